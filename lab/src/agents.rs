//! Gateway agents (`wglb-agent`) for a rig: a token per gateway, the balancer configuration that
//! lets them attach, and the agents themselves, each in its gateway's namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

use crate::daemon::Daemon;
use crate::rig::Rig;

/// The balancer's TCP API, which agents attach to.
pub const AGENT_API_PORT: u16 = 7443;

/// The `wglb-agent` binary next to `wglb` (cargo builds both into one directory).
pub fn agent_binary(wglb: &Path) -> Result<PathBuf> {
    let path = wglb.with_file_name("wglb-agent");
    ensure!(
        path.exists(),
        "no wglb-agent binary at {} (cargo build -p wglb-agent)",
        path.display()
    );
    Ok(path)
}

/// Gateway j's agent token, written into `dir`.
pub fn agent_token(dir: &Path, j: usize) -> Result<PathBuf> {
    let path = dir.join(format!("agent-gw{j}.token"));
    std::fs::write(&path, format!("agent-token-of-gateway-{j}-0123456789"))?;
    Ok(path)
}

/// What a balancer's configuration needs for agents of gateways `gw0..gwN` of `listener`: the
/// lines of its `[api]` section (a TCP API on every address, with a token of its own for the
/// CLI) and an `[[agent]]` entry per gateway. Token files go into `dir`.
pub fn agents_config(
    rig: &Rig,
    dir: &Path,
    listener: &str,
    gateways: usize,
) -> Result<(String, String)> {
    let api_token = dir.join("api.token");
    std::fs::write(&api_token, "an-api-token-of-this-rig-0123456789")?;
    let any = match rig.balancer_seen_from_gateway(0) {
        IpAddr::V4(_) => "0.0.0.0",
        IpAddr::V6(_) => "[::]",
    };
    let api = format!(
        "tcp = \"{any}:{AGENT_API_PORT}\"\ntoken_file = \"{}\"\n",
        api_token.display()
    );
    let mut entries = String::new();
    for j in 0..gateways {
        entries += &format!(
            "\n[[agent]]\nlistener = \"{listener}\"\ngateway = \"gw{j}\"\ntoken_file = \"{}\"\n",
            agent_token(dir, j)?.display()
        );
    }
    Ok((api, entries))
}

/// Gateway j's agent, in the gateway's namespace, attaching with `token`; its log in `dir`.
pub fn start_agent(rig: &Rig, dir: &Path, binary: &Path, j: usize, token: &Path) -> Result<Daemon> {
    start_agent_on(rig, dir, binary, j, rig.gateway_ifname(j), token)
}

/// [`start_agent`] pointed at `interface` (one the gateway may not have).
pub fn start_agent_on(
    rig: &Rig,
    dir: &Path,
    binary: &Path,
    j: usize,
    interface: &str,
    token: &Path,
) -> Result<Daemon> {
    let api = SocketAddr::new(rig.balancer_seen_from_gateway(j), AGENT_API_PORT);
    let url = format!("http://{api}");
    let token = token.display().to_string();
    Daemon::spawn(
        rig.gateway_ns(j),
        binary,
        &[
            "--interface",
            interface,
            "--backend",
            "userspace",
            "--balancer",
            &url,
            "--token-file",
            &token,
        ],
        &dir.join(format!("agent-gw{j}-{interface}.log")),
    )
}

/// The agents of `gateways` (with the tokens [`agents_config`] wrote).
pub fn start_agents(
    rig: &Rig,
    dir: &Path,
    binary: &Path,
    gateways: impl IntoIterator<Item = usize>,
) -> Result<Vec<Daemon>> {
    gateways
        .into_iter()
        .map(|j| start_agent(rig, dir, binary, j, &agent_token(dir, j)?))
        .collect()
}
