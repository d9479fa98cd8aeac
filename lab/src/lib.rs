//! Real WireGuard test networks for wglb, built from network namespaces.
//!
//! A [`Rig`] gives each client and gateway its own namespace, linked to one balancer namespace
//! where the balancer under test runs. Clients and gateways are real wireguard-go peers (the
//! kernel here has no WireGuard module), and the gateways share one private key and one peer
//! list, as Defguard deploys them, so a client cannot tell which gateway answers it.
//!
//! Many rigs can run at once in one process (tests run in parallel threads): every namespace,
//! interface and file name carries the rig's id.

pub mod agents;
pub mod bench;
mod bird;
mod cmd;
pub mod contender;
pub mod cpu;
mod daemon;
pub mod generator;
mod health;
pub mod metrics;
mod netns;
mod ping;
mod rig;
pub mod swarm;
pub mod timeline;
mod wg;
mod wglb;

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub use bird::Bird;
pub use cmd::{run, terminate, wait_for};
pub use daemon::Daemon;
pub use health::HealthEndpoint;
pub use netns::Netns;
pub use ping::Pinger;
pub use rig::{Family, Rig, RigSpec, ANYCAST_ADDR, FLOATING_ADDR, ROUTER_ADDR};
pub use wg::Keypair;
pub use wglb::{Launch, Wglb};

/// Checks that rigs can be built here. Tests call it first and fail with its error: skipping
/// would let a CI job that lost its root privileges pass without testing anything.
pub fn require_root() -> Result<()> {
    const NEEDS: &str =
        "needs root and network namespaces: run as root; CI runs these tests as root";
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!("{NEEDS} (running as uid {euid})");
    }
    cmd::run(Command::new("ip").args(["netns", "list"])).context(NEEDS)?;
    for (tool, package) in [("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools")] {
        cmd::run(Command::new(tool).arg("--version")).with_context(|| {
            format!("{NEEDS}; `{tool}` is needed too (Debian package {package})")
        })?;
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("{NEEDS}; wireguard-go needs /dev/net/tun");
    }
    Ok(())
}
