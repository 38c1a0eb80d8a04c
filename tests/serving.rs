//! The serving path with a real Open Inference Protocol server: MLServer from PyPI with its
//! scikit-learn runtime, loading the files the agent placed. Two nodes (two `peat agent`s), each
//! with its own MLServer on its host network (`serving.endpoint: Host`: 127.0.0.1 and 127.0.0.2),
//! the real controller, API server and registry. In one sequence:
//! activation → Loading until the server serves → Operational (and after `minReadySeconds`);
//! a server killed → Degraded with its error, back once it serves again; a slowed link →
//! Degraded above `degradedLatencyMilliseconds`, then back; a version the server cannot load
//! (a corrupt file whose digests are right) → Failed → the rollout aborts → auto-rollback → the
//! previous version served again, as MLServer itself reports.
//! The CSI consumers (pods found through the volume's pod info) are covered on the real node
//! (tests/real_node.rs).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use peat::api::{DeploymentPhase, ModelDeployment, ModelRollout, RolloutPhase};
use peat::oci::push::VariantMeta;
use peat_testenv::{Lifetime, ManagedProcess, Registry};
use serde_json::json;
use support::{AgentProc, create_node, inference_request, mlserver_python, push_files, start_agent, trained_model};

const T: Duration = Duration::from_secs(90);
const MODEL: &str = "iris";

/// One MLServer, serving the model directory of one node's store.
struct Server {
    process: Option<ManagedProcess>,
    host: String,
    port: u16,
    grpc_port: u16,
    root: PathBuf,
    log: PathBuf,
}

fn free_port(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0)).unwrap().local_addr().unwrap().port()
}

impl Server {
    fn new(host: &str, port: u16, root: &Path, log: PathBuf) -> Server {
        let grpc_port = free_port(host);
        Server { process: None, host: host.into(), port, grpc_port, root: root.into(), log }
    }

    /// Starts MLServer on the model's `current` directory, loading nothing by itself: the agent asks.
    async fn start(&mut self) {
        let env = support::env();
        let vars: Vec<(String, String)> = [
            ("MLSERVER_HOST", self.host.clone()),
            ("MLSERVER_HTTP_PORT", self.port.to_string()),
            ("MLSERVER_GRPC_PORT", self.grpc_port.to_string()),
            ("MLSERVER_METRICS_ENDPOINT", String::new()),
            ("MLSERVER_LOAD_MODELS_AT_STARTUP", "false".into()),
            // Inference in the server's own process (its worker pool is not needed here).
            ("MLSERVER_PARALLEL_WORKERS", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let args = vec!["start".to_string(), self.root.display().to_string()];
        let p = ManagedProcess::spawn_with_env(
            &format!("mlserver-{}", self.host),
            &env.binaries.mlserver,
            &args,
            &vars,
            &self.log,
            Lifetime::TiedToThisProcess,
        )
        .expect("starting MLServer");
        self.process = Some(p);
        let url = format!("http://{}:{}/v2/health/live", self.host, self.port);
        let log = self.log.clone();
        support::eventually(&format!("MLServer at {url} (log {})", log.display()), T, || {
            let url = url.clone();
            async move { http_status(&url).await.filter(|s| *s == 200) }
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host, self.port)
    }

    /// The version MLServer says answered an inference request.
    async fn infer(&self) -> String {
        let answer = http()
            .post(self.url(&format!("/v2/models/{MODEL}/infer")))
            .header("content-type", "application/json")
            .body(inference_request())
            .send()
            .await
            .expect("an inference request");
        let text = answer.text().await.expect("an inference answer");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("an inference answer: {text}"));
        v["model_version"].as_str().unwrap_or_else(|| panic!("a model_version in {v}")).to_string()
    }

    async fn ready(&self, version: &str) -> Option<u16> {
        http_status(&self.url(&format!("/v2/models/{MODEL}/versions/{version}/ready"))).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

/// HTTP status of a GET; None when nothing answers.
async fn http_status(url: &str) -> Option<u16> {
    http().get(url).send().await.ok().map(|r| r.status().as_u16())
}

/// A TCP proxy that holds every chunk from the client for `delay` before passing it on: a slow link
/// in front of a real server.
struct SlowLink {
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    async fn start(listen: &str, upstream: String) -> SlowLink {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("the slow link's port");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let d = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (d, upstream) = (d.clone(), upstream.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 << 10];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(d.load(Ordering::Relaxed))).await;
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        SlowLink { delay_ms, task }
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn cpu() -> VariantMeta {
    VariantMeta {
        name: "cpu".into(),
        precision: Some("float32".into()),
        providers: vec!["cpu".into()],
        ..Default::default()
    }
}

struct Fleet {
    ctx: support::Ctx,
    registry: Registry,
    agents: Vec<AgentProc>,
}

impl Fleet {
    fn md_api(&self) -> Api<ModelDeployment> {
        Api::namespaced(self.ctx.client.clone(), &self.ctx.ns)
    }

    async fn apply(&self, version: &str, serving: serde_json::Value) {
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let obj = json!({
            "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout",
            "metadata": {"name": MODEL},
            "spec": {
                "model": MODEL,
                "version": version,
                "source": {"repository": format!("{}/models/{MODEL}", self.registry.addr), "insecure": true},
                "scope": {"nodes": self.agents.iter().map(|a| a.node.clone()).collect::<Vec<_>>()},
                "strategy": {"failureThreshold": 1, "autoRollback": true},
                "serving": serving,
            },
        });
        api.patch(MODEL, &PatchParams::apply("peat-test").force(), &Patch::Apply(&obj)).await.expect("applying");
    }

    fn logs(&self) -> String {
        self.agents.iter().map(|a| format!("--- {}\n{}\n", a.node, a.log_tail())).collect()
    }

    /// Waits until node `i`'s deployment satisfies `pred`; returns it.
    async fn md_where(&self, i: usize, what: &str, pred: impl Fn(&ModelDeployment) -> bool) -> ModelDeployment {
        let name = ModelDeployment::name_for(MODEL, &self.agents[i].node);
        let deadline = Instant::now() + T;
        loop {
            if let Ok(md) = self.md_api().get(&name).await
                && pred(&md)
            {
                return md;
            }
            if Instant::now() > deadline {
                let st = self.md_api().get(&name).await.ok().and_then(|m| m.status);
                panic!("timed out waiting for {name}: {what}; status {st:#?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the rollout to converge on `version` with every node serving it.
    async fn serving(&self, version: &str) -> ModelRollout {
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let n = self.agents.len() as i32;
        let deadline = Instant::now() + T;
        loop {
            if let Ok(r) = api.get(MODEL).await
                && let Some(s) = &r.status
                && s.observed_generation == r.metadata.generation
                && s.phase == RolloutPhase::Converged
                && s.resolved_version.as_deref() == Some(version)
                && s.serving == n
            {
                return r;
            }
            if Instant::now() > deadline {
                let st = api.get(MODEL).await.ok().and_then(|r| r.status);
                panic!("timed out waiting for {version} served on {n} nodes; rollout {st:#?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// From the moment node 0 has `version` active (its status says so) to Operational: the
    /// time an upgrade takes from activation to serving. Also whether a soak was seen (Loading
    /// while the server already answered ready).
    async fn activation_to_operational(&self, version: &str) -> (Duration, bool) {
        let name = ModelDeployment::name_for(MODEL, &self.agents[0].node);
        let deadline = Instant::now() + T;
        let mut activated: Option<Instant> = None;
        let mut soaked = false;
        loop {
            if let Ok(md) = self.md_api().get(&name).await
                && let Some(s) = md.status
                && s.active_version.as_deref() == Some(version)
            {
                let at = *activated.get_or_insert_with(Instant::now);
                let ready = s.serving.as_ref().is_some_and(|v| v.ready && v.version == version);
                soaked |= s.phase == DeploymentPhase::Loading && ready;
                if s.phase == DeploymentPhase::Operational && ready {
                    return (at.elapsed(), soaked);
                }
                assert_ne!(s.phase, DeploymentPhase::Failed, "{version} failed: {:?}\n{}", s.message, self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {version} Operational on {name}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Records every (node, version, status) the namespace's ModelDeployments pass through, from a watch.
fn record_statuses(
    api: Api<ModelDeployment>,
) -> Arc<std::sync::Mutex<Vec<(String, String, peat::api::ModelDeploymentStatus)>>> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
        while let Some(ev) = stream.next().await {
            if let Ok(md) = ev
                && let Some(s) = md.status
            {
                out.lock().unwrap().push((md.spec.node_name, md.spec.version, s));
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn operational_means_served_by_a_real_open_inference_server() {
    let ctx = support::ctx("serving").await;
    let controller = support::start_controller("serving", &ctx.ns, &[]).await;
    controller.wait_leading(T).await;
    let dir = ctx.env.dir.join(&ctx.ns);
    let registry = Registry::start(&ctx.env.binaries.registry, &dir.join("registry")).await.expect("a registry");
    let python = mlserver_python(&ctx.env.binaries.mlserver);
    let repo = format!("{}/models/{MODEL}", registry.addr);

    // Node 0's server is reached through a slow link (latency can be injected); node 1's directly.
    let port = loop {
        let p = free_port("127.0.0.1");
        if std::net::TcpListener::bind(("127.0.0.2", p)).is_ok() {
            break p;
        }
    };
    let hosts = ["127.0.0.1", "127.0.0.2"];
    let mut agents = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let node = format!("{}-{i}", ctx.ns);
        create_node(&ctx.client, &node, &[]).await;
        let store = dir.join(format!("store-{i}"));
        agents.push(start_agent(&node, &store, &["--host-address", host, "--serving-interval", "250ms"]));
    }
    let fleet = Fleet { ctx, registry, agents };
    let behind_link = free_port("127.0.0.1");
    let link = SlowLink::start(&format!("127.0.0.1:{port}"), format!("127.0.0.1:{behind_link}")).await;
    let logs = fleet.ctx.env.dir.join("logs");
    let current = |i: usize| fleet.agents[i].store.join(format!("models/{MODEL}/current"));
    let mut servers = [
        Server::new("127.0.0.1", behind_link, &current(0), logs.join(format!("{}-mlserver-0.log", fleet.ctx.ns))),
        Server::new("127.0.0.2", port, &current(1), logs.join(format!("{}-mlserver-1.log", fleet.ctx.ns))),
    ];
    let serving = |min_ready: i32, timeout: i32| {
        json!({"protocol": "OpenInference", "endpoint": "Host", "port": port,
               "readyTimeoutSeconds": timeout, "minReadySeconds": min_ready, "degradedLatencyMilliseconds": 1000})
    };

    // 1.0.0: active on disk, but no server yet — Loading, saying why; then the servers start
    // (loading nothing by themselves), the agents ask them to load it, and only then Operational.
    for (version, seed) in [("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)] {
        push_files(&repo, version, cpu(), &trained_model(&python, MODEL, version, seed)).await;
    }
    fleet.apply("1.0.0", serving(0, 120)).await;
    for i in 0..2 {
        let md = fleet
            .md_where(i, "1.0.0 active and Loading while no server answers", |m| {
                let s = m.status.clone().unwrap_or_default();
                s.active_version.as_deref() == Some("1.0.0")
                    && s.phase == DeploymentPhase::Loading
                    && s.serving.as_ref().is_some_and(|v| !v.ready && !v.consumers.is_empty())
            })
            .await;
        let msg = md.status.unwrap().message.unwrap_or_default();
        assert!(msg.contains("waiting for the model server to serve version 1.0.0: host:"), "{msg}");
        assert!(msg.to_lowercase().contains("connect"), "the reason is the refused connection: {msg}");
    }
    for s in servers.iter_mut() {
        s.start().await;
    }
    let r = fleet.serving("1.0.0").await;
    let st = r.status.unwrap();
    assert_eq!((st.serving, st.staged, st.converged), (2, 0, 2));
    for (i, s) in servers.iter().enumerate() {
        assert_eq!(s.ready("1.0.0").await, Some(200), "MLServer {i} reports 1.0.0 ready itself");
        assert_eq!(s.infer().await, "1.0.0");
        let md = fleet.md_where(i, "serving status", |_| true).await;
        let sv = md.status.unwrap().serving.expect("a serving section");
        assert_eq!((sv.version.as_str(), sv.ready, sv.consumers.len()), ("1.0.0", true, 1));
        assert_eq!(sv.consumers[0].name, "host");
        assert_eq!(sv.consumers[0].endpoint.as_deref(), Some(format!("{}:{port}", hosts[i]).as_str()));
        assert!(sv.since.is_some() && sv.latency_milliseconds.is_some());
    }

    // 2.0.0, no soak: activation → the server loads it → Operational.
    fleet.apply("2.0.0", serving(0, 120)).await;
    let (no_soak, _) = fleet.activation_to_operational("2.0.0").await;
    fleet.serving("2.0.0").await;
    for s in &servers {
        assert_eq!(s.infer().await, "2.0.0");
        assert_eq!(s.ready("1.0.0").await, Some(404), "the server replaced 1.0.0");
    }

    // Node 1's server dies: Degraded, with the error; it comes back (empty: the agent loads again).
    servers[1].kill();
    let md = fleet
        .md_where(1, "Degraded once its server is gone", |m| {
            m.status.as_ref().is_some_and(|s| s.phase == DeploymentPhase::Degraded)
        })
        .await;
    let msg = md.status.unwrap().message.unwrap_or_default();
    assert!(msg.contains("version 2.0.0 is no longer served: host:"), "{msg}");
    let api: Api<ModelRollout> = Api::namespaced(fleet.ctx.client.clone(), &fleet.ctx.ns);
    support::eventually("the rollout counts one node serving, one staged", T, || async {
        let s = api.get(MODEL).await.ok()?.status?;
        (s.serving == 1 && s.staged == 1 && s.converged == 2).then_some(())
    })
    .await;
    servers[1].start().await;
    fleet.serving("2.0.0").await;
    assert_eq!(servers[1].infer().await, "2.0.0");

    // A slow link to node 0's server: Degraded above degradedLatencyMilliseconds, back when fast.
    link.set_delay(Duration::from_millis(1500));
    let md = fleet
        .md_where(0, "Degraded on a slow answer", |m| {
            m.status.as_ref().is_some_and(|s| s.phase == DeploymentPhase::Degraded)
        })
        .await;
    let st = md.status.unwrap();
    let msg = st.message.unwrap_or_default();
    assert!(msg.contains("above degradedLatencyMilliseconds 1000"), "{msg}");
    assert!(st.serving.and_then(|s| s.latency_milliseconds).is_some_and(|l| l >= 1500));
    link.set_delay(Duration::ZERO);
    fleet
        .md_where(0, "Operational again on a fast link", |m| {
            m.status.as_ref().is_some_and(|s| s.phase == DeploymentPhase::Operational)
        })
        .await;

    // 3.0.0 with a soak: Loading while the server answers ready, Operational after minReadySeconds.
    fleet.apply("3.0.0", serving(3, 120)).await;
    let (soak, soaked) = fleet.activation_to_operational("3.0.0").await;
    assert!(soaked, "Loading was seen while the server already answered ready");
    // The agent holds Operational ≥ 3 s after the first ready answer, which comes after activation;
    // both ends are seen through 20 ms polls of the API, hence the margin (without the soak: ~0.3 s).
    assert!(soak >= Duration::from_millis(2500), "Operational {soak:?} after activation, before minReadySeconds 3");
    fleet.serving("3.0.0").await;
    println!("activation → Operational: {no_soak:?} without minReadySeconds, {soak:?} with minReadySeconds 3");

    // 4.0.0: a file the server cannot load, with digests that are right. Failed on both nodes →
    // more than failureThreshold 1 → abort → auto-rollback to 3.0.0, which the servers serve.
    let mut corrupt = trained_model(&python, MODEL, "4.0.0", 4);
    corrupt[0].1 = b"not a model, digests notwithstanding".repeat(64);
    push_files(&repo, "4.0.0", cpu(), &corrupt).await;
    // Every status the deployments pass through is recorded from a watch: Failed lasts only until
    // the controller rolls the node back, which a poll could miss.
    let statuses = record_statuses(fleet.md_api());
    fleet.apply("4.0.0", serving(3, 8)).await;
    support::eventually("the rollout rolled back", T, || async {
        let s = api.get(MODEL).await.ok()?.status?;
        (s.phase == RolloutPhase::RolledBack && s.aborted_version.as_deref() == Some("4.0.0")).then_some(())
    })
    .await;
    for agent in &fleet.agents {
        let seen = statuses.lock().unwrap().clone();
        let failed = seen
            .iter()
            .find(|(node, version, s)| *node == agent.node && version == "4.0.0" && s.phase == DeploymentPhase::Failed);
        let (_, _, st) = failed.unwrap_or_else(|| panic!("{} Failed on 4.0.0; seen: {seen:#?}", agent.node));
        let msg = st.message.clone().unwrap_or_default();
        assert_eq!(st.reason, Some(peat::api::BlockerReason::DeploymentFailed));
        assert!(msg.contains("version 4.0.0 not served within readyTimeoutSeconds 8"), "{msg}");
        assert!(msg.contains("POST /v2/repository/models/iris/load answered 500"), "the server's refusal: {msg}");
    }
    for (i, server) in servers.iter().enumerate() {
        fleet
            .md_where(i, "3.0.0 Operational again", |m| {
                let s = m.status.clone().unwrap_or_default();
                m.spec.version == "3.0.0"
                    && s.phase == DeploymentPhase::Operational
                    && s.serving.is_some_and(|v| v.ready && v.version == "3.0.0")
            })
            .await;
        assert_eq!(server.ready("3.0.0").await, Some(200));
        assert_eq!(server.infer().await, "3.0.0", "the previous version serves again");
    }
    drop(link);
    drop(controller);
}
