//! `peat agent`: one per node. Watches the node's ModelDeployments (field selector on
//! `spec.nodeName`, or the `peat.dev/node` label on servers without CRD selectable fields), pulls and verifies the chosen variant into the store, activates it atomically,
//! keeps earlier versions for instant rollback, reports status, publishes the node's ModelNode and
//! labels the Node with its Operational models.
//!
//! One loop owns the decisions (what to pull, in which order, what to report); transfers run as
//! tasks it starts and cancels (a Critical transfer preempts a lower one, which resumes later from
//! its partial download).

mod act;
pub mod capabilities;
mod context;
pub mod csi;
pub mod decide;
pub mod metrics;
mod node;
pub mod options;
pub mod outcome;
mod probe;
mod report;
pub mod serving;
pub mod store;
pub mod transfer;

pub use context::FIELD_MANAGER;
pub use options::Options;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::{self, Admin};
use crate::api::ModelDeployment;
use crate::oci::client::Clients;
use act::Wake;
use context::Agent;
use metrics::Metrics;
use store::Store;
use transfer::RateLimiter;

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    crate::telemetry::init(opts.log_format);
    let client = Client::try_default().await?;
    let store =
        Store::open(&opts.store).map_err(|e| anyhow::anyhow!("opening the store {}: {e}", opts.store.display()))?;
    let annotations = node::read_capability_annotations(&client, &opts.node_name).await;
    let caps = node::detect_capabilities(&opts, &annotations.clone().unwrap_or_default()).await;
    info!(node = %opts.node_name, store = %store.root().display(), ?caps, "starting");
    let shutdown = crate::telemetry::shutdown_on_signals();
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Admin { ready: ready.clone(), registry: Arc::new(registry) };
    let (addr, admin_task) = admin::serve(opts.metrics_addr, admin, shutdown.clone()).await?;
    info!(%addr, "serving /livez, /readyz and /metrics");

    let agent = Arc::new(Agent {
        client: client.clone(),
        limiter: opts.max_bandwidth.map(RateLimiter::new),
        opts: opts.clone(),
        store,
        caps: Mutex::new(caps),
        metrics,
        clients: Clients::default(),
        in_flight: transfer::InFlight::default(),
        pinned: Mutex::new(HashMap::new()),
        wanted: Mutex::new(Default::default()),
        store_lock: tokio::sync::Mutex::new(()),
        inventory_changed: tokio::sync::Notify::new(),
        serving: Default::default(),
    });
    report::publish_model_node(&agent).await?;
    let heartbeat = tokio::spawn(report::heartbeat_loop(agent.clone(), shutdown.clone()));
    let annotations = tokio::spawn(node::follow_capability_annotations(agent.clone(), annotations, shutdown.clone()));

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (cache, writer) = reflector::store();
    let api: Api<ModelDeployment> = Api::all(client.clone());
    let wc = node::deployments_selector(&client, &opts.node_name).await?;
    // Every event (deletions too) wakes the loop.
    let stream = watcher::watcher(api, wc).default_backoff().reflect(writer);
    let watch = follow(stream, "watching ModelDeployments", Some(events_tx.clone()));
    let csi = opts.csi_kubelet_dir.clone().map(|dir| {
        let (agent, shutdown) = (agent.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = csi::serve(agent, &dir, shutdown).await {
                warn!(error = %e, "the CSI driver stopped");
            }
        })
    });
    // The pods on this node, for the addresses of the model's consumers (with the CSI driver only).
    let (pods, pods_watch) = match &opts.csi_kubelet_dir {
        Some(_) => {
            let (pods, writer) = reflector::store();
            let api: Api<Pod> = Api::all(client.clone());
            let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
            let stream = watcher::watcher(api, wc)
                .default_backoff()
                .modify(|p: &mut Pod| p.managed_fields_mut().clear())
                .reflect(writer);
            (Some(pods), Some(follow(stream, "watching the node's pods", None)))
        }
        None => (None, None),
    };
    let prober = tokio::spawn(probe::probe_loop(agent.clone(), cache.clone(), pods, events_tx.clone()));
    cache.wait_until_ready().await?;
    ready.store(true, Ordering::Release);
    info!("initial list complete: ready");
    let result = tokio::select! {
        r = act::decision_loop(agent.clone(), cache, events_tx, events_rx) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    watch.abort();
    prober.abort();
    if let Some(t) = pods_watch {
        t.abort();
    }
    heartbeat.abort();
    annotations.abort();
    if let Some(csi) = csi {
        // It ends on the shutdown signal, removing its socket (the kubelet then deregisters it).
        let _ = csi.await;
    }
    let _ = admin_task.await;
    result
}

/// Drives a watch (feeding its cache) for the life of the agent, logging its errors; every event
/// wakes the decision loop when `wake` is given.
fn follow<K: Send + 'static>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    what: &'static str,
    wake: Option<mpsc::UnboundedSender<Wake>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                warn!(error = %e, "{what}");
            }
            if let Some(wake) = &wake {
                let _ = wake.send(Wake::Changed);
            }
        }
    })
}
