//! The routes of the announced addresses, in a kernel table of wglb's own, through an interface
//! only this process holds open: a tun device without `persist`. The routing daemon exports that
//! table; when wglb ends in any way, SIGKILL included, the kernel deletes the interface and every
//! route through it, and the daemon withdraws them (BIRD does at once: it follows interfaces).

use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use anyhow::{ensure, Context};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::libc;

use crate::config::AnnounceConfig;
use crate::host::Netlink;

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

pub struct AnnounceDevice {
    /// Holding it open is what keeps the interface, and so the routes, alive.
    _tun: File,
    ifindex: u32,
    table: u32,
    netlink: Netlink,
}

impl AnnounceDevice {
    /// Creates the interface and brings it up, with no route yet.
    pub fn create(config: &AnnounceConfig) -> anyhow::Result<AnnounceDevice> {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun (the announcement's interface is a tun device)")?;
        // SAFETY: ifreq is plain data; zeroed is its empty value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        let name = config.device.as_bytes();
        ensure!(name.len() < libc::IFNAMSIZ, "interface name too long");
        for (slot, &byte) in request.ifr_name.iter_mut().zip(name) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: the request is a valid ifreq for TUNSETIFF and outlives the call.
        unsafe { tun_set_iff(tun.as_raw_fd(), &request) }.with_context(|| {
            format!(
                "cannot create the interface `{}` for announced routes (another wglb holds it, or CAP_NET_ADMIN is missing)",
                config.device
            )
        })?;
        let ifindex = nix::net::if_::if_nametoindex(config.device.as_str())
            .with_context(|| format!("the interface `{}` is gone", config.device))?;
        let mut netlink = Netlink::open().context("opening a route netlink socket")?;
        // Down first: an interface left over (persistent, from someone else) loses its routes.
        for up in [false, true] {
            let mut link = LinkMessage::default();
            link.header.index = ifindex;
            link.header.flags = if up {
                LinkFlags::Up
            } else {
                LinkFlags::empty()
            };
            link.header.change_mask = LinkFlags::Up;
            netlink
                .change(RouteNetlinkMessage::SetLink(link), 0)
                .with_context(|| format!("cannot bring `{}` up", config.device))?;
        }
        Ok(AnnounceDevice {
            _tun: tun,
            ifindex,
            table: config.table,
            netlink,
        })
    }

    pub fn announce(&mut self, address: IpAddr) -> anyhow::Result<()> {
        let route = self.route(address);
        self.netlink
            .change(
                RouteNetlinkMessage::NewRoute(route),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .with_context(|| format!("cannot add the route of {address}"))
    }

    pub fn withdraw(&mut self, address: IpAddr) -> anyhow::Result<()> {
        let route = self.route(address);
        match self.netlink.change(RouteNetlinkMessage::DelRoute(route), 0) {
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::ESRCH) =>
            {
                Ok(())
            }
            outcome => outcome.with_context(|| format!("cannot delete the route of {address}")),
        }
    }

    fn route(&self, address: IpAddr) -> RouteMessage {
        let mut route = RouteMessage::default();
        let (family, bits, destination) = match address {
            IpAddr::V4(v4) => (AddressFamily::Inet, 32, RouteAddress::Inet(v4)),
            IpAddr::V6(v6) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(v6)),
        };
        route.header.address_family = family;
        route.header.destination_prefix_length = bits;
        // Tables above 255 only fit the attribute; the header then says "unspecified".
        route.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        route.header.protocol = RouteProtocol::Static;
        route.header.scope = RouteScope::Link;
        route.header.kind = RouteType::Unicast;
        route.attributes.push(RouteAttribute::Table(self.table));
        route
            .attributes
            .push(RouteAttribute::Destination(destination));
        route.attributes.push(RouteAttribute::Oif(self.ifindex));
        route
    }
}
