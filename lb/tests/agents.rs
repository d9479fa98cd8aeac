//! Gateway agents (`wglb-agent`) beside real wireguard-go gateways, in network namespaces: a
//! dead gateway's clients are called by their new gateway instead of waiting out WireGuard's
//! own 15 s timer.
//!
//! Needs root, like every namespace test, and the `wglb-agent` binary next to `wglb` (`cargo
//! test --workspace` builds both).

#[macro_use]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use support::{
    config_text, connect, first_reply, lost_since, ports_for, predicted_gateway,
    settled_handshakes, Balancer, Datapath, HANDSHAKE,
};
use wglb_lab::{agents, require_root, wait_for, Daemon, Family, Pinger, Rig, RigSpec};

/// Far below WireGuard's own 15 s re-handshake floor, which is what a moved client waits without
/// an agent: only a handshake the new gateway starts brings it back this soon. (Measured times
/// are printed; the issue's target is 1 s median, 2 s at worst.)
const CALLED_BACK: Duration = Duration::from_secs(5);

fn agent_binary() -> Result<PathBuf> {
    agents::agent_binary(Path::new(env!("CARGO_BIN_EXE_wglb")))
}

/// The listener's configuration with a TCP API the agents reach, and an `[[agent]]` with a
/// token of its own for each gateway.
fn config_with_agents(rig: &Rig, listener: &str, gateways: usize) -> Result<String> {
    let (api, entries) = agents::agents_config(rig, rig.temp_dir(), "test", gateways)?;
    Ok(format!("[api]\n{api}\n{listener}{entries}"))
}

fn start_agent(rig: &Rig, j: usize, token: &Path) -> Result<Daemon> {
    agents::start_agent(rig, rig.temp_dir(), &agent_binary()?, j, token)
}

/// Kills gw0 (wireguard-go and its /health): its agent reports the interface gone, the balancer
/// takes gw0 down at once, opens each of its clients' paths to the gateway Maglev picks now,
/// and that gateway's agent makes it start a handshake: the clients answer again within
/// seconds, on their new gateways; the other clients notice nothing.
fn a_dead_gateways_clients_are_called_by_their_new_gateway(datapath: Datapath) -> Result<()> {
    called_by_their_new_gateway(datapath, Family::V4)
}

fn a_dead_gateways_ipv6_clients_are_called_by_their_new_gateway(datapath: Datapath) -> Result<()> {
    called_by_their_new_gateway(datapath, Family::V6)
}

/// Six clients on three gateways (gw0, gw1, gw2, gw0, gw1, gw2), each gateway with its agent,
/// which has told the balancer of its two clients.
struct Fleet {
    rig: Rig,
    balancer: Balancer,
    agents: Vec<Daemon>,
    pingers: Vec<Pinger>,
    wanted: [usize; 6],
}

impl Fleet {
    fn start(datapath: Datapath, family: Family) -> Result<Fleet> {
        require_root()?;
        let listener = config_text(family, &["active", "active", "active"]);
        let wanted = [0, 1, 2, 0, 1, 2];
        let mut rig = Rig::new(RigSpec {
            balancers: 1,
            family,
            gateways: 3,
            client_ports: ports_for(family, &listener, &wanted),
            keepalive: None,
        })?;
        let config = config_with_agents(&rig, &listener, 3)?;
        let balancer = Balancer::start(&rig, &config, datapath)?;
        let agents = agents::start_agents(&rig, rig.temp_dir(), &agent_binary()?, 0..3)?;
        let pingers = connect(&mut rig, 0..wanted.len())?;
        for (i, &j) in wanted.iter().enumerate() {
            ensure!(
                rig.gateway_serving(i)? == Some(j),
                "client {i} is not on gw{j}"
            );
        }
        for j in 0..3 {
            let series = format!(r#"wglb_agent_peers{{gateway="gw{j}",listener="test"}}"#);
            balancer.wait_metric(&series, Duration::from_secs(10), |v| v == 2.0)?;
        }
        Ok(Fleet {
            rig,
            balancer,
            agents,
            pingers,
            wanted,
        })
    }

    /// Waits until `count` handshake orders were answered by their client completing the
    /// handshake (the agent tells once it sees it).
    fn wait_orders_completed(&self, count: u32) -> Result<()> {
        wait_for(
            format!("{count} re-homing orders to complete"),
            Duration::from_secs(10),
            || Ok((self.orders_completed()? == f64::from(count)).then_some(())),
        )
        .with_context(|| {
            let metrics = self.balancer.metrics().unwrap_or_default();
            let orders: Vec<&str> = metrics.lines().filter(|l| l.contains("rehome")).collect();
            orders.join("\n")
        })
    }

    fn orders_completed(&self) -> Result<f64> {
        Ok(self
            .balancer
            .metrics()?
            .lines()
            .filter(|l| {
                l.starts_with("wglb_rehome_orders_total{") && l.contains(r#"result="completed""#)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

fn called_by_their_new_gateway(datapath: Datapath, family: Family) -> Result<()> {
    let mut fleet = Fleet::start(datapath, family)?;
    let wanted = fleet.wanted;
    let survivors = [1, 2, 4, 5];
    let handshakes = settled_handshakes(&fleet.rig, &survivors)?;
    let seqs: Vec<_> = survivors
        .iter()
        .map(|&i| fleet.pingers[i].last_seq())
        .collect();

    fleet.rig.stop_gateway(0)?;
    let killed = SystemTime::now();
    let without_gw0 = config_text(family, &["down", "active", "active"]);
    for moved in [0, 3] {
        let back = first_reply(&fleet.pingers[moved], killed, Duration::from_secs(40))?;
        eprintln!("client {moved} answered again {back:?} after gw0 died");
        ensure!(
            back <= CALLED_BACK,
            "client {moved} answered again only {back:?} after gw0 died: it was not called back"
        );
        let expected = predicted_gateway(&without_gw0, fleet.rig.client_addr(moved));
        ensure!(
            fleet.rig.gateway_serving(moved)? == Some(expected),
            "client {moved} is not on gw{expected}"
        );
        let endpoint = fleet
            .rig
            .gateway_endpoint_of(expected, moved)?
            .context("no endpoint")?;
        ensure!(
            datapath.relayed_from(endpoint),
            "client {moved} reached gw{expected} from {endpoint}, not through the {datapath:?} datapath"
        );
    }
    fleet.wait_orders_completed(2)?;
    ensure!(
        fleet
            .balancer
            .metric(r#"wglb_health_report_up{gateway="gw0",listener="test",source="agent"}"#)?
            == 0.0,
        "gw0's agent did not report its interface gone"
    );

    std::thread::sleep(Duration::from_secs(2));
    for (k, &i) in survivors.iter().enumerate() {
        let lost = lost_since(&fleet.pingers[i], seqs[k]);
        ensure!(
            lost.is_empty(),
            "client {i} lost pings {lost:?} while gw0 failed"
        );
        ensure!(
            fleet.rig.client_latest_handshake(i)? == handshakes[k],
            "client {i} handshook again"
        );
        ensure!(
            fleet.rig.gateway_serving(i)? == Some(wanted[i]),
            "client {i} moved"
        );
    }
    Ok(())
}

/// The whole host of gw0 dies, its agent with it: nothing reports its interface gone, so the
/// balancer's own health checks find it dead (its suspect stage included), and its sessions are
/// re-homed by what its agent reported last. Slower than an agent's word, still far from
/// WireGuard's own 15 s.
fn a_dead_hosts_clients_are_called_by_their_new_gateway(datapath: Datapath) -> Result<()> {
    let mut fleet = Fleet::start(datapath, Family::V4)?;
    fleet.agents[0].kill()?;
    fleet.rig.stop_gateway(0)?;
    let killed = SystemTime::now();
    let without_gw0 = config_text(Family::V4, &["down", "active", "active"]);
    for moved in [0, 3] {
        let back = first_reply(&fleet.pingers[moved], killed, Duration::from_secs(40))?;
        eprintln!("client {moved} answered again {back:?} after gw0's host died");
        ensure!(
            back <= Duration::from_secs(10),
            "client {moved} answered again only {back:?} after gw0's host died: it was not called back"
        );
        let expected = predicted_gateway(&without_gw0, fleet.rig.client_addr(moved));
        ensure!(
            fleet.rig.gateway_serving(moved)? == Some(expected),
            "client {moved} is not on gw{expected}"
        );
    }
    fleet.wait_orders_completed(2)?;
    Ok(())
}

/// `wglb drain gw0 --move`: gw0 takes no new clients and its two clients move at once, each to
/// the gateway Maglev picks without gw0, called by it, losing at most one ping; gw0 is left with
/// no session and the other clients notice nothing.
fn a_drained_gateways_clients_move_at_once(datapath: Datapath) -> Result<()> {
    let fleet = Fleet::start(datapath, Family::V4)?;
    let survivors = [1, 2, 4, 5];
    let handshakes = settled_handshakes(&fleet.rig, &survivors)?;
    let seqs: Vec<_> = fleet.pingers.iter().map(|p| p.last_seq()).collect();
    let out = fleet.balancer.cli(&["--json", "drain", "gw0", "--move"])?;
    let answer: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(answer["moved"] == 2 && answer["stayed"] == 0, "{out}");
    let draining = config_text(Family::V4, &["draining", "active", "active"]);
    for moved in [0, 3] {
        let expected = predicted_gateway(&draining, fleet.rig.client_addr(moved));
        wait_for(
            format!("client {moved} to be served by gw{expected}"),
            Duration::from_secs(10),
            || Ok((fleet.rig.gateway_serving(moved)? == Some(expected)).then_some(())),
        )?;
    }
    fleet.wait_orders_completed(2)?;
    std::thread::sleep(Duration::from_secs(2));
    for (i, pinger) in fleet.pingers.iter().enumerate() {
        let lost = lost_since(pinger, seqs[i]);
        let allowed = if fleet.wanted[i] == 0 { 1 } else { 0 };
        ensure!(
            lost.len() <= allowed,
            "client {i} lost pings {lost:?} (at most {allowed} allowed)"
        );
    }
    for (k, &i) in survivors.iter().enumerate() {
        ensure!(
            fleet.rig.client_latest_handshake(i)? == handshakes[k],
            "client {i} handshook again"
        );
    }
    let listed: serde_json::Value =
        serde_json::from_str(&fleet.balancer.cli(&["--json", "sessions"])?)?;
    let on_gw0 = listed["sessions"]
        .as_array()
        .context("a session list")?
        .iter()
        .filter(|s| s["gateway"] == "gw0")
        .count();
    ensure!(on_gw0 == 0, "gw0 still holds {on_gw0} session(s): {listed}");
    Ok(())
}

/// Client 0's device gets a new key (its old peer stays on the gateways, with the same path as
/// its endpoint, until Core would remove it): the gateway's agent reports both, the balancer
/// takes the key that handshook last, and when the gateway dies the client is called with its
/// new key and answers. Had the stale key been taken, the new gateway's call would go unanswered
/// and the client would wait out its own 15 s.
fn a_rotated_key_moves_nobody_wrongly(datapath: Datapath) -> Result<()> {
    let mut fleet = Fleet::start(datapath, Family::V4)?;
    let old_key = fleet.rig.client_public_key(0).to_string();
    fleet.rig.rotate_client_key(0)?;
    let new_key = fleet.rig.client_public_key(0).to_string();
    wait_for(
        "gw0 to handshake with client 0's new key",
        HANDSHAKE,
        || Ok(fleet.rig.gateway_handshake_with(0, 0)?.map(|_| ())),
    )?;
    // The balancer logs the key it holds for a path when it changes.
    wait_for(
        "the balancer to hold client 0's new key",
        Duration::from_secs(5),
        || {
            let log = fleet.balancer.log_text();
            let held = log
                .lines()
                .any(|l| l.contains("the client key behind a path") && l.contains(&new_key));
            Ok(held.then_some(()))
        },
    )?;
    // The old peer is still there, at the same path: the stale entry the agent reports too.
    let stale = fleet
        .rig
        .gateway_peer_endpoint(0, &old_key)?
        .context("the old peer has no endpoint")?;
    let current = fleet
        .rig
        .gateway_endpoint_of(0, 0)?
        .context("no endpoint")?;
    ensure!(
        stale == current,
        "old peer at {stale}, new one at {current}"
    );
    fleet.rig.stop_gateway(0)?;
    let killed = SystemTime::now();
    let back = first_reply(&fleet.pingers[0], killed, Duration::from_secs(40))?;
    eprintln!("client 0 (rotated key) answered again {back:?} after gw0 died");
    ensure!(
        back <= CALLED_BACK,
        "client 0 answered again only {back:?} after gw0 died: it was called with its stale key"
    );
    fleet.wait_orders_completed(2)?;
    Ok(())
}

/// One gateway with a health check, and a balancer that takes its agent.
fn one_gateway(datapath: Datapath) -> Result<(Rig, Balancer)> {
    require_root()?;
    let listener = config_text(Family::V4, &["active"]);
    let rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 1,
        client_ports: Vec::new(),
        keepalive: None,
    })?;
    let config = config_with_agents(&rig, &listener, 1)?;
    let balancer = Balancer::start(&rig, &config, datapath)?;
    Ok((rig, balancer))
}

/// An agent with a token no `[[agent]]` holds is refused, and orders nothing.
fn an_agent_without_a_valid_token_is_refused(datapath: Datapath) -> Result<()> {
    let (rig, balancer) = one_gateway(datapath)?;
    let forged = rig.temp_dir().join("forged.token");
    fs::write(&forged, "not-the-token-of-any-gateway-0123")?;
    let agent = start_agent(&rig, 0, &forged)?;
    wait_for("the agent to be refused", Duration::from_secs(10), || {
        Ok(agent.log_text().contains("refused the agent").then_some(()))
    })?;
    let attached = r#"wglb_agent_attached{gateway="gw0",listener="test"}"#;
    ensure!(
        !balancer.metrics()?.contains(&format!("{attached} 1")),
        "a forged agent attached"
    );
    drop(agent);
    let _agent = start_agent(&rig, 0, &agents::agent_token(rig.temp_dir(), 0)?)?;
    balancer.wait_metric(attached, Duration::from_secs(10), |v| v == 1.0)?;
    Ok(())
}

on_every_datapath!(
    a_dead_gateways_clients_are_called_by_their_new_gateway,
    a_dead_gateways_ipv6_clients_are_called_by_their_new_gateway,
    a_drained_gateways_clients_move_at_once,
    a_rotated_key_moves_nobody_wrongly,
    a_dead_hosts_clients_are_called_by_their_new_gateway,
);

/// An agent pointed at an interface its gateway does not have (or started before it) attaches
/// and reports it gone, and the balancer takes no word from it: the gateway stays up.
fn an_agent_that_never_saw_its_interface_takes_nothing_down(datapath: Datapath) -> Result<()> {
    let (rig, balancer) = one_gateway(datapath)?;
    let token = agents::agent_token(rig.temp_dir(), 0)?;
    let agent = agents::start_agent_on(
        &rig,
        rig.temp_dir(),
        &agent_binary()?,
        0,
        "wg-nonexistent",
        &token,
    )?;
    let attached = r#"wglb_agent_attached{gateway="gw0",listener="test"}"#;
    balancer.wait_metric(attached, Duration::from_secs(10), |v| v == 1.0)?;
    // Its report of the interface gone has reached the balancer (which logs each change).
    wait_for("the agent's report", Duration::from_secs(10), || {
        Ok(balancer
            .log_text()
            .contains("interface_up=false")
            .then_some(()))
    })?;
    ensure!(
        agent.log_text().contains("cannot read the interface yet"),
        "{}",
        agent.log_text()
    );
    let metrics = balancer.metrics()?;
    ensure!(
        !metrics.contains(r#"source="agent""#),
        "the agent's word counted: {metrics}"
    );
    ensure!(
        balancer.metric(r#"wglb_gateway_health{gateway="gw0",listener="test",state="up"}"#)? == 1.0
    );
    Ok(())
}

// The agent's credentials are checked by the API, whatever the datapath.
#[test]
fn an_agent_without_a_valid_token_is_refused_userspace() -> Result<()> {
    an_agent_without_a_valid_token_is_refused(Datapath::Userspace)
}

#[test]
fn an_agent_that_never_saw_its_interface_takes_nothing_down_userspace() -> Result<()> {
    an_agent_that_never_saw_its_interface_takes_nothing_down(Datapath::Userspace)
}
