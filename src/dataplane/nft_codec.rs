//! The nftables wire format of sixpn's table: the JSON batches `nft -j -f -`
//! reads (built with the `nftables` crate's types from the rule model in
//! [`crate::plan::nft`]) and the parser of `nft -j list table inet sixpn`.
//! The Linux adapter sends and reads these; the fake kernel applies the same
//! batches and answers with the same listings, so a codec bug shows in the
//! CPU-only tests too. The rule model itself stays pure data in `plan`.

use std::net::Ipv6Addr;

use nftables::expr::{BinaryOperation, Elem, Expression, Exthdr, Meta, MetaKey, NamedExpression};
use nftables::expr::{Payload, PayloadBase, PayloadField, PayloadRaw, Prefix, SetItem};
use nftables::schema::{self, NfListObject, Nftables};
use nftables::stmt::{self, JumpTarget, Match, Operator, QueueFlag, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::model::OrgPrefix;
use crate::plan::nft::*;

impl Ruleset {
    /// One transaction that replaces the table whole: `add table` (so the
    /// `delete` cannot fail when it is absent), `delete table`, then every
    /// object anew. Either all of it applies or none of it.
    pub fn replace_batch(&self) -> Nftables<'static> {
        let mut b = nftables::batch::Batch::new();
        b.add(NfListObject::Table(table()));
        b.delete(NfListObject::Table(table()));
        b.add(NfListObject::Table(table()));
        for c in [FORWARD_DROPPED, INPUT_DROPPED] {
            b.add(NfListObject::Counter(schema::Counter {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: c.into(),
                handle: None,
                packets: None,
                bytes: None,
            }));
        }
        let elems: Vec<Expression<'static>> = self
            .orgs
            .iter()
            .map(|(p, n)| json_elem(element_key(*p), Some(n)))
            .collect();
        b.add(NfListObject::Set(Box::new(schema::Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: SET.into(),
            handle: None,
            set_type: schema::SetTypeValue::Concatenated(
                vec![schema::SetType::Ipv6Addr, schema::SetType::Ipv6Addr].into(),
            ),
            policy: None,
            flags: None,
            elem: (!elems.is_empty()).then(|| elems.into()),
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        })));
        for c in &self.chains {
            b.add(NfListObject::Chain(schema::Chain {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: c.name.into(),
                newname: None,
                handle: None,
                _type: c.base.map(|_| NfChainType::Filter),
                hook: c.base.map(|b| match b.hook {
                    Hook::Forward => NfHook::Forward,
                    Hook::Input => NfHook::Input,
                }),
                prio: c.base.map(|b| b.priority),
                dev: None,
                policy: c.base.map(|_| NfChainPolicy::Accept),
            }));
        }
        for c in &self.chains {
            for r in &c.rules {
                b.add(NfListObject::Rule(schema::Rule {
                    family: NfFamily::INet,
                    table: TABLE.into(),
                    chain: c.name.into(),
                    expr: r.json().into(),
                    handle: None,
                    index: None,
                    comment: Some(r.comment.clone().into()),
                }));
            }
        }
        b.to_nftables()
    }
}

impl Cond {
    fn json(&self) -> Statement<'static> {
        let m = |left, op, right| Statement::Match(Match { left, right, op });
        let s = |v: String| Expression::String(v.into());
        match self {
            Cond::IifName(n) => m(meta(MetaKey::Iifname), Operator::EQ, s(n.clone())),
            Cond::OifName(n) => m(meta(MetaKey::Oifname), Operator::EQ, s(n.clone())),
            Cond::NotIpv6 => m(meta(MetaKey::Nfproto), Operator::NEQ, s("ipv6".into())),
            Cond::SameOrg(eq) => m(
                Expression::Named(NamedExpression::Concat(vec![
                    and(payload("ip6", "saddr"), s(ORG_MASK.to_string())),
                    and(payload("ip6", "daddr"), s(ORG_MASK.to_string())),
                ])),
                if *eq { Operator::EQ } else { Operator::NEQ },
                s(format!("@{SET}")),
            ),
            Cond::SaddrIn(a, l) => m(payload("ip6", "saddr"), Operator::EQ, prefix(*a, *l)),
            Cond::DaddrIn(a, l) => m(payload("ip6", "daddr"), Operator::EQ, prefix(*a, *l)),
            Cond::DaddrHost(h, eq) => m(
                and(payload("ip6", "daddr"), s(HOST_MASK.to_string())),
                if *eq { Operator::EQ } else { Operator::NEQ },
                s(h.to_string()),
            ),
            Cond::UdpDport(p) => m(
                payload("udp", "dport"),
                Operator::EQ,
                Expression::Number(u32::from(*p)),
            ),
            Cond::UdpLength(n) => m(
                payload("udp", "length"),
                Operator::EQ,
                Expression::Number(u32::from(*n)),
            ),
            // `@th,64,32`: 32 bits at bit 64 of the transport header.
            Cond::UdpHead(v) => m(
                Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw {
                    base: PayloadBase::TH,
                    offset: 64,
                    len: 32,
                }))),
                Operator::EQ,
                Expression::Number(*v),
            ),
            Cond::TcpDport(p) => m(
                payload("tcp", "dport"),
                Operator::EQ,
                Expression::Number(u32::from(*p)),
            ),
            Cond::Icmpv6 => m(meta(MetaKey::L4proto), Operator::EQ, s("ipv6-icmp".into())),
            Cond::LaterFragment => m(
                Expression::Named(NamedExpression::Exthdr(Exthdr {
                    name: "frag".into(),
                    field: Some("frag-off".into()),
                    offset: None,
                })),
                Operator::NEQ,
                Expression::Number(0),
            ),
            Cond::NeighborDiscovery => m(
                payload("icmpv6", "type"),
                Operator::EQ,
                Expression::Named(NamedExpression::Set(vec![
                    SetItem::Element(s("nd-neighbor-solicit".into())),
                    SetItem::Element(s("nd-neighbor-advert".into())),
                ])),
            ),
        }
    }
}

impl Rule {
    fn json(&self) -> Vec<Statement<'static>> {
        let mut v: Vec<Statement<'static>> = self.conds.iter().map(Cond::json).collect();
        if let Some(c) = self.counter {
            v.push(Statement::Counter(stmt::Counter::Named(c.into())));
        }
        v.push(match self.verdict {
            Verdict::Accept => Statement::Accept(None),
            Verdict::Drop => Statement::Drop(None),
            Verdict::Jump(t) => Statement::Jump(JumpTarget { target: t.into() }),
            Verdict::Queue(n) => Statement::Queue(stmt::Queue {
                num: Expression::Number(u32::from(n)),
                flags: Some([QueueFlag::Bypass].into()),
            }),
            Verdict::Log(g) => Statement::Log(Some(stmt::Log::new(Some(u32::from(g))))),
        });
        v
    }
}

fn table() -> schema::Table<'static> {
    schema::Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn and(a: Expression<'static>, b: Expression<'static>) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(a, b)))
}

fn prefix(a: Ipv6Addr, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(a.to_string().into())),
        len: u32::from(len),
    }))
}

fn json_elem(key: ElementKey, comment: Option<&str>) -> Expression<'static> {
    let val = Expression::Named(NamedExpression::Concat(vec![
        Expression::String(key.0.to_string().into()),
        Expression::String(key.1.to_string().into()),
    ]));
    match comment {
        None => val,
        Some(c) => Expression::Named(NamedExpression::Elem(Elem {
            val: Box::new(val),
            timeout: None,
            expires: None,
            comment: Some(c.to_owned().into()),
            counter: None,
        })),
    }
}

/// One transaction that adds and removes set elements only (the `nft -j -f -`
/// form of an [`FirewallPlan::Update`]; the Linux adapter sends the same
/// over netlink without spawning `nft`).
pub fn update_batch(add: &[(OrgPrefix, String)], remove: &[ElementKey]) -> Nftables<'static> {
    let mut b = nftables::batch::Batch::new();
    let element = |elem: Vec<Expression<'static>>| {
        NfListObject::Element(schema::Element {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: SET.into(),
            elem: elem.into(),
        })
    };
    if !remove.is_empty() {
        b.delete(element(
            remove.iter().map(|k| json_elem(*k, None)).collect(),
        ));
    }
    if !add.is_empty() {
        b.add(element(
            add.iter()
                .map(|(p, n)| json_elem(element_key(*p), Some(n)))
                .collect(),
        ));
    }
    b.to_nftables()
}

/// The throwaway table of [`queue_probe_batch`]; never committed.
pub const PROBE_TABLE: &str = "sixpn_probe";

/// A transaction for `nft -c` only (checked by the kernel, never
/// committed): a throwaway table `inet sixpn_probe` with one rule that
/// queues, written as the capture rule's verdict is. A kernel without nft's
/// `queue` expression refuses it with `ENOENT`.
pub fn queue_probe_batch() -> Nftables<'static> {
    let mut b = nftables::batch::Batch::new();
    b.add(NfListObject::Table(schema::Table {
        family: NfFamily::INet,
        name: PROBE_TABLE.into(),
        handle: None,
    }));
    b.add(NfListObject::Chain(schema::Chain {
        family: NfFamily::INet,
        table: PROBE_TABLE.into(),
        name: "probe".into(),
        newname: None,
        handle: None,
        _type: None,
        hook: None,
        prio: None,
        dev: None,
        policy: None,
    }));
    let rule = Rule {
        conds: vec![],
        counter: None,
        verdict: Verdict::Queue(0),
        comment: String::new(),
    };
    b.add(NfListObject::Rule(schema::Rule {
        family: NfFamily::INet,
        table: PROBE_TABLE.into(),
        chain: "probe".into(),
        expr: rule.json().into(),
        handle: None,
        index: None,
        comment: None,
    }));
    b.to_nftables()
}

/// A batch as the JSON text `nft -j -f -` reads. `null` fields the crate
/// writes for absent options (`"timeout": null`, a counter's `"bytes": null`)
/// are dropped; a lone `null` is a verdict (`{"accept": null}`) and stays.
pub fn to_json(batch: &Nftables<'_>) -> String {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if m.len() > 1 {
                    m.retain(|_, x| !x.is_null());
                }
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(batch).expect("nftables batches serialize");
    strip(&mut v);
    v.to_string()
}

/// Parses `nft -j list table inet sixpn` output. Elements that are not a
/// pair of IPv6 addresses make it an error: the table is then replaced.
pub fn parse_listing(json: &str) -> Result<ObservedTable, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = v["nftables"]
        .as_array()
        .ok_or("no \"nftables\" array in the listing")?;
    let mut o = ObservedTable::default();
    for it in items {
        if let Some(c) = it.get("chain") {
            if let Some(name) = c["name"].as_str() {
                o.rules.entry(name.to_owned()).or_default();
            }
        } else if let Some(r) = it.get("rule") {
            if let Some(chain) = r["chain"].as_str() {
                let comment = r["comment"].as_str().unwrap_or("").to_owned();
                o.rules.entry(chain.to_owned()).or_default().push(comment);
            }
        } else if let Some(s) = it.get("set") {
            if s["name"].as_str() != Some(SET) {
                continue;
            }
            o.set = true;
            for e in s["elem"].as_array().into_iter().flatten() {
                let (val, comment) = match e.get("elem") {
                    Some(inner) => (&inner["val"], inner["comment"].as_str()),
                    None => (e, None),
                };
                let pair = val["concat"]
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .ok_or_else(|| format!("set element {val} is not a pair"))?;
                let addr = |x: &serde_json::Value| {
                    x.as_str()
                        .and_then(|s| s.parse::<Ipv6Addr>().ok())
                        .ok_or_else(|| format!("set element {val} is not two IPv6 addresses"))
                };
                o.elements.insert(
                    (addr(&pair[0])?, addr(&pair[1])?),
                    comment.map(str::to_owned),
                );
            }
        }
    }
    Ok(o)
}

/// Reads a named counter's packet count from `nft -j list …` output.
pub fn counter_packets(json: &str, name: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["nftables"].as_array()?.iter().find_map(|it| {
        let c = it.get("counter")?;
        (c["name"].as_str()? == name).then(|| c["packets"].as_u64())?
    })
}

/// The table's drop counters from `nft -j list …` output (0 for one the
/// listing lacks).
pub fn parse_counters(json: &str) -> crate::dataplane::FirewallCounters {
    crate::dataplane::FirewallCounters {
        forward_dropped: counter_packets(json, FORWARD_DROPPED).unwrap_or(0),
        input_dropped: counter_packets(json, INPUT_DROPPED).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::nft::tests::{example, example_with, org, JIT_CAPTURE};

    #[test]
    fn replace_batch_is_one_atomic_transaction_with_named_elements() {
        let json = to_json(&example().replace_batch());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let cmds = v["nftables"].as_array().unwrap();
        // add table; delete table; add table: atomic whether or not it existed.
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
        assert_eq!(cmds[2]["add"]["table"]["name"], TABLE);
        assert!(cmds.iter().all(|c| {
            let obj = c.as_object().unwrap().values().next().unwrap();
            let inner = obj.as_object().unwrap().values().next().unwrap();
            inner["family"] == "inet" && (inner["table"] == TABLE || inner["name"] == TABLE)
        }));
        let set = cmds
            .iter()
            .find_map(|c| c["add"].get("set"))
            .expect("the set");
        assert_eq!(set["elem"][0]["elem"]["comment"], "acme");
        assert_eq!(
            set["elem"][1]["elem"]["val"]["concat"],
            serde_json::json!(["fdaa:0:2::", "fdaa:0:2::"])
        );
        let rules = cmds
            .iter()
            .filter(|c| c["add"].get("rule").is_some())
            .count();
        assert_eq!(rules, 18);
        assert!(
            json.contains(r#"{"accept":null}"#),
            "verdicts keep their null"
        );
        assert!(!json.contains(r#""timeout""#) && !json.contains(r#""bytes""#));
    }

    #[test]
    fn update_batch_touches_set_elements_only() {
        let add = vec![(org(3), "initech".to_string())];
        let remove = vec![element_key(org(1))];
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&update_batch(&add, &remove))).unwrap();
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0]["delete"]["element"]["name"], SET);
        assert_eq!(
            cmds[0]["delete"]["element"]["elem"][0]["concat"],
            serde_json::json!(["fdaa:0:1::", "fdaa:0:1::"])
        );
        assert_eq!(
            cmds[1]["add"]["element"]["elem"][0]["elem"]["comment"],
            "initech"
        );
    }

    /// The capture rule's statements in a replace batch.
    fn capture_rule(rs: &Ruleset) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&to_json(&rs.replace_batch())).unwrap();
        let cmds = v["nftables"].as_array().unwrap().clone();
        let chain = cmds
            .iter()
            .find_map(|c| c["add"].get("chain").filter(|c| c["name"] == CAPTURE_CHAIN))
            .expect("the capture chain");
        assert_eq!(
            (
                &chain["type"],
                &chain["hook"],
                &chain["prio"],
                &chain["policy"]
            ),
            (
                &serde_json::json!("filter"),
                &serde_json::json!("input"),
                &serde_json::json!(-11),
                &serde_json::json!("accept")
            )
        );
        let rules: Vec<&serde_json::Value> = cmds
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["chain"] == CAPTURE_CHAIN)
            .collect();
        assert_eq!(rules.len(), 1);
        rules[0]["expr"].clone()
    }

    #[test]
    fn the_capture_rule_is_the_json_nft_reads_for_it() {
        let matches = serde_json::json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 51820}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "length"}}, "right": 156}},
            {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": 64, "len": 32}}, "right": 0x0100_0000}},
        ]);
        let with = |last: serde_json::Value| {
            let mut v = matches.as_array().unwrap().clone();
            v.push(last);
            serde_json::Value::Array(v)
        };
        assert_eq!(
            capture_rule(&example_with(JIT_CAPTURE)),
            with(serde_json::json!({"log": {"group": 1}}))
        );
        let queue = Capture {
            listen_port: 51820,
            mode: CaptureMode::Queue { num: 3 },
        };
        assert_eq!(
            capture_rule(&example_with(queue)),
            with(serde_json::json!({"queue": {"num": 3, "flags": ["bypass"]}}))
        );
        // Without a capture, the batch is the one it always was.
        let json = to_json(&example().replace_batch());
        assert!(!json.contains(CAPTURE_CHAIN) && !json.contains("\"th\""));
    }

    #[test]
    fn the_queue_probe_names_a_throwaway_table_only() {
        let v: serde_json::Value = serde_json::from_str(&to_json(&queue_probe_batch())).unwrap();
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 3);
        for c in cmds {
            let obj = c["add"].as_object().unwrap().values().next().unwrap();
            let table = obj.get("table").unwrap_or(&obj["name"]);
            assert_eq!(
                (&obj["family"], table),
                (&serde_json::json!("inet"), &serde_json::json!(PROBE_TABLE))
            );
        }
        assert_eq!(
            cmds[2]["add"]["rule"]["expr"],
            serde_json::json!([{"queue": {"num": 0, "flags": ["bypass"]}}])
        );
    }

    fn listing(rs: &Ruleset, extra_elems: &[serde_json::Value]) -> String {
        let mut items = vec![serde_json::json!({"metainfo": {"version": "1.0.6"}})];
        items.push(serde_json::json!({"table": {"family": "inet", "name": TABLE, "handle": 1}}));
        let mut elems: Vec<serde_json::Value> = rs
        .orgs
        .iter()
        .map(|(p, n)| {
            serde_json::json!({"elem": {"val": {"concat": [p.addr().to_string(), p.addr().to_string()]}, "comment": n}})
        })
        .collect();
        elems.extend_from_slice(extra_elems);
        items.push(
            serde_json::json!({"set": {"family": "inet", "name": SET, "table": TABLE,
        "type": ["ipv6_addr", "ipv6_addr"], "elem": elems}}),
        );
        for c in &rs.chains {
            items.push(
                serde_json::json!({"chain": {"family": "inet", "table": TABLE, "name": c.name}}),
            );
            for r in &c.rules {
                items.push(
                    serde_json::json!({"rule": {"family": "inet", "table": TABLE,
                "chain": c.name, "comment": r.comment, "expr": []}}),
                );
            }
        }
        items.push(
            serde_json::json!({"counter": {"family": "inet", "name": FORWARD_DROPPED,
        "table": TABLE, "packets": 7, "bytes": 700}}),
        );
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn a_listing_parses_to_what_the_ruleset_says() {
        let rs = example();
        let o = parse_listing(&listing(&rs, &[])).unwrap();
        assert_eq!(o, rs.as_observed());
        assert!(o.skeleton_matches(&rs));
        assert_eq!(
            counter_packets(&listing(&rs, &[]), FORWARD_DROPPED),
            Some(7)
        );
        assert_eq!(counter_packets(&listing(&rs, &[]), INPUT_DROPPED), None);
        let bad = serde_json::json!({"elem": {"val": "fdaa:0:1::"}});
        assert!(parse_listing(&listing(&rs, &[bad])).is_err());
    }

    #[test]
    fn a_listing_with_a_capture_parses_to_its_ruleset_and_no_other() {
        let jit = example_with(JIT_CAPTURE);
        let o = parse_listing(&listing(&jit, &[])).unwrap();
        assert_eq!(o, jit.as_observed());
        assert_eq!(o.rules[CAPTURE_CHAIN].len(), 1);
        assert!(o.skeleton_matches(&jit));
        assert!(!o.skeleton_matches(&example()));
        let plain = parse_listing(&listing(&example(), &[])).unwrap();
        assert!(!plain.skeleton_matches(&jit));
    }
}
