//! A listener's gateway pool at one moment, and every placement decision derived from it. A
//! [`Placement`] is immutable: the control plane builds a new one when configuration or health
//! changes and hands it to the datapath, so the datapath never sees a half-applied change and the
//! same decisions can be replayed by any datapath (userspace now, XDP later) and by tests.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::maglev::Maglev;

impl HashKey {
    pub fn as_str(self) -> &'static str {
        match self {
            HashKey::SourceIp => "source-ip",
            HashKey::SourceIpPort => "source-ip-port",
        }
    }
}

impl AllDownPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            AllDownPolicy::FailOpen => "fail-open",
            AllDownPolicy::Drop => "drop",
        }
    }
}

impl std::str::FromStr for HashKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "source-ip" => Ok(HashKey::SourceIp),
            "source-ip-port" => Ok(HashKey::SourceIpPort),
            _ => Err(format!("`{text}` is not one of source-ip, source-ip-port")),
        }
    }
}

impl std::str::FromStr for AllDownPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "fail-open" => Ok(AllDownPolicy::FailOpen),
            "drop" => Ok(AllDownPolicy::Drop),
            _ => Err(format!("`{text}` is not one of fail-open, drop")),
        }
    }
}

/// A gateway's identity inside one listener, stable across reloads for as long as its name is
/// configured. Sessions refer to gateways by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayId(pub u32);

/// What the operator says about a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminState {
    /// Takes new sessions and keeps its own.
    Active,
    /// Takes no new session; keeps its own until they go idle (maintenance without cutting anyone).
    Draining,
    /// Out of service: its sessions are evicted at once.
    Down,
}

impl AdminState {
    pub fn parse(text: &str) -> Option<AdminState> {
        match text {
            "active" => Some(AdminState::Active),
            "draining" => Some(AdminState::Draining),
            "down" => Some(AdminState::Down),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Down => "down",
        }
    }
}

/// What identifies a client for placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashKey {
    /// All of a client address's flows go to one gateway, so a client whose NAT changes its source
    /// port stays on its gateway. Many users behind one NAT address share a gateway.
    SourceIp,
    /// Spreads clients behind one NAT address over gateways; a port change re-places the client.
    SourceIpPort,
}

/// What to do when no gateway is healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllDownPolicy {
    /// Keep every session where it is and place new ones as if all active gateways were healthy:
    /// when every check fails at once the checks are more likely wrong than every gateway.
    FailOpen,
    /// Drop what cannot go to a healthy gateway.
    Drop,
}

/// A gateway's health as the control plane has settled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Reported down, not yet long enough to act on: takes no new session but keeps its own, so
    /// that gateways failing together (every Defguard /health turns 503 when Core goes away) are
    /// seen as all down, and fail open, instead of being evicted one by one.
    Suspect,
    /// Down: its sessions are evicted.
    Down,
}

impl Health {
    pub const ALL: [Health; 3] = [Health::Up, Health::Suspect, Health::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Down => "down",
        }
    }
}

/// One gateway as the datapath needs to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayView {
    pub id: GatewayId,
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub admin: AdminState,
    pub health: Health,
}

/// The placement rules of one listener at one moment.
#[derive(Debug)]
pub struct Placement {
    gateways: Vec<GatewayView>,
    /// Maglev over the gateways that take new sessions; its entries index `placeable`.
    table: Maglev,
    placeable: Vec<usize>,
    hash_key: HashKey,
    /// No active gateway is up, and the policy is to fail open.
    failing_open: bool,
}

impl Placement {
    pub fn new(
        gateways: Vec<GatewayView>,
        hash_key: HashKey,
        all_down: AllDownPolicy,
        maglev_size: u32,
    ) -> Placement {
        let active = |g: &GatewayView| g.admin == AdminState::Active;
        let mut placeable: Vec<usize> = (0..gateways.len())
            .filter(|&i| active(&gateways[i]) && gateways[i].health == Health::Up)
            .collect();
        let failing_open = placeable.is_empty()
            && all_down == AllDownPolicy::FailOpen
            && gateways.iter().any(active);
        if failing_open {
            placeable = (0..gateways.len())
                .filter(|&i| active(&gateways[i]))
                .collect();
        }
        let backends: Vec<(&str, u32)> = placeable
            .iter()
            .map(|&i| (gateways[i].name.as_str(), gateways[i].weight))
            .collect();
        let table = Maglev::build(&backends, maglev_size);
        Placement {
            gateways,
            table,
            placeable,
            hash_key,
            failing_open,
        }
    }

    pub fn gateways(&self) -> &[GatewayView] {
        &self.gateways
    }

    pub fn gateway(&self, id: GatewayId) -> Option<&GatewayView> {
        self.gateways.iter().find(|g| g.id == id)
    }

    pub fn hash_key(&self) -> HashKey {
        self.hash_key
    }

    /// Whether some gateway may still be used: up (or suspect) and not taken down. Draining
    /// counts: its sessions still go there.
    pub fn usable(&self) -> bool {
        self.gateways
            .iter()
            .any(|g| g.admin != AdminState::Down && g.health != Health::Down)
    }

    /// True while no active gateway is up and health is being ignored.
    pub fn failing_open(&self) -> bool {
        self.failing_open
    }

    /// The flow hash of a client under this listener's hash key; the XDP datapath computes the
    /// same from packet headers.
    pub fn client_hash(&self, client: SocketAddr) -> u32 {
        let ip = match client.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped()),
        };
        let port = match self.hash_key {
            HashKey::SourceIp => 0,
            HashKey::SourceIpPort => client.port(),
        };
        wglb_common::hash::flow_hash(ip.octets(), port)
    }

    /// The Maglev table slot by slot, as the gateway each slot sends new sessions to: what the
    /// XDP datapath loads, so that it places clients exactly as [`Placement::place`] does.
    pub fn slots(&self) -> impl Iterator<Item = &GatewayView> + '_ {
        self.table
            .slots()
            .iter()
            .map(|&slot| &self.gateways[self.placeable[slot as usize]])
    }

    /// Where a new session of `client` goes, if anywhere.
    pub fn place(&self, client: SocketAddr) -> Option<&GatewayView> {
        let index = self.table.lookup(self.client_hash(client))?;
        Some(&self.gateways[self.placeable[index]])
    }

    /// The gateway of this name and address, if sessions pinned to it may keep going there: how
    /// a session synced from a peer balancer finds its gateway here.
    pub fn keeper(&self, name: &str, address: SocketAddr) -> Option<GatewayId> {
        let gateway = self.gateways.iter().find(|g| g.name == name)?;
        self.keeps(gateway.id, address).then_some(gateway.id)
    }

    /// Whether a session pinned to `id` at `address` may keep going there. A changed address is a
    /// different gateway as far as WireGuard state goes, so it ends the session too.
    pub fn keeps(&self, id: GatewayId, address: SocketAddr) -> bool {
        self.gateway(id).is_some_and(|g| {
            g.address == address
                && g.admin != AdminState::Down
                && (g.health != Health::Down || self.failing_open)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(id: u32, admin: AdminState, health: Health) -> GatewayView {
        GatewayView {
            id: GatewayId(id),
            name: format!("gw{id}"),
            address: SocketAddr::from(([10, 0, 0, id as u8], 51820)),
            weight: 1,
            admin,
            health,
        }
    }

    fn pool(states: &[(AdminState, Health)], policy: AllDownPolicy) -> Placement {
        let gateways = states
            .iter()
            .enumerate()
            .map(|(i, &(a, h))| gateway(i as u32, a, h))
            .collect();
        Placement::new(gateways, HashKey::SourceIpPort, policy, 65_537)
    }

    fn clients(n: u16) -> impl Iterator<Item = SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([192, 0, 2, (i % 250) as u8], 40_000 + i)))
    }

    use AdminState::*;
    use Health::{Down as Lost, Suspect, Up};

    #[test]
    fn new_sessions_avoid_draining_and_down_gateways() {
        let p = pool(
            &[(Active, Up), (Draining, Up), (Down, Up), (Active, Lost)],
            AllDownPolicy::FailOpen,
        );
        for client in clients(2000) {
            assert_eq!(p.place(client).unwrap().id, GatewayId(0));
        }
        assert!(
            p.keeps(GatewayId(1), p.gateway(GatewayId(1)).unwrap().address),
            "draining keeps its sessions"
        );
        assert!(
            !p.keeps(GatewayId(2), p.gateway(GatewayId(2)).unwrap().address),
            "down evicts"
        );
        assert!(
            !p.keeps(GatewayId(3), p.gateway(GatewayId(3)).unwrap().address),
            "unhealthy evicts"
        );
        assert!(
            !p.keeps(GatewayId(0), "10.9.9.9:51820".parse().unwrap()),
            "moved address evicts"
        );
        assert!(
            !p.keeps(GatewayId(7), "10.0.0.7:51820".parse().unwrap()),
            "removed gateway evicts"
        );
    }

    #[test]
    fn a_failure_moves_only_the_failed_gateways_clients() {
        let healthy = pool(
            &[(Active, Up), (Active, Up), (Active, Up)],
            AllDownPolicy::FailOpen,
        );
        let one_down = pool(
            &[(Active, Up), (Active, Lost), (Active, Up)],
            AllDownPolicy::FailOpen,
        );
        let (mut moved_from_failed, mut collateral) = (0, 0);
        for client in clients(5000) {
            let before = healthy.place(client).unwrap().id;
            let after = one_down.place(client).unwrap().id;
            if before == GatewayId(1) {
                assert_ne!(after, GatewayId(1));
                moved_from_failed += 1;
            } else if before != after {
                collateral += 1;
            }
        }
        assert!(moved_from_failed > 1000, "{moved_from_failed}");
        assert!(
            collateral < 100,
            "{collateral} of the healthy gateways' clients moved"
        );
    }

    #[test]
    fn a_suspect_gateway_keeps_its_sessions_but_takes_no_new_ones() {
        let p = pool(&[(Active, Up), (Active, Suspect)], AllDownPolicy::FailOpen);
        assert!(!p.failing_open());
        assert!(p.keeps(GatewayId(1), p.gateway(GatewayId(1)).unwrap().address));
        assert!(clients(500).all(|c| p.place(c).unwrap().id == GatewayId(0)));
        // Everyone suspect or down at once: fail open, nobody is evicted.
        let p = pool(
            &[(Active, Lost), (Active, Suspect)],
            AllDownPolicy::FailOpen,
        );
        assert!(p.failing_open());
        assert!(p.keeps(GatewayId(0), p.gateway(GatewayId(0)).unwrap().address));
    }

    #[test]
    fn all_down_fails_open_or_drops() {
        let open = pool(
            &[(Active, Lost), (Active, Lost), (Draining, Lost)],
            AllDownPolicy::FailOpen,
        );
        assert!(open.failing_open());
        assert!(open.keeps(GatewayId(1), open.gateway(GatewayId(1)).unwrap().address));
        let placed: std::collections::HashSet<_> =
            clients(500).map(|c| open.place(c).unwrap().id).collect();
        assert_eq!(placed, [GatewayId(0), GatewayId(1)].into());

        let closed = pool(&[(Active, Lost), (Active, Lost)], AllDownPolicy::Drop);
        assert!(!closed.failing_open());
        assert!(clients(100).all(|c| closed.place(c).is_none()));
        assert!(!closed.keeps(GatewayId(0), closed.gateway(GatewayId(0)).unwrap().address));

        let drained = pool(&[(Draining, Up), (Down, Up)], AllDownPolicy::FailOpen);
        assert!(!drained.failing_open());
        assert!(clients(100).all(|c| drained.place(c).is_none()));
    }

    #[test]
    fn hash_key_decides_whether_the_port_counts() {
        let mut by_ip = pool(
            &[(Active, Up), (Active, Up), (Active, Up)],
            AllDownPolicy::FailOpen,
        );
        by_ip.hash_key = HashKey::SourceIp;
        let by_port = pool(
            &[(Active, Up), (Active, Up), (Active, Up)],
            AllDownPolicy::FailOpen,
        );
        let ip = [198, 51, 100, 7];
        let gateways_by_ip: std::collections::HashSet<_> = (1000..1100)
            .map(|p| by_ip.place(SocketAddr::from((ip, p))).unwrap().id)
            .collect();
        assert_eq!(gateways_by_ip.len(), 1);
        let gateways_by_port: std::collections::HashSet<_> = (1000..1100)
            .map(|p| by_port.place(SocketAddr::from((ip, p))).unwrap().id)
            .collect();
        assert_eq!(gateways_by_port.len(), 3);
    }

    #[test]
    fn v4_mapped_v6_clients_hash_like_v4() {
        let p = pool(&[(Active, Up), (Active, Up)], AllDownPolicy::FailOpen);
        let v4: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5000".parse().unwrap();
        assert_eq!(p.client_hash(v4), p.client_hash(mapped));
    }
}
