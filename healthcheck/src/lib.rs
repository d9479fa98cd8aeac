//! Probes of a WireGuard gateway, from the cheapest to the most telling, shared by the balancer's
//! built-in checker and the `wglb-healthcheck` sidecar:
//!
//! - [`http`]: Defguard's contract, `GET /health` on the gateway's health port. It says whether
//!   Core is attached, not whether WireGuard works;
//! - [`port`]: whether anything listens on the gateway's UDP port (the kernel answers a datagram
//!   to a closed port with ICMP port unreachable; WireGuard answers nothing);
//! - [`handshake`]: a real WireGuard handshake from a probe peer, which only a working data plane
//!   with the probe peer configured completes.
//!
//! [`thresholds`] turns results into a state that needs several in a row to change, and
//! [`verdict`] combines a gateway's probes into one verdict by a documented policy. The sidecar
//! binary runs a [`checker`] per gateway and a [`report`]er per balancer, as its [`config`] says,
//! and with Core's API follows its gateway list ([`discovery`]) into the balancers' [`pools`]
//! and registers its probe peer as a network device of each location ([`registration`]); it
//! serves the [`topology`] it sees over gRPC.

pub mod answers;
pub mod checker;
pub mod config;
pub mod core_api;
pub mod discovery;
pub mod handshake;
pub mod metrics;
pub mod pools;
pub mod port;
pub mod registration;
pub mod report;
pub mod topology;
pub mod verdict;

// The probe library the balancer links too, where the sidecar's own modules expect it.
pub use wglb_probe::{exposition, http, thresholds};
