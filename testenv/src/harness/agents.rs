//! Real `peat agent` processes of a test run, and what they leave on disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env::{env, eventually, peat_binary};
use crate::ManagedProcess;

/// A `peat agent` process of this test run.
pub struct AgentProc {
    pub process: ManagedProcess,
    pub node: String,
    pub store: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    binary: PathBuf,
}

/// Starts `peat agent` for `node` with its store in `store` (fast heartbeats and progress for tests).
pub fn start_agent(node: &str, store: &Path, extra: &[&str]) -> AgentProc {
    start_agent_with(&peat_binary(), node, store, extra)
}

/// [`start_agent`] with another executable standing for `peat` (a wrapper that starts it in a
/// network namespace, say).
pub fn start_agent_with(binary: &Path, node: &str, store: &Path, extra: &[&str]) -> AgentProc {
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
    if let Some(ns) = super::controller::SECRET_NAMESPACE.lock().unwrap().clone() {
        args.extend(["--secret-namespace".to_string(), ns]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let process = spawn_agent(binary, node, &args, &log);
    AgentProc { process, node: node.into(), store: store.to_path_buf(), log, args, binary: binary.to_path_buf() }
}

fn spawn_agent(binary: &Path, node: &str, args: &[String], log: &Path) -> ManagedProcess {
    env().spawn_peat(binary, &format!("agent-{node}"), args, "info,peat=debug", log).expect("starting peat agent")
}

impl AgentProc {
    /// SIGKILL, as a power cut would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again (after [`AgentProc::kill`]) with the same arguments.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = spawn_agent(&self.binary, &self.node, &self.args, &self.log);
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Peak resident memory of a running process, MiB (VmHWM).
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident memory of a running process now, MiB (VmRSS).
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A kB field of /proc/<pid>/status (`VmRSS:`, `RssAnon:`, `RssFile:` …), in MiB (0 when the
/// process is gone).
pub fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
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
