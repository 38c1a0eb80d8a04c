//! The peat.dev/v1alpha1 API: ModelRollout, ModelDeployment, ModelNode.

// kube's repeated `printcolumn(name = …, type_ = …)` entries read to clippy as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
pub mod deployment;
#[allow(clippy::duplicated_attributes)]
pub mod node;
pub mod quantity;
#[allow(clippy::duplicated_attributes)]
pub mod rollout;
pub mod serving;
pub mod shared;

pub use deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};
pub use node::{ModelNode, ModelNodeSpec, ModelNodeStatus, NodeModel};
pub use rollout::{
    AllNodes, Blocker, CapableScope, DeltaSpec, HistoryEntry, LabelRequirement, ModelRollout, ModelRolloutSpec,
    ModelRolloutStatus, ModelSource, NodeSelector, ScopeSpec, SelectorOperator, StrategySpec, VariantSpec,
};
pub use serving::{ServingConsumer, ServingEndpoint, ServingProtocol, ServingSpec, ServingStatus};
pub use shared::{BlockerReason, DeletionPolicy, DeploymentPhase, Priority, RolloutPhase};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The three CRDs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ModelRollout::crd(), ModelDeployment::crd(), ModelNode::crd()]
}

/// All CRDs as one multi-document YAML stream (the content of `crds/peat.dev.yaml`).
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
