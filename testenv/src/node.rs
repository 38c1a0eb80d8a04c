//! A real node: containerd + runc + kubelet + kube-proxy beside kube-scheduler and a
//! kube-controller-manager with every default controller, so the chart's pods really run, all in
//! the network namespace of a [`ClusterNetwork`]. The caller's thread enters the namespace
//! ([`ClusterNetwork::enter`]) before starting, so its clients, the ports it picks and the
//! processes it forks are inside. [`RealCluster::stop`] removes everything ([`teardown`]);
//! [`leftovers`] says what would still be there.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::error::{TestEnvError, io};
pub use crate::netns::{
    ClusterNetwork, NETNS_PREFIX, NODE_IP, NodeBinaries, POD_CIDR, SERVICE_CIDR, leftovers, node_namespaces, teardown,
};
use crate::{Binaries, Lifetime, ManagedProcess, Options, TestEnv, certs, image};

const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);

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
        crate::netns::write_atomically(&state.join("env-dir"), &dir.display().to_string())?;
        // What the kubelet changes machine-wide, to put back; its cgroups apart from any other.
        crate::netns::record_machine(cluster.net.name())?;
        crate::netns::create_cgroup_root(cluster.net.name())?;

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
                // Its default ignores --root-dir (/var/lib/kubelet/pki).
                format!("--cert-dir={}", env_dir("kubelet/pki")),
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
        // without it.
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
  # Pod network namespaces under the state directory (/run/<node>/containerd), not /run/netns.
  netns_mounts_under_state_dir = true
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
# The node's own cgroup root: its pods' cgroups apart from any other kubelet's on the machine.
cgroupRoot: /{name}
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
                name = self.net.name(),
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
        crate::not_ready(&self.env.dir, name, why)
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
        self.net.keep_on_drop();
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
        // The control plane in its order (etcd last), before teardown sweeps the namespace.
        for p in self.env.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        self.env.processes.clear();
        let name = self.net.name().to_string();
        teardown(&name, Some(&self.env.dir.clone()));
        // Removes the directory, once nothing is mounted under it.
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
    let mut stopped = Vec::new();
    if let Ok(name) = std::fs::read_to_string(dir.join("node")) {
        let name = name.trim();
        if Path::new("/run/netns").join(name).exists() {
            // Every process in the namespace (the control plane too), the pods, mounts, cgroups.
            teardown(name, Some(dir));
            stopped.push(format!("the real node in network namespace {name} with its pods and control plane"));
        }
    }
    stopped.extend(crate::stop_detached(dir));
    stopped
}
