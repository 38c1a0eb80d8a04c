//! Rivals: several rollouts of one model that want the same node. Who gets it is decided here;
//! the plan then blocks the losers with NodeBusy.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{ModelRollout, Priority};

/// A rollout wanting a model on some nodes, for deciding who gets a contested node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `namespace/name`.
    pub key: String,
    /// The rollout's uid.
    pub uid: String,
    /// Its priority.
    pub priority: Priority,
    /// Its creation time.
    pub created: Option<Timestamp>,
}

/// Who gets a node two rollouts of one model want: the higher priority; on a tie the older; then the name.
pub fn winning_claim<'a>(claims: impl IntoIterator<Item = &'a Claim>) -> Option<&'a Claim> {
    claims.into_iter().min_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| match (a.created, b.created) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
            .then_with(|| a.key.cmp(&b.key))
    })
}

/// A rollout's claim: its key, uid, priority and creation time.
pub fn claim_of(r: &ModelRollout) -> Claim {
    Claim {
        key: format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any()),
        uid: r.uid().unwrap_or_default(),
        priority: r.spec.priority,
        created: r.creation_timestamp().map(|t| t.0),
    }
}

/// The nodes of `targets` that other live rollouts of the same model also want, each with every
/// claim on it (`mine` first). `theirs` are the other rollouts with the targets their scope
/// selects (`None`: a scope that cannot be evaluated claims nothing).
pub fn contested(
    mine: &Claim,
    targets: &[String],
    theirs: impl IntoIterator<Item = (Claim, Option<Vec<String>>)>,
) -> BTreeMap<String, Vec<Claim>> {
    let wanted: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    let mut out: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for (claim, their_targets) in theirs {
        if claim.uid == mine.uid {
            continue;
        }
        for node in their_targets.into_iter().flatten().filter(|n| wanted.contains(n.as_str())) {
            out.entry(node).or_insert_with(|| vec![mine.clone()]).push(claim.clone());
        }
    }
    out
}

/// The other rollouts of `mine`'s model that may claim nodes: same model, not `mine`, not being deleted.
pub fn rivals_of<'a>(
    mine: &'a ModelRollout,
    all: impl IntoIterator<Item = &'a ModelRollout>,
) -> impl Iterator<Item = &'a ModelRollout> {
    all.into_iter().filter(move |o| {
        o.spec.model == mine.spec.model && o.uid() != mine.uid() && o.metadata.deletion_timestamp.is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fixtures::claim;

    #[test]
    fn the_higher_priority_wins_then_the_older_then_the_name() {
        let a = claim("ml/vision", "uid-vision", Priority::Normal, 100);
        let older = claim("other/vision", "uid-other", Priority::Normal, 50);
        let urgent = claim("hotfix/vision", "uid-hot", Priority::Critical, 200);
        assert_eq!(winning_claim([&a, &older, &urgent]).unwrap().key, "hotfix/vision");
        let twin = Claim { key: "a/vision".into(), ..a.clone() };
        assert_eq!(winning_claim([&a, &twin]).unwrap().key, "a/vision");
        let undated = Claim { created: None, ..older.clone() };
        assert_eq!(winning_claim([&undated, &a]).unwrap().key, "ml/vision", "a known age beats an unknown one");
        assert_eq!(winning_claim([]), None);
    }

    #[test]
    fn only_shared_nodes_are_contested_and_each_lists_every_claim() {
        let mine = claim("ml/vision", "uid-vision", Priority::Normal, 100);
        let b = claim("b/vision", "uid-b", Priority::High, 50);
        let c = claim("c/vision", "uid-c", Priority::Normal, 10);
        let targets = vec!["n0".to_string(), "n1".into(), "n2".into()];
        let theirs = vec![
            (b.clone(), Some(vec!["n1".to_string(), "n9".into()])),
            (c.clone(), Some(vec!["n1".to_string(), "n2".into()])),
            (claim("bad/vision", "uid-bad", Priority::Critical, 1), None),
            (mine.clone(), Some(targets.clone())),
        ];
        let got = contested(&mine, &targets, theirs);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["n1", "n2"], "n0 is mine alone; n9 is not mine");
        assert_eq!(got["n1"], [mine.clone(), b, c.clone()]);
        assert_eq!(got["n2"], [mine, c]);
    }
}
