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
//! [`thresholds`] turns results into a verdict that needs several in a row to change.

pub mod handshake;
pub mod http;
pub mod port;
pub mod thresholds;
