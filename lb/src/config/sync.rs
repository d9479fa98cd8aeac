//! `[sync]`: session sync with the other balancers of a site (`crate::sync`).

use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ApiConfig, ConfigError, Origin, TlsFiles};

/// Session sync with peer balancers. Fixed for the process's life: a reload does not change it.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncConfig {
    /// This balancer's name among its peers (default: the host name).
    pub node: String,
    pub peers: Vec<SyncPeerConfig>,
    /// Changes queued per peer; beyond it they are dropped (counted) and the peer is resynced.
    pub queue: usize,
}

/// A peer balancer this one pushes its sessions to, through the peer's TCP API.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncPeerConfig {
    pub name: String,
    /// `http://` or `https://` URL of the peer's `[api] tcp`.
    pub url: String,
    /// The bearer token this balancer presents to the peer's API.
    pub token_file: Option<PathBuf>,
    /// The token the peer presents when it pushes its sessions here: its identity. Without one,
    /// the peer is whoever holds this balancer's API credentials and says it is this peer.
    pub accept_token_file: Option<PathBuf>,
    /// CA to verify the peer's certificate with.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, when the peer asks for mutual TLS.
    pub identity: Option<TlsFiles>,
}

pub const DEFAULT_SYNC_QUEUE: usize = 65_536;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    node: Option<String>,
    queue: Option<usize>,
    #[serde(default)]
    peer: Vec<Spanned<RawSyncPeer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSyncPeer {
    name: String,
    url: String,
    token_file: Option<PathBuf>,
    accept_token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

pub(super) fn build_sync(
    raw: Option<Spanned<RawSync>>,
    api: &ApiConfig,
    origin: Origin<'_>,
) -> Result<SyncConfig, ConfigError> {
    let span = raw.as_ref().map(|r| r.span());
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let err = |span: Option<Range<usize>>, what: &str, field: &str, reason: &str| ConfigError {
        place: origin.place(span, what),
        field: field.into(),
        reason: reason.into(),
    };
    let node = match raw.node {
        Some(node) => node,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "wglb".into()),
    };
    if node.is_empty() || node.len() > 64 {
        return Err(err(span, "[sync]", "node", "must be 1 to 64 characters"));
    }
    let queue = raw.queue.unwrap_or(DEFAULT_SYNC_QUEUE);
    if !(64..=16_777_216).contains(&queue) {
        return Err(err(
            span,
            "[sync]",
            "queue",
            "must be from 64 to 16777216 changes",
        ));
    }
    if !raw.peer.is_empty() && api.tcp.is_none() {
        return Err(err(
            span,
            "[sync]",
            "peer",
            "peers push their sessions to this balancer's TCP API too: set [api] tcp (with a \
             token_file or client_ca) on every balancer of the group",
        ));
    }
    let mut peers: Vec<SyncPeerConfig> = Vec::new();
    for spanned in raw.peer {
        let span = Some(spanned.span());
        let peer = spanned.into_inner();
        let err = |field: &str, reason: &str| err(span.clone(), "[[sync.peer]]", field, reason);
        if peer.name.is_empty() || peer.name == node {
            return Err(err(
                "name",
                "must be set and differ from this balancer's node name",
            ));
        }
        if peers.iter().any(|p| p.name == peer.name) {
            return Err(err(
                "name",
                &format!("peer `{}` is defined twice", peer.name),
            ));
        }
        let https = peer.url.starts_with("https://");
        if !https && !peer.url.starts_with("http://") {
            return Err(err(
                "url",
                "expected the peer's API as http://HOST:PORT or https://HOST:PORT",
            ));
        }
        let identity = match (peer.cert, peer.key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(err("cert", "cert and key go together")),
        };
        if (identity.is_some() || peer.ca.is_some()) && !https {
            return Err(err(
                "url",
                "a CA or client certificate needs an https:// URL",
            ));
        }
        peers.push(SyncPeerConfig {
            name: peer.name,
            url: peer.url,
            token_file: peer.token_file,
            accept_token_file: peer.accept_token_file,
            ca: peer.ca,
            identity,
        });
    }
    Ok(SyncConfig { node, peers, queue })
}
