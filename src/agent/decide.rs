//! The agent's decisions, pure: from what it knows — this node's ModelDeployments, the transfers
//! running, the store's inventory, its limits, the clock — to the actions to carry out: status
//! reports, transfers to start and to stop, a kept version to switch to, models to remove, the
//! garbage-collection keep set, the Node's labels. No I/O here; the loop in `agent/act.rs` observes,
//! calls [`decide`], carries the actions out, and feeds finished transfers to [`on_finished`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;

use k8s_openapi::jiff::Timestamp;

use super::serving::{Observation, Track, assess};
use super::store::{ModelState, is_safe_component};
use super::transfer::PullPlan;
use crate::api::shared::NODE_MODEL_LABEL_PREFIX;
use crate::api::{BlockerReason, DeletionPolicy, DeploymentPhase, ModelDeployment, Priority, ServingStatus};

/// Bytes of one transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// Received from the registry.
    pub fetched: u64,
    /// Taken from the store instead of the wire.
    pub reused: u64,
    /// Of the whole variant.
    pub total: u64,
}

/// What the agent reports in a ModelDeployment's status (compared with what is there before writing).
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The phase.
    pub phase: DeploymentPhase,
    /// A blocker reason, when not progressing.
    pub reason: Option<BlockerReason>,
    /// For a person.
    pub message: Option<String>,
    /// Bytes, when known.
    pub bytes: Option<Bytes>,
    /// The serving section (deployments with `spec.serving` whose version is active); None clears it.
    pub serving: Option<ServingStatus>,
}

impl Report {
    /// Just a phase.
    pub fn phase(phase: DeploymentPhase) -> Report {
        Report { phase, reason: None, message: None, bytes: None, serving: None }
    }

    /// A phase with a blocker.
    pub fn blocked(phase: DeploymentPhase, reason: BlockerReason, message: String) -> Report {
        Report { phase, reason: Some(reason), message: Some(message), bytes: None, serving: None }
    }
}

/// `namespace/name` of a ModelDeployment: how the agent keys what it remembers.
pub fn key_of(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// The manifest digest of `<repository>@sha256:…`.
pub fn artifact_digest(artifact: &str) -> Option<&str> {
    artifact.rsplit_once('@').map(|(_, d)| d)
}

/// A version as a label value (63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends).
pub fn label_value(version: &str) -> Option<String> {
    let ok = !version.is_empty()
        && version.len() <= 63
        && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version.ends_with(|c: char| c.is_ascii_alphanumeric());
    ok.then(|| version.to_string())
}

/// What the agent remembers of one ModelDeployment between passes.
#[derive(Clone, Debug, Default)]
pub struct Tracked {
    /// The artifact this memory is about; a new artifact starts afresh.
    pub artifact: String,
    /// The transfer's plan, once read (reused by retries; its layers are kept from collection).
    pub plan: Option<PullPlan>,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// No new attempt before this.
    pub not_before: Option<Instant>,
    /// A failure only a new artifact fixes: (reason, message).
    pub failed: Option<(BlockerReason, String)>,
    /// Bytes of the last completed transfer.
    pub last_bytes: Option<Bytes>,
    /// Serving of the active version (with `spec.serving`): soak, timeout, transitions.
    pub serving: Option<Track>,
}

/// The agent's memory: one [`Tracked`] per ModelDeployment it has seen (and still sees).
pub type Memory = HashMap<String, Tracked>;

/// A transfer running now.
#[derive(Clone, Debug)]
pub struct RunningTransfer {
    /// The artifact it fetches.
    pub artifact: String,
    /// Its deployment's priority.
    pub priority: Priority,
    /// Already told to stop.
    pub cancelled: bool,
}

/// Everything a pass decides from, observed just before.
#[derive(Clone, Debug)]
pub struct Known<'a> {
    /// This node's name.
    pub node: &'a str,
    /// ModelDeployments from the cache (others' and deleted ones are ignored).
    pub deployments: &'a [Arc<ModelDeployment>],
    /// Transfers running, by deployment key.
    pub running: &'a BTreeMap<String, RunningTransfer>,
    /// Layer digests of the running transfers' plans.
    pub running_layers: &'a HashSet<String>,
    /// Per model on disk: its versions and the active one.
    pub inventory: &'a BTreeMap<String, (ModelState, Option<String>)>,
    /// Transfers allowed at once.
    pub max_transfers: usize,
    /// The Node's model labels as last applied (none yet: they are applied).
    pub labels_applied: Option<&'a BTreeMap<String, String>>,
    /// What the prober last saw of the servers, by deployment key.
    pub serving: &'a HashMap<String, Observation>,
    /// Now.
    pub now: Instant,
    /// Now, on the wall clock (for the times a status shows).
    pub wall: Timestamp,
}

/// Why a running transfer is stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A waiting Critical transfer takes its slot (it resumes later from its partial).
    Preempted {
        /// The deployment that preempts it.
        by: String,
    },
    /// Its deployment is gone, paused, or wants another artifact now.
    NotWanted,
}

/// One thing to do, in the order given.
#[derive(Clone, Debug)]
pub enum Action {
    /// Write this to the deployment's status (unless it already says exactly that).
    Report(Arc<ModelDeployment>, Report),
    /// Make the deployment's version, kept on disk, the active one: no bytes move.
    SwitchToKept(Arc<ModelDeployment>),
    /// Start the deployment's transfer.
    Start(Arc<ModelDeployment>),
    /// Stop a running transfer; its partial download stays.
    Stop {
        /// The deployment's key.
        key: String,
        /// Why.
        why: StopReason,
    },
    /// Remove a model no deployment wants any more (its holder said `Delete`, or nothing of it is active).
    RemoveModel(String),
    /// Record on disk that a deployment holds the model, and what to do when none does.
    Hold {
        /// The model.
        model: String,
        /// The holder's deletion policy.
        policy: DeletionPolicy,
    },
    /// Keep a model no deployment holds any more (`Retain`): active, labelled, unmanaged.
    Retain(String),
    /// Remove blobs not in `keep`, and partial downloads when `partials`.
    CollectGarbage {
        /// Layer digests still needed.
        keep: HashSet<String>,
        /// Whether partial downloads may go too (only when whose they are is known).
        partials: bool,
    },
    /// Set the Node's `models.peat.dev/<model>` labels to exactly these.
    Label(BTreeMap<String, String>),
}

/// Where a deployment stands without a transfer.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    /// Operational on its version.
    Active,
    /// Switching to a kept version (done by the action; the next pass sees it active).
    Switching,
    /// Needs bytes from the registry.
    NeedsTransfer,
    /// Paused, or waiting for its retry.
    Waiting,
    /// Failed in a way only a change of the deployment fixes.
    Failed,
}

/// One pass: what to do now. Updates `memory` (new artifacts start afresh, failures found here
/// are remembered, gone deployments are forgotten).
pub fn decide(known: &Known<'_>, memory: &mut Memory) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut mds: Vec<&Arc<ModelDeployment>> = known
        .deployments
        .iter()
        .filter(|m| m.spec.node_name == known.node && m.metadata.deletion_timestamp.is_none())
        .collect();
    // The oldest deployment of a model holds it; another one for the same model waits (NodeBusy).
    mds.sort_by(|a, b| (&a.metadata.creation_timestamp, key_of(a)).cmp(&(&b.metadata.creation_timestamp, key_of(b))));
    let mut holders: BTreeMap<&str, &Arc<ModelDeployment>> = BTreeMap::new();
    let mut wanted: Vec<&Arc<ModelDeployment>> = Vec::new();
    // Deployments that still need bytes (running, queued, paused, retrying): their partials stay.
    let mut unsettled: Vec<String> = Vec::new();
    for md in &mds {
        let key = key_of(md);
        if let Some(holder) = holders.get(md.spec.model.as_str()) {
            let msg = format!("{} already holds model {} on this node", key_of(holder), md.spec.model);
            // A blocker, not a failure: it must not count toward a rollout's failureThreshold.
            let report = Report::blocked(DeploymentPhase::NotDeployed, BlockerReason::NodeBusy, msg);
            actions.push(Action::Report((*md).clone(), report));
            continue;
        }
        holders.insert(&md.spec.model, md);
        if let Some((state, _)) = known.inventory.get(&md.spec.model)
            && (state.on_release != md.spec.deletion_policy || state.retained)
        {
            actions.push(Action::Hold { model: md.spec.model.clone(), policy: md.spec.deletion_policy });
        }
        let t = memory.entry(key.clone()).or_default();
        if t.artifact != md.spec.artifact {
            *t = Tracked { artifact: md.spec.artifact.clone(), ..Default::default() };
        }
        if let Some(r) = known.running.get(&key)
            && !md.spec.paused
        {
            unsettled.push(key);
            if r.artifact == md.spec.artifact {
                wanted.push(md);
            }
            continue; // the transfer task reports
        }
        let on_disk = known.inventory.get(&md.spec.model);
        let (settled, report) = settle(md, t, on_disk, known.serving.get(&key), known.now, known.wall);
        let failed = t.failed.is_some();
        if let Some(report) = report {
            actions.push(Action::Report((*md).clone(), report));
        }
        match settled {
            Settled::Active => {}
            Settled::Switching => actions.push(Action::SwitchToKept((*md).clone())),
            Settled::NeedsTransfer => {
                unsettled.push(key);
                wanted.push(md);
            }
            Settled::Waiting if !failed => unsettled.push(key),
            Settled::Waiting => {}
            Settled::Failed => {}
        }
    }
    schedule(known, &wanted, &mut actions);
    // Transfers of deployments that are gone, paused or satisfied stop (their partials stay).
    let present: HashMap<String, bool> = mds.iter().map(|m| (key_of(m), m.spec.paused)).collect();
    for (key, r) in known.running {
        let still = present.get(key) == Some(&false) && memory.get(key).is_some_and(|t| t.artifact == r.artifact);
        if !still && !r.cancelled {
            actions.push(Action::Stop { key: key.clone(), why: StopReason::NotWanted });
        }
    }
    memory.retain(|k, _| present.contains_key(k));
    // Garbage: models nobody holds; blobs outside every known plan and running transfer; partials
    // only when the plan of every deployment that still needs bytes is known (else whose they are is not).
    // Models nobody holds: removed when their last holder said Delete or nothing of them is active;
    // else kept, unmanaged (Retain).
    let mut removed: HashSet<&str> = HashSet::new();
    for (model, (state, current)) in known.inventory.iter().filter(|(m, _)| !holders.contains_key(m.as_str())) {
        if state.on_release == DeletionPolicy::Delete || current.is_none() {
            removed.insert(model);
            actions.push(Action::RemoveModel(model.clone()));
        } else if !state.retained {
            actions.push(Action::Retain(model.clone()));
        }
    }
    // The scheduling label names the active version of every model on disk (held or retained), so
    // it stays while an upgrade downloads, is paused or fails, and switches only at activation.
    let operational: BTreeMap<String, String> = known
        .inventory
        .iter()
        .filter(|(m, _)| !removed.contains(m.as_str()))
        .filter_map(|(m, (state, current))| {
            let v = current.as_deref().filter(|v| state.get(v).is_some())?;
            Some((format!("{NODE_MODEL_LABEL_PREFIX}{m}"), label_value(v)?))
        })
        .collect();
    let mut keep: HashSet<String> = memory.values().filter_map(|t| t.plan.as_ref()).flat_map(|p| p.digests()).collect();
    keep.extend(known.running_layers.iter().cloned());
    let partials = unsettled.iter().all(|k| memory.get(k).is_some_and(|t| t.plan.is_some()));
    actions.push(Action::CollectGarbage { keep, partials });
    if known.labels_applied != Some(&operational) {
        actions.push(Action::Label(operational));
    }
    actions
}

/// How far a deployment goes without a transfer: already active, a kept version to switch to,
/// paused, failed for good, or waiting for its retry; with the report that says so.
fn settle(
    md: &ModelDeployment,
    t: &mut Tracked,
    on_disk: Option<&(ModelState, Option<String>)>,
    observation: Option<&Observation>,
    now: Instant,
    wall: Timestamp,
) -> (Settled, Option<Report>) {
    let spec = &md.spec;
    let mut fail_for_good = |reason, message: String| {
        t.failed = Some((reason, message.clone()));
        (Settled::Failed, Some(Report::blocked(DeploymentPhase::Failed, reason, message)))
    };
    if !is_safe_component(&spec.model) || !is_safe_component(&spec.version) {
        let msg = format!("model {:?} or version {:?} cannot name a directory", spec.model, spec.version);
        return fail_for_good(BlockerReason::DeploymentFailed, msg);
    }
    let Some(digest) = artifact_digest(&spec.artifact) else {
        let msg = format!("artifact {:?} is not referenced by digest", spec.artifact);
        return fail_for_good(BlockerReason::TransferFailed, msg);
    };
    let kept = on_disk.and_then(|(state, _)| state.get(&spec.version)).filter(|v| v.digest == digest);
    let current = on_disk.and_then(|(_, current)| current.as_deref());
    if kept.is_some() && current == Some(spec.version.as_str()) {
        let Some(serving) = &spec.serving else {
            return (
                Settled::Active,
                Some(Report { bytes: t.last_bytes, ..Report::phase(DeploymentPhase::Operational) }),
            );
        };
        // Active on disk; Operational only once the node's model server serves it.
        if t.serving.is_none()
            && let Some(s) = &md.status
            && s.active_version.as_deref() == Some(spec.version.as_str())
            && let Some(served) = s.serving.as_ref().filter(|v| v.version == spec.version)
        {
            // An agent that restarted goes on from the status it wrote: served stays served
            // (a slow server after a reboot is Degraded, not Failed), and a failure stays.
            t.serving = Track::resumed(&spec.version, s.phase, served, now);
            if s.phase == DeploymentPhase::Failed && s.reason == Some(BlockerReason::DeploymentFailed) {
                t.failed = Some((BlockerReason::DeploymentFailed, s.message.clone().unwrap_or_default()));
            }
        }
        if observation.is_none() && t.failed.is_none() {
            // No probe since this agent started: the status stands (Loading, written at activation).
            return (Settled::Active, None);
        }
        let a = assess(&spec.model, serving, &spec.version, &mut t.serving, observation, now, wall);
        if let Some((reason, message)) = t.failed.clone() {
            let report =
                Report { serving: Some(a.status), ..Report::blocked(DeploymentPhase::Failed, reason, message) };
            return (Settled::Failed, Some(report));
        }
        if a.phase == DeploymentPhase::Failed {
            // Failed for good on this artifact: the rollout's failureThreshold and autoRollback take it from here.
            let message = a.message.unwrap_or_default();
            t.failed = Some((BlockerReason::DeploymentFailed, message.clone()));
            let blocked = Report::blocked(DeploymentPhase::Failed, BlockerReason::DeploymentFailed, message);
            return (Settled::Failed, Some(Report { serving: Some(a.status), bytes: t.last_bytes, ..blocked }));
        }
        let report =
            Report { message: a.message, bytes: t.last_bytes, serving: Some(a.status), ..Report::phase(a.phase) };
        return (Settled::Active, Some(report));
    }
    if spec.paused {
        let phase = md.status.as_ref().map_or(DeploymentPhase::NotDeployed, |s| match s.phase {
            DeploymentPhase::Downloading | DeploymentPhase::Loading => DeploymentPhase::Downloading,
            _ => DeploymentPhase::NotDeployed,
        });
        let report = Report { message: Some("paused; resumes where it stopped".into()), ..Report::phase(phase) };
        return (Settled::Waiting, Some(report));
    }
    if kept.is_some() {
        return (Settled::Switching, None);
    }
    if let Some((reason, message)) = t.failed.clone() {
        return (Settled::Failed, Some(Report::blocked(DeploymentPhase::Failed, reason, message)));
    }
    if t.not_before.is_some_and(|nb| now < nb) {
        return (Settled::Waiting, None); // the failure's status stands until the retry
    }
    (Settled::NeedsTransfer, None)
}

/// Starts the most urgent wanted transfers within the limit; a waiting Critical one preempts the
/// least urgent running non-Critical transfer; the rest report their place in the queue.
fn schedule(known: &Known<'_>, wanted: &[&Arc<ModelDeployment>], actions: &mut Vec<Action>) {
    let mut wanted: Vec<(Priority, String, &Arc<ModelDeployment>)> =
        wanted.iter().map(|md| (md.spec.priority, key_of(md), *md)).collect();
    wanted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut running = known.running.len();
    let mut stopping: HashSet<&str> =
        known.running.iter().filter(|(_, r)| r.cancelled).map(|(k, _)| k.as_str()).collect();
    let mut waiting = Vec::new();
    for (priority, key, md) in wanted {
        if known.running.contains_key(&key) {
            continue;
        }
        if running < known.max_transfers {
            actions.push(Action::Start(md.clone()));
            running += 1;
            continue;
        }
        if priority == Priority::Critical
            && let Some((victim, _)) = known
                .running
                .iter()
                .filter(|(k, r)| r.priority < Priority::Critical && !stopping.contains(k.as_str()))
                .min_by_key(|(_, r)| r.priority)
        {
            stopping.insert(victim);
            actions.push(Action::Stop { key: victim.clone(), why: StopReason::Preempted { by: key.clone() } });
        }
        waiting.push(md);
    }
    for (i, md) in waiting.into_iter().enumerate() {
        let msg = format!("waiting for a transfer slot ({} ahead)", i + running);
        actions.push(Action::Report(
            md.clone(),
            Report { message: Some(msg), ..Report::phase(DeploymentPhase::Downloading) },
        ));
    }
}

#[cfg(test)]
mod tests;
