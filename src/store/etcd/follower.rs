//! Following the cluster: the whole read a snapshot starts from (in pages),
//! the watch whose events keep it current as deltas, and the feeds that
//! tell the rest of the daemon.

use super::*;

/// What the watch keeps current.
#[derive(Clone)]
pub(super) struct Feeds {
    /// The change feed (everything but sync reports).
    pub(super) revision: watch::Sender<Revision>,
    /// The gateways' sync reports.
    pub(super) reports: watch::Sender<Arc<SyncReports>>,
    /// The snapshot the watch follows.
    pub(super) follower: Arc<Mutex<Follower>>,
    /// [`Follower::revision`], for readers waiting for it to catch up.
    pub(super) followed: watch::Sender<i64>,
}

impl Feeds {
    pub(super) fn new() -> Self {
        Self {
            revision: watch::channel(0).0,
            reports: watch::channel(Arc::default()).0,
            follower: Arc::default(),
            followed: watch::channel(0).0,
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Follower> {
        // A panic while holding it can only leave a half-applied batch:
        // drop the snapshot, so the next read takes a whole one.
        self.follower.lock().unwrap_or_else(|poisoned| {
            let mut f = poisoned.into_inner();
            f.working = None;
            f.shared = None;
            f
        })
    }

    /// Lets waiting readers know how far the follower got.
    pub(super) fn announce(&self, revision: i64) {
        self.followed.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }
}

/// The snapshot the watch keeps current, so that a store change costs the
/// change, not a read of the whole prefix (see the module doc). The watch
/// task applies events; readers take [`Follower::snapshot`].
#[derive(Debug)]
pub(super) struct Follower {
    /// Everything under the prefix as of `revision`; `None` before the
    /// first whole read and after an event it can't follow.
    pub(super) working: Option<Snapshot>,
    /// `working` as last handed out, while it hasn't changed.
    pub(super) shared: Option<Arc<Snapshot>>,
    /// Every event under the prefix up to here is in `working`.
    pub(super) revision: i64,
    /// The revision `working` was read whole at: events up to it are in.
    pub(super) whole_at: i64,
    /// The writes followed since the whole read: what
    /// [`Store::snapshot_since`] hands out.
    pub(super) log: DeltaLog,
}

impl Default for Follower {
    fn default() -> Self {
        Self {
            working: None,
            shared: None,
            revision: 0,
            whole_at: 0,
            log: DeltaLog::new(0, LOG_MAX),
        }
    }
}

/// An etcd revision as the store's (they start at 1; never negative).
pub(super) fn rev(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

/// An event the follower can't express as a [`Delta`]: only a whole read
/// brings it back in step.
#[derive(Debug)]
pub(super) struct Unfollowable(pub(super) String);

impl From<StoreError> for Unfollowable {
    fn from(e: StoreError) -> Self {
        Self(e.to_string())
    }
}

impl Follower {
    /// Starts over from `snap`, read whole at `revision`, unless what the
    /// follower holds is as new.
    pub(super) fn install(&mut self, snap: Snapshot, revision: i64) {
        if self.working.is_some() && self.revision >= revision {
            return;
        }
        *self = Follower {
            working: Some(snap),
            shared: None,
            revision,
            whole_at: revision,
            log: DeltaLog::new(rev(revision), LOG_MAX),
        };
    }

    /// The followed snapshot, shared until it next changes.
    pub(super) fn snapshot(&mut self) -> Option<Arc<Snapshot>> {
        if self.shared.is_none() {
            let mut s = self.working.clone()?;
            s.revision = u64::try_from(self.revision).unwrap_or(0);
            self.shared = Some(Arc::new(s));
        }
        self.shared.clone()
    }

    /// The writes from revision `from` up to [`Follower::revision`], if
    /// the log reaches back that far.
    pub(super) fn since(&self, from: Revision) -> Option<Vec<Delta>> {
        self.log.since(from, rev(self.revision))
    }

    /// Applies one batch of watch events (sync reports aside). Events the
    /// whole read already held (a reader's, newer than the watch) are
    /// skipped. Returns whether a snapshot's content changed.
    pub(super) fn follow(&mut self, keys: &Keys, events: &[Event]) -> Result<bool, Unfollowable> {
        // Events passing by with no snapshot to apply them to would leave
        // a gap behind whatever snapshot comes next: read whole instead.
        let Some(working) = self.working.as_mut() else {
            return Err(Unfollowable("no whole read to follow on from".into()));
        };
        let mut changed = false;
        for e in events {
            let Some(kv) = e.kv() else { continue };
            let at = kv.mod_revision();
            if at <= self.whole_at {
                continue;
            }
            if let Some(delta) = delta_of(keys, working, e.event_type(), kv)? {
                working.apply(delta.clone());
                self.log.push(rev(at), delta);
                changed = true;
            }
        }
        if changed {
            self.shared = None;
        }
        Ok(changed)
    }

    /// Moves to `revision`: every event up to it has been applied. A
    /// shared snapshot keeps the revision it was built at: what it holds
    /// hasn't changed since (renumbering it would copy it while readers
    /// hold it, on every sync report).
    pub(super) fn reach(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    pub(super) fn forget(&mut self) {
        *self = Follower::default();
    }
}

/// Follows the prefix and bumps the feed on every change, forever.
///
/// `from` is the first revision to watch; 0 means "the current one", which
/// is what a fresh store does (tests start older to meet a compaction).
pub(super) async fn watch_loop(client: Client, keys: Keys, feeds: Feeds, from: i64) {
    let mut backoff = BACKOFF_MIN;
    // The next revision to watch from; 0 until we've read the current one.
    let mut next: i64 = from;
    loop {
        if next == 0 {
            // A whole read: the snapshot to follow from, and the reports.
            match read_whole(&client, &keys).await {
                Ok((rev, whole)) => {
                    match whole {
                        Ok((snap, reports)) => {
                            crate::store::publish_reports(&feeds.reports, reports);
                            feeds.lock().install(snap, rev);
                        }
                        Err(e) => {
                            // Readers will meet the same error reading
                            // whole; follow on once the data is mended.
                            tracing::warn!(error = %e, "etcd: cannot parse the store");
                            feeds.lock().forget();
                        }
                    }
                    feeds.announce(rev);
                    publish(&feeds.revision, rev);
                    next = rev + 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "etcd: cannot read the store whole");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let mut wc = client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_progress_notify();
        let watched =
            tokio::time::timeout(REQUEST_TIMEOUT, wc.watch(keys.prefix.as_str(), Some(opts)))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()));
        let (_watcher, mut stream) = match watched {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "etcd: cannot watch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff = BACKOFF_MIN;
                    if resp.compact_revision() > 0 {
                        tracing::info!(
                            compacted = resp.compact_revision(),
                            wanted = next,
                            "etcd: watched revision was compacted; reloading"
                        );
                        next = 0;
                        break;
                    }
                    if resp.canceled() {
                        tracing::warn!(reason = resp.cancel_reason(), "etcd: watch canceled");
                        break;
                    }
                    if !follow(&keys, &feeds, resp.events(), &mut next) {
                        next = 0;
                        break;
                    }
                }
                Ok(None) => {
                    tracing::warn!("etcd: watch stream ended; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "etcd: watch failed; reconnecting");
                    break;
                }
            }
        }
        if next != 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Everything under the prefix in one read, at the revision returned
/// with it: the snapshot and the reports, or why they don't parse.
pub(super) async fn read_whole(
    client: &Client,
    keys: &Keys,
) -> Result<(i64, Result<(Snapshot, SyncReports), StoreError>), StoreError> {
    read_whole_paged(client, keys, PAGE).await
}

/// [`read_whole`] in pages of `page` keys.
pub(super) async fn read_whole_paged(
    client: &Client,
    keys: &Keys,
    page: i64,
) -> Result<(i64, Result<(Snapshot, SyncReports), StoreError>), StoreError> {
    // Only what a snapshot and the reports are made of: the uniqueness
    // keys are as many again.
    let ranges = ["orgs/", "gateways/", "peers/", "instances/", "synced/"].map(|r| keys.k(r));
    let mut attempt = 0;
    let (revision, kvs) = loop {
        match read_ranges(client, &ranges, page).await {
            // Compacted past the revision between two pages: start over.
            Err(StoreError::Internal(e)) if e.contains("compacted") && attempt < 3 => {
                attempt += 1;
            }
            r => break r?,
        }
    };
    let whole = parse_snapshot(keys, revision, &kvs).map(|snap| {
        let reports = kvs
            .iter()
            .filter_map(|kv| match keys.parts(kv.key()).as_deref() {
                Some(["synced", gw]) => parse_report(gw, kv),
                _ => None,
            })
            .collect();
        (snap, reports)
    });
    Ok((revision, whole))
}

/// Every key under each of `prefixes`, in pages of `page` keys, all at the
/// revision of the first page (returned with them): a whole read stays
/// consistent and each response small, whatever the store's size.
pub(super) async fn read_ranges(
    client: &Client,
    prefixes: &[String],
    page: i64,
) -> Result<(i64, Vec<KeyValue>), StoreError> {
    let mut revision = 0;
    let mut kvs = Vec::new();
    for prefix in prefixes {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision != 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp = read_retrying(|| {
                let mut kv = client.clone();
                let (from, opts) = (from.clone(), opts.clone());
                async move { kv.get(from, Some(opts)).await }
            })
            .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let batch = resp.take_kvs();
            // The next page starts at the key right after this one's last.
            let next = batch.last().filter(|_| more).map(|last| {
                let mut k = last.key().to_vec();
                k.push(0);
                k
            });
            kvs.extend(batch);
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
    }
    Ok((revision, kvs))
}

/// Applies one batch of watch events: sync reports go to their feed, the
/// rest to the follower, and any change but a report bumps the change
/// feed; `next` moves past all of them. False: the follower can't follow
/// them and the prefix must be read whole again.
pub(super) fn follow(keys: &Keys, feeds: &Feeds, events: &[Event], next: &mut i64) -> bool {
    let mut last_change = None;
    let mut reports: Option<SyncReports> = None;
    for e in events {
        let Some(kv) = e.kv() else { continue };
        *next = (*next).max(kv.mod_revision() + 1);
        let parts = keys.parts(kv.key());
        let Some(["synced", gw]) = parts.as_deref() else {
            last_change = last_change.max(Some(kv.mod_revision()));
            continue;
        };
        let reports = reports.get_or_insert_with(|| SyncReports::clone(&feeds.reports.borrow()));
        match e.event_type() {
            EventType::Put => reports.extend(parse_report(gw, kv)),
            EventType::Delete => {
                if let Ok(gw) = gw.parse::<GatewayName>() {
                    reports.remove(&gw);
                }
            }
        }
    }
    if let Some(reports) = reports {
        crate::store::publish_reports(&feeds.reports, reports);
    }
    let mut follower = feeds.lock();
    if let Err(Unfollowable(why)) = follower.follow(keys, events) {
        tracing::info!(
            why,
            "etcd: a change the followed snapshot can't express; reading whole"
        );
        follower.forget();
        return false;
    }
    follower.reach(*next - 1);
    drop(follower);
    // The follower first: a pass the feed sets off finds the change there.
    feeds.announce(*next - 1);
    if let Some(rev) = last_change {
        publish(&feeds.revision, rev);
    }
    true
}
