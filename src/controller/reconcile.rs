//! One reconcile: resolve → target → select → plan (pure) → apply (I/O) → status (pure) → write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::Context;
use super::metrics::{ErrorLabels, RolloutLabels};
use super::resolve::{ResolveError, TagNow};
use crate::api::shared::{LABEL_MODEL, LABEL_NODE, LABEL_VERSION};
use crate::api::{ModelDeployment, ModelDeploymentSpec, ModelRollout, ModelRolloutStatus, RolloutPhase};
use crate::plan::convergence::aggregate;
use crate::plan::scope::select_targets;
use crate::plan::status::{SourceProblem, StatusInput, rollout_status};
use crate::plan::strategy::{
    Claim, EffectiveTarget, PlanInput, controller_uid, failed_on, plan_deployments, threshold_crossed,
};

/// ModelDeployment writes in flight at once within one reconcile.
const WRITE_CONCURRENCY: usize = 16;

/// Field manager of every write the controller makes (server-side apply).
pub const FIELD_MANAGER: &str = "peat-controller";
/// Finalizer that lets the controller remove a rollout's ModelDeployments itself, also where
/// garbage collection does not run.
pub const FINALIZER: &str = "peat.dev/cleanup";

/// Reconcile errors, classified for `error_policy`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server failed or refused: transient, retried with backoff.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The source could not be resolved: retried with backoff (someone may push the tag, the registry may come back).
    #[error("source: {0}")]
    Source(#[from] ResolveError),
    /// The spec cannot be acted on; waits for a change of the rollout.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Source(_) => "source",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

fn key(r: &ModelRollout) -> String {
    format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any())
}

/// Entry point of the kube-runtime Controller.
#[instrument(skip_all, fields(rollout = %key(&rollout)))]
pub async fn reconcile(rollout: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = rollout.namespace().unwrap_or_default();
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, rollout, |event| async {
        match event {
            Finalizer::Apply(r) => apply(r, ctx.clone()).await,
            Finalizer::Cleanup(r) => cleanup(r, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    result
}

/// Invalid spec → wait for a change; anything else → exponential backoff per rollout (5 s … 5 min).
pub fn error_policy(rollout: Arc<ModelRollout>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.get_or_create(&ErrorLabels { category: error.category() }).inc();
    if let Error::InvalidSpec(_) = error {
        return Action::await_change();
    }
    let uid = rollout.uid().unwrap_or_default();
    let mut failures = ctx.failures.lock().expect("failures lock");
    let n = failures.entry(uid).or_insert(0);
    *n = n.saturating_add(1);
    // A registry problem is cheap to probe (one manifest GET) and a push can fix it any moment:
    // retry it at least every 30 s. Unrelated triggers also count as failed attempts, so without
    // this cap a missing tag could back off for minutes after it was pushed.
    let cap = if matches!(error, Error::Source(_)) { Duration::from_secs(30) } else { Duration::from_secs(300) };
    let delay = Duration::from_secs(5).saturating_mul(1 << (*n - 1).min(6)).min(cap);
    warn!(rollout = %key(&rollout), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn labels(r: &ModelRollout) -> RolloutLabels {
    RolloutLabels { namespace: r.namespace().unwrap_or_default(), name: r.name_any() }
}

async fn publish(ctx: &Context, r: &ModelRollout, type_: EventType, reason: &str, mut note: String) {
    // The API server refuses event messages over 1024 bytes.
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &r.object_ref(&())).await {
        warn!(error = %e, "publishing an event");
    }
}

/// The effective target: the spec's version, or, for an aborted rollout with autoRollback, the
/// last version it converged on before.
async fn effective_target(
    ctx: &Context,
    r: &ModelRollout,
    aborted: bool,
) -> Result<(EffectiveTarget, Option<String>), ResolveError> {
    let spec = &r.spec;
    let status = r.status.clone().unwrap_or_default();
    let auto_rollback = spec.strategy.as_ref().is_some_and(|s| s.auto_rollback);
    if aborted
        && auto_rollback
        && let Some(good) = status.history.iter().rev().find(|h| h.version != spec.version)
    {
        let resolved = ctx.resolver.resolve(&ctx.client, r, &good.version, Some(&good.digest)).await?;
        let t = EffectiveTarget {
            version: good.version.clone(),
            digest: resolved.digest,
            variants: resolved.variants,
            rolling_back: true,
        };
        return Ok((t, None));
    }
    // Pinned: the digest resolved for this version, or, when going back to a version this rollout
    // converged on before (GitOps rollback), the digest in its history: the same bytes as then.
    let pinned = (status.resolved_version.as_deref() == Some(spec.version.as_str()))
        .then_some(status.resolved_digest.as_deref())
        .flatten()
        .or_else(|| status.history.iter().rev().find(|h| h.version == spec.version).map(|h| h.digest.as_str()));
    let resolved = ctx.resolver.resolve(&ctx.client, r, &spec.version, pinned).await?;
    let note = pinned
        .is_none()
        .then(|| format!("{}:{} resolved to {}", spec.source.repository, spec.version, resolved.digest));
    Ok((
        EffectiveTarget {
            version: spec.version.clone(),
            digest: resolved.digest,
            variants: resolved.variants,
            rolling_back: false,
        },
        note,
    ))
}

fn same_deployment(existing: &ModelDeployment, spec: &ModelDeploymentSpec, owner_uid: &str) -> bool {
    existing.spec == *spec
        && controller_uid(existing) == Some(owner_uid)
        && existing.labels().get(LABEL_VERSION) == Some(&spec.version)
        && existing.labels().get(LABEL_MODEL) == Some(&spec.model)
}

fn node_label(node: &str) -> Option<String> {
    (node.len() <= 63).then(|| node.to_string())
}

async fn write_status(ctx: &Context, r: &ModelRollout, status: &ModelRolloutStatus) -> Result<(), Error> {
    if r.status.as_ref() == Some(status) {
        return Ok(()); // nothing changed: no write
    }
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "status": status});
    api.patch_status(&r.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.status_writes.inc();
    Ok(())
}

/// Pins a resolution in status at once: should anything after it fail, the retry must not read
/// the tag again.
async fn pin(ctx: &Context, r: &ModelRollout, target: &EffectiveTarget, note: String) -> Result<(), Error> {
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    // A new resolution is a new target: the phase must not say Converged (of the old one) in the
    // moment before the full status is written.
    let patch = json!({"status": {"resolvedVersion": target.version, "resolvedDigest": target.digest,
                                  "phase": RolloutPhase::Progressing}});
    api.patch_status(&r.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    ctx.metrics.status_writes.inc();
    publish(ctx, r, EventType::Normal, "Resolved", note).await;
    Ok(())
}

async fn apply(r: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = r.namespace().unwrap_or_default();
    let uid = r.uid().unwrap_or_default();
    let spec = &r.spec;
    let prev = r.status.clone().unwrap_or_default();
    let prev_aborted = prev.aborted_version.clone().filter(|v| *v == spec.version);

    // target
    let facts = ctx.node_facts();
    let fact_list: Vec<_> = facts.values().cloned().collect();
    let targets = match select_targets(&spec.scope, &fact_list) {
        Ok(t) => t,
        Err(e) => {
            let status = rollout_status(&StatusInput {
                rollout: &r,
                target: None,
                source_problem: None,
                invalid_spec: Some(e.to_string()),
                convergence: None,
                conflicts: &[],
                aborted_version: prev_aborted,
                in_flight: 0,
                rate: None,
                now,
            });
            write_status(&ctx, &r, &status).await?;
            return Err(Error::InvalidSpec(e.to_string()));
        }
    };

    // resolve (with the abort decision, which can switch the target to the rollback version)
    let deployments: Vec<ModelDeployment> =
        ctx.deployments.state().iter().filter(|md| md.spec.model == spec.model).map(|md| (**md).clone()).collect();
    // `capable.minStorage` admits nodes; the model then uses that storage. A node that holds this
    // rollout's deployment stays a target when storage is all it now lacks, or it would flap out
    // and back in with every install.
    let targets = match spec.scope.capable.as_ref().filter(|c| c.min_storage.is_some()) {
        Some(capable) => {
            let mut relaxed_scope = spec.scope.clone();
            relaxed_scope.capable = Some(crate::api::CapableScope { min_storage: None, ..capable.clone() });
            let relaxed = select_targets(&relaxed_scope, &fact_list).unwrap_or_default();
            let holding: BTreeSet<&str> = deployments
                .iter()
                .filter(|md| controller_uid(md) == Some(uid.as_str()))
                .map(|md| md.spec.node_name.as_str())
                .collect();
            let mut t: BTreeSet<String> = targets.into_iter().collect();
            t.extend(relaxed.into_iter().filter(|n| holding.contains(n.as_str())));
            t.into_iter().collect()
        }
        None => targets,
    };
    let failed = failed_on(&spec.version, &uid, &deployments);
    let newly_aborted = prev_aborted.is_none() && threshold_crossed(spec, failed, targets.len());
    let aborted_version = if newly_aborted { Some(spec.version.clone()) } else { prev_aborted.clone() };
    let aborted = aborted_version.is_some();
    let (mut target, resolved_note) = match effective_target(&ctx, &r, aborted).await {
        Ok(t) => t,
        Err(e) => {
            let problem = SourceProblem { reason: e.reason().into(), message: e.to_string() };
            let status = match &r.status {
                // Known before: keep counts, blockers and phase; only Ready says what is wrong.
                Some(prev) if prev.total_nodes > 0 => {
                    crate::plan::status::with_source_problem(prev, &problem, r.metadata.generation, now)
                }
                _ => rollout_status(&StatusInput {
                    rollout: &r,
                    target: None,
                    source_problem: Some(problem),
                    invalid_spec: None,
                    convergence: None,
                    conflicts: &[],
                    aborted_version,
                    in_flight: 0,
                    rate: None,
                    now,
                }),
            };
            write_status(&ctx, &r, &status).await?;
            if prev.conditions.iter().all(|c| c.reason != e.reason()) {
                publish(&ctx, &r, EventType::Warning, e.reason(), e.to_string()).await;
            }
            return Err(e.into());
        }
    };
    if let Some(note) = resolved_note {
        pin(&ctx, &r, &target, note).await?;
    }
    if newly_aborted {
        // Record the abort before acting on it: once deployments move back, the failures that
        // caused it are gone from the cache, and only status.abortedVersion remembers.
        let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"status": {"abortedVersion": spec.version}});
        api.patch_status(&r.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        ctx.metrics.status_writes.inc();
        let what = if target.rolling_back {
            format!("{failed} targets failed on {}: aborting, rolling back to {}", spec.version, target.version)
        } else {
            format!("{failed} targets failed on {}: aborting, no new transfers", spec.version)
        };
        warn!("{what}");
        publish(&ctx, &r, EventType::Warning, "Aborted", what).await;
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    // Rivals: other rollouts of this model that also want some of our targets.
    let my_targets: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    let mut contested: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    let mine =
        Claim { key: key(&r), uid: uid.clone(), priority: spec.priority, created: r.creation_timestamp().map(|t| t.0) };
    for other in ctx.rollouts.state() {
        if other.spec.model != spec.model
            || other.uid() == Some(uid.clone())
            || other.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let Ok(their) = select_targets(&other.spec.scope, &fact_list) else { continue };
        let claim = Claim {
            key: key(&other),
            uid: other.uid().unwrap_or_default(),
            priority: other.spec.priority,
            created: other.creation_timestamp().map(|t| t.0),
        };
        for n in their.into_iter().filter(|n| my_targets.contains(n.as_str())) {
            contested.entry(n).or_insert_with(|| vec![mine.clone()]).push(claim.clone());
        }
    }

    // plan (pure)
    let plan_for = |target: &EffectiveTarget| {
        plan_deployments(&PlanInput {
            rollout: &r,
            target,
            targets: &targets,
            nodes: &facts,
            deployments: &deployments,
            contested: &contested,
            aborted,
            now,
            heartbeat_timeout: ctx.heartbeat_timeout,
        })
    };
    let mut plan = plan_for(&target);
    // A node no pinned variant fits may be waiting for one still being pushed: look at the tag again.
    let mut tag_recheck = None;
    if plan.waits_for_a_variant() && !target.rolling_back {
        let pinned = crate::oci::Resolved { digest: target.digest.clone(), variants: target.variants.clone() };
        let (tag, next) = ctx.resolver.recheck_tag(&ctx.client, &r, &target.version, &pinned).await;
        match tag {
            TagNow::Extended(fresh) => {
                let added: Vec<&str> = fresh
                    .variants
                    .iter()
                    .filter(|f| target.variants.iter().all(|p| p.name != f.name))
                    .map(|f| f.name.as_str())
                    .collect();
                let note = format!(
                    "{}:{} gained variant(s) {}: resolved to {} (was {}; the variants already pinned are unchanged)",
                    spec.source.repository,
                    target.version,
                    added.join(", "),
                    fresh.digest,
                    target.digest
                );
                info!("{note}");
                target = EffectiveTarget { digest: fresh.digest, variants: fresh.variants, ..target };
                pin(&ctx, &r, &target, note).await?;
                plan = plan_for(&target);
            }
            TagNow::Moved(digest) => {
                let note = format!(
                    "{}:{} now points to {digest}, which changes variants pinned from {}: the rollout keeps \
                     {}; push changed bytes as a new version",
                    spec.source.repository, target.version, target.digest, target.digest
                );
                publish(&ctx, &r, EventType::Warning, "TagMoved", note).await;
            }
            TagNow::Same => {}
        }
        tag_recheck = plan.waits_for_a_variant().then_some(next);
    }

    // apply
    let md_api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = r.controller_owner_ref(&()).expect("a stored rollout has a uid");
    let existing: BTreeMap<String, &ModelDeployment> = deployments
        .iter()
        .filter(|md| md.namespace().as_deref() == Some(ns.as_str()))
        .map(|md| (md.name_any(), md))
        .collect();
    // Writes go out a few at a time: one round trip each, bounded so a big fleet does not flood
    // the API server (its priority-and-fairness limits apply as well).
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let applies = plan.apply.iter().filter_map(|desired| {
        let name = ModelDeployment::name_for(&desired.model, &desired.node_name);
        if existing.get(&name).is_some_and(|md| same_deployment(md, desired, &uid)) {
            return None;
        }
        let mut labels = serde_json::Map::new();
        labels.insert(LABEL_MODEL.into(), json!(desired.model));
        labels.insert(LABEL_VERSION.into(), json!(desired.version));
        if let Some(n) = node_label(&desired.node_name) {
            labels.insert(LABEL_NODE.into(), json!(n));
        }
        let obj = json!({
            "apiVersion": "peat.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
            "spec": desired,
        });
        let (md_api, pp, ctx) = (md_api.clone(), pp.clone(), ctx.clone());
        Some(async move {
            md_api.patch(&name, &pp, &Patch::Apply(&obj)).await?;
            ctx.metrics.deployment_writes.inc();
            Ok::<(), kube::Error>(())
        })
    });
    // Collected first: a lazy iterator of borrowing closures trips the Send bound of the controller.
    let applies: Vec<_> = applies.collect();
    futures::stream::iter(applies).buffer_unordered(WRITE_CONCURRENCY).try_collect::<Vec<()>>().await?;
    let deletes: Vec<_> = plan
        .delete
        .iter()
        .cloned()
        .map(|name| {
            let (md_api, ctx) = (md_api.clone(), ctx.clone());
            async move {
                match md_api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => {
                        ctx.metrics.deployment_writes.inc();
                        Ok(())
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .collect();
    futures::stream::iter(deletes).buffer_unordered(WRITE_CONCURRENCY).try_collect::<Vec<()>>().await?;

    // status (pure) from what the agents reported
    let own: Vec<ModelDeployment> =
        deployments.into_iter().filter(|md| controller_uid(md) == Some(uid.as_str())).collect();
    let convergence = aggregate(&spec.model, &target.version, &plan.targets, &own, &prev.blockers, now);
    let rate = ctx.rates.observe(&uid, (convergence.bytes_transferred + convergence.bytes_reused).max(0) as u64, now);
    let status = rollout_status(&StatusInput {
        rollout: &r,
        target: Some(&target),
        source_problem: None,
        invalid_spec: None,
        convergence: Some(&convergence),
        conflicts: &plan.conflicts,
        aborted_version,
        in_flight: plan.in_flight,
        rate,
        now,
    });
    let l = labels(&r);
    ctx.metrics.converged.get_or_create(&l).set(status.converged as i64);
    ctx.metrics.failed.get_or_create(&l).set(status.failed as i64);
    ctx.metrics.total.get_or_create(&l).set(status.total_nodes as i64);
    if status.phase != prev.phase {
        let type_ = match status.phase {
            RolloutPhase::Degraded | RolloutPhase::Failed | RolloutPhase::RolledBack => EventType::Warning,
            _ => EventType::Normal,
        };
        let note = format!(
            "{:?} → {:?}: {}/{} converged on {}",
            prev.phase, status.phase, status.converged, status.total_nodes, target.version
        );
        info!(phase = ?status.phase, "{note}");
        publish(&ctx, &r, type_, &format!("{:?}", status.phase), note).await;
    }
    if !plan.conflicts.is_empty() && prev.conditions.iter().all(|c| c.reason != "Conflict") {
        let holders: BTreeSet<&str> = plan.conflicts.iter().map(|(_, h)| h.as_str()).collect();
        let note = format!(
            "{} node(s) held for model {} by {}",
            plan.conflicts.len(),
            spec.model,
            holders.into_iter().collect::<Vec<_>>().join(", ")
        );
        publish(&ctx, &r, EventType::Warning, "Conflict", note).await;
    }
    write_status(&ctx, &r, &status).await?;
    ctx.failures.lock().expect("failures lock").remove(&uid);

    // Heartbeats age without events: look again when the first one would expire.
    // ... and the tag, while a node waits for a variant.
    let recheck = [plan.recheck_after, tag_recheck].into_iter().flatten().fold(Duration::from_secs(300), Duration::min);
    Ok(Action::requeue(recheck))
}

/// The rollout is being deleted: remove its ModelDeployments (owner references would too, where
/// garbage collection runs) and wait until they are gone before the finalizer is released.
async fn cleanup(r: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = r.namespace().unwrap_or_default();
    let uid = r.uid().unwrap_or_default();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = kube::api::ListParams::default().labels(&format!("{LABEL_MODEL}={}", r.spec.model));
    let owned: Vec<ModelDeployment> =
        api.list(&lp).await?.items.into_iter().filter(|md| controller_uid(md) == Some(uid.as_str())).collect();
    for md in &owned {
        match api.delete(&md.name_any(), &DeleteParams::background()).await {
            Ok(_) => {
                ctx.metrics.deployment_writes.inc();
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    ctx.metrics.forget(&labels(&r));
    ctx.rates.forget(&uid);
    ctx.resolver.forget(&uid);
    ctx.failures.lock().expect("failures lock").remove(&uid);
    info!(deleted = owned.len(), "rollout deleted: removed its ModelDeployments");
    Ok(Action::await_change())
}

/// Deletes ModelDeployments whose owning rollout no longer exists (a rollout deleted while no
/// controller ran, in a cluster without garbage collection).
pub(crate) async fn sweep_orphans(ctx: &Context) {
    let live: BTreeSet<String> = ctx.rollouts.state().iter().filter_map(|r| r.uid()).collect();
    for md in ctx.deployments.state() {
        let Some(owner) = controller_uid(&md) else { continue };
        if live.contains(owner) {
            continue;
        }
        // The caches are separate watches and may lag each other: ask the API server before deleting.
        let ns = md.namespace().unwrap_or_default();
        let owner_name =
            md.owner_references().iter().find(|o| o.uid == owner).map(|o| o.name.clone()).unwrap_or_default();
        let rollouts: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ns);
        match rollouts.get_opt(&owner_name).await {
            Ok(None) => {}
            Ok(Some(r)) if r.uid().as_deref() != Some(owner) => {}
            _ => continue, // the owner lives (or we cannot tell): keep
        }
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        match api.delete(&md.name_any(), &DeleteParams::background()).await {
            Ok(_) => info!(deployment = %md.name_any(), "removed an orphaned ModelDeployment"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => warn!(deployment = %md.name_any(), error = %e, "removing an orphaned ModelDeployment"),
        }
    }
}
