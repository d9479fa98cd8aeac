//! Memory per session of the userspace datapath, measured on loopback: a real `wglb` process
//! relays one handshake initiation from each of N client addresses to a gateway socket that
//! swallows them, and the process's resident memory and the kernel's slab memory are read
//! before and after. The baseline in the same run is a process that only holds N plain UDP
//! sockets, what any per-session-socket relay (Envoy's udp_proxy, nginx stream) pays at least.
//!
//! Run (as root, for the open-file limit): `cargo bench -p wglb-benches --bench session_memory`
//! Only loopback addresses (127.0.0.0/8) are used.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use wglb_lab::{metrics, wait_for, Launch};

const SESSIONS: usize = 10_000;
const LISTEN: &str = "127.0.0.1:45820";
const METRICS: &str = "127.0.0.1:45821";

fn metrics_address() -> SocketAddr {
    METRICS.parse().expect("address")
}

fn meminfo_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("meminfo field")
}

fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The sessions wglb holds; `None` before it reports any.
fn sessions(metrics: SocketAddr) -> anyhow::Result<Option<f64>> {
    Ok(metrics::sum(&metrics::scrape(metrics)?, "wglb_sessions{"))
}

fn client(i: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250) as u8 + 1),
        40_000,
    ))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes benchmarks this way: nothing to list.
    }
    let _ = rlimit::increase_nofile_limit(SESSIONS as u64 * 2 + 100);
    let gateway = UdpSocket::bind("127.0.0.1:0").expect("gateway socket");
    let gateway_addr = gateway.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("wglb-session-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    // The stand-in gateway never answers, so every session stays unconfirmed: probation must
    // hold them all.
    let room = SESSIONS + 1000;
    let config = format!(
        "[[listener]]\nname = \"memory\"\nlisten = \"{LISTEN}\"\ntable_size = {room}\n\
         probation_size = {room}\n[[listener.gateway]]\nname = \"gw\"\naddress = \"{gateway_addr}\"\n"
    );
    let wglb = wglb_lab::bench::workspace_binary("wglb").expect("the wglb binary");
    let balancer = Launch::new(&wglb, &dir, metrics_address())
        .log("warn")
        .config(&config)
        .expect("wglb starts");
    let pid = balancer.pid().expect("running");
    std::thread::sleep(Duration::from_millis(300));
    let (rss_before, slab_before) = (rss_kib(pid), meminfo_kib("Slab:"));

    let mut initiation = [0u8; 148];
    initiation[0] = 1;
    for i in 0..SESSIONS {
        let socket = UdpSocket::bind(client(i)).expect("client socket on loopback");
        socket.send_to(&initiation, LISTEN).expect("send");
    }
    wait_for("every session to open", Duration::from_secs(30), || {
        Ok((sessions(metrics_address())? == Some(SESSIONS as f64)).then_some(()))
    })
    .expect("every session opens");
    std::thread::sleep(Duration::from_millis(300));
    let (rss_after, slab_after) = (rss_kib(pid), meminfo_kib("Slab:"));
    drop(balancer);
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);

    // Baseline: the same number of bound, connected UDP sockets and nothing else.
    std::thread::sleep(Duration::from_millis(500));
    let slab_base_before = meminfo_kib("Slab:");
    let own_before = rss_kib(std::process::id());
    let plain: Vec<UdpSocket> = (0..SESSIONS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(gateway_addr).unwrap();
            s
        })
        .collect();
    let slab_base_after = meminfo_kib("Slab:");
    let own_after = rss_kib(std::process::id());
    drop(plain);

    let per =
        |before: u64, after: u64| (after.saturating_sub(before) as f64 * 1024.0) / SESSIONS as f64;
    let wglb_user = per(rss_before, rss_after);
    let wglb_kernel = per(slab_before, slab_after);
    let base_user = per(own_before, own_after);
    let base_kernel = per(slab_base_before, slab_base_after);
    println!("sessions: {SESSIONS}");
    println!("wglb process memory per session:   {wglb_user:>7.0} B");
    println!("wglb kernel slab per session:      {wglb_kernel:>7.0} B");
    println!(
        "baseline (bare UDP socket) process {base_user:>7.0} B, kernel slab {base_kernel:>7.0} B"
    );
    println!(
        "wglb total / bare socket total:    {:>7.2}",
        (wglb_user + wglb_kernel) / (base_user + base_kernel).max(1.0)
    );
}
