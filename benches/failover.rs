//! Failover trials with real wireguard-go: the time from a gateway's death (WireGuard and its
//! `/health` both stop) to the first reply its client gets through another gateway, for wglb
//! with and without gateway agents and for the balancers users would pick instead, and whether
//! clients of the other gateway noticed.
//!
//! Without agents WireGuard sets the floor: a client whose data goes unanswered handshakes again
//! after KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s), and only then can another gateway answer. A
//! balancer can only add to that: wglb must notice the death (health checks) and evict the
//! session before the client's new handshake, or the handshake goes to the dead gateway too.
//! With agents (`wglb-agent` beside each gateway) wglb breaks the floor: the dead gateway's
//! agent reports its interface gone, and the new gateway's agent makes it call the client.
//! nftables DNAT keeps a flow on its conntrack entry, which the client's own retries keep
//! alive; nginx stream has no active health checks in its open-source build, only passive ones.
//!
//! Writes `benches/results/failover.{csv,md}`. Run (as root): `sudo bash scripts/bench.sh`, or
//! `cargo bench -p wglb-benches --bench failover` with nginx, libnginx-mod-stream and nftables installed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use wglb_lab::bench::{self, machine};
use wglb_lab::contender::{Contender, Setup};
use wglb_lab::{Family, Rig, RigSpec};

const CLIENTS: usize = 4;
/// WireGuard's own floor for a session that moves.
const FLOOR: Duration = Duration::from_secs(15);
/// How long a trial waits for the dead gateway's client before calling it stranded.
const GIVE_UP: Duration = Duration::from_secs(45);
/// Each contender, and whether its gateways have agents (only wglb has any use for them).
const CONTENDERS: [(Contender, bool); 6] = [
    (Contender::Userspace, true),
    (Contender::XdpGeneric, true),
    (Contender::Userspace, false),
    (Contender::XdpGeneric, false),
    (Contender::Nginx, false),
    (Contender::Nftables, false),
];

fn name(contender: Contender, agents: bool) -> String {
    if agents {
        format!("{} + agents", contender.name())
    } else {
        contender.name().to_string()
    }
}

struct Trial {
    /// Time to the first reply through another gateway; None: not within GIVE_UP.
    failover: Option<Duration>,
    /// Clients of the surviving gateway, and how many of them handshook again or moved.
    survivors: usize,
    survivors_disturbed: usize,
}

fn trial(contender: Contender, agents: bool) -> Result<Trial> {
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 2,
        client_ports: (0..CLIENTS as u16).map(|i| 41_000 + 7 * i).collect(),
        keepalive: None,
    })?;
    let dir = rig.temp_dir().to_path_buf();
    let wglb = &bench::workspace_binary("wglb")?;
    let agent = agents
        .then(|| wglb_lab::agents::agent_binary(wglb))
        .transpose()?;
    let running = contender.start(
        &Setup {
            rig: &rig,
            wglb,
            dir: &dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 51820)),
            gateways: vec![rig.gateway_addr(0), rig.gateway_addr(1)],
            health_port: Some(rig.gateway_health_port()),
            wglb_listener_extra: String::new(),
            wglb_datapath_extra: String::new(),
            agent: agent.as_deref(),
            relay: None,
        },
        || Ok(()),
    )?;
    let start = SystemTime::now();
    let mut pingers = Vec::new();
    for i in 0..CLIENTS {
        rig.start_client(i)?;
        pingers.push(rig.pinger(i)?);
    }
    for pinger in &pingers {
        pinger.wait_reply_after(start, Duration::from_secs(20))?;
    }
    // Late first handshakes have a retransmission behind them (5 s): let them settle.
    std::thread::sleep(Duration::from_secs(7));
    let serving: Vec<usize> = (0..CLIENTS)
        .map(|i| rig.gateway_serving(i)?.context("a client with no gateway"))
        .collect::<Result<_>>()?;
    let handshakes: Vec<Option<u64>> = (0..CLIENTS)
        .map(|i| rig.client_latest_handshake(i))
        .collect::<Result<_>>()?;
    let dead = serving[0];
    rig.stop_gateway(dead)?;
    let killed = SystemTime::now();
    // Replies the gateway sent just before it died may still arrive.
    let after = killed + Duration::from_millis(300);
    let failover = pingers[0]
        .wait_reply_after(after, GIVE_UP)
        .ok()
        .map(|at| at.duration_since(killed).unwrap_or_default());
    let survivors: Vec<usize> = (0..CLIENTS).filter(|&i| serving[i] != dead).collect();
    let mut disturbed = 0;
    for &i in &survivors {
        if rig.client_latest_handshake(i)? != handshakes[i]
            || rig.gateway_serving(i)? != Some(serving[i])
        {
            disturbed += 1;
        }
    }
    drop(running);
    Ok(Trial {
        failover,
        survivors: survivors.len(),
        survivors_disturbed: disturbed,
    })
}

fn main() -> Result<()> {
    let trials = bench::begin()?.trials(3);
    if trials == 0 {
        return Ok(());
    }
    let mut csv =
        String::from("contender,trial,failover_s,beyond_floor_s,survivors,survivors_disturbed\n");
    let mut md = format!(
        "# Failover: a gateway dies under a live WireGuard session\n\nCommand: `sudo bash scripts/bench.sh` (runs `cargo bench -p wglb-benches --bench failover`).\n\n\
         Machine: {}\n\n{CLIENTS} wireguard-go clients pinging through the balancer every 0.2 s, 2 gateways; the gateway of client 0 stops \
         (WireGuard and `/health`). Failover: from its death to client 0's first reply through the other gateway (a reply counts from 0.3 s after the death, \
         as one the dying gateway sent may still be on its way: no failover reads below 0.3 s); without help WireGuard's floor is 15 s (the client's own re-handshake); \"+ agents\": each gateway runs `wglb-agent`, and the new gateway calls the client. \
         Survivors: clients of the other gateway; disturbed: handshook again or moved. {trials} trials each; stranded = no reply within {} s.\n\n\
         | contender | failover per trial | median | survivors disturbed |\n|---|---|---|---|\n",
        machine(),
        GIVE_UP.as_secs()
    );
    for (contender, agents) in CONTENDERS {
        let name = name(contender, agents);
        let mut times = Vec::new();
        let (mut survivors, mut disturbed) = (0, 0);
        for n in 0..trials {
            let result = trial(contender, agents).with_context(|| format!("{name} trial {n}"))?;
            let shown = result.failover.map_or("stranded".to_string(), |d| {
                format!("{:.2} s", d.as_secs_f64())
            });
            eprintln!("{name}, trial {n}: {shown}");
            let _ = writeln!(
                csv,
                "{name},{n},{},{},{},{}",
                result
                    .failover
                    .map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64())),
                result.failover.map_or(String::new(), |d| format!(
                    "{:.2}",
                    d.as_secs_f64() - FLOOR.as_secs_f64()
                )),
                result.survivors,
                result.survivors_disturbed
            );
            times.push(result.failover);
            survivors += result.survivors;
            disturbed += result.survivors_disturbed;
        }
        let shown: Vec<String> = times
            .iter()
            .map(|t| {
                t.map_or("stranded".to_string(), |d| {
                    format!("{:.2} s", d.as_secs_f64())
                })
            })
            .collect();
        let mut done: Vec<f64> = times.iter().flatten().map(|d| d.as_secs_f64()).collect();
        done.sort_by(f64::total_cmp);
        let median = if done.len() == times.len() {
            format!("{:.2} s", done[done.len() / 2])
        } else {
            "n/a (stranded)".to_string()
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {median} | {disturbed} of {survivors} |",
            shown.join(", ")
        );
    }
    md += "\nTargets: with agents, wglb's failover takes at most 1 s (median) and 2 s (worst); without, it adds at most 1 s beyond the WireGuard floor; sessions on healthy gateways: 0 moved.\n";
    bench::write_results(env!("CARGO_MANIFEST_DIR"), "failover", &csv, &md)?;
    println!("{md}");
    Ok(())
}
