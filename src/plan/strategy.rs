//! plan: which ModelDeployments should exist with which spec, given the targets, their variants,
//! the strategy (maxParallel, pause, failure threshold, auto-rollback) and competing rollouts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    BlockerReason, DeploymentPhase, ModelDeployment, ModelDeploymentSpec, ModelRollout, ModelRolloutSpec,
};

use super::convergence::{PlannedBlocker, TargetState, TargetView, classify};
use super::rivals::{Claim, winning_claim};
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
    pub nodes: &'a BTreeMap<std::borrow::Cow<'a, str>, NodeFacts<'a>>,
    /// ModelDeployments of this model, cluster-wide (the cache's, shared: not cloned per reconcile).
    pub deployments: &'a [std::sync::Arc<ModelDeployment>],
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
        ca_bundle_secret: spec.source.ca_bundle.as_deref().map(crate::api::shared::ca_bundle_copy_name),
        pull_secret: spec.source.pull_secret.clone(),
        priority: spec.priority,
        delta: spec.delta.as_ref().is_none_or(|d| d.enabled),
        max_size_bytes: spec.variant.as_ref().and_then(|v| v.max_size_bytes),
        paused: spec.paused,
        deletion_policy: spec.deletion_policy,
        serving: spec.serving.clone(),
    }
}

/// Refreshes the policy fields of a kept ModelDeployment (what it asks for stays).
fn refreshed(existing: &ModelDeploymentSpec, spec: &ModelRolloutSpec) -> ModelDeploymentSpec {
    ModelDeploymentSpec {
        insecure: spec.source.insecure,
        ca_bundle_secret: spec.source.ca_bundle.as_deref().map(crate::api::shared::ca_bundle_copy_name),
        pull_secret: spec.source.pull_secret.clone(),
        priority: spec.priority,
        delta: spec.delta.as_ref().is_none_or(|d| d.enabled),
        max_size_bytes: spec.variant.as_ref().and_then(|v| v.max_size_bytes),
        paused: spec.paused,
        deletion_policy: spec.deletion_policy,
        serving: spec.serving.clone(),
        ..existing.clone()
    }
}

/// Whether `artifact` (`repository@digest`) is pinned to `digest`.
fn pins_digest(artifact: &str, digest: &str) -> bool {
    artifact.strip_suffix(digest).is_some_and(|rest| rest.ends_with('@'))
}

fn heartbeat_age(facts: &NodeFacts<'_>, now: Timestamp) -> Option<Duration> {
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
/// frees its slot, and so does a silent one (NetworkPartition) until it reports again. Nothing new starts while paused or aborted (but an aborted rollout with
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
        .map(AsRef::as_ref)
        .filter(|md| md.spec.model == spec.model && controller_uid(md) == Some(my_uid))
        .map(|md| (md.spec.node_name.as_str(), md))
        .collect();
    let foreign: BTreeMap<&str, &ModelDeployment> = input
        .deployments
        .iter()
        .map(AsRef::as_ref)
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
    let mut waiting: Vec<(bool, ModelDeploymentSpec)> = Vec::new();
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

        let facts = input.nodes.get(node.as_str());
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
            && let Some(v) = target.variants.iter().find(|v| pins_digest(&md.spec.artifact, &v.digest))
        {
            view.expected_bytes = v.size;
            plan.apply.push(refreshed(&md.spec, spec));
            // A silent node gives its slot up (an edge node offline for a day must not hold up the
            // fleet); it keeps its deployment and resumes from its partial when it is back.
            if stale.is_none()
                && matches!(classify(&target.version, Some(md)), TargetState::InProgress | TargetState::Pending)
            {
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
        if transferring_other && stale.is_none() {
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
                    waiting.push((held_locally, desired));
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
    waiting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.node_name.cmp(&b.1.node_name)));
    let free = plan.max_parallel.saturating_sub(plan.in_flight);
    let starting: Vec<ModelDeploymentSpec> = waiting.into_iter().take(free).map(|(_, desired)| desired).collect();
    // One pass over the plan for all of them: a pass per starting node made a 10,000-node
    // rollout's first plan quadratic (0.6 s).
    let replaced: BTreeSet<&str> = starting.iter().map(|d| d.node_name.as_str()).collect();
    plan.apply.retain(|s| !replaced.contains(s.node_name.as_str()));
    plan.in_flight += starting.len();
    plan.apply.extend(starting);
    plan.apply.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    plan.delete.sort();
    plan.delete.dedup();
    plan.targets = input.targets.iter().filter_map(|n| views.remove(n)).collect();
    plan
}

#[cfg(test)]
mod tests;
