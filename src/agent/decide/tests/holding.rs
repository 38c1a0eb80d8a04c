//! What the node keeps of a model: the scheduling label, the deletion policy, retained models.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

fn removed_and_retained(actions: &[Action]) -> (Vec<String>, Vec<String>) {
    let removed = actions.iter().filter_map(|a| if let Action::RemoveModel(m) = a { Some(m.clone()) } else { None });
    let retained = actions.iter().filter_map(|a| if let Action::Retain(m) = a { Some(m.clone()) } else { None });
    (removed.collect(), retained.collect())
}

#[test]
fn models_no_deployment_holds_follow_their_deletion_policy() {
    let mut w = World::new(vec![md("d", "held", "1", Normal, 1)]);
    w.inventory.insert("held".into(), on_disk(&["1"], Some("1")));
    w.inventory.insert("kept".into(), on_disk(&["3"], Some("3")));
    let mut delete = on_disk(&["3"], Some("3"));
    delete.0.on_release = DeletionPolicy::Delete;
    w.inventory.insert("delete".into(), delete);
    w.inventory.insert("inactive".into(), on_disk(&["2"], None));
    let mut already = on_disk(&["4"], Some("4"));
    already.0.retained = true;
    w.inventory.insert("already".into(), already);
    let actions = w.pass();
    let (removed, retained) = removed_and_retained(&actions);
    assert_eq!(removed, ["delete", "inactive"], "Delete, or nothing active");
    assert_eq!(retained, ["kept"], "Retain (the default) keeps the active version; once is enough");
    let labels = labels_of(&actions).unwrap();
    let names: Vec<&str> = labels.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["models.peat.dev/already", "models.peat.dev/held", "models.peat.dev/kept"],
        "removed: unlabelled"
    );
    w.mds.clear();
    assert_eq!(removed_and_retained(&w.pass()).1, ["held", "kept"], "no deployment left");
}

#[test]
fn a_holder_records_its_policy_and_adopts_a_retained_model() {
    let mut d = md("d", "m", "1", Normal, 1);
    d.spec.deletion_policy = DeletionPolicy::Delete;
    let mut w = World::new(vec![d]);
    let mut retained = on_disk(&["1"], Some("1"));
    retained.0.retained = true;
    w.inventory.insert("m".into(), retained);
    let holds: Vec<_> = w.pass().into_iter().filter(|a| matches!(a, Action::Hold { .. })).collect();
    assert!(
        matches!(&holds[..], [Action::Hold { model, policy: DeletionPolicy::Delete }] if model == "m"),
        "{holds:?}"
    );
    let s = &mut w.inventory.get_mut("m").unwrap().0;
    (s.retained, s.on_release) = (false, DeletionPolicy::Delete);
    assert!(!w.pass().iter().any(|a| matches!(a, Action::Hold { .. })), "recorded: no write");
}

#[test]
fn the_node_is_labelled_with_the_models_active_on_it() {
    let mut w = World::new(vec![
        md("a", "ma", "1.0.0", Normal, 1),
        md("b", "mb", "2.0.0", Normal, 2),
        md("c", "mc", "v+build", Normal, 3),
    ]);
    w.inventory.insert("ma".into(), on_disk(&["1.0.0"], Some("1.0.0")));
    w.inventory.insert("mc".into(), on_disk(&["v+build"], Some("v+build")));
    let actions = w.pass();
    let labels = labels_of(&actions).expect("labels applied at first");
    let want = BTreeMap::from([("models.peat.dev/ma".to_string(), "1.0.0".to_string())]);
    assert_eq!(labels, &want, "mb is downloading; mc's version is no label value");
    w.labels = Some(want.clone());
    assert!(labels_of(&w.pass()).is_none(), "unchanged: no write");
    w.inventory.insert("mb".into(), on_disk(&["2.0.0"], Some("2.0.0")));
    assert_eq!(labels_of(&w.pass()).unwrap().len(), 2, "mb active: labelled");
}

#[test]
fn the_label_names_the_active_version_while_an_upgrade_downloads_waits_or_fails() {
    let mut w = World::new(vec![md("a", "ma", "2.0.0", Normal, 1)]);
    w.inventory.insert("ma".into(), on_disk(&["1.0.0"], Some("1.0.0")));
    let want = BTreeMap::from([("models.peat.dev/ma".to_string(), "1.0.0".to_string())]);
    assert_eq!(labels_of(&w.pass()), Some(&want), "downloading 2.0.0: 1.0.0 is still active");
    Arc::make_mut(&mut w.mds[0]).spec.paused = true;
    assert_eq!(labels_of(&w.pass()), Some(&want), "paused");
    Arc::make_mut(&mut w.mds[0]).spec.paused = false;
    w.memory.get_mut(&key("a")).unwrap().failed = Some((BlockerReason::TransferFailed, "bad".into()));
    assert_eq!(labels_of(&w.pass()), Some(&want), "failed");
    w.inventory.insert("ma".into(), on_disk(&["1.0.0", "2.0.0"], Some("2.0.0")));
    assert_eq!(labels_of(&w.pass()).unwrap()["models.peat.dev/ma"], "2.0.0", "switches at activation");
}
