//! wglb against the balancers users would pick instead, in one run on one netns rig: packets/s
//! and Gbit/s delivered to the gateways, loss, and the whole machine's busy CPU per million
//! packets, for 64- and 1420-byte WireGuard transport messages from 1024 source tuples.
//!
//! Contenders: wglb userspace, wglb XDP native, wglb XDP generic, nginx stream (UDP, `hash
//! $remote_addr$remote_port consistent`, a worker per core, reuseport, 4 MB socket buffers like
//! wglb's, no `proxy_responses` limit), nftables DNAT spreading by jhash of the source tuple with
//! conntrack (and masquerade, so replies would come back), plain kernel forwarding with no
//! balancing: the rig's own ceiling, and the floor of a userspace relay (`wglb-relay`: one
//! thread, `recvmmsg` and one `sendmmsg` per gateway, 64 datagrams a call, a hash of the source;
//! built by `scripts/bench.sh`), what wglb's userspace datapath is measured beside. The lab's
//! rig: a client namespace, the balancer namespace, two gateway namespaces whose WireGuard is
//! replaced by UDP sinks that count.
//!
//! The generator (`wglb_lab::generator`: sendmmsg on a raw socket, batches of 64) runs pinned to
//! CPU 0 and reports its own rate. Each contender is measured at a fixed offered rate every
//! contender sustains (50k packets/s: CPU per packet is comparable there) and flat out. The
//! machine has two cores shared by generator, contender and sinks, so flat-out figures measure
//! the rig as much as the contender; the busy CPU of the whole machine is the figure that is fair
//! to kernel-path and userspace contenders alike (veth runs the receiver's path in the sender's
//! context, so per-process CPU cannot separate them). Rounds alternate the contenders; each
//! figure is the median over rounds.
//!
//! Writes `benches/results/rig.{csv,md,svg}`. Run (as root): `sudo bash scripts/bench.sh`, or
//! `cargo bench -p wglb-benches --bench rig` with nginx, libnginx-mod-stream and nftables installed.
//! `WGLB_BENCH_QUICK=1` runs one short round (to try the rig, not for figures);
//! `WGLB_BENCH_ONLY="wglb userspace,nginx stream"` runs those contenders and writes nothing (to
//! profile one, or try a change against another).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use plotters::prelude::*;
use wglb_lab::bench::{self, machine, Run};
use wglb_lab::contender::{Contender, Running, Setup};
use wglb_lab::cpu::{machine_ticks, process_ticks, TICKS_PER_SECOND};
use wglb_lab::generator::{self, v4, v4_socket, Flows, Sinks};
use wglb_lab::Rig;

const RATE: u64 = 50_000;
const FLOWS: usize = 1024;
const PAYLOADS: [usize; 2] = [64, 1420];
const GENERATOR_CPU: usize = 0;

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    offered_pps: f64,
    delivered_pps: f64,
    gbps: f64,
    loss: f64,
    machine_per_million: f64,
    process_per_million: f64,
}

fn measure(
    rig: &Rig,
    running: &Running,
    flows: &Arc<Flows>,
    sinks: &Sinks,
    rate: u64,
    seconds: u64,
) -> Result<Measured> {
    sinks.reset();
    let pid = running.pid();
    let before = machine_ticks();
    let own0 = pid.map_or(0, process_ticks);
    let sent = generator::send(
        rig.client_ns(0),
        flows,
        rate,
        Duration::from_secs(seconds),
        GENERATOR_CPU,
    )?;
    // What is in flight arrives.
    std::thread::sleep(Duration::from_millis(300));
    let after = machine_ticks();
    let own1 = pid.map_or(0, process_ticks);
    let (got, bytes) = sinks.count();
    let millions = (got as f64 / 1e6).max(1e-9);
    Ok(Measured {
        offered_pps: sent.packets as f64 / sent.seconds,
        delivered_pps: got as f64 / sent.seconds,
        gbps: bytes as f64 * 8.0 / sent.seconds / 1e9,
        loss: 1.0 - got as f64 / sent.packets.max(1) as f64,
        machine_per_million: (after.busy - before.busy) as f64 / TICKS_PER_SECOND / millions,
        process_per_million: (own1 - own0) as f64 / TICKS_PER_SECOND / millions,
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median of every figure over rounds.
fn medians(runs: &[Measured]) -> Measured {
    Measured {
        offered_pps: median(runs.iter().map(|m| m.offered_pps)),
        delivered_pps: median(runs.iter().map(|m| m.delivered_pps)),
        gbps: median(runs.iter().map(|m| m.gbps)),
        loss: median(runs.iter().map(|m| m.loss)),
        machine_per_million: median(runs.iter().map(|m| m.machine_per_million)),
        process_per_million: median(runs.iter().map(|m| m.process_per_million)),
    }
}

struct Results {
    /// (contender, payload, at the fixed rate, flat out)
    rows: Vec<(Contender, usize, Measured, Measured)>,
    rounds: usize,
    seconds: u64,
}

impl Results {
    fn get(&self, contender: Contender, payload: usize) -> (Measured, Measured) {
        self.rows
            .iter()
            .find(|r| r.0 == contender && r.1 == payload)
            .map(|r| (r.2, r.3))
            .expect("every contender measured")
    }

    fn csv(&self) -> String {
        let mut out = String::from(
            "contender,payload_bytes,mode,offered_pps,delivered_pps,delivered_gbps,loss,machine_cpu_s_per_million,balancer_process_cpu_s_per_million\n",
        );
        for (contender, payload, paced, flat) in &self.rows {
            for (mode, m) in [(format!("{RATE}pps"), paced), ("max".to_string(), flat)] {
                let _ = writeln!(
                    out,
                    "{},{payload},{mode},{:.0},{:.0},{:.4},{:.4},{:.3},{:.3}",
                    contender.name(),
                    m.offered_pps,
                    m.delivered_pps,
                    m.gbps,
                    m.loss,
                    m.machine_per_million,
                    m.process_per_million
                );
            }
        }
        out
    }

    fn markdown(&self, machine: &str) -> String {
        let mut out = format!(
            "# The rig: wglb against nginx stream, a userspace relay's floor, nftables DNAT and kernel forwarding\n\n\
             Command: `sudo bash scripts/bench.sh` (runs `cargo bench -p wglb-benches --bench rig`).\n\n\
             Machine: {machine}\n\n\
             {FLOWS} source tuples, WireGuard transport messages, 2 gateways (UDP sinks); generator \
             pinned to CPU {GENERATOR_CPU}; medians of {} alternating rounds of {} s. CPU: the whole \
             machine's busy time per million packets delivered (generator and sinks included, the \
             same for every contender at a fixed rate).\n",
            self.rounds, self.seconds
        );
        for payload in PAYLOADS {
            let _ = write!(
                out,
                "\n## {payload}-byte messages\n\n\
                 | contender | at {RATE} packets/s: delivered | loss | machine CPU s per 1M | balancer process CPU s per 1M | flat out: offered (generator) | delivered packets/s | Gbit/s | loss |\n\
                 |---|---|---|---|---|---|---|---|---|\n"
            );
            for contender in Contender::ALL {
                let (p, f) = self.get(contender, payload);
                let process = match contender {
                    Contender::Nftables | Contender::KernelForwarding => "kernel".to_string(),
                    _ => format!("{:.2}", p.process_per_million),
                };
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.2} % | {:.2} | {process} | {:.0} | {:.0} | {:.2} | {:.1} % |",
                    contender.name(),
                    p.delivered_pps,
                    100.0 * p.loss,
                    p.machine_per_million,
                    f.offered_pps,
                    f.delivered_pps,
                    f.gbps,
                    100.0 * f.loss
                );
            }
            let _ = write!(
                out,
                "\nRatios, wglb to each contender ({payload} bytes): machine CPU per packet at {RATE} packets/s / packets per second delivered flat out\n\n| | {} |\n|---|{}\n",
                Contender::ALL.map(Contender::name).join(" | "),
                "---|".repeat(Contender::ALL.len())
            );
            for row in Contender::WGLB {
                let (rp, rf) = self.get(row, payload);
                let cells: Vec<String> = Contender::ALL
                    .iter()
                    .map(|&column| {
                        let (cp, cf) = self.get(column, payload);
                        format!(
                            "{:.2}x / {:.2}x",
                            rp.machine_per_million / cp.machine_per_million,
                            rf.delivered_pps / cf.delivered_pps
                        )
                    })
                    .collect();
                let _ = writeln!(out, "| {} | {} |", row.name(), cells.join(" | "));
            }
        }
        out += "\n## Against the targets (64-byte messages)\n\n";
        let (up, uf) = self.get(Contender::Userspace, 64);
        let (np, nf) = self.get(Contender::Nginx, 64);
        let (_, rf) = self.get(Contender::Relay, 64);
        let (kp, _) = self.get(Contender::KernelForwarding, 64);
        let (_, tf) = self.get(Contender::Nftables, 64);
        let mut target = |what: String, ratio: f64, bound: f64, at_most: bool| {
            let met = if at_most {
                ratio <= bound
            } else {
                ratio >= bound
            };
            let _ = writeln!(
                out,
                "- {what}: {ratio:.2}x (target {} {bound}x): {}",
                if at_most { "at most" } else { "at least" },
                if met { "met" } else { "missed" }
            );
        };
        target(
            "userspace CPU per packet / nginx's".into(),
            up.machine_per_million / np.machine_per_million,
            0.6,
            true,
        );
        target(
            "userspace packets/s flat out / nginx stream's".into(),
            uf.delivered_pps / nf.delivered_pps,
            1.2,
            false,
        );
        target(
            "userspace packets/s flat out / the userspace relay's (floor)".into(),
            uf.delivered_pps / rf.delivered_pps,
            0.8,
            false,
        );
        for xdp in [Contender::XdpNative, Contender::XdpGeneric] {
            let (xp, xf) = self.get(xdp, 64);
            target(
                format!("{} CPU per packet / kernel forwarding's", xdp.name()),
                xp.machine_per_million / kp.machine_per_million,
                1.0,
                true,
            );
            target(
                format!("{} packets/s flat out / nftables'", xdp.name()),
                xf.delivered_pps / tf.delivered_pps,
                1.0,
                false,
            );
        }
        out += "\n![the rig's figures](rig.svg)\n";
        out
    }

    /// Two panels: packets/s delivered flat out, and machine CPU per million packets at the
    /// fixed rate, one bar per contender and payload.
    fn plot(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (1400, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(700);
        let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14)];
        let names = Contender::ALL.map(|c| match c {
            // Short enough for its slot, and not to be read as wglb's "userspace".
            Contender::Relay => "relay (floor)",
            c => c.name().trim_start_matches("wglb "),
        });
        // (at the fixed rate, flat out) -> the bar's height
        type Figure = fn(&Measured, &Measured) -> f64;
        let panels: [(_, &str, Figure); 2] = [
            (
                &left,
                "packets/s delivered flat out (thousands)",
                |_, flat| flat.delivered_pps / 1e3,
            ),
            (
                &right,
                "machine CPU s per 1M packets at 50k packets/s",
                |paced, _| paced.machine_per_million,
            ),
        ];
        for (area, title, value) in panels {
            let top = self
                .rows
                .iter()
                .map(|r| value(&r.2, &r.3))
                .fold(0.0, f64::max)
                * 1.4;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(60)
                .y_label_area_size(55)
                .build_cartesian_2d(0f64..Contender::ALL.len() as f64, 0f64..top.max(1.0))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(Contender::ALL.len() * 2 + 1)
                .x_label_formatter(&|x| {
                    let slot = x.floor() as usize;
                    if (x - slot as f64 - 0.5).abs() < 0.01 {
                        names.get(slot).copied().unwrap_or("").to_string()
                    } else {
                        String::new()
                    }
                })
                .draw()?;
            for (p, payload) in PAYLOADS.iter().enumerate() {
                let color = colors[p];
                chart
                    .draw_series(Contender::ALL.iter().enumerate().map(|(i, &c)| {
                        let (paced, flat) = self.get(c, *payload);
                        let x = i as f64 + 0.1 + 0.4 * p as f64;
                        Rectangle::new([(x, 0.0), (x + 0.4, value(&paced, &flat))], color.filled())
                    }))?
                    .label(format!("{payload}-byte messages"))
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

fn main() -> Result<()> {
    let (rounds, seconds) = match bench::begin()? {
        Run::Listing => return Ok(()),
        Run::Measure { quick: true } => (1, 2),
        Run::Measure { quick: false } => (3, 5),
    };
    let rig = bench::sink_rig()?;
    let gateways = vec![rig.gateway_addr(0), rig.gateway_addr(1)];
    let sinks = Sinks::start(&rig, &gateways)?;
    rig.route_through_balancer()?;
    let dir = rig.temp_dir().to_path_buf();
    let wglb = bench::workspace_binary("wglb")?;
    // Absent (not built): the relay contender fails to start, saying how to build it; the others
    // can still run (WGLB_BENCH_ONLY).
    let relay = bench::workspace_binary("wglb-relay").ok();
    let setup = Setup {
        rig: &rig,
        wglb: &wglb,
        dir: &dir,
        listen: rig.listen_addr(0),
        gateways: gateways.clone(),
        health_port: None,
        wglb_listener_extra: String::new(),
        wglb_datapath_extra: String::new(),
        agent: None,
        relay: relay.as_deref(),
    };
    let client = v4(rig.client_addr(0).ip())?;
    let sources = generator::sources(&[client], 20_000, FLOWS);
    // To profile or compare some contenders: their names, comma-separated (e.g. "nginx stream");
    // nothing is written then.
    let only = std::env::var("WGLB_BENCH_ONLY").ok();
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|names| names.split(',').any(|n| n == c.name()))
        })
        .collect();
    let mut runs: Vec<(Contender, usize, Vec<Measured>, Vec<Measured>)> = Vec::new();
    for round in 0..rounds {
        for &payload in &PAYLOADS {
            for &contender in &contenders {
                let flows = Arc::new(Flows::new(
                    &sources,
                    |k| {
                        let to = if contender.routes_to_gateways() {
                            gateways[k % 2]
                        } else {
                            setup.listen
                        };
                        v4_socket(to)
                    },
                    payload,
                ));
                // Every flow gets its session (or conntrack entry) before measuring.
                let warm_up = || {
                    generator::send(
                        rig.client_ns(0),
                        &flows,
                        20_000,
                        Duration::from_secs(1),
                        GENERATOR_CPU,
                    )
                    .map(drop)
                };
                let running = contender
                    .start(&setup, warm_up)
                    .with_context(|| format!("starting {}", contender.name()))?;
                let paced = measure(&rig, &running, &flows, &sinks, RATE, seconds)?;
                let flat = measure(&rig, &running, &flows, &sinks, 0, seconds)?;
                eprintln!(
                    "round {round}, {payload} bytes, {}: {:.0} of {RATE} packets/s delivered, {:.2} s CPU per 1M; flat out {:.0} of {:.0} packets/s",
                    contender.name(),
                    paced.delivered_pps,
                    paced.machine_per_million,
                    flat.delivered_pps,
                    flat.offered_pps
                );
                match runs.iter_mut().find(|r| r.0 == contender && r.1 == payload) {
                    Some(r) => {
                        r.2.push(paced);
                        r.3.push(flat);
                    }
                    None => runs.push((contender, payload, vec![paced], vec![flat])),
                }
            }
        }
    }
    drop(sinks);
    if only.is_some() {
        return Ok(());
    }
    let results = Results {
        rows: runs
            .iter()
            .map(|(c, p, paced, flat)| (*c, *p, medians(paced), medians(flat)))
            .collect(),
        rounds,
        seconds,
    };
    let markdown = results.markdown(&machine());
    let out = bench::write_results(env!("CARGO_MANIFEST_DIR"), "rig", &results.csv(), &markdown)?;
    results.plot(&out.join("rig.svg"))?;
    println!("{markdown}");
    println!("written: {}", out.join("rig.{csv,md,svg}").display());
    Ok(())
}
