//! A UDP socket with quinn-udp's batched, offload-aware I/O, and the buffers a batch lands in.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Room for one GRO batch: the kernel coalesces up to 64 KiB.
const RECV_BUFFER: usize = 64 * 1024;

/// A UDP socket with quinn-udp's batched, offload-aware I/O.
pub struct UdpEndpoint {
    pub(super) io: UdpSocket,
    state: UdpSocketState,
    /// A session's socket, connected to its gateway: a single datagram goes out with send(2),
    /// naming no destination, so the kernel uses the route cached on the socket instead of
    /// looking one up per datagram (as a sendmsg naming the destination makes it do).
    connected: bool,
}

impl UdpEndpoint {
    fn from_socket2(socket: Socket, connected: bool) -> io::Result<UdpEndpoint> {
        socket.set_nonblocking(true)?;
        let std: std::net::UdpSocket = socket.into();
        let state = UdpSocketState::new((&std).into())?;
        Ok(UdpEndpoint {
            io: UdpSocket::from_std(std)?,
            state,
            connected,
        })
    }

    /// Binds a listener's socket: reuse-port so that a listener's shards share its address and
    /// a new balancer can bind before the old one exits (an upgrade without a gap; both place
    /// clients alike), large buffers so bursts are not dropped by the kernel. An IPv6 listener
    /// takes IPv6 only, so a `0.0.0.0` listener on the same port can take IPv4. The socket
    /// joins a runtime with [`UdpEndpoint::listener`], on the thread that will serve it.
    pub(super) fn bind_listener(address: SocketAddr, buffer: usize) -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::for_address(address),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        if address.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        set_buffers(&socket, buffer);
        socket.bind(&address.into())?;
        Ok(socket)
    }

    /// A bound listener socket, registered with the current runtime.
    pub(super) fn listener(socket: Socket) -> io::Result<UdpEndpoint> {
        UdpEndpoint::from_socket2(socket, false)
    }

    /// Opens a session's socket towards its gateway.
    pub(super) fn upstream(gateway: SocketAddr, source: Option<IpAddr>) -> io::Result<UdpEndpoint> {
        let socket = Socket::new(
            Domain::for_address(gateway),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        let local = match (source, gateway) {
            (Some(ip), _) => SocketAddr::new(ip, 0),
            (None, SocketAddr::V4(_)) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            (None, SocketAddr::V6(_)) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        };
        socket.bind(&local.into())?;
        // Connected: the kernel hands this socket only the gateway's datagrams.
        socket.connect(&gateway.into())?;
        UdpEndpoint::from_socket2(socket, true)
    }

    /// Sends `data`, split into `stride`-sized datagrams, in one GSO send when the kernel allows.
    pub(super) fn send(
        &self,
        destination: SocketAddr,
        src_ip: Option<IpAddr>,
        data: &[u8],
        stride: usize,
    ) -> io::Result<()> {
        let segments = data.len().div_ceil(stride);
        if segments == 1 || segments <= self.state.max_gso_segments() {
            return self.send_one(destination, src_ip, data, (segments > 1).then_some(stride));
        }
        datagrams(data, stride)
            .try_for_each(|datagram| self.send_one(destination, src_ip, datagram, None))
    }

    pub(super) fn send_one(
        &self,
        destination: SocketAddr,
        src_ip: Option<IpAddr>,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        // Straight to the non-blocking socket, not through tokio's readiness flags: a new socket
        // is not known writable until the reactor has polled it, and a relay drops (counted)
        // rather than waits when the kernel's send buffer is full.
        if self.connected && segment_size.is_none() && src_ip.is_none() {
            return socket2::SockRef::from(&self.io).send(contents).map(drop);
        }
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip,
        };
        self.state.try_send((&self.io).into(), &transmit)
    }

    /// Receives one batch without waiting; Err(WouldBlock) when nothing is queued.
    pub(super) fn recv_batch(&self, buffers: &mut RecvBuffers) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = buffers
            .data
            .iter_mut()
            .map(|b| IoSliceMut::new(b))
            .collect();
        self.io.try_io(Interest::READABLE, || {
            self.state
                .recv((&self.io).into(), &mut slices, &mut buffers.meta)
        })
    }
}

/// Asks for `bytes` of kernel buffer each way. The kernel caps SO_RCVBUF/SO_SNDBUF at
/// net.core.[rw]mem_max (about 208 KiB by default, which a burst fills in milliseconds); with
/// CAP_NET_ADMIN the FORCE variants lift the cap. Without it the capped size still works.
fn set_buffers(socket: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = socket.set_recv_buffer_size(bytes);
    let _ = socket.set_send_buffer_size(bytes);
    // The kernel reports twice what was set (it counts its own overhead).
    if socket.recv_buffer_size().unwrap_or(0) < bytes {
        let _ = setsockopt(socket, sockopt::RcvBufForce, &bytes);
    }
    if socket.send_buffer_size().unwrap_or(0) < bytes {
        let _ = setsockopt(socket, sockopt::SndBufForce, &bytes);
    }
}

pub(super) struct RecvBuffers {
    pub(super) data: Vec<Vec<u8>>,
    pub(super) meta: Vec<RecvMeta>,
}

impl RecvBuffers {
    pub(super) fn new() -> RecvBuffers {
        RecvBuffers {
            data: vec![vec![0; RECV_BUFFER]; BATCH_SIZE],
            meta: vec![RecvMeta::default(); BATCH_SIZE],
        }
    }
}

/// The datagrams of a receive buffer: GRO packs several of `stride` bytes into one. An empty
/// datagram is still a datagram (and junk).
pub(super) fn datagrams(data: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    let empty = data.is_empty().then_some(data);
    data.chunks(stride).chain(empty)
}
