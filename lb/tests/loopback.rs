//! A real `wglb` process relaying WireGuard-shaped datagrams between sockets on loopback: the
//! parts that need no WireGuard peer (several listeners, flags, the session table's bounds, the
//! drop policy). Each test uses its own 127.x address, so tests in parallel never share a port.

mod local;

use std::net::{Ipv4Addr, UdpSocket};

use anyhow::{ensure, Result};
use local::{at, initiation, response, round_trip, Client, Gateway, Wglb};

#[test]
fn each_listener_keeps_its_own_pool_and_answers_from_its_address() -> Result<()> {
    let ip = Ipv4Addr::new(127, 31, 0, 1);
    let office = [
        Gateway::start(at(ip, 52001))?,
        Gateway::start(at(ip, 52002))?,
    ];
    let lab = Gateway::start(at(ip, 52003))?;
    let config = format!(
        "[[listener]]\nname = \"office\"\nlisten = \"{}\"\nhash_key = \"source-ip-port\"\n\
         [[listener.gateway]]\nname = \"a\"\naddress = \"{}\"\n\
         [[listener.gateway]]\nname = \"b\"\naddress = \"{}\"\n\
         [[listener]]\nname = \"lab\"\nlisten = \"{}\"\n\
         [[listener.gateway]]\nname = \"c\"\naddress = \"{}\"\n",
        at(ip, 51820),
        office[0].address,
        office[1].address,
        at(ip, 51821),
        lab.address,
    );
    let _wglb = Wglb::start_with_file(&config, at(ip, 9638))?;
    for port in 40_000..40_020 {
        let (from, echo) = round_trip(at(Ipv4Addr::new(127, 31, 1, 1), port), at(ip, 51820))?;
        ensure!(from == at(ip, 51820) && echo == response());
    }
    let (from, _) = round_trip(at(Ipv4Addr::new(127, 31, 1, 1), 41_000), at(ip, 51821))?;
    ensure!(
        from == at(ip, 51821),
        "the lab listener answered from {from}"
    );
    ensure!(office[0].count() + office[1].count() == 20 && lab.count() == 1);
    ensure!(
        office[0].count() > 0 && office[1].count() > 0,
        "source-ip-port did not spread 20 clients"
    );
    // Full NAT: gateways see the balancer, never the client.
    for gateway in office.iter().chain([&lab]) {
        for from in gateway.senders.lock().unwrap().iter() {
            ensure!(
                from.ip() != Ipv4Addr::new(127, 31, 1, 1),
                "a gateway saw the client's address"
            );
        }
    }
    Ok(())
}

#[test]
fn the_table_stays_bounded_and_idle_sessions_expire() -> Result<()> {
    let ip = Ipv4Addr::new(127, 31, 0, 2);
    let gateway = Gateway::start(at(ip, 52001))?;
    let listen = at(ip, 51820).to_string();
    let spec = format!("g={}", gateway.address);
    let wglb = Wglb::start(
        &[
            "--listen",
            &listen,
            "--gateway",
            &spec,
            "--table-size",
            "2",
            "--idle-timeout",
            "1s",
        ],
        at(ip, 9638),
    )?;
    // Each answered, and confirmed by its client's next datagram: only confirmed sessions
    // compete for the table.
    for port in 40_000..40_003 {
        let client = Client::new(at(Ipv4Addr::new(127, 31, 2, 1), port), at(ip, 51820))?;
        client.round_trip()?;
        client.round_trip()?;
    }
    ensure!(wglb.metric(r#"wglb_sessions_confirmed_total{listener="default"}"#)? == 3.0);
    ensure!(wglb.metric("wglb_sessions{")? == 2.0);
    // Push-outs are counted at the next sweep.
    wglb.wait_metric(
        r#"wglb_session_evictions_total{listener="default",reason="table_full"}"#,
        |v| v == 1.0,
    )?;
    // Idle sessions expire.
    wglb.wait_metric(
        r#"wglb_session_evictions_total{listener="default",reason="idle"}"#,
        |v| v == 2.0,
    )?;
    ensure!(wglb.metric("wglb_sessions{")? == 0.0);
    Ok(())
}

#[test]
fn with_the_drop_policy_nothing_reaches_a_pool_that_is_all_down() -> Result<()> {
    let ip = Ipv4Addr::new(127, 31, 0, 3);
    let gateway = Gateway::start(at(ip, 52001))?;
    let listen = at(ip, 51820).to_string();
    // Nothing listens on the health port: the check fails.
    let spec = format!("g={},health-port=55003", gateway.address);
    let wglb = Wglb::start(
        &[
            "--listen",
            &listen,
            "--gateway",
            &spec,
            "--all-down",
            "drop",
        ],
        at(ip, 9638),
    )?;
    wglb.wait_metric(
        r#"wglb_gateway_health{gateway="g",listener="default",state="down"}"#,
        |v| v == 1.0,
    )?;
    let socket = UdpSocket::bind(at(Ipv4Addr::new(127, 31, 3, 1), 40_000))?;
    socket.send_to(&initiation(), at(ip, 51820))?;
    wglb.wait_metric(
        r#"wglb_dropped_packets_total{direction="to_gateway",listener="default",reason="no_gateway"}"#,
        |v| v == 1.0,
    )?;
    ensure!(gateway.count() == 0);
    Ok(())
}

#[test]
fn tells_systemd_and_kubernetes_when_it_is_ready_and_when_it_stops() -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    let ip = Ipv4Addr::new(127, 36, 0, 1);
    let gateway = Gateway::start(at(ip, 52001))?;
    let metrics = at(ip, 9638);
    // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
    let notify_path = local::temp_path(ip, ".notify");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut wglb = local::launch(metrics)
        .env("NOTIFY_SOCKET", &notify_path)
        .flags(&["--listen", &at(ip, 51820).to_string()])
        .flags(&["--gateway", &format!("gw={}", gateway.address)])
        .flags_only()?;
    let mut message = [0u8; 256];
    let len = notify.recv(&mut message)?;
    ensure!(
        &message[..len] == b"READY=1\n",
        "{:?}",
        String::from_utf8_lossy(&message[..len])
    );
    // Ready means forwarding: a client is answered at once.
    round_trip(at(Ipv4Addr::new(127, 36, 1, 1), 40_000), at(ip, 51820))?;
    let mut http = std::net::TcpStream::connect(metrics)?;
    write!(
        http,
        "GET /ready HTTP/1.1\r\nHost: wglb\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    http.read_to_string(&mut response)?;
    ensure!(response.starts_with("HTTP/1.1 200"), "{response}");

    let status = wglb.stop_for_status()?;
    let len = notify.recv(&mut message)?;
    ensure!(
        &message[..len] == b"STOPPING=1\n",
        "{:?}",
        String::from_utf8_lossy(&message[..len])
    );
    ensure!(status.success(), "wglb exited with {status} on SIGTERM");
    let _ = std::fs::remove_file(&notify_path);
    Ok(())
}
