//! An in-memory `table inet sixpn` that speaks the adapter's wire format.
//!
//! It takes the same JSON transactions the Linux adapter pipes to
//! `nft -j -f -` (built by [`crate::dataplane::nft_codec`]), applies each one
//! whole or not at all, and answers a listing in the JSON `nft -j list table`
//! prints, which the fake kernel then parses with the real listing parser.
//! So the CPU-only tests run the codec both ways: a batch the real `nft`
//! would read differently from what the planner meant shows up here, as a
//! wrong observation on the next pass. Commands or objects it does not know
//! fail the transaction, as an unknown one would in `nft`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::plan::nft::{SET, TABLE};

/// One chain: its base-chain attributes (hook, priority …) and its rules.
#[derive(Debug, Clone, Default)]
struct FakeChain {
    attrs: Map<String, Value>,
    rules: Vec<Value>,
}

/// The table's contents, as nftables holds them.
#[derive(Debug, Clone, Default)]
pub struct FakeTable {
    counters: BTreeMap<String, u64>,
    /// The set's attributes and its elements, keyed by their value.
    set: Option<(Map<String, Value>, BTreeMap<String, Value>)>,
    chains: BTreeMap<String, FakeChain>,
    /// Chain names in the order they were added, as `nft list` shows them.
    order: Vec<String>,
}

/// Why a transaction was refused: nft's message, and the errno it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What nft would say.
    pub message: String,
    /// `ENOENT` for a missing object, `EINVAL` otherwise.
    pub errno: i32,
}

fn refused(errno: i32, message: impl Into<String>) -> Refused {
    Refused {
        message: message.into(),
        errno,
    }
}

fn invalid(message: impl Into<String>) -> Refused {
    refused(libc::EINVAL, message)
}

/// Which table an object names; it must be ours.
fn check_ours(obj: &Value) -> Result<(), Refused> {
    let table = obj.get("table").or_else(|| obj.get("name"));
    if obj["family"] != "inet" || table.and_then(Value::as_str) != Some(TABLE) {
        return Err(invalid(format!("not in table inet {TABLE}: {obj}")));
    }
    Ok(())
}

fn name_of(obj: &Value, what: &str) -> Result<String, Refused> {
    obj["name"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(format!("{what} without a name: {obj}")))
}

/// An element's key: its value, whatever the comment.
fn element_key(e: &Value) -> String {
    e.get("elem").map_or(e, |inner| &inner["val"]).to_string()
}

/// Applies one transaction (the JSON text of an nft batch) to `table`
/// (`None`: absent): all of it, or on error none of it.
pub fn apply(table: &mut Option<FakeTable>, batch: &str) -> Result<(), Refused> {
    apply_on(table, batch, true)
}

/// [`apply`] on a kernel with (`queue`) or without nft's `queue`
/// expression: without it, a rule that queues refuses the transaction with
/// `ENOENT`, as the kernel does.
pub fn apply_on(table: &mut Option<FakeTable>, batch: &str, queue: bool) -> Result<(), Refused> {
    let v: Value = serde_json::from_str(batch).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let cmds = v["nftables"]
        .as_array()
        .ok_or_else(|| invalid("no \"nftables\" array"))?;
    let mut work = table.clone();
    for cmd in cmds {
        let (verb, body) = cmd
            .as_object()
            .and_then(|m| m.iter().next())
            .ok_or_else(|| invalid(format!("not a command: {cmd}")))?;
        let (kind, obj) = body
            .as_object()
            .and_then(|m| m.iter().next())
            .ok_or_else(|| invalid(format!("no object in: {cmd}")))?;
        check_ours(obj)?;
        command(&mut work, verb, kind, obj, queue)?;
    }
    *table = work;
    Ok(())
}

/// Checks a rule's statements: kinds sixpn writes only, each with the
/// fields nft needs.
fn check_statements(rule: &Value, queue: bool) -> Result<(), Refused> {
    let exprs = rule["expr"]
        .as_array()
        .filter(|e| !e.is_empty())
        .ok_or_else(|| invalid(format!("rule without expressions: {rule}")))?;
    let u16_field = |v: &Value, f: &str| v[f].as_u64().is_some_and(|n| n <= u64::from(u16::MAX));
    for e in exprs {
        let Some((kind, v)) = e
            .as_object()
            .filter(|m| m.len() == 1)
            .and_then(|m| m.iter().next())
        else {
            return Err(invalid(format!("not a statement: {e}")));
        };
        let ok = match kind.as_str() {
            "match" => v.get("left").is_some() && v.get("right").is_some() && v["op"].is_string(),
            "counter" | "accept" | "drop" | "jump" => true,
            // The kernel looks an expression type up by name: ENOENT.
            "queue" if !queue => return Err(refused(libc::ENOENT, "No such file or directory")),
            "queue" => u16_field(v, "num"),
            "log" => v.get("group").is_none_or(|_| u16_field(v, "group")),
            _ => return Err(invalid(format!("unsupported statement: {e}"))),
        };
        if !ok {
            return Err(invalid(format!("malformed statement: {e}")));
        }
    }
    Ok(())
}

fn command(
    t: &mut Option<FakeTable>,
    verb: &str,
    kind: &str,
    obj: &Value,
    queue: bool,
) -> Result<(), Refused> {
    let missing = || refused(libc::ENOENT, "No such file or directory");
    match (verb, kind) {
        ("add", "table") => {
            t.get_or_insert_with(FakeTable::default);
        }
        ("delete", "table") => {
            t.take().ok_or_else(missing)?;
        }
        ("flush", "table") => {
            let t = t.as_mut().ok_or_else(missing)?;
            t.flush_rules();
        }
        (_, _) if t.is_none() => return Err(missing()),
        ("add", "counter") => {
            let t = t.as_mut().ok_or_else(missing)?;
            t.counters.entry(name_of(obj, "counter")?).or_insert(0);
        }
        ("add", "set") => {
            let t = t.as_mut().ok_or_else(missing)?;
            if name_of(obj, "set")? != SET {
                return Err(invalid(format!("unexpected set {obj}")));
            }
            let mut attrs = obj.as_object().cloned().unwrap_or_default();
            let elems = attrs.remove("elem");
            let (_, have) = t.set.get_or_insert_with(|| (attrs, BTreeMap::new()));
            for e in elems
                .as_ref()
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                have.insert(element_key(e), e.clone());
            }
        }
        ("add", "chain") => {
            let t = t.as_mut().ok_or_else(missing)?;
            let name = name_of(obj, "chain")?;
            if !t.chains.contains_key(&name) {
                t.order.push(name.clone());
            }
            let attrs = obj.as_object().cloned().unwrap_or_default();
            t.chains.entry(name).or_default().attrs = attrs;
        }
        ("add", "rule") => {
            let t = t.as_mut().ok_or_else(missing)?;
            let chain = obj["chain"]
                .as_str()
                .ok_or_else(|| invalid(format!("rule without a chain: {obj}")))?;
            check_statements(obj, queue)?;
            let c = t.chains.get_mut(chain).ok_or_else(missing)?;
            c.rules.push(obj.clone());
        }
        ("add" | "delete", "element") => {
            let t = t.as_mut().ok_or_else(missing)?;
            if name_of(obj, "set")? != SET {
                return Err(missing());
            }
            let (_, have) = t.set.as_mut().ok_or_else(missing)?;
            let elems = obj["elem"]
                .as_array()
                .ok_or_else(|| invalid(format!("no elements in {obj}")))?;
            for e in elems {
                if verb == "add" {
                    have.insert(element_key(e), e.clone());
                } else if have.remove(&element_key(e)).is_none() {
                    // As in the kernel: removing an absent element fails
                    // the whole transaction.
                    return Err(missing());
                }
            }
        }
        _ => return Err(invalid(format!("unsupported command: {verb} {kind}"))),
    }
    Ok(())
}

impl FakeTable {
    /// `nft -j list table inet sixpn`: metainfo, the table, its counters,
    /// the set with its elements, then each chain followed by its rules.
    pub fn listing(&self) -> String {
        let mut items = vec![
            json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
            json!({"table": {"family": "inet", "name": TABLE, "handle": 1}}),
        ];
        let mut handle = 2;
        let mut next = || {
            handle += 1;
            handle
        };
        for (name, packets) in &self.counters {
            items.push(
                json!({"counter": {"family": "inet", "name": name, "table": TABLE,
                "handle": next(), "packets": packets, "bytes": packets * 100}}),
            );
        }
        if let Some((attrs, elems)) = &self.set {
            let mut set = attrs.clone();
            set.insert("handle".into(), json!(next()));
            if !elems.is_empty() {
                set.insert("elem".into(), elems.values().cloned().collect());
            }
            items.push(json!({ "set": set }));
        }
        for name in &self.order {
            let Some(c) = self.chains.get(name) else {
                continue;
            };
            let mut chain = c.attrs.clone();
            chain.insert("handle".into(), json!(next()));
            items.push(json!({ "chain": chain }));
            for r in &c.rules {
                let mut rule = r.as_object().cloned().unwrap_or_default();
                rule.insert("handle".into(), json!(next()));
                items.push(json!({ "rule": rule }));
            }
        }
        json!({ "nftables": items }).to_string()
    }

    /// The number of elements in the set.
    pub fn element_count(&self) -> usize {
        self.set.as_ref().map_or(0, |(_, e)| e.len())
    }

    /// Deletes every rule and keeps chains, set and elements, as
    /// `nft flush table inet sixpn` does.
    pub fn flush_rules(&mut self) {
        for c in self.chains.values_mut() {
            c.rules.clear();
        }
    }

    /// Adds `packets` to the named counter, as matching traffic would.
    pub fn count(&mut self, counter: &str, packets: u64) {
        if let Some(n) = self.counters.get_mut(counter) {
            *n += packets;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeKernel;
    use crate::dataplane::nft_codec::{parse_listing, to_json, update_batch};
    use crate::dataplane::Firewall;
    use crate::plan::nft::tests::{example, example_with, org, JIT_CAPTURE};
    use crate::plan::nft::{element_key, Capture, CaptureMode, Ruleset, FORWARD_DROPPED};

    fn loaded() -> Option<FakeTable> {
        let mut t = None;
        apply(&mut t, &to_json(&example().replace_batch())).unwrap();
        t
    }

    #[test]
    fn a_replace_batch_lists_back_as_the_ruleset_it_came_from() {
        let t = loaded().unwrap();
        let seen = parse_listing(&t.listing()).unwrap();
        assert_eq!(seen, example().as_observed());
        // A second replace of the same ruleset is the same table.
        let mut again = Some(t);
        apply(&mut again, &to_json(&example().replace_batch())).unwrap();
        assert_eq!(parse_listing(&again.unwrap().listing()).unwrap(), seen);
    }

    #[test]
    fn element_batches_add_and_remove_and_a_bad_one_changes_nothing() {
        let mut t = loaded();
        let add = [(org(3), "initech".to_owned())];
        apply(&mut t, &to_json(&update_batch(&add, &[]))).unwrap();
        let seen = parse_listing(&t.as_ref().unwrap().listing()).unwrap();
        assert_eq!(
            seen.elements.get(&element_key(org(3))),
            Some(&Some("initech".into()))
        );
        apply(&mut t, &to_json(&update_batch(&[], &[element_key(org(1))]))).unwrap();
        assert_eq!(t.as_ref().unwrap().element_count(), 2);
        // Removing an absent element refuses the whole batch, the add too.
        let before = t.as_ref().unwrap().listing();
        let err = apply(
            &mut t,
            &to_json(&update_batch(
                &[(org(4), "x".into())],
                &[element_key(org(1))],
            )),
        )
        .unwrap_err();
        assert_eq!(err.errno, libc::ENOENT);
        assert_eq!(t.as_ref().unwrap().listing(), before);
    }

    #[test]
    fn a_replace_resets_the_counters_and_elements_need_a_table() {
        let mut t = loaded();
        t.as_mut().unwrap().count(FORWARD_DROPPED, 5);
        let l = t.as_ref().unwrap().listing();
        assert_eq!(
            crate::dataplane::nft_codec::counter_packets(&l, FORWARD_DROPPED),
            Some(5)
        );
        apply(&mut t, &to_json(&example().replace_batch())).unwrap();
        let l = t.as_ref().unwrap().listing();
        assert_eq!(
            crate::dataplane::nft_codec::counter_packets(&l, FORWARD_DROPPED),
            Some(0)
        );
        let mut none = None;
        let err = apply(
            &mut none,
            &to_json(&update_batch(&[(org(4), "x".into())], &[])),
        );
        assert_eq!(err.unwrap_err().errno, libc::ENOENT);
        assert!(none.is_none());
    }

    #[test]
    fn a_command_it_does_not_know_refuses_the_transaction() {
        let mut t = loaded();
        let before = t.as_ref().unwrap().listing();
        let batch = json!({"nftables": [
            {"add": {"element": {"family": "inet", "table": TABLE, "name": SET,
                "elem": [{"concat": ["fdaa:0:9::", "fdaa:0:9::"]}]}}},
            {"replace": {"rule": {"family": "inet", "table": TABLE, "chain": "forward"}}}
        ]});
        assert!(apply(&mut t, &batch.to_string()).is_err());
        assert_eq!(t.unwrap().listing(), before);
        let other = json!({"nftables": [{"add": {"table": {"family": "inet", "name": "filter"}}}]});
        assert!(
            apply(&mut None, &other.to_string()).is_err(),
            "only our table"
        );
    }

    fn queue_capture() -> Ruleset {
        example_with(Capture {
            listen_port: 51820,
            mode: CaptureMode::Queue { num: 3 },
        })
    }

    #[test]
    fn a_capture_lists_back_and_a_kernel_without_queue_refuses_only_queueing() {
        for rs in [example_with(JIT_CAPTURE), queue_capture()] {
            let mut t = None;
            apply(&mut t, &to_json(&rs.replace_batch())).unwrap();
            let seen = parse_listing(&t.unwrap().listing()).unwrap();
            assert_eq!(seen, rs.as_observed());
        }
        // No queue expression: the log capture loads, the queue one is
        // refused whole and the table stays as it was.
        let mut t = None;
        apply_on(
            &mut t,
            &to_json(&example_with(JIT_CAPTURE).replace_batch()),
            false,
        )
        .unwrap();
        let before = t.as_ref().unwrap().listing();
        let err = apply_on(&mut t, &to_json(&queue_capture().replace_batch()), false).unwrap_err();
        assert_eq!(err.errno, libc::ENOENT);
        assert_eq!(t.unwrap().listing(), before);
    }

    #[test]
    fn a_statement_it_does_not_know_or_cannot_read_refuses_the_transaction() {
        let rule = |expr: Value| {
            json!({"nftables": [
                {"add": {"table": {"family": "inet", "name": TABLE}}},
                {"add": {"chain": {"family": "inet", "table": TABLE, "name": "c"}}},
                {"add": {"rule": {"family": "inet", "table": TABLE, "chain": "c", "expr": expr}}}
            ]})
            .to_string()
        };
        for bad in [
            json!([{"reject": null}]),
            json!([{"queue": {"flags": ["bypass"]}}]),
            json!([{"queue": {"num": 70000}}]),
            json!([{"log": {"group": "one"}}]),
            json!([{"match": {"left": 1}}]),
            json!([{"accept": null, "drop": null}]),
        ] {
            let err = apply(&mut None, &rule(bad.clone())).unwrap_err();
            assert_eq!(err.errno, libc::EINVAL, "{bad}");
        }
        for good in [
            json!([{"queue": {"num": 1, "flags": ["bypass"]}}]),
            json!([{"log": {"group": 1}}]),
            json!([{"log": null}]),
        ] {
            apply(&mut None, &rule(good.clone())).unwrap_or_else(|e| panic!("{good}: {e:?}"));
        }
    }

    #[tokio::test]
    async fn the_fake_kernel_has_queue_unless_told_otherwise() {
        let k = FakeKernel::new();
        assert!(k.queue_supported().await.unwrap());
        k.replace(&queue_capture()).await.unwrap();
        k.state().no_queue = true;
        assert!(!k.queue_supported().await.unwrap());
        let err = k.replace(&queue_capture()).await.unwrap_err();
        assert_eq!(err.errno, Some(libc::ENOENT), "{err}");
        assert_eq!(
            k.observe().await.unwrap(),
            Some(queue_capture().as_observed()),
            "the refused replace changed nothing"
        );
        k.replace(&example_with(JIT_CAPTURE)).await.unwrap();
    }
}
