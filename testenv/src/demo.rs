//! `make demo`: the main job end to end on a private local environment (DESIGN.md §2).
//!
//! Starts etcd, kube-apiserver and a registry of its own, pushes a generated model (2 versions ×
//! 2 variants) with `peat push`, registers three differently capable arm64 nodes each played by a
//! `peat agent` behind a bandwidth cap, runs `peat controller`, applies `examples/rollout.yaml`,
//! and follows it with `kubectl peat status --watch` through install, a delta upgrade and a
//! rollback. Every step is a real command, printed before it runs. A watch on the
//! ModelDeployments times each node from "told" to "active". Everything it started is torn down
//! when it ends or on Ctrl-C (the caller drops the future); the logs stay in `<dir>/logs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::HumanBytes;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use thiserror::Error;
use tokio::sync::Notify;

use super::{Binaries, Lifetime, ManagedProcess, Options, TestEnv, TestEnvError, pseudo_random};
use peat::api::{DeploymentPhase, ModelDeployment, ModelNode};

/// The model the example rolls out, and the namespace it lives in.
const MODEL: &str = "target-recognition";
const NAMESPACE: &str = "default";
/// The version `examples/rollout.yaml` names, and the one the demo upgrades to.
const FIRST: &str = "4.2.1";
const SECOND: &str = "4.3.0";
/// Marks a directory the demo made, so `--demo-dir` never clears anything else.
const MARKER: &str = ".peat-demo";
/// The stages: what each is called in the summary, and the version it rolls to.
const STAGES: [(&str, &str); 3] = [("install", FIRST), ("upgrade", SECOND), ("rollback", FIRST)];
/// How long one stage (install, upgrade, rollback) may take before the demo gives up loudly.
const STAGE_TIMEOUT: Duration = Duration::from_secs(180);

/// Errors of the demo, each naming the step that failed.
#[derive(Debug, Error)]
pub enum DemoError {
    /// Starting the environment failed.
    #[error(transparent)]
    Env(#[from] TestEnvError),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status})")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A step did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// The end state is not what the demo promised.
    #[error("{0}")]
    NotConverged(String),
    /// `--demo-dir` names a directory the demo did not make.
    #[error("{0} exists and is not a demo work directory (it has no {MARKER}); choose another --demo-dir")]
    NotADemoDir(String),
    /// SIGINT or SIGTERM.
    #[error("{0}")]
    Interrupted(&'static str),
    /// The API server refused or failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// Where the demo works and what it runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The repository root (for `scripts/testenv-build.sh` and `examples/rollout.yaml`).
    pub repo_root: PathBuf,
    /// Working directory (replaced at start; only `logs/` stays afterwards).
    pub dir: PathBuf,
    /// The `peat` binary.
    pub peat: PathBuf,
}

/// One demo node: what the agent reports, and its link.
struct DemoNode {
    name: &'static str,
    gpu_memory: &'static str,
    providers: &'static str,
    link: &'static str,
    storage: &'static str,
}

/// Three arm64 boxes the example's scope (arm64, ≥ 4 GiB of GPU memory) all matches, but which get
/// different variants: the fp16-cuda variant needs 6 GiB of GPU memory, so the smallest gets int8-cpu.
const NODES: [DemoNode; 3] = [
    DemoNode { name: "edge-orin-1", gpu_memory: "32Gi", providers: "cuda,tensorrt,cpu", link: "32Mi", storage: "8Gi" },
    DemoNode { name: "edge-xavier-2", gpu_memory: "8Gi", providers: "cuda,cpu", link: "16Mi", storage: "4Gi" },
    DemoNode { name: "edge-nano-3", gpu_memory: "4Gi", providers: "cuda,cpu", link: "8Mi", storage: "2Gi" },
];

/// One variant of the generated model: its push flags and its weights' size.
struct DemoVariant {
    name: &'static str,
    push_flags: &'static [&'static str],
    weights_mib: u64,
}

const VARIANTS: [DemoVariant; 2] = [
    DemoVariant {
        name: "fp16-cuda",
        push_flags: &[
            "--precision",
            "float16",
            "--providers",
            "cuda",
            "--min-gpu-memory",
            "6Gi",
            "--platform",
            "linux/arm64",
        ],
        weights_mib: 48,
    },
    DemoVariant {
        name: "int8-cpu",
        push_flags: &["--precision", "int8", "--providers", "cpu", "--platform", "linux/arm64"],
        weights_mib: 24,
    },
];

/// What one node did in one stage.
#[derive(Clone, Debug, Default)]
struct NodeStage {
    started: Option<Instant>,
    finished: Option<Instant>,
    variant: String,
    fetched: i64,
    reused: i64,
}

/// The stage in progress (an index into [`STAGES`]); results by (stage, node).
#[derive(Default)]
struct Timings {
    stage: Option<usize>,
    by_node: BTreeMap<(usize, String), NodeStage>,
}

/// A stage under way: its index into [`STAGES`], and when its command ran.
struct Stage {
    index: usize,
    started: Instant,
}

fn header(step: usize, text: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m==> {step}/7 {text}\x1b[0m");
    } else {
        println!("\n==> {step}/7 {text}");
    }
}

fn show_command(cmd: &[&str]) {
    println!("$ {}", cmd.join(" "));
    let _ = std::io::stdout().flush();
}

/// The work directory: made (or cleared, when it is one of ours) at start; on drop everything but
/// `logs/` and the marker is removed, whatever step the demo reached.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(dir: &Path) -> Result<WorkDir, DemoError> {
        let foreign = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_some() && !dir.join(MARKER).exists(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
        };
        if foreign {
            return Err(DemoError::NotADemoDir(dir.display().to_string()));
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("clearing the demo directory")(e)),
            _ => {}
        }
        for d in ["logs", "bin", "stores", "model"] {
            std::fs::create_dir_all(dir.join(d)).map_err(io(format!("creating {d}/")))?;
        }
        std::fs::write(dir.join(MARKER), "made by peat-testenv demo; cleared by its next run\n")
            .map_err(io("writing the marker"))?;
        Ok(WorkDir(dir.to_path_buf()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let (name, path) = (entry.file_name(), entry.path());
            if name == "logs" || name == MARKER {
                continue;
            }
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// The running demo's pieces. [`Demo::shutdown`] takes them down in order.
struct Demo {
    opts: DemoOptions,
    env: TestEnv,
    /// `PATH` for the commands it runs: `peat`, `kubectl-peat`, kubectl.
    path: String,
    client: kube::Client,
    timings: Arc<Mutex<Timings>>,
    changed: Arc<Notify>,
    processes: Vec<ManagedProcess>,
    watch: Option<tokio::task::JoinHandle<()>>,
    /// Last: cleared after the processes are gone.
    _work: WorkDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
        // Agents and controller first, while the API server they talk to still runs.
        for p in self.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(5));
        }
        // The environment's own logs (etcd, kube-apiserver, registry) would go with its directory.
        self.env.stop_keeping_logs(&self.opts.dir.join("logs").join("env"));
    }
}

impl Demo {
    /// Closes the demo's own watch (an open watch holds kube-apiserver's graceful shutdown up),
    /// then stops agents, controller and environment off the runtime. A second Ctrl-C or SIGTERM
    /// meanwhile exits at once: the processes are tied to this one and die with it.
    async fn shutdown(mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
            let _ = w.await;
        }
        let teardown = tokio::task::spawn_blocking(move || drop(self));
        tokio::select! {
            _ = teardown => {}
            _ = interrupted() => {
                eprintln!("second signal: killing everything at once (the next run clears the files)");
                std::process::exit(130);
            }
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted (Ctrl-C)",
        Some(_) = async { term.as_mut()?.recv().await } => "terminated (SIGTERM)",
    }
}

/// Runs the demo to its summary (returned as text, already printed). On Ctrl-C or SIGTERM it
/// stops what it started and returns [`DemoError::Interrupted`].
pub async fn run(opts: DemoOptions) -> Result<String, DemoError> {
    let mut slot = None;
    let result = tokio::select! {
        biased;
        why = interrupted() => Err(DemoError::Interrupted(why)),
        r = steps(opts, &mut slot) => r,
    };
    // A command killed by the same Ctrl-C may finish first; it is the interruption all the same.
    let result = match result {
        Err(DemoError::Command { status, .. })
            if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGINT) =>
        {
            Err(DemoError::Interrupted("interrupted (Ctrl-C)"))
        }
        other => other,
    };
    if let Err(DemoError::Interrupted(why)) = &result {
        eprintln!("\n{why}: stopping the agents, the controller and the environment (again to kill at once) …");
    }
    if let Some(demo) = slot.take() {
        demo.shutdown().await;
    }
    result
}

async fn steps(opts: DemoOptions, slot: &mut Option<Demo>) -> Result<String, DemoError> {
    let started = Instant::now();
    let work = WorkDir::create(&opts.dir)?;
    println!(
        "peat-operator demo: {MODEL} on three differently capable arm64 nodes\n\
         (work directory {}; logs stay in its logs/; Ctrl-C tears everything down)",
        opts.dir.display()
    );

    header(1, "local environment: etcd, kube-apiserver and an OCI registry on 127.0.0.1");
    // Off the runtime's one thread, so a Ctrl-C during a first (long) build is seen as one.
    let root = opts.repo_root.clone();
    let binaries = tokio::task::spawn_blocking(move || Binaries::ensure(&root))
        .await
        .map_err(|e| DemoError::Io { what: "building the environment".into(), source: std::io::Error::other(e) })??;
    let bin = opts.dir.join("bin");
    for link in ["peat", "kubectl-peat"] {
        std::os::unix::fs::symlink(&opts.peat, bin.join(link)).map_err(io(format!("linking {link}")))?;
    }
    let kube_bin = binaries.kubectl.parent().unwrap_or(Path::new("/")).to_path_buf();
    let path = format!("{}:{}:{}", bin.display(), kube_bin.display(), std::env::var("PATH").unwrap_or_default());
    let t = Instant::now();
    let env = TestEnv::start(
        binaries,
        Options {
            dir: opts.dir.join("env"),
            lifetime: Lifetime::TiedToThisProcess,
            controller_manager: false,
            install_crds: true,
            cluster: None,
        },
    )
    .await?;
    println!(
        "    API server {}, registry {}, peat CRDs installed ({:.1} s)",
        env.apiserver_url,
        env.registry,
        t.elapsed().as_secs_f64()
    );
    let client = env.client().await?;
    let demo = slot.insert(Demo {
        opts,
        env,
        path,
        client,
        timings: Arc::default(),
        changed: Arc::default(),
        processes: Vec::new(),
        watch: None,
        _work: work,
    });

    header(2, "a generated model: 2 versions × 2 variants, pushed with `peat push`");
    demo.push_model().await?;

    header(3, "three nodes, each played by a `peat agent` behind a bandwidth cap; the controller");
    demo.start_nodes_and_controller().await?;

    header(4, &format!("roll out {FIRST}: examples/rollout.yaml"));
    let repository = format!("{}/models/{MODEL}", demo.env.registry);
    let example = demo.opts.repo_root.join("examples/rollout.yaml");
    let manifest = std::fs::read_to_string(&example).map_err(io(format!("reading {}", example.display())))?;
    let rollout = demo.opts.dir.join("rollout.yaml");
    std::fs::write(&rollout, local_rollout(&manifest, &repository)).map_err(io("writing rollout.yaml"))?;
    println!(
        "    {}: examples/rollout.yaml with source.repository {repository}, insecure (plain HTTP)",
        rollout.display()
    );
    println!(
        "    its scope (arm64, at least 4 GiB of GPU memory) takes all three nodes; fp16-cuda needs 6 GiB,\n    \
         so edge-nano-3 gets int8-cpu; at most 25% of the targets (one node) download at once"
    );
    let stage = demo.begin_stage(0);
    demo.command(&["kubectl", "apply", "-f", &rollout.display().to_string()]).await?;
    demo.finish_stage(stage).await?;

    header(5, &format!("upgrade to {SECOND}: each node fetches only the chunks that changed"));
    let patch = format!(r#"{{"spec":{{"version":"{SECOND}"}}}}"#);
    let stage = demo.begin_stage(1);
    demo.command(&["kubectl", "patch", "modelrollout", MODEL, "--type", "merge", "-p", &patch]).await?;
    demo.finish_stage(stage).await?;

    header(6, &format!("roll back to {FIRST}: the kept version is switched to, no bytes move"));
    let stage = demo.begin_stage(2);
    demo.command(&["kubectl", "peat", "rollback", MODEL]).await?;
    demo.finish_stage(stage).await?;

    header(7, "summary");
    let summary = demo.summary(started)?;
    print!("{summary}");
    Ok(summary)
}

/// `examples/rollout.yaml` pointed at the local registry.
fn local_rollout(example: &str, repository: &str) -> String {
    example
        .lines()
        .map(|l| match l.trim_start().strip_prefix("repository:") {
            Some(_) => {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}repository: {repository}\n{indent}insecure: true\n")
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// Writes one variant of one version: `model.onnx` (weights), `config.json`, `labels.txt`.
/// The second version rewrites three 1 MiB stretches of the weights (a fine-tune touches
/// some tensors) and the config; `labels.txt` is the same everywhere.
fn write_variant(dir: &Path, variant: &DemoVariant, seed: u64, version: &str) -> Result<(), DemoError> {
    const MIB: usize = 1 << 20;
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut weights = pseudo_random(seed, variant.weights_mib as usize * MIB);
    if version == SECOND {
        let n = weights.len();
        for (i, at) in [n / 8, n / 2, n * 7 / 8].into_iter().enumerate() {
            weights[at..at + MIB].copy_from_slice(&pseudo_random(seed ^ (0xD1FF + i as u64), MIB));
        }
    }
    let config = format!(
        "{{\"model\": \"{MODEL}\", \"version\": \"{version}\", \"variant\": \"{}\", \"inputs\": [1, 3, 640, 640]}}\n",
        variant.name
    );
    let labels: String = (0..2000).map(|i| format!("class-{i:04}\n")).collect();
    for (name, bytes) in
        [("model.onnx", weights.as_slice()), ("config.json", config.as_bytes()), ("labels.txt", labels.as_bytes())]
    {
        std::fs::write(dir.join(name), bytes).map_err(io(format!("writing {name}")))?;
    }
    Ok(())
}

impl Demo {
    fn tokio_command(&self, argv: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.env.kubeconfig)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        cmd
    }

    /// Runs a command with the demo's PATH and kubeconfig, output to the terminal.
    async fn command(&self, argv: &[&str]) -> Result<(), DemoError> {
        show_command(argv);
        let status = self.tokio_command(argv).status().await.map_err(io(format!("running {}", argv[0])))?;
        if !status.success() {
            return Err(DemoError::Command { command: argv.join(" "), status });
        }
        Ok(())
    }

    async fn push_model(&self) -> Result<(), DemoError> {
        let repository = format!("{}/models/{MODEL}", self.env.registry);
        for version in [FIRST, SECOND] {
            for (i, variant) in VARIANTS.iter().enumerate() {
                let dir = self.opts.dir.join("model").join(version).join(variant.name);
                write_variant(&dir, variant, 0x5EED + i as u64, version)?;
                let dir = dir.display().to_string();
                let mut argv = vec![
                    "peat",
                    "push",
                    &dir,
                    "--repository",
                    &repository,
                    "--version",
                    version,
                    "--variant",
                    variant.name,
                ];
                argv.extend(variant.push_flags);
                argv.push("--insecure");
                self.command(&argv).await?;
            }
        }
        Ok(())
    }

    /// Starts `peat ARGS…` in the background as `name` (log `logs/<name>.log`), printed as the
    /// command it is; stopped with the demo.
    fn start_peat(&mut self, name: &str, args: &[&str]) -> Result<(), DemoError> {
        let log = self.opts.dir.join("logs").join(format!("{name}.log"));
        println!("$ peat {} > {} 2>&1 &", args.join(" "), log.display());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let p = self
            .env
            .spawn_peat(&self.opts.peat, name, &args, "info,peat=debug", &log)
            .map_err(io(format!("starting {name}")))?;
        self.processes.push(p);
        Ok(())
    }

    async fn start_nodes_and_controller(&mut self) -> Result<(), DemoError> {
        // No kubelet here: the Node objects are made by hand, as each kubelet would register itself.
        let nodes_yaml: String = NODES
            .iter()
            .map(|n| {
                format!(
                    "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{kubernetes.io/arch: arm64, kubernetes.io/os: linux}}\n",
                    n.name
                )
            })
            .collect();
        let nodes_file = self.opts.dir.join("nodes.yaml");
        std::fs::write(&nodes_file, nodes_yaml).map_err(io("writing nodes.yaml"))?;
        self.command(&["kubectl", "apply", "-f", &nodes_file.display().to_string()]).await?;
        for n in &NODES {
            let store = self.opts.dir.join("stores").join(n.name).display().to_string();
            let args = [
                "agent",
                "--node-name",
                n.name,
                "--store",
                &store,
                "--arch",
                "arm64",
                "--gpus",
                "1",
                "--gpu-memory",
                n.gpu_memory,
                "--providers",
                n.providers,
                "--max-bandwidth",
                n.link,
                "--storage-capacity",
                n.storage,
                "--metrics-addr",
                "127.0.0.1:0",
                "--heartbeat-interval",
                "5s",
                "--progress-interval",
                "500ms",
            ];
            self.start_peat(&format!("agent-{}", n.name), &args)?;
        }
        self.start_peat(
            "controller",
            &["controller", "--metrics-addr", "127.0.0.1:0", "--lease-namespace", NAMESPACE],
        )?;

        // Wait for every agent's first heartbeat, so the controller plans with known capabilities.
        let model_nodes: Api<ModelNode> = Api::all(self.client.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = model_nodes.list(&ListParams::default()).await?;
            if list.items.iter().filter(|n| n.status.as_ref().is_some_and(|s| s.last_heartbeat.is_some())).count()
                == NODES.len()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(DemoError::Timeout(format!(
                    "the agents did not publish their ModelNodes within 60 s\n{}",
                    self.log_tails()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.command(&["kubectl", "peat", "nodes"]).await?;
        self.watch = Some(self.watch_deployments());
        Ok(())
    }

    /// Records, per stage and node, when the node was told the stage's version and when it ran it.
    fn watch_deployments(&self) -> tokio::task::JoinHandle<()> {
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        let timings = self.timings.clone();
        let changed = self.changed.clone();
        tokio::spawn(async move {
            let mut events =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff().applied_objects());
            while let Some(ev) = events.next().await {
                let Ok(md) = ev else { continue };
                let now = Instant::now();
                let mut t = timings.lock().expect("timings lock");
                let Some(stage) = t.stage else { continue };
                let version = STAGES[stage].1;
                if md.spec.version != version {
                    continue;
                }
                let entry = t.by_node.entry((stage, md.spec.node_name.clone())).or_default();
                entry.started.get_or_insert(now);
                let Some(st) = md.status.as_ref() else { continue };
                let active = st.phase == DeploymentPhase::Operational
                    && st.active_version.as_deref() == Some(version)
                    && st.observed_generation == md.metadata.generation;
                if active && entry.finished.is_none() {
                    entry.finished = Some(now);
                    entry.variant = md.spec.variant.clone();
                    entry.fetched = st.bytes_done;
                    entry.reused = st.bytes_reused;
                    changed.notify_waiters();
                }
            }
        })
    }

    /// Starts timing stage `index` (install, upgrade, rollback), before its command runs.
    fn begin_stage(&self, index: usize) -> Stage {
        self.timings.lock().expect("timings lock").stage = Some(index);
        Stage { index, started: Instant::now() }
    }

    /// Follows `kubectl peat status --watch` until the rollout converges, then waits until the
    /// watch here has seen each node run the version.
    async fn finish_stage(&self, stage: Stage) -> Result<(), DemoError> {
        let Stage { index, started } = stage;
        let version = STAGES[index].1;
        let watch = self.command(&["kubectl", "peat", "status", MODEL, "--watch"]);
        match tokio::time::timeout(STAGE_TIMEOUT, watch).await {
            Ok(Ok(())) => {}
            // The watch ends with status 1 when the rollout ends short of converging.
            Ok(Err(DemoError::Command { status, .. })) if status.code() == Some(1) => {
                return Err(DemoError::NotConverged(format!(
                    "{MODEL} did not converge on {version} (above: why)\n{}",
                    self.log_tails()
                )));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(DemoError::Timeout(format!(
                    "{MODEL} did not converge on {version} within {} s\n{}",
                    STAGE_TIMEOUT.as_secs(),
                    self.log_tails()
                )));
            }
        }
        // The status says Converged; the watch here sees the same objects a moment later at most.
        let all_done = async {
            loop {
                let notified = self.changed.notified();
                let done = {
                    let t = self.timings.lock().expect("timings lock");
                    NODES
                        .iter()
                        .all(|n| t.by_node.get(&(index, n.name.to_string())).is_some_and(|s| s.finished.is_some()))
                };
                if done {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all_done).await.map_err(|_| {
            DemoError::Timeout(format!("the rollout converged, but not every ModelDeployment showed {version} active"))
        })?;
        println!("    converged on {version} in {:.1} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The last lines of the controller's and agents' logs, for a failure message.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in &self.processes {
            let log = self.opts.dir.join("logs").join(format!("{}.log", p.name));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(out, "--- last lines of {} ---", log.display());
            for l in &lines[lines.len().saturating_sub(15)..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }

    /// The per-node table, and a check of what each node's store holds.
    fn summary(&self, started: Instant) -> Result<String, DemoError> {
        let t = self.timings.lock().expect("timings lock");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:<10} {:<8} {:>10} {:>10} {:>8}",
            "NODE", "STAGE", "VARIANT", "VERSION", "FETCHED", "REUSED", "TIME"
        );
        let mut upgrade = (0i64, 0i64);
        for n in &NODES {
            for (i, (stage, version)) in STAGES.iter().enumerate() {
                let s = t.by_node.get(&(i, n.name.to_string())).cloned().unwrap_or_default();
                let time = match (s.started, s.finished) {
                    (Some(a), Some(b)) => format!("{:.1} s", b.duration_since(a).as_secs_f64()),
                    _ => "-".into(),
                };
                if i == 1 {
                    upgrade = (upgrade.0 + s.fetched, upgrade.1 + s.reused);
                }
                let _ = writeln!(
                    out,
                    "{:<14} {:<9} {:<10} {:<8} {:>10} {:>10} {:>8}",
                    if i == 0 { n.name } else { "" },
                    stage,
                    s.variant,
                    version,
                    HumanBytes(s.fetched.max(0) as u64).to_string(),
                    HumanBytes(s.reused.max(0) as u64).to_string(),
                    time
                );
            }
        }
        let total = upgrade.0 + upgrade.1;
        if total > 0 {
            let _ = writeln!(
                out,
                "\nThe upgrade fetched {} and reused {} already on the nodes: {:.1}% of its bytes crossed the network.",
                HumanBytes(upgrade.0 as u64),
                HumanBytes(upgrade.1 as u64),
                100.0 * upgrade.0 as f64 / total as f64
            );
        }
        // What `current` points at on each node's disk: the ground truth behind the status.
        let mut active = Vec::new();
        for n in &NODES {
            let current = self.opts.dir.join("stores").join(n.name).join("models").join(MODEL).join("current");
            let target = std::fs::read_link(&current).map_err(io(format!("reading {}", current.display())))?;
            let version = target.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            active.push(format!("{}={version}", n.name));
            if version != FIRST {
                return Err(DemoError::NotConverged(format!("{} runs {version}, not {FIRST}", n.name)));
            }
        }
        let _ = writeln!(
            out,
            "Every node converged; each store's `current` is {FIRST} ({}).\nDemo done in {:.0} s; logs in {}.",
            active.join(", "),
            started.elapsed().as_secs_f64(),
            self.opts.dir.join("logs").display()
        );
        let _ = writeln!(
            out,
            "Here the nodes are processes. For the chart's pods on a real kubelet (containerd, kube-proxy, an\n\
             agent pod writing its hostPath store, an inference pod reading the model): make env NODE=1\n\
             (README, \"On a real node\"); tests/real_node.rs runs that path in make test."
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_pointed_at_the_local_registry_and_nothing_else_changes() {
        let example = "spec:\n  source:\n    repository: registry.example:5000/models/x\n  priority: High\n";
        let local = local_rollout(example, "127.0.0.1:5000/models/x");
        assert_eq!(
            local,
            "spec:\n  source:\n    repository: 127.0.0.1:5000/models/x\n    insecure: true\n  priority: High\n"
        );
    }

    #[test]
    fn the_second_version_changes_three_mebibytes_of_the_weights() {
        let dir = std::env::temp_dir().join(format!("peat-demo-unit-{}", std::process::id()));
        let v = &VARIANTS[1];
        write_variant(&dir.join("a"), v, 7, FIRST).unwrap();
        write_variant(&dir.join("b"), v, 7, SECOND).unwrap();
        let a = std::fs::read(dir.join("a/model.onnx")).unwrap();
        let b = std::fs::read(dir.join("b/model.onnx")).unwrap();
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(a.len(), b.len());
        // Random replacement bytes equal the old ones 1 time in 256.
        assert!((3 * (1 << 20) * 99 / 100..=3 << 20).contains(&differing), "{differing} bytes differ");
        assert_eq!(std::fs::read(dir.join("a/labels.txt")).unwrap(), std::fs::read(dir.join("b/labels.txt")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
