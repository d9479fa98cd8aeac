//! `wglb-relay LISTEN GATEWAY [GATEWAY...]`: the floor of a userspace UDP relay, a contender of
//! the benchmark rig (`benches/rig.rs`), so that wglb's userspace datapath is measured beside the
//! least a relay in userspace can do per packet. One thread, no health checks, no sessions beyond
//! what replies need, no per-packet output.
//!
//! Clients' datagrams are received on LISTEN with `recvmmsg`, 64 a call, spread over the gateways
//! by a hash of their source address and port, and sent with one `sendmmsg` per gateway on a
//! socket connected to it. Gateways' replies find their client by WireGuard receiver index: the
//! relay learns each client's sender index from its handshake messages.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::ptr::null_mut;

const USAGE: &str = "usage: wglb-relay LISTEN GATEWAY [GATEWAY...]";
/// Datagrams per `recvmmsg` and at most per `sendmmsg`.
const BATCH: usize = 64;
/// A receive slot: the largest UDP payload, so nothing is ever truncated.
const SLOT: usize = 1 << 16;
/// Socket buffers each way, as wglb's and nginx's in the rig.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Batches read from one socket per wakeup: a flood of clients cannot starve the replies.
const DRAIN: usize = 8;

fn main() -> ExitCode {
    let args: Vec<SocketAddr> = match std::env::args().skip(1).map(|a| a.parse()).collect() {
        Ok(args) => args,
        Err(e) => return usage(&e),
    };
    if args.len() < 2 {
        return usage(&"no gateway");
    }
    match run(args[0], &args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wglb-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("wglb-relay: {error}\n{USAGE}");
    ExitCode::from(2)
}

/// Runs until a signal ends the process (SIGTERM's default action: nothing to clean up).
fn run(listen: SocketAddr, gateways: &[SocketAddr]) -> io::Result<()> {
    let listener = UdpSocket::bind(listen)?;
    size_buffers(&listener);
    let mut upstream = Vec::new();
    for gateway in gateways {
        let any: IpAddr = match gateway {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = UdpSocket::bind((any, 0))?;
        // Connected: no address per datagram, and the kernel routes the socket once.
        socket.connect(gateway)?;
        size_buffers(&socket);
        upstream.push(socket);
    }
    let mut relay = Relay {
        listener: listener.as_raw_fd(),
        upstream: upstream.iter().map(AsRawFd::as_raw_fd).collect(),
        inbox: Inbox::new(),
        to_gateways: (0..gateways.len()).map(|_| Outbox::new()).collect(),
        to_clients: Outbox::new(),
        clients: HashMap::default(),
    };
    let mut fds: Vec<libc::pollfd> = std::iter::once(&listener)
        .chain(&upstream)
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => continue,
                e => return Err(e),
            }
        }
        // Any event, POLLERR included: reading clears a pending error (an ICMP unreachable).
        for (k, _) in fds.iter().enumerate().filter(|(_, fd)| fd.revents != 0) {
            for _ in 0..DRAIN {
                let full = if k == 0 {
                    relay.relay_clients()?
                } else {
                    relay.relay_gateway(k - 1)?
                };
                if !full {
                    break;
                }
            }
        }
    }
}

/// Asks for `SOCKET_BUFFER` each way: the FORCE options pass `net.core.[rw]mem_max` but need
/// CAP_NET_ADMIN (the rig runs as root); without it, the plain ones, capped by those limits.
fn size_buffers(socket: &UdpSocket) {
    let set = |option| unsafe {
        let size = &SOCKET_BUFFER as *const libc::c_int as *const libc::c_void;
        let len = size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, option, size, len) == 0
    };
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(forced) {
            set(plain);
        }
    }
}

/// A peer's address as the kernel gives and takes it, never converted: a sockaddr_in6 has room
/// for either family's (28 bytes, where a sockaddr_storage would take 128).
type Sockaddr = libc::sockaddr_in6;

#[derive(Clone, Copy)]
struct Name {
    address: Sockaddr,
    len: libc::socklen_t,
}

struct Relay {
    listener: RawFd,
    upstream: Vec<RawFd>,
    inbox: Inbox,
    to_gateways: Vec<Outbox>,
    to_clients: Outbox,
    /// A client's sender index -> its address. One entry per handshake, never expired: the
    /// rig's runs are short, and the floor keeps no timers.
    clients: HashMap<u32, Name, BuildHasherDefault<IndexHasher>>,
}

impl Relay {
    /// One batch from the clients to the gateways; whether it was full (more may be waiting).
    fn relay_clients(&mut self) -> io::Result<bool> {
        let n = self.inbox.receive(self.listener)?;
        for i in 0..n {
            let datagram = self.inbox.datagram(i);
            // Initiation (148 bytes) and response (92): the sender index at 4..8.
            if matches!(
                (datagram.first(), datagram.len()),
                (Some(1), 148) | (Some(2), 92)
            ) {
                self.clients
                    .insert(index_at(datagram, 4), self.inbox.name(i));
            }
            let gateway = spread(&self.inbox.names[i]) % self.to_gateways.len() as u64;
            self.to_gateways[gateway as usize].push(datagram, None);
        }
        for (outbox, &fd) in self.to_gateways.iter_mut().zip(&self.upstream) {
            outbox.send(fd);
        }
        Ok(n == BATCH)
    }

    /// One batch from gateway `j` back to the clients, by receiver index; unknown ones dropped.
    fn relay_gateway(&mut self, j: usize) -> io::Result<bool> {
        let n = self.inbox.receive(self.upstream[j])?;
        for i in 0..n {
            let datagram = self.inbox.datagram(i);
            // Response (92 bytes): the receiver index at 8..12; cookie reply (64), transport
            // data (32 and more): at 4..8.
            let index = match (datagram.first(), datagram.len()) {
                (Some(2), 92) => index_at(datagram, 8),
                (Some(3), 64) => index_at(datagram, 4),
                (Some(4), len) if len >= 32 => index_at(datagram, 4),
                _ => continue,
            };
            if let Some(client) = self.clients.get(&index) {
                self.to_clients.push(datagram, Some(client));
            }
        }
        self.to_clients.send(self.listener);
        Ok(n == BATCH)
    }
}

fn index_at(datagram: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(datagram[at..at + 4].try_into().unwrap())
}

/// FNV-1a of the source address and port: a client's datagrams all go to one gateway.
fn spread(name: &Sockaddr) -> u64 {
    let mut hash = IndexHasher(0xcbf2_9ce4_8422_2325);
    // Both families have the port at the same place.
    hash.write(&name.sin6_port.to_ne_bytes());
    if name.sin6_family == libc::AF_INET as libc::sa_family_t {
        // SAFETY: the kernel wrote a sockaddr_in there, which fits.
        let v4 = unsafe { &*(name as *const Sockaddr).cast::<libc::sockaddr_in>() };
        hash.write(&v4.sin_addr.s_addr.to_ne_bytes());
    } else {
        hash.write(&name.sin6_addr.s6_addr);
    }
    hash.0
}

/// FNV-1a for byte strings; a multiply for indices, which WireGuard picks at random already (no
/// SipHash per reply).
#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u32(&mut self, index: u32) {
        self.0 = (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `recvmmsg`'s headers, each pointing at its slot and name once: the Vecs' heap memory never
/// moves, so the pointers stay valid wherever the Inbox goes.
struct Inbox {
    slots: Vec<u8>,
    names: Vec<Sockaddr>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Inbox {
    fn new() -> Inbox {
        // SAFETY (the zeroed structs): plain data, all-zero is valid.
        let mut inbox = Inbox {
            slots: vec![0; BATCH * SLOT],
            names: vec![unsafe { zeroed() }; BATCH],
            iovecs: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
        };
        for i in 0..BATCH {
            inbox.iovecs[i].iov_base = inbox.slots[i * SLOT..].as_mut_ptr().cast();
            inbox.iovecs[i].iov_len = SLOT;
            let header = &mut inbox.headers[i].msg_hdr;
            header.msg_name = (&mut inbox.names[i] as *mut Sockaddr).cast();
            header.msg_iov = &mut inbox.iovecs[i];
            header.msg_iovlen = 1;
        }
        inbox
    }

    /// Up to a batch, without waiting: how many arrived (none on EAGAIN, or when the read
    /// returned a pending ICMP error instead).
    fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        for header in &mut self.headers {
            header.msg_hdr.msg_namelen = size_of::<Sockaddr>() as libc::socklen_t;
        }
        let flags = libc::MSG_DONTWAIT;
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                BATCH as u32,
                flags,
                null_mut(),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR | libc::ECONNREFUSED) => Ok(0),
            _ => Err(error),
        }
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.slots[i * SLOT..i * SLOT + self.headers[i].msg_len as usize]
    }

    fn name(&self, i: usize) -> Name {
        Name {
            address: self.names[i],
            len: self.headers[i].msg_hdr.msg_namelen,
        }
    }
}

/// A `sendmmsg` batch. Its iovecs point into the Inbox's slots: sent before the next receive.
struct Outbox {
    names: Vec<Sockaddr>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    len: usize,
}

impl Outbox {
    fn new() -> Outbox {
        let mut outbox = Outbox {
            names: vec![unsafe { zeroed() }; BATCH],
            iovecs: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
            len: 0,
        };
        for i in 0..BATCH {
            outbox.headers[i].msg_hdr.msg_iov = &mut outbox.iovecs[i];
            outbox.headers[i].msg_hdr.msg_iovlen = 1;
        }
        outbox
    }

    /// Adds a datagram; `to`: its destination, None on a connected socket.
    fn push(&mut self, datagram: &[u8], to: Option<&Name>) {
        let i = self.len;
        self.iovecs[i].iov_base = datagram.as_ptr().cast_mut().cast();
        self.iovecs[i].iov_len = datagram.len();
        if let Some(to) = to {
            self.names[i] = to.address;
            let header = &mut self.headers[i].msg_hdr;
            header.msg_name = (&mut self.names[i] as *mut Sockaddr).cast();
            header.msg_namelen = to.len;
        }
        self.len += 1;
    }

    /// Sends what was pushed, without waiting: what does not fit the socket's buffer is dropped,
    /// as a router would, rather than stalling the other gateways and the replies.
    fn send(&mut self, fd: RawFd) {
        let mut sent = 0;
        while sent < self.len {
            let rest = (self.len - sent) as u32;
            let headers = unsafe { self.headers.as_mut_ptr().add(sent) };
            let n = unsafe { libc::sendmmsg(fd, headers, rest, libc::MSG_DONTWAIT) };
            if n >= 0 {
                // (Never 0 for a non-empty batch; if it were, no endless loop.)
                sent += n.max(1) as usize;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::ENOBUFS) => break,
                // E.g. ECONNREFUSED, a gateway's earlier ICMP error: that one datagram is lost.
                _ => sent += 1,
            }
        }
        self.len = 0;
    }
}
