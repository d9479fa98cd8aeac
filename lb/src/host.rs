//! What the kernel knows of this host, read (and, for routes, written) by several parts: the
//! local addresses (the XDP fast path serves a listener's addresses that are local, the route
//! announcement announces only addresses this host receives) and a route netlink socket (the fast
//! path's way to each gateway, the announcement's routes).

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;

use anyhow::Context;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// This host's addresses, loopback ones aside, sorted.
pub fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("listing local addresses")?
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| !ip.is_loopback())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    addresses.sort();
    Ok(addresses)
}

/// A route socket: requests and their answers, one at a time.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink {
            socket,
            sequence: 0,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// A question with one answer.
    pub fn ask(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
        self.request(message, NLM_F_REQUEST)
    }

    /// A question whose answer is a list.
    pub fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
        self.request(message, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// A change (`flags` such as NLM_F_CREATE), done once the kernel acknowledges it.
    pub fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> anyhow::Result<()> {
        self.request(message, NLM_F_REQUEST | NLM_F_ACK | flags)
            .map(drop)
    }

    /// Sends one request and collects its answers (several for a dump) until the kernel says
    /// done, acknowledges, or refuses.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let acked = flags & NLM_F_ACK != 0;
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0).context("netlink send")?;
        let mut answers = Vec::new();
        loop {
            let size = self
                .socket
                .recv(&mut &mut self.buffer[..], 0)
                .context("netlink receive")?;
            let mut offset = 0;
            while offset < size {
                let message: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&self.buffer[offset..size])
                        .context("a netlink answer that does not parse")?;
                let length = message.header.length as usize;
                if message.header.sequence_number == self.sequence {
                    match message.payload {
                        NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::Error(error) => match error.code {
                            Some(code) => {
                                return Err(io::Error::from_raw_os_error(-code.get()).into())
                            }
                            None => return Ok(answers),
                        },
                        NetlinkPayload::InnerMessage(inner) => {
                            answers.push(inner);
                            if !dump && !acked {
                                return Ok(answers);
                            }
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}
