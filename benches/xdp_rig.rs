//! The XDP datapath against the userspace one on the netns rig, in the same run: packets per
//! second delivered to the gateways and CPU time per million packets, with plain kernel
//! forwarding (no balancing) as the rig's own reference.
//!
//! The lab's rig gives a client namespace, the balancer namespace and two gateway namespaces
//! joined by veth links; the gateways' WireGuard is stopped and UDP sinks that count take their
//! port. A generator in the client namespace offers 64-byte WireGuard transport messages from
//! 256 source ports, first at a fixed rate every contender sustains (where CPU per packet is
//! comparable), then as fast as one thread can send. Rounds alternate the contenders; each figure
//! is the median over rounds.
//!
//! CPU time is the whole machine's busy time (/proc/stat), the one figure that is fair to every
//! contender here: veth hands a frame to its peer in the sender's context, so XDP's work, the
//! kernel's forwarding and the delivery into the sinks are charged to whichever thread sent
//! (the generator's, or wglb's for the userspace datapath), not to the balancer. At a fixed
//! offered rate the generator and the sinks cost every contender the same, so the difference to
//! kernel forwarding (the same path with no balancing) is what balancing adds. wglb's own process
//! time is shown too; for the userspace datapath it includes the delivery into the sinks.
//!
//! Run (as root): `cargo bench -p wglb --bench xdp_rig`

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wglb_lab::cpu::{machine_ticks, process_ticks, TICKS_PER_SECOND};
use wglb_lab::{metrics, Family, Rig, RigSpec};

const RATE: u64 = 50_000;
const SECONDS: u64 = 8;
const SOURCES: u16 = 256;
const FIRST_SOURCE_PORT: u16 = 20_000;
const ROUNDS: usize = 5;
const METRICS: &str = "127.0.0.1:9639";
#[derive(Clone, Copy, Debug, PartialEq)]
enum Contender {
    Userspace,
    XdpNative,
    XdpGeneric,
    KernelForwarding,
}

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::Userspace,
        Contender::XdpNative,
        Contender::XdpGeneric,
        Contender::KernelForwarding,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Userspace => "wglb userspace",
            Contender::XdpNative => "wglb XDP native",
            Contender::XdpGeneric => "wglb XDP generic",
            Contender::KernelForwarding => "kernel forwarding, no balancing",
        }
    }
}

struct Measured {
    delivered_per_second: f64,
    offered_per_second: f64,
    loss: f64,
    machine_per_million: f64,
    softirq_per_million: f64,
    process_per_million: f64,
}

/// A running contender: wglb in the balancer namespace, or kernel forwarding switched on there.
struct Running<'a> {
    rig: &'a Rig,
    wglb: Option<Child>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.wglb.take() {
            let _ = wglb_lab::terminate(&mut child, Duration::from_secs(5));
        }
        let _ = set_forwarding(self.rig, false);
    }
}

fn set_forwarding(rig: &Rig, on: bool) -> Result<()> {
    let value = format!("net.ipv4.ip_forward={}", on as u8);
    let status = rig
        .balancer_ns()
        .command("sysctl")
        .args(["-q", "-w", &value])
        .status()?;
    anyhow::ensure!(status.success(), "sysctl {value}");
    Ok(())
}

fn start<'a>(rig: &'a Rig, contender: Contender, config: &std::path::Path) -> Result<Running<'a>> {
    let args: &[&str] = match contender {
        Contender::Userspace => &["--datapath", "userspace"],
        Contender::XdpNative => &["--datapath", "xdp", "--xdp-mode", "native"],
        Contender::XdpGeneric => &["--datapath", "xdp", "--xdp-mode", "generic"],
        Contender::KernelForwarding => {
            set_forwarding(rig, true)?;
            return Ok(Running { rig, wglb: None });
        }
    };
    let child = rig
        .balancer_ns()
        .command(env!("CARGO_BIN_EXE_wglb"))
        .args(["--log", "warn", "run", "--config"])
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .context("starting wglb")?;
    let running = Running {
        rig,
        wglb: Some(child),
    };
    let address: SocketAddr = METRICS.parse()?;
    wglb_lab::wait_for("wglb to serve metrics", Duration::from_secs(15), || {
        Ok(rig
            .balancer_ns()
            .run(move || metrics::scrape(address))?
            .ok())
    })?;
    Ok(running)
}

fn scrape(rig: &Rig) -> Result<String> {
    let address: SocketAddr = METRICS.parse()?;
    rig.balancer_ns().run(move || metrics::scrape(address))?
}

/// Sends 64-byte WireGuard transport messages round-robin over the sources, paced at `rate`
/// (0: as fast as possible), for `seconds`; returns how many and over how long.
fn offer(sources: &[UdpSocket], targets: &[SocketAddr], rate: u64, seconds: u64) -> (u64, f64) {
    let mut message = [0u8; 64];
    message[0] = 4;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(due) = (sent * 1_000_000_000).checked_div(rate) {
            let due = start + Duration::from_nanos(due);
            if now < due {
                std::thread::sleep(due - now);
                continue;
            }
        }
        for _ in 0..16 {
            let k = sent as usize % sources.len();
            if sources[k].send_to(&message, targets[k]).is_ok() {
                sent += 1;
            }
        }
    }
    (sent, start.elapsed().as_secs_f64())
}

fn measure(
    running: &Running,
    sources: &[UdpSocket],
    targets: &[SocketAddr],
    delivered: &AtomicU64,
    rate: u64,
) -> Measured {
    delivered.store(0, Ordering::Relaxed);
    let pid = running.wglb.as_ref().map(|c| c.id());
    let before = machine_ticks();
    let own0 = pid.map_or(0, process_ticks);
    let (sent, seconds) = offer(sources, targets, rate, SECONDS);
    std::thread::sleep(Duration::from_millis(300));
    let after = machine_ticks();
    let own1 = pid.map_or(0, process_ticks);
    let got = delivered.load(Ordering::Relaxed);
    let millions = (got as f64 / 1e6).max(1e-9);
    Measured {
        delivered_per_second: got as f64 / seconds,
        offered_per_second: sent as f64 / seconds,
        loss: 1.0 - got as f64 / sent.max(1) as f64,
        machine_per_million: (after.busy - before.busy) as f64 / TICKS_PER_SECOND / millions,
        softirq_per_million: (after.softirq - before.softirq) as f64 / TICKS_PER_SECOND / millions,
        process_per_million: (own1 - own0) as f64 / TICKS_PER_SECOND / millions,
    }
}

fn median(runs: &[&Measured], key: fn(&Measured) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(|m| key(m)).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` probes benchmarks this way: nothing to list.
    }
    wglb_lab::require_root()?;
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 2,
        client_ports: vec![41_000],
        keepalive: None,
    })?;
    // The gateways become UDP sinks on their WireGuard port.
    for j in 0..2 {
        rig.stop_gateway(j)?;
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut sinks = Vec::new();
    for j in 0..2 {
        let address = rig.gateway_addr(j);
        let socket = rig.gateway_ns(j).run(move || UdpSocket::bind(address))??;
        // The sinks must not be where packets are lost.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::RcvBufForce,
            &(16 << 20),
        );
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (delivered, stop) = (delivered.clone(), stop.clone());
        sinks.push(std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if socket.recv_from(&mut buffer).is_ok() {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let client_ip = rig.client_addr(0).ip();
    let sources: Vec<UdpSocket> = rig.client_ns(0).run(move || {
        (0..SOURCES)
            .map(|k| UdpSocket::bind(SocketAddr::new(client_ip, FIRST_SOURCE_PORT + k)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    // Kernel forwarding needs routes across the balancer namespace.
    rig.client_ns(0)
        .command("ip")
        .args(["route", "add", "10.202.0.0/16", "via"])
        .arg(rig.listen_addr(0).ip().to_string())
        .status()?;
    for j in 0..2 {
        let via = match rig.gateway_addr(j).ip() {
            std::net::IpAddr::V4(ip) => {
                let [a, b, c, _] = ip.octets();
                std::net::Ipv4Addr::new(a, b, c, 1)
            }
            std::net::IpAddr::V6(_) => unreachable!("an IPv4 rig"),
        };
        rig.gateway_ns(j)
            .command("ip")
            .args(["route", "add", "10.201.0.0/16", "via", &via.to_string()])
            .status()?;
    }
    let config = rig.temp_dir().join("wglb.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nsocket = \"{}\"\n[metrics]\nlisten = \"{METRICS}\"\n\
             [[listener]]\nname = \"bench\"\nlisten = \"0.0.0.0:51820\"\nhash_key = \"source-ip-port\"\n\
             [[listener.gateway]]\nname = \"sink0\"\naddress = \"{}\"\n\
             [[listener.gateway]]\nname = \"sink1\"\naddress = \"{}\"\n",
            rig.temp_dir().join("api.sock").display(),
            rig.gateway_addr(0),
            rig.gateway_addr(1)
        ),
    )?;

    let mut paced: Vec<Vec<(Contender, Measured)>> = Vec::new();
    let mut flat_out: Vec<Vec<(Contender, Measured)>> = Vec::new();
    for round in 0..ROUNDS {
        let (mut paced_round, mut flat_round) = (Vec::new(), Vec::new());
        for contender in Contender::ALL {
            let running = start(&rig, contender, &config)?;
            let targets: Vec<SocketAddr> = (0..SOURCES as usize)
                .map(|k| match contender {
                    Contender::KernelForwarding => rig.gateway_addr(k % 2),
                    _ => rig.listen_addr(0),
                })
                .collect();
            // Warm up: every source gets a session (the first packets to a gateway whose MAC
            // the kernel has not resolved go through userspace, and resolve it).
            offer(&sources, &targets, 20_000, 1);
            if matches!(contender, Contender::XdpNative | Contender::XdpGeneric) {
                wglb_lab::wait_for(
                    "the XDP program to forward to both sinks",
                    Duration::from_secs(10),
                    || {
                        Ok(
                            (metrics::sum(&scrape(&rig)?, "wglb_xdp_gateway_ready{") == 2.0)
                                .then_some(()),
                        )
                    },
                )?;
                offer(&sources, &targets, 20_000, 1);
            }
            let at_rate = measure(&running, &sources, &targets, &delivered, RATE);
            let unlimited = measure(&running, &sources, &targets, &delivered, 0);
            eprintln!(
                "round {round}: {}: {:.0} pps delivered at {RATE} offered, {:.0} of {:.0} flat out",
                contender.name(),
                at_rate.delivered_per_second,
                unlimited.delivered_per_second,
                unlimited.offered_per_second
            );
            paced_round.push((contender, at_rate));
            flat_round.push((contender, unlimited));
        }
        paced.push(paced_round);
        flat_out.push(flat_round);
    }
    stop.store(true, Ordering::Relaxed);
    for sink in sinks {
        let _ = sink.join();
    }

    let medians = |rounds: &[Vec<(Contender, Measured)>], contender: Contender| {
        let runs: Vec<&Measured> = rounds
            .iter()
            .flat_map(|r| r.iter().filter(|(c, _)| *c == contender).map(|(_, m)| m))
            .collect();
        Measured {
            delivered_per_second: median(&runs, |m| m.delivered_per_second),
            offered_per_second: median(&runs, |m| m.offered_per_second),
            loss: median(&runs, |m| m.loss),
            machine_per_million: median(&runs, |m| m.machine_per_million),
            softirq_per_million: median(&runs, |m| m.softirq_per_million),
            process_per_million: median(&runs, |m| m.process_per_million),
        }
    };
    println!(
        "netns rig, 64-byte WireGuard transport messages from {SOURCES} source ports to 2 gateways; median of {ROUNDS} alternating rounds of {SECONDS} s"
    );
    println!();
    println!("At {RATE} packets/s offered:");
    println!("| contender | delivered packets/s | loss | machine busy CPU s per 1M | of which softirq | above kernel forwarding | wglb process CPU s per 1M |");
    println!("|---|---|---|---|---|---|---|");
    let at_rate: Vec<(Contender, Measured)> = Contender::ALL
        .iter()
        .map(|&c| (c, medians(&paced, c)))
        .collect();
    let forwarding = at_rate[3].1.machine_per_million;
    for (contender, m) in &at_rate {
        println!(
            "| {} | {:.0} | {:.2} % | {:.2} | {:.2} | {:.2} | {:.2} |",
            contender.name(),
            m.delivered_per_second,
            100.0 * m.loss,
            m.machine_per_million,
            m.softirq_per_million,
            m.machine_per_million - forwarding,
            m.process_per_million
        );
    }
    println!();
    println!("Flat out (one generator thread sending as fast as it can):");
    println!("| contender | offered packets/s | delivered packets/s | loss | machine busy CPU s per 1M |");
    println!("|---|---|---|---|---|");
    for contender in Contender::ALL {
        let m = medians(&flat_out, contender);
        println!(
            "| {} | {:.0} | {:.0} | {:.2} % | {:.2} |",
            contender.name(),
            m.offered_per_second,
            m.delivered_per_second,
            100.0 * m.loss,
            m.machine_per_million
        );
    }
    let userspace = &at_rate[0].1;
    println!();
    for (contender, m) in &at_rate[1..3] {
        println!(
            "{} / wglb userspace at {RATE} packets/s: CPU per packet {:.2}x machine-wide, {:.2}x above kernel forwarding",
            contender.name(),
            m.machine_per_million / userspace.machine_per_million,
            (m.machine_per_million - forwarding) / (userspace.machine_per_million - forwarding)
        );
    }
    Ok(())
}
