//! The gRPC API (`wglb.v1`, defined in `proto/`): the [`service`] answers from the control plane
//! and the datapaths, [`serve`] puts it on a Unix socket (and on TCP with a token or mTLS), and
//! [`client`] is how the CLI and tests reach it.

pub mod client;
pub mod serve;
pub mod service;

pub use wglb_proto::v1 as pb;
