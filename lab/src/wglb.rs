//! The one way tests, benchmarks and the demo run a `wglb` balancer: write its configuration,
//! start it on the host or in a namespace, wait until it serves metrics (and, with XDP, until
//! the program forwards to every gateway), then drive it through its CLI, signals and metrics,
//! and stop it. Dropping a [`Wglb`] stops it (SIGTERM, then SIGKILL).

use std::fmt::Display;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::run_in;
use crate::{metrics, terminate, wait_for, Netns};

/// How long a balancer may take to serve metrics, and its XDP program to forward.
const STARTUP: Duration = Duration::from_secs(15);
/// How long a stop waits for the process after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How to start a balancer; [`Launch::config`] or [`Launch::flags_only`] starts it.
#[derive(Clone, Debug)]
pub struct Launch {
    binary: PathBuf,
    dir: PathBuf,
    name: String,
    namespace: Option<String>,
    metrics: SocketAddr,
    log: String,
    flags: Vec<String>,
    env: Vec<(String, PathBuf)>,
    xdp_gateways: Option<usize>,
}

impl Launch {
    /// `binary` run with its files (configuration, API socket, log) in `dir`, serving metrics
    /// on `metrics` unless its configuration names another address.
    pub fn new(binary: &Path, dir: &Path, metrics: SocketAddr) -> Launch {
        Launch {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            name: "wglb".into(),
            namespace: None,
            metrics,
            log: "wglb=debug".into(),
            flags: Vec::new(),
            env: Vec::new(),
            xdp_gateways: None,
        }
    }

    /// The stem of its file names, for several balancers sharing `dir`.
    pub fn named(mut self, name: &str) -> Launch {
        self.name = name.into();
        self
    }

    /// Runs it in `ns` rather than on the host.
    pub fn inside(mut self, ns: &Netns) -> Launch {
        self.namespace = Some(ns.name().to_string());
        self
    }

    /// Its `--log` filter (default `wglb=debug`).
    pub fn log(mut self, filter: &str) -> Launch {
        self.log = filter.into();
        self
    }

    /// Flags after `run` (e.g. `--datapath xdp`).
    pub fn flags(mut self, flags: &[&str]) -> Launch {
        self.flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// Sets an environment variable that names a file (e.g. systemd's `NOTIFY_SOCKET`).
    pub fn env(mut self, name: &str, path: &Path) -> Launch {
        self.env.push((name.into(), path.to_path_buf()));
        self
    }

    /// Also waits, at start, until the XDP program forwards to `gateways` gateways itself.
    pub fn xdp_ready(mut self, gateways: usize) -> Launch {
        self.xdp_gateways = Some(gateways);
        self
    }

    fn path(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}{suffix}", self.name))
    }

    /// `wglb run --config` with `text` as its file, to which an API socket in `dir` and the
    /// metrics address are added unless it names its own.
    pub fn config(self, text: &str) -> Result<Wglb> {
        let placed = Placed::from(&self, text);
        let config = self.path(".toml");
        fs::write(&config, placed.fill_in(text))
            .with_context(|| format!("writing {}", config.display()))?;
        let args = vec!["--config".to_string(), config.display().to_string()];
        self.spawn(args, placed, Some(config))
    }

    /// `wglb run` with flags only (no file): the metrics address and an API socket in `dir`
    /// as flags, then [`Launch::flags`].
    pub fn flags_only(self) -> Result<Wglb> {
        let placed = Placed {
            api_socket: self.path(".sock"),
            metrics: self.metrics,
        };
        let args = vec![
            "--metrics-listen".to_string(),
            placed.metrics.to_string(),
            "--api-socket".to_string(),
            placed.api_socket.display().to_string(),
        ];
        self.spawn(args, placed, None)
    }

    fn spawn(self, args: Vec<String>, placed: Placed, config: Option<PathBuf>) -> Result<Wglb> {
        let log = self.path(".log");
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = match &self.namespace {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .args(["--log", &self.log, "run"])
            .args(&args)
            .args(&self.flags)
            .envs(self.env.iter().map(|(name, path)| (name, path)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let mut wglb = Wglb {
            child: Some(child),
            binary: self.binary,
            namespace: self.namespace,
            config,
            api_socket: placed.api_socket,
            metrics: placed.metrics,
            log,
        };
        wglb.wait("wglb to serve metrics", STARTUP, |w| Ok(w.metrics().ok()))?;
        if let Some(gateways) = self.xdp_gateways {
            wglb.wait("XDP to forward to every gateway", STARTUP, |w| {
                // Absent until the program knows a gateway: not ready either.
                let ready = metrics::sum(&w.metrics()?, "wglb_xdp_gateway_ready{");
                Ok((ready == Some(gateways as f64)).then_some(()))
            })?;
        }
        Ok(wglb)
    }
}

/// Where a balancer's API socket and metrics are, as its configuration says or the launch
/// fills in.
struct Placed {
    api_socket: PathBuf,
    metrics: SocketAddr,
}

impl Placed {
    fn from(launch: &Launch, text: &str) -> Placed {
        // An unparsable file is the balancer's to refuse: the launch's defaults then.
        let table: toml::Table = text.parse().unwrap_or_default();
        let named = |section: &str, key: &str| {
            table
                .get(section)
                .and_then(|s| s.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Placed {
            api_socket: named("api", "socket").map_or_else(|| launch.path(".sock"), PathBuf::from),
            metrics: named("metrics", "listen")
                .and_then(|listen| listen.parse().ok())
                .unwrap_or(launch.metrics),
        }
    }

    /// `text` with the API socket and the metrics address it lacks: a key under the section's
    /// existing header, or a section of its own at the top.
    fn fill_in(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (section, key, value) in [
            ("api", "socket", self.api_socket.display().to_string()),
            ("metrics", "listen", self.metrics.to_string()),
        ] {
            let table: toml::Table = text.parse().unwrap_or_default();
            if table.get(section).and_then(|s| s.get(key)).is_some() {
                continue;
            }
            let header = format!("[{section}]\n");
            let line = format!("{key} = \"{value}\"\n");
            text = match text.find(&header) {
                Some(at) if at == 0 || text[..at].ends_with('\n') => {
                    let after = at + header.len();
                    format!("{}{line}{}", &text[..after], &text[after..])
                }
                _ => format!("{header}{line}{text}"),
            };
        }
        text
    }
}

/// A running balancer.
pub struct Wglb {
    child: Option<Child>,
    binary: PathBuf,
    namespace: Option<String>,
    config: Option<PathBuf>,
    api_socket: PathBuf,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Wglb {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `check` until it yields a value, but gives up as soon as the balancer exits:
    /// nothing can succeed then. A failure carries the end of its log.
    pub fn wait<T>(
        &mut self,
        what: impl Display,
        timeout: Duration,
        mut check: impl FnMut(&Wglb) -> Result<Option<T>>,
    ) -> Result<T> {
        let waited = wait_for(what, timeout, || {
            if let Some(status) = self.exited()? {
                bail!("wglb exited ({status})");
            }
            check(self)
        });
        waited.with_context(|| format!("log {}:\n{}", self.log.display(), self.log_tail(40)))
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("wglb was stopped"),
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log_text();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The Prometheus text it serves (scraped from inside its namespace).
    pub fn metrics(&self) -> Result<String> {
        let address = self.metrics;
        match &self.namespace {
            Some(ns) => run_in(ns, move || metrics::scrape(address))?,
            None => metrics::scrape(address),
        }
    }

    /// The sum of every sample whose series starts with `prefix`; an error when there is none.
    pub fn metric(&self, prefix: &str) -> Result<f64> {
        metrics::value(&self.metrics()?, prefix)
    }

    /// [`Wglb::metric`] of a counter that nothing may have created yet: absent is zero.
    pub fn metric_or_zero(&self, prefix: &str) -> Result<f64> {
        Ok(metrics::value_or_zero(&self.metrics()?, prefix))
    }

    /// Polls a metric until it exists and `done` holds for it.
    pub fn wait_metric(
        &self,
        prefix: &str,
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        metrics::wait_for_value(prefix, timeout, || self.metrics(), done)
            .with_context(|| format!("log:\n{}", self.log_tail(40)))
    }

    /// Runs the `wglb` CLI against its API socket (a file, reachable from any namespace).
    pub fn run_cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.binary)
            .arg("--api")
            .arg(&self.api_socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running the wglb CLI")
    }

    /// [`Wglb::run_cli`] for a command that must succeed: its stdout, or an error with its
    /// stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let output = self.run_cli(args)?;
        ensure!(
            output.status.success(),
            "wglb {args:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("wglb is not running")?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Writes `text` as its configuration file (with the API socket and metrics address it
    /// started with filled in), for a reload.
    pub fn write_config(&self, text: &str) -> Result<()> {
        let path = self.config.as_ref().context("wglb runs without a file")?;
        let placed = Placed {
            api_socket: self.api_socket.clone(),
            metrics: self.metrics,
        };
        fs::write(path, placed.fill_in(text))?;
        Ok(())
    }

    /// Writes `text` and sends SIGHUP; returns once the balancer counted the reload as
    /// `result` ("ok" or "error").
    pub fn reload(&self, text: &str, result: &str) -> Result<()> {
        let counter = format!(r#"wglb_config_reloads_total{{result="{result}"}}"#);
        let before = self.metric_or_zero(&counter)?;
        self.write_config(text)?;
        self.signal(Signal::SIGHUP)?;
        self.wait_metric(&counter, Duration::from_secs(10), |v| v > before)?;
        Ok(())
    }

    /// The process's open files and resident memory (bytes) now.
    pub fn footprint(&self) -> Result<(usize, u64)> {
        let pid = self.pid().context("not running")?;
        let files = fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        Ok((files, rss_kb * 1024))
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> Result<bool> {
        Ok(match &mut self.child {
            Some(child) => child.try_wait()?.is_none(),
            None => false,
        })
    }

    /// SIGKILL: it dies without a word to anyone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, and its exit status once it exits (SIGKILL after a grace period).
    pub fn stop_for_status(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("wglb was stopped already")?;
        Ok(terminate(&mut child, STOP_GRACE)?)
    }

    /// SIGTERM; it must exit cleanly.
    pub fn stop(&mut self) -> Result<()> {
        let status = self.stop_for_status()?;
        ensure!(
            status.success(),
            "wglb exited with {status}; log:\n{}",
            self.log_tail(40)
        );
        Ok(())
    }
}

impl Drop for Wglb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, STOP_GRACE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> Placed {
        Placed {
            api_socket: "/run/t/api.sock".into(),
            metrics: "127.0.0.1:9638".parse().unwrap(),
        }
    }

    #[test]
    fn fills_in_what_the_file_lacks_and_keeps_what_it_has() {
        let filled = placed().fill_in("[[listener]]\nname = \"a\"\n");
        assert_eq!(
            filled,
            "[metrics]\nlisten = \"127.0.0.1:9638\"\n[api]\nsocket = \"/run/t/api.sock\"\n\
             [[listener]]\nname = \"a\"\n"
        );
        let own = "[api]\ntcp = \"10.0.0.1:7443\"\n[metrics]\nlisten = \"127.0.0.1:1\"\n";
        assert_eq!(
            placed().fill_in(own),
            "[api]\nsocket = \"/run/t/api.sock\"\ntcp = \"10.0.0.1:7443\"\n\
             [metrics]\nlisten = \"127.0.0.1:1\"\n"
        );
    }

    #[test]
    fn reads_where_the_file_puts_its_socket_and_metrics() {
        let launch = Launch::new(Path::new("wglb"), Path::new("/tmp/x"), placed().metrics);
        let text = "[api]\nsocket = \"/s.sock\"\n[metrics]\nlisten = \"127.0.0.2:9\"\n";
        let placed = Placed::from(&launch, text);
        assert_eq!(placed.api_socket, PathBuf::from("/s.sock"));
        assert_eq!(placed.metrics, "127.0.0.2:9".parse().unwrap());
        let defaults = Placed::from(&launch, "");
        assert_eq!(defaults.api_socket, PathBuf::from("/tmp/x/wglb.sock"));
    }
}
