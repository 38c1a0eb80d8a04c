//! Flags of `peat controller`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::telemetry::LogFormat;
use crate::units::parse_duration;

/// Flags of `peat controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", env = "PEAT_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// A ModelNode heartbeat older than this marks its node NetworkPartition (nine of the agent's default 10 s heartbeats).
    #[arg(long, default_value = "90s", value_parser = parse_duration, env = "PEAT_HEARTBEAT_TIMEOUT")]
    pub heartbeat_timeout: Duration,
    /// Elect a leader through a Lease, so that several replicas run with one writer.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "PEAT_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace from POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Namespace the pull secrets that rollouts name are copied into, the only one where agents may
    /// read Secrets (default: the Lease's namespace, i.e. the chart's).
    #[arg(long)]
    pub secret_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "peat-controller")]
    pub lease_name: String,
    /// How long a Lease stays valid without renewal; a new leader takes over after it.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (default: POD_NAME, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "PEAT_LOG_FORMAT")]
    pub log_format: LogFormat,
}
