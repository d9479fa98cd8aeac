//! A real WireGuard handshake with a gateway, from a probe peer: the sidecar's own key pair,
//! whose public key is a peer on every gateway of the location. Only a gateway whose WireGuard
//! works, has its interface, and knows the probe peer completes it, so this proves the data plane
//! itself, which Defguard's `/health` does not. The Noise handshake is boringtun's (Cloudflare's
//! maintained implementation), not hand-written cryptography.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::net::UdpSocket;

/// WireGuard's message type of a cookie reply (a gateway under load asks the initiator to prove
/// its address before it spends a handshake on it).
const COOKIE_REPLY: u8 = 3;

/// A completed handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// From the first initiation sent to the response.
    pub rtt: Duration,
    /// The gateway answered with a cookie reply first, and the retry carried the cookie.
    pub after_cookie: bool,
}

/// Why a handshake did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// ICMP port unreachable: nothing listens on the port.
    Refused,
    /// No answer within the timeout: the data plane is dead, or it does not know the probe peer
    /// (WireGuard answers nothing to an initiation it cannot authenticate).
    Silent,
    /// An answer that does not complete a handshake.
    Rejected(String),
    /// The probe itself could not run.
    Local(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => write!(f, "port unreachable: nothing listens"),
            Failure::Silent => write!(
                f,
                "no handshake response (WireGuard down, or the probe peer is not configured)"
            ),
            Failure::Rejected(why) => write!(f, "bad handshake answer: {why}"),
            Failure::Local(why) => write!(f, "cannot probe: {why}"),
        }
    }
}

/// Parses a WireGuard key as `wg genkey` and `wg pubkey` print it (base64 of 32 bytes).
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not a WireGuard key (base64 of 32 bytes): {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("not a WireGuard key: {} bytes, not 32", bytes.len()))
}

/// Handshakes with the WireGuard endpoint `target`, whose static public key is `gateway`, as the
/// peer whose private key is `probe`.
pub async fn probe_handshake(
    target: SocketAddr,
    probe: &StaticSecret,
    gateway: &PublicKey,
    timeout: Duration,
) -> Result<Handshake, Failure> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let local_error = |e: std::io::Error| Failure::Local(e.to_string());
    let socket = UdpSocket::bind(local).await.map_err(local_error)?;
    socket.connect(target).await.map_err(local_error)?;
    // A fresh sender index per probe (boringtun takes 24 bits of it).
    let index = rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8;
    let mut tunn = Tunn::new(probe.clone(), *gateway, None, None, index, None);
    let mut datagram = [0u8; 256];
    let mut out = [0u8; 256];
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + timeout);
    let mut after_cookie = false;
    send_initiation(&mut tunn, &socket, &mut out).await?;
    loop {
        let received = tokio::time::timeout_at(deadline, socket.recv(&mut datagram)).await;
        let length = match received {
            Err(_) => return Err(Failure::Silent),
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return Err(Failure::Refused),
            Ok(Err(e)) => return Err(local_error(e)),
            Ok(Ok(length)) => length,
        };
        let message = &datagram[..length];
        match tunn.decapsulate(Some(target.ip()), message, &mut out) {
            // The keepalive that confirms the new session to the gateway.
            TunnResult::WriteToNetwork(packet) => {
                let _ = socket.send(packet).await;
            }
            TunnResult::Err(e) => return Err(Failure::Rejected(format!("{e:?}"))),
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {}
        }
        if tunn.time_since_last_handshake().is_some() {
            return Ok(Handshake {
                rtt: started.elapsed(),
                after_cookie,
            });
        }
        if message.first() == Some(&COOKIE_REPLY) && !after_cookie {
            // boringtun keeps the cookie; the new initiation carries it.
            after_cookie = true;
            send_initiation(&mut tunn, &socket, &mut out).await?;
        }
    }
}

async fn send_initiation(
    tunn: &mut Tunn,
    socket: &UdpSocket,
    out: &mut [u8],
) -> Result<(), Failure> {
    match tunn.format_handshake_initiation(out, true) {
        TunnResult::WriteToNetwork(packet) => match socket.send(packet).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Err(Failure::Refused),
            Err(e) => Err(Failure::Local(e.to_string())),
        },
        other => Err(Failure::Local(format!(
            "boringtun made no initiation: {}",
            describe(&other)
        ))),
    }
}

fn describe(result: &TunnResult<'_>) -> String {
    match result {
        TunnResult::Done => "done".into(),
        TunnResult::Err(e) => format!("{e:?}"),
        TunnResult::WriteToNetwork(_) => "a packet".into(),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => "tunnel data".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A responder in-process, also boringtun: enough to check the probe's side of the
    /// exchange. The netns tests handshake with real wireguard-go gateways.
    async fn responder(
        gateway: StaticSecret,
        probe_public: PublicKey,
        under_load: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        // A limit of 0 handshakes: always under load, so every initiation without a cookie is
        // answered with a cookie reply.
        let limiter = under_load.then(|| {
            std::sync::Arc::new(boringtun::noise::rate_limiter::RateLimiter::new(
                &PublicKey::from(&gateway),
                0,
            ))
        });
        let task = tokio::spawn(async move {
            let mut tunn = Tunn::new(gateway, probe_public, None, None, 7, limiter);
            let mut datagram = [0u8; 256];
            let mut out = [0u8; 256];
            while let Ok((length, from)) = socket.recv_from(&mut datagram).await {
                if let TunnResult::WriteToNetwork(packet) =
                    tunn.decapsulate(Some(from.ip()), &datagram[..length], &mut out)
                {
                    let _ = socket.send_to(packet, from).await;
                }
            }
        });
        (address, task)
    }

    fn keys() -> (StaticSecret, PublicKey) {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret);
        (secret, public)
    }

    #[tokio::test]
    async fn completes_with_a_peer_that_knows_the_probe_and_fails_otherwise() {
        let timeout = Duration::from_millis(500);
        let (gateway_secret, gateway_public) = keys();
        let (probe_secret, probe_public) = keys();
        let (address, task) = responder(gateway_secret.clone(), probe_public, false).await;
        let done = probe_handshake(address, &probe_secret, &gateway_public, timeout)
            .await
            .unwrap();
        assert!(!done.after_cookie && done.rtt < timeout);

        // A probe key the gateway does not know: silence.
        let (stranger, _) = keys();
        assert_eq!(
            probe_handshake(address, &stranger, &gateway_public, timeout).await,
            Err(Failure::Silent)
        );
        // Nothing listening: refused.
        task.abort();
        let _ = task.await;
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(
            probe_handshake(address, &probe_secret, &gateway_public, timeout).await,
            Err(Failure::Refused)
        );
    }

    #[tokio::test]
    async fn a_gateway_under_load_is_answered_with_its_cookie() {
        let (gateway_secret, gateway_public) = keys();
        let (probe_secret, probe_public) = keys();
        let (address, task) = responder(gateway_secret, probe_public, true).await;
        let done = probe_handshake(
            address,
            &probe_secret,
            &gateway_public,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert!(done.after_cookie);
        task.abort();
    }

    #[test]
    fn keys_parse_as_wg_prints_them() {
        let key = parse_key("YOdlS0GwLFoX5bRhvGtb0ovfsuRoxQbLpAbqqV5qz2Q=\n").unwrap();
        assert_eq!(key.len(), 32);
        assert!(parse_key("not a key").is_err());
    }
}
