//! A real local environment for tests and `make env`: etcd, kube-apiserver, kube-controller-manager
//! and a plain-HTTP OCI registry (Debian's `docker-registry`) on free 127.0.0.1 ports.
//!
//! The binaries are built once per machine by `scripts/testenv-build.sh` (from the Go module proxy)
//! and cached outside the repo. Two lifetimes:
//! - [`Lifetime::TiedToThisProcess`] (tests): every process gets `PR_SET_PDEATHSIG`, so it dies with
//!   the test binary even when a test panics or the run is killed; no orphan etcd after `make test`.
//! - [`Lifetime::Detached`] (`make env`): the processes run in their own session after the starter
//!   exits; [`stop_detached`] ends them from the pid file.

mod certs;
pub mod demo;
mod error;
pub mod harness;
pub mod image;
pub mod netns;
pub mod node;
mod process;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

pub use error::TestEnvError;
use error::io;
pub use process::{Lifetime, ManagedProcess};

/// Where the environment's binaries are (the `KEY=path` output of `scripts/testenv-build.sh`).
#[derive(Clone, Debug)]
pub struct Binaries {
    /// etcd 3.6.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
    /// kubectl of the same version.
    pub kubectl: PathBuf,
    /// helm.
    pub helm: PathBuf,
    /// oras (ORAS compatibility test, pull benchmark).
    pub oras: PathBuf,
    /// Debian's docker-registry.
    pub registry: PathBuf,
    /// MLServer (PyPI, in a virtualenv whose `python` has scikit-learn): tests/serving.rs.
    pub mlserver: PathBuf,
    /// What a real node runs (`node::RealCluster`).
    pub node: netns::NodeBinaries,
}

impl Binaries {
    /// Runs the build script (a no-op once everything is cached) and reads where it put things.
    pub fn ensure(repo_root: &Path) -> Result<Binaries, TestEnvError> {
        let script = repo_root.join("scripts/testenv-build.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg("all")
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(io(format!("running {}", script.display())))?;
        if !out.status.success() {
            return Err(TestEnvError::Build(format!("{} exited with {}", script.display(), out.status)));
        }
        let vars: BTreeMap<String, PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), PathBuf::from(v.trim())))
            .collect();
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .filter(|p| p.exists())
                .ok_or_else(|| TestEnvError::Build(format!("the build script gave no usable {k}")))
        };
        Ok(Binaries {
            etcd: get("ETCD")?,
            kube_apiserver: get("KUBE_APISERVER")?,
            kube_controller_manager: get("KUBE_CONTROLLER_MANAGER")?,
            kubectl: get("KUBECTL")?,
            helm: get("HELM")?,
            oras: get("ORAS")?,
            mlserver: get("MLSERVER")?,
            registry: get("REGISTRY")?,
            node: netns::NodeBinaries {
                kube_scheduler: get("KUBE_SCHEDULER")?,
                kubelet: get("KUBELET")?,
                kube_proxy: get("KUBE_PROXY")?,
                pause: get("PAUSE")?,
                containerd: get("CONTAINERD")?,
                ctr: get("CTR")?,
                runc: get("RUNC")?,
                busybox: get("BUSYBOX")?,
                cni_bin_dir: get("CNI_BIN_DIR")?,
            },
        })
    }
}

/// Deterministic incompressible bytes (xorshift64), for test, benchmark and demo models.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory for certificates, data, logs, kubeconfig and `env.sh` (created; removed by `stop`).
    pub dir: PathBuf,
    /// How long the processes live.
    pub lifetime: Lifetime,
    /// Start kube-controller-manager (garbage collection, namespaces, service accounts).
    pub controller_manager: bool,
    /// Install the peat CRDs and wait for them to be Established.
    pub install_crds: bool,
    /// Run as the control plane of a real node (`node::RealCluster`): every process in the
    /// node's network namespace, serving on the node IP, with the authorizers, admission plugins
    /// and controllers that pods need. The caller's thread must have entered that namespace.
    pub cluster: Option<netns::ClusterNetwork>,
}

/// A running environment.
#[derive(Debug)]
pub struct TestEnv {
    /// Its state directory.
    pub dir: PathBuf,
    /// Admin kubeconfig (client certificate in group system:masters).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub apiserver_url: String,
    /// `127.0.0.1:<port>` of the plain-HTTP registry.
    pub registry: String,
    /// Directory the registry stores blobs in (tests tamper with it).
    pub registry_storage: PathBuf,
    /// The binaries it runs.
    pub binaries: Binaries,
    /// The processes, in start order.
    pub processes: Vec<ManagedProcess>,
    /// The cluster network it runs in, if any.
    pub cluster: Option<netns::ClusterNetwork>,
    pki: certs::Pki,
}

/// A port on 127.0.0.1 free at the time of asking.
pub fn free_port() -> Result<u16, TestEnvError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

const READY_TIMEOUT: Duration = Duration::from_secs(90);

impl TestEnv {
    /// Starts everything and waits until it serves.
    pub async fn start(binaries: Binaries, opts: Options) -> Result<TestEnv, TestEnvError> {
        let dir = std::path::absolute(&opts.dir).map_err(io("resolving the state directory"))?;
        std::fs::create_dir_all(dir.join("logs")).map_err(io(format!("creating {}", dir.display())))?;
        let net = opts.cluster.clone();
        let pki = match &net {
            Some(net) => certs::write_pki(&dir.join("pki"), &net.apiserver_names(), Some(&net.node_name))?,
            None => certs::write_pki(&dir.join("pki"), &[], None)?,
        };
        let mut env = TestEnv {
            kubeconfig: dir.join("kubeconfig"),
            apiserver_url: String::new(),
            registry: String::new(),
            registry_storage: dir.join("registry"),
            dir: dir.clone(),
            binaries,
            processes: Vec::new(),
            cluster: net.clone(),
            pki: pki.clone(),
        };
        // Where the API server and the registry serve: the node IP in a cluster (pods reach them
        // there), loopback otherwise.
        let host = net.as_ref().map_or("127.0.0.1".to_string(), |n| n.node_ip.clone());
        // On any failure below, `env` is dropped and stops what it started.
        let etcd_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        env.spawn(
            "etcd",
            &env.binaries.etcd.clone(),
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                "--listen-peer-urls=http://localhost:0".into(),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            opts.lifetime,
        )?;
        env.wait_http("etcd", &format!("127.0.0.1:{etcd_port}"), "/health", "\"health\":\"true\"").await?;

        let api_port = free_port()?;
        env.apiserver_url = format!("https://{host}:{api_port}");
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", pki.dir.display()),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--secure-port={api_port}"),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            "--service-account-issuer=https://peat-testenv.invalid".into(),
            format!("--service-account-key-file={}", pki.sa_pub.display()),
            format!("--service-account-signing-key-file={}", pki.sa_key.display()),
            "--allow-privileged=true".into(),
        ];
        match &net {
            None => args.extend([
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--endpoint-reconciler-type=none".into(),
            ]),
            // Pods: projected service-account tokens (ServiceAccount admission), kubelets confined
            // to their node (Node authorizer, NodeRestriction), the `kubernetes` Service's
            // endpoint at the node IP, logs and exec through the kubelet.
            Some(n) => args.extend([
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={}", n.node_ip),
                format!("--service-cluster-ip-range={}", n.service_cidr),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--kubelet-client-certificate={}", pki.admin_cert.display()),
                // The node IP, not its name: a name lookup would ask the machine's resolver.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-client-key={}", pki.admin_key.display()),
            ]),
        }
        env.spawn("kube-apiserver", &env.binaries.kube_apiserver.clone(), &args, opts.lifetime)?;
        certs::write_kubeconfig(&env.kubeconfig, &env.apiserver_url, &pki)?;
        env.wait_apiserver().await?;

        // CRDs before kube-controller-manager: its garbage collector picks up new resource types
        // only on its 30 s discovery resync, so CRDs installed later would be collected late.
        if opts.install_crds {
            env.install_crds().await?;
        }
        if opts.controller_manager {
            let controllers = match &net {
                None => "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token".to_string(),
                // Deployments, ReplicaSets, DaemonSets, node lifecycle, endpoints…: all of them,
                // each with its own service account as in a real cluster.
                Some(_) => "--controllers=*".to_string(),
            };
            let mut args = vec![
                format!("--kubeconfig={}", env.kubeconfig.display()),
                controllers,
                format!("--service-account-private-key-file={}", pki.sa_key.display()),
                format!("--root-ca-file={}", pki.ca_cert.display()),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--concurrent-gc-syncs=5".into(),
            ];
            if net.is_some() {
                args.push("--use-service-account-credentials".into());
            }
            env.spawn("kube-controller-manager", &env.binaries.kube_controller_manager.clone(), &args, opts.lifetime)?;
        }

        let registry_port = free_port()?;
        env.registry = format!("{host}:{registry_port}");
        let registry_config = dir.join("registry.yml");
        write_registry_config(&registry_config, &env.registry_storage, &env.registry)?;
        env.spawn(
            "registry",
            &env.binaries.registry.clone(),
            &["serve".into(), registry_config.display().to_string()],
            opts.lifetime,
        )?;
        env.wait_http("registry", &env.registry.clone(), "/v2/", "{}").await?;

        env.write_state_files(opts.lifetime)?;
        Ok(env)
    }

    fn spawn(&mut self, name: &str, bin: &Path, args: &[String], lifetime: Lifetime) -> Result<(), TestEnvError> {
        self.spawn_with_env(name, bin, args, &[], lifetime)
    }

    /// Starts a process of the environment (in its network namespace, if it has one).
    fn spawn_with_env(
        &mut self,
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        lifetime: Lifetime,
    ) -> Result<(), TestEnvError> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let netns = self.cluster.as_ref().map(|c| c.netns_fd());
        let p = ManagedProcess::spawn_in(name, bin, args, env, &log, lifetime, netns)
            .map_err(io(format!("starting {name}")))?;
        self.processes.push(p);
        Ok(())
    }

    fn not_ready(&mut self, name: &str, why: String) -> TestEnvError {
        not_ready(&self.dir, name, why)
    }

    fn exited(&mut self, name: &str) -> Option<String> {
        let p = self.processes.iter_mut().find(|p| p.name == name)?;
        p.try_exit_status().map(|s| format!("it exited ({s})"))
    }

    /// Polls `probe` until it says ready; fails fast when the process exits, and after READY_TIMEOUT.
    async fn wait_ready<F, Fut>(&mut self, name: &str, what: &str, mut probe: F) -> Result<(), TestEnvError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(why) = self.exited(name) {
                return Err(self.not_ready(name, why));
            }
            if probe().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.not_ready(name, format!("{what} not ready within {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a plain-HTTP endpoint answers 200 with `expect` in the body.
    async fn wait_http(&mut self, name: &str, addr: &str, path: &str, expect: &str) -> Result<(), TestEnvError> {
        let url = format!("http://{addr}{path}");
        self.wait_ready(name, &url, || async {
            matches!(http_get(addr, path).await, Ok((200, body)) if body.contains(expect))
        })
        .await
    }

    async fn wait_apiserver(&mut self) -> Result<(), TestEnvError> {
        let client = self.client().await?;
        self.wait_ready("kube-apiserver", "/readyz", || async {
            let req = http::Request::get("/readyz").body(Vec::new()).expect("static request");
            client.request_text(req).await.is_ok_and(|body| body.trim() == "ok")
        })
        .await
    }

    /// Starts `peat ARGS…` (`peat` the binary at `peat`) against this environment as `name`,
    /// with `RUST_LOG=rust_log` and its output in `log`; it dies with this process.
    pub fn spawn_peat(
        &self,
        peat: &Path,
        name: &str,
        args: &[String],
        rust_log: &str,
        log: &Path,
    ) -> std::io::Result<ManagedProcess> {
        let envs = [
            ("KUBECONFIG".to_string(), self.kubeconfig.display().to_string()),
            ("RUST_LOG".to_string(), rust_log.to_string()),
        ];
        ManagedProcess::spawn_with_env(name, peat, args, &envs, log, Lifetime::TiedToThisProcess)
    }

    /// An admin client.
    pub async fn client(&self) -> Result<kube::Client, TestEnvError> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Applies the peat CRDs (server-side) and waits until each is Established.
    pub async fn install_crds(&self) -> Result<(), TestEnvError> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let pp = PatchParams::apply("peat-testenv").force();
        for crd in peat::api::crds() {
            let name = crd.metadata.name.clone().expect("generated CRDs are named");
            api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
        }
        for crd in peat::api::crds() {
            let name = crd.metadata.name.clone().expect("generated CRDs are named");
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(60), established)
                .await
                .map_err(|_| TestEnvError::CrdNotEstablished(name.clone()))?
                .map_err(|e| TestEnvError::Build(format!("waiting for {name}: {e}")))?;
        }
        Ok(())
    }

    fn write_state_files(&self, lifetime: Lifetime) -> Result<(), TestEnvError> {
        let kube_bin = self.binaries.kubectl.parent().unwrap_or(Path::new("/"));
        let helm_dir = self.dir.join("bin");
        std::fs::create_dir_all(&helm_dir).map_err(io("creating bin/"))?;
        let helm_link = helm_dir.join("helm");
        let _ = std::fs::remove_file(&helm_link);
        std::os::unix::fs::symlink(&self.binaries.helm, &helm_link).map_err(io("linking helm"))?;
        let inside = self.cluster.as_ref().map_or(String::new(), |c| {
            format!("# Its addresses exist only inside network namespace {0}: ip netns exec {0} bash\n", c.name())
        });
        let env_sh = format!(
            "# peat test environment (make env); source it: . {dir}/env.sh\n{inside}\
             export KUBECONFIG={kc}\n\
             export PEAT_REGISTRY={reg}\n\
             export PEAT_ENV_DIR={dir}\n\
             export PATH={kube_bin}:{helm_dir}:$PATH\n",
            dir = self.dir.display(),
            kc = self.kubeconfig.display(),
            reg = self.registry,
            kube_bin = kube_bin.display(),
            helm_dir = helm_dir.display(),
        );
        std::fs::write(self.dir.join("env.sh"), env_sh).map_err(io("writing env.sh"))?;
        if lifetime == Lifetime::Detached {
            let pids: String =
                self.processes.iter().map(|p| format!("{} {} {}\n", p.pid(), p.name, p.binary.display())).collect();
            std::fs::write(self.dir.join("pids"), pids).map_err(io("writing the pid file"))?;
        }
        Ok(())
    }

    /// Leaves the processes running after this value is gone (for `make env`).
    pub fn detach(mut self) {
        for p in self.processes.drain(..) {
            p.forget();
        }
    }

    /// Stops every process (SIGTERM, then SIGKILL) and removes the state directory.
    pub fn stop(&mut self) {
        for p in self.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        self.processes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Like [`TestEnv::stop`], first copying the processes' logs (complete by then) into `to`.
    pub fn stop_keeping_logs(&mut self, to: &Path) {
        for p in self.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        if std::fs::create_dir_all(to).is_ok() {
            for entry in std::fs::read_dir(self.dir.join("logs")).into_iter().flatten().flatten() {
                let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
            }
        }
        self.stop();
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !self.processes.is_empty() {
            self.stop();
        }
    }
}

/// `name` of the environment in `dir` did not get ready (`why`): with the end of its log.
pub(crate) fn not_ready(dir: &Path, name: &str, why: String) -> TestEnvError {
    let log = dir.join("logs").join(format!("{name}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    TestEnvError::NotReady {
        name: name.into(),
        why,
        log: log.display().to_string(),
        tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    }
}

/// Whether a detached environment in `dir` is running: the pids of its processes that are alive.
pub fn detached_status(dir: &Path) -> Vec<(u32, String)> {
    process::read_pid_file(&dir.join("pids"))
        .into_iter()
        .filter(|(pid, _, bin)| process::is_alive(*pid, bin))
        .map(|(pid, name, _)| (pid, name))
        .collect()
}

/// Stops a detached environment: every process of its pid file, then removes `dir`. Returns what it stopped.
pub fn stop_detached(dir: &Path) -> Vec<String> {
    let mut stopped = Vec::new();
    let mut entries = process::read_pid_file(&dir.join("pids"));
    entries.reverse();
    for (pid, name, bin) in entries {
        if process::is_alive(pid, &bin) {
            process::terminate(pid, &bin, Duration::from_secs(10));
            stopped.push(format!("{name} (pid {pid})"));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    stopped
}

fn write_registry_config(path: &Path, storage: &Path, addr: &str) -> Result<(), TestEnvError> {
    write_secured_registry_config(path, storage, addr, "")
}

/// The registry's config; `extra` is appended (it may continue the closing `http:` section).
fn write_secured_registry_config(path: &Path, storage: &Path, addr: &str, extra: &str) -> Result<(), TestEnvError> {
    std::fs::create_dir_all(storage).map_err(io("creating the registry's storage"))?;
    // The access log (one line per request with the bytes sent) lets tests count bytes on the wire.
    std::fs::write(
        path,
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: peat-testenv\n{extra}",
            storage.display(),
        ),
    )
    .map_err(io("writing the registry's config"))
}

/// What a registry of its own demands of its clients.
#[derive(Clone, Debug, Default)]
pub struct RegistrySecurity {
    /// Users (name, password) in an htpasswd file (bcrypt): every request must authenticate.
    pub users: Vec<(String, String)>,
    /// Serve HTTPS with a certificate for 127.0.0.1 from a CA of its own (`Registry::ca_pem`).
    pub tls: bool,
}

/// A registry of its own (for tests that stop it or tamper with its storage): same binary and
/// config as the environment's, on a free port that survives a restart.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Its storage directory.
    pub storage: PathBuf,
    /// Its log, with the access log lines.
    pub log: PathBuf,
    /// PEM of the CA that signed its serving certificate (with `RegistrySecurity::tls`).
    pub ca_pem: Option<String>,
    config: PathBuf,
    binary: PathBuf,
    process: Option<ManagedProcess>,
}

impl Registry {
    /// Starts a registry with its state under `dir`, tied to this process.
    pub async fn start(binary: &Path, dir: &Path) -> Result<Registry, TestEnvError> {
        Registry::start_secured(binary, dir, RegistrySecurity::default()).await
    }

    /// Starts a registry that requires credentials and/or serves TLS.
    pub async fn start_secured(
        binary: &Path,
        dir: &Path,
        security: RegistrySecurity,
    ) -> Result<Registry, TestEnvError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut r = Registry {
            storage: dir.join("storage"),
            log: dir.join("registry.log"),
            config: dir.join("registry.yml"),
            binary: binary.to_path_buf(),
            addr,
            ca_pem: None,
            process: None,
        };
        let mut extra = String::new();
        if security.tls {
            // Under the config's closing `http:` section.
            let (ca, cert, key) = certs::write_registry_tls(&dir.join("tls"))?;
            extra.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
            r.ca_pem = Some(ca);
        }
        if !security.users.is_empty() {
            let htpasswd = dir.join("htpasswd");
            let mut lines = String::new();
            for (user, password) in &security.users {
                let hash = bcrypt::hash(password, 4).map_err(|e| TestEnvError::Build(format!("bcrypt: {e}")))?;
                lines.push_str(&format!("{user}:{hash}\n"));
            }
            std::fs::write(&htpasswd, lines).map_err(io("writing the htpasswd file"))?;
            extra.push_str(&format!("auth:\n  htpasswd:\n    realm: peat-test\n    path: {}\n", htpasswd.display()));
        }
        write_secured_registry_config(&r.config, &r.storage, &r.addr, &extra)?;
        r.restart().await?;
        Ok(r)
    }

    /// Stops it (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again on the same port and storage; waits until it serves.
    pub async fn restart(&mut self) -> Result<(), TestEnvError> {
        self.stop();
        let p = ManagedProcess::spawn(
            "registry",
            &self.binary,
            &["serve".into(), self.config.display().to_string()],
            &self.log,
            Lifetime::TiedToThisProcess,
        )
        .map_err(io("starting the registry"))?;
        self.process = Some(p);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // Any HTTP answer: 200, 401 when it requires credentials, 400 to plain HTTP on a TLS port.
            if let Ok((200 | 400 | 401, _)) = http_get(&self.addr, "/v2/").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestEnvError::NotReady {
                    name: "registry".into(),
                    why: format!("no answer on {} within {READY_TIMEOUT:?}", self.addr),
                    log: self.log.display().to_string(),
                    tail: std::fs::read_to_string(&self.log).unwrap_or_default(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Bytes of blob content it has sent so far (GETs of `/blobs/`, from its access log).
    pub fn blob_bytes_served(&self) -> u64 {
        blob_bytes_in_access_log(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// Sums the response sizes of blob GETs in a registry access log (combined log format).
pub fn blob_bytes_in_access_log(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let after = l.split("HTTP/1.1\" ").nth(1)?;
            let mut parts = after.split_whitespace();
            let status: u16 = parts.next()?.parse().ok()?;
            let bytes: u64 = parts.next()?.parse().ok()?;
            matches!(status, 200 | 206).then_some(bytes)
        })
        .sum()
}

/// A minimal HTTP/1.0 GET for plain-HTTP readiness checks (etcd, the registry, admin endpoints).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}
