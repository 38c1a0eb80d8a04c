//! The failure threshold: when a rollout aborts, and what it then remembers.

use crate::api::{DeploymentPhase, ModelDeployment, ModelRolloutSpec};

use super::strategy::{controller_uid, scaled};

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

/// Whether a rollout is aborted, and whether this reconcile is the one that aborts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortDecision {
    /// The version the rollout aborted on (`status.abortedVersion`), if any.
    pub aborted_version: Option<String>,
    /// True when the threshold was crossed just now: the abort must be recorded before acting on it.
    pub newly: bool,
    /// Targets failed on `spec.version`.
    pub failed: usize,
}

/// Decides the abort: an abort recorded for the spec's version stays (the failures that caused
/// it are gone once deployments move back); otherwise the threshold decides over `targets` nodes.
pub fn abort_decision(
    spec: &ModelRolloutSpec,
    recorded: Option<&str>,
    rollout_uid: &str,
    deployments: &[ModelDeployment],
    targets: usize,
) -> AbortDecision {
    let failed = failed_on(&spec.version, rollout_uid, deployments);
    let recorded = recorded.filter(|v| *v == spec.version).map(str::to_string);
    let newly = recorded.is_none() && threshold_crossed(spec, failed, targets);
    let aborted_version = if newly { Some(spec.version.clone()) } else { recorded };
    AbortDecision { aborted_version, newly, failed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AllNodes, ModelDeploymentStatus, ModelSource, Priority, ScopeSpec, StrategySpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn spec(threshold: Option<IntOrString>) -> ModelRolloutSpec {
        ModelRolloutSpec {
            model: "vision".into(),
            version: "2.0.0".into(),
            source: ModelSource { repository: "reg:5000/models/vision".into(), pull_secret: None, insecure: true },
            variant: None,
            scope: ScopeSpec { all: Some(AllNodes {}), ..Default::default() },
            priority: Priority::Normal,
            strategy: Some(StrategySpec { max_parallel: None, failure_threshold: threshold, auto_rollback: false }),
            delta: None,
            paused: false,
        }
    }

    fn deployment(owner: &str, node: &str, version: &str, phase: DeploymentPhase) -> ModelDeployment {
        let mut md = ModelDeployment::new(
            &ModelDeployment::name_for("vision", node),
            crate::api::ModelDeploymentSpec {
                node_name: node.into(),
                model: "vision".into(),
                version: version.into(),
                variant: "int8-cpu".into(),
                artifact: "reg:5000/models/vision@sha256:cpu".into(),
                insecure: true,
                pull_secret: None,
                priority: Priority::Normal,
                delta: true,
                max_size_bytes: None,
                paused: false,
            },
        );
        md.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "peat.dev/v1alpha1".into(),
            kind: "ModelRollout".into(),
            name: "vision".into(),
            uid: owner.into(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
        md.status = Some(ModelDeploymentStatus { phase, ..Default::default() });
        md
    }

    #[test]
    fn failure_threshold() {
        assert!(!threshold_crossed(&spec(None), 5, 10), "no threshold: never abort");
        let pct = spec(Some(IntOrString::String("10%".into())));
        assert!(!threshold_crossed(&pct, 1, 10));
        assert!(threshold_crossed(&pct, 2, 10));
        let three = spec(Some(IntOrString::Int(3)));
        assert!(!threshold_crossed(&three, 3, 10));
        assert!(threshold_crossed(&three, 4, 10));
    }

    #[test]
    fn failures_count_for_this_rollout_and_version_only() {
        let mds = [
            deployment("uid-v", "n0", "2.0.0", DeploymentPhase::Failed),
            deployment("uid-v", "n1", "2.0.0", DeploymentPhase::Failed),
            deployment("uid-v", "n2", "1.0.0", DeploymentPhase::Failed),
            deployment("uid-other", "n3", "2.0.0", DeploymentPhase::Failed),
            deployment("uid-v", "n4", "2.0.0", DeploymentPhase::Operational),
        ];
        assert_eq!(failed_on("2.0.0", "uid-v", &mds), 2);
        let s = spec(Some(IntOrString::Int(1)));
        assert_eq!(
            abort_decision(&s, None, "uid-v", &mds, 5),
            AbortDecision { aborted_version: Some("2.0.0".into()), newly: true, failed: 2 }
        );
        // Recorded before: stays aborted, not newly, even with the failures gone.
        assert_eq!(
            abort_decision(&s, Some("2.0.0"), "uid-v", &[], 5),
            AbortDecision { aborted_version: Some("2.0.0".into()), newly: false, failed: 0 }
        );
        // An abort of another version does not carry over to a new spec.version.
        assert_eq!(
            abort_decision(&s, Some("1.0.0"), "uid-v", &mds[..1], 5),
            AbortDecision { aborted_version: None, newly: false, failed: 1 }
        );
    }
}
