//! How client commands print: aligned tables for people, JSON for scripts. JSON uses names, not
//! protobuf numbers, for enums, so scripts read `"state": "draining"`.

use std::time::{Duration, UNIX_EPOCH};

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, Table};
use serde_json::{json, Value};

use crate::api::pb;

fn print_json(value: &Value) {
    println!("{value}");
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(NOTHING).set_header(header.to_vec());
    table
}

fn right_align(table: &mut Table, columns: &[usize]) {
    for &index in columns {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn state_name(state: pb::GatewayState) -> &'static str {
    match state {
        pb::GatewayState::Unspecified => "unspecified",
        pb::GatewayState::Active => "active",
        pb::GatewayState::Draining => "draining",
        pb::GatewayState::Down => "down",
    }
}

fn health_name(health: pb::Health) -> &'static str {
    match health {
        pb::Health::Unspecified => "unspecified",
        pb::Health::Up => "up",
        pb::Health::Suspect => "suspect",
        pb::Health::Down => "down",
    }
}

pub fn status(status: &pb::StatusResponse, json: bool) {
    if json {
        print_json(&json!({
            "version": status.version,
            "uptime_seconds": status.uptime_seconds,
            "config_path": status.config_path,
            "health_sources": status.health_sources,
            "health_quorum": status.health_quorum,
            "listeners": status.listeners.iter().map(|l| json!({
                "name": l.name,
                "listen": l.listen,
                "hash_key": l.hash_key,
                "idle_timeout_seconds": l.idle_timeout_seconds,
                "table_size": l.table_size,
                "sessions": l.sessions,
                "gateways": l.gateways,
                "failing_open": l.failing_open,
                "all_down": l.all_down,
                "unconfirmed": l.unconfirmed,
                "probation_size": l.probation_size,
                "refused": {
                    "source_rate": l.refused_source_rate,
                    "source_unconfirmed": l.refused_source_unconfirmed,
                },
                "public_key": (!l.public_key.is_empty()).then_some(&l.public_key),
            })).collect::<Vec<_>>(),
            "drained": status.drained,
            "routes": routes_json(&status.routes),
        }));
        return;
    }
    println!(
        "wglb {} up {}, config {}",
        status.version,
        humantime::format_duration(Duration::from_secs(status.uptime_seconds)),
        if status.config_path.is_empty() {
            "from flags"
        } else {
            &status.config_path
        }
    );
    println!(
        "health sources: {} (quorum {})",
        if status.health_sources.is_empty() {
            "none reporting".to_string()
        } else {
            status.health_sources.join(", ")
        },
        status.health_quorum
    );
    if !status.routes.is_empty() {
        println!(
            "routes{}: {}",
            if status.drained { " (drained)" } else { "" },
            routes_text(&status.routes)
        );
    }
    let mut listeners = table(&[
        "LISTENER",
        "LISTEN",
        "GATEWAYS",
        "SESSIONS",
        "UNCONFIRMED",
        "TABLE",
        "REFUSED RATE/UNCONF",
        "HASH",
        "IDLE",
        "ALL DOWN",
        "MAC1",
    ]);
    for l in &status.listeners {
        listeners.add_row(vec![
            l.name.clone(),
            l.listen.clone(),
            l.gateways.to_string(),
            l.sessions.to_string(),
            format!("{}/{}", l.unconfirmed, l.probation_size),
            l.table_size.to_string(),
            format!("{}/{}", l.refused_source_rate, l.refused_source_unconfirmed),
            l.hash_key.clone(),
            format!("{}s", l.idle_timeout_seconds),
            if l.failing_open {
                format!("{} (FAILING OPEN)", l.all_down)
            } else {
                l.all_down.clone()
            },
            if l.public_key.is_empty() {
                "-"
            } else {
                "checked"
            }
            .to_string(),
        ]);
    }
    right_align(&mut listeners, &[2, 3, 4, 5, 6]);
    println!("{listeners}");
}

pub fn listener_key(listener: &pb::Listener, json: bool) {
    let key = (!listener.public_key.is_empty()).then_some(&listener.public_key);
    if json {
        print_json(&json!({ "listener": listener.name, "public_key": key }));
        return;
    }
    match key {
        Some(key) => println!(
            "listener {}: initiations must carry a mac1 for {key}",
            listener.name
        ),
        None => println!("listener {}: no mac1 check", listener.name),
    }
}

/// A source's word on a gateway. Healthy sources that say "degraded" first (the built-in
/// checker and the sidecar, when /health answers 503 but the gateway works) are shown so.
fn report_name(healthy: bool, detail: &str) -> &'static str {
    match (healthy, detail.starts_with("degraded")) {
        (true, true) => "degraded",
        (true, false) => "up",
        (false, _) => "down",
    }
}

pub fn gateways(gateways: &[pb::Gateway], json: bool) {
    if json {
        print_json(&json!({
            "gateways": gateways.iter().map(|g| json!({
                "listener": g.listener,
                "name": g.name,
                "address": g.address,
                "weight": g.weight,
                "state": state_name(g.state()),
                "health": health_name(g.health()),
                "health_detail": g.health_detail,
                "fail_static": g.fail_static,
                "sessions": g.sessions,
                "health_port": (g.health_port != 0).then_some(g.health_port),
                "added_at_runtime": g.added_at_runtime,
                "changed_at_runtime": g.changed_at_runtime,
                "reports": g.votes.iter().map(|v| json!({
                    "source": v.source,
                    "healthy": v.healthy,
                    "detail": v.detail,
                    "age_ms": v.age_ms,
                    "expires_in_ms": v.expires_in_ms,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut out = table(&[
        "LISTENER", "GATEWAY", "ADDRESS", "STATE", "WEIGHT", "HEALTH", "SESSIONS", "REPORTS",
    ]);
    for g in gateways {
        let mut state = state_name(g.state()).to_string();
        if g.added_at_runtime {
            state += " (api-added)";
        } else if g.changed_at_runtime {
            state += " (api-set)";
        }
        let mut health = health_name(g.health()).to_string();
        if g.fail_static {
            health += " (fail static)";
        }
        let reports = g
            .votes
            .iter()
            .map(|v| format!("{}={}", v.source, report_name(v.healthy, &v.detail)))
            .collect::<Vec<_>>()
            .join(" ");
        out.add_row(vec![
            g.listener.clone(),
            g.name.clone(),
            g.address.clone(),
            state,
            g.weight.to_string(),
            health,
            g.sessions.to_string(),
            if reports.is_empty() {
                "-".into()
            } else {
                reports
            },
        ]);
    }
    right_align(&mut out, &[4, 6]);
    println!("{out}");
}

pub fn sessions(sessions: &[pb::Session], total: u64, json: bool) {
    if json {
        print_json(&json!({
            "total": total,
            "sessions": sessions.iter().map(|s| json!({
                "listener": s.listener,
                "client": s.client,
                "gateway": s.gateway,
                "gateway_address": s.gateway_address,
                "idle_ms": s.idle_ms,
                "synced_from": (!s.synced_from.is_empty()).then_some(&s.synced_from),
                "receiver_index": s.receiver_index,
                "shard": s.shard,
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut out = table(&[
        "LISTENER",
        "CLIENT",
        "GATEWAY",
        "GATEWAY ADDRESS",
        "IDLE",
        "SYNCED FROM",
        "RECEIVER INDEX",
        "SHARD",
    ]);
    for s in sessions {
        out.add_row(vec![
            s.listener.clone(),
            s.client.clone(),
            s.gateway.clone(),
            s.gateway_address.clone(),
            format!("{:.1}s", s.idle_ms as f64 / 1000.0),
            s.synced_from.clone(),
            s.receiver_index
                .map_or_else(String::new, |index| format!("{index:08x}")),
            s.shard.map_or_else(String::new, |shard| shard.to_string()),
        ]);
    }
    right_align(&mut out, &[4]);
    println!("{out}");
    println!("{} of {total} session(s) shown", sessions.len());
}

pub fn evicted(count: u64, json: bool) {
    if json {
        print_json(&json!({ "evicted": count }));
    } else {
        println!("evicted {count} session(s)");
    }
}

pub fn reloaded(path: &str, json: bool) {
    if json {
        print_json(&json!({ "reloaded": path }));
    } else {
        println!("reloaded {path}");
    }
}

pub fn moved(gateway: &str, moved: &pb::MoveSessionsResponse, json: bool) {
    if json {
        print_json(&json!({ "gateway": gateway, "moved": moved.moved, "stayed": moved.stayed }));
    } else {
        println!(
            "{gateway} is draining: moved {} session(s), their new gateways call the clients; {} stayed (no client key from its agent, or no agent on the new gateway)",
            moved.moved, moved.stayed
        );
    }
}

pub fn drained(gateway: &str, took: Duration, json: bool) {
    if json {
        print_json(&json!({ "drained": gateway, "seconds": took.as_secs_f64() }));
    } else {
        println!(
            "{gateway} is drained: no session left after {}s",
            took.as_secs()
        );
    }
}

fn routes_json(routes: &[pb::Route]) -> Value {
    routes
        .iter()
        .map(|r| {
            json!({
                "address": r.address,
                "announced": r.announced,
                "held": (!r.held.is_empty()).then_some(&r.held),
            })
        })
        .collect()
}

fn routes_text(routes: &[pb::Route]) -> String {
    routes
        .iter()
        .map(|r| {
            if r.announced {
                format!("{} announced", r.address)
            } else {
                format!("{} withheld ({})", r.address, r.held)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `wglb drain --self` (and `undrain --self`) leaves announced.
pub fn routes(response: &pb::DrainSelfResponse, json: bool) {
    if json {
        print_json(&json!({ "routes": routes_json(&response.routes) }));
    } else {
        println!("routes: {}", routes_text(&response.routes));
    }
}

fn kind_name(kind: pb::event::Kind) -> &'static str {
    use pb::event::Kind;
    match kind {
        Kind::Unspecified => "unspecified",
        Kind::GatewayHealth => "gateway_health",
        Kind::GatewayState => "gateway_state",
        Kind::GatewayAdded => "gateway_added",
        Kind::GatewayRemoved => "gateway_removed",
        Kind::SessionsEvicted => "sessions_evicted",
        Kind::SessionsRefused => "sessions_refused",
        Kind::SessionsMoved => "sessions_moved",
        Kind::ConfigReloaded => "config_reloaded",
        Kind::ConfigRefused => "config_refused",
        Kind::FailStatic => "fail_static",
        Kind::FailingOpen => "failing_open",
        Kind::Route => "route",
        Kind::Lagged => "lagged",
    }
}

pub fn event(event: &pb::Event, json: bool) {
    use pb::event::Kind;
    let kind = kind_name(event.kind());
    if json {
        print_json(&json!({
            "kind": kind,
            "unix_ms": event.unix_ms,
            "listener": event.listener,
            "gateway": event.gateway,
            "health": health_name(event.health()),
            "state": state_name(event.state()),
            "weight": event.weight,
            "source": event.source,
            "detail": event.detail,
            "reason": event.reason,
            "count": event.count,
            "active": event.active,
        }));
        return;
    }
    let what = match event.kind() {
        Kind::GatewayHealth => format!(
            "{} ({}{})",
            health_name(event.health()),
            event.detail,
            if event.source.is_empty() {
                String::new()
            } else {
                format!("; from {}", event.source)
            }
        ),
        Kind::GatewayState => format!("{} weight {}", state_name(event.state()), event.weight),
        Kind::SessionsEvicted => format!("{} session(s), {}", event.count, event.reason),
        Kind::SessionsRefused => format!("{} new session(s), {}", event.count, event.reason),
        Kind::SessionsMoved => format!("{} session(s) moved, their clients called", event.count),
        Kind::ConfigRefused => event.detail.clone(),
        Kind::FailStatic | Kind::FailingOpen => {
            (if event.active { "on" } else { "off" }).to_string()
        }
        Kind::Lagged => format!("{} event(s) missed", event.count),
        Kind::Route => format!(
            "{} {} ({})",
            event.source,
            if event.active {
                "announced"
            } else {
                "withdrawn"
            },
            event.detail
        ),
        _ => String::new(),
    };
    let at = UNIX_EPOCH + Duration::from_millis(event.unix_ms);
    let place = [event.listener.as_str(), event.gateway.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    println!(
        "{} {kind} {} {what}",
        humantime::format_rfc3339_millis(at),
        if place.is_empty() { "-" } else { &place }
    );
}
