//! Prometheus' text exposition over HTTP (`GET /metrics`), and readiness (`GET /ready`, for
//! Kubernetes probes; sd_notify, for systemd), for the sidecar and the balancer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{Encoder, Registry, TextEncoder};
pub use sd_notify::NotifyState;

/// Tells systemd (under `Type=notify`; nothing without NOTIFY_SOCKET) where the process is.
pub fn notify_systemd(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The registry's metrics in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding");
    String::from_utf8(out).expect("utf-8 metrics")
}

/// Serves `GET /metrics` and `GET /ready` (200 while `ready`, else 503) on a bound socket.
pub async fn serve(
    socket: tokio::net::TcpListener,
    registry: Registry,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::{routing::get, Router};
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render(&registry);
                async move { ([("content-type", "text/plain; version=0.0.4")], text) }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    match ready {
                        true => (StatusCode::OK, "ready\n"),
                        false => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                    }
                }
            }),
        );
    axum::serve(socket, app).await
}
