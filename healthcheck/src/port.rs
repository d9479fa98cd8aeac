//! Whether anything listens on a gateway's UDP port, without any configuration: the kernel
//! answers a datagram to a closed UDP port with ICMP port unreachable, which a connected socket
//! reports as ECONNREFUSED. WireGuard answers nothing to a datagram it cannot authenticate, so
//! silence is all a listening gateway gives; only the refusal is a verdict.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

/// What the port probe learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Refused: nothing listens (the WireGuard process or interface is gone).
    Closed,
    /// No refusal within the timeout: something listens, or ICMP is filtered.
    NotRefused,
}

/// Sends an empty datagram, which WireGuard ignores, and waits `timeout` for a refusal.
pub async fn probe_port(target: SocketAddr, timeout: Duration) -> std::io::Result<PortState> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    socket.send(&[]).await?;
    let mut buffer = [0u8; 64];
    match tokio::time::timeout(timeout, socket.recv(&mut buffer)).await {
        Err(_) => Ok(PortState::NotRefused),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => Ok(PortState::Closed),
        Ok(Err(e)) => Err(e),
        // Something answered an empty datagram: whatever it is, it listens.
        Ok(Ok(_)) => Ok(PortState::NotRefused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_refused_and_an_open_one_is_not() {
        let timeout = Duration::from_millis(300);
        let open = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = open.local_addr().unwrap();
        assert_eq!(
            probe_port(address, timeout).await.unwrap(),
            PortState::NotRefused
        );
        drop(open);
        assert_eq!(
            probe_port(address, timeout).await.unwrap(),
            PortState::Closed
        );
    }
}
