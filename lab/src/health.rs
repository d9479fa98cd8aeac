//! A stand-in for the Defguard gateway's HTTP health endpoint, which the balancer probes.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// How often the accept loop looks at its stop flag; bounds how long stopping takes.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// What a gateway's health endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthEndpoint {
    /// `200 alive`: Core's stream to the gateway is up.
    Alive,
    /// `503 Not connected to core`: the gateway lives on without Core, as every Defguard gateway
    /// does during a Core outage.
    CoreDetached,
    /// Every connection is reset before an answer: the gateway process is gone, its host is not.
    Unreachable,
}

/// A [`HealthEndpoint`] the test changes while the server reads it.
#[derive(Debug)]
pub(crate) struct SharedHealth(AtomicU8);

impl SharedHealth {
    const ALL: [HealthEndpoint; 3] = [
        HealthEndpoint::Alive,
        HealthEndpoint::CoreDetached,
        HealthEndpoint::Unreachable,
    ];

    pub(crate) fn new(state: HealthEndpoint) -> SharedHealth {
        SharedHealth(AtomicU8::new(state as u8))
    }

    pub(crate) fn set(&self, state: HealthEndpoint) {
        self.0.store(state as u8, Ordering::Relaxed);
    }

    fn get(&self) -> HealthEndpoint {
        Self::ALL[self.0.load(Ordering::Relaxed) as usize]
    }
}

/// Serving stops, and the listening socket closes, when this is dropped.
pub(crate) struct HealthServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    pub(crate) fn start(ns: &Netns, addr: SocketAddr, health: Arc<SharedHealth>) -> Result<Self> {
        let listener = ns
            .run(move || -> io::Result<TcpListener> {
                let listener = TcpListener::bind(addr)?;
                // Non-blocking so the loop can notice the stop flag without a connection arriving.
                listener.set_nonblocking(true)?;
                Ok(listener)
            })?
            .with_context(|| format!("binding the health server on {addr} in {}", ns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name(format!("health {addr}"))
            .spawn({
                let stop = stop.clone();
                move || serve(listener, &stop, &health)
            })
            .context("spawning the health server thread")?;
        Ok(HealthServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool, health: &SharedHealth) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = answer(stream, health.get()) {
                    tracing::debug!("health request from {peer} failed: {error}");
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(error) => {
                tracing::warn!("health server accept failed: {error}");
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn answer(mut stream: TcpStream, health: HealthEndpoint) -> io::Result<()> {
    if health == HealthEndpoint::Unreachable {
        // A zero linger turns the close into a reset, what a port nobody serves any more answers.
        let reset = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &reset)?;
        return Ok(());
    }
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let request = read_head(&mut stream)?;
    let path = request
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("");
    let path = path.split('?').next().unwrap_or(path);
    let (status, body) = match path {
        "/health" if health == HealthEndpoint::Alive => ("200 OK", "alive"),
        "/health" => ("503 Service Unavailable", "Not connected to core"),
        _ => ("404 Not Found", "Not found"),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Reads up to the blank line ending the request head; the body, if any, is not needed.
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
