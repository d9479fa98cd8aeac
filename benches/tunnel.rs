//! Real WireGuard through wglb: iperf3 TCP inside a wireguard-go tunnel, through wglb on each
//! datapath and directly (the balancer namespace only routing), in one run on one rig. The
//! tunnel's own cost (wireguard-go encrypting in userspace on both ends) bounds all of them; the
//! figure is what wglb takes away from it.
//!
//! Writes `benches/results/tunnel.{csv,md}`. Run (as root): `sudo bash scripts/bench.sh`, or
//! `cargo bench -p wglb-benches --bench tunnel` with iperf3 installed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use wglb_lab::bench::{self, machine};
use wglb_lab::contender::{Contender, Setup};
use wglb_lab::{Daemon, Family, Rig, RigSpec};

const SECONDS: u64 = 8;
const CONTENDERS: [Contender; 4] = [
    Contender::KernelForwarding,
    Contender::Userspace,
    Contender::XdpNative,
    Contender::XdpGeneric,
];
/// The gateway's address inside the tunnel, where iperf3 listens.
const TUNNEL_SERVER: &str = "10.99.0.1";

fn name(contender: Contender) -> &'static str {
    match contender {
        Contender::KernelForwarding => "direct (routed, no balancer)",
        other => other.name(),
    }
}

/// Mbit/s received by the iperf3 server over `SECONDS`.
fn iperf(rig: &Rig) -> Result<f64> {
    let json = wglb_lab::run(rig.client_ns(0).command("iperf3").args([
        "-c",
        TUNNEL_SERVER,
        "-t",
        &SECONDS.to_string(),
        "-J",
    ]))?;
    let value: serde_json::Value = serde_json::from_str(&json)?;
    value["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bits| bits / 1e6)
        .with_context(|| format!("no throughput in iperf3's report: {json}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let rounds = bench::begin()?.trials(3);
    if rounds == 0 {
        return Ok(());
    }
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 1,
        client_ports: vec![41_000],
        keepalive: None,
    })?;
    rig.route_through_balancer()?;
    rig.start_client(0)?;
    let dir = rig.temp_dir().to_path_buf();
    let wglb = bench::workspace_binary("wglb")?;
    let _server = Daemon::spawn(
        rig.gateway_ns(0),
        Path::new("iperf3"),
        &["-s", "-B", TUNNEL_SERVER],
        &dir.join("iperf3-server.log"),
    )?;
    let setup = Setup {
        rig: &rig,
        wglb: &wglb,
        dir: &dir,
        listen: rig.listen_addr(0),
        gateways: vec![rig.gateway_addr(0)],
        health_port: None,
        wglb_listener_extra: String::new(),
        wglb_datapath_extra: String::new(),
        agent: None,
        relay: None,
    };
    let mut runs: Vec<(Contender, Vec<f64>)> =
        CONTENDERS.iter().map(|&c| (c, Vec::new())).collect();
    for round in 0..rounds {
        for (contender, results) in runs.iter_mut() {
            let endpoint = if contender.routes_to_gateways() {
                rig.gateway_addr(0)
            } else {
                setup.listen
            };
            rig.set_client_endpoint(0, endpoint)?;
            let _running = contender.start(&setup, || rig.ping_with_size(0, 56))?;
            // iperf3's server answers one client at a time: a failed run is retried once.
            let mbps = iperf(&rig).or_else(|_| iperf(&rig))?;
            eprintln!("round {round}, {}: {mbps:.0} Mbit/s", name(*contender));
            results.push(mbps);
        }
    }
    let medians: Vec<(Contender, f64)> = runs.into_iter().map(|(c, r)| (c, median(r))).collect();
    let direct = medians[0].1;
    let mut csv = String::from("path,mbit_per_s,ratio_to_direct\n");
    let mut md = format!(
        "# iperf3 TCP inside a wireguard-go tunnel\n\nCommand: `sudo bash scripts/bench.sh` (runs `cargo bench -p wglb-benches --bench tunnel`).\n\n\
         Machine: {}\n\nOne client and one gateway (wireguard-go, MTU 1420), {SECONDS} s per run, median of {rounds} alternating rounds.\n\n\
         | path | Mbit/s | through wglb / direct |\n|---|---|---|\n",
        machine()
    );
    for (contender, mbps) in &medians {
        let _ = writeln!(csv, "{},{mbps:.1},{:.3}", name(*contender), mbps / direct);
        let _ = writeln!(
            md,
            "| {} | {mbps:.0} | {:.2}x |",
            name(*contender),
            mbps / direct
        );
    }
    md += "\nTarget: through wglb at least 0.9x of direct.\n";
    bench::write_results(env!("CARGO_MANIFEST_DIR"), "tunnel", &csv, &md)?;
    println!("{md}");
    Ok(())
}
