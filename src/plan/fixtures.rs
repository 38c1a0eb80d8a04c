//! Test fixtures shared by the planning steps' unit tests: a rollout "ml/vision" (uid `uid-vision`),
//! the deployments it or a rival owns, and claims.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    AllNodes, DeploymentPhase, ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus, ModelRollout,
    ModelRolloutSpec, ModelSource, Priority, ScopeSpec, StrategySpec,
};
use crate::plan::rivals::Claim;

/// The spec of a ModelDeployment of `model` `version` on `node` (variant `int8-cpu`), every policy
/// field at its default: tests override what they are about.
pub(crate) fn deployment_spec(node: &str, model: &str, version: &str, artifact: &str) -> ModelDeploymentSpec {
    ModelDeploymentSpec {
        node_name: node.into(),
        model: model.into(),
        version: version.into(),
        variant: "int8-cpu".into(),
        artifact: artifact.into(),
        insecure: false,
        ca_bundle_secret: None,
        pull_secret: None,
        priority: Priority::Normal,
        delta: true,
        max_size_bytes: None,
        paused: false,
        deletion_policy: Default::default(),
        serving: None,
    }
}

/// Rollout `ml/vision` of version 2.0.0 on all nodes.
pub(crate) fn rollout(max_parallel: Option<IntOrString>) -> ModelRollout {
    let mut r = ModelRollout::new(
        "vision",
        ModelRolloutSpec {
            model: "vision".into(),
            version: "2.0.0".into(),
            source: ModelSource { repository: "reg:5000/models/vision".into(), insecure: true, ..Default::default() },
            variant: None,
            scope: ScopeSpec { all: Some(AllNodes {}), ..Default::default() },
            priority: Priority::Normal,
            strategy: Some(StrategySpec { max_parallel, failure_threshold: None, auto_rollback: false }),
            delta: None,
            paused: false,
            deletion_policy: Default::default(),
            serving: None,
        },
    );
    r.metadata.namespace = Some("ml".into());
    r.metadata.uid = Some("uid-vision".into());
    r
}

/// A ModelDeployment of `vision` on `node`, owned by the rollout with `uid`.
pub(crate) fn owned(
    uid: &str,
    node: &str,
    version: &str,
    variant_digest: &str,
    status: Option<ModelDeploymentStatus>,
) -> ModelDeployment {
    let mut md = ModelDeployment::new(
        &ModelDeployment::name_for("vision", node),
        ModelDeploymentSpec {
            insecure: true,
            ..deployment_spec(node, "vision", version, &format!("reg:5000/models/vision@{variant_digest}"))
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

pub(crate) fn status(phase: DeploymentPhase, active: Option<&str>) -> Option<ModelDeploymentStatus> {
    Some(ModelDeploymentStatus { phase, active_version: active.map(Into::into), ..Default::default() })
}

/// A claim of rollout `key`, created at `created` (seconds).
pub(crate) fn claim(key: &str, uid: &str, priority: Priority, created: i64) -> Claim {
    Claim { key: key.into(), uid: uid.into(), priority, created: Some(Timestamp::from_second(created).unwrap()) }
}
