//! Reaching a balancer's API: over its Unix socket (a path), or over TCP (`http://` or
//! `https://` URL) with a bearer token and/or a client certificate.

use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::v1::control_client::ControlClient;
use crate::v1::events_client::EventsClient;
use crate::v1::gateway_agents_client::GatewayAgentsClient;
use crate::v1::health_ingest_client::HealthIngestClient;
use crate::v1::session_sync_client::SessionSyncClient;

/// A balancer that has not accepted a connection by then is not going to.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// HTTP/2 pings on long-lived streams (events, health reports, session sync): a peer gone
/// silent (a partition, a dead host) is noticed in seconds rather than at TCP's timeout.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where and how to reach a balancer.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// A Unix socket path, or an `http://` / `https://` URL.
    pub address: String,
    pub token: Option<String>,
    /// CA to verify the balancer's certificate with (https).
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (https).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Why the API could not be reached (as opposed to a request it refused).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the balancer's API at {address}: {reason}")]
pub struct Unreachable {
    pub address: String,
    pub reason: String,
}

/// Adds the bearer token, when there is one, to every request.
#[derive(Clone)]
pub struct SendToken(Option<Arc<MetadataValue<tonic::metadata::Ascii>>>);

impl Interceptor for SendToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.as_ref().clone());
        }
        Ok(request)
    }
}

pub type AuthChannel = InterceptedService<Channel, SendToken>;

/// A connection to one balancer, with a client per service.
#[derive(Clone)]
pub struct Connection {
    pub control: ControlClient<AuthChannel>,
    pub health: HealthIngestClient<AuthChannel>,
    pub events: EventsClient<AuthChannel>,
    pub sync: SessionSyncClient<AuthChannel>,
    pub agents: GatewayAgentsClient<AuthChannel>,
}

impl Target {
    pub async fn connect(&self) -> Result<Connection, Unreachable> {
        let unreachable = |reason: String| Unreachable {
            address: self.address.clone(),
            reason,
        };
        let channel = if self.address.starts_with("http://") || self.address.starts_with("https://")
        {
            let mut endpoint = Endpoint::from_shared(self.address.clone())
                .map_err(|e| unreachable(format!("not a URL: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .keep_alive_while_idle(true);
            if self.address.starts_with("https://") {
                let mut tls = ClientTlsConfig::new();
                if let Some(ca) = &self.ca {
                    let pem = std::fs::read(ca)
                        .map_err(|e| unreachable(format!("cannot read {}: {e}", ca.display())))?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                if let Some((cert, key)) = &self.identity {
                    let read = |p: &PathBuf| {
                        std::fs::read(p)
                            .map_err(|e| unreachable(format!("cannot read {}: {e}", p.display())))
                    };
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
            }
            endpoint
                .connect()
                .await
                .map_err(|e| unreachable(error_chain(&e)))?
        } else {
            let path = PathBuf::from(&self.address);
            // The URI is a placeholder: the connector below decides where to connect.
            Endpoint::from_static("http://wglb.invalid")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
                .map_err(|e| unreachable(error_chain(&e)))?
        };
        let token = match &self.token {
            Some(token) => {
                Some(Arc::new(format!("Bearer {token}").parse().map_err(
                    |_| unreachable("the token is not printable ASCII".into()),
                )?))
            }
            None => None,
        };
        let intercepted = InterceptedService::new(channel, SendToken(token));
        Ok(Connection {
            control: ControlClient::new(intercepted.clone()),
            health: HealthIngestClient::new(intercepted.clone()),
            events: EventsClient::new(intercepted.clone()),
            sync: SessionSyncClient::new(intercepted.clone()),
            agents: GatewayAgentsClient::new(intercepted),
        })
    }
}

/// A bearer token kept in a file (as `openssl rand -hex 32 > FILE` writes it: one line).
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// An error with its causes, which is where transport errors say what actually went wrong.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    with_causes(error.to_string(), error.source())
}

/// `text` followed by each cause that it does not already say (transport errors often repeat
/// their cause in their own message).
pub fn with_causes(mut text: String, mut cause: Option<&dyn std::error::Error>) -> String {
    while let Some(error) = cause {
        let said = error.to_string();
        if !text.contains(&said) {
            text += &format!(": {said}");
        }
        cause = error.source();
    }
    text
}
