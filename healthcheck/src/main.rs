//! `wglb-healthcheck`: probes every gateway of every location in its configuration and reports
//! a verdict per gateway to one or more `wglb` balancers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use wglb_healthcheck::checker::spawn_gateway_checker;
use wglb_healthcheck::config::Config;
use wglb_healthcheck::report::{run_reporter, Latest};
use wglb_proto::client::Target;

#[derive(Parser)]
#[command(
    name = "wglb-healthcheck",
    version,
    about = "Probes WireGuard gateways and reports their health to wglb balancers"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = "WGLB_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
                eprintln!(
                    "wglb-healthcheck: bad --log filter `{}`: {e}; using info",
                    cli.log
                );
                tracing_subscriber::EnvFilter::new("info")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wglb-healthcheck: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wglb-healthcheck: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wglb-healthcheck: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let probes = Arc::new(config.probes.clone());
    // Room for a slow round and a late tick before a report goes stale at the balancer.
    let ttl = 3 * (probes.interval + probes.timeout);
    let (reports_tx, mut reports) = mpsc::channel(1024);
    let mut checkers = Vec::new();
    for location in &config.locations {
        for gateway in &location.gateways {
            checkers.push(spawn_gateway_checker(
                location,
                gateway,
                probes.clone(),
                reports_tx.clone(),
            ));
        }
    }
    drop(reports_tx);
    tracing::info!(source = %config.source, gateways = checkers.len(), balancers = config.balancers.len(), "probing");
    let (latest_tx, latest) = watch::channel::<Latest>(Arc::default());
    for balancer in &config.balancers {
        let token = match &balancer.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let target = Target {
            address: balancer.api.clone(),
            token,
            ca: balancer.ca.clone(),
            identity: None,
        };
        tokio::spawn(run_reporter(
            target,
            config.source.clone(),
            ttl,
            latest.clone(),
        ));
    }
    // Collects verdicts into the snapshot the reporters follow.
    let collector = tokio::spawn(async move {
        let mut snapshot: BTreeMap<(String, String), (u64, _)> = BTreeMap::new();
        let mut round = 0u64;
        while let Some(report) = reports.recv().await {
            round += 1;
            let key = (report.location.clone(), report.gateway.clone());
            if snapshot.get(&key).is_none_or(
                |(_, old): &(u64, wglb_healthcheck::checker::Report)| old.verdict != report.verdict,
            ) {
                tracing::info!(location = %report.location, gateway = %report.gateway, verdict = %report.verdict.as_str(), detail = %report.detail, "verdict");
            }
            snapshot.insert(key, (round, report));
            latest_tx.send_replace(Arc::new(snapshot.clone()));
        }
    });
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
        _ = collector => anyhow::bail!("every checker stopped"),
    }
    tracing::info!("shutting down");
    Ok(())
}
