//! Arbitrary bytes into `sixpn::dns::answer`, the whole `.internal` query
//! path (parse, org check, lookup, response writing), against a zone with
//! every kind of name. The first input byte picks the transport and whether
//! the source is inside the listener's org; the rest is the query.
//!
//! Besides "never panics", it checks what every response must be: the
//! query's ID, QR set, within the UDP limit, and a `Forward` or `Drop`
//! writes nothing.

#![no_main]

use std::net::{IpAddr, Ipv6Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sixpn::dns::{answer, Outcome, RegionDistances, Transport, ZoneIndex, MAX_UDP_PAYLOAD};
use sixpn::model::{HostId, NetworkId, OrgPrefix, PeerSlot, PrivateKey};
use sixpn::store::{Gateway, Instance, Org, Peer, Snapshot};

const ACME: u32 = 0x18;

fn prefix() -> OrgPrefix {
    NetworkId::new(ACME).unwrap().prefix()
}

/// Org `acme`: apps with instances in several regions (some stopped, some
/// with process groups), enough apps for a `_apps` TXT over 255 bytes, and
/// peers; org `other` beside it.
fn zone() -> &'static ZoneIndex {
    static ZONE: OnceLock<ZoneIndex> = OnceLock::new();
    ZONE.get_or_init(|| {
        let mut s = Snapshot {
            revision: 1,
            ..Snapshot::default()
        };
        for (name, net) in [("acme", ACME), ("other", ACME + 1)] {
            s.orgs.push(Org {
                name: name.parse().unwrap(),
                network_id: NetworkId::new(net).unwrap(),
            });
        }
        s.gateways.push(Gateway {
            name: "lhr-1".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            host_id: HostId::from_u32(0x0a7b_0d6b),
            endpoint: "gw.example.net:51820".parse().unwrap(),
            public_key: PrivateKey::generate().public_key(),
        });
        let regions = ["lhr", "iad", "syd", "ams", "xyz"];
        for app in 0..40u32 {
            for k in 0..5u32 {
                let m = app * 8 + k + 1;
                s.instances.push(Instance {
                    org: "acme".parse().unwrap(),
                    app: format!("app-{app:02}").parse().unwrap(),
                    id: format!("i{app}x{k}").parse().unwrap(),
                    region: regions[k as usize].parse().unwrap(),
                    address: Ipv6Addr::new(0xfdaa, 0, ACME as u16, 0xa7b, 0x7d, 0, m as u16, 2),
                    process_group: (k % 2 == 0).then(|| "web".parse().unwrap()),
                    started: k != 3,
                });
            }
        }
        for p in 0..20u32 {
            let slot = PeerSlot::new(p).unwrap();
            let g = &s.gateways[0];
            s.peers.push(Peer {
                org: "acme".parse().unwrap(),
                name: format!("peer-{p}").parse().unwrap(),
                gateway: g.name.clone(),
                region: g.region.clone(),
                slot,
                net: slot.net(prefix(), g.host_id),
                public_key: PrivateKey::generate().public_key(),
                created_at: 0,
                revision: 0,
            });
        }
        ZoneIndex::build(&s, &"lhr".parse().unwrap(), &RegionDistances::builtin())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, query)) = data.split_first() else {
        return;
    };
    let transport = if mode & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let src: IpAddr = if mode & 2 == 0 {
        "fdaa:0:18:a7b:d6b:0:a:2".parse().unwrap()
    } else {
        "fdaa:0:19::2".parse().unwrap()
    };
    let mut out = Vec::new();
    match answer(zone(), prefix(), src, query, transport, &mut out) {
        Outcome::Answered(_) => {
            assert!(out.len() >= 12);
            assert_eq!(out[..2], query[..2]);
            assert_ne!(out[2] & 0x80, 0);
            if transport == Transport::Udp {
                assert!(out.len() <= usize::from(MAX_UDP_PAYLOAD));
            }
            assert!(out.len() <= 65535);
        }
        Outcome::Forward => assert!(out.is_empty()),
        Outcome::Drop => {
            assert!(out.is_empty());
            assert!(query.len() < 12 || query[2] & 0x80 != 0);
        }
    }
});
