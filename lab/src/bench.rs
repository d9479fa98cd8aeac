//! What every netns benchmark binary shares: how it starts, where its results go, and how it
//! describes the machine they come from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{Family, Rig, RigSpec};

/// How a benchmark run goes, from its command line and environment.
pub enum Run {
    /// `cargo test --benches` probes benchmark binaries with `--list`: nothing to run.
    Listing,
    /// A run; `quick` (WGLB_BENCH_QUICK set) asks for short runs, to try the rig, not for
    /// figures.
    Measure { quick: bool },
}

impl Run {
    /// How many trials a benchmark of `full` trials runs: one when quick, none when listing.
    pub fn trials(&self, full: usize) -> usize {
        match self {
            Run::Listing => 0,
            Run::Measure { quick: true } => 1,
            Run::Measure { quick: false } => full,
        }
    }
}

/// Starts a benchmark: it needs root (namespaces, raw sockets, BPF).
pub fn begin() -> Result<Run> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(Run::Listing);
    }
    crate::require_root()?;
    Ok(Run::Measure {
        quick: std::env::var_os("WGLB_BENCH_QUICK").is_some(),
    })
}

/// The rig of the packet benchmarks: one client (the generator's namespace) and two gateway
/// hosts whose WireGuard and health servers are stopped, so that their addresses are free for
/// [`crate::generator::Sinks`].
pub fn sink_rig() -> Result<Rig> {
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 2,
        client_ports: vec![41_000],
        keepalive: None,
    })?;
    for j in 0..2 {
        rig.stop_gateway(j)?;
    }
    Ok(rig)
}

/// Writes `benches/results/STEM.csv` and `STEM.md` (`manifest_dir`: the bench's
/// `CARGO_MANIFEST_DIR`) and returns the directory.
pub fn write_results(manifest_dir: &str, stem: &str, csv: &str, markdown: &str) -> Result<PathBuf> {
    let out = Path::new(manifest_dir).join("../benches/results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join(format!("{stem}.csv")), csv)?;
    std::fs::write(out.join(format!("{stem}.md")), markdown)?;
    Ok(out)
}

/// A binary of this workspace, built before the benchmark runs (`cargo build --release -p wglb`,
/// as `scripts/bench.sh` does): it sits beside the directory of the benchmark's own executable
/// (`target/release/deps/`), in the profile's directory.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .context("the benchmark's executable has no target directory")?;
    let path = profile.join(name);
    anyhow::ensure!(
        path.exists(),
        "no {name} binary at {} (cargo build --release -p {name} first; scripts/bench.sh does)",
        path.display()
    );
    Ok(path)
}

/// The machine, as benchmark results describe it.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} x {model}, {memory} GiB, Linux {}", kernel.trim())
}
