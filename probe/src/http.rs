//! Defguard's gateway health contract: `GET /health` on the health port answers `200 alive` while
//! Core's stream to the gateway is up and `503 Not connected to core` otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What `/health` answers while the gateway lives but Core's stream to it is down.
pub const CORE_DETACHED: u16 = 503;

/// One `GET path` against `target`: the status code, or what went wrong before there was one.
pub async fn probe_http(target: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: wglb\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        // The status line is all we need; a gateway's answer is tiny.
        let mut head = Vec::with_capacity(128);
        let mut chunk = [0u8; 128];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<u16>)) {
            (Some(version), Some(Ok(code))) if version.starts_with("HTTP/") => Ok(code),
            _ => Err(format!(
                "not an HTTP response: {:?}",
                line.chars().take(60).collect::<String>()
            )),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Serves one canned response per connection on loopback.
    async fn server(response: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                if !response.is_empty() {
                    let _ = stream.write_all(response).await;
                }
                // An empty response means: hold the connection open and say nothing.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn reads_defguards_answers() {
        let timeout = Duration::from_millis(300);
        let alive = server(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nalive").await;
        assert_eq!(probe_http(alive, "/health", timeout).await, Ok(200));
        let detached =
            server(b"HTTP/1.1 503 Service Unavailable\r\n\r\nNot connected to core").await;
        assert_eq!(probe_http(detached, "/health", timeout).await, Ok(503));
        let silent = server(b"").await;
        let err = probe_http(silent, "/health", timeout).await.unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        let junk = server(b"SSH-2.0-OpenSSH\r\n").await;
        let err = probe_http(junk, "/health", timeout).await.unwrap_err();
        assert!(err.contains("not an HTTP response"), "{err}");
        // Nothing listens on a port we just released.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = probe_http(closed, "/health", timeout).await.unwrap_err();
        assert!(err.contains("connect"), "{err}");
    }
}
