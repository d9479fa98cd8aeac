//! The files in deploy/ work as shipped: Prometheus accepts the scrape configuration; the Grafana
//! dashboard's queries are valid PromQL over metrics the balancer and the sidecar really export
//! (and cover all of them), so an import shows data rather than empty panels; the Kubernetes
//! manifests pass the API's schemas and carry configurations both programs load; the compose file
//! follows the Compose specification. The schema checkers come from PyPI, installed by
//! scripts/setup.sh into a virtualenv of their own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::time::Duration;

use wglb::config::Config;
use wglb::metrics::Metrics;
use wglb::pool::{AdminState, GatewayId, GatewayView, Health};
use wglb_healthcheck::verdict::{Probe, Verdict};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn promtool(args: &[&str], file: &Path) -> Result<()> {
    let output = Command::new("promtool")
        .args(args)
        .arg(file)
        .output()
        .context("running promtool (install Debian's prometheus package: scripts/setup.sh does)")?;
    ensure!(
        output.status.success(),
        "promtool {args:?} {}: {}\n{}{}",
        file.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Where scripts/setup.sh installs kubernetes-validate and check-jsonschema.
const TOOLS: &str = "/opt/wglb-tools/venv/bin";

/// Runs a tool of the virtualenv; its output on success.
fn tool(name: &str, args: &[&str]) -> Result<String> {
    let path = Path::new(TOOLS).join(name);
    let output = Command::new(&path)
        .args(args)
        .output()
        .with_context(|| format!("running {} (scripts/setup.sh installs it)", path.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "{name} {args:?}: {}\n{text}",
        output.status
    );
    Ok(text)
}

/// Every document of a YAML file, as JSON.
fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let json = tool(
        "python",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            &path.display().to_string(),
        ],
    )?;
    Ok(serde_json::from_str(&json)?)
}

#[test]
fn the_kubernetes_manifests_pass_the_api_schemas_and_carry_loadable_configurations() -> Result<()> {
    let manifest = deploy("kubernetes/wglb.yaml");
    let documents = yaml_documents(&manifest)?;
    let report = tool(
        "kubernetes-validate",
        &["--strict", &manifest.display().to_string()],
    )?;
    // Every resource but the Prometheus Operator's ServiceMonitor (a CRD) has a schema.
    let passed = report.matches(" passed for resource ").count();
    ensure!(passed == documents.len() - 1, "{report}");
    let kind = |kind: &'static str| documents.iter().filter(move |d| d["kind"] == kind);
    let monitor = kind("ServiceMonitor").next().context("a ServiceMonitor")?;
    // It scrapes the port named metrics of both services.
    let selected = &monitor["spec"]["selector"]["matchExpressions"][0]["values"];
    for service in kind("Service") {
        let name = &service["metadata"]["labels"]["app.kubernetes.io/name"];
        ensure!(
            selected.as_array().is_some_and(|v| v.contains(name)),
            "the ServiceMonitor does not select {name}"
        );
        ensure!(
            service["spec"]["ports"]
                .as_array()
                .is_some_and(|ports| ports.iter().any(|p| p["name"] == "metrics")),
            "{name} has no metrics port"
        );
    }
    // The ConfigMaps hold configurations the programs accept.
    let config = |name: &str, key: &str| -> Result<String> {
        let map = kind("ConfigMap")
            .find(|m| m["metadata"]["name"] == name)
            .with_context(|| format!("ConfigMap {name}"))?;
        Ok(map["data"][key].as_str().context("the file")?.to_string())
    };
    let balancer = Config::parse(&config("wglb", "wglb.toml")?, "ConfigMap wglb")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Every gateway's agent is a container of the gateway's pod, with its token mounted from
    // the Secret the balancer reads too.
    for agent in &balancer.agents {
        let pod = kind("Deployment")
            .find(|d| d["metadata"]["labels"]["wglb.io/gateway"] == agent.gateway.as_str())
            .with_context(|| format!("a gateway Deployment for {}", agent.gateway))?;
        let containers = pod["spec"]["template"]["spec"]["containers"]
            .as_array()
            .context("containers")?;
        let container = containers
            .iter()
            .find(|c| c["command"][0] == "wglb-agent")
            .context("an agent container")?;
        ensure!(containers.iter().any(|c| c["name"] == "gateway"), "{pod}");
        ensure!(
            container["securityContext"]["capabilities"]["add"] == serde_json::json!(["NET_ADMIN"]),
            "{container}"
        );
        let secret = pod["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"].clone();
        ensure!(
            kind("Secret").any(|s| s["metadata"]["name"] == secret),
            "no Secret {secret}"
        );
    }
    ensure!(!balancer.agents.is_empty(), "no [[agent]] in the ConfigMap");
    let dir = std::env::temp_dir().join(format!("wglb-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("probe.key"),
        "YOdlS0GwLFoX5bRhvGtb0ovfsuRoxQbLpAbqqV5qz2Q=\n",
    )?;
    std::fs::write(dir.join("token"), "a-token\n")?;
    // Secrets mounted as files in the pod; stand-ins here.
    let text = config("wglb-healthcheck", "healthcheck.toml")?
        .replace("/etc/wglb-healthcheck/probe/probe.key", "probe.key")
        .replace("/etc/wglb-healthcheck/core/token", "token");
    let parsed =
        wglb_healthcheck::config::Config::parse(&text, "ConfigMap wglb-healthcheck", Some(&dir));
    std::fs::remove_dir_all(&dir)?;
    parsed.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[test]
fn the_compose_file_follows_the_compose_specification() -> Result<()> {
    let compose = deploy("compose.yaml");
    tool(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            &compose.display().to_string(),
        ],
    )?;
    // wglb stands where Envoy stood, in front of both gateways.
    let document = &yaml_documents(&compose)?[0];
    let wglb = &document["services"]["wglb"];
    // On the location's port, as Defguard 2.x's HA example publishes it.
    ensure!(wglb["ports"][0] == "51820:51820/udp", "{wglb}");
    // 2.x's Core: adoption, no secrets it no longer reads.
    let core = &document["services"]["core"]["environment"];
    ensure!(core["DEFGUARD_ADOPT_GATEWAY"] == "gateway1:50066", "{core}");
    for gone in [
        "DEFGUARD_SECRET_KEY",
        "DEFGUARD_GATEWAY_SECRET",
        "DEFGUARD_AUTH_SECRET",
    ] {
        ensure!(core.get(gone).is_none(), "{gone} is set: {core}");
    }
    for (gateway, agent) in [("gateway1", "agent1"), ("gateway2", "agent2")] {
        ensure!(document["services"][gateway]["environment"]["HEALTH_PORT"] == 55003);
        // Each gateway's agent lives in its network namespace, with NET_ADMIN and nothing else.
        let agent = &document["services"][agent];
        ensure!(
            agent["network_mode"] == format!("service:{gateway}"),
            "{agent}"
        );
        ensure!(
            agent["cap_add"] == serde_json::json!(["NET_ADMIN"]),
            "{agent}"
        );
        ensure!(agent["entrypoint"][0] == "/usr/bin/wglb-agent", "{agent}");
    }
    Ok(())
}

#[test]
fn prometheus_accepts_the_scrape_configuration() -> Result<()> {
    promtool(&["check", "config"], &deploy("prometheus/prometheus.yml"))
}

/// Every metric family the balancer and the sidecar export, each made to appear once.
fn exported_metrics() -> BTreeSet<String> {
    let metrics = Metrics::new();
    let _listener = metrics.listener("l");
    let _gateway = metrics.gateway("l", "g");
    metrics.set_gateway(
        "l",
        &GatewayView {
            id: GatewayId(1),
            name: "g".into(),
            address: "10.0.0.1:51820".parse().unwrap(),
            weight: 1,
            admin: AdminState::Active,
            health: Health::Up,
        },
    );
    metrics.set_health_vote("l", "g", "s", Some(true));
    metrics.set_fail_static("l", "g", false);
    metrics.health_report(true);
    metrics.reload(true);
    metrics.set_datapath("xdp");
    metrics.set_xdp_attached("eth0", "native");
    metrics.set_xdp_ready("l", "g", Some(true));
    let _passed = metrics.xdp_passed("", "not_ip");
    let _peer = metrics.sync_peer("p");
    metrics.sync_received("p", 1, 0);
    let _standby = metrics.sync_standby("l");
    let _drift = metrics.nat_drift(wglb::metrics::NatDrift::Orphaned);
    let _waiting = metrics.passive_waiting("l", "g");
    let _ejections = metrics.passive_ejections("l", "g");
    let sidecar = wglb_healthcheck::metrics::Metrics::new();
    sidecar.probe("l", "g", Probe::Handshake, true, Duration::from_millis(1));
    sidecar.verdict("l", "g", Verdict::Up, true);
    sidecar.balancer("b", true);
    let text = metrics.render() + &wglb_probe::exposition::render(&sidecar.registry());
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `wglb_...` identifiers in a query.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("wglb_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

#[test]
fn the_dashboard_queries_exported_metrics_with_valid_promql() -> Result<()> {
    let text = std::fs::read_to_string(deploy("grafana/wglb-dashboard.json"))?;
    let dashboard: Value = serde_json::from_str(&text).context("the dashboard is not JSON")?;
    ensure!(dashboard["uid"] == "wglb-overview" && dashboard["panels"].is_array());
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    ensure!(exprs.len() >= 10, "only {} queries", exprs.len());

    let exported = exported_metrics();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            // A histogram's series are its family's name with a suffix.
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|family| exported.contains(*family))
                .map_or(name.clone(), str::to_string);
            ensure!(
                exported.contains(&name),
                "the dashboard queries {name}, which wglb does not export: {expr}"
            );
            used.insert(name);
        }
    }
    let unused: Vec<_> = exported.difference(&used).collect();
    ensure!(unused.is_empty(), "no panel shows {unused:?}");

    // Prometheus' own parser on every query, with Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let concrete = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("${listener}", ".*")
            .replace("${gateway}", ".*")
            .replace("$listener", ".*")
            .replace("$gateway", ".*");
        rules += &format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete)?
        );
    }
    let file =
        std::env::temp_dir().join(format!("wglb-dashboard-rules-{}.yml", std::process::id()));
    std::fs::write(&file, rules)?;
    let checked = promtool(&["check", "rules"], &file);
    let _ = std::fs::remove_file(&file);
    checked
}
