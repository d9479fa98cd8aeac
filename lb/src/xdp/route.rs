//! How this host reaches a gateway, asked of the kernel over rtnetlink: the route (out of which
//! interface, through which next hop, from which address) and the next hop's MAC from the
//! neighbour table. The XDP program writes frames itself, so it needs what the kernel's own stack
//! would work out per packet; the fast path asks again every second, so route and neighbour
//! changes reach the program within one.
//!
//! The fast path never resolves a neighbour itself: until the kernel has a MAC (learnt from the
//! health checks' connections or from traffic the userspace datapath relays), the program passes
//! the gateway's packets to userspace.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{bail, Context};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::host::Netlink;

/// The way to a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    /// The interface out, and its MAC.
    pub ifindex: u32,
    pub local_mac: [u8; 6],
    /// The gateway itself on a connected network, else the router the route names.
    pub next_hop: IpAddr,
    /// The address to send from: the configured source, else the route's preferred one.
    pub source: IpAddr,
}

impl Netlink {
    /// The kernel's route to `destination` (as `ip route get`), from `source` if given.
    pub fn path_to(&mut self, destination: IpAddr, source: Option<IpAddr>) -> anyhow::Result<Path> {
        let mut query = RouteMessage::default();
        let (family, bits) = match destination {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        query.header.address_family = family;
        query.header.destination_prefix_length = bits;
        query
            .attributes
            .push(RouteAttribute::Destination(destination.into()));
        if let Some(source) = source {
            query.header.source_prefix_length = bits;
            query.attributes.push(RouteAttribute::Source(source.into()));
        }
        let answers = self.ask(RouteNetlinkMessage::GetRoute(query))?;
        let Some(RouteNetlinkMessage::NewRoute(route)) = answers.into_iter().next() else {
            bail!("no route to {destination}");
        };
        let mut ifindex = None;
        let mut next_hop = destination;
        let mut preferred = None;
        for attribute in route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => ifindex = Some(index),
                RouteAttribute::Gateway(address) => next_hop = ip_of(address).unwrap_or(next_hop),
                RouteAttribute::PrefSource(address) => preferred = ip_of(address),
                _ => {}
            }
        }
        let ifindex =
            ifindex.with_context(|| format!("the route to {destination} names no interface"))?;
        let source = source
            .or(preferred)
            .with_context(|| format!("the route to {destination} gives no source address"))?;
        Ok(Path {
            ifindex,
            local_mac: interface_mac(ifindex)?,
            next_hop,
            source,
        })
    }

    /// Every neighbour entry with a usable MAC, by interface and address. Stale entries count:
    /// the kernel keeps using them until a probe says otherwise, and XDP traffic, which does not
    /// confirm them, would otherwise lose its next hop every few minutes.
    pub fn neighbours(&mut self) -> anyhow::Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        let answers = self.dump(RouteNetlinkMessage::GetNeighbour(
            NeighbourMessage::default(),
        ))?;
        let mut neighbours = HashMap::new();
        for answer in answers {
            let RouteNetlinkMessage::NewNeighbour(entry) = answer else {
                continue;
            };
            if matches!(
                entry.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            ) {
                continue;
            }
            let mut address = None;
            let mut mac = None;
            for attribute in entry.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        address = Some(IpAddr::V4(ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        address = Some(IpAddr::V6(ip))
                    }
                    NeighbourAttribute::LinkLayerAddress(bytes) => {
                        mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
                    }
                    _ => {}
                }
            }
            if let (Some(address), Some(mac)) = (address, mac) {
                neighbours.insert((entry.header.ifindex, address), mac);
            }
        }
        Ok(neighbours)
    }
}

fn ip_of(address: RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// An interface's name.
pub fn interface_name(ifindex: u32) -> anyhow::Result<String> {
    let name = nix::net::if_::if_indextoname(ifindex)
        .with_context(|| format!("no interface with index {ifindex}"))?;
    Ok(name.to_string_lossy().into_owned())
}

/// An interface's MAC (all zeros for one without, such as a tunnel).
pub fn interface_mac(ifindex: u32) -> anyhow::Result<[u8; 6]> {
    let name = interface_name(ifindex)?;
    let path = format!("/sys/class/net/{name}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("{path}: `{text}`"))?;
    }
    Ok(mac)
}
