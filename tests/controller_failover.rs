//! Crashes and replicas: a controller SIGKILLed mid-rollout and restarted converges with no
//! duplicate or orphan object; of two replicas only the leader writes, and killing it hands over.
//! (A binary of its own: these tests kill controllers, which must not disturb other tests.)

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use peat::api::{DeploymentPhase, ModelDeployment, ModelRollout, RolloutPhase};
use serde_json::json;
use support::{NodeSpec, register_node, report};

const T: Duration = Duration::from_secs(60);

async fn apply_rollout(
    ctx: &support::Ctx,
    name: &str,
    model: &str,
    version: &str,
    repo: &str,
    nodes: &[String],
    max_parallel: i32,
) {
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let obj = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": name},
        "spec": {"model": model, "version": version, "source": {"repository": repo, "insecure": true},
                 "scope": {"nodes": nodes}, "strategy": {"maxParallel": max_parallel}}});
    api.patch(name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&obj)).await.unwrap();
}

/// Reports Operational for every deployment of `model` not yet there; returns how many it moved.
async fn finish_some(ctx: &support::Ctx, model: &str, at_most: usize) -> usize {
    let mut n = 0;
    for md in support::deployments(&ctx.client, &ctx.ns, model).await.values() {
        let done = md.status.as_ref().is_some_and(|s| {
            s.phase == DeploymentPhase::Operational && s.active_version.as_deref() == Some(&md.spec.version)
        });
        if !done && n < at_most {
            report(&ctx.client, &ctx.ns, &md.name_any(), DeploymentPhase::Operational, Some(&md.spec.version), 10)
                .await;
            n += 1;
        }
    }
    n
}

async fn drive_to_convergence(ctx: &support::Ctx, name: &str, model: &str) -> ModelRollout {
    support::eventually(&format!("{name} Converged"), T, || async {
        finish_some(ctx, model, usize::MAX).await;
        let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
        api.get(name).await.ok().filter(|r| r.status.as_ref().is_some_and(|s| s.phase == RolloutPhase::Converged))
    })
    .await
}

fn assert_one_per_node_and_owned(mds: &[ModelDeployment], rollout: &ModelRollout, nodes: &[String]) {
    let uid = rollout.uid().unwrap();
    let on: Vec<&str> = mds.iter().map(|m| m.spec.node_name.as_str()).collect();
    let unique: BTreeSet<&str> = on.iter().copied().collect();
    assert_eq!(on.len(), unique.len(), "duplicate deployments: {on:?}");
    assert_eq!(unique, nodes.iter().map(String::as_str).collect::<BTreeSet<_>>());
    for m in mds {
        let owner = m.owner_references().iter().find(|o| o.controller == Some(true)).map(|o| o.uid.clone());
        assert_eq!(owner.as_deref(), Some(uid.as_str()), "{} is not owned by the rollout", m.name_any());
    }
}

#[tokio::test]
async fn a_controller_killed_mid_rollout_and_restarted_converges_without_duplicates_or_orphans() {
    let system = support::ctx("lease-crash").await;
    let ctx = support::ctx("crash").await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    support::push_two_variants(&repo, "1.0.0").await;
    let nodes: Vec<String> = (0..5).map(|i| format!("{}-n{i}", ctx.ns)).collect();
    for n in &nodes {
        register_node(&ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
    }
    let mut first = support::start_controller("crash-a", &system.ns, &[]).await;
    first.wait_leading(T).await;
    apply_rollout(&ctx, "r", "m", "1.0.0", &repo, &nodes, 2).await;
    apply_rollout(&ctx, "doomed", "d", "1.0.0", &repo, &nodes[..1], 2).await;
    support::eventually("two deployments of m started", T, || async {
        (support::deployments(&ctx.client, &ctx.ns, "m").await.len() == 2).then_some(())
    })
    .await;
    finish_some(&ctx, "m", 1).await;

    // SIGKILL: no graceful shutdown, no lease release.
    first.process.kill();
    // While no controller runs: an agent finishes, and a rollout is deleted (its finalizer holds it).
    finish_some(&ctx, "m", 1).await;
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    api.delete("doomed", &DeleteParams::default()).await.unwrap();

    let second = support::start_controller("crash-b", &system.ns, &[]).await;
    second.wait_leading(T).await;
    let r = drive_to_convergence(&ctx, "r", "m").await;
    let mds: Vec<ModelDeployment> = Api::<ModelDeployment>::namespaced(ctx.client.clone(), &ctx.ns)
        .list(&ListParams::default().labels("peat.dev/model=m"))
        .await
        .unwrap()
        .items;
    assert_one_per_node_and_owned(&mds, &r, &nodes);
    assert_eq!(r.status.as_ref().unwrap().converged, 5);
    support::eventually("the deleted rollout and its deployment gone", T, || async {
        (api.get_opt("doomed").await.unwrap().is_none()
            && support::deployments(&ctx.client, &ctx.ns, "d").await.is_empty())
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_writes_and_killing_it_hands_over() {
    let system = support::ctx("lease-replicas").await;
    let ctx = support::ctx("replicas").await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    support::push_two_variants(&repo, "1.0.0").await;
    support::push_two_variants(&repo, "2.0.0").await;
    let nodes: Vec<String> = (0..3).map(|i| format!("{}-n{i}", ctx.ns)).collect();
    for n in &nodes {
        register_node(&ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
    }
    let mut a = support::start_controller("replica-a", &system.ns, &[]).await;
    let mut b = support::start_controller("replica-b", &system.ns, &[]).await;
    // Exactly one leads.
    let leader_is_a = support::eventually("one replica leading", T, || async {
        match (a.metric("peat_controller_leader").await, b.metric("peat_controller_leader").await) {
            (Some(1.0), Some(0.0)) => Some(true),
            (Some(0.0), Some(1.0)) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, follower) = if leader_is_a { (&mut a, &mut b) } else { (&mut b, &mut a) };

    apply_rollout(&ctx, "r", "m", "1.0.0", &repo, &nodes, 3).await;
    let r = drive_to_convergence(&ctx, "r", "m").await;
    assert_eq!(r.status.as_ref().unwrap().converged, 3);
    let leader_writes = leader.metric("peat_controller_deployment_writes_total").await.unwrap();
    assert!(leader_writes >= 3.0, "the leader wrote the deployments ({leader_writes})");
    assert_eq!(follower.metric("peat_controller_reconciles_total").await, Some(0.0), "the follower reconciles nothing");
    assert_eq!(
        follower.metric("peat_controller_deployment_writes_total").await,
        Some(0.0),
        "the follower writes nothing"
    );
    assert_eq!(follower.metric("peat_controller_status_writes_total").await, Some(0.0));

    leader.process.kill();
    follower.wait_leading(T).await;
    // The new leader carries on: an upgrade converges.
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    api.patch("r", &PatchParams::default(), &Patch::Merge(json!({"spec": {"version": "2.0.0"}}))).await.unwrap();
    support::eventually("deployments on 2.0.0", T, || async {
        support::deployments(&ctx.client, &ctx.ns, "m").await.values().all(|m| m.spec.version == "2.0.0").then_some(())
    })
    .await;
    let r = drive_to_convergence(&ctx, "r", "m").await;
    assert_eq!(r.status.as_ref().unwrap().resolved_version.as_deref(), Some("2.0.0"));
    assert!(follower.metric("peat_controller_deployment_writes_total").await.unwrap() >= 3.0, "the new leader wrote");
}

/// A retry is state of the term that scheduled it. When the lease is lost between a failure and
/// its retry — here taken by another identity, as a partitioned replica's would be — and won back,
/// the new term reconciles every rollout: the version pushed in between is picked up.
#[tokio::test]
async fn a_retry_pending_when_the_lease_is_lost_is_made_good_when_it_is_won_back() {
    use k8s_openapi::api::coordination::v1::Lease;
    let system = support::ctx("lease-flap").await;
    let ctx = support::ctx("flap").await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    let node = format!("{}-n", ctx.ns);
    register_node(&ctx.client, &NodeSpec::new(&node, "amd64", 0, &["cpu"])).await;
    let c = support::start_controller("flapper", &system.ns, &[]).await;
    c.wait_leading(T).await;
    apply_rollout(&ctx, "late", "m", "9.9.9", &repo, std::slice::from_ref(&node), 1).await;
    support::wait_rollout(&ctx.client, &ctx.ns, "late", "Ready=False VersionNotFound", T, |r| {
        r.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "VersionNotFound"))
    })
    .await;

    // Another identity takes the lease; the controller notices at its next renewal and stops.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &system.ns);
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let take = json!({"spec": {"holderIdentity": "intruder", "acquireTime": now, "renewTime": now, "leaseDurationSeconds": 4}});
    leases.patch("peat-controller", &PatchParams::default(), &Patch::Merge(&take)).await.unwrap();
    support::eventually("the controller to step down", T, || async {
        (c.metric("peat_controller_leader").await == Some(0.0)).then_some(())
    })
    .await;
    support::push_two_variants(&repo, "9.9.9").await;
    // The intruder never renews: the lease expires and the controller takes it back.
    c.wait_leading(T).await;
    support::eventually("the deployment of the pushed version", T, || async {
        let mds = support::deployments(&ctx.client, &ctx.ns, "m").await;
        mds.get(&node).filter(|md| md.spec.version == "9.9.9").map(|_| ())
    })
    .await;
}

/// Two replicas that both read the Lease as free (as two pods of the chart's Deployment do at
/// install): the one that claims it second — with the apply the lease manager sends for a free
/// Lease — must be refused, not overwrite the holder. Under one field manager shared by every
/// replica the second apply succeeded and both led until their first renewal (seen on the real
/// node, tests/real_node.rs: two controller pods led for ten seconds).
#[tokio::test]
async fn a_replica_claiming_a_lease_it_read_as_free_after_another_took_it_is_refused() {
    use k8s_openapi::api::coordination::v1::Lease;
    let ctx = support::ctx("lease-race").await;
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let a = peat::controller::lease_manager(ctx.client.clone(), &ctx.ns, "race", 15, "replica-a").await.unwrap();
    assert!(a.changed().await.unwrap(), "replica-a takes the free Lease");
    // replica-b read the Lease before that, found it free, and now claims it.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let claim = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {
        "acquireTime": now, "renewTime": now, "holderIdentity": "replica-b", "leaseDurationSeconds": 15}});
    let pp =
        PatchParams { field_manager: Some(peat::controller::lease_field_manager("replica-b")), ..Default::default() };
    match leases.patch("race", &pp, &Patch::Apply(&claim)).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409, "the stale claim conflicts: {e:?}"),
        other => panic!("replica-b's stale claim was not refused: {other:?}"),
    }
    let holder = leases.get("race").await.unwrap().spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("replica-a"), "the first claim stands");
    a.release().await.unwrap();
}
