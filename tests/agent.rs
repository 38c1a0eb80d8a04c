//! Real agents (`peat agent` processes) with the real controller, API server and registry: pulls,
//! verification, atomic activation, instant rollback, resume after SIGKILL, a tampered blob, a full
//! disk, a registry outage, unsafe artifacts and ORAS artifacts. Bytes on the wire are counted at
//! the registry (its access log); each test has a registry of its own so counts do not mix.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use peat::api::{BlockerReason, DeploymentPhase, ModelDeployment, ModelNode, ModelRollout, RolloutPhase};
use peat::oci::push::VariantMeta;
use peat_testenv::Registry;
use serde_json::json;
use support::{AgentProc, CountingProxy, create_node, pseudo_random, push_files, start_agent};
use tokio::sync::OnceCell;

const T: Duration = Duration::from_secs(90);
const MI: usize = 1 << 20;

static CONTROLLER: OnceCell<support::ControllerProc> = OnceCell::const_new();

async fn controller() -> &'static support::ControllerProc {
    CONTROLLER
        .get_or_init(|| async {
            let ctx = support::ctx("peat-system").await;
            let c = support::start_controller("controller", &ctx.ns, &["--heartbeat-timeout", "30s"]).await;
            c.wait_leading(T).await;
            c
        })
        .await
}

struct Setup {
    ctx: support::Ctx,
    registry: Registry,
    dir: PathBuf,
}

async fn setup(test: &str) -> Setup {
    controller().await;
    let ctx = support::ctx(test).await;
    let dir = ctx.env.dir.join(&ctx.ns);
    let registry = Registry::start(&ctx.env.binaries.registry, &dir.join("registry")).await.expect("a registry");
    Setup { ctx, registry, dir }
}

fn cpu(name: &str) -> VariantMeta {
    VariantMeta {
        name: name.into(),
        precision: Some("int8".into()),
        providers: vec!["cpu".into()],
        ..Default::default()
    }
}

fn cuda(name: &str) -> VariantMeta {
    VariantMeta {
        name: name.into(),
        precision: Some("float16".into()),
        providers: vec!["cuda".into()],
        min_gpu_memory: 4 << 30,
        ..Default::default()
    }
}

impl Setup {
    fn repo(&self, model: &str) -> String {
        format!("{}/models/{model}", self.registry.addr)
    }

    fn node(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.ctx.ns)
    }

    /// A Node and its agent with a store under this test's directory.
    async fn agent(&self, suffix: &str, extra: &[&str]) -> AgentProc {
        let node = self.node(suffix);
        create_node(&self.ctx.client, &node, &[]).await;
        start_agent(&node, &self.dir.join(format!("store-{suffix}")), extra)
    }

    async fn apply(&self, model: &str, version: &str, nodes: &[&AgentProc], extra: serde_json::Value) {
        self.apply_via(&self.registry.addr, model, version, nodes, extra).await
    }

    /// Applies a rollout whose repository is reached at `host` (the registry, or a proxy in front of it).
    async fn apply_via(&self, host: &str, model: &str, version: &str, nodes: &[&AgentProc], extra: serde_json::Value) {
        self.apply_named(model, host, model, version, nodes, extra).await
    }

    /// Applies the rollout `name` (the other `apply`s name it after the model).
    async fn apply_named(
        &self,
        name: &str,
        host: &str,
        model: &str,
        version: &str,
        nodes: &[&AgentProc],
        extra: serde_json::Value,
    ) {
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let mut spec = json!({
            "model": model,
            "version": version,
            "source": {"repository": format!("{host}/models/{model}"), "insecure": true},
            "scope": {"nodes": nodes.iter().map(|a| a.node.clone()).collect::<Vec<_>>()},
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        let obj = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": name}, "spec": spec});
        api.patch(name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&obj)).await.expect("applying");
    }

    async fn converged(&self, model: &str, version: &str, agents: &[&AgentProc]) -> ModelRollout {
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let what = format!("{model} {version} converged");
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Ok(r) = api.get(model).await
                && let Some(s) = &r.status
                && s.phase == RolloutPhase::Converged
                && s.resolved_version.as_deref() == Some(version)
                && s.observed_generation == r.metadata.generation
                && s.converged as usize == agents.len()
            {
                return r;
            }
            if std::time::Instant::now() > deadline {
                let logs: String = agents.iter().map(|a| format!("--- {}\n{}\n", a.node, a.log_tail())).collect();
                let mds = support::deployments(&self.ctx.client, &self.ctx.ns, model).await;
                let st: Vec<_> = mds.values().map(|m| (m.spec.node_name.clone(), m.status.clone())).collect();
                panic!("timed out waiting for {what}; deployments: {st:#?}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the node's deployment of `model` is Failed on `version`; its status.
    async fn failed_on(&self, model: &str, agent: &AgentProc, version: &str) -> peat::api::ModelDeploymentStatus {
        let what = format!("Failed for {version}");
        let md = self
            .deployment_where(model, agent, &what, |m| {
                m.spec.version == version && phase(m) == Some(DeploymentPhase::Failed)
            })
            .await;
        md.status.expect("a Failed deployment has a status")
    }

    async fn deployment(&self, model: &str, agent: &AgentProc) -> ModelDeployment {
        let api: Api<ModelDeployment> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        api.get(&ModelDeployment::name_for(model, &agent.node)).await.expect("the node's ModelDeployment")
    }

    /// Waits until the node's deployment of `model` satisfies `pred`.
    async fn deployment_where(
        &self,
        model: &str,
        agent: &AgentProc,
        what: &str,
        pred: impl Fn(&ModelDeployment) -> bool,
    ) -> ModelDeployment {
        let api: Api<ModelDeployment> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let name = ModelDeployment::name_for(model, &agent.node);
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Ok(md) = api.get(&name).await
                && pred(&md)
            {
                return md;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {name}: {what}; status {:?}\n{}",
                api.get(&name).await.ok().and_then(|m| m.status),
                agent.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn phase(md: &ModelDeployment) -> Option<DeploymentPhase> {
    md.status.as_ref().map(|s| s.phase)
}

/// Asserts the model's `current` points at `version` and holds exactly `files`.
fn assert_active(store: &Path, model: &str, version: &str, files: &[(&str, Vec<u8>)]) {
    let current = store.join("models").join(model).join("current");
    assert_eq!(std::fs::read_link(&current).unwrap(), PathBuf::from(version), "current → {version}");
    for (title, bytes) in files {
        let got = std::fs::read(current.join(title)).unwrap_or_else(|e| panic!("{title}: {e}"));
        assert!(got == *bytes, "{title} differs from what was pushed");
    }
    let count = walk_files(&current.join(".")).len();
    assert_eq!(count, files.len(), "no other files in the version dir");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// Pushes `data` as a blob of `repo` (no manifest); returns its digest.
async fn push_raw_blob(client: &oci_client::Client, repo: &str, data: Vec<u8>) -> String {
    let digest = peat::oci::digest::sha256_digest(&data);
    let r: oci_client::Reference = format!("{repo}:1.0.0").parse().unwrap();
    client.push_blob(&r, data, &digest).await.unwrap();
    digest
}

/// A file layer descriptor as a hand-made (possibly hostile) manifest would declare it.
fn file_layer(digest: &str, title: &str, size: i64) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: peat::oci::layout::MEDIA_MODEL_FILE.into(),
        digest: digest.to_string(),
        size,
        annotations: Some([(peat::oci::layout::ANN_TITLE.to_string(), title.to_string())].into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn variants_per_node_upgrade_and_rollback_without_bytes() {
    let s = setup("agent-variants").await;
    let repo = s.repo("vision");
    let v1_cuda = vec![("model.onnx", pseudo_random(1, 3 * MI)), ("config.json", b"{\"v\":1}".to_vec())];
    let v1_cpu = vec![("model.onnx", pseudo_random(2, MI)), ("tokenizer/vocab.txt", b"a b c".to_vec())];
    let v2_cuda = vec![("model.onnx", pseudo_random(3, 3 * MI)), ("config.json", b"{\"v\":2}".to_vec())];
    let v2_cpu = vec![("model.onnx", pseudo_random(4, MI)), ("tokenizer/vocab.txt", b"a b c".to_vec())];
    push_files(&repo, "1.0.0", cuda("fp16-cuda"), &v1_cuda).await;
    push_files(&repo, "1.0.0", cpu("int8-cpu"), &v1_cpu).await;

    let gpu = s.agent("gpu", &["--arch", "amd64", "--gpus", "1", "--gpu-memory", "8Gi"]).await;
    let arm = s.agent("arm", &["--arch", "arm64", "--gpus", "0", "--gpu-memory", "0"]).await;
    let small =
        s.agent("small", &["--arch", "amd64", "--gpus", "0", "--gpu-memory", "0", "--storage-capacity", "64Mi"]).await;
    let agents = [&gpu, &arm, &small];
    s.apply("vision", "1.0.0", &agents, json!({})).await;
    s.converged("vision", "1.0.0", &agents).await;

    // Capabilities from the flags reached the ModelNodes.
    let mns: Api<ModelNode> = Api::all(s.ctx.client.clone());
    let g = mns.get(&gpu.node).await.unwrap().status.unwrap();
    assert_eq!((g.arch.as_deref(), g.gpus, g.gpu_memory_bytes), (Some("amd64"), 1, 8 << 30));
    assert_eq!(g.providers, vec!["cpu", "cuda"]);
    assert_eq!(g.models_summary.as_deref(), Some("vision=1.0.0"));
    let sm = mns.get(&small.node).await.unwrap().status.unwrap();
    assert_eq!(sm.storage_total_bytes, 64 << 20);
    assert!(sm.storage_free_bytes <= (64 << 20) - (MI as i64), "the model's bytes count against the capacity");

    for (agent, variant, files) in
        [(&gpu, "fp16-cuda", &v1_cuda), (&arm, "int8-cpu", &v1_cpu), (&small, "int8-cpu", &v1_cpu)]
    {
        let md = s.deployment("vision", agent).await;
        assert_eq!(md.spec.variant, variant, "{}", agent.node);
        let st = md.status.unwrap();
        assert_eq!((st.phase, st.active_version.as_deref()), (DeploymentPhase::Operational, Some("1.0.0")));
        let total: usize = files.iter().map(|f| f.1.len()).sum();
        assert_eq!((st.bytes_total, st.bytes_reused), (total as i64, 0));
        // On the wire: the files, plus their chunk indexes (kept for later delta transfers).
        assert!(st.bytes_done >= total as i64 && st.bytes_done as f64 <= 1.01 * total as f64, "{st:?}");
        assert_active(&agent.store, "vision", "1.0.0", files);
    }
    let nodes: Api<Node> = Api::all(s.ctx.client.clone());
    let labels = nodes.get(&arm.node).await.unwrap().metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("models.peat.dev/vision").map(String::as_str), Some("1.0.0"));

    // Upgrade.
    push_files(&repo, "2.0.0", cuda("fp16-cuda"), &v2_cuda).await;
    push_files(&repo, "2.0.0", cpu("int8-cpu"), &v2_cpu).await;
    s.apply("vision", "2.0.0", &agents, json!({})).await;
    s.converged("vision", "2.0.0", &agents).await;
    for (agent, files) in [(&gpu, &v2_cuda), (&arm, &v2_cpu), (&small, &v2_cpu)] {
        assert_active(&agent.store, "vision", "2.0.0", files);
        let st = s.deployment("vision", agent).await.status.unwrap();
        assert_eq!(st.previous_versions, vec!["1.0.0"]);
    }
    // The unchanged vocab file was not fetched again.
    let st = s.deployment("vision", &arm).await.status.unwrap();
    assert_eq!(st.bytes_reused, 5);
    let labels = nodes.get(&gpu.node).await.unwrap().metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("models.peat.dev/vision").map(String::as_str), Some("2.0.0"));

    // Rollback to the kept version: no blob leaves the registry.
    let served = s.registry.blob_bytes_served();
    s.apply("vision", "1.0.0", &agents, json!({"deletionPolicy": "Delete"})).await;
    s.converged("vision", "1.0.0", &agents).await;
    for (agent, files) in [(&gpu, &v1_cuda), (&arm, &v1_cpu), (&small, &v1_cpu)] {
        assert_active(&agent.store, "vision", "1.0.0", files);
        let st = s.deployment("vision", agent).await.status.unwrap();
        assert_eq!(st.bytes_done, 0, "{}: rollback fetched bytes", agent.node);
    }
    assert_eq!(s.registry.blob_bytes_served(), served, "a rollback to a kept version moves no bytes");

    // Deleting a rollout with deletionPolicy Delete removes the model from the stores and the label
    // from the Nodes.
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    api.delete("vision", &Default::default()).await.unwrap();
    support::eventually("models removed from the stores", T, || async {
        agents.iter().all(|a| !a.store.join("models/vision").exists()).then_some(())
    })
    .await;
    support::eventually("the Node label removed", T, || async {
        let l = nodes.get(&gpu.node).await.ok()?.metadata.labels.unwrap_or_default();
        (!l.contains_key("models.peat.dev/vision")).then_some(())
    })
    .await;
    support::eventually("blobs collected", T, || async {
        agents.iter().all(|a| dir_is_empty(&a.store.join("blobs/sha256"))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_agent_killed_mid_pull_resumes_where_it_stopped() {
    let s = setup("agent-resume").await;
    let size = 64 * MI;
    let files = vec![("weights.bin", pseudo_random(7, size))];
    push_files(&s.repo("big"), "1.0.0", cpu("int8-cpu"), &files).await;
    // The node reaches the registry over a 16 MiB/s link: the pull takes about 4 s.
    let link = CountingProxy::start(&s.registry.addr).await;
    link.set_rate(16 * MI as u64);
    let mut agent = s.agent("n", &[]).await;
    s.apply_via(&link.addr, "big", "1.0.0", &[&agent], json!({})).await;
    let partial = support::partial_over(&agent.store, (size / 3) as u64, "a third of the blob on disk").await;
    agent.kill();
    assert!(partial < size as u64, "killed before the end");
    agent.restart();
    s.converged("big", "1.0.0", &[&agent]).await;
    assert_active(&agent.store, "big", "1.0.0", &files);
    let wire = link.delivered();
    assert!(wire as f64 <= 1.05 * size as f64, "the resumed pull moved {wire} bytes for a {size}-byte artifact");
    assert!(wire >= size as u64, "every byte crossed the link once");
    assert!(dir_is_empty(&agent.store.join("tmp")));
}

/// Overwrites a blob's bytes in the registry's storage (same length, other content).
fn tamper(registry: &Registry, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let path = registry.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
}

#[tokio::test]
async fn a_tampered_blob_fails_and_the_previous_version_stays_active() {
    let s = setup("agent-tamper").await;
    let v1 = vec![("model.onnx", pseudo_random(11, MI))];
    let v2 = vec![("model.onnx", pseudo_random(12, MI))];
    push_files(&s.repo("m"), "1.0.0", cpu("int8-cpu"), &v1).await;
    push_files(&s.repo("m"), "2.0.0", cpu("int8-cpu"), &v2).await;
    let agent = s.agent("n", &[]).await;
    s.apply("m", "1.0.0", &[&agent], json!({})).await;
    s.converged("m", "1.0.0", &[&agent]).await;

    let v2_digest = peat::oci::digest::sha256_digest(&v2[0].1);
    tamper(&s.registry, &v2_digest);
    s.apply("m", "2.0.0", &[&agent], json!({})).await;
    let st = s.failed_on("m", &agent, "2.0.0").await;
    assert_eq!(st.reason, Some(BlockerReason::TransferFailed));
    assert!(st.message.as_deref().unwrap_or_default().contains("digest mismatch"), "{:?}", st.message);
    assert_eq!(st.active_version.as_deref(), Some("1.0.0"));
    assert_active(&agent.store, "m", "1.0.0", &v1);
    assert!(!agent.store.join("models/m/2.0.0").exists(), "no directory for the bad version");
    assert!(!agent.store.join(format!("blobs/sha256/{}", &v2_digest[7..])).exists(), "bad bytes never stored");
    assert!(dir_is_empty(&agent.store.join("tmp")));
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    support::eventually("the rollout counts the failure", T, || async {
        let r = api.get("m").await.ok()?;
        (r.status?.failed == 1).then_some(())
    })
    .await;
}

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (the test environment runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_store_too_small_reports_insufficient_storage_and_leaves_nothing() {
    let s = setup("agent-full").await;
    let files = vec![("model.onnx", pseudo_random(21, 4 * MI)), ("extra.bin", pseudo_random(22, 2 * MI))];
    let manifest = push_files(&s.repo("m"), "1.0.0", cpu("int8-cpu"), &files).await;
    let store = s.dir.join("store-tiny");
    let _tmpfs = Tmpfs::mount(&store, "3m");
    let node = s.node("tiny");
    create_node(&s.ctx.client, &node, &[]).await;
    let agent = start_agent(&node, &store, &[]);

    // The controller sees the small store in the ModelNode and starts no transfer.
    s.apply("m", "1.0.0", &[&agent], json!({})).await;
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    support::eventually("the rollout blocked by InsufficientStorage", T, || async {
        let st = api.get("m").await.ok()?.status?;
        st.blockers.iter().any(|b| b.node == node && b.reason == BlockerReason::InsufficientStorage).then_some(())
    })
    .await;

    // A deployment written anyway (the store filled up after the last heartbeat): the agent checks.
    let md = json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "other.tiny"},
        "spec": {"nodeName": node, "model": "other", "version": "1.0.0", "variant": "int8-cpu",
                 "artifact": format!("{}@{manifest}", s.repo("m")), "insecure": true},
    });
    let mds: Api<ModelDeployment> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    mds.patch("other.tiny", &PatchParams::apply("peat-test"), &Patch::Apply(&md)).await.unwrap();
    let md = support::eventually("Failed InsufficientStorage from the agent", T, || async {
        let md = mds.get("other.tiny").await.ok()?;
        md.status.as_ref().is_some_and(|st| st.reason == Some(BlockerReason::InsufficientStorage)).then_some(md)
    })
    .await;
    let st = md.status.unwrap();
    assert_eq!(st.phase, DeploymentPhase::Failed);
    assert!(st.message.unwrap_or_default().contains("free"));
    assert!(dir_is_empty(&store.join("tmp")), "no partial download left");
    assert!(dir_is_empty(&store.join("blobs/sha256")));
    assert!(dir_is_empty(&store.join("models")));
    assert_eq!(s.registry.blob_bytes_served(), 0, "refused before any transfer");
}

#[tokio::test]
async fn a_registry_outage_mid_rollout_is_retried_until_it_converges() {
    let mut s = setup("agent-outage").await;
    let size = 48 * MI;
    let files = vec![("weights.bin", pseudo_random(31, size))];
    push_files(&s.repo("m"), "1.0.0", cpu("int8-cpu"), &files).await;
    let link = CountingProxy::start(&s.registry.addr).await;
    link.set_rate(8 * MI as u64);
    let agent = s.agent("n", &[]).await;
    s.apply_via(&link.addr, "m", "1.0.0", &[&agent], json!({})).await;
    support::partial_over(&agent.store, (size / 5) as u64, "the transfer under way").await;
    s.registry.stop();
    let during = s
        .deployment_where("m", &agent, "a retry reported during the outage", |m| {
            m.status.as_ref().is_some_and(|st| {
                st.phase == DeploymentPhase::Downloading && st.reason == Some(BlockerReason::TransferFailed)
            })
        })
        .await;
    assert!(during.status.unwrap().message.unwrap_or_default().contains("retrying"));
    // The outage lasts 20 s (the scenario), whatever the agent does meanwhile.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_ne!(phase(&s.deployment("m", &agent).await), Some(DeploymentPhase::Failed), "an outage is not a failure");
    s.registry.restart().await.expect("registry back");
    link.set_rate(0);
    s.converged("m", "1.0.0", &[&agent]).await;
    assert_active(&agent.store, "m", "1.0.0", &files);
    let wire = link.delivered();
    assert!(wire as f64 <= 1.05 * size as f64, "resumed after the outage: {wire} bytes for {size}");
}

#[tokio::test]
async fn unsafe_titles_and_oversized_layers_are_refused() {
    let s = setup("agent-unsafe").await;
    let escape = vec![("../../escape.txt", b"owned".to_vec())];
    push_files(&s.repo("esc"), "1.0.0", cpu("int8-cpu"), &escape).await;

    // A layer whose descriptor declares half the blob's real size.
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    let client = access.client();
    let repo = s.repo("big");
    let digest = push_raw_blob(&client, &repo, pseudo_random(41, 2000)).await;
    let layer = file_layer(&digest, "model.onnx", 1000);
    peat::oci::push::push_variant_manifest(&client, &access.auth, &repo, "1.0.0", &cpu("int8-cpu"), vec![layer])
        .await
        .unwrap();

    let agent = s.agent("n", &[]).await;
    s.apply("esc", "1.0.0", &[&agent], json!({})).await;
    s.apply("big", "1.0.0", &[&agent], json!({})).await;
    let md = s.deployment_where("esc", &agent, "Failed", |m| phase(m) == Some(DeploymentPhase::Failed)).await;
    let st = md.status.unwrap();
    assert_eq!(st.reason, Some(BlockerReason::TransferFailed));
    assert!(st.message.unwrap_or_default().contains("escapes the model directory"));
    assert!(!s.dir.join("escape.txt").exists() && !agent.store.join("escape.txt").exists());
    let md = s.deployment_where("big", &agent, "Failed", |m| phase(m) == Some(DeploymentPhase::Failed)).await;
    let st = md.status.unwrap();
    assert_eq!(st.reason, Some(BlockerReason::TransferFailed));
    assert!(st.message.unwrap_or_default().contains("more than the 1000 bytes"), "oversize refused");
    assert!(dir_is_empty(&agent.store.join("tmp")) && dir_is_empty(&agent.store.join("blobs/sha256")));
}

#[tokio::test]
async fn an_oras_pushed_artifact_is_pulled_as_a_single_variant() {
    let s = setup("agent-oras").await;
    let src = s.dir.join("oras-src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let model = pseudo_random(51, MI);
    std::fs::write(src.join("model.onnx"), &model).unwrap();
    std::fs::write(src.join("sub/labels.txt"), b"cat\ndog\n").unwrap();
    let out = std::process::Command::new(&s.ctx.env.binaries.oras)
        .current_dir(&src)
        .args(["push", "--plain-http", &format!("{}:1.0.0", s.repo("plain")), "model.onnx", "sub/labels.txt"])
        .output()
        .expect("running oras");
    assert!(out.status.success(), "oras push: {}", String::from_utf8_lossy(&out.stderr));
    let agent = s.agent("n", &[]).await;
    s.apply("plain", "1.0.0", &[&agent], json!({})).await;
    s.converged("plain", "1.0.0", &[&agent]).await;
    assert_eq!(s.deployment("plain", &agent).await.spec.variant, "default");
    assert_active(&agent.store, "plain", "1.0.0", &[("model.onnx", model), ("sub/labels.txt", b"cat\ndog\n".to_vec())]);
}

#[tokio::test]
async fn a_critical_transfer_preempts_a_lower_one_which_resumes_later() {
    let s = setup("agent-preempt").await;
    let slow = vec![("weights.bin", pseudo_random(61, 40 * MI))];
    let urgent = vec![("patch.bin", pseudo_random(62, 2 * MI))];
    push_files(&s.repo("slow"), "1.0.0", cpu("int8-cpu"), &slow).await;
    push_files(&s.repo("urgent"), "1.0.0", cpu("int8-cpu"), &urgent).await;
    let link = CountingProxy::start(&s.registry.addr).await;
    link.set_rate(8 * MI as u64);
    // One transfer at a time: the Critical one can only run by preempting.
    let agent = s.agent("n", &["--max-concurrent-pulls", "1"]).await;
    s.apply_via(&link.addr, "slow", "1.0.0", &[&agent], json!({"priority": "Low"})).await;
    support::partial_over(&agent.store, (4 * MI) as u64, "the Low transfer under way").await;
    s.apply_via(&link.addr, "urgent", "1.0.0", &[&agent], json!({"priority": "Critical"})).await;
    s.deployment_where("urgent", &agent, "Critical Operational", |m| phase(m) == Some(DeploymentPhase::Operational))
        .await;
    let slow_md = s.deployment("slow", &agent).await;
    assert_ne!(phase(&slow_md), Some(DeploymentPhase::Operational), "the Critical transfer finished first");
    s.converged("slow", "1.0.0", &[&agent]).await;
    assert_active(&agent.store, "slow", "1.0.0", &slow);
    assert_active(&agent.store, "urgent", "1.0.0", &urgent);
    let wire = link.delivered();
    let both = (42 * MI) as f64;
    assert!(wire as f64 <= 1.05 * both, "the preempted transfer resumed: {wire} bytes on the wire for {both}");
}

#[tokio::test]
async fn two_models_sharing_a_layer_fetch_it_once() {
    let s = setup("agent-shared").await;
    let shared = pseudo_random(71, 8 * MI);
    let a = vec![("tokenizer.bin", shared.clone()), ("a.bin", pseudo_random(72, MI))];
    let b = vec![("tokenizer.bin", shared.clone()), ("b.bin", pseudo_random(73, MI))];
    push_files(&s.repo("a"), "1.0.0", cpu("int8-cpu"), &a).await;
    push_files(&s.repo("b"), "1.0.0", cpu("int8-cpu"), &b).await;
    let link = CountingProxy::start(&s.registry.addr).await;
    link.set_rate(8 * MI as u64); // both transfers overlap on the shared layer
    let agent = s.agent("n", &[]).await;
    s.apply_via(&link.addr, "a", "1.0.0", &[&agent], json!({})).await;
    s.apply_via(&link.addr, "b", "1.0.0", &[&agent], json!({})).await;
    s.converged("a", "1.0.0", &[&agent]).await;
    s.converged("b", "1.0.0", &[&agent]).await;
    assert_active(&agent.store, "a", "1.0.0", &a);
    assert_active(&agent.store, "b", "1.0.0", &b);
    let wire = link.delivered();
    let unique = (10 * MI) as f64;
    assert!(wire as f64 <= 1.05 * unique, "the shared layer crossed the link once: {wire} bytes for {unique}");
}

#[tokio::test]
async fn node_annotations_give_what_detection_cannot_see_and_flags_win_over_them() {
    let s = setup("agent-annotations").await;
    // A Jetson: no NVML, so an administrator annotates its Node; one flag of the DaemonSet differs.
    let node = s.node("jetson");
    create_node(&s.ctx.client, &node, &[]).await;
    let nodes: Api<Node> = Api::all(s.ctx.client.clone());
    let annotations = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "annotations": {
        "peat.dev/arch": "aarch64", "peat.dev/gpus": "1", "peat.dev/gpu-memory": "8Gi",
        "peat.dev/providers": "cuda,tensorrt,cpu"}}});
    nodes.patch(&node, &PatchParams::apply("peat-admin").force(), &Patch::Apply(&annotations)).await.unwrap();
    let _agent = start_agent(&node, &s.dir.join("store-jetson"), &["--gpu-memory", "16Gi"]);

    let mns: Api<ModelNode> = Api::all(s.ctx.client.clone());
    support::wait_for(mns.clone(), &node, "the ModelNode's first heartbeat", T, |mn: Option<&ModelNode>| {
        mn.and_then(|m| m.status.as_ref()).is_some_and(|st| st.last_heartbeat.is_some())
    })
    .await;
    let st = mns.get(&node).await.unwrap().status.unwrap();
    assert_eq!((st.arch.as_deref(), st.gpus, st.gpu_memory_bytes), (Some("arm64"), 1, 16 << 30));
    assert_eq!(st.providers, ["cuda", "tensorrt", "cpu"]);

    // A changed annotation reaches the ModelNode without restarting the agent (heartbeats here are
    // every 2 s; the change must not wait for a restart that never comes).
    let changed = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "annotations": {
        "peat.dev/arch": "aarch64", "peat.dev/gpus": "2", "peat.dev/gpu-memory": "8Gi", "peat.dev/providers": "cuda,cpu"}}});
    nodes.patch(&node, &PatchParams::apply("peat-admin").force(), &Patch::Apply(&changed)).await.unwrap();
    support::wait_for(mns.clone(), &node, "gpus 2 and providers cuda,cpu", T, |mn: Option<&ModelNode>| {
        mn.and_then(|m| m.status.as_ref()).is_some_and(|st| st.gpus == 2 && st.providers == ["cuda", "cpu"])
    })
    .await;
    assert_eq!(mns.get(&node).await.unwrap().status.unwrap().gpu_memory_bytes, 16 << 30, "the flag still wins");
}

/// A second ModelDeployment of a model the node already holds (here from another namespace, as a
/// second team or a hand-written object would make it) waits with the blocker NodeBusy: it is not
/// Failed, so it can never count toward its rollout's failureThreshold and trigger a rollback.
#[tokio::test]
async fn a_second_deployment_of_a_held_model_waits_node_busy_and_is_no_failure() {
    let s = setup("agent-node-busy").await;
    push_files(&s.repo("held"), "1.0.0", cpu("int8-cpu"), &[("model.onnx", pseudo_random(7, 4096))]).await;
    let agent = s.agent("n", &[]).await;
    s.apply("held", "1.0.0", &[&agent], json!({})).await;
    s.converged("held", "1.0.0", &[&agent]).await;

    let other = support::ctx("agent-node-busy-other").await;
    let holder = s.deployment("held", &agent).await;
    let api: Api<ModelDeployment> = Api::namespaced(other.client.clone(), &other.ns);
    let name = ModelDeployment::name_for("held", &agent.node);
    let obj = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment",
                     "metadata": {"name": name}, "spec": holder.spec});
    api.patch(&name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&obj)).await.expect("a second deployment");
    let busy = support::eventually("the second deployment reports NodeBusy", T, || {
        let api = api.clone();
        let name = name.clone();
        async move { api.get(&name).await.ok().and_then(|m| m.status).filter(|st| st.reason.is_some()) }
    })
    .await;
    assert_eq!(busy.reason, Some(BlockerReason::NodeBusy), "{busy:?}");
    assert_eq!(busy.phase, DeploymentPhase::NotDeployed, "a blocker, not a failure: {busy:?}");
    assert!(busy.message.unwrap_or_default().contains("already holds model held"));
    let first = s.deployment("held", &agent).await.status.unwrap();
    assert_eq!((first.phase, first.active_version.as_deref()), (DeploymentPhase::Operational, Some("1.0.0")));
}

/// A manifest whose layer sizes add up past 2^64 (sizes come from the registry) is refused with a
/// message at resolution; nothing panics or wraps, and the controller goes on serving other rollouts.
#[tokio::test]
async fn layer_sizes_that_overflow_are_refused_with_a_message() {
    let s = setup("agent-size-overflow").await;
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    let client = access.client();
    let repo = s.repo("huge");
    let r: oci_client::Reference = format!("{repo}:1.0.0").parse().unwrap();
    let digest = push_raw_blob(&client, &repo, pseudo_random(43, 1000)).await;
    let layer = |title: &str, size: i64| file_layer(&digest, title, size);
    let config = b"{}".to_vec();
    let config_digest = peat::oci::digest::sha256_digest(&config);
    client.push_blob(&r, config.clone(), &config_digest).await.unwrap();
    let manifest = oci_client::manifest::OciImageManifest {
        config: oci_client::manifest::OciDescriptor {
            media_type: "application/vnd.oci.empty.v1+json".into(),
            digest: config_digest,
            size: config.len() as i64,
            ..Default::default()
        },
        layers: vec![layer("a.bin", i64::MAX), layer("b.bin", i64::MAX), layer("c.bin", 2)],
        ..Default::default()
    };
    client.push_manifest(&r, &oci_client::manifest::OciManifest::Image(manifest)).await.expect("the registry takes it");

    let agent = s.agent("n", &[]).await;
    s.apply("huge", "1.0.0", &[&agent], json!({})).await;
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    let ready = support::eventually("the rollout says why it cannot resolve", T, || {
        let api = api.clone();
        async move {
            let r = api.get("huge").await.ok()?;
            r.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.reason == "InvalidArtifact")
        }
    })
    .await;
    assert!(ready.message.contains("more than 2^64 bytes"), "{}", ready.message);
    assert!(support::deployments(&s.ctx.client, &s.ctx.ns, "huge").await.is_empty(), "nothing reaches a node");
    // The controller survived it: another rollout still converges.
    push_files(&s.repo("fine"), "1.0.0", cpu("int8-cpu"), &[("model.onnx", pseudo_random(44, 2048))]).await;
    s.apply("fine", "1.0.0", &[&agent], json!({})).await;
    s.converged("fine", "1.0.0", &[&agent]).await;
}

/// The node's `models.peat.dev/<model>` label, if any.
async fn model_label(s: &Setup, agent: &AgentProc, model: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(s.ctx.client.clone());
    let labels = nodes.get(&agent.node).await.unwrap().metadata.labels.unwrap_or_default();
    labels.get(&format!("models.peat.dev/{model}")).cloned()
}

#[tokio::test]
async fn the_scheduling_label_stays_on_the_active_version_through_a_slow_paused_and_failed_upgrade() {
    let s = setup("agent-label").await;
    let v1 = vec![("model.onnx", pseudo_random(31, MI))];
    let v2 = vec![("model.onnx", pseudo_random(32, 32 * MI))];
    let v3 = vec![("model.onnx", pseudo_random(33, MI))];
    for (v, files) in [("1.0.0", &v1), ("2.0.0", &v2), ("3.0.0", &v3)] {
        push_files(&s.repo("m"), v, cpu("int8-cpu"), files).await;
    }
    let link = CountingProxy::start(&s.registry.addr).await;
    let agent = s.agent("n", &[]).await;
    s.apply_via(&link.addr, "m", "1.0.0", &[&agent], json!({})).await;
    s.converged("m", "1.0.0", &[&agent]).await;
    assert_eq!(model_label(&s, &agent, "m").await.as_deref(), Some("1.0.0"));

    // A slow upgrade: while 2.0.0 downloads, 1.0.0 is active and the label says so.
    link.set_rate(4 * MI as u64);
    s.apply_via(&link.addr, "m", "2.0.0", &[&agent], json!({})).await;
    s.deployment_where("m", &agent, "2.0.0 downloading", |m| {
        m.spec.version == "2.0.0" && m.status.as_ref().is_some_and(|st| st.bytes_done > 0)
    })
    .await;
    assert_eq!(model_label(&s, &agent, "m").await.as_deref(), Some("1.0.0"), "while downloading");
    s.apply_via(&link.addr, "m", "2.0.0", &[&agent], json!({"paused": true})).await;
    s.deployment_where("m", &agent, "paused", |m| {
        m.status.as_ref().and_then(|st| st.message.as_deref()).is_some_and(|msg| msg.contains("paused"))
    })
    .await;
    assert_eq!(model_label(&s, &agent, "m").await.as_deref(), Some("1.0.0"), "while paused");

    // A failed upgrade: 1.0.0 stays active and labelled.
    link.set_rate(0); // unlimited
    tamper(&s.registry, &peat::oci::digest::sha256_digest(&v3[0].1));
    s.apply_via(&link.addr, "m", "3.0.0", &[&agent], json!({})).await;
    s.failed_on("m", &agent, "3.0.0").await;
    assert_eq!(model_label(&s, &agent, "m").await.as_deref(), Some("1.0.0"), "after a failed upgrade");
    assert_active(&agent.store, "m", "1.0.0", &v1);

    // The label switches at activation.
    s.apply_via(&link.addr, "m", "2.0.0", &[&agent], json!({})).await;
    s.converged("m", "2.0.0", &[&agent]).await;
    support::eventually("the label switched to 2.0.0", T, || async {
        (model_label(&s, &agent, "m").await.as_deref() == Some("2.0.0")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_a_rollout_keeps_the_active_model_which_a_new_rollout_adopts_without_a_transfer() {
    let s = setup("agent-retain").await;
    let v1 = vec![("model.onnx", pseudo_random(41, 2 * MI)), ("config.json", b"{}".to_vec())];
    push_files(&s.repo("m"), "1.0.0", cpu("int8-cpu"), &v1).await;
    let agent = s.agent("n", &[]).await;
    s.apply("m", "1.0.0", &[&agent], json!({})).await;
    s.converged("m", "1.0.0", &[&agent]).await;

    // Deleted (as an Argo CD prune would): the default deletionPolicy Retain keeps the active version.
    let rollouts: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    rollouts.delete("m", &Default::default()).await.unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    let md_name = ModelDeployment::name_for("m", &agent.node);
    support::eventually("the ModelDeployment collected", T, || async {
        matches!(mds.get_opt(&md_name).await, Ok(None)).then_some(())
    })
    .await;
    let mns: Api<ModelNode> = Api::all(s.ctx.client.clone());
    let inventory = support::eventually("the ModelNode lists m as retained", T, || async {
        let st = mns.get(&agent.node).await.ok()?.status?;
        st.models.iter().any(|m| m.model == "m" && m.active && m.retained).then_some(st)
    })
    .await;
    assert_eq!(inventory.models_summary.as_deref(), Some("m=1.0.0"));
    assert_active(&agent.store, "m", "1.0.0", &v1);
    assert_eq!(model_label(&s, &agent, "m").await.as_deref(), Some("1.0.0"), "still schedulable");

    // A new rollout of the model (a rename) adopts it: no byte from the registry.
    let served = s.registry.blob_bytes_served();
    s.apply_named("m-renamed", &s.registry.addr, "m", "1.0.0", &[&agent], json!({})).await;
    let r = support::wait_rollout(&s.ctx.client, &s.ctx.ns, "m-renamed", "converged", T, |r| {
        r.status.as_ref().is_some_and(|st| st.phase == RolloutPhase::Converged && st.converged == 1)
    })
    .await;
    assert_eq!(r.status.unwrap().resolved_version.as_deref(), Some("1.0.0"));
    assert_eq!(s.deployment("m", &agent).await.status.unwrap().bytes_done, 0, "adopted, not fetched");
    assert_eq!(s.registry.blob_bytes_served(), served, "adoption moves no bytes");
    support::eventually("m managed again", T, || async {
        let st = mns.get(&agent.node).await.ok()?.status?;
        st.models.iter().any(|m| m.model == "m" && m.active && !m.retained).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_full_store_evicts_kept_versions_to_make_room_and_keeps_the_active_one() {
    let s = setup("agent-evict").await;
    let a1 = vec![("model.onnx", pseudo_random(51, 4 * MI))];
    let a2 = vec![("model.onnx", pseudo_random(52, 4 * MI))];
    let b1 = vec![("model.onnx", pseudo_random(53, 5 * MI))];
    push_files(&s.repo("a"), "1.0.0", cpu("int8-cpu"), &a1).await;
    push_files(&s.repo("a"), "2.0.0", cpu("int8-cpu"), &a2).await;
    push_files(&s.repo("b"), "1.0.0", cpu("int8-cpu"), &b1).await;
    let store = s.dir.join("store-small");
    let _tmpfs = Tmpfs::mount(&store, "12m");
    let node = s.node("small");
    create_node(&s.ctx.client, &node, &[]).await;
    let agent = start_agent(&node, &store, &[]);
    s.apply("a", "1.0.0", &[&agent], json!({})).await;
    s.converged("a", "1.0.0", &[&agent]).await;
    s.apply("a", "2.0.0", &[&agent], json!({})).await;
    s.converged("a", "2.0.0", &[&agent]).await;
    assert!(store.join("models/a/1.0.0").is_dir(), "1.0.0 kept for rollback");
    let mns: Api<ModelNode> = Api::all(s.ctx.client.clone());
    let st = support::eventually("the kept version reported as reclaimable", T, || async {
        mns.get(&node).await.ok()?.status.filter(|st| st.storage_reclaimable_bytes == 4 * MI as i64)
    })
    .await;
    assert!(st.storage_free_bytes < 5 * MI as i64, "b does not fit without eviction: {st:?}");

    // b needs 5 MiB: only evicting a 1.0.0 (the kept, not active, version) makes room.
    s.apply("b", "1.0.0", &[&agent], json!({})).await;
    s.converged("b", "1.0.0", &[&agent]).await;
    assert_active(&store, "b", "1.0.0", &b1);
    assert_active(&store, "a", "2.0.0", &a2);
    assert!(!store.join("models/a/1.0.0").exists(), "the kept version was evicted");
    let a1_blob = peat::oci::digest::sha256_digest(&a1[0].1);
    assert!(!store.join(format!("blobs/sha256/{}", &a1_blob[7..])).exists(), "with its blob");
    assert!(std::fs::read_to_string(&agent.log).unwrap().contains("evicted kept versions to make room"));
}

/// Runs the environment's oras (built from the Go module proxy) in `dir`.
fn oras(s: &Setup, dir: &Path, args: &[&str]) {
    let out = std::process::Command::new(&s.ctx.env.binaries.oras)
        .current_dir(dir)
        .arg("push")
        .arg("--plain-http")
        .args(args)
        .output()
        .expect("running oras");
    assert!(out.status.success(), "oras push {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn archives_from_oras_and_model_pack_are_unpacked_inside_the_version_only() {
    let s = setup("agent-archives").await;
    let src = s.dir.join("archives");
    let weights = pseudo_random(91, MI);
    std::fs::create_dir_all(src.join("weights/sub")).unwrap();
    std::fs::write(src.join("weights/model.safetensors"), &weights).unwrap();
    std::fs::write(src.join("weights/sub/tokenizer.json"), b"{\"v\":1}").unwrap();

    // 1.0.0: `oras push dir/` (one tar+gzip layer marked for unpacking).
    oras(&s, &src, &[&format!("{}:1.0.0", s.repo("m")), "weights/"]);
    let agent = s.agent("n", &[]).await;
    s.apply("m", "1.0.0", &[&agent], json!({})).await;
    s.converged("m", "1.0.0", &[&agent]).await;
    assert_active(
        &agent.store,
        "m",
        "1.0.0",
        &[("weights/model.safetensors", weights.clone()), ("weights/sub/tokenizer.json", b"{\"v\":1}".to_vec())],
    );

    // 2.0.0: a ModelPack artifact (model-spec v0.0.7 media types) of tar, tar+gzip and tar+zstd
    // layers, the tars made by GNU tar, pushed by oras.
    let pack = src.join("pack");
    std::fs::create_dir_all(pack.join("docs")).unwrap();
    std::fs::write(pack.join("model.safetensors"), &weights).unwrap();
    std::fs::write(pack.join("config.json"), b"{\"arch\":\"x\"}").unwrap();
    std::fs::write(pack.join("docs/README.md"), b"# m\n").unwrap();
    let tar = |args: &[&str]| {
        let out = std::process::Command::new("tar").current_dir(&src).args(args).output().expect("running tar");
        assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    tar(&["-cf", "weights.tar", "-C", "pack", "model.safetensors"]);
    tar(&["-czf", "config.tar.gz", "-C", "pack", "config.json"]);
    tar(&["-cf", "docs.tar", "-C", "pack", "docs"]);
    let zst = zstd::encode_all(std::fs::File::open(src.join("docs.tar")).unwrap(), 3).unwrap();
    std::fs::write(src.join("docs.tar.zst"), zst).unwrap();
    std::fs::write(
        src.join("model-config.json"),
        br#"{"descriptor":{"name":"m"},"modelfs":{"type":"layers","diffIds":[]},"config":{}}"#,
    )
    .unwrap();
    let model_pack = |tag: &str, layers: &[&str]| {
        let mut args = vec![
            format!("{}:{tag}", s.repo("m")),
            "--artifact-type".into(),
            "application/vnd.cncf.model.manifest.v1+json".into(),
            "--config".into(),
            "model-config.json:application/vnd.cncf.model.config.v1+json".into(),
        ];
        args.extend(layers.iter().map(|l| l.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        oras(&s, &src, &args);
    };
    model_pack(
        "2.0.0",
        &[
            "weights.tar:application/vnd.cncf.model.weight.v1.tar",
            "config.tar.gz:application/vnd.cncf.model.weight.config.v1.tar+gzip",
            "docs.tar.zst:application/vnd.cncf.model.doc.v1.tar+zstd",
        ],
    );
    s.apply("m", "2.0.0", &[&agent], json!({})).await;
    s.converged("m", "2.0.0", &[&agent]).await;
    assert_active(
        &agent.store,
        "m",
        "2.0.0",
        &[
            ("model.safetensors", weights.clone()),
            ("config.json", b"{\"arch\":\"x\"}".to_vec()),
            ("docs/README.md", b"# m\n".to_vec()),
        ],
    );

    // 3.0.0: a tar whose entry climbs out of the version directory: refused before activation.
    let mut b = ::tar::Builder::new(Vec::new());
    let mut h = ::tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"../../escaped");
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(::tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    std::fs::write(src.join("evil.tar"), b.into_inner().unwrap()).unwrap();
    model_pack("3.0.0", &["evil.tar:application/vnd.cncf.model.weight.v1.tar"]);
    s.apply("m", "3.0.0", &[&agent], json!({})).await;
    let st = s.failed_on("m", &agent, "3.0.0").await;
    assert_eq!(st.reason, Some(BlockerReason::TransferFailed));
    assert!(st.message.as_deref().unwrap_or_default().contains("escapes"), "{:?}", st.message);
    assert_eq!(st.active_version.as_deref(), Some("2.0.0"));
    assert!(!agent.store.join("models/m/3.0.0").exists() && !agent.store.join("escaped").exists());
    assert!(!agent.store.join("models/escaped").exists() && !agent.store.join("models/m/escaped").exists());
    assert_active(
        &agent.store,
        "m",
        "2.0.0",
        &[
            ("model.safetensors", weights.clone()),
            ("config.json", b"{\"arch\":\"x\"}".to_vec()),
            ("docs/README.md", b"# m\n".to_vec()),
        ],
    );
}
