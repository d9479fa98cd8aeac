//! The gateway's WireGuard interface: its peers as the balancers are told of them, and the one
//! change an agent makes, a handshake started towards a path a balancer opened.
//!
//! Reading goes through Defguard's crate (netlink for kernel WireGuard, the control socket for
//! wireguard-go). The order's writes touch only the peer's endpoint and persistent keepalive;
//! on wireguard-go they are `update_only` writes, so a peer that Core removed an instant before
//! is never added back. The crate has no such write for netlink: on kernel WireGuard the agent
//! re-reads the peer just before and writes it back whole with those two fields changed.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{Kernel, Userspace, WGApi, WireguardInterfaceApi};

/// A peer as the gateway holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    /// Unix ms of the latest completed handshake.
    pub latest_handshake_ms: Option<u64>,
}

/// How the gateway runs WireGuard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The kernel module, through netlink (in the agent's network namespace).
    Kernel,
    /// wireguard-go (or another userspace implementation), through
    /// `/var/run/wireguard/IFACE.sock`.
    Userspace,
}

pub struct Interface {
    name: String,
    api: Api,
}

enum Api {
    Kernel(WGApi<Kernel>),
    Userspace(WGApi<Userspace>),
}

/// wireguard-go's control socket answers within milliseconds; one that hangs is frozen.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(2);

impl Interface {
    pub fn new(name: &str, backend: Backend) -> anyhow::Result<Interface> {
        let api = match backend {
            Backend::Kernel => Api::Kernel(WGApi::<Kernel>::new(name)?),
            Backend::Userspace => Api::Userspace(WGApi::<Userspace>::new(name)?),
        };
        Ok(Interface {
            name: name.to_string(),
            api,
        })
    }

    /// Every peer, or why the interface cannot be read (gone, or its process dead).
    pub fn peers(&self) -> anyhow::Result<Vec<PeerState>> {
        let host = match &self.api {
            Api::Kernel(api) => api.read_interface_data(),
            Api::Userspace(api) => api.read_interface_data(),
        }
        .with_context(|| format!("cannot read WireGuard interface {}", self.name))?;
        let mut peers: Vec<PeerState> = host
            .peers
            .values()
            .map(|peer| PeerState {
                public_key: peer.public_key.as_array(),
                endpoint: peer.endpoint,
                latest_handshake_ms: peer
                    .last_handshake
                    .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|since| since.as_millis() as u64)
                    .filter(|ms| *ms > 0),
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        Ok(peers)
    }

    /// Points the peer of `public_key` at `endpoint` and makes the gateway start a handshake to
    /// it now: WireGuard sends a keepalive at once when persistent keepalive is switched on
    /// (from 0), and with no session that keepalive starts a handshake. The peer's own
    /// keepalive setting is put back after; the endpoint stays, since it is the client's path
    /// from now on. Refused for a key the gateway does not have.
    pub fn start_handshake(
        &self,
        public_key: &[u8; 32],
        endpoint: SocketAddr,
    ) -> anyhow::Result<()> {
        let key = Key::new(*public_key);
        let peer = self.peer(&key)?;
        let keepalive = peer.persistent_keepalive_interval.unwrap_or(0);
        match &self.api {
            Api::Userspace(_) => {
                self.update_only(&key, Some(endpoint), 0)?;
                self.update_only(&key, None, 1)?;
                self.update_only(&key, None, keepalive)
            }
            Api::Kernel(api) => {
                let mut peer = peer;
                peer.endpoint = Some(endpoint);
                for interval in [0, 1, keepalive] {
                    // Re-read each time: a write of a peer Core removed meanwhile would add it.
                    let now = self.peer(&key)?;
                    peer.allowed_ips = now.allowed_ips;
                    peer.preshared_key = now.preshared_key;
                    peer.persistent_keepalive_interval = Some(interval);
                    api.configure_peer(&peer)
                        .with_context(|| format!("cannot configure the peer on {}", self.name))?;
                }
                Ok(())
            }
        }
    }

    fn peer(&self, key: &Key) -> anyhow::Result<Peer> {
        let host = match &self.api {
            Api::Kernel(api) => api.read_interface_data(),
            Api::Userspace(api) => api.read_interface_data(),
        }
        .with_context(|| format!("cannot read WireGuard interface {}", self.name))?;
        host.peers.get(key).cloned().with_context(|| {
            format!(
                "{} has no peer {key}: orders are only for its own peers",
                self.name
            )
        })
    }

    /// One `set` on wireguard-go's control socket that changes an existing peer only.
    fn update_only(
        &self,
        key: &Key,
        endpoint: Option<SocketAddr>,
        keepalive: u16,
    ) -> anyhow::Result<()> {
        let path = format!("/var/run/wireguard/{}.sock", self.name);
        let mut socket =
            UnixStream::connect(&path).with_context(|| format!("cannot connect to {path}"))?;
        socket.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        socket.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        let mut request = format!(
            "set=1\npublic_key={}\nupdate_only=true\n",
            key.to_lower_hex()
        );
        if let Some(endpoint) = endpoint {
            request += &format!("endpoint={endpoint}\n");
        }
        request += &format!("persistent_keepalive_interval={keepalive}\n\n");
        socket.write_all(request.as_bytes())?;
        let mut reader = BufReader::new(socket);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("{path} closed without an answer");
            }
            match line.trim().strip_prefix("errno=") {
                Some("0") => return Ok(()),
                Some(errno) => bail!("{path} refused the change: errno {errno}"),
                None => continue,
            }
        }
    }
}
