//! Leader election: only the replica holding the Lease runs the kube-runtime Controller over the
//! triggers, so only it writes; after any change of leadership it reconciles every rollout.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::ObjectRef;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::context::Context;
use super::options::Options;
use super::reconcile::{self, FIELD_MANAGER};
use super::triggers;
use super::watches::Triggers;

/// Runs the controller whenever this replica holds the Lease, until `shutdown`.
pub(crate) async fn run_with_leader_election(
    opts: &Options,
    identity: &str,
    ctx: Arc<Context>,
    triggers: Triggers,
    ready: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let duration = opts.lease_duration.as_secs().max(2);
    let manager =
        lease_manager(ctx.client.clone(), &opts.lease_namespace, &opts.lease_name, duration, identity).await?;
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

/// The manager of this replica's claim on the Lease `namespace/name`, valid `duration` seconds.
///
/// Each replica applies the Lease's holder under a field manager of its own: two replicas that
/// find the Lease free at once then conflict on the apply and one of them backs off. Under one
/// shared field manager both applies succeeded, and both replicas led until their first renewal.
pub async fn lease_manager(
    client: kube::Client,
    namespace: &str,
    name: &str,
    duration: u64,
    identity: &str,
) -> Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError> {
    kube_lease_manager::LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .with_field_manager(lease_field_manager(identity))
        .build()
        .await
}

/// The field manager under which the replica `identity` applies its claim on the Lease.
pub fn lease_field_manager(identity: &str) -> String {
    format!("{FIELD_MANAGER}-lease-{identity}")
}

/// Runs the kube-runtime Controller over the broadcast triggers until `stop`.
pub(crate) async fn run_controller(
    ctx: Arc<Context>,
    triggers: Triggers,
    mut ready: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) {
    // Do not plan from half-listed caches: a missing ModelDeployment would look like one to create.
    tokio::select! {
        _ = stop.cancelled() => return,
        r = ready.wait_for(|r| *r) => if r.is_err() { return },
    }
    reconcile::sweep_orphans(&ctx).await;
    // Copies may have changed while another replica led: write each again once.
    ctx.secret_copies.lock().expect("copies lock").clear();
    super::secrets::sweep_pull_secret_copies(&ctx, None).await;
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
