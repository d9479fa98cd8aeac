//! The agent's reads and its one change, against a real wireguard-go gateway in a network
//! namespace. Needs root, like every namespace test.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use base64::Engine;
use wglb_agent::wireguard::{Backend, Interface};
use wglb_lab::{require_root, wait_for, Family, Rig, RigSpec};

fn key_of(rig: &Rig, i: usize) -> Result<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(rig.client_public_key(i))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("a key is 32 bytes"))
}

/// A gateway with two client peers (their clients never start): the agent lists both; an order
/// for one points it at the path named and makes the gateway send a handshake initiation there
/// at once, then puts its keepalive back; an order for a key the gateway does not have (never
/// had, or Core removed) is refused and adds nothing.
#[test]
fn orders_start_a_handshake_with_the_gateways_own_peers_only() -> Result<()> {
    require_root()?;
    let rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 1,
        client_ports: vec![41_000, 41_001],
        keepalive: None,
    })?;
    let interface = Interface::new(rig.gateway_ifname(0), Backend::Userspace)?;
    let peers = interface.peers()?;
    let keys: Vec<[u8; 32]> = peers.iter().map(|p| p.public_key).collect();
    let (first, second) = (key_of(&rig, 0)?, key_of(&rig, 1)?);
    ensure!(keys.contains(&first) && keys.contains(&second), "{peers:?}");
    ensure!(peers
        .iter()
        .all(|p| p.endpoint.is_none() && p.latest_handshake_ms.is_none()));

    // Somewhere the gateway routes to (its balancer's side of the link): nobody answers, but
    // the initiation leaves.
    let path = SocketAddr::new(rig.balancer_seen_from_gateway(0), 40_123);
    let sent = rig.gateway_tx_bytes_to(0, 0)?;
    interface.start_handshake(&first, path)?;
    let endpoint = interface
        .peers()?
        .into_iter()
        .find(|p| p.public_key == first)
        .context("the peer is still there")?
        .endpoint;
    ensure!(endpoint == Some(path), "endpoint {endpoint:?}, not {path}");
    wait_for(
        "the gateway to send an initiation",
        Duration::from_secs(5),
        || Ok((rig.gateway_tx_bytes_to(0, 0)? >= sent + 148).then_some(())),
    )?;
    ensure!(
        rig.gateway_keepalive_of(0, 0)? == 0,
        "the keepalive was not put back"
    );

    let stranger = [7u8; 32];
    let refused = interface.start_handshake(&stranger, path).unwrap_err();
    ensure!(
        format!("{refused:#}").contains("has no peer"),
        "{refused:#}"
    );
    rig.remove_gateway_peer(0, rig.client_public_key(1))?;
    ensure!(interface.start_handshake(&second, path).is_err());
    let after: Vec<[u8; 32]> = interface.peers()?.iter().map(|p| p.public_key).collect();
    ensure!(
        after == vec![first],
        "the agent changed the peer set: {after:?}"
    );
    Ok(())
}

/// A gateway whose wireguard-go is gone reads as an error: the agent's "interface gone".
#[test]
fn a_stopped_wireguard_go_reads_as_gone() -> Result<()> {
    require_root()?;
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 1,
        client_ports: vec![41_000],
        keepalive: None,
    })?;
    let interface = Interface::new(rig.gateway_ifname(0), Backend::Userspace)?;
    ensure!(interface.peers()?.len() == 1);
    rig.stop_gateway_wireguard(0)?;
    ensure!(interface.peers().is_err());
    Ok(())
}
