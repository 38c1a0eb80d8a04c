//! One reconcile as a pipeline of named steps:
//! [`observe`] (the caches) → [`Reconcile::resolve`] (the registry) → [`Reconcile::plan`] (pure,
//! in `plan/`) → [`writes::apply_plan`] → [`Reconcile::report`] (pure status, one write).
//! Deletion is [`cleanup`]; [`sweep_orphans`] catches what a deletion missed while no controller ran.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tracing::{debug, info, instrument, warn};

use super::context::{Context, NodeObjects, key};
use super::metrics::{ErrorLabels, RolloutLabels};
use super::resolve::{ResolveError, TagNow};
use super::secrets;
use super::writes::{self, StatusWriter, delete_if_present, publish};
use crate::api::shared::LABEL_MODEL;
use crate::api::{ModelDeployment, ModelRollout, ModelRolloutStatus, RolloutPhase};
use crate::plan::abort::{AbortDecision, abort_decision};
use crate::plan::convergence::aggregate;
use crate::plan::rivals::{Claim, claim_of, contested, rivals_of};
use crate::plan::scope::{NodeFacts, ScopeError, rollout_targets, select_targets};
use crate::plan::status::{SourceProblem, StatusInput, conflict_message, rollout_status, with_source_problem};
use crate::plan::strategy::{EffectiveTarget, Plan, PlanInput, controller_uid, plan_deployments};

pub use super::writes::FIELD_MANAGER;

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

/// How often a rollout with an ETA is looked at without an event (a stall decays the ETA).
const ETA_REFRESH: Duration = Duration::from_secs(10);

/// Entry point of the kube-runtime Controller.

#[instrument(skip_all, fields(rollout = %key(&rollout)))]
pub async fn reconcile(rollout: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = rollout.namespace().unwrap_or_default();
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ns);
    let result = async {
        // kube-runtime's `finalizer` adds a missing finalizer and ends the reconcile, leaving the
        // rest to the trigger the write causes — which the throttle holds back up to
        // TRIGGER_INTERVAL, so every new rollout's first deployments would wait for it. The
        // finalizer is added here instead, and the reconcile goes on with the stored rollout.
        let rollout =
            if rollout.metadata.deletion_timestamp.is_none() && !rollout.finalizers().iter().any(|f| f == FINALIZER) {
                let stored = writes::add_finalizer(&api, &rollout, FINALIZER)
                    .await
                    .map_err(|e| Error::Finalizer(Box::new(kube::runtime::finalizer::Error::AddFinalizer(e))))?;
                Arc::new(stored)
            } else {
                rollout
            };
        finalizer(&api, FINALIZER, rollout, |event| async {
            match event {
                Finalizer::Apply(r) => apply(r, ctx.clone()).await,
                Finalizer::Cleanup(r) => cleanup(r, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(Box::new(other)),
        })
    }
    .await;
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

/// What the caches say, for one rollout.
struct Observed<'a> {
    /// Every node: Node labels joined with ModelNode facts (borrowed from the caches' objects).
    facts: BTreeMap<std::borrow::Cow<'a, str>, NodeFacts<'a>>,
    /// The ModelDeployments of the rollout's model, whoever owns them (shared with the cache).
    deployments: Vec<Arc<ModelDeployment>>,
    /// The rollout's targets, or why its scope cannot be evaluated.
    targets: Result<Vec<String>, ScopeError>,
    /// Targets that other rollouts of the model also want, with every claim on each.
    contested: BTreeMap<String, Vec<Claim>>,
}

/// observe: reads the caches (no I/O).
fn observe<'a>(ctx: &Context, r: &ModelRollout, nodes: &'a NodeObjects) -> Observed<'a> {
    let facts = nodes.node_facts();
    let fact_list: Vec<NodeFacts<'_>> = facts.values().cloned().collect();
    let deployments: Vec<Arc<ModelDeployment>> =
        ctx.deployments.state().into_iter().filter(|md| md.spec.model == r.spec.model).collect();
    let uid = r.uid().unwrap_or_default();
    let holds: BTreeSet<&str> = deployments
        .iter()
        .filter(|md| controller_uid(md) == Some(uid.as_str()))
        .map(|md| md.spec.node_name.as_str())
        .collect();
    let targets = rollout_targets(&r.spec.scope, &fact_list, &holds);
    let contested = match &targets {
        Ok(targets) => {
            let all = ctx.rollouts.state();
            let theirs = rivals_of(r, all.iter().map(|o| &**o))
                .map(|o| (claim_of(o), select_targets(&o.spec.scope, &fact_list).ok()));
            contested(&claim_of(r), targets, theirs)
        }
        Err(_) => BTreeMap::new(),
    };
    Observed { facts, deployments, targets, contested }
}

/// One reconcile of one rollout.
struct Reconcile<'a> {
    ctx: &'a Context,
    r: &'a ModelRollout,
    now: Timestamp,
    status: StatusWriter<'a>,
}

async fn apply(r: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let mut rec = Reconcile { ctx: &ctx, r: &r, now: Timestamp::now(), status: StatusWriter::new(&r) };
    let nodes = ctx.node_objects();
    let seen = observe(&ctx, &r, &nodes);
    debug!(since_start = ?started.elapsed(), "observed");
    let recorded_abort = r.status.as_ref().and_then(|s| s.aborted_version.as_deref());
    let targets = match &seen.targets {
        Ok(t) => t,
        Err(e) => {
            let aborted_version = recorded_abort.filter(|v| *v == r.spec.version).map(String::from);
            rec.write_problem(None, Some(e.to_string()), aborted_version).await?;
            return Err(Error::InvalidSpec(e.to_string()));
        }
    };
    let uid = r.uid().unwrap_or_default();
    let abort = abort_decision(&r.spec, recorded_abort, &uid, &seen.deployments, targets.len());
    // Before the deployments that need them (the agents read the copies), and before resolving: a
    // revoked pull secret must take its copy with it even though resolution then fails.
    secrets::copy_for_agents(&ctx, &r).await?;
    let target = rec.resolve(&abort).await?;
    debug!(since_start = ?started.elapsed(), "resolved");
    if abort.newly {
        return rec.record_abort(&abort, &target).await;
    }
    let (plan, target, tag_recheck) = rec.plan(&seen, targets, target, &abort).await?;
    debug!(targets = targets.len(), planned = plan.apply.len(), since_start = ?started.elapsed(), "planned");
    writes::apply_plan(&ctx, &r, &plan, &seen.deployments).await?;
    debug!(since_start = ?started.elapsed(), "deployments written");
    let recheck = rec.report(seen.deployments, &plan, &target, abort).await?;
    // Heartbeats age without events: look again when the first one would expire; and at the tag,
    // while a node waits for a variant.
    let next = [recheck, tag_recheck].into_iter().flatten().fold(Duration::from_secs(300), Duration::min);
    Ok(Action::requeue(next))
}

impl Reconcile<'_> {
    /// resolve: the effective target, pinned in status when newly resolved. A source that cannot
    /// be read is written to status (keeping what is known of the targets) and returned.
    async fn resolve(&mut self, abort: &AbortDecision) -> Result<EffectiveTarget, Error> {
        match self.effective_target(abort.aborted_version.is_some()).await {
            Ok((target, None)) => Ok(target),
            Ok((target, Some(note))) => {
                self.pin(&target, note).await?;
                Ok(target)
            }
            Err(e) => {
                let problem = SourceProblem { reason: e.reason().into(), message: e.to_string() };
                let prev = self.status.current();
                if prev.total_nodes > 0 {
                    // Known before: keep counts, blockers and phase; only Ready says what is wrong.
                    let status = with_source_problem(&prev, &problem, self.r.metadata.generation, self.now);
                    self.status.write(self.ctx, status).await?;
                } else {
                    self.write_problem(Some(problem), None, abort.aborted_version.clone()).await?;
                }
                if prev.conditions.iter().all(|c| c.reason != e.reason()) {
                    publish(self.ctx, self.r, EventType::Warning, e.reason(), e.to_string()).await;
                }
                Err(e.into())
            }
        }
    }

    /// The effective target: the spec's version, or, for an aborted rollout with autoRollback,
    /// the last version it converged on before. The note, when set, says it was newly resolved.
    async fn effective_target(&self, aborted: bool) -> Result<(EffectiveTarget, Option<String>), ResolveError> {
        let (ctx, r) = (self.ctx, self.r);
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
        let target = EffectiveTarget {
            version: spec.version.clone(),
            digest: resolved.digest,
            variants: resolved.variants,
            rolling_back: false,
        };
        Ok((target, note))
    }

    /// Pins a resolution in status at once: should anything after it fail, the retry must not
    /// read the tag again. A new resolution is a new target: the phase must not say Converged
    /// (of the old one) in the moment before the full status is written.
    async fn pin(&mut self, target: &EffectiveTarget, note: String) -> Result<(), Error> {
        let status = ModelRolloutStatus {
            resolved_version: Some(target.version.clone()),
            resolved_digest: Some(target.digest.clone()),
            phase: RolloutPhase::Progressing,
            ..self.status.current()
        };
        self.status.write(self.ctx, status).await?;
        publish(self.ctx, self.r, EventType::Normal, "Resolved", note).await;
        Ok(())
    }

    /// Records an abort before acting on it: once deployments move back, the failures that
    /// caused it are gone from the cache, and only `status.abortedVersion` remembers.
    async fn record_abort(&mut self, abort: &AbortDecision, target: &EffectiveTarget) -> Result<Action, Error> {
        let status = ModelRolloutStatus { aborted_version: abort.aborted_version.clone(), ..self.status.current() };
        self.status.write(self.ctx, status).await?;
        let (failed, version) = (abort.failed, &self.r.spec.version);
        let what = if target.rolling_back {
            format!("{failed} targets failed on {version}: aborting, rolling back to {}", target.version)
        } else {
            format!("{failed} targets failed on {version}: aborting, no new transfers")
        };
        warn!("{what}");
        publish(self.ctx, self.r, EventType::Warning, "Aborted", what).await;
        Ok(Action::requeue(Duration::from_millis(200)))
    }

    /// plan: the deployments to write (pure). A node no pinned variant fits may be waiting for
    /// one still being pushed: then the tag is read again (at most as often as the resolver
    /// allows), and a tag that gained variants is adopted. Returns the plan, the target it was
    /// made for, and when to look at the tag next.
    async fn plan(
        &mut self,
        seen: &Observed<'_>,
        targets: &[String],
        mut target: EffectiveTarget,
        abort: &AbortDecision,
    ) -> Result<(Plan, EffectiveTarget, Option<Duration>), Error> {
        let (ctx, r, now) = (self.ctx, self.r, self.now);
        let plan_for = |target: &EffectiveTarget| {
            plan_deployments(&PlanInput {
                rollout: r,
                target,
                targets,
                nodes: &seen.facts,
                deployments: &seen.deployments,
                contested: &seen.contested,
                aborted: abort.aborted_version.is_some(),
                now,
                heartbeat_timeout: ctx.heartbeat_timeout,
            })
        };
        let mut plan = plan_for(&target);
        if !plan.waits_for_a_variant() || target.rolling_back {
            return Ok((plan, target, None));
        }
        let pinned = crate::oci::Resolved { digest: target.digest.clone(), variants: target.variants.clone() };
        let (tag, next) = ctx.resolver.recheck_tag(&ctx.client, r, &target.version, &pinned).await;
        let repository = &r.spec.source.repository;
        match tag {
            TagNow::Extended(fresh) => {
                let added: Vec<&str> = fresh
                    .variants
                    .iter()
                    .filter(|f| target.variants.iter().all(|p| p.name != f.name))
                    .map(|f| f.name.as_str())
                    .collect();
                let note = format!(
                    "{repository}:{} gained variant(s) {}: resolved to {} (was {}; the variants already pinned are unchanged)",
                    target.version,
                    added.join(", "),
                    fresh.digest,
                    target.digest
                );
                info!("{note}");
                target = EffectiveTarget { digest: fresh.digest, variants: fresh.variants, ..target };
                // Not pinned on its own (as a first resolution is): the status written at the end
                // of this reconcile carries the new digest together with the blockers planned for it,
                // never the new digest beside the old plan's blockers. Should this reconcile fail
                // before, the old pin stands and the tag is read again soon.
                publish(ctx, r, EventType::Normal, "Resolved", note).await;
                plan = plan_for(&target);
            }
            TagNow::Moved(digest) => {
                let note = format!(
                    "{repository}:{} now points to {digest}, which changes variants pinned from {}: the rollout \
                     keeps {}; push changed bytes as a new version",
                    target.version, target.digest, target.digest
                );
                publish(ctx, r, EventType::Warning, "TagMoved", note).await;
            }
            TagNow::Same => {}
        }
        let tag_recheck = plan.waits_for_a_variant().then_some(next);
        Ok((plan, target, tag_recheck))
    }

    /// status: aggregates what the agents reported (pure), updates metrics, publishes Events
    /// on transitions and writes the status. Returns when to look again for heartbeats.
    async fn report(
        &mut self,
        deployments: Vec<Arc<ModelDeployment>>,
        plan: &Plan,
        target: &EffectiveTarget,
        abort: AbortDecision,
    ) -> Result<Option<Duration>, Error> {
        let (ctx, r, now) = (self.ctx, self.r, self.now);
        let uid = r.uid().unwrap_or_default();
        let prev = r.status.clone().unwrap_or_default();
        let own: Vec<Arc<ModelDeployment>> =
            deployments.into_iter().filter(|md| controller_uid(md) == Some(uid.as_str())).collect();
        let convergence = aggregate(&r.spec.model, &target.version, &plan.targets, &own, &prev.blockers, now);
        let status = rollout_status(&StatusInput {
            rollout: r,
            target: Some(target),
            source_problem: None,
            invalid_spec: None,
            convergence: Some(&convergence),
            conflicts: &plan.conflicts,
            aborted_version: abort.aborted_version,
            in_flight: plan.in_flight,
            now,
        });
        let l = RolloutLabels::of(r);
        ctx.metrics.converged.get_or_create(&l).set(status.converged as i64);
        ctx.metrics.failed.get_or_create(&l).set(status.failed as i64);
        ctx.metrics.total.get_or_create(&l).set(status.total_nodes as i64);
        ctx.metrics.serving.get_or_create(&l).set(status.serving as i64);
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
            publish(ctx, r, type_, &format!("{:?}", status.phase), note).await;
        }
        if !plan.conflicts.is_empty() && prev.conditions.iter().all(|c| c.reason != "Conflict") {
            let note = conflict_message(&r.spec.model, &plan.conflicts);
            publish(ctx, r, EventType::Warning, "Conflict", note).await;
        }
        // While bytes are to come, look again now and then even without an event: a stall shows
        // as a growing ETA instead of a frozen one.
        let eta_refresh = status.estimated_completion_seconds.filter(|s| *s > 0).map(|_| ETA_REFRESH);
        self.status.write(ctx, status).await?;
        ctx.failures.lock().expect("failures lock").remove(&uid);
        Ok([plan.recheck_after, eta_refresh].into_iter().flatten().min())
    }

    /// Writes a status that says why nothing can be planned (no target known).
    async fn write_problem(
        &mut self,
        source_problem: Option<SourceProblem>,
        invalid_spec: Option<String>,
        aborted_version: Option<String>,
    ) -> Result<(), Error> {
        let status = rollout_status(&StatusInput {
            rollout: self.r,
            target: None,
            source_problem,
            invalid_spec,
            convergence: None,
            conflicts: &[],
            aborted_version,
            in_flight: 0,
            now: self.now,
        });
        Ok(self.status.write(self.ctx, status).await?)
    }
}

/// The rollout is being deleted: remove its ModelDeployments (owner references would too, where
/// garbage collection runs) and wait until they are gone before the finalizer is released.
async fn cleanup(r: Arc<ModelRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = r.uid().unwrap_or_default();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    let lp = kube::api::ListParams::default().labels(&format!("{LABEL_MODEL}={}", r.spec.model));
    let owned: Vec<ModelDeployment> =
        api.list(&lp).await?.items.into_iter().filter(|md| controller_uid(md) == Some(uid.as_str())).collect();
    for md in &owned {
        if delete_if_present(&api, &md.name_any()).await? {
            ctx.metrics.deployment_writes.inc();
        }
    }
    ctx.metrics.forget(&RolloutLabels::of(&r));
    secrets::sweep_pull_secret_copies(&ctx, Some(&uid)).await;
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
        match delete_if_present(&api, &md.name_any()).await {
            Ok(true) => info!(deployment = %md.name_any(), "removed an orphaned ModelDeployment"),
            Ok(false) => {}
            Err(e) => warn!(deployment = %md.name_any(), error = %e, "removing an orphaned ModelDeployment"),
        }
    }
}
