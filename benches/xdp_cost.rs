//! The XDP program's own cost per packet, with BPF_PROG_TEST_RUN repeat runs (the kernel's clock,
//! no system call in it), beside the floor measured in the same run: a program that only parses,
//! rewrites and sends back (`ebpf/xdp/src/floor.rs`). Cases: a session hit, a miss (placement, a
//! NAT port and two map inserts), and junk dropped at the shape check. Needs root.
//!
//! Run: `sudo cargo bench -p wglb --bench xdp_cost`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use wglb::config::Config;
use wglb::control::initial_placement;
use wglb::xdp::{endpoint_of, Limits, XdpProgram};
use wglb_common::xdp::{Gateway, GATEWAY_KEEPS, GATEWAY_READY};

const REPEAT: u32 = 1_000_000;
const MISSES: u16 = 20_000;

fn frame(client: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(source), listener) = (client.ip(), Ipv4Addr::new(10, 201, 0, 1)) else {
        unreachable!()
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(source.octets(), listener.octets(), 64)
        .udp(client.port(), 51820)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn message(kind: u8, len: usize) -> Vec<u8> {
    let mut payload = vec![0u8; len];
    payload[0] = kind;
    payload
}

fn main() -> anyhow::Result<()> {
    let config = Config::parse(
        "[[listener]]\nname = \"l\"\nlisten = \"10.201.0.1:51820\"\nhash_key = \"source-ip-port\"\n\
         [[listener.gateway]]\nname = \"gw0\"\naddress = \"10.202.0.2:51820\"\n\
         [[listener.gateway]]\nname = \"gw1\"\naddress = \"10.202.1.2:51820\"\n",
        "bench",
    )?;
    let listener = &config.listeners[0];
    let mut program = XdpProgram::load(Limits {
        sessions: 65_536,
        maglev_slots: listener.maglev_size,
    })?;
    program.set_nat_ports(20_000, 40_000)?;
    for (index, gateway) in listener.gateways.iter().enumerate() {
        program.set_gateway(
            index as u32,
            Gateway {
                endpoint: endpoint_of(gateway.address),
                source: endpoint_of(SocketAddr::from(([10, 202, index as u8, 1], 0))).addr,
                next_hop_mac: [2, 0, 0, 0, 2, index as u8],
                local_mac: [2, 0, 0, 0, 0, 2],
                ifindex: 1,
                flags: GATEWAY_KEEPS | GATEWAY_READY,
            },
        )?;
    }
    let placement = initial_placement(listener);
    let slots = listener.maglev_size;
    program.set_placement(0, &[listener.listen], &[], 0, slots, &placement, |g| {
        listener
            .gateways
            .iter()
            .position(|c| c.name == g.name)
            .unwrap() as u32
    })?;

    let data = message(4, 32 + 16 * 80);
    let hit = frame(SocketAddr::from(([10, 201, 0, 2], 40_000)), &data);
    program.run(&hit)?;
    let hit_ns = program.time(&hit, REPEAT)?;
    let junk_ns = program.time(
        &frame(
            SocketAddr::from(([10, 201, 0, 2], 40_000)),
            &message(9, 148),
        ),
        REPEAT,
    )?;
    let mut miss_total = Duration::ZERO;
    for port in 0..MISSES {
        let client = SocketAddr::from(([10, 201, 1 + (port / 250) as u8, 2], 1024 + port));
        miss_total += program.time(&frame(client, &message(1, 148)), 1)?;
    }
    let miss_ns = miss_total / MISSES as u32;

    let mut floor = aya::Ebpf::load(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/xdp-floor"
    )))?;
    let floor: &mut Xdp = floor
        .program_mut("floor")
        .context("floor program")?
        .try_into()?;
    floor.load()?;
    let mut out = vec![0u8; hit.len() + 256];
    let floor_ns = floor
        .test_run(TestRunOptions {
            data_in: Some(&hit),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })?
        .duration;

    let ratio = |d: Duration| d.as_nanos() as f64 / floor_ns.as_nanos().max(1) as f64;
    println!("case                          ns/packet   vs floor");
    println!(
        "floor (parse, rewrite, TX)    {:>9}   1.00x",
        floor_ns.as_nanos()
    );
    for (case, d) in [
        ("session hit (1312-byte data)", hit_ns),
        ("miss: place + NAT + insert", miss_ns),
        ("junk dropped", junk_ns),
    ] {
        println!("{case:<29} {:>9}   {:.2}x", d.as_nanos(), ratio(d));
    }
    Ok(())
}
