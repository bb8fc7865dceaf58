//! Ephemeral peers (a CI job's, Fly's `ephemeral`): when one is due for
//! removal. Pure: the caller brings the clock and what the gateway saw.
//!
//! An ephemeral peer lives TTL ([`Peer::ephemeral`], seconds) from its
//! creation if it never connects, and TTL from its last activity (the last
//! handshake or packet the gateway saw) once it has. So a job's peer that
//! keeps its tunnel up stays as long as the job runs, and one whose job
//! died goes TTL after it went quiet.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::Peer;

/// When `peer` is due for removal, given its last activity (`None`: never
/// seen): TTL after the later of its creation and that activity. `None`
/// for a normal peer, or a deadline past what the clock can hold.
pub fn deadline(peer: &Peer, last_active: Option<SystemTime>) -> Option<SystemTime> {
    let ttl = peer.ephemeral?;
    let created = UNIX_EPOCH.checked_add(Duration::from_secs(peer.created_at))?;
    let since = last_active.map_or(created, |a| a.max(created));
    since.checked_add(Duration::from_secs(ttl))
}

/// Whether `peer` should be removed at `now`: it is ephemeral and
/// `now >= max(created_at, last_active) + ttl`. A normal peer never is.
pub fn expired(peer: &Peer, last_active: Option<SystemTime>, now: SystemTime) -> bool {
    deadline(peer, last_active).is_some_and(|d| now >= d)
}

/// The peers of `peers` that are [`expired`] at `now`, in their order;
/// `last_active` gives each one's last handshake or packet.
pub fn due<'a>(
    peers: impl Iterator<Item = &'a Peer>,
    last_active: impl Fn(&Peer) -> Option<SystemTime>,
    now: SystemTime,
) -> Vec<&'a Peer> {
    peers.filter(|p| expired(p, last_active(p), now)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostId, NetworkId, PeerSlot, PrivateKey};

    const CREATED: u64 = 1_000_000;
    const TTL: u64 = 3_600;

    fn peer(name: &str, ephemeral: Option<u64>) -> Peer {
        let slot = PeerSlot::new(0).unwrap();
        Peer {
            org: "ci".parse().unwrap(),
            name: name.parse().unwrap(),
            gateway: "lhr-1".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            slot,
            net: slot.net(NetworkId::new(1).unwrap().prefix(), HostId::from_u32(1)),
            public_key: PrivateKey::generate().public_key(),
            created_at: CREATED,
            ephemeral,
            revision: 1,
        }
    }

    /// Unix second `s`.
    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn a_peer_that_never_connects_goes_ttl_after_its_creation() {
        let p = peer("job", Some(TTL));
        assert!(!expired(&p, None, at(CREATED)));
        assert!(!expired(&p, None, at(CREATED + TTL - 1)));
        assert!(expired(&p, None, at(CREATED + TTL)));
        assert!(expired(&p, None, at(CREATED + 10 * TTL)));
        assert_eq!(deadline(&p, None), Some(at(CREATED + TTL)));
    }

    #[test]
    fn activity_keeps_a_peer_until_ttl_after_the_last_of_it() {
        let p = peer("job", Some(TTL));
        // Well past created + TTL, but active a minute ago: it stays.
        let last = at(CREATED + 5 * TTL);
        assert!(!expired(&p, Some(last), at(CREATED + 5 * TTL + 60)));
        assert!(!expired(&p, Some(last), at(CREATED + 6 * TTL - 1)));
        // Idle for TTL since: it goes.
        assert!(expired(&p, Some(last), at(CREATED + 6 * TTL)));
    }

    #[test]
    fn activity_never_shortens_the_first_ttl() {
        // A "last activity" before creation (a clock step, a reused key's
        // old counters) counts from the creation instead.
        let p = peer("job", Some(TTL));
        let before = at(CREATED - 10 * TTL);
        assert!(!expired(&p, Some(before), at(CREATED + TTL - 1)));
        assert!(expired(&p, Some(before), at(CREATED + TTL)));
    }

    #[test]
    fn a_normal_peer_never_expires() {
        let p = peer("laptop", None);
        assert!(!expired(&p, None, at(u64::from(u32::MAX))));
        assert!(!expired(&p, Some(at(CREATED)), at(CREATED + 100 * TTL)));
        assert_eq!(deadline(&p, None), None);
    }

    #[test]
    fn a_clock_before_the_creation_expires_nothing() {
        let p = peer("job", Some(TTL));
        assert!(!expired(&p, None, at(CREATED - 1)));
        assert!(!expired(&p, None, UNIX_EPOCH));
        // Even a zero TTL (the API refuses it; a store might hold it).
        let zero = peer("zero", Some(0));
        assert!(!expired(&zero, None, at(CREATED - 1)));
        assert!(expired(&zero, None, at(CREATED)));
    }

    #[test]
    fn times_past_the_clock_never_expire() {
        let mut p = peer("job", Some(u64::MAX));
        assert!(!expired(&p, None, at(u64::from(u32::MAX))));
        p.created_at = u64::MAX;
        p.ephemeral = Some(1);
        assert!(!expired(&p, None, at(u64::from(u32::MAX))));
    }

    #[test]
    fn due_picks_the_expired_ephemeral_peers_in_order() {
        let peers = [
            peer("idle", Some(TTL)),
            peer("laptop", None),
            peer("active", Some(TTL)),
            peer("never", Some(TTL)),
        ];
        let now = at(CREATED + 2 * TTL);
        let last_active = |p: &Peer| match p.name.as_str() {
            "idle" => Some(at(CREATED + TTL)),
            "active" => Some(at(CREATED + 2 * TTL - 30)),
            "laptop" => Some(at(CREATED)),
            _ => None,
        };
        let names: Vec<&str> = due(peers.iter(), last_active, now)
            .into_iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["idle", "never"]);
        assert!(due(peers.iter(), last_active, at(CREATED)).is_empty());
    }
}
