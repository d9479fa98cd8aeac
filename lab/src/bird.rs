//! BIRD 2 (Debian's `bird2`), the routing daemon of the lab's routers and of the balancers that
//! announce their addresses over BGP: one daemon per namespace, its control socket and log in
//! the rig's directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd;
use crate::daemon::Daemon;
use crate::netns::Netns;

pub struct Bird {
    daemon: Option<Daemon>,
    control: PathBuf,
    name: String,
}

impl Bird {
    /// Starts `bird -f` in `ns` with `config` (written to `dir/NAME.conf`) and waits until its
    /// control socket answers.
    pub fn start(ns: &Netns, dir: &Path, name: &str, config: &str) -> Result<Bird> {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, config)?;
        let control = dir.join(format!("{name}.ctl"));
        // `bird -p` parses the file and stops: a bad file is an error here, not a silent daemon.
        cmd::run(Command::new("bird").arg("-p").arg("-c").arg(&path))
            .with_context(|| format!("BIRD refuses {}", path.display()))?;
        let daemon = Daemon::spawn(
            ns,
            Path::new("bird"),
            &[
                "-f",
                "-c",
                &path.display().to_string(),
                "-s",
                &control.display().to_string(),
                "-P",
                &dir.join(format!("{name}.pid")).display().to_string(),
            ],
            &dir.join(format!("{name}.log")),
        )?;
        let bird = Bird {
            daemon: Some(daemon),
            control,
            name: name.to_string(),
        };
        cmd::wait_for(
            format!("BIRD `{name}` to answer"),
            Duration::from_secs(10),
            || Ok(bird.birdc(&["show", "status"]).ok()),
        )?;
        Ok(bird)
    }

    /// `birdc ARGS` on this daemon's control socket.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        cmd::run(
            Command::new("birdc")
                .arg("-s")
                .arg(&self.control)
                .args(args),
        )
    }

    /// The names of its BGP sessions that are established.
    pub fn established(&self) -> Result<Vec<String>> {
        let text = self.birdc(&["show", "protocols"])?;
        Ok(text
            .lines()
            .filter(|line| line.contains(" BGP ") && line.contains("Established"))
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect())
    }

    /// SIGKILL: the daemon dies without a word to its peers.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill()?;
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_else(|| format!("({} is not running)", self.name))
    }
}
