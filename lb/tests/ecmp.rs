//! Active-active balancers behind ECMP: three wglb balancers announce the site's address over
//! BGP with BFD (BIRD 2, with the configuration shipped in deploy/bird/), a router (BIRD 2 too,
//! deploy/bird/bird-router.conf) spreads the clients' flows over them by a hash of their UDP
//! ports, and the balancers sync their sessions each to each, in front of three wireguard-go
//! gateways (see the lab's rig and `Rig::route_anycast`).
//!
//! These tests need root and FAIL without it; CI runs them as root.

#[macro_use]
mod support;

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use support::{
    config_text, connect, lost_since, predicted_gateway, sessions, settled_handshakes, shipped,
    synced_config, Balancer, Datapath,
};
use wglb_lab::{
    require_root, wait_for, Bird, Family, Pinger, Rig, RigSpec, ANYCAST_ADDR, ROUTER_ADDR,
};

const BALANCERS: usize = 3;
const CLIENTS: usize = 6;
/// Time for BGP sessions to come up: BIRD waits a few seconds before it first connects.
const BGP_UP: Duration = Duration::from_secs(30);

/// Balancer b's configuration: the test listener announcing the anycast address, its API on the
/// back segment for its peers, and every other balancer to sync with.
fn site_config(rig: &Rig, b: usize) -> Result<String> {
    let peers: Vec<usize> = (0..BALANCERS).filter(|&p| p != b).collect();
    let rest = format!(
        "[announce]\nwithdraw_wait = \"1s\"\n\n{}",
        listener_config()
    );
    synced_config(rig, b, &peers, &rest)
}

fn listener_config() -> String {
    let text = config_text(Family::V4, &["active", "active", "active"]);
    let hash = "hash_key = \"source-ip-port\"\n";
    text.replace(hash, &format!("{hash}announce = [\"{ANYCAST_ADDR}\"]\n"))
}

fn balancer_bird(rig: &Rig, b: usize) -> Result<String> {
    let (front, interface, _) = rig.balancer_front(b);
    shipped(
        include_str!("../../deploy/bird/bird-balancer.conf"),
        &[
            ("router id 192.0.2.10;", format!("router id {front};")),
            ("interface \"eth0\"", format!("interface \"{interface}\"")),
            ("local 192.0.2.10 as", format!("local {front} as")),
            (
                "neighbor 192.0.2.1 as",
                format!("neighbor {ROUTER_ADDR} as"),
            ),
        ],
    )
}

fn router_bird(rig: &Rig) -> Result<String> {
    let mut replacements = vec![
        ("router id 192.0.2.1;", format!("router id {ROUTER_ADDR};")),
        ("interface \"eth0\"", "interface \"front\"".to_string()),
        ("local 192.0.2.1 as", format!("local {ROUTER_ADDR} as")),
        (
            "203.0.113.0/24{32,32}",
            format!("{ANYCAST_ADDR}/32{{32,32}}"),
        ),
    ];
    let neighbors = [
        "neighbor 192.0.2.10 as",
        "neighbor 192.0.2.11 as",
        "neighbor 192.0.2.12 as",
    ];
    for (b, neighbor) in neighbors.into_iter().enumerate() {
        let (front, _, _) = rig.balancer_front(b);
        replacements.push((neighbor, format!("neighbor {front} as")));
    }
    shipped(
        include_str!("../../deploy/bird/bird-router.conf"),
        &replacements,
    )
}

/// Dropped in field order: the processes first, then the rig (its namespaces).
struct Site {
    balancers: Vec<Balancer>,
    birds: Vec<Bird>,
    router: Bird,
    pingers: Vec<Pinger>,
    rig: Rig,
    configs: Vec<String>,
    /// Client i's gateway.
    gateways: Vec<usize>,
}

impl Site {
    /// Three balancers announcing through BIRD, the router with a path through each, and six
    /// clients pinging: client i on gateway i % 3 through balancer i % 3.
    fn start(datapath: Datapath) -> Result<Site> {
        require_root()?;
        let mut rig = Rig::new(RigSpec {
            balancers: BALANCERS,
            family: Family::V4,
            gateways: 3,
            client_ports: (0..CLIENTS).map(|i| 40_000 + i as u16).collect(),
            keepalive: None,
        })?;
        rig.route_anycast()?;
        let router = Bird::start(
            rig.router_ns(),
            rig.temp_dir(),
            "router",
            &router_bird(&rig)?,
        )?;
        let configs: Vec<String> = (0..BALANCERS)
            .map(|b| site_config(&rig, b))
            .collect::<Result<_>>()?;
        let mut balancers = Vec::new();
        let mut birds = Vec::new();
        for (b, config) in configs.iter().enumerate() {
            balancers.push(Balancer::start_at(&rig, Some(b), config, datapath)?);
            birds.push(Bird::start(
                rig.balancer_ns_at(b),
                rig.temp_dir(),
                &format!("bird-lb{b}"),
                &balancer_bird(&rig, b)?,
            )?);
        }
        let mut site = Site {
            rig,
            configs,
            balancers,
            birds,
            router,
            pingers: Vec::new(),
            gateways: (0..CLIENTS).map(|i| i % 3).collect(),
        };
        site.wait_paths(&[0, 1, 2], BGP_UP)?;
        // Ports that put client i on gateway i % 3 (Maglev) through balancer i % 3 (the router's
        // hash): two clients a balancer, on two different gateways.
        let listener = listener_config();
        for i in 0..CLIENTS {
            let first = 41_000 + 100 * i as u16;
            let client_ip = site.rig.client_addr(i).ip();
            let port = (first..first + 200)
                .find(|&port| {
                    let client = std::net::SocketAddr::new(client_ip, port);
                    predicted_gateway(&listener, client) == i % 3
                        && site.rig.router_choice(i, port).ok().flatten() == Some(i % 3)
                })
                .with_context(|| format!("no port for client {i} within 200 tries"))?;
            site.rig.set_client_port(i, port)?;
        }
        site.pingers = connect(&mut site.rig, 0..CLIENTS)?;
        for i in 0..CLIENTS {
            ensure!(
                site.rig.gateway_serving(i)? == Some(i % 3),
                "client {i} is not on gw{}",
                i % 3
            );
        }
        // Flows spread: each balancer forwards its two clients, and holds the others' sessions
        // from its peers.
        wait_for(
            "every balancer to hold every session",
            Duration::from_secs(15),
            || {
                let mut carried = Vec::new();
                for balancer in &site.balancers {
                    let held = sessions(balancer)?;
                    if held.len() < CLIENTS {
                        return Ok(None);
                    }
                    carried.push(held.iter().filter(|s| s.synced_from.is_none()).count());
                }
                Ok(Some(carried))
            },
        )
        .and_then(|carried| {
            eprintln!("flows per balancer: {carried:?}");
            ensure!(
                carried == [2, 2, 2],
                "each balancer should forward two clients' flows: {carried:?}"
            );
            Ok(())
        })?;
        Ok(site)
    }

    fn wait_paths(&self, wanted: &[usize], timeout: Duration) -> Result<Duration> {
        let started = std::time::Instant::now();
        wait_for(
            format!("the router to have paths through balancers {wanted:?}"),
            timeout,
            || Ok((self.rig.router_paths()? == wanted).then_some(())),
        )
        .with_context(|| format!("router log:\n{}", self.router.log_text()))?;
        Ok(started.elapsed())
    }

    fn marks(&self) -> Vec<u32> {
        self.pingers.iter().map(Pinger::last_seq).collect()
    }

    /// Every client still on its gateway, with no handshake since `handshakes`.
    fn kept(&self, handshakes: &[Option<u64>], what: &str) -> Result<()> {
        for (i, &before) in handshakes.iter().enumerate() {
            let latest = self.rig.client_latest_handshake(i)?;
            // WireGuard rekeys by itself once a session is REKEY_AFTER_TIME (120 s) old, which a
            // loaded machine may reach here; a rekey keeps the client on its gateway, checked
            // below.
            let rekeyed = matches!((before, latest), (Some(b), Some(l)) if l >= b + 115);
            ensure!(
                latest == before || rekeyed,
                "{what}: client {i} handshook again ({before:?} -> {latest:?}): its session did not survive"
            );
            ensure!(
                self.rig.gateway_serving(i)? == Some(self.gateways[i]),
                "{what}: client {i} left gw{}",
                self.gateways[i]
            );
        }
        Ok(())
    }

    /// At most `most` pings of each client lost since `marks`, once a few seconds have passed.
    fn lost_at_most(&self, marks: &[u32], most: usize, what: &str) -> Result<()> {
        std::thread::sleep(Duration::from_secs(3));
        for (i, pinger) in self.pingers.iter().enumerate() {
            let lost = lost_since(pinger, marks[i]);
            ensure!(
                lost.len() <= most,
                "{what}: client {i} lost pings {lost:?} (at most {most} may go)"
            );
        }
        Ok(())
    }
}

/// The site's life: flows spread over three balancers; one stops cleanly (withdrawn first, no
/// client loses more than one ping) and comes back (its flows return, on their gateways); one
/// dies outright (cut off, its wglb and BIRD killed: BFD drops it, every client answers again
/// within a second); one loses every gateway (withdrawn). No client handshakes again throughout.
fn active_active(datapath: Datapath) -> Result<()> {
    let mut site = Site::start(datapath)?;
    let all: Vec<usize> = (0..CLIENTS).collect();
    let handshakes = settled_handshakes(&site.rig, &all)?;

    // An operator withdraws lb0 (`wglb drain --self`): its flows go to the others, which hold
    // its sessions; then it is announced again.
    let marks = site.marks();
    let said = site.balancers[0].cli(&["drain", "--self"])?;
    ensure!(
        said.contains("withheld (drained"),
        "wglb drain --self said: {said}"
    );
    site.wait_paths(&[1, 2], Duration::from_secs(5))?;
    site.lost_at_most(&marks, 1, "lb0 drained")?;
    site.kept(&handshakes, "lb0 drained")?;
    let said = site.balancers[0].cli(&["undrain", "--self"])?;
    ensure!(
        said.contains("announced"),
        "wglb undrain --self said: {said}"
    );
    site.wait_paths(&[0, 1, 2], Duration::from_secs(5))?;

    // A clean stop: the route goes while lb2 still forwards (for `withdraw_wait`).
    let marks = site.marks();
    site.balancers[2].ask_to_stop()?;
    site.wait_paths(&[0, 1], Duration::from_secs(5))?;
    ensure!(
        site.balancers[2].running()?,
        "lb2 exited before the router stopped sending to it"
    );
    site.balancers[2].stop()?;
    site.lost_at_most(&marks, 1, "lb2 stopped")?;
    site.kept(&handshakes, "lb2 stopped")?;

    // Back: its flows return to it, on their gateways. gw2 is drained meanwhile, so that lb2's
    // own placement would send gw2's clients elsewhere: only the sessions its peers push it keep
    // them there, and it announces itself only once it has them.
    for b in [0, 1] {
        site.balancers[b].cli(&["drain", "gw2"])?;
    }
    let drained = site.configs[2].replace(
        "name = \"gw2\"\naddress = \"10.202.2.2:51820\"\nhealth_port = 55003\nstate = \"active\"",
        "name = \"gw2\"\naddress = \"10.202.2.2:51820\"\nhealth_port = 55003\nstate = \"draining\"",
    );
    ensure!(
        drained != site.configs[2],
        "no gw2 to drain in lb2's configuration"
    );
    let marks = site.marks();
    site.balancers[2] = Balancer::start_at(&site.rig, Some(2), &drained, datapath)?;
    site.wait_paths(&[0, 1, 2], BGP_UP)?;
    site.lost_at_most(&marks, 1, "lb2 came back")?;
    site.kept(&handshakes, "lb2 came back")?;
    let returned = sessions(&site.balancers[2])?
        .iter()
        .filter(|s| s.synced_from.is_none())
        .count();
    ensure!(returned > 0, "no flow came back to lb2");
    eprintln!("flows back on lb2: {returned}");

    // Death: lb1's host goes, without a word to the router (no BGP notification, no TCP reset).
    let marks = site.marks();
    let died = SystemTime::now();
    site.rig.cut_balancer(1, true)?;
    site.rig.cut_balancer(1, false)?;
    site.birds[1].kill()?;
    site.balancers[1].kill()?;
    let dropped = site.wait_paths(&[0, 2], Duration::from_secs(5))?;
    eprintln!("router dropped lb1 after {dropped:?}");
    for (i, pinger) in site.pingers.iter().enumerate() {
        let back = pinger
            .wait_reply_after(died, Duration::from_secs(5))
            .with_context(|| format!("client {i} is not answered after lb1 died"))?;
        let took = back.duration_since(died).unwrap_or_default();
        eprintln!("client {i} answered {took:?} after lb1 died");
        ensure!(
            took <= Duration::from_secs(1),
            "client {i} answered only {took:?} after lb1 died (at most 1 s)"
        );
    }
    site.lost_at_most(&marks, 5, "lb1 died")?;
    site.kept(&handshakes, "lb1 died")?;
    // Its flows went to the other two, which forward every client now.
    let mut forwarded = std::collections::BTreeSet::new();
    for b in [0, 2] {
        let own = sessions(&site.balancers[b])?
            .into_iter()
            .filter(|s| s.synced_from.is_none())
            .map(|s| s.client);
        forwarded.extend(own);
    }
    ensure!(
        forwarded.len() == CLIENTS,
        "lb0 and lb2 forward {forwarded:?}, not every client"
    );

    // lb0 loses every gateway (its link to them): it withdraws, and lb2 carries everyone.
    site.rig.cut_balancer(0, false)?;
    site.wait_paths(&[2], Duration::from_secs(30))?;
    let status: serde_json::Value =
        serde_json::from_str(&site.balancers[0].cli(&["status", "--json"])?)?;
    let held = status["routes"][0]["held"].as_str().unwrap_or_default();
    ensure!(
        held.contains("no gateway"),
        "lb0 withheld its route for another reason: {status}"
    );
    for (i, pinger) in site.pingers.iter().enumerate() {
        pinger
            .wait_reply_after(SystemTime::now(), Duration::from_secs(5))
            .with_context(|| format!("client {i} is not answered through lb2"))?;
    }
    site.kept(&handshakes, "lb0 lost its gateways")?;
    Ok(())
}

mod active_active {
    use super::*;

    #[test]
    fn userspace() -> Result<()> {
        super::active_active(Datapath::Userspace)
    }

    #[test]
    fn xdp_native() -> Result<()> {
        super::active_active(Datapath::XdpNative)
    }
}
