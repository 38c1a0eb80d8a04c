//! Types shared by the three CRDs: priorities, phases, blocker reasons, conditions, labels.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every peat CRD.
pub const GROUP: &str = "peat.dev";
/// API version of every peat CRD.
pub const VERSION: &str = "v1alpha1";

/// Label on a ModelDeployment: the model id.
pub const LABEL_MODEL: &str = "peat.dev/model";
/// Label on a ModelDeployment: the node it targets.
pub const LABEL_NODE: &str = "peat.dev/node";
/// Label on a ModelDeployment: the version it asks for.
pub const LABEL_VERSION: &str = "peat.dev/version";
/// Node label that puts a node into a formation (`scope.formation`).
pub const LABEL_FORMATION: &str = "peat.dev/formation";
/// Name of the copy, in the peat namespace, of the pull secret `name` of namespace `ns`: the
/// controller writes it, agents read it (they may read Secrets in that namespace only).
pub fn pull_secret_copy_name(ns: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    // 10 bytes (20 hex digits) of sha256("<ns>/<name>"): a valid name whatever the lengths.
    let digest = Sha256::digest(format!("{ns}/{name}").as_bytes());
    let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    format!("peat-pull-{hex}")
}

/// Name of the copy, in the peat namespace, of a rollout's `source.caBundle` (key `ca.crt`):
/// content-addressed, so rollouts with the same CA share one.
pub fn ca_bundle_copy_name(pem: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(pem.as_bytes());
    let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    format!("peat-ca-{hex}")
}

/// Prefix of the Node label the agent sets while a model is Operational: `models.peat.dev/<model>=<version>`.
pub const NODE_MODEL_LABEL_PREFIX: &str = "models.peat.dev/";

/// What happens to the models on the nodes when their ModelRollout is deleted (or pruned, or renamed).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum DeletionPolicy {
    /// The default: the active version stays on each node, its `models.peat.dev/<model>` label too,
    /// no longer managed (the ModelNode lists it as retained); a later rollout of the same model
    /// adopts it without a transfer.
    #[default]
    Retain,
    /// Each node removes the model (every version) and its label.
    Delete,
}

/// How urgent a rollout is. Higher priorities win a node when rollouts compete, and the agent
/// pulls them first (Critical preempts lower transfers).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Priority {
    /// Pulled before anything else; preempts running lower-priority transfers.
    Critical,
    /// Pulled before Normal and Low.
    High,
    /// The default.
    #[default]
    Normal,
    /// Pulled when nothing else waits.
    Low,
}

impl Priority {
    /// A rank where a larger number means more urgent (for sorting).
    pub fn rank(self) -> u8 {
        match self {
            Priority::Critical => 3,
            Priority::High => 2,
            Priority::Normal => 1,
            Priority::Low => 0,
        }
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// Why a node does not progress towards the target version (the origin protocol's set, exactly).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
pub enum BlockerReason {
    /// The node's agent has not sent a heartbeat within the configured limit.
    NetworkPartition,
    /// The node's store has less free space than the variant needs.
    InsufficientStorage,
    /// Every variant that would otherwise fit needs more GPU memory than the node has.
    InsufficientGpuMemory,
    /// Fetching or verifying the artifact failed (registry error, digest mismatch, bad layer).
    TransferFailed,
    /// The artifact arrived but could not be activated.
    DeploymentFailed,
    /// No variant fits the node's architecture or execution providers.
    IncompatibleCapabilities,
    /// Another rollout holds the node for the same model, or the agent is saturated.
    NodeBusy,
    /// Anything else.
    Unknown,
}

impl BlockerReason {
    /// Every reason, in a stable order (for per-reason counts and metrics labels).
    pub const ALL: [BlockerReason; 8] = [
        BlockerReason::NetworkPartition,
        BlockerReason::InsufficientStorage,
        BlockerReason::InsufficientGpuMemory,
        BlockerReason::TransferFailed,
        BlockerReason::DeploymentFailed,
        BlockerReason::IncompatibleCapabilities,
        BlockerReason::NodeBusy,
        BlockerReason::Unknown,
    ];

    /// The name as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockerReason::NetworkPartition => "NetworkPartition",
            BlockerReason::InsufficientStorage => "InsufficientStorage",
            BlockerReason::InsufficientGpuMemory => "InsufficientGpuMemory",
            BlockerReason::TransferFailed => "TransferFailed",
            BlockerReason::DeploymentFailed => "DeploymentFailed",
            BlockerReason::IncompatibleCapabilities => "IncompatibleCapabilities",
            BlockerReason::NodeBusy => "NodeBusy",
            BlockerReason::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for BlockerReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one node stands with one model (reported by the agent in ModelDeployment status).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum DeploymentPhase {
    /// Nothing of the requested version is active yet, and no transfer runs.
    #[default]
    NotDeployed,
    /// The artifact is being fetched.
    Downloading,
    /// The artifact is verified and being activated.
    Loading,
    /// The requested version is active and healthy.
    Operational,
    /// The requested version is active but the node reports a problem with it.
    Degraded,
    /// The node gave up on the requested version; `reason` and `message` say why.
    Failed,
}

/// Where a rollout stands as a whole.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum RolloutPhase {
    /// Accepted; nothing has started yet (resolving the source, or no targets).
    #[default]
    Pending,
    /// Transfers or activations are under way.
    Progressing,
    /// Every target runs the requested version.
    Converged,
    /// `spec.paused` is true: no new transfers start, running ones halt and resume later.
    Paused,
    /// Failures crossed `strategy.failureThreshold` (or the spec cannot be acted on); no new transfers start.
    Degraded,
    /// The rollout aborted and its updated nodes returned to the last good version.
    RolledBack,
    /// The rollout cannot proceed at all (e.g. the source cannot be resolved for good).
    Failed,
}

/// Condition types set on a ModelRollout (`kubectl wait --for=condition=Converged`).
pub mod condition {
    /// The rollout is accepted, its source resolved and its spec actionable.
    pub const READY: &str = "Ready";
    /// Transfers or activations are under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Every target runs the requested version and none failed.
    pub const CONVERGED: &str = "Converged";
    /// The rollout aborted, failed, or cannot be acted on.
    pub const DEGRADED: &str = "Degraded";
}
