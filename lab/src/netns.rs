//! Named network namespaces (`ip netns`), owned by the rig that created them.

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::thread;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::cmd;

/// A network namespace created by a rig; dropping it deletes the namespace, which also removes
/// the veth ends inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn create(name: String) -> Result<Netns> {
        cmd::ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace (`ip netns exec NAME program`).
    ///
    /// `ip netns exec` execs the program in place, so the returned child's pid is the program's
    /// own and signals sent to it (see [`crate::terminate`]) reach it directly.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `f` on a fresh thread that has joined this namespace, so that sockets it creates live
    /// in the namespace; they stay there after the thread ends and can be used from any thread.
    ///
    /// A panic in `f` is resumed on the calling thread, as if `f` had been called directly.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        run_in(&self.name, f)
    }

    /// Runs `ip -n NAME ARGS…`.
    pub(crate) fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::run(Command::new("ip").args(["-n", &self.name]).args(args))
    }
}

/// [`Netns::run`] for a namespace known by name: for whoever must not hold the rig borrowed.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = Path::new("/var/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let name = name.to_string();
    let handle = thread::Builder::new()
        .name(format!("netns {name}"))
        .spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into network namespace {name}"))?;
            drop(file);
            Ok(f())
        })
        .context("spawning a thread to enter a network namespace")?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = cmd::ip(&["netns", "del", &self.name]) {
            tracing::warn!(
                "could not delete network namespace {}: {error:#}",
                self.name
            );
        }
    }
}
