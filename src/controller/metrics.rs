//! Controller metrics (prometheus-client). Labels are bounded: error categories are a fixed set,
//! per-rollout gauges carry namespace/name of existing rollouts only (removed on deletion).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Error category label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `kube`, `source`, `invalid_spec` or `finalizer`.
    pub category: &'static str,
}

/// Per-rollout label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    /// Namespace of the rollout.
    pub namespace: String,
    /// Name of the rollout.
    pub name: String,
}

impl RolloutLabels {
    /// The labels of rollout `r`.
    pub fn of(r: &crate::api::ModelRollout) -> Self {
        use kube::ResourceExt;
        RolloutLabels { namespace: r.namespace().unwrap_or_default(), name: r.name_any() }
    }
}

/// The controller's metrics.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconcile errors by category.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration.
    pub duration: Histogram,
    /// Targets converged, per rollout.
    pub converged: Family<RolloutLabels, Gauge>,
    /// Targets failed, per rollout.
    pub failed: Family<RolloutLabels, Gauge>,
    /// Targets in total, per rollout.
    pub total: Family<RolloutLabels, Gauge>,
    /// Targets whose model server serves the rollout's version, per rollout (with `spec.serving`).
    pub serving: Family<RolloutLabels, Gauge>,
    /// ModelDeployment writes (applies and deletes) issued.
    pub deployment_writes: Counter,
    /// Status writes issued.
    pub status_writes: Counter,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            converged: Family::default(),
            failed: Family::default(),
            total: Family::default(),
            serving: Family::default(),
            deployment_writes: Counter::default(),
            status_writes: Counter::default(),
            leader: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("peat_controller");
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register("reconcile_errors", "Reconcile errors by category", m.errors.clone());
        r.register("reconcile_duration_seconds", "Reconcile duration", m.duration.clone());
        r.register("rollout_converged_targets", "Targets running the rollout's version", m.converged.clone());
        r.register("rollout_failed_targets", "Targets that failed", m.failed.clone());
        r.register("rollout_targets", "Targets in scope", m.total.clone());
        r.register(
            "rollout_serving_targets",
            "Targets whose model server serves the rollout's version (spec.serving)",
            m.serving.clone(),
        );
        r.register("deployment_writes", "ModelDeployment applies and deletes issued", m.deployment_writes.clone());
        r.register("status_writes", "ModelRollout status writes issued", m.status_writes.clone());
        r.register("leader", "1 while this replica holds the lease", m.leader.clone());
        m
    }

    /// Forgets a deleted rollout's series.
    pub fn forget(&self, labels: &RolloutLabels) {
        self.converged.remove(labels);
        self.failed.remove(labels);
        self.total.remove(labels);
        self.serving.remove(labels);
    }
}
