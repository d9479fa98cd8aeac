//! wireguard-go processes and the `wg` tool that configures and inspects them.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::netns::Netns;

/// How long wireguard-go gets to create its TUN device and control socket; it normally takes
/// tens of milliseconds, but many rigs may be starting at once on two cores.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long wireguard-go gets to remove its control socket and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A WireGuard key pair, as `wg genkey` and `wg pubkey` print them.
pub struct Keypair {
    pub private: String,
    pub public: String,
}

impl Keypair {
    pub fn generate() -> Result<Keypair> {
        let private = cmd::run(Command::new("wg").arg("genkey"))?
            .trim()
            .to_owned();
        let public = cmd::run_with_input(
            Command::new("wg").arg("pubkey"),
            format!("{private}\n").as_bytes(),
        )?
        .trim()
        .to_owned();
        Ok(Keypair { private, public })
    }

    /// `wg set` only takes private keys from files; keep them unreadable to other users anyway.
    pub fn write_private(&self, path: &Path) -> Result<()> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| writeln!(file, "{}", self.private))
            .with_context(|| format!("writing private key {}", path.display()))
    }
}

/// A running wireguard-go: dropping it stops the process.
pub(crate) struct WgProcess {
    child: Child,
    socket: PathBuf,
}

impl WgProcess {
    /// Starts wireguard-go for `ifname` in `ns` and waits until its control socket answers, so
    /// that `wg set` can configure it right away.
    pub(crate) fn spawn(ns: &Netns, ifname: &str, log: &Path) -> Result<WgProcess> {
        let socket = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let log_file =
            File::create(log).with_context(|| format!("creating log file {}", log.display()))?;
        let mut command = ns.command("env");
        command
            .args([
                "WG_PROCESS_FOREGROUND=1",
                "LOG_LEVEL=verbose",
                "wireguard-go",
                "-f",
                ifname,
            ])
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .context("duplicating a log file handle")?,
            )
            .stderr(log_file);
        let line = cmd::describe(&command);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start `{line}`"))?;
        let mut process = WgProcess { child, socket };
        let what = format!("wireguard-go's control socket {}", process.socket.display());
        cmd::wait_for(what, START_TIMEOUT, || {
            if let Some(status) = process.child.try_wait()? {
                bail!(
                    "`{line}` exited ({status}); its log {}:\n{}",
                    log.display(),
                    fs::read_to_string(log).unwrap_or_default().trim()
                );
            }
            // Connecting, not just checking the file, skips a stale socket of a killed process.
            Ok(UnixStream::connect(&process.socket).ok().map(drop))
        })?;
        Ok(process)
    }

    /// SIGSTOP: wireguard-go keeps its socket and interface but answers nothing, as a hung
    /// gateway does (no ICMP error either). Stopping or dropping it later still works.
    pub(crate) fn freeze(&self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)
            .with_context(|| format!("freezing wireguard-go {pid}"))?;
        Ok(())
    }

    /// Stops wireguard-go, reporting what dropping would only log.
    pub(crate) fn stop(mut self) -> Result<()> {
        cmd::terminate(&mut self.child, STOP_GRACE)
            .with_context(|| format!("stopping wireguard-go {}", self.child.id()))?;
        Ok(())
    }
}

impl Drop for WgProcess {
    fn drop(&mut self) {
        if let Err(error) = cmd::terminate(&mut self.child, STOP_GRACE) {
            tracing::warn!("could not stop wireguard-go {}: {error}", self.child.id());
        }
        // wireguard-go removes its socket on SIGTERM but not when it had to be killed.
        let _ = fs::remove_file(&self.socket);
    }
}

/// Runs `wg show IFNAME FIELD` in `ns` and returns the values for `peer`: `wg show` prints one
/// line per peer, the public key then tab-separated values.
pub(crate) fn show_peer(ns: &Netns, ifname: &str, field: &str, peer: &str) -> Result<Vec<u64>> {
    let output = cmd::run(ns.command("wg").args(["show", ifname, field]))?;
    peer_values(&output, peer)
        .with_context(|| format!("`wg show {ifname} {field}` has no line for peer {peer}"))
}

/// The endpoint `wg show IFNAME endpoints` gives for `peer`: where its packets last came from.
pub(crate) fn peer_endpoint(ns: &Netns, ifname: &str, peer: &str) -> Result<Option<SocketAddr>> {
    let output = cmd::run(ns.command("wg").args(["show", ifname, "endpoints"]))?;
    let value = peer_line(&output, peer)
        .with_context(|| format!("`wg show {ifname} endpoints` has no line for peer {peer}"))?;
    Ok(value.trim().parse().ok())
}

fn peer_line<'a>(output: &'a str, peer: &str) -> Result<&'a str> {
    output
        .lines()
        .find_map(|line| line.strip_prefix(peer)?.strip_prefix('\t'))
        .context("peer not found")
}

fn peer_values(output: &str, peer: &str) -> Result<Vec<u64>> {
    let line = peer_line(output, peer)?;
    line.split('\t')
        .map(|value| {
            value
                .trim()
                .parse()
                .with_context(|| format!("not a number: {value:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_values_of_the_requested_peer() {
        let output = "AAAA=\t0\nBBBB=\t1700000000\n";
        assert_eq!(peer_values(output, "BBBB=").unwrap(), vec![1_700_000_000]);
        assert_eq!(peer_values(output, "AAAA=").unwrap(), vec![0]);
        assert!(peer_values(output, "CCCC=").is_err());
        let transfer = "AAAA=\t1234\t5678\n";
        assert_eq!(peer_values(transfer, "AAAA=").unwrap(), vec![1234, 5678]);
    }
}
