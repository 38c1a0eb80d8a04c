//! `peat agent`: one per node. Watches the node's ModelDeployments (field selector on
//! `spec.nodeName`), pulls and verifies the chosen variant into the store, activates it atomically,
//! keeps earlier versions for instant rollback, reports status, publishes the node's ModelNode and
//! labels the Node with its Operational models.
//!
//! One loop owns the decisions (what to pull, in which order, what to report); transfers run as
//! tasks it starts and cancels (a Critical transfer preempts a lower one, which resumes later from
//! its partial download).

mod act;
pub mod capabilities;
pub mod decide;
pub(crate) mod metrics;
mod report;
pub mod store;
pub mod transfer;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use oci_client::secrets::RegistryAuth;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::{self, Admin};
use crate::api::ModelDeployment;
use crate::oci::client::{Clients, auth_from_secret, parse_reference};
use crate::telemetry::LogFormat;
use crate::units::{parse_duration, parse_quantity};
use act::Wake;
use capabilities::{Capabilities, Overrides};
use metrics::Metrics;
use store::Store;
use transfer::{RateLimiter, Source, TransferError};

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "peat-agent";

/// Options of `peat agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// This node's name (the Downward API's `spec.nodeName` in the chart).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
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
    /// Capability overrides.
    #[command(flatten)]
    pub capabilities: Overrides,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "PEAT_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// Shared by the loop and the transfer tasks.
pub(crate) struct Agent {
    client: Client,
    opts: Options,
    store: Store,
    /// What the ModelNode reports; changes when the Node's capability annotations do.
    caps: Mutex<Capabilities>,
    limiter: Option<RateLimiter>,
    metrics: Metrics,
    /// Registry clients by registry and credentials.
    clients: Clients,
    /// Layers being downloaded (one writer per digest).
    in_flight: transfer::InFlight,
    /// Layer digests of each running transfer's plan: garbage collection keeps them.
    pinned: Mutex<HashMap<String, HashSet<String>>>,
    /// Serializes changes of the store's model directories (activation, pruning, collection).
    store_lock: tokio::sync::Mutex<()>,
    /// Wakes the heartbeat early (the inventory changed).
    inventory_changed: tokio::sync::Notify,
}

impl Agent {
    async fn source_for(&self, md: &ModelDeployment) -> Result<Source, TransferError> {
        let r = parse_reference(&md.spec.artifact)?;
        let registry = r.resolve_registry().to_string();
        let auth = match &md.spec.pull_secret {
            Some(name) => auth_from_secret(&self.client, &md.namespace().unwrap_or_default(), name, &registry).await?,
            None => RegistryAuth::Anonymous,
        };
        let client = self.clients.get(&registry, md.spec.insecure, &auth);
        Ok(Source { client, auth })
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    crate::telemetry::init(opts.log_format);
    let client = Client::try_default().await?;
    let store =
        Store::open(&opts.store).map_err(|e| anyhow::anyhow!("opening the store {}: {e}", opts.store.display()))?;
    let annotations = capabilities::read_capability_annotations(&client, &opts.node_name).await;
    let caps = capabilities::detect_capabilities(&opts, &annotations.clone().unwrap_or_default()).await;
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
        store_lock: tokio::sync::Mutex::new(()),
        inventory_changed: tokio::sync::Notify::new(),
    });
    report::publish_model_node(&agent).await?;
    let heartbeat = tokio::spawn(report::heartbeat_loop(agent.clone(), shutdown.clone()));
    let annotations =
        tokio::spawn(capabilities::follow_capability_annotations(agent.clone(), annotations, shutdown.clone()));

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (cache, writer) = reflector::store();
    let api: Api<ModelDeployment> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
    let watch = {
        let tx = events_tx.clone();
        // Every event (deletions too) wakes the loop.
        let stream = watcher::watcher(api, wc).default_backoff().reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "watching ModelDeployments"),
                }
                let _ = tx.send(Wake::Changed);
            }
        })
    };
    cache.wait_until_ready().await?;
    ready.store(true, Ordering::Release);
    info!("initial list complete: ready");
    let result = tokio::select! {
        r = act::decision_loop(agent.clone(), cache, events_tx, events_rx) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    watch.abort();
    heartbeat.abort();
    annotations.abort();
    let _ = admin_task.await;
    result
}
