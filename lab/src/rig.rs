//! The test network: namespaces, veth links, wireguard-go peers and gateway health servers.

use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::cmd;
use crate::health::{HealthEndpoint, HealthServer, SharedHealth};
use crate::netns::Netns;
use crate::ping::Pinger;
use crate::wg::{self, Keypair, WgProcess};

/// The port the balancer listens on and the gateways' WireGuard port, as in a Defguard deployment.
const WG_PORT: u16 = 51820;
/// The Defguard gateway's health endpoint port.
const HEALTH_PORT: u16 = 55003;
/// Every gateway has this tunnel address: they are interchangeable copies of one gateway.
const GATEWAY_TUNNEL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Client i's tunnel address is 10.99.0.{FIRST_CLIENT_HOST + i}.
const FIRST_CLIENT_HOST: usize = 10;

/// Client links are 10.201.i.0/24 or fd00:201:i::/64, gateway links 10.202.j.0/24 or
/// fd00:202:j::/64: the second octet / segment for each address family.
const CLIENT_LINKS: (u8, u16) = (201, 0x201);
const GATEWAY_LINKS: (u8, u16) = (202, 0x202);

/// The bridges of a shared-segment rig's switch, and the address its clients send to.
const FRONT_BRIDGE: &str = "front";
const BACK_BRIDGE: &str = "back";
pub const FLOATING_ADDR: Ipv4Addr = Ipv4Addr::new(10, CLIENT_LINKS.0, 255, 100);
/// With [`Rig::route_anycast`]: the address every balancer holds and announces, on no segment,
/// and the router the clients send it to (the switch namespace, on the front segment).
pub const ANYCAST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 255, 100);
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, CLIENT_LINKS.0, 255, 254);

/// Makes rig ids unique within the process; the process id makes them unique across processes.
static RIG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Set to keep each rig's temporary directory (wireguard-go, ping and balancer logs) after the rig
/// is dropped, to investigate a failing test.
const KEEP_TEMP_ENV: &str = "WGLB_LAB_KEEP_TEMP";

/// The address family of the outer network, the one the balancer forwards; tunnels are always
/// IPv4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    #[default]
    V4,
    V6,
}

#[derive(Clone, Debug)]
pub struct RigSpec {
    /// 1: one balancer namespace with a link per client and per gateway. 2 or more: that many
    /// balancer namespaces on two shared segments (see [`Rig`]), for HA pairs.
    pub balancers: usize,
    pub family: Family,
    pub gateways: usize,
    /// One entry per client: its WireGuard listen port, fixed so that the source address the
    /// balancer sees (and hashes) is known in advance.
    pub client_ports: Vec<u16>,
    /// Persistent keepalive of the clients; without it a client is silent unless it has traffic.
    pub keepalive: Option<u16>,
}

/// A test network of WireGuard clients, a balancer namespace and gateways sharing one key.
///
/// Client i and gateway j each have their own namespace joined to the balancer namespace by a
/// veth link: 10.201.i.0/24 and 10.202.j.0/24 (IPv6: fd00:201:i::/64 and fd00:202:j::/64, i and
/// j in hex), the far end .2 (::2) and the balancer end .1 (::1). Nothing routes between links:
/// a balancer must proxy, receiving on client links and sending from its gateway-link addresses.
///
/// With several balancers the balancer namespace becomes a switch instead: the client and gateway
/// links end in two bridges there, the front segment 10.201.0.0/16 (client i at 10.201.i.2) and
/// the back segment 10.202.0.0/16 (gateway j at 10.202.j.2), and each balancer b has its own
/// namespace on both segments, at 10.201.255.(b+1) and 10.202.255.(b+1). Clients send to the
/// floating address 10.201.255.100, which nobody holds until a test (keepalived) assigns it.
///
/// Everything is torn down on drop, in field order: processes first, then namespaces, then the
/// temporary directory.
pub struct Rig {
    clients: Vec<Client>,
    gateways: Vec<Gateway>,
    /// The balancers of a shared-segment rig (empty otherwise).
    balancers: Vec<Netns>,
    /// The balancer's namespace, or the switch of a shared-segment rig.
    balancer: Netns,
    temp: TempDir,
    id: String,
    family: Family,
    keepalive: Option<u16>,
    gateway_public: String,
    /// Clients send to [`ANYCAST_ADDR`] through the router instead of the floating address.
    anycast: bool,
}

struct Client {
    // Declared before `ns` so that it is dropped, and wireguard-go stopped, first.
    wg: Option<WgProcess>,
    ns: Netns,
    ifname: String,
    port: u16,
    outer: IpAddr,
    balancer_side: IpAddr,
    public: String,
    key_file: PathBuf,
}

struct Gateway {
    health_server: Option<HealthServer>,
    wg: Option<WgProcess>,
    /// Its wireguard-go is stopped by SIGSTOP: its control socket would hang `wg show`.
    frozen: bool,
    ns: Netns,
    ifname: String,
    outer: IpAddr,
    health: Arc<SharedHealth>,
}

impl Gateway {
    /// Its wireguard-go runs and answers (`wg` can ask it).
    fn answering(&self) -> bool {
        self.wg.is_some() && !self.frozen
    }
}

impl Rig {
    /// Builds the network and starts every gateway, but no client: tests start clients once
    /// their balancer is listening, so the first handshake goes through it.
    pub fn new(spec: RigSpec) -> Result<Rig> {
        ensure!(
            spec.client_ports.len() <= 255 - FIRST_CLIENT_HOST,
            "at most {} clients fit the tunnel subnet",
            255 - FIRST_CLIENT_HOST
        );
        ensure!(
            spec.gateways <= 256,
            "at most 256 gateways fit the address plan"
        );
        ensure!(
            !spec.client_ports.contains(&0),
            "client ports must be fixed, not 0"
        );
        ensure!(
            spec.balancers <= 1 || (spec.family == Family::V4 && spec.balancers < 100),
            "shared segments are IPv4, for up to 99 balancers"
        );
        let (id, temp) = claim_id()?;
        let balancer = Netns::create(format!("wglb-{id}-b"))?;
        let gateway_key = Keypair::generate()?;
        let gateway_key_file = temp.path.join("gateway.key");
        gateway_key.write_private(&gateway_key_file)?;
        let mut rig = Rig {
            clients: Vec::new(),
            gateways: Vec::new(),
            balancers: Vec::new(),
            balancer,
            temp,
            id,
            family: spec.family,
            keepalive: spec.keepalive,
            gateway_public: gateway_key.public,
            anycast: false,
        };
        if spec.balancers > 1 {
            rig.add_switch(spec.balancers)
                .context("setting up the shared segments")?;
        }
        for (i, &port) in spec.client_ports.iter().enumerate() {
            let client = rig
                .add_client(i, port)
                .with_context(|| format!("setting up client {i}"))?;
            rig.clients.push(client);
        }
        for j in 0..spec.gateways {
            let gateway = rig
                .add_gateway(j, &gateway_key_file)
                .with_context(|| format!("setting up gateway {j}"))?;
            rig.gateways.push(gateway);
        }
        tracing::info!(id = %rig.id, temp = %rig.temp.path.display(), "rig ready");
        Ok(rig)
    }

    fn add_client(&self, i: usize, port: u16) -> Result<Client> {
        let id = &self.id;
        let ns = Netns::create(format!("wglb-{id}-c{i}"))?;
        let (outer, balancer_side) = self.link_addrs(CLIENT_LINKS, i);
        self.connect(
            &ns,
            &format!("v{id}c{i}"),
            &format!("v{id}C{i}"),
            outer,
            balancer_side,
        )?;
        let key = Keypair::generate()?;
        let key_file = self.temp.path.join(format!("c{i}.key"));
        key.write_private(&key_file)?;
        Ok(Client {
            wg: None,
            ns,
            ifname: format!("wg{id}c{i}"),
            port,
            outer,
            balancer_side,
            public: key.public,
            key_file,
        })
    }

    fn add_gateway(&self, j: usize, key_file: &Path) -> Result<Gateway> {
        let id = &self.id;
        let ns = Netns::create(format!("wglb-{id}-g{j}"))?;
        let (outer, balancer_side) = self.link_addrs(GATEWAY_LINKS, j);
        self.connect(
            &ns,
            &format!("v{id}g{j}"),
            &format!("v{id}G{j}"),
            outer,
            balancer_side,
        )?;
        let ifname = format!("wg{id}g{j}");
        let log = self.temp.path.join(format!("g{j}-wireguard-go.log"));
        let wg = WgProcess::spawn(&ns, &ifname, &log)?;
        let mut set = ns.command("wg");
        set.args(["set", &ifname, "private-key"])
            .arg(key_file)
            .args(["listen-port", &WG_PORT.to_string()]);
        for (i, client) in self.clients.iter().enumerate() {
            set.args([
                "peer",
                &client.public,
                "allowed-ips",
                &client_tunnel_cidr(i, 32),
            ]);
        }
        cmd::run(&mut set)?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{GATEWAY_TUNNEL_ADDR}/24"),
            "dev",
            &ifname,
        ])?;
        ns.ip(&["link", "set", &ifname, "up"])?;
        let endpoint = Arc::new(SharedHealth::new(HealthEndpoint::Alive));
        let server =
            HealthServer::start(&ns, SocketAddr::new(outer, HEALTH_PORT), endpoint.clone())?;
        Ok(Gateway {
            health_server: Some(server),
            wg: Some(wg),
            frozen: false,
            ns,
            ifname,
            outer,
            health: endpoint,
        })
    }

    /// Makes the balancer namespace a switch with a front and a back bridge, and links each
    /// balancer to both.
    fn add_switch(&mut self, balancers: usize) -> Result<()> {
        let id = self.id.clone();
        for bridge in [FRONT_BRIDGE, BACK_BRIDGE] {
            self.balancer
                .ip(&["link", "add", bridge, "type", "bridge"])?;
            self.balancer.ip(&["link", "set", bridge, "up"])?;
        }
        for b in 0..balancers {
            let ns = Netns::create(format!("wglb-{id}-lb{b}"))?;
            for (bridge, octet) in [
                (FRONT_BRIDGE, CLIENT_LINKS.0),
                (BACK_BRIDGE, GATEWAY_LINKS.0),
            ] {
                let near = format!("v{id}{bridge}{b}");
                let far = format!("{bridge}{b}");
                self.balancer
                    .ip(&["link", "add", &near, "type", "veth", "peer", "name", &far])?;
                self.balancer
                    .ip(&["link", "set", &far, "netns", ns.name()])?;
                self.balancer
                    .ip(&["link", "set", &near, "master", bridge, "up"])?;
                // An XDP balancer's native redirects into its veth reach the switch only with
                // GRO on this end (see `connect`).
                cmd::run(
                    self.balancer
                        .command("ethtool")
                        .args(["-K", &near, "gro", "on"]),
                )?;
                let addr = format!("10.{octet}.255.{}/16", b + 1);
                ns.ip(&["addr", "add", &addr, "dev", &far])?;
                ns.ip(&["link", "set", &far, "up"])?;
            }
            ns.ip(&["link", "set", "lo", "up"])?;
            self.balancers.push(ns);
        }
        Ok(())
    }

    fn shared_segments(&self) -> bool {
        !self.balancers.is_empty()
    }

    /// The far-end and balancer-end addresses of link `index` of the given kind; on shared
    /// segments the balancer end is the first balancer's address there.
    fn link_addrs(&self, (v4_octet, v6_segment): (u8, u16), index: usize) -> (IpAddr, IpAddr) {
        if self.shared_segments() {
            let far = IpAddr::V4(Ipv4Addr::new(10, v4_octet, index as u8, 2));
            return (far, IpAddr::V4(Ipv4Addr::new(10, v4_octet, 255, 1)));
        }
        match self.family {
            Family::V4 => {
                let addr = |host| IpAddr::V4(Ipv4Addr::new(10, v4_octet, index as u8, host));
                (addr(2), addr(1))
            }
            Family::V6 => {
                let addr = |host| {
                    IpAddr::V6(Ipv6Addr::new(
                        0xfd00,
                        v6_segment,
                        index as u16,
                        0,
                        0,
                        0,
                        0,
                        host,
                    ))
                };
                (addr(2), addr(1))
            }
        }
    }

    /// Links `ns` to the balancer namespace with a veth pair and addresses both ends.
    fn connect(
        &self,
        ns: &Netns,
        far_if: &str,
        near_if: &str,
        far: IpAddr,
        near: IpAddr,
    ) -> Result<()> {
        ns.ip(&[
            "link", "add", far_if, "type", "veth", "peer", "name", near_if,
        ])?;
        ns.ip(&["link", "set", near_if, "netns", self.balancer.name()])?;
        if self.shared_segments() {
            let bridge = if far
                .to_string()
                .starts_with(&format!("10.{}.", CLIENT_LINKS.0))
            {
                FRONT_BRIDGE
            } else {
                BACK_BRIDGE
            };
            self.balancer
                .ip(&["link", "set", near_if, "master", bridge, "up"])?;
            ns.ip(&["addr", "add", &format!("{far}/16"), "dev", far_if])?;
            ns.ip(&["link", "set", far_if, "up"])?;
        }
        let ends: &[(&Netns, &str, IpAddr)] = if self.shared_segments() {
            &[]
        } else {
            &[(ns, far_if, far), (&self.balancer, near_if, near)]
        };
        for &(netns, ifname, addr) in ends {
            let mut args = vec!["addr", "add"];
            let cidr = match addr {
                IpAddr::V4(_) => format!("{addr}/24"),
                IpAddr::V6(_) => format!("{addr}/64"),
            };
            args.extend([cidr.as_str(), "dev", ifname]);
            if addr.is_ipv6() {
                // Duplicate address detection would hold the address back for a second or more.
                args.push("nodad");
            }
            netns.ip(&args)?;
            netns.ip(&["link", "set", ifname, "up"])?;
        }
        // For an XDP balancer on the near end (harmless to others): veth leaves UDP checksums
        // to an offload that never happens once XDP rewrites and redirects the frame, so the far
        // end computes them in full; and a native-mode redirect into a veth is delivered only
        // if its peer has GRO on (or an XDP program).
        cmd::run(
            ns.command("ethtool")
                .args(["-K", far_if, "tx", "off", "gro", "on"]),
        )?;
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The balancer's namespace (the switch of a shared-segment rig).
    pub fn balancer_ns(&self) -> &Netns {
        &self.balancer
    }

    /// How many gateways the rig has.
    pub fn gateways(&self) -> usize {
        self.gateways.len()
    }

    /// Balancer b's namespace on a shared-segment rig.
    pub fn balancer_ns_at(&self, b: usize) -> &Netns {
        &self.balancers[b]
    }

    /// Balancer b's address on the front (client) segment of a shared-segment rig, its interface
    /// there, and its address on the back (gateway) segment.
    pub fn balancer_front(&self, b: usize) -> (Ipv4Addr, String, Ipv4Addr) {
        (
            Ipv4Addr::new(10, CLIENT_LINKS.0, 255, b as u8 + 1),
            format!("{FRONT_BRIDGE}{b}"),
            Ipv4Addr::new(10, GATEWAY_LINKS.0, 255, b as u8 + 1),
        )
    }

    pub fn client_ns(&self, i: usize) -> &Netns {
        &self.clients[i].ns
    }

    pub fn gateway_ns(&self, j: usize) -> &Netns {
        &self.gateways[j].ns
    }

    /// Gateway j's WireGuard interface (wireguard-go's control socket is named after it).
    pub fn gateway_ifname(&self, j: usize) -> &str {
        &self.gateways[j].ifname
    }

    /// The balancer's address on gateway j's link: where the gateway reaches the balancer.
    pub fn balancer_seen_from_gateway(&self, j: usize) -> IpAddr {
        self.link_addrs(GATEWAY_LINKS, j).1
    }

    /// Where client i sends its WireGuard packets: the balancer's address on client i's link, or
    /// the floating address of a shared-segment rig.
    pub fn listen_addr(&self, i: usize) -> SocketAddr {
        if self.anycast {
            return SocketAddr::new(ANYCAST_ADDR.into(), WG_PORT);
        }
        if self.shared_segments() {
            return SocketAddr::new(FLOATING_ADDR.into(), WG_PORT);
        }
        SocketAddr::new(self.clients[i].balancer_side, WG_PORT)
    }

    /// Client i's outer address and WireGuard port: the source the balancer sees.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.clients[i].outer, self.clients[i].port)
    }

    pub fn gateway_addr(&self, j: usize) -> SocketAddr {
        SocketAddr::new(self.gateways[j].outer, WG_PORT)
    }

    pub fn gateway_health_port(&self) -> u16 {
        HEALTH_PORT
    }

    /// Starts client i's wireguard-go, configured with the balancer as its gateway's endpoint.
    /// It stays silent until it has traffic to send (or a keepalive is due).
    pub fn start_client(&mut self, i: usize) -> Result<()> {
        let client = &self.clients[i];
        if client.wg.is_some() {
            bail!("client {i} is already running");
        }
        let log = self.temp.path.join(format!("c{i}-wireguard-go.log"));
        let wg = WgProcess::spawn(&client.ns, &client.ifname, &log)
            .with_context(|| format!("starting client {i}"))?;
        let mut set = client.ns.command("wg");
        set.args(["set", &client.ifname, "private-key"])
            .arg(&client.key_file)
            .args(["listen-port", &client.port.to_string()])
            .args(["peer", &self.gateway_public])
            .args(["endpoint", &self.listen_addr(i).to_string()])
            .args(["allowed-ips", &format!("{GATEWAY_TUNNEL_ADDR}/32")]);
        if let Some(keepalive) = self.keepalive {
            set.args(["persistent-keepalive", &keepalive.to_string()]);
        }
        cmd::run(&mut set)?;
        let cidr = client_tunnel_cidr(i, 24);
        client
            .ns
            .ip(&["addr", "add", &cidr, "dev", &client.ifname])?;
        client.ns.ip(&["link", "set", &client.ifname, "up"])?;
        self.clients[i].wg = Some(wg);
        Ok(())
    }

    /// Simulates a gateway host going down: its WireGuard port and its health port both stop
    /// answering (the namespace and link stay, so packets to it are refused, not black-holed).
    /// Stopping a stopped gateway does nothing.
    pub fn stop_gateway(&mut self, j: usize) -> Result<()> {
        let gateway = &mut self.gateways[j];
        if let Some(wg) = gateway.wg.take() {
            wg.stop()
                .with_context(|| format!("stopping gateway {j}'s wireguard-go"))?;
        }
        drop(gateway.health_server.take());
        Ok(())
    }

    /// Stops gateway j's WireGuard only: its `/health` goes on answering, as a Defguard gateway's
    /// does when its interface is gone but the process lives.
    pub fn stop_gateway_wireguard(&mut self, j: usize) -> Result<()> {
        if let Some(wg) = self.gateways[j].wg.take() {
            wg.stop()
                .with_context(|| format!("stopping gateway {j}'s wireguard-go"))?;
        }
        Ok(())
    }

    /// Freezes gateway j's wireguard-go (SIGSTOP): it answers nothing while its `/health` goes on
    /// answering 200.
    pub fn freeze_gateway_wireguard(&mut self, j: usize) -> Result<()> {
        let gateway = &mut self.gateways[j];
        gateway
            .wg
            .as_ref()
            .with_context(|| format!("gateway {j}'s wireguard-go is not running"))?
            .freeze()?;
        gateway.frozen = true;
        Ok(())
    }

    /// Removes client i's peer from every running gateway, as Defguard does for a revoked device
    /// or an expired MFA session.
    pub fn revoke_client(&self, i: usize) -> Result<()> {
        let key = self.clients[i].public.clone();
        for j in 0..self.gateways.len() {
            if self.gateways[j].answering() {
                self.remove_gateway_peer(j, &key)?;
            }
        }
        Ok(())
    }

    /// The key every gateway answers handshakes with.
    pub fn gateway_public_key(&self) -> &str {
        &self.gateway_public
    }

    /// Adds a peer (e.g. a health probe's) to every running gateway, with a tunnel address of
    /// its own outside the clients' range.
    pub fn add_gateway_peer(&self, public_key: &str) -> Result<()> {
        for gateway in self.gateways.iter().filter(|g| g.answering()) {
            cmd::run(gateway.ns.command("wg").args([
                "set",
                &gateway.ifname,
                "peer",
                public_key,
                "allowed-ips",
                "10.99.0.250/32",
            ]))?;
        }
        Ok(())
    }

    /// Adds peers without allowed IPs (they handshake, nothing is routed to them) to every
    /// running gateway, in one `wg set` each: a swarm's clients.
    pub fn add_gateway_peers(&self, public_keys: &[String]) -> Result<()> {
        for gateway in self.gateways.iter().filter(|g| g.answering()) {
            let mut set = gateway.ns.command("wg");
            set.args(["set", &gateway.ifname]);
            for key in public_keys {
                set.args(["peer", key]);
            }
            cmd::run(&mut set)?;
        }
        Ok(())
    }

    /// Gives running client i a new key, as a device whose key is rotated: every running
    /// gateway gets the new peer (with the client's tunnel address), while the old one stays
    /// behind, as it does until Core removes it. The client's next packet handshakes with it.
    pub fn rotate_client_key(&mut self, i: usize) -> Result<()> {
        let key = Keypair::generate()?;
        let key_file = self.temp.path.join(format!("c{i}-rotated.key"));
        key.write_private(&key_file)?;
        let client = &self.clients[i];
        ensure!(client.wg.is_some(), "client {i} is not running");
        cmd::run(
            client
                .ns
                .command("wg")
                .args(["set", &client.ifname, "private-key"])
                .arg(&key_file),
        )?;
        for gateway in self.gateways.iter().filter(|g| g.answering()) {
            cmd::run(gateway.ns.command("wg").args([
                "set",
                &gateway.ifname,
                "peer",
                &key.public,
                "allowed-ips",
                &client_tunnel_cidr(i, 32),
            ]))?;
        }
        self.clients[i].public = key.public;
        self.clients[i].key_file = key_file;
        Ok(())
    }

    /// Removes a peer from gateway j.
    pub fn remove_gateway_peer(&self, j: usize, public_key: &str) -> Result<()> {
        let gateway = &self.gateways[j];
        cmd::run(gateway.ns.command("wg").args([
            "set",
            &gateway.ifname,
            "peer",
            public_key,
            "remove",
        ]))?;
        Ok(())
    }

    /// Switches what gateway j's health endpoint does: as a Defguard gateway's when it loses its
    /// connection to Core, or when the gateway process is gone.
    pub fn set_gateway_health(&self, j: usize, health: HealthEndpoint) {
        self.gateways[j].health.set(health);
    }

    /// Unix time of client i's latest handshake with the gateway key, `None` before the first.
    pub fn client_latest_handshake(&self, i: usize) -> Result<Option<u64>> {
        let client = &self.clients[i];
        ensure!(client.wg.is_some(), "client {i} is not running");
        let values = wg::show_peer(
            &client.ns,
            &client.ifname,
            "latest-handshakes",
            &self.gateway_public,
        )?;
        Ok(handshake_time(&values))
    }

    pub fn gateway_handshake_with(&self, j: usize, client: usize) -> Result<Option<u64>> {
        let gateway = &self.gateways[j];
        ensure!(gateway.answering(), "gateway {j} is stopped or frozen");
        let peer = &self.clients[client].public;
        let values = wg::show_peer(&gateway.ns, &gateway.ifname, "latest-handshakes", peer)?;
        Ok(handshake_time(&values))
    }

    /// Bytes gateway j has received from the client's peer, whichever path they took.
    pub fn gateway_rx_bytes_from(&self, j: usize, client: usize) -> Result<u64> {
        let gateway = &self.gateways[j];
        ensure!(gateway.answering(), "gateway {j} is stopped or frozen");
        let peer = &self.clients[client].public;
        let values = wg::show_peer(&gateway.ns, &gateway.ifname, "transfer", peer)?;
        values
            .first()
            .copied()
            .context("`wg show transfer` gave no rx bytes")
    }

    /// Bytes gateway j has sent to the client's peer (a handshake initiation is 148).
    pub fn gateway_tx_bytes_to(&self, j: usize, client: usize) -> Result<u64> {
        let gateway = &self.gateways[j];
        ensure!(gateway.answering(), "gateway {j} is stopped or frozen");
        let peer = &self.clients[client].public;
        let values = wg::show_peer(&gateway.ns, &gateway.ifname, "transfer", peer)?;
        values
            .get(1)
            .copied()
            .context("`wg show transfer` gave no tx bytes")
    }

    /// Gateway j's persistent keepalive for the client's peer, in seconds (0: off).
    pub fn gateway_keepalive_of(&self, j: usize, client: usize) -> Result<u64> {
        let gateway = &self.gateways[j];
        let peer = &self.clients[client].public;
        let output = cmd::run(gateway.ns.command("wg").args([
            "show",
            &gateway.ifname,
            "persistent-keepalive",
        ]))?;
        let line = output
            .lines()
            .find_map(|line| line.strip_prefix(peer.as_str())?.strip_prefix('\t'))
            .with_context(|| format!("gateway {j} has no peer {peer}"))?;
        Ok(line.trim().parse().unwrap_or(0))
    }

    /// Client i's WireGuard public key (base64, as `wg` writes it).
    pub fn client_public_key(&self, i: usize) -> &str {
        &self.clients[i].public
    }

    /// Where gateway j last heard the client's peer from: the balancer's address and the port it
    /// relays the client's session from.
    pub fn gateway_endpoint_of(&self, j: usize, client: usize) -> Result<Option<SocketAddr>> {
        self.gateway_peer_endpoint(j, &self.clients[client].public)
    }

    /// [`Rig::gateway_endpoint_of`] for a peer known by its key (one a client left behind).
    pub fn gateway_peer_endpoint(&self, j: usize, public_key: &str) -> Result<Option<SocketAddr>> {
        let gateway = &self.gateways[j];
        ensure!(gateway.answering(), "gateway {j} is stopped or frozen");
        wg::peer_endpoint(&gateway.ns, &gateway.ifname, public_key)
    }

    /// The running gateway that handshook with the client most recently: the one the balancer
    /// sends it to, since all gateways share one key and the client cannot tell them apart.
    pub fn gateway_serving(&self, client: usize) -> Result<Option<usize>> {
        let mut serving: Option<(usize, u64)> = None;
        for (j, gateway) in self.gateways.iter().enumerate() {
            if !gateway.answering() {
                continue;
            }
            if let Some(at) = self.gateway_handshake_with(j, client)? {
                if serving.is_none_or(|(_, latest)| at > latest) {
                    serving = Some((j, at));
                }
            }
        }
        Ok(serving.map(|(j, _)| j))
    }

    /// Waits for client i's first handshake; something must make the client send (a
    /// [`Pinger`] or a keepalive), as WireGuard only handshakes when it has data to send.
    pub fn wait_handshake(&self, i: usize, timeout: Duration) -> Result<()> {
        cmd::wait_for(format!("a handshake of client {i}"), timeout, || {
            self.client_latest_handshake(i)
        })
        .map(drop)
    }

    /// Pings the gateways' tunnel address through client i's tunnel, which must be started.
    pub fn pinger(&self, i: usize) -> Result<Pinger> {
        let client = &self.clients[i];
        ensure!(
            client.wg.is_some(),
            "client {i} is not running: start_client({i}) before pinger({i})"
        );
        let stderr = self.temp.path.join(format!("c{i}-ping.log"));
        Pinger::spawn(&client.ns, GATEWAY_TUNNEL_ADDR, &stderr)
    }

    /// Makes the balancer namespace a router between the client and gateway links (benchmarks
    /// compare balancers against plain forwarding): routes on both sides; forwarding itself is
    /// switched with [`Rig::set_forwarding`].
    pub fn route_through_balancer(&self) -> Result<()> {
        ensure!(
            self.family == Family::V4 && !self.shared_segments(),
            "routing is set up for IPv4 rigs with one balancer"
        );
        for (i, client) in self.clients.iter().enumerate() {
            let via = self.link_addrs(CLIENT_LINKS, i).1.to_string();
            client.ns.ip(&[
                "route",
                "add",
                &format!("10.{}.0.0/16", GATEWAY_LINKS.0),
                "via",
                &via,
            ])?;
        }
        for (j, gateway) in self.gateways.iter().enumerate() {
            let via = self.link_addrs(GATEWAY_LINKS, j).1.to_string();
            gateway.ns.ip(&[
                "route",
                "add",
                &format!("10.{}.0.0/16", CLIENT_LINKS.0),
                "via",
                &via,
            ])?;
        }
        Ok(())
    }

    /// Makes a shared-segment rig an anycast site behind a router, as for balancers that run
    /// active-active behind ECMP: the switch namespace routes too, at [`ROUTER_ADDR`] on the
    /// front segment, hashing flows over equal-cost paths by their UDP ports; every balancer
    /// holds [`ANYCAST_ADDR`] on its loopback; clients send to it through the router (their
    /// answers come straight back over the segment). Routes to it come from a routing daemon
    /// the test runs in [`Rig::router_ns`].
    pub fn route_anycast(&mut self) -> Result<()> {
        ensure!(
            self.shared_segments(),
            "anycast needs a rig of several balancers"
        );
        let router = &self.balancer;
        router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_ADDR}/16"),
            "dev",
            FRONT_BRIDGE,
        ])?;
        // The router forwards back out of the segment it received on: no ICMP redirects, or
        // clients would learn to bypass it for a balancer.
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv4.conf.all.send_redirects=0",
            &format!("net.ipv4.conf.{FRONT_BRIDGE}.send_redirects=0"),
        ] {
            cmd::run(router.command("sysctl").args(["-q", "-w", setting]))?;
        }
        for client in &self.clients {
            cmd::run(client.ns.command("sysctl").args([
                "-q",
                "-w",
                "net.ipv4.conf.all.accept_redirects=0",
            ]))?;
            client.ns.ip(&[
                "route",
                "add",
                &format!("{ANYCAST_ADDR}/32"),
                "via",
                &ROUTER_ADDR.to_string(),
            ])?;
        }
        for balancer in &self.balancers {
            balancer.ip(&["addr", "add", &format!("{ANYCAST_ADDR}/32"), "dev", "lo"])?;
        }
        self.anycast = true;
        Ok(())
    }

    /// The router's namespace of an anycast rig (the switch).
    pub fn router_ns(&self) -> &Netns {
        &self.balancer
    }

    /// Which balancer the router sends client i's datagrams from `port` to now (by the
    /// multipath hash of its routes to [`ANYCAST_ADDR`]), if it has a route.
    pub fn router_choice(&self, i: usize, port: u16) -> Result<Option<usize>> {
        let client = self.clients[i].outer.to_string();
        let route = cmd::run(self.balancer.command("ip").args([
            "route",
            "get",
            &ANYCAST_ADDR.to_string(),
            "from",
            &client,
            "iif",
            FRONT_BRIDGE,
            "ipproto",
            "udp",
            "sport",
            &port.to_string(),
            "dport",
            &WG_PORT.to_string(),
        ]));
        let Ok(route) = route else {
            return Ok(None);
        };
        let front = |b: usize| self.balancer_front(b).0.to_string();
        let via = route
            .split_whitespace()
            .skip_while(|word| *word != "via")
            .nth(1);
        Ok(via.and_then(|via| (0..self.balancers.len()).find(|&b| front(b) == via)))
    }

    /// The balancers the router has a path to [`ANYCAST_ADDR`] through, in order.
    pub fn router_paths(&self) -> Result<Vec<usize>> {
        let routes = self
            .balancer
            .ip(&["route", "show", &format!("{ANYCAST_ADDR}/32")])?;
        Ok((0..self.balancers.len())
            .filter(|&b| routes.contains(&format!("via {} ", self.balancer_front(b).0)))
            .collect())
    }

    /// Sets the WireGuard port client i will send from; only before it starts.
    pub fn set_client_port(&mut self, i: usize, port: u16) -> Result<()> {
        let client = &mut self.clients[i];
        ensure!(client.wg.is_none(), "client {i} is already running");
        ensure!(port != 0, "client ports must be fixed, not 0");
        client.port = port;
        Ok(())
    }

    /// Cuts balancer b off a shared segment (front: the clients' and the router's; back: the
    /// gateways'), as a dead link or a dead host would: its processes are told nothing.
    pub fn cut_balancer(&self, b: usize, front: bool) -> Result<()> {
        let bridge = if front { FRONT_BRIDGE } else { BACK_BRIDGE };
        let id = &self.id;
        self.balancer
            .ip(&["link", "set", &format!("v{id}{bridge}{b}"), "down"])?;
        Ok(())
    }

    /// IPv4 forwarding in the balancer namespace.
    pub fn set_forwarding(&self, on: bool) -> Result<()> {
        let value = format!("net.ipv4.ip_forward={}", on as u8);
        cmd::run(self.balancer.command("sysctl").args(["-q", "-w", &value]))?;
        Ok(())
    }

    /// Client i's NAT mapping changes: from now on its datagrams leave from another address and
    /// port (rewritten on their way out of its namespace by stateless nftables rules, as a
    /// carrier NAT would), answers to the new mapping come back to it, and what still arrives at
    /// the old one is dropped. Returns the new mapping.
    pub fn rebind_client(&self, i: usize) -> Result<SocketAddr> {
        let id = &self.id;
        let client = &self.clients[i];
        let (family, new_ip, prefix) = match client.outer {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                ("ip", IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, 3)), 32)
            }
            IpAddr::V6(v6) => {
                let mut segments = v6.segments();
                segments[7] = 3;
                ("ip6", IpAddr::V6(std::net::Ipv6Addr::from(segments)), 128)
            }
        };
        let new = SocketAddr::new(new_ip, client.port + 1);
        let (address, link) = (format!("{new_ip}/{prefix}"), format!("v{id}c{i}"));
        let mut add = vec!["addr", "add", &address, "dev", &link];
        if prefix == 128 {
            add.push("nodad");
        }
        client.ns.ip(&add)?;
        let (old_ip, old_port) = (client.outer, client.port);
        let (new_port, f) = (new.port(), family);
        let rules = [
            format!("table {f} wglb_rebind {{"),
            "  chain out {".into(),
            "    type filter hook postrouting priority 100; policy accept;".into(),
            format!("    {f} saddr {old_ip} udp sport {old_port} {f} saddr set {new_ip} udp sport set {new_port}"),
            "  }".into(),
            "  chain in {".into(),
            "    type filter hook prerouting priority -300; policy accept;".into(),
            format!("    {f} daddr {old_ip} udp dport {old_port} drop"),
            format!("    {f} daddr {new_ip} udp dport {new_port} {f} daddr set {old_ip} udp dport set {old_port}"),
            "  }".into(),
            "}".into(),
        ]
        .join("\n");
        let path = self.temp_dir().join(format!("rebind-c{i}.nft"));
        std::fs::write(&path, rules)?;
        cmd::run(
            client
                .ns
                .command("nft")
                .args(["-f", &path.display().to_string()]),
        )?;
        Ok(new)
    }

    /// Points client i's WireGuard at `endpoint` (a balancer, or a gateway directly).
    pub fn set_client_endpoint(&self, i: usize, endpoint: SocketAddr) -> Result<()> {
        let client = &self.clients[i];
        cmd::run(client.ns.command("wg").args([
            "set",
            &client.ifname,
            "peer",
            &self.gateway_public,
            "endpoint",
            &endpoint.to_string(),
        ]))?;
        Ok(())
    }

    /// Pings the gateways' tunnel address through client i's tunnel with `size` bytes of ICMP
    /// payload and the don't-fragment bit, until one reply (three tries): 1392 fills the default
    /// tunnel MTU of 1420, the largest WireGuard transport messages a gateway sees.
    pub fn ping_with_size(&self, i: usize, size: usize) -> Result<()> {
        cmd::run(self.clients[i].ns.command("ping").args([
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size.to_string(),
            &GATEWAY_TUNNEL_ADDR.to_string(),
        ]))
        .with_context(|| format!("no reply to {size}-byte pings through client {i}'s tunnel"))?;
        Ok(())
    }

    /// A directory for this rig's logs, keys and whatever a test wants to put there (a balancer
    /// config, its log); removed with the rig unless `WGLB_LAB_KEEP_TEMP` is set.
    pub fn temp_dir(&self) -> &Path {
        &self.temp.path
    }
}

fn client_tunnel_cidr(i: usize, prefix: u8) -> String {
    format!("10.99.0.{}/{prefix}", FIRST_CLIENT_HOST + i)
}

fn handshake_time(values: &[u64]) -> Option<u64> {
    values.first().copied().filter(|&at| at != 0)
}

/// Picks an id no other rig, in this process or another, is using. The temporary directory is
/// the claim: creating it is atomic, and a leftover namespace of a killed run is skipped too.
fn claim_id() -> Result<(String, TempDir)> {
    for _ in 0..256 {
        let n = RIG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:05x}", ((std::process::id() & 0xfff) << 8) | (n & 0xff));
        if Path::new(&format!("/var/run/netns/wglb-{id}-b")).exists() {
            continue;
        }
        let path = std::env::temp_dir().join(format!("wglb-lab-{id}"));
        match fs::create_dir(&path) {
            Ok(()) => return Ok((id, TempDir { path })),
            Err(error) if error.kind() == ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("creating {}", path.display()));
            }
        }
    }
    bail!("no free rig id: too many rigs (or leftovers of killed runs: `ip netns list`, wglb-lab-* in the temp dir)")
}

struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_TEMP_ENV).is_some() {
            eprintln!("wglb-lab: keeping {}", self.path.display());
            return;
        }
        if let Err(error) = fs::remove_dir_all(&self.path) {
            tracing::warn!("could not remove {}: {error}", self.path.display());
        }
    }
}
