//! `[api]`: where the API is served and who may use it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Where the gRPC API is served. The Unix socket is always on (its file mode decides who may
/// drive the balancer); TCP only when configured, and then only authenticated unless
/// `allow_unauthenticated` says otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// The group that owns the socket, so its members may use the CLI without root.
    pub socket_group: Option<String>,
    pub tcp: Option<SocketAddr>,
    /// A file holding the bearer token TCP clients must present.
    pub token_file: Option<PathBuf>,
    /// Server certificate and key (PEM) for TLS on TCP.
    pub tls: Option<TlsFiles>,
    /// CA (PEM) that client certificates must chain to: mutual TLS.
    pub client_ca: Option<PathBuf>,
    pub allow_unauthenticated: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the API listens unless configured otherwise, and where the CLI looks for it.
pub const DEFAULT_API_SOCKET: &str = "/run/wglb/api.sock";

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from(DEFAULT_API_SOCKET),
            socket_mode: 0o660,
            socket_group: None,
            tcp: None,
            token_file: None,
            tls: None,
            client_ca: None,
            allow_unauthenticated: false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) socket: Option<PathBuf>,
    /// Octal, as a string: "0660".
    pub(super) socket_mode: Option<String>,
    pub(super) socket_group: Option<String>,
    pub(super) tcp: Option<SocketAddr>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) allow_unauthenticated: Option<bool>,
}

pub(super) fn build_api(raw: RawApi, place: &str) -> Result<ApiConfig, ConfigError> {
    let err = |field: &str, reason: &str| ConfigError {
        place: place.into(),
        field: field.into(),
        reason: reason.into(),
    };
    let defaults = ApiConfig::default();
    let socket_mode = match raw.socket_mode {
        Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                err(
                    "socket_mode",
                    "expected an octal file mode such as \"0660\"",
                )
            })?,
        None => defaults.socket_mode,
    };
    let tls = match (raw.tls_cert, raw.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => return Err(err("tls_cert", "tls_cert and tls_key go together")),
    };
    if raw.client_ca.is_some() && tls.is_none() {
        return Err(err(
            "client_ca",
            "client certificates need TLS: set tls_cert and tls_key too",
        ));
    }
    let allow_unauthenticated = raw.allow_unauthenticated.unwrap_or(false);
    if raw.tcp.is_some()
        && raw.token_file.is_none()
        && raw.client_ca.is_none()
        && !allow_unauthenticated
    {
        return Err(err(
            "tcp",
            "a TCP API needs a token_file or client_ca (mutual TLS); anyone reaching the port could \
             otherwise drive the balancer (set allow_unauthenticated = true to accept that)",
        ));
    }
    let socket = raw.socket.unwrap_or(defaults.socket);
    if socket.as_os_str().is_empty() {
        return Err(err("socket", "must not be empty"));
    }
    if raw.socket_group.as_deref() == Some("") {
        return Err(err("socket_group", "must not be empty"));
    }
    Ok(ApiConfig {
        socket,
        socket_mode,
        socket_group: raw.socket_group,
        tcp: raw.tcp,
        token_file: raw.token_file,
        tls,
        client_ca: raw.client_ca,
        allow_unauthenticated,
    })
}
