//! The gRPC API (`wglb.v1`, defined in `proto/`): the [`service`] answers from the control plane
//! and the datapaths, and [`serve`] puts it on a Unix socket (and on TCP with a token or mTLS).
//! The CLI, the tests and the sidecar reach it with `wglb_proto::client`.

mod agents;
pub mod serve;
pub mod service;

pub(crate) use serve::constant_time_eq;

pub use wglb_proto::v1 as pb;
