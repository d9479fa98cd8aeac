//! A packet generator for benchmarks: WireGuard-shaped UDP datagrams from any number of source
//! tuples, sent with `sendmmsg` on a raw socket (the kernel fills in the IP checksum; the UDP
//! checksum is computed here, in full, since an XDP balancer updates it incrementally).
//!
//! A raw socket needs no socket per source tuple, so a million flows cost a million prebuilt
//! packets, not a million file descriptors; and one thread, pinned to a core, sends in batches
//! of 64, so the generator is not the bottleneck the rig measures (its own rate is returned).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::netns::Netns;
use crate::Rig;

/// Packets per `sendmmsg` call.
const BATCH: usize = 64;

/// Prebuilt IPv4/UDP packets, one per flow, each with its destination.
pub struct Flows {
    /// Packets back to back, `stride` bytes each.
    packets: Vec<u8>,
    stride: usize,
    destinations: Vec<SocketAddrV4>,
}

impl Flows {
    /// One flow per source: WireGuard transport messages (type 4) of `payload` bytes, flow k to
    /// `destination(k)`.
    pub fn new(
        sources: &[SocketAddrV4],
        destination: impl Fn(usize) -> SocketAddrV4,
        payload: usize,
    ) -> Flows {
        let mut message = vec![0u8; payload];
        if let Some(kind) = message.first_mut() {
            *kind = 4;
        }
        Flows::with_message(sources, destination, &message)
    }

    /// Flows that all carry `message`.
    pub fn with_message(
        sources: &[SocketAddrV4],
        destination: impl Fn(usize) -> SocketAddrV4,
        message: &[u8],
    ) -> Flows {
        let stride = 20 + 8 + message.len();
        let mut packets = vec![0u8; stride * sources.len()];
        let mut destinations = Vec::with_capacity(sources.len());
        for (k, (source, packet)) in sources.iter().zip(packets.chunks_mut(stride)).enumerate() {
            let to = destination(k);
            write_packet(packet, *source, to, message);
            destinations.push(to);
        }
        Flows {
            packets,
            stride,
            destinations,
        }
    }

    pub fn len(&self) -> usize {
        self.destinations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty()
    }

    /// Payload bytes per packet (what a UDP sink receives).
    pub fn payload(&self) -> usize {
        self.stride - 28
    }
}

/// `count` source tuples: ports `first_port..` on `ips` in turn, as many as needed.
pub fn sources(ips: &[Ipv4Addr], first_port: u16, count: usize) -> Vec<SocketAddrV4> {
    let per_ip = (u16::MAX - first_port) as usize + 1;
    (0..count)
        .map(|k| {
            SocketAddrV4::new(
                ips[k / per_ip % ips.len()],
                first_port + (k % per_ip) as u16,
            )
        })
        .collect()
}

/// What one burst sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    pub seconds: f64,
}

/// Sends the flows round-robin from namespace `ns` for `duration`, paced at `rate` packets per
/// second (0: as fast as it can), on a thread pinned to CPU `cpu`.
pub fn send(
    ns: &Netns,
    flows: &Arc<Flows>,
    rate: u64,
    duration: Duration,
    cpu: usize,
) -> Result<Sent> {
    let flows = flows.clone();
    ns.run(move || send_here(&flows, rate, duration, cpu))?
}

fn send_here(flows: &Flows, rate: u64, duration: Duration, cpu: usize) -> Result<Sent> {
    ensure!(!flows.is_empty(), "no flows to send");
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("CPU number")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .context("pinning the generator")?;
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let buffer: libc::c_int = 16 << 20;
    // SAFETY: setsockopt with a c_int value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            &buffer as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    let names: Vec<libc::sockaddr_in> = flows.destinations.iter().map(sockaddr).collect();
    let start = Instant::now();
    let end = start + duration;
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut iovecs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: mmsghdr is plain data; every field used is set before each call.
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(due) = (sent * 1_000_000_000).checked_div(rate) {
            let due = start + Duration::from_nanos(due);
            if now < due {
                std::thread::sleep(due - now);
                continue;
            }
        }
        for (iovec, header) in iovecs.iter_mut().zip(headers.iter_mut()) {
            let k = next;
            next = (next + 1) % flows.len();
            let packet = &flows.packets[k * flows.stride..(k + 1) * flows.stride];
            iovec.iov_base = packet.as_ptr() as *mut libc::c_void;
            iovec.iov_len = packet.len();
            header.msg_hdr.msg_name = &names[k] as *const _ as *mut libc::c_void;
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            header.msg_hdr.msg_iov = iovec as *mut libc::iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: headers point at iovecs, names and packets that outlive the call.
        let done =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), BATCH as u32, 0) };
        if done > 0 {
            sent += done as u64;
        }
    }
    Ok(Sent {
        packets: sent,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn sockaddr(address: &SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        // A raw socket with IPPROTO_RAW ignores the port; the header carries it.
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// An IPv4 header (checksum and id left to the kernel) and a UDP header with its checksum.
fn write_packet(packet: &mut [u8], from: SocketAddrV4, to: SocketAddrV4, message: &[u8]) {
    let total = packet.len() as u16;
    let udp_len = total - 20;
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&from.ip().octets());
    packet[16..20].copy_from_slice(&to.ip().octets());
    let udp = &mut packet[20..];
    udp[0..2].copy_from_slice(&from.port().to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[8..].copy_from_slice(message);
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += word as u32;
        }
    };
    add(&from.ip().octets());
    add(&to.ip().octets());
    add(&[0, 17]);
    add(&udp_len.to_be_bytes());
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
}

/// UDP sinks in the gateways' namespaces, counting what arrives: what a benchmark's gateways
/// become once their WireGuard is stopped. Each answers every handshake initiation with a
/// response and the first other datagram from each source with a keepalive-sized data message,
/// as a gateway answers a new session, so that a balancer confirms it; after that it only counts.
pub struct Sinks {
    packets: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Sinks {
    /// A sink on each address, in the namespace of the rig's gateway with that IP.
    pub fn start(rig: &Rig, addresses: &[SocketAddr]) -> Result<Sinks> {
        let packets = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &address in addresses {
            let j = (0..rig.gateways())
                .find(|&j| rig.gateway_addr(j).ip() == address.ip())
                .with_context(|| format!("no gateway has {}", address.ip()))?;
            let socket = rig.gateway_ns(j).run(move || UdpSocket::bind(address))??;
            // The sinks must not be where packets are lost.
            let _ = nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::RcvBufForce,
                &(32 << 20),
            );
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
            let (packets, bytes, stop) = (packets.clone(), bytes.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buffer = [0u8; 2048];
                let mut response = [0u8; 92];
                response[0] = 2;
                let mut keepalive = [0u8; 32];
                keepalive[0] = 4;
                let mut answered = std::collections::HashSet::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buffer) {
                        packets.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        // Every initiation, as a gateway answers each; other datagrams once
                        // per source, enough to confirm a session a benchmark then streams on.
                        let initiation = n == 148 && buffer[0] == 1;
                        if initiation || answered.insert(from) {
                            let answer = if initiation {
                                &response[..]
                            } else {
                                &keepalive[..]
                            };
                            let _ = socket.send_to(answer, from);
                        }
                    }
                }
            }));
        }
        Ok(Sinks {
            packets,
            bytes,
            stop,
            threads,
        })
    }

    pub fn reset(&self) {
        self.packets.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Datagrams and payload bytes received since the last reset.
    pub fn count(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

pub fn v4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(v6) => anyhow::bail!("{v6}: the generator sends IPv4"),
    }
}

/// An IPv4 socket address (the generator's rigs are IPv4).
pub fn v4_socket(address: SocketAddr) -> SocketAddrV4 {
    match address {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(v6) => panic!("{v6}: the generator sends IPv4"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_checksums_verify() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 201, 0, 2), 20_001);
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 201, 0, 1), 51_820);
        let flows = Flows::new(&[from], |_| to, 65);
        let udp = &flows.packets[20..];
        // Summing a datagram with its checksum and pseudo-header gives all ones.
        let mut sum: u32 = 0;
        for bytes in [
            &from.ip().octets()[..],
            &to.ip().octets()[..],
            &[0, 17],
            &(udp.len() as u16).to_be_bytes(),
            udp,
        ] {
            for pair in bytes.chunks(2) {
                sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(udp[8], 4, "a WireGuard transport message");
        assert_eq!(flows.payload(), 65);
    }

    #[test]
    fn sources_fill_each_address_before_the_next() {
        let ips = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];
        let all = sources(&ips, 65_000, 600);
        assert_eq!(all[0], SocketAddrV4::new(ips[0], 65_000));
        assert_eq!(all[535], SocketAddrV4::new(ips[0], 65_535));
        assert_eq!(all[536], SocketAddrV4::new(ips[1], 65_000));
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 600);
    }
}
