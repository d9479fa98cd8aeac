//! The gateway agent (`wglb-agent`): what it reads of a gateway's WireGuard interface and the one
//! change it makes there ([`wireguard`]), and its link to each balancer ([`link`]).

pub mod link;
pub mod wireguard;
