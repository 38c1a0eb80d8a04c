//! Nodes that go silent mid-transfer (the agent killed, as a power cut or a lost uplink would leave
//! it), and the ETA. A silent node is a `NetworkPartition` blocker after the heartbeat timeout and
//! gives its `maxParallel` slot to the next node; back, it resumes from its partial download and the
//! rollout converges without operator action. The ETA is kept in the status (a new controller goes
//! on from it), grows while nothing moves, and leaves silent nodes out.
//!
//! Own test binary: its controllers run a short heartbeat timeout. The tests take turns, each with
//! a controller of its own (two at once would both reconcile every namespace).

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use peat::api::{BlockerReason, DeploymentPhase, ModelDeployment, ModelRollout, RolloutPhase};
use peat::oci::push::VariantMeta;
use serde_json::json;
use support::{CountingProxy, create_node, pseudo_random, push_files, start_agent};

const T: Duration = Duration::from_secs(90);
const MI: usize = 1 << 20;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn controller(ns: &str) -> support::ControllerProc {
    let c = support::start_controller("controller", ns, &["--heartbeat-timeout", "6s"]).await;
    c.wait_leading(T).await;
    c
}

/// Pushes `size` bytes of model `model` 1.0.0 and applies a rollout of it to `nodes` through `via`.
async fn roll_out(
    ctx: &support::Ctx,
    via: &str,
    model: &str,
    size: usize,
    nodes: &[&str],
    max_parallel: i32,
) -> Vec<u8> {
    let files = vec![("weights.bin", pseudo_random(size as u64, size))];
    let meta = VariantMeta { name: "int8-cpu".into(), providers: vec!["cpu".into()], ..Default::default() };
    push_files(&format!("{}/models/{model}", ctx.env.registry), "1.0.0", meta, &files).await;
    let rollout = json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": model},
        "spec": {"model": model, "version": "1.0.0",
                 "source": {"repository": format!("{via}/models/{model}"), "insecure": true},
                 "scope": {"nodes": nodes}, "strategy": {"maxParallel": max_parallel}},
    });
    let rollouts: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    rollouts.patch(model, &PatchParams::apply("peat-test"), &Patch::Apply(&rollout)).await.expect("applying");
    files.into_iter().next().unwrap().1
}

#[tokio::test]
async fn a_node_silent_mid_transfer_gives_up_its_slot_and_catches_up_when_back() {
    let _turn = TURN.lock().await;
    let ctx = support::ctx("partition").await;
    let _controller = controller(&ctx.ns).await;
    let size = 24 * MI;
    // The nodes reach the registry over a 6 MiB/s link: a pull takes about 4 s.
    let link = CountingProxy::start(&ctx.env.registry).await;
    link.set_rate(6 * MI as u64);
    let dir = ctx.env.dir.join(&ctx.ns);
    let (first, second) = (format!("{}-a", ctx.ns), format!("{}-b", ctx.ns));
    for n in [&first, &second] {
        create_node(&ctx.client, n, &[]).await;
    }
    let mut a = start_agent(&first, &dir.join("store-a"), &[]);
    let b = start_agent(&second, &dir.join("store-b"), &[]);
    let pushed = roll_out(&ctx, &link.addr, "big", size, &[&first, &second], 1).await;
    let rollouts: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    // The first node (by name) has the one slot; it goes silent a third of the way in.
    let partial = support::partial_over(&a.store, (size / 3) as u64, "a third on the first node").await;
    a.kill();
    assert!(partial < size as u64);

    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    support::eventually("the silent node a NetworkPartition blocker", T, || async {
        let st = rollouts.get("big").await.ok()?.status?;
        st.blockers.iter().any(|bl| bl.node == first && bl.reason == BlockerReason::NetworkPartition).then_some(())
    })
    .await;
    let on_b = support::eventually("the second node served while the first is silent", T, || async {
        let md = mds.get(&ModelDeployment::name_for("big", &second)).await.ok()?;
        md.status.as_ref().is_some_and(|s| s.phase == DeploymentPhase::Operational).then_some(md)
    })
    .await;
    assert_eq!(on_b.status.unwrap().active_version.as_deref(), Some("1.0.0"), "{}", b.log_tail());

    // Back: it resumes where it stopped and the rollout converges.
    let before = link.delivered();
    a.restart();
    support::eventually("converged on both nodes", T, || async {
        let st = rollouts.get("big").await.ok()?.status?;
        (st.phase == RolloutPhase::Converged && st.converged == 2).then_some(())
    })
    .await;
    let resumed = link.delivered() - before;
    assert!(
        resumed <= (size as u64 - partial) + (size as u64 / 20),
        "the returning node fetched {resumed} bytes; {} were left after its {partial}-byte partial",
        size as u64 - partial
    );
    let got = std::fs::read(a.store.join("models/big/current/weights.bin")).unwrap();
    assert!(got == pushed, "the resumed file is the pushed one");
}

#[tokio::test]
async fn the_eta_is_kept_in_status_grows_while_stalled_and_leaves_silent_nodes_out() {
    let _turn = TURN.lock().await;
    let ctx = support::ctx("eta").await;
    let mut first_controller = controller(&ctx.ns).await;
    let link = CountingProxy::start(&ctx.env.registry).await;
    link.set_rate(2 * MI as u64);
    let node = format!("{}-n", ctx.ns);
    create_node(&ctx.client, &node, &[]).await;
    let mut agent = start_agent(&node, &ctx.env.dir.join(&ctx.ns).join("store"), &[]);
    roll_out(&ctx, &link.addr, "eta", 32 * MI, &[&node], 1).await;
    let rollouts: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let status = || async { rollouts.get("eta").await.ok().and_then(|r| r.status) };
    let moving = support::eventually("an ETA from a measured rate", T, || async {
        let st = status().await?;
        (st.estimated_completion_seconds.is_some_and(|s| s > 0) && st.transfer_rate_bytes_per_second.is_some())
            .then_some(st)
    })
    .await;
    assert!(moving.last_progress_time.is_some(), "{moving:?}");

    // The transfer's connection stalls (no error, no byte; it takes the agent's read timeout, 60 s,
    // to notice) and the controller is replaced: the new one goes on from the status, and the ETA
    // grows while nothing moves (instead of freezing, or vanishing with the old process's memory).
    link.stall_open_connections();
    first_controller.process.kill();
    let _second_controller = controller(&ctx.ns).await;
    // The ETA to compare with is the one written with the last progress: bytes the agent had read
    // before the stall are still reported (and counted, with a new rate) after it, which can
    // lower the ETA once more (seen: 71 s before them, 45 s after).
    let baseline = std::sync::Mutex::new(None);
    let grown = support::eventually("the ETA grown by half since the last progress", T, || async {
        let st = status().await?;
        let (eta, at) = (st.estimated_completion_seconds?, st.last_progress_time.clone()?);
        let mut b = baseline.lock().unwrap();
        match &*b {
            Some((t, since)) if *t == at => (eta as f64 >= 1.5 * *since as f64).then_some(st),
            _ => {
                *b = Some((at, eta));
                None
            }
        }
    })
    .await;
    assert_eq!(grown.partitioned_nodes, 0);

    // The node goes silent: reported apart, and no ETA is promised for it.
    agent.kill();
    let silent = support::eventually("the silent node out of the ETA", T, || async {
        status().await.filter(|st| st.partitioned_nodes == 1)
    })
    .await;
    assert_eq!(silent.estimated_completion_seconds, None, "{silent:?}");
    assert!(silent.blockers.iter().any(|b| b.node == node && b.reason == BlockerReason::NetworkPartition));
}
