//! Flags of `peat agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::capabilities::Overrides;
use crate::telemetry::LogFormat;
use crate::units::{parse_duration, parse_quantity};

/// Options of `peat agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// This node's name (the Downward API's `spec.nodeName` in the chart).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Namespace of the pull secret copies the controller writes (the chart's, from POD_NAMESPACE):
    /// the only Secrets the agent reads. Without it the agent reads a deployment's pull secret in
    /// the deployment's namespace (which needs cluster-wide read access to Secrets).
    #[arg(long, env = "POD_NAMESPACE")]
    pub secret_namespace: Option<String>,
    /// The store directory (a hostPath in the chart).
    #[arg(long, default_value = "/var/lib/peat", env = "PEAT_STORE")]
    pub store: PathBuf,
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8081", env = "PEAT_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// How often the ModelNode heartbeat (capabilities, storage, inventory) is written.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Least time between two progress writes of one transfer.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub progress_interval: Duration,
    /// Transfers running at once; more wait, highest priority first.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_pulls: u16,
    /// Versions kept on disk besides the active one, so rolling back to them moves no bytes.
    #[arg(long, default_value_t = 2)]
    pub keep_versions: usize,
    /// Cap on download bandwidth, bytes per second for all transfers together (`10Mi`).
    #[arg(long, value_parser = parse_quantity)]
    pub max_bandwidth: Option<u64>,
    /// Most bytes the store may occupy on its filesystem (`20Gi`); reported as the node's storage.
    #[arg(long, value_parser = parse_quantity)]
    pub storage_capacity: Option<u64>,
    /// The kubelet's root directory (`/var/lib/kubelet`): serve the CSI driver `models.peat.dev`
    /// there (registered through its `plugins_registry/`), so pods mount models as CSI volumes.
    /// Without it, no driver.
    #[arg(long, env = "PEAT_CSI_KUBELET_DIR")]
    pub csi_kubelet_dir: Option<PathBuf>,
    /// The node's address, where a model server on the host network (`serving.endpoint: Host`) is
    /// probed (the chart passes the Downward API's `status.hostIP`).
    #[arg(long, default_value = "127.0.0.1", env = "HOST_IP")]
    pub host_address: String,
    /// How often the model servers of deployments with `spec.serving` are probed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub serving_interval: Duration,
    /// Capability overrides.
    #[command(flatten)]
    pub capabilities: Overrides,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "PEAT_LOG_FORMAT")]
    pub log_format: LogFormat,
}
