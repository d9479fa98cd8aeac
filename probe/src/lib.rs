//! The part of a health checker the balancer shares with the `wglb-healthcheck` sidecar, kept
//! small so that the balancer links it and not the sidecar (Core's REST client, boringtun,
//! gRPC health):
//!
//! - [`http`]: Defguard's contract, `GET /health` on the gateway's health port;
//! - [`thresholds`]: results turned into a state that needs several in a row to change;
//! - [`exposition`]: how each daemon is observed: Prometheus metrics, `/ready`, sd_notify.

pub mod exposition;
pub mod http;
pub mod thresholds;
