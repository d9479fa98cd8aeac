//! Announcing the listeners' addresses to the routers, for balancers that run active-active
//! behind ECMP: each balancer's routing daemon (BIRD in `deploy/bird/`) exports the routes wglb
//! keeps in a kernel table of its own ([`device`]), and the routers spread the clients' flows
//! over every balancer that announces. An address is announced only while this balancer can
//! take its traffic ([`decide`]): it is local (the datapaths receive it), every listener it is
//! announced for has a gateway it may use, and no operator withdrew it (`wglb drain --self`).
//! A starting balancer announces once its sync peers have pushed it their sessions (or after
//! `[announce] sync_wait`), so that the flows the routers move to it keep their gateways; a
//! stopping one withdraws first and forwards on for `withdraw_wait`, while the routers move the
//! flows; one that dies loses its routes with its interface.

pub mod device;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::control::ListenerPlan;
use crate::events::{EventBus, EventKind};
use crate::host::local_addresses;
use crate::metrics::Metrics;
use device::AnnounceDevice;

/// How often the local addresses and the plans are looked at: a lost gateway or address is
/// withdrawn within this.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Why an address is not announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// An operator withdrew this balancer (`wglb drain --self`).
    Drained,
    /// The balancer is stopping.
    Stopping,
    /// The balancer started and these sync peers have not pushed it their sessions yet.
    Syncing(Vec<String>),
    /// No interface of this host has the address, so its traffic would not reach a datapath.
    NotLocal,
    /// This listener, one the address is announced for, has no gateway it may use.
    NoGateway(String),
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Drained => write!(f, "drained by an operator (wglb drain --self)"),
            Held::Stopping => write!(f, "the balancer is stopping"),
            Held::Syncing(peers) => write!(
                f,
                "waiting for the sessions of sync peer(s) {}",
                peers.join(", ")
            ),
            Held::NotLocal => write!(f, "no local interface has the address"),
            Held::NoGateway(listener) => {
                write!(f, "listener `{listener}` has no gateway it may use")
            }
        }
    }
}

/// Whether `address` is announced, given the listeners it is announced for (name, and whether
/// it has a gateway it may use). Every one of them must be able to forward: a client of the one
/// that cannot would otherwise be drawn here while another balancer could serve it.
pub fn decide(
    address: IpAddr,
    listeners: &[(&str, bool)],
    local: &[IpAddr],
    drained: bool,
    syncing: &[String],
) -> Result<(), Held> {
    if drained {
        return Err(Held::Drained);
    }
    if !syncing.is_empty() {
        return Err(Held::Syncing(syncing.to_vec()));
    }
    if !local.contains(&address) {
        return Err(Held::NotLocal);
    }
    match listeners.iter().find(|(_, usable)| !usable) {
        Some((name, _)) => Err(Held::NoGateway(name.to_string())),
        None => Ok(()),
    }
}

/// One address and where it stands, for the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteState {
    pub address: IpAddr,
    pub held: Option<Held>,
}

/// The API's side: withdraw or restore this balancer, see what is announced, and tell which
/// sync peers have pushed their sessions.
#[derive(Clone)]
pub struct AnnounceHandle {
    drained: watch::Sender<bool>,
    routes: watch::Receiver<Arc<[RouteState]>>,
    resynced: watch::Sender<BTreeSet<Arc<str>>>,
}

impl AnnounceHandle {
    /// `peer` pushed this balancer every session it forwards (a resync ended).
    pub fn peer_resynced(&self, peer: &Arc<str>) {
        self.resynced
            .send_if_modified(|peers| peers.insert(peer.clone()));
    }

    /// Withdraws every address (`true`) or announces them again where they may be (`false`);
    /// what stands once the announcer has acted.
    pub async fn set_drained(&self, drained: bool) -> Vec<RouteState> {
        let mut routes = self.routes.clone();
        routes.mark_unchanged();
        let changes = self.drained.send_replace(drained) != drained;
        if changes {
            // The announcer acts within LOOK_EVERY; a bound in case it has stopped.
            let _ = tokio::time::timeout(Duration::from_secs(2), routes.changed()).await;
        }
        self.routes()
    }

    pub fn drained(&self) -> bool {
        *self.drained.borrow()
    }

    pub fn routes(&self) -> Vec<RouteState> {
        self.routes.borrow().to_vec()
    }
}

/// The announcer's task: keeps the routes as [`decide`] says until told to stop, then
/// withdraws them all.
pub struct Announcer {
    device: AnnounceDevice,
    /// Each announced address with the listeners it is announced for (indices into `plans`).
    addresses: BTreeMap<IpAddr, Vec<usize>>,
    listeners: Vec<(String, watch::Receiver<Arc<ListenerPlan>>)>,
    drained: watch::Receiver<bool>,
    routes: watch::Sender<Arc<[RouteState]>>,
    announced: BTreeMap<IpAddr, bool>,
    /// The sync peers, and those that have pushed their sessions since the start.
    peers: Vec<String>,
    resynced: watch::Receiver<BTreeSet<Arc<str>>>,
    started: Instant,
    sync_wait: Duration,
    metrics: Metrics,
    events: EventBus,
}

impl Announcer {
    /// The announcer, if some listener announces an address; fails if its interface cannot be
    /// made (no CAP_NET_ADMIN, no tun support, or another wglb holds it).
    pub fn start(
        config: &Config,
        plans: &[watch::Receiver<Arc<ListenerPlan>>],
        metrics: &Metrics,
        events: &EventBus,
    ) -> anyhow::Result<Option<(Announcer, AnnounceHandle)>> {
        let mut addresses: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            for address in &listener.announce {
                addresses.entry(*address).or_default().push(index);
            }
        }
        if addresses.is_empty() {
            return Ok(None);
        }
        let device = AnnounceDevice::create(&config.announce)?;
        let (drained_tx, drained) = watch::channel(false);
        let initial: Arc<[RouteState]> = addresses
            .keys()
            .map(|&address| RouteState {
                address,
                held: Some(Held::NotLocal),
            })
            .collect();
        let (routes_tx, routes) = watch::channel(initial);
        let (resynced_tx, resynced) = watch::channel(BTreeSet::new());
        for address in addresses.keys() {
            metrics.set_route_announced(*address, false);
        }
        tracing::info!(
            table = config.announce.table,
            device = %config.announce.device,
            addresses = ?addresses.keys().collect::<Vec<_>>(),
            "announcing the listeners' addresses while they can forward"
        );
        let announcer = Announcer {
            device,
            addresses,
            listeners: config
                .listeners
                .iter()
                .zip(plans)
                .map(|(l, plan)| (l.name.clone(), plan.clone()))
                .collect(),
            drained,
            routes: routes_tx,
            announced: BTreeMap::new(),
            peers: config.sync.peers.iter().map(|p| p.name.clone()).collect(),
            resynced,
            started: Instant::now(),
            sync_wait: config.announce.sync_wait,
            metrics: metrics.clone(),
            events: events.clone(),
        };
        let handle = AnnounceHandle {
            drained: drained_tx,
            routes,
            resynced: resynced_tx,
        };
        Ok(Some((announcer, handle)))
    }

    /// Runs until `stop` fires, then withdraws everything; says whether anything was announced
    /// at that moment (the stop then waits for the routers).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> bool {
        let mut look = tokio::time::interval(LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = look.tick() => self.look(false),
                Ok(()) = self.drained.changed() => self.look(false),
                Ok(()) = self.resynced.changed() => self.look(false),
                _ = stop.wait_for(|&stop| stop) => break,
            }
        }
        let was_announcing = self.announced.values().any(|&a| a);
        self.look(true);
        was_announcing
    }

    fn look(&mut self, stopping: bool) {
        let local = match local_addresses() {
            Ok(local) => local,
            Err(e) => {
                // Nothing changes on a failed look but a stop: the last decision stands.
                tracing::warn!("announcement: cannot read the local addresses: {e:#}");
                if !stopping {
                    return;
                }
                Vec::new()
            }
        };
        let drained = *self.drained.borrow_and_update();
        let syncing: Vec<String> = if self.started.elapsed() < self.sync_wait {
            let resynced = self.resynced.borrow_and_update();
            self.peers
                .iter()
                .filter(|p| !resynced.contains(p.as_str()))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let usable: Vec<bool> = self
            .listeners
            .iter()
            .map(|(_, plan)| plan.borrow().placement.usable())
            .collect();
        let mut states = Vec::with_capacity(self.addresses.len());
        for (&address, listeners) in &self.addresses {
            let named: Vec<(&str, bool)> = listeners
                .iter()
                .map(|&i| (self.listeners[i].0.as_str(), usable[i]))
                .collect();
            let decision = if stopping {
                Err(Held::Stopping)
            } else {
                decide(address, &named, &local, drained, &syncing)
            };
            let wanted = decision.is_ok();
            if self.announced.get(&address).copied() != Some(wanted) {
                let done = if wanted {
                    self.device.announce(address)
                } else {
                    self.device.withdraw(address)
                };
                match done {
                    Ok(()) => {
                        let why = match &decision {
                            Ok(()) => "it can forward".to_string(),
                            Err(held) => held.to_string(),
                        };
                        tracing::info!(%address, announced = wanted, %why, "route");
                        self.announced.insert(address, wanted);
                        self.metrics.set_route_announced(address, wanted);
                        self.events.publish(
                            "",
                            "",
                            EventKind::Route {
                                address,
                                announced: wanted,
                                why,
                            },
                        );
                    }
                    // Tried again at the next look.
                    Err(e) => tracing::error!(%address, "announcement: {e:#}"),
                }
            }
            states.push(RouteState {
                address,
                held: decision.err(),
            });
        }
        self.routes.send_if_modified(|routes| {
            let changed = routes[..] != states[..];
            if changed {
                *routes = states.into();
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_only_while_local_usable_synced_and_not_drained() {
        let vip: IpAddr = "192.0.2.100".parse().unwrap();
        let local: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), vip];
        let none: &[String] = &[];
        assert_eq!(
            decide(vip, &[("a", true), ("b", true)], &local, false, none),
            Ok(())
        );
        assert_eq!(
            decide(vip, &[("a", true), ("b", false)], &local, false, none),
            Err(Held::NoGateway("b".into()))
        );
        assert_eq!(
            decide(vip, &[("a", true)], &local[..1], false, none),
            Err(Held::NotLocal)
        );
        assert_eq!(
            decide(vip, &[("a", true)], &local, true, none),
            Err(Held::Drained)
        );
        assert_eq!(
            decide(vip, &[("a", true)], &local, false, &["lb1".to_string()]),
            Err(Held::Syncing(vec!["lb1".into()]))
        );
    }
}
