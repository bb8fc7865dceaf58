//! Firewall planning: what was observed of our table, and the change
//! (replace it whole, patch set elements, or nothing) that brings it to the
//! desired ruleset. Pure, like the rest of [`crate::plan`].

use std::collections::{BTreeMap, BTreeSet};

use super::{element_key, Capture, ElementKey, Ruleset};
use crate::model::OrgPrefix;

// ----- observing ------------------------------------------------------------

/// Our table as `nft -j list table inet sixpn` showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedTable {
    /// Whether the set `same_org48` exists.
    pub set: bool,
    /// The comments of each chain's rules, in order (`""` for none). The
    /// first rule's carries the skeleton's fingerprint.
    pub rules: BTreeMap<String, Vec<String>>,
    /// The set's elements with their comments, whatever they are.
    pub elements: BTreeMap<ElementKey, Option<String>>,
}

impl ObservedTable {
    /// Whether the static part is the one `want` would install.
    pub fn skeleton_matches(&self, want: &Ruleset) -> bool {
        let w = want.as_observed();
        self.set && self.rules == w.rules
    }
}

// ----- planning -------------------------------------------------------------

/// What to do to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallPlan {
    /// It matches: nothing.
    Nothing,
    /// Replace the table whole, in one transaction.
    Replace {
        /// The ruleset to install.
        ruleset: Box<Ruleset>,
        /// Why, for the log.
        reason: &'static str,
    },
    /// Add and remove set elements, in one transaction.
    Update {
        /// Orgs to add.
        add: Vec<(OrgPrefix, String)>,
        /// Elements to remove.
        remove: Vec<ElementKey>,
    },
}

/// Plans the change from `observed` (`None`: the table is absent) to the
/// ruleset for `interface` and `capture` with `orgs` (`None`: the store has
/// not loaded, so no element is added or removed). `force_replace`: the
/// last transaction failed, so the cache can't be trusted. A table with
/// another capture (or none where one is wanted) has another skeleton, so
/// it is replaced.
pub fn plan_firewall(
    interface: &str,
    capture: Option<Capture>,
    orgs: Option<&BTreeMap<OrgPrefix, String>>,
    observed: Option<&ObservedTable>,
    force_replace: bool,
) -> FirewallPlan {
    let replace = |orgs: BTreeMap<OrgPrefix, String>, reason| FirewallPlan::Replace {
        ruleset: Box::new(Ruleset::new(interface, orgs, capture)),
        reason,
    };
    let Some(seen) = observed else {
        return replace(orgs.cloned().unwrap_or_default(), "the table is missing");
    };
    // Before the store loads, keep the orgs that are there (the valid ones).
    let kept;
    let orgs = match orgs {
        Some(o) => o,
        None => {
            kept = kept_orgs(seen);
            &kept
        }
    };
    let want = Ruleset::new(interface, BTreeMap::new(), capture);
    if force_replace {
        return replace(orgs.clone(), "the last change failed");
    }
    if !seen.skeleton_matches(&want) {
        return replace(orgs.clone(), "the chains or rules differ from sixpn's");
    }
    let (add, remove) = diff(orgs, &seen.elements);
    if add.is_empty() && remove.is_empty() {
        FirewallPlan::Nothing
    } else {
        FirewallPlan::Update { add, remove }
    }
}

/// [`plan_firewall`] for a table that held `orgs` as they were before the
/// writes that `touched` these orgs: looks at those elements only, so a
/// store change costs what it changed. Anything else (no table, a failed
/// change, a skeleton that differs) gets the full plan.
pub fn plan_firewall_touched(
    interface: &str,
    capture: Option<Capture>,
    orgs: &BTreeMap<OrgPrefix, String>,
    observed: Option<&ObservedTable>,
    force_replace: bool,
    touched: &BTreeSet<OrgPrefix>,
) -> FirewallPlan {
    let seen = match observed {
        Some(seen)
            if !force_replace
                && seen.skeleton_matches(&Ruleset::new(interface, BTreeMap::new(), capture)) =>
        {
            seen
        }
        _ => return plan_firewall(interface, capture, Some(orgs), observed, force_replace),
    };
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for p in touched {
        let key = element_key(*p);
        match (orgs.get(p), seen.elements.contains_key(&key)) {
            (Some(name), false) => add.push((*p, name.clone())),
            (None, true) => remove.push(key),
            _ => {}
        }
    }
    if add.is_empty() && remove.is_empty() {
        FirewallPlan::Nothing
    } else {
        FirewallPlan::Update { add, remove }
    }
}

/// The orgs to add and the elements to remove, by one merge walk over both
/// sorted maps: this runs on every store change, at 100k orgs too.
/// [`element_key`] grows with the prefix, so both walk in the same order.
fn diff(
    want: &BTreeMap<OrgPrefix, String>,
    seen: &BTreeMap<ElementKey, Option<String>>,
) -> (Vec<(OrgPrefix, String)>, Vec<ElementKey>) {
    use std::cmp::Ordering;
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let mut w = want.iter().peekable();
    let mut s = seen.keys().peekable();
    loop {
        let order = match (w.peek(), s.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((p, _)), Some(k)) => element_key(**p).cmp(k),
        };
        match order {
            Ordering::Less => {
                let (p, n) = w.next().expect("peeked");
                add.push((*p, n.clone()));
            }
            Ordering::Greater => remove.push(*s.next().expect("peeked")),
            Ordering::Equal => {
                w.next();
                s.next();
            }
        }
    }
    (add, remove)
}

/// The orgs of a table's valid elements (`{P . P}` for a 6PN /48 `P`),
/// named by their comment when it is a plain name.
fn kept_orgs(seen: &ObservedTable) -> BTreeMap<OrgPrefix, String> {
    seen.elements
        .iter()
        .filter_map(|((a, b), c)| {
            let p = OrgPrefix::of(*a)?;
            (element_key(p) == (*a, *b)).then(|| {
                let name = c
                    .as_deref()
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= 63
                            && n.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    })
                    .unwrap_or("unnamed");
                (p, name.to_owned())
            })
        })
        .collect()
}

/// What the table looks like once `plan` applied, given what it was.
pub fn apply_firewall_to(observed: &mut Option<ObservedTable>, plan: &FirewallPlan) {
    match plan {
        FirewallPlan::Nothing => {}
        FirewallPlan::Replace { ruleset, .. } => *observed = Some(ruleset.as_observed()),
        FirewallPlan::Update { add, remove } => {
            if let Some(o) = observed.as_mut() {
                for k in remove {
                    o.elements.remove(k);
                }
                for (p, n) in add {
                    o.elements.insert(element_key(*p), Some(n.clone()));
                }
            }
        }
    }
}
