//! Where the API is served. Always on a Unix socket, whose file mode decides who may drive the
//! balancer; on TCP only when configured, and then behind a bearer token and/or mutual TLS (an
//! unauthenticated TCP API must be asked for by name).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use super::pb::control_server::ControlServer;
use super::pb::events_server::EventsServer;
use super::pb::gateway_agents_server::GatewayAgentsServer;
use super::pb::health_ingest_server::HealthIngestServer;
use super::pb::session_sync_server::SessionSyncServer;
use super::service::Api;
use crate::config::{ApiConfig, SyncPeerConfig};

/// Checks the `authorization: Bearer ...` header when a token is set.
#[derive(Clone)]
pub struct RequireToken(Option<Arc<str>>);

pub(crate) fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        match bearer(&request) {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong API token")),
            None => Err(Status::unauthenticated(
                "this API needs a bearer token (authorization: Bearer ...)",
            )),
        }
    }
}

/// The peer balancer a sync stream comes from, as its credential says: set on the request by
/// [`SyncAuth`], read by the SessionSync service.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Arc<str>);

/// The SessionSync service's check: a token of a configured peer (`accept_token_file`) names that
/// peer; anything else must pass the API's own check, and then names no one.
#[derive(Clone)]
struct SyncAuth {
    api: RequireToken,
    /// (token, peer name).
    peers: Arc<[(Arc<str>, Arc<str>)]>,
}

impl Interceptor for SyncAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let peer = bearer(&request).and_then(|given| {
            self.peers
                .iter()
                .find(|(token, _)| constant_time_eq(given.as_bytes(), token.as_bytes()))
                .map(|(_, name)| name.clone())
        });
        match peer {
            Some(name) => {
                request.extensions_mut().insert(PeerIdentity(name));
                Ok(request)
            }
            None => self.api.call(request),
        }
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The API's sockets, bound before the balancer reports itself started so that a bad path or a
/// taken port fails the start instead of a background task.
pub struct ApiServer {
    unix: UnixListener,
    socket: SocketFile,
    tcp: Option<(TcpListener, Option<ServerTlsConfig>, RequireToken)>,
    /// (token, name) of the peers that push with a token of their own.
    sync_peers: Arc<[(Arc<str>, Arc<str>)]>,
}

/// The socket file; removed on drop if it is still ours (a newer balancer may have replaced it).
struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl ApiServer {
    pub async fn bind(config: &ApiConfig, peers: &[SyncPeerConfig]) -> anyhow::Result<ApiServer> {
        let group = match &config.socket_group {
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .with_context(|| format!("cannot look up the API socket's group `{name}`"))?
                    .with_context(|| format!("the API socket's group `{name}` does not exist"))?
                    .gid,
            ),
            None => None,
        };
        let (unix, socket) = bind_unix(&config.socket, config.socket_mode, group)?;
        let tcp = match config.tcp {
            Some(address) => {
                let token = match &config.token_file {
                    Some(path) => Some(read_token(path)?),
                    None => None,
                };
                let tls = match &config.tls {
                    Some(files) => {
                        let identity = Identity::from_pem(
                            read(&files.cert, "TLS certificate")?,
                            read(&files.key, "TLS key")?,
                        );
                        let mut tls = ServerTlsConfig::new().identity(identity);
                        if let Some(ca) = &config.client_ca {
                            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
                        }
                        Some(tls)
                    }
                    None => None,
                };
                if token.is_some() && tls.is_none() {
                    tracing::warn!(%address, "the API token travels in clear text over TCP without TLS: set tls_cert and tls_key unless the network is trusted");
                }
                let listener = TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot serve the API on {address}"))?;
                Some((listener, tls, RequireToken(token)))
            }
            None => None,
        };
        let sync_peers = peers
            .iter()
            .filter_map(|peer| {
                let file = peer.accept_token_file.as_ref()?;
                Some(read_token(file).map(|token| (token, peer.name.as_str().into())))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(ApiServer {
            unix,
            socket,
            tcp,
            sync_peers,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    pub fn tcp_address(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _, _)| l.local_addr().ok())
    }

    /// Serves until the returned future is dropped or a server fails.
    pub async fn run(self, api: Api) -> anyhow::Result<()> {
        let ApiServer {
            unix,
            socket,
            tcp,
            sync_peers,
        } = self;
        let local = Server::builder()
            .add_service(ControlServer::new(api.clone()))
            .add_service(HealthIngestServer::new(api.clone()))
            .add_service(EventsServer::new(api.clone()))
            .add_service(SessionSyncServer::new(api.clone()))
            .add_service(GatewayAgentsServer::new(api.clone()))
            .serve_with_incoming(UnixListenerStream::new(unix));
        let remote = async move {
            let Some((listener, tls, token)) = tcp else {
                return std::future::pending().await;
            };
            // Pings find a peer gone silent (a partition) on a long-lived stream in seconds.
            let keepalive = Some(std::time::Duration::from_secs(5));
            let mut builder = Server::builder()
                .http2_keepalive_interval(keepalive)
                .http2_keepalive_timeout(keepalive);
            if let Some(tls) = tls {
                builder = builder.tls_config(tls).context("TLS configuration")?;
            }
            builder
                .add_service(ControlServer::with_interceptor(api.clone(), token.clone()))
                .add_service(HealthIngestServer::with_interceptor(
                    api.clone(),
                    token.clone(),
                ))
                .add_service(EventsServer::with_interceptor(api.clone(), token.clone()))
                // Agents authenticate with their own tokens, which the service checks.
                .add_service(GatewayAgentsServer::new(api.clone()))
                .add_service(SessionSyncServer::with_interceptor(
                    api,
                    SyncAuth {
                        api: token,
                        peers: sync_peers,
                    },
                ))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .context("TCP API server")
        };
        let result = tokio::select! {
            result = local => result.context("Unix socket API server"),
            result = remote => result,
        };
        drop(socket);
        result
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read the API's {what} {}", path.display()))
}

fn read_token(path: &Path) -> anyhow::Result<Arc<str>> {
    let text = String::from_utf8(read(path, "token file")?)
        .with_context(|| format!("{} is not text", path.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        bail!(
            "the API token in {} is shorter than 16 characters; use e.g. `openssl rand -hex 32`",
            path.display()
        );
    }
    Ok(token.into())
}

/// Binds the Unix socket with `mode`, owned by `group` if given. A socket left over by a
/// balancer that died is replaced; anything else at the path (a live balancer's socket, a file)
/// is refused rather than taken over or deleted.
fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<nix::unistd::Gid>,
) -> anyhow::Result<(UnixListener, SocketFile)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {} for the API socket", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!(
                "{} exists and is not a socket; refusing to replace it with the API socket",
                path.display()
            )
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            bail!("another process (a running wglb?) serves on {}; stop it or set another [api] socket", path.display())
        }
        Ok(_) => fs::remove_file(path)
            .with_context(|| format!("cannot replace the stale socket {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot serve the API on {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(group) = group {
        nix::unistd::chown(path, None, Some(group))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    let inode = fs::metadata(path)?.ino();
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_replaces_only_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("wglb-serve-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-socket");
        fs::write(&file, "keep me").unwrap();
        let err = bind_unix(&file, 0o660, None).err().unwrap().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");

        let live = dir.join("live.sock");
        let _serving = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let err = bind_unix(&live, 0o660, None).err().unwrap().to_string();
        assert!(err.contains("another process"), "{err}");

        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let (_listener, socket) = bind_unix(&stale, 0o600, None).unwrap();
        let mode = fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(socket);
        assert!(!stale.exists(), "the socket file outlived its server");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_are_checked_whole() {
        let mut check = RequireToken(Some("0123456789abcdef".into()));
        let with = |value: &str| {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
            request
        };
        assert!(check.call(with("Bearer 0123456789abcdef")).is_ok());
        assert!(check.call(with("Bearer 0123456789abcdeX")).is_err());
        assert!(check.call(with("Bearer 0123456789abcde")).is_err());
        assert!(check.call(with("0123456789abcdef")).is_err());
        assert!(check.call(Request::new(())).is_err());
        assert!(RequireToken(None).call(Request::new(())).is_ok());
    }
}
