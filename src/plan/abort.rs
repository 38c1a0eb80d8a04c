//! The failure threshold: when a rollout aborts, and what it then remembers.

use crate::api::{DeploymentPhase, ModelDeployment, ModelRolloutSpec};

use super::strategy::{controller_uid, scaled};

/// Failed targets of `version` among this rollout's deployments.
pub fn failed_on<D: AsRef<ModelDeployment>>(version: &str, rollout_uid: &str, deployments: &[D]) -> usize {
    deployments
        .iter()
        .map(AsRef::as_ref)
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
pub fn abort_decision<D: AsRef<ModelDeployment>>(
    spec: &ModelRolloutSpec,
    recorded: Option<&str>,
    rollout_uid: &str,
    deployments: &[D],
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
    use crate::api::StrategySpec;
    use crate::plan::fixtures::{owned, rollout, status};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn failing_on(node: &str, version: &str, owner: &str, phase: DeploymentPhase) -> ModelDeployment {
        owned(owner, node, version, "sha256:cpu2", status(phase, None))
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
    fn failures_count_for_this_rollout_and_version_only() {
        let mds = [
            failing_on("n0", "2.0.0", "uid-vision", DeploymentPhase::Failed),
            failing_on("n1", "2.0.0", "uid-vision", DeploymentPhase::Failed),
            failing_on("n2", "1.0.0", "uid-vision", DeploymentPhase::Failed),
            failing_on("n3", "2.0.0", "uid-other", DeploymentPhase::Failed),
            failing_on("n4", "2.0.0", "uid-vision", DeploymentPhase::Operational),
        ];
        assert_eq!(failed_on("2.0.0", "uid-vision", &mds), 2);
        let mut s = rollout(None).spec;
        s.strategy = Some(StrategySpec { failure_threshold: Some(IntOrString::Int(1)), ..Default::default() });
        assert_eq!(
            abort_decision(&s, None, "uid-vision", &mds, 5),
            AbortDecision { aborted_version: Some("2.0.0".into()), newly: true, failed: 2 }
        );
        // Recorded before: stays aborted, not newly, even with the failures gone.
        assert_eq!(
            abort_decision(&s, Some("2.0.0"), "uid-vision", &[] as &[ModelDeployment], 5),
            AbortDecision { aborted_version: Some("2.0.0".into()), newly: false, failed: 0 }
        );
        // An abort of another version does not carry over to a new spec.version.
        assert_eq!(
            abort_decision(&s, Some("1.0.0"), "uid-vision", &mds[..1], 5),
            AbortDecision { aborted_version: None, newly: false, failed: 1 }
        );
    }
}
