//! wglb's public gRPC API. The source of truth is `wglb/v1/*.proto`; this crate only compiles it
//! so that the balancer, its CLI and the health sidecar share one generated copy.

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("wglb.v1");
}
