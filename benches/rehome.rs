//! Re-homing at scale: 500 WireGuard clients (the lab's swarm: boringtun handshakes in one
//! process) on three wireguard-go gateways with an agent each; the gateway holding the most of
//! them dies, and its clients are called by the gateways they move to. Measured from the
//! death: when each moved client was called (and answered), the time to the last one, and
//! whether the balancer's pacing of orders (`orders_per_second`, 200 by default) held: a
//! gateway given k clients cannot have called the last of them sooner than (k - 1) / 200 s
//! after its first order.
//!
//! Every moved client must be called (the benchmark fails otherwise). Writes
//! `benches/results/rehome.{csv,md}`. Run (as root): `sudo bash scripts/bench.sh rehome`, or
//! `cargo bench -p wglb-benches --bench rehome` with `wglb-agent` built (`cargo build --release -p
//! wglb-agent`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use wglb_lab::bench::{self, machine};
use wglb_lab::contender::{Contender, Setup};
use wglb_lab::swarm::Swarm;
use wglb_lab::{agents, metrics, wait_for, Family, Rig, RigSpec};

const CLIENTS: usize = 500;
const FIRST_PORT: u16 = 42_000;
const GATEWAYS: usize = 3;
/// The balancer's default `orders_per_second` per gateway.
const ORDERS_PER_SECOND: f64 = 200.0;

struct Trial {
    moved: usize,
    /// Per new gateway: how many clients it called, and the time from the first call to the
    /// last (the pacing bound is (k - 1) / rate).
    per_gateway: Vec<(String, usize, Duration)>,
    /// From the death to each moved client's call, sorted.
    called_after: Vec<Duration>,
}

fn trial(contender: Contender) -> Result<Trial> {
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: GATEWAYS,
        // One client namespace, whose address the swarm's clients share (one port each).
        client_ports: vec![41_000],
        keepalive: None,
    })?;
    let (secrets, public_keys) = Swarm::keys(CLIENTS);
    rig.add_gateway_peers(&public_keys)?;
    let dir = rig.temp_dir().to_path_buf();
    let wglb = &bench::workspace_binary("wglb")?;
    let agent = agents::agent_binary(wglb)?;
    let running = contender.start(
        &Setup {
            rig: &rig,
            wglb,
            dir: &dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 51820)),
            gateways: (0..GATEWAYS).map(|j| rig.gateway_addr(j)).collect(),
            health_port: Some(rig.gateway_health_port()),
            wglb_listener_extra: String::new(),
            wglb_datapath_extra: String::new(),
            agent: Some(&agent),
            relay: None,
        },
        || Ok(()),
    )?;
    let swarm = Swarm::start(
        rig.client_ns(0),
        rig.client_addr(0).ip(),
        FIRST_PORT,
        rig.listen_addr(0),
        rig.gateway_public_key(),
        secrets,
    )?;
    wait_for(
        format!("{CLIENTS} clients to connect"),
        Duration::from_secs(60),
        || {
            let connected = swarm
                .logs()
                .iter()
                .filter(|l| l.connected.is_some())
                .count();
            Ok((connected == CLIENTS).then_some(()))
        },
    )?;
    // Every agent has told the balancer of its gateway's clients, and the balancer counts
    // every session (under XDP, from its next sweep).
    wait_for(
        "the agents to report every client, and the balancer to count it",
        Duration::from_secs(20),
        || {
            let text = running.wglb_metrics()?;
            let reported = metrics::sum(&text, "wglb_agent_peers{");
            let counted = metrics::sum(&text, "wglb_sessions{");
            let all = Some(CLIENTS as f64);
            Ok((reported == all && counted == all).then_some(()))
        },
    )?;
    let text = running.wglb_metrics()?;
    let sessions: Vec<f64> = (0..GATEWAYS)
        .map(|j| metrics::sum(&text, &format!("wglb_sessions{{gateway=\"gw{j}\"")).unwrap_or(0.0))
        .collect();
    let victim = (0..GATEWAYS)
        .max_by(|&a, &b| sessions[a].total_cmp(&sessions[b]))
        .context("a gateway")?;
    let moved = sessions[victim] as usize;
    ensure!(moved > 0, "no gateway holds a session: {sessions:?}");
    rig.stop_gateway(victim)?;
    let killed = SystemTime::now();
    let completed = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("wglb_rehome_orders_total{") && l.contains("result=\"completed\"")
            })
            .filter_map(metrics::sample_value)
            .sum::<f64>()
    };
    wait_for(
        format!("{moved} re-homed clients to complete their handshakes"),
        Duration::from_secs(60),
        || Ok((completed(&running.wglb_metrics()?) == moved as f64).then_some(())),
    )
    .with_context(|| {
        let text = running.wglb_metrics().unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("wglb_rehome_orders_total"))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let logs = swarm.logs();
    let mut called_after: Vec<Duration> = logs
        .iter()
        .filter_map(|l| l.called.iter().find(|at| **at >= killed))
        .map(|at| at.duration_since(killed).unwrap_or_default())
        .collect();
    called_after.sort();
    ensure!(
        called_after.len() == moved,
        "{} clients were called, {moved} moved",
        called_after.len()
    );
    // Which gateway called whom: the balancer's orders per gateway, and the spread of the
    // calls each made, read from the clients' own logs in order of their new gateway.
    let text = running.wglb_metrics()?;
    let placed = sessions_by_client(wglb, &dir.join("api.sock"))?;
    let mut per_gateway = Vec::new();
    let mut calls: HashMap<String, Vec<SystemTime>> = HashMap::new();
    for (i, log) in logs.iter().enumerate() {
        if let Some(at) = log.called.iter().find(|at| **at >= killed) {
            let client = SocketAddr::new(rig.client_addr(0).ip(), FIRST_PORT + i as u16);
            let gateway = placed
                .get(&client)
                .with_context(|| format!("no session of {client}"))?;
            calls.entry(gateway.clone()).or_default().push(*at);
        }
    }
    for (gateway, times) in calls {
        let first = times.iter().min().copied().unwrap_or(killed);
        let last = times.iter().max().copied().unwrap_or(killed);
        let series = format!("wglb_rehome_orders_total{{gateway=\"{gateway}\",listener=\"bench\",result=\"completed\"}}");
        let orders = metrics::sum(&text, &series).unwrap_or(0.0) as usize;
        ensure!(
            orders == times.len(),
            "{gateway} completed {orders} orders but called {} clients",
            times.len()
        );
        let spread = last.duration_since(first).unwrap_or_default();
        per_gateway.push((gateway, times.len(), spread));
    }
    per_gateway.sort();
    drop(swarm);
    drop(running);
    Ok(Trial {
        moved,
        per_gateway,
        called_after,
    })
}

/// Each client's gateway as the balancer forwards it now (`wglb sessions --all --json`).
fn sessions_by_client(wglb: &Path, api: &Path) -> Result<HashMap<SocketAddr, String>> {
    let output = std::process::Command::new(wglb)
        .arg("--api")
        .arg(api)
        .args(["--json", "sessions", "--all"])
        .output()?;
    ensure!(
        output.status.success(),
        "wglb sessions: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    listed["sessions"]
        .as_array()
        .context("a session list")?
        .iter()
        .map(|s| {
            let client = s["client"].as_str().context("a client")?.parse()?;
            let gateway = s["gateway"].as_str().context("a gateway")?.to_string();
            Ok((client, gateway))
        })
        .collect()
}

fn main() -> Result<()> {
    let trials = bench::begin()?.trials(3);
    if trials == 0 {
        return Ok(());
    }
    let mut csv = String::from(
        "contender,trial,moved,median_s,last_s,gateway,called,first_to_last_s,pacing_floor_s\n",
    );
    let mut md = format!(
        "# Re-homing {CLIENTS} clients at once\n\nCommand: `sudo bash scripts/bench.sh rehome` (runs `cargo bench -p wglb-benches --bench rehome`).\n\n\
         Machine: {}\n\n{CLIENTS} WireGuard clients (boringtun handshakes, one process, one port each) on {GATEWAYS} wireguard-go gateways \
         with `wglb-agent` each; the gateway with the most clients dies (WireGuard and `/health`). Called: from its death to the moment a \
         client received its new gateway's handshake initiation and answered. Pacing: a gateway given k clients needs at least \
         (k - 1) / {ORDERS_PER_SECOND} s from its first call to its last. {trials} trials each.\n\n\
         | contender | moved | median called after | last called after | per new gateway: called, first to last (pacing floor) |\n|---|---|---|---|---|\n",
        machine()
    );
    for contender in [Contender::Userspace, Contender::XdpGeneric] {
        for n in 0..trials {
            let result =
                trial(contender).with_context(|| format!("{} trial {n}", contender.name()))?;
            let median = result.called_after[result.called_after.len() / 2];
            let last = *result.called_after.last().context("a moved client")?;
            eprintln!(
                "{}, trial {n}: {} moved, median {median:?}, last {last:?}",
                contender.name(),
                result.moved
            );
            let mut shown = Vec::new();
            for (gateway, called, spread) in &result.per_gateway {
                let floor = (*called as f64 - 1.0).max(0.0) / ORDERS_PER_SECOND;
                let _ = writeln!(
                    csv,
                    "{},{n},{},{:.3},{:.3},{gateway},{called},{:.3},{floor:.3}",
                    contender.name(),
                    result.moved,
                    median.as_secs_f64(),
                    last.as_secs_f64(),
                    spread.as_secs_f64()
                );
                shown.push(format!(
                    "{gateway} {called}, {:.2} s ({floor:.2} s)",
                    spread.as_secs_f64()
                ));
            }
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} s | {:.2} s | {} |",
                contender.name(),
                result.moved,
                median.as_secs_f64(),
                last.as_secs_f64(),
                shown.join("; ")
            );
        }
    }
    bench::write_results(env!("CARGO_MANIFEST_DIR"), "rehome", &csv, &md)?;
    println!("{md}");
    Ok(())
}
