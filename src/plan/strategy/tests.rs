use super::*;
use crate::api::Priority;
use crate::api::{ModelDeploymentStatus, ModelNodeStatus};
use crate::plan::fixtures::{claim, owned, rollout, status};
use crate::plan::rivals::{Claim, winning_claim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const GI: u64 = 1 << 30;

fn variants() -> Vec<VariantInfo> {
    vec![
        VariantInfo {
            name: "fp16-cuda".into(),
            digest: "sha256:cuda2".into(),
            providers: vec!["cuda".into()],
            min_gpu_memory: 4 * GI,
            size: 900,
            ..Default::default()
        },
        VariantInfo {
            name: "int8-cpu".into(),
            digest: "sha256:cpu2".into(),
            providers: vec!["cpu".into()],
            size: 300,
            ..Default::default()
        },
    ]
}

fn target() -> EffectiveTarget {
    EffectiveTarget { version: "2.0.0".into(), digest: "sha256:idx2".into(), variants: variants(), rolling_back: false }
}

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn facts(name: &str, gpu: u64, heartbeat_age_s: i64) -> NodeFacts<'static> {
    NodeFacts {
        name: name.to_string().into(),
        labels: Default::default(),
        capabilities: Some(std::borrow::Cow::Owned(ModelNodeStatus {
            arch: Some("arm64".into()),
            gpu_memory_bytes: gpu as i64,
            providers: if gpu > 0 { vec!["cpu".into(), "cuda".into()] } else { vec!["cpu".into()] },
            storage_free_bytes: (10 * GI) as i64,
            last_heartbeat: Some(Time(Timestamp::from_second(1_800_000_000 - heartbeat_age_s).unwrap())),
            ..Default::default()
        })),
    }
}

fn fleet(n: usize) -> BTreeMap<std::borrow::Cow<'static, str>, NodeFacts<'static>> {
    (0..n)
        .map(|i| format!("n{i}"))
        .map(|n| (n.clone().into(), facts(&n, if n == "n0" { 8 * GI } else { 0 }, 5)))
        .collect()
}

struct Case {
    rollout: ModelRollout,
    target: EffectiveTarget,
    nodes: BTreeMap<std::borrow::Cow<'static, str>, NodeFacts<'static>>,
    deployments: Vec<ModelDeployment>,
    contested: BTreeMap<String, Vec<Claim>>,
    aborted: bool,
}

impl Case {
    fn new(n: usize, max_parallel: Option<IntOrString>) -> Self {
        Case {
            rollout: rollout(max_parallel),
            target: target(),
            nodes: fleet(n),
            deployments: vec![],
            contested: BTreeMap::new(),
            aborted: false,
        }
    }
    fn plan(&self) -> Plan {
        let targets: Vec<String> = self.nodes.keys().map(|k| k.to_string()).collect();
        let deployments: Vec<std::sync::Arc<ModelDeployment>> =
            self.deployments.iter().cloned().map(std::sync::Arc::new).collect();
        plan_deployments(&PlanInput {
            rollout: &self.rollout,
            target: &self.target,
            targets: &targets,
            nodes: &self.nodes,
            deployments: &deployments,
            contested: &self.contested,
            aborted: self.aborted,
            now: now(),
            heartbeat_timeout: Duration::from_secs(90),
        })
    }
}

fn nodes_of(plan: &Plan, version: &str) -> Vec<String> {
    plan.apply.iter().filter(|s| s.version == version).map(|s| s.node_name.clone()).collect()
}

#[test]
fn fresh_rollout_starts_max_parallel_targets_with_their_variants() {
    let plan = Case::new(5, Some(IntOrString::String("40%".into()))).plan();
    assert_eq!(plan.max_parallel, 2);
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0", "n1"]);
    assert_eq!(plan.apply[0].variant, "fp16-cuda");
    assert_eq!(plan.apply[0].artifact, "reg:5000/models/vision@sha256:cuda2");
    assert_eq!(plan.apply[1].variant, "int8-cpu");
    assert_eq!(plan.in_flight, 2);
    assert_eq!(plan.targets.len(), 5);
    assert!(plan.targets.iter().all(|t| t.planned_blocker.is_none()));
}

#[test]
fn in_flight_targets_hold_their_slots_and_converged_or_failed_ones_free_them() {
    let mut c = Case::new(5, Some(IntOrString::Int(2)));
    c.deployments = vec![
        owned("uid-vision", "n0", "2.0.0", "sha256:cuda2", status(DeploymentPhase::Operational, Some("2.0.0"))),
        owned("uid-vision", "n1", "2.0.0", "sha256:cpu2", status(DeploymentPhase::Downloading, None)),
        owned("uid-vision", "n2", "2.0.0", "sha256:cpu2", status(DeploymentPhase::Failed, None)),
    ];
    let plan = c.plan();
    // n1 downloads (1 slot); n0 converged and n2 failed hold none: one more starts, n3.
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0", "n1", "n2", "n3"]);
    assert_eq!(plan.in_flight, 2);
    // A deployment not yet picked up by its agent holds a slot too.
    c.deployments.push(owned("uid-vision", "n3", "2.0.0", "sha256:cpu2", None));
    assert_eq!(nodes_of(&c.plan(), "2.0.0"), ["n0", "n1", "n2", "n3"]);
}

#[test]
fn an_upgrade_advances_nodes_a_slot_at_a_time_and_keeps_the_rest_on_the_old_version() {
    let mut c = Case::new(3, Some(IntOrString::Int(1)));
    c.deployments = (0..3)
        .map(|i| {
            owned(
                "uid-vision",
                &format!("n{i}"),
                "1.0.0",
                "sha256:cpu1",
                status(DeploymentPhase::Operational, Some("1.0.0")),
            )
        })
        .collect();
    let plan = c.plan();
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0"]);
    assert_eq!(nodes_of(&plan, "1.0.0"), ["n1", "n2"]);
}

#[test]
fn nodes_holding_the_target_locally_go_first() {
    let mut c = Case::new(3, Some(IntOrString::Int(1)));
    let mut kept = ModelDeploymentStatus {
        phase: DeploymentPhase::Operational,
        active_version: Some("3.0.0".into()),
        ..Default::default()
    };
    kept.previous_versions = vec!["2.0.0".into()];
    c.deployments = vec![
        owned("uid-vision", "n0", "3.0.0", "sha256:cuda3", status(DeploymentPhase::Operational, Some("3.0.0"))),
        owned("uid-vision", "n2", "3.0.0", "sha256:cpu3", Some(kept)),
    ];
    assert_eq!(nodes_of(&c.plan(), "2.0.0"), ["n2"]);
}

#[test]
fn a_deployment_on_the_target_keeps_its_variant_even_when_the_disk_is_now_full() {
    let mut c = Case::new(1, None);
    c.nodes.get_mut("n0").unwrap().capabilities.as_mut().unwrap().to_mut().storage_free_bytes = 0;
    c.deployments =
        vec![owned("uid-vision", "n0", "2.0.0", "sha256:cuda2", status(DeploymentPhase::Operational, Some("2.0.0")))];
    let plan = c.plan();
    assert_eq!(plan.apply.len(), 1);
    assert!(plan.targets[0].planned_blocker.is_none());
}

#[test]
fn capability_blockers_are_decided_without_a_deployment() {
    let mut c = Case::new(2, None);
    c.target.variants.retain(|v| v.name == "fp16-cuda");
    let plan = c.plan();
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0"]);
    let b = plan.targets[1].planned_blocker.as_ref().unwrap();
    assert_eq!(b.reason, BlockerReason::IncompatibleCapabilities);
    assert!(plan.waits_for_a_variant(), "a cpu variant pushed later would serve n1");
    assert!(!Case::new(2, None).plan().waits_for_a_variant(), "every target has a variant");
}

#[test]
fn paused_starts_nothing_and_pauses_what_exists() {
    let mut c = Case::new(3, None);
    c.rollout.spec.paused = true;
    c.deployments =
        vec![owned("uid-vision", "n0", "2.0.0", "sha256:cuda2", status(DeploymentPhase::Downloading, None))];
    let plan = c.plan();
    assert_eq!(plan.apply.len(), 1);
    assert!(plan.apply[0].paused);
}

#[test]
fn aborted_starts_nothing_new_unless_rolling_back() {
    let mut c = Case::new(3, None);
    c.aborted = true;
    c.deployments =
        vec![owned("uid-vision", "n0", "1.0.0", "sha256:cpu1", status(DeploymentPhase::Operational, Some("1.0.0")))];
    let plan = c.plan();
    assert_eq!(nodes_of(&plan, "2.0.0"), Vec::<String>::new());
    assert_eq!(nodes_of(&plan, "1.0.0"), ["n0"]);
    c.target.rolling_back = true;
    assert_eq!(nodes_of(&c.plan(), "2.0.0"), ["n0", "n1", "n2"]);
}

#[test]
fn stale_heartbeat_is_a_network_partition_and_starts_nothing_there() {
    let mut c = Case::new(2, None);
    c.nodes.insert("n1".into(), facts("n1", 0, 600));
    let plan = c.plan();
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0"]);
    assert_eq!(plan.targets[1].planned_blocker.as_ref().unwrap().reason, BlockerReason::NetworkPartition);
    // The fresh node's heartbeat expires in 90 - 5 (+1) seconds: look again then.
    assert_eq!(plan.recheck_after, Some(Duration::from_secs(86)));
}

#[test]
fn a_node_that_goes_silent_mid_transfer_gives_its_slot_to_the_next() {
    let mut c = Case::new(3, Some(IntOrString::Int(1)));
    c.deployments = vec![owned("uid-vision", "n1", "2.0.0", "sha256:cpu2", status(DeploymentPhase::Downloading, None))];
    assert_eq!(nodes_of(&c.plan(), "2.0.0"), ["n1"], "n1 holds the one slot");
    c.nodes.insert("n1".into(), facts("n1", 0, 600));
    let plan = c.plan();
    assert_eq!(plan.targets[1].planned_blocker.as_ref().unwrap().reason, BlockerReason::NetworkPartition);
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0", "n1"], "n0 takes the slot; n1 keeps its deployment to resume");
    assert_eq!(plan.in_flight, 1);
}

#[test]
fn named_node_without_an_agent_is_blocked_unknown() {
    let mut c = Case::new(1, None);
    c.nodes.insert("ghost".into(), NodeFacts { name: "ghost".into(), ..Default::default() });
    let plan = c.plan();
    let ghost = plan.targets.iter().find(|t| t.node == "ghost").unwrap();
    assert_eq!(ghost.planned_blocker.as_ref().unwrap().reason, BlockerReason::Unknown);
}

#[test]
fn nodes_that_left_the_scope_lose_their_deployment() {
    let mut c = Case::new(1, None);
    c.deployments = vec![owned("uid-vision", "gone", "2.0.0", "sha256:cpu2", None)];
    assert_eq!(c.plan().delete, ["vision.gone"]);
}

#[test]
fn contested_nodes_go_to_the_higher_priority_then_the_older_rollout() {
    let a = claim("ml/vision", "uid-vision", Priority::Normal, 100);
    let older = claim("other/vision", "uid-other", Priority::Normal, 50);
    let urgent = claim("hotfix/vision", "uid-hot", Priority::Critical, 200);
    assert_eq!(winning_claim([&a, &older]).unwrap().key, "other/vision");
    assert_eq!(winning_claim([&a, &older, &urgent]).unwrap().key, "hotfix/vision");

    let mut c = Case::new(2, None);
    c.contested.insert("n1".into(), vec![a.clone(), older.clone()]);
    let plan = c.plan();
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0"]);
    assert_eq!(plan.targets[1].planned_blocker.as_ref().unwrap().reason, BlockerReason::NodeBusy);
    assert_eq!(plan.conflicts, [("n1".to_string(), "other/vision".to_string())]);
}

#[test]
fn a_held_node_stays_with_its_holder_whatever_the_rivals_priority() {
    let mut c = Case::new(2, None);
    let mine = claim("ml/vision", "uid-vision", Priority::Normal, 100);
    let urgent = claim("hotfix/vision", "uid-hot", Priority::Critical, 200);
    c.contested.insert("n0".into(), vec![mine.clone(), urgent]);
    c.deployments = vec![
        owned("uid-vision", "n0", "2.0.0", "sha256:cuda2", status(DeploymentPhase::Operational, Some("2.0.0"))),
        owned("uid-other", "n1", "1.0.0", "sha256:cpu1", None),
    ];
    let plan = c.plan();
    assert!(plan.delete.is_empty(), "n0 is ours and stays ours");
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n0"]);
    assert_eq!(
        plan.targets[1].planned_blocker.as_ref().unwrap().reason,
        BlockerReason::NodeBusy,
        "n1 is held by another"
    );
}

#[test]
fn transfers_of_an_older_version_hold_slots_too() {
    let mut c = Case::new(3, Some(IntOrString::Int(1)));
    c.deployments = vec![
        owned("uid-vision", "n0", "1.0.0", "sha256:cpu1", status(DeploymentPhase::Operational, Some("1.0.0"))),
        owned("uid-vision", "n1", "1.5.0", "sha256:cpu15", status(DeploymentPhase::Downloading, Some("1.0.0"))),
    ];
    let plan = c.plan();
    assert_eq!(nodes_of(&plan, "2.0.0"), ["n1"], "n1 switches to 2.0.0 within the slot it holds; nothing else starts");
    assert_eq!(plan.in_flight, 1);
}

#[test]
fn scaled_values() {
    assert_eq!(scaled(&IntOrString::String("25%".into()), 10), 3);
    assert_eq!(scaled(&IntOrString::String("1%".into()), 10), 1);
    assert_eq!(scaled(&IntOrString::String("100%".into()), 1000), 1000);
    assert_eq!(scaled(&IntOrString::Int(7), 3), 7);
    assert_eq!(scaled(&IntOrString::String("50%".into()), 0), 1);
}
