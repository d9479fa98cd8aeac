//! Many WireGuard clients in one process (boringtun's Noise, no tunnel device): each has a key of
//! its own and a UDP port of one namespace's address, completes a handshake through the
//! balancer, and answers handshakes its gateway starts, noting when. Hundreds of wireguard-go
//! processes would not fit on two cores; this answers what a re-homing benchmark asks of a
//! client (that it is called, and answers) and nothing else (no data through the tunnel).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::netns::Netns;

/// A first handshake not answered by then is sent again (WireGuard's REKEY_TIMEOUT).
const RESEND_AFTER: Duration = Duration::from_secs(5);
const HANDSHAKE_INITIATION: u8 = 1;

/// What one client saw, by wall clock.
#[derive(Clone, Debug, Default)]
pub struct ClientLog {
    /// When its own first handshake completed.
    pub connected: Option<SystemTime>,
    /// When a gateway's handshake initiation reached it and it answered, each time.
    pub called: Vec<SystemTime>,
}

pub struct Swarm {
    logs: Arc<Mutex<Vec<ClientLog>>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

struct Client {
    socket: UdpSocket,
    tunn: Tunn,
    sent_at: Option<Instant>,
}

impl Swarm {
    /// `count` keys, their public halves as `wg` writes them (to be added as the gateways'
    /// peers before [`Swarm::start`]).
    pub fn keys(count: usize) -> (Vec<StaticSecret>, Vec<String>) {
        let secrets: Vec<StaticSecret> = (0..count)
            .map(|_| {
                let mut key = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
                StaticSecret::from(key)
            })
            .collect();
        let public = secrets
            .iter()
            .map(|s| {
                base64::engine::general_purpose::STANDARD.encode(PublicKey::from(s).as_bytes())
            })
            .collect();
        (secrets, public)
    }

    /// The clients of `secrets`, on ports `first_port..` of `address` in `ns`, each handshaking
    /// with `server` (whose static key is `server_key`, base64) at once.
    pub fn start(
        ns: &Netns,
        address: IpAddr,
        first_port: u16,
        server: SocketAddr,
        server_key: &str,
        secrets: Vec<StaticSecret>,
    ) -> Result<Swarm> {
        let key: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(server_key)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a key is 32 bytes"))?;
        let server_key = PublicKey::from(key);
        let count = secrets.len();
        let sockets = ns.run(move || -> Result<Vec<UdpSocket>> {
            (0..count)
                .map(|i| {
                    let socket = UdpSocket::bind(SocketAddr::new(address, first_port + i as u16))?;
                    socket.connect(server)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket)
                })
                .collect()
        })??;
        let clients: Vec<Client> = sockets
            .into_iter()
            .zip(secrets)
            .enumerate()
            .map(|(i, (socket, secret))| Client {
                socket,
                tunn: Tunn::new(secret, server_key, None, None, (i as u32 + 1) << 4, None),
                sent_at: None,
            })
            .collect();
        let logs = Arc::new(Mutex::new(vec![ClientLog::default(); count]));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = std::thread::Builder::new()
            .name("swarm".into())
            .spawn({
                let (logs, stop) = (logs.clone(), stop.clone());
                move || run(clients, &logs, &stop)
            })
            .context("starting the swarm's thread")?;
        Ok(Swarm {
            logs,
            stop,
            worker: Some(worker),
        })
    }

    /// What each client saw so far.
    pub fn logs(&self) -> Vec<ClientLog> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// One thread polls every client's socket: a handshake message in, its answer out.
fn run(mut clients: Vec<Client>, logs: &Mutex<Vec<ClientLog>>, stop: &AtomicBool) {
    let mut datagram = [0u8; 2048];
    let mut out = [0u8; 2048];
    let mut fds: Vec<libc::pollfd> = clients
        .iter()
        .map(|c| libc::pollfd {
            fd: c.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        for client in clients.iter_mut() {
            let due = client.sent_at.is_none_or(|at| at.elapsed() >= RESEND_AFTER);
            if due && client.tunn.time_since_last_handshake().is_none() {
                if let TunnResult::WriteToNetwork(packet) =
                    client.tunn.format_handshake_initiation(&mut out, true)
                {
                    let _ = client.socket.send(packet);
                }
                client.sent_at = Some(Instant::now());
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the whole call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready <= 0 {
            continue;
        }
        for (i, fd) in fds.iter_mut().enumerate() {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            fd.revents = 0;
            let client = &mut clients[i];
            while let Ok(length) = client.socket.recv(&mut datagram) {
                let message = &datagram[..length];
                let called = message.first() == Some(&HANDSHAKE_INITIATION);
                let connected = client.tunn.time_since_last_handshake().is_some();
                let mut answered = false;
                let mut result = client.tunn.decapsulate(None, message, &mut out);
                // boringtun queues what follows a handshake: drained with empty datagrams.
                while let TunnResult::WriteToNetwork(packet) = result {
                    answered |= client.socket.send(packet).is_ok();
                    result = client.tunn.decapsulate(None, &[], &mut out);
                }
                let mut logs = logs.lock().unwrap_or_else(PoisonError::into_inner);
                if called && answered {
                    logs[i].called.push(SystemTime::now());
                } else if !connected && client.tunn.time_since_last_handshake().is_some() {
                    logs[i].connected = Some(SystemTime::now());
                }
            }
        }
    }
}
