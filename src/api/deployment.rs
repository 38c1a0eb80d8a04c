//! `ModelDeployment`: one per (node, model), written by the controller, its status by the agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::serving::{ServingSpec, ServingStatus};
use super::shared::{BlockerReason, DeletionPolicy, DeploymentPhase, Priority};

/// One model on one node: what the node should hold, and (in status) what it holds.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "peat.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    doc = "One model on one node: written by the controller for each target of a ModelRollout; its status is written by the node's agent.",
    namespaced,
    status = "ModelDeploymentStatus",
    shortname = "md",
    category = "peat",
    selectable = ".spec.nodeName",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName", description = "Target node"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model", description = "Model id"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version", description = "Desired version"),
    printcolumn(name = "Variant", type_ = "string", json_path = ".spec.variant", description = "Chosen variant"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where the node stands"),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.activeVersion",
        description = "Version active on the node"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The node that should hold the model (a field selector can filter on it).
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 253").message("nodeName must be a node name"))]
    pub node_name: String,

    /// Model id.
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 63").message("model must be a model id"))]
    pub model: String,

    /// Desired version.
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 128").message("version must be a version"))]
    pub version: String,

    /// Variant chosen for this node.
    pub variant: String,

    /// The variant's manifest, by digest (`<repository>@sha256:…`): every node gets the same bytes.
    #[x_kube(validation = Rule::new("self.contains('@sha256:')").message("artifact must reference a manifest by sha256 digest"))]
    pub artifact: String,

    /// Plain HTTP to the registry.
    #[serde(default)]
    pub insecure: bool,

    /// Secret in the peat namespace holding the CA bundle (key `ca.crt`) to trust for the
    /// registry's TLS certificate: the controller's copy of the rollout's `source.caBundle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_secret: Option<String>,

    /// Secret (in this namespace) with registry credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret: Option<String>,

    /// Transfer priority on the node.
    #[serde(default)]
    pub priority: Priority,

    /// Whether the node may fetch only changed chunks.
    #[serde(default = "default_true")]
    pub delta: bool,

    /// Largest size the artifact may have (from the rollout's `variant.maxSizeBytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<i64>,

    /// Halt the transfer (it resumes where it stopped).
    #[serde(default)]
    pub paused: bool,

    /// What the node does with the model once no ModelDeployment holds it (from the rollout).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// How the node's model server serves the model (from the rollout's `spec.serving`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingSpec>,
}

fn default_true() -> bool {
    true
}

/// What the node holds and how its transfer goes (written by the node's agent).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// NotDeployed, Downloading, Loading, Operational, Degraded or Failed.
    #[serde(default)]
    pub phase: DeploymentPhase,

    /// Version currently active on the node (`models/<model>/current`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,

    /// Manifest digest of the active version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_digest: Option<String>,

    /// Earlier versions kept on the node: rolling back to them moves no bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_versions: Vec<String>,

    /// Size of the desired artifact, in bytes.
    #[serde(default)]
    pub bytes_total: i64,

    /// Bytes fetched over the network so far.
    #[serde(default)]
    pub bytes_done: i64,

    /// Bytes taken from local chunks or layers instead of the network.
    #[serde(default)]
    pub bytes_reused: i64,

    /// Why the node does not progress, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BlockerReason>,

    /// Details for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// When the agent last wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,

    /// The `metadata.generation` the agent acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Whether the node's model server serves the active version (with `spec.serving`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingStatus>,
}

/// Lets the planning functions take deployments as owned values (tests) or as the cache's shared
/// `Arc`s (the controller) alike, without cloning a fleet's worth of objects per reconcile.
impl AsRef<ModelDeployment> for ModelDeployment {
    fn as_ref(&self) -> &ModelDeployment {
        self
    }
}

impl ModelDeploymentSpec {
    /// The labels the controller writes on the ModelDeployment of this spec: model, version and
    /// node (label values are at most 63 characters; a longer node name goes without its label).
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.label_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Whether `found` holds every label of [`Self::labels`] with its value (labels others added
    /// may be there too). Read for every ModelDeployment event, so it builds no map.
    pub fn labelled_in(&self, found: &std::collections::BTreeMap<String, String>) -> bool {
        self.label_pairs().all(|(k, v)| found.get(k).is_some_and(|f| f == v))
    }

    fn label_pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        use super::shared::{LABEL_MODEL, LABEL_NODE, LABEL_VERSION};
        let node = (self.node_name.len() <= 63).then_some((LABEL_NODE, self.node_name.as_str()));
        [(LABEL_MODEL, self.model.as_str()), (LABEL_VERSION, self.version.as_str())].into_iter().chain(node)
    }
}

impl ModelDeployment {
    /// The object name for a model on a node: `<model>.<node>`, shortened with a hash of the node
    /// name when that would pass the 253 characters an object name may have.
    pub fn name_for(model: &str, node: &str) -> String {
        let name = format!("{model}.{node}");
        if name.len() <= 253 {
            return name;
        }
        use sha2::Digest;
        let hash = format!("{:x}", sha2::Sha256::digest(node.as_bytes()));
        let keep = 253 - model.len() - 1 - 1 - 10;
        let head = node[..keep].trim_end_matches(['.', '-']);
        format!("{model}.{head}-{}", &hash[..10])
    }
}

#[cfg(test)]
mod tests {
    use crate::plan::fixtures::deployment_spec;

    #[test]
    fn labels_name_model_version_and_a_node_short_enough_for_a_label() {
        let labels = deployment_spec("edge-1", "vision", "1.0.0", "r/m@sha256:aa").labels();
        let got: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, [("peat.dev/model", "vision"), ("peat.dev/node", "edge-1"), ("peat.dev/version", "1.0.0")]);
        let long = deployment_spec(&"n".repeat(64), "vision", "1.0.0", "r/m@sha256:aa").labels();
        assert_eq!(long.len(), 2, "a node name over 63 characters is no label value");
        let spec = deployment_spec("edge-1", "vision", "1.0.0", "r/m@sha256:aa");
        let mut found = spec.labels();
        found.insert("team".into(), "vision".into());
        assert!(spec.labelled_in(&found), "labels others added do not matter");
        found.insert("peat.dev/version".into(), "0.9.0".into());
        assert!(!spec.labelled_in(&found));
        assert!(!spec.labelled_in(&Default::default()));
    }
}
