//! The network namespace of a real node ([`ClusterNetwork`]) and the machine-wide state a kubelet
//! leaves behind: finding it ([`leftovers`]) and removing it ([`teardown`]). Apart from
//! [`crate::node`] so that the environment's options can name a cluster network without importing
//! the node that runs in it.
//!
//! Everything of a node runs inside a network namespace made here (`ip netns add peat-node-<pid>`):
//! the node IP, the pod CIDR with its CNI bridge, the service CIDR and kube-proxy's rules exist only
//! there, and nothing can leave it (besides loopback and the pods' veths, its only interfaces are a
//! veth pair with both ends inside). Its name is also the node's state directory under `/run`
//! (containerd's socket and state, pod network namespaces). One node runs at a time on a machine
//! (a lock): cgroups (`/kubepods`), mounts and shim sockets are machine-wide.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{TestEnvError, io};

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
/// How long a start waits for another run's node.
const LOCK_WAIT: Duration = Duration::from_secs(600);

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

pub(crate) fn run(cmd: &mut Command) -> Result<(), TestEnvError> {
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

pub(crate) fn ip(args: &[&str]) -> Result<(), TestEnvError> {
    run(Command::new("ip").args(args))
}

impl ClusterNetwork {
    /// Takes the machine's node lock (waiting, bounded, for another test run's node), sweeps what
    /// killed runs left, and creates the namespace with the node IP on a veth whose peer is
    /// inside too. Fails without root, and while a node of `make env NODE=1` runs.
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
        // Another test run's node: wait for it (bounded), saying so.
        let deadline = Instant::now() + LOCK_WAIT;
        let mut said = false;
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(format!("locking {LOCK}"))(e));
            }
            if Instant::now() > deadline {
                return Err(TestEnvError::Build(format!(
                    "another real node held {LOCK} for {LOCK_WAIT:?} (a test run, or a wedged one: see `ip netns`)"
                )));
            }
            if !said {
                eprintln!("waiting for another run's real node to finish ({LOCK}) …");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // A node of `make env NODE=1` runs without the lock; leftovers of killed runs are swept.
        for name in node_namespaces() {
            if live(&name) {
                return Err(TestEnvError::Build(format!(
                    "a real node runs in network namespace {name} (make env NODE=1): stop it first with make env-down"
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
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = ip(&["netns", "delete", &name]);
                return Err(io(format!("opening {path}"))(e));
            }
        };
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

    /// Leaves the namespace in place when the last handle goes (`make env NODE=1`).
    pub(crate) fn keep_on_drop(&self) {
        self.netns.detached.store(true, std::sync::atomic::Ordering::Relaxed);
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

fn inode(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The processes (but this one) in the network namespace `name`, with their executable's name:
/// the kubelet, containerd, its shims, kube-proxy, the control plane, the registry. (Pods have
/// namespaces of their own; they are found by their cgroups.)
fn processes_in(name: &str) -> Vec<(i32, String)> {
    let Some(ns) = inode(Path::new("/run/netns").join(name)) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid as u32 == std::process::id() || inode(entry.path().join("ns/net")) != Some(ns) {
            continue;
        }
        let exe = std::fs::read_link(entry.path().join("exe"))
            .ok()
            .and_then(|e| e.file_name().map(|f| f.to_string_lossy().to_string()))
            .unwrap_or_default();
        found.push((pid, exe));
    }
    found
}

/// Whether the node `name` runs: its kubelet or containerd is alive (a node of `make env NODE=1`).
/// Without them, what is left is a killed run's (pods, shims) and may be swept.
fn live(name: &str) -> bool {
    processes_in(name).iter().any(|(_, exe)| exe == "kubelet" || exe == "containerd")
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

/// The cgroup hierarchies: (mount point, whether it is cpuset's).
fn cgroup_hierarchies() -> Vec<(PathBuf, bool)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1).unwrap_or_default();
            if !matches!(fstype, "cgroup" | "cgroup2") {
                return None;
            }
            Some((PathBuf::from(left.split(' ').nth(4)?), opts.split(',').any(|o| o == "cpuset")))
        })
        .collect()
}

/// The node's cgroup root (`/<name>` in every hierarchy, the kubelet's `cgroupRoot`), so the kubelet's
/// cgroups are apart from any other on the machine and teardown finds exactly them.
pub(crate) fn create_cgroup_root(name: &str) -> Result<(), TestEnvError> {
    for (mount, cpuset) in cgroup_hierarchies() {
        let dir = mount.join(name);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        if cpuset {
            // A new cpuset has no CPUs or memory nodes until given its parent's.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(mount.join(f)).map_err(io(format!("reading {f}")))?;
                std::fs::write(dir.join(f), v.trim()).map_err(io(format!("writing {}", dir.join(f).display())))?;
            }
        }
    }
    Ok(())
}

/// The node's cgroups in every hierarchy, deepest first.
fn node_cgroups(name: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (mount, _) in cgroup_hierarchies() {
        let root = mount.join(name);
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
        let alive = pids.iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        });
        if !alive {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, up to `grace`, then SIGKILL.
fn stop_all(pids: &[i32], grace: Duration) {
    kill_all(pids, libc::SIGTERM);
    if !wait_gone(pids, grace) {
        kill_all(pids, libc::SIGKILL);
        wait_gone(pids, Duration::from_secs(5));
    }
}

/// Kernel settings the kubelet changes machine-wide (without `protectKernelDefaults`, it sets
/// them to what it wants): recorded before it starts, put back at teardown.
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// Directories the kubelet and containerd make at fixed paths, whatever their configuration
/// (the device-plugin socket, container log links, libcni's cache, the shims' sockets and runc's
/// default root): removed at teardown when they were not there before.
const FIXED_DIRS: [&str; 4] = ["/var/lib/kubelet", "/var/log/containers", "/var/lib/cni", "/run/containerd"];

/// What of the machine outside the node's own directories a node changes: the kubelet's kernel
/// settings, the fixed directories (and whether each exists), the network namespaces. Equal
/// before a node's start and after its teardown.
pub fn machine_state() -> Vec<String> {
    let mut state: Vec<String> = KUBELET_SYSCTLS
        .iter()
        .map(|k| {
            format!(
                "sysctl {k} = {}",
                std::fs::read_to_string(Path::new("/proc/sys").join(k)).unwrap_or_default().trim()
            )
        })
        .collect();
    for d in FIXED_DIRS {
        state.push(format!("{d} exists: {}", Path::new(d).exists()));
    }
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        state.push(format!("network namespace {}", e.file_name().to_string_lossy()));
    }
    state
}

/// Records what [`restore_machine`] puts back, in the node's `/run` directory (before the kubelet runs).
pub(crate) fn record_machine(name: &str) -> Result<(), TestEnvError> {
    let mut text = String::new();
    for k in KUBELET_SYSCTLS {
        let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).map_err(io(format!("reading sysctl {k}")))?;
        text.push_str(&format!("sysctl {k} {}\n", v.trim()));
    }
    for d in FIXED_DIRS.iter().filter(|d| !Path::new(d).exists()) {
        text.push_str(&format!("created {d}\n"));
    }
    write_atomically(&Path::new("/run").join(name).join("machine"), &text)
}

fn restore_machine(run_dir: &Path) {
    for line in std::fs::read_to_string(run_dir.join("machine")).unwrap_or_default().lines() {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("sysctl"), Some(key), Some(value)) if KUBELET_SYSCTLS.contains(&key) => {
                let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
            }
            (Some("created"), Some(dir), None) if FIXED_DIRS.contains(&dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            _ => {}
        }
    }
}

/// Writes `text` to `path` through a temporary file and a rename: a reader sees all or nothing.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<(), TestEnvError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))
}

/// The environment directory the node `name` recorded, if it is plausibly one (absolute, not a
/// top-level directory, with the node's containerd.toml): teardown unmounts everything under it.
fn recorded_env_dir(run_dir: &Path) -> Option<PathBuf> {
    let dir = PathBuf::from(std::fs::read_to_string(run_dir.join("env-dir")).ok()?.trim());
    (dir.is_absolute() && dir.components().count() > 2 && dir.join("containerd.toml").is_file()).then_some(dir)
}

/// Removes everything of the node `name`: its processes (the kubelet first, then the pods' processes
/// found by the node's cgroups, the shims, then everything else in its network namespace), its
/// mounts (under `/run/<name>` and its environment directory `dir`, or the one it recorded), its
/// cgroups, the shim sockets and libcni results of its pods, the kernel settings and fixed
/// directories the kubelet changed, the namespace. Idempotent; the environment directory stays.
pub fn teardown(name: &str, dir: Option<&Path>) {
    let run_dir = Path::new("/run").join(name);
    let dir = dir.map(Path::to_path_buf).or_else(|| recorded_env_dir(&run_dir));
    let of = |exe: &dyn Fn(&str) -> bool| -> Vec<i32> {
        processes_in(name).into_iter().filter(|(_, e)| exe(e)).map(|(pid, _)| pid).collect()
    };
    stop_all(&of(&|e| e == "kubelet"), Duration::from_secs(10));
    // The pods' processes: whatever is in the node's cgroups.
    let mut pod_pids = Vec::new();
    for cg in node_cgroups(name) {
        for line in std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default().lines() {
            pod_pids.extend(line.trim().parse::<i32>().ok());
        }
    }
    pod_pids.sort_unstable();
    pod_pids.dedup();
    kill_all(&pod_pids, libc::SIGKILL);
    wait_gone(&pod_pids, Duration::from_secs(10));
    // Shims listen under /run/containerd/s (containerd 1.6 puts them there whatever its state
    // directory): note ours, from the namespace's socket table, before they go.
    let shims = of(&|e| e.starts_with("containerd-shim"));
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
    // The rest; etcd last, or the API server waits for it while shutting down.
    stop_all(&of(&|e| !e.starts_with("etcd")), Duration::from_secs(10));
    stop_all(&of(&|_| true), Duration::from_secs(10));

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
        for cg in node_cgroups(name) {
            let _ = std::fs::remove_dir(&cg);
        }
        if node_cgroups(name).is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // libcni's result cache (`<network>-<sandbox id>-<interface>`): our network is named after
    // the namespace, and containerd's loopback entries carry the ids of our sandboxes.
    let sandboxes: Vec<String> = dir
        .iter()
        .flat_map(|d| std::fs::read_dir(d.join("containerd/root/io.containerd.grpc.v1.cri/sandboxes")).into_iter())
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let prefix = format!("{name}-");
    for entry in std::fs::read_dir("/var/lib/cni/results").into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if file.starts_with(&prefix) || sandboxes.iter().any(|id| file.contains(&format!("-{id}-"))) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    restore_machine(&run_dir);
    let _ = ip(&["netns", "delete", name]);
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// What of the node `name` (and its environment directory `dir`) is still on the machine:
/// processes, mounts, cgroups, the network namespace, its `/run` directory. Empty after
/// [`teardown`] (compare [`machine_state`] for the rest).
pub fn leftovers(name: &str, dir: &Path) -> Vec<String> {
    let run_dir = Path::new("/run").join(name);
    let mut left = Vec::new();
    for (pid, exe) in processes_in(name) {
        left.push(format!("process {pid} ({exe}) in the node's network namespace"));
    }
    for (pid, cmd) in processes_mentioning(&format!("{}/", dir.display())) {
        left.push(format!("process {pid}: {cmd}"));
    }
    for m in mounts_under(&[run_dir.clone(), dir.to_path_buf()]) {
        left.push(format!("mount {}", m.display()));
    }
    for cg in node_cgroups(name) {
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

/// Processes whose command line mentions `needle` (an environment directory).
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
