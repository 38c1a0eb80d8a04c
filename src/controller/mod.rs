//! `peat controller`: reconciles ModelRollouts into per-node ModelDeployments and aggregates their status.
//!
//! - [`options`]: the flags.
//! - `watches`: four reflectors (ModelRollouts, ModelDeployments, ModelNodes, Nodes) run for the
//!   whole life of the process, so every replica keeps a warm cache; their events are mapped to
//!   the rollouts they concern and broadcast.
//! - `leader`: only the replica holding the Lease runs the Controller over those triggers, so only it writes.
//! - `triggers`: how triggers and retries become reconciles (none lost, none starved).
//! - `reconcile`: one reconcile as a pipeline, observe → resolve → plan → apply → status; the
//!   decisions are pure functions in [`crate::plan`], the writes are in `writes`.
//! - [`resolve`]: tags and digests from the registry; [`metrics`]: what /metrics shows.

mod context;
mod leader;
pub mod metrics;
pub mod options;
mod reconcile;
pub mod resolve;
mod secrets;
mod triggers;
mod watches;
mod writes;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tracing::info;

use crate::admin::{self, Admin};
use crate::api::ModelRollout;
use context::Context;

pub use leader::{lease_field_manager, lease_manager};
pub use options::Options;
pub use reconcile::{Error, FIELD_MANAGER, FINALIZER};

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    crate::telemetry::init(opts.log_format);
    let client = Client::try_default().await?;
    let shutdown = crate::telemetry::shutdown_on_signals();

    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Admin { ready: ready.clone(), registry: Arc::new(registry) };
    let (addr, admin_task) = admin::serve(opts.metrics_addr, admin, shutdown.clone()).await?;
    info!(%addr, "serving /livez, /readyz and /metrics");

    let (triggers, _) = broadcast::channel::<ObjectRef<ModelRollout>>(16_384);
    let mut reflectors = tokio::task::JoinSet::new();
    let caches = watches::start(&client, opts.heartbeat_timeout, &triggers, &mut reflectors);
    let ready_rx = watches::readiness(&caches, ready);

    let identity = opts.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "peat".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        rollouts: caches.rollouts,
        deployments: caches.deployments,
        model_nodes: caches.model_nodes,
        nodes: caches.nodes,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "peat-controller".into(), instance: Some(identity.clone()) },
        ),
        metrics,
        resolver: resolve::Resolver::default(),
        failures: Mutex::new(HashMap::new()),
        heartbeat_timeout: opts.heartbeat_timeout,
        secret_namespace: opts.secret_namespace.clone().unwrap_or_else(|| opts.lease_namespace.clone()),
        secret_copies: Mutex::new(HashMap::new()),
    });

    let result = if opts.leader_elect {
        leader::run_with_leader_election(&opts, &identity, ctx.clone(), triggers, ready_rx, shutdown.clone()).await
    } else {
        ctx.metrics.leader.set(1);
        leader::run_controller(ctx.clone(), triggers, ready_rx, shutdown.clone()).await;
        Ok(())
    };
    shutdown.cancel();
    reflectors.abort_all();
    let _ = admin_task.await;
    result
}
