//! The user's path on a real node: the chart's pods run on a real kubelet (containerd + runc),
//! from the image `make image` builds, in a network namespace of the test's own
//! (`peat_testenv::node`). One test, in order, because each step stands on the one before:
//! 1. `helm install` with the image: controller Deployment and agent DaemonSet Ready, the agent's
//!    ModelNode published from its pod;
//! 2. `peat push`, a ModelRollout, the agent pod pulls into its hostPath store, Converged;
//! 3. an inference pod (busybox, non-root, read-only) scheduled by `models.peat.dev/<model>` reads
//!    the files through the documented hostPath mount and checks their digests; a pod with the CSI
//!    volume waits (FailedMount, saying why) until the model is active, then reads it; a pod under
//!    Pod Security `restricted` reads it through the CSI volume and sees the upgrade switch it;
//! 4. an upgrade by delta and a rollback, each read by a new inference pod;
//! 5. the leader controller pod killed: the other replica takes the Lease, a new rollout converges;
//! 6. `helm upgrade` with changed values;
//! 7. `spec.serving` through the CSI consumers: a pod serving the volume over HTTP (busybox httpd,
//!    Pod Security `restricted`) gates Operational through an upgrade; deleted, the node is
//!    Degraded and counted staged, not serving;
//! 8. MLServer (PyPI) in a pod that mounts the model with the CSI driver: the agent has it load
//!    each version, Operational once it reports that version ready; then the documented uninstall;
//!
//! and at the end, the node torn down with nothing left (processes, mounts, cgroups, namespace).

mod support;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use peat::api::{DeploymentPhase, ModelDeployment, ModelNode, ModelRollout, RolloutPhase};
use peat_testenv::netns::machine_state;
use peat_testenv::node::{ClusterNetwork, RealCluster, leftovers};
use peat_testenv::{Binaries, Lifetime, blob_bytes_in_access_log, pseudo_random};
use sha2::{Digest, Sha256};

const NODE: &str = "peat-node";
const NS: &str = "peat-system";
const RELEASE: &str = "peat";
const MODEL: &str = "demo";
/// The model MLServer serves in step 8 (trained here, scikit-learn).
const IRIS: &str = "iris";
const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(180);

struct Run {
    cluster: RealCluster,
    client: kube::Client,
    store: PathBuf,
    started: Instant,
}

fn output(mut cmd: Command, stdin: Option<&str>) -> (bool, String) {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes()).expect("writing stdin");
    }
    let out = child.wait_with_output().expect("waiting for a command");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

impl Run {
    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.cluster.command(&self.cluster.env.binaries.kubectl);
        cmd.args(args);
        let (ok, text) = output(cmd, stdin);
        assert!(ok, "kubectl {}: {text}", args.join(" "));
        text
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_in(args, None)
    }

    fn apply(&self, manifest: &serde_json::Value) {
        self.kubectl_in(&["apply", "-f", "-"], Some(&manifest.to_string()));
    }

    fn helm(&self, args: &[&str]) -> String {
        let mut cmd = self.cluster.command(&self.cluster.env.binaries.helm);
        cmd.args(args).current_dir(support::repo_root());
        let (ok, text) = output(cmd, None);
        assert!(ok, "helm {}: {text}", args.join(" "));
        text
    }

    fn step(&self, what: &str) {
        eprintln!("[real-node {:>6.1?}] {what}", self.started.elapsed());
    }

    /// Blob bytes the registry has served so far (its access log).
    fn registry_blob_bytes(&self) -> u64 {
        blob_bytes_in_access_log(
            &std::fs::read_to_string(self.cluster.env.dir.join("logs/registry.log")).unwrap_or_default(),
        )
    }

    async fn deployment_ready(&self, name: &str, replicas: i32) {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), NS);
        eventually(&format!("Deployment {name}: {replicas} replicas Ready and up to date"), || async {
            let d = api.get(name).await.ok()?;
            let s = d.status?;
            let generation_seen = s.observed_generation == d.metadata.generation;
            (generation_seen
                && s.ready_replicas.unwrap_or(0) == replicas
                && s.updated_replicas.unwrap_or(0) == replicas
                && s.replicas.unwrap_or(0) == replicas)
                .then_some(())
        })
        .await;
    }

    async fn daemonset_ready(&self, name: &str) {
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), NS);
        eventually(&format!("DaemonSet {name}: one pod Ready and up to date"), || async {
            let d = api.get(name).await.ok()?;
            let s = d.status?;
            (s.observed_generation == d.metadata.generation
                && s.desired_number_scheduled == 1
                && s.number_ready == 1
                && s.updated_number_scheduled == Some(1)
                && s.number_available == Some(1))
            .then_some(())
        })
        .await;
    }

    async fn converged(&self, name: &str, version: &str) {
        let api: Api<ModelRollout> = Api::namespaced(self.client.clone(), "default");
        eventually(&format!("rollout {name} Converged on {version}"), || async {
            let r = api.get(name).await.ok()?;
            let s = r.status?;
            (s.observed_generation == r.metadata.generation
                && r.spec.version == version
                && s.phase == RolloutPhase::Converged
                && s.converged == 1
                && s.total_nodes == 1)
                .then_some(())
        })
        .await;
    }

    fn rollout(&self, name: &str, model: &str, version: &str) {
        self.apply(&serde_json::json!({
            "apiVersion": "peat.dev/v1alpha1",
            "kind": "ModelRollout",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "model": model,
                "version": version,
                "source": {"repository": format!("{}/models/{model}", self.cluster.env.registry), "insecure": true},
                "scope": {"all": {}},
            },
        }));
    }

    /// Runs a busybox pod, non-root with a read-only root, scheduled by the node's
    /// `models.peat.dev/<model>=<version>` label, that checks each file of the model's `current`
    /// version through the documented read-only mount of the store against its digest.
    async fn inference_pod_reads(&self, pod: &str, version: &str, files: &[(&str, Vec<u8>)]) {
        let check: String = files.iter().map(|(f, b)| format!("{:x}  {f}\\n", Sha256::digest(b))).collect();
        let script = format!(
            "cd /models/{MODEL}/current && /bin/busybox sha256sum {names} && printf '{check}' | /bin/busybox sha256sum -c -",
            names = files.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(" "),
        );
        // Scheduled by the label, reading the documented hostPath mount of the store.
        let affinity = serde_json::json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": format!("models.peat.dev/{MODEL}"), "operator": "In", "values": [version]}]},
        ]}}});
        let volume = serde_json::json!({"hostPath": {"path": self.store.join("models"), "type": "Directory"}});
        self.reader_pod(pod, "default", &script, "Never", ("/models", volume), Some(affinity));
        let phase = eventually(&format!("pod {pod} to finish"), || async {
            self.pod_phase("default", pod).await.filter(|p| p == "Succeeded" || p == "Failed")
        })
        .await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        let logs = self.kubectl(&["logs", "-n", "default", pod]);
        assert_eq!(phase, "Succeeded", "the inference pod read other bytes than pushed: {logs}");
        for (f, _) in files {
            assert!(logs.contains(&format!("{f}: OK")), "{f} not checked: {logs}");
        }
        pods.delete(pod, &DeleteParams::default()).await.expect("deleting the inference pod");
    }

    /// The controller pods whose `/metrics` say they lead (read at their pod IPs, on the node's bridge).
    async fn controllers_leading(&self) -> Vec<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let lp = kube::api::ListParams::default().labels("app.kubernetes.io/component=controller");
        let mut leading = Vec::new();
        for p in pods.list(&lp).await.expect("listing controller pods") {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("a Ready pod has an IP");
            let (code, body) = peat_testenv::http_get(&format!("{ip}:8080"), "/metrics").await.expect("metrics");
            assert_eq!(code, 200);
            if body.lines().any(|l| l.starts_with("peat_controller_leader ") && l.ends_with(" 1")) {
                leading.push(p.metadata.name.unwrap_or_default());
            }
        }
        leading
    }

    /// A busybox pod (restricted-compliant: non-root, read-only root, no capabilities) that mounts
    /// `volume` read-only at its path and runs `script`.
    fn reader_pod(
        &self,
        pod: &str,
        namespace: &str,
        script: &str,
        restart: &str,
        (path, volume): (&str, serde_json::Value),
        affinity: Option<serde_json::Value>,
    ) {
        let mut volume = volume;
        volume["name"] = "model".into();
        self.apply(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": namespace},
            "spec": {
                "restartPolicy": restart,
                // busybox sh ignores SIGTERM: do not wait 30 s for it at deletion.
                "terminationGracePeriodSeconds": 1,
                "affinity": affinity,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "inference",
                    "image": self.cluster.busybox_image,
                    "command": ["/bin/busybox", "sh", "-c", script],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "model", "mountPath": path, "readOnly": true}],
                }],
                "volumes": [volume],
            },
        }));
    }

    /// A [`Run::reader_pod`] with the model mounted by the CSI driver at /model.
    fn csi_pod(&self, pod: &str, namespace: &str, script: &str, restart: &str) {
        let volume = serde_json::json!({"csi": {"driver": "models.peat.dev", "readOnly": true, "volumeAttributes": {"model": MODEL}}});
        self.reader_pod(pod, namespace, script, restart, ("/model", volume), None);
    }

    /// Waits until the restricted `reader` pod's last line is the digest of `files`' model.onnx.
    async fn reader_sees(&self, version: &str, files: &[(&str, Vec<u8>)]) {
        let hex = format!("{:x}", Sha256::digest(&files[0].1));
        eventually(&format!("the restricted pod to read {version} through the CSI volume"), || async {
            let mut cmd = self.cluster.command(&self.cluster.env.binaries.kubectl);
            cmd.args(["logs", "-n", "restricted", "reader", "--tail=1"]);
            output(cmd, None).1.contains(&hex).then_some(())
        })
        .await;
    }

    /// Waits until the rollout of `model` counts its node serving `version` (its consumers answer
    /// ready for it); the node's deployment then.
    async fn serving_on(&self, model: &str, version: &str) -> ModelDeployment {
        let api: Api<ModelRollout> = Api::namespaced(self.client.clone(), "default");
        let mds: Api<ModelDeployment> = Api::namespaced(self.client.clone(), "default");
        eventually(&format!("rollout {model} served on {version}"), || async {
            let r = api.get(model).await.ok()?;
            let s = r.status?;
            let md = mds.list(&Default::default()).await.ok()?.items.into_iter().find(|m| m.spec.model == model)?;
            let ok = s.observed_generation == r.metadata.generation
                && r.spec.version == version
                && s.phase == RolloutPhase::Converged
                && s.serving == 1
                && md.status.as_ref().is_some_and(|m| m.phase == DeploymentPhase::Operational);
            ok.then_some(md)
        })
        .await
    }

    /// Points the `demo` rollout at `version`.
    fn set_version(&self, version: &str) {
        self.set_model_version(MODEL, version);
    }

    /// Points the rollout of `model` at `version`.
    fn set_model_version(&self, model: &str, version: &str) {
        let patch = format!(r#"{{"spec":{{"version":"{version}"}}}}"#);
        self.kubectl(&["patch", "mr", model, "-n", "default", "--type=merge", "-p", &patch]);
    }

    /// Waits until the node's deployment of `model` has a status `pred` accepts; its message.
    async fn md_message(&self, model: &str, pred: impl Fn(&peat::api::ModelDeploymentStatus) -> bool) -> String {
        let mds: Api<ModelDeployment> = Api::namespaced(self.client.clone(), "default");
        eventually(&format!("the deployment of {model} in the awaited state"), || async {
            let md = mds.list(&Default::default()).await.ok()?.items.into_iter().find(|m| m.spec.model == model)?;
            md.status.filter(|s| pred(s)).map(|s| s.message.unwrap_or_default())
        })
        .await
    }

    /// MLServer in a pod, on port 8080, serving the model `iris` it mounts with the CSI driver at
    /// /model (its repository: /model/current). The host's Python and MLServer's virtualenv are
    /// mounted read-only at their own paths, with /usr and the library directories.
    fn mlserver_pod(&self, pod: &str, python: &Path) {
        let venv = python.parent().and_then(Path::parent).expect("a virtualenv");
        let base = Command::new(python).args(["-c", "import sys; print(sys.base_prefix)"]).output().expect("python");
        let base = String::from_utf8_lossy(&base.stdout).trim().to_string();
        let mut host_dirs: Vec<String> =
            vec!["/usr".into(), "/lib".into(), "/lib64".into(), venv.display().to_string()];
        if !base.starts_with("/usr/") {
            host_dirs.push(base);
        }
        let mut volumes = vec![
            serde_json::json!({"name": "model", "csi": {"driver": "models.peat.dev", "readOnly": true, "volumeAttributes": {"model": IRIS}}}),
            serde_json::json!({"name": "tmp", "emptyDir": {}}),
        ];
        let mut mounts = vec![
            serde_json::json!({"name": "model", "mountPath": "/model", "readOnly": true}),
            serde_json::json!({"name": "tmp", "mountPath": "/tmp"}),
        ];
        for (i, dir) in host_dirs.iter().enumerate() {
            volumes
                .push(serde_json::json!({"name": format!("host{i}"), "hostPath": {"path": dir, "type": "Directory"}}));
            mounts.push(serde_json::json!({"name": format!("host{i}"), "mountPath": dir, "readOnly": true}));
        }
        let env: Vec<serde_json::Value> = [
            ("MLSERVER_HTTP_PORT", "8080"),
            ("MLSERVER_GRPC_PORT", "8081"),
            ("MLSERVER_METRICS_ENDPOINT", ""),
            ("MLSERVER_LOAD_MODELS_AT_STARTUP", "false"),
            ("MLSERVER_PARALLEL_WORKERS", "0"),
            ("HOME", "/tmp"),
        ]
        .iter()
        .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
        .collect();
        self.apply(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": "default"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "mlserver",
                    "image": self.cluster.busybox_image,
                    "command": [venv.join("bin/mlserver").display().to_string(), "start", "/model/current"],
                    "env": env,
                    "volumeMounts": mounts,
                }],
                "volumes": volumes,
            },
        }));
    }

    async fn pod_phase(&self, namespace: &str, pod: &str) -> Option<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        pods.get(pod).await.ok()?.status?.phase
    }

    async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NS);
        leases.get("peat-controller").await.ok()?.spec?.holder_identity
    }

    /// Error lines, and lost-lease warnings, in the running peat pods' logs.
    fn pod_log_problems(&self) -> Vec<String> {
        let logs =
            self.kubectl(&["logs", "-n", NS, "-l", "app.kubernetes.io/name=peat-operator", "--prefix", "--tail=-1"]);
        logs.lines()
            .filter(|l| l.contains(r#""level":"ERROR""#) || l.contains("lost the lease"))
            .map(String::from)
            .collect()
    }

    /// On failure: what the pods said, for the test's output.
    fn dump_pod_logs(&self) {
        let mut cmd = self.cluster.command(&self.cluster.env.binaries.kubectl);
        cmd.args(["get", "pods", "-A", "-o", "wide"]);
        eprintln!("{}", output(cmd, None).1);
        for selector in ["app.kubernetes.io/component=controller", "app.kubernetes.io/component=agent"] {
            let mut cmd = self.cluster.command(&self.cluster.env.binaries.kubectl);
            cmd.args(["logs", "-n", NS, "-l", selector, "--tail=40", "--prefix", "--all-containers"]);
            eprintln!("{}", output(cmd, None).1);
        }
    }
}

/// The version an Open Inference Protocol server at `endpoint` says answered an inference of `iris`.
async fn infer(endpoint: &str) -> String {
    let url = format!("http://{endpoint}/v2/models/{IRIS}/infer");
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
    let answer = http
        .post(&url)
        .header("content-type", "application/json")
        .body(support::inference_request())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let text = answer.text().await.expect("an inference answer");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("an inference answer: {text}"));
    v["model_version"].as_str().unwrap_or_else(|| panic!("a model_version in {v}")).to_string()
}

/// The host pids of a container's processes (its id is in their cgroup paths).
fn processes_in_container(id: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(id)))
        .collect()
}

async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    support::eventually(what, WAIT, f).await
}

fn model_files(version: u8, seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    let mut weights = pseudo_random(seed, 8 * MIB);
    if version == 2 {
        // A fine-tune: 64 KiB changed in the middle.
        weights[4 * MIB..4 * MIB + 64 * 1024].copy_from_slice(&pseudo_random(seed + 100, 64 * 1024));
    }
    vec![("model.onnx", weights), ("config.json", format!("{{\"version\": {version}}}").into_bytes())]
}

async fn push(registry: &str, model: &str, version: &str, files: &[(&str, Vec<u8>)]) {
    let meta = peat::oci::push::VariantMeta {
        name: "int8-cpu".into(),
        precision: Some("int8".into()),
        providers: vec!["cpu".into()],
        min_gpu_memory: 0,
        arch: None,
        os: None,
    };
    support::push_files(&format!("{registry}/models/{model}"), version, meta, files).await;
}

async fn end_to_end(run: &mut Run) {
    let registry = run.cluster.env.registry.clone();
    // 1. The image, the chart, the pods.
    let image_dir = run.cluster.env.dir.join("images/peat");
    let peat = run.cluster.env.dir.join("peat");
    std::fs::copy(support::peat_binary(), &peat).expect("copying peat");
    // The debug build without its debug info stands in for the release one (same libraries).
    let strip = Command::new("strip").arg("--strip-debug").arg(&peat).status().expect("running strip");
    assert!(strip.success());
    let img = peat_testenv::image::build(&peat, &support::registrar_binary(), &image_dir, "amd64", "test")
        .expect("building the peat image");
    peat_testenv::image::push(&image_dir, &format!("{registry}/peat:test"), true)
        .await
        .expect("pushing the peat image");
    run.step(&format!("peat image pushed ({} bytes compressed)", img.layer_size));

    let installed = Instant::now();
    let store = run.store.display().to_string();
    run.helm(&[
        "install",
        RELEASE,
        "charts/peat-operator",
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        &format!("image.repository={registry}/peat"),
        "--set",
        "image.tag=test",
        "--set",
        &format!("agent.store={store}"),
        "--set",
        &format!("agent.kubeletDir={}", run.cluster.env.dir.join("kubelet").display()),
    ]);
    let name = format!("{RELEASE}-peat-operator");
    run.deployment_ready(&format!("{name}-controller"), 2).await;
    run.daemonset_ready(&format!("{name}-agent")).await;
    run.step(&format!("chart pods Ready {:.1?} after helm install", installed.elapsed()));
    let nodes: Api<ModelNode> = Api::all(run.client.clone());
    let published = eventually("the agent pod's ModelNode", || async {
        nodes.get(NODE).await.ok().and_then(|n| n.status).filter(|s| s.storage_available_bytes() > 0)
    })
    .await;
    assert_eq!(published.arch.as_deref(), Some("amd64"), "the agent in its pod read the node's arch");
    assert!(run.leader().await.is_some(), "a controller pod holds the Lease");
    // By their own metrics, exactly one controller pod leads, and it is the Lease's holder.
    let leading = eventually("the Lease holder alone to say it leads", || async {
        let (holder, leading) = (run.leader().await?, run.controllers_leading().await);
        (leading == [holder.clone()]).then_some(leading)
    })
    .await;
    let leading_again = run.controllers_leading().await;
    assert_eq!(leading_again, leading, "no second controller pod started leading");

    // 2. A model to the node; a pod that mounts it with the CSI driver waits for it, saying why.
    let v1 = model_files(1, 7);
    let check: String = v1.iter().map(|(f, b)| format!("{:x}  /model/current/{f}\\n", Sha256::digest(b))).collect();
    run.csi_pod("csi-waits", "default", &format!("printf '{check}' | /bin/busybox sha256sum -c -"), "Never");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(run.client.clone(), "default");
    let why = eventually("a FailedMount Event saying the model is not on the node", || async {
        let lp = kube::api::ListParams::default().fields("involvedObject.name=csi-waits");
        events
            .list(&lp)
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|e| e.message)
            .find(|m| m.contains("is not active on node"))
    })
    .await;
    assert_eq!(run.pod_phase("default", "csi-waits").await.as_deref(), Some("Pending"), "it waits: {why}");
    run.step("a pod with the CSI volume waits while the model is absent");
    push(&registry, MODEL, "1.0.0", &v1).await;
    let before = run.registry_blob_bytes();
    run.rollout(MODEL, MODEL, "1.0.0");
    run.converged(MODEL, "1.0.0").await;
    let install_bytes = run.registry_blob_bytes() - before;
    assert!(install_bytes >= v1[0].1.len() as u64, "the first pull moved the whole file: {install_bytes} bytes");
    let current = run.store.join(format!("models/{MODEL}/current"));
    assert_eq!(std::fs::read(current.join("model.onnx")).expect("the model in the hostPath store"), v1[0].1);
    run.step("1.0.0 converged: the agent pod wrote its hostPath store");

    // 3. Used from a pod.
    run.inference_pod_reads("infer-v1", "1.0.0", &v1).await;
    run.step("an inference pod read 1.0.0 through the mount");
    let phase = eventually("the waiting CSI pod to run once the model is there", || async {
        run.pod_phase("default", "csi-waits").await.filter(|p| p == "Succeeded" || p == "Failed")
    })
    .await;
    let logs = run.kubectl(&["logs", "-n", "default", "csi-waits"]);
    assert_eq!(phase, "Succeeded", "the CSI volume holds the model's bytes: {logs}");
    // Under Pod Security `restricted` (no hostPath allowed): a pod that keeps reading the model.
    run.apply(&serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "restricted",
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}));
    run.csi_pod(
        "reader",
        "restricted",
        "while true; do /bin/busybox sha256sum /model/current/model.onnx; /bin/busybox sleep 1; done",
        "Always",
    );
    run.reader_sees("1.0.0", &v1).await;
    run.step("the CSI pod started once the model was active and read it; so does a pod under Pod Security restricted");

    // 4. Upgrade by delta, roll back without bytes.
    let v2 = model_files(2, 7);
    push(&registry, MODEL, "2.0.0", &v2).await;
    let before = run.registry_blob_bytes();
    run.set_version("2.0.0");
    run.converged(MODEL, "2.0.0").await;
    let upgrade_bytes = run.registry_blob_bytes() - before;
    assert!(upgrade_bytes >= 64 * 1024, "the upgrade fetched at least the changed bytes: {upgrade_bytes}");
    assert!(
        upgrade_bytes < (v2[0].1.len() / 4) as u64,
        "the upgrade moved {upgrade_bytes} bytes for 64 KiB changed in {} (a delta moves far less than the file)",
        v2[0].1.len()
    );
    run.inference_pod_reads("infer-v2", "2.0.0", &v2).await;
    run.reader_sees("2.0.0", &v2).await;
    run.step(&format!("upgraded to 2.0.0 by delta: {upgrade_bytes} blob bytes for an 8 MiB file; a pod read it"));
    let before = run.registry_blob_bytes();
    run.set_version("1.0.0");
    run.converged(MODEL, "1.0.0").await;
    assert_eq!(run.registry_blob_bytes() - before, 0, "a rollback to a kept version moves no bytes");
    run.inference_pod_reads("infer-rollback", "1.0.0", &v1).await;
    run.step("rolled back to 1.0.0 without a byte; a pod read it");

    // 5. The leader's pod killed (SIGKILL: no chance to hand the Lease over, as when its node
    // dies), then removed: the other replica leads once the Lease expires, a new rollout converges.
    let leader = run.leader().await.expect("a leader");
    let pods: Api<Pod> = Api::namespaced(run.client.clone(), NS);
    let pod = pods.get(&leader).await.expect("the leader's pod");
    let container = pod.status.and_then(|s| s.container_statuses).and_then(|c| c.into_iter().next()?.container_id);
    let container = container.expect("the leader's container id");
    let id = container.rsplit("://").next().expect("runtime://id");
    let killed = Instant::now();
    let pids = processes_in_container(id);
    assert!(!pids.is_empty(), "no process of container {id} found");
    for pid in &pids {
        // SAFETY: kill(2) of the leader container's processes.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    pods.delete(&leader, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("removing the leader's pod");
    let next = eventually("another controller pod to take the Lease", || async {
        run.leader().await.filter(|l| *l != leader)
    })
    .await;
    run.step(&format!("leader {leader} killed; {next} took over after {:.1?}", killed.elapsed()));
    let other = model_files(1, 99);
    push(&registry, "other", "1.0.0", &other).await;
    run.rollout("other", "other", "1.0.0");
    run.converged("other", "1.0.0").await;
    run.deployment_ready(&format!("{name}-controller"), 2).await;
    run.step("a rollout converged under the new leader; the Deployment replaced the killed pod");

    // 6. helm upgrade with changed values, then the documented uninstall.
    run.helm(&[
        "upgrade",
        RELEASE,
        "charts/peat-operator",
        "--namespace",
        NS,
        "--reuse-values",
        "--set",
        "controller.replicas=1",
        "--set",
        "agent.keepVersions=3",
    ]);
    run.deployment_ready(&format!("{name}-controller"), 1).await;
    run.daemonset_ready(&format!("{name}-agent")).await;
    let agent = run.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=agent",
        "-o",
        "jsonpath={.items[*].spec.containers[0].args}",
    ]);
    assert!(agent.contains("--keep-versions=3"), "the agent pod runs with the upgraded values: {agent}");
    // The new agent pod adopts what is on disk: an upgrade to the kept 2.0.0 pulls nothing.
    let before = run.registry_blob_bytes();
    run.set_version("2.0.0");
    run.converged(MODEL, "2.0.0").await;
    assert_eq!(run.registry_blob_bytes() - before, 0, "the new agent pod found 2.0.0 kept on disk");
    run.step("helm upgrade: 1 controller, agents with --keep-versions=3, rollouts still converged");

    // 7. Serving through the CSI consumers: a pod that mounts the model and serves it over HTTP
    // (busybox httpd on the volume, under Pod Security restricted) gates Operational.
    run.kubectl(&["delete", "pod", "-n", "restricted", "reader", "--timeout=120s"]);
    let serving = r#"{"spec":{"serving":{"protocol":"HttpGet","endpoint":"Consumers","port":8080,"path":"/{version}/model.onnx","readyTimeoutSeconds":60}}}"#;
    run.kubectl(&["patch", "mr", MODEL, "-n", "default", "--type=merge", "-p", serving]);
    // Staged, not served: no pod serves it yet (the one that read it ran to its end).
    let waiting = run
        .md_message(MODEL, |s| {
            s.phase == DeploymentPhase::Loading
                && s.message.as_deref().is_some_and(|m| m.contains("no pod on this node mounts model demo"))
        })
        .await;
    assert!(waiting.contains("waiting for the model server to serve version 2.0.0"), "{waiting}");
    run.csi_pod("server", "restricted", "exec /bin/busybox httpd -f -p 8080 -h /model", "Always");
    let md = run.serving_on(MODEL, "2.0.0").await;
    let consumers = md.status.and_then(|s| s.serving).map(|s| s.consumers).unwrap_or_default();
    assert_eq!(consumers.len(), 1, "the one serving pod (the reader went): {consumers:?}");
    assert_eq!(consumers[0].name, "restricted/server");
    assert!(consumers[0].endpoint.as_deref().is_some_and(|e| e.starts_with("10.88.0.") && e.ends_with(":8080")));
    run.set_version("1.0.0");
    let switched = Instant::now();
    run.serving_on(MODEL, "1.0.0").await;
    run.step(&format!(
        "a pod serving the CSI volume gates Operational: 2.0.0, then 1.0.0 served {:.1?} after the switch",
        switched.elapsed()
    ));
    run.kubectl(&["delete", "pod", "-n", "restricted", "server", "--timeout=120s"]);
    let api: Api<ModelRollout> = Api::namespaced(run.client.clone(), "default");
    let mds: Api<ModelDeployment> = Api::namespaced(run.client.clone(), "default");
    let msg = eventually("Degraded once no pod serves the model", || async {
        let md = mds.list(&Default::default()).await.ok()?.items.into_iter().find(|m| m.spec.model == MODEL)?;
        let s = md.status?;
        (s.phase == DeploymentPhase::Degraded).then_some(s.message.unwrap_or_default())
    })
    .await;
    assert!(msg.contains("no longer served") && msg.contains("no pod on this node mounts model demo"), "{msg}");
    eventually("the rollout to count the node staged, not serving", || async {
        let s = api.get(MODEL).await.ok()?.status?;
        (s.serving == 0 && s.staged == 1).then_some(())
    })
    .await;
    run.step("the serving pod deleted: Degraded, staged not serving");

    // 8. A real Open Inference Protocol server as the consumer: MLServer (PyPI, its scikit-learn
    // runtime) in a pod that mounts the model with the CSI driver. Its Python comes from the host
    // (hostPath, read-only): no image of it is built here.
    let python = support::mlserver_python(&run.cluster.env.binaries.mlserver);
    for (version, seed) in [("1.0.0", 1), ("2.0.0", 2)] {
        push(&registry, IRIS, version, &support::trained_model(&python, IRIS, version, seed)).await;
    }
    run.rollout(IRIS, IRIS, "1.0.0");
    let oip = r#"{"spec":{"serving":{"protocol":"OpenInference","port":8080,"readyTimeoutSeconds":120,"minReadySeconds":2}}}"#;
    run.kubectl(&["patch", "mr", IRIS, "-n", "default", "--type=merge", "-p", oip]);
    // Active on disk, and Loading because nothing serves it yet (the first probe may not have run).
    let waiting = run
        .md_message(IRIS, |s| {
            s.phase == DeploymentPhase::Loading
                && s.active_version.as_deref() == Some("1.0.0")
                && s.message.as_deref().is_some_and(|m| !m.contains("no probe of the model server yet"))
        })
        .await;
    assert!(waiting.contains("no pod on this node mounts model iris"), "{waiting}");
    run.mlserver_pod("mlserver", &python);
    let md = run.serving_on(IRIS, "1.0.0").await;
    let endpoint = md.status.and_then(|s| s.serving).and_then(|s| s.consumers.first()?.endpoint.clone());
    let endpoint = endpoint.expect("the MLServer pod's endpoint");
    assert_eq!(infer(&endpoint).await, "1.0.0", "MLServer serves what the agent reported");
    run.set_model_version(IRIS, "2.0.0");
    let switched = Instant::now();
    run.serving_on(IRIS, "2.0.0").await;
    let served = switched.elapsed();
    assert_eq!(infer(&endpoint).await, "2.0.0");
    run.step(&format!(
        "MLServer in a pod with the CSI volume: loaded and served 1.0.0, then 2.0.0 Operational {served:.1?} after the change (minReadySeconds 2)"
    ));
    run.kubectl(&["delete", "pod", "-n", "default", "mlserver", "--timeout=120s"]);
    let problems = run.pod_log_problems();
    assert!(problems.is_empty(), "the pods logged errors or a lost lease on the happy path:\n{}", problems.join("\n"));

    run.kubectl(&["delete", "pod", "-n", "default", "csi-waits", "--timeout=120s"]);
    run.kubectl(&["delete", "modelrollouts", "--all", "-A", "--timeout=120s"]);
    run.helm(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout=120s"]);
    eventually("every pod of the release to go", || async {
        pods.list(&Default::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    let crds = run.kubectl(&["get", "crd", "-o", "name"]);
    assert!(crds.contains("modelrollouts.peat.dev"), "helm leaves the CRDs, as documented: {crds}");
    // 1.0.0: the serving step's last version.
    assert_eq!(std::fs::read(current.join("model.onnx")).expect("the store stays after uninstall (Retain)"), v1[0].1);
    run.step("uninstalled: pods gone, CRDs and the node's active model stay");
}

#[test]
fn the_chart_runs_on_a_real_node_from_install_to_uninstall() {
    let binaries = Binaries::ensure(&support::repo_root()).expect("building the environment's binaries");
    // What a node may change outside its own directories (kernel settings, fixed directories,
    // network namespaces): the same after its teardown.
    let machine_before = machine_state();
    let started = Instant::now();
    let net = ClusterNetwork::create(NODE).expect("creating the node's network namespace");
    // This thread, and the runtime's threads made from it, live in the node's network.
    net.enter().expect("entering the node's network namespace");
    let name = net.name().to_string();
    let dir = support::repo_root().join(format!("target/testenv/real-node-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let cluster = RealCluster::start(binaries, &dir, net, Lifetime::TiedToThisProcess)
            .await
            .unwrap_or_else(|e| panic!("starting the real node: {e}"));
        let env_ready = started.elapsed();
        let client = cluster.env.client().await.expect("a client");
        let store = dir.join("store");
        let mut run = Run { cluster, client, store, started };
        run.step(&format!("node Ready {env_ready:.1?} after the environment's start"));
        let result = std::panic::AssertUnwindSafe(end_to_end(&mut run)).catch_unwind().await;
        if let Err(panic) = result {
            run.dump_pod_logs();
            let logs = support::repo_root().join("target/testenv-logs/real-node");
            run.cluster.stop_keeping_logs(&logs);
            eprintln!("the node's logs are in {}", logs.display());
            std::panic::resume_unwind(panic);
        }
        run.step("end to end done; tearing down");
        let torn_down = Instant::now();
        run.cluster.stop();
        run.step(&format!("torn down in {:.1?}", torn_down.elapsed()));
    });
    let left = leftovers(&name, &dir);
    assert!(left.is_empty(), "the node left things behind:\n{}", left.join("\n"));
    assert_eq!(machine_state(), machine_before, "the node changed the machine");
    assert!(!Path::new(&dir).exists(), "the environment's directory is gone");
}
