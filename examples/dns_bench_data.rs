//! Test data for `scripts/bench-dns.sh`: fills a SQLite store with one org
//! of `--apps` apps × `--per-app` instances and `--peers` WireGuard peers on
//! gateway `bench-1`, and writes what the other servers need to serve the
//! same names:
//!
//! - `--zone FILE`: an RFC 1035 zone file for `internal.` whose records are
//!   sixpn's own answers — every name is asked of [`answer`] over TCP, on
//!   the zone the daemon builds from the same store, and the response's
//!   records are written out. So NSD and Unbound serve byte-for-byte the
//!   same RRsets. Names whose answer can't fit any message (`_instances`
//!   with thousands of instances) are left out; `top<N>` is written for
//!   N = 1..3.
//! - `--queries FILE`: a dnsperf query file, a shuffled mix of the names
//!   (AAAA of apps, regions, `top1`, instances and peers; TXT of `vms`).
//!
//! `cargo run --release --example dns_bench_data -- --db state.db --apps 1000 --per-app 3 --peers 1000 --zone internal.zone --queries queries.txt`

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use sixpn::dns::{answer, Outcome, RegionDistances, Transport, ZoneIndex};
use sixpn::model::{HostId, PrivateKey};
use sixpn::store::sqlite::SqliteStore;
use sixpn::store::{Gateway, InstanceAddress, NewInstance, NewPeer, Store};

#[derive(Parser)]
struct Args {
    /// The SQLite store to create (must not exist).
    #[arg(long)]
    db: PathBuf,
    #[arg(long, default_value_t = 1000)]
    apps: u32,
    #[arg(long, default_value_t = 3)]
    per_app: u32,
    #[arg(long, default_value_t = 1000)]
    peers: u32,
    /// Write the zone file here.
    #[arg(long)]
    zone: Option<PathBuf>,
    /// Write the dnsperf query file here.
    #[arg(long)]
    queries: Option<PathBuf>,
}

const REGIONS: [&str; 10] = [
    "lhr", "iad", "syd", "ams", "fra", "nrt", "sin", "gru", "ord", "sea",
];

fn app_name(a: u32) -> String {
    format!("app-{a:05}")
}

fn inst_id(a: u32, k: u32) -> String {
    format!("i{a}x{k}")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.db.exists(), "{} exists", args.db.display());
    let t0 = Instant::now();
    let store = SqliteStore::open(&args.db)?;
    store
        .register_gateway(&Gateway {
            name: "bench-1".parse()?,
            region: "lhr".parse()?,
            host_id: "a7b:d6b".parse()?,
            endpoint: "[::1]:51820".parse()?,
            // The daemon registers its own key when it starts.
            public_key: PrivateKey::generate().public_key(),
        })
        .await?;
    let org = store.create_org(&"bench".parse()?).await?;
    let prefix = org.prefix();
    let base = prefix.addr().segments();
    let host = HostId::from_u32(0x0a7b_007d);
    for a in 0..args.apps {
        for k in 0..args.per_app {
            let m = a * 16 + k + 1;
            let addr = Ipv6Addr::new(
                base[0],
                base[1],
                base[2],
                (host.get() >> 16) as u16,
                host.get() as u16,
                (m >> 16) as u16,
                m as u16,
                2,
            );
            store
                .add_instance(&NewInstance {
                    org: org.name.clone(),
                    app: app_name(a).parse()?,
                    id: Some(inst_id(a, k).parse()?),
                    region: REGIONS[k as usize % REGIONS.len()].parse()?,
                    address: InstanceAddress::Address(addr),
                    process_group: None,
                    started: true,
                })
                .await?;
        }
    }
    for p in 0..args.peers {
        store
            .create_peer(&NewPeer {
                org: org.name.clone(),
                name: format!("peer-{p:04}").parse()?,
                region: "lhr".parse()?,
                public_key: PrivateKey::generate().public_key(),
                ephemeral: None,
            })
            .await?;
    }
    eprintln!(
        "store: {} apps × {} instances, {} peers in {:?}",
        args.apps,
        args.per_app,
        args.peers,
        t0.elapsed()
    );
    if args.zone.is_none() && args.queries.is_none() {
        return Ok(());
    }

    let snap = store.snapshot().await?;
    let index = ZoneIndex::build(&snap, &"lhr".parse()?, &RegionDistances::builtin());
    let member: IpAddr = snap
        .peers
        .first()
        .map(|p| p.net.peer_addr())
        .unwrap_or(prefix.dns_addr())
        .into();

    // Every name and the types it holds.
    let mut names: Vec<(String, &str)> = vec![
        ("internal".into(), ""),
        ("_apps.internal".into(), "TXT"),
        ("_peer.internal".into(), "TXT"),
        ("_instances.internal".into(), "TXT"),
        ("all._instances.internal".into(), "TXT"),
    ];
    let mut queries: Vec<String> = Vec::new();
    for a in 0..args.apps {
        let app = app_name(a);
        names.push((format!("{app}.internal"), "AAAA"));
        names.push((format!("global.{app}.internal"), "AAAA"));
        for r in REGIONS.iter().take(args.per_app as usize) {
            names.push((format!("{r}.{app}.internal"), "AAAA"));
        }
        for n in 1..=3 {
            names.push((format!("top{n}.nearest.of.{app}.internal"), "AAAA"));
        }
        for k in 0..args.per_app {
            names.push((format!("{}.vm.{app}.internal", inst_id(a, k)), "AAAA"));
        }
        for t in ["regions", "all.regions", "vms", "all.vms"] {
            names.push((format!("{t}.{app}.internal"), "TXT"));
        }
        queries.push(format!("{app}.internal AAAA"));
        queries.push(format!("lhr.{app}.internal AAAA"));
        queries.push(format!("top1.nearest.of.{app}.internal AAAA"));
        queries.push(format!("{}.vm.{app}.internal AAAA", inst_id(a, 1)));
        queries.push(format!("vms.{app}.internal TXT"));
    }
    for p in 0..args.peers {
        names.push((format!("peer-{p:04}._peer.internal"), "AAAA"));
        queries.push(format!("peer-{p:04}._peer.internal AAAA"));
    }

    if let Some(path) = &args.zone {
        let mut z = String::new();
        z.push_str("$ORIGIN internal.\n$TTL 5\n");
        z.push_str("@ 5 IN SOA ns.internal. hostmaster.internal. 1 3600 600 86400 5\n");
        z.push_str("@ 5 IN NS ns.internal.\n");
        let (mut records, mut skipped) = (0usize, Vec::new());
        let mut out = Vec::with_capacity(65536);
        for (name, rtype) in &names {
            if rtype.is_empty() {
                continue;
            }
            let code = if *rtype == "AAAA" { 28 } else { 16 };
            let q = query(name, code);
            match answer(&index, prefix, member, &q, Transport::Tcp, &mut out) {
                Outcome::Answered(_) => {}
                other => anyhow::bail!("{name}: {other:?}"),
            }
            let m = Message::from_vec(&out)?;
            if m.metadata.response_code.low() != 0 {
                skipped.push(name.clone());
                continue;
            }
            for rec in &m.answers {
                match &rec.data {
                    RData::AAAA(a) => writeln!(z, "{name}. 5 IN AAAA {}", a.0)?,
                    RData::TXT(t) => {
                        write!(z, "{name}. 5 IN TXT")?;
                        for s in t.txt_data.iter() {
                            let s = String::from_utf8_lossy(s)
                                .replace('\\', "\\\\")
                                .replace('"', "\\\"");
                            write!(z, " \"{s}\"")?;
                        }
                        z.push('\n');
                    }
                    other => anyhow::bail!("{name}: unexpected {other:?}"),
                }
                records += 1;
            }
        }
        // The name server's own address (NSD wants the NS to resolve).
        z.push_str("ns 5 IN AAAA fd00:b::1\n");
        std::fs::write(path, z)?;
        eprintln!(
            "zone: {records} records for {} names in {}; left out (too large for any message): {skipped:?}",
            names.len(),
            path.display()
        );
    }

    if let Some(path) = &args.queries {
        // A deterministic shuffle (xorshift), repeated to ~20k lines.
        let mut lines = Vec::new();
        while lines.len() < 20_000 && !queries.is_empty() {
            lines.extend(queries.iter().cloned());
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in (1..lines.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lines.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text)?;
        eprintln!("queries: {} lines in {}", lines.len(), path.display());
    }
    Ok(())
}

/// A query for `name` (dotted, no trailing dot) of type `code`, RD clear.
fn query(name: &str, code: u16) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&code.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}
