//! `peat controller` processes of a test run, and their admin endpoints.

use std::path::PathBuf;
use std::time::Duration;

use super::env::{env, peat_binary};
use crate::ManagedProcess;

/// A `peat controller` process of this test run.
pub struct ControllerProc {
    pub process: ManagedProcess,
    pub metrics_addr: String,
    pub log: PathBuf,
}

/// The namespace of the controller started last: it copies pull secrets there, and agents started
/// after it read them there (as the chart's agents read them in the chart's namespace).
pub(crate) static SECRET_NAMESPACE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Starts `peat controller` against this binary's environment and waits until it is ready.
pub async fn start_controller(name: &str, lease_namespace: &str, extra: &[&str]) -> ControllerProc {
    let env = env();
    *SECRET_NAMESPACE.lock().unwrap() = Some(lease_namespace.to_string());
    let metrics_addr = format!("127.0.0.1:{}", crate::free_port().expect("a free port"));
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
    let process = env
        .spawn_peat(&peat_binary(), name, &args, "info,peat=debug,kube_lease_manager=info", &log)
        .expect("starting peat controller");
    let c = ControllerProc { process, metrics_addr, log };
    c.wait_ready().await;
    c
}

impl ControllerProc {
    /// GET on the admin server.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        crate::http_get(&self.metrics_addr, path).await.ok()
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
