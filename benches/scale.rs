//! Scale: packets/s and memory with 1k, 100k and 1M live sessions, on the netns rig.
//!
//! Sessions are made by sending one 64-byte WireGuard transport message from each of N source
//! tuples (16 client addresses, the generator's raw socket spoofing them on the client's link);
//! then the generator sends flat out round-robin over all N, so every packet looks up a live
//! session in a table of N. Memory: the balancer's resident set, the memory the kernel charges
//! for its BPF maps (`memlock` in /proc/PID/fdinfo), and for the userspace datapath the kernel's
//! slab (a socket per session).
//!
//! The XDP datapath sends from its NAT ports, one session per port per gateway: 32 gateways (16
//! UDP ports on each of the rig's two gateway hosts) and NAT ports 1024-59999 give it room for
//! 1.9M. The userspace datapath has a socket, so a local port, per session: at most ~64k per
//! balancer address, so it is measured at 1k and 50k; 100k and 1M need shared upstream sockets,
//! which it does not have.
//!
//! Writes `benches/results/scale.{csv,md}`. Run (as root): `sudo bash scripts/bench.sh`, or
//! `cargo bench -p wglb-benches --bench scale`.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use wglb_lab::bench::{self, machine, Run};
use wglb_lab::contender::{Contender, Running, Setup};
use wglb_lab::generator::{self, v4_socket, Flows, Sinks};
use wglb_lab::{metrics, Rig};

const GENERATOR_CPU: usize = 0;
const PORTS_PER_GATEWAY_HOST: u16 = 16;
const XDP_TABLE: usize = 1_100_000;

/// What one level measured.
struct Level {
    contender: Contender,
    sessions: usize,
    held: f64,
    /// Delivered to the sinks, and offered by the generator.
    pps: f64,
    offered_pps: f64,
    rss_bytes: u64,
    bpf_bytes: u64,
    slab_bytes: u64,
}

impl Level {
    fn loss(&self) -> f64 {
        1.0 - self.pps / self.offered_pps.max(1.0)
    }
}

/// Loss below this and the balancer kept up with everything offered: the generator, not the
/// balancer, bounded the run, so its packets/s say nothing about the balancer's limit.
const BOUND_BY_GENERATOR: f64 = 0.01;

/// The XDP datapath's 1M level against its 1k level, or why the run cannot say.
fn verdict(levels: &[Level]) -> String {
    let xdp = |n: usize| {
        levels
            .iter()
            .find(|l| l.contender == Contender::XdpGeneric && l.sessions == n)
    };
    let (Some(small), Some(large)) = (xdp(1_000), xdp(1_000_000)) else {
        return "Not measured: a level is missing.".into();
    };
    if small.loss() < BOUND_BY_GENERATOR && large.loss() < BOUND_BY_GENERATOR {
        return format!(
            "No verdict: both levels delivered what the generator offered (loss {:.1} % and {:.1} %), so the generator bounded them, not the balancer.",
            small.loss() * 100.0,
            large.loss() * 100.0
        );
    }
    let ratio = large.pps / small.pps;
    format!(
        "{ratio:.2}x: {}.",
        if ratio >= 0.9 { "met" } else { "missed" }
    )
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What the kernel charges for the BPF maps `pid` holds open.
fn bpf_map_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

fn slab_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn sysctl(rig: &Rig, setting: &str) -> Result<()> {
    wglb_lab::run(
        rig.balancer_ns()
            .command("sysctl")
            .args(["-q", "-w", setting]),
    )?;
    Ok(())
}

/// The sessions the balancer holds; `None` before it reports any.
fn held(running: &Running) -> Result<Option<f64>> {
    Ok(metrics::sum(&running.wglb_metrics()?, "wglb_sessions{"))
}

fn main() -> Result<()> {
    let quick = match bench::begin()? {
        Run::Listing => return Ok(()),
        Run::Measure { quick } => quick,
    };
    // A session per socket: the userspace datapath needs a descriptor each (it raises its soft
    // limit, but only up to the hard one it inherits from here).
    // Without CAP_SYS_RESOURCE (some containers) the hard limit stays and bounds the level.
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, 1 << 20, 1 << 20);
    let (_, files) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let userspace_top = (files.saturating_sub(2_000) / 1_000 * 1_000).clamp(1_000, 50_000) as usize;
    let seconds = if quick { 2 } else { 5 };
    let rig = bench::sink_rig()?;
    let gateways: Vec<SocketAddr> = (0..2)
        .flat_map(|j| {
            let ip = rig.gateway_addr(j).ip();
            (0..PORTS_PER_GATEWAY_HOST).map(move |p| SocketAddr::new(ip, 51820 + p))
        })
        .collect();
    let sinks = Sinks::start(&rig, &gateways)?;
    let dir = rig.temp_dir().to_path_buf();
    let wglb = bench::workspace_binary("wglb")?;
    let clients: Vec<Ipv4Addr> = (10..26).map(|h| Ipv4Addr::new(10, 201, 0, h)).collect();
    let listen = rig.listen_addr(0);
    let plan: [(Contender, &[usize]); 2] = [
        (Contender::Userspace, &[1_000, userspace_top]),
        (Contender::XdpGeneric, &[1_000, 100_000, 1_000_000]),
    ];
    let mut levels = Vec::new();
    for (contender, sizes) in plan {
        let (ports, table, nat) = match contender {
            Contender::Userspace => ("1024 65535", 60_000, ""),
            _ => ("60000 65535", XDP_TABLE, "nat_ports = \"1024-59999\""),
        };
        sysctl(&rig, &format!("net.ipv4.ip_local_port_range={ports}"))?;
        for &size in sizes {
            let sources = generator::sources(&clients, 1024, size);
            let flows = Arc::new(Flows::new(&sources, |_| v4_socket(listen), 64));
            let slab_before = slab_bytes();
            let setup = Setup {
                rig: &rig,
                wglb: &wglb,
                dir: &dir,
                listen,
                gateways: gateways.clone(),
                health_port: None,
                // Every session stays unconfirmed until its sink answers: probation as large as
                // the table, so that filling it is not a race against the LRU.
                wglb_listener_extra: format!(
                    "table_size = {table}\nprobation_size = {table}\nsocket_buffer = 16777216"
                ),
                wglb_datapath_extra: nat.to_string(),
                agent: None,
                relay: None,
            };
            let once = Duration::from_secs_f64(size as f64 / 100_000.0 + 1.0);
            let running = contender.start(&setup, || {
                generator::send(rig.client_ns(0), &flows, 100_000, once, GENERATOR_CPU).map(drop)
            })?;
            // The XDP datapath counts its sessions at its sweeps; userspace at once.
            let count = wglb_lab::wait_for(
                format!("{} sessions", size),
                Duration::from_secs(60),
                || {
                    // A balancer busy opening sockets may answer a scrape late, and the XDP
                    // datapath reports no count before its first sweep: no count yet, ask again.
                    let full = |now: &f64| *now >= size as f64 * 0.99;
                    let now = held(&running).ok().flatten().filter(full);
                    if now.is_none() {
                        generator::send(rig.client_ns(0), &flows, 100_000, once, GENERATOR_CPU)?;
                    }
                    Ok(now)
                },
            )
            .with_context(|| format!("{}: filling the table", contender.name()))?;
            sinks.reset();
            let sent = generator::send(
                rig.client_ns(0),
                &flows,
                0,
                Duration::from_secs(seconds),
                GENERATOR_CPU,
            )?;
            std::thread::sleep(Duration::from_millis(300));
            let (delivered, _) = sinks.count();
            let pid = running.pid().context("wglb runs")?;
            let level = Level {
                contender,
                sessions: size,
                held: count,
                pps: delivered as f64 / sent.seconds,
                offered_pps: sent.packets as f64 / sent.seconds,
                rss_bytes: status_kb(pid, "VmRSS:") * 1024,
                bpf_bytes: bpf_map_bytes(pid),
                slab_bytes: slab_bytes().saturating_sub(slab_before),
            };
            eprintln!(
                "{} with {size} sessions ({count} held): {:.0} packets/s of {:.0} offered, RSS {} MB, BPF maps {} MB, slab +{} MB",
                contender.name(),
                level.pps,
                sent.packets as f64 / sent.seconds,
                level.rss_bytes >> 20,
                level.bpf_bytes >> 20,
                level.slab_bytes >> 20
            );
            levels.push(level);
            drop(running);
        }
    }
    sysctl(&rig, "net.ipv4.ip_local_port_range=32768 60999")?;
    drop(sinks);

    let mut csv = String::from(
        "contender,sessions,sessions_held,pps,offered_pps,rss_bytes,bpf_map_bytes,slab_growth_bytes\n",
    );
    let mut md = format!(
        "# Scale: packets/s and memory by live sessions\n\nCommand: `sudo bash scripts/bench.sh` (runs `cargo bench -p wglb-benches --bench scale`).\n\n\
         Machine: {}\n\n64-byte WireGuard transport messages, flat out round-robin over every session's source tuple for {seconds} s \
         (generator pinned to CPU {GENERATOR_CPU}); 32 gateways. The userspace datapath's largest level is bounded by the open-file limit \
         ({files} here) as well as by its ports.\n\n\
         | datapath | sessions | packets/s | offered | loss | vs 1k | process RSS | BPF maps | kernel slab growth |\n|---|---|---|---|---|---|---|---|---|\n",
        machine()
    );
    for level in &levels {
        let base = levels
            .iter()
            .find(|l| l.contender == level.contender && l.sessions == 1_000)
            .map_or(level.pps, |l| l.pps);
        let _ = writeln!(
            csv,
            "{},{},{:.0},{:.0},{:.0},{},{},{}",
            level.contender.name(),
            level.sessions,
            level.held,
            level.pps,
            level.offered_pps,
            level.rss_bytes,
            level.bpf_bytes,
            level.slab_bytes
        );
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} % | {:.2}x | {} MB | {} MB | {} MB |",
            level.contender.name(),
            level.sessions,
            level.pps,
            level.offered_pps,
            level.loss() * 100.0,
            level.pps / base,
            level.rss_bytes >> 20,
            level.bpf_bytes >> 20,
            level.slab_bytes >> 20
        );
    }
    let per_session = |contender: Contender, key: fn(&Level) -> u64| {
        let of = |n: usize| {
            levels
                .iter()
                .find(|l| l.contender == contender && l.sessions == n)
        };
        let (small, large) = (
            of(1_000)?,
            levels
                .iter()
                .filter(|l| l.contender == contender)
                .max_by_key(|l| l.sessions)?,
        );
        Some((key(large) as f64 - key(small) as f64) / (large.sessions - small.sessions) as f64)
    };
    md += "\nPer session (growth from 1k to the largest level):\n\n";
    if let Some(rss) = per_session(Contender::Userspace, |l| l.rss_bytes) {
        let slab = per_session(Contender::Userspace, |l| l.slab_bytes).unwrap_or(0.0);
        let _ = writeln!(
            md,
            "- userspace: {rss:.0} B of process memory and {slab:.0} B of kernel slab (its socket) per session; the target is 150 B in the table at 1M sessions: missed, bound by a socket per session."
        );
    }
    if let Some(largest) = levels
        .iter()
        .filter(|l| l.contender == Contender::XdpGeneric)
        .max_by_key(|l| l.sessions)
    {
        let rss = per_session(Contender::XdpGeneric, |l| l.rss_bytes).unwrap_or(0.0);
        let _ = writeln!(
            md,
            "- XDP: the kernel allocates its maps whole at start, from table_size ({XDP_TABLE} here): {} B per session slot, whether used or not; the process adds {rss:.0} B per live session.",
            largest.bpf_bytes / XDP_TABLE as u64
        );
    }
    md += "\nTarget: packets/s at 1M sessions at least 0.9x of that at 1k. ";
    md += &verdict(&levels);
    md += "\n";
    bench::write_results(env!("CARGO_MANIFEST_DIR"), "scale", &csv, &md)?;
    println!("{md}");
    Ok(())
}
