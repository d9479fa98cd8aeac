//! A long-running program under test (a balancer, a sidecar) inside a namespace, its output in a
//! log file; stopped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program ARGS` in `ns`, appending its stdout and stderr to `log`.
    pub fn spawn(ns: &Netns, program: &Path, args: &[&str], log: &Path) -> Result<Daemon> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the program dies without cleaning up, as in a crash.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("killing")?;
        self.child.wait().context("reaping")?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = crate::terminate(&mut self.child, Duration::from_secs(5));
    }
}
