//! wglb in front of real wireguard-go gateways, in network namespaces.
//!
//! These tests need root (namespaces, veth, /dev/net/tun) and FAIL without it: CI runs them as
//! root. Each builds its own rig with unique names, so they run in parallel.
//!
//! Every scenario runs on each datapath: userspace, and XDP in native and in generic mode
//! (`scenario::userspace`, `scenario::xdp_native`, `scenario::xdp_generic`).
//!
//! Every client is placed by prediction: the test picks client ports so that Maglev puts each
//! client on a chosen gateway, then checks on the gateways themselves (`wg show`) that the
//! handshake happened there.

#[macro_use]
mod support;

use std::net::UdpSocket;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use support::{
    config_text, connect, first_reply, lost_since, ports_for, predicted_gateway, sessions,
    settled_handshakes, Balancer, Datapath, Listed, HANDSHAKE,
};
use wglb::datapath::shard_of;
use wglb_lab::{require_root, wait_for, Family, HealthEndpoint, Pinger, Rig, RigSpec};

/// WireGuard's floor for a session that moves (a client re-handshakes 15 s after its data went
/// unanswered) plus the 2 s the balancer may add.
const FAILOVER_BOUND: Duration = Duration::from_secs(17);

fn rig(family: Family, gateways: usize, config: &str, wanted: &[usize]) -> Result<Rig> {
    require_root()?;
    Rig::new(RigSpec {
        balancers: 1,
        family,
        gateways,
        client_ports: ports_for(family, config, wanted),
        keepalive: None,
    })
}

/// Starts clients with a pinger each and waits until every one gets replies.
/// Sequence numbers answered in a pinger's window [from, now - in flight] that got no reply.
fn handshakes_and_pings_spread_over_gateways(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2, 0, 1, 2];
    let mut rig = rig(Family::V4, 3, &config, &wanted)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    // Full-MTU packets too: their transport messages (1452 bytes) are not 16-byte aligned.
    rig.ping_with_size(0, 1392)?;
    for (i, &gateway) in wanted.iter().enumerate() {
        ensure!(
            rig.gateway_serving(i)? == Some(gateway),
            "client {i} is not on gw{gateway}"
        );
        ensure!(rig.gateway_rx_bytes_from(gateway, i)? > 0);
        let endpoint = rig
            .gateway_endpoint_of(gateway, i)?
            .context("no endpoint")?;
        ensure!(
            datapath.relayed_from(endpoint),
            "client {i} reached gw{gateway} from {endpoint}, not through the {datapath:?} datapath"
        );
    }
    // The XDP datapath counts its sessions once a second.
    balancer.wait_metric("wglb_sessions{", Duration::from_secs(5), |v| v == 6.0)?;
    ensure!(balancer.metric(r#"wglb_handshake_messages_total{gateway="gw0",listener="test",message="handshake_initiation"}"#)? >= 2.0);
    ensure!(balancer.metric(r#"wglb_handshake_messages_total{gateway="gw2",listener="test",message="handshake_response"}"#)? >= 2.0);
    ensure!(balancer.metric_or_zero("wglb_dropped_packets_total")? == 0.0);

    // The forwarding counters move with the traffic: every answered ping is at least one
    // WireGuard data packet each way (keepalives only add).
    let counters = || -> Result<[f64; 3]> {
        Ok([
            balancer.metric(r#"wglb_packets_total{direction="to_gateway""#)?,
            balancer.metric(r#"wglb_packets_total{direction="to_client""#)?,
            balancer.metric(r#"wglb_bytes_total{direction="to_gateway""#)?,
        ])
    };
    let before = counters()?;
    let seqs: Vec<u32> = pingers.iter().map(|p| p.last_seq()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let answered: usize = pingers
        .iter()
        .zip(&seqs)
        .map(|(p, &from)| {
            let to = p.last_seq().saturating_sub(6);
            (to.saturating_sub(from) as usize).saturating_sub(p.lost_between(from, to).len())
        })
        .sum();
    ensure!(answered >= 24, "only {answered} pings answered in 3 s");
    // The XDP datapath reads the program's counters once a second: allow it one more read.
    let moved = |after: &[f64; 3]| [0, 1, 2].map(|k| after[k] - before[k]);
    let enough = |after: &[f64; 3]| {
        let [out, back, _] = moved(after);
        out >= answered as f64 && back >= answered as f64
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut after = counters()?;
    while !enough(&after) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = counters()?;
    }
    let [packets_out, packets_back, bytes_out] = moved(&after);
    ensure!(
        enough(&after),
        "{answered} pings answered, counters moved by {packets_out} out and {packets_back} back"
    );
    // A WireGuard data packet is at least 32 bytes.
    ensure!(bytes_out >= 32.0 * packets_out);
    wglb_lab::metrics::check_exposition(&balancer.metrics()?)?;

    // The CLI lists and evicts the sessions wherever the datapath holds them.
    let listed: serde_json::Value = serde_json::from_str(&balancer.cli(&["--json", "sessions"])?)?;
    ensure!(listed["total"] == 6, "{listed}");
    for (i, &gateway) in wanted.iter().enumerate() {
        let client = rig.client_addr(i).to_string();
        let session = listed["sessions"]
            .as_array()
            .context("a session list")?
            .iter()
            .find(|s| s["client"] == client.as_str())
            .with_context(|| format!("client {i} is not listed: {listed}"))?;
        ensure!(session["gateway"] == format!("gw{gateway}"), "{session}");
    }
    let created = balancer.metric("wglb_sessions_created_total")?;
    let client = rig.client_addr(0).to_string();
    let out = balancer.cli(&["evict", "--client", &client])?;
    ensure!(out.contains("evicted 1 session(s)"), "{out}");
    // Its next ping places it again, on the same gateway: Maglev has not changed.
    balancer.wait_metric("wglb_sessions_created_total", Duration::from_secs(5), |v| {
        v == created + 1.0
    })?;
    ensure!(rig.gateway_serving(0)? == Some(wanted[0]));
    Ok(())
}

fn a_dead_gateways_clients_move_and_the_others_do_not_notice(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2, 0, 1, 2];
    let mut rig = rig(Family::V4, 3, &config, &wanted)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    let survivors = [1, 2, 4, 5];
    let handshakes = settled_handshakes(&rig, &survivors)?;
    let seqs: Vec<_> = survivors.iter().map(|&i| pingers[i].last_seq()).collect();

    rig.stop_gateway(0)?;
    let killed = SystemTime::now();
    // Replies gw0 sent just before it died may still arrive for a moment: only a reply after
    // that can have come through another gateway.
    let in_flight = Duration::from_millis(300);
    let without_gw0 = config_text(Family::V4, &["down", "active", "active"]);
    for moved in [0, 3] {
        let failover =
            first_reply(&pingers[moved], killed + in_flight, Duration::from_secs(40))? + in_flight;
        eprintln!("failover: client {moved} answered again {failover:?} after gw0 died");
        ensure!(
            failover <= FAILOVER_BOUND,
            "client {moved}: failover took {failover:?}, more than {FAILOVER_BOUND:?}"
        );
        let expected = predicted_gateway(&without_gw0, rig.client_addr(moved));
        ensure!(
            rig.gateway_serving(moved)? == Some(expected),
            "client {moved} is not on gw{expected}"
        );
        let endpoint = rig
            .gateway_endpoint_of(expected, moved)?
            .context("no endpoint")?;
        ensure!(
            datapath.relayed_from(endpoint),
            "client {moved} reached gw{expected} from {endpoint}, not through the {datapath:?} datapath"
        );
    }
    ensure!(
        balancer.metric(r#"wglb_gateway_health{gateway="gw0",listener="test",state="down"}"#)?
            == 1.0
    );
    ensure!(
        balancer
            .metric(r#"wglb_session_evictions_total{listener="test",reason="gateway_gone"}"#)?
            == 2.0
    );

    std::thread::sleep(Duration::from_secs(2));
    for (k, &i) in survivors.iter().enumerate() {
        let lost = lost_since(&pingers[i], seqs[k]);
        ensure!(
            lost.is_empty(),
            "client {i} lost pings {lost:?} while gw0 failed"
        );
        ensure!(
            rig.client_latest_handshake(i)? == handshakes[k],
            "client {i} handshook again"
        );
        ensure!(
            rig.gateway_serving(i)? == Some(wanted[i]),
            "client {i} moved"
        );
    }
    Ok(())
}

fn a_core_outage_turning_every_health_check_503_keeps_every_gateway_in_service(
    datapath: Datapath,
) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    // Client 3 connects during the outage, onto gw1 as Maglev places it with every gateway up.
    let mut rig = rig(Family::V4, 3, &config, &[0, 1, 2, 1])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..3)?;
    let handshakes = settled_handshakes(&rig, &[0, 1, 2])?;
    let seqs: Vec<_> = pingers.iter().map(|p| p.last_seq()).collect();

    // Core goes away: every gateway's /health answers 503 while WireGuard keeps working. The
    // checks notice at different moments.
    for j in 0..3 {
        rig.set_gateway_health(j, HealthEndpoint::CoreDetached);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for_reports(&balancer, "every gateway reported degraded", |detail| {
        detail.starts_with("degraded: Core detached (GET ") && detail.ends_with("answered 503)")
    })?;
    let table = balancer.cli(&["gateways"])?;
    ensure!(
        table.matches("builtin-http=degraded").count() == 3,
        "wglb gateways:\n{table}"
    );
    // Past the eviction delay: every gateway is still up, nothing was evicted, and the balancer
    // is not failing open (health still counts: no gateway is down).
    std::thread::sleep(Duration::from_secs(4));
    for j in 0..3 {
        ensure!(
            balancer.metric(&format!(
                r#"wglb_gateway_health{{gateway="gw{j}",listener="test",state="up"}}"#
            ))? == 1.0,
            "gw{j} is not up during the Core outage"
        );
    }
    ensure!(balancer.metric("wglb_failing_open{")? == 0.0);
    ensure!(
        balancer.metric_or_zero(
            r#"wglb_session_evictions_total{listener="test",reason="gateway_gone"}"#
        )? == 0.0
    );
    let newcomer = connect(&mut rig, 3..4)?;
    let expected = predicted_gateway(&config, rig.client_addr(3));
    ensure!(
        rig.gateway_serving(3)? == Some(expected),
        "the client connecting during the outage is not on gw{expected}"
    );
    for i in 0..3 {
        let lost = lost_since(&pingers[i], seqs[i]);
        ensure!(
            lost.is_empty(),
            "client {i} lost pings {lost:?} during the Core outage"
        );
        ensure!(
            rig.client_latest_handshake(i)? == handshakes[i],
            "client {i} handshook again"
        );
        ensure!(rig.gateway_serving(i)? == Some(i), "client {i} moved");
    }

    for j in 0..3 {
        rig.set_gateway_health(j, HealthEndpoint::Alive);
    }
    wait_for_reports(&balancer, "every gateway reported up again", |detail| {
        detail.ends_with("answered 200")
    })?;
    drop(newcomer);
    Ok(())
}

/// Waits until the built-in checker's fresh report on every gateway has a detail that `done`
/// accepts, as `wglb --json gateways` shows them.
fn wait_for_reports(balancer: &Balancer, what: &str, done: impl Fn(&str) -> bool) -> Result<()> {
    wait_for(what, Duration::from_secs(10), || {
        let gateways: serde_json::Value =
            serde_json::from_str(&balancer.cli(&["--json", "gateways"])?)?;
        let gateways = gateways["gateways"].as_array().context("no gateways")?;
        Ok(gateways
            .iter()
            .all(|g| {
                g["reports"].as_array().is_some_and(|reports| {
                    reports.iter().any(|r| {
                        r["source"] == "builtin-http"
                            && r["healthy"] == true
                            && r["detail"].as_str().is_some_and(&done)
                    })
                })
            })
            .then_some(()))
    })
}

fn a_gateway_whose_health_endpoint_is_dead_takes_no_new_clients_until_it_answers(
    datapath: Datapath,
) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    // Clients 0 and 1 would both land on gw1.
    let mut rig = rig(Family::V4, 3, &config, &[1, 1])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    rig.set_gateway_health(1, HealthEndpoint::Unreachable);
    balancer.wait_health(1, "down")?;
    let _first = connect(&mut rig, 0..1)?;
    let expected = predicted_gateway(
        &config_text(Family::V4, &["active", "down", "active"]),
        rig.client_addr(0),
    );
    ensure!(
        rig.gateway_serving(0)? == Some(expected) && expected != 1,
        "client 0 is not on gw{expected}"
    );

    rig.set_gateway_health(1, HealthEndpoint::Alive);
    balancer.wait_health(1, "up")?;
    let _second = connect(&mut rig, 1..2)?;
    ensure!(
        rig.gateway_serving(1)? == Some(1),
        "client 1 is not back on gw1"
    );
    // Client 0 stays where it was placed: a recovered gateway takes back nobody.
    ensure!(rig.gateway_serving(0)? == Some(expected));
    Ok(())
}

fn draining_through_the_cli_keeps_sessions_and_sends_new_clients_elsewhere(
    datapath: Datapath,
) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    // Both clients would land on gw1 if it took new sessions.
    let mut rig = rig(Family::V4, 3, &config, &[1, 1])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..1)?;
    ensure!(rig.gateway_serving(0)? == Some(1));
    let handshake = rig.client_latest_handshake(0)?;
    let seq = pingers[0].last_seq();
    let rx = rig.gateway_rx_bytes_from(1, 0)?;

    // A broken file is refused and changes nothing.
    balancer.reload_refused(&config.replace("state = \"active\"", "state = \"resting\""))?;
    // A reload that changes what only a restart can apply is refused whole through the CLI,
    // naming the line ([api] comes first in the file the balancer reads), and the running
    // configuration stays: not even the state change beside it applies.
    let resized = config
        .replace(
            "hash_key = \"source-ip-port\"\n",
            "hash_key = \"source-ip-port\"\nmaglev_size = 251\n",
        )
        .replacen("state = \"active\"", "state = \"draining\"", 1);
    let refusal = balancer.reload_refused_through_cli(&resized)?;
    ensure!(
        refusal.contains(
            "line 10 (listener `test`): field `maglev_size`: changed from 65537 to 251; that needs a restart"
        ),
        "wglb reload said: {refusal}"
    );
    let gateways: serde_json::Value =
        serde_json::from_str(&balancer.cli(&["--json", "gateways"])?)?;
    ensure!(gateways["gateways"][0]["state"] == "active", "{gateways}");
    ensure!(
        balancer.metric(r#"wglb_config_reloads_total{result="error"}"#)? == 2.0,
        "the SIGHUP and the CLI refusals are not both counted"
    );
    let out = balancer.cli(&["drain", "gw1"])?;
    ensure!(out.contains("draining"), "wglb drain printed {out}");
    let drained = config_text(Family::V4, &["active", "draining", "active"]);
    ensure!(
        balancer.metric(
            r#"wglb_gateway_admin_state{gateway="gw1",listener="test",state="draining"}"#
        )? == 1.0
    );

    let newcomer = connect(&mut rig, 1..2)?;
    let expected = predicted_gateway(&drained, rig.client_addr(1));
    ensure!(expected != 1);
    ensure!(
        rig.gateway_serving(1)? == Some(expected),
        "the new client is not on gw{expected}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let lost = lost_since(&pingers[0], seq);
    ensure!(
        lost.is_empty(),
        "the drained gateway's client lost pings {lost:?}"
    );
    ensure!(
        rig.client_latest_handshake(0)? == handshake,
        "the drained gateway's client handshook again"
    );
    ensure!(
        rig.gateway_rx_bytes_from(1, 0)? > rx,
        "the drained gateway's client left it"
    );
    // A reload of the unchanged file keeps the drain the CLI set.
    balancer.reload(&config)?;
    let gateways: serde_json::Value =
        serde_json::from_str(&balancer.cli(&["--json", "gateways"])?)?;
    ensure!(gateways["gateways"][1]["state"] == "draining", "{gateways}");
    ensure!(gateways["gateways"][1]["sessions"] == 1, "{gateways}");
    drop(newcomer);
    Ok(())
}

fn a_restarted_balancer_puts_clients_back_on_their_gateways(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let mut rig = rig(Family::V4, 3, &config, &[0, 1, 2])?;
    let mut balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..3)?;
    let handshakes: Vec<_> = (0..3)
        .map(|i| rig.client_latest_handshake(i))
        .collect::<Result<_>>()?;
    let rx: Vec<_> = (0..3)
        .map(|i| rig.gateway_rx_bytes_from(i, i))
        .collect::<Result<_>>()?;

    balancer.stop()?;
    let restarted = SystemTime::now();
    let balancer = Balancer::start(&rig, &config, datapath)?;
    for (i, pinger) in pingers.iter().enumerate() {
        // Well under WireGuard's 15 s re-handshake: the client's data reached its old gateway.
        let back = first_reply(pinger, restarted, Duration::from_secs(10))?;
        eprintln!("client {i} answered {back:?} after the restart");
    }
    for i in 0..3 {
        ensure!(
            rig.client_latest_handshake(i)? == handshakes[i],
            "client {i} handshook again"
        );
        ensure!(
            rig.gateway_rx_bytes_from(i, i)? > rx[i],
            "client {i} left gw{i}"
        );
        // Datagrams queued while the balancer started may have gone through userspace; the
        // next ones go through the datapath under test, and the gateway follows them.
        wglb_lab::wait_for(
            format!("client {i} to reach gw{i} through the {datapath:?} datapath"),
            Duration::from_secs(5),
            || {
                let endpoint = rig.gateway_endpoint_of(i, i)?;
                Ok(endpoint.filter(|e| datapath.relayed_from(*e)))
            },
        )?;
    }
    balancer.wait_metric("wglb_sessions{", Duration::from_secs(5), |v| v == 3.0)?;
    Ok(())
}

fn junk_is_dropped_counted_and_harmless(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active"]);
    let mut rig = rig(Family::V4, 2, &config, &[0])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..1)?;
    let seq = pingers[0].last_seq();
    let target = rig.listen_addr(0);

    let mut junk: Vec<Vec<u8>> = Vec::new();
    let mut noise = 0x2545_f491_u32;
    for n in 0..40usize {
        noise ^= noise << 13;
        noise ^= noise >> 17;
        noise ^= noise << 5;
        let mut random: Vec<u8> = (0..(n * 37 % 1400 + 1))
            .map(|k| (noise >> (k % 24)) as u8)
            .collect();
        random[0] = 5 + (noise % 200) as u8; // never a WireGuard type byte
        junk.push(random);
    }
    for (kind, len) in [(1u8, 148usize), (2, 92), (3, 64), (4, 32)] {
        let mut truncated = vec![0u8; len - 1];
        truncated[0] = kind;
        let mut reserved = vec![0u8; len];
        reserved[0] = kind;
        reserved[3] = 1;
        junk.extend([truncated, reserved]);
        // Transport data has no upper bound (its padding stops at the MTU).
        if kind != 4 {
            let mut oversized = vec![0u8; len + 17];
            oversized[0] = kind;
            junk.push(oversized);
        }
    }
    junk.extend([vec![], vec![1], vec![4, 0, 0]]);
    let sent = junk.len();
    let socket = rig.client_ns(0).run(|| UdpSocket::bind("0.0.0.0:0"))??;
    for datagram in &junk {
        socket.send_to(datagram, target)?;
    }
    balancer.wait_metric(
        "wglb_dropped_packets_total{direction=\"to_gateway\"",
        Duration::from_secs(10),
        |v| v == sent as f64,
    )?;
    ensure!(
        balancer.metric("wglb_sessions_created_total")? == 1.0,
        "junk opened a session"
    );
    std::thread::sleep(Duration::from_secs(2));
    let lost = lost_since(&pingers[0], seq);
    ensure!(
        lost.is_empty(),
        "the tunnel lost pings {lost:?} during the junk"
    );
    Ok(())
}

fn ipv6_clients_and_gateways(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V6, &["active", "active"]);
    let mut rig = rig(Family::V6, 2, &config, &[0, 1])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let _pingers = connect(&mut rig, 0..2)?;
    for i in 0..2 {
        ensure!(rig.client_addr(i).is_ipv6());
        ensure!(
            rig.gateway_serving(i)? == Some(i),
            "client {i} is not on gw{i}"
        );
        let endpoint = rig.gateway_endpoint_of(i, i)?.context("no endpoint")?;
        ensure!(
            datapath.relayed_from(endpoint),
            "client {i} reached gw{i} from {endpoint}, not through the {datapath:?} datapath"
        );
    }
    balancer.wait_metric("wglb_sessions{", Duration::from_secs(5), |v| v == 2.0)?;
    Ok(())
}

fn a_gateway_removed_by_a_reload_hands_its_clients_over(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let mut rig = rig(Family::V4, 3, &config, &[0, 1])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..2)?;
    let handshake = rig.client_latest_handshake(1)?;
    let seq = pingers[1].last_seq();

    // gw0 leaves the file: its session goes at once, the client is placed again.
    let start = config.find("[[listener.gateway]]").context("a gateway")?;
    let end = start
        + config[start..]
            .find("state = \"active\"\n")
            .context("its end")?
        + 17;
    let without_gw0 = format!("{}{}", &config[..start], &config[end..]);
    ensure!(!without_gw0.contains("gw0") && without_gw0.contains("gw1"));
    let removed = SystemTime::now();
    balancer.reload(&without_gw0)?;
    balancer.wait_metric(
        r#"wglb_session_evictions_total{listener="test",reason="gateway_gone"}"#,
        Duration::from_secs(5),
        |v| v == 1.0,
    )?;
    let failover = first_reply(&pingers[0], removed, Duration::from_secs(40))?;
    eprintln!("client 0 answered again {failover:?} after gw0 was removed");
    ensure!(failover <= FAILOVER_BOUND, "took {failover:?}");
    let expected = predicted_gateway(&without_gw0, rig.client_addr(0));
    ensure!(
        rig.gateway_serving(0)? == Some(expected),
        "client 0 is not on gw{expected}"
    );
    let endpoint = rig
        .gateway_endpoint_of(expected, 0)?
        .context("no endpoint")?;
    ensure!(datapath.relayed_from(endpoint), "{endpoint}");
    let lost = lost_since(&pingers[1], seq);
    ensure!(lost.is_empty(), "client 1 lost pings {lost:?}");
    ensure!(rig.client_latest_handshake(1)? == handshake);
    balancer.wait_metric("wglb_sessions{", Duration::from_secs(5), |v| v == 2.0)?;
    Ok(())
}

fn idle_sessions_expire(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active"])
        .replace("hash_key", "idle_timeout = \"3s\"\nhash_key");
    let mut rig = rig(Family::V4, 2, &config, &[1])?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..1)?;
    balancer.wait_metric("wglb_sessions{", Duration::from_secs(5), |v| v == 1.0)?;
    let idle = r#"wglb_session_evictions_total{listener="test",reason="idle"}"#;
    ensure!(
        balancer.metric_or_zero(idle)? == 0.0,
        "expired while in use"
    );
    // Silence: no pings, and no keepalive before WireGuard's 10 s.
    drop(pingers);
    balancer.wait_metric(idle, Duration::from_secs(9), |v| v == 1.0)?;
    ensure!(balancer.metric("wglb_sessions{")? == 0.0);
    let listed: serde_json::Value = serde_json::from_str(&balancer.cli(&["--json", "sessions"])?)?;
    ensure!(listed["total"] == 0, "{listed}");
    Ok(())
}

#[test]
fn xdp_that_cannot_attach_falls_back_to_userspace_under_auto_and_refuses_to_start_under_xdp(
) -> Result<()> {
    let config = config_text(Family::V4, &["active"]);
    let mut rig = rig(Family::V4, 1, &config, &[0])?;
    let unattachable = format!("[datapath]\ninterfaces = [\"nowhere0\"]\n{config}");

    let refused = rig
        .balancer_ns()
        .command(env!("CARGO_BIN_EXE_wglb"))
        .args(["run", "--datapath", "xdp", "--config"])
        .arg(write_config(&rig, "refused.toml", &unattachable)?)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "started: {stderr}");
    ensure!(
        stderr.contains("the XDP datapath cannot run") && stderr.contains("nowhere0"),
        "{stderr}"
    );

    let balancer = Balancer::start(&rig, &unattachable, Datapath::Auto)?;
    let _pingers = connect(&mut rig, 0..1)?;
    let endpoint = rig.gateway_endpoint_of(0, 0)?.context("no endpoint")?;
    ensure!(Datapath::Userspace.relayed_from(endpoint), "{endpoint}");
    ensure!(balancer.metric(r#"wglb_datapath{datapath="userspace"}"#)? == 1.0);
    let log = balancer.log_text();
    ensure!(
        log.contains("forwarding in userspace only") && log.contains("nowhere0"),
        "{log}"
    );
    Ok(())
}

/// Sends `count` copies of `message` (WireGuard-shaped) from client 0's namespace to the
/// balancer, one per spoofed source tuple on client 0's link (so the balancer's kernel takes
/// them as on-link): from `addresses` addresses in turn, a new port each round.
/// A shaped transport message (keepalive-sized).
const TRANSPORT: [u8; 32] = {
    let mut message = [0u8; 32];
    message[0] = 4;
    message
};

fn flood(rig: &Rig, addresses: u8, count: usize, message: &[u8]) -> Result<()> {
    let Some(std::net::IpAddr::V4(client)) = Some(rig.client_addr(0).ip()) else {
        unreachable!("an IPv4 rig")
    };
    let [a, b, c, _] = client.octets();
    let sources: Vec<std::net::SocketAddrV4> = (0..count)
        .map(|k| {
            let ip = std::net::Ipv4Addr::new(a, b, c, 100 + (k % addresses as usize) as u8);
            std::net::SocketAddrV4::new(ip, 1024 + (k / addresses as usize) as u16)
        })
        .collect();
    let std::net::SocketAddr::V4(listener) = rig.listen_addr(0) else {
        unreachable!("an IPv4 rig")
    };
    let flows = std::sync::Arc::new(wglb_lab::generator::Flows::with_message(
        &sources,
        |_| listener,
        message,
    ));
    // Each source once: the whole set at 5,000 datagrams a second.
    let duration = Duration::from_secs_f64(count as f64 / 5000.0);
    let sent = wglb_lab::generator::send(rig.client_ns(0), &flows, 5000, duration, 1)?;
    ensure!(
        sent.packets as usize >= count * 9 / 10,
        "the flood sent only {} datagrams",
        sent.packets
    );
    Ok(())
}

/// The most open files and resident memory a balancer reaches while `during` runs.
fn peak_footprint(
    balancer: &Balancer,
    during: impl FnOnce() -> Result<()>,
) -> Result<(usize, u64)> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = (0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((files, rss)) = balancer.footprint() {
                    peak = (peak.0.max(files), peak.1.max(rss));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        let result = during();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().expect("the sampler");
        result.map(|()| peak)
    })
}

/// A flood of WireGuard-shaped datagrams from thousands of spoofed source tuples, first from one
/// address and then from 64: it may cost the flooder its admission budget and churn the
/// probation part of the table, never a client whose gateway has answered, even an idle one
/// that only the table keeps where it is (on a draining gateway, or moved by a failover whose
/// gateway came back), and a new client still connects meanwhile.
fn a_flood_of_new_sessions_pushes_out_no_idle_client(datapath: Datapath) -> Result<()> {
    const TABLE: usize = 256;
    const PROBATION: usize = 128;
    let states = ["active", "active", "active"];
    let config = config_text(Family::V4, &states).replace(
        "hash_key = \"source-ip-port\"\n",
        &format!(
            "hash_key = \"source-ip-port\"\ntable_size = {TABLE}\nprobation_size = {PROBATION}\n"
        ),
    );
    // Clients 0 and 3 on gw0, 1 and 4 on gw1, 2 on gw2; client 5 arrives during the flood.
    let wanted = [0, 1, 2, 0, 1, 2];
    require_root()?;
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 3,
        client_ports: ports_for(Family::V4, &config, &wanted),
        keepalive: Some(10),
    })?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..5)?;
    // gw1 drains: clients 1 and 4 stay on it only because the table says so.
    balancer.cli(&["drain", "gw1"])?;
    // gw0 is taken out and put back: clients 0 and 3 move (after WireGuard's re-handshake) and
    // stay where they moved, though Maglev would put them back on gw0.
    balancer.cli(&["gateway", "set", "gw0", "--state", "down"])?;
    let moved_at = SystemTime::now();
    for i in [0, 3] {
        first_reply(
            &pingers[i],
            moved_at + Duration::from_secs(1),
            Duration::from_secs(40),
        )?;
        ensure!(
            rig.gateway_serving(i)? == Some(2),
            "client {i} did not move to gw2"
        );
    }
    balancer.cli(&["gateway", "set", "gw0", "--state", "active"])?;
    let placed: Vec<_> = (0..5)
        .map(|i| rig.gateway_serving(i))
        .collect::<Result<_>>()?;
    ensure!(
        placed == [Some(2), Some(1), Some(2), Some(2), Some(1)],
        "placed {placed:?}"
    );
    let handshakes = settled_handshakes(&rig, &[0, 1, 2, 3, 4])?;
    // Idle from here on: keepalives only.
    drop(pingers);
    // Client 5's WireGuard is up, silent until it has something to send: during the flood.
    rig.start_client(5)?;
    let (files_before, rss_before) = balancer.footprint()?;

    let peak = peak_footprint(&balancer, || {
        // One address, 20,000 source ports; a new client connects meanwhile.
        std::thread::scope(|scope| {
            let flooding = scope.spawn(|| flood(&rig, 1, 20_000, &TRANSPORT));
            let newcomer = rig.pinger(5)?;
            first_reply(&newcomer, SystemTime::now(), HANDSHAKE)?;
            flooding.join().expect("the flood")
        })?;
        // 64 addresses, 20,000 tuples: more than probation and table hold together.
        flood(&rig, 64, 20_000, &TRANSPORT)
    })?;
    ensure!(
        rig.gateway_serving(5)?
            == Some(predicted_gateway(
                &config_text(Family::V4, &["active", "draining", "active"]),
                rig.client_addr(5)
            )),
        "the newcomer is not where Maglev puts it"
    );
    // The flood reached the balancer and was held to its budget.
    balancer.wait_metric(
        r#"wglb_dropped_packets_total{direction="to_gateway",listener="test",reason="source_"#,
        Duration::from_secs(5),
        |v| v > 10_000.0,
    )?;
    let (files, rss) = peak;
    eprintln!(
        "flood on {datapath:?}: open files {files_before} -> at most {files}, RSS {} -> at most {} MiB",
        rss_before >> 20,
        rss >> 20
    );
    // A socket per session at most, and little else.
    ensure!(
        files <= files_before + TABLE + PROBATION,
        "{files} open files during the flood, from {files_before}"
    );
    ensure!(
        rss <= rss_before + (64 << 20),
        "RSS grew from {} to {} MiB during the flood",
        rss_before >> 20,
        rss >> 20
    );

    // Every idle client speaks again: answered at once, on its gateway, with no new handshake.
    for i in 0..5 {
        let pinger = rig.pinger(i)?;
        let answered = first_reply(&pinger, SystemTime::now(), Duration::from_secs(10))?;
        ensure!(
            answered < Duration::from_secs(2),
            "client {i} took {answered:?} to be answered after the flood"
        );
        ensure!(rig.gateway_serving(i)? == placed[i], "client {i} moved");
        ensure!(
            rig.client_latest_handshake(i)? == handshakes[i],
            "client {i} handshook again"
        );
    }
    Ok(())
}

/// Passive health, with no sidecar and `/health` answering 200 throughout: a client revoked on
/// every gateway retries its handshakes into one of them for as long as the test runs and takes
/// no gateway down; then a gateway's wireguard-go hangs (SIGSTOP), its clients' handshakes go
/// unanswered, passive health reports it down, and its clients land on other gateways at their
/// next attempt, while every other client stays where it was.
fn a_gateway_that_answers_no_handshakes_is_ejected_by_passive_health(
    datapath: Datapath,
) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2, 0, 1, 2];
    let mut rig = rig(Family::V4, 3, &config, &wanted)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    let ejections = |j: usize| -> Result<f64> {
        balancer.metric_or_zero(&format!(
            r#"wglb_passive_ejections_total{{gateway="gw{j}",listener="test"}}"#
        ))
    };

    // Client 5 (on gw2) is revoked: its data goes unanswered, and 15 s later its initiations.
    let revoked = 5;
    rig.revoke_client(revoked)?;
    let waiting = r#"wglb_passive_waiting_clients{gateway="gw2",listener="test"}"#;
    balancer.wait_metric(waiting, Duration::from_secs(40), |v| v >= 1.0)?;
    // Two more looks after the window: time enough for a wrong verdict.
    std::thread::sleep(Duration::from_secs(3));
    balancer.wait_metric(waiting, Duration::from_secs(5), |v| v >= 1.0)?;
    for j in 0..3 {
        ensure!(ejections(j)? == 0.0, "a revoked client took gw{j} down");
    }

    let stayers = [0, 2, 3];
    let handshakes = settled_handshakes(&rig, &stayers)?;
    rig.freeze_gateway_wireguard(1)?;
    // Replies gw1 sent just before it froze may still arrive for a moment.
    let frozen = SystemTime::now() + Duration::from_millis(300);
    for moved in [1, 4] {
        let back = first_reply(&pingers[moved], frozen, Duration::from_secs(60))?;
        let now_on = rig.gateway_serving(moved)?;
        eprintln!("client {moved} answered again {back:?} after gw1 froze, on gw{now_on:?}");
        ensure!(
            now_on.is_some_and(|j| j != 1),
            "client {moved} is on gw{now_on:?}"
        );
    }
    ensure!(
        ejections(1)? >= 1.0,
        "gw1 was not ejected by passive health"
    );
    ensure!(
        balancer
            .metric(r#"wglb_health_report_up{gateway="gw1",listener="test",source="passive"}"#)?
            == 0.0
    );
    ensure!(
        balancer.metric(
            r#"wglb_health_report_up{gateway="gw1",listener="test",source="builtin-http"}"#
        )? == 1.0,
        "gw1's /health should still say 200"
    );
    for j in [0, 2] {
        ensure!(ejections(j)? == 0.0, "gw{j} was ejected too");
    }
    for (k, &i) in stayers.iter().enumerate() {
        ensure!(
            rig.client_latest_handshake(i)? == handshakes[k],
            "client {i} handshook again"
        );
        ensure!(
            rig.gateway_serving(i)? == Some(wanted[i]),
            "client {i} moved"
        );
    }
    // Its round trips were measured on the way: every client's first handshake at least.
    let rtt = r#"wglb_handshake_rtt_seconds_count{gateway="gw0",listener="test"}"#;
    ensure!(
        balancer.metric(rtt)? >= 2.0,
        "no handshake round trips for gw0"
    );
    Ok(())
}

/// With the location's public key, a listener drops initiations whose mac1 is wrong: 10,000 of
/// them from 64 spoofed addresses reach no gateway (dropped, counted), while real clients,
/// whose mac1 is right, connect during the flood.
fn initiations_with_a_wrong_mac1_never_reach_a_gateway(datapath: Datapath) -> Result<()> {
    let base = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2];
    let mut rig = rig(Family::V4, 3, &base, &wanted)?;
    let key = format!("public_key = \"{}\"\nhash_key", rig.gateway_public_key());
    let config = base.replacen("hash_key", &key, 1);
    let balancer = Balancer::start(&rig, &config, datapath)?;
    for i in 0..wanted.len() {
        rig.start_client(i)?;
    }
    // Shaped right, sender index and all; mac1 zeros.
    let mut forged = [0u8; 148];
    forged[0] = 1;
    forged[4..8].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    let start = SystemTime::now();
    let _pingers = std::thread::scope(|scope| -> Result<Vec<Pinger>> {
        let flooding = scope.spawn(|| flood(&rig, 64, 10_000, &forged));
        let pingers = (0..wanted.len())
            .map(|i| rig.pinger(i))
            .collect::<Result<Vec<_>>>()?;
        for pinger in &pingers {
            first_reply(pinger, start, HANDSHAKE)?;
        }
        flooding.join().expect("the flood thread")?;
        Ok(pingers)
    })?;
    let dropped =
        r#"wglb_dropped_packets_total{direction="to_gateway",listener="test",reason="bad_mac1"}"#;
    // The XDP datapath's counters are read once a second.
    let counted = balancer.wait_metric(dropped, Duration::from_secs(5), |v| v >= 9_000.0)?;
    let mut forwarded = 0.0;
    for j in 0..3 {
        forwarded += balancer.metric_or_zero(&format!(
                r#"wglb_handshake_messages_total{{gateway="gw{j}",listener="test",message="handshake_initiation"}}"#
            ),
        )?;
    }
    eprintln!("{counted} forged initiations dropped, {forwarded} initiations forwarded");
    ensure!(
        forwarded <= 3.0 * wanted.len() as f64,
        "{forwarded} initiations reached the gateways: forged ones among them"
    );
    for (i, &j) in wanted.iter().enumerate() {
        ensure!(
            rig.gateway_serving(i)? == Some(j),
            "client {i} is not on gw{j}"
        );
    }
    Ok(())
}

/// Passive health hears ICMP too: a gateway whose wireguard-go is gone (its port closed, its
/// `/health` still 200, no sidecar) answers its clients' data with port unreachable, and is
/// reported down before their own 15 s timer makes them send a single initiation; they come back
/// on other gateways at that first handshake.
fn a_gateway_whose_port_is_closed_is_ejected_before_its_clients_handshake_again(
    datapath: Datapath,
) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2, 0, 1, 2];
    let mut rig = rig(Family::V4, 3, &config, &wanted)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    rig.stop_gateway_wireguard(1)?;
    let stopped = SystemTime::now();
    let ejections = r#"wglb_passive_ejections_total{gateway="gw1",listener="test"}"#;
    // The clients' timer fires 15 s after their first unanswered data.
    balancer.wait_metric(ejections, Duration::from_secs(14), |v| v >= 1.0)?;
    eprintln!("gw1 ejected {:?} after its port closed", stopped.elapsed()?);
    ensure!(
        balancer.metric(r#"wglb_gateway_unreachable_total{gateway="gw1",listener="test"}"#)? >= 1.0
    );
    for moved in [1, 4] {
        let back = first_reply(&pingers[moved], stopped, Duration::from_secs(40))?;
        let now_on = rig.gateway_serving(moved)?;
        eprintln!(
            "client {moved} answered again {back:?} after gw1's port closed, on gw{now_on:?}"
        );
        ensure!(
            now_on.is_some_and(|j| j != 1),
            "client {moved} is on gw{now_on:?}"
        );
    }
    Ok(())
}

/// Every client's NAT mapping changes mid-session (address and port, the old mapping gone): the
/// balancer routes the new tuple by the receiver index its data carries, to the same gateway on
/// a new upstream path; the gateway roams there once the data authenticates; the old tuple's
/// session is retired. Each client keeps its gateway with no new handshake and at most one lost
/// ping. Before this, 4 of 6 clients handshook again 15.5 s later, often elsewhere.
/// The userspace datapath's shards in the rebinding tests: more than the cores of a small
/// machine, so that some new tuples land on another shard than their session's old one.
const SHARDS: usize = 4;

fn rebinding(datapath: Datapath, family: Family) -> Result<()> {
    let config = format!(
        "[datapath]\nshards = {SHARDS}\n\n{}",
        config_text(family, &["active", "active", "active"])
    );
    let wanted = [0, 1, 2, 0, 1, 2];
    let mut rig = rig(family, 3, &config, &wanted)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    let clients: Vec<usize> = (0..wanted.len()).collect();
    let handshakes = settled_handshakes(&rig, &clients)?;
    let mut moved_at = Vec::new();
    let mut tuples = Vec::new();
    for (i, pinger) in pingers.iter().enumerate() {
        moved_at.push(pinger.last_seq());
        let old = rig.client_addr(i);
        let new = rig.rebind_client(i)?;
        eprintln!("client {i} now appears as {new}");
        tuples.push((old, new));
    }
    let rebound = r#"wglb_session_evictions_total{listener="test",reason="rebound"}"#;
    balancer.wait_metric(rebound, Duration::from_secs(10), |v| {
        v >= wanted.len() as f64
    })?;
    if datapath == Datapath::Userspace {
        // Each client's one session is on the shard its new tuple's datagrams reach, also where
        // that is another shard than its old tuple's (whose session that shard retired).
        let crossed = tuples
            .iter()
            .filter(|(old, new)| shard_of(*old, SHARDS) != shard_of(*new, SHARDS))
            .count();
        ensure!(crossed > 0, "no rebinding crosses shards: {tuples:?}");
        let listed = sessions(&balancer)?;
        for (i, (_, new)) in tuples.iter().enumerate() {
            let held: Vec<&Listed> = listed
                .iter()
                .filter(|s| s.client == new.to_string())
                .collect();
            ensure!(
                held.len() == 1 && held[0].shard == Some(shard_of(*new, SHARDS)),
                "client {i} ({new}) is not held once, on shard {}: {listed:?}",
                shard_of(*new, SHARDS)
            );
        }
        ensure!(
            listed.len() == wanted.len(),
            "old tuples' sessions are left: {listed:?}"
        );
    }
    // A few more pings through the new mappings, then no more than one lost each.
    std::thread::sleep(Duration::from_secs(3));
    for (i, &j) in wanted.iter().enumerate() {
        let lost = lost_since(&pingers[i], moved_at[i]);
        ensure!(
            lost.len() <= 1,
            "client {i} lost pings {lost:?} when its mapping changed"
        );
        ensure!(
            rig.client_latest_handshake(i)? == handshakes[i],
            "client {i} handshook again"
        );
        ensure!(rig.gateway_serving(i)? == Some(j), "client {i} moved");
    }
    Ok(())
}

fn clients_whose_nat_mapping_changes_keep_their_gateway(datapath: Datapath) -> Result<()> {
    rebinding(datapath, Family::V4)
}

/// A balancer restarted since the clients' handshakes knows none of their indices: when their
/// mappings change, it does what a tuple-hash balancer does and no worse (each client answers
/// again by WireGuard's own re-handshake at the latest).
fn mappings_that_change_after_a_restart_recover_as_before(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2, 0, 1, 2];
    let mut rig = rig(Family::V4, 3, &config, &wanted)?;
    let mut balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    balancer.stop()?;
    let restarted = SystemTime::now();
    let _balancer = Balancer::start(&rig, &config, datapath)?;
    for pinger in &pingers {
        first_reply(pinger, restarted, Duration::from_secs(10))?;
    }
    for i in 0..wanted.len() {
        rig.rebind_client(i)?;
    }
    let rebound = SystemTime::now();
    for (i, pinger) in pingers.iter().enumerate() {
        let back = first_reply(pinger, rebound, FAILOVER_BOUND + Duration::from_secs(5))?;
        eprintln!("client {i} answered {back:?} after its mapping changed");
    }
    Ok(())
}

/// Forged transport messages from new tuples, carrying a live client's receiver index (as an
/// on-path attacker would see it): the balancer routes them to that client's gateway on paths
/// of their own, where they never authenticate. The victim loses no ping, its gateway still
/// answers it on its own path, and no session is retired.
fn forged_messages_with_a_clients_index_cost_it_nothing(datapath: Datapath) -> Result<()> {
    let config = config_text(Family::V4, &["active", "active", "active"]);
    let wanted = [0, 1, 2];
    let mut rig = rig(Family::V4, 3, &config, &wanted)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    let pingers = connect(&mut rig, 0..wanted.len())?;
    let clients: Vec<usize> = (0..wanted.len()).collect();
    let handshakes = settled_handshakes(&rig, &clients)?;
    let (victim, j) = (1, wanted[1]);
    let client = rig.client_addr(victim).to_string();
    let index = wait_for(
        "the balancer to know the victim's receiver index",
        Duration::from_secs(10),
        || {
            let text = balancer.cli(&["sessions", "--all", "--json"])?;
            let listed: serde_json::Value = serde_json::from_str(&text)?;
            let sessions = listed["sessions"].as_array().context("a session list")?;
            Ok(sessions
                .iter()
                .find(|s| s["client"] == client.as_str())
                .and_then(|s| s["receiver_index"].as_u64()))
        },
    )?;
    let path = rig.gateway_endpoint_of(j, victim)?;
    let created = format!(r#"wglb_sessions_created_total{{gateway="gw{j}",listener="test"}}"#);
    let created_before = balancer.metric(&created)?;
    let from = pingers[victim].last_seq();
    let mut forged = [0u8; 64];
    forged[0] = 4;
    forged[4..8].copy_from_slice(&(index as u32).to_le_bytes());
    flood(&rig, 8, 400, &forged)?;
    // The forgeries reached the victim's gateway (routed by its index, not placed by their
    // tuples, which would spread them over all three).
    let forwarded = balancer.wait_metric(&created, Duration::from_secs(5), |v| {
        v >= created_before + 8.0
    })?;
    eprintln!(
        "{} forged sessions opened on gw{j}",
        forwarded - created_before
    );
    std::thread::sleep(Duration::from_secs(3));
    let lost = lost_since(&pingers[victim], from);
    ensure!(lost.is_empty(), "the victim lost pings {lost:?}");
    ensure!(
        rig.gateway_endpoint_of(j, victim)? == path,
        "gw{j} moved the victim's reply path"
    );
    let rebound = r#"wglb_session_evictions_total{listener="test",reason="rebound"}"#;
    ensure!(
        balancer.metric_or_zero(rebound)? == 0.0,
        "a forgery retired a session"
    );
    ensure!(
        rig.client_latest_handshake(victim)? == handshakes[victim],
        "the victim handshook again"
    );
    Ok(())
}

fn ipv6_clients_whose_nat_mapping_changes_keep_their_gateway(datapath: Datapath) -> Result<()> {
    rebinding(datapath, Family::V6)
}

fn write_config(rig: &Rig, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let path = rig.temp_dir().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

on_every_datapath!(
    clients_whose_nat_mapping_changes_keep_their_gateway,
    mappings_that_change_after_a_restart_recover_as_before,
    ipv6_clients_whose_nat_mapping_changes_keep_their_gateway,
    forged_messages_with_a_clients_index_cost_it_nothing,
    a_gateway_that_answers_no_handshakes_is_ejected_by_passive_health,
    a_gateway_whose_port_is_closed_is_ejected_before_its_clients_handshake_again,
    initiations_with_a_wrong_mac1_never_reach_a_gateway,
    a_flood_of_new_sessions_pushes_out_no_idle_client,
    handshakes_and_pings_spread_over_gateways,
    a_dead_gateways_clients_move_and_the_others_do_not_notice,
    a_core_outage_turning_every_health_check_503_keeps_every_gateway_in_service,
    a_gateway_whose_health_endpoint_is_dead_takes_no_new_clients_until_it_answers,
    draining_through_the_cli_keeps_sessions_and_sends_new_clients_elsewhere,
    a_restarted_balancer_puts_clients_back_on_their_gateways,
    junk_is_dropped_counted_and_harmless,
    ipv6_clients_and_gateways,
    idle_sessions_expire,
    a_gateway_removed_by_a_reload_hands_its_clients_over,
);
