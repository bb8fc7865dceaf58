//! The in-memory side: the last snapshot with this process's writes since
//! (a [`DeltaLog`] for readers a snapshot behind), and the poll of SQLite's
//! `data_version` that notices other processes' writes and moves the feed.

use super::*;

/// How often the watcher looks for commits by other processes.
pub(super) const POLL: Duration = Duration::from_millis(20);

/// The most writes the cache holds back before it gives up on them (when
/// nobody takes snapshots, e.g. during a bulk import) and reloads instead.
pub(super) const MAX_PENDING: usize = 4096;

/// The last snapshot and this process's writes since; see the module doc.
/// Only touched while holding the connection, so writes and snapshots of
/// this process take their turns in revision order.
#[derive(Debug)]
pub(super) struct Cache {
    pub(super) base: Option<Arc<Snapshot>>,
    pub(super) pending: Vec<Delta>,
    /// The revision of `base` with `pending` applied.
    pub(super) revision: Revision,
    /// The writes already in `base`: what [`Store::snapshot_since`] hands
    /// to those a snapshot or more behind.
    pub(super) log: DeltaLog,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            base: None,
            pending: Vec::new(),
            revision: 0,
            log: DeltaLog::new(0, MAX_PENDING),
        }
    }
}

impl Cache {
    /// Records the write that committed as `revision`, or drops everything
    /// if it doesn't follow on from what the cache holds.
    /// `None`: a change the cache can't follow (a gateway re-registered,
    /// which may move its peers' region).
    pub(super) fn record(&mut self, revision: Revision, delta: Option<Delta>) {
        let follows = self.base.is_some() && self.revision + 1 == revision;
        if let Some(delta) = delta.filter(|_| follows && self.pending.len() < MAX_PENDING) {
            self.pending.push(delta);
            self.revision = revision;
        } else {
            *self = Cache::default();
        }
    }

    /// The snapshot at `revision`, if the cache can build it.
    pub(super) fn snapshot(&mut self, revision: Revision) -> Option<Arc<Snapshot>> {
        let base = self.base.as_ref().filter(|_| self.revision == revision)?;
        if !self.pending.is_empty() {
            let mut next = Snapshot::clone(base);
            // One write per revision: the pending ones end at `revision`.
            let first = revision + 1 - self.pending.len() as Revision;
            for (rev, d) in (first..).zip(self.pending.drain(..)) {
                next.apply(d.clone());
                self.log.push(rev, d);
            }
            next.revision = revision;
            self.base = Some(Arc::new(next));
        }
        self.base.clone()
    }

    /// The writes from revision `from` to the cached snapshot (called right
    /// after [`Cache::snapshot`]), if the log reaches back that far.
    pub(super) fn since(&self, from: Revision) -> Option<Vec<Delta>> {
        self.log.since(from, self.revision)
    }

    pub(super) fn reset(&mut self, snapshot: Arc<Snapshot>) {
        let revision = snapshot.revision;
        *self = Cache {
            revision,
            base: Some(snapshot),
            pending: Vec::new(),
            log: DeltaLog::new(revision, MAX_PENDING),
        };
    }
}

pub(super) fn lock(cache: &Mutex<Cache>) -> Result<std::sync::MutexGuard<'_, Cache>, StoreError> {
    cache
        .lock()
        .map_err(|_| StoreError::Internal("snapshot cache lock poisoned".into()))
}

pub(super) fn watch_loop(
    conn: Connection,
    feed: watch::Sender<Revision>,
    reports: watch::Sender<Arc<SyncReports>>,
    stop: Arc<AtomicBool>,
) {
    let mut last_version: Option<i64> = None;
    while !stop.load(Ordering::Relaxed) {
        let version = conn
            .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            .ok();
        if version.is_some() && version != last_version {
            last_version = version;
            if let Ok(revision) = read_revision(&conn) {
                feed.send_if_modified(|r| {
                    let newer = revision > *r;
                    if newer {
                        *r = revision;
                    }
                    newer
                });
            }
            if let Ok(r) = read_reports(&conn) {
                crate::store::publish_reports(&reports, r);
            }
        }
        std::thread::sleep(POLL);
    }
}
