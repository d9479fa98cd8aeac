//! A `wglb` process under test inside a rig's balancer namespace, and the placement predictions
//! the tests check real traffic against.

// Each test crate uses a part of this module.
#![allow(dead_code)]

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use wglb::config::{Config, DEFAULT_NAT_PORTS};
use wglb::control::initial_placement;
use wglb::pool::Placement;
use wglb_lab::{Family, Launch, Rig, Wglb};

pub const METRICS_PORT: u16 = 9638;

/// A balancer configuration for a rig: one listener on port 51820, gateways `gw0..`, each with
/// Defguard's health port, states as given.
pub fn config_text(family: Family, states: &[&str]) -> String {
    let listen = match family {
        Family::V4 => "0.0.0.0:51820",
        Family::V6 => "[::]:51820",
    };
    let gateway_ip = |j: usize| match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(10, 202, j as u8, 2)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x202, j as u16, 0, 0, 0, 0, 2)),
    };
    let mut text = format!(
        "[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n\n[[listener]]\nname = \"test\"\nlisten = \"{listen}\"\nhash_key = \"source-ip-port\"\n"
    );
    for (j, state) in states.iter().enumerate() {
        let address = SocketAddr::new(gateway_ip(j), 51820);
        text += &format!(
            "\n[[listener.gateway]]\nname = \"gw{j}\"\naddress = \"{address}\"\nhealth_port = 55003\nstate = \"{state}\"\n"
        );
    }
    text
}

/// The TCP API port of the balancers of a shared-segment rig, on their back segment addresses.
pub const API_PORT: u16 = 7443;
const API_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Balancer b's configuration on a shared-segment rig: its API on the back segment (bearer
/// token), session sync with `peers` (each balancer pushes with a token of its own, which names
/// it to its peers), then `rest` (more sections, and the listeners).
pub fn synced_config(rig: &Rig, b: usize, peers: &[usize], rest: &str) -> Result<String> {
    let token = rig.temp_dir().join("api.token");
    fs::write(&token, API_TOKEN)?;
    let sync_token = |b: usize| -> Result<String> {
        let path = rig.temp_dir().join(format!("sync-lb{b}.token"));
        fs::write(&path, format!("{API_TOKEN}-lb{b}"))?;
        Ok(path.display().to_string())
    };
    let (_, _, back) = rig.balancer_front(b);
    let mut text = format!(
        "[api]\ntcp = \"{back}:{API_PORT}\"\ntoken_file = \"{}\"\n\n[sync]\nnode = \"lb{b}\"\n",
        token.display()
    );
    for &peer in peers {
        let (_, _, peer_back) = rig.balancer_front(peer);
        text += &format!(
            "[[sync.peer]]\nname = \"lb{peer}\"\nurl = \"http://{peer_back}:{API_PORT}\"\ntoken_file = \"{}\"\naccept_token_file = \"{}\"\n",
            sync_token(b)?,
            sync_token(peer)?
        );
    }
    Ok(format!("{text}\n{rest}"))
}

/// Client i's outer address in a rig of `family`, as the lab lays it out.
pub fn client_ip(family: Family, i: usize) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(10, 201, i as u8, 2)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x201, i as u16, 0, 0, 0, 0, 2)),
    }
}

/// The gateway index a new session of `client` lands on under `config_text`.
pub fn predicted_gateway(config_text: &str, client: SocketAddr) -> usize {
    gateway_index(&placement_of(config_text), client)
}

fn placement_of(config_text: &str) -> Placement {
    let config = Config::parse(config_text, "test").expect("test config");
    initial_placement(&config.listeners[0])
}

fn gateway_index(placement: &Placement, client: SocketAddr) -> usize {
    let name = &placement
        .place(client)
        .expect("some gateway takes the client")
        .name;
    name.trim_start_matches("gw")
        .parse()
        .expect("gateway named gwN")
}

/// WireGuard listen ports for clients so that, under `config_text`, client i is placed on
/// `wanted[i]`: lets a test decide the spread instead of hoping for it.
pub fn ports_for(family: Family, config_text: &str, wanted: &[usize]) -> Vec<u16> {
    let placement = placement_of(config_text);
    wanted
        .iter()
        .enumerate()
        .map(|(i, &gateway)| {
            let first = 41_000 + 100 * i as u16;
            (first..first + 100)
                .find(|&port| {
                    gateway_index(&placement, SocketAddr::new(client_ip(family, i), port))
                        == gateway
                })
                .expect("a port within 100 tries")
        })
        .collect()
}

/// Which datapath a balancer under test forwards with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    Userspace,
    /// XDP in driver mode on the rig's veths (their far ends have GRO on, see the lab).
    XdpNative,
    XdpGeneric,
    /// XDP if it can attach, else userspace: the test finds out which.
    Auto,
}

impl Datapath {
    fn args(self) -> &'static [&'static str] {
        match self {
            Datapath::Userspace => &["--datapath", "userspace"],
            Datapath::XdpNative => &["--datapath", "xdp", "--xdp-mode", "native"],
            Datapath::XdpGeneric => &["--datapath", "xdp", "--xdp-mode", "generic"],
            Datapath::Auto => &["--datapath", "auto"],
        }
    }

    fn is_xdp(self) -> bool {
        matches!(self, Datapath::XdpNative | Datapath::XdpGeneric)
    }

    /// Whether a gateway that saw a client's session come from `endpoint` got it through this
    /// datapath: the XDP program sends from its NAT ports, the userspace one from the kernel's
    /// ephemeral ports.
    pub fn relayed_from(self, endpoint: SocketAddr) -> bool {
        let nat_port = DEFAULT_NAT_PORTS.contains(&endpoint.port());
        nat_port == self.is_xdp()
    }
}

/// A balancer under test: the lab's runner, started in the rig's balancer namespace; what it
/// does not add here (metrics, CLI, kill...) is the runner's.
pub struct Balancer {
    wglb: Wglb,
}

impl std::ops::Deref for Balancer {
    type Target = Wglb;

    fn deref(&self) -> &Wglb {
        &self.wglb
    }
}

impl std::ops::DerefMut for Balancer {
    fn deref_mut(&mut self) -> &mut Wglb {
        &mut self.wglb
    }
}

impl Balancer {
    /// Starts `wglb run --config` in the rig's balancer namespace and waits until it serves
    /// metrics (it binds its listeners before that) and, with XDP, until the program forwards
    /// to every gateway itself (the kernel has resolved their MACs for the health checks).
    pub fn start(rig: &Rig, config_text: &str, datapath: Datapath) -> Result<Balancer> {
        Balancer::start_at(rig, None, config_text, datapath)
    }

    /// [`Balancer::start`] for balancer `at` of a shared-segment rig (None: the rig's one).
    pub fn start_at(
        rig: &Rig,
        at: Option<usize>,
        config_text: &str,
        datapath: Datapath,
    ) -> Result<Balancer> {
        let name = format!("wglb{}", at.map_or(String::new(), |b| b.to_string()));
        let ns = match at {
            Some(b) => rig.balancer_ns_at(b),
            None => rig.balancer_ns(),
        };
        let metrics = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
        let mut launch = Launch::new(
            Path::new(env!("CARGO_BIN_EXE_wglb")),
            rig.temp_dir(),
            metrics,
        )
        .named(&name)
        .inside(ns)
        .flags(datapath.args());
        if datapath.is_xdp() {
            launch = launch.xdp_ready(config_text.matches("[[listener.gateway]]").count());
        }
        Ok(Balancer {
            wglb: launch.config(config_text)?,
        })
    }

    /// Waits until the balancer has settled gateway `gw{j}`'s health to `state`.
    pub fn wait_health(&self, j: usize, state: &str) -> Result<()> {
        let series =
            format!(r#"wglb_gateway_health{{gateway="gw{j}",listener="test",state="{state}"}}"#);
        self.wait_metric(&series, Duration::from_secs(10), |v| v == 1.0)?;
        Ok(())
    }

    /// Writes a new configuration and sends SIGHUP; returns once the balancer says it applied it.
    pub fn reload(&self, config_text: &str) -> Result<()> {
        self.wglb.reload(config_text, "ok")
    }

    /// Like [`Balancer::reload`], for a configuration the balancer must refuse.
    pub fn reload_refused(&self, config_text: &str) -> Result<()> {
        self.wglb.reload(config_text, "error")
    }

    /// Writes a new configuration and asks for a reload through the CLI (`wglb reload`), which
    /// the balancer must refuse (exit code 1); returns what the CLI said about it.
    pub fn reload_refused_through_cli(&self, config_text: &str) -> Result<String> {
        self.wglb.write_config(config_text)?;
        let output = self.wglb.run_cli(&["reload"])?;
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        ensure!(
            output.status.code() == Some(1),
            "wglb reload: {}, expected a refusal: {said}",
            output.status
        );
        Ok(said)
    }

    /// SIGTERM without waiting: [`Balancer::stop`] waits for the exit.
    pub fn ask_to_stop(&self) -> Result<()> {
        self.wglb.signal(Signal::SIGTERM)
    }
}

/// A balancer's session as `wglb sessions --all --json` lists it.
#[derive(Debug)]
pub struct Listed {
    pub client: String,
    pub gateway: String,
    pub synced_from: Option<String>,
    pub receiver_index: Option<u64>,
    /// The userspace datapath's shard holding it.
    pub shard: Option<usize>,
}

/// Every session a balancer holds, its own and its peers' (standby).
pub fn sessions(balancer: &Balancer) -> Result<Vec<Listed>> {
    let text = balancer.cli(&["sessions", "--all", "--json"])?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    let sessions = value["sessions"].as_array().context("a session list")?;
    Ok(sessions
        .iter()
        .map(|s| Listed {
            client: s["client"].as_str().unwrap_or_default().to_string(),
            gateway: s["gateway"].as_str().unwrap_or_default().to_string(),
            synced_from: s["synced_from"].as_str().map(str::to_string),
            receiver_index: s["receiver_index"].as_u64(),
            shard: s["shard"].as_u64().map(|shard| shard as usize),
        })
        .collect())
}

/// A configuration shipped in deploy/ with a test's names and addresses in place of the
/// example's: each example value must be there, or the test would run a different file.
pub fn shipped(text: &str, replacements: &[(&str, String)]) -> Result<String> {
    let mut config = text.to_string();
    for (from, to) in replacements {
        ensure!(
            config.contains(from),
            "the shipped configuration has no `{from}`"
        );
        config = config.replace(from, to);
    }
    Ok(config)
}

/// Longest wait for a first handshake through the balancer.
pub const HANDSHAKE: Duration = Duration::from_secs(20);

/// Starts `clients` with a pinger each and waits until every one is answered.
pub fn connect(rig: &mut Rig, clients: std::ops::Range<usize>) -> Result<Vec<wglb_lab::Pinger>> {
    let start = std::time::SystemTime::now();
    let mut pingers = Vec::new();
    for i in clients {
        rig.start_client(i)?;
        pingers.push(rig.pinger(i)?);
    }
    for pinger in &pingers {
        first_reply(pinger, start, HANDSHAKE)?;
    }
    Ok(pingers)
}

/// Waits for client i's first ping reply after `after`.
pub fn first_reply(
    pinger: &wglb_lab::Pinger,
    after: std::time::SystemTime,
    timeout: Duration,
) -> Result<Duration> {
    let at = pinger.wait_reply_after(after, timeout)?;
    Ok(at.duration_since(after).unwrap_or_default())
}

/// The pings `pinger` sent since sequence `from_seq` that were not answered.
pub fn lost_since(pinger: &wglb_lab::Pinger, from_seq: u32) -> Vec<u32> {
    // ping -W 1: replies to the last five (one second at -i 0.2) may still be in flight.
    pinger.lost_between(from_seq, pinger.last_seq().saturating_sub(6))
}

/// The latest handshake of each client, taken once the handshakes have settled: a first
/// handshake answered late (several clients start at once on two cores) has a retransmitted one
/// behind it, REKEY_TIMEOUT (5 s + jitter) later, which must not pass for one a test provoked.
pub fn settled_handshakes(rig: &Rig, clients: &[usize]) -> Result<Vec<Option<u64>>> {
    let latest = |rig: &Rig| -> Result<Vec<Option<u64>>> {
        clients
            .iter()
            .map(|&i| rig.client_latest_handshake(i))
            .collect()
    };
    let newest = latest(rig)?.into_iter().flatten().max().unwrap_or(0);
    let settled = SystemTime::UNIX_EPOCH + Duration::from_secs(newest + 7);
    if let Ok(wait) = settled.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    latest(rig)
}

/// A test per datapath for each scenario: `scenario::userspace`, `scenario::xdp_native`,
/// `scenario::xdp_generic`.
#[allow(unused_macros)]
macro_rules! on_every_datapath {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[test]
            fn userspace() -> Result<()> {
                super::$scenario(Datapath::Userspace)
            }

            #[test]
            fn xdp_native() -> Result<()> {
                super::$scenario(Datapath::XdpNative)
            }

            #[test]
            fn xdp_generic() -> Result<()> {
                super::$scenario(Datapath::XdpGeneric)
            }
        }
    )*};
}
