//! `ModelNode`: a node's capabilities and inventory, published by its agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A node as peat sees it: what it can run and what it holds. Named after the node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "peat.dev",
    version = "v1alpha1",
    kind = "ModelNode",
    doc = "A node as peat sees it: its capabilities and the models it holds, published by the node's agent. Named after the node.",
    status = "ModelNodeStatus",
    shortname = "mn",
    category = "peat",
    printcolumn(name = "Arch", type_ = "string", json_path = ".status.arch", description = "CPU architecture"),
    printcolumn(
        name = "GPU memory",
        type_ = "integer",
        json_path = ".status.gpuMemoryBytes",
        description = "Memory of the largest GPU, bytes"
    ),
    printcolumn(
        name = "Free storage",
        type_ = "integer",
        json_path = ".status.storageFreeBytes",
        description = "Free bytes in the agent's store"
    ),
    printcolumn(name = "Models", type_ = "string", json_path = ".status.modelsSummary", description = "Active models"),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat",
        description = "Last sign of life from the agent"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelNodeSpec {}

/// Capabilities and inventory of one node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelNodeStatus {
    /// CPU architecture, GOARCH-style: `amd64`, `arm64`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,

    /// Number of GPUs.
    #[serde(default)]
    pub gpus: i32,

    /// Memory of the largest GPU, in bytes (0 without a GPU).
    #[serde(default)]
    pub gpu_memory_bytes: i64,

    /// Execution providers available on the node (`cpu`, `cuda`, `tensorrt`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,

    /// Free bytes on the filesystem of the agent's store.
    #[serde(default)]
    pub storage_free_bytes: i64,

    /// Bytes the agent frees, when a transfer needs them, by evicting kept versions that are not
    /// active (least recently active first): counted as available when placing a model.
    #[serde(default)]
    pub storage_reclaimable_bytes: i64,

    /// Size of the filesystem of the agent's store, in bytes.
    #[serde(default)]
    pub storage_total_bytes: i64,

    /// Version of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,

    /// When the agent last reported; an old heartbeat marks the node `NetworkPartition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,

    /// Model versions on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<NodeModel>,

    /// Active models as `model=version,…`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_summary: Option<String>,
}

impl ModelNodeStatus {
    /// Bytes a transfer can have: free, plus what evicting kept, non-active versions frees.
    pub fn storage_available_bytes(&self) -> u64 {
        (self.storage_free_bytes.max(0) as u64).saturating_add(self.storage_reclaimable_bytes.max(0) as u64)
    }
}

/// One model version held by a node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeModel {
    /// Model id.
    pub model: String,
    /// Version.
    pub version: String,
    /// Manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Whether this version is the active one.
    #[serde(default)]
    pub active: bool,
    /// Kept after the rollout that managed it was deleted (`deletionPolicy: Retain`): no rollout
    /// manages it now; a new rollout of the model adopts it without a transfer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retained: bool,
}
