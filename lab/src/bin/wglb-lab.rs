//! `wglb-lab demo`: runs wglb in front of real WireGuard gateways and narrates two failovers: one
//! as WireGuard alone allows (about 15 s), then one with gateway agents (well under a second).

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use wglb_lab::{
    agents, metrics, require_root, timeline, Family, Launch, Pinger, Rig, RigSpec, Wglb,
};

const USAGE: &str = "usage: wglb-lab demo [--wglb PATH] [--agent PATH] [--svg PATH]";
const GATEWAYS: usize = 3;
const CLIENTS: u16 = 6;
const FIRST_CLIENT_PORT: u16 = 41000;
const METRICS_ADDR: &str = "127.0.0.1:9638";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Failover cannot be faster than WireGuard's ~15 s of retrying the dead session before it
/// handshakes again; the rest is margin for the balancer's health checks.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(40);

fn main() -> ExitCode {
    let result = match parse_args() {
        Ok(Some(programs)) => demo(&programs),
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wglb-lab: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The executables the demo runs, and where its picture goes.
struct Programs {
    wglb: PathBuf,
    agent: PathBuf,
    svg: PathBuf,
}

/// The executables to run, or `None` when help was asked for.
fn parse_args() -> Result<Option<Programs>> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("demo") => {}
        Some("-h" | "--help") => return Ok(None),
        _ => bail!(USAGE),
    }
    let (mut wglb, mut agent) = (None, None);
    let mut svg = PathBuf::from("wglb-demo.svg");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--wglb" => wglb = Some(PathBuf::from(args.next().context("--wglb needs a path")?)),
            "--agent" => agent = Some(PathBuf::from(args.next().context("--agent needs a path")?)),
            "--svg" => svg = PathBuf::from(args.next().context("--svg needs a path")?),
            "-h" | "--help" => return Ok(None),
            _ => bail!("unexpected argument {arg:?}\n{USAGE}"),
        }
    }
    let wglb = match wglb {
        Some(path) => path,
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("wglb"),
    };
    let agent = agent.unwrap_or_else(|| wglb.with_file_name("wglb-agent"));
    Ok(Some(Programs { wglb, agent, svg }))
}

struct Narrator {
    start: Instant,
}

impl Narrator {
    fn say(&self, message: impl Display) {
        println!("[{:6.2}s] {message}", self.start.elapsed().as_secs_f64());
    }
}

fn demo(programs: &Programs) -> Result<()> {
    let narrator = Narrator {
        start: Instant::now(),
    };
    let wglb = &programs.wglb;
    ensure!(
        wglb.is_file(),
        "no wglb executable at {} (build it with `cargo build -p wglb`, or pass --wglb PATH)",
        wglb.display()
    );
    ensure!(
        programs.agent.is_file(),
        "no wglb-agent executable at {} (build it with `cargo build -p wglb-agent`, or pass --agent PATH)",
        programs.agent.display()
    );
    require_root()?;

    narrator.say(format!(
        "building a rig: {GATEWAYS} gateways, {CLIENTS} clients, IPv4"
    ));
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: GATEWAYS,
        client_ports: (FIRST_CLIENT_PORT..FIRST_CLIENT_PORT + CLIENTS).collect(),
        keepalive: None,
    })?;
    narrator.say(format!(
        "rig {} is up; its files are in {} (set WGLB_LAB_KEEP_TEMP=1 to keep them)",
        rig.id(),
        rig.temp_dir().display()
    ));

    let metrics: SocketAddr = METRICS_ADDR.parse()?;
    let mut balancer = Launch::new(wglb, rig.temp_dir(), metrics)
        .inside(rig.balancer_ns())
        .log("info")
        .config(&config(&rig)?)?;
    narrator.say(format!(
        "started {} run --config {} in {}; its log: {}",
        wglb.display(),
        rig.temp_dir().join("wglb.toml").display(),
        rig.balancer_ns().name(),
        balancer.log_path().display()
    ));

    if let Err(error) = exercise(&mut rig, &mut balancer, programs, &narrator) {
        // The balancer's log is deleted with the rig, so show its end before it goes.
        eprintln!(
            "last lines of {}:\n{}",
            balancer.log_path().display(),
            balancer.log_tail(30)
        );
        return Err(error);
    }

    narrator.say(format!(
        "every client's ping replies over time: {}",
        programs.svg.display()
    ));
    narrator.say("stopping the balancer (SIGTERM)");
    let status = balancer.stop_for_status()?;
    narrator.say(format!("balancer exited: {status}"));
    drop(rig);
    narrator.say("rig torn down");
    Ok(())
}

/// Traffic through the balancer, a gateway failure as WireGuard alone recovers from it, the
/// same with gateway agents, and the balancer's metrics.
fn exercise(
    rig: &mut Rig,
    balancer: &mut Wglb,
    programs: &Programs,
    narrator: &Narrator,
) -> Result<()> {
    let started = SystemTime::now();
    let clients = usize::from(CLIENTS);
    for i in 0..clients {
        rig.start_client(i)?;
    }
    let pingers = (0..clients)
        .map(|i| rig.pinger(i))
        .collect::<Result<Vec<_>>>()?;
    narrator.say(format!(
        "started {clients} clients, each pinging the gateway through its tunnel"
    ));

    let mut waiting: Vec<usize> = (0..clients).collect();
    balancer
        .wait("every client's handshake", HANDSHAKE_TIMEOUT, |_| {
            let mut still_waiting = Vec::new();
            for &i in &waiting {
                if rig.client_latest_handshake(i)?.is_none() {
                    still_waiting.push(i);
                }
            }
            waiting = still_waiting;
            Ok(waiting.is_empty().then_some(()))
        })
        .with_context(|| format!("clients {waiting:?} have no handshake"))?;
    narrator.say("every client has completed a handshake through the balancer");
    let mut serving = Vec::with_capacity(clients);
    for (i, pinger) in pingers.iter().enumerate() {
        let gateway = rig
            .gateway_serving(i)?
            .with_context(|| format!("no gateway has a handshake with client {i}"))?;
        let now = SystemTime::now();
        balancer.wait(
            format_args!("a ping reply to client {i}"),
            Duration::from_secs(5),
            |_| Ok(pinger.first_reply_after(now)),
        )?;
        narrator.say(format!(
            "client {i} ({}) is served by gw{gateway}; pings flow",
            rig.client_addr(i)
        ));
        serving.push(gateway);
    }

    narrator.say("1. a gateway dies, with nothing but the balancer to help its clients");
    let victim = serving[0];
    let mut events = vec![(SystemTime::now(), format!("gw{victim} killed, no agents"))];
    serving = fail_gateway(rig, balancer, &pingers, &serving, victim, narrator)?;

    narrator.say(
        "2. the same with gateway agents: wglb-agent beside each live gateway reports its peers",
    );
    let live: Vec<usize> = (0..GATEWAYS).filter(|&j| j != victim).collect();
    let _agents = agents::start_agents(rig, rig.temp_dir(), &programs.agent, live.iter().copied())?;
    for &j in &live {
        let clients_of_j = serving.iter().filter(|&&g| g == j).count() as f64;
        let series = format!("wglb_agent_peers{{gateway=\"gw{j}\",listener=\"demo\"}}");
        balancer.wait(
            format_args!("gw{j}'s agent to report its {clients_of_j} client(s)"),
            Duration::from_secs(10),
            |w| {
                let text = w.metrics()?;
                Ok((metrics::sum(&text, &series) == Some(clients_of_j)).then_some(()))
            },
        )?;
    }
    narrator.say("every agent has told the balancer which client is behind which of its paths");
    // The gateway with the most clients now.
    let second = *live
        .iter()
        .max_by_key(|&&j| serving.iter().filter(|&&g| g == j).count())
        .context("a live gateway")?;
    events.push((SystemTime::now(), format!("gw{second} killed, with agents")));
    fail_gateway(rig, balancer, &pingers, &serving, second, narrator)?;

    let rows: Vec<timeline::Row> = pingers
        .iter()
        .enumerate()
        .map(|(i, pinger)| timeline::Row {
            name: format!("client {i}"),
            replies: pinger.replies().into_iter().map(|(at, _)| at).collect(),
        })
        .collect();
    timeline::write_svg(
        &programs.svg,
        "ping replies through wglb: a gateway killed without agents, then one with",
        started,
        &rows,
        &events,
    )?;

    match balancer.metrics().map(|text: String| nonzero(&text)) {
        Ok(lines) => {
            narrator.say(format!(
                "nonzero wglb_ metrics from http://{METRICS_ADDR}/metrics:"
            ));
            for line in lines {
                println!("    {line}");
            }
        }
        Err(error) => narrator.say(format!("could not fetch the metrics: {error:#}")),
    }
    Ok(())
}

/// Stops gateway `victim` and reports how long each of its clients went without an answer and
/// where it is now, and what the other clients lost; returns who serves each client after.
fn fail_gateway(
    rig: &mut Rig,
    balancer: &mut Wglb,
    pingers: &[Pinger],
    serving: &[usize],
    victim: usize,
    narrator: &Narrator,
) -> Result<Vec<usize>> {
    let sent_before: Vec<u32> = pingers.iter().map(Pinger::sent).collect();
    rig.stop_gateway(victim)?;
    let killed_at = SystemTime::now();
    // Replies the victim sent just before it died may still arrive for a moment: only a reply
    // after that can have come through another gateway.
    let in_flight = Duration::from_millis(300);
    let moved: Vec<usize> = (0..pingers.len())
        .filter(|&i| serving[i] == victim)
        .collect();
    narrator.say(format!(
        "stopped gw{victim} (WireGuard and health port), which served client(s) {moved:?}"
    ));
    let mut now_serving = serving.to_vec();
    for &i in &moved {
        let reply = balancer.wait(
            format_args!("client {i} to fail over (its first ping reply after the kill)"),
            FAILOVER_TIMEOUT,
            |_| Ok(pingers[i].first_reply_after(killed_at + in_flight)),
        )?;
        let failover = reply.duration_since(killed_at).unwrap_or_default();
        let new_gateway = rig.gateway_serving(i)?;
        narrator.say(format!(
            "client {i} answered again {:.2} s after the kill, now served by {}",
            failover.as_secs_f64(),
            new_gateway.map_or("no gateway with a handshake (?)".into(), |j| format!(
                "gw{j}"
            ))
        ));
        if let Some(j) = new_gateway {
            now_serving[i] = j;
        }
    }
    let sent_at_reply: Vec<u32> = pingers.iter().map(Pinger::sent).collect();
    // Pings still in flight need a moment to be answered or reported missing (ping reports a
    // miss when it sends the next one, 0.2 s later).
    let settled = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settled
        && pingers
            .iter()
            .zip(&sent_at_reply)
            .any(|(pinger, &sent)| pinger.sent() <= sent)
    {
        thread::sleep(Duration::from_millis(50));
    }
    for i in (0..pingers.len()).filter(|i| !moved.contains(i)) {
        let window = sent_before[i] + 1..=sent_at_reply[i];
        let lost = pingers[i].lost_between(*window.start(), *window.end());
        let verdict = if lost.is_empty() {
            format!("no ping lost of {}", window.count())
        } else {
            format!(
                "lost {} of {} pings (icmp_seq {})",
                lost.len(),
                window.count(),
                ranges(&lost)
            )
        };
        narrator.say(format!("client {i} (on gw{}): {verdict}", serving[i]));
    }
    Ok(now_serving)
}

fn config(rig: &Rig) -> Result<String> {
    let (api, agents) = agents::agents_config(rig, rig.temp_dir(), "demo", GATEWAYS)?;
    let mut config = format!(
        "[api]\n{api}\n[metrics]\nlisten = \"{METRICS_ADDR}\"\n\n\
         [[listener]]\nname = \"demo\"\nlisten = \"0.0.0.0:51820\"\nhash_key = \"source-ip-port\"\n"
    );
    for j in 0..GATEWAYS {
        config.push_str(&format!(
            "\n[[listener.gateway]]\nname = \"gw{j}\"\naddress = \"{}\"\nhealth_port = {}\n",
            rig.gateway_addr(j),
            rig.gateway_health_port()
        ));
    }
    config.push_str(&agents);
    Ok(config)
}

/// `[3, 4, 5, 9]` as `3-5, 9`: a failover loses long runs of pings.
fn ranges(seqs: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &seq in seqs {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs.iter()
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nonzero `wglb_` samples of a scrape.
fn nonzero(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            line.starts_with("wglb_") && metrics::sample_value(line).is_some_and(|v| v != 0.0)
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_runs_of_sequence_numbers() {
        assert_eq!(ranges(&[3, 4, 5, 9, 11, 12]), "3-5, 9, 11-12");
        assert_eq!(ranges(&[]), "");
    }
}
