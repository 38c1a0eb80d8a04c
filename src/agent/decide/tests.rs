//! The agent's decision tables, without a process, a cluster or a disk.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::agent::outcome::{Verdict, on_finished};
use crate::agent::store::{FileRecord, VersionRecord};
use crate::agent::transfer::FileLayer;
use crate::agent::transfer::TransferError;
use crate::api::{ModelDeploymentSpec, ModelDeploymentStatus};
use crate::oci::OciError;

const NODE: &str = "n1";

/// The manifest digest the test artifacts of `version` have.
fn manifest_of(version: &str) -> String {
    crate::oci::digest::sha256_digest(version.as_bytes())
}

/// A deployment `ns/<name>` on this node, created `age` seconds after the epoch (older holds).
fn md(name: &str, model: &str, version: &str, priority: Priority, age: i64) -> ModelDeployment {
    let mut md = ModelDeployment::new(
        name,
        ModelDeploymentSpec {
            priority,
            ..crate::plan::fixtures::deployment_spec(
                NODE,
                model,
                version,
                &format!("reg.example/{model}@{}", manifest_of(version)),
            )
        },
    );
    md.metadata.namespace = Some("ns".into());
    md.metadata.creation_timestamp = Some(Time(Timestamp::from_second(age).unwrap()));
    md
}

fn key(name: &str) -> String {
    format!("ns/{name}")
}

fn on_disk(versions: &[&str], current: Option<&str>) -> (ModelState, Option<String>) {
    let versions = versions
        .iter()
        .map(|v| VersionRecord {
            version: v.to_string(),
            digest: manifest_of(v),
            files: vec![FileRecord {
                title: "model.onnx".into(),
                digest: format!("sha256:{}", "b".repeat(64)),
                size: 10,
                archive: None,
            }],
            activated_at: 0,
        })
        .collect();
    (ModelState { versions, ..Default::default() }, current.map(str::to_string))
}

fn plan_with(layers: &[&str]) -> PullPlan {
    PullPlan {
        artifact: "a".into(),
        manifest_digest: "m".into(),
        files: layers
            .iter()
            .map(|d| FileLayer { title: format!("{d}.bin"), digest: d.to_string(), size: 1, archive: None })
            .collect(),
        chunk_indexes: BTreeMap::new(),
        patches: BTreeMap::new(),
    }
}

/// Everything the agent knows, as a test sets it up; `decide` runs a pass over it.
struct World {
    mds: Vec<Arc<ModelDeployment>>,
    running: BTreeMap<String, RunningTransfer>,
    running_layers: HashSet<String>,
    inventory: BTreeMap<String, (ModelState, Option<String>)>,
    max: usize,
    labels: Option<BTreeMap<String, String>>,
    now: Instant,
    memory: Memory,
    serving: HashMap<String, Observation>,
}

impl World {
    fn new(mds: Vec<ModelDeployment>) -> World {
        World {
            mds: mds.into_iter().map(Arc::new).collect(),
            running: BTreeMap::new(),
            running_layers: HashSet::new(),
            inventory: BTreeMap::new(),
            max: 2,
            labels: None,
            now: Instant::now(),
            memory: Memory::new(),
            serving: HashMap::new(),
        }
    }

    fn run(&mut self, name: &str, priority: Priority) {
        let md = self.mds.iter().find(|m| m.metadata.name.as_deref() == Some(name)).expect("a deployment");
        let r = RunningTransfer { artifact: md.spec.artifact.clone(), priority, cancelled: false };
        self.running.insert(key(name), r);
    }

    fn pass(&mut self) -> Vec<Action> {
        let known = Known {
            node: NODE,
            deployments: &self.mds,
            running: &self.running,
            running_layers: &self.running_layers,
            inventory: &self.inventory,
            max_transfers: self.max,
            labels_applied: self.labels.as_ref(),
            serving: &self.serving,
            now: self.now,
            wall: Timestamp::from_second(1_000_000).unwrap(),
        };
        decide(&known, &mut self.memory)
    }
}

fn started(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(md) => md.metadata.name.clone(),
            _ => None,
        })
        .collect()
}

fn stopped(actions: &[Action]) -> Vec<(String, StopReason)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { key, why } => Some((key.clone(), why.clone())),
            _ => None,
        })
        .collect()
}

fn report_of<'a>(actions: &'a [Action], name: &str) -> Option<&'a Report> {
    actions.iter().find_map(|a| match a {
        Action::Report(md, r) if md.metadata.name.as_deref() == Some(name) => Some(r),
        _ => None,
    })
}

fn labels_of(actions: &[Action]) -> Option<&BTreeMap<String, String>> {
    actions.iter().find_map(|a| match a {
        Action::Label(l) => Some(l),
        _ => None,
    })
}

fn garbage_of(actions: &[Action]) -> (HashSet<String>, bool) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::CollectGarbage { keep, partials } => Some((keep.clone(), *partials)),
            _ => None,
        })
        .expect("every pass collects garbage")
}

use Priority::{Critical, High, Low, Normal};

#[test]
fn transfers_start_most_urgent_first_within_the_limit() {
    // (priorities of waiting deployments a, b, c, d; limit) → started, in order
    let cases: &[(&[Priority], usize, &[&str])] = &[
        (&[Normal, Normal, Normal], 2, &["a", "b"]),
        (&[Low, Normal, High], 2, &["c", "b"]),
        (&[Low, Low, Critical, High], 2, &["c", "d"]),
        (&[Normal], 2, &["a"]),
        (&[High, High, High], 1, &["a"]),
        (&[Low, Normal, High, Critical], 4, &["d", "c", "b", "a"]),
    ];
    for (priorities, limit, want) in cases {
        let names = ["a", "b", "c", "d"];
        let mds = priorities.iter().zip(names).map(|(p, n)| md(n, &format!("m-{n}"), "1.0.0", *p, 1)).collect();
        let mut w = World::new(mds);
        w.max = *limit;
        assert_eq!(started(&w.pass()), *want, "priorities {priorities:?}, limit {limit}");
    }
}

#[test]
fn the_ones_that_wait_report_their_place_in_the_queue() {
    let mut w =
        World::new(vec![md("a", "ma", "1", Normal, 1), md("b", "mb", "1", Normal, 2), md("c", "mc", "1", Low, 3)]);
    w.max = 1;
    let actions = w.pass();
    assert_eq!(started(&actions), ["a"]);
    assert_eq!(report_of(&actions, "b").unwrap().message.as_deref(), Some("waiting for a transfer slot (1 ahead)"));
    assert_eq!(report_of(&actions, "c").unwrap().message.as_deref(), Some("waiting for a transfer slot (2 ahead)"));
    assert_eq!(report_of(&actions, "c").unwrap().phase, DeploymentPhase::Downloading);
}

#[test]
fn a_waiting_critical_transfer_preempts_the_least_urgent_running_one() {
    // (running: name → priority; waiting critical ones) → stopped (preempted) transfers
    type Case<'a> = (&'a [(&'a str, Priority)], &'a [&'a str], &'a [&'a str]);
    let cases: &[Case] = &[
        (&[("r1", Normal), ("r2", Low)], &["c1"], &["ns/r2"]),
        (&[("r1", High), ("r2", Normal)], &["c1"], &["ns/r2"]),
        (&[("r1", Normal), ("r2", Low)], &["c1", "c2"], &["ns/r2", "ns/r1"]),
        (&[("r1", Critical), ("r2", Critical)], &["c1"], &[]),
        (&[("r1", Critical), ("r2", Low)], &["c1", "c2"], &["ns/r2"]),
    ];
    for (running, critical, want) in cases {
        let mut mds: Vec<ModelDeployment> = running.iter().map(|(n, p)| md(n, &format!("m-{n}"), "1", *p, 1)).collect();
        mds.extend(critical.iter().map(|n| md(n, &format!("m-{n}"), "1", Critical, 2)));
        let mut w = World::new(mds);
        for (n, p) in running.iter() {
            w.run(n, *p);
        }
        let actions = w.pass();
        let victims: Vec<String> = stopped(&actions).into_iter().map(|(k, _)| k).collect();
        assert_eq!(victims, *want, "running {running:?}, critical {critical:?}");
        assert!(started(&actions).is_empty(), "no slot is free until the victims stop");
        for (_, why) in stopped(&actions) {
            assert!(matches!(why, StopReason::Preempted { .. }));
        }
    }
}

#[test]
fn a_preempted_transfer_is_not_stopped_twice_and_resumes_when_a_slot_frees() {
    let mut w = World::new(vec![md("low", "ml", "1", Low, 1), md("crit", "mc", "1", Critical, 2)]);
    w.max = 1;
    w.run("low", Low);
    assert_eq!(stopped(&w.pass()).len(), 1);
    w.running.get_mut(&key("low")).unwrap().cancelled = true;
    assert!(stopped(&w.pass()).is_empty(), "already stopping");
    // It ended (cancelled): the critical one starts, the low one waits for the next slot.
    w.running.clear();
    let verdict = on_finished(
        &mut w.memory,
        &key("low"),
        &w.mds[0].spec.artifact,
        None,
        Err(TransferError::Cancelled),
        true,
        w.now,
    );
    assert!(matches!(verdict, Verdict::Cancelled));
    assert_eq!(started(&w.pass()), ["crit"]);
    w.run("crit", Critical);
    w.running.remove(&key("crit"));
    w.inventory.insert("mc".into(), on_disk(&["1"], Some("1")));
    assert_eq!(started(&w.pass()), ["low"], "resumes once crit is done");
}

#[test]
fn paused_deployments_start_nothing_stop_what_runs_and_say_so() {
    // (phase in status, running) → reported phase, stopped
    let cases = [
        (Some(DeploymentPhase::Downloading), false, DeploymentPhase::Downloading, false),
        (Some(DeploymentPhase::Loading), false, DeploymentPhase::Downloading, false),
        (None, false, DeploymentPhase::NotDeployed, false),
        (Some(DeploymentPhase::Downloading), true, DeploymentPhase::Downloading, true),
    ];
    for (phase, running, want, stops) in cases {
        let mut m = md("p", "m", "1", Normal, 1);
        m.spec.paused = true;
        m.status = phase.map(|phase| ModelDeploymentStatus { phase, ..Default::default() });
        let mut w = World::new(vec![m]);
        if running {
            w.run("p", Normal);
        }
        let actions = w.pass();
        assert!(started(&actions).is_empty());
        let r = report_of(&actions, "p").unwrap();
        assert_eq!((r.phase, r.message.as_deref()), (want, Some("paused; resumes where it stopped")));
        assert_eq!(stopped(&actions) == [(key("p"), StopReason::NotWanted)], stops, "{phase:?} running={running}");
        let (_, partials) = garbage_of(&actions);
        assert!(!partials, "a paused transfer's partial stays");
    }
}

#[test]
fn the_oldest_deployment_of_a_model_holds_it_a_later_one_is_node_busy() {
    let mut w = World::new(vec![md("young", "m", "2", Critical, 20), md("old", "m", "1", Low, 10)]);
    let actions = w.pass();
    assert_eq!(started(&actions), ["old"], "age, not priority, decides who holds the model");
    let busy = report_of(&actions, "young").unwrap();
    assert_eq!(busy.reason, Some(BlockerReason::NodeBusy));
    assert_eq!(busy.phase, DeploymentPhase::NotDeployed, "a blocker, not a failure");
    assert!(busy.message.as_deref().unwrap().contains("ns/old already holds model m"));
    // Another model is not affected.
    let mut w = World::new(vec![md("x", "m1", "1", Normal, 20), md("y", "m2", "1", Normal, 10)]);
    assert_eq!(started(&w.pass()).len(), 2);
}

#[test]
fn a_version_kept_on_disk_is_switched_to_without_a_transfer() {
    // (versions on disk, current, desired) → action
    let cases: &[(&[&str], Option<&str>, &str, &str)] = &[
        (&["1", "2"], Some("2"), "1", "switch"),
        (&["1", "2"], Some("1"), "1", "active"),
        (&["1"], Some("1"), "2", "transfer"),
        (&["2"], None, "2", "switch"),
    ];
    for (versions, current, desired, want) in cases {
        let mut w = World::new(vec![md("d", "m", desired, Normal, 1)]);
        w.inventory.insert("m".into(), on_disk(versions, *current));
        let actions = w.pass();
        let got = if actions.iter().any(|a| matches!(a, Action::SwitchToKept(_))) {
            "switch"
        } else if !started(&actions).is_empty() {
            "transfer"
        } else if report_of(&actions, "d").is_some_and(|r| r.phase == DeploymentPhase::Operational) {
            "active"
        } else {
            "nothing"
        };
        assert_eq!(got, *want, "on disk {versions:?} current {current:?} desired {desired}");
    }
}

#[test]
fn a_kept_version_with_other_bytes_is_not_switched_to() {
    let mut w = World::new(vec![md("d", "m", "1", Normal, 1)]);
    let (mut state, current) = on_disk(&["1"], None);
    state.versions[0].digest = manifest_of("something else");
    w.inventory.insert("m".into(), (state, current));
    assert_eq!(started(&w.pass()), ["d"], "same version name, other manifest: transferred");
}

#[test]
fn deployments_that_cannot_be_acted_on_fail_for_good_until_they_change() {
    // (model, version, artifact) → reason
    let cases = [
        ("../etc", "1", None, BlockerReason::DeploymentFailed),
        ("m", "current", None, BlockerReason::DeploymentFailed),
        ("m", "1/2", None, BlockerReason::DeploymentFailed),
        ("m", "1", Some("reg.example/m:1"), BlockerReason::TransferFailed),
    ];
    for (model, version, artifact, reason) in cases {
        let mut m = md("d", model, version, Normal, 1);
        if let Some(a) = artifact {
            m.spec.artifact = a.into();
        }
        let mut w = World::new(vec![m]);
        let actions = w.pass();
        assert!(started(&actions).is_empty(), "{model} {version}");
        let r = report_of(&actions, "d").unwrap();
        assert_eq!((r.phase, r.reason), (DeploymentPhase::Failed, Some(reason)), "{model} {version}");
        assert!(w.memory[&key("d")].failed.is_some());
    }
}

#[test]
fn a_failure_for_good_is_reported_until_a_new_artifact_clears_it() {
    let mut w = World::new(vec![md("d", "m", "1", Normal, 1)]);
    w.pass();
    let artifact = w.mds[0].spec.artifact.clone();
    let bad = TransferError::DigestMismatch { title: "t".into(), expected: "a".into(), actual: "b".into() };
    assert!(matches!(
        on_finished(&mut w.memory, &key("d"), &artifact, None, Err(bad), true, w.now),
        Verdict::Failed { .. }
    ));
    let actions = w.pass();
    assert!(started(&actions).is_empty());
    assert_eq!(report_of(&actions, "d").unwrap().phase, DeploymentPhase::Failed);
    // A new version (new artifact) starts afresh.
    w.mds = vec![Arc::new(md("d", "m", "2", Normal, 1))];
    assert_eq!(started(&w.pass()), ["d"]);
}

#[test]
fn a_deployment_waits_for_its_retry_then_starts_again() {
    let mut w = World::new(vec![md("d", "m", "1", Normal, 1)]);
    w.pass();
    let artifact = w.mds[0].spec.artifact.clone();
    let e = TransferError::Registry(OciError::Unreachable { reference: "r".into(), message: "m".into() });
    on_finished(&mut w.memory, &key("d"), &artifact, Some(plan_with(&["x"])), Err(e), true, w.now);
    assert!(started(&w.pass()).is_empty(), "not before its time");
    assert!(report_of(&w.pass(), "d").is_none(), "the failure's report stands meanwhile");
    w.now += Duration::from_secs(3);
    assert_eq!(started(&w.pass()), ["d"]);
}

#[test]
fn transfers_no_longer_wanted_are_stopped() {
    // (what happened to the running deployment) → stopped?
    let cases = ["deleted", "new artifact", "other node", "deleting", "unchanged"];
    for case in cases {
        let mut w = World::new(vec![md("d", "m", "1", Normal, 1)]);
        w.run("d", Normal);
        w.pass();
        match case {
            "deleted" => w.mds.clear(),
            "new artifact" => w.mds = vec![Arc::new(md("d", "m", "2", Normal, 1))],
            "other node" => {
                let mut m = md("d", "m", "1", Normal, 1);
                m.spec.node_name = "n2".into();
                w.mds = vec![Arc::new(m)];
            }
            "deleting" => {
                let mut m = md("d", "m", "1", Normal, 1);
                m.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
                w.mds = vec![Arc::new(m)];
            }
            _ => {}
        }
        let stops = stopped(&w.pass());
        assert_eq!(stops.len(), usize::from(case != "unchanged"), "{case}");
    }
}

#[test]
fn garbage_collection_keeps_every_known_plan_and_running_layer() {
    // (plans known for d1/d2, running layers, d2 still needs bytes) → keep set, partials may go
    type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], bool, &'a [&'a str], bool);
    let cases: &[Case] = &[
        (&["a"], &["b"], &[], false, &["a", "b"], true),
        (&["a"], &[], &["r"], false, &["a", "r"], true),
        (&["a"], &[], &[], true, &["a"], false),
        (&["a"], &["b"], &["r"], true, &["a", "b", "r"], true),
    ];
    for (d1, d2, running, d2_unsettled, keep, partials) in cases {
        let mut w = World::new(vec![md("d1", "m1", "1", Normal, 1), md("d2", "m2", "1", Normal, 2)]);
        w.inventory.insert("m1".into(), on_disk(&["1"], Some("1")));
        if !d2_unsettled {
            w.inventory.insert("m2".into(), on_disk(&["1"], Some("1")));
        }
        w.pass();
        for (name, layers) in [("d1", d1), ("d2", d2)] {
            if !layers.is_empty() {
                w.memory.get_mut(&key(name)).unwrap().plan = Some(plan_with(layers));
            }
        }
        w.running_layers = running.iter().map(|s| s.to_string()).collect();
        let (got, may) = garbage_of(&w.pass());
        let want: HashSet<String> = keep.iter().map(|s| s.to_string()).collect();
        assert_eq!((got, may), (want, *partials), "{d1:?} {d2:?} {running:?} unsettled={d2_unsettled}");
    }
}

mod holding;
mod outcomes;
