//! Which shard of a listener a client's datagrams reach. Each shard has its own socket on the
//! listener's address (SO_REUSEPORT); a classic BPF program on the group picks the socket from
//! the client's source address and port, and [`shard_of`] computes the same in userspace, for
//! what reaches a listener without a datagram (a sync peer's sessions, a retired tuple).
//!
//! The kernel's own reuse-port hash would also keep a tuple on one socket, but it is keyed with
//! a secret, so userspace could not tell where a peer's session belongs; and a hash of the
//! address alone would put every client behind one NAT address on one shard.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// The multiplier of the hash (2^32 / golden ratio): consecutive ports land far apart.
const MULTIPLIER: u32 = 0x9E37_79B1;
/// The hash's well-mixed upper half.
const SHIFT: u32 = 16;

/// The shard of `shards` that datagrams from `client` reach.
pub fn shard_of(client: SocketAddr, shards: usize) -> usize {
    let address = match client.ip() {
        IpAddr::V4(ip) => u32::from(ip),
        IpAddr::V6(ip) => {
            let words = ip.octets();
            words
                .chunks_exact(4)
                .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
                .fold(0, |folded, word| folded ^ word)
        }
    };
    let mixed = (address ^ u32::from(client.port())).wrapping_mul(MULTIPLIER) >> SHIFT;
    mixed as usize % shards.max(1)
}

// Classic BPF, as in <linux/filter.h>.
const LD: u16 = 0x00;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const MEM: u16 = 0x60;
const AND: u16 = 0x50;
const MUL: u16 = 0x20;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;
/// Loads relative to the network header (the program runs on the UDP payload).
const NET: u32 = (-0x10_0000i32) as u32;
const IPPROTO_UDP: u32 = 17;

fn op(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump_if(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: JMP | JEQ | K,
        jt,
        jf,
        k,
    }
}

/// The program for a listener of `family` with `shards` sockets: [`shard_of`] over the
/// datagram's source. A datagram whose UDP header is not where a plain header puts it (IPv4
/// options, IPv6 extension headers) is steered by its address alone: the kernel hands the
/// program no way to find the port then, and such datagrams are rare enough not to matter.
fn program(ipv6: bool, shards: u32) -> Vec<libc::sock_filter> {
    let mut program = if ipv6 {
        let mut program = vec![
            op(LD | B | ABS, NET + 6),
            jump_if(IPPROTO_UDP, 0, 2),
            op(LD | H | ABS, NET + 40),
            op(JMP | JA, 1),
            op(LD | IMM, 0),
            op(ST, 0),
            op(LD | W | ABS, NET + 8),
        ];
        for offset in [12, 16, 20] {
            program.push(op(MISC | TAX, 0));
            program.push(op(LD | W | ABS, NET + offset));
            program.push(op(ALU | XOR | X, 0));
        }
        program.push(op(MISC | TAX, 0));
        program.push(op(LD | MEM, 0));
        program
    } else {
        vec![
            op(LD | B | ABS, NET),
            op(ALU | AND | K, 0x0f),
            jump_if(5, 0, 2),
            op(LD | H | ABS, NET + 20),
            op(JMP | JA, 1),
            op(LD | IMM, 0),
            op(MISC | TAX, 0),
            op(LD | W | ABS, NET + 12),
        ]
    };
    program.extend([
        op(ALU | XOR | X, 0),
        op(ALU | MUL | K, MULTIPLIER),
        op(ALU | RSH | K, SHIFT),
        op(ALU | MOD | K, shards),
        op(RET | A, 0),
    ]);
    program
}

/// Steers the reuse-port group `socket` belongs to (bound, with the group's other sockets
/// bound after it in shard order) by [`shard_of`].
pub fn steer(socket: &impl AsRawFd, ipv6: bool, shards: usize) -> io::Result<()> {
    let mut program = program(ipv6, shards as u32);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: fprog points at `program`, alive for the call; the kernel copies it.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use socket2::{Domain, Protocol, Socket, Type};

    use super::*;

    fn group(address: SocketAddr, shards: usize) -> Vec<UdpSocket> {
        let mut sockets: Vec<UdpSocket> = Vec::new();
        let mut address = address;
        for _ in 0..shards {
            let socket = Socket::new(
                Domain::for_address(address),
                Type::DGRAM,
                Some(Protocol::UDP),
            )
            .unwrap();
            socket.set_reuse_port(true).unwrap();
            socket.bind(&address.into()).unwrap();
            let socket: UdpSocket = socket.into();
            address = socket.local_addr().unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            sockets.push(socket);
        }
        steer(&sockets[0], address.is_ipv6(), shards).unwrap();
        sockets
    }

    /// Sends from every source and checks each datagram reached the socket `shard_of` names
    /// (and only it): the kernel's program and userspace agree.
    fn agrees(listen: SocketAddr, sources: &[IpAddr], shards: usize) {
        let sockets = group(listen, shards);
        let to = sockets[0].local_addr().unwrap();
        let mut reached = vec![0; shards];
        for (k, ip) in sources.iter().cycle().take(64).enumerate() {
            let sender = UdpSocket::bind(SocketAddr::new(*ip, 0)).unwrap();
            let from = sender.local_addr().unwrap();
            let tag = (k as u32).to_be_bytes();
            sender.send_to(&tag, to).unwrap();
            let expected = shard_of(from, shards);
            let mut buffer = [0; 8];
            let (length, seen) = sockets[expected]
                .recv_from(&mut buffer)
                .unwrap_or_else(|e| panic!("{from} did not reach shard {expected}: {e}"));
            assert_eq!((&buffer[..length], seen), (&tag[..], from));
            reached[expected] += 1;
            for (other, socket) in sockets.iter().enumerate().filter(|(s, _)| *s != expected) {
                assert!(
                    socket.recv_from(&mut buffer).is_err(),
                    "{from} reached shard {other} too"
                );
            }
        }
        assert!(
            reached.iter().all(|count| *count > 0),
            "every shard gets some of 64 tuples: {reached:?}"
        );
    }

    #[test]
    fn the_kernel_steers_ipv4_as_userspace_computes() {
        let sources: Vec<IpAddr> = (1..=4)
            .map(|k| format!("127.0.0.{k}").parse().unwrap())
            .collect();
        agrees("127.0.0.1:0".parse().unwrap(), &sources, 3);
    }

    #[test]
    fn the_kernel_steers_ipv6_as_userspace_computes() {
        agrees("[::1]:0".parse().unwrap(), &["::1".parse().unwrap()], 2);
    }

    #[test]
    fn one_address_spreads_over_the_shards_by_port() {
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        let mut counts = [0usize; 4];
        for port in 20_000..21_024 {
            counts[shard_of(SocketAddr::new(client, port), 4)] += 1;
        }
        assert!(counts.iter().all(|c| (200..=312).contains(c)), "{counts:?}");
    }
}
