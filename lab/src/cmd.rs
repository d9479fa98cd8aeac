//! Running the external tools (`ip`, `wg`, `wireguard-go`, `ping`) the rig is built from.

use std::fmt::Display;
use std::io::{self, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often waits re-check their condition: fast enough that tests measuring failover times are
/// not skewed, slow enough not to compete for the two cores with the processes under test.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs a command to completion; the error names the command line and carries its stderr, which
/// is the only useful diagnostic `ip` and `wg` give.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    tracing::debug!(command = %line, "running");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    checked(&line, output)
}

/// Like [`run`], with `input` written to the command's stdin (closed after it, which is what
/// makes filters such as `wg pubkey` answer).
pub(crate) fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<String> {
    let line = describe(cmd);
    tracing::debug!(command = %line, "running");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    child
        .stdin
        .take()
        .context("the child's stdin")?
        .write_all(input)
        .with_context(|| format!("writing to `{line}`"))?;
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    checked(&line, output)
}

fn checked(line: &str, output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip ARGS…` in the current (root) namespace; `ip -n NS` reaches into the rig's namespaces.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stops a child process: SIGTERM first, so that wireguard-go removes its control socket and a
/// balancer under test can shut down cleanly, then SIGKILL once `grace` has passed.
///
/// Children started through [`crate::Netns::command`] are the program itself (`ip netns exec`
/// execs without forking), so signalling the child's pid reaches the real process.
pub fn terminate(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(io::Error::other)?);
    // The child may exit between try_wait and kill; waiting below copes with that.
    let _ = kill(pid, Signal::SIGTERM);
    // A stopped (frozen) process acts on SIGTERM only once it runs again.
    let _ = kill(pid, Signal::SIGCONT);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(pid = child.id(), "child ignored SIGTERM, killing it");
    child.kill()?;
    child.wait()
}

/// Polls `check` every [`POLL_INTERVAL`] until it yields a value; errors from `check` end the
/// wait at once because they mean the thing being waited for can no longer happen.
pub fn wait_for<T>(
    what: impl Display,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().with_context(|| format!("while waiting for {what}"))? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:.1?} waiting for {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}
