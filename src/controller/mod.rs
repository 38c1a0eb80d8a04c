//! `peat controller`: reconciles ModelRollouts into per-node ModelDeployments and aggregates their status.
//!
//! Wiring: four reflectors (ModelRollouts, ModelDeployments, ModelNodes, Nodes) run for the whole
//! life of the process, so every replica keeps a warm cache; their events are mapped to the
//! rollouts they concern and broadcast. Only the replica holding the Lease runs the kube-runtime
//! Controller over those triggers, so only it writes.

pub mod metrics;
mod reconcile;
pub mod resolve;
mod triggers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Admin};
use crate::api::{ModelDeployment, ModelNode, ModelRollout, ModelRolloutSpec};
use crate::plan::scope::NodeFacts;
use crate::telemetry::LogFormat;
use crate::units::parse_duration;

pub use reconcile::{Error, FIELD_MANAGER, FINALIZER};

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

/// Transfer-rate samples per rollout (uid), for the ETA.
#[derive(Default)]
pub(crate) struct RateTracker {
    samples: Mutex<HashMap<String, (crate::plan::convergence::ThroughputSample, Option<f64>)>>,
}

impl RateTracker {
    /// Records `bytes` done at `now`; returns the smoothed rate.
    pub(crate) fn observe(&self, uid: &str, bytes: u64, now: Timestamp) -> Option<f64> {
        use crate::plan::convergence::{ThroughputSample, throughput};
        let sample = ThroughputSample { at: now, bytes };
        let mut map = self.samples.lock().expect("rate lock");
        match map.get(uid).copied() {
            None => {
                map.insert(uid.to_string(), (sample, None));
                None
            }
            Some((prev, rate)) if prev.bytes == bytes => rate,
            Some((prev, rate)) => {
                let new = throughput(prev, sample);
                // Exponential smoothing: one slow sample does not swing the ETA.
                let smoothed = match (rate, new) {
                    (Some(r), Some(n)) => Some(0.7 * r + 0.3 * n),
                    (r, n) => n.or(r),
                };
                map.insert(uid.to_string(), (sample, smoothed));
                smoothed
            }
        }
    }

    pub(crate) fn forget(&self, uid: &str) {
        self.samples.lock().expect("rate lock").remove(uid);
    }
}

/// Shared state of the reconciler.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) rollouts: Store<ModelRollout>,
    pub(crate) deployments: Store<ModelDeployment>,
    pub(crate) model_nodes: Store<ModelNode>,
    pub(crate) nodes: Store<Node>,
    pub(crate) recorder: Recorder,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) resolver: resolve::Resolver,
    pub(crate) rates: RateTracker,
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    pub(crate) heartbeat_timeout: Duration,
}

impl Context {
    /// Everything known of every node: Node labels joined with ModelNode status.
    pub(crate) fn node_facts(&self) -> std::collections::BTreeMap<String, NodeFacts> {
        let mut out: std::collections::BTreeMap<String, NodeFacts> = std::collections::BTreeMap::new();
        for n in self.nodes.state() {
            let name = n.name_any();
            out.insert(name.clone(), NodeFacts { name, labels: n.labels().clone(), capabilities: None });
        }
        for mn in self.model_nodes.state() {
            let name = mn.name_any();
            let e = out.entry(name.clone()).or_insert_with(|| NodeFacts { name, ..Default::default() });
            e.capabilities = Some(mn.status.clone().unwrap_or_default());
        }
        out
    }
}

/// Whether a rollout's scope depends on Node labels or ModelNode facts of nodes it does not name.
fn scope_may_include(spec: &ModelRolloutSpec, node: &str) -> bool {
    match &spec.scope.nodes {
        Some(names) => names.iter().any(|n| n == node),
        None => true,
    }
}

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

    // Triggers: rollouts to reconcile, from any of the four watches.
    let (trigger_tx, _) = broadcast::channel::<ObjectRef<ModelRollout>>(16_384);
    let (rollouts, rollout_writer) = reflector::store();
    let (deployments, deployment_writer) = reflector::store();
    let (model_nodes, model_node_writer) = reflector::store();
    let (nodes, node_writer) = reflector::store();

    let wc = watcher::Config::default().any_semantic();
    let mut reflectors = tokio::task::JoinSet::new();
    {
        let tx = trigger_tx.clone();
        let s = watcher::watcher(Api::<ModelRollout>::all(client.clone()), wc.clone())
            .default_backoff()
            .reflect(rollout_writer);
        reflectors.spawn(forward_changes(
            s,
            |_: &ModelRollout| None,
            move |r: &ModelRollout| vec![ObjectRef::from_obj(r)],
            tx,
            "ModelRollout",
        ));
    }
    {
        let tx = trigger_tx.clone();
        let store = rollouts.clone();
        let s = watcher::watcher(Api::<ModelDeployment>::all(client.clone()), wc.clone())
            .default_backoff()
            .reflect(deployment_writer);
        // A deployment concerns every rollout of its model: its owner, and rivals waiting for the node.
        reflectors.spawn(forward_changes(
            s,
            |_: &ModelDeployment| None,
            move |md: &ModelDeployment| {
                store
                    .state()
                    .iter()
                    .filter(|r| r.spec.model == md.spec.model)
                    .map(|r| ObjectRef::from_obj(&**r))
                    .collect()
            },
            tx,
            "ModelDeployment",
        ));
    }
    {
        let tx = trigger_tx.clone();
        let store = rollouts.clone();
        // Heartbeats alone do not trigger (staleness is rechecked on a timer); capability changes do.
        let s = watcher::watcher(Api::<ModelNode>::all(client.clone()), wc.clone())
            .default_backoff()
            .reflect(model_node_writer);
        reflectors.spawn(forward_changes(
            s,
            model_node_fingerprint(opts.heartbeat_timeout),
            move |mn: &ModelNode| {
                let node = mn.name_any();
                store
                    .state()
                    .iter()
                    .filter(|r| scope_may_include(&r.spec, &node))
                    .map(|r| ObjectRef::from_obj(&**r))
                    .collect()
            },
            tx,
            "ModelNode",
        ));
    }
    {
        let tx = trigger_tx.clone();
        let store = rollouts.clone();
        // Nodes matter for their labels only (kubelets update Node status constantly).
        let s = watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|n: &mut Node| {
                n.status = None;
                n.spec = None;
                n.managed_fields_mut().clear();
            })
            .reflect(node_writer);
        reflectors.spawn(forward_changes(
            s,
            |n: &Node| kube::runtime::predicates::labels(n),
            move |n: &Node| {
                let node = n.name_any();
                store
                    .state()
                    .iter()
                    .filter(|r| r.spec.scope.capable.is_none() && scope_may_include(&r.spec, &node))
                    .map(|r| ObjectRef::from_obj(&**r))
                    .collect()
            },
            tx,
            "Node",
        ));
    }

    // Ready once every watch has its initial list. One waiter per store: a store's readiness wakes
    // only the waiter that polled it last (kube-runtime's DelayedInit holds one oneshot waker), so
    // everything else waits on this task's signal instead.
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    {
        let (r, d, m, n, ready) =
            (rollouts.clone(), deployments.clone(), model_nodes.clone(), nodes.clone(), ready.clone());
        tokio::spawn(async move {
            for store_ready in [
                r.wait_until_ready().await,
                d.wait_until_ready().await,
                m.wait_until_ready().await,
                n.wait_until_ready().await,
            ] {
                if store_ready.is_err() {
                    return; // a reflector ended: stay unready
                }
            }
            ready.store(true, Ordering::Release);
            let _ = ready_tx.send(true);
            info!("initial lists complete: ready");
        });
    }

    let identity = opts.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "peat".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        rollouts: rollouts.clone(),
        deployments,
        model_nodes,
        nodes,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "peat-controller".into(), instance: Some(identity.clone()) },
        ),
        metrics,
        resolver: resolve::Resolver::default(),
        rates: RateTracker::default(),
        failures: Mutex::new(HashMap::new()),
        heartbeat_timeout: opts.heartbeat_timeout,
    });

    let result = if opts.leader_elect {
        run_with_leader_election(&opts, &identity, ctx.clone(), trigger_tx.clone(), ready_rx, shutdown.clone()).await
    } else {
        ctx.metrics.leader.set(1);
        run_controller(ctx.clone(), trigger_tx.clone(), ready_rx, shutdown.clone()).await;
        Ok(())
    };
    shutdown.cancel();
    reflectors.abort_all();
    let _ = admin_task.await;
    result
}

/// Fingerprint of what planning reads from a ModelNode. Heartbeats alone do not change it, except
/// the first heartbeat after a silence longer than the timeout: a node back from a partition must
/// be re-planned at once (its going silent is caught by the reconciler's recheck timer).
fn model_node_fingerprint(timeout: Duration) -> impl Fn(&ModelNode) -> Option<u64> {
    let revivals: Mutex<HashMap<String, (Option<Timestamp>, u64)>> = Mutex::new(HashMap::new());
    move |mn: &ModelNode| {
        use std::hash::{Hash, Hasher};
        let s = mn.status.clone().unwrap_or_default();
        let hb = s.last_heartbeat.as_ref().map(|t| t.0);
        let mut seen = revivals.lock().expect("fingerprint lock");
        let entry = seen.entry(mn.name_any()).or_insert((None, 0));
        let silent_before = match (entry.0, hb) {
            (Some(prev), Some(now)) => now.as_millisecond() - prev.as_millisecond() > timeout.as_millis() as i64,
            (None, Some(_)) => true,
            _ => false,
        };
        if silent_before {
            entry.1 += 1;
        }
        if hb.is_some() {
            entry.0 = hb;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (s.arch, s.gpus, s.gpu_memory_bytes, s.providers, s.storage_free_bytes / (64 << 20), entry.1).hash(&mut h);
        Some(h.finish())
    }
}

/// Drives a reflector stream and broadcasts the rollouts each event concerns. When `fingerprint`
/// gives a value, an update whose fingerprint did not change is not forwarded (a heartbeat, a
/// kubelet status update); deletions always are.
async fn forward_changes<K, S>(
    stream: S,
    fingerprint: impl Fn(&K) -> Option<u64>,
    map: impl Fn(&K) -> Vec<ObjectRef<ModelRollout>>,
    tx: broadcast::Sender<ObjectRef<ModelRollout>>,
    kind: &'static str,
) where
    K: kube::Resource,
    S: futures::Stream<Item = Result<WatchEvent<K>, watcher::Error>>,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let (obj, deleted) = match ev {
            Ok(WatchEvent::Apply(o) | WatchEvent::InitApply(o)) => (o, false),
            Ok(WatchEvent::Delete(o)) => (o, true),
            Ok(_) => continue,
            Err(e) => {
                warn!(kind, error = %e, "watch error (retrying with backoff)");
                continue;
            }
        };
        let id = format!(
            "{}/{}",
            obj.meta().namespace.clone().unwrap_or_default(),
            obj.meta().name.clone().unwrap_or_default()
        );
        if deleted {
            seen.remove(&id);
        } else if let Some(fp) = fingerprint(&obj)
            && seen.insert(id, fp) == Some(fp)
        {
            continue;
        }
        for r in map(&obj) {
            let _ = tx.send(r);
        }
    }
}

async fn run_with_leader_election(
    opts: &Options,
    identity: &str,
    ctx: Arc<Context>,
    triggers: broadcast::Sender<ObjectRef<ModelRollout>>,
    ready: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let duration = opts.lease_duration.as_secs().max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(ctx.client.clone(), &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .with_field_manager(format!("{FIELD_MANAGER}-lease"))
        .build()
        .await?;
    let (mut leader_rx, lease_task) = manager.watch().await;
    info!(identity, lease = %opts.lease_name, "waiting for the lease");
    loop {
        // Wait to become leader (or to be told to stop).
        while !*leader_rx.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = leader_rx.changed() => if changed.is_err() { anyhow::bail!("the lease manager stopped") },
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        info!(identity, "leading: running the controller");
        ctx.metrics.leader.set(1);
        let lost = CancellationToken::new();
        let run = run_controller(ctx.clone(), triggers.clone(), ready.clone(), lost.clone());
        let mut run = std::pin::pin!(run);
        tokio::select! {
            _ = &mut run => {},
            _ = shutdown.cancelled() => { lost.cancel(); run.await; },
            _ = async { while leader_rx.changed().await.is_ok() { if !*leader_rx.borrow() { break } } } => {
                warn!(identity, "lost the lease: stopping the controller");
                lost.cancel();
                // Reconciles in flight get a moment to finish, never past the time a successor may start.
                let grace = Duration::from_secs((duration / 3).max(1));
                if tokio::time::timeout(grace, run).await.is_err() {
                    warn!(identity, "reconciles still running after {grace:?}: dropped");
                }
                if leader_rx.has_changed().is_err() {
                    anyhow::bail!("the lease manager stopped");
                }
            }
        }
        ctx.metrics.leader.set(0);
        if shutdown.is_cancelled() {
            break;
        }
    }
    // Dropping the receiver makes the lease task release the lease, so a successor need not wait it out.
    drop(leader_rx);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(manager))) => {
            let _ = manager.release().await;
        }
        Ok(Ok(Err(e))) => warn!(error = %e, "lease manager"),
        _ => {}
    }
    Ok(())
}

/// Runs the kube-runtime Controller over the broadcast triggers until `stop`.
async fn run_controller(
    ctx: Arc<Context>,
    triggers: broadcast::Sender<ObjectRef<ModelRollout>>,
    mut ready: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) {
    // Do not plan from half-listed caches: a missing ModelDeployment would look like one to create.
    tokio::select! {
        _ = stop.cancelled() => return,
        r = ready.wait_for(|r| *r) => if r.is_err() { return },
    }
    reconcile::sweep_orphans(&ctx).await;
    // A lagging receiver lost triggers it cannot name: reconcile everything instead.
    let store = ctx.rollouts.clone();
    let refs = BroadcastStream::new(triggers.subscribe()).flat_map(move |r| {
        let refs = match r {
            Ok(r) => vec![r],
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)) => {
                warn!(missed, "trigger channel lagged: reconciling every rollout");
                store.state().iter().map(|o| ObjectRef::from_obj(&**o)).collect()
            }
        };
        futures::stream::iter(refs)
    });
    triggers::run_rollout_controller(
        ctx.rollouts.clone(),
        refs,
        stop,
        reconcile::reconcile,
        reconcile::error_policy,
        ctx,
    )
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "reconcile");
        }
    })
    .await;
}
