//! The balancers the benchmarks compare, started in a rig's balancer namespace: wglb on each of
//! its datapaths, nginx stream, the floor of a userspace relay (`wglb-relay`: one thread,
//! `recvmmsg`/`sendmmsg`, a hash of the source), nftables DNAT, and plain kernel forwarding. Each
//! is configured the way a fair operator would (see [`Contender::start`]); stopping one resets
//! the namespace.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::{agents, cmd, metrics, Daemon, Launch, Rig, Wglb};

const NGINX_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Where a wglb contender serves metrics, inside the balancer namespace.
pub const WGLB_METRICS: &str = "127.0.0.1:9639";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Userspace,
    XdpNative,
    XdpGeneric,
    Nginx,
    /// `wglb-relay`: what a userspace relay costs at the least, beside wglb's userspace datapath.
    Relay,
    Nftables,
    KernelForwarding,
}

impl Contender {
    pub const ALL: [Contender; 7] = [
        Contender::Userspace,
        Contender::XdpNative,
        Contender::XdpGeneric,
        Contender::Nginx,
        Contender::Relay,
        Contender::Nftables,
        Contender::KernelForwarding,
    ];
    pub const WGLB: [Contender; 3] = [
        Contender::Userspace,
        Contender::XdpNative,
        Contender::XdpGeneric,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Userspace => "wglb userspace",
            Contender::XdpNative => "wglb XDP native",
            Contender::XdpGeneric => "wglb XDP generic",
            Contender::Nginx => "nginx stream",
            Contender::Relay => "userspace relay (floor)",
            Contender::Nftables => "nftables DNAT",
            Contender::KernelForwarding => "kernel forwarding",
        }
    }

    pub fn is_xdp(self) -> bool {
        matches!(self, Contender::XdpNative | Contender::XdpGeneric)
    }

    /// Whether clients send to the gateways themselves (through the balancer namespace as a
    /// router) rather than to the balancer's address.
    pub fn routes_to_gateways(self) -> bool {
        self == Contender::KernelForwarding
    }
}

/// What every contender balances.
pub struct Setup<'a> {
    pub rig: &'a Rig,
    /// The wglb binary (the bench's `CARGO_BIN_EXE_wglb`).
    pub wglb: &'a Path,
    /// Where configurations and logs go.
    pub dir: &'a Path,
    /// The address clients send to (the balancer's on their link).
    pub listen: SocketAddr,
    pub gateways: Vec<SocketAddr>,
    /// Defguard's health port on each gateway, for wglb's built-in checks; None: no checks.
    pub health_port: Option<u16>,
    /// Lines added to wglb's [[listener]] (e.g. `table_size = ...`).
    pub wglb_listener_extra: String,
    /// Lines added to wglb's [datapath] (e.g. `nat_ports = ...`).
    pub wglb_datapath_extra: String,
    /// The `wglb-agent` binary: when set, each gateway gets its agent (`crate::agents`).
    pub agent: Option<&'a Path>,
    /// The `wglb-relay` binary, for [`Contender::Relay`]; None: that contender cannot start.
    pub relay: Option<&'a Path>,
}

/// A running contender; stopped on drop, with forwarding off and the nftables table gone. It
/// holds the balancer namespace by name, so the rig stays free for the benchmark to change
/// (start clients, stop gateways).
pub struct Running {
    /// nginx (whose master takes its workers down with it on SIGTERM, Daemon's stop) or the
    /// relay.
    process: Option<Daemon>,
    wglb: Option<Wglb>,
    ns: String,
    /// The gateways' agents, when the setup asked for them.
    agents: Vec<Daemon>,
}

impl Running {
    /// The contender's process (nginx's master, whose workers count with it), if it has one.
    pub fn pid(&self) -> Option<u32> {
        match &self.wglb {
            Some(wglb) => wglb.pid(),
            None => self.process.as_ref().map(Daemon::pid),
        }
    }

    /// The wglb contender's metrics.
    pub fn wglb_metrics(&self) -> Result<String> {
        self.wglb.as_ref().context("not wglb")?.metrics()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.process.take());
        drop(self.wglb.take());
        for command in [
            &["nft", "delete", "table", "ip", "bench"][..],
            &["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"],
        ] {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .args(command)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Contender {
    /// Starts the contender and waits until it forwards: wglb serves metrics (and, with XDP,
    /// the program forwards to every gateway itself: `warm_up` is called until it does), nginx
    /// or the relay listens, the nftables rules are in. `warm_up` sends traffic through it, so
    /// that the gateways' MACs get resolved.
    pub fn start(self, setup: &Setup, warm_up: impl Fn() -> Result<()>) -> Result<Running> {
        let rig = setup.rig;
        let mut running = Running {
            ns: rig.balancer_ns().name().to_string(),
            process: None,
            wglb: None,
            agents: Vec::new(),
        };
        let spawn = |program: &Path, args: &[&str], log: &str| {
            Daemon::spawn(rig.balancer_ns(), program, args, &setup.dir.join(log))
        };
        match self {
            Contender::Userspace | Contender::XdpNative | Contender::XdpGeneric => {
                let flags = match self {
                    Contender::Userspace => &["--datapath", "userspace"][..],
                    Contender::XdpNative => &["--datapath", "xdp", "--xdp-mode", "native"],
                    _ => &["--datapath", "xdp", "--xdp-mode", "generic"],
                };
                let launch = Launch::new(setup.wglb, setup.dir, WGLB_METRICS.parse()?)
                    .inside(rig.balancer_ns())
                    .log("warn")
                    .flags(flags);
                running.wglb = Some(launch.config(&wglb_config(setup)?)?);
                if let Some(agent) = setup.agent {
                    let gateways = setup.gateways.len();
                    running.agents = agents::start_agents(rig, setup.dir, agent, 0..gateways)?;
                    cmd::wait_for("every agent to attach", Duration::from_secs(10), || {
                        let attached =
                            metrics::sum(&running.wglb_metrics()?, "wglb_agent_attached{");
                        Ok((attached == Some(gateways as f64)).then_some(()))
                    })?;
                }
                warm_up()?;
                if self.is_xdp() {
                    let gateways = setup.gateways.len() as f64;
                    cmd::wait_for(
                        "XDP to forward to every gateway",
                        Duration::from_secs(20),
                        || {
                            // Absent until the program knows a gateway: not ready either.
                            let ready =
                                metrics::sum(&running.wglb_metrics()?, "wglb_xdp_gateway_ready{");
                            if ready.is_none_or(|ready| ready < gateways) {
                                warm_up()?;
                            }
                            Ok((ready == Some(gateways)).then_some(()))
                        },
                    )?;
                }
            }
            Contender::Nginx => {
                ensure!(
                    Path::new(NGINX_MODULE).exists(),
                    "nginx stream is not installed (apt-get install nginx libnginx-mod-stream)"
                );
                let config = setup.dir.join("nginx.conf");
                std::fs::write(&config, nginx_config(setup))?;
                let config = config.display().to_string();
                running.process = Some(spawn(
                    Path::new("nginx"),
                    &["-c", &config, "-g", "daemon off;"],
                    "nginx.log",
                )?);
                wait_to_listen(setup, "nginx")?;
                warm_up()?;
            }
            Contender::Relay => {
                let relay = setup.relay.context(
                    "no wglb-relay binary in the setup (cargo build --release -p wglb-lab --bin wglb-relay)",
                )?;
                let mut args = vec![setup.listen.to_string()];
                args.extend(setup.gateways.iter().map(SocketAddr::to_string));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                running.process = Some(spawn(relay, &args, "relay.log")?);
                wait_to_listen(setup, "the relay")?;
                warm_up()?;
            }
            Contender::Nftables => {
                rig.set_forwarding(true)?;
                let rules = setup.dir.join("bench.nft");
                std::fs::write(&rules, nft_rules(setup))?;
                cmd::run(rig.balancer_ns().command("nft").arg("-f").arg(&rules))?;
                warm_up()?;
            }
            Contender::KernelForwarding => {
                rig.set_forwarding(true)?;
                warm_up()?;
            }
        }
        Ok(running)
    }
}

/// Waits until a UDP socket in the balancer namespace is bound to the listener's port.
fn wait_to_listen(setup: &Setup, what: &str) -> Result<()> {
    let (ns, port) = (setup.rig.balancer_ns(), format!(":{}", setup.listen.port()));
    cmd::wait_for(format!("{what} to listen"), Duration::from_secs(10), || {
        let bound = cmd::run(ns.command("ss").args(["-Hlun", "sport", "=", &port]))?;
        Ok((!bound.trim().is_empty()).then_some(()))
    })
}

fn wglb_config(setup: &Setup) -> Result<String> {
    let (agent_api, agent_entries) = match setup.agent {
        Some(_) => agents::agents_config(setup.rig, setup.dir, "bench", setup.gateways.len())?,
        None => Default::default(),
    };
    // The generator opens thousands of sessions from a few spoofed addresses: admission would
    // refuse most of them, and admission is not what the benchmarks measure.
    let mut text = format!(
        "[api]\nsocket = \"{}\"\n{agent_api}[metrics]\nlisten = \"{WGLB_METRICS}\"\n[datapath]\n{}\n\
         [[listener]]\nname = \"bench\"\nlisten = \"0.0.0.0:{}\"\nhash_key = \"source-ip-port\"\n\
         source_rate = 100000000\nsource_burst = 100000000\nsource_unconfirmed = 100000000\n{}\n",
        setup.dir.join("api.sock").display(),
        setup.wglb_datapath_extra,
        setup.listen.port(),
        setup.wglb_listener_extra,
    );
    for (j, gateway) in setup.gateways.iter().enumerate() {
        let _ = write!(
            text,
            "[[listener.gateway]]\nname = \"gw{j}\"\naddress = \"{gateway}\"\n"
        );
        if let Some(port) = setup.health_port {
            let _ = writeln!(text, "health_port = {port}");
        }
    }
    text += &agent_entries;
    Ok(text)
}

/// nginx stream as users would set it up, fairly: a worker per core with reuseport, hashing the
/// source address and port (so one client address's flows spread), wglb's socket buffer size,
/// its idle timeout, and no `proxy_responses` limit (which would open a session per datagram).
fn nginx_config(setup: &Setup) -> String {
    let servers: String = setup
        .gateways
        .iter()
        .map(|g| format!("    server {g};\n"))
        .collect();
    format!(
        "load_module {NGINX_MODULE};\nworker_processes 2;\nworker_rlimit_nofile 65536;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         stream {{\n  upstream gateways {{\n    hash $remote_addr$remote_port consistent;\n{servers}  }}\n\
         server {{\n    listen {listen} udp reuseport rcvbuf=4m sndbuf=4m;\n\
         proxy_pass gateways;\n    proxy_timeout 180s;\n  }}\n}}\n",
        dir = setup.dir.display(),
        listen = setup.listen,
    )
}

/// DNAT spreading by a hash of the source tuple, with conntrack keeping each flow where it
/// went, and masquerade so the gateways' replies come back through the balancer. The gateways
/// listen on the listener's port (DNAT keeps it).
fn nft_rules(setup: &Setup) -> String {
    let map: Vec<String> = setup
        .gateways
        .iter()
        .enumerate()
        .map(|(j, g)| format!("{j} : {}", g.ip()))
        .collect();
    let addresses: Vec<String> = setup.gateways.iter().map(|g| g.ip().to_string()).collect();
    // A wildcard listener: whatever local address clients send to.
    let to = if setup.listen.ip().is_unspecified() {
        "fib daddr type local".to_string()
    } else {
        format!("ip daddr {}", setup.listen.ip())
    };
    format!(
        "table ip bench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n\
         {to} udp dport {port} dnat to jhash ip saddr . udp sport mod {n} map {{ {map} }}\n  }}\n\
         chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
         ip daddr {{ {addresses} }} udp dport {gport} masquerade\n  }}\n}}\n",
        port = setup.listen.port(),
        n = setup.gateways.len(),
        map = map.join(", "),
        gport = setup.gateways[0].port(),
        addresses = addresses.join(", "),
    )
}
