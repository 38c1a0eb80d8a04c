//! The agent's metrics (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Transfer outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `succeeded`, `failed`, `retrying` or `cancelled`.
    pub result: &'static str,
}

/// The agent's metrics.
pub struct Metrics {
    /// `peat_agent_bytes_fetched`: bytes received from registries.
    pub fetched: Counter,
    /// `peat_agent_bytes_reused`: bytes taken from the store instead of the wire.
    pub reused: Counter,
    /// `peat_agent_transfers`: finished transfers by result.
    pub transfers: Family<ResultLabels, Counter>,
    /// `peat_agent_transfers_active`: transfers running now.
    pub active: Gauge,
    /// `peat_agent_models_serving`: deployments of this node whose model server serves the active version.
    pub serving: Gauge,
    /// `peat_agent_models_staged`: deployments with `spec.serving` active on disk but not served.
    pub staged: Gauge,
    /// `peat_agent_serving_probe_seconds`: latency of the model servers' ready probes that answered.
    pub probe_latency: Histogram,
}

impl Metrics {
    /// Registers every metric of the agent in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            fetched: Counter::default(),
            reused: Counter::default(),
            transfers: Family::default(),
            active: Gauge::default(),
            serving: Gauge::default(),
            staged: Gauge::default(),
            probe_latency: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        };
        registry.register("peat_agent_bytes_fetched", "Bytes received from registries", m.fetched.clone());
        registry.register(
            "peat_agent_bytes_reused",
            "Bytes taken from the store instead of the wire",
            m.reused.clone(),
        );
        registry.register("peat_agent_transfers", "Finished transfers by result", m.transfers.clone());
        registry.register("peat_agent_transfers_active", "Transfers running now", m.active.clone());
        registry.register(
            "peat_agent_models_serving",
            "Deployments whose model server serves the active version",
            m.serving.clone(),
        );
        registry.register(
            "peat_agent_models_staged",
            "Deployments with spec.serving active on disk but not served",
            m.staged.clone(),
        );
        registry.register(
            "peat_agent_serving_probe_seconds",
            "Latency of the model servers' ready probes that answered",
            m.probe_latency.clone(),
        );
        m
    }
}
