//! The handler on bytes: every answer, rcode and malformed query, with
//! chosen source addresses and no sockets.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use proptest::prelude::*;

use super::*;
use crate::dns::zone::{RegionDistances, ZoneIndex, TTL};
use crate::dns::SharedZones;
use crate::model::{HostId, NetworkId, PrivateKey, RegionName};
use crate::store::{Gateway, Instance, Org, Snapshot};

const ACME: u32 = 0x18;
const OTHER: u32 = 0x19;

fn r(s: &str) -> RegionName {
    s.parse().unwrap()
}

fn prefix(net: u32) -> OrgPrefix {
    NetworkId::new(net).unwrap().prefix()
}

fn addr(net: u32, machine: u32) -> Ipv6Addr {
    let (hi, lo) = ((machine >> 16) as u16, machine as u16);
    Ipv6Addr::new(
        0xfdaa,
        (net >> 16) as u16,
        net as u16,
        0xa7b,
        0x7d,
        hi,
        lo,
        2,
    )
}

fn org(s: &mut Snapshot, name: &str, net: u32) {
    s.orgs.push(Org {
        name: name.parse().unwrap(),
        network_id: NetworkId::new(net).unwrap(),
    });
}

fn gateway(s: &mut Snapshot, name: &str, region: &str, host: u32) {
    s.gateways.push(Gateway {
        name: name.parse().unwrap(),
        region: r(region),
        host_id: HostId::from_u32(host),
        endpoint: "gw.example.net:51820".parse().unwrap(),
        public_key: PrivateKey::generate().public_key(),
    });
}

#[allow(clippy::too_many_arguments)]
fn instance(
    s: &mut Snapshot,
    (org, net): (&str, u32),
    app: &str,
    id: &str,
    region: &str,
    machine: u32,
    group: Option<&str>,
    started: bool,
) {
    s.instances.push(Instance {
        org: org.parse().unwrap(),
        app: app.parse().unwrap(),
        id: id.parse().unwrap(),
        region: r(region),
        address: addr(net, machine),
        process_group: group.map(|g| g.parse().unwrap()),
        started,
    });
}

fn peer(s: &mut Snapshot, (org, net): (&str, u32), name: &str, gw: &str, slot: u32) {
    let g = s.gateways.iter().find(|g| g.name.as_str() == gw).unwrap();
    let p = crate::store::fixture::peer_on(g, org, prefix(net), name, slot);
    s.peers.push(p);
}

const A: (&str, u32) = ("acme", ACME);
const O: (&str, u32) = ("other", OTHER);

/// acme: app `web` in lhr, iad, ams, syd (stopped) and an unknown
/// region; app `db` with one stopped instance; peers `laptop` (lhr-1)
/// and `ci` (iad-1). other: app `secret`, peer `spy`.
fn fixture() -> Snapshot {
    let mut s = Snapshot {
        revision: 7,
        ..Snapshot::default()
    };
    org(&mut s, "acme", ACME);
    org(&mut s, "other", OTHER);
    gateway(&mut s, "lhr-1", "lhr", 0x0a7b_0d6b);
    gateway(&mut s, "iad-1", "iad", 0x0a7b_0001);
    instance(&mut s, A, "web", "a1", "lhr", 0xa1, Some("web"), true);
    instance(&mut s, A, "web", "b1", "iad", 0xb1, Some("web"), true);
    instance(&mut s, A, "web", "c1", "ams", 0xc1, Some("worker"), true);
    instance(&mut s, A, "web", "d1", "syd", 0xd1, Some("worker"), false);
    instance(&mut s, A, "web", "e1", "xyz", 0xe1, None, true);
    instance(&mut s, A, "db", "p1", "fra", 0x91, None, false);
    instance(&mut s, O, "secret", "s1", "lhr", 0x51, None, true);
    peer(&mut s, A, "laptop", "lhr-1", 0);
    peer(&mut s, A, "ci", "iad-1", 0);
    peer(&mut s, O, "spy", "lhr-1", 0);
    s
}

fn build(s: &Snapshot) -> ZoneIndex {
    ZoneIndex::build(s, &r("lhr"), &RegionDistances::builtin())
}

/// A source inside acme's /48 (the `laptop` peer).
fn member() -> IpAddr {
    "fdaa:0:18:a7b:d6b:0:a:2".parse().unwrap()
}

fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn raw(index: &ZoneIndex, src: IpAddr, q: &[u8], transport: Transport) -> (Outcome, Vec<u8>) {
    let mut out = vec![0xAA; 3]; // answer() must clear it
    let o = answer(index, prefix(ACME), src, q, transport, &mut out);
    (o, out)
}

/// Asks acme's listener from a member, over UDP with EDNS 1232.
fn ask(index: &ZoneIndex, name: &str, rtype: RecordType) -> Message {
    let q = query(name, rtype, Some(1232));
    let (o, out) = raw(index, member(), &q, Transport::Udp);
    assert!(matches!(o, Outcome::Answered(_)), "{name}: {o:?}");
    let m = Message::from_vec(&out).unwrap();
    let expect = match o {
        Outcome::Answered(Rcode::NxDomain) => ResponseCode::NXDomain,
        _ => m.metadata.response_code,
    };
    assert_eq!(m.metadata.response_code, expect);
    m
}

fn aaaa(m: &Message) -> Vec<Ipv6Addr> {
    m.answers
        .iter()
        .map(|rec| {
            assert_eq!(rec.ttl, TTL);
            assert_eq!(rec.dns_class, DNSClass::IN);
            match &rec.data {
                RData::AAAA(a) => a.0,
                other => panic!("not AAAA: {other:?}"),
            }
        })
        .collect()
}

/// Each TXT record's strings, concatenated.
fn txt(m: &Message) -> Vec<String> {
    txt_strings(m)
        .into_iter()
        .map(|strings| String::from_utf8(strings.concat()).unwrap())
        .collect()
}

fn txt_strings(m: &Message) -> Vec<Vec<Vec<u8>>> {
    m.answers
        .iter()
        .map(|rec| {
            assert_eq!(rec.ttl, TTL);
            match &rec.data {
                RData::TXT(t) => t.txt_data.iter().map(|s| s.to_vec()).collect(),
                other => panic!("not TXT: {other:?}"),
            }
        })
        .collect()
}

fn is_answer(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, rcode);
    assert!(m.metadata.authoritative);
    assert!(!m.metadata.truncation);
}

fn ok_aaaa(index: &ZoneIndex, name: &str) -> Vec<Ipv6Addr> {
    let m = ask(index, name, RecordType::AAAA);
    is_answer(&m, ResponseCode::NoError);
    aaaa(&m)
}

fn ok_txt(index: &ZoneIndex, name: &str) -> Vec<String> {
    let m = ask(index, name, RecordType::TXT);
    is_answer(&m, ResponseCode::NoError);
    txt(&m)
}

fn nxdomain(index: &ZoneIndex, name: &str, rtype: RecordType) {
    let m = ask(index, name, rtype);
    is_answer(&m, ResponseCode::NXDomain);
    assert!(m.answers.is_empty(), "{name}");
    negative_soa(index, &m);
}

fn nodata(index: &ZoneIndex, name: &str, rtype: RecordType) {
    let m = ask(index, name, rtype);
    is_answer(&m, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "{name} {rtype}: {:?}", m.answers);
    negative_soa(index, &m);
}

/// The SOA record's data.
fn soa_of(rec: &hickory_proto::rr::Record) -> &hickory_proto::rr::rdata::SOA {
    match &rec.data {
        RData::SOA(soa) => soa,
        other => panic!("not SOA: {other:?}"),
    }
}

/// A negative answer's AUTHORITY: acme's SOA at `internal.`, TTL
/// min(TTL, MINIMUM), serial of the zone — or nothing when the listener's
/// org has no zone.
fn negative_soa(index: &ZoneIndex, m: &Message) {
    let Some(zone) = index.org(prefix(ACME)) else {
        assert!(m.authorities.is_empty(), "{:?}", m.authorities);
        return;
    };
    assert_eq!(m.authorities.len(), 1, "{:?}", m.authorities);
    let rec = &m.authorities[0];
    assert_eq!(rec.name, Name::from_ascii("internal.").unwrap());
    assert_eq!(rec.dns_class, DNSClass::IN);
    assert_eq!(rec.ttl, crate::dns::zone::NEGATIVE_TTL);
    assert_eq!(rec.ttl, TTL.min(soa_of(rec).minimum));
    assert_eq!(soa_of(rec).serial, zone.serial());
    assert!(m.additionals.is_empty());
}

fn a(machine: u32) -> Ipv6Addr {
    addr(ACME, machine)
}

#[test]
fn an_update_rebuilds_only_the_orgs_that_changed_and_answers_as_a_build() {
    let before = fixture();
    let old = build(&before);
    let update = |s: &Snapshot| {
        ZoneIndex::update(
            Some((&old, &before)),
            s,
            &r("lhr"),
            &RegionDistances::builtin(),
        )
    };
    let zone = |i: &ZoneIndex, net| i.org(prefix(net)).unwrap().clone();

    // Nothing changed: nothing built, the same zones.
    let (same, built) = update(&before);
    assert_eq!(built, 0);
    assert!(std::sync::Arc::ptr_eq(
        &zone(&same, ACME),
        &zone(&old, ACME)
    ));

    // An instance and a peer added to acme: acme rebuilt and answering
    // them, other's zone taken over as it was.
    let mut after = before.clone();
    instance(&mut after, A, "api", "n1", "lhr", 0x77, None, true);
    peer(&mut after, A, "desk", "lhr-1", 1);
    after.revision = 8;
    let (new, built) = update(&after);
    assert_eq!(built, 1);
    assert_eq!(new.revision(), 8);
    assert!(std::sync::Arc::ptr_eq(
        &zone(&new, OTHER),
        &zone(&old, OTHER)
    ));
    assert!(!std::sync::Arc::ptr_eq(
        &zone(&new, ACME),
        &zone(&old, ACME)
    ));
    assert_eq!(ok_aaaa(&new, "api.internal"), vec![addr(ACME, 0x77)]);
    let fresh = build(&after);
    for name in ["_peer.internal", "_apps.internal", "_instances.internal"] {
        assert_eq!(ok_txt(&new, name), ok_txt(&fresh, name), "{name}");
    }
    for name in ["web.internal", "api.internal", "desk._peer.internal"] {
        assert_eq!(ok_aaaa(&new, name), ok_aaaa(&fresh, name), "{name}");
    }

    // An org removed goes; one added is built.
    let mut orgs = before.clone();
    orgs.orgs.retain(|o| o.name.as_str() != "other");
    orgs.instances.retain(|i| i.org.as_str() != "other");
    orgs.peers.retain(|p| p.org.as_str() != "other");
    org(&mut orgs, "third", 3);
    let (new, built) = update(&orgs);
    assert_eq!(built, 1);
    assert!(new.org(prefix(OTHER)).is_none());
    assert!(new.org(prefix(3)).is_some());
    assert!(std::sync::Arc::ptr_eq(&zone(&new, ACME), &zone(&old, ACME)));
}

/// `cargo test --release --lib bench_zone_update -- --ignored --nocapture`:
/// one instance added to a store of 1,000 orgs × 100 instances, as a
/// full build and as an update from the previous index.
#[test]
#[ignore = "benchmark"]
fn bench_zone_update_at_100k_instances() {
    let mut s = Snapshot::default();
    gateway(&mut s, "lhr-1", "lhr", 0x0a7b_0d6b);
    for o in 1..=1000u32 {
        let name = format!("org{o:04}");
        org(&mut s, &name, o);
        for i in 0..100u32 {
            let app = format!("app{}", i % 10);
            let id = format!("i{i:03}");
            instance(&mut s, (&name, o), &app, &id, "lhr", i + 1, None, true);
        }
    }
    // In store order, as snapshots come.
    let by_key = |a: &Instance, b: &Instance| (&a.org, &a.app, &a.id).cmp(&(&b.org, &b.app, &b.id));
    s.instances.sort_by(by_key);
    let t = std::time::Instant::now();
    let old = build(&s);
    let full = t.elapsed();
    let mut next = s.clone();
    instance(
        &mut next,
        ("org0500", 500),
        "new",
        "n1",
        "lhr",
        999,
        None,
        true,
    );
    next.instances
        .sort_by(|a, b| (&a.org, &a.app, &a.id).cmp(&(&b.org, &b.app, &b.id)));
    let t = std::time::Instant::now();
    let (new, built) = ZoneIndex::update(
        Some((&old, &s)),
        &next,
        &r("lhr"),
        &RegionDistances::builtin(),
    );
    let update = t.elapsed();
    assert_eq!(built, 1);
    assert!(new.org(prefix(500)).is_some());
    println!(
        "zone, 100k instances in 1,000 orgs: full build {full:?}, update after one change \
         {update:?} ({:.1}x faster)",
        full.as_secs_f64() / update.as_secs_f64()
    );
}

#[test]
fn app_and_global_names_list_started_instances_in_any_region() {
    let z = build(&fixture());
    let started = vec![a(0xa1), a(0xb1), a(0xc1), a(0xe1)];
    assert_eq!(ok_aaaa(&z, "web.internal"), started);
    assert_eq!(ok_aaaa(&z, "global.web.internal."), started);
    // An app whose instances are all stopped exists, with no addresses.
    nodata(&z, "db.internal", RecordType::AAAA);
    nodata(&z, "global.db.internal", RecordType::AAAA);
    nxdomain(&z, "nope.internal", RecordType::AAAA);
}

#[test]
fn region_names_list_started_instances_in_that_region() {
    let z = build(&fixture());
    assert_eq!(ok_aaaa(&z, "lhr.web.internal"), vec![a(0xa1)]);
    assert_eq!(ok_aaaa(&z, "iad.web.internal"), vec![a(0xb1)]);
    assert_eq!(ok_aaaa(&z, "xyz.web.internal"), vec![a(0xe1)]);
    // syd only has a stopped instance: the name exists, no address.
    nodata(&z, "syd.web.internal", RecordType::AAAA);
    nxdomain(&z, "sjc.web.internal", RecordType::AAAA);
}

#[test]
fn nearest_orders_by_distance_from_this_gateways_region() {
    let z = build(&fixture());
    // From lhr: lhr (0 km), ams (~370 km), iad (~5,900 km), then the
    // unknown region xyz; the stopped syd instance is never listed.
    assert_eq!(ok_aaaa(&z, "top1.nearest.of.web.internal"), vec![a(0xa1)]);
    assert_eq!(
        ok_aaaa(&z, "top2.nearest.of.web.internal"),
        vec![a(0xa1), a(0xc1)]
    );
    let all = vec![a(0xa1), a(0xc1), a(0xb1), a(0xe1)];
    assert_eq!(ok_aaaa(&z, "top4.nearest.of.web.internal"), all);
    assert_eq!(ok_aaaa(&z, "top99.nearest.of.web.internal"), all);
    assert_eq!(
        ok_aaaa(&z, "top99999999999999999999999.nearest.of.web.internal"),
        all
    );
    // From iad the order changes.
    let from_iad = ZoneIndex::build(&fixture(), &r("iad"), &RegionDistances::builtin());
    assert_eq!(
        ok_aaaa(&from_iad, "top2.nearest.of.web.internal"),
        vec![a(0xb1), a(0xa1)]
    );
    // No started instances: the name exists, no address.
    nodata(&z, "top3.nearest.of.db.internal", RecordType::AAAA);
    nodata(&z, "top3.nearest.of.web.internal", RecordType::TXT);
    for bad in ["top0", "top01", "top", "top-1", "topx", "top1x", "first1"] {
        nxdomain(
            &z,
            &format!("{bad}.nearest.of.web.internal"),
            RecordType::AAAA,
        );
    }
    nxdomain(&z, "top1.nearest.of.nope.internal", RecordType::AAAA);
    nxdomain(&z, "top1.nearest.web.internal", RecordType::AAAA);
    nxdomain(&z, "top1.x.nearest.of.web.internal", RecordType::AAAA);
    // The ancestors of top<N> exist.
    nodata(&z, "nearest.of.web.internal", RecordType::AAAA);
    nodata(&z, "of.web.internal", RecordType::AAAA);
}

#[test]
fn vm_and_process_names() {
    let z = build(&fixture());
    assert_eq!(ok_aaaa(&z, "a1.vm.web.internal"), vec![a(0xa1)]);
    // A stopped instance is still addressable by id (see zone.rs).
    assert_eq!(ok_aaaa(&z, "d1.vm.web.internal"), vec![a(0xd1)]);
    assert_eq!(ok_aaaa(&z, "p1.vm.db.internal"), vec![a(0x91)]);
    nxdomain(&z, "zz.vm.web.internal", RecordType::AAAA);
    nxdomain(&z, "a1.vm.db.internal", RecordType::AAAA);
    assert_eq!(
        ok_aaaa(&z, "web.process.web.internal"),
        vec![a(0xa1), a(0xb1)]
    );
    assert_eq!(ok_aaaa(&z, "worker.process.web.internal"), vec![a(0xc1)]);
    nxdomain(&z, "cron.process.web.internal", RecordType::AAAA);
    nodata(&z, "vm.web.internal", RecordType::AAAA);
    nodata(&z, "process.web.internal", RecordType::AAAA);
    // db has no process groups, so no `process` name either.
    nxdomain(&z, "process.db.internal", RecordType::AAAA);
}

#[test]
fn regions_and_vms_txt() {
    let z = build(&fixture());
    assert_eq!(ok_txt(&z, "regions.web.internal"), ["ams,iad,lhr,xyz"]);
    assert_eq!(
        ok_txt(&z, "all.regions.web.internal"),
        ["ams,iad,lhr,syd,xyz"]
    );
    assert_eq!(
        ok_txt(&z, "vms.web.internal"),
        ["a1 lhr,b1 iad,c1 ams,e1 xyz"]
    );
    assert_eq!(
        ok_txt(&z, "all.vms.web.internal"),
        ["a1 lhr,b1 iad,c1 ams,d1 syd,e1 xyz"]
    );
    nodata(&z, "regions.db.internal", RecordType::TXT);
    assert_eq!(ok_txt(&z, "all.regions.db.internal"), ["fra"]);
    nodata(&z, "vms.db.internal", RecordType::TXT);
    assert_eq!(ok_txt(&z, "all.vms.db.internal"), ["p1 fra"]);
    nodata(&z, "all.web.internal", RecordType::TXT);
}

#[test]
fn org_wide_txt_names() {
    let z = build(&fixture());
    assert_eq!(ok_txt(&z, "_apps.internal"), ["db,web"]);
    let inst = |id: &str, app: &str, m: u32, region: &str| {
        format!("instance={id},app={app},ip={},region={region}", a(m))
    };
    let started = [
        inst("a1", "web", 0xa1, "lhr"),
        inst("b1", "web", 0xb1, "iad"),
        inst("c1", "web", 0xc1, "ams"),
        inst("e1", "web", 0xe1, "xyz"),
    ];
    assert_eq!(ok_txt(&z, "_instances.internal"), [started.join(";")]);
    let all = [
        inst("p1", "db", 0x91, "fra"),
        inst("a1", "web", 0xa1, "lhr"),
        inst("b1", "web", 0xb1, "iad"),
        inst("c1", "web", 0xc1, "ams"),
        inst("d1", "web", 0xd1, "syd"),
        inst("e1", "web", 0xe1, "xyz"),
    ];
    assert_eq!(ok_txt(&z, "all._instances.internal"), [all.join(";")]);
    // Every peer of the org, on any gateway; another org's never.
    assert_eq!(ok_txt(&z, "_peer.internal"), ["ci,laptop"]);
    let laptop: Ipv6Addr = "fdaa:0:18:a7b:d6b:0:a:2".parse().unwrap();
    let ci: Ipv6Addr = "fdaa:0:18:a7b:1:0:a:2".parse().unwrap();
    assert_eq!(ok_aaaa(&z, "laptop._peer.internal"), [laptop]);
    assert_eq!(ok_aaaa(&z, "ci._peer.internal"), [ci]);
    nxdomain(&z, "spy._peer.internal", RecordType::AAAA);
    // `_api.internal`: the org's ::3; other types there are no-data.
    assert_eq!(
        ok_aaaa(&z, "_api.internal"),
        ["fdaa:0:18::3".parse::<Ipv6Addr>().unwrap()]
    );
    let m = ask(&z, "_api.internal", RecordType::TXT);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    nxdomain(&z, "secret.internal", RecordType::AAAA);
    nxdomain(&z, "s1.vm.secret.internal", RecordType::AAAA);
}

#[test]
fn empty_lists_are_no_data_and_fixed_names_always_exist() {
    let mut s = Snapshot::default();
    org(&mut s, "acme", ACME);
    let z = build(&s);
    for name in [
        "_apps.internal",
        "_instances.internal",
        "all._instances.internal",
        "_peer.internal",
        "internal",
    ] {
        nodata(&z, name, RecordType::TXT);
    }
    nxdomain(&z, "web.internal", RecordType::AAAA);
    // A listener whose org is gone from the index: nothing exists.
    let gone = ZoneIndex::default();
    nxdomain(&gone, "_apps.internal", RecordType::TXT);
}

#[test]
fn nxdomain_versus_no_data() {
    let z = build(&fixture());
    for t in [
        RecordType::A,
        RecordType::MX,
        RecordType::ANY,
        RecordType::TXT,
        RecordType::CNAME,
    ] {
        nodata(&z, "web.internal", t);
        nodata(&z, "a1.vm.web.internal", t);
    }
    nodata(&z, "_apps.internal", RecordType::AAAA);
    nodata(&z, "regions.web.internal", RecordType::AAAA);
    nodata(&z, "internal", RecordType::AAAA);
    nodata(&z, "vm.web.internal", RecordType::TXT);
    for t in [RecordType::AAAA, RecordType::A, RecordType::TXT] {
        nxdomain(&z, "nope.internal", t);
        nxdomain(&z, "a.b.c.d.web.internal", t);
        nxdomain(&z, "_nope.internal", t);
    }
}

#[test]
fn refused_outside_the_listeners_org() {
    let z = build(&fixture());
    let q = query("web.internal", RecordType::AAAA, Some(1232));
    let other_org: IpAddr = "fdaa:0:19:a7b:d6b:0:a:2".parse().unwrap();
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
    let outsiders = [
        other_org,
        "::1".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
        "fdaa::3".parse().unwrap(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        mapped,
    ];
    for src in outsiders {
        for t in [Transport::Udp, Transport::Tcp] {
            let (o, out) = raw(&z, src, &q, t);
            assert_eq!(o, Outcome::Answered(Rcode::Refused), "{src}");
            let m = Message::from_vec(&out).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::Refused);
            assert!(m.answers.is_empty() && !m.metadata.authoritative);
            assert_eq!(m.queries.len(), 1, "the question is echoed");
        }
    }
    // Not an open resolver either: other names are refused, not forwarded.
    let q = query("example.com", RecordType::A, None);
    assert_eq!(
        raw(&z, other_org, &q, Transport::Udp).0,
        Outcome::Answered(Rcode::Refused)
    );
    // A foreign source gets REFUSED even for a malformed query.
    let (o, out) = raw(&z, other_org, &q[..20], Transport::Udp);
    assert_eq!(o, Outcome::Answered(Rcode::Refused));
    assert_eq!(out.len(), HEADER_LEN);
    // And a member of the other org asking its own listener is fine.
    let mut out = Vec::new();
    let q = query("secret.internal", RecordType::AAAA, None);
    let o = answer(&z, prefix(OTHER), other_org, &q, Transport::Udp, &mut out);
    assert_eq!(o, Outcome::Answered(Rcode::NoError));
    assert_eq!(aaaa(&Message::from_vec(&out).unwrap()), [addr(OTHER, 0x51)]);
}

#[test]
fn names_outside_internal_are_forwarded() {
    let z = build(&fixture());
    for name in [
        "example.com",
        "internal.example.com",
        "web.internal.evil",
        ".",
    ] {
        let q = query(name, RecordType::AAAA, Some(1232));
        let (o, out) = raw(&z, member(), &q, Transport::Udp);
        assert_eq!(o, Outcome::Forward, "{name}");
        assert!(out.is_empty());
    }
}

#[test]
fn header_bits_id_and_0x20_case_are_echoed() {
    let z = build(&fixture());
    let mut q = query("ToP2.NeArEsT.oF.wEb.InTeRnAl", RecordType::AAAA, None);
    q[0] = 0xBE;
    q[1] = 0xEF;
    q[3] |= FLAG_CD;
    let (o, out) = raw(&z, member(), &q, Transport::Udp);
    assert_eq!(o, Outcome::Answered(Rcode::NoError));
    assert_eq!(&out[..2], &[0xBE, 0xEF]);
    assert_eq!(out[2], FLAG_QR | FLAG_AA | FLAG_RD);
    assert_eq!(out[3], FLAG_RA | FLAG_CD);
    // The question comes back byte for byte, mixed case included.
    assert_eq!(&out[HEADER_LEN..q.len()], &q[HEADER_LEN..]);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(aaaa(&m), [a(0xa1), a(0xc1)]);
    for rec in &m.answers {
        assert_eq!(rec.name.to_ascii(), "ToP2.NeArEsT.oF.wEb.InTeRnAl.");
    }
    // RD clear in, RD clear out.
    let mut q = query("web.internal", RecordType::AAAA, None);
    q[2] &= !FLAG_RD;
    let (_, out) = raw(&z, member(), &q, Transport::Udp);
    assert_eq!(out[2] & FLAG_RD, 0);
}

/// An org with `n` apps of 24-character names: `_apps.internal` is
/// about 25·n bytes.
fn many_apps(n: u32) -> (ZoneIndex, String) {
    let mut s = fixture();
    s.instances.retain(|i| i.org.as_str() != "acme");
    let mut names = Vec::new();
    for k in 0..n {
        let app = format!("long-application-name-{k:02}");
        instance(&mut s, A, &app, "i1", "lhr", k, None, true);
        names.push(app);
    }
    (build(&s), names.join(","))
}

#[test]
fn long_txt_is_split_into_255_byte_strings_and_reassembles() {
    let (z, expected) = many_apps(40);
    assert!(expected.len() > 3 * 255 && expected.len() < 4 * 255);
    let m = ask(&z, "_apps.internal", RecordType::TXT);
    is_answer(&m, ResponseCode::NoError);
    let strings = txt_strings(&m);
    assert_eq!(strings.len(), 1, "one record");
    let lens: Vec<usize> = strings[0].iter().map(Vec::len).collect();
    assert_eq!(lens, [255, 255, 255, expected.len() - 3 * 255]);
    assert_eq!(txt(&m), [expected]);
}

#[test]
fn udp_size_follows_edns_and_truncates_with_tc() {
    let (z, expected) = many_apps(40); // a ~1.1 kB response
    let name = "_apps.internal";
    let cases = [
        (None, true),        // 512 without EDNS
        (Some(600), true),   // the client's smaller buffer
        (Some(1232), false), // fits
        (Some(4096), false), // fits in our 1232
    ];
    for (edns, truncated) in cases {
        let q = query(name, RecordType::TXT, edns);
        let (o, out) = raw(&z, member(), &q, Transport::Udp);
        assert_eq!(o, Outcome::Answered(Rcode::NoError));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.truncation, truncated, "{edns:?}");
        assert!(out.len() <= usize::from(edns.unwrap_or(512)).clamp(512, 1232));
        if truncated {
            assert!(m.answers.is_empty());
            assert_eq!(m.queries.len(), 1);
        } else {
            assert_eq!(txt(&m), std::slice::from_ref(&expected));
        }
        // The OPT is echoed with our payload iff the query had one.
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), edns.map(|_| 1232));
    }
    // An advertised payload below 512 counts as 512 (RFC 6891 §6.2.5).
    let small = query("web.process.web.internal", RecordType::AAAA, Some(512));
    let mut q = small.clone();
    let class_at = q.len() - OPT_RR_LEN + 3;
    q[class_at..class_at + 2].copy_from_slice(&100u16.to_be_bytes());
    let (_, out) = raw(&build(&fixture()), member(), &q, Transport::Udp);
    assert!(!Message::from_vec(&out).unwrap().metadata.truncation);

    // Larger than 1232: truncated over UDP whatever the client says,
    // complete over TCP.
    let (z, expected) = many_apps(100);
    let q = query(name, RecordType::TXT, Some(4096));
    let (_, out) = raw(&z, member(), &q, Transport::Udp);
    let m = Message::from_vec(&out).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty() && out.len() <= 1232);
    let (o, out) = raw(&z, member(), &q, Transport::Tcp);
    assert_eq!(o, Outcome::Answered(Rcode::NoError));
    let m = Message::from_vec(&out).unwrap();
    assert!(!m.metadata.truncation);
    assert!(out.len() > 2000);
    assert_eq!(txt(&m), [expected]);
}

#[test]
fn edns_version_and_do_bit() {
    let z = build(&fixture());
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii("web.internal").unwrap(),
        RecordType::AAAA,
    ));
    let mut e = Edns::new();
    e.set_max_payload(1232).set_dnssec_ok(true);
    m.set_edns(e.clone());
    let (_, out) = raw(&z, member(), &m.to_vec().unwrap(), Transport::Udp);
    let resp = Message::from_vec(&out).unwrap();
    assert!(resp.edns.as_ref().unwrap().flags().dnssec_ok);
    e.set_version(1);
    m.set_edns(e);
    let (o, out) = raw(&z, member(), &m.to_vec().unwrap(), Transport::Udp);
    assert_eq!(o, Outcome::Answered(Rcode::BadVers));
    let resp = Message::from_vec(&out).unwrap();
    // 16 is both BADVERS and TSIG's BADSIG; hickory names it the latter.
    assert_eq!(u16::from(resp.metadata.response_code), 16);
    assert!(resp.answers.is_empty());
}

#[test]
fn aaaa_sets_too_large_for_any_message_are_servfail_over_tcp_and_lists_are_cut() {
    let mut s = fixture();
    for k in 0..2400 {
        instance(
            &mut s,
            A,
            "big",
            &format!("i{k}"),
            "lhr",
            0x1_0000 + k,
            None,
            true,
        );
    }
    let z = build(&s);
    let zone = z.org(prefix(ACME)).unwrap();
    assert_eq!(
        zone.oversized(),
        ["big.internal", "lhr.big.internal", "global.big.internal"]
    );
    assert_eq!(
        zone.truncated(),
        ["all._instances.internal", "_instances.internal"]
    );
    // An address set can't be cut (a resolver would take a part for the
    // whole): SERVFAIL over TCP, TC over UDP.
    let q = query("big.internal", RecordType::AAAA, Some(1232));
    let (o, out) = raw(&z, member(), &q, Transport::Tcp);
    assert_eq!(o, Outcome::Answered(Rcode::ServFail));
    let m = Message::from_vec(&out).unwrap();
    assert!(m.answers.is_empty() && m.authorities.is_empty());
    let (o, out) = raw(&z, member(), &q, Transport::Udp);
    assert_eq!(o, Outcome::Answered(Rcode::NoError));
    assert!(Message::from_vec(&out).unwrap().metadata.truncation);
    // A list is cut at a whole item, and says so.
    let q = query("_instances.internal", RecordType::TXT, Some(1232));
    let (o, out) = raw(&z, member(), &q, Transport::Tcp);
    assert_eq!(o, Outcome::Answered(Rcode::NoError));
    assert!(out.len() <= MAX_MESSAGE);
    let m = Message::from_vec(&out).unwrap();
    let v = txt(&m).pop().unwrap();
    let items: Vec<&str> = v.split(';').collect();
    let (last, shown) = items.split_last().unwrap();
    assert_eq!(*last, format!("truncated: {} of 2404", shown.len()));
    assert!(shown.len() > 1000, "{}", shown.len());
    assert!(shown
        .iter()
        .all(|i| i.starts_with("instance=") && i.ends_with("region=lhr")));
    // A prefix of the same set still fits.
    let q = query("top2000.nearest.of.big.internal", RecordType::AAAA, None);
    let (o, out) = raw(&z, member(), &q, Transport::Tcp);
    assert_eq!(o, Outcome::Answered(Rcode::NoError));
    assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 2000);
}

/// acme with `n` peers `peer-000000`… on one gateway (one key, cloned:
/// generating 100,000 would dominate the test).
fn many_peers(n: u32) -> Snapshot {
    let mut s = fixture();
    s.peers.retain(|p| p.org.as_str() != "acme");
    let g = s.gateways[0].clone();
    let first = crate::store::fixture::peer_on(&g, "acme", prefix(ACME), "peer-000000", 0);
    for k in 0..n {
        let slot = crate::model::PeerSlot::new(k).unwrap();
        let mut p = first.clone();
        p.name = format!("peer-{k:06}").parse().unwrap();
        p.slot = slot;
        p.net = slot.net(prefix(ACME), g.host_id);
        s.peers.push(p);
    }
    s
}

#[test]
fn a_peer_list_too_long_for_one_message_is_cut_with_a_marker() {
    let z = build(&many_peers(100_000));
    let zone = z.org(prefix(ACME)).unwrap();
    assert_eq!(zone.truncated(), ["_peer.internal"]);
    assert!(zone.oversized().is_empty());
    for edns in [None, Some(1232)] {
        // TCP: the cut list is the answer, one TXT record.
        let q = query("_peer.internal", RecordType::TXT, edns);
        let (o, out) = raw(&z, member(), &q, Transport::Tcp);
        assert_eq!(o, Outcome::Answered(Rcode::NoError), "{edns:?}");
        assert!(out.len() <= MAX_MESSAGE);
        // Nearly full: the cut leaves less than one more item unused.
        assert!(out.len() > MAX_MESSAGE - 40, "{}", out.len());
        let m = Message::from_vec(&out).unwrap();
        is_answer(&m, ResponseCode::NoError);
        assert!(m.authorities.is_empty());
        let values = txt(&m);
        assert_eq!(values.len(), 1);
        let items: Vec<&str> = values[0].split(',').collect();
        let (last, shown) = items.split_last().unwrap();
        assert_eq!(*last, format!("truncated: {} of 100000", shown.len()));
        // Whole items, in order, from the first.
        for (k, item) in shown.iter().enumerate() {
            assert_eq!(*item, format!("peer-{k:06}"));
        }
        // UDP: too big, so TC and the client retries over TCP.
        let (o, out) = raw(&z, member(), &q, Transport::Udp);
        assert_eq!(o, Outcome::Answered(Rcode::NoError));
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty());
        assert!(out.len() <= 512);
    }
    // The peers' own names are unaffected.
    assert_eq!(ok_aaaa(&z, "peer-099999._peer.internal").len(), 1);
}

#[test]
fn soa_and_ns_at_the_apex() {
    let mut s = fixture();
    // The serial is the revision's low 32 bits.
    s.revision = 0x1_0000_002a;
    let z = build(&s);
    for name in ["internal.", "InTeRnAl."] {
        let m = ask(&z, name, RecordType::SOA);
        is_answer(&m, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert!(m.authorities.is_empty());
        let rec = &m.answers[0];
        assert_eq!(rec.name.to_ascii(), name, "the question name, as asked");
        assert_eq!(rec.ttl, TTL);
        let soa = soa_of(rec);
        assert_eq!(soa.mname, Name::from_ascii("_api.internal.").unwrap());
        assert_eq!(soa.rname, Name::from_ascii("hostmaster.internal.").unwrap());
        assert_eq!(soa.serial, 0x2a);
        assert_eq!(
            (soa.refresh, soa.retry, soa.expire, soa.minimum),
            (3600, 600, 1_209_600, TTL)
        );
    }
    let m = ask(&z, "internal", RecordType::NS);
    is_answer(&m, ResponseCode::NoError);
    let ns: Vec<_> = m
        .answers
        .iter()
        .map(|rec| {
            assert_eq!(rec.ttl, TTL);
            match &rec.data {
                RData::NS(ns) => ns.0.clone(),
                other => panic!("not NS: {other:?}"),
            }
        })
        .collect();
    assert_eq!(ns, [Name::from_ascii("_api.internal.").unwrap()]);
    // The NS target resolves, to the server itself.
    assert_eq!(ok_aaaa(&z, "_api.internal"), [prefix(ACME).dns_addr()]);
    // SOA and NS exist at the apex only; elsewhere they are no-data.
    for t in [RecordType::SOA, RecordType::NS] {
        nodata(&z, "web.internal", t);
        nodata(&z, "_api.internal", t);
        nxdomain(&z, "nope.internal", t);
        nodata(&z, "top1.nearest.of.web.internal", t);
    }
    // Over TCP and without EDNS too.
    let q = query("internal", RecordType::SOA, None);
    let (_, out) = raw(&z, member(), &q, Transport::Tcp);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(soa_of(&m.answers[0]).serial, 0x2a);
}

#[test]
fn negative_answers_carry_the_soa_of_the_revision_the_zone_was_built_from() {
    let before = fixture();
    let old = build(&before);
    let serial = |i: &ZoneIndex, net| i.org(prefix(net)).unwrap().serial();
    assert_eq!(serial(&old, ACME), 7);
    // NXDOMAIN and no-data, over UDP with and without EDNS and over TCP.
    for transport in [Transport::Udp, Transport::Tcp] {
        for edns in [None, Some(512), Some(1232)] {
            for (name, t, rcode) in [
                ("nope.internal", RecordType::AAAA, ResponseCode::NXDomain),
                (
                    "a.b.c.web.internal",
                    RecordType::TXT,
                    ResponseCode::NXDomain,
                ),
                ("web.internal", RecordType::A, ResponseCode::NoError),
                ("internal", RecordType::AAAA, ResponseCode::NoError),
            ] {
                let q = query(name, t, edns);
                let (_, out) = raw(&old, member(), &q, transport);
                let m = Message::from_vec(&out).unwrap();
                is_answer(&m, rcode);
                assert!(m.answers.is_empty());
                assert_eq!(u16::from_be_bytes([out[8], out[9]]), 1, "NSCOUNT");
                negative_soa(&old, &m);
                assert_eq!(m.edns.is_some(), edns.is_some());
            }
        }
    }
    // A positive answer has no AUTHORITY.
    let m = ask(&old, "web.internal", RecordType::AAAA);
    assert!(m.authorities.is_empty());
    // The longest name there is still fits with its SOA in 512 bytes.
    let label = "x".repeat(61);
    let long = format!("{label}.{label}.{label}.{}.internal", "y".repeat(58));
    nxdomain(&old, &long, RecordType::AAAA);

    // A rebuilt zone takes the new revision; one taken over keeps its own.
    let mut after = before.clone();
    instance(&mut after, A, "api", "n1", "lhr", 0x77, None, true);
    after.revision = 8;
    let (new, _) = ZoneIndex::update(
        Some((&old, &before)),
        &after,
        &r("lhr"),
        &RegionDistances::builtin(),
    );
    assert_eq!(serial(&new, ACME), 8);
    assert_eq!(serial(&new, OTHER), 7);
    let m = ask(&new, "nope.internal", RecordType::AAAA);
    assert_eq!(soa_of(&m.authorities[0]).serial, 8);
}

/// A valid query for `web.internal` AAAA without EDNS: 12 + 14 + 4 bytes.
fn base() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x03web\x08internal\x00\x00\x1c\x00\x01");
    q
}

fn rcode_of(q: &[u8]) -> Outcome {
    raw(&build(&fixture()), member(), q, Transport::Udp).0
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    assert_eq!(rcode_of(&base()), Outcome::Answered(Rcode::NoError));
    let formerr = Outcome::Answered(Rcode::FormErr);
    // Truncated anywhere after the header.
    let b = base();
    for cut in HEADER_LEN..b.len() {
        let (o, out) = raw(&build(&fixture()), member(), &b[..cut], Transport::Udp);
        assert_eq!(o, formerr, "cut at {cut}");
        assert_eq!(out.len(), HEADER_LEN);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
    // Too short for a header, or a response: dropped.
    for cut in 0..HEADER_LEN {
        assert_eq!(rcode_of(&b[..cut]), Outcome::Drop);
    }
    let mut q = base();
    q[2] |= FLAG_QR;
    assert_eq!(rcode_of(&q), Outcome::Drop);
    // QDCOUNT 0 and 2.
    for qd in [0u8, 2] {
        let mut q = base();
        q[5] = qd;
        assert_eq!(rcode_of(&q), formerr, "qdcount {qd}");
    }
    // A pointer, or an extended label type, in the question.
    let mut q = base();
    q[HEADER_LEN] = 0xC0;
    assert_eq!(rcode_of(&q), formerr);
    q[HEADER_LEN] = 0x41;
    assert_eq!(rcode_of(&q), formerr);
    // A name longer than 255 bytes.
    let mut q = base()[..HEADER_LEN].to_vec();
    for _ in 0..5 {
        q.push(63);
        q.extend_from_slice(&[b'a'; 63]);
    }
    q.extend_from_slice(b"\x00\x00\x1c\x00\x01");
    assert_eq!(rcode_of(&q), formerr);
    // ARCOUNT says there is a record but there isn't; two OPTs; an OPT
    // not owned by the root.
    let mut q = base();
    q[11] = 1;
    assert_eq!(rcode_of(&q), formerr);
    let opt = [0u8, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0];
    let mut q = base();
    q[11] = 2;
    q.extend_from_slice(&opt);
    q.extend_from_slice(&opt);
    assert_eq!(rcode_of(&q), formerr);
    let mut q = base();
    q[11] = 1;
    q.extend_from_slice(&[1, b'x']);
    q.extend_from_slice(&opt[1..]);
    assert_eq!(rcode_of(&q), formerr);
    // Records in the answer section are skipped (pointers included).
    let mut q = base();
    q[7] = 1;
    q.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
    q[11] = 1;
    q.extend_from_slice(&opt);
    assert_eq!(rcode_of(&q), Outcome::Answered(Rcode::NoError));
    // Garbage.
    let garbage: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
    assert!(matches!(
        rcode_of(&garbage),
        Outcome::Answered(_) | Outcome::Drop
    ));
}

#[test]
fn other_opcodes_classes_and_transfers() {
    let mut q = base();
    q[2] = 2 << 3; // STATUS
    assert_eq!(rcode_of(&q), Outcome::Answered(Rcode::NotImp));
    let mut q = base();
    q[2] = 5 << 3; // UPDATE
    assert_eq!(rcode_of(&q), Outcome::Answered(Rcode::NotImp));
    let mut q = base();
    let class_at = q.len() - 1;
    q[class_at] = 3; // CHAOS
    assert_eq!(rcode_of(&q), Outcome::Answered(Rcode::Refused));
    q[class_at] = 255; // ANY class: nothing is authoritative for it (RFC 6895)
    assert_eq!(rcode_of(&q), Outcome::Answered(Rcode::Refused));
    let z = build(&fixture());
    for t in [RecordType::AXFR, RecordType::IXFR] {
        let (o, _) = raw(&z, member(), &query("internal", t, None), Transport::Tcp);
        assert_eq!(o, Outcome::Answered(Rcode::Refused));
    }
}

#[test]
fn builds_are_deterministic_whatever_the_snapshot_order() {
    let s = fixture();
    let mut shuffled = s.clone();
    shuffled.instances.reverse();
    shuffled.peers.reverse();
    shuffled.orgs.reverse();
    let (z1, z2) = (build(&s), build(&shuffled));
    for (name, t) in [
        ("web.internal", RecordType::AAAA),
        ("top9.nearest.of.web.internal", RecordType::AAAA),
        ("_instances.internal", RecordType::TXT),
        ("all.vms.web.internal", RecordType::TXT),
        ("_peer.internal", RecordType::TXT),
    ] {
        let q = query(name, t, Some(1232));
        assert_eq!(
            raw(&z1, member(), &q, Transport::Udp).1,
            raw(&z2, member(), &q, Transport::Udp).1,
            "{name}"
        );
    }
    assert_eq!(z1.revision(), 7);
    assert_eq!(z1.len(), 2);
}

#[test]
fn shared_zones_swap_whole_indexes() {
    let shared = SharedZones::default();
    let before = shared.load();
    assert!(before.is_empty());
    shared.store(build(&fixture()));
    // A reader that loaded before the swap keeps its consistent view.
    assert!(before.is_empty());
    let after = shared.load();
    assert_eq!(after.revision(), 7);
    assert_eq!(ok_aaaa(&after, "lhr.web.internal"), [a(0xa1)]);
}

fn check_response(q: &[u8], o: Outcome, out: &[u8], t: Transport) {
    match o {
        Outcome::Answered(_) => {
            assert!(out.len() >= HEADER_LEN);
            assert_eq!(out[..2], q[..2]);
            assert_ne!(out[2] & FLAG_QR, 0);
            if t == Transport::Udp {
                assert!(out.len() <= usize::from(MAX_UDP_PAYLOAD));
            }
        }
        Outcome::Forward => assert!(out.is_empty()),
        Outcome::Drop => {
            assert!(out.is_empty());
            assert!(q.len() < HEADER_LEN || q[2] & FLAG_QR != 0);
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        inside in any::<bool>(),
        tcp in any::<bool>(),
    ) {
        let z = build(&fixture());
        let src = if inside { member() } else { "fdaa:0:19::2".parse().unwrap() };
        let t = if tcp { Transport::Tcp } else { Transport::Udp };
        let mut out = Vec::new();
        let o = answer(&z, prefix(ACME), src, &bytes, t, &mut out);
        check_response(&bytes, o, &out, t);
    }

    #[test]
    fn mutated_queries_never_panic(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
    ) {
        let z = build(&fixture());
        let names = ["web.internal", "top2.nearest.of.web.internal", "_apps.internal", "example.com"];
        let mut q = query(names[which], RecordType::TXT, Some(1232));
        for (at, v) in edits {
            let at = at % q.len();
            q[at] = v;
        }
        q.truncate(cut % (q.len() + 1));
        let mut out = Vec::new();
        let o = answer(&z, prefix(ACME), member(), &q, Transport::Udp, &mut out);
        check_response(&q, o, &out, Transport::Udp);
    }
}

/// ns/query for the hot path at 1,000 apps × 3 instances + 1,000 peers:
/// `cargo test --release --lib dns::handler::tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn bench_answer() {
    let mut s = Snapshot::default();
    org(&mut s, "acme", ACME);
    gateway(&mut s, "lhr-1", "lhr", 0x0a7b_0d6b);
    let regions = ["lhr", "iad", "syd"];
    for app in 0..1000u32 {
        for (k, region) in regions.iter().enumerate() {
            let id = format!("i{app}x{k}");
            let m = app * 4 + k as u32;
            instance(
                &mut s,
                A,
                &format!("app-{app:04}"),
                &id,
                region,
                m,
                None,
                true,
            );
        }
    }
    for p in 0..1000 {
        peer(&mut s, A, &format!("peer-{p:04}"), "lhr-1", p);
    }
    let t0 = Instant::now();
    let z = build(&s);
    let built = t0.elapsed();
    let zone = z.org(prefix(ACME)).unwrap();
    println!(
        "build: {built:?} for {} names; oversized: {:?}",
        zone.name_count(),
        zone.oversized()
    );

    let cases = [
        (
            "app-0500.internal AAAA udp",
            "app-0500.internal",
            RecordType::AAAA,
            Transport::Udp,
        ),
        (
            "top2.nearest.of.app-0500 AAAA udp",
            "top2.nearest.of.app-0500.internal",
            RecordType::AAAA,
            Transport::Udp,
        ),
        (
            "_apps.internal TXT udp (TC)",
            "_apps.internal",
            RecordType::TXT,
            Transport::Udp,
        ),
        (
            "_apps.internal TXT tcp (9 kB)",
            "_apps.internal",
            RecordType::TXT,
            Transport::Tcp,
        ),
        (
            "nope.internal NXDOMAIN",
            "nope.internal",
            RecordType::AAAA,
            Transport::Udp,
        ),
        (
            "example.com (forward)",
            "example.com",
            RecordType::AAAA,
            Transport::Udp,
        ),
    ];
    let mut out = Vec::with_capacity(65536);
    let (listener, src) = (prefix(ACME), member());
    for (label, name, t, transport) in cases {
        let q = query(name, t, Some(1232));
        let iters = 2_000_000u32;
        let t0 = Instant::now();
        for _ in 0..iters {
            let o = answer(
                std::hint::black_box(&z),
                listener,
                std::hint::black_box(src),
                std::hint::black_box(&q),
                transport,
                &mut out,
            );
            std::hint::black_box(o);
        }
        let ns = t0.elapsed().as_nanos() as f64 / f64::from(iters);
        println!("{label:<40} {ns:>7.1} ns/query  ({} bytes)", out.len());
    }
}

#[test]
fn chaos_and_any_class_queries_are_refused_never_forwarded() {
    let z = build(&fixture());
    for (name, class) in [
        ("version.bind", DNSClass::CH),
        ("hostname.bind", DNSClass::CH),
        ("id.server", DNSClass::CH),
        ("example.com", DNSClass::ANY),
        ("web.internal", DNSClass::ANY),
        ("web.internal", DNSClass::CH),
    ] {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        let mut q = Query::query(Name::from_ascii(name).unwrap(), RecordType::TXT);
        q.set_query_class(class);
        m.add_query(q);
        let (o, out) = raw(&z, member(), &m.to_vec().unwrap(), Transport::Udp);
        assert_eq!(o, Outcome::Answered(Rcode::Refused), "{name} {class:?}");
        let r = Message::from_vec(&out).unwrap();
        assert!(
            r.answers.is_empty() && !r.metadata.authoritative,
            "{name}: {r:?}"
        );
        assert!(!r.metadata.recursion_available, "{name}: RA claimed");
    }
}

#[test]
fn error_answers_to_edns_queries_carry_an_opt() {
    let z = build(&fixture());
    let with_opt = |m: &Message| m.edns.as_ref().map(|e| e.max_payload());
    // REFUSED (a CHAOS name), NOTIMP (opcode STATUS): both with an OPT.
    let mut m = Message::query();
    let mut q = Query::query(Name::from_ascii("version.bind").unwrap(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    m.add_query(q);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    m.set_edns(e);
    let chaos = m.to_vec().unwrap();
    let (o, out) = raw(&z, member(), &chaos, Transport::Udp);
    assert_eq!(o, Outcome::Answered(Rcode::Refused));
    assert_eq!(with_opt(&Message::from_vec(&out).unwrap()), Some(1232));
    let mut status = query("web.internal", RecordType::AAAA, Some(1232));
    status[2] = 2 << 3; // STATUS
    let (o, out) = raw(&z, member(), &status, Transport::Udp);
    assert_eq!(o, Outcome::Answered(Rcode::NotImp));
    let r = Message::from_vec(&out).unwrap();
    assert_eq!(with_opt(&r), Some(1232), "{r:?}");
    assert!(!r.metadata.recursion_available);
}
