//! Prometheus' text exposition over HTTP (`GET /metrics`), for the sidecar and the balancer.

use prometheus::{Encoder, Registry, TextEncoder};

/// The registry's metrics in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding");
    String::from_utf8(out).expect("utf-8 metrics")
}

/// Serves `GET /metrics` on an already bound socket.
pub async fn serve(socket: tokio::net::TcpListener, registry: Registry) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let text = render(&registry);
            async move { ([("content-type", "text/plain; version=0.0.4")], text) }
        }),
    );
    axum::serve(socket, app).await
}
