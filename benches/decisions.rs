//! The per-packet decisions of the userspace datapath, each beside a baseline measured in the
//! same run so results read as ratios: the WireGuard shape check against a bare length check,
//! the flow hash against std's SipHash, a session lookup in the bounded LRU table against a plain
//! HashMap (and inserts into a full table, each evicting the least recently used session) at 1k,
//! 100k and 1M sessions, and Maglev placement. Also the cost of rebuilding a Maglev table (3 to
//! 1000 gateways), which the control plane pays on every health change, and of one page of
//! `wglb sessions` from a million sessions, which the datapath pays between batches (against
//! sorting them all); the edge's mac1 check (against RustCrypto's BLAKE2s), and routing a new
//! tuple by its receiver index among 100k (against Maglev placement).
//!
//! Run: `cargo bench -p wglb-benches --bench decisions`

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use wglb::maglev::Maglev;
use wglb::metrics::Metrics;
use wglb::pool::{AdminState, AllDownPolicy, GatewayId, GatewayView, HashKey, Health, Placement};
use wglb::query::page;
use wglb::rebinding::{Indices, Learned};
use wglb::session::{now_ns, Activity, Session, SessionTable};
use wglb_common::hash::flow_hash;
use wglb_common::mac1::{Blake2sWork, Mac1Key, INITIATION_LEN, LABEL_MAC1, MAC1_OFFSET};
use wglb_common::wireguard::classify;

const SESSIONS: u32 = 100_000;

fn client(i: u32) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::from(0x0a00_0000 | i),
        40_000 + (i % 20_000) as u16,
    ))
}

fn placement(gateways: u32) -> Placement {
    let views = (0..gateways)
        .map(|i| GatewayView {
            id: GatewayId(i),
            name: format!("gw{i}"),
            address: SocketAddr::from(([10, 1, 0, i as u8], 51820)),
            weight: 1,
            admin: AdminState::Active,
            health: Health::Up,
        })
        .collect();
    Placement::new(
        views,
        HashKey::SourceIpPort,
        AllDownPolicy::FailOpen,
        65_537,
    )
}

fn classification(c: &mut Criterion) {
    let mut data = vec![0u8; 32 + 1280];
    data[0] = 4;
    let junk = vec![0xffu8; 200];
    let mut group = c.benchmark_group("classify");
    group.bench_function("wireguard_shape_check", |b| {
        b.iter(|| classify(black_box(&data)))
    });
    group.bench_function("junk_shape_check", |b| {
        b.iter(|| classify(black_box(&junk)))
    });
    group.bench_function("baseline_length_check", |b| {
        b.iter(|| black_box(&data).len() >= 32)
    });
    group.finish();
}

/// The edge's mac1 check of an initiation, against RustCrypto's BLAKE2s doing the same MAC.
fn mac1(c: &mut Criterion) {
    use blake2::digest::{FixedOutput, KeyInit, Update};
    use blake2::Digest;
    let public_key = [7u8; 32];
    let key = Mac1Key::new(&public_key);
    let mut initiation = [0u8; INITIATION_LEN];
    initiation[0] = 1;
    let mut work = Blake2sWork::default();
    let mut group = c.benchmark_group("mac1");
    group.bench_function("wglb_common_verify", |b| {
        b.iter(|| key.verifies(black_box(&initiation), &mut work))
    });
    let mac_key = blake2::Blake2s256::new()
        .chain_update(LABEL_MAC1)
        .chain_update(public_key)
        .finalize();
    group.bench_function("baseline_rustcrypto_blake2s_mac", |b| {
        b.iter(|| {
            let mut mac =
                blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&mac_key)
                    .expect("a 32-byte key");
            mac.update(&black_box(&initiation)[..MAC1_OFFSET]);
            mac.finalize_fixed()
        })
    });
    group.finish();
}

/// A datagram from a tuple without a session: routed by the receiver index it carries (a rebound
/// client) or, its index unknown, placed by Maglev as any new tuple; against placement alone.
fn receiver_index(c: &mut Criterion) {
    let placement = placement(3);
    let counters = Metrics::new().listener("bench");
    let mut indices = Indices::new(NonZeroUsize::new(SESSIONS as usize).expect("non-zero"));
    let now = now_ns();
    let index_of = |i: u32| i.wrapping_mul(0x9e37_79b9);
    for i in 0..SESSIONS {
        let gateway = placement.place(client(i)).expect("a gateway");
        let learned = Learned {
            index: index_of(i),
            client: client(i),
            gateway: gateway.id,
            address: gateway.address,
        };
        indices.learn(learned, now, now, &counters);
    }
    let transport = |index: u32| {
        let mut data = [0u8; 64];
        data[0] = 4;
        data[4..8].copy_from_slice(&index.to_le_bytes());
        data
    };
    let (known, unknown) = (transport(index_of(777)), transport(0xffff_fff1));
    let rebound = client(SESSIONS + 1);
    let mut group = c.benchmark_group(format!("new_tuple_{SESSIONS}_indices"));
    group.bench_function("rebound_routed_by_index", |b| {
        b.iter(|| {
            indices
                .route(rebound, black_box(&known), &placement, now, |_, _| true)
                .expect("routed")
        })
    });
    group.bench_function("unknown_index_placed_by_maglev", |b| {
        b.iter(|| {
            let routed = indices.route(rebound, black_box(&unknown), &placement, now, |_, _| true);
            routed.map_or_else(
                || placement.place(rebound).map(|g| g.id),
                |r| Some(r.gateway),
            )
        })
    });
    group.bench_function("baseline_maglev_place", |b| {
        b.iter(|| placement.place(black_box(rebound)).map(|g| g.id))
    });
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let ip = Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped().octets();
    let sip = RandomState::new();
    let mut group = c.benchmark_group("flow_hash");
    group.bench_function("murmur3_flow_hash", |b| {
        b.iter(|| flow_hash(black_box(ip), black_box(40_000)))
    });
    group.bench_function("baseline_std_siphash", |b| {
        b.iter(|| sip.hash_one((black_box(ip), black_box(40_000u16))))
    });
    group.finish();
}

fn placement_lookup(c: &mut Criterion) {
    let pool = placement(3);
    let mut i = 0u32;
    c.bench_function("maglev_place_new_session", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            pool.place(black_box(client(i))).map(|g| g.id)
        })
    });
}

fn session(i: u32) -> Session<()> {
    Session {
        gateway: GatewayId(i % 3),
        gateway_address: SocketAddr::from(([10, 1, 0, 1], 51820)),
        activity: Arc::new(Activity::default()),
        link: (),
    }
}

/// A full table of `size` sessions, and the same clients in a plain HashMap.
fn full_table(size: u32) -> (SessionTable<()>, HashMap<SocketAddr, GatewayId>) {
    let mut table = SessionTable::new(NonZeroUsize::new(size as usize).unwrap());
    let mut plain = HashMap::new();
    for i in 0..size {
        table.insert(client(i), session(i));
        plain.insert(client(i), GatewayId(i % 3));
    }
    (table, plain)
}

/// Hits, and inserts into a full table (each pushing the least recently used session out), at
/// 1k, 100k and 1M sessions; a hit beside a plain HashMap's.
fn session_table(c: &mut Criterion) {
    for size in [1_000u32, SESSIONS, 1_000_000] {
        let (mut table, plain) = full_table(size);
        let mut group = c.benchmark_group(format!("session_table_{size}"));
        let mut i = 0u32;
        group.bench_function("hit", |b| {
            b.iter(|| {
                i = (i + 7919) % size;
                table.lookup(black_box(&client(i)), 1).map(|s| s.gateway)
            })
        });
        group.bench_function("baseline_hashmap_hit", |b| {
            b.iter(|| {
                i = (i + 7919) % size;
                plain.get(black_box(&client(i))).copied()
            })
        });
        // New clients past the table's end: every insert evicts the oldest session.
        let mut next = size;
        group.bench_function("insert_evicting_lru", |b| {
            b.iter(|| {
                next = next.wrapping_add(1);
                table.insert(black_box(client(next)), session(next))
            })
        });
        group.finish();
    }
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build_65537");
    group.sample_size(20);
    for gateways in [3usize, 10, 100, 1000] {
        let names: Vec<String> = (0..gateways).map(|i| format!("gw{i}")).collect();
        let backends: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        group.bench_function(format!("{gateways}_gateways"), |b| {
            b.iter(|| Maglev::build(black_box(&backends), 65_537))
        });
    }
    group.finish();
}

fn session_listing(c: &mut Criterion) {
    let sessions: Vec<(SocketAddr, u32)> = (0..1_000_000u32)
        .map(|i| (client(i.wrapping_mul(2_654_435_761)), i % 3))
        .collect();
    let mut group = c.benchmark_group("session_page_of_1m");
    group.sample_size(10);
    for limit in [1_000, 10_000] {
        group.bench_function(format!("heap_page_{limit}"), |b| {
            b.iter(|| page(sessions.iter().copied(), None, black_box(limit)))
        });
    }
    group.bench_function("baseline_sort_all", |b| {
        b.iter(|| {
            let mut all = sessions.clone();
            all.sort_unstable_by_key(|(client, _)| *client);
            all.truncate(black_box(1_000));
            all
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    classification,
    mac1,
    receiver_index,
    hashing,
    placement_lookup,
    session_table,
    maglev_build,
    session_listing
);
criterion_main!(benches);
