//! A real node: containerd + runc + kubelet + kube-proxy beside kube-scheduler and a
//! kube-controller-manager with every default controller, so the chart's pods really run.
//!
//! Everything runs inside a network namespace made here (`ip netns add peat-node-<pid>`): the node
//! IP, the pod CIDR with its CNI bridge, the service CIDR and kube-proxy's rules exist only there,
//! and nothing can leave it (besides loopback and the pods' veths, its only interfaces are a veth
//! pair with both ends inside). Its name is also
//! the node's state directory under `/run` (containerd's socket and state, pod network
//! namespaces). The caller's thread enters the namespace ([`ClusterNetwork::enter`]) before
//! starting, so its clients, the ports it picks and the processes it forks are inside.
//!
//! A kubelet leaves machine-wide state behind (`/kubepods` cgroups, mounts, shim sockets), so one
//! node runs at a time on a machine (a lock), a start first sweeps what a killed run left, and
//! [`RealCluster::stop`] removes it all; [`leftovers`] says what would still be there.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::error::{TestEnvError, io};
use crate::{Binaries, Lifetime, ManagedProcess, Options, TestEnv, certs, image};

/// The node IP, inside the namespace only.
pub const NODE_IP: &str = "10.201.0.2";
/// Pod addresses (the CNI bridge's subnet; its gateway is `.1`).
pub const POD_CIDR: &str = "10.88.0.0/24";
/// Service addresses; the `kubernetes` Service has the first.
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// Network namespaces (and `/run` state directories) of real nodes are named `peat-node-<pid>`.
pub const NETNS_PREFIX: &str = "peat-node-";
/// One real node per machine: cgroups, the kubelet's mounts and shim sockets are machine-wide.
const LOCK: &str = "/run/lock/peat-testenv-node.lock";
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a real node runs (from `scripts/testenv-build.sh`).
#[derive(Clone, Debug)]
pub struct NodeBinaries {
    /// kube-scheduler (DaemonSet and Deployment pods are bound by it).
    pub kube_scheduler: PathBuf,
    /// kubelet.
    pub kubelet: PathBuf,
    /// kube-proxy (pods reach the `kubernetes` Service through its rules).
    pub kube_proxy: PathBuf,
    /// The sandboxes' pause binary (static), built from the kubernetes module's source.
    pub pause: PathBuf,
    /// Debian's containerd.
    pub containerd: PathBuf,
    /// Its `ctr`.
    pub ctr: PathBuf,
    /// Debian's runc.
    pub runc: PathBuf,
    /// A static busybox, the test pods' image.
    pub busybox: PathBuf,
    /// The CNI plugins (bridge, host-local, portmap, loopback).
    pub cni_bin_dir: PathBuf,
}

#[derive(Debug)]
struct Netns {
    name: String,
    file: File,
    /// Left running on purpose (`make env NODE=1`).
    detached: std::sync::atomic::AtomicBool,
    /// Held while the namespace exists (flock, released when the process ends).
    _lock: File,
}

impl Drop for Netns {
    /// A start that failed half-way leaves nothing either.
    fn drop(&mut self) {
        if !self.detached.load(std::sync::atomic::Ordering::Relaxed) {
            teardown(&self.name, None);
        }
    }
}

/// A node's network namespace and addresses; cheap to clone.
#[derive(Clone, Debug)]
pub struct ClusterNetwork {
    netns: Arc<Netns>,
    /// The node's name (its kubelet's client certificate says `system:node:<name>`).
    pub node_name: String,
    /// [`NODE_IP`].
    pub node_ip: String,
    /// [`POD_CIDR`].
    pub pod_cidr: String,
    /// [`SERVICE_CIDR`].
    pub service_cidr: String,
}

fn run(cmd: &mut Command) -> Result<(), TestEnvError> {
    let out = cmd.output().map_err(io(format!("running {cmd:?}")))?;
    if !out.status.success() {
        return Err(TestEnvError::Build(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), TestEnvError> {
    run(Command::new("ip").args(args))
}

impl ClusterNetwork {
    /// Takes the machine's node lock (waiting for another run's node to go), sweeps what killed
    /// runs left, and creates the namespace with the node IP on a dummy interface. Fails when a
    /// node of `make env` still runs, or without root.
    pub fn create(node_name: &str) -> Result<ClusterNetwork, TestEnvError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(TestEnvError::Build("a real node needs root (network namespaces, cgroups, mounts)".into()));
        }
        std::fs::create_dir_all("/run/lock").map_err(io("creating /run/lock"))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .map_err(io(format!("opening {LOCK}")))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(format!("locking {LOCK}"))(std::io::Error::last_os_error()));
        }
        for name in node_namespaces() {
            if live(&name) {
                return Err(TestEnvError::Build(format!(
                    "a real node already runs in network namespace {name} (make env NODE=1?); stop it first (make env-down)"
                )));
            }
            teardown(&name, None);
        }
        let name = format!("{NETNS_PREFIX}{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let setup = || -> Result<(), TestEnvError> {
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            // A veth pair with both ends inside (this kernel has no dummy devices): the node IP on
            // one end, nothing on the other, so nothing leaves.
            ip(&["-n", &name, "link", "add", "node0", "type", "veth", "peer", "name", "node0-end"])?;
            ip(&["-n", &name, "addr", "add", &format!("{NODE_IP}/24"), "dev", "node0"])?;
            ip(&["-n", &name, "link", "set", "node0-end", "up"])?;
            ip(&["-n", &name, "link", "set", "node0", "up"])?;
            // Service addresses need a route before kube-proxy's DNAT; the other end drops the rest.
            ip(&["-n", &name, "route", "add", "default", "dev", "node0"])?;
            run(Command::new("ip").args(["netns", "exec", &name, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))
        };
        if let Err(e) = setup() {
            let _ = ip(&["netns", "delete", &name]);
            return Err(e);
        }
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).map_err(io(format!("opening {path}")))?;
        Ok(ClusterNetwork {
            netns: Arc::new(Netns { name, file, detached: false.into(), _lock: lock }),
            node_name: node_name.to_string(),
            node_ip: NODE_IP.into(),
            pod_cidr: POD_CIDR.into(),
            service_cidr: SERVICE_CIDR.into(),
        })
    }

    /// The namespace's name (`ip netns exec <name> …`).
    pub fn name(&self) -> &str {
        &self.netns.name
    }

    /// Moves the calling thread into the namespace: its sockets, and threads and processes it
    /// starts from then on, are inside.
    pub fn enter(&self) -> Result<(), TestEnvError> {
        // SAFETY: setns with a namespace descriptor we hold open.
        if unsafe { libc::setns(self.netns.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io(format!("entering network namespace {}", self.name()))(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Whether the calling thread is inside the namespace.
    pub fn entered(&self) -> bool {
        let here = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
        let ours = self.netns.file.metadata().map(|m| m.ino());
        matches!((here, ours), (Ok(a), Ok(b)) if a == b)
    }

    pub(crate) fn netns_fd(&self) -> RawFd {
        self.netns.file.as_raw_fd()
    }

    /// The node's `/run` state directory (containerd's socket and state, pod network namespaces).
    pub fn state_dir(&self) -> PathBuf {
        Path::new("/run").join(self.name())
    }

    /// Names the API server's certificate must carry: pods reach it as the `kubernetes` Service.
    pub(crate) fn apiserver_names(&self) -> Vec<String> {
        [
            self.node_ip.as_str(),
            KUBERNETES_SERVICE_IP,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// A control plane with one real node, all in a [`ClusterNetwork`].
pub struct RealCluster {
    /// The control plane and registry (at the node IP).
    pub env: TestEnv,
    /// Its network.
    pub net: ClusterNetwork,
    /// busybox (static) in the registry: `<registry>/busybox:peat-testenv`, entrypoint /bin/busybox.
    pub busybox_image: String,
    /// The kubelet's, containerd's, kube-proxy's and kube-scheduler's processes.
    node_processes: Vec<ManagedProcess>,
    stopped: bool,
}

impl std::fmt::Debug for RealCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealCluster").field("dir", &self.env.dir).field("netns", &self.net.name()).finish()
    }
}

impl RealCluster {
    /// Starts the control plane, the registry and the node in `net` (which the calling thread must
    /// have entered) and waits until the node is Ready.
    pub async fn start(
        binaries: Binaries,
        dir: &Path,
        net: ClusterNetwork,
        lifetime: Lifetime,
    ) -> Result<RealCluster, TestEnvError> {
        if !net.entered() {
            return Err(TestEnvError::Build(format!(
                "RealCluster::start runs on a thread outside network namespace {} (ClusterNetwork::enter first)",
                net.name()
            )));
        }
        let nb = binaries.node.clone();
        let env = TestEnv::start(
            binaries,
            Options {
                dir: dir.to_path_buf(),
                lifetime,
                controller_manager: true,
                install_crds: true,
                cluster: Some(net.clone()),
            },
        )
        .await?;
        let dir = env.dir.clone();
        let mut cluster = RealCluster {
            busybox_image: format!("{}/busybox:peat-testenv", env.registry),
            env,
            net,
            node_processes: Vec::new(),
            stopped: false,
        };
        std::fs::write(dir.join("node"), cluster.net.name()).map_err(io("writing the node's name"))?;
        let state = cluster.net.state_dir();
        std::fs::create_dir_all(&state).map_err(io(format!("creating {}", state.display())))?;
        // So that a later run's sweep finds the mounts of this one if it is killed.
        std::fs::write(state.join("env-dir"), dir.display().to_string()).map_err(io("writing env-dir"))?;

        // The pause image of the sandboxes and the test pods' busybox, from the registry.
        let registry = cluster.env.registry.clone();
        let pause_image = format!("{registry}/pause:peat-testenv");
        for (what, reference, file, path, entrypoint) in [
            ("pause", &pause_image, &nb.pause, "pause", "/pause"),
            ("busybox", &cluster.busybox_image, &nb.busybox, "bin/busybox", "/bin/busybox"),
        ] {
            let layout = dir.join("images").join(what);
            image::build_static(&[(path, file.as_path())], &[entrypoint], "0:0", &layout, "amd64", "peat-testenv")?;
            image::push(&layout, reference, true).await?;
        }

        let containerd_sock = state.join("containerd.sock");
        cluster.write_node_config(&nb, &pause_image, &containerd_sock)?;
        let env_dir = |p: &str| dir.join(p).display().to_string();
        cluster.spawn(
            "kube-scheduler",
            &cluster.env.binaries.node.kube_scheduler.clone(),
            &[
                format!("--kubeconfig={}", cluster.env.kubeconfig.display()),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
            ],
            lifetime,
        )?;
        cluster.spawn(
            "containerd",
            &nb.containerd,
            &[format!("--config={}", env_dir("containerd.toml")), "--log-level=info".into()],
            lifetime,
        )?;
        cluster.wait_for("containerd", || containerd_sock.exists()).await?;
        cluster.spawn(
            "kubelet",
            &nb.kubelet,
            &[
                format!("--config={}", env_dir("kubelet.yaml")),
                format!("--kubeconfig={}", env_dir("kubelet.kubeconfig")),
                format!("--root-dir={}", env_dir("kubelet")),
                format!("--hostname-override={}", cluster.net.node_name),
                format!("--node-ip={}", cluster.net.node_ip),
                "--v=1".into(),
            ],
            lifetime,
        )?;
        cluster.spawn(
            "kube-proxy",
            &nb.kube_proxy,
            &[
                format!("--kubeconfig={}", cluster.env.kubeconfig.display()),
                "--proxy-mode=iptables".into(),
                format!("--cluster-cidr={}", cluster.net.pod_cidr),
                format!("--hostname-override={}", cluster.net.node_name),
                // Not port 0: kube-proxy refuses it. Inside the namespace, so no clash.
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                // The VM's conntrack table is not ours to resize.
                "--conntrack-max-per-core=0".into(),
            ],
            lifetime,
        )?;
        cluster.wait_node_ready().await?;
        Ok(cluster)
    }

    fn write_node_config(&self, nb: &NodeBinaries, pause_image: &str, sock: &Path) -> Result<(), TestEnvError> {
        let dir = &self.env.dir;
        let state = self.net.state_dir();
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
            }
            std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))
        };
        let registry = &self.env.registry;
        // Plain HTTP to the node's own registry.
        write(
            &format!("containerd/certs.d/{registry}/hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        // restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc fails every sandbox
        // without it. Pod network namespaces under the node's /run directory, so teardown finds them.
        write(
            "containerd.toml",
            format!(
                r#"version = 2
root = "{root}"
state = "{state}/containerd"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under = "{state}/netns"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
        Root = "{state}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
                root = dir.join("containerd/root").display(),
                state = state.display(),
                sock = sock.display(),
                opt = dir.join("containerd/opt").display(),
                runc = nb.runc.display(),
                cni_bin = nb.cni_bin_dir.display(),
                cni_conf = dir.join("cni").display(),
                certs = dir.join("containerd/certs.d").display(),
            ),
        )?;
        write(
            "cni/10-peat.conflist",
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "1.0.0",
                "name": self.net.name(),
                "plugins": [
                    {
                        "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": self.net.pod_cidr}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": dir.join("cni-ipam").display().to_string(),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                ],
            }))
            .expect("json"),
        )?;
        let pki = &self.env.pki;
        let (cert, key) = pki.kubelet.clone().expect("a cluster's PKI has a kubelet certificate");
        certs::write_kubeconfig_for(
            &dir.join("kubelet.kubeconfig"),
            &self.env.apiserver_url,
            &pki.ca_cert,
            &cert,
            &key,
        )?;
        // No name servers: pods of the tests use addresses, and nothing may leave the namespace.
        write("resolv.conf", "# peat test node: no name servers\n".into())?;
        write(
            "kubelet.yaml",
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 (hybrid); kubelet 1.37 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
address: {node_ip}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
podCIDR: {pod_cidr}
resolvConf: {resolv}
podLogsDir: {logs}
serializeImagePulls: false
# A shared development disk: evict only when truly full.
evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
                sock = sock.display(),
                node_ip = self.net.node_ip,
                ca = pki.ca_cert.display(),
                pod_cidr = self.net.pod_cidr,
                resolv = dir.join("resolv.conf").display(),
                logs = dir.join("pod-logs").display(),
            ),
        )?;
        Ok(())
    }

    fn spawn(&mut self, name: &str, bin: &Path, args: &[String], lifetime: Lifetime) -> Result<(), TestEnvError> {
        let log = self.env.dir.join("logs").join(format!("{name}.log"));
        let p = ManagedProcess::spawn_in(name, bin, args, &[], &log, lifetime, Some(self.net.netns_fd()))
            .map_err(io(format!("starting {name}")))?;
        self.node_processes.push(p);
        Ok(())
    }

    fn failure(&mut self, name: &str, why: String) -> TestEnvError {
        let log = self.env.dir.join("logs").join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        TestEnvError::NotReady {
            name: name.into(),
            why,
            log: log.display().to_string(),
            tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
    }

    /// The first node process that exited, if any.
    fn exited(&mut self) -> Option<(String, String)> {
        self.node_processes
            .iter_mut()
            .find_map(|p| p.try_exit_status().map(|s| (p.name.clone(), format!("it exited ({s})"))))
    }

    async fn wait_for(&mut self, name: &str, mut ready: impl FnMut() -> bool) -> Result<(), TestEnvError> {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        while !ready() {
            if let Some((who, why)) = self.exited() {
                return Err(self.failure(&who, why));
            }
            if Instant::now() > deadline {
                return Err(self.failure(name, format!("not ready within {NODE_READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Waits until the kubelet has registered the node and it is Ready.
    pub async fn wait_node_ready(&mut self) -> Result<(), TestEnvError> {
        let nodes: Api<Node> = Api::all(self.env.client().await?);
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            let ready = nodes.get_opt(&self.net.node_name).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                return Ok(());
            }
            if let Some((who, why)) = self.exited() {
                return Err(self.failure(&who, why));
            }
            if Instant::now() > deadline {
                return Err(self.failure("kubelet", format!("node not Ready within {NODE_READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A command (kubectl, helm, …) with this cluster's kubeconfig; it runs inside the namespace
    /// when started from a thread that entered it.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("KUBECONFIG", &self.env.kubeconfig);
        c
    }

    /// Leaves everything running (`make env NODE=1`); `peat-testenv down` ends it
    /// ([`stop_detached`]).
    pub fn detach(mut self) -> Result<(), TestEnvError> {
        self.stopped = true;
        self.net.netns.detached.store(true, std::sync::atomic::Ordering::Relaxed);
        let pids: String =
            self.node_processes.iter().map(|p| format!("{} {} {}\n", p.pid(), p.name, p.binary.display())).collect();
        let pid_file = self.env.dir.join("pids");
        let mut all = std::fs::read_to_string(&pid_file).unwrap_or_default();
        all.push_str(&pids);
        std::fs::write(&pid_file, all).map_err(io("writing the pid file"))?;
        for p in self.node_processes.drain(..) {
            p.forget();
        }
        for p in std::mem::take(&mut self.env.processes) {
            p.forget();
        }
        Ok(())
    }

    /// Stops everything and removes the node's state: processes (the kubelet, the pods, their
    /// shims, containerd), mounts, cgroups, the network namespace, the directories.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        for p in self.node_processes.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        self.node_processes.clear();
        let name = self.net.name().to_string();
        teardown(&name, Some(&self.env.dir.clone()));
        self.env.stop();
    }

    /// Like [`RealCluster::stop`], first copying the logs (complete by then) into `to`.
    pub fn stop_keeping_logs(&mut self, to: &Path) {
        for p in self.node_processes.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        self.node_processes.clear();
        for p in self.env.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        if std::fs::create_dir_all(to).is_ok() {
            for entry in std::fs::read_dir(self.env.dir.join("logs")).into_iter().flatten().flatten() {
                let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
            }
        }
        self.stop();
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a detached environment with a real node (`make env-down`): the node, then the rest.
pub fn stop_detached(dir: &Path) -> Vec<String> {
    if let Ok(name) = std::fs::read_to_string(dir.join("node")) {
        teardown(name.trim(), Some(dir));
    }
    crate::stop_detached(dir)
}

/// The real nodes' network namespaces on this machine.
pub fn node_namespaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect();
    names.sort();
    names
}

/// Processes whose command line mentions `needle` (a node's `/run` directory or state directory).
fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid as u32 == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            found.push((pid, cmd.trim().to_string()));
        }
    }
    found
}

/// Whether a node's processes still run (a node of `make env`, or another run's).
fn live(name: &str) -> bool {
    !processes_mentioning(&format!("/run/{name}/")).is_empty()
}

/// Mount points (of this mount namespace) under any of `roots`, deepest first.
fn mounts_under(roots: &[PathBuf]) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| roots.iter().any(|r| p.starts_with(r)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// Every cgroup the kubelet made (`kubepods` in each hierarchy), deepest first.
fn kubepods_cgroups() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if !matches!(right.split(' ').next(), Some("cgroup" | "cgroup2")) {
            continue;
        }
        let Some(mount) = left.split(' ').nth(4) else { continue };
        let root = Path::new(mount).join("kubepods");
        if root.is_dir() {
            collect_dirs(&root, &mut dirs);
        }
    }
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    dirs
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

fn kill_all(pids: &[i32], sig: i32) {
    for pid in pids {
        // SAFETY: kill(2); these are processes of the node being torn down.
        unsafe {
            libc::kill(*pid, sig);
        }
    }
}

fn wait_gone(pids: &[i32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let alive: Vec<_> = pids
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
            })
            .collect();
        if alive.is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes everything of the node `name` (state under `/run/<name>`; mounts under its environment
/// directory `dir`, or the one it recorded): its processes (kubelet first, then the pods'
/// processes, their shims, containerd), its mounts, the kubelet's cgroups, the network namespace,
/// the shim sockets of its pods. Idempotent; the environment directory itself stays.
pub fn teardown(name: &str, dir: Option<&Path>) {
    let run_dir = Path::new("/run").join(name);
    let recorded = std::fs::read_to_string(run_dir.join("env-dir")).ok().map(PathBuf::from);
    let dir = dir.map(Path::to_path_buf).or(recorded);
    let needle = format!("{}/", run_dir.display());
    let by_name = |exe: &str| -> Vec<i32> {
        processes_mentioning(&needle)
            .into_iter()
            .filter(|(pid, _)| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with(exe)))
            .map(|(pid, _)| pid)
            .collect()
    };
    let kubelet = by_name("kubelet");
    kill_all(&kubelet, libc::SIGTERM);
    if !wait_gone(&kubelet, Duration::from_secs(10)) {
        kill_all(&kubelet, libc::SIGKILL);
    }
    // The pods' processes: whatever is in the kubelet's cgroups.
    let mut pod_pids = Vec::new();
    for cg in kubepods_cgroups() {
        for line in std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default().lines() {
            if let Ok(pid) = line.trim().parse::<i32>() {
                pod_pids.push(pid);
            }
        }
    }
    pod_pids.sort_unstable();
    pod_pids.dedup();
    kill_all(&pod_pids, libc::SIGKILL);
    wait_gone(&pod_pids, Duration::from_secs(10));
    // Shims listen on sockets under /run/containerd/s (containerd 1.6 puts them there whatever its
    // state directory): note ours, from the namespace's socket table, before they go.
    let shims: Vec<i32> = processes_mentioning(&needle)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim"))
        .map(|(pid, _)| pid)
        .collect();
    let mut sockets = Vec::new();
    for pid in &shims {
        for line in std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default().lines() {
            if let Some(path) = line.split_whitespace().nth(7).filter(|p| p.starts_with("/run/containerd/s/")) {
                sockets.push(PathBuf::from(path));
            }
        }
    }
    kill_all(&shims, libc::SIGKILL);
    wait_gone(&shims, Duration::from_secs(10));
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    let rest: Vec<i32> = processes_mentioning(&needle).into_iter().map(|(pid, _)| pid).collect();
    kill_all(&rest, libc::SIGTERM);
    if !wait_gone(&rest, Duration::from_secs(10)) {
        kill_all(&rest, libc::SIGKILL);
        wait_gone(&rest, Duration::from_secs(5));
    }
    let mut roots = vec![run_dir.clone()];
    roots.extend(dir.clone());
    for m in mounts_under(&roots) {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid C string.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    // A cgroup goes once its last process has; the kernel takes a moment after SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for cg in kubepods_cgroups() {
            let _ = std::fs::remove_dir(&cg);
        }
        if kubepods_cgroups().is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ip(&["netns", "delete", name]);
    let _ = std::fs::remove_dir_all(&run_dir);
    // libcni's result cache (`<network>-<sandbox id>-<interface>`): our network is named after
    // the namespace, and containerd's loopback entries carry the ids of our sandboxes.
    let sandboxes: Vec<String> = dir
        .iter()
        .flat_map(|d| std::fs::read_dir(d.join("containerd/root/io.containerd.grpc.v1.cri/sandboxes")).into_iter())
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for entry in std::fs::read_dir("/var/lib/cni/results").into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if file.starts_with(name) || sandboxes.iter().any(|id| file.contains(id.as_str())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    // The directories the shims and libcni made, when nothing else uses them (fails if not empty).
    for d in ["/run/containerd/s", "/run/containerd", "/var/lib/cni/results", "/var/lib/cni"] {
        let _ = std::fs::remove_dir(d);
    }
}

/// What of the node `name` (and the state directory `dir`) is still on the machine: processes,
/// mounts, kubelet cgroups, the network namespace. Empty after [`teardown`].
pub fn leftovers(name: &str, dir: &Path) -> Vec<String> {
    let run_dir = Path::new("/run").join(name);
    let mut left = Vec::new();
    for needle in [format!("{}/", run_dir.display()), format!("{}/", dir.display())] {
        for (pid, cmd) in processes_mentioning(&needle) {
            left.push(format!("process {pid}: {cmd}"));
        }
    }
    for m in mounts_under(&[run_dir.clone(), dir.to_path_buf()]) {
        left.push(format!("mount {}", m.display()));
    }
    for cg in kubepods_cgroups() {
        left.push(format!("cgroup {}", cg.display()));
    }
    if Path::new("/run/netns").join(name).exists() {
        left.push(format!("network namespace {name}"));
    }
    if run_dir.exists() {
        left.push(format!("directory {}", run_dir.display()));
    }
    left.sort();
    left.dedup();
    left
}
