//! Keeps a balancer's gateway pools in step with Core's list through the control API: a gateway
//! Core adopts is added to the listener of its location; one Core drops (removed or disabled) is
//! drained, so its live sessions finish where they are and it takes no new ones, and undrained
//! should Core list it again. Gateways the balancer has from its own file and Core never listed
//! are left alone, and so is a gateway someone else drained. A change that fails is retried at
//! the next poll. A location's public key
//! becomes its listener's (the balancer then drops initiations whose mac1 is wrong for it); a
//! location without one leaves the listener's key as it is.

use std::collections::{HashMap, HashSet};

use base64::Engine;
use wglb_proto::client::{AuthChannel, Target};
use wglb_proto::v1::control_client::ControlClient;
use wglb_proto::v1::{
    AddGatewayRequest, GatewayState, ListGatewaysRequest, SetGatewayRequest, SetListenerKeyRequest,
    StatusRequest,
};

use crate::config::Location;

/// What one balancer's pools were last brought in line with, and the gateways the sidecar
/// drained there because Core stopped listing them.
#[derive(Default)]
pub struct Synced {
    applied: Vec<Location>,
    drained: HashSet<(String, String)>,
}

/// Brings one balancer in line with `current`. Until that succeeds whole, `synced` keeps what
/// was applied before, so the next call retries what failed.
pub async fn sync_pools(
    target: &Target,
    synced: &mut Synced,
    current: &[Location],
) -> Result<(), String> {
    apply(target, synced, current).await?;
    synced.applied = current.to_vec();
    Ok(())
}

async fn apply(target: &Target, synced: &mut Synced, current: &[Location]) -> Result<(), String> {
    let previous = &synced.applied;
    let connection = target.connect().await.map_err(|e| e.to_string())?;
    let mut control = connection.control;
    let keys: HashMap<String, String> = control
        .status(StatusRequest {})
        .await
        .map_err(|s| format!("asking for the balancer's status: {}", s.message()))?
        .into_inner()
        .listeners
        .into_iter()
        .map(|l| (l.name, l.public_key))
        .collect();
    for location in current {
        let (Some(key), Some(held)) = (&location.public_key, keys.get(&location.name)) else {
            continue;
        };
        let key = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
        if *held != key {
            control
                .set_listener_key(SetListenerKeyRequest {
                    listener: location.name.clone(),
                    public_key: key,
                })
                .await
                .map_err(|s| {
                    format!(
                        "setting listener `{}`'s public key: {}",
                        location.name,
                        s.message()
                    )
                })?;
            tracing::info!(balancer = %target.address, location = %location.name, "the listener checks mac1 for the location's public key now");
        }
    }
    // A location Core dropped altogether has its gateways drained too.
    let gone: Vec<Location> = previous
        .iter()
        .filter(|p| !current.iter().any(|c| c.name == p.name))
        .map(|p| Location {
            gateways: Vec::new(),
            ..p.clone()
        })
        .collect();
    for location in current.iter().chain(&gone) {
        let pool = match control
            .list_gateways(ListGatewaysRequest {
                listener: location.name.clone(),
            })
            .await
        {
            Ok(response) => response.into_inner().gateways,
            Err(status) => {
                tracing::warn!(balancer = %target.address, location = %location.name, "cannot follow this location: {}", status.message());
                continue;
            }
        };
        for gateway in &location.gateways {
            match pool.iter().find(|g| g.name == gateway.name) {
                None => {
                    control
                        .add_gateway(AddGatewayRequest {
                            listener: location.name.clone(),
                            name: gateway.name.clone(),
                            address: gateway.address.to_string(),
                            weight: 0,
                            state: GatewayState::Active as i32,
                            // The sidecar probes it; the balancer need not.
                            health_port: 0,
                        })
                        .await
                        .map_err(|s| {
                            format!("adding gateway `{}`: {}", gateway.name, s.message())
                        })?;
                    tracing::info!(balancer = %target.address, location = %location.name, gateway = %gateway.name, address = %gateway.address, "gateway added: Core adopted it");
                }
                Some(known) if known.address != gateway.address.to_string() => {
                    tracing::warn!(balancer = %target.address, location = %location.name, gateway = %gateway.name, "Core and the balancer disagree on the gateway's address ({} against {}): left as it is", gateway.address, known.address);
                }
                Some(known) => {
                    let key = (location.name.clone(), gateway.name.clone());
                    let drained = known.state == GatewayState::Draining as i32;
                    if drained && synced.drained.contains(&key) {
                        set_state(&mut control, &key, GatewayState::Active).await?;
                        tracing::info!(balancer = %target.address, location = %location.name, gateway = %gateway.name, "gateway undrained: Core lists it again");
                    }
                    synced.drained.remove(&key);
                }
            }
        }
        let dropped = previous
            .iter()
            .filter(|p| p.name == location.name)
            .flat_map(|p| &p.gateways)
            .filter(|g| !location.gateways.iter().any(|c| c.name == g.name));
        for gateway in dropped {
            let live = pool
                .iter()
                .any(|g| g.name == gateway.name && g.state != GatewayState::Draining as i32);
            if live {
                let key = (location.name.clone(), gateway.name.clone());
                set_state(&mut control, &key, GatewayState::Draining).await?;
                tracing::info!(balancer = %target.address, location = %location.name, gateway = %gateway.name, "gateway drained: Core no longer lists it");
                synced.drained.insert(key);
            }
        }
    }
    Ok(())
}

/// Sets gateway `(listener, name)`'s state on a balancer.
async fn set_state(
    control: &mut ControlClient<AuthChannel>,
    (listener, name): &(String, String),
    state: GatewayState,
) -> Result<(), String> {
    control
        .set_gateway(SetGatewayRequest {
            listener: listener.clone(),
            name: name.clone(),
            state: state as i32,
            weight: 0,
        })
        .await
        .map(drop)
        .map_err(|s| format!("setting gateway `{name}` {state:?}: {}", s.message()))
}
