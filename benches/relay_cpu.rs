//! CPU per packet of the userspace relay against nginx stream, the userspace UDP balancer users
//! would otherwise pick, in the same run on loopback: a paced generator offers WireGuard-shaped
//! transport messages (64 bytes) from 1,000 source ports at a fixed rate that both sustain, a
//! sink counts what arrives, and the machine's busy CPU time (/proc/stat) and the balancer
//! processes' own CPU time (/proc/PID/stat) are read around each run.
//!
//! On loopback a send also delivers the datagram into the receiver's socket, so each
//! contender's process time includes that delivery; both pay it alike, so read the ratio.
//!
//! Run (as root; nginx optional): `apt-get install nginx libnginx-mod-stream`, then
//! `cargo bench -p wglb --bench relay_cpu`. Only loopback addresses are used.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wglb_lab::cpu::{machine_ticks, process_ticks, TICKS_PER_SECOND};

const RATE: u64 = 50_000;
const SECONDS: u64 = 10;
const SOURCES: usize = 1_000;
const ROUNDS: usize = 3;
const SINK: &str = "127.0.0.1:52901";
const NGINX_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

struct Contender {
    name: &'static str,
    listen: SocketAddr,
    child: Child,
}

impl Drop for Contender {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master takes its workers down with it only then.
        let _ = wglb_lab::terminate(&mut self.child, Duration::from_secs(5));
    }
}

fn wglb() -> Contender {
    let listen: SocketAddr = "127.0.0.1:52820".parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_wglb"))
        .args([
            "--log",
            "error",
            "run",
            "--hash-key",
            "source-ip-port",
            "--listen",
        ])
        .arg(listen.to_string())
        .args(["--gateway", &format!("sink={SINK}")])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting wglb");
    Contender {
        name: "wglb userspace",
        listen,
        child,
    }
}

/// nginx stream as Defguard users would set it up, configured fairly: one worker per the
/// balancer's one datapath thread, a receive buffer sized for the load, sessions per client
/// tuple (no `proxy_responses 0`, which opens a session per datagram).
fn nginx(dir: &Path) -> Option<Contender> {
    if !Path::new(NGINX_MODULE).exists() {
        println!(
            "nginx stream is not installed (apt-get install nginx libnginx-mod-stream): skipped"
        );
        return None;
    }
    let listen: SocketAddr = "127.0.0.1:52821".parse().unwrap();
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "load_module {NGINX_MODULE};\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nevents {{ worker_connections 8192; }}\n\
             stream {{\n  upstream gw {{ hash $remote_addr$remote_port consistent; server {SINK}; }}\n\
             server {{ listen {listen} udp rcvbuf=4m; proxy_pass gw; proxy_timeout 180s; }}\n}}\n",
            dir = dir.display()
        ),
    )
    .expect("nginx config");
    let child = Command::new("nginx")
        .args(["-c"])
        .arg(&config)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting nginx");
    Some(Contender {
        name: "nginx stream",
        listen,
        child,
    })
}

struct Result {
    name: &'static str,
    delivered_per_second: f64,
    loss: f64,
    machine_per_million: f64,
    process_per_million: f64,
}

/// The median of each figure over rounds of one contender.
fn median(mut runs: Vec<&Result>) -> Result {
    let mut pick = |key: fn(&Result) -> f64| {
        runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
        key(runs[runs.len() / 2])
    };
    Result {
        delivered_per_second: pick(|r| r.delivered_per_second),
        loss: pick(|r| r.loss),
        machine_per_million: pick(|r| r.machine_per_million),
        process_per_million: pick(|r| r.process_per_million),
        name: runs[0].name,
    }
}

fn run(contender: &Contender, delivered: &AtomicU64) -> Result {
    std::thread::sleep(Duration::from_millis(500));
    let sources: Vec<UdpSocket> = (0..SOURCES)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("source socket");
            s.connect(contender.listen).expect("connect");
            s
        })
        .collect();
    let mut message = [0u8; 64];
    message[0] = 4; // WireGuard transport data: 32 + 16 * 2 bytes
    for source in &sources {
        let _ = source.send(&message);
    }
    std::thread::sleep(Duration::from_millis(500));
    delivered.store(0, Ordering::Relaxed);
    let busy0 = machine_ticks().busy;
    let own0 = process_ticks(contender.child.id());
    let start = Instant::now();
    let total = RATE * SECONDS;
    let mut sent = 0u64;
    while sent < total {
        let due = start + Duration::from_nanos(sent * 1_000_000_000 / RATE);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
            continue;
        }
        for _ in 0..16.min(total - sent) {
            let _ = sources[sent as usize % SOURCES].send(&message);
            sent += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let busy1 = machine_ticks().busy;
    let own1 = process_ticks(contender.child.id());
    let got = delivered.load(Ordering::Relaxed);
    let millions = got as f64 / 1e6;
    Result {
        name: contender.name,
        delivered_per_second: got as f64 / seconds,
        loss: 1.0 - got as f64 / sent as f64,
        machine_per_million: (busy1 - busy0) as f64 / TICKS_PER_SECOND / millions,
        process_per_million: (own1 - own0) as f64 / TICKS_PER_SECOND / millions,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes benchmarks this way: nothing to list.
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let sink = UdpSocket::bind(SINK).expect("sink socket");
    // The sink must not be where packets are lost.
    let _ = nix::sys::socket::setsockopt(&sink, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20));
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = (delivered.clone(), stop.clone());
    let sink_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !counter.1.load(Ordering::Relaxed) {
            if sink.recv_from(&mut buf).is_ok() {
                counter.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let dir = std::env::temp_dir().join(format!("wglb-relay-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Rounds alternate the contenders so that whatever else the machine does falls on both;
    // each figure is the median over the rounds.
    let mut rounds: Vec<Vec<Result>> = Vec::new();
    for _ in 0..ROUNDS {
        let mut round = Vec::new();
        let contender = wglb();
        round.push(run(&contender, &delivered));
        drop(contender);
        if let Some(contender) = nginx(&dir) {
            round.push(run(&contender, &delivered));
        }
        rounds.push(round);
    }
    let results: Vec<Result> = (0..rounds[0].len())
        .map(|i| median(rounds.iter().map(|round| &round[i]).collect()))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let _ = sink_thread.join();
    let _ = std::fs::remove_dir_all(&dir);

    println!("offered {RATE} packets/s for {SECONDS} s from {SOURCES} sources, 64-byte WireGuard transport messages, loopback; median of {ROUNDS} alternating rounds");
    println!("| contender | delivered packets/s | loss | machine busy CPU s per 1M | balancer process CPU s per 1M |");
    println!("|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.2} % | {:.2} | {:.2} |",
            r.name,
            r.delivered_per_second,
            100.0 * r.loss,
            r.machine_per_million,
            r.process_per_million
        );
    }
    if let [wglb, nginx] = &results[..] {
        println!(
            "wglb / nginx: machine CPU per packet {:.2}x, balancer process CPU per packet {:.2}x",
            wglb.machine_per_million / nginx.machine_per_million,
            wglb.process_per_million / nginx.process_per_million
        );
    }
}
