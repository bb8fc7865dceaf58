//! The per-org `.internal` zone, built from a store [`Snapshot`] with every
//! answer already encoded as wire bytes.
//!
//! [`ZoneIndex::build`] is pure (no I/O, no clock): snapshot in, index out.
//! The daemon rebuilds it on every store change and swaps it in whole
//! ([`super::SharedZones`]); a query never sees half a change.
//!
//! What the hot path gets from an [`OrgZone`] is, for a lower-cased name in
//! wire format, an entry holding byte ranges of one arena: the complete
//! answer-section records for AAAA and for TXT, owner name already written as
//! the compression pointer `0xC00C` (the question name, which is always at
//! offset 12 of the response), class IN, TTL [`TTL`]. The apex's SOA and NS
//! answers and the SOA for negative answers' AUTHORITY section (owner
//! `internal.` written out) are encoded the same way, once per build.
//! Answering is then "parse header and question, one hash lookup, copy
//! bytes".
//!
//! Names (docs/architecture.md "DNS", contract), for each org:
//!
//! | name | data |
//! |---|---|
//! | `internal` | SOA: MNAME `_api.internal.`, RNAME `hostmaster.internal.`, SERIAL the store revision (low 32 bits), REFRESH 3600, RETRY 600, EXPIRE 1209600, MINIMUM [`TTL`]; NS: `_api.internal.` (other types no-data) |
//! | `<app>`, `global.<app>` | AAAA: started instances, any region |
//! | `<region>.<app>` | AAAA: started instances in region (name exists for every region the app has any instance in) |
//! | `top<N>.nearest.of.<app>` | AAAA: the N started instances nearest [`ZoneIndex::build`]'s `my_region`; N ≥ 1, no leading zero, any size |
//! | `<id>.vm.<app>` | AAAA: that instance, **started or stopped** |
//! | `<group>.process.<app>` | AAAA: started instances of the process group |
//! | `regions.<app>` / `all.regions.<app>` | TXT: `iad,lhr` — regions with started / any instances |
//! | `vms.<app>` / `all.vms.<app>` | TXT: `<id> <region>,…` — started / all instances |
//! | `_apps` | TXT: every app with any instance |
//! | `_instances` / `all._instances` | TXT: `instance=<id>,app=<app>,ip=<addr>,region=<r>;…` started / all |
//! | `_peer` | TXT: every WireGuard peer of the org, on any gateway |
//! | `<peer>._peer` | AAAA: the peer's address |
//! | `_api` | AAAA: the org's `::3` (what flyctl probes) |
//!
//! (all under `.internal`). Decisions the table leaves open:
//!
//! - `<id>.vm.<app>` answers for a stopped instance too: it names one machine
//!   explicitly, its address is stable across stop/start, and `all.vms`
//!   already lists it. Everything else that yields addresses lists started
//!   instances only.
//! - An app exists while it has any instance; an app whose instances are all
//!   stopped still has its names (no-data for AAAA), and is in `_apps`.
//! - A list that is empty (an org with no peers asked for `_peer`) is
//!   no-data, not an empty TXT string. `_apps`, `_instances`,
//!   `all._instances` and `_peer` always exist.
//! - Empty non-terminals (`vm.<app>`, `process.<app>` when the app has
//!   groups, `all.<app>`, `of.<app>`, `nearest.of.<app>`, `internal`) answer
//!   no-data, not NXDOMAIN: RFC 8020 says NXDOMAIN means nothing exists
//!   below the name.
//! - A region called `global` would collide with `global.<app>`; the fixed
//!   name wins. Other collisions (a region called `regions`) hold different
//!   types and simply coexist.
//! - Ordering is deterministic: AAAA sets by address, TXT lists sorted by
//!   name (instances by app then id), `top<N>` by (distance, region, id).
//!   Duplicate addresses in one set are dropped (RFC 2181 §5: an RRset has
//!   no duplicate records).
//! - TXT values are split into 255-byte character-strings of one record
//!   (RFC 1035 §3.3.14); a reader concatenates them.
//! - A TXT list whose record can't fit in one 65,535-byte message with the
//!   question (and our OPT) is cut after the last whole item that leaves
//!   room for one more, the final item `truncated: <shown> of <total>`
//!   (after the list's own separator: `peer-a,peer-b,truncated: 2 of 9`,
//!   `instance=…;truncated: 1055 of 2404`). A reader splitting on the
//!   separator gets whole items, then the marker, which no name can be
//!   (names have no spaces or colons). Over TCP the cut list is the answer;
//!   over UDP it is too big for any client, so TC. Cut names are listed in
//!   [`OrgZone::truncated`]. An AAAA set too large for any message can't be
//!   cut like that (a resolver would take the part for the whole): it is
//!   listed in [`OrgZone::oversized`] and gets TC over UDP, SERVFAIL over
//!   TCP.
//! - `_peer` lists every peer: sixpn names none itself, so there are no
//!   auto-named peers to leave out (Fly leaves out its `interactive-*`).
//! - The SOA's MNAME (and the one NS) is `_api.internal.`, which exists and
//!   is the org's `::3`, the answering server; `ns.internal.` would be the
//!   name of an app called `ns`. The serial is the revision of the store
//!   snapshot the zone was built from; a zone [`ZoneIndex::update`] takes
//!   over unchanged keeps its serial. Negative answers carry this SOA in
//!   AUTHORITY with TTL [`NEGATIVE_TTL`] (RFC 2308 §3), so resolvers cache
//!   them for 5 s like any answer.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::net::Ipv6Addr;
use std::sync::Arc;

use crate::model::{NetworkId, OrgPrefix, RegionName};
use crate::store::{Instance, Revision, Snapshot};

/// The TTL of every `.internal` record, in seconds (README "The `.internal` names": 5 s).
pub const TTL: u32 = 5;

/// Bytes of one encoded AAAA answer record: pointer(2) type(2) class(2)
/// ttl(4) rdlength(2) address(16).
pub(crate) const AAAA_RR_LEN: usize = 28;

/// The most a single DNS message can hold (TCP's 16-bit length prefix).
pub(crate) const MAX_MESSAGE: usize = 65535;

/// Header bytes of a DNS message.
pub(crate) const HEADER_LEN: usize = 12;

/// Bytes of the OPT record the handler appends when the query had one.
pub(crate) const OPT_RR_LEN: usize = 11;

const TYPE_NS: u16 = 2;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_TXT: u16 = 16;
const CLASS_IN: u16 = 1;

/// The zone's primary server (SOA MNAME, and the one NS): `_api.internal.`,
/// a name that already exists and resolves to the org's `::3`, the very
/// server answering. (`ns.internal.` would be the name of an app called
/// `ns`.)
pub const MNAME: &[&str] = &["_api", "internal"];

/// The SOA RNAME, the zone's contact mailbox: `hostmaster.internal.`
/// (`hostmaster@internal`, RFC 2142; nothing receives mail there — the SOA
/// just has to name someone).
pub const RNAME: &[&str] = &["hostmaster", "internal"];

/// SOA REFRESH, in seconds. No secondary ever transfers the zone (AXFR and
/// IXFR are refused), so REFRESH, RETRY and EXPIRE only have to be
/// plausible to tools that check them: RFC 1912 §2.2's ranges.
pub const SOA_REFRESH: u32 = 3600;

/// SOA RETRY, in seconds (below REFRESH).
pub const SOA_RETRY: u32 = 600;

/// SOA EXPIRE, in seconds (two weeks).
pub const SOA_EXPIRE: u32 = 1_209_600;

/// SOA MINIMUM, the negative-caching TTL (RFC 2308 §4): the TTL of every
/// other record, so a name that appears is seen as soon as a changed one.
pub const SOA_MINIMUM: u32 = TTL;

/// The TTL of the SOA in a negative answer's AUTHORITY section:
/// min(SOA TTL, MINIMUM) (RFC 2308 §3).
pub const NEGATIVE_TTL: u32 = if TTL < SOA_MINIMUM { TTL } else { SOA_MINIMUM };

/// A run of encoded answer records in an [`OrgZone`]'s arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rrs {
    start: u32,
    len: u32,
    /// How many records the bytes hold (the response's ANCOUNT).
    pub(crate) count: u32,
    /// The records can't be carried by any DNS message (only set for TXT,
    /// whose RDATA would pass 65535 bytes; large AAAA sets are caught by the
    /// handler's size check).
    pub(crate) oversize: bool,
}

impl Rrs {
    /// The first `n` records of a run of AAAA records (`top<N>`).
    pub(crate) fn first_aaaa(self, n: usize) -> Rrs {
        let n = n.min(self.count as usize);
        Rrs {
            start: self.start,
            len: (n * AAAA_RR_LEN) as u32,
            count: n as u32,
            oversize: false,
        }
    }
}

/// What one name holds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Entry {
    /// AAAA answer records.
    pub(crate) aaaa: Rrs,
    /// TXT answer record.
    pub(crate) txt: Rrs,
    /// On `nearest.of.<app>` only: the app's started instances as AAAA
    /// records nearest first, so `top<N>` is the first N records.
    pub(crate) nearest: Option<Rrs>,
}

/// One org's `.internal` names with their encoded answers.
pub struct OrgZone {
    prefix: OrgPrefix,
    /// Lower-cased wire-format name (with the root label) → entry.
    names: NameTable,
    /// Every record of every entry, back to back.
    arena: Box<[u8]>,
    oversized: Vec<String>,
    truncated: Vec<String>,
    /// The store revision the zone was built from, low 32 bits.
    serial: u32,
    /// `internal. SOA` as an answer record (owner `0xC00C`).
    soa: Rrs,
    /// `internal. NS` as an answer record (owner `0xC00C`).
    ns: Rrs,
    /// `internal. SOA` for the AUTHORITY section of negative answers: owner
    /// written out, TTL [`NEGATIVE_TTL`].
    negative_soa: Rrs,
}

impl fmt::Debug for OrgZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgZone")
            .field("prefix", &self.prefix)
            .field("names", &self.names.len())
            .field("arena_bytes", &self.arena.len())
            .field("oversized", &self.oversized)
            .field("truncated", &self.truncated)
            .field("serial", &self.serial)
            .finish()
    }
}

impl OrgZone {
    /// A zone with no apps and no peers: only the fixed names, all no-data
    /// (and the apex's SOA and NS, with serial 0).
    pub fn empty(prefix: OrgPrefix) -> Self {
        Builder::new().finish(prefix, 0)
    }

    /// The SOA serial: the low 32 bits of the store revision the zone was
    /// built from. A zone taken over unchanged by [`ZoneIndex::update`]
    /// keeps its serial, so the serial moves exactly when the zone does.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The org's /48.
    pub fn prefix(&self) -> OrgPrefix {
        self.prefix
    }

    /// How many names exist (empty non-terminals included).
    pub fn name_count(&self) -> usize {
        self.names.len()
    }

    /// Names (dotted, without the trailing dot) with an answer too large
    /// for any DNS message, even over TCP: worth a warning when the zone is
    /// swapped in.
    pub fn oversized(&self) -> &[String] {
        &self.oversized
    }

    /// Names (dotted) whose TXT list was cut to fit one DNS message (see
    /// the module doc): worth a warning too.
    pub fn truncated(&self) -> &[String] {
        &self.truncated
    }

    /// The apex's SOA answer record.
    pub(crate) fn soa(&self) -> Rrs {
        self.soa
    }

    /// The apex's NS answer record.
    pub(crate) fn ns(&self) -> Rrs {
        self.ns
    }

    /// The SOA record for a negative answer's AUTHORITY section.
    pub(crate) fn negative_soa(&self) -> Rrs {
        self.negative_soa
    }

    /// The entry of a lower-cased wire-format name.
    pub(crate) fn lookup(&self, wire_name: &[u8]) -> Option<&Entry> {
        self.names.get(wire_name)
    }

    /// The encoded records of `rrs`.
    pub(crate) fn bytes(&self, rrs: Rrs) -> &[u8] {
        let start = rrs.start as usize;
        self.arena
            .get(start..start + rrs.len as usize)
            .unwrap_or_default()
    }
}

/// Names → entries: an open-addressing hash table (linear probing, load
/// ≤ 1/2) over one buffer holding every name back to back.
///
/// A zone is thus a handful of large allocations however many names it
/// has. With a `HashMap<Box<[u8]>, Entry>`, 100,000 instances meant ~300k
/// small key allocations scattered among the builder's freed memory, which
/// kept ~150 MB of it resident after every rebuild.
struct NameTable {
    hasher: RandomState,
    /// Every name, wire format, back to back.
    bytes: Box<[u8]>,
    /// Where each name is in `bytes`: (start, length).
    spans: Box<[(u32, u32)]>,
    /// Each name's entry, in the order of `spans`.
    entries: Box<[Entry]>,
    /// Index + 1 into `spans`/`entries`; 0 is an empty slot. The length is
    /// a power of two at least twice the number of names.
    slots: Box<[u32]>,
}

impl NameTable {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, name: &[u8]) -> Option<&Entry> {
        let mask = self.slots.len().checked_sub(1)?;
        let mut i = self.hasher.hash_one(name) as usize & mask;
        loop {
            let k = usize::try_from(*self.slots.get(i)?).ok()?.checked_sub(1)?;
            let (start, len) = *self.spans.get(k)?;
            let (start, len) = (start as usize, len as usize);
            if self.bytes.get(start..start + len)? == name {
                return self.entries.get(k);
            }
            i = (i + 1) & mask;
        }
    }
}

/// Collects unique names for a [`NameTable`].
struct NameTableBuilder {
    bytes: Vec<u8>,
    spans: Vec<(u32, u32)>,
    entries: Vec<Entry>,
}

impl NameTableBuilder {
    fn with_capacity(n: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(n * 24),
            spans: Vec::with_capacity(n),
            entries: Vec::with_capacity(n),
        }
    }

    /// Adds a name (each name once).
    fn push(&mut self, name: &[u8], entry: Entry) {
        self.spans
            .push((self.bytes.len() as u32, name.len() as u32));
        self.bytes.extend_from_slice(name);
        self.entries.push(entry);
    }

    fn finish(self) -> NameTable {
        let hasher = RandomState::new();
        let size = (self.entries.len() * 2).next_power_of_two().max(2);
        let mut slots = vec![0u32; size].into_boxed_slice();
        let mask = size - 1;
        for (k, &(start, len)) in self.spans.iter().enumerate() {
            let name = &self.bytes[start as usize..(start + len) as usize];
            let mut i = hasher.hash_one(name) as usize & mask;
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = k as u32 + 1;
        }
        NameTable {
            hasher,
            bytes: self.bytes.into_boxed_slice(),
            spans: self.spans.into_boxed_slice(),
            entries: self.entries.into_boxed_slice(),
            slots,
        }
    }
}

/// Every org's zone, by network id; what the DNS listeners read.
#[derive(Debug, Default)]
pub struct ZoneIndex {
    orgs: HashMap<NetworkId, Arc<OrgZone>>,
    revision: Revision,
}

impl ZoneIndex {
    /// Builds every org's zone from `snapshot`, ordering `top<N>.nearest`
    /// by distance from `my_region` (this gateway's region) in `distances`.
    pub fn build(snapshot: &Snapshot, my_region: &RegionName, distances: &RegionDistances) -> Self {
        Self::update(None, snapshot, my_region, distances).0
    }

    /// Builds the index for `snapshot` like [`ZoneIndex::build`], taking
    /// over from `prev` (the index built from the snapshot given with it)
    /// every org's zone whose peers and instances are unchanged: a store
    /// change costs a compare of everything and a rebuild of the orgs it
    /// touched (100,000 instances: one org's change in milliseconds, not
    /// half a second). Also returns how many zones were built.
    pub fn update(
        prev: Option<(&ZoneIndex, &Snapshot)>,
        snapshot: &Snapshot,
        my_region: &RegionName,
        distances: &RegionDistances,
    ) -> (Self, usize) {
        let mut now = OrgContents::of(snapshot);
        let mut before = prev.map(|(index, snap)| (index, OrgContents::of(snap)));
        let mut built = 0;
        let orgs = snapshot
            .orgs
            .iter()
            .map(|org| {
                let name = org.name.as_str();
                let instances = now.instances.remove(name).unwrap_or_default();
                let peers = now.peers.remove(name).unwrap_or_default();
                let kept = before.as_mut().and_then(|(index, old)| {
                    let zone = index.orgs.get(&org.network_id)?;
                    let same = old.instances.remove(name).unwrap_or_default() == instances
                        && old.peers.remove(name).unwrap_or_default() == peers
                        && zone.prefix() == org.prefix();
                    same.then(|| zone.clone())
                });
                let zone = kept.unwrap_or_else(|| {
                    built += 1;
                    Arc::new(build_org(
                        org.prefix(),
                        instances,
                        peers,
                        snapshot.revision,
                        my_region,
                        distances,
                    ))
                });
                (org.network_id, zone)
            })
            .collect();
        let index = Self {
            orgs,
            revision: snapshot.revision,
        };
        (index, built)
    }

    /// The zone of the org whose /48 is `prefix`.
    pub fn org(&self, prefix: OrgPrefix) -> Option<&Arc<OrgZone>> {
        self.orgs.get(&prefix.network_id())
    }

    /// The store revision this index was built from.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// How many orgs have a zone.
    pub fn len(&self) -> usize {
        self.orgs.len()
    }

    /// Whether no org has a zone.
    pub fn is_empty(&self) -> bool {
        self.orgs.is_empty()
    }
}

/// A snapshot's instances and peers, by org name: what an org's zone is
/// built from.
struct OrgContents<'a> {
    instances: HashMap<&'a str, Vec<&'a Instance>>,
    peers: HashMap<&'a str, Vec<(&'a str, Ipv6Addr)>>,
}

impl<'a> OrgContents<'a> {
    fn of(snapshot: &'a Snapshot) -> Self {
        let mut instances: HashMap<&str, Vec<&Instance>> = HashMap::new();
        for i in &snapshot.instances {
            instances.entry(i.org.as_str()).or_default().push(i);
        }
        let mut peers: HashMap<&str, Vec<(&str, Ipv6Addr)>> = HashMap::new();
        for p in &snapshot.peers {
            peers
                .entry(p.org.as_str())
                .or_default()
                .push((p.name.as_str(), p.net.peer_addr()));
        }
        Self { instances, peers }
    }
}

/// One name's data before encoding.
#[derive(Default)]
struct Draft {
    /// Sorted and deduplicated when the zone is finished.
    aaaa: Vec<Ipv6Addr>,
    txt: Option<String>,
    /// The TXT list was cut to fit one message.
    truncated: bool,
    nearest: Option<Vec<Ipv6Addr>>,
}

/// Names under construction, keyed by wire-format name so that the arena is
/// laid out in a deterministic order.
struct Builder {
    names: BTreeMap<Vec<u8>, Draft>,
}

impl Builder {
    fn new() -> Self {
        let mut b = Self {
            names: BTreeMap::new(),
        };
        b.name(&["internal"]);
        b.name(&["_apps", "internal"]);
        b.name(&["_instances", "internal"]);
        b.name(&["all", "_instances", "internal"]);
        b.name(&["_peer", "internal"]);
        b
    }

    /// The draft of `labels` (+ `.`), created empty (the name exists).
    fn name(&mut self, labels: &[&str]) -> &mut Draft {
        self.names.entry(wire_name(labels)).or_default()
    }

    fn aaaa(&mut self, labels: &[&str], addrs: impl IntoIterator<Item = Ipv6Addr>) {
        self.name(labels).aaaa.extend(addrs);
    }

    /// Sets a TXT value, the `items` joined by `sep`, cut to fit one
    /// message (see [`join_within`]); no items leave the name with no TXT
    /// data.
    fn list<T: fmt::Display>(
        &mut self,
        labels: &[&str],
        items: impl IntoIterator<Item = T>,
        sep: &str,
    ) {
        let name = wire_name(labels);
        let budget = txt_value_budget(name.len());
        let (value, cut) = join_within(items, sep, budget);
        let d = self.names.entry(name).or_default();
        if !value.is_empty() {
            d.txt = Some(value);
            d.truncated = cut.is_some();
        }
    }

    fn finish(self, prefix: OrgPrefix, serial: u32) -> OrgZone {
        let mut arena = Vec::new();
        let mut names = NameTableBuilder::with_capacity(self.names.len());
        let mut oversized = Vec::new();
        let mut truncated = Vec::new();
        let soa = encode_soa(&mut arena, &[0xC0, 0x0C], TTL, serial);
        let ns = encode_ns(&mut arena);
        let negative_soa = encode_soa(&mut arena, &wire_name(&["internal"]), NEGATIVE_TTL, serial);
        for (name, mut draft) in self.names {
            draft.aaaa.sort_unstable();
            draft.aaaa.dedup();
            let aaaa = encode_aaaa(&mut arena, draft.aaaa.iter().copied());
            let txt = draft
                .txt
                .as_deref()
                .map(|v| encode_txt(&mut arena, v))
                .unwrap_or_default();
            let nearest = draft
                .nearest
                .map(|addrs| encode_aaaa(&mut arena, addrs.into_iter()));
            // The response is header + question + answers + OPT.
            let fixed = HEADER_LEN + name.len() + 4 + OPT_RR_LEN;
            if [aaaa, txt]
                .iter()
                .any(|r| r.oversize || fixed + r.len as usize > MAX_MESSAGE)
            {
                oversized.push(dotted(&name));
            }
            if draft.truncated {
                truncated.push(dotted(&name));
            }
            names.push(&name, Entry { aaaa, txt, nearest });
        }
        OrgZone {
            prefix,
            names: names.finish(),
            arena: arena.into_boxed_slice(),
            oversized,
            truncated,
            serial,
            soa,
            ns,
            negative_soa,
        }
    }
}

/// Builds one org's zone from its instances and peers (any order).
fn build_org(
    prefix: OrgPrefix,
    mut instances: Vec<&Instance>,
    mut peers: Vec<(&str, Ipv6Addr)>,
    revision: Revision,
    my_region: &RegionName,
    distances: &RegionDistances,
) -> OrgZone {
    const I: &str = "internal";
    let mut b = Builder::new();
    instances.sort_by(|a, b| (&a.app, &a.id).cmp(&(&b.app, &b.id)));
    peers.sort();

    let mut apps: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
    for i in &instances {
        apps.entry(i.app.as_str()).or_default().push(*i);
    }

    for (app, list) in &apps {
        let app = *app;
        let started = || list.iter().filter(|i| i.started);
        b.aaaa(&[app, I], started().map(|i| i.address));
        b.aaaa(&["global", app, I], started().map(|i| i.address));
        b.name(&["all", app, I]);
        b.name(&["vm", app, I]);
        b.name(&["of", app, I]);

        let mut started_regions = BTreeSet::new();
        let mut all_regions = BTreeSet::new();
        for i in list.iter() {
            all_regions.insert(i.region.as_str());
            if i.started {
                started_regions.insert(i.region.as_str());
            }
            if i.region.as_str() != "global" {
                let addr = i.started.then_some(i.address);
                b.aaaa(&[i.region.as_str(), app, I], addr);
            }
            b.aaaa(&[i.id.as_str(), "vm", app, I], [i.address]);
            if let Some(g) = &i.process_group {
                b.name(&["process", app, I]);
                let addr = i.started.then_some(i.address);
                b.aaaa(&[g.as_str(), "process", app, I], addr);
            }
        }
        b.list(&["regions", app, I], started_regions, ",");
        b.list(&["all", "regions", app, I], all_regions, ",");
        let vm = |i: &&Instance| format!("{} {}", i.id, i.region);
        b.list(&["vms", app, I], started().map(vm), ",");
        b.list(&["all", "vms", app, I], list.iter().map(vm), ",");

        let mut nearest: Vec<(f64, &str, &str, Ipv6Addr)> = started()
            .map(|i| {
                let d = distances
                    .distance_km(my_region, &i.region)
                    .unwrap_or(f64::INFINITY);
                (d, i.region.as_str(), i.id.as_str(), i.address)
            })
            .collect();
        nearest.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)).then(a.2.cmp(b.2)));
        let mut seen = BTreeSet::new();
        let order = nearest
            .into_iter()
            .filter(|n| seen.insert(n.3))
            .map(|n| n.3)
            .collect();
        b.name(&["nearest", "of", app, I]).nearest = Some(order);
    }

    b.list(&["_apps", I], apps.keys(), ",");
    let instance = |i: &Instance| {
        format!(
            "instance={},app={},ip={},region={}",
            i.id, i.app, i.address, i.region
        )
    };
    let started = instances.iter().filter(|i| i.started);
    b.list(&["_instances", I], started.map(|i| instance(i)), ";");
    let all = instances.iter().map(|i| instance(i));
    b.list(&["all", "_instances", I], all, ";");

    // Every peer by the name its owner gave it: sixpn names no peer itself
    // (Fly leaves out its auto-named `interactive-*` peers; there are none
    // here to leave out).
    b.list(&["_peer", I], peers.iter().map(|p| p.0), ",");
    for (name, addr) in &peers {
        b.aaaa(&[name, "_peer", I], [*addr]);
    }
    // flyctl probes `_api.internal` for the org's API address: here, the
    // org's DNS server `::3` on the gateway.
    b.aaaa(&["_api", I], [prefix.dns_addr()]);
    // The serial is the revision's low 32 bits (RFC 1982 arithmetic
    // copes with the wrap).
    b.finish(prefix, revision as u32)
}

/// The final item of a list cut to fit one message: `shown` items of
/// `total` are in the value before it.
pub(crate) fn truncation_marker(shown: usize, total: usize) -> String {
    format!("truncated: {shown} of {total}")
}

/// The longest TXT value (one record, 255-byte character-strings) that
/// fits in one message with the question (a `name_len`-byte name), its
/// 12-byte header and our OPT.
fn txt_value_budget(name_len: usize) -> usize {
    let rdlen_of = |l: usize| l + l.div_ceil(255);
    let max_rdlen = MAX_MESSAGE
        .saturating_sub(HEADER_LEN + name_len + 4 + OPT_RR_LEN + 12)
        .min(usize::from(u16::MAX));
    let mut l = max_rdlen * 255 / 256;
    while rdlen_of(l + 1) <= max_rdlen {
        l += 1;
    }
    while l > 0 && rdlen_of(l) > max_rdlen {
        l -= 1;
    }
    l
}

/// `items` joined by `sep`, at most `budget` bytes: a list that is longer
/// is cut after the last whole item that leaves room for one more, the
/// marker [`truncation_marker`] (so a reader splitting on `sep` gets whole
/// items and then the marker, which no name can be: names have no spaces
/// or colons). Also returns (items shown, items in all) when cut.
fn join_within<T: fmt::Display>(
    items: impl IntoIterator<Item = T>,
    sep: &str,
    budget: usize,
) -> (String, Option<(usize, usize)>) {
    use fmt::Write as _;
    let mut out = String::new();
    // Where each item written ends; past the budget items are only counted.
    let mut ends = Vec::new();
    let mut total = 0;
    for item in items {
        total += 1;
        if out.len() > budget {
            continue;
        }
        if !ends.is_empty() {
            out.push_str(sep);
        }
        let _ = write!(out, "{item}");
        ends.push(out.len());
    }
    if out.len() <= budget {
        return (out, None);
    }
    // The longest marker (`shown` has at most as many digits as `total`).
    let room = sep.len() + truncation_marker(total, total).len();
    let shown = ends.partition_point(|&end| end + room <= budget);
    out.truncate(ends.get(shown.wrapping_sub(1)).copied().unwrap_or(0));
    if shown > 0 {
        out.push_str(sep);
    }
    out.push_str(&truncation_marker(shown, total));
    (out, Some((shown, total)))
}

/// `labels` as a wire-format name: length-prefixed labels and the root.
/// Labels come from validated names (≤ 63 bytes, lower case).
pub(crate) fn wire_name(labels: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1);
    for l in labels {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// A wire-format name as `a.b.c` (for logs).
fn dotted(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&len) = wire.get(pos) {
        if len == 0 {
            break;
        }
        let label = wire
            .get(pos + 1..pos + 1 + len as usize)
            .unwrap_or_default();
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&String::from_utf8_lossy(label));
        pos += 1 + len as usize;
    }
    out
}

/// The fixed part of an answer record owned by the question name.
fn rr_head(arena: &mut Vec<u8>, rtype: u16) {
    arena.extend_from_slice(&[0xC0, 0x0C]);
    arena.extend_from_slice(&rtype.to_be_bytes());
    arena.extend_from_slice(&CLASS_IN.to_be_bytes());
    arena.extend_from_slice(&TTL.to_be_bytes());
}

/// The SOA of `internal.` owned by `owner` (wire bytes: a pointer or a
/// name), with `ttl`. Names in the RDATA are written out (no compression:
/// the record is copied to wherever the response has room for it).
///
/// Written by hand like every other record here rather than with
/// hickory-proto's encoder: its `Name` parsing and `BinEncoder` are
/// fallible for what are constants, and the handler tests decode these
/// records with hickory-proto, which checks the bytes.
fn encode_soa(arena: &mut Vec<u8>, owner: &[u8], ttl: u32, serial: u32) -> Rrs {
    let (mname, rname) = (wire_name(MNAME), wire_name(RNAME));
    let start = arena.len();
    arena.extend_from_slice(owner);
    arena.extend_from_slice(&TYPE_SOA.to_be_bytes());
    arena.extend_from_slice(&CLASS_IN.to_be_bytes());
    arena.extend_from_slice(&ttl.to_be_bytes());
    let rdlen = (mname.len() + rname.len() + 20) as u16;
    arena.extend_from_slice(&rdlen.to_be_bytes());
    arena.extend_from_slice(&mname);
    arena.extend_from_slice(&rname);
    for v in [serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, SOA_MINIMUM] {
        arena.extend_from_slice(&v.to_be_bytes());
    }
    Rrs {
        start: start as u32,
        len: (arena.len() - start) as u32,
        count: 1,
        oversize: false,
    }
}

/// The NS of `internal.` as an answer record: [`MNAME`].
fn encode_ns(arena: &mut Vec<u8>) -> Rrs {
    let mname = wire_name(MNAME);
    let start = arena.len();
    rr_head(arena, TYPE_NS);
    arena.extend_from_slice(&(mname.len() as u16).to_be_bytes());
    arena.extend_from_slice(&mname);
    Rrs {
        start: start as u32,
        len: (arena.len() - start) as u32,
        count: 1,
        oversize: false,
    }
}

fn encode_aaaa(arena: &mut Vec<u8>, addrs: impl Iterator<Item = Ipv6Addr>) -> Rrs {
    let start = arena.len();
    let mut count = 0;
    for a in addrs {
        rr_head(arena, TYPE_AAAA);
        arena.extend_from_slice(&16u16.to_be_bytes());
        arena.extend_from_slice(&a.octets());
        count += 1;
    }
    debug_assert_eq!(arena.len() - start, count as usize * AAAA_RR_LEN);
    Rrs {
        start: start as u32,
        len: (arena.len() - start) as u32,
        count,
        oversize: false,
    }
}

/// One TXT record holding `value` as 255-byte character-strings.
fn encode_txt(arena: &mut Vec<u8>, value: &str) -> Rrs {
    let chunks = value.as_bytes().chunks(255);
    let rdlen = chunks.len() + value.len();
    let Ok(rdlen) = u16::try_from(rdlen) else {
        return Rrs {
            oversize: true,
            ..Rrs::default()
        };
    };
    let start = arena.len();
    rr_head(arena, TYPE_TXT);
    arena.extend_from_slice(&rdlen.to_be_bytes());
    for c in chunks {
        arena.push(c.len() as u8);
        arena.extend_from_slice(c);
    }
    Rrs {
        start: start as u32,
        len: (arena.len() - start) as u32,
        count: 1,
        oversize: false,
    }
}

/// Where regions are, for ordering `top<N>.nearest.of.<app>.internal`:
/// great-circle distance between region coordinates. A region without
/// coordinates is farther than any region with them (but a region is always
/// at distance 0 from itself).
#[derive(Clone, Debug)]
pub struct RegionDistances {
    coords: HashMap<RegionName, (f64, f64)>,
}

/// Coordinates (latitude, longitude in degrees) out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid coordinates for region {region}: latitude {lat} must be in -90..=90 and longitude {lon} in -180..=180")]
pub struct BadCoordinates {
    /// The region.
    pub region: RegionName,
    /// The latitude given.
    pub lat: f64,
    /// The longitude given.
    pub lon: f64,
}

/// Fly's common region codes at their airports (lat, lon in degrees).
const BUILTIN_REGIONS: &[(&str, f64, f64)] = &[
    ("ams", 52.3105, 4.7683),
    ("arn", 59.6519, 17.9186),
    ("atl", 33.6367, -84.4281),
    ("bog", 4.7016, -74.1469),
    ("bom", 19.0896, 72.8656),
    ("cdg", 49.0097, 2.5479),
    ("den", 39.8617, -104.6731),
    ("dfw", 32.8968, -97.0380),
    ("ewr", 40.6925, -74.1687),
    ("fra", 50.0379, 8.5622),
    ("gig", -22.8100, -43.2506),
    ("gru", -23.4356, -46.4731),
    ("hkg", 22.3080, 113.9185),
    ("iad", 38.9445, -77.4558),
    ("jnb", -26.1392, 28.2460),
    ("lax", 33.9425, -118.4081),
    ("lhr", 51.4700, -0.4543),
    ("mad", 40.4719, -3.5626),
    ("mia", 25.7932, -80.2906),
    ("nrt", 35.7720, 140.3929),
    ("ord", 41.9786, -87.9048),
    ("otp", 44.5711, 26.0850),
    ("scl", -33.3930, -70.7858),
    ("sea", 47.4490, -122.3093),
    ("sin", 1.3644, 103.9915),
    ("sjc", 37.3626, -121.9291),
    ("syd", -33.9399, 151.1753),
    ("waw", 52.1657, 20.9671),
    ("yul", 45.4706, -73.7408),
    ("yyz", 43.6777, -79.6248),
];

impl Default for RegionDistances {
    fn default() -> Self {
        Self::builtin()
    }
}

impl RegionDistances {
    /// The built-in table of Fly's common regions.
    pub fn builtin() -> Self {
        let coords = BUILTIN_REGIONS
            .iter()
            .map(|&(r, lat, lon)| (RegionName::from_static(r), (lat, lon)))
            .collect();
        Self { coords }
    }

    /// A table with no regions (every other region is "unknown").
    pub fn empty() -> Self {
        Self {
            coords: HashMap::new(),
        }
    }

    /// Adds or replaces a region's coordinates (the configurable override).
    pub fn set(&mut self, region: RegionName, lat: f64, lon: f64) -> Result<(), BadCoordinates> {
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(BadCoordinates { region, lat, lon });
        }
        self.coords.insert(region, (lat, lon));
        Ok(())
    }

    /// The built-in table with `overrides` applied on top.
    pub fn with_overrides(
        overrides: impl IntoIterator<Item = (RegionName, (f64, f64))>,
    ) -> Result<Self, BadCoordinates> {
        let mut d = Self::builtin();
        for (r, (lat, lon)) in overrides {
            d.set(r, lat, lon)?;
        }
        Ok(d)
    }

    /// A region's coordinates, if known.
    pub fn coords(&self, region: &RegionName) -> Option<(f64, f64)> {
        self.coords.get(region).copied()
    }

    /// Great-circle distance in km (haversine on a 6371 km sphere); 0 from a
    /// region to itself, `None` if either region is unknown.
    pub fn distance_km(&self, a: &RegionName, b: &RegionName) -> Option<f64> {
        if a == b {
            return Some(0.0);
        }
        let (lat1, lon1) = self.coords(a)?;
        let (lat2, lon2) = self.coords(b)?;
        let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
        let dp = (lat2 - lat1).to_radians();
        let dl = (lon2 - lon1).to_radians();
        let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        Some(2.0 * 6371.0 * h.sqrt().min(1.0).asin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionName {
        s.parse().unwrap()
    }

    #[test]
    fn builtin_regions_are_valid_and_distances_are_plausible() {
        let d = RegionDistances::builtin();
        assert_eq!(d.coords.len(), 30);
        let km = |a, b| d.distance_km(&r(a), &r(b)).unwrap();
        assert_eq!(km("lhr", "lhr"), 0.0);
        // London–Paris ≈ 350 km, London–New York ≈ 5,500 km.
        assert!(
            (300.0..400.0).contains(&km("lhr", "cdg")),
            "{}",
            km("lhr", "cdg")
        );
        assert!((5400.0..5700.0).contains(&km("lhr", "ewr")));
        assert_eq!(km("lhr", "syd"), km("syd", "lhr"));
        assert!(km("lhr", "ams") < km("lhr", "fra"));
        assert_eq!(d.distance_km(&r("lhr"), &r("xyz")), None);
        assert_eq!(d.distance_km(&r("xyz"), &r("xyz")), Some(0.0));
    }

    #[test]
    fn overrides_add_and_replace_regions() {
        let d =
            RegionDistances::with_overrides([(r("xyz"), (51.0, 0.0)), (r("syd"), (51.5, -0.5))])
                .unwrap();
        assert!(d.distance_km(&r("lhr"), &r("xyz")).unwrap() < 100.0);
        assert!(d.distance_km(&r("lhr"), &r("syd")).unwrap() < 100.0);
        let e = RegionDistances::with_overrides([(r("abc"), (91.0, 0.0))]).unwrap_err();
        assert!(e.to_string().contains("abc"), "{e}");
        assert!(RegionDistances::empty().coords(&r("lhr")).is_none());
    }

    #[test]
    fn txt_values_split_into_255_byte_strings() {
        let mut arena = Vec::new();
        let v = "x".repeat(600);
        let rrs = encode_txt(&mut arena, &v);
        assert_eq!(rrs.count, 1);
        // head(10) + rdlength(2) + 255+1 + 255+1 + 90+1
        assert_eq!(arena.len(), 12 + 603);
        assert_eq!(&arena[10..12], &603u16.to_be_bytes());
        assert_eq!(arena[12], 255);
        assert_eq!(arena[12 + 256], 255);
        assert_eq!(arena[12 + 512], 90);
        // Exactly 255 bytes is one string.
        let mut a2 = Vec::new();
        encode_txt(&mut a2, &"y".repeat(255));
        assert_eq!(a2.len(), 12 + 256);
        // Too large for a 16-bit RDLENGTH: oversized, nothing written.
        let mut a3 = Vec::new();
        let big = encode_txt(&mut a3, &"z".repeat(70_000));
        assert!(big.oversize && a3.is_empty());
    }

    #[test]
    fn the_txt_budget_is_the_largest_value_whose_response_fits() {
        for name_len in [10, 16, 100, 255] {
            let l = txt_value_budget(name_len);
            let response = |l: usize| {
                let mut arena = Vec::new();
                let rrs = encode_txt(&mut arena, &"v".repeat(l));
                assert!(!rrs.oversize);
                HEADER_LEN + name_len + 4 + rrs.len as usize + OPT_RR_LEN
            };
            assert!(response(l) <= MAX_MESSAGE, "{name_len}");
            assert!(response(l + 1) > MAX_MESSAGE, "{name_len}");
        }
    }

    #[test]
    fn lists_are_cut_after_a_whole_item_with_a_marker() {
        let items = ["aaaa", "bbbb", "cccc", "dddd"];
        // Fits exactly: whole, unmarked.
        assert_eq!(
            join_within(items, ",", 19),
            ("aaaa,bbbb,cccc,dddd".into(), None)
        );
        // One byte short: as many items as leave room for the marker.
        let (v, cut) = join_within(items, ",", 18);
        assert_eq!(v, "truncated: 0 of 4");
        assert_eq!(cut, Some((0, 4)));
        let six = ["aaaa", "bbbb", "cccc", "dddd", "eeee", "ffff"];
        let (v, cut) = join_within(six, ";", 28);
        assert_eq!(v, "aaaa;bbbb;truncated: 2 of 6");
        assert_eq!(cut, Some((2, 6)));
        // The marker is sized for the widest count.
        let many: Vec<String> = (0..1000).map(|k| format!("p{k:03}")).collect();
        for budget in 20..200 {
            let (v, cut) = join_within(&many, ",", budget);
            assert!(v.len() <= budget, "{budget}: {v}");
            let (shown, total) = cut.unwrap();
            assert_eq!(total, 1000);
            let parts: Vec<&str> = v.split(',').collect();
            assert_eq!(parts.len(), shown + 1);
            assert_eq!(parts[..shown], many[..shown]);
        }
        assert_eq!(
            join_within(Vec::<String>::new(), ",", 0),
            (String::new(), None)
        );
    }

    #[test]
    fn name_table_finds_every_name_and_only_those() {
        for n in [0usize, 1, 2, 3, 1000, 4096] {
            let names: Vec<Vec<u8>> = (0..n)
                .map(|i| wire_name(&[&format!("n{i}"), "internal"]))
                .collect();
            let mut b = NameTableBuilder::with_capacity(n);
            for (i, name) in names.iter().enumerate() {
                let rrs = Rrs {
                    count: i as u32,
                    ..Rrs::default()
                };
                b.push(
                    name,
                    Entry {
                        aaaa: rrs,
                        ..Entry::default()
                    },
                );
            }
            let t = b.finish();
            assert_eq!(t.len(), n);
            assert!(t.slots.len() >= 2 * n && t.slots.len().is_power_of_two());
            for (i, name) in names.iter().enumerate() {
                assert_eq!(t.get(name).map(|e| e.aaaa.count), Some(i as u32));
            }
            for miss in [
                &b""[..],
                b"\0",
                b"\x02n0\x08internal",
                b"\x05n9999\x08internal\x00",
            ] {
                assert!(t.get(miss).is_none(), "{miss:?}");
            }
        }
    }

    #[test]
    fn wire_names_round_trip_for_logs() {
        let w = wire_name(&["a", "_peer", "internal"]);
        assert_eq!(w, b"\x01a\x05_peer\x08internal\x00");
        assert_eq!(dotted(&w), "a._peer.internal");
    }
}
