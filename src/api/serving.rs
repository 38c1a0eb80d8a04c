//! `spec.serving`: how the node's model server serves a model, so that Operational means "serving
//! inference" and not only "staged on disk" — and the per-node serving state the agent reports.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the model's server is asked whether it serves a version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ServingProtocol {
    /// The KServe Open Inference Protocol (V2), as MLServer and KServe runtimes speak it:
    /// after activation the agent asks the server to load the model (`POST
    /// /v2/repository/models/{model}/load`), then waits for `GET /v2/models/{model}/versions/{version}/ready`
    /// to answer 200 — the server itself reports the version it serves.
    #[default]
    OpenInference,
    /// A plain HTTP GET of `path` (with `{model}` and `{version}` replaced); any 2xx answer means ready.
    HttpGet,
}

/// Where the model's server listens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ServingEndpoint {
    /// The pods on the node whose spec mounts the model through the CSI volume (`models.peat.dev`): each
    /// running one is probed at its pod IP and `port` (only those declaring `port` as a
    /// containerPort, when some do). No such pod, no serving.
    #[default]
    Consumers,
    /// A server outside Kubernetes on the node's host network (a Triton or DeepStream service on a
    /// Jetson), probed at the node's address and `port`; it reads the model from the agent's store.
    Host,
}

/// How the node's model server serves the model. Without it Operational means "staged on disk";
/// with it a node is Operational only once its server answers ready for the new version.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.path) || !has(self.protocol) || self.protocol != 'HttpGet'").message("serving.path is required with protocol HttpGet"),
    validation = Rule::new("!has(self.path) || (has(self.protocol) && self.protocol == 'HttpGet')").message("serving.path is only used with protocol HttpGet")
)]
pub struct ServingSpec {
    /// OpenInference (default) or HttpGet.
    #[serde(default)]
    pub protocol: ServingProtocol,

    /// Consumers (default: the pods mounting the model's CSI volume) or Host (the node's host network).
    #[serde(default)]
    pub endpoint: ServingEndpoint,

    /// TCP port of the server's HTTP endpoint.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("serving.port must be 1 to 65535"))]
    pub port: i32,

    /// For HttpGet: the path to GET, e.g. `/models/{model}/{version}/ready`; `{model}` and
    /// `{version}` are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && self.size() <= 1024").message("serving.path must start with / and have at most 1024 characters"))]
    pub path: Option<String>,

    /// Seconds from activation for the server to answer ready for the new version. Not ready in
    /// time: the node is Failed (reason DeploymentFailed), which counts toward
    /// `strategy.failureThreshold` (so `autoRollback` returns it to the previous version, which the
    /// server is then asked to load). Default 300.
    #[serde(default = "default_ready_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("serving.readyTimeoutSeconds must be 1 to 86400"))]
    pub ready_timeout_seconds: i32,

    /// Seconds the server must answer ready, continuously, before the node is Operational (a soak;
    /// a not-ready answer starts it over). Default 0.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("serving.minReadySeconds must be 0 to 3600"))]
    pub min_ready_seconds: i32,

    /// A ready probe slower than this many milliseconds makes the node Degraded; faster again, it
    /// is Operational again. Default: latency is reported, never judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("serving.degradedLatencyMilliseconds must be at least 1"))]
    pub degraded_latency_milliseconds: Option<i32>,
}

fn default_ready_timeout() -> i32 {
    300
}

impl ServingSpec {
    /// The HTTP path probed for `version` of `model`.
    pub fn ready_path(&self, model: &str, version: &str) -> String {
        match self.protocol {
            ServingProtocol::OpenInference => format!("/v2/models/{model}/versions/{version}/ready"),
            ServingProtocol::HttpGet => {
                self.path.as_deref().unwrap_or("/").replace("{model}", model).replace("{version}", version)
            }
        }
    }
}

/// One server probed for the model on the node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServingConsumer {
    /// `namespace/pod` of a consumer pod, or `host` for a server on the host network.
    pub name: String,
    /// `address:port` probed, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Whether it answered ready for the version at the last probe.
    pub ready: bool,
    /// Why it is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Whether the node's model server serves the active version (written by the agent, with `spec.serving`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServingStatus {
    /// The version probed.
    #[serde(default)]
    pub version: String,
    /// Every consumer answers ready for `version` (and there is at least one).
    #[serde(default)]
    pub ready: bool,
    /// Since when `ready` has its current value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The slowest consumer's last ready-probe latency, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_milliseconds: Option<i64>,
    /// The servers probed (at most 16 are listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ServingConsumer>,
}
