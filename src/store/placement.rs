//! Where a new peer goes, as pure functions the backends call inside their
//! write: the least-loaded gateway of the region (both backends), and the
//! slot it takes on that gateway (etcd, which retries under contention;
//! SQLite has one writer at a time, so its lowest free slot is the same
//! rule as attempt 0 here, found by an indexed query instead of loading the
//! set).

use std::collections::BTreeSet;

use crate::model::{GatewayName, PeerSlot};

/// The candidate with the fewest peers, ties going to the first name: the
/// order every backend places by, so a fleet spreads the same way whatever
/// holds it. Candidates are `(name, peers on it, what to return)`.
pub fn least_loaded<'a, T>(
    candidates: impl IntoIterator<Item = (&'a GatewayName, usize, T)>,
) -> Option<T> {
    candidates
        .into_iter()
        .min_by(|(an, al, _), (bn, bl, _)| (al, an).cmp(&(bl, bn)))
        .map(|(_, _, t)| t)
}

/// The slot to try on attempt `attempt` of a create, given the slots of
/// (org, gateway) in use: the lowest free one first; after a lost race, one
/// of the lowest few (`roll` picks which), so that concurrent creates stop
/// colliding while still filling the lowest slots.
pub fn pick_slot(used: &BTreeSet<u32>, attempt: u32, roll: usize) -> Option<u32> {
    let spread = attempt.min(8) as usize + 1;
    let free: Vec<u32> = (0..PeerSlot::COUNT)
        .filter(|s| !used.contains(s))
        .take(spread)
        .collect();
    if free.is_empty() {
        return None;
    }
    let i = if attempt == 0 { 0 } else { roll % free.len() };
    Some(free[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> GatewayName {
        s.parse().unwrap()
    }

    #[test]
    fn the_fewest_peers_win_and_ties_go_to_the_first_name() {
        let (a, b, c) = (name("lhr-1"), name("lhr-2"), name("lhr-3"));
        assert_eq!(least_loaded([(&b, 3, 'b'), (&a, 4, 'a')]), Some('b'));
        assert_eq!(
            least_loaded([(&c, 2, 'c'), (&b, 2, 'b'), (&a, 5, 'a')]),
            Some('b')
        );
        assert_eq!(
            least_loaded(Vec::<(&GatewayName, usize, char)>::new()),
            None
        );
    }

    #[test]
    fn the_first_attempt_takes_the_lowest_free_slot() {
        let used: BTreeSet<u32> = [0, 1, 2, 4, 5].into();
        assert_eq!(pick_slot(&used, 0, 7), Some(3));
        assert_eq!(pick_slot(&BTreeSet::new(), 0, 7), Some(0));
    }

    #[test]
    fn a_retry_spreads_over_the_lowest_few_free_slots() {
        let used: BTreeSet<u32> = [0, 2].into();
        // Attempt 1 chooses between the two lowest free slots, 1 and 3.
        let picked: BTreeSet<u32> = (0..4).filter_map(|r| pick_slot(&used, 1, r)).collect();
        assert_eq!(picked, [1, 3].into());
        // However many attempts, at most nine slots are in play.
        let picked: BTreeSet<u32> = (0..100).filter_map(|r| pick_slot(&used, 50, r)).collect();
        assert_eq!(picked.len(), 9);
        assert!(picked.iter().all(|s| *s <= 10));
    }

    #[test]
    fn a_full_gateway_has_no_slot() {
        let used: BTreeSet<u32> = (0..PeerSlot::COUNT).collect();
        assert_eq!(pick_slot(&used, 0, 0), None);
    }
}
