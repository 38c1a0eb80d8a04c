//! The controller on the real environment. Test code plays the agents: it registers Nodes and
//! ModelNodes and patches ModelDeployment status; artifacts are pushed to the real registry.
//! One `peat controller` serves every test of this binary; each test uses its own nodes and namespace.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use peat::api::{BlockerReason, DeploymentPhase, ModelDeployment, ModelRollout, RolloutPhase};
use serde_json::json;
use support::{NodeSpec, TestVariant, register_node, report};
use tokio::sync::OnceCell;

const T: Duration = Duration::from_secs(60);
const GI: i64 = 1 << 30;

static CONTROLLER: OnceCell<support::ControllerProc> = OnceCell::const_new();

async fn controller() -> &'static support::ControllerProc {
    CONTROLLER
        .get_or_init(|| async {
            let ctx = support::ctx("peat-system").await;
            let c = support::start_controller("controller", &ctx.ns, &[]).await;
            c.wait_leading(T).await;
            c
        })
        .await
}

struct Setup {
    ctx: support::Ctx,
    repo: String,
}

/// A namespace, the shared controller, and `model` pushed at `versions` with two variants each.
async fn setup(test: &str, versions: &[&str]) -> Setup {
    controller().await;
    let ctx = support::ctx(test).await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    for v in versions {
        support::push_two_variants(&repo, v).await;
    }
    Setup { ctx, repo }
}

impl Setup {
    fn node(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.ctx.ns)
    }

    async fn apply(&self, name: &str, spec: serde_json::Value) -> ModelRollout {
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let mut spec = spec;
        spec["source"] = json!({"repository": self.repo, "insecure": true});
        let obj = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": name}, "spec": spec});
        api.patch(name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&obj))
            .await
            .expect("applying the rollout")
    }

    async fn patch_spec(&self, name: &str, patch: serde_json::Value) {
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": patch})))
            .await
            .expect("patching the rollout");
    }

    async fn rollout(&self, name: &str, what: &str, pred: impl Fn(&ModelRollout) -> bool) -> ModelRollout {
        support::wait_rollout(&self.ctx.client, &self.ctx.ns, name, what, T, pred).await
    }

    async fn deployments(&self, model: &str) -> std::collections::BTreeMap<String, ModelDeployment> {
        support::deployments(&self.ctx.client, &self.ctx.ns, model).await
    }

    /// Waits until the model's deployments are exactly on `nodes`.
    async fn deployments_on(
        &self,
        model: &str,
        nodes: &[String],
    ) -> std::collections::BTreeMap<String, ModelDeployment> {
        let want: BTreeSet<String> = nodes.iter().cloned().collect();
        support::eventually(&format!("ModelDeployments of {model} on exactly {want:?}"), T, || async {
            let mds = self.deployments(model).await;
            (mds.keys().cloned().collect::<BTreeSet<_>>() == want).then_some(mds)
        })
        .await
    }

    /// Plays every agent: each deployment of `model` reports Operational on its desired version.
    async fn converge_all(&self, model: &str) {
        for md in self.deployments(model).await.values() {
            report(
                &self.ctx.client,
                &self.ctx.ns,
                &md.metadata.name.clone().unwrap(),
                DeploymentPhase::Operational,
                Some(&md.spec.version),
                100,
            )
            .await;
        }
    }
}

fn status(r: &ModelRollout) -> peat::api::ModelRolloutStatus {
    r.status.clone().unwrap_or_default()
}

fn condition(r: &ModelRollout, type_: &str) -> Option<(String, String)> {
    status(r).conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn each_scope_kind_selects_the_right_nodes_and_each_node_gets_its_variant() {
    let s = setup("scopes", &["1.0.0"]).await;
    let f = format!("{}-f", s.ctx.ns);
    let jetson = s.node("jetson");
    let gateway = s.node("gateway");
    let tiny = s.node("tiny-gpu");
    let odd = s.node("riscv");
    for n in [
        NodeSpec::new(&jetson, "arm64", 8 * GI, &["cpu", "cuda"])
            .label("peat.dev/formation", &f)
            .label("test", &s.ctx.ns)
            .label("tier", "edge"),
        NodeSpec::new(&gateway, "x86_64", 0, &["cpu"]).label("test", &s.ctx.ns).label("tier", "gateway"),
        NodeSpec::new(&tiny, "aarch64", 2 * GI, &["cpu", "cuda"])
            .label("peat.dev/formation", &f)
            .label("test", &s.ctx.ns),
        NodeSpec::new(&odd, "riscv64", 0, &[]).label("test", &s.ctx.ns).label("tier", "edge"),
    ] {
        register_node(&s.ctx.client, &n).await;
    }

    // formation: jetson gets the cuda variant, the 2 GiB GPU node the cpu one.
    s.apply("by-formation", json!({"model": "m-formation", "version": "1.0.0", "scope": {"formation": f}})).await;
    let mds = s.deployments_on("m-formation", &[jetson.clone(), tiny.clone()]).await;
    assert_eq!(mds[&jetson].spec.variant, "fp16-cuda");
    assert_eq!(mds[&tiny].spec.variant, "int8-cpu");
    assert!(mds[&jetson].spec.artifact.starts_with(&format!("{}@sha256:", s.repo)));
    assert_eq!(mds[&jetson].metadata.labels.as_ref().unwrap()["peat.dev/version"], "1.0.0");

    // nodeSelector with matchLabels and an expression; the riscv node has no fitting variant:
    // a capability blocker, decided without any ModelDeployment.
    s.apply(
        "by-selector",
        json!({"model": "m-selector", "version": "1.0.0", "scope": {"nodeSelector": {
            "matchLabels": {"test": s.ctx.ns},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["edge"]}]}}}),
    )
    .await;
    s.deployments_on("m-selector", std::slice::from_ref(&jetson)).await;
    let r = s
        .rollout("by-selector", "an IncompatibleCapabilities blocker for the riscv node", |r| {
            status(r).blockers.iter().any(|b| b.reason == BlockerReason::IncompatibleCapabilities)
        })
        .await;
    let st = status(&r);
    assert_eq!(st.total_nodes, 2);
    assert_eq!(st.blockers[0].node, odd);
    assert_eq!(st.blocker_counts.get("IncompatibleCapabilities"), Some(&1));

    // named nodes
    s.apply("by-name", json!({"model": "m-named", "version": "1.0.0", "scope": {"nodes": [gateway, tiny]}})).await;
    let mds = s.deployments_on("m-named", &[gateway.clone(), tiny.clone()]).await;
    assert_eq!(mds[&gateway].spec.variant, "int8-cpu");

    // capable: >= 4Gi GPU memory and arm64 (aliases: aarch64 nodes count).
    s.apply(
        "by-capability",
        json!({"model": "m-capable", "version": "1.0.0", "scope": {"capable": {"minGpuMemory": "4Gi", "cpuArch": "aarch64"}}}),
    )
    .await;
    let mds = s.deployments_on("m-capable", std::slice::from_ref(&jetson)).await;
    assert_eq!(mds[&jetson].spec.variant, "fp16-cuda");

    // explicit variant that does not fit a node: InsufficientGpuMemory, no deployment there.
    s.apply(
        "explicit",
        json!({"model": "m-explicit", "version": "1.0.0", "variant": {"name": "fp16-cuda"}, "scope": {"nodes": [jetson, tiny]}}),
    )
    .await;
    s.deployments_on("m-explicit", std::slice::from_ref(&jetson)).await;
    s.rollout("explicit", "InsufficientGpuMemory for the 2 GiB node", |r| {
        status(r).blockers.iter().any(|b| b.node == tiny && b.reason == BlockerReason::InsufficientGpuMemory)
    })
    .await;

    // all: every node with an agent, ours among them.
    s.apply("everywhere", json!({"model": "m-all", "version": "1.0.0", "scope": {"all": {}}})).await;
    let r = s.rollout("everywhere", "targets counted", |r| status(r).total_nodes >= 4).await;
    let mds = support::eventually("deployments for all our fitting nodes", T, || async {
        let mds = s.deployments("m-all").await;
        [&jetson, &gateway, &tiny].iter().all(|n| mds.contains_key(*n)).then_some(mds)
    })
    .await;
    assert!(!mds.contains_key(&odd), "no deployment where no variant fits");
    assert!(status(&r).total_nodes as usize >= mds.len());
}

#[tokio::test]
async fn max_parallel_is_never_exceeded_and_the_rollout_converges() {
    let s = setup("max-parallel", &["1.0.0"]).await;
    let nodes: Vec<String> = (0..6).map(|i| s.node(&format!("n{i}"))).collect();
    for n in &nodes {
        register_node(&s.ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"]).label("test", &s.ctx.ns)).await;
    }
    s.apply(
        "limited",
        json!({"model": "m", "version": "1.0.0", "scope": {"nodeSelector": {"matchLabels": {"test": s.ctx.ns}}},
               "strategy": {"maxParallel": 2}}),
    )
    .await;
    let mut max_seen = 0;
    let mut steps = 0;
    loop {
        // Each step: wait until the controller has caught up with the last report, then check the limit.
        let mds = support::eventually("at least one deployment", T, || async {
            let mds = s.deployments("m").await;
            (!mds.is_empty()).then_some(mds)
        })
        .await;
        let unfinished: Vec<&ModelDeployment> = mds
            .values()
            .filter(|m| m.status.as_ref().is_none_or(|st| st.phase != DeploymentPhase::Operational))
            .collect();
        max_seen = max_seen.max(unfinished.len());
        assert!(unfinished.len() <= 2, "maxParallel 2 exceeded: {} transferring at step {steps}", unfinished.len());
        if unfinished.is_empty() && mds.len() == nodes.len() {
            break;
        }
        // The agent of one transferring node finishes; the next one must start only then.
        let Some(md) = unfinished.first() else {
            // Everything reported done, more to come: wait for the controller to start the next.
            let before = mds.len();
            support::eventually("the next node to start", T, || async {
                (s.deployments("m").await.len() > before).then_some(())
            })
            .await;
            continue;
        };
        report(&s.ctx.client, &s.ctx.ns, &md.metadata.name.clone().unwrap(), DeploymentPhase::Downloading, None, 100)
            .await;
        report(
            &s.ctx.client,
            &s.ctx.ns,
            &md.metadata.name.clone().unwrap(),
            DeploymentPhase::Operational,
            Some("1.0.0"),
            100,
        )
        .await;
        steps += 1;
        assert!(steps < 50, "no convergence after 50 steps");
    }
    assert_eq!(max_seen, 2, "the limit was used, not just respected");
    let r = s.rollout("limited", "Converged", |r| status(r).phase == RolloutPhase::Converged).await;
    let st = status(&r);
    assert_eq!((st.converged, st.total_nodes), (6, 6));
    assert_eq!(condition(&r, "Converged"), Some(("True".into(), "AllTargetsConverged".into())));
    assert_eq!(st.history.last().map(|h| h.version.as_str()), Some("1.0.0"));
}

#[tokio::test]
async fn failure_threshold_aborts_and_rolls_back_to_the_previous_version() {
    let s = setup("rollback", &["1.0.0", "2.0.0"]).await;
    let nodes: Vec<String> = (0..4).map(|i| s.node(&format!("n{i}"))).collect();
    for n in &nodes {
        register_node(&s.ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"]).label("test", &s.ctx.ns)).await;
    }
    let scope = json!({"nodeSelector": {"matchLabels": {"test": s.ctx.ns}}});
    s.apply(
        "r",
        json!({"model": "m", "version": "1.0.0", "scope": scope,
        "strategy": {"failureThreshold": 1, "autoRollback": true}}),
    )
    .await;
    s.deployments_on("m", &nodes).await;
    s.converge_all("m").await;
    s.rollout("r", "1.0.0 converged", |r| status(r).phase == RolloutPhase::Converged).await;

    s.patch_spec("r", json!({"version": "2.0.0"})).await;
    let mds = support::eventually("all deployments on 2.0.0", T, || async {
        let mds = s.deployments("m").await;
        mds.values().all(|m| m.spec.version == "2.0.0").then_some(mds)
    })
    .await;
    // Two of four fail: more than the threshold of 1.
    let names: Vec<String> = mds.values().map(|m| m.metadata.name.clone().unwrap()).collect();
    report(&s.ctx.client, &s.ctx.ns, &names[0], DeploymentPhase::Operational, Some("2.0.0"), 100).await;
    report(&s.ctx.client, &s.ctx.ns, &names[1], DeploymentPhase::Failed, Some("1.0.0"), 100).await;
    report(&s.ctx.client, &s.ctx.ns, &names[2], DeploymentPhase::Failed, Some("1.0.0"), 100).await;

    // The abort is recorded first, then acted on: Degraded follows.
    let r = s
        .rollout("r", "abort recorded and Degraded", |r| {
            status(r).aborted_version.as_deref() == Some("2.0.0")
                && condition(r, "Degraded").map(|c| c.0) == Some("True".into())
        })
        .await;
    // The updated nodes return to 1.0.0, by the digest pinned in history.
    let mds = support::eventually("every deployment back on 1.0.0", T, || async {
        let mds = s.deployments("m").await;
        mds.values().all(|m| m.spec.version == "1.0.0").then_some(mds)
    })
    .await;
    let v1_digest = status(&r).history.iter().find(|h| h.version == "1.0.0").map(|h| h.digest.clone());
    assert!(v1_digest.is_some());
    s.converge_all("m").await;
    let _ = mds;
    let r = s.rollout("r", "RolledBack", |r| status(r).phase == RolloutPhase::RolledBack).await;
    assert_eq!(condition(&r, "Degraded"), Some(("True".into(), "RolledBack".into())));
    assert_eq!(condition(&r, "Converged").map(|c| c.0), Some("False".into()), "2.0.0 is not what runs");
    assert_eq!(status(&r).version_distribution.get("1.0.0"), Some(&4));
}

#[tokio::test]
async fn pause_resume_upgrade_rollback_and_delete() {
    let s = setup("lifecycle", &["1.0.0", "1.1.0"]).await;
    let nodes: Vec<String> = (0..3).map(|i| s.node(&format!("n{i}"))).collect();
    for n in &nodes {
        register_node(&s.ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
    }
    s.apply("life", json!({"model": "m", "version": "1.0.0", "scope": {"nodes": nodes}, "paused": true})).await;
    let r = s.rollout("life", "Paused", |r| status(r).phase == RolloutPhase::Paused).await;
    assert!(s.deployments("m").await.is_empty(), "a paused rollout starts no transfer");
    assert_eq!(status(&r).total_nodes, 3);

    s.patch_spec("life", json!({"paused": false})).await;
    s.deployments_on("m", &nodes).await;
    s.converge_all("m").await;
    s.rollout("life", "1.0.0 Converged", |r| status(r).phase == RolloutPhase::Converged).await;

    // Pause mid-upgrade: the deployments are told to halt.
    s.patch_spec("life", json!({"version": "1.1.0"})).await;
    support::eventually("deployments on 1.1.0", T, || async {
        s.deployments("m").await.values().all(|m| m.spec.version == "1.1.0").then_some(())
    })
    .await;
    s.patch_spec("life", json!({"paused": true})).await;
    support::eventually("deployments paused", T, || async {
        s.deployments("m").await.values().all(|m| m.spec.paused).then_some(())
    })
    .await;
    s.patch_spec("life", json!({"paused": false})).await;
    support::eventually("deployments resumed", T, || async {
        s.deployments("m").await.values().all(|m| !m.spec.paused).then_some(())
    })
    .await;
    s.converge_all("m").await;
    let r = s
        .rollout("life", "1.1.0 Converged", |r| {
            status(r).phase == RolloutPhase::Converged && status(r).history.len() == 2
        })
        .await;
    assert_eq!(status(&r).version_distribution.get("1.1.0"), Some(&3));

    // GitOps rollback: set the old version again.
    s.patch_spec("life", json!({"version": "1.0.0"})).await;
    support::eventually("deployments back on 1.0.0", T, || async {
        s.deployments("m").await.values().all(|m| m.spec.version == "1.0.0").then_some(())
    })
    .await;
    s.converge_all("m").await;
    s.rollout("life", "1.0.0 Converged again", |r| {
        status(r).phase == RolloutPhase::Converged && status(r).resolved_version.as_deref() == Some("1.0.0")
    })
    .await;

    // Deleting the rollout removes its deployments.
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    api.delete("life", &DeleteParams::default()).await.unwrap();
    support::eventually("deployments removed and the rollout gone", T, || async {
        (s.deployments("m").await.is_empty() && api.get_opt("life").await.unwrap().is_none()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn what_the_rollout_no_longer_sets_is_removed_from_its_deployments() {
    // The controller creates deployments by POST and changes them by server-side apply; an apply
    // alone would leave the fields the create wrote (see writes::write_one).
    let s = setup("dropped-fields", &["1.0.0"]).await;
    let nodes: Vec<String> = (0..2).map(|i| s.node(&format!("n{i}"))).collect();
    for n in &nodes {
        register_node(&s.ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
    }
    let http_get = json!({"protocol": "HttpGet", "port": 8080, "path": "/ready", "minReadySeconds": 5});
    s.apply(
        "drop",
        json!({"model": "m", "version": "1.0.0", "scope": {"nodes": nodes}, "serving": http_get,
               "variant": {"maxSizeBytes": GI}}),
    )
    .await;
    let mds = s.deployments_on("m", &nodes).await;
    for md in mds.values() {
        let serving = md.spec.serving.as_ref().expect("serving as the rollout says");
        assert_eq!((serving.path.as_deref(), serving.min_ready_seconds), (Some("/ready"), 5));
        assert_eq!(md.spec.max_size_bytes, Some(GI));
    }
    // A nested field and a whole optional field dropped (the apply by "peat-test" removes them
    // from the rollout): gone from every deployment too.
    s.apply("drop", json!({"model": "m", "version": "1.0.0", "scope": {"nodes": nodes}, "serving": {"port": 8080}}))
        .await;
    support::eventually("deployments without path, minReadySeconds and maxSizeBytes", T, || async {
        let mds = s.deployments("m").await;
        mds.values()
            .all(|md| {
                md.spec.max_size_bytes.is_none()
                    && md.spec.serving.as_ref().is_some_and(|v| v.path.is_none() && v.min_ready_seconds == 0)
            })
            .then_some(())
    })
    .await;
    s.apply("drop", json!({"model": "m", "version": "1.0.0", "scope": {"nodes": nodes}})).await;
    support::eventually("deployments without serving", T, || async {
        s.deployments("m").await.values().all(|md| md.spec.serving.is_none()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stale_heartbeat_is_a_network_partition_until_it_is_fresh_again() {
    let s = setup("partition", &["1.0.0"]).await;
    let a = s.node("a");
    let b = s.node("b");
    for n in [&a, &b] {
        register_node(&s.ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
    }
    // b's agent fell silent an hour ago.
    let mns: Api<peat::api::ModelNode> = Api::all(s.ctx.client.clone());
    let old = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(3600);
    mns.patch_status(&b, &PatchParams::default(), &Patch::Merge(json!({"status": {"lastHeartbeat": old.to_string()}})))
        .await
        .unwrap();

    s.apply("p", json!({"model": "m", "version": "1.0.0", "scope": {"nodes": [a, b]}})).await;
    let r = s
        .rollout("p", "NetworkPartition blocker for b", |r| {
            status(r).blockers.iter().any(|x| x.node == b && x.reason == BlockerReason::NetworkPartition)
        })
        .await;
    assert!(status(&r).blockers.iter().all(|x| x.node != a));
    s.deployments_on("m", std::slice::from_ref(&a)).await;

    mns.patch_status(
        &b,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"lastHeartbeat": k8s_openapi::jiff::Timestamp::now().to_string()}})),
    )
    .await
    .unwrap();
    // Fresh again: cleared, and b gets its deployment.
    s.deployments_on("m", &[a.clone(), b.clone()]).await;
    s.rollout("p", "blocker cleared", |r| {
        status(r).blockers.iter().all(|x| x.reason != BlockerReason::NetworkPartition)
    })
    .await;
}

#[tokio::test]
async fn kubectl_wait_for_converged_returns_when_the_agents_report_operational() {
    let s = setup("kubectl-wait", &["3.0.0"]).await;
    let nodes: Vec<String> = (0..2).map(|i| s.node(&format!("n{i}"))).collect();
    for n in &nodes {
        register_node(&s.ctx.client, &NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
    }
    s.apply("w", json!({"model": "m", "version": "3.0.0", "scope": {"nodes": nodes}})).await;
    s.deployments_on("m", &nodes).await;
    let env = support::env();
    let mut wait = tokio::process::Command::new(&env.binaries.kubectl)
        .env("KUBECONFIG", &env.kubeconfig)
        .args(["wait", "--for=condition=Converged", "--timeout=60s", "-n", &s.ctx.ns, "modelrollout/w"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Not yet: kubectl wait must still be waiting while the agents have not reported.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), wait.wait()).await.is_err(),
        "kubectl wait returned before convergence"
    );
    s.converge_all("m").await;
    let out = tokio::time::timeout(T, wait.wait_with_output()).await.expect("kubectl wait returned").unwrap();
    assert!(out.status.success(), "kubectl wait: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("condition met"));
}

#[tokio::test]
async fn a_missing_version_is_a_condition_and_converges_once_pushed() {
    let s = setup("missing-tag", &[]).await;
    let n = s.node("n");
    register_node(&s.ctx.client, &NodeSpec::new(&n, "amd64", 0, &["cpu"])).await;
    s.apply("late", json!({"model": "m", "version": "9.9.9", "scope": {"nodes": [n]}})).await;
    let r = s
        .rollout("late", "Ready=False VersionNotFound", |r| {
            condition(r, "Ready") == Some(("False".into(), "VersionNotFound".into()))
        })
        .await;
    assert_eq!(status(&r).phase, RolloutPhase::Pending);
    assert!(s.deployments("m").await.is_empty());
    support::push_two_variants(&s.repo, "9.9.9").await;
    // Retried with backoff (5 s, 10 s, … at most 30 s for a source problem): the deployment
    // appears once the tag exists. (A clean-clone run once missed this within 60 s; the
    // controller's lines about this rollout go into the failure message to show why.)
    let deadline = std::time::Instant::now() + T;
    while s.deployments("m").await.keys().cloned().collect::<Vec<_>>() != vec![n.clone()] {
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(&controller().await.log).unwrap_or_default();
            let ours: Vec<&str> = log.lines().filter(|l| l.contains(&s.ctx.ns)).collect();
            let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
            let now = api.get("late").await.map(|r| serde_json::to_string_pretty(&r.status)).ok();
            panic!(
                "no ModelDeployment on {n} within {T:?} of the push; rollout status: {now:?}\ncontroller about {}:\n{}",
                s.ctx.ns,
                ours.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = s.rollout("late", "Ready=True", |r| condition(r, "Ready").map(|c| c.0) == Some("True".into())).await;
    assert!(status(&r).resolved_digest.as_deref().is_some_and(|d| d.starts_with("sha256:")));
}

/// CI pushes the variants of one version one after another, while GitOps has already applied the
/// rollout: the controller may read the tag between two pushes. The variants added later must
/// reach the nodes they fit, and the nodes already served keep exactly the bytes they were given.
#[tokio::test]
async fn a_variant_pushed_after_the_rollout_resolved_is_picked_up_and_served_nodes_keep_their_bytes() {
    let s = setup("late-variant", &[]).await;
    let (cpu, gpu) = (s.node("cpu"), s.node("gpu"));
    register_node(&s.ctx.client, &NodeSpec::new(&cpu, "amd64", 0, &["cpu"])).await;
    register_node(&s.ctx.client, &NodeSpec::new(&gpu, "amd64", 8 * GI, &["cpu", "cuda"])).await;
    let gpu_manifest = support::push_variant(&s.repo, "5.0.0", TestVariant::Fp16Cuda).await;
    s.apply("staged", json!({"model": "m", "version": "5.0.0", "scope": {"nodes": [cpu, gpu]}})).await;
    let first = s
        .rollout("staged", "resolved with the cpu node blocked", |r| {
            status(r).resolved_digest.is_some()
                && status(r)
                    .blockers
                    .iter()
                    .any(|b| b.node == cpu && b.reason == BlockerReason::IncompatibleCapabilities)
        })
        .await;
    let mds = s.deployments_on("m", std::slice::from_ref(&gpu)).await;
    assert!(mds[&gpu].spec.artifact.ends_with(&gpu_manifest), "{:?}", mds[&gpu].spec);

    support::push_variant(&s.repo, "5.0.0", TestVariant::Int8Cpu).await;
    let mds = s.deployments_on("m", &[cpu.clone(), gpu.clone()]).await;
    assert_eq!(mds[&cpu].spec.variant, "int8-cpu");
    assert!(mds[&gpu].spec.artifact.ends_with(&gpu_manifest), "the gpu node keeps its bytes: {:?}", mds[&gpu].spec);
    let r = s
        .rollout("staged", "the extended index pinned", |r| {
            status(r).resolved_digest.is_some()
                && status(r).resolved_digest != first.status.as_ref().unwrap().resolved_digest
        })
        .await;
    assert!(status(&r).blockers.iter().all(|b| b.node != cpu), "{:?}", status(&r).blockers);
}

/// A rollout waiting for its version retries on its own. A storm of triggers — a sibling rollout's
/// agents reporting many times a second, each report triggering every rollout of the model — must
/// neither replace nor postpone those retries (a debounce that restarts on every trigger did: the
/// rollout did not reconcile until the reports stopped).
#[tokio::test]
async fn a_storm_of_triggers_from_a_busy_sibling_does_not_hold_back_a_waiting_rollout() {
    let s = setup("storm", &["1.0.0"]).await;
    let model = format!("storm-{}", s.ctx.ns);
    let (busy, late) = (s.node("busy"), s.node("late"));
    register_node(&s.ctx.client, &NodeSpec::new(&busy, "amd64", 0, &["cpu"])).await;
    register_node(&s.ctx.client, &NodeSpec::new(&late, "amd64", 0, &["cpu"])).await;
    s.apply("busy", json!({"model": model, "version": "1.0.0", "scope": {"nodes": [busy]}})).await;
    let md = s.deployments_on(&model, std::slice::from_ref(&busy)).await[&busy].metadata.name.clone().unwrap();
    s.apply("late", json!({"model": model, "version": "9.9.9", "scope": {"nodes": [late]}})).await;
    s.rollout("late", "Ready=False VersionNotFound", |r| {
        condition(r, "Ready") == Some(("False".into(), "VersionNotFound".into()))
    })
    .await;

    let (client, ns) = (s.ctx.client.clone(), s.ctx.ns.clone());
    let storm = tokio::spawn(async move {
        for i in 1.. {
            report(&client, &ns, &md, DeploymentPhase::Downloading, None, i * 1000).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    support::push_two_variants(&s.repo, "9.9.9").await;
    let mds = s.deployments_on(&model, &[busy, late.clone()]).await;
    assert!(!storm.is_finished(), "the storm still blows");
    storm.abort();
    assert_eq!(mds[&late].spec.version, "9.9.9");
}

#[tokio::test]
async fn two_rollouts_of_one_model_never_share_a_node_the_older_keeps_it() {
    let s = setup("conflict", &["1.0.0"]).await;
    let n = s.node("n");
    register_node(&s.ctx.client, &NodeSpec::new(&n, "amd64", 0, &["cpu"])).await;
    let model = format!("shared-{}", s.ctx.ns);
    s.apply("first", json!({"model": model, "version": "1.0.0", "scope": {"nodes": [n]}})).await;
    s.deployments_on(&model, std::slice::from_ref(&n)).await;

    // A second rollout of the same model, in another namespace, same priority: it must wait.
    let other = support::ctx("conflict-other").await;
    let api: Api<ModelRollout> = Api::namespaced(other.client.clone(), &other.ns);
    let obj: ModelRollout = serde_json::from_value(json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "second"},
        "spec": {"model": model, "version": "1.0.0", "source": {"repository": s.repo, "insecure": true}, "scope": {"nodes": [n]}}}))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let r = support::wait_rollout(&other.client, &other.ns, "second", "Ready=False Conflict", T, |r| {
        condition(r, "Ready") == Some(("False".into(), "Conflict".into()))
    })
    .await;
    assert_eq!(status(&r).blockers[0].reason, BlockerReason::NodeBusy);
    assert!(status(&r).blockers[0].details.contains(&format!("{}/first", s.ctx.ns)), "{:?}", status(&r).blockers);
    assert!(
        support::deployments(&other.client, &other.ns, &model).await.is_empty(),
        "never two deployments of one model on a node"
    );
}
