//! The agent's loop: observe (the cache of this node's ModelDeployments, the transfers running,
//! the store), [`decide`], carry the actions out; and run each transfer as a task of its own,
//! whose end comes back as a [`Wake::Finished`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kube::runtime::reflector::Store as Cache;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::context::Agent;
use super::decide::{Action, Bytes, Known, Memory, Report, RunningTransfer, StopReason, decide, key_of};
use super::metrics::ResultLabels;
use super::outcome::{Verdict, on_finished, on_switched};
use super::report::{apply_node_labels, write_status};
use super::store::VersionRecord;
use super::transfer::{self, Progress, PullPlan, Transfer, TransferError};
use crate::api::{DeploymentPhase, ModelDeployment, Priority};

/// What wakes the loop besides its timer.
pub(super) enum Wake {
    /// The cache of ModelDeployments changed.
    Changed,
    /// A transfer task ended.
    Finished(Box<Finished>),
}

/// A transfer task's end.
pub(super) struct Finished {
    key: String,
    artifact: String,
    plan: Option<PullPlan>,
    result: Result<Bytes, TransferError>,
}

/// A transfer task, as the loop holds it.
struct Running {
    artifact: String,
    priority: Priority,
    cancel: CancellationToken,
}

/// The loop's state: what it remembers and what runs.
struct Loop {
    agent: Arc<Agent>,
    cache: Cache<ModelDeployment>,
    wakes: mpsc::UnboundedSender<Wake>,
    memory: Memory,
    running: HashMap<String, Running>,
    labels: Option<BTreeMap<String, String>>,
}

/// Decides on every change, every finished transfer, and every few seconds (retries, deletions).
pub(super) async fn decision_loop(
    agent: Arc<Agent>,
    cache: Cache<ModelDeployment>,
    wakes: mpsc::UnboundedSender<Wake>,
    mut woken: mpsc::UnboundedReceiver<Wake>,
) -> anyhow::Result<()> {
    let mut l = Loop { agent, cache, wakes, memory: Memory::new(), running: HashMap::new(), labels: None };
    loop {
        l.pass().await;
        tokio::select! {
            wake = woken.recv() => match wake {
                Some(Wake::Finished(done)) => l.finished(*done).await,
                Some(Wake::Changed) => {}
                None => return Ok(()),
            },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        // Coalesce a burst of wakes into one pass.
        while let Ok(wake) = woken.try_recv() {
            if let Wake::Finished(done) = wake {
                l.finished(*done).await;
            }
        }
    }
}

impl Loop {
    /// Observes, decides, acts; again at once after switching to a kept version (so the next
    /// decision sees it active and labels the node).
    async fn pass(&mut self) {
        loop {
            let deployments = self.cache.state();
            *self.agent.wanted.lock().expect("wanted lock") = deployments
                .iter()
                .filter(|m| m.spec.node_name == self.agent.opts.node_name && m.metadata.deletion_timestamp.is_none())
                .map(|m| (m.spec.model.clone(), m.spec.version.clone()))
                .collect();
            let running: BTreeMap<String, RunningTransfer> = self
                .running
                .iter()
                .map(|(k, r)| {
                    let t = RunningTransfer {
                        artifact: r.artifact.clone(),
                        priority: r.priority,
                        cancelled: r.cancel.is_cancelled(),
                    };
                    (k.clone(), t)
                })
                .collect();
            let running_layers: HashSet<String> =
                self.agent.pinned.lock().expect("pinned lock").values().flatten().cloned().collect();
            let inventory = self.agent.store.inventory();
            let serving = self.agent.serving.lock().expect("serving lock").clone();
            let known = Known {
                node: &self.agent.opts.node_name,
                deployments: &deployments,
                running: &running,
                running_layers: &running_layers,
                inventory: &inventory,
                max_transfers: usize::from(self.agent.opts.max_concurrent_pulls),
                labels_applied: self.labels.as_ref(),
                serving: &serving,
                now: Instant::now(),
                wall: k8s_openapi::jiff::Timestamp::now(),
            };
            let actions = decide(&known, &mut self.memory);
            // Every pass reports each active deployment with spec.serving: count them here.
            let (mut serving, mut staged) = (0, 0);
            for a in &actions {
                if let Action::Report(_, Report { serving: Some(s), phase, .. }) = a {
                    match (s.ready, phase) {
                        (true, DeploymentPhase::Operational | DeploymentPhase::Degraded) => serving += 1,
                        _ => staged += 1,
                    }
                }
            }
            self.agent.metrics.serving.set(serving);
            self.agent.metrics.staged.set(staged);
            let mut switched = false;
            for action in actions {
                switched |= matches!(action, Action::SwitchToKept(_));
                self.carry_out(action).await;
            }
            if !switched {
                return;
            }
        }
    }

    async fn carry_out(&mut self, action: Action) {
        let agent = &self.agent;
        match action {
            Action::Report(md, report) => write_status(agent, &md, &report).await,
            Action::SwitchToKept(md) => {
                let (model, version) = (&md.spec.model, &md.spec.version);
                let total: u64 =
                    agent.store.state(model).get(version).map_or(0, |r| r.files.iter().map(|f| f.size).sum());
                let result = {
                    let _guard = agent.store_lock.lock().await;
                    agent.store.activate(model, version)
                };
                if result.is_ok() {
                    info!(md = %key_of(&md), %version, "switched to a kept version");
                    agent.inventory_changed.notify_one();
                }
                let serving = md.spec.serving.is_some();
                let report = on_switched(
                    &mut self.memory,
                    &key_of(&md),
                    version,
                    total,
                    serving,
                    result.map_err(|e| e.to_string()),
                );
                write_status(agent, &md, &report).await;
            }
            Action::Start(md) => self.start(md),
            Action::Stop { key, why } => {
                if let StopReason::Preempted { by } = &why {
                    info!(md = %by, preempted = %key, "a Critical transfer preempts a lower one");
                }
                if let Some(r) = self.running.get(&key) {
                    r.cancel.cancel();
                }
            }
            Action::RemoveModel(model) => {
                let done = "removed: no ModelDeployment holds it (deletionPolicy Delete, or none of it active)";
                store_change(agent, &model, |s| s.remove_model(&model), Some(done), "removing an unwanted model").await;
            }
            Action::Hold { model, policy } => {
                store_change(agent, &model, |s| s.hold(&model, policy), None, "recording the model's deletion policy")
                    .await;
            }
            Action::Retain(model) => {
                let done = "retained: no ModelDeployment holds it; the active version stays, unmanaged";
                store_change(agent, &model, |s| s.retain(&model), Some(done), "recording a retained model").await;
            }
            Action::CollectGarbage { keep, partials } => {
                let collected = {
                    let _guard = agent.store_lock.lock().await;
                    agent.store.collect_garbage(&keep, partials)
                };
                match collected {
                    Ok(0) => {}
                    Ok(freed) => {
                        info!(freed, "collected unused blobs and partial downloads");
                        agent.inventory_changed.notify_one();
                    }
                    Err(e) => warn!(error = %e, "collecting garbage failed"),
                }
            }
            Action::Label(labels) => match apply_node_labels(agent, &labels).await {
                Ok(()) => self.labels = Some(labels),
                Err(e) => warn!(error = %e, "labelling the Node failed"),
            },
        }
    }

    fn start(&mut self, md: Arc<ModelDeployment>) {
        let key = key_of(&md);
        let cancel = CancellationToken::new();
        let running =
            Running { artifact: md.spec.artifact.clone(), priority: md.spec.priority, cancel: cancel.clone() };
        self.running.insert(key.clone(), running);
        self.agent.metrics.active.set(self.running.len() as i64);
        let plan = self.memory.get(&key).and_then(|t| t.plan.clone());
        let (agent, wakes, artifact) = (self.agent.clone(), self.wakes.clone(), md.spec.artifact.clone());
        tokio::spawn(async move {
            let (plan, result) = transfer(&agent, &md, plan, &cancel).await;
            let _ = wakes.send(Wake::Finished(Box::new(Finished { key, artifact, plan, result })));
        });
    }

    /// A transfer task ended: free its slot, record the outcome, report a retry.
    async fn finished(&mut self, done: Finished) {
        let Finished { key, artifact, plan, result } = done;
        self.running.remove(&key);
        self.agent.metrics.active.set(self.running.len() as i64);
        let md = self.cache.state().into_iter().find(|m| key_of(m) == key);
        let verdict = on_finished(&mut self.memory, &key, &artifact, plan, result, md.is_some(), Instant::now());
        let count = |result| self.agent.metrics.transfers.get_or_create(&ResultLabels { result }).inc();
        match verdict {
            Verdict::Stale => {}
            Verdict::Succeeded(b) => {
                count("succeeded");
                info!(md = %key, fetched = b.fetched, reused = b.reused, total = b.total, "active");
            }
            Verdict::Cancelled => {
                count("cancelled");
            }
            Verdict::Retrying { error, attempt, after, report } => {
                count("retrying");
                warn!(md = %key, %error, attempt, "transfer failed; retrying in {after:?}");
                if let Some(md) = md {
                    write_status(&self.agent, &md, &report).await;
                }
            }
            Verdict::Failed { error } => {
                count("failed");
                warn!(md = %key, %error, "transfer failed for good");
            }
        }
    }
}

/// One transfer: plan (manifest by digest), fetch, verify, materialize, activate. Reports progress
/// while it runs. Returns the plan (kept for retries and garbage collection) and the bytes moved.
async fn transfer(
    agent: &Arc<Agent>,
    md: &ModelDeployment,
    plan: Option<PullPlan>,
    cancel: &CancellationToken,
) -> (Option<PullPlan>, Result<Bytes, TransferError>) {
    let source = match agent.source_for(md).await {
        Ok(s) => s,
        Err(e) => return (plan, Err(e)),
    };
    let max_size = md.spec.max_size_bytes.map(|m| m.max(0) as u64);
    let plan = match plan {
        Some(p) => p,
        None => {
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return (None, Err(TransferError::Cancelled)),
                p = transfer::fetch_plan(&source, &md.spec.artifact, max_size) => p,
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

/// One change of a model's directory under the store lock; the inventory is republished after it.
async fn store_change(
    agent: &Agent,
    model: &str,
    change: impl FnOnce(&super::store::Store) -> std::io::Result<()>,
    done: Option<&str>,
    what: &str,
) {
    let result = {
        let _guard = agent.store_lock.lock().await;
        change(&agent.store)
    };
    match result {
        Ok(()) => {
            if let Some(done) = done {
                info!(%model, "{done}");
            }
            agent.inventory_changed.notify_one();
        }
        Err(e) => warn!(%model, error = %e, "{what} failed"),
    }
}

fn bytes_of(progress: &Progress) -> Bytes {
    Bytes {
        fetched: progress.fetched.load(Ordering::Relaxed),
        reused: progress.reused.load(Ordering::Relaxed),
        total: progress.total.load(Ordering::Relaxed),
    }
}

async fn fetch_and_activate(
    agent: &Arc<Agent>,
    md: &ModelDeployment,
    source: &transfer::Source,
    plan: &PullPlan,
    cancel: &CancellationToken,
) -> Result<Bytes, TransferError> {
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let reporter = {
        let (stop, agent, md, progress) = (stop.clone(), agent.clone(), md.clone(), progress.clone());
        let interval = agent.opts.progress_interval;
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let bytes = bytes_of(&progress);
                if last != Some(bytes) {
                    let report = Report { bytes: Some(bytes), ..Report::phase(DeploymentPhase::Downloading) };
                    write_status(&agent, &md, &report).await;
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
        store_lock: &agent.store_lock,
        pinned: &agent.pinned,
        wanted: &agent.wanted,
    };
    let fetched = transfer::fetch_layers(&t, plan).await;
    // Stopped and awaited, so no progress write lands after the final status.
    stop.cancel();
    let _ = reporter.await;
    let bytes = bytes_of(&progress);
    agent.metrics.fetched.inc_by(bytes.fetched);
    fetched?;
    agent.metrics.reused.inc_by(bytes.reused);
    debug!(md = %key_of(md), elapsed = ?started.elapsed(), fetched = bytes.fetched, "layers fetched and verified");
    let report = Report { bytes: Some(bytes), ..Report::phase(DeploymentPhase::Loading) };
    write_status(agent, md, &report).await;
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
            return Err(TransferError::Cancelled);
        }
        // Off the async workers: hard links are quick, unpacking an archive may take minutes.
        let (a, spec) = (agent.clone(), md.spec.clone());
        tokio::task::spawn_blocking(move || {
            a.store
                .materialize(&spec.model, &record)
                .and_then(|()| a.store.activate(&spec.model, &spec.version))
                .and_then(|()| a.store.prune(&spec.model, a.opts.keep_versions).map(|_| ()))
                // With the activation, so a deletion right after it is handled by the holder's policy.
                .and_then(|()| a.store.hold(&spec.model, spec.deletion_policy))
        })
        .await
        .expect("activation does not panic")
    };
    agent.inventory_changed.notify_one();
    debug!(md = %key_of(md), elapsed = ?started.elapsed(), "activated");
    activated.map(|()| bytes).map_err(|e| match e.kind() {
        // An archive the store refused to unpack: the artifact is at fault, not the node.
        std::io::ErrorKind::InvalidData => {
            TransferError::BadArtifact { artifact: md.spec.artifact.clone(), why: e.to_string() }
        }
        _ => TransferError::Io(e),
    })
}
