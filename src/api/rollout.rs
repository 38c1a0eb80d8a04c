//! `ModelRollout`: model M, version V, on these nodes, with this priority and strategy.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::serving::ServingSpec;
use super::shared::{BlockerReason, DeletionPolicy, Priority, RolloutPhase};

/// Roll model M, version V, out to a set of nodes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "peat.dev",
    version = "v1alpha1",
    kind = "ModelRollout",
    doc = "Rolls model M, version V, out to a set of nodes, choosing a variant per node; its status aggregates the nodes' progress.",
    namespaced,
    status = "ModelRolloutStatus",
    shortname = "mr",
    category = "peat",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model", description = "Model id"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version", description = "Desired version"),
    printcolumn(
        name = "Converged",
        type_ = "string",
        json_path = ".status.convergedRatio",
        description = "Converged targets / all targets"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the rollout stands"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutSpec {
    /// Model id, unique in the cluster (a DNS-1123 label, e.g. `target-recognition`). One node holds
    /// at most one version of a model at a time.
    #[x_kube(
        validation = Rule::new("self.size() <= 63 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
            .message("model must be a DNS-1123 label: lower-case letters, digits and '-', at most 63 characters")
    )]
    #[schemars(length(max = 253))]
    pub model: String,

    /// Desired version: a semantic version (MAJOR.MINOR.PATCH with an optional -PRERELEASE), also the
    /// OCI tag of the image index in `source.repository`. Changing it upgrades or rolls back.
    #[x_kube(
        validation = Rule::new("self.size() <= 128 && self.matches('^(0|[1-9][0-9]*)\\\\.(0|[1-9][0-9]*)\\\\.(0|[1-9][0-9]*)(-(0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(\\\\.(0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*)?$')")
            .message("version must be a semantic version such as 4.2.1 or 4.2.1-rc.1 (no build metadata: OCI tags cannot hold '+')")
    )]
    #[schemars(length(max = 253))]
    pub version: String,

    /// Where the model's artifacts live.
    pub source: ModelSource,

    /// Which variant each node gets. Without it the best-fitting variant is chosen per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<VariantSpec>,

    /// The nodes to roll out to: exactly one of `all`, `formation`, `nodeSelector`, `nodes`, `capable`.
    pub scope: ScopeSpec,

    /// How urgent this rollout is: Critical, High, Normal (default) or Low.
    #[serde(default)]
    pub priority: Priority,

    /// How fast to go and when to give up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StrategySpec>,

    /// Delta transfers: a node holding an earlier version fetches only the chunks that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaSpec>,

    /// Halt transfers (they resume, without losing progress, when set back to false).
    #[serde(default)]
    pub paused: bool,

    /// What the nodes do with the model when this rollout is deleted: `Retain` (default: the
    /// active version stays, labelled, unmanaged; a new rollout of the model adopts it) or `Delete`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// How the node's model server serves the model. Without it Operational means "staged on disk";
    /// with it a node is Operational once its server answers ready for the new version, and a server
    /// that cannot load it fails the node (see `readyTimeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingSpec>,
}

/// Where the model's artifacts live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.insecure) && self.insecure && has(self.caBundle))")
        .message("insecure (plain HTTP) and caBundle (TLS with a private CA) exclude each other")
)]
pub struct ModelSource {
    /// OCI repository holding one image index per version, tagged with the version
    /// (e.g. `registry.example:5000/models/target-recognition`; no tag or digest).
    #[x_kube(
        validation = Rule::new("self.size() > 0 && self.size() <= 255 && !self.contains('@') && !self.matches('^[^/]+/.*:[^/]*$') && !self.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://')")
            .message("repository must be a registry host and path without scheme, tag or digest, e.g. registry.example:5000/models/target-recognition"),
        // The OCI reference grammar (distribution/reference) for a name: host[:port], then lower-case
        // path components. Without it a space or an upper-case path is accepted here and fails only
        // when the controller resolves.
        validation = Rule::new("self.matches('^(\\\\[[0-9a-fA-F:.]+\\\\]|[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?(\\\\.[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(:[0-9]+)?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+$')")
            .message("repository must follow the OCI reference grammar: a registry host[:port], then lower-case path components of letters and digits joined by '.', '_', '__' or '-' (no spaces, no upper case)"),
        // A first component without '.' or ':' is not a host to OCI tools (they would prefix docker.io).
        validation = Rule::new("self.matches('^(localhost(:[0-9]+)?|[^/]*[.:\\\\[][^/]*)/')")
            .message("repository must start with a registry host: a name with a '.' or a port, an IP address, or localhost, e.g. registry.example:5000/models/target-recognition")
    )]
    #[schemars(length(max = 1024))]
    pub repository: String,

    /// Name of a Secret of type `kubernetes.io/dockerconfigjson`, in the rollout's namespace, with
    /// credentials for the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub pull_secret: Option<String>,

    /// Talk plain HTTP to the registry: for a lab registry without TLS only (nothing is encrypted
    /// or authenticated). A registry with a certificate from a private CA needs `caBundle` instead.
    #[serde(default)]
    pub insecure: bool,

    /// PEM certificates of the CAs to trust for the registry's TLS certificate, besides the
    /// system's (a private CA). The controller uses them and copies them for the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----') && self.contains('-----END CERTIFICATE-----')")
            .message("caBundle must hold PEM certificates (-----BEGIN CERTIFICATE----- … -----END CERTIFICATE-----)")
    )]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
}

/// Which variant a node gets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.name) || (!has(self.preferredPrecision) && !has(self.requiredProviders))")
        .message("variant.name picks one variant explicitly: it cannot be combined with preferredPrecision or requiredProviders")
)]
pub struct VariantSpec {
    /// Explicit variant (its `peat.dev/variant` annotation, e.g. `fp16-cuda`). A node it does not fit is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 128").message("variant.name must be 1 to 128 characters"))]
    #[schemars(length(max = 1024))]
    pub name: Option<String>,

    /// Precision to prefer among the variants that fit (e.g. `float16`, `int8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 64").message("preferredPrecision must be 1 to 64 characters"))]
    #[schemars(length(max = 1024))]
    pub preferred_precision: Option<String>,

    /// Execution providers a variant must use to be chosen (e.g. `[cuda]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() <= 16 && self.all(p, p.size() > 0 && p.size() <= 64)").message("requiredProviders takes at most 16 non-empty names of at most 64 characters"))]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    pub required_providers: Option<Vec<String>>,

    /// Largest variant (sum of its files, in bytes) a node may receive; larger ones are not chosen
    /// and a transfer that grows past it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("maxSizeBytes must be greater than 0"))]
    pub max_size_bytes: Option<i64>,
}

/// The nodes to roll out to: exactly one kind.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.all), has(self.formation), has(self.nodeSelector), has(self.nodes), has(self.capable)].filter(x, x).size() == 1")
        .message("scope must set exactly one of all, formation, nodeSelector, nodes, capable")
)]
pub struct ScopeSpec {
    /// Every node that runs a peat agent: `all: {}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<AllNodes>,

    /// Nodes labelled `peat.dev/formation=<this value>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.size() <= 63 && self.matches('^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$') && self.size() > 0")
            .message("formation must be a valid label value: at most 63 characters, alphanumeric at both ends, '-', '_' or '.' inside")
    )]
    #[schemars(length(max = 1024))]
    pub formation: Option<String>,

    /// Nodes whose labels match this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,

    /// These nodes, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.size() > 0").message("nodes must list at least one node name"),
        validation = Rule::new("self.all(n, n.size() <= 253 && n.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'))")
            .message("nodes must be node names (DNS-1123 subdomains)")
    )]
    #[schemars(length(max = 1000), inner(length(max = 253)))]
    pub nodes: Option<Vec<String>>,

    /// Nodes whose reported capabilities (ModelNode status) meet every given minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capable: Option<CapableScope>,
}

/// Marker for `scope.all`: an empty object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct AllNodes {}

/// A label selector over Node labels (the semantics of Kubernetes label selectors).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.matchLabels) || has(self.matchExpressions)")
        .message("nodeSelector needs matchLabels or matchExpressions")
)]
pub struct NodeSelector {
    /// Labels a node must carry with exactly these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub match_labels: Option<BTreeMap<String, String>>,

    /// Requirements a node's labels must all meet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub match_expressions: Option<Vec<LabelRequirement>>,
}

/// One requirement of a label selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.operator in ['In', 'NotIn']) == (has(self.values) && self.values.size() > 0)")
        .message("In and NotIn need a non-empty values list; Exists and DoesNotExist take no values")
)]
pub struct LabelRequirement {
    /// The label key.
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 317").message("key must be a label key"))]
    #[schemars(length(max = 1024))]
    pub key: String,

    /// How the key relates to the values.
    pub operator: SelectorOperator,

    /// Values for In and NotIn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 1024)))]
    pub values: Option<Vec<String>>,
}

/// Operator of a label requirement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// Minimum capabilities, from each node's ModelNode status.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.minGpuMemory) || has(self.cpuArch) || has(self.minStorage)")
        .message("capable needs at least one of minGpuMemory, cpuArch, minStorage")
)]
pub struct CapableScope {
    /// Least GPU memory (of the node's largest GPU), as a quantity such as `4Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))")
            .message("minGpuMemory must be a positive quantity such as 4Gi")
    )]
    #[schemars(length(max = 64))]
    pub min_gpu_memory: Option<String>,

    /// CPU architecture (`amd64` or its alias `x86_64`, `arm64` or its alias `aarch64`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self.size() > 0 && self.size() <= 32 && self.matches('^[a-z0-9_]+$')")
            .message("cpuArch must be an architecture name such as amd64, arm64, x86_64 or aarch64")
    )]
    #[schemars(length(max = 64))]
    pub cpu_arch: Option<String>,

    /// Least free storage in the agent's store, as a quantity such as `500Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))")
            .message("minStorage must be a positive quantity such as 500Mi")
    )]
    #[schemars(length(max = 64))]
    pub min_storage: Option<String>,
}

/// How fast to go and when to give up.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StrategySpec {
    /// Most targets transferring at once: a count (`10`) or a percentage of the targets (`25%`,
    /// rounded up, at least 1). Default: all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("type(self) == int ? self > 0 : self.matches('^([1-9][0-9]?|100)%$')")
            .message("maxParallel must be a count greater than 0 or a percentage from 1% to 100%")
    )]
    pub max_parallel: Option<IntOrString>,

    /// Failed targets that abort the rollout: a count (`3`) or a percentage of the targets (`10%`).
    /// The rollout aborts once more targets than this have failed. Default: never abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("type(self) == int ? self > 0 : self.matches('^([1-9][0-9]?|100)%$')")
            .message("failureThreshold must be a count greater than 0 or a percentage from 1% to 100%")
    )]
    pub failure_threshold: Option<IntOrString>,

    /// On abort, return the nodes already updated to the last version that converged (from `status.history`).
    #[serde(default)]
    pub auto_rollback: bool,
}

/// Delta transfers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeltaSpec {
    /// Fetch only the chunks a node does not already hold (default true). False: always fetch whole files.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for DeltaSpec {
    fn default() -> Self {
        DeltaSpec { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

/// Observed state of a rollout, aggregated from its ModelDeployments.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the rollout stands: Pending, Progressing, Converged, Paused, Degraded, RolledBack or Failed.
    #[serde(default)]
    pub phase: RolloutPhase,

    /// Digest of the image index the version's tag pointed at when first resolved; every node gets these bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,

    /// The version `resolvedDigest` belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_version: Option<String>,

    /// A version whose rollout aborted on `strategy.failureThreshold`: nothing new starts for it (and
    /// with `autoRollback` the updated nodes return to the last good version) until `spec.version` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_version: Option<String>,

    /// Nodes in scope.
    #[serde(default)]
    pub total_nodes: i32,

    /// Targets whose active version is the desired one and that are Operational or Degraded.
    #[serde(default)]
    pub converged: i32,

    /// Targets downloading or loading.
    #[serde(default)]
    pub in_progress: i32,

    /// Targets not yet started, waiting for a slot, or blocked before any transfer.
    #[serde(default)]
    pub pending: i32,

    /// Targets that report Failed.
    #[serde(default)]
    pub failed: i32,

    /// Converged targets whose model server answers ready for the desired version (with `spec.serving`).
    #[serde(default)]
    pub serving: i32,

    /// Targets with the desired version active on disk but not (yet) served: all converged ones
    /// without `spec.serving`; with it, those still loading or soaking and those whose server stopped answering.
    #[serde(default)]
    pub staged: i32,

    /// `converged/totalNodes`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_ratio: Option<String>,

    /// How many targets have each version active.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version_distribution: BTreeMap<String, i32>,

    /// What keeps which node from converging (at most 20 entries; `blockerCounts` counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<Blocker>,

    /// Number of blocked targets per reason, including those not listed in `blockers`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blocker_counts: BTreeMap<String, i32>,

    /// Seconds until every reachable target is expected to converge: the bytes still to come over
    /// the transfer rate, which halves for every 30 s without progress (a stall makes it grow, not
    /// freeze). Silent nodes are left out (see `partitionedNodes`); absent when no rate has been
    /// observed yet, or when only silent nodes remain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion_seconds: Option<i64>,

    /// Smoothed transfer rate of the targets, bytes per second, as of `lastProgressTime` (kept
    /// here so that a new controller leader goes on from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_rate_bytes_per_second: Option<i64>,

    /// When the bytes done by the targets last grew (to the microsecond: rates are measured over
    /// intervals shorter than a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<MicroTime>,

    /// Targets whose agent has gone silent (NetworkPartition): not in the ETA; they resume when back.
    #[serde(default)]
    pub partitioned_nodes: i32,

    /// Bytes fetched over the network by all targets for this rollout.
    #[serde(default)]
    pub bytes_transferred: i64,

    /// Bytes the targets took from what they already held (delta chunks, shared layers) instead of the network.
    #[serde(default)]
    pub bytes_reused: i64,

    /// Versions this rollout fully converged on, newest last (the source of rollbacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,

    /// Ready, Progressing, Converged and Degraded, each with the generation it was computed for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One node that does not progress, and why.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Blocker {
    /// The node's name.
    pub node: String,
    /// Why it is blocked.
    pub reason: BlockerReason,
    /// When the blocker was first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// What exactly is wrong, for a person.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// A version the rollout converged on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The version.
    pub version: String,
    /// The image index digest it was resolved to.
    pub digest: String,
    /// When every target ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}
