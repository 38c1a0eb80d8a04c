//! `peat agent`: one per node. Watches the node's ModelDeployments (field selector on
//! `spec.nodeName`), pulls and verifies the chosen variant into the store, activates it atomically,
//! keeps earlier versions for instant rollback, reports status, publishes the node's ModelNode and
//! labels the Node with its Operational models.
//!
//! One loop owns the decisions (what to pull, in which order, what to report); transfers run as
//! tasks it starts and cancels (a Critical transfer preempts a lower one, which resumes later from
//! its partial download).

pub mod capabilities;
pub mod pull;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use oci_client::secrets::RegistryAuth;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::{self, Admin};
use crate::api::shared::NODE_MODEL_LABEL_PREFIX;
use crate::api::{BlockerReason, DeploymentPhase, ModelDeployment, ModelNode, ModelNodeStatus, NodeModel, Priority};
use crate::controller::parse_duration;
use crate::oci::RegistryAccess;
use crate::oci::client::{auth_from_secret, parse_reference};
use crate::telemetry::LogFormat;
use capabilities::{Capabilities, Overrides};
use pull::{Progress, PullError, PullPlan, RateLimiter, Source, Transfer};
use store::{Store, VersionRecord, is_safe_component};

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

fn parse_quantity(s: &str) -> Result<u64, String> {
    crate::api::quantity::parse_bytes(s).map_err(|e| e.to_string())
}

/// Transfer outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `succeeded`, `failed`, `retrying` or `cancelled`.
    pub(crate) result: &'static str,
}

/// The agent's metrics.
pub(crate) struct Metrics {
    fetched: Counter,
    reused: Counter,
    pub(crate) transfers: Family<ResultLabels, Counter>,
    active: Gauge,
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

/// Shared by the loop and the transfer tasks.
struct Agent {
    client: Client,
    opts: Options,
    store: Store,
    /// What the ModelNode reports; changes when the Node's capability annotations do.
    caps: Mutex<Capabilities>,
    limiter: Option<RateLimiter>,
    metrics: Metrics,
    /// Registry clients by (registry, insecure, fingerprint of the credentials): a client keeps the
    /// credentials it first saw, so other or rotated credentials need a client of their own.
    clients: Mutex<HashMap<(String, bool, String), oci_client::Client>>,
    /// Layers being downloaded (one writer per digest).
    in_flight: pull::InFlight,
    /// Layer digests of each running transfer's plan: garbage collection keeps them.
    pinned: Mutex<HashMap<String, HashSet<String>>>,
    /// Serializes changes of the store's model directories (activation, pruning, collection).
    store_lock: tokio::sync::Mutex<()>,
    /// Wakes the heartbeat early (the inventory changed).
    inventory_changed: tokio::sync::Notify,
}

fn key_of(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// The manifest digest of `<repository>@sha256:…`.
fn artifact_digest(artifact: &str) -> Option<&str> {
    artifact.rsplit_once('@').map(|(_, d)| d)
}

/// What the agent reports in a ModelDeployment's status (compared with what is there before writing).
#[derive(Clone, Debug, PartialEq)]
struct Report {
    phase: DeploymentPhase,
    reason: Option<BlockerReason>,
    message: Option<String>,
    /// (done on the wire, reused, total) when known.
    bytes: Option<(u64, u64, u64)>,
}

impl Report {
    fn phase(phase: DeploymentPhase) -> Report {
        Report { phase, reason: None, message: None, bytes: None }
    }
    fn blocked(phase: DeploymentPhase, reason: BlockerReason, message: String) -> Report {
        Report { phase, reason: Some(reason), message: Some(message), bytes: None }
    }
}

impl Agent {
    async fn source_for(&self, md: &ModelDeployment) -> Result<Source, PullError> {
        let r = parse_reference(&md.spec.artifact)?;
        let registry = r.resolve_registry().to_string();
        let auth = match &md.spec.pull_secret {
            Some(name) => auth_from_secret(&self.client, &md.namespace().unwrap_or_default(), name, &registry).await?,
            None => RegistryAuth::Anonymous,
        };
        let fingerprint = match &auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Basic(u, p) => crate::oci::push::sha256_digest(format!("{u}:{p}").as_bytes()),
            RegistryAuth::Bearer(t) => crate::oci::push::sha256_digest(t.as_bytes()),
        };
        let client = self
            .clients
            .lock()
            .expect("clients lock")
            .entry((registry, md.spec.insecure, fingerprint))
            .or_insert_with(|| RegistryAccess { insecure: md.spec.insecure, auth: RegistryAuth::Anonymous }.client())
            .clone();
        Ok(Source { client, auth })
    }

    /// Writes a ModelDeployment's status from the store's view of its model plus `report`,
    /// unless the status already says exactly that.
    async fn write_status(&self, md: &ModelDeployment, report: &Report) {
        let state = self.store.state(&md.spec.model);
        let current = self.store.current(&md.spec.model);
        let active = current.as_ref().and_then(|v| state.get(v));
        let mut previous: Vec<&VersionRecord> =
            state.versions.iter().filter(|v| Some(&v.version) != current.as_ref()).collect();
        previous.sort_by_key(|v| std::cmp::Reverse(v.activated_at));
        let previous: Vec<String> = previous.into_iter().map(|v| v.version.clone()).collect();
        let old = md.status.clone().unwrap_or_default();
        let same = old.phase == report.phase
            && old.reason == report.reason
            && old.message == report.message
            && old.active_version.as_deref() == active.map(|a| a.version.as_str())
            && old.active_digest.as_deref() == active.map(|a| a.digest.as_str())
            && old.previous_versions == previous
            && old.observed_generation == md.metadata.generation
            && report.bytes.is_none_or(|(d, r, t)| {
                (old.bytes_done, old.bytes_reused, old.bytes_total) == (d as i64, r as i64, t as i64)
            });
        if same {
            return;
        }
        let mut status = serde_json::json!({
            "phase": report.phase,
            "reason": report.reason,
            "message": report.message,
            "activeVersion": active.map(|a| a.version.clone()),
            "activeDigest": active.map(|a| a.digest.clone()),
            "previousVersions": previous,
            "lastHeartbeat": Time(Timestamp::now()),
            "observedGeneration": md.metadata.generation,
        });
        if let Some((done, reused, total)) = report.bytes {
            status["bytesDone"] = done.into();
            status["bytesReused"] = reused.into();
            status["bytesTotal"] = total.into();
        }
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &md.namespace().unwrap_or_default());
        // A merge patch: fields not named (bytes while unknown) keep their values.
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        match api.patch_status(&md.name_any(), &PatchParams::default(), &patch).await {
            Ok(_) => debug!(md = %key_of(md), phase = ?report.phase, "status written"),
            Err(e) => warn!(md = %key_of(md), error = %e, "writing status failed"),
        }
    }
}

/// Per-ModelDeployment memory of the loop.
#[derive(Default)]
struct Tracked {
    artifact: String,
    plan: Option<PullPlan>,
    attempts: u32,
    not_before: Option<Instant>,
    /// A failure only a new artifact fixes: (reason, message).
    failed: Option<(BlockerReason, String)>,
    /// Bytes of the last completed transfer: (fetched, reused, total).
    last_bytes: Option<(u64, u64, u64)>,
}

struct Running {
    artifact: String,
    priority: Priority,
    cancel: CancellationToken,
}

struct Finished {
    key: String,
    artifact: String,
    plan: Option<PullPlan>,
    result: Result<(u64, u64, u64), PullError>,
}

enum Event {
    Changed,
    Done(Box<Finished>),
}

/// The Node's capability annotations (`peat.dev/arch` …), or none when the Node does not exist.
/// At start; later changes are followed by [`follow_capability_annotations`]. Until the Node can be
/// read it retries: starting without the annotations would publish wrong capabilities (a Jetson
/// without its GPU).
async fn read_capability_annotations(client: &Client, node: &str) -> Option<BTreeMap<String, String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut wait = Duration::from_secs(1);
    loop {
        match nodes.get_opt(node).await {
            Ok(Some(n)) => return Some(capabilities::capability_annotations(n.annotations())),
            Ok(None) => {
                warn!(node, "no Node of this name: capabilities from flags and detection only");
                return None;
            }
            Err(e) => {
                warn!(node, error = %e, retry_in = ?wait, "reading the Node for its capability annotations failed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Detects the capabilities with the flags, then `annotations`, over what is detected; says which
/// annotations were malformed. (NVML calls block: run off the runtime.)
async fn detect_capabilities(opts: &Options, annotations: &BTreeMap<String, String>) -> Capabilities {
    let (overrides, problems) = opts.capabilities.with_annotations(annotations);
    for p in problems {
        warn!(node = %opts.node_name, "ignoring a capability annotation: {p}");
    }
    tokio::task::spawn_blocking(move || capabilities::detect(&overrides))
        .await
        .expect("capability detection does not panic")
}

/// Watches this node's Node and, when its capability annotations change from `last`, recomputes
/// what the ModelNode reports and writes it at once (no agent restart needed). Other Node changes
/// (the kubelet's status, our own labels) are ignored.
async fn follow_capability_annotations(
    agent: Arc<Agent>,
    mut last: Option<BTreeMap<String, String>>,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", agent.opts.node_name));
    let mut events = std::pin::pin!(watcher(nodes, wc).default_backoff().applied_objects());
    loop {
        let node = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.next() => match ev {
                Some(Ok(node)) => node,
                Some(Err(e)) => {
                    warn!(error = %e, "watching the Node for capability annotations");
                    continue;
                }
                None => return,
            },
        };
        let now = capabilities::capability_annotations(node.annotations());
        if last.as_ref() == Some(&now) {
            continue;
        }
        let caps = detect_capabilities(&agent.opts, &now).await;
        last = Some(now);
        let changed = {
            let mut current = agent.caps.lock().expect("caps lock");
            std::mem::replace(&mut *current, caps.clone()) != caps
        };
        if changed {
            info!(node = %agent.opts.node_name, ?caps, "capability annotations changed");
            agent.inventory_changed.notify_one();
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    crate::telemetry::init(opts.log_format);
    let client = Client::try_default().await?;
    let store =
        Store::open(&opts.store).map_err(|e| anyhow::anyhow!("opening the store {}: {e}", opts.store.display()))?;
    let annotations = read_capability_annotations(&client, &opts.node_name).await;
    let caps = detect_capabilities(&opts, &annotations.clone().unwrap_or_default()).await;
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
        clients: Mutex::new(HashMap::new()),
        in_flight: pull::InFlight::default(),
        pinned: Mutex::new(HashMap::new()),
        store_lock: tokio::sync::Mutex::new(()),
        inventory_changed: tokio::sync::Notify::new(),
    });
    publish_model_node(&agent).await?;
    let heartbeat = tokio::spawn(heartbeat_loop(agent.clone(), shutdown.clone()));
    let annotations = tokio::spawn(follow_capability_annotations(agent.clone(), annotations, shutdown.clone()));

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
                let _ = tx.send(Event::Changed);
            }
        })
    };
    cache.wait_until_ready().await?;
    ready.store(true, Ordering::Release);
    info!("initial list complete: ready");
    let result = tokio::select! {
        r = decision_loop(agent.clone(), cache, events_tx, events_rx) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    watch.abort();
    heartbeat.abort();
    annotations.abort();
    let _ = admin_task.await;
    result
}

/// Creates the node's ModelNode (owned by the Node when it exists, so it goes with it).
async fn publish_model_node(agent: &Agent) -> anyhow::Result<()> {
    let node = &agent.opts.node_name;
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let owner = match nodes.get_opt(node).await? {
        Some(n) => serde_json::json!([{
            "apiVersion": "v1", "kind": "Node", "name": node, "uid": n.metadata.uid,
        }]),
        None => {
            warn!(%node, "no Node object of this name: the ModelNode will not be removed with it");
            serde_json::json!([])
        }
    };
    let api: Api<ModelNode> = Api::all(agent.client.clone());
    let mn = serde_json::json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode",
        "metadata": {"name": node, "ownerReferences": owner},
        "spec": {},
    });
    api.patch(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&mn)).await?;
    write_heartbeat(agent).await
}

async fn write_heartbeat(agent: &Agent) -> anyhow::Result<()> {
    let (free, total) = agent.store.space(agent.opts.storage_capacity).unwrap_or((0, 0));
    let mut models = Vec::new();
    let mut summary = Vec::new();
    for (model, (state, current)) in agent.store.inventory() {
        for v in &state.versions {
            let active = current.as_deref() == Some(v.version.as_str());
            if active {
                summary.push(format!("{model}={}", v.version));
            }
            models.push(NodeModel {
                model: model.clone(),
                version: v.version.clone(),
                digest: Some(v.digest.clone()),
                active,
            });
        }
    }
    let caps = agent.caps.lock().expect("caps lock").clone();
    let status = ModelNodeStatus {
        arch: Some(caps.arch),
        gpus: caps.gpus,
        gpu_memory_bytes: caps.gpu_memory_bytes,
        providers: caps.providers,
        storage_free_bytes: free as i64,
        storage_total_bytes: total as i64,
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        last_heartbeat: Some(Time(Timestamp::now())),
        models,
        models_summary: (!summary.is_empty()).then(|| summary.join(",")),
    };
    let api: Api<ModelNode> = Api::all(agent.client.clone());
    let body = serde_json::json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode", "status": status});
    api.patch_status(&agent.opts.node_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

async fn heartbeat_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(agent.opts.heartbeat_interval) => {}
            _ = agent.inventory_changed.notified() => {}
        }
        if let Err(e) = write_heartbeat(&agent).await {
            warn!(error = %e, "writing the ModelNode heartbeat failed");
        }
    }
}

/// The loop that decides: reads the cache of this node's ModelDeployments on every change, every
/// finished transfer, and every few seconds (retries, deletions).
async fn decision_loop(
    agent: Arc<Agent>,
    cache: Cache<ModelDeployment>,
    events_tx: mpsc::UnboundedSender<Event>,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> anyhow::Result<()> {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut labels: Option<BTreeMap<String, String>> = None;
    loop {
        let mut s = Sync { agent: &agent, tracked: &mut tracked, running: &mut running, events: &events_tx };
        s.sync(&cache, &mut labels).await;
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Done(done)) => finished(&agent, &cache, &mut tracked, &mut running, *done).await,
                Some(Event::Changed) => {}
                None => return Ok(()),
            },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        // Coalesce a burst of events into one pass.
        while let Ok(ev) = events.try_recv() {
            if let Event::Done(done) = ev {
                finished(&agent, &cache, &mut tracked, &mut running, *done).await;
            }
        }
    }
}

/// A transfer task ended: free its slot and record the outcome.
async fn finished(
    agent: &Agent,
    cache: &Cache<ModelDeployment>,
    tracked: &mut HashMap<String, Tracked>,
    running: &mut HashMap<String, Running>,
    done: Finished,
) {
    let Finished { key, artifact, plan, result } = done;
    running.remove(&key);
    agent.metrics.active.set(running.len() as i64);
    let mds = cache.state();
    let md = mds.iter().find(|m| key_of(m) == key);
    handle_done(agent, tracked, md.map(|m| &**m), &key, artifact, plan, result).await;
}

async fn handle_done(
    agent: &Agent,
    tracked: &mut HashMap<String, Tracked>,
    md: Option<&ModelDeployment>,
    key: &str,
    artifact: String,
    plan: Option<PullPlan>,
    result: Result<(u64, u64, u64), PullError>,
) {
    let Some(t) = tracked.get_mut(key) else { return };
    if t.artifact != artifact {
        return; // the deployment moved on while this transfer ran
    }
    if plan.is_some() {
        t.plan = plan;
    }
    let label = |result| ResultLabels { result };
    match result {
        Ok(bytes) => {
            agent.metrics.transfers.get_or_create(&label("succeeded")).inc();
            info!(md = %key, fetched = bytes.0, reused = bytes.1, total = bytes.2, "active");
            t.attempts = 0;
            t.not_before = None;
            t.last_bytes = Some(bytes);
        }
        Err(PullError::Cancelled) => {
            agent.metrics.transfers.get_or_create(&label("cancelled")).inc();
        }
        Err(e) => {
            t.attempts += 1;
            let Some(md) = md else { return };
            match e.retry_after(t.attempts) {
                Some(after) => {
                    agent.metrics.transfers.get_or_create(&label("retrying")).inc();
                    warn!(md = %key, error = %e, attempt = t.attempts, "transfer failed; retrying in {after:?}");
                    t.not_before = Some(Instant::now() + after);
                    let msg = format!("attempt {} failed: {e}; retrying in {}s", t.attempts, after.as_secs());
                    let phase =
                        if e.is_failure(t.attempts) { DeploymentPhase::Failed } else { DeploymentPhase::Downloading };
                    agent.write_status(md, &Report::blocked(phase, e.reason(), msg)).await;
                }
                None => {
                    agent.metrics.transfers.get_or_create(&label("failed")).inc();
                    warn!(md = %key, error = %e, "transfer failed for good");
                    t.failed = Some((e.reason(), e.to_string()));
                }
            }
        }
    }
}

/// One pass of the decision loop.
struct Sync<'a> {
    agent: &'a Arc<Agent>,
    tracked: &'a mut HashMap<String, Tracked>,
    running: &'a mut HashMap<String, Running>,
    events: &'a mpsc::UnboundedSender<Event>,
}

impl Sync<'_> {
    async fn sync(&mut self, cache: &Cache<ModelDeployment>, labels: &mut Option<BTreeMap<String, String>>) {
        let agent = self.agent;
        let node = agent.opts.node_name.as_str();
        let mut mds: Vec<Arc<ModelDeployment>> = cache
            .state()
            .into_iter()
            .filter(|m| m.spec.node_name == node && m.metadata.deletion_timestamp.is_none())
            .collect();
        // The oldest deployment of a model holds it; another one for the same model waits (NodeBusy).
        mds.sort_by(|a, b| {
            (&a.metadata.creation_timestamp, key_of(a)).cmp(&(&b.metadata.creation_timestamp, key_of(b)))
        });
        let mut holders: BTreeMap<String, Arc<ModelDeployment>> = BTreeMap::new();
        let mut wanted: Vec<(Priority, String, Arc<ModelDeployment>)> = Vec::new();
        let mut operational: BTreeMap<String, String> = BTreeMap::new();
        // Deployments that still need bytes (running, queued, paused, retrying): their partials stay.
        let mut unsettled: Vec<String> = Vec::new();
        for md in &mds {
            let key = key_of(md);
            if let Some(holder) = holders.get(&md.spec.model) {
                let msg = format!("{} already holds model {} on this node", key_of(holder), md.spec.model);
                agent.write_status(md, &Report::blocked(DeploymentPhase::Failed, BlockerReason::NodeBusy, msg)).await;
                continue;
            }
            holders.insert(md.spec.model.clone(), md.clone());
            let t = self.tracked.entry(key.clone()).or_default();
            if t.artifact != md.spec.artifact {
                *t = Tracked { artifact: md.spec.artifact.clone(), ..Default::default() };
            }
            if self.running.contains_key(&key) && !md.spec.paused {
                unsettled.push(key.clone());
                if self.running[&key].artifact == md.spec.artifact {
                    wanted.push((md.spec.priority, key, md.clone()));
                }
                continue; // the transfer task reports
            }
            match self.settle(md).await {
                Settled::Done => {
                    if let Some(v) = label_value(&md.spec.version) {
                        operational.insert(format!("{NODE_MODEL_LABEL_PREFIX}{}", md.spec.model), v);
                    }
                }
                Settled::NeedsTransfer => {
                    unsettled.push(key.clone());
                    wanted.push((md.spec.priority, key, md.clone()));
                }
                Settled::Waiting => {
                    if self.tracked.get(&key).is_some_and(|t| t.failed.is_none()) {
                        unsettled.push(key);
                    }
                }
            }
        }
        self.schedule(wanted).await;
        // Transfers of deployments that are gone, paused or satisfied stop (their partials stay).
        let keep: HashSet<String> = mds.iter().filter(|m| !m.spec.paused).map(|m| key_of(m)).collect();
        for (key, r) in self.running.iter() {
            let still = keep.contains(key) && self.tracked.get(key).is_some_and(|t| t.artifact == r.artifact);
            if !still {
                r.cancel.cancel();
            }
        }
        self.tracked.retain(|k, _| mds.iter().any(|m| &key_of(m) == k));
        self.collect_garbage(&holders, &unsettled).await;
        if labels.as_ref() != Some(&operational) {
            match apply_node_labels(agent, &operational).await {
                Ok(()) => *labels = Some(operational),
                Err(e) => warn!(error = %e, "labelling the Node failed"),
            }
        }
    }

    /// Brings a deployment as far as it goes without a transfer: already active, a kept version
    /// switched to at once, paused, or failed for good.
    async fn settle(&mut self, md: &ModelDeployment) -> Settled {
        let agent = self.agent;
        let key = key_of(md);
        let spec = &md.spec;
        if !is_safe_component(&spec.model) || !is_safe_component(&spec.version) {
            let msg = format!("model {:?} or version {:?} cannot name a directory", spec.model, spec.version);
            return self.fail_for_good(md, BlockerReason::DeploymentFailed, msg).await;
        }
        let Some(digest) = artifact_digest(&spec.artifact) else {
            let msg = format!("artifact {:?} is not referenced by digest", spec.artifact);
            return self.fail_for_good(md, BlockerReason::TransferFailed, msg).await;
        };
        let t = self.tracked.get_mut(&key).expect("tracked above");
        let state = agent.store.state(&spec.model);
        let current = agent.store.current(&spec.model);
        let on_disk = state.get(&spec.version).filter(|v| v.digest == digest);
        let is_active = on_disk.is_some() && current.as_deref() == Some(spec.version.as_str());
        if is_active {
            let report = Report { bytes: t.last_bytes, ..Report::phase(DeploymentPhase::Operational) };
            agent.write_status(md, &report).await;
            return Settled::Done;
        }
        if spec.paused {
            let phase = md.status.as_ref().map_or(DeploymentPhase::NotDeployed, |s| match s.phase {
                DeploymentPhase::Downloading | DeploymentPhase::Loading => DeploymentPhase::Downloading,
                _ => DeploymentPhase::NotDeployed,
            });
            let report = Report { message: Some("paused; resumes where it stopped".into()), ..Report::phase(phase) };
            agent.write_status(md, &report).await;
            return Settled::Waiting;
        }
        if let Some(record) = on_disk {
            // Kept version: switch to it, no bytes moved.
            let total: u64 = record.files.iter().map(|f| f.size).sum();
            let _guard = agent.store_lock.lock().await;
            let res = agent.store.activate(&spec.model, &spec.version);
            drop(_guard);
            match res {
                Ok(()) => {
                    info!(md = %key, version = %spec.version, "switched to a kept version");
                    agent.inventory_changed.notify_one();
                    t.last_bytes = Some((0, total, total));
                    let report = Report { bytes: t.last_bytes, ..Report::phase(DeploymentPhase::Operational) };
                    agent.write_status(md, &report).await;
                    return Settled::Done;
                }
                Err(e) => {
                    let msg = format!("activating kept version {}: {e}", spec.version);
                    return self.fail_for_good(md, BlockerReason::DeploymentFailed, msg).await;
                }
            }
        }
        if let Some((reason, message)) = t.failed.clone() {
            agent.write_status(md, &Report::blocked(DeploymentPhase::Failed, reason, message)).await;
            return Settled::Waiting;
        }
        if t.not_before.is_some_and(|nb| Instant::now() < nb) {
            return Settled::Waiting; // the failure's status stands until the retry
        }
        Settled::NeedsTransfer
    }

    /// Reports a failure only a change of the deployment can fix, and remembers it.
    async fn fail_for_good(&mut self, md: &ModelDeployment, reason: BlockerReason, msg: String) -> Settled {
        if let Some(t) = self.tracked.get_mut(&key_of(md)) {
            t.failed = Some((reason, msg.clone()));
        }
        self.agent.write_status(md, &Report::blocked(DeploymentPhase::Failed, reason, msg)).await;
        Settled::Waiting
    }

    /// Starts the most urgent wanted transfers within the limit; a waiting Critical one preempts
    /// the least urgent running non-Critical transfer.
    async fn schedule(&mut self, mut wanted: Vec<(Priority, String, Arc<ModelDeployment>)>) {
        let limit = usize::from(self.agent.opts.max_concurrent_pulls);
        wanted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut waiting = Vec::new();
        for (priority, key, md) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            if self.running.len() < limit {
                self.start(md).await;
                continue;
            }
            if priority == Priority::Critical
                && let Some((victim, _)) = self
                    .running
                    .iter()
                    .filter(|(_, r)| r.priority < Priority::Critical && !r.cancel.is_cancelled())
                    .min_by_key(|(_, r)| r.priority)
            {
                info!(md = %key, preempted = %victim, "a Critical transfer preempts a lower one");
                self.running[victim].cancel.cancel();
            }
            waiting.push(md);
        }
        for (i, md) in waiting.iter().enumerate() {
            let msg = format!("waiting for a transfer slot ({} ahead)", i + self.running.len());
            self.agent
                .write_status(md, &Report { message: Some(msg), ..Report::phase(DeploymentPhase::Downloading) })
                .await;
        }
    }

    async fn start(&mut self, md: Arc<ModelDeployment>) {
        let key = key_of(&md);
        let t = self.tracked.get_mut(&key).expect("tracked");
        let cancel = CancellationToken::new();
        self.running.insert(
            key.clone(),
            Running { artifact: md.spec.artifact.clone(), priority: md.spec.priority, cancel: cancel.clone() },
        );
        self.agent.metrics.active.set(self.running.len() as i64);
        let agent = self.agent.clone();
        let plan = t.plan.clone();
        let tx = self.events.clone();
        let artifact = md.spec.artifact.clone();
        tokio::spawn(async move {
            let (plan, result) = transfer(&agent, &md, plan, &cancel).await;
            let _ = tx.send(Event::Done(Box::new(Finished { key, artifact, plan, result })));
        });
    }

    /// Removes models no deployment wants, and blobs and partials nothing uses. Partials are kept
    /// while a deployment that still needs bytes has no known plan (its partials are unknown).
    async fn collect_garbage(&mut self, holders: &BTreeMap<String, Arc<ModelDeployment>>, unsettled: &[String]) {
        let agent = self.agent;
        let _guard = agent.store_lock.lock().await;
        let mut changed = false;
        for model in agent.store.models() {
            if !holders.contains_key(&model) {
                match agent.store.remove_model(&model) {
                    Ok(()) => {
                        info!(%model, "removed: no ModelDeployment wants it any more");
                        changed = true;
                    }
                    Err(e) => warn!(%model, error = %e, "removing an unwanted model failed"),
                }
            }
        }
        // Blobs: keep those of every known plan and of every running transfer. Partials: only when
        // the plan of every deployment that still needs bytes is known (else whose they are is not).
        let mut keep: HashSet<String> =
            self.tracked.values().filter_map(|t| t.plan.as_ref()).flat_map(|p| p.digests()).collect();
        keep.extend(agent.pinned.lock().expect("pinned lock").values().flatten().cloned());
        let all_known = unsettled.iter().all(|k| self.tracked.get(k).is_some_and(|t| t.plan.is_some()));
        {
            match agent.store.collect_garbage(&keep, all_known) {
                Ok(0) => {}
                Ok(freed) => {
                    info!(freed, "collected unused blobs and partial downloads");
                    changed = true;
                }
                Err(e) => warn!(error = %e, "collecting garbage failed"),
            }
        }
        if changed {
            agent.inventory_changed.notify_one();
        }
    }
}

enum Settled {
    /// Operational.
    Done,
    /// Needs bytes from the registry.
    NeedsTransfer,
    /// Paused, failed for good, or waiting for a retry.
    Waiting,
}

/// A version as a label value (63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends).
fn label_value(version: &str) -> Option<String> {
    let ok = !version.is_empty()
        && version.len() <= 63
        && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version.ends_with(|c: char| c.is_ascii_alphanumeric());
    ok.then(|| version.to_string())
}

/// Sets the Node's `models.peat.dev/<model>` labels to exactly `labels` (server-side apply: labels
/// this manager set before and leaves out now are removed).
async fn apply_node_labels(agent: &Agent, labels: &BTreeMap<String, String>) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": agent.opts.node_name, "labels": labels},
    });
    nodes.patch(&agent.opts.node_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// One transfer: plan (manifest by digest), fetch, verify, materialize, activate. Reports progress
/// while it runs. Returns the plan (kept for retries and garbage collection) and the bytes moved.
async fn transfer(
    agent: &Arc<Agent>,
    md: &ModelDeployment,
    plan: Option<PullPlan>,
    cancel: &CancellationToken,
) -> (Option<PullPlan>, Result<(u64, u64, u64), PullError>) {
    let source = match agent.source_for(md).await {
        Ok(s) => s,
        Err(e) => return (plan, Err(e)),
    };
    let max_size = md.spec.max_size_bytes.map(|m| m.max(0) as u64);
    let plan = match plan {
        Some(p) => p,
        None => {
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return (None, Err(PullError::Cancelled)),
                p = pull::fetch_plan(&source, &md.spec.artifact, max_size) => p,
            };
            match fetched {
                Ok(p) => p,
                Err(e) => return (None, Err(e)),
            }
        }
    };
    agent.pinned.lock().expect("pinned lock").insert(key_of(md), plan.digests());
    let result = fetch_and_activate(agent, md, &source, &plan, cancel).await;
    agent.pinned.lock().expect("pinned lock").remove(&key_of(md));
    (Some(plan), result)
}

async fn fetch_and_activate(
    agent: &Arc<Agent>,
    md: &ModelDeployment,
    source: &Source,
    plan: &PullPlan,
    cancel: &CancellationToken,
) -> Result<(u64, u64, u64), PullError> {
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let reporter = {
        let stop = stop.clone();
        let agent = agent.clone();
        let md = md.clone();
        let progress = progress.clone();
        let interval = agent.opts.progress_interval;
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let bytes = (
                    progress.fetched.load(Ordering::Relaxed),
                    progress.reused.load(Ordering::Relaxed),
                    progress.total.load(Ordering::Relaxed),
                );
                if last != Some(bytes) {
                    let report = Report { bytes: Some(bytes), ..Report::phase(DeploymentPhase::Downloading) };
                    agent.write_status(&md, &report).await;
                    last = Some(bytes);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    };
    let started = Instant::now();
    let t = Transfer {
        store: &agent.store,
        source,
        progress: &progress,
        cancel,
        limiter: agent.limiter.as_ref(),
        capacity: agent.opts.storage_capacity,
        in_flight: &agent.in_flight,
        delta: md.spec.delta,
        model: &md.spec.model,
    };
    let fetched = pull::fetch_layers(&t, plan).await;
    // Stopped and awaited, so no progress write lands after the final status.
    stop.cancel();
    let _ = reporter.await;
    let bytes = (
        progress.fetched.load(Ordering::Relaxed),
        progress.reused.load(Ordering::Relaxed),
        progress.total.load(Ordering::Relaxed),
    );
    agent.metrics.fetched.inc_by(bytes.0);
    fetched?;
    agent.metrics.reused.inc_by(bytes.1);
    debug!(md = %key_of(md), elapsed = ?started.elapsed(), fetched = bytes.0, "layers fetched and verified");
    let report = Report { bytes: Some(bytes), ..Report::phase(DeploymentPhase::Loading) };
    agent.write_status(md, &report).await;
    let record = VersionRecord {
        version: md.spec.version.clone(),
        digest: plan.manifest_digest.clone(),
        files: plan.records(),
        activated_at: 0,
    };
    let activated = {
        let _guard = agent.store_lock.lock().await;
        // Superseded (spec changed, preempted) after the bytes arrived: do not switch to it.
        if cancel.is_cancelled() {
            return Err(PullError::Cancelled);
        }
        agent
            .store
            .materialize(&md.spec.model, &record)
            .and_then(|()| agent.store.activate(&md.spec.model, &md.spec.version))
            .and_then(|()| agent.store.prune(&md.spec.model, agent.opts.keep_versions).map(|_| ()))
    };
    agent.inventory_changed.notify_one();
    debug!(md = %key_of(md), elapsed = ?started.elapsed(), "activated");
    activated.map(|()| bytes).map_err(PullError::Io)
}
