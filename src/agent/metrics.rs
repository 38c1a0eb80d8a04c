//! The agent's metrics (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Transfer outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `succeeded`, `failed`, `retrying` or `cancelled`.
    pub(crate) result: &'static str,
}

/// The agent's metrics.
pub(crate) struct Metrics {
    pub(crate) fetched: Counter,
    pub(crate) reused: Counter,
    pub(crate) transfers: Family<ResultLabels, Counter>,
    pub(crate) active: Gauge,
}

impl Metrics {
    pub(crate) fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            fetched: Counter::default(),
            reused: Counter::default(),
            transfers: Family::default(),
            active: Gauge::default(),
        };
        registry.register("peat_agent_bytes_fetched", "Bytes received from registries", m.fetched.clone());
        registry.register(
            "peat_agent_bytes_reused",
            "Bytes taken from the store instead of the wire",
            m.reused.clone(),
        );
        registry.register("peat_agent_transfers", "Finished transfers by result", m.transfers.clone());
        registry.register("peat_agent_transfers_active", "Transfers running now", m.active.clone());
        m
    }
}
