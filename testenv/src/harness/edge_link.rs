//! An edge link for benchmarks: an agent in a network namespace of its own (`peat-edge-<pid>`),
//! reaching the registry across a veth pair into a second namespace (`peat-hub-<pid>`), both ends
//! shaped with tc TBF (this kernel has TBF, not netem). All addresses live in those two namespaces:
//! in the hub, a counting proxy listens on [`HUB_IP`] and forwards to the test registry on
//! 127.0.0.1; in the edge, a relay on the edge's own 127.0.0.1 forwards to the API server, so the
//! agent's kubeconfig works unchanged and only registry traffic crosses the shaped link.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::agents::{AgentProc, start_agent_with};
use super::env::{env, peat_binary};
use super::proxy::CountingProxy;
use crate::netns::{ip, run};

/// The hub's end of the link (where the registry is, as the edge sees it).
pub const HUB_IP: &str = "10.213.0.1";
/// The edge's end.
pub const EDGE_IP: &str = "10.213.0.2";
const EDGE_PREFIX: &str = "peat-edge-";
const HUB_PREFIX: &str = "peat-hub-";

/// A shaped link between an edge namespace (the agent) and a hub namespace (the registry's proxy).
pub struct EdgeLink {
    /// `10.213.0.1:<port>`: the registry as the edge reaches it, across the link.
    pub registry: String,
    /// Counts what the registry delivers across the link (headers included).
    pub proxy: CountingProxy,
    api_relay: tokio::task::JoinHandle<()>,
    wrapper: PathBuf,
    /// Last: the namespaces go after everything that uses them.
    ns: Namespaces,
}

/// The two namespaces, deleted when dropped (also when a start fails half-way).
struct Namespaces {
    edge: String,
    hub: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.edge, &self.hub] {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A listening socket made inside network namespace `ns` (a thread enters it, binds, and ends).
fn listen_in(ns: &str, addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let (path, addr) = (format!("/run/netns/{ns}"), addr.to_string());
    let listener = std::thread::spawn(move || {
        let f = File::open(&path)?;
        // SAFETY: setns on a namespace descriptor we hold open; it moves only this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let l = std::net::TcpListener::bind(&addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(l)
    })
    .join()
    .map_err(|_| std::io::Error::other("the listener thread panicked"))??;
    tokio::net::TcpListener::from_std(listener)
}

/// Namespaces of earlier runs whose process is gone.
fn sweep_leftovers() {
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid = name.strip_prefix(EDGE_PREFIX).or_else(|| name.strip_prefix(HUB_PREFIX));
        if let Some(pid) = pid
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

impl EdgeLink {
    /// Creates the namespaces and the link at `rate_mbit`, the registry proxy and the API relay.
    /// Needs root, `ip` and `tc`.
    pub async fn start(rate_mbit: u32) -> std::io::Result<EdgeLink> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(std::io::Error::other("an edge link needs root (network namespaces, tc)"));
        }
        sweep_leftovers();
        let pid = std::process::id();
        let ns = Namespaces { edge: format!("{EDGE_PREFIX}{pid}"), hub: format!("{HUB_PREFIX}{pid}") };
        let (edge, hub) = (ns.edge.as_str(), ns.hub.as_str());
        ip(&["netns", "add", edge]).map_err(io_error)?;
        ip(&["netns", "add", hub]).map_err(io_error)?;
        ip(&["-n", hub, "link", "add", "hub0", "type", "veth", "peer", "name", "edge0", "netns", edge])
            .map_err(io_error)?;
        for (ns, dev, addr) in [(hub, "hub0", HUB_IP), (edge, "edge0", EDGE_IP)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]).map_err(io_error)?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]).map_err(io_error)?;
            ip(&["-n", ns, "link", "set", dev, "up"]).map_err(io_error)?;
        }
        shape(&ns, rate_mbit)?;
        let env = env();
        let registry = format!("{HUB_IP}:5000");
        let proxy = CountingProxy::start_on(listen_in(hub, &registry)?, &env.registry);
        let api = env.apiserver_url.trim_start_matches("https://").to_string();
        let relay = listen_in(edge, &api)?;
        let api_relay = tokio::spawn(async move {
            while let Ok((mut client, _)) = relay.accept().await {
                let api = api.clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&api).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        let wrapper = env.dir.join(format!("peat-in-{edge}.sh"));
        std::fs::write(&wrapper, format!("#!/bin/sh\nexec ip netns exec {edge} {} \"$@\"\n", peat_binary().display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        Ok(EdgeLink { registry, proxy, api_relay, wrapper, ns })
    }

    /// Shapes both directions to `mbit` megabits per second.
    pub fn set_rate(&self, mbit: u32) -> std::io::Result<()> {
        shape(&self.ns, mbit)
    }

    /// Starts `peat agent` for `node` inside the edge namespace.
    pub fn start_agent(&self, node: &str, store: &Path, extra: &[&str]) -> AgentProc {
        start_agent_with(&self.wrapper, node, store, extra)
    }

    /// A command run inside the edge namespace (`oras pull` across the link, say).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.edge]).arg(program);
        cmd
    }
}

/// TBF on both ends of the link: a 64 KiB bucket, 50 ms of queue.
fn shape(ns: &Namespaces, mbit: u32) -> std::io::Result<()> {
    let rate = format!("{mbit}mbit");
    for (ns, dev) in [(&ns.hub, "hub0"), (&ns.edge, "edge0")] {
        run(Command::new("tc")
            .args(["-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate])
            .args(["burst", "64kb", "latency", "50ms"]))
        .map_err(io_error)?;
    }
    Ok(())
}

impl Drop for EdgeLink {
    fn drop(&mut self) {
        self.api_relay.abort();
        let _ = std::fs::remove_file(&self.wrapper);
    }
}
