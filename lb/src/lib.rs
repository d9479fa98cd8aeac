//! wglb: a WireGuard-aware UDP load balancer.
//!
//! Data flows one way: [`config`], the [`api`] and [`health`] reports (combined by [`quorum`])
//! feed the [`control`] plane, which builds a [`pool::Placement`] per listener (Maglev table plus
//! gateway states); the datapaths (the userspace [`datapath`] and the [`xdp`] fast path) execute
//! its decisions against their session tables, admit new sessions by [`admission`] budgets, take
//! a session's life as [`lifecycle`] decides, and answer [`query`] requests about them. State
//! changes go out as [`events`]; [`balancer`] starts and stops the whole.

pub mod admission;
pub mod agents;
pub mod announce;
pub mod api;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod events;
pub mod health;
pub mod host;
pub mod lifecycle;
pub mod maglev;
pub mod metrics;
pub mod passive;
pub mod pool;
pub mod query;
pub mod quorum;
pub mod rebinding;
pub mod session;
pub mod sync;
pub mod xdp;
