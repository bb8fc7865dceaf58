//! When the reconcile loop runs a pass, and what that pass re-reads.
//!
//! - A store change needs a new snapshot only: the pass plans it against
//!   what it already knows of the kernel.
//! - Netlink and nftables events come in bursts (one per route we add), so
//!   each kind waits [`EVENT_SETTLE`] after the first of a burst, without
//!   holding up anything else.
//! - WireGuard peers have no change events: they are re-read at an interval
//!   that follows how long reading them takes (a fixed share of a core),
//!   and the firewall table likewise, at a slower one.
//! - Everything but the firewall is re-read on a fixed full-resync period;
//!   a wireguard-go restart asks for the same at once.
//! - A failed pass is retried with backoff (100 ms doubling to 5 s), and the
//!   retry re-reads everything.
//!
//! Pure: every decision takes `now` and returns or records data; the loop
//! owns the clock and the channels, so this is tested without tokio time.

use std::time::{Duration, Instant};

/// The slowest the WireGuard peers are re-read for drift.
pub(super) const MAX_WG_INTERVAL: Duration = Duration::from_secs(30);
/// The quickest the WireGuard peers are re-read for drift.
pub(super) const MIN_WG_INTERVAL: Duration = Duration::from_secs(1);
/// How long reading the peers may take relative to the interval (1/20: 5%
/// of a core at most, however many peers there are).
const WG_READ_SHARE: u32 = 20;
/// A full resync of everything, whatever the events said.
pub(super) const FULL_RESYNC: Duration = Duration::from_secs(30);
/// How long to wait for the rest of an event burst before looking.
pub(super) const EVENT_SETTLE: Duration = Duration::from_millis(20);
/// The slowest the firewall table is re-read for drift the events missed.
const MAX_FW_INTERVAL: Duration = Duration::from_secs(300);
/// How long listing the table may take relative to the interval.
const FW_READ_SHARE: u32 = 20;
/// The first retry delay after a failed pass.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Which parts of the cached state are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Need {
    /// The store's snapshot.
    pub snapshot: bool,
    /// The WireGuard device and its peers.
    pub wg: bool,
    /// The link, its addresses and routes.
    pub net: bool,
    /// The firewall table.
    pub fw: bool,
}

impl Need {
    /// Everything.
    pub const ALL: Need = Need {
        snapshot: true,
        wg: true,
        net: true,
        fw: true,
    };
    /// Nothing.
    pub const NONE: Need = Need {
        snapshot: false,
        wg: false,
        net: false,
        fw: false,
    };

    /// Whether anything is stale.
    pub fn any(self) -> bool {
        self.snapshot || self.wg || self.net || self.fw
    }

    /// Everything except the firewall, which keeps its own (slower) period;
    /// the firewall only if it was stale already.
    fn all_but_fw(self) -> Need {
        Need {
            fw: self.fw,
            ..Need::ALL
        }
    }
}

/// Something the loop was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// The store changed.
    Store,
    /// The WireGuard device was restarted (it lost its peers).
    DeviceRestarted,
    /// Netlink reported a change on our interface.
    Netlink,
    /// Someone else committed to nftables.
    Firewall,
}

/// The loop's deadlines and what the next pass must re-read.
#[derive(Debug, Clone)]
pub(super) struct Schedule {
    need: Need,
    wg_interval: Duration,
    fw_interval: Duration,
    next_wg: Instant,
    next_full: Instant,
    next_fw: Instant,
    backoff: Duration,
    retry_at: Option<Instant>,
    net_due: Option<Instant>,
    fw_due: Option<Instant>,
}

impl Schedule {
    /// A schedule starting at `now` with a full pass due at once.
    pub fn new(now: Instant) -> Self {
        Self {
            need: Need::ALL,
            wg_interval: MIN_WG_INTERVAL,
            fw_interval: FULL_RESYNC,
            next_wg: now + MIN_WG_INTERVAL,
            next_full: now + FULL_RESYNC,
            next_fw: now + FULL_RESYNC,
            backoff: BACKOFF_MIN,
            retry_at: None,
            net_due: None,
            fw_due: None,
        }
    }

    /// What a pass must re-read now, if a pass is due; taking it clears it.
    pub fn take(&mut self) -> Option<Need> {
        let need = std::mem::replace(&mut self.need, Need::NONE);
        need.any().then_some(need)
    }

    /// A pass ended at `now`, `ok` or not. A failure retries after the
    /// backoff, which doubles up to its cap; success resets it. The periodic
    /// re-reads move no later than their (possibly new) intervals from now.
    pub fn passed(&mut self, ok: bool, now: Instant) {
        if ok {
            self.backoff = BACKOFF_MIN;
            self.retry_at = None;
        } else {
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.next_wg = self.next_wg.min(now + self.wg_interval);
        self.next_fw = self.next_fw.min(now + self.fw_interval);
    }

    /// Records `event`, told at `now`.
    pub fn event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Store => self.need.snapshot = true,
            Event::DeviceRestarted => self.need = self.need.all_but_fw(),
            Event::Netlink => {
                self.net_due.get_or_insert(now + EVENT_SETTLE);
            }
            Event::Firewall => {
                self.fw_due.get_or_insert(now + EVENT_SETTLE);
            }
        }
    }

    /// When the loop must next look at the clock, if nothing else happens.
    pub fn wake(&self) -> Instant {
        [self.retry_at, self.net_due, self.fw_due]
            .into_iter()
            .flatten()
            .fold(
                self.next_wg.min(self.next_full).min(self.next_fw),
                Instant::min,
            )
    }

    /// The clock reached `now`: marks stale whatever is due.
    pub fn tick(&mut self, now: Instant) {
        if now >= self.next_wg {
            self.need.wg = true;
            self.next_wg = now + self.wg_interval;
        }
        if now >= self.next_full {
            self.need = self.need.all_but_fw();
            self.next_full = now + FULL_RESYNC;
        }
        if now >= self.next_fw {
            self.need.fw = true;
            self.next_fw = now + self.fw_interval;
        }
        if self.retry_at.is_some_and(|r| now >= r) {
            // A failed firewall step dropped its cache, so it is re-read
            // anyway; other failures need not list a big table again.
            self.need = self.need.all_but_fw();
            self.retry_at = None;
        }
        if self.net_due.is_some_and(|d| now >= d) {
            self.need.net = true;
            self.net_due = None;
        }
        if self.fw_due.is_some_and(|d| now >= d) {
            self.need.fw = true;
            self.fw_due = None;
        }
    }

    /// Reading the WireGuard peers took `took`: re-read them at the interval
    /// that keeps reading to its share of a core.
    pub fn wg_read_took(&mut self, took: Duration) {
        self.wg_interval = (took * WG_READ_SHARE).clamp(MIN_WG_INTERVAL, MAX_WG_INTERVAL);
    }

    /// Listing the firewall table took `took`; likewise.
    pub fn fw_read_took(&mut self, took: Duration) {
        self.fw_interval = (took * FW_READ_SHARE).clamp(FULL_RESYNC, MAX_FW_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A schedule whose first (full) pass has run, ok.
    fn started(t0: Instant) -> Schedule {
        let mut s = Schedule::new(t0);
        assert_eq!(s.take(), Some(Need::ALL));
        s.passed(true, t0);
        assert_eq!(s.take(), None);
        s
    }

    #[test]
    fn the_first_pass_reads_everything_and_then_nothing_is_due() {
        let t0 = Instant::now();
        let s = started(t0);
        assert_eq!(s.wake(), t0 + MIN_WG_INTERVAL);
    }

    #[test]
    fn a_store_change_needs_the_snapshot_only() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.event(Event::Store, t0);
        s.event(Event::Store, t0);
        assert_eq!(
            s.take(),
            Some(Need {
                snapshot: true,
                ..Need::NONE
            })
        );
        assert_eq!(s.take(), None);
    }

    #[test]
    fn a_burst_of_netlink_events_is_one_read_after_the_first_settles() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.event(Event::Netlink, t0);
        s.event(Event::Netlink, t0 + ms(15));
        assert_eq!(s.wake(), t0 + EVENT_SETTLE, "from the first event");
        s.tick(t0 + ms(10));
        assert_eq!(s.take(), None, "not before it settles");
        s.tick(t0 + EVENT_SETTLE);
        assert_eq!(
            s.take(),
            Some(Need {
                net: true,
                ..Need::NONE
            })
        );
        s.tick(t0 + ms(60));
        assert_eq!(s.take(), None, "one read per burst");
    }

    #[test]
    fn a_foreign_nft_commit_rereads_the_firewall_only_after_it_settles() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.event(Event::Firewall, t0);
        assert_eq!(s.wake(), t0 + EVENT_SETTLE);
        s.tick(t0 + EVENT_SETTLE);
        assert_eq!(
            s.take(),
            Some(Need {
                fw: true,
                ..Need::NONE
            })
        );
    }

    #[test]
    fn a_device_restart_rereads_all_but_the_firewall() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.event(Event::DeviceRestarted, t0);
        assert_eq!(
            s.take(),
            Some(Need {
                fw: false,
                ..Need::ALL
            })
        );
    }

    #[test]
    fn failures_back_off_doubling_to_five_seconds_and_success_resets() {
        let t0 = Instant::now();
        let mut s = started(t0);
        // Slow peer reads: no periodic re-read comes due during the retries.
        s.wg_read_took(Duration::from_secs(2));
        s.next_wg = t0 + Duration::from_secs(3600);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            s.passed(false, now);
            let retry = s.wake();
            delays.push(retry - now);
            s.tick(retry);
            let need = s.take().expect("a retry is due");
            assert_eq!(
                need,
                Need {
                    fw: false,
                    ..Need::ALL
                },
                "a retry re-reads all but the table"
            );
            now = retry;
        }
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
                .map(ms)
                .to_vec()
        );
        s.passed(true, now);
        assert_eq!(s.retry_at, None);
        s.passed(false, now);
        assert_eq!(s.wake(), now + ms(100), "success resets the backoff");
    }

    #[test]
    fn peers_are_reread_at_an_interval_that_follows_the_read_time() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.wg_read_took(ms(10));
        assert_eq!(s.wg_interval, MIN_WG_INTERVAL, "at least a second");
        s.wg_read_took(ms(100));
        assert_eq!(s.wg_interval, Duration::from_secs(2), "5% of a core");
        s.wg_read_took(Duration::from_secs(5));
        assert_eq!(s.wg_interval, MAX_WG_INTERVAL, "at most 30 s");
        s.fw_read_took(Duration::from_secs(3));
        assert_eq!(s.fw_interval, Duration::from_secs(60));
        s.fw_read_took(ms(1));
        assert_eq!(s.fw_interval, FULL_RESYNC);
        s.fw_read_took(Duration::from_secs(60));
        assert_eq!(s.fw_interval, MAX_FW_INTERVAL);
    }

    #[test]
    fn periodic_rereads_come_due_on_their_own_clocks() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.tick(t0 + MIN_WG_INTERVAL);
        assert_eq!(
            s.take(),
            Some(Need {
                wg: true,
                ..Need::NONE
            })
        );
        // A slow table moves the firewall's period out from its next read.
        s.fw_read_took(Duration::from_secs(3));
        // At the full resync both come due: everything, firewall included.
        s.tick(t0 + FULL_RESYNC);
        assert_eq!(s.take(), Some(Need::ALL));
        s.passed(true, t0 + FULL_RESYNC);
        s.tick(t0 + FULL_RESYNC * 2);
        let need = s.take().expect("the full resync is due");
        assert!(need.snapshot && need.wg && need.net && !need.fw, "{need:?}");
        s.tick(t0 + FULL_RESYNC + Duration::from_secs(60));
        assert!(s.take().expect("the firewall re-read is due").fw);
    }

    #[test]
    fn a_shorter_interval_takes_effect_after_the_next_pass() {
        let t0 = Instant::now();
        let mut s = started(t0);
        s.wg_read_took(Duration::from_secs(5));
        s.tick(t0 + MIN_WG_INTERVAL);
        s.take();
        assert_eq!(s.next_wg, t0 + MIN_WG_INTERVAL + MAX_WG_INTERVAL);
        s.wg_read_took(ms(10));
        s.passed(true, t0 + Duration::from_secs(2));
        assert_eq!(s.next_wg, t0 + Duration::from_secs(3));
    }
}
