//! The XDP fast path's userspace side. [`program`] is the handle on the loaded program and its
//! maps; [`route`] finds how to reach a gateway (interface, next hop's MAC, our address); and
//! [`fastpath`] runs it behind `wglb run --datapath xdp`: it attaches the program, keeps the maps
//! in step with the control plane's plans, expires idle sessions, answers the API's session
//! requests and reads the program's counters into the balancer's metrics. Policy stays in
//! userspace; the program (`ebpf/xdp`) only executes it.

pub mod fastpath;
pub mod program;
pub mod route;

pub use program::{endpoint_of, Counters, Limits, Outcome, Table, XdpProgram};
pub use program::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};
