//! plan: which ModelDeployments should exist with which spec, given the targets, their variants,
//! the strategy (maxParallel, pause, failure threshold, auto-rollback) and competing rollouts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    BlockerReason, DeploymentPhase, ModelDeployment, ModelDeploymentSpec, ModelRollout, ModelRolloutSpec, Priority,
};

use super::convergence::{PlannedBlocker, TargetState, TargetView, classify};
use super::scope::NodeFacts;
use super::variant::{VariantInfo, select_variant};

/// The version a rollout converges to right now, and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveTarget {
    /// The version.
    pub version: String,
    /// Digest of its index (pinned).
    pub digest: String,
    /// Its variants.
    pub variants: Vec<VariantInfo>,
    /// True when this is the last good version of an aborted rollout.
    pub rolling_back: bool,
}

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

/// Resolves an int-or-percent against a total: percentages round up; the result is at least 1.
pub fn scaled(value: &IntOrString, total: usize) -> usize {
    let n = match value {
        IntOrString::Int(i) => (*i).max(0) as usize,
        IntOrString::String(s) => {
            let pct: usize = s.trim_end_matches('%').trim().parse().unwrap_or(100);
            (total * pct).div_ceil(100)
        }
    };
    n.max(1)
}

/// Everything planning reads, already fetched.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    /// The rollout.
    pub rollout: &'a ModelRollout,
    /// What it converges to now.
    pub target: &'a EffectiveTarget,
    /// Target nodes (from the scope), sorted.
    pub targets: &'a [String],
    /// Facts of every known node, by name.
    pub nodes: &'a BTreeMap<String, NodeFacts>,
    /// ModelDeployments of this model, cluster-wide.
    pub deployments: &'a [ModelDeployment],
    /// For each target node another rollout also wants: the competing claims (this one included).
    pub contested: &'a BTreeMap<String, Vec<Claim>>,
    /// Whether the rollout aborted (failure threshold crossed for `spec.version`).
    pub aborted: bool,
    /// Now.
    pub now: Timestamp,
    /// A heartbeat older than this marks a node `NetworkPartition`.
    pub heartbeat_timeout: Duration,
}

/// What the rollout's ModelDeployments should be.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// ModelDeployments to exist with exactly this spec (created, or updated when they differ).
    pub apply: Vec<ModelDeploymentSpec>,
    /// Names of this rollout's ModelDeployments to delete (node left the scope, or lost to another rollout).
    pub delete: Vec<String>,
    /// The targets as the status step sees them.
    pub targets: Vec<TargetView>,
    /// Nodes held by other rollouts: (node, `namespace/name` of the holder).
    pub conflicts: Vec<(String, String)>,
    /// Targets transferring (started, neither converged nor failed) after this plan.
    pub in_flight: usize,
    /// The maxParallel limit in force.
    pub max_parallel: usize,
    /// When to look again even if nothing changes: the earliest heartbeat expiry.
    pub recheck_after: Option<Duration>,
}

impl Plan {
    /// Whether a target is blocked only because no variant of the index fits it (a variant pushed
    /// to the version later could): incompatible, short of GPU memory, or of storage.
    pub fn waits_for_a_variant(&self) -> bool {
        self.targets.iter().filter_map(|t| t.planned_blocker.as_ref()).any(|b| {
            matches!(
                b.reason,
                BlockerReason::IncompatibleCapabilities
                    | BlockerReason::InsufficientGpuMemory
                    | BlockerReason::InsufficientStorage
            )
        })
    }
}

/// The uid of the ModelRollout that controls a ModelDeployment.
pub fn controller_uid(md: &ModelDeployment) -> Option<&str> {
    md.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "ModelRollout")
        .map(|o| o.uid.as_str())
}

fn owner_key(md: &ModelDeployment) -> String {
    let owner = md
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "ModelRollout")
        .map(|o| o.name.clone());
    match owner {
        Some(name) => format!("{}/{name}", md.metadata.namespace.clone().unwrap_or_default()),
        None => format!(
            "{}/{} (no owning rollout)",
            md.metadata.namespace.clone().unwrap_or_default(),
            md.metadata.name.clone().unwrap_or_default()
        ),
    }
}

/// The spec a rollout gives a ModelDeployment for `variant` of the effective target on `node`.
pub fn deployment_spec(
    spec: &ModelRolloutSpec,
    target: &EffectiveTarget,
    variant: &VariantInfo,
    node: &str,
) -> ModelDeploymentSpec {
    ModelDeploymentSpec {
        node_name: node.to_string(),
        model: spec.model.clone(),
        version: target.version.clone(),
        variant: variant.name.clone(),
        artifact: format!("{}@{}", spec.source.repository, variant.digest),
        insecure: spec.source.insecure,
        pull_secret: spec.source.pull_secret.clone(),
        priority: spec.priority,
        delta: spec.delta.as_ref().is_none_or(|d| d.enabled),
        max_size_bytes: spec.variant.as_ref().and_then(|v| v.max_size_bytes),
        paused: spec.paused,
    }
}

/// Refreshes the policy fields of a kept ModelDeployment (what it asks for stays).
fn refreshed(existing: &ModelDeploymentSpec, spec: &ModelRolloutSpec) -> ModelDeploymentSpec {
    ModelDeploymentSpec {
        insecure: spec.source.insecure,
        pull_secret: spec.source.pull_secret.clone(),
        priority: spec.priority,
        delta: spec.delta.as_ref().is_none_or(|d| d.enabled),
        max_size_bytes: spec.variant.as_ref().and_then(|v| v.max_size_bytes),
        paused: spec.paused,
        ..existing.clone()
    }
}

fn heartbeat_age(facts: &NodeFacts, now: Timestamp) -> Option<Duration> {
    let hb = facts.capabilities.as_ref()?.last_heartbeat.as_ref()?;
    let ms = now.as_millisecond() - hb.0.as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// Plans the rollout's ModelDeployments.
///
/// Per target: a node another rollout holds or wins is `NodeBusy`; a node without an agent is
/// `Unknown`; a silent one `NetworkPartition` (nothing new starts there); a deployment already on the
/// target keeps its variant (a node whose disk filled with the model must not be re-planned as
/// `InsufficientStorage`); otherwise a variant is selected or a capability blocker recorded, and
/// the node waits for a slot. Slots: at most maxParallel targets transfer at once; a failed target
/// frees its slot. Nothing new starts while paused or aborted (but an aborted rollout with
/// autoRollback plans its rollback target like any other). Nodes that already hold the target
/// locally go first: switching them moves no bytes.
pub fn plan_deployments(input: &PlanInput<'_>) -> Plan {
    let rollout = input.rollout;
    let spec = &rollout.spec;
    let my_uid = rollout.metadata.uid.as_deref().unwrap_or_default();
    let target = input.target;
    let mut plan = Plan::default();

    let mine: BTreeMap<&str, &ModelDeployment> = input
        .deployments
        .iter()
        .filter(|md| md.spec.model == spec.model && controller_uid(md) == Some(my_uid))
        .map(|md| (md.spec.node_name.as_str(), md))
        .collect();
    let foreign: BTreeMap<&str, &ModelDeployment> = input
        .deployments
        .iter()
        .filter(|md| md.spec.model == spec.model && controller_uid(md) != Some(my_uid))
        .map(|md| (md.spec.node_name.as_str(), md))
        .collect();
    let target_set: BTreeSet<&str> = input.targets.iter().map(String::as_str).collect();

    for (node, md) in &mine {
        if !target_set.contains(node) {
            plan.delete.push(md.metadata.name.clone().unwrap_or_default());
        }
    }

    plan.max_parallel = match spec.strategy.as_ref().and_then(|s| s.max_parallel.as_ref()) {
        Some(v) => scaled(v, input.targets.len()),
        None => input.targets.len().max(1),
    };
    let may_start = !spec.paused && (!input.aborted || target.rolling_back);

    // Nodes waiting for a slot, with the spec they would get.
    let mut waiting: Vec<(bool, String, ModelDeploymentSpec, u64)> = Vec::new();
    let mut views: BTreeMap<String, TargetView> = BTreeMap::new();

    for node in input.targets {
        let mut view = TargetView { node: node.clone(), planned_blocker: None, expected_bytes: 0 };
        let existing = mine.get(node.as_str()).copied();

        // A node held by one rollout stays with it (never taken away mid-transfer); a free node
        // another rollout of this model also wants goes to the winning claim.
        let winner = input.contested.get(node).and_then(winning_claim);
        let free = existing.is_none() && !foreign.contains_key(node.as_str());
        if let Some(w) = winner.filter(|w| w.uid != my_uid && free) {
            view.planned_blocker = Some(PlannedBlocker {
                reason: BlockerReason::NodeBusy,
                message: format!(
                    "rollout {} ({:?} priority) has this node for model {}",
                    w.key, w.priority, spec.model
                ),
            });
            plan.conflicts.push((node.clone(), w.key.clone()));
            views.insert(node.clone(), view);
            continue;
        }
        if let Some(other) = foreign.get(node.as_str()) {
            let holder = owner_key(other);
            view.planned_blocker = Some(PlannedBlocker {
                reason: BlockerReason::NodeBusy,
                message: format!(
                    "ModelDeployment of {holder} holds model {} on this node; waiting for it to be released",
                    spec.model
                ),
            });
            plan.conflicts.push((node.clone(), holder));
            views.insert(node.clone(), view);
            continue;
        }

        let facts = input.nodes.get(node);
        let Some(caps) = facts.and_then(|f| f.capabilities.as_ref()) else {
            view.planned_blocker = Some(PlannedBlocker {
                reason: BlockerReason::Unknown,
                message: "no ModelNode: no peat agent has reported from this node".into(),
            });
            if let Some(md) = existing {
                plan.apply.push(refreshed(&md.spec, spec));
            }
            views.insert(node.clone(), view);
            continue;
        };
        let stale = match facts.and_then(|f| heartbeat_age(f, input.now)) {
            Some(age) if age > input.heartbeat_timeout => Some(age),
            Some(age) => {
                let left = input.heartbeat_timeout - age + Duration::from_secs(1);
                plan.recheck_after = Some(plan.recheck_after.map_or(left, |r| r.min(left)));
                None
            }
            None => None, // never sent a heartbeat field: judged by its presence alone
        };
        if stale.is_some() {
            // No age in the message: it would change the status on every reconcile.
            let last = caps.last_heartbeat.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            view.planned_blocker = Some(PlannedBlocker {
                reason: BlockerReason::NetworkPartition,
                message: format!(
                    "no heartbeat from the node's agent since {last} (limit {}s)",
                    input.heartbeat_timeout.as_secs()
                ),
            });
        }

        // Already on the target: keep its variant.
        if let Some(md) = existing.filter(|md| md.spec.version == target.version)
            && let Some(v) = target.variants.iter().find(|v| md.spec.artifact.ends_with(&format!("@{}", v.digest)))
        {
            view.expected_bytes = v.size;
            plan.apply.push(refreshed(&md.spec, spec));
            if matches!(classify(&target.version, Some(md)), TargetState::InProgress | TargetState::Pending) {
                plan.in_flight += 1;
            }
            views.insert(node.clone(), view);
            continue;
        }

        // Still transferring another version (an upgrade or rollback overtook it): it holds a slot,
        // and may switch to the target within it.
        let transferring_other = existing
            .and_then(|md| md.status.as_ref())
            .is_some_and(|s| matches!(s.phase, DeploymentPhase::Downloading | DeploymentPhase::Loading));
        if transferring_other {
            plan.in_flight += 1;
        }
        match select_variant(spec.variant.as_ref(), &target.variants, caps) {
            Err(b) => {
                view.planned_blocker.get_or_insert(PlannedBlocker { reason: b.reason, message: b.message });
                if let Some(md) = existing {
                    plan.apply.push(refreshed(&md.spec, spec));
                }
            }
            Ok(v) => {
                view.expected_bytes = v.size;
                let desired = deployment_spec(spec, target, v, node);
                if stale.is_some() || !may_start {
                    if let Some(md) = existing {
                        plan.apply.push(refreshed(&md.spec, spec));
                    }
                } else if transferring_other {
                    plan.apply.push(desired);
                } else {
                    let held_locally = existing.and_then(|md| md.status.as_ref()).is_some_and(|s| {
                        s.active_version.as_deref() == Some(&target.version)
                            || s.previous_versions.contains(&target.version)
                    });
                    waiting.push((held_locally, node.clone(), desired, v.size));
                    if let Some(md) = existing {
                        // Until it gets a slot, the node keeps what it has.
                        plan.apply.push(refreshed(&md.spec, spec));
                    }
                }
            }
        }
        views.insert(node.clone(), view);
    }

    // Fill free slots: nodes that hold the target locally first (instant), then by name.
    waiting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let free = plan.max_parallel.saturating_sub(plan.in_flight);
    for (_, node, desired, _) in waiting.into_iter().take(free) {
        plan.apply.retain(|s| s.node_name != node);
        plan.apply.push(desired);
        plan.in_flight += 1;
    }
    plan.apply.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    plan.delete.sort();
    plan.delete.dedup();
    plan.targets = input.targets.iter().filter_map(|n| views.remove(n)).collect();
    plan
}

/// Failed targets of `version` among this rollout's deployments.
pub fn failed_on(version: &str, rollout_uid: &str, deployments: &[ModelDeployment]) -> usize {
    deployments
        .iter()
        .filter(|md| controller_uid(md) == Some(rollout_uid) && md.spec.version == version)
        .filter(|md| md.status.as_ref().is_some_and(|s| s.phase == DeploymentPhase::Failed))
        .count()
}

/// Whether failures crossed `strategy.failureThreshold`: more failed targets than the threshold allows.
pub fn threshold_crossed(spec: &ModelRolloutSpec, failed: usize, total: usize) -> bool {
    match spec.strategy.as_ref().and_then(|s| s.failure_threshold.as_ref()) {
        Some(t) => failed > scaled(t, total),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AllNodes, ModelDeploymentStatus, ModelNodeStatus, ModelSource, ScopeSpec, StrategySpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    const GI: u64 = 1 << 30;

    fn rollout(max_parallel: Option<IntOrString>) -> ModelRollout {
        let mut r = ModelRollout::new(
            "vision",
            ModelRolloutSpec {
                model: "vision".into(),
                version: "2.0.0".into(),
                source: ModelSource { repository: "reg:5000/models/vision".into(), pull_secret: None, insecure: true },
                variant: None,
                scope: ScopeSpec { all: Some(AllNodes {}), ..Default::default() },
                priority: Priority::Normal,
                strategy: Some(StrategySpec { max_parallel, failure_threshold: None, auto_rollback: false }),
                delta: None,
                paused: false,
            },
        );
        r.metadata.namespace = Some("ml".into());
        r.metadata.uid = Some("uid-vision".into());
        r
    }

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
        EffectiveTarget {
            version: "2.0.0".into(),
            digest: "sha256:idx2".into(),
            variants: variants(),
            rolling_back: false,
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn facts(name: &str, gpu: u64, heartbeat_age_s: i64) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: Default::default(),
            capabilities: Some(ModelNodeStatus {
                arch: Some("arm64".into()),
                gpu_memory_bytes: gpu as i64,
                providers: if gpu > 0 { vec!["cpu".into(), "cuda".into()] } else { vec!["cpu".into()] },
                storage_free_bytes: (10 * GI) as i64,
                last_heartbeat: Some(Time(Timestamp::from_second(1_800_000_000 - heartbeat_age_s).unwrap())),
                ..Default::default()
            }),
        }
    }

    fn fleet(n: usize) -> BTreeMap<String, NodeFacts> {
        (0..n).map(|i| format!("n{i}")).map(|n| (n.clone(), facts(&n, if n == "n0" { 8 * GI } else { 0 }, 5))).collect()
    }

    fn owned(
        uid: &str,
        node: &str,
        version: &str,
        variant_digest: &str,
        status: Option<ModelDeploymentStatus>,
    ) -> ModelDeployment {
        let mut md = ModelDeployment::new(
            &ModelDeployment::name_for("vision", node),
            ModelDeploymentSpec {
                node_name: node.into(),
                model: "vision".into(),
                version: version.into(),
                variant: "int8-cpu".into(),
                artifact: format!("reg:5000/models/vision@{variant_digest}"),
                insecure: true,
                pull_secret: None,
                priority: Priority::Normal,
                delta: true,
                max_size_bytes: None,
                paused: false,
            },
        );
        md.metadata.namespace = Some("ml".into());
        md.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "peat.dev/v1alpha1".into(),
            kind: "ModelRollout".into(),
            name: if uid == "uid-vision" { "vision".into() } else { "other".into() },
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        md.status = status;
        md
    }

    fn status(phase: DeploymentPhase, active: Option<&str>) -> Option<ModelDeploymentStatus> {
        Some(ModelDeploymentStatus { phase, active_version: active.map(Into::into), ..Default::default() })
    }

    struct Case {
        rollout: ModelRollout,
        target: EffectiveTarget,
        nodes: BTreeMap<String, NodeFacts>,
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
            let targets: Vec<String> = self.nodes.keys().cloned().collect();
            plan_deployments(&PlanInput {
                rollout: &self.rollout,
                target: &self.target,
                targets: &targets,
                nodes: &self.nodes,
                deployments: &self.deployments,
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
        c.nodes.get_mut("n0").unwrap().capabilities.as_mut().unwrap().storage_free_bytes = 0;
        c.deployments = vec![owned(
            "uid-vision",
            "n0",
            "2.0.0",
            "sha256:cuda2",
            status(DeploymentPhase::Operational, Some("2.0.0")),
        )];
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
        c.deployments = vec![owned(
            "uid-vision",
            "n0",
            "1.0.0",
            "sha256:cpu1",
            status(DeploymentPhase::Operational, Some("1.0.0")),
        )];
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

    fn claim(key: &str, uid: &str, priority: Priority, created: i64) -> Claim {
        Claim { key: key.into(), uid: uid.into(), priority, created: Some(Timestamp::from_second(created).unwrap()) }
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
        assert_eq!(
            nodes_of(&plan, "2.0.0"),
            ["n1"],
            "n1 switches to 2.0.0 within the slot it holds; nothing else starts"
        );
        assert_eq!(plan.in_flight, 1);
    }

    #[test]
    fn failure_threshold() {
        let r = rollout(None);
        assert!(!threshold_crossed(&r.spec, 5, 10), "no threshold: never abort");
        let mut spec = r.spec.clone();
        spec.strategy =
            Some(StrategySpec { failure_threshold: Some(IntOrString::String("10%".into())), ..Default::default() });
        assert!(!threshold_crossed(&spec, 1, 10));
        assert!(threshold_crossed(&spec, 2, 10));
        spec.strategy = Some(StrategySpec { failure_threshold: Some(IntOrString::Int(3)), ..Default::default() });
        assert!(!threshold_crossed(&spec, 3, 10));
        assert!(threshold_crossed(&spec, 4, 10));
    }

    #[test]
    fn scaled_values() {
        assert_eq!(scaled(&IntOrString::String("25%".into()), 10), 3);
        assert_eq!(scaled(&IntOrString::String("1%".into()), 10), 1);
        assert_eq!(scaled(&IntOrString::String("100%".into()), 1000), 1000);
        assert_eq!(scaled(&IntOrString::Int(7), 3), 7);
        assert_eq!(scaled(&IntOrString::String("50%".into()), 0), 1);
    }
}
