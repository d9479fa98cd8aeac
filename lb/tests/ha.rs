//! An HA pair: two wglb balancers syncing sessions, and Debian's keepalived moving a floating
//! address between them with the configuration and notify hook shipped in deploy/keepalived/,
//! on shared segments with the clients and three wireguard-go gateways (see the lab's rig).
//!
//! These tests need root and FAIL without it; CI runs them as root.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use support::{
    client_ip, config_text, connect, first_reply, lost_since, ports_for, predicted_gateway,
    sessions, settled_handshakes, shipped, synced_config, Balancer, Datapath, Listed,
};
use wglb_lab::{require_root, wait_for, Daemon, Family, Pinger, Rig, RigSpec};

/// The track script misses twice a second apart, then VRRP moves the address at once (the
/// failing node advertises priority 0); a generous bound for two loaded cores.
const VRRP_SWITCH: Duration = Duration::from_secs(10);

/// Balancer b's configuration: the test listener and gateways, its API on the back segment for
/// the peer, and the peer to sync with.
fn ha_config(rig: &Rig, b: usize, listener_config: &str) -> Result<String> {
    synced_config(rig, b, &[1 - b], listener_config)
}

/// keepalived for balancer b from the shipped configuration, with this rig's interface and
/// addresses, the test's wglb and API socket, and the shipped notify hook writing into the
/// rig's directory. Script security is off only because a test's paths may sit under a world-
/// writable temporary directory, which keepalived refuses for root's scripts.
fn start_keepalived(rig: &Rig, b: usize, api_socket: &Path) -> Result<Daemon> {
    let shipped_text = include_str!("../../deploy/keepalived/keepalived.conf");
    let (front, interface, _) = rig.balancer_front(b);
    let (peer_front, _, _) = rig.balancer_front(1 - b);
    let temp = rig.temp_dir();
    let notify = temp.join(format!("notify{b}"));
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keepalived/keepalived-notify");
    let wglb = env!("CARGO_BIN_EXE_wglb");
    fs::write(
        &notify,
        format!(
            "#!/bin/sh\nWGLB_BIN={wglb} WGLB_API={} WGLB_NOTIFY_DIR={} exec {} \"$@\"\n",
            api_socket.display(),
            temp.join(format!("vrrp{b}")).display(),
            hook.display()
        ),
    )?;
    fs::set_permissions(&notify, fs::Permissions::from_mode(0o755))?;
    let replacements = [
        ("    enable_script_security\n", String::new()),
        (
            "/usr/bin/wglb --api /run/wglb/api.sock status",
            format!("{wglb} --api {} status", api_socket.display()),
        ),
        ("interface eth0", format!("interface {interface}")),
        ("dev eth0", format!("dev {interface}")),
        ("priority 150", format!("priority {}", 150 - 50 * b)),
        ("192.0.2.100/24", format!("{}/16", wglb_lab::FLOATING_ADDR)),
        ("192.0.2.10 ", format!("{front} ")),
        ("192.0.2.11 ", format!("{peer_front} ")),
        (
            "/usr/lib/wglb/keepalived-notify",
            notify.display().to_string(),
        ),
    ];
    let config = shipped(shipped_text, &replacements)?;
    let path = temp.join(format!("keepalived{b}.conf"));
    fs::write(&path, config)?;
    let pid = |what: &str| temp.join(format!("{what}{b}.pid")).display().to_string();
    Daemon::spawn(
        rig.balancer_ns_at(b),
        Path::new("keepalived"),
        &[
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--vrrp",
            "--use-file",
            &path.display().to_string(),
            "--pid",
            &pid("keepalived"),
            "--vrrp_pid",
            &pid("vrrp"),
        ],
        &temp.join(format!("keepalived{b}.log")),
    )
}

fn holds_floating_address(rig: &Rig, b: usize) -> Result<bool> {
    let (_, interface, _) = rig.balancer_front(b);
    let addresses = wglb_lab::run(
        rig.balancer_ns_at(b)
            .command("ip")
            .args(["-4", "-o", "addr", "show", "dev", &interface]),
    )?;
    Ok(addresses.contains(&format!("{}/", wglb_lab::FLOATING_ADDR)))
}

/// What changes in the gateway set between placement and failover.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Between {
    Nothing,
    /// gw1 is drained on both balancers: the standby's own placement would send its clients
    /// elsewhere.
    Drain,
    /// gw2 joins both pools: the standby's own placement would send some clients of gw0 and gw1
    /// to it.
    Join,
}

/// Client ports for the `Join` scenario: client i on gateway i % 2 under `before`, and the odd
/// clients on gw2 under `after`, which only sync can then keep where they are.
fn ports_moving_to_gw2(before: &str, after: &str, clients: usize) -> Vec<u16> {
    (0..clients)
        .map(|i| {
            let first = 41_000 + 100 * i as u16;
            (first..first + 100)
                .find(|&port| {
                    let client = std::net::SocketAddr::new(client_ip(Family::V4, i), port);
                    let later = if i % 2 == 1 { 2 } else { i % 2 };
                    predicted_gateway(before, client) == i % 2
                        && predicted_gateway(after, client) == later
                })
                .expect("a port within 100 tries")
        })
        .collect()
}

/// Two balancers with keepalived, the floating address on lb0, and `ports.len()` clients
/// pinging through it, each on its `wanted` gateway and held by lb1 as lb0's.
struct Pair {
    rig: Rig,
    configs: Vec<String>,
    balancers: Vec<Balancer>,
    _keepalived: Vec<Daemon>,
    pingers: Vec<Pinger>,
}

impl Pair {
    fn start(
        datapath: Datapath,
        listener: &str,
        wanted: &[usize],
        ports: Vec<u16>,
    ) -> Result<Pair> {
        require_root()?;
        let mut rig = Rig::new(RigSpec {
            balancers: 2,
            family: Family::V4,
            gateways: 3,
            client_ports: ports,
            keepalive: None,
        })?;
        let configs: Vec<String> = (0..2)
            .map(|b| ha_config(&rig, b, listener))
            .collect::<Result<_>>()?;
        let balancers: Vec<Balancer> = (0..2)
            .map(|b| Balancer::start_at(&rig, Some(b), &configs[b], datapath))
            .collect::<Result<_>>()?;
        let keepalived: Vec<Daemon> = (0..2)
            .map(|b| start_keepalived(&rig, b, balancers[b].api_socket()))
            .collect::<Result<_>>()?;
        wait_for("lb0 to take the floating address", VRRP_SWITCH * 2, || {
            Ok(holds_floating_address(&rig, 0)?.then_some(()))
        })?;
        let pingers = connect(&mut rig, 0..wanted.len())?;
        for (i, &j) in wanted.iter().enumerate() {
            ensure!(
                rig.gateway_serving(i)? == Some(j),
                "client {i} is not on gw{j}"
            );
        }
        wait_for(
            "lb1 to hold lb0's sessions",
            Duration::from_secs(10),
            || {
                let held = sessions(&balancers[1])?;
                let synced = held
                    .iter()
                    .filter(|s| s.synced_from.as_deref() == Some("lb0"))
                    .count();
                Ok((synced == wanted.len()).then_some(held))
            },
        )?;
        Ok(Pair {
            rig,
            configs,
            balancers,
            _keepalived: keepalived,
            pingers,
        })
    }

    /// A pair whose six clients are on gw0, gw1, gw2, gw0, gw1, gw2, and where they should be.
    fn spread(datapath: Datapath) -> Result<(Pair, [usize; 6])> {
        let all = config_text(Family::V4, &["active", "active", "active"]);
        let wanted = [0, 1, 2, 0, 1, 2];
        let ports = ports_for(Family::V4, &all, &wanted);
        Ok((Pair::start(datapath, &all, &wanted, ports)?, wanted))
    }

    /// SIGKILL for lb0, and the floating address on lb1.
    fn kill_master(&mut self) -> Result<SystemTime> {
        let killed = SystemTime::now();
        self.balancers[0].kill()?;
        wait_for("lb1 to take the floating address", VRRP_SWITCH, || {
            Ok(holds_floating_address(&self.rig, 1)?.then_some(()))
        })?;
        Ok(killed)
    }

    /// Every client on its gateway through lb1's own datapath, lb1 forwarding it, and no new
    /// handshake since `handshakes`.
    fn on_lb1(
        &self,
        datapath: Datapath,
        wanted: &[usize],
        handshakes: &[Option<u64>],
    ) -> Result<()> {
        let rig = &self.rig;
        let (_, _, lb1_back) = rig.balancer_front(1);
        for (i, &j) in wanted.iter().enumerate() {
            let latest = rig.client_latest_handshake(i)?;
            // WireGuard rekeys a session by itself once it is REKEY_AFTER_TIME (120 s) old, and
            // a loaded machine can take that long to get here: a rekey keeps the client on its
            // gateway. A session lost in the failover would start anew on another one.
            let rekeyed = match (handshakes[i], latest) {
                (Some(before), Some(now)) => now >= before + 115,
                _ => false,
            };
            ensure!(
                latest == handshakes[i] || rekeyed && rig.gateway_serving(i)? == Some(j),
                "client {i} handshook again ({:?} -> {latest:?}, unix seconds) on gw{:?}: its session did not survive the failover",
                handshakes[i],
                rig.gateway_serving(i)?
            );
            // The XDP program serves the floating address from its next look at the local
            // addresses (once a second); the userspace datapath relays until then.
            wait_for(
                format!("gw{j} to hear client {i} through lb1's {datapath:?} datapath"),
                Duration::from_secs(5),
                || {
                    let endpoint = rig.gateway_endpoint_of(j, i)?;
                    Ok(endpoint.filter(|e| e.ip() == lb1_back && datapath.relayed_from(*e)))
                },
            )?;
        }
        let held = sessions(&self.balancers[1])?;
        for (i, &j) in wanted.iter().enumerate() {
            let client = rig.client_addr(i).to_string();
            let session = held
                .iter()
                .find(|s| s.client == client && s.synced_from.is_none())
                .with_context(|| format!("lb1 forwards no session of client {i}: {held:?}"))?;
            ensure!(
                session.gateway == format!("gw{j}"),
                "client {i} is on {} at lb1",
                session.gateway
            );
        }
        Ok(())
    }
}

/// Kills the master balancer mid-session: keepalived moves the floating address to the other,
/// and every tunnel goes on through the same gateway with no new handshake, whatever changed in
/// the gateway set `between` placement and failover: only the synced sessions keep clients
/// where their WireGuard state is when the standby's own placement says otherwise.
fn failover(datapath: Datapath, between: Between) -> Result<()> {
    let all = config_text(Family::V4, &["active", "active", "active"]);
    let (listener, wanted, ports) = match between {
        Between::Join => {
            let two = config_text(Family::V4, &["active", "active"]);
            let ports = ports_moving_to_gw2(&two, &all, 6);
            (two, vec![0, 1, 0, 1, 0, 1], ports)
        }
        _ => {
            let wanted = vec![0, 1, 2, 0, 1, 2];
            let ports = ports_for(Family::V4, &all, &wanted);
            (all, wanted, ports)
        }
    };
    let mut pair = Pair::start(datapath, &listener, &wanted, ports)?;
    let rig = &pair.rig;
    match between {
        Between::Nothing => {}
        Between::Drain => {
            for balancer in &pair.balancers {
                balancer.cli(&["drain", "gw1"])?;
            }
        }
        Between::Join => {
            let address = rig.gateway_addr(2).to_string();
            let port = rig.gateway_health_port().to_string();
            for balancer in &pair.balancers {
                balancer.cli(&[
                    "gateway",
                    "add",
                    "--listener",
                    "test",
                    "gw2",
                    &address,
                    "--health-port",
                    &port,
                ])?;
                balancer.wait_health(2, "up")?;
            }
        }
    }
    let clients: Vec<usize> = (0..wanted.len()).collect();
    let handshakes = settled_handshakes(rig, &clients)?;

    let killed = pair.kill_master()?;
    for (i, pinger) in pair.pingers.iter().enumerate() {
        let back = first_reply(pinger, killed, VRRP_SWITCH + Duration::from_secs(5))?;
        eprintln!("client {i} answered again {back:?} after lb0 was killed");
    }
    pair.on_lb1(datapath, &wanted, &handshakes)?;
    let state = fs::read_to_string(pair.rig.temp_dir().join("vrrp1/vrrp-wglb.prom"))
        .context("the notify hook's state file")?;
    ensure!(
        state.contains("wglb_vrrp_state{instance=\"wglb\",state=\"MASTER\"} 1"),
        "{state}"
    );
    Ok(())
}

/// The master dies and comes straight back with an empty table while some clients are silent:
/// its first resync must not make the standby forget the sessions only the standby still
/// holds. When the silent clients speak again (through the standby, which keeps the floating
/// address), they are on their gateways (one of them drained since) with no new handshake.
fn a_restarted_master_makes_the_standby_forget_nothing(datapath: Datapath) -> Result<()> {
    let (mut pair, wanted) = Pair::spread(datapath)?;
    for balancer in &pair.balancers {
        balancer.cli(&["drain", "gw1"])?;
    }
    let clients: Vec<usize> = (0..wanted.len()).collect();
    let handshakes = settled_handshakes(&pair.rig, &clients)?;
    // Clients 1 and 4 (on gw1, drained) fall silent; the others keep talking.
    let silent = [1, 4];
    let mut pingers: Vec<Option<Pinger>> = std::mem::take(&mut pair.pingers)
        .into_iter()
        .map(Some)
        .collect();
    for i in silent {
        pingers[i] = None;
    }
    let killed = pair.kill_master()?;
    for pinger in pingers.iter().flatten() {
        first_reply(pinger, killed, VRRP_SWITCH + Duration::from_secs(5))?;
    }
    // lb0 comes back, empty, and resyncs its (no) sessions to lb1: acknowledged, so applied.
    pair.balancers[0] = Balancer::start_at(&pair.rig, Some(0), &pair.configs[0], datapath)?;
    pair.balancers[0].wait_metric(
        r#"wglb_sync_lag_seconds{peer="lb1"}"#,
        Duration::from_secs(20),
        |_| true,
    )?;
    ensure!(
        holds_floating_address(&pair.rig, 1)?,
        "the floating address went back to lb0 (nopreempt)"
    );
    let spoke = SystemTime::now();
    for i in silent {
        let pinger = pair.rig.pinger(i)?;
        let back = first_reply(&pinger, spoke, Duration::from_secs(5))?;
        eprintln!("silent client {i} answered {back:?} after it spoke again");
        pingers[i] = Some(pinger);
    }
    pair.on_lb1(datapath, &wanted, &handshakes)
}

fn the_standby_takes_over_every_session_when_the_master_dies(datapath: Datapath) -> Result<()> {
    failover(datapath, Between::Nothing)
}

fn sessions_of_a_drained_gateway_survive_a_failover(datapath: Datapath) -> Result<()> {
    failover(datapath, Between::Drain)
}

fn sessions_placed_before_a_gateway_joined_survive_a_failover(datapath: Datapath) -> Result<()> {
    failover(datapath, Between::Join)
}

/// The standby learns each session's receiver index with the session; after a failover the
/// clients' NAT mappings change, before lb1 has seen a single handshake of theirs: lb1 routes
/// each new tuple by the index lb0 announced, to the same gateway, and every client goes on with
/// no new handshake and at most one lost ping. Without the index, each would be placed anew by
/// its new tuple and wait out WireGuard's 15 s re-handshake, most of them on another gateway.
fn clients_whose_mapping_changes_after_a_failover_keep_their_gateway(
    datapath: Datapath,
) -> Result<()> {
    let (mut pair, wanted) = Pair::spread(datapath)?;
    let clients: Vec<usize> = (0..wanted.len()).collect();
    let handshakes = settled_handshakes(&pair.rig, &clients)?;
    wait_for(
        "lb1 to hold lb0's receiver index of every session",
        Duration::from_secs(10),
        || {
            let own = sessions(&pair.balancers[0])?;
            let held = sessions(&pair.balancers[1])?;
            let told = own.iter().filter(|mine| {
                mine.receiver_index.is_some()
                    && held.iter().any(|theirs| {
                        theirs.client == mine.client
                            && theirs.synced_from.as_deref() == Some("lb0")
                            && theirs.receiver_index == mine.receiver_index
                    })
            });
            Ok((told.count() == wanted.len()).then_some(()))
        },
    )
    .with_context(|| {
        // What each held, for a wait that times out.
        let listed = |b: usize| sessions(&pair.balancers[b]).map(|s| format!("{s:?}"));
        format!("lb0: {:?}\nlb1: {:?}", listed(0), listed(1))
    })?;
    let killed = pair.kill_master()?;
    for pinger in &pair.pingers {
        first_reply(pinger, killed, VRRP_SWITCH + Duration::from_secs(5))?;
    }
    pair.on_lb1(datapath, &wanted, &handshakes)?;
    let mut moved_at = Vec::new();
    for (i, pinger) in pair.pingers.iter().enumerate() {
        moved_at.push(pinger.last_seq());
        pair.rig.rebind_client(i)?;
    }
    let rebound = r#"wglb_session_evictions_total{listener="test",reason="rebound"}"#;
    pair.balancers[1].wait_metric(rebound, Duration::from_secs(10), |v| {
        v >= wanted.len() as f64
    })?;
    // A few more pings through the new mappings, then no more than one lost each.
    std::thread::sleep(Duration::from_secs(3));
    for (i, &j) in wanted.iter().enumerate() {
        let lost = lost_since(&pair.pingers[i], moved_at[i]);
        ensure!(
            lost.len() <= 1,
            "client {i} lost pings {lost:?} when its mapping changed"
        );
        ensure!(
            pair.rig.client_latest_handshake(i)? == handshakes[i],
            "client {i} handshook again"
        );
        ensure!(pair.rig.gateway_serving(i)? == Some(j), "client {i} moved");
    }
    Ok(())
}

/// Sends one WireGuard handshake initiation (shaped right; the gateways drop it) from each of
/// `ports` in client 0's namespace to the floating address: a session per port on the balancer
/// holding it.
/// Where the churn test's answering gateway stand-ins listen, beside the real gateways.
const ANSWERING_PORT: u16 = 51999;

fn offer(rig: &Rig, ports: std::ops::Range<u16>) -> Result<()> {
    let to = std::net::SocketAddr::new(wglb_lab::FLOATING_ADDR.into(), 51820);
    rig.client_ns(0).run(move || -> Result<()> {
        let mut initiation = [0u8; 148];
        initiation[0] = 1;
        for (n, port) in ports.enumerate() {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", port))?;
            socket.send_to(&initiation, to)?;
            if n % 128 == 127 {
                // Paced, so no burst outruns a socket buffer.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })?
}

/// The clients of a balancer's own sessions, and of those it holds for `peer`.
fn clients(balancer: &Balancer, peer: &str) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut own = BTreeSet::new();
    let mut held = BTreeSet::new();
    for Listed {
        client,
        synced_from,
        ..
    } in sessions(balancer)?
    {
        match synced_from.as_deref() {
            None => own.insert(client),
            Some(from) if from == peer => held.insert(client),
            Some(_) => false,
        };
    }
    Ok((own, held))
}

/// Waits until lb1 holds exactly lb0's sessions, and returns how many.
fn converged(balancers: &[Balancer], what: &str) -> Result<usize> {
    wait_for(
        format!("lb1 to hold lb0's sessions {what}"),
        Duration::from_secs(40),
        || {
            let (own, _) = clients(&balancers[0], "")?;
            let (_, held) = clients(&balancers[1], "lb0")?;
            Ok((own == held).then_some(own.len()))
        },
    )
}

fn route(rig: &Rig, b: usize, verb: &str) -> Result<()> {
    let (_, _, peer_back) = rig.balancer_front(1 - b);
    wglb_lab::run(rig.balancer_ns_at(b).command("ip").args([
        "route",
        verb,
        "blackhole",
        &format!("{peer_back}/32"),
    ]))?;
    Ok(())
}

/// Thousands of sessions created and evicted on one balancer appear on and vanish from the
/// other; changes made while the two cannot reach each other (and more than the sync queue
/// holds) converge once they can again.
fn sync_follows_churn_and_converges_after_a_partition(datapath: Datapath) -> Result<()> {
    require_root()?;
    // Only confirmed sessions are synced: the gateways are stand-ins beside the real ones that
    // answer every initiation, and one address may open thousands of sessions.
    let listener = config_text(Family::V4, &["active", "active", "active"])
        .replace(
            ":51820\"\nhealth_port",
            &format!(":{ANSWERING_PORT}\"\nhealth_port"),
        )
        .replace(
            "hash_key = \"source-ip-port\"\n",
            "hash_key = \"source-ip-port\"\nprobation_size = 16384\nsource_rate = 100000\n\
             source_burst = 100000\nsource_unconfirmed = 100000\n",
        );
    let rig = Rig::new(RigSpec {
        balancers: 2,
        family: Family::V4,
        gateways: 3,
        client_ports: vec![41_000],
        keepalive: None,
    })?;
    let answering: Vec<_> = (0..3)
        .map(|j| std::net::SocketAddr::new(rig.gateway_addr(j).ip(), ANSWERING_PORT))
        .collect();
    let _gateways = wglb_lab::generator::Sinks::start(&rig, &answering)?;
    let mut balancers = Vec::new();
    for b in 0..2 {
        let config = ha_config(&rig, b, &listener)?.replace("[sync]\n", "[sync]\nqueue = 512\n");
        balancers.push(Balancer::start_at(&rig, Some(b), &config, datapath)?);
    }
    let (_, interface, _) = rig.balancer_front(0);
    let vip = format!("{}/16", wglb_lab::FLOATING_ADDR);
    wglb_lab::run(
        rig.balancer_ns_at(0)
            .command("ip")
            .args(["addr", "add", &vip, "dev", &interface]),
    )?;

    offer(&rig, 20_000..23_000)?;
    let created = converged(&balancers, "after 3000 were created")?;
    ensure!(created == 3000, "lb0 holds {created} sessions, not 3000");
    balancers[0].cli(&["evict", "--gateway", "gw1"])?;
    let left = converged(&balancers, "after gw1's were evicted")?;
    ensure!(
        left < created && left > 1000,
        "{left} sessions left after evicting gw1's"
    );

    let dropped = r#"wglb_sync_changes_dropped_total{peer="lb1"}"#;
    let resyncs = r#"wglb_sync_resyncs_total{peer="lb1"}"#;
    let resyncs_before = balancers[0].metric_or_zero(resyncs)?;
    for b in 0..2 {
        route(&rig, b, "add")?;
    }
    // More than the queue and the batches in flight hold.
    offer(&rig, 30_000..40_000)?;
    balancers[0].cli(&["evict", "--gateway", "gw0"])?;
    balancers[0].wait_metric(dropped, Duration::from_secs(20), |v| v > 0.0)?;
    // Long enough for the stream to be found dead (HTTP/2 pings): the heal then goes through a
    // new connection and its resync.
    let connected = r#"wglb_sync_peer_connected{peer="lb1"}"#;
    balancers[0].wait_metric(connected, Duration::from_secs(30), |v| v == 0.0)?;
    for b in 0..2 {
        route(&rig, b, "del")?;
    }
    let healed = converged(&balancers, "once the partition healed")?;
    ensure!(
        healed > left,
        "{healed} sessions after the partition, {left} before"
    );
    ensure!(
        balancers[0].metric(resyncs)? > resyncs_before,
        "lb0 converged lb1 without a resync"
    );

    // A clean stop hands the last sessions over before the process ends.
    let confirmed = "wglb_sessions_confirmed_total";
    let before = balancers[0].metric(confirmed)?;
    offer(&rig, 40_000..40_500)?;
    balancers[0].wait_metric(confirmed, Duration::from_secs(10), |v| v >= before + 500.0)?;
    balancers[0].stop()?;
    // No waiting: the flush was acknowledged, so applied, before lb0 exited.
    let (_, held) = clients(&balancers[1], "lb0")?;
    let ip = rig.client_addr(0).ip();
    let missing = (40_000..40_500)
        .filter(|port| !held.contains(&format!("{ip}:{port}")))
        .count();
    ensure!(
        missing == 0,
        "{missing} of the last 500 sessions did not reach lb1"
    );
    Ok(())
}

on_every_datapath!(
    a_restarted_master_makes_the_standby_forget_nothing,
    clients_whose_mapping_changes_after_a_failover_keep_their_gateway,
    the_standby_takes_over_every_session_when_the_master_dies,
    sessions_of_a_drained_gateway_survive_a_failover,
    sessions_placed_before_a_gateway_joined_survive_a_failover,
    sync_follows_churn_and_converges_after_a_partition,
);
