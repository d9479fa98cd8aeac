//! Failover trials with real wireguard-go: the time from a gateway's death (WireGuard and its
//! `/health` both stop) to the first reply its client gets through another gateway, for wglb and
//! for the balancers users would pick instead, and whether clients of the other gateway noticed.
//!
//! WireGuard sets the floor: a client whose data goes unanswered handshakes again after
//! KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s), and only then can another gateway answer. A
//! balancer can only add to that: wglb must notice the death (health checks) and evict the
//! session before the client's new handshake, or the handshake goes to the dead gateway too.
//! nftables DNAT keeps a flow on its conntrack entry, which the client's own retries keep
//! alive; nginx stream has no active health checks in its open-source build, only passive ones.
//!
//! Writes `benches/results/failover.{csv,md}`. Run (as root): `sudo bash scripts/bench.sh`, or
//! `cargo bench -p wglb --bench failover` with nginx, libnginx-mod-stream and nftables installed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use wglb_lab::bench::{self, machine, Run};
use wglb_lab::contender::{Contender, Setup};
use wglb_lab::{Family, Rig, RigSpec};

const CLIENTS: usize = 4;
/// WireGuard's own floor for a session that moves.
const FLOOR: Duration = Duration::from_secs(15);
/// How long a trial waits for the dead gateway's client before calling it stranded.
const GIVE_UP: Duration = Duration::from_secs(45);
const CONTENDERS: [Contender; 4] = [
    Contender::Userspace,
    Contender::XdpGeneric,
    Contender::Nginx,
    Contender::Nftables,
];

struct Trial {
    /// Time to the first reply through another gateway; None: not within GIVE_UP.
    failover: Option<Duration>,
    /// Clients of the surviving gateway, and how many of them handshook again or moved.
    survivors: usize,
    survivors_disturbed: usize,
}

fn trial(contender: Contender) -> Result<Trial> {
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 2,
        client_ports: (0..CLIENTS as u16).map(|i| 41_000 + 7 * i).collect(),
        keepalive: None,
    })?;
    let dir = rig.temp_dir().to_path_buf();
    let running = contender.start(
        &Setup {
            rig: &rig,
            wglb: Path::new(env!("CARGO_BIN_EXE_wglb")),
            dir: &dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 51820)),
            gateways: vec![rig.gateway_addr(0), rig.gateway_addr(1)],
            health_port: Some(rig.gateway_health_port()),
            wglb_listener_extra: String::new(),
            wglb_datapath_extra: String::new(),
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
    let trials = match bench::begin()? {
        Run::Listing => return Ok(()),
        Run::Measure { quick } => {
            if quick {
                1
            } else {
                3
            }
        }
    };
    let mut csv =
        String::from("contender,trial,failover_s,beyond_floor_s,survivors,survivors_disturbed\n");
    let mut md = format!(
        "# Failover: a gateway dies under a live WireGuard session\n\nCommand: `sudo bash scripts/bench.sh` (runs `cargo bench -p wglb --bench failover`).\n\n\
         Machine: {}\n\n{CLIENTS} wireguard-go clients pinging through the balancer every 0.2 s, 2 gateways; the gateway of client 0 stops \
         (WireGuard and `/health`). Failover: from its death to client 0's first reply through the other gateway; WireGuard's floor is 15 s. \
         Survivors: clients of the other gateway; disturbed: handshook again or moved. {trials} trials each; stranded = no reply within {} s.\n\n\
         | contender | failover per trial | beyond the 15 s floor (median) | survivors disturbed |\n|---|---|---|---|\n",
        machine(),
        GIVE_UP.as_secs()
    );
    for contender in CONTENDERS {
        let mut times = Vec::new();
        let (mut survivors, mut disturbed) = (0, 0);
        for n in 0..trials {
            let result =
                trial(contender).with_context(|| format!("{} trial {n}", contender.name()))?;
            let shown = result.failover.map_or("stranded".to_string(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            });
            eprintln!("{}, trial {n}: {shown}", contender.name());
            let _ = writeln!(
                csv,
                "{},{n},{},{},{},{}",
                contender.name(),
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
                    format!("{:.1} s", d.as_secs_f64())
                })
            })
            .collect();
        let mut done: Vec<f64> = times.iter().flatten().map(|d| d.as_secs_f64()).collect();
        done.sort_by(f64::total_cmp);
        let beyond = if done.len() == times.len() {
            format!("{:.1} s", done[done.len() / 2] - FLOOR.as_secs_f64())
        } else {
            "n/a (stranded)".to_string()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {beyond} | {disturbed} of {survivors} |",
            contender.name(),
            shown.join(", ")
        );
    }
    md += "\nTargets: wglb adds at most 1 s beyond the WireGuard floor; sessions on healthy gateways: 0 moved.\n";
    bench::write_results(env!("CARGO_MANIFEST_DIR"), "failover", &csv, &md)?;
    println!("{md}");
    Ok(())
}
