//! Checks the rig against real wireguard-go peers. Needs root, and fails without it.
//!
//! There is no balancer in this crate, so the tunnel tests put a minimal UDP relay in the
//! balancer namespace: it is the smallest thing that proves clients, gateways and addresses fit
//! together the way a balancer will use them.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use wglb_lab::{require_root, Family, HealthEndpoint, Rig, RigSpec};

/// Relays a client's datagrams to one gateway from a second socket, and the gateway's replies
/// back to the last client seen: a one-client, one-gateway full-NAT balancer.
struct Relay {
    stop: Arc<AtomicBool>,
    client: Arc<Mutex<Option<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    fn start(rig: &Rig, gateway: usize) -> Relay {
        let gateway = rig.gateway_addr(gateway);
        let (front_addr, back_addr) = if gateway.is_ipv4() {
            ("0.0.0.0:51820", "0.0.0.0:0")
        } else {
            ("[::]:51820", "[::]:0")
        };
        let (front, back) = rig
            .balancer_ns()
            .run(move || -> io::Result<(UdpSocket, UdpSocket)> {
                let front = UdpSocket::bind(front_addr)?;
                let back = UdpSocket::bind(back_addr)?;
                back.connect(gateway)?;
                // Timeouts let the relay threads notice the stop flag.
                front.set_read_timeout(Some(Duration::from_millis(50)))?;
                back.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok((front, back))
            })
            .expect("entering the balancer namespace")
            .expect("binding the relay sockets");
        let front = Arc::new(front);
        let back = Arc::new(back);
        let stop = Arc::new(AtomicBool::new(false));
        let client = Arc::new(Mutex::new(None));
        let upstream = {
            let (front, back, stop, client) =
                (front.clone(), back.clone(), stop.clone(), client.clone());
            thread::spawn(move || {
                let mut buf = [0; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        *client.lock().unwrap() = Some(from);
                        let _ = back.send(&buf[..n]);
                    }
                }
            })
        };
        let downstream = {
            let (stop, client) = (stop.clone(), client.clone());
            thread::spawn(move || {
                let mut buf = [0; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = back.recv(&mut buf) {
                        if let Some(to) = *client.lock().unwrap() {
                            let _ = front.send_to(&buf[..n], to);
                        }
                    }
                }
            })
        };
        Relay {
            stop,
            client,
            threads: vec![upstream, downstream],
        }
    }

    fn client(&self) -> Option<SocketAddr> {
        *self.client.lock().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn tunnel_through_relay(family: Family) {
    require_root().unwrap();
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family,
        gateways: 2,
        client_ports: vec![41000, 41001],
        keepalive: None,
    })
    .unwrap();
    let relay = Relay::start(&rig, 0);
    rig.start_client(0).unwrap();
    assert!(rig.start_client(0).is_err(), "a client starts only once");
    let pinger = rig.pinger(0).unwrap();
    rig.wait_handshake(0, Duration::from_secs(15)).unwrap();
    pinger
        .wait_reply_after(SystemTime::now(), Duration::from_secs(10))
        .unwrap();

    assert!(!pinger.replies().is_empty());
    assert!(pinger.last_seq() >= 1);
    assert!(pinger.sent() >= pinger.last_seq());
    assert_eq!(relay.client(), Some(rig.client_addr(0)));
    assert_eq!(rig.gateway_serving(0).unwrap(), Some(0));
    assert!(rig.gateway_rx_bytes_from(0, 0).unwrap() > 0);
    assert_eq!(rig.gateway_handshake_with(1, 0).unwrap(), None);
    assert_eq!(rig.gateway_rx_bytes_from(1, 0).unwrap(), 0);
    assert!(
        rig.client_latest_handshake(1).is_err(),
        "client 1 never started"
    );

    let id = rig.id().to_owned();
    let temp = rig.temp_dir().to_owned();
    drop(pinger);
    drop(relay);
    drop(rig);
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("wglb-{id}-")),
        "namespaces left behind:\n{namespaces}"
    );
    assert!(!temp.exists(), "{} left behind", temp.display());
    for ifname in [
        format!("wg{id}c0"),
        format!("wg{id}g0"),
        format!("wg{id}g1"),
    ] {
        let socket = format!("/var/run/wireguard/{ifname}.sock");
        assert!(!Path::new(&socket).exists(), "{socket} left behind");
    }
}

#[test]
fn ipv4_tunnel_through_a_relay() {
    tunnel_through_relay(Family::V4);
}

#[test]
fn ipv6_tunnel_through_a_relay() {
    tunnel_through_relay(Family::V6);
}

/// `GET path` against a gateway's health port, from the balancer namespace like a balancer.
fn get_health(rig: &Rig, j: usize, path: &'static str) -> io::Result<(String, String)> {
    let addr = SocketAddr::new(rig.gateway_addr(j).ip(), rig.gateway_health_port());
    let response = rig
        .balancer_ns()
        .run(move || -> io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .expect("entering the balancer namespace")?;
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

#[test]
fn health_endpoint_follows_the_gateway_state() {
    require_root().unwrap();
    let mut rig = Rig::new(RigSpec {
        balancers: 1,
        family: Family::V4,
        gateways: 2,
        client_ports: vec![],
        keepalive: None,
    })
    .unwrap();
    let ok = ("HTTP/1.1 200 OK".to_owned(), "alive".to_owned());
    assert_eq!(get_health(&rig, 0, "/health").unwrap(), ok);
    assert_eq!(get_health(&rig, 1, "/health").unwrap(), ok);

    rig.set_gateway_health(1, HealthEndpoint::CoreDetached);
    assert_eq!(
        get_health(&rig, 1, "/health").unwrap(),
        (
            "HTTP/1.1 503 Service Unavailable".to_owned(),
            "Not connected to core".to_owned()
        )
    );
    let (status, _) = get_health(&rig, 1, "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    rig.set_gateway_health(1, HealthEndpoint::Unreachable);
    // Reset while the request is sent, or while the answer is awaited.
    let reset = get_health(&rig, 1, "/health").unwrap_err();
    assert!(
        matches!(
            reset.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "{reset}"
    );
    rig.set_gateway_health(1, HealthEndpoint::Alive);
    assert_eq!(get_health(&rig, 1, "/health").unwrap(), ok);

    rig.stop_gateway(0).unwrap();
    // No answer: refused, or (seen once in CI) reset, never an HTTP response.
    let refused = get_health(&rig, 0, "/health").unwrap_err();
    assert!(
        matches!(
            refused.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
        ),
        "{refused}"
    );
    let socket = format!("/var/run/wireguard/wg{}g0.sock", rig.id());
    assert!(!Path::new(&socket).exists(), "{socket} left behind");
    assert!(
        rig.gateway_handshake_with(0, 0).is_err(),
        "gateway 0 is stopped"
    );
    assert_eq!(get_health(&rig, 1, "/health").unwrap(), ok);
    rig.stop_gateway(0).unwrap();
}
