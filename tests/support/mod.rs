//! The real-environment harness: one etcd + kube-apiserver + kube-controller-manager + registry per
//! test binary, started on first use, and a fresh namespace per test.
//!
//! The processes die with the test binary (PR_SET_PDEATHSIG), also when a test panics or the run
//! is killed; an `atexit` hook removes the state directory, and a later run removes what a killed
//! run left.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};
use peat::testenv::{Binaries, Lifetime, Options, TestEnv};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn state_root() -> PathBuf {
    repo_root().join("target/testenv")
}

static ENV: OnceLock<TestEnv> = OnceLock::new();
static CLEANUP: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_state_at_exit() {
    // Kill the children first so nothing writes into the directory while it goes.
    if let Some(env) = ENV.get() {
        for p in &env.processes {
            unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
        }
    }
    // PEAT_KEEP_TESTENV=1 keeps logs and state for a look after the run.
    if let Ok(guard) = CLEANUP.lock()
        && let Some(dir) = guard.as_ref()
        && std::env::var_os("PEAT_KEEP_TESTENV").is_none()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes state directories of earlier runs whose process is gone (a run killed before `atexit`).
fn remove_stale_state(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid: Option<u32> = name.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The environment of this test binary, started on first use.
pub fn env() -> &'static TestEnv {
    ENV.get_or_init(|| {
        // Started on a thread of its own: the caller is usually inside a test's tokio runtime.
        std::thread::spawn(|| {
            let root = state_root();
            remove_stale_state(&root);
            let dir = root.join(format!("{}-{}", std::process::id(), env!("CARGO_CRATE_NAME")));
            let binaries = Binaries::ensure(&repo_root()).unwrap_or_else(|e| panic!("{e}"));
            *CLEANUP.lock().unwrap() = Some(dir.clone());
            unsafe { libc::atexit(remove_state_at_exit) };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let opts =
                Options { dir, lifetime: Lifetime::TiedToThisProcess, controller_manager: true, install_crds: true };
            rt.block_on(TestEnv::start(binaries, opts)).unwrap_or_else(|e| panic!("starting the test environment: {e}"))
        })
        .join()
        .expect("the test environment failed to start")
    })
}

/// What one test gets: a client and a namespace of its own.
pub struct Ctx {
    pub env: &'static TestEnv,
    pub client: Client,
    pub ns: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace named after the test.
pub async fn ctx(test: &str) -> Ctx {
    let env = env();
    let client = env.client().await.expect("client");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let slug: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let mut ns = format!("{}-{n}", slug.trim_matches('-'));
    ns.truncate(63);
    let ns = ns.trim_end_matches('-').to_string();
    let api: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
    api.create(&PostParams::default(), &obj).await.expect("creating the test namespace");
    Ctx { env, client, ns }
}

/// Waits for `cond` on an object, failing loudly after `timeout`.
pub async fn wait_for<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl kube::runtime::wait::Condition<K>,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    match tokio::time::timeout(timeout, kube::runtime::wait::await_condition(api, name, cond)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("watching {name} for {what}: {e}"),
        Err(_) => panic!("timed out after {timeout:?} waiting for {name}: {what}"),
    }
}

/// Runs kubectl (the one built for the environment) against it.
pub fn kubectl(args: &[&str]) -> std::process::Output {
    let env = env();
    std::process::Command::new(&env.binaries.kubectl)
        .env("KUBECONFIG", &env.kubeconfig)
        .args(args)
        .output()
        .expect("running kubectl")
}

// ---------------------------------------------------------------------------------------------
// Controller, nodes, artifacts and simulated agents.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use peat::api::{DeploymentPhase, ModelDeployment, ModelNode, ModelNodeStatus, ModelRollout};
use peat::testenv::ManagedProcess;

/// A `peat controller` process of this test run.
pub struct ControllerProc {
    pub process: ManagedProcess,
    pub metrics_addr: String,
    pub log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `peat controller` against this binary's environment and waits until it is ready.
pub async fn start_controller(name: &str, lease_namespace: &str, extra: &[&str]) -> ControllerProc {
    let env = env();
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let log = env.dir.join("logs").join(format!("{name}.log"));
    let mut args: Vec<String> = vec![
        "controller".into(),
        "--metrics-addr".into(),
        metrics_addr.clone(),
        "--lease-namespace".into(),
        lease_namespace.into(),
        "--identity".into(),
        name.into(),
        "--lease-duration".into(),
        "4s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let envs = vec![
        ("KUBECONFIG".to_string(), env.kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "info,peat=debug,kube_lease_manager=info".to_string()),
    ];
    let process = ManagedProcess::spawn_with_env(
        name,
        Path::new(env!("CARGO_BIN_EXE_peat")),
        &args,
        &envs,
        &log,
        Lifetime::TiedToThisProcess,
    )
    .expect("starting peat controller");
    let c = ControllerProc { process, metrics_addr, log };
    c.wait_ready().await;
    c
}

impl ControllerProc {
    /// GET on the admin server.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        peat::testenv::http_get(&self.metrics_addr, path).await.ok()
    }

    /// A metric's value (first sample whose line starts with `name`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "controller not ready in 60 s; log: {}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until this replica leads.
    pub async fn wait_leading(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.metric("peat_controller_leader").await != Some(1.0) {
            assert!(
                std::time::Instant::now() < deadline,
                "controller did not lead within {timeout:?}; log: {}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// What a simulated node reports.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub arch: String,
    pub gpu_memory: i64,
    pub providers: Vec<String>,
    pub free: i64,
}

impl NodeSpec {
    pub fn new(name: &str, arch: &str, gpu_memory: i64, providers: &[&str]) -> Self {
        NodeSpec {
            name: name.into(),
            labels: vec![],
            arch: arch.into(),
            gpu_memory,
            providers: providers.iter().map(|p| p.to_string()).collect(),
            free: 100 << 30,
        }
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
}

/// Registers a Node (no kubelet) and its ModelNode with a fresh heartbeat, as an agent would.
pub async fn register_node(client: &Client, n: &NodeSpec) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: serde_json::Map<String, serde_json::Value> =
        n.labels.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": labels}});
    nodes
        .patch(&n.name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&node))
        .await
        .expect("creating a Node");
    let mns: Api<ModelNode> = Api::all(client.clone());
    let mn = serde_json::json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode", "metadata": {"name": n.name}, "spec": {}});
    mns.patch(&n.name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&mn))
        .await
        .expect("creating a ModelNode");
    let status = ModelNodeStatus {
        arch: Some(n.arch.clone()),
        gpus: i32::from(n.gpu_memory > 0),
        gpu_memory_bytes: n.gpu_memory,
        providers: n.providers.clone(),
        storage_free_bytes: n.free,
        storage_total_bytes: n.free * 2,
        agent_version: Some("test".into()),
        last_heartbeat: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    set_model_node_status(client, &n.name, &status).await;
}

pub async fn set_model_node_status(client: &Client, name: &str, status: &ModelNodeStatus) {
    let mns: Api<ModelNode> = Api::all(client.clone());
    mns.patch_status(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"status": status})))
        .await
        .expect("patching ModelNode status");
}

/// Plays the node's agent: reports a phase and active version for a ModelDeployment.
pub async fn report(client: &Client, ns: &str, md: &str, phase: DeploymentPhase, active: Option<&str>, bytes: i64) {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let mut status = serde_json::json!({
        "phase": phase,
        "bytesTotal": bytes,
        "bytesDone": if phase == DeploymentPhase::Operational { bytes } else { bytes / 2 },
        "lastHeartbeat": Timestamp::now().to_string(),
    });
    if let Some(v) = active {
        status["activeVersion"] = serde_json::json!(v);
    }
    if phase == DeploymentPhase::Failed {
        status["reason"] = serde_json::json!("TransferFailed");
        status["message"] = serde_json::json!("digest mismatch (simulated)");
    }
    api.patch_status(md, &PatchParams::default(), &Patch::Merge(serde_json::json!({"status": status})))
        .await
        .unwrap_or_else(|e| panic!("reporting on {ns}/{md}: {e}"));
}

/// Polls `f` until it returns Some, failing after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rollout's ModelDeployments, by node.
pub async fn deployments(
    client: &Client,
    ns: &str,
    model: &str,
) -> std::collections::BTreeMap<String, ModelDeployment> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    api.list(&kube::api::ListParams::default().labels(&format!("peat.dev/model={model}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| (m.spec.node_name.clone(), m))
        .collect()
}

/// Waits until the rollout's status satisfies `pred`.
pub async fn wait_rollout(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&ModelRollout) -> bool,
) -> ModelRollout {
    let api: Api<ModelRollout> = Api::namespaced(client.clone(), ns);
    eventually(what, timeout, || {
        let api = api.clone();
        let pred = &pred;
        async move { api.get(name).await.ok().filter(|r| pred(r)) }
    })
    .await
}

/// Pushes a two-variant model version (fp16-cuda needing 4 GiB GPU memory, int8-cpu) to the registry.
pub async fn push_two_variants(repository: &str, version: &str) -> (String, String) {
    let gpu = push_variant(repository, version, TestVariant::Fp16Cuda).await;
    let cpu = push_variant(repository, version, TestVariant::Int8Cpu).await;
    (gpu, cpu)
}

/// The two variants the tests push: `fp16-cuda` (cuda, 4 GiB of GPU memory, two files) and `int8-cpu`.
#[derive(Clone, Copy, Debug)]
pub enum TestVariant {
    Fp16Cuda,
    Int8Cpu,
}

/// Pushes one variant of `repository:version` (added to the version's index); returns its manifest digest.
pub async fn push_variant(repository: &str, version: &str, variant: TestVariant) -> String {
    use peat::oci::push::{VariantMeta, push_variant_bytes};
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    let client = access.client();
    let (name, precision, provider, min_gpu_memory, extra) = match variant {
        TestVariant::Fp16Cuda => ("fp16-cuda", "float16", "cuda", 4u64 << 30, true),
        TestVariant::Int8Cpu => ("int8-cpu", "int8", "cpu", 0, false),
    };
    let meta = VariantMeta {
        name: name.into(),
        precision: Some(precision.into()),
        providers: vec![provider.into()],
        min_gpu_memory,
        arch: None,
        os: None,
    };
    let mut files = vec![("model.onnx", format!("{provider} weights {version}").into_bytes())];
    if extra {
        files.push(("config.json", b"{}".to_vec()));
    }
    push_variant_bytes(&client, &access.auth, repository, version, &meta, &files)
        .await
        .unwrap_or_else(|e| panic!("pushing {name}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Real agents.

/// A `peat agent` process of this test run.
pub struct AgentProc {
    pub process: ManagedProcess,
    pub node: String,
    pub store: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

/// Creates a Node object (no kubelet) with labels; its agent publishes the ModelNode.
pub async fn create_node(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
    nodes.patch(name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&node)).await.expect("creating a Node");
}

/// Starts `peat agent` for `node` with its store in `store` (fast heartbeats and progress for tests).
pub fn start_agent(node: &str, store: &Path, extra: &[&str]) -> AgentProc {
    let env = env();
    let log = env.dir.join("logs").join(format!("agent-{node}.log"));
    let mut args: Vec<String> = [
        "agent",
        "--node-name",
        node,
        "--store",
        &store.display().to_string(),
        "--metrics-addr",
        "127.0.0.1:0",
        "--heartbeat-interval",
        "2s",
        "--progress-interval",
        "300ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    AgentProc { process: spawn_agent(node, &args, &log), node: node.into(), store: store.to_path_buf(), log, args }
}

fn spawn_agent(node: &str, args: &[String], log: &Path) -> ManagedProcess {
    let envs = vec![
        ("KUBECONFIG".to_string(), env().kubeconfig.display().to_string()),
        ("RUST_LOG".to_string(), "info,peat=debug".to_string()),
    ];
    ManagedProcess::spawn_with_env(
        &format!("agent-{node}"),
        Path::new(env!("CARGO_BIN_EXE_peat")),
        args,
        &envs,
        log,
        Lifetime::TiedToThisProcess,
    )
    .expect("starting peat agent")
}

impl AgentProc {
    /// SIGKILL, as a power cut would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again (after [`AgentProc::kill`]) with the same arguments.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = spawn_agent(&self.node, &self.args, &self.log);
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

// Not every test binary that includes this module pushes generated bytes.
#[allow(unused_imports)]
pub use peat::testenv::pseudo_random;

/// Pushes in-memory files as one variant of `repository:version`.
pub async fn push_files(
    repository: &str,
    version: &str,
    meta: peat::oci::push::VariantMeta,
    files: &[(&str, Vec<u8>)],
) -> String {
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    peat::oci::push::push_variant_bytes(&access.client(), &access.auth, repository, version, &meta, files)
        .await
        .unwrap_or_else(|e| panic!("pushing {repository}:{version}: {e}"))
}

/// A TCP proxy in front of a registry that counts the bytes it delivers to clients (bytes on the
/// wire as a node's link would carry them) and can pace them like a slow link.
pub struct CountingProxy {
    pub addr: String,
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on a free port and forwards every connection to `upstream`.
    pub async fn start(upstream: &str) -> CountingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let delivered = std::sync::Arc::new(AtomicU64::new(0));
        let rate = std::sync::Arc::new(AtomicU64::new(0));
        let (d, r, upstream) = (delivered.clone(), rate.clone(), upstream.to_string());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (d, r, upstream) = (d.clone(), r.clone(), upstream.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let rate = r.load(Ordering::Relaxed);
                            if rate > 0 {
                                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            d.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    };
                    // Either direction ending ends the connection.
                    tokio::select! {
                        _ = up => {},
                        _ = down => {},
                    }
                });
            }
        });
        CountingProxy { addr, delivered, rate, task }
    }

    /// Bytes delivered to clients so far (headers included).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Paces deliveries to `bytes_per_second` (0: as fast as possible).
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Peak resident memory of a running process, MiB (VmHWM).
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Waits until a partial download in `store`'s `tmp/` holds more than `min` bytes; returns its length.
pub async fn partial_over(store: &Path, min: u64, what: &str) -> u64 {
    let tmp = store.join("tmp");
    eventually(what, Duration::from_secs(90), || {
        let tmp = tmp.clone();
        async move {
            let len = std::fs::read_dir(&tmp).ok()?.flatten().next()?.metadata().ok()?.len();
            (len > min).then_some(len)
        }
    })
    .await
}
