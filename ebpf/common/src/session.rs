//! What to do with a client's datagram given what the datapath holds for it, and which gateway
//! messages confirm a session: decided here once, for the userspace relay and the XDP program
//! alike (each finds the session its own way and carries the action out with its own means).

use crate::wireguard::MessageType;

/// What a datapath found for a client's datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The session's gateway still keeps sessions (up or failing open, active or draining, at the
    /// address the session was placed at).
    pub keeps: bool,
    /// The session is a peer balancer's (a standby entry), not this balancer's.
    pub standby: bool,
    /// Its gateway has answered on it (see [`confirms`]).
    pub confirmed: bool,
    /// Its gateway has answered since the datapath last looked: it is to be confirmed now.
    pub answered: bool,
}

/// What becomes of a client's datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// On to the session's gateway.
    Forward,
    /// The session leaves probation (its gateway answered), then on to its gateway.
    Confirm,
    /// A peer's session: this balancer forwards it from now on, to the gateway the peer had.
    TakeOver,
    /// Its gateway no longer keeps it: the session goes, and the client is placed again (its
    /// next handshake lands on the new gateway), as Katran's UDP flow migration does.
    Replace,
}

/// The action for a datagram of a client that has a session; a client without one is placed.
#[inline(always)]
pub fn on_client_datagram(found: Found) -> ClientAction {
    if !found.keeps {
        ClientAction::Replace
    } else if found.standby {
        ClientAction::TakeOver
    } else if !found.confirmed && found.answered {
        ClientAction::Confirm
    } else {
        ClientAction::Forward
    }
}

/// Whether a gateway's message confirms its session: a handshake response or data proves the
/// gateway holds keys for the client. A cookie reply does not: a gateway under load sends one to
/// any initiation whose mac1 is right, and anyone who knows the public key computes mac1.
#[inline(always)]
pub fn confirms(kind: MessageType) -> bool {
    matches!(
        kind,
        MessageType::HandshakeResponse | MessageType::TransportData
    )
}

/// Whether a new session is admitted against its source's budget: not one a peer balancer
/// forwarded (its gateway answered there), which this balancer takes over confirmed.
#[inline(always)]
pub fn needs_admission(from_peer: bool) -> bool {
    !from_peer
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: Found = Found {
        keeps: true,
        standby: false,
        confirmed: true,
        answered: false,
    };

    #[test]
    fn what_becomes_of_a_clients_datagram() {
        assert_eq!(on_client_datagram(LIVE), ClientAction::Forward);
        let gone = Found {
            keeps: false,
            ..LIVE
        };
        assert_eq!(on_client_datagram(gone), ClientAction::Replace);
        let peers = Found {
            standby: true,
            ..LIVE
        };
        assert_eq!(on_client_datagram(peers), ClientAction::TakeOver);
        // A peer's session on a gateway gone is placed anew, not taken over.
        let peers_gone = Found {
            keeps: false,
            ..peers
        };
        assert_eq!(on_client_datagram(peers_gone), ClientAction::Replace);
        let waiting = Found {
            confirmed: false,
            ..LIVE
        };
        assert_eq!(on_client_datagram(waiting), ClientAction::Forward);
        let answered = Found {
            answered: true,
            ..waiting
        };
        assert_eq!(on_client_datagram(answered), ClientAction::Confirm);
    }

    #[test]
    fn only_a_response_or_data_confirms() {
        assert!(confirms(MessageType::HandshakeResponse));
        assert!(confirms(MessageType::TransportData));
        assert!(!confirms(MessageType::CookieReply));
        assert!(!confirms(MessageType::HandshakeInitiation));
        assert!(needs_admission(false) && !needs_admission(true));
    }
}
