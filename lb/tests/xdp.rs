//! The XDP program, loaded through this kernel's verifier and run on packet fixtures with
//! BPF_PROG_TEST_RUN: for each fixture the verdict, the counter it moves and the bytes it leaves.
//! Fixtures are built, and outputs parsed and their checksums verified, by etherparse, a packet
//! library independent of wglb. Placement is checked against the userspace datapath's own
//! `Placement::place`, and junk against its shape check (parity). Needs root (CAP_BPF), like the
//! namespace tests; fails without it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    Icmpv4Type, IpHeaders, IpNumber, Ipv4Header, Ipv6Header, LinkHeader, NetHeaders, PacketBuilder,
    PacketHeaders, TransportHeader,
};
use wglb::config::Config;
use wglb::control::initial_placement;
use wglb::pool::Placement;
use wglb::rebinding::{Indices, Learned};
use wglb::xdp::{Limits, Table, XdpProgram, XDP_DROP, XDP_PASS, XDP_TX};
use wglb_common::admission::AdmissionLimits;
use wglb_common::handshake::HandshakeWait;
use wglb_common::mac1::Mac1Key;
use wglb_common::wireguard::classify;
use wglb_common::xdp::{
    FlowKey, Gateway, IndexEntry, IndexKey, XdpCounter, GATEWAY_KEEPS, GATEWAY_READY,
};
use wglb_lab::require_root;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BALANCER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const PORT: u16 = 51820;
const MAGLEV: u32 = 65_537;
const NAT_FIRST: u16 = 40_000;
const NAT_PORTS: u16 = 1000;
/// BPF_PROG_TEST_RUN runs XDP programs as if on the loopback interface.
const LOOPBACK: u32 = 1;
/// Admission that admits everything: most fixtures open many sessions from one address.
const OPEN: AdmissionLimits = AdmissionLimits {
    rate: 1_000_000,
    burst: 1_000_000,
    unconfirmed: 1_000_000,
    pad: 0,
};

fn listener_v4() -> SocketAddr {
    SocketAddr::from(([10, 201, 0, 1], PORT))
}

fn listener_v6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6("fd00:201::1".parse().unwrap()), PORT)
}

fn client_v4(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 201, 0, 2], port))
}

fn client_v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6("fd00:201::2".parse().unwrap()), port)
}

/// Gateway j of the IPv4 listener (0..3) or of the IPv6 one (3..5).
fn gateway_addr(j: u32) -> SocketAddr {
    if j < 3 {
        SocketAddr::from(([10, 202, j as u8, 2], PORT))
    } else {
        let ip = Ipv6Addr::new(0xfd00, 0x202, j as u16, 0, 0, 0, 0, 2);
        SocketAddr::new(IpAddr::V6(ip), PORT)
    }
}

/// Our address towards gateway j: the NAT source.
fn source_of(j: u32) -> IpAddr {
    match gateway_addr(j).ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 202, j as u8, 1)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x202, j as u16, 0, 0, 0, 0, 1)),
    }
}

fn gateway_mac(j: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, j as u8]
}

/// A listener's configuration: gateways `gw{j}` for j in `js`, states as given.
fn listener_config(listen: SocketAddr, js: &[u32], states: &[&str]) -> Placement {
    placement_with(listen, "source-ip-port", js, states)
}

fn placement_with(listen: SocketAddr, hash_key: &str, js: &[u32], states: &[&str]) -> Placement {
    let mut text =
        format!("[[listener]]\nname = \"l\"\nlisten = \"{listen}\"\nhash_key = \"{hash_key}\"\n");
    for (&j, state) in js.iter().zip(states) {
        text += &format!(
            "[[listener.gateway]]\nname = \"gw{j}\"\naddress = \"{}\"\nstate = \"{state}\"\n",
            gateway_addr(j)
        );
    }
    initial_placement(&Config::parse(&text, "test").unwrap().listeners[0])
}

fn index_of(name: &str) -> u32 {
    name.trim_start_matches("gw").parse().unwrap()
}

/// The program with two listeners: IPv4 with gw0..gw2 (Maglev table at 0) and IPv6 with gw3,
/// gw4 (at 65537). Userspace's job, done by hand: gateways, tables, NAT ports.
struct Lab {
    program: XdpProgram,
    v4: Placement,
    admission: AdmissionLimits,
}

impl Lab {
    fn new() -> Result<Lab> {
        Lab::with(4096, OPEN)
    }

    /// A lab whose probation holds `probation` sessions, with these admission limits.
    fn with(probation: u32, admission: AdmissionLimits) -> Result<Lab> {
        require_root()?;
        let mut program = XdpProgram::load(Limits {
            sessions: 4096,
            probation,
            maglev_slots: 2 * MAGLEV,
        })?;
        program.set_nat_ports(NAT_FIRST, NAT_PORTS)?;
        for j in 0..5 {
            Lab::set_gateway(&mut program, j, true)?;
        }
        let v4 = listener_config(listener_v4(), &[0, 1, 2], &["active"; 3]);
        let v6 = listener_config(listener_v6(), &[3, 4], &["active"; 2]);
        program.set_placement(0, &[listener_v4()], &[], 0, MAGLEV, &v4, admission, |g| {
            index_of(&g.name)
        })?;
        program.set_placement(
            1,
            &[listener_v6()],
            &[],
            MAGLEV,
            MAGLEV,
            &v6,
            admission,
            |g| index_of(&g.name),
        )?;
        Ok(Lab {
            program,
            v4,
            admission,
        })
    }

    fn set_gateway(program: &mut XdpProgram, j: u32, keeps: bool) -> Result<()> {
        program.set_gateway(
            j,
            Gateway {
                endpoint: wglb::xdp::endpoint_of(gateway_addr(j)),
                source: wglb::xdp::endpoint_of(SocketAddr::new(source_of(j), 0)).addr,
                next_hop_mac: gateway_mac(j),
                local_mac: BALANCER_MAC,
                ifindex: LOOPBACK,
                flags: if keeps {
                    GATEWAY_KEEPS | GATEWAY_READY
                } else {
                    0
                },
            },
        )
    }

    /// Replaces the IPv4 listener's pool with `states` for gw0..gw2, as the control plane would:
    /// a new Maglev table, and which gateways keep their sessions.
    fn set_v4_states(&mut self, states: [&str; 3]) -> Result<()> {
        self.v4 = listener_config(listener_v4(), &[0, 1, 2], &states);
        for (j, state) in states.iter().enumerate() {
            Lab::set_gateway(&mut self.program, j as u32, *state != "down")?;
        }
        self.load_v4()
    }

    fn load_v4(&mut self) -> Result<()> {
        let admission = self.admission;
        self.program.set_placement(
            0,
            &[listener_v4()],
            &[],
            0,
            MAGLEV,
            &self.v4,
            admission,
            |g| index_of(&g.name),
        )
    }

    /// The table `client`'s session (of the IPv4 listener) is in, and the session.
    fn session(&self, client: SocketAddr) -> Option<(Table, wglb_common::xdp::Session)> {
        self.program.session(&FlowKey {
            listener: 0,
            client: wglb::xdp::endpoint_of(client),
        })
    }

    /// The gateway index Maglev places `client` of the IPv4 listener on.
    fn placed(&self, client: SocketAddr) -> u32 {
        index_of(&self.v4.place(client).expect("a gateway").name)
    }

    /// A datagram from gateway j to our NAT port `nat`.
    fn reply(j: u32, nat: u16, payload: &[u8]) -> Vec<u8> {
        frame(
            gateway_addr(j),
            SocketAddr::new(source_of(j), nat),
            (gateway_mac(j), BALANCER_MAC),
            payload,
        )
    }

    fn counter(&self, which: XdpCounter) -> Result<u64> {
        Ok(self.program.counters(2)?.total(which))
    }

    /// Runs `frame`, checking its verdict and that `counter` moved by one.
    fn expect(&self, frame: &[u8], verdict: u32, counter: XdpCounter) -> Result<Vec<u8>> {
        let before = self.counter(counter)?;
        let outcome = self.program.run(frame)?;
        ensure!(
            outcome.verdict == verdict,
            "verdict {} instead of {verdict}",
            outcome.verdict
        );
        ensure!(
            self.counter(counter)? == before + 1,
            "{} did not count it",
            counter.as_str()
        );
        Ok(outcome.packet)
    }
}

fn message(kind: u8, len: usize) -> Vec<u8> {
    let mut payload = vec![0u8; len];
    if let Some(first) = payload.first_mut() {
        *first = kind;
    }
    // Something to carry through unchanged.
    for (i, byte) in payload.iter_mut().enumerate().skip(16) {
        *byte = i as u8;
    }
    payload
}

/// A UDP datagram in an Ethernet frame, built by etherparse (with correct checksums).
fn frame(from: SocketAddr, to: SocketAddr, macs: ([u8; 6], [u8; 6]), payload: &[u8]) -> Vec<u8> {
    frame_with(from, to, macs, |_| {}, payload)
}

fn frame_with(
    from: SocketAddr,
    to: SocketAddr,
    (source_mac, destination_mac): ([u8; 6], [u8; 6]),
    tweak: impl FnOnce(&mut Ipv4Header),
    payload: &[u8],
) -> Vec<u8> {
    let link = PacketBuilder::ethernet2(source_mac, destination_mac);
    let mut out = Vec::new();
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, s.octets(), d.octets()).unwrap();
            tweak(&mut ip);
            link.ip(IpHeaders::Ipv4(ip, Default::default()))
                .udp(from.port(), to.port())
                .write(&mut out, payload)
                .unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => link
            .ipv6(s.octets(), d.octets(), 64)
            .udp(from.port(), to.port())
            .write(&mut out, payload)
            .unwrap(),
        _ => panic!("mixed families"),
    }
    out
}

fn from_client(client: SocketAddr, listener: SocketAddr, payload: &[u8]) -> Vec<u8> {
    frame(client, listener, (CLIENT_MAC, BALANCER_MAC), payload)
}

/// A frame as etherparse reads it, with both checksums verified.
#[derive(Debug)]
struct Parsed {
    source_mac: [u8; 6],
    destination_mac: [u8; 6],
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

fn parse(frame: &[u8]) -> Result<Parsed> {
    let headers = PacketHeaders::from_ethernet_slice(frame).context("etherparse")?;
    let Some(LinkHeader::Ethernet2(eth)) = headers.link else {
        bail!("no Ethernet header")
    };
    let Some(TransportHeader::Udp(udp)) = headers.transport else {
        bail!("not UDP")
    };
    let payload = headers.payload.slice().to_vec();
    let (from, to, checksum) = match headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            ensure!(
                ip.header_checksum == ip.calc_header_checksum(),
                "bad IPv4 header checksum"
            );
            (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                udp.calc_checksum_ipv4(&ip, &payload)?,
            )
        }
        Some(NetHeaders::Ipv6(ip, _)) => (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            udp.calc_checksum_ipv6(&ip, &payload)?,
        ),
        _ => bail!("not IP"),
    };
    ensure!(
        udp.checksum == checksum,
        "bad UDP checksum {:#06x}, should be {checksum:#06x}",
        udp.checksum
    );
    Ok(Parsed {
        source_mac: eth.source,
        destination_mac: eth.destination,
        from: SocketAddr::new(from, udp.source_port),
        to: SocketAddr::new(to, udp.destination_port),
        payload,
    })
}

/// Sends `payload` from `client`; returns the gateway index it went to and the NAT port.
fn to_gateway(
    lab: &Lab,
    client: SocketAddr,
    listener: SocketAddr,
    payload: &[u8],
) -> Result<(u32, u16)> {
    let out = lab.expect(
        &from_client(client, listener, payload),
        XDP_TX,
        XdpCounter::ToGateway,
    )?;
    let parsed = parse(&out)?;
    let j = (0..5)
        .find(|&j| gateway_addr(j) == parsed.to)
        .with_context(|| format!("sent to {}, not a gateway", parsed.to))?;
    ensure!(
        parsed.from.ip() == source_of(j),
        "from {} towards gw{j}",
        parsed.from
    );
    let port = parsed.from.port();
    ensure!(
        (NAT_FIRST..NAT_FIRST + NAT_PORTS).contains(&port),
        "NAT port {port}"
    );
    ensure!(parsed.destination_mac == gateway_mac(j) && parsed.source_mac == BALANCER_MAC);
    ensure!(parsed.payload == payload, "the payload changed");
    Ok((j, port))
}

#[test]
fn new_clients_are_placed_as_userspace_places_them_and_stay() -> Result<()> {
    let lab = Lab::new()?;
    for port in 40_000..40_040 {
        let client = client_v4(port);
        let created = lab.counter(XdpCounter::SessionCreated)?;
        let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
        let expected = lab.v4.place(client).unwrap();
        ensure!(
            gateway_addr(j) == expected.address,
            "{client}: XDP chose gw{j}, userspace {}",
            expected.name
        );
        ensure!(lab.counter(XdpCounter::SessionCreated)? == created + 1);
        // Its next datagram hits the session: same gateway, same NAT port, no new session.
        let again = to_gateway(&lab, client, listener_v4(), &message(4, 32 + 16 * 4))?;
        ensure!(
            again == (j, nat),
            "{client} moved from {:?} to {again:?}",
            (j, nat)
        );
        ensure!(lab.counter(XdpCounter::SessionCreated)? == created + 1);
    }
    ensure!(lab.program.sessions(Table::Unconfirmed)?.len() == 40);
    ensure!(
        lab.program.sessions(Table::Confirmed)?.is_empty(),
        "confirmed without an answer"
    );
    Ok(())
}

#[test]
fn replies_go_back_to_the_client_from_the_address_it_sent_to() -> Result<()> {
    let lab = Lab::new()?;
    for (client, listener) in [
        (client_v4(41_000), listener_v4()),
        (client_v6(41_000), listener_v6()),
    ] {
        let (j, nat) = to_gateway(&lab, client, listener, &message(1, 148))?;
        let reply = Lab::reply(j, nat, &message(2, 92));
        let out = lab.expect(&reply, XDP_TX, XdpCounter::ToClient)?;
        let parsed = parse(&out)?;
        ensure!(parsed.from == listener && parsed.to == client, "{parsed:?}");
        ensure!(parsed.destination_mac == CLIENT_MAC && parsed.source_mac == BALANCER_MAC);
        ensure!(parsed.payload == message(2, 92));
        // Junk from the gateway is dropped, counted like the userspace path counts it.
        let junk = Lab::reply(j, nat, &message(7, 92));
        lab.expect(&junk, XDP_DROP, XdpCounter::JunkUnknownType)?;
        // A reply to a port no session holds is none of the program's business.
        let stray = Lab::reply(j, nat + 1, &message(2, 92));
        lab.expect(&stray, XDP_PASS, XdpCounter::ReplyNoSession)?;
    }
    Ok(())
}

#[test]
fn a_down_gateway_loses_its_sessions_and_a_draining_one_keeps_them() -> Result<()> {
    let mut lab = Lab::new()?;
    let clients: Vec<SocketAddr> = (42_000..42_030).map(client_v4).collect();
    let mut placed = Vec::new();
    for &client in &clients {
        placed.push(to_gateway(&lab, client, listener_v4(), &message(1, 148))?);
    }
    ensure!(placed.iter().any(|(j, _)| *j == 0) && placed.iter().any(|(j, _)| *j == 1));

    // gw1 drains, gw0 goes down.
    lab.set_v4_states(["down", "draining", "active"])?;
    for (&client, &(j, nat)) in clients.iter().zip(&placed) {
        let gone = lab.counter(XdpCounter::GatewayGone)?;
        let (now, port) = to_gateway(&lab, client, listener_v4(), &message(4, 48))?;
        match j {
            0 => {
                let expected = lab.v4.place(client).unwrap();
                ensure!(
                    gateway_addr(now) == expected.address && now == 2,
                    "{client} went to gw{now}"
                );
                ensure!(lab.counter(XdpCounter::GatewayGone)? == gone + 1);
                // The old gateway's NAT entry went with the session.
                let late = Lab::reply(0, nat, &message(4, 32));
                lab.expect(&late, XDP_PASS, XdpCounter::ReplyNoSession)?;
            }
            _ => ensure!(
                (now, port) == (j, nat),
                "{client} on gw{j} moved to gw{now}"
            ),
        }
    }
    // Newcomers avoid both.
    for port in 43_000..43_020 {
        let (j, _) = to_gateway(&lab, client_v4(port), listener_v4(), &message(1, 148))?;
        ensure!(j == 2, "a new client went to gw{j}");
    }
    // With no gateway left to place on, new clients are dropped, counted.
    lab.set_v4_states(["down", "draining", "down"])?;
    lab.expect(
        &from_client(client_v4(44_000), listener_v4(), &message(1, 148)),
        XDP_DROP,
        XdpCounter::NoGateway,
    )?;
    Ok(())
}

#[test]
fn a_peer_balancers_session_pins_its_client_until_the_session_exists() -> Result<()> {
    let mut lab = Lab::new()?;
    // gw1 drains: Maglev places nobody there, but a session a peer forwarded to it stays there.
    lab.set_v4_states(["active", "draining", "active"])?;
    let client = client_v4(45_000);
    let key = FlowKey {
        listener: 0,
        client: wglb::xdp::endpoint_of(client),
    };
    lab.program.pin(&key, 1)?;
    let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(4, 48))?;
    ensure!(j == 1, "the pinned client went to gw{j}");
    // The peer's session was confirmed there: it skips probation.
    let (table, session) = lab.program.session(&key).context("a session")?;
    ensure!(table == Table::Confirmed && session.nat_port == nat.to_be_bytes());
    ensure!(to_gateway(&lab, client, listener_v4(), &message(4, 48))? == (1, nat));
    // The pin went with its first use: once the session is gone, Maglev places the client.
    lab.program.remove_session(table, &key, &session)?;
    let (j, _) = to_gateway(&lab, client, listener_v4(), &message(4, 48))?;
    ensure!(j != 1, "the pin outlived its use");

    // A pin to a gateway that keeps no sessions is ignored.
    let other = client_v4(45_001);
    let other_key = FlowKey {
        listener: 0,
        client: wglb::xdp::endpoint_of(other),
    };
    lab.program.pin(&other_key, 1)?;
    lab.set_v4_states(["active", "down", "active"])?;
    let (j, _) = to_gateway(&lab, other, listener_v4(), &message(1, 148))?;
    ensure!(
        gateway_addr(j) == lab.v4.place(other).unwrap().address,
        "a pin to a down gateway was followed to gw{j}"
    );
    Ok(())
}

#[test]
fn clients_behind_one_address_share_its_gateway_on_ports_of_their_own() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.v4 = placement_with(listener_v4(), "source-ip", &[0, 1, 2], &["active"; 3]);
    lab.load_v4()?;
    let mut seen = std::collections::HashSet::new();
    let mut gateways = std::collections::HashSet::new();
    for port in 46_000..46_200 {
        let (j, nat) = to_gateway(&lab, client_v4(port), listener_v4(), &message(1, 148))?;
        gateways.insert(j);
        ensure!(seen.insert(nat), "NAT port {nat} given twice");
    }
    ensure!(
        gateways.len() == 1,
        "one address went to gateways {gateways:?}"
    );
    Ok(())
}

/// Frames the program must leave alone or drop, with the counter each moves.
fn unforwarded() -> Vec<(&'static str, Vec<u8>, u32, XdpCounter)> {
    use XdpCounter::*;
    let to_listener = |payload: &[u8]| from_client(client_v4(45_000), listener_v4(), payload);
    let mut reserved = message(1, 148);
    reserved[3] = 1;
    let mut lying = to_listener(&message(1, 148));
    lying[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&(8 + 148 + 100u16).to_be_bytes());
    let mut tcp = to_listener(&message(1, 148));
    tcp[14 + 9] = 6;
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let options = frame_with(
        client_v4(45_000),
        listener_v4(),
        (CLIENT_MAC, BALANCER_MAC),
        |ip| ip.options = [1u8, 1, 1, 0][..].try_into().unwrap(),
        &message(1, 148),
    );
    let fragment = frame_with(
        client_v4(45_000),
        listener_v4(),
        (CLIENT_MAC, BALANCER_MAC),
        |ip| ip.more_fragments = true,
        &message(4, 48),
    );
    vec![
        ("empty", to_listener(&[]), XDP_DROP, JunkTruncated),
        (
            "three bytes",
            to_listener(&[1, 0, 0]),
            XDP_DROP,
            JunkTruncated,
        ),
        (
            "type 0",
            to_listener(&message(0, 148)),
            XDP_DROP,
            JunkUnknownType,
        ),
        (
            "type 5",
            to_listener(&message(5, 148)),
            XDP_DROP,
            JunkUnknownType,
        ),
        (
            "reserved byte set",
            to_listener(&reserved),
            XDP_DROP,
            JunkReservedNotZero,
        ),
        (
            "short initiation",
            to_listener(&message(1, 147)),
            XDP_DROP,
            JunkBadLength,
        ),
        (
            "long response",
            to_listener(&message(2, 93)),
            XDP_DROP,
            JunkBadLength,
        ),
        (
            "short data",
            to_listener(&message(4, 31)),
            XDP_DROP,
            JunkBadLength,
        ),
        (
            "IPv6 junk",
            from_client(client_v6(45_000), listener_v6(), &message(9, 20)),
            XDP_DROP,
            JunkUnknownType,
        ),
        ("UDP length beyond the frame", lying, XDP_DROP, Malformed),
        (
            "other port",
            from_client(
                client_v4(45_000),
                SocketAddr::from(([10, 201, 0, 1], PORT + 1)),
                &message(1, 148),
            ),
            XDP_PASS,
            NotListener,
        ),
        (
            "a listener's port on an address of none",
            from_client(
                client_v4(45_000),
                SocketAddr::from(([10, 201, 0, 9], PORT)),
                &message(1, 148),
            ),
            XDP_PASS,
            NotListener,
        ),
        ("IPv4 options", options, XDP_PASS, IpOptions),
        ("IPv4 first fragment", fragment, XDP_PASS, Fragment),
        (
            "IPv6 fragment",
            ipv6_fragment(&message(1, 148)),
            XDP_PASS,
            Fragment,
        ),
        ("TCP", tcp, XDP_PASS, NotUdp),
        ("ARP", arp, XDP_PASS, NotIp),
    ]
}

/// An IPv6 datagram whose UDP header follows a fragment header (first fragment, more to come).
fn ipv6_fragment(payload: &[u8]) -> Vec<u8> {
    let mut frame = from_client(client_v6(45_000), listener_v6(), payload);
    let header = Ipv6Header::from_slice(&frame[14..]).unwrap().0;
    frame[14 + 6] = 44;
    frame[14 + 4..14 + 6].copy_from_slice(&(header.payload_length + 8).to_be_bytes());
    // Next header UDP, reserved, offset 0 with the more-fragments bit, identification.
    frame.splice(14 + 40..14 + 40, [17, 0, 0, 1, 0, 0, 0, 42]);
    frame
}

#[test]
fn junk_is_dropped_and_what_the_program_does_not_handle_goes_to_the_kernel_unchanged() -> Result<()>
{
    let lab = Lab::new()?;
    for (name, frame, verdict, counter) in unforwarded() {
        let out = lab.expect(&frame, verdict, counter).with_context(|| name)?;
        ensure!(out == frame, "{name}: the packet changed");
        // Parity: where both paths apply the WireGuard shape check, they agree on the kind.
        if let Ok(headers) = PacketHeaders::from_ethernet_slice(&frame) {
            let kinds = [
                XdpCounter::JunkTruncated,
                XdpCounter::JunkUnknownType,
                XdpCounter::JunkReservedNotZero,
                XdpCounter::JunkBadLength,
            ];
            if kinds.contains(&counter) {
                let junk = classify(headers.payload.slice()).expect_err(name);
                ensure!(
                    XdpCounter::junk(junk) == counter,
                    "{name}: userspace says {junk:?}"
                );
            }
        }
    }
    for table in [Table::Confirmed, Table::Unconfirmed] {
        ensure!(
            lab.program.sessions(table)?.is_empty(),
            "junk opened a session"
        );
    }
    Ok(())
}

#[test]
fn the_verifier_takes_the_largest_tables() -> Result<()> {
    require_root()?;
    // A million sessions and 64 listeners of 65537 Maglev slots.
    XdpProgram::load(Limits {
        sessions: 1 << 20,
        probation: 1 << 16,
        maglev_slots: 64 * MAGLEV,
    })?;
    Ok(())
}

#[test]
fn a_gateway_without_a_known_next_hop_is_left_to_userspace_and_traffic_is_counted_per_gateway(
) -> Result<()> {
    let mut lab = Lab::new()?;
    let client = client_v4(40_500);
    let j = index_of(&lab.v4.place(client).unwrap().name);
    let initiation = from_client(client, listener_v4(), &message(1, 148));
    // Keeps its sessions, but userspace does not know its next hop's MAC yet.
    let mut gateway = Gateway {
        endpoint: wglb::xdp::endpoint_of(gateway_addr(j)),
        source: wglb::xdp::endpoint_of(SocketAddr::new(source_of(j), 0)).addr,
        next_hop_mac: [0; 6],
        local_mac: BALANCER_MAC,
        ifindex: LOOPBACK,
        flags: GATEWAY_KEEPS,
    };
    lab.program.set_gateway(j, gateway)?;
    let out = lab.expect(&initiation, XDP_PASS, XdpCounter::NextHopUnknown)?;
    ensure!(out == initiation, "a passed frame was changed");
    ensure!(lab.session(client).is_none(), "a session was opened");

    gateway.next_hop_mac = gateway_mac(j);
    gateway.flags |= GATEWAY_READY;
    lab.program.set_gateway(j, gateway)?;
    let before = lab.program.traffic(j)?;
    let (to, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
    ensure!(to == j);
    to_gateway(&lab, client, listener_v4(), &message(4, 32 + 16 * 4))?;
    let response = Lab::reply(j, nat, &message(2, 92));
    lab.expect(&response, XDP_TX, XdpCounter::ToClient)?;
    let after = lab.program.traffic(j)?;
    ensure!(after.packets_to_gateway == before.packets_to_gateway + 2);
    ensure!(after.bytes_to_gateway == before.bytes_to_gateway + 148 + 96);
    ensure!(after.initiations == before.initiations + 1);
    ensure!(after.sessions_created == before.sessions_created + 1);
    ensure!(after.packets_to_client == before.packets_to_client + 1);
    ensure!(after.bytes_to_client == before.bytes_to_client + 92);
    ensure!(after.responses == before.responses + 1);
    // Counted in the listener's rows: from its clients, and from its gateways.
    let counters = lab.program.counters(2)?;
    ensure!(counters.get(Some(0), false, XdpCounter::NextHopUnknown) == 1);
    ensure!(counters.get(Some(0), false, XdpCounter::ToGateway) == 2);
    ensure!(counters.get(Some(0), true, XdpCounter::ToClient) == 1);
    ensure!(counters.get(Some(1), false, XdpCounter::ToGateway) == 0);
    Ok(())
}

#[test]
fn a_session_is_confirmed_by_its_gateways_answer_and_not_by_a_cookie() -> Result<()> {
    let lab = Lab::new()?;
    let client = client_v4(47_000);
    let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
    ensure!(matches!(lab.session(client), Some((Table::Unconfirmed, _))));
    // A gateway under load answers any initiation with a valid mac1 with a cookie: no proof.
    lab.expect(
        &Lab::reply(j, nat, &message(3, 64)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(matches!(lab.session(client), Some((Table::Unconfirmed, _))));
    let confirmed = lab.counter(XdpCounter::SessionConfirmed)?;
    lab.expect(
        &Lab::reply(j, nat, &message(2, 92)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    let (table, session) = lab.session(client).context("the session")?;
    ensure!(table == Table::Confirmed && session.nat_port == nat.to_be_bytes());
    ensure!(lab.counter(XdpCounter::SessionConfirmed)? == confirmed + 1);
    // Data from the gateway confirms too.
    let other = client_v4(47_001);
    let (j, nat) = to_gateway(&lab, other, listener_v4(), &message(4, 48))?;
    lab.expect(
        &Lab::reply(j, nat, &message(4, 48)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(matches!(lab.session(other), Some((Table::Confirmed, _))));
    ensure!(to_gateway(&lab, other, listener_v4(), &message(4, 48))? == (j, nat));
    Ok(())
}

/// Passive health's raw material, kept by the program: an initiation starts a wait that a retry
/// does not restart, a response or cookie reply ends it and counts its round trip in the
/// gateway's histogram buckets; data ends nothing.
#[test]
fn the_program_times_handshakes_and_keeps_unanswered_waits() -> Result<()> {
    let lab = Lab::new()?;
    let client = client_v4(47_500);
    let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
    let waiting = |lab: &Lab| -> Result<HandshakeWait> {
        Ok(lab.session(client).context("the session")?.1.handshake)
    };
    let first = waiting(&lab)?;
    ensure!(first.waiting_since_ns != 0 && first.initiated_ns == first.waiting_since_ns);
    std::thread::sleep(Duration::from_millis(5));
    ensure!(to_gateway(&lab, client, listener_v4(), &message(1, 148))? == (j, nat));
    let retried = waiting(&lab)?;
    ensure!(
        retried.waiting_since_ns == first.waiting_since_ns
            && retried.initiated_ns > first.initiated_ns,
        "a retry restarted the wait: {first:?} -> {retried:?}"
    );
    let rtt_counted =
        |lab: &Lab| -> Result<u64> { Ok(lab.program.traffic(j)?.rtt_buckets.iter().sum()) };
    let before = rtt_counted(&lab)?;
    lab.expect(
        &Lab::reply(j, nat, &message(4, 48)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(
        waiting(&lab)?.waiting_since_ns != 0,
        "data answered an initiation"
    );
    lab.expect(
        &Lab::reply(j, nat, &message(3, 64)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(
        waiting(&lab)?.waiting_since_ns == 0,
        "a cookie reply is an answer"
    );
    ensure!(rtt_counted(&lab)? == before + 1);
    // A response with nothing asked times nothing.
    lab.expect(
        &Lab::reply(j, nat, &message(2, 92)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(rtt_counted(&lab)? == before + 1);
    Ok(())
}

/// An initiation whose mac1 is right, by an independent BLAKE2s (RustCrypto's).
fn signed_initiation(public_key: &[u8; 32], sender: u32) -> Vec<u8> {
    use blake2::digest::{FixedOutput, KeyInit, Update};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    let mut initiation = message(1, 148);
    initiation[4..8].copy_from_slice(&sender.to_le_bytes());
    let key = Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(public_key)
        .finalize();
    let mut mac = Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key).unwrap();
    mac.update(&initiation[..116]);
    let mac1: [u8; 16] = mac.finalize_fixed().into();
    initiation[116..132].copy_from_slice(&mac1);
    initiation
}

/// A listener given the location's public key drops initiations whose mac1 is wrong (before
/// they open a session), forwards the ones that are right, and checks nothing else; a listener
/// without a key forwards any shaped initiation.
#[test]
fn initiations_are_checked_for_mac1_where_the_listener_has_the_key() -> Result<()> {
    let mut lab = Lab::new()?;
    let public_key = [7u8; 32];
    lab.program.set_mac1(0, Mac1Key::new(&public_key))?;
    let client = client_v4(47_700);
    let mut forged = signed_initiation(&public_key, 1);
    forged[120] ^= 0x40;
    lab.expect(
        &from_client(client, listener_v4(), &forged),
        XDP_DROP,
        XdpCounter::BadMac1,
    )?;
    ensure!(
        lab.session(client).is_none(),
        "a forged initiation opened a session"
    );
    let other_key = signed_initiation(&[8u8; 32], 1);
    lab.expect(
        &from_client(client, listener_v4(), &other_key),
        XDP_DROP,
        XdpCounter::BadMac1,
    )?;
    let (j, nat) = to_gateway(
        &lab,
        client,
        listener_v4(),
        &signed_initiation(&public_key, 2),
    )?;
    // Data is not what mac1 covers.
    ensure!(to_gateway(&lab, client, listener_v4(), &message(4, 48))? == (j, nat));
    // The IPv6 listener has no key.
    to_gateway(&lab, client_v6(47_700), listener_v6(), &forged)?;
    // And the key can be taken away again.
    lab.program.set_mac1(0, Mac1Key::default())?;
    to_gateway(&lab, client_v4(47_701), listener_v4(), &forged)?;
    Ok(())
}

/// ICMP port unreachable from a gateway about a session's datagram, quoting it as the kernel does.
fn port_unreachable(j: u32, nat: u16) -> Vec<u8> {
    let ours = SocketAddr::new(source_of(j), nat);
    let sent = frame(
        ours,
        gateway_addr(j),
        (BALANCER_MAC, gateway_mac(j)),
        &message(4, 32),
    );
    let (IpAddr::V4(from), IpAddr::V4(to)) = (gateway_addr(j).ip(), ours.ip()) else {
        panic!("an IPv4 gateway");
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(gateway_mac(j), BALANCER_MAC)
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, &sent[14..14 + 28])
        .unwrap();
    out
}

/// A gateway's ICMP port unreachable about a session's datagram makes its client wait (passive
/// health) and is counted for the gateway; the packet itself goes on to the kernel.
#[test]
fn a_port_unreachable_from_a_gateway_counts_against_it() -> Result<()> {
    let lab = Lab::new()?;
    let client = client_v4(47_800);
    let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(4, 48))?;
    ensure!(
        lab.session(client)
            .context("the session")?
            .1
            .handshake
            .waiting_since_ns
            == 0
    );
    let outcome = lab.program.run(&port_unreachable(j, nat))?;
    ensure!(outcome.verdict == XDP_PASS, "verdict {}", outcome.verdict);
    let wait = lab.session(client).context("the session")?.1.handshake;
    ensure!(
        wait.waiting_since_ns != 0 && wait.initiated_ns == 0,
        "{wait:?}"
    );
    ensure!(lab.program.traffic(j)?.unreachable == 1);
    // About a port no session holds: nothing.
    lab.program.run(&port_unreachable(j, nat + 1))?;
    ensure!(lab.program.traffic(j)?.unreachable == 1);
    Ok(())
}

/// A message of `kind` carrying `index` at `offset` (a sender or receiver index).
fn with_index(kind: u8, len: usize, offset: usize, index: u32) -> Vec<u8> {
    let mut payload = message(kind, len);
    payload[offset..offset + 4].copy_from_slice(&index.to_le_bytes());
    payload
}

/// A client whose NAT mapping changes keeps its gateway: the gateway's index, learned from its
/// handshake response, routes the new tuple to it on a NAT port of its own; a forged message
/// carrying the same index gets a session nobody answers and costs the client nothing; once the
/// gateway answers on the new tuple's port, the old tuple's session is retired and what still
/// comes from it is dropped. An index a second gateway also chose routes nothing.
#[test]
fn a_rebound_client_follows_its_receiver_index_and_only_the_gateway_moves_its_replies() -> Result<()>
{
    const INDEX: u32 = 0x5eed_0001;
    let lab = Lab::new()?;
    let old = client_v4(48_000);
    let (j, old_nat) = to_gateway(&lab, old, listener_v4(), &message(1, 148))?;
    lab.expect(
        &Lab::reply(j, old_nat, &with_index(2, 92, 4, INDEX)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    // The session holds the index, to announce it to sync peers.
    ensure!(
        matches!(lab.session(old), Some((Table::Confirmed, s)) if s.indexed != 0 && s.index == INDEX)
    );

    // The same client behind a new mapping, and a forger who guessed the index: both go to gw j,
    // each from a NAT port of its own, unconfirmed.
    let data = with_index(4, 48, 4, INDEX);
    let (new, forger) = (client_v4(48_001), client_v4(48_002));
    let (to_new, new_nat) = to_gateway(&lab, new, listener_v4(), &data)?;
    let (to_forger, forger_nat) = to_gateway(&lab, forger, listener_v4(), &data)?;
    ensure!(
        to_new == j && to_forger == j,
        "gw{to_new} and gw{to_forger}, not gw{j}"
    );
    ensure!(new_nat != old_nat && forger_nat != old_nat && new_nat != forger_nat);
    ensure!(matches!(lab.session(new), Some((Table::Unconfirmed, s)) if s.rebinding != 0));
    // The old tuple keeps its session and its replies meanwhile.
    ensure!(to_gateway(&lab, old, listener_v4(), &data)? == (j, old_nat));
    lab.expect(
        &Lab::reply(j, old_nat, &message(4, 48)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;

    // The gateway authenticated the new tuple's data and answers there: the old one retires.
    lab.expect(
        &Lab::reply(j, new_nat, &message(4, 48)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(
        matches!(lab.session(new), Some((Table::Confirmed, s)) if s.indexed != 0 && s.index == INDEX)
    );
    ensure!(
        lab.session(old).is_none(),
        "the old tuple's session was not retired"
    );
    ensure!(lab.counter(XdpCounter::Rebound)? == 1);
    lab.expect(
        &from_client(old, listener_v4(), &data),
        XDP_DROP,
        XdpCounter::RetiredTuple,
    )?;
    ensure!(to_gateway(&lab, new, listener_v4(), &data)? == (j, new_nat));
    // The forger's session is still unconfirmed, and retired nothing.
    ensure!(matches!(lab.session(forger), Some((Table::Unconfirmed, _))));

    // Another gateway chooses the same index for another client: it routes nothing now.
    let other = (0..200)
        .map(|p| client_v4(48_100 + p))
        .find(|c| lab.placed(*c) != j)
        .context("a client placed on another gateway")?;
    let (k, other_nat) = to_gateway(&lab, other, listener_v4(), &message(1, 148))?;
    lab.expect(
        &Lab::reply(k, other_nat, &with_index(2, 92, 4, INDEX)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(lab.counter(XdpCounter::IndexCollision)? == 1);
    ensure!(
        matches!(lab.session(other), Some((_, s)) if s.indexed == 0),
        "a collided index is nobody's to announce"
    );
    let stray = (0..200)
        .map(|p| client_v4(48_400 + p))
        .find(|c| lab.placed(*c) != j)
        .context("a client placed on neither")?;
    let (placed, _) = to_gateway(&lab, stray, listener_v4(), &data)?;
    ensure!(
        placed == lab.placed(stray),
        "a collided index routed a new tuple"
    );
    Ok(())
}

/// A tuple whose own session left the program's table (pushed out, or relayed by userspace until
/// the program served its address: the fast path adopts the indices userspace learned) goes back
/// to the gateway its index names, not where Maglev would place it now, and its new session
/// holds the index. A collided index routes nothing.
#[test]
fn a_tuple_whose_session_left_the_table_goes_back_to_its_indexs_gateway() -> Result<()> {
    const INDEX: u32 = 0x0dd5_0001;
    let mut lab = Lab::new()?;
    let coarse_now = || -> Result<u64> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)?;
        Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
    };
    let adopt = |lab: &mut Lab, client: SocketAddr, index: u32, gateway: u32, collided: u32| {
        let entry = IndexEntry {
            client: FlowKey {
                listener: 0,
                client: wglb::xdp::endpoint_of(client),
            },
            gateway,
            collided,
            learned_ns: coarse_now()?,
        };
        lab.program
            .set_index(&IndexKey { listener: 0, index }, &entry)
    };
    let client = client_v4(48_700);
    let k = (0..3)
        .find(|&k| k != lab.placed(client))
        .context("another gateway")?;
    adopt(&mut lab, client, INDEX, k, 0)?;
    let (j, nat) = to_gateway(&lab, client, listener_v4(), &with_index(4, 48, 4, INDEX))?;
    ensure!(j == k, "placed on gw{j}, not on its index's gw{k}");
    ensure!(
        matches!(lab.session(client), Some((Table::Unconfirmed, s)) if s.indexed != 0 && s.index == INDEX && s.rebinding == 0),
        "{:?}",
        lab.session(client)
    );
    lab.expect(
        &Lab::reply(k, nat, &message(4, 48)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(matches!(lab.session(client), Some((Table::Confirmed, _))));
    ensure!(
        lab.counter(XdpCounter::Rebound)? == 0,
        "its own tuple is no rebinding"
    );

    let other = client_v4(48_701);
    let k = (0..3)
        .find(|&k| k != lab.placed(other))
        .context("another gateway")?;
    adopt(&mut lab, other, INDEX + 1, k, 1)?;
    let (j, _) = to_gateway(&lab, other, listener_v4(), &with_index(4, 48, 4, INDEX + 1))?;
    ensure!(j == lab.placed(other), "a collided index routed gw{j}");
    ensure!(matches!(lab.session(other), Some((_, s)) if s.indexed == 0));
    Ok(())
}

#[test]
fn a_flood_of_new_sessions_churns_probation_and_never_pushes_out_a_confirmed_one() -> Result<()> {
    const PROBATION: u32 = 64;
    let lab = Lab::with(PROBATION, OPEN)?;
    let mut confirmed = Vec::new();
    for port in 48_000..48_010 {
        let client = client_v4(port);
        let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
        lab.expect(
            &Lab::reply(j, nat, &message(2, 92)),
            XDP_TX,
            XdpCounter::ToClient,
        )?;
        confirmed.push((client, j, nat));
    }
    // Shaped transport messages from 2,000 spoofed sources: each opens an unconfirmed session.
    for i in 0..2000u32 {
        let spoofed = SocketAddr::from((
            [10, 210, (i / 200) as u8, (i % 200) as u8 + 1],
            1024 + i as u16,
        ));
        lab.expect(
            &from_client(spoofed, listener_v4(), &message(4, 32)),
            XDP_TX,
            XdpCounter::ToGateway,
        )?;
    }
    let unconfirmed = lab.program.sessions(Table::Unconfirmed)?.len();
    ensure!(
        unconfirmed <= PROBATION as usize,
        "{unconfirmed} unconfirmed sessions, beyond the probation bound"
    );
    ensure!(lab.program.sessions(Table::Confirmed)?.len() == confirmed.len());
    for (client, j, nat) in confirmed {
        ensure!(
            to_gateway(&lab, client, listener_v4(), &message(4, 48))? == (j, nat),
            "{client} lost its session"
        );
        let out = lab.expect(
            &Lab::reply(j, nat, &message(4, 48)),
            XDP_TX,
            XdpCounter::ToClient,
        )?;
        ensure!(parse(&out)?.to == client, "{client}'s reply went elsewhere");
    }
    Ok(())
}

#[test]
fn a_source_gets_its_rate_and_its_cap_of_unconfirmed_sessions() -> Result<()> {
    let lab = Lab::with(
        4096,
        AdmissionLimits {
            rate: 1,
            burst: 5,
            unconfirmed: 3,
            pad: 0,
        },
    )?;
    let mut opened = Vec::new();
    for port in 49_000..49_003 {
        opened.push(to_gateway(
            &lab,
            client_v4(port),
            listener_v4(),
            &message(1, 148),
        )?);
    }
    let refused = from_client(client_v4(49_003), listener_v4(), &message(1, 148));
    lab.expect(&refused, XDP_DROP, XdpCounter::SourceUnconfirmed)?;
    ensure!(lab.session(client_v4(49_003)).is_none());
    // Another address has a budget of its own.
    to_gateway(&lab, client_v6(49_003), listener_v6(), &message(1, 148))?;
    // One is confirmed: room for one more unconfirmed session, and the fourth token.
    let (j, nat) = opened[0];
    lab.expect(
        &Lab::reply(j, nat, &message(2, 92)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    to_gateway(&lab, client_v4(49_003), listener_v4(), &message(1, 148))?;
    lab.expect(
        &from_client(client_v4(49_004), listener_v4(), &message(1, 148)),
        XDP_DROP,
        XdpCounter::SourceUnconfirmed,
    )?;
    // Confirm two more: the cap has room, but the burst of five is spent.
    for &(j, nat) in &opened[1..] {
        lab.expect(
            &Lab::reply(j, nat, &message(4, 32)),
            XDP_TX,
            XdpCounter::ToClient,
        )?;
    }
    to_gateway(&lab, client_v4(49_004), listener_v4(), &message(1, 148))?;
    lab.expect(
        &from_client(client_v4(49_005), listener_v4(), &message(1, 148)),
        XDP_DROP,
        XdpCounter::SourceRate,
    )?;
    // Sessions that exist are never refused.
    ensure!(to_gateway(&lab, client_v4(49_000), listener_v4(), &message(4, 48))? == opened[0]);
    Ok(())
}

#[test]
fn a_nat_port_belongs_to_one_session_and_only_its_owner_frees_it() -> Result<()> {
    // gw0 alone, with 8 NAT ports.
    let mut lab = Lab::new()?;
    lab.program.set_nat_ports(NAT_FIRST, 8)?;
    lab.set_v4_states(["active", "down", "down"])?;
    let mut live = Vec::new();
    for port in 50_000..50_008 {
        let client = client_v4(port);
        let (_, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
        live.push((client, nat));
    }
    let mut ports: Vec<u16> = live.iter().map(|(_, nat)| *nat).collect();
    ports.sort();
    ports.dedup();
    ensure!(ports.len() == 8, "ports given twice: {ports:?}");
    // Every port is held by a live session: a ninth client is refused one, not given one.
    lab.expect(
        &from_client(client_v4(50_008), listener_v4(), &message(1, 148)),
        XDP_DROP,
        XdpCounter::NatPortsExhausted,
    )?;
    // Removing a session with a stale idea of its port frees only the session's own port.
    let (victim, victim_port) = live[0];
    let (table, mut stale) = lab.session(victim).context("a session")?;
    stale.nat_port = live[1].1.to_be_bytes();
    let key = FlowKey {
        listener: 0,
        client: wglb::xdp::endpoint_of(victim),
    };
    lab.program.remove_session(table, &key, &stale)?;
    let out = lab.expect(
        &Lab::reply(0, live[1].1, &message(4, 32)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(
        parse(&out)?.to == live[1].0,
        "another session's port was freed"
    );
    let entry = wglb_common::xdp::NatKey {
        gateway: 0,
        nat_port: victim_port.to_be_bytes(),
        pad: [0; 2],
    };
    ensure!(
        lab.program.nat_owner(&entry) == Some(key),
        "a removal that was not the owner's touched the port"
    );
    Ok(())
}

#[test]
fn a_port_left_behind_by_a_session_pushed_out_of_probation_is_taken_over() -> Result<()> {
    // Probation holds 4 sessions; gw0 has 8 NAT ports.
    let mut lab = Lab::with(4, OPEN)?;
    lab.program.set_nat_ports(NAT_FIRST, 8)?;
    lab.set_v4_states(["active", "down", "down"])?;
    let mut confirmed = Vec::new();
    for port in 50_100..50_102 {
        let client = client_v4(port);
        let (_, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
        lab.expect(
            &Lab::reply(0, nat, &message(2, 92)),
            XDP_TX,
            XdpCounter::ToClient,
        )?;
        confirmed.push((client, nat));
    }
    // Six unconfirmed sessions in a probation of four: some are pushed out (which, the kernel's
    // LRU decides), and their ports stay behind until someone takes them over. Every port has
    // an entry now.
    let mut unconfirmed = Vec::new();
    for port in 50_200..50_206 {
        let client = client_v4(port);
        unconfirmed.push((
            client,
            to_gateway(&lab, client, listener_v4(), &message(1, 148))?.1,
        ));
    }
    let pushed_out: Vec<u16> = unconfirmed
        .iter()
        .filter(|(client, _)| lab.session(*client).is_none())
        .map(|(_, port)| *port)
        .collect();
    ensure!(!pushed_out.is_empty(), "probation outgrew its bound");
    // A new client takes over a port of a session pushed out: never a live session's.
    let reclaimed = lab.counter(XdpCounter::NatReclaimed)?;
    let newcomer = client_v4(50_300);
    let (_, nat) = to_gateway(&lab, newcomer, listener_v4(), &message(1, 148))?;
    ensure!(lab.counter(XdpCounter::NatReclaimed)? == reclaimed + 1);
    ensure!(
        pushed_out.contains(&nat),
        "port {nat} was not one left behind ({pushed_out:?})"
    );
    // Its replies reach the new client, not the one pushed out; the others keep theirs.
    let out = lab.expect(
        &Lab::reply(0, nat, &message(4, 32)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(parse(&out)?.to == newcomer);
    let live = confirmed
        .iter()
        .chain(&unconfirmed)
        .filter(|(client, _)| lab.session(*client).is_some());
    for (client, port) in live {
        let out = lab.expect(
            &Lab::reply(0, *port, &message(4, 32)),
            XDP_TX,
            XdpCounter::ToClient,
        )?;
        ensure!(parse(&out)?.to == *client, "{client}'s port changed hands");
    }
    Ok(())
}

#[test]
fn replies_follow_the_clients_latest_path_and_only_our_address_is_rewritten() -> Result<()> {
    let lab = Lab::new()?;
    let client = client_v4(51_000);
    let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148))?;
    // The client's router failed over: its packets come from another MAC now.
    let new_mac = [0x02, 0, 0, 0, 0, 0x77];
    let moved = frame(
        client,
        listener_v4(),
        (new_mac, BALANCER_MAC),
        &message(4, 48),
    );
    let changed = lab.counter(XdpCounter::ClientPathChanged)?;
    lab.expect(&moved, XDP_TX, XdpCounter::ToGateway)?;
    ensure!(lab.counter(XdpCounter::ClientPathChanged)? == changed + 1);
    let out = lab.expect(
        &Lab::reply(j, nat, &message(2, 92)),
        XDP_TX,
        XdpCounter::ToClient,
    )?;
    ensure!(
        parse(&out)?.destination_mac == new_mac,
        "the reply went to the old router"
    );
    // Unchanged paths are not written again.
    lab.expect(&moved, XDP_TX, XdpCounter::ToGateway)?;
    ensure!(lab.counter(XdpCounter::ClientPathChanged)? == changed + 1);
    // The gateway's datagram to the same port of another address is not ours to rewrite.
    let elsewhere = frame(
        gateway_addr(j),
        SocketAddr::from(([10, 202, j as u8, 99], nat)),
        (gateway_mac(j), BALANCER_MAC),
        &message(4, 48),
    );
    let out = lab.expect(&elsewhere, XDP_PASS, XdpCounter::ReplyOtherDestination)?;
    ensure!(out == elsewhere, "a passed reply was changed");
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Random datagrams to the listener, WireGuard-shaped or nearly: the program's verdict is the
    /// userspace datapath's decision for the same bytes. Junk is dropped under the kind the
    /// shape check gives it; WireGuard goes to the gateway `Placement::place` picks, intact.
    #[test]
    fn the_program_decides_as_userspace_does(
        port in 1024u16..65535,
        kind in 0u8..6,
        reserved in proptest::prop_oneof![3 => proptest::strategy::Just([0u8; 3]), 1 => proptest::array::uniform3(proptest::num::u8::ANY)],
        len in proptest::prop_oneof![
            proptest::strategy::Just(148usize),
            proptest::strategy::Just(92),
            proptest::strategy::Just(64),
            32usize..200,
            0usize..8,
        ],
    ) {
        let fail = |e: anyhow::Error| proptest::test_runner::TestCaseError::fail(format!("{e:#}"));
        let lab = LAB.with(|lab| lab.clone());
        let lab = match &*lab {
            Ok(lab) => lab,
            Err(e) => return Err(fail(anyhow::anyhow!("{e:#}"))),
        };
        let mut payload = message(kind, len);
        for (byte, value) in payload.iter_mut().skip(1).take(3).zip(reserved) {
            *byte = value;
        }
        let client = client_v4(port);
        let frame = from_client(client, listener_v4(), &payload);
        let outcome = lab.program.run(&frame).map_err(fail)?;
        match classify(&payload) {
            Err(junk) => {
                proptest::prop_assert_eq!(outcome.verdict, XDP_DROP, "{:?} was not dropped", junk);
                proptest::prop_assert_eq!(&outcome.packet, &frame);
            }
            Ok(_) => {
                proptest::prop_assert_eq!(outcome.verdict, XDP_TX);
                let parsed = parse(&outcome.packet).map_err(fail)?;
                proptest::prop_assert_eq!(parsed.to, lab.v4.place(client).unwrap().address);
                proptest::prop_assert_eq!(parsed.payload, payload);
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Receiver-index routing decided alike: gateways choose indices for their clients (some of
    /// them the same index, so that some collide), then a new tuple, or the first client once its
    /// session left the table, sends data carrying one of them. The program and the userspace
    /// datapath's index table, told the same handshakes, send it to the same gateway (the
    /// index's, or Maglev's when the index routes nothing).
    #[test]
    fn the_program_routes_rebound_tuples_as_userspace_does(
        learned in proptest::collection::vec((0u16..6, 0u32..3), 1..6),
        probe_index in 0u32..4,
        probe_returning in proptest::bool::ANY,
    ) {
        let fail = |e: anyhow::Error| proptest::test_runner::TestCaseError::fail(format!("{e:#}"));
        let mut lab = Lab::new().map_err(fail)?;
        let mut indices = Indices::new(std::num::NonZeroUsize::new(64).unwrap());
        let counters = wglb::metrics::Metrics::new().listener("test");
        let id_of = |j: u32| {
            let name = format!("gw{j}");
            let view = lab.v4.gateways().iter().find(|g| g.name == name).unwrap();
            (view.id, view.address)
        };
        let mut clients = std::collections::HashMap::new();
        let returning = client_v4(49_000 + learned[0].0);
        for (port, index) in learned {
            let client = client_v4(49_000 + port);
            let (j, nat) = to_gateway(&lab, client, listener_v4(), &message(1, 148)).map_err(fail)?;
            lab.expect(&Lab::reply(j, nat, &with_index(2, 92, 4, 0x7000 + index)), XDP_TX, XdpCounter::ToClient)
                .map_err(fail)?;
            let (gateway, address) = id_of(j);
            let now = wglb::session::now_ns();
            indices.learn(Learned { index: 0x7000 + index, client, gateway, address }, now, now, &counters);
            clients.insert(client, gateway);
        }
        let probe = if probe_returning {
            let key = FlowKey { listener: 0, client: wglb::xdp::endpoint_of(returning) };
            let (table, session) = lab.program.session(&key).context("its session").map_err(fail)?;
            lab.program.remove_session(table, &key, &session).map_err(fail)?;
            clients.remove(&returning);
            returning
        } else {
            client_v4(49_500)
        };
        let data = with_index(4, 48, 4, 0x7000 + probe_index);
        let alive = |old: SocketAddr, gateway| clients.get(&old) == Some(&gateway);
        let expected = match indices.route(probe, &data, &lab.v4, wglb::session::now_ns(), alive) {
            Some(routed) => routed.address,
            None => lab.v4.place(probe).unwrap().address,
        };
        let (j, _) = to_gateway(&lab, probe, listener_v4(), &data).map_err(fail)?;
        proptest::prop_assert_eq!(gateway_addr(j), expected);
    }
}

thread_local! {
    /// One program for every case of the property test: loading one costs far more than a run.
    static LAB: std::rc::Rc<Result<Lab>> = std::rc::Rc::new(Lab::new());
}
