//! wglb's public gRPC API. The source of truth is `wglb/v1/*.proto`; this crate compiles it so
//! that the balancer, its CLI and the health sidecar share one generated copy, and holds the
//! [`client`] they reach a balancer with.

pub mod client;

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("wglb.v1");
}
