//! wglb: a WireGuard-aware UDP load balancer.
//!
//! Data flows one way: [`config`] and [`health`] feed the [`control`] plane, which builds a
//! [`pool::Placement`] per listener (Maglev table plus gateway states); the [`datapath`] executes
//! its decisions against its [`session`] table.

pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod pool;
pub mod session;
