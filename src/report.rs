//! Sync reports: each gateway tells the store what it has installed, so an
//! API on any gateway can answer a `wireguard create` with `installed` once
//! the gateway holding the peer has it live (see [`SyncReport`]).
//!
//! A report is written only when the installed peers change (or the peers
//! that failed to install do), not after every pass: a store change in an
//! org this gateway doesn't hold costs no write. Reports never move the
//! store's change feed, so they set off no passes elsewhere.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::model::GatewayName;
use crate::reconcile::Installed;
use crate::store::{Store, SyncReport};

/// The first wait before retrying a report the store refused.
const RETRY_MIN: Duration = Duration::from_millis(200);
/// The longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What was last written, to tell whether a new report says anything new.
#[derive(Debug, Default)]
pub struct Published {
    report: Option<SyncReport>,
    /// [`Installed::peer_set`] when it was written.
    peer_set: u64,
}

impl Published {
    fn new(peer_set: u64, report: SyncReport) -> Self {
        Self {
            report: Some(report),
            peer_set,
        }
    }
}

/// The report to write now and the peer set it describes, read without
/// keeping the published state: holding it across the write would make
/// the reconciler copy every installed peer to publish the next change.
fn next(
    installed: &mut watch::Receiver<Arc<Installed>>,
    last: &Published,
) -> Option<(SyncReport, u64)> {
    let now = installed.borrow_and_update();
    next_report(&now, last).map(|r| (r, now.peer_set))
}

/// The report to write for `now`, if it says something `last` didn't:
/// the first one after start, or one whose installed or missing peers
/// differ. Nothing before the first pass that read the store, nothing that
/// would go back in revisions, and nothing from a gateway missing more than
/// [`SyncReport::MAX_MISSING`] peers (it is broken; waiters time out).
pub fn next_report(now: &Installed, last: &Published) -> Option<SyncReport> {
    if now.revision == 0 || now.missing.len() > SyncReport::MAX_MISSING {
        return None;
    }
    let mut missing = now.missing.clone();
    missing.sort_unstable_by_key(|k| *k.as_bytes());
    if let Some(prev) = &last.report {
        let same_installed = now.peer_set == last.peer_set;
        if now.revision < prev.revision || (same_installed && missing == prev.missing) {
            return None;
        }
    }
    Some(SyncReport {
        revision: now.revision,
        missing,
    })
}

/// Writes this gateway's reports as its installed peers change, until
/// `shutdown` turns true. A refused write is retried with backoff.
pub async fn run(
    store: Arc<dyn Store>,
    gateway: GatewayName,
    mut installed: watch::Receiver<Arc<Installed>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = Published::default();
    let mut retry = RETRY_MIN;
    let mut failed = false;
    loop {
        failed = match next(&mut installed, &last) {
            None => false,
            Some((report, peer_set)) => match store.report_sync(&gateway, &report).await {
                Ok(()) => {
                    debug!(gateway = %gateway, revision = report.revision,
                        missing = report.missing.len(), "sync report written");
                    last = Published::new(peer_set, report);
                    retry = RETRY_MIN;
                    false
                }
                Err(e) => {
                    if !failed {
                        warn!(gateway = %gateway, error = %e, "cannot write sync report; retrying");
                    }
                    true
                }
            },
        };
        let backoff = retry;
        if failed {
            retry = (retry * 2).min(RETRY_MAX);
        }
        tokio::select! {
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() { return; }
            }
            r = installed.changed() => {
                if r.is_err() { return; }
            }
            _ = tokio::time::sleep(backoff), if failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PrivateKey, PublicKey};
    use std::time::SystemTime;

    /// `peer_set` stands in for the reconciler's counter: it differs
    /// whenever the set of live peers does.
    fn installed(revision: u64, peers: &[PublicKey], missing: &[PublicKey]) -> Installed {
        let mut keys: Vec<_> = peers.iter().map(|k| *k.as_bytes()).collect();
        keys.sort_unstable();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&keys, &mut h);
        Installed {
            peers: peers.iter().map(|k| (*k, SystemTime::now())).collect(),
            registered: peers.len() + missing.len(),
            last_sync: None,
            revision,
            missing: missing.to_vec(),
            peer_set: std::hash::Hasher::finish(&h),
        }
    }

    fn keys(n: usize) -> Vec<PublicKey> {
        (0..n)
            .map(|_| PrivateKey::generate().public_key())
            .collect()
    }

    #[test]
    fn nothing_before_the_first_snapshot() {
        assert_eq!(
            next_report(&Installed::default(), &Published::default()),
            None
        );
    }

    #[test]
    fn the_first_pass_reports_then_only_changes_do() {
        let k = keys(3);
        let first = installed(5, &k[..1], &[]);
        let r = next_report(&first, &Published::default()).expect("first report");
        assert_eq!(r.revision, 5);
        let last = Published::new(first.peer_set, r);

        // A later revision that changed nothing here: no write.
        assert_eq!(next_report(&installed(9, &k[..1], &[]), &last), None);
        // A peer added: reported at the new revision.
        let r = next_report(&installed(9, &k[..2], &[]), &last).expect("added");
        assert_eq!(r.revision, 9);
        // A peer removed, and a peer swapped for another: both reported.
        assert!(next_report(&installed(9, &[], &[]), &last).is_some());
        assert!(next_report(&installed(9, &k[1..2], &[]), &last).is_some());
    }

    #[test]
    fn a_peer_that_failed_is_missing_until_it_is_installed() {
        let k = keys(2);
        let failed = installed(7, &k[..1], &k[1..]);
        let r = next_report(&failed, &Published::default()).unwrap();
        assert_eq!(r.missing, vec![k[1]]);
        let last = Published::new(failed.peer_set, r);
        // Same state again: nothing; fixed by a later pass: reported.
        assert_eq!(next_report(&failed, &last), None);
        let r = next_report(&installed(7, &k, &[]), &last).unwrap();
        assert!(r.missing.is_empty());
    }

    #[test]
    fn never_back_in_revisions_nor_with_too_many_missing() {
        let k = keys(1);
        let now = installed(10, &k, &[]);
        let last = Published::new(
            now.peer_set,
            next_report(&now, &Published::default()).unwrap(),
        );
        assert_eq!(next_report(&installed(8, &[], &[]), &last), None);
        let broken = installed(11, &[], &keys(SyncReport::MAX_MISSING + 1));
        assert_eq!(next_report(&broken, &Published::default()), None);
    }
}
