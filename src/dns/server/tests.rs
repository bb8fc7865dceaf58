//! The socket layer on loopback, no namespaces and no root: listeners
//! bind `[::1]:0` and the handler is told the source is inside the org
//! (`Ctx::pretend_src`); upstreams are fake resolvers on `[::1]`.

use std::net::SocketAddrV6;
use std::time::Instant;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::{Name, RData, RecordType};

use super::*;
use crate::model::{HostId, NetworkId, PrivateKey};
use crate::store::{Gateway, Instance, Org};

const ACME: u32 = 0x18;
const OTHER: u32 = 0x19;

fn prefix(net: u32) -> OrgPrefix {
    NetworkId::new(net).unwrap().prefix()
}

fn web_addr() -> Ipv6Addr {
    "fdaa:0:18:a7b:7d:0:a1:2".parse().unwrap()
}

fn member() -> IpAddr {
    "fdaa:0:18:a7b:d6b:0:a:2".parse().unwrap()
}

/// acme (peer `laptop` on lhr-1, app `web`), other (peer `spy` on iad-1).
fn snapshot(revision: u64, laptop: bool) -> Snapshot {
    let mut s = Snapshot {
        revision,
        ..Snapshot::default()
    };
    for (name, net) in [("acme", ACME), ("other", OTHER)] {
        s.orgs.push(Org {
            name: name.parse().unwrap(),
            network_id: NetworkId::new(net).unwrap(),
        });
    }
    for (name, region, host) in [("lhr-1", "lhr", 0x0a7b_0d6b), ("iad-1", "iad", 0x0a7b_0001)] {
        s.gateways.push(Gateway {
            name: name.parse().unwrap(),
            region: region.parse().unwrap(),
            host_id: HostId::from_u32(host),
            endpoint: "gw.example.net:51820".parse().unwrap(),
            public_key: PrivateKey::generate().public_key(),
        });
    }
    s.instances.push(Instance {
        org: "acme".parse().unwrap(),
        app: "web".parse().unwrap(),
        id: "a1".parse().unwrap(),
        region: "lhr".parse().unwrap(),
        address: web_addr(),
        process_group: None,
        started: true,
    });
    let mut peer = |org: &str, net: u32, name: &str, gw: usize| {
        let p = crate::store::fixture::peer_on(&s.gateways[gw], org, prefix(net), name, 0);
        s.peers.push(p);
    };
    if laptop {
        peer("acme", ACME, "laptop", 0);
    }
    peer("other", OTHER, "spy", 1);
    s
}

fn limits() -> Limits {
    Limits {
        forward_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// A listener for acme on `[::1]:0` that believes every source is
/// `laptop`.
fn serve(limits: Limits, upstreams: Vec<SocketAddr>) -> (Listener, Arc<Ctx>) {
    let metrics = Arc::new(DnsMetrics::default());
    let forwarder = Forwarder::start(upstreams, &limits, metrics.clone());
    let zones = SharedZones::new(ZoneIndex::build(
        &snapshot(1, true),
        &"lhr".parse().unwrap(),
        &RegionDistances::builtin(),
    ));
    let ctx = Arc::new(Ctx {
        zones: Arc::new(zones),
        metrics,
        forwarder,
        limits,
        pretend_src: Some(member()),
    });
    let l = Listener::start(prefix(ACME), "[::1]:0".parse().unwrap(), &ctx).unwrap();
    (l, ctx)
}

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

async fn udp_ask(to: SocketAddr, q: &[u8], wait: Duration) -> Option<Message> {
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    s.send_to(q, to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(wait, s.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(Message::from_vec(&buf[..n]).unwrap())
}

fn frame(q: &[u8]) -> Vec<u8> {
    let mut f = (q.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(q);
    f
}

async fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut m).await?;
    Ok(m)
}

fn aaaa(m: &Message) -> Vec<Ipv6Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn udp_answers_from_the_zone_and_counts_rcodes() {
    let (l, ctx) = serve(limits(), vec![]);
    let m = udp_ask(
        l.local,
        &query(7, "WEB.internal", RecordType::AAAA),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.id, 7);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(aaaa(&m), [web_addr()]);
    let m = udp_ask(
        l.local,
        &query(8, "nope.internal", RecordType::AAAA),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Garbage is dropped or FORMERR'd, and the listener lives on.
    for junk in [&b""[..], b"\x00", &[0xFF; 40], &[0; 12]] {
        let s = UdpSocket::bind("[::1]:0").await.unwrap();
        s.send_to(junk, l.local).await.unwrap();
    }
    let m = udp_ask(
        l.local,
        &query(9, "laptop._peer.internal", RecordType::AAAA),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(m.answers.len(), 1);
    let got = ctx.metrics.snapshot();
    assert_eq!(got.udp_queries, 7);
    assert_eq!(got.rcode(Rcode::NoError), 2);
    assert_eq!(got.rcode(Rcode::NxDomain), 1);
    assert_eq!(got.rcode(Rcode::FormErr), 1, "{got:?}");
    assert_eq!(got.dropped, 3, "{got:?}");
}

#[tokio::test]
async fn a_source_outside_the_org_is_refused() {
    let (l, _) = serve(limits(), vec![]);
    // Without the test override the handler sees ::1: not in acme.
    let metrics = Arc::new(DnsMetrics::default());
    let forwarder = Forwarder::start(vec![], &limits(), metrics.clone());
    let ctx = Arc::new(Ctx {
        zones: Arc::new(SharedZones::default()),
        metrics,
        forwarder,
        limits: limits(),
        pretend_src: None,
    });
    let real = Listener::start(prefix(ACME), "[::1]:0".parse().unwrap(), &ctx).unwrap();
    for name in ["web.internal", "example.com"] {
        let m = udp_ask(
            real.local,
            &query(1, name, RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
    }
    drop(l);
}

#[tokio::test]
async fn tcp_pipelined_queries_are_answered_in_order() {
    let (l, ctx) = serve(limits(), vec![]);
    let mut s = TcpStream::connect(l.local).await.unwrap();
    let names = [
        ("web.internal", RecordType::AAAA),
        ("nope.internal", RecordType::AAAA),
        ("_peer.internal", RecordType::TXT),
        ("lhr.web.internal", RecordType::AAAA),
    ];
    let mut all = Vec::new();
    for (i, (n, t)) in names.iter().enumerate() {
        all.extend(frame(&query(100 + i as u16, n, *t)));
    }
    // One write, split at an awkward place to exercise partial reads.
    s.write_all(&all[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.write_all(&all[5..]).await.unwrap();
    for (i, (n, _)) in names.iter().enumerate() {
        let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
        assert_eq!(m.metadata.id, 100 + i as u16, "{n}");
        assert_eq!(m.queries[0].name().to_ascii(), format!("{n}."));
    }
    assert_eq!(ctx.metrics.snapshot().tcp_queries, 4);
}

#[tokio::test]
async fn tcp_connections_are_bounded_idle_ones_closed_and_queries_capped() {
    let l = Limits {
        tcp_connections: 2,
        tcp_idle: Duration::from_millis(300),
        tcp_queries: 3,
        ..limits()
    };
    let (l, ctx) = serve(l, vec![]);
    let mut a = TcpStream::connect(l.local).await.unwrap();
    let mut b = TcpStream::connect(l.local).await.unwrap();
    // Both are served.
    for s in [&mut a, &mut b] {
        s.write_all(&frame(&query(1, "web.internal", RecordType::AAAA)))
            .await
            .unwrap();
        read_frame(s).await.unwrap();
    }
    // Both begin another query, so neither is idle: a third is closed at
    // once.
    for s in [&mut a, &mut b] {
        s.write_all(&[0]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = TcpStream::connect(l.local).await.unwrap();
    let mut byte = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(1), c.read(&mut byte))
        .await
        .expect("the third connection was not closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(ctx.metrics.snapshot().tcp_rejected, 1);
    // Silent or slow connections are closed after the idle timeout…
    let t0 = Instant::now();
    let r = a.read(&mut byte).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let idle = t0.elapsed();
    assert!(idle < Duration::from_secs(2), "closed after {idle:?}");
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // …as are silent ones…
    let mut e = TcpStream::connect(l.local).await.unwrap();
    let t0 = Instant::now();
    let r = e.read(&mut byte).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let idle = t0.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&idle),
        "closed after {idle:?}"
    );
    drop(e);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // …which frees their slots. A connection gets `tcp_queries` answers
    // and then every query it had already sent: then FIN, not a reset.
    let mut d = TcpStream::connect(l.local).await.unwrap();
    let mut all = Vec::new();
    for i in 0..6 {
        all.extend(frame(&query(i, "web.internal", RecordType::AAAA)));
    }
    d.write_all(&all).await.unwrap();
    for i in 0..6 {
        let m = Message::from_vec(&read_frame(&mut d).await.unwrap()).unwrap();
        assert_eq!(
            m.metadata.id, i,
            "queries received before the cap closed in are answered"
        );
    }
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(2), d.read_to_end(&mut rest)).await;
    assert!(
        matches!(r, Ok(Ok(0))),
        "a clean close (FIN) after the last answer, not a reset: {r:?}"
    );
    // A query sent after that is read and dropped, not met with a reset.
    let _ = d
        .write_all(&frame(&query(9, "web.internal", RecordType::AAAA)))
        .await;
    assert_eq!(ctx.metrics.snapshot().tcp_queries, 1 + 1 + 6);
}

#[tokio::test]
async fn two_thousand_pipelined_tcp_queries_on_one_connection_are_all_answered() {
    let l = Limits {
        tcp_queries: 1000,
        ..limits()
    };
    let (l, _) = serve(l, vec![]);
    let mut answered = 0;
    // A client that gets a FIN after the cap reconnects for the rest, as
    // dnsperf does; none is lost to a reset.
    let mut next = 0u16;
    while next < 2000 {
        let mut s = TcpStream::connect(l.local).await.unwrap();
        let start = next;
        let mut all = Vec::new();
        for id in start..2000 {
            all.extend(frame(&query(id, "web.internal", RecordType::AAAA)));
        }
        let (mut rd, mut wr) = s.split();
        let send = async {
            let _ = wr.write_all(&all).await;
        };
        let recv = async {
            let mut n = 0u16;
            loop {
                let mut len = [0u8; 2];
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if rd.read_exact(&mut m).await.is_err() {
                    break;
                }
                let m = Message::from_vec(&m).unwrap();
                assert_eq!(m.metadata.id, start + n);
                n += 1;
            }
            n
        };
        let ((), n) = tokio::join!(send, recv);
        assert!(n >= 1000, "a connection answers at least its cap: {n}");
        answered += usize::from(n);
        next = start + n;
    }
    assert_eq!(answered, 2000);
}

/// Builds a response to `q` with one AAAA answer `2001:db8::7`.
fn fake_reply(q: &[u8]) -> Vec<u8> {
    let end = question_end(q).unwrap();
    let mut r = q[..end].to_vec();
    r[2] |= 0x80;
    r[3] = 0x80;
    r[6..8].copy_from_slice(&1u16.to_be_bytes());
    r[10..12].copy_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&[0xC0, 0x0C, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
    r.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
    r
}

/// Replies to send before the right one: `(from the spoofer?, bytes)`.
type BeforeReply = fn(&[u8]) -> Vec<(bool, Vec<u8>)>;

/// A UDP upstream on `[::1]` that, for each query, first sends the
/// replies `before(query)` gives (from `spoofer` when asked), then the
/// right one. Returns its address and the IDs it saw.
async fn fake_upstream(before: BeforeReply) -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    let spoofer = UdpSocket::bind("[::1]:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, from) = s.recv_from(&mut buf).await.unwrap();
            let q = buf[..n].to_vec();
            seen2.lock().unwrap().push(be16(&q, 0).unwrap());
            for (spoof, junk) in before(&q) {
                let sock = if spoof { &spoofer } else { &s };
                sock.send_to(&junk, from).await.unwrap();
            }
            s.send_to(&fake_reply(&q), from).await.unwrap();
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn forwarding_rewrites_the_id_and_drops_replies_that_do_not_match() {
    let (up, seen) = fake_upstream(|q| {
        let right = fake_reply(q);
        let mut wrong_id = right.clone();
        wrong_id[0] ^= 0xFF;
        let mut wrong_q = right.clone();
        wrong_q[13] ^= 0x01; // a letter of the name
        let mut not_response = right.clone();
        not_response[2] &= 0x7F;
        vec![
            (false, b"\x01\x02\x03".to_vec()),
            (false, wrong_id),
            (false, wrong_q),
            (false, not_response),
            (true, right),
        ]
    })
    .await;
    let (l, ctx) = serve(limits(), vec![up]);
    let m = udp_ask(
        l.local,
        &query(0x4242, "Example.COM", RecordType::AAAA),
        Duration::from_secs(2),
    )
    .await
    .expect("no forwarded answer");
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(aaaa(&m), ["2001:db8::7".parse::<Ipv6Addr>().unwrap()]);
    assert_eq!(m.queries[0].name().to_ascii(), "Example.COM.");
    let ids = seen.lock().unwrap().clone();
    assert_eq!(ids.len(), 1);
    assert_ne!(ids[0], 0x4242, "the query ID was not rewritten");
    let got = ctx.metrics.snapshot();
    assert_eq!((got.forwarded, got.forward_failed), (1, 0));
}

#[tokio::test]
async fn a_silent_upstream_is_skipped_and_all_silent_is_servfail() {
    let silent = UdpSocket::bind("[::1]:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (good, _) = fake_upstream(|_| vec![]).await;
    let (l, _) = serve(limits(), vec![silent_addr, good]);
    let t0 = Instant::now();
    let m = udp_ask(
        l.local,
        &query(1, "example.com", RecordType::AAAA),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    assert_eq!(aaaa(&m).len(), 1);
    assert!(took >= Duration::from_millis(280), "{took:?}");

    let (l2, ctx) = serve(limits(), vec![silent_addr, silent_addr]);
    let t0 = Instant::now();
    let m = udp_ask(
        l2.local,
        &query(2, "example.com", RecordType::AAAA),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries.len(), 1);
    assert!(t0.elapsed() >= Duration::from_millis(580));
    assert_eq!(ctx.metrics.snapshot().forward_failed, 1);
    drop((l, silent));
}

#[tokio::test]
async fn forwards_beyond_the_limit_get_servfail_at_once() {
    let silent = UdpSocket::bind("[::1]:0").await.unwrap();
    let l = Limits {
        max_forwards: 1,
        forward_timeout: Duration::from_secs(2),
        ..limits()
    };
    let (l, ctx) = serve(l, vec![silent.local_addr().unwrap()]);
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    s.send_to(&query(1, "one.example", RecordType::AAAA), l.local)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let m = udp_ask(
        l.local,
        &query(2, "two.example", RecordType::AAAA),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_eq!(ctx.metrics.snapshot().forward_rejected, 1);
}

#[tokio::test]
async fn tcp_queries_are_forwarded_over_tcp() {
    let up = TcpListener::bind("[::1]:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = up.accept().await.unwrap();
            tokio::spawn(async move {
                let q = read_frame(&mut s).await.unwrap();
                s.write_all(&frame(&fake_reply(&q))).await.unwrap();
            });
        }
    });
    let (l, _) = serve(limits(), vec![up_addr]);
    let mut s = TcpStream::connect(l.local).await.unwrap();
    s.write_all(&frame(&query(77, "example.com", RecordType::AAAA)))
        .await
        .unwrap();
    s.write_all(&frame(&query(78, "web.internal", RecordType::AAAA)))
        .await
        .unwrap();
    // Each answer carries its query's ID; they may come in either order.
    let mut got = BTreeMap::new();
    for _ in 0..2 {
        let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
        got.insert(m.metadata.id, aaaa(&m));
    }
    assert_eq!(got[&77], ["2001:db8::7".parse::<Ipv6Addr>().unwrap()]);
    assert_eq!(got[&78], vec![web_addr()]);
}

#[tokio::test]
async fn a_slow_forward_does_not_hold_up_internal_answers_on_the_same_tcp_connection() {
    let up = TcpListener::bind("[::1]:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = up.accept().await.unwrap();
            tokio::spawn(async move {
                let q = read_frame(&mut s).await.unwrap();
                tokio::time::sleep(Duration::from_millis(800)).await;
                s.write_all(&frame(&fake_reply(&q))).await.unwrap();
            });
        }
    });
    let l = Limits {
        forward_timeout: Duration::from_secs(3),
        ..limits()
    };
    let (l, _) = serve(l, vec![up_addr]);
    let mut s = TcpStream::connect(l.local).await.unwrap();
    let t0 = Instant::now();
    let mut all = frame(&query(1, "example.com", RecordType::AAAA));
    for id in 2..6 {
        all.extend(frame(&query(id, "web.internal", RecordType::AAAA)));
    }
    s.write_all(&all).await.unwrap();
    for id in 2..6 {
        let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
        assert_eq!(m.metadata.id, id, "the .internal answers first, in order");
    }
    let fast = t0.elapsed();
    assert!(
        fast < Duration::from_millis(400),
        "behind the forward: {fast:?}"
    );
    let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
    assert_eq!(m.metadata.id, 1);
    assert!(t0.elapsed() >= Duration::from_millis(800));
}

#[tokio::test]
async fn the_service_follows_snapshots_with_listeners_and_zones() {
    let mut settings = DnsSettings::new("lhr-1".parse().unwrap(), "lhr".parse().unwrap(), vec![]);
    // Port 0: no privileges needed; IPV6_FREEBIND lets the ::3
    // addresses be bound although no interface has them.
    settings.port = 0;
    let dns = DnsService::start(settings);
    let zones = dns.zones();
    let (snap_tx, snap_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    // Observe the listeners from inside by wrapping `apply`.
    let task = tokio::spawn(async move {
        let mut dns = dns;
        let mut snaps: watch::Receiver<Option<Arc<Snapshot>>> = snap_rx;
        let mut stop = stop_rx;
        loop {
            tokio::select! {
                r = snaps.changed() => {
                    if r.is_err() { break; }
                    let s = snaps.borrow_and_update().clone();
                    if let Some(s) = s {
                        dns.apply(s).await;
                        let _ = seen_tx.send(dns.listening());
                    }
                }
                _ = stop.changed() => break,
            }
        }
        dns.stop().await;
    });

    let acme3 = Ipv6Addr::new(0xfdaa, 0, 0x18, 0, 0, 0, 0, 3);
    let t0 = Instant::now();
    snap_tx.send_replace(Some(Arc::new(snapshot(1, true))));
    let l = seen_rx.recv().await.unwrap();
    println!("snapshot to zone and listeners: {:?}", t0.elapsed());
    // acme has a peer here; other's only peer is on iad-1.
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0].ip(), IpAddr::V6(acme3));
    assert_eq!(zones.load().revision(), 1);

    snap_tx.send_replace(Some(Arc::new(snapshot(2, false))));
    assert!(seen_rx.recv().await.unwrap().is_empty());
    assert_eq!(zones.load().revision(), 2);
    // And back: the address can be bound again at once.
    snap_tx.send_replace(Some(Arc::new(snapshot(3, true))));
    assert_eq!(seen_rx.recv().await.unwrap().len(), 1);
    stop_tx.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn run_swaps_the_zone_within_100_ms_and_stops_on_shutdown() {
    let mut settings = DnsSettings::new("lhr-1".parse().unwrap(), "lhr".parse().unwrap(), vec![]);
    settings.port = 0;
    let dns = DnsService::start(settings);
    let zones = dns.zones();
    let metrics = dns.metrics();
    let (snap_tx, snap_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(dns.run(snap_rx, stop_rx));
    for rev in 1..=3u64 {
        let t0 = Instant::now();
        snap_tx.send_replace(Some(Arc::new(snapshot(rev, true))));
        while zones.load().revision() != rev {
            assert!(t0.elapsed() < Duration::from_millis(100), "rev {rev}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(metrics.snapshot().zone_swaps, 3);
    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("run did not stop")
        .unwrap();
}

#[test]
fn resolv_conf_nameservers() {
    let got = parse_resolv_conf(
        "# comment\nsearch example.net\nnameserver 127.0.0.53\n\
         nameserver  2001:db8::53 \nnameserver fe80::1%1\nnameserver fe80::2%nosuchif0\n\
         nameserver bogus\noptions edns0\n",
    );
    assert_eq!(
        got,
        vec![
            "127.0.0.53:53".parse().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 1)),
        ]
    );
    assert_eq!(
        upstreams_or_resolv_conf(&["[::1]:5353".parse().unwrap()]),
        vec!["[::1]:5353".parse::<SocketAddr>().unwrap()]
    );
}

#[test]
fn servfail_echoes_id_flags_and_question() {
    let q = query(0xBEEF, "example.com", RecordType::AAAA);
    let mut out = Vec::new();
    assert!(servfail(&q, &mut out));
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0xBEEF);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
    assert_eq!(m.queries.len(), 1);
    assert!(!servfail(b"short", &mut out));
    // A header with a garbled question: header only.
    let mut bad = q.clone();
    bad[12] = 0xC0;
    assert!(servfail(&bad, &mut out));
    assert_eq!(out.len(), HEADER_LEN);
}

#[tokio::test]
async fn one_org_flooding_the_forwarder_leaves_the_others_their_share() {
    let l = Limits {
        max_forwards: 8,
        max_forwards_per_org: 3,
        ..limits()
    };
    let (_l, ctx) = serve(l, vec!["[::1]:9".parse().unwrap()]);
    let f = &ctx.forwarder;
    let (acme, other) = (prefix(ACME), prefix(OTHER));
    // acme's names never answer: its forwards pile up to its share, no more.
    let held: Vec<_> = (0..10).filter_map(|_| f.permit(acme)).collect();
    assert_eq!(held.len(), 3);
    assert_eq!(ctx.metrics.snapshot().forward_rejected, 7);
    // Another org still forwards, up to its own share.
    let theirs: Vec<_> = (0..3).map(|_| f.permit(other)).collect();
    assert!(
        theirs.iter().all(Option::is_some),
        "other's lookups refused"
    );
    assert!(f.permit(other).is_none());
    // A finished forward gives its org's share back.
    drop(held);
    let again: Vec<_> = (0..3).filter_map(|_| f.permit(acme)).collect();
    assert_eq!(again.len(), 3);
    assert!(f.by_org.lock().unwrap().values().all(|n| *n <= 3));
    drop((again, theirs));
    assert!(f.by_org.lock().unwrap().is_empty(), "counts left behind");
}

#[tokio::test]
async fn one_source_holds_only_its_share_of_a_tcp_listener() {
    let l = Limits {
        tcp_connections: 8,
        tcp_connections_per_source: 2,
        ..limits()
    };
    let (l, ctx) = serve(l, vec![]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(l.local).await.unwrap();
        s.write_all(&frame(&query(1, "web.internal", RecordType::AAAA)))
            .await
            .unwrap();
        read_frame(&mut s).await.unwrap();
        held.push(s);
    }
    // The listener has room, but not for a third from the same source.
    let mut third = TcpStream::connect(l.local).await.unwrap();
    let mut byte = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(1), third.read(&mut byte))
        .await
        .expect("the third connection from one source was not closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(ctx.metrics.snapshot().tcp_rejected, 1);
    // One closed, its share is back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(l.local).await.unwrap();
    again
        .write_all(&frame(&query(2, "web.internal", RecordType::AAAA)))
        .await
        .unwrap();
    assert!(read_frame(&mut again).await.is_ok());
}

/// Asks `web.internal` on `s` and waits for the answer.
async fn ask_tcp(s: &mut TcpStream, id: u16) -> io::Result<Vec<u8>> {
    s.write_all(&frame(&query(id, "web.internal", RecordType::AAAA)))
        .await?;
    tokio::time::timeout(Duration::from_secs(2), read_frame(s))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// True when the server closed `s` (EOF or reset) within a second.
async fn closed(s: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut byte)).await {
        Ok(r) => matches!(r, Ok(0) | Err(_)),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_full_tcp_listener_closes_the_connection_idle_longest_for_a_new_one() {
    let l = Limits {
        tcp_connections: 3,
        ..limits()
    };
    let (l, ctx) = serve(l, vec![]);
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(l.local).await.unwrap();
        ask_tcp(&mut s, i).await.unwrap();
        conns.push(s);
    }
    // The first asks again: now the second has been idle longest.
    ask_tcp(&mut conns[0], 10).await.unwrap();
    let mut new = TcpStream::connect(l.local).await.unwrap();
    let m = Message::from_vec(
        &ask_tcp(&mut new, 20)
            .await
            .expect("the newcomer was refused"),
    );
    assert_eq!(m.unwrap().metadata.id, 20);
    assert!(closed(&mut conns[1]).await, "the idlest was not closed");
    for i in [0, 2] {
        ask_tcp(&mut conns[i], 30)
            .await
            .unwrap_or_else(|e| panic!("connection {i} closed too: {e}"));
    }
    let m = ctx.metrics.snapshot();
    assert_eq!((m.tcp_evicted, m.tcp_rejected), (1, 0));
    let mut text = String::new();
    crate::metrics::MetricsSource::render(&*ctx.metrics, &mut text).await;
    assert!(text.contains("\nsixpn_dns_tcp_evicted_total 1\n"), "{text}");
}

#[tokio::test]
async fn a_full_tcp_listener_passes_over_connections_mid_query_and_rejects_when_none_is_idle() {
    let l = Limits {
        tcp_connections: 2,
        ..limits()
    };
    let (l, ctx) = serve(l, vec![]);
    // `a` connected first and is idle longest, but has begun a query: its
    // length and half the message.
    let q = frame(&query(1, "web.internal", RecordType::AAAA));
    let mut a = TcpStream::connect(l.local).await.unwrap();
    a.write_all(&q[..q.len() / 2]).await.unwrap();
    let mut b = TcpStream::connect(l.local).await.unwrap();
    ask_tcp(&mut b, 2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The newcomer takes the idle one's place, not the busy one's.
    let mut c = TcpStream::connect(l.local).await.unwrap();
    ask_tcp(&mut c, 3).await.expect("the newcomer was refused");
    assert!(closed(&mut b).await, "the idle one was not closed");
    // Now `c` starts a query too: nothing is idle, so the next is reset.
    c.write_all(&q[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut d = TcpStream::connect(l.local).await.unwrap();
    assert!(closed(&mut d).await, "a fourth was let in");
    // Both busy ones finish their queries.
    a.write_all(&q[q.len() / 2..]).await.unwrap();
    c.write_all(&q[1..]).await.unwrap();
    for s in [&mut a, &mut c] {
        let m = Message::from_vec(&read_frame(s).await.unwrap()).unwrap();
        assert_eq!(m.metadata.id, 1);
    }
    let m = ctx.metrics.snapshot();
    assert_eq!((m.tcp_evicted, m.tcp_rejected), (1, 1));
}

/// A UDP upstream on `[::1]` that answers every query with `rcode` (and the
/// AAAA of [`fake_reply`] when NOERROR), noting the source port of each.
async fn recording_upstream(rcode: u8) -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let ports = Arc::new(Mutex::new(Vec::new()));
    let seen = ports.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, from) = s.recv_from(&mut buf).await.unwrap();
            seen.lock().unwrap().push(from.port());
            let mut r = fake_reply(&buf[..n]);
            if rcode != 0 {
                r[3] = 0x80 | rcode;
            }
            s.send_to(&r, from).await.unwrap();
        }
    });
    (addr, ports)
}

#[tokio::test]
async fn every_forwarded_query_leaves_from_a_port_of_its_own() {
    let (up, ports) = recording_upstream(0).await;
    let (l, _) = serve(limits(), vec![up]);
    for i in 0..100u16 {
        let m = udp_ask(
            l.local,
            &query(i, &format!("n{i}.example.com"), RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .expect("no forwarded answer");
        assert_eq!(m.metadata.id, i);
    }
    let ports = ports.lock().unwrap().clone();
    let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(ports.len(), 100);
    assert!(
        distinct.len() >= 90,
        "{} distinct source ports of 100",
        distinct.len()
    );
}

#[tokio::test]
async fn servfail_or_refused_from_one_upstream_is_answered_by_the_next() {
    for rcode in [2u8, 5] {
        let (bad, asked) = recording_upstream(rcode).await;
        let (good, _) = recording_upstream(0).await;
        let (l, ctx) = serve(limits(), vec![bad, good]);
        let m = udp_ask(
            l.local,
            &query(7, "example.com", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .expect("no answer");
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NoError,
            "rcode {rcode}"
        );
        assert_eq!(aaaa(&m).len(), 1);
        assert_eq!(
            asked.lock().unwrap().len(),
            1,
            "the first upstream was asked"
        );
        // Only SERVFAIL upstreams: the client gets SERVFAIL.
        let (l2, _) = serve(limits(), vec![bad, bad]);
        let m = udp_ask(
            l2.local,
            &query(8, "example.com", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .expect("no answer");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(ctx.metrics.snapshot().forward_failed, 0);
    }
}

/// `q`'s answer with `n` AAAA records (~28 bytes each), no OPT.
fn big_reply(q: &[u8], n: u16) -> Vec<u8> {
    let end = question_end(q).unwrap();
    let mut r = q[..end].to_vec();
    r[2] |= 0x80;
    r[3] = 0x80;
    r[6..8].copy_from_slice(&n.to_be_bytes());
    r[10..12].copy_from_slice(&0u16.to_be_bytes());
    for i in 0..n {
        r.extend_from_slice(&[0xC0, 0x0C, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        let a = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
        r.extend_from_slice(&a.octets());
    }
    r
}

/// An upstream on `[::1]` serving UDP and TCP on one port: every query
/// gets `n` AAAA records (over UDP too, whatever its size). Keeps the
/// queries it was sent.
async fn big_upstream(n: u16) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let udp = UdpSocket::bind("[::1]:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (len, from) = udp.recv_from(&mut buf).await.unwrap();
            s1.lock().unwrap().push(buf[..len].to_vec());
            udp.send_to(&big_reply(&buf[..len], n), from).await.unwrap();
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut c, _) = tcp.accept().await.unwrap();
            let q = read_frame(&mut c).await.unwrap();
            s2.lock().unwrap().push(q.clone());
            c.write_all(&frame(&big_reply(&q, n))).await.unwrap();
        }
    });
    (addr, seen)
}

/// `query` with an OPT: payload `size`, DO set, and a cookie option.
fn edns_query(id: u16, name: &str, size: u16) -> Vec<u8> {
    let mut m = Message::from_vec(&query(id, name, RecordType::AAAA)).unwrap();
    let mut e = Edns::new();
    e.set_max_payload(size);
    e.set_dnssec_ok(true);
    e.options_mut()
        .insert(EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]));
    m.edns = Some(e);
    m.to_vec().unwrap()
}

#[tokio::test]
async fn edns_is_per_hop_and_an_answer_too_big_for_udp_is_truncated() {
    let (up, seen) = big_upstream(150).await;
    let (l, _) = serve(limits(), vec![up]);
    let wait = Duration::from_secs(2);

    // No EDNS: at most 512 bytes, TC, the question kept, no OPT added.
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    s.send_to(&query(1, "big.example.com", RecordType::AAAA), l.local)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(wait, s.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n <= 512, "{n} bytes to a client without EDNS");
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert!(
        m.metadata.truncation && m.answers.is_empty() && m.edns.is_none(),
        "{m:?}"
    );
    assert_eq!((m.metadata.id, m.queries.len()), (1, 1));

    // EDNS 4096 with a cookie: at most sixpn's 1232, TC, sixpn's OPT back
    // (its payload, the client's DO, no options), never the upstream's.
    s.send_to(&edns_query(2, "big.example.com", 4096), l.local)
        .await
        .unwrap();
    let n = tokio::time::timeout(wait, s.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n <= 1232, "{n} bytes");
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert!(m.metadata.truncation, "{m:?}");
    let e = m.edns.expect("sixpn's OPT");
    assert_eq!(e.max_payload(), 1232);
    assert!(
        e.flags().dnssec_ok && e.options().as_ref().is_empty(),
        "{e:?}"
    );

    // What the upstream saw: sixpn's OPT, not the client's.
    for q in seen.lock().unwrap().iter() {
        let m = Message::from_vec(q).unwrap();
        let e = m.edns.expect("an OPT upstream");
        assert_eq!(e.max_payload(), 1232);
        assert!(
            e.options().as_ref().is_empty(),
            "the client's cookie went upstream"
        );
    }

    // Over TCP the whole answer arrives.
    let mut c = TcpStream::connect(l.local).await.unwrap();
    c.write_all(&frame(&query(3, "big.example.com", RecordType::AAAA)))
        .await
        .unwrap();
    let r = tokio::time::timeout(wait, read_frame(&mut c))
        .await
        .unwrap()
        .unwrap();
    let m = Message::from_vec(&r).unwrap();
    assert_eq!(m.answers.len(), 150);
    assert!(!m.metadata.truncation && m.edns.is_none());
}

#[tokio::test]
async fn a_servfail_to_an_edns_query_carries_sixpns_opt() {
    // No upstream answers: SERVFAIL, with an OPT because the query had one.
    let silent = UdpSocket::bind("[::1]:0").await.unwrap();
    let (l, _) = serve(limits(), vec![silent.local_addr().unwrap()]);
    let m = udp_ask(
        l.local,
        &edns_query(9, "example.com", 4096),
        Duration::from_secs(3),
    )
    .await
    .expect("no answer");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let e = m.edns.expect("an OPT in the SERVFAIL");
    assert_eq!(e.max_payload(), 1232);
    assert!(e.flags().dnssec_ok && e.options().as_ref().is_empty());
    // Without EDNS, none.
    let m = udp_ask(
        l.local,
        &query(10, "example.com", RecordType::AAAA),
        Duration::from_secs(3),
    )
    .await
    .expect("no answer");
    assert!(m.edns.is_none());
}

#[tokio::test]
async fn an_upstream_that_timed_out_is_asked_last_for_a_while() {
    let silent = UdpSocket::bind("[::1]:0").await.unwrap();
    let (good, _) = recording_upstream(0).await;
    let (l, _) = serve(limits(), vec![silent.local_addr().unwrap(), good]);
    let timeout = limits().forward_timeout;
    let ask = |id| {
        let to = l.local;
        async move {
            let t0 = Instant::now();
            let m = udp_ask(
                to,
                &query(id, "example.com", RecordType::AAAA),
                Duration::from_secs(3),
            )
            .await
            .expect("no answer");
            assert_eq!(aaaa(&m).len(), 1);
            t0.elapsed()
        }
    };
    let first = ask(1).await;
    assert!(
        first >= timeout,
        "the first query waits out the silent one: {first:?}"
    );
    for id in 2..5 {
        let later = ask(id).await;
        assert!(later < timeout / 2, "query {id} waited {later:?} again");
    }
    drop(silent);
}

#[tokio::test]
async fn query_latency_is_a_histogram_by_org_and_outcome() {
    use crate::metrics::MetricsSource;
    let (l, ctx) = serve(limits(), vec![]);
    for id in 0..3 {
        udp_ask(
            l.local,
            &query(id, "web.internal", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    }
    let mut s = TcpStream::connect(l.local).await.unwrap();
    s.write_all(&frame(&query(9, "web.internal", RecordType::AAAA)))
        .await
        .unwrap();
    read_frame(&mut s).await.unwrap();
    let mut out = String::new();
    ctx.metrics.render(&mut out).await;
    let org = prefix(ACME).to_string();
    let count =
        format!("sixpn_dns_query_duration_seconds_count{{org=\"{org}\",outcome=\"answered\"}} 4");
    assert!(out.contains(&count), "{out}");
    assert!(out.contains("# TYPE sixpn_dns_query_duration_seconds histogram"));
    assert!(out.contains(&format!(
        "sixpn_dns_query_duration_seconds_bucket{{org=\"{org}\",outcome=\"answered\",le=\"+Inf\"}} 4"
    )));
}
