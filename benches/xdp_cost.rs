//! The XDP program's own cost per packet, with BPF_PROG_TEST_RUN repeat runs (the kernel's clock,
//! no system call in it), beside the floor measured in the same run: a program that only parses,
//! rewrites and sends back (`ebpf/xdp/src/floor.rs`). Cases: a confirmed session's hit, a new
//! session (placement, admission, a NAT port and two map inserts), a new session refused by its
//! source's budget, junk dropped at the shape check, a handshake initiation on a session
//! without and with the mac1 check (and one the check drops), and a new tuple routed by the
//! receiver index its data carries (a NAT rebinding). Needs root.
//!
//! BPF_PROG_TEST_RUN runs every repeat on the same buffer, which the program rewrites: a hit would
//! measure the rewritten frame's path from the second run on. So the hit's frame is made a fixed
//! point of the rewrite: its gateway's address is the listener's, its client address is our
//! source address towards that gateway and the one NAT port, and the MACs are the gateway
//! entry's, so the frame the program sends is the frame it received, and every run is a hit.
//! The refusal and junk cases change nothing. New sessions are timed one run each.
//!
//! Run: `sudo cargo bench -p wglb-benches --bench xdp_cost`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context};
use aya::maps::HashMap;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use wglb::config::Config;
use wglb::control::initial_placement;
use wglb::xdp::{endpoint_of, Limits, Table, XdpProgram, XDP_DROP, XDP_TX};
use wglb_common::mac1::{Blake2sWork, Mac1Key, INITIATION_LEN, MAC1_OFFSET};
use wglb_common::xdp::{
    Endpoint, FlowKey, Gateway, ListenerInfo, Session, GATEWAY_KEEPS, GATEWAY_READY,
};

const REPEAT: u32 = 1_000_000;
const MISSES: u16 = 20_000;
const LISTENER: [u8; 4] = [10, 201, 0, 1];
/// Our address towards the loop gateway, and with the one NAT port, the hit's client.
const SOURCE: [u8; 4] = [10, 201, 0, 9];
const NAT_PORT: u16 = 20_000;
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn frame(client: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(source), listener) = (client.ip(), Ipv4Addr::from(LISTENER)) else {
        unreachable!()
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
        .ipv4(source.octets(), listener.octets(), 64)
        .udp(client.port(), 51820)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// The mean time of `payload` sent once from each of MISSES new clients (10.`net`.x.y), over the
/// runs whose session ended up as `opened` says (the others hit an admission or NAT limit).
fn one_shots(
    program: &XdpProgram,
    net: u8,
    payload: &[u8],
    what: &str,
    opened: impl Fn(&(Table, Session)) -> bool,
) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    let mut counted = 0u32;
    for i in 0..MISSES {
        let client = SocketAddr::from(([10, net, (i / 250) as u8, 1 + (i % 250) as u8], 1024 + i));
        let time = program.time(&frame(client, payload), 1)?;
        let key = FlowKey {
            listener: 0,
            client: endpoint_of(client),
        };
        if program.session(&key).as_ref().is_some_and(&opened) {
            total += time;
            counted += 1;
        }
    }
    ensure!(counted > u32::from(MISSES) / 3, "only {counted} {what}");
    Ok(total / counted)
}

fn message(kind: u8, len: usize) -> Vec<u8> {
    let mut payload = vec![0u8; len];
    payload[0] = kind;
    payload
}

fn main() -> anyhow::Result<()> {
    // gw0 is the loop gateway at the listener's own address; new sessions land on it or gw1.
    let config = Config::parse(
        "[[listener]]\nname = \"l\"\nlisten = \"10.201.0.1:51820\"\nhash_key = \"source-ip-port\"\n\
         [[listener.gateway]]\nname = \"gw0\"\naddress = \"10.201.0.1:51820\"\n\
         [[listener.gateway]]\nname = \"gw1\"\naddress = \"10.202.1.2:51820\"\n",
        "bench",
    )?;
    let listener = &config.listeners[0];
    let mut program = XdpProgram::load(Limits {
        sessions: 65_536,
        probation: listener.admission.probation_size.get() as u32,
        maglev_slots: listener.maglev_size,
    })?;
    program.set_nat_ports(NAT_PORT, 1)?;
    for (index, gateway) in listener.gateways.iter().enumerate() {
        let source = if index == 0 { SOURCE } else { [10, 202, 1, 1] };
        program.set_gateway(
            index as u32,
            Gateway {
                endpoint: endpoint_of(gateway.address),
                source: endpoint_of(SocketAddr::from((source, 0))).addr,
                // The hit's frame goes out with the MACs it came in with.
                next_hop_mac: OUR_MAC,
                local_mac: CLIENT_MAC,
                ifindex: 1,
                flags: GATEWAY_KEEPS | GATEWAY_READY,
            },
        )?;
    }
    let placement = initial_placement(listener);
    let slots = listener.maglev_size;
    let admission = listener.admission.limits();
    program.set_placement(
        0,
        &[listener.listen],
        &[],
        0,
        slots,
        &placement,
        admission,
        |g| {
            listener
                .gateways
                .iter()
                .position(|c| c.name == g.name)
                .unwrap() as u32
        },
    )?;

    // A peer balancer's session (a pin) skips probation: the hit is a confirmed session's.
    let client = SocketAddr::from((SOURCE, NAT_PORT));
    let key = FlowKey {
        listener: 0,
        client: endpoint_of(client),
    };
    program.pin(&key, 0)?;
    let hit = frame(client, &message(4, 32 + 16 * 80));
    let first = program.run(&hit)?;
    ensure!(
        first.verdict == XDP_TX && first.packet == hit,
        "the hit's frame is not a fixed point of the rewrite"
    );
    let Some((Table::Confirmed, hit_session)) = program.session(&key) else {
        anyhow::bail!("the hit's session is not confirmed");
    };
    let hit_ns = program.time(&hit, REPEAT)?;
    let hit_key = key;
    let junk_ns = program.time(&frame(client, &message(9, 148)), REPEAT)?;

    // Initiations on the same session: without a key, then checked (mac1 right, and wrong).
    let key = Mac1Key::new(&[7; 32]);
    let mut initiation = [0u8; INITIATION_LEN];
    initiation[0] = 1;
    let words = key.mac1(&initiation, &mut Blake2sWork::default());
    for (i, word) in words.iter().enumerate() {
        initiation[MAC1_OFFSET + 4 * i..][..4].copy_from_slice(&word.to_le_bytes());
    }
    let signed = frame(client, &initiation);
    let initiation_ns = program.time(&signed, REPEAT)?;
    program.set_mac1(0, key)?;
    let first = program.run(&signed)?;
    ensure!(
        first.verdict == XDP_TX && first.packet == signed,
        "mac1 refused"
    );
    let checked_ns = program.time(&signed, REPEAT)?;
    initiation[MAC1_OFFSET] ^= 1;
    let forged = frame(client, &initiation);
    ensure!(
        program.run(&forged)?.verdict == XDP_DROP,
        "a wrong mac1 passed"
    );
    let forged_ns = program.time(&forged, REPEAT)?;
    program.set_mac1(0, Mac1Key::default())?;

    // New sessions, each from an address of its own (each source has a budget of its own), on
    // NAT ports other than the hit's.
    program.set_nat_ports(NAT_PORT + 1, 40_000)?;
    let miss_ns = one_shots(
        &program,
        203,
        &message(1, 148),
        "new sessions were opened",
        |s| s.0 == Table::Unconfirmed,
    )?;

    // A session on gw1 whose gateway chose an index (learned from its handshake response), then
    // new tuples carrying that index: each is routed to gw1 by it, one run each.
    const INDEX: u32 = 0x5eed_0001;
    let placed_on_gw1 = (0..1000u16)
        .map(|p| SocketAddr::from(([10, 205, 0, 1], 2000 + p)))
        .find(|c| placement.place(*c).is_some_and(|g| g.name == "gw1"))
        .context("a client Maglev places on gw1")?;
    let sent = program.run(&frame(placed_on_gw1, &message(1, 148)))?;
    let nat_port = u16::from_be_bytes([sent.packet[34], sent.packet[35]]);
    let mut response = message(2, 92);
    response[4..8].copy_from_slice(&INDEX.to_le_bytes());
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(OUR_MAC, CLIENT_MAC)
        .ipv4([10, 202, 1, 2], [10, 202, 1, 1], 64)
        .udp(51820, nat_port)
        .write(&mut reply, &response)?;
    ensure!(
        program.run(&reply)?.verdict == XDP_TX,
        "the response was not relayed"
    );
    let mut data = message(4, 32 + 16 * 80);
    data[4..8].copy_from_slice(&INDEX.to_le_bytes());
    let rebound_ns = one_shots(
        &program,
        206,
        &data,
        "tuples were routed by their index",
        |s| s.0 == Table::Unconfirmed && s.1.rebinding != 0,
    )?;

    // One address opens its burst of new sessions, then every further new one is refused.
    let mut refused = None;
    for port in 1024..2048 {
        let new = frame(SocketAddr::from(([10, 204, 0, 1], port)), &message(1, 148));
        if program.run(&new)?.verdict == XDP_DROP {
            refused = Some(new);
            break;
        }
    }
    let refused = refused.context("a source was never refused")?;
    let refused_ns = program.time(&refused, REPEAT)?;

    // The floors, one object: the session floor finds the hit's session in a map of its own.
    let mut floors = aya::Ebpf::load(wglb::xdp::program::FLOOR_OBJECT)?;
    let mut sessions: HashMap<_, FlowKey, Session> = floors
        .map_mut("FLOOR_SESSIONS")
        .context("the floor's session map")?
        .try_into()?;
    sessions.insert(hit_key, hit_session, 0)?;
    // The hit's listener, as wglb's program holds it, for the floor that looks it up; and the
    // address the floors rewrite the destination to, which the repeats after the first see.
    let mut listeners: HashMap<_, Endpoint, ListenerInfo> = floors
        .map_mut("FLOOR_LISTENERS")
        .context("the floor's listener map")?
        .try_into()?;
    let listener_info = ListenerInfo {
        index: 0,
        maglev_offset: 0,
        maglev_size: slots,
        hash_port: 1,
        pad: [0; 3],
        admission,
    };
    for address in [listener.listen, SocketAddr::from(([10, 202, 0, 2], 51820))] {
        listeners.insert(endpoint_of(address), listener_info, 0)?;
    }
    let mut time_floor = |name: &str| -> anyhow::Result<Duration> {
        let floor: &mut Xdp = floors
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        floor.load()?;
        let mut out = vec![0u8; hit.len() + 256];
        let first = floor.test_run(TestRunOptions {
            data_in: Some(&hit),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        ensure!(first.return_value == XDP_TX, "{name} did not send the hit");
        let timed = floor.test_run(TestRunOptions {
            data_in: Some(&hit),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })?;
        Ok(timed.duration)
    };
    let floor_ns = time_floor("floor")?;
    let session_floor_ns = time_floor("floor_session")?;
    let listener_floor_ns = time_floor("floor_listener_session")?;

    let ratio = |d: Duration, of: Duration| d.as_nanos() as f64 / of.as_nanos().max(1) as f64;
    println!("case                            ns/packet   vs floor   vs session floor");
    println!(
        "floor (parse, rewrite, TX)      {:>9}   1.00x",
        floor_ns.as_nanos()
    );
    println!(
        "session floor (+ lookup, touch) {:>9}   {:.2}x      1.00x",
        session_floor_ns.as_nanos(),
        ratio(session_floor_ns, floor_ns)
    );
    println!(
        "  + listener lookup first       {:>9}   {:.2}x      {:.2}x",
        listener_floor_ns.as_nanos(),
        ratio(listener_floor_ns, floor_ns),
        ratio(listener_floor_ns, session_floor_ns)
    );
    println!("(new sessions and rebound tuples: the mean of the runs that opened one)");
    for (case, d) in [
        ("confirmed hit (1312-byte data)", hit_ns),
        ("initiation on a session", initiation_ns),
        ("... with mac1 checked", checked_ns),
        ("initiation, mac1 wrong, dropped", forged_ns),
        ("new session (place, admit, NAT)", miss_ns),
        ("rebound tuple (routed by index)", rebound_ns),
        ("new session refused (budget)", refused_ns),
        ("junk dropped", junk_ns),
    ] {
        println!(
            "{case:<31} {:>9}   {:.2}x      {:.2}x",
            d.as_nanos(),
            ratio(d, floor_ns),
            ratio(d, session_floor_ns)
        );
    }
    Ok(())
}
