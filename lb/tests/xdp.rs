//! The XDP program, loaded through this kernel's verifier and run on packet fixtures with
//! BPF_PROG_TEST_RUN: for each fixture the verdict, the counter it moves, and the bytes it
//! leaves. Fixtures are built by etherparse, an independent packet library, and the verdicts are
//! checked against the userspace datapath's own shape check (parity). Needs root (CAP_BPF), like
//! the namespace tests; fails without it.

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder};
use wglb::xdp::{XdpProgram, XDP_DROP, XDP_PASS};
use wglb_common::wireguard::classify;
use wglb_common::xdp::XdpCounter;
use wglb_lab::require_root;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BALANCER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const LISTENER_V4: [u8; 4] = [10, 201, 0, 1];
const LISTENER_V6: [u8; 16] = [0xfd, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT_V4: [u8; 4] = [10, 201, 0, 2];
const CLIENT_V6: [u8; 16] = [0xfd, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const PORT: u16 = 51820;

fn message(kind: u8, len: usize) -> Vec<u8> {
    let mut payload = vec![0u8; len];
    if let Some(first) = payload.first_mut() {
        *first = kind;
    }
    payload
}

fn ipv4_with(tweak: impl FnOnce(&mut Ipv4Header), port: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, CLIENT_V4, LISTENER_V4).unwrap();
    tweak(&mut ip);
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(40_000, port);
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

fn ipv4(port: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_with(|_| {}, port, payload)
}

fn ipv6(payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC)
        .ipv6(CLIENT_V6, LISTENER_V6, 64)
        .udp(40_000, PORT);
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// An IPv6 datagram whose UDP header follows a fragment header (first fragment, more to come).
fn ipv6_fragment(payload: &[u8]) -> Vec<u8> {
    let mut frame = ipv6(payload);
    let header = Ipv6Header::from_slice(&frame[14..]).unwrap().0;
    frame[14 + 6] = 44;
    let length = header.payload_length + 8;
    frame[14 + 4..14 + 6].copy_from_slice(&length.to_be_bytes());
    // Next header UDP, reserved, offset 0 with the more-fragments bit, identification.
    let fragment = [17, 0, 0, 1, 0, 0, 0, 42];
    frame.splice(14 + 40..14 + 40, fragment);
    frame
}

struct Fixture {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    counter: XdpCounter,
}

fn fixture(name: &'static str, frame: Vec<u8>, verdict: u32, counter: XdpCounter) -> Fixture {
    Fixture {
        name,
        frame,
        verdict,
        counter,
    }
}

fn fixtures() -> Vec<Fixture> {
    use XdpCounter::*;
    let mut all = vec![
        fixture(
            "handshake initiation",
            ipv4(PORT, &message(1, 148)),
            XDP_PASS,
            WireguardPassed,
        ),
        fixture(
            "handshake response",
            ipv4(PORT, &message(2, 92)),
            XDP_PASS,
            WireguardPassed,
        ),
        fixture(
            "cookie reply",
            ipv4(PORT, &message(3, 64)),
            XDP_PASS,
            WireguardPassed,
        ),
        fixture(
            "keepalive",
            ipv4(PORT, &message(4, 32)),
            XDP_PASS,
            WireguardPassed,
        ),
        fixture(
            "data",
            ipv4(PORT, &message(4, 32 + 16 * 80)),
            XDP_PASS,
            WireguardPassed,
        ),
        fixture(
            "IPv6 initiation",
            ipv6(&message(1, 148)),
            XDP_PASS,
            WireguardPassed,
        ),
        fixture("empty", ipv4(PORT, &[]), XDP_DROP, JunkTruncated),
        fixture(
            "three bytes",
            ipv4(PORT, &[1, 0, 0]),
            XDP_DROP,
            JunkTruncated,
        ),
        fixture(
            "type 0",
            ipv4(PORT, &message(0, 148)),
            XDP_DROP,
            JunkUnknownType,
        ),
        fixture(
            "type 5",
            ipv4(PORT, &message(5, 148)),
            XDP_DROP,
            JunkUnknownType,
        ),
        fixture(
            "short initiation",
            ipv4(PORT, &message(1, 147)),
            XDP_DROP,
            JunkBadLength,
        ),
        fixture(
            "long response",
            ipv4(PORT, &message(2, 93)),
            XDP_DROP,
            JunkBadLength,
        ),
        fixture(
            "unaligned data",
            ipv4(PORT, &message(4, 33)),
            XDP_DROP,
            JunkBadLength,
        ),
        fixture(
            "IPv6 junk",
            ipv6(&message(9, 20)),
            XDP_DROP,
            JunkUnknownType,
        ),
        fixture(
            "other port",
            ipv4(PORT + 1, &message(1, 148)),
            XDP_PASS,
            NotListener,
        ),
        fixture(
            "IPv4 options",
            ipv4_with(
                |ip| ip.options = [1u8, 1, 1, 0][..].try_into().unwrap(),
                PORT,
                &message(1, 148),
            ),
            XDP_PASS,
            IpOptions,
        ),
        fixture(
            "IPv4 first fragment",
            ipv4_with(|ip| ip.more_fragments = true, PORT, &message(4, 48)),
            XDP_PASS,
            Fragment,
        ),
        fixture(
            "IPv6 fragment",
            ipv6_fragment(&message(1, 148)),
            XDP_PASS,
            Fragment,
        ),
    ];
    let mut reserved = message(1, 148);
    reserved[3] = 1;
    all.push(fixture(
        "reserved byte set",
        ipv4(PORT, &reserved),
        XDP_DROP,
        JunkReservedNotZero,
    ));
    // A UDP length that claims more than the frame holds.
    let mut lying = ipv4(PORT, &message(1, 148));
    let claimed = (8 + 148 + 100u16).to_be_bytes();
    lying[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&claimed);
    all.push(fixture(
        "UDP length beyond the frame",
        lying,
        XDP_DROP,
        Malformed,
    ));
    let mut tcp = ipv4(PORT, &message(1, 148));
    tcp[14 + 9] = 6;
    all.push(fixture("TCP", tcp, XDP_PASS, NotUdp));
    let mut arp = vec![0u8; 42];
    arp[..6].copy_from_slice(&[0xff; 6]);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    all.push(fixture("ARP", arp, XDP_PASS, NotIp));
    all
}

fn program() -> Result<XdpProgram> {
    require_root()?;
    let mut program = XdpProgram::load()?;
    program.add_listener(SocketAddr::from((LISTENER_V4, PORT)), 0)?;
    program.add_listener(SocketAddr::from((LISTENER_V6, PORT)), 0)?;
    Ok(program)
}

fn counter(program: &XdpProgram, which: XdpCounter) -> Result<u64> {
    let counters = program.counters()?;
    Ok(counters
        .iter()
        .find(|(c, _)| *c == which)
        .context("listed")?
        .1)
}

#[test]
fn every_fixture_gets_its_verdict_and_counter_and_leaves_the_packet_as_it_was() -> Result<()> {
    let program = program()?;
    for fixture in fixtures() {
        let before = counter(&program, fixture.counter)?;
        let outcome = program.run(&fixture.frame)?;
        ensure!(
            outcome.verdict == fixture.verdict,
            "{}: verdict {} instead of {}",
            fixture.name,
            outcome.verdict,
            fixture.verdict
        );
        ensure!(
            counter(&program, fixture.counter)? == before + 1,
            "{}: {} did not count it",
            fixture.name,
            fixture.counter.as_str()
        );
        ensure!(
            outcome.packet == fixture.frame,
            "{}: the packet changed",
            fixture.name
        );
    }
    Ok(())
}

/// Whether a counter is an outcome of the WireGuard shape check (rather than of parsing).
fn shape_checked(counter: XdpCounter) -> bool {
    use XdpCounter::*;
    matches!(
        counter,
        WireguardPassed | JunkTruncated | JunkUnknownType | JunkReservedNotZero | JunkBadLength
    )
}

#[test]
fn the_program_and_the_userspace_filter_judge_payloads_alike() -> Result<()> {
    let program = program()?;
    let mut compared = 0;
    for fixture in fixtures() {
        // Only datagrams the program parses to a listener reach a shape check on both paths.
        let parsed = etherparse::SlicedPacket::from_ethernet(&fixture.frame);
        let Ok(parsed) = parsed else { continue };
        let Some(etherparse::TransportSlice::Udp(udp)) = parsed.transport else {
            continue;
        };
        if udp.destination_port() != PORT || !shape_checked(fixture.counter) {
            continue;
        }
        let verdict = program.run(&fixture.frame)?.verdict;
        let userspace = classify(udp.payload());
        ensure!(
            (verdict == XDP_PASS) == userspace.is_ok(),
            "{}: XDP says {verdict}, userspace says {userspace:?}",
            fixture.name
        );
        if let Err(junk) = userspace {
            ensure!(
                XdpCounter::junk(junk) == fixture.counter,
                "{}",
                fixture.name
            );
        }
        compared += 1;
    }
    ensure!(compared >= 14, "only {compared} fixtures compared");
    Ok(())
}
