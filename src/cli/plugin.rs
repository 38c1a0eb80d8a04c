//! The kubectl-plugin commands (`kubectl peat …`, or `peat …`): status, rollback, pause, resume, nodes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::HumanBytes;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::api::{ModelDeployment, ModelNode, ModelRollout, RolloutPhase};

/// Where a command looks.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// Namespace of the rollout (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
}

/// `status NAME [--watch]`.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// The ModelRollout.
    pub name: String,
    /// Redraw on every change until the rollout converges (exit 0), or ends Degraded, RolledBack or
    /// Failed (exit 1), or Ctrl-C.
    #[arg(short, long)]
    pub watch: bool,
    /// Where to look.
    #[command(flatten)]
    pub target: Target,
}

/// `rollback NAME [--to VERSION]`.
#[derive(Clone, Debug, clap::Args)]
pub struct RollbackArgs {
    /// The ModelRollout.
    pub name: String,
    /// Version to go back to (default: the last version that converged before the current one).
    #[arg(long)]
    pub to: Option<String>,
    /// Where to look.
    #[command(flatten)]
    pub target: Target,
}

/// `pause NAME` / `resume NAME`.
#[derive(Clone, Debug, clap::Args)]
pub struct NameArgs {
    /// The ModelRollout.
    pub name: String,
    /// Where to look.
    #[command(flatten)]
    pub target: Target,
}

/// Errors of the plugin commands, worded for a person at a terminal.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No kubeconfig or in-cluster config, or the API server does not answer.
    #[error("cannot reach the cluster: {0}")]
    NoCluster(String),
    /// The rollout does not exist.
    #[error("modelrollout {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Nothing to roll back to.
    #[error("modelrollout {0} has no earlier converged version to roll back to; give one with --to")]
    NoHistory(String),
    /// `--watch` saw the rollout end without converging.
    #[error("modelrollout {name} ended {phase:?}: {why}")]
    Ended {
        /// The rollout.
        name: String,
        /// Degraded, RolledBack or Failed.
        phase: RolloutPhase,
        /// Its Ready condition's message, or its blockers.
        why: String,
    },
    /// The API server refused.
    #[error("{0}")]
    Api(#[from] kube::Error),
}

async fn client() -> Result<Client, PluginError> {
    let client = Client::try_default().await.map_err(|e| PluginError::NoCluster(e.to_string()))?;
    client.apiserver_version().await.map_err(|e| PluginError::NoCluster(e.to_string()))?;
    Ok(client)
}

fn namespace(client: &Client, target: &Target) -> String {
    target.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string())
}

async fn get_rollout(api: &Api<ModelRollout>, ns: &str, name: &str) -> Result<ModelRollout, PluginError> {
    api.get_opt(name).await?.ok_or_else(|| PluginError::NotFound { namespace: ns.into(), name: name.into() })
}

/// A text progress bar.
fn bar(done: i64, total: i64, width: usize) -> String {
    let filled = if total > 0 { ((done.max(0) as f64 / total as f64) * width as f64).round() as usize } else { 0 };
    let filled = filled.min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// `1h 2m`, `1m 30s`, `45s`.
fn duration(secs: u64) -> String {
    match (secs / 3600, (secs % 3600) / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

fn age(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    match t {
        Some(t) => format!("{} ago", duration((Timestamp::now().as_second() - t.0.as_second()).max(0) as u64)),
        None => "never".into(),
    }
}

/// Renders a rollout and its deployments as the status screen.
pub fn render(r: &ModelRollout, deployments: &[ModelDeployment]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let st = r.status.clone().unwrap_or_default();
    let ns = r.namespace().unwrap_or_default();
    let _ = writeln!(out, "ModelRollout {ns}/{}  model {}  version {}", r.name_any(), r.spec.model, r.spec.version);
    let current = st.observed_generation == r.metadata.generation;
    let eta = match st.estimated_completion_seconds {
        _ if current && st.phase == RolloutPhase::Converged => "done".to_string(),
        Some(s) => duration(s.max(0) as u64),
        None => "unknown".into(),
    };
    let _ = writeln!(
        out,
        "phase {:?}{}  converged {}/{}  in progress {}  pending {}  failed {}  ETA {eta}",
        st.phase,
        if r.spec.paused { " (paused)" } else { "" },
        st.converged,
        st.total_nodes,
        st.in_progress,
        st.pending,
        st.failed
    );
    if r.spec.serving.is_some() {
        let _ = writeln!(
            out,
            "serving {}/{}  staged {} (active on disk, not served: loading, soaking, or the server stopped answering)",
            st.serving, st.total_nodes, st.staged
        );
    }
    if !current {
        // Just after a change (apply, rollback), the status still describes the previous spec.
        let _ =
            writeln!(out, "(the controller has not acted on the latest change yet: the status is the previous one)");
    }
    let _ = writeln!(
        out,
        "transferred {}  reused {}",
        HumanBytes(st.bytes_transferred.max(0) as u64),
        HumanBytes(st.bytes_reused.max(0) as u64)
    );
    for c in &st.conditions {
        if c.status != "True" && c.type_ == "Ready" {
            let _ = writeln!(out, "not ready: {} — {}", c.reason, c.message);
        }
    }
    let _ = writeln!(out, "\nVERSIONS");
    let mut versions: BTreeMap<&str, i32> = st.version_distribution.iter().map(|(v, n)| (v.as_str(), *n)).collect();
    versions.entry(r.spec.version.as_str()).or_insert(0);
    for (v, n) in versions {
        let marker = if v == r.spec.version { "→" } else { " " };
        let _ = writeln!(
            out,
            "{marker} {v:<16} {} {n}/{}",
            bar(i64::from(n), i64::from(st.total_nodes), 30),
            st.total_nodes
        );
    }
    let _ = writeln!(
        out,
        "\nNODE                           VARIANT          ACTIVE     PHASE         PROGRESS                 REASON"
    );
    let mut mds: Vec<&ModelDeployment> = deployments.iter().collect();
    mds.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
    for md in mds {
        let s = md.status.clone().unwrap_or_default();
        let done = s.bytes_done + s.bytes_reused;
        let pct =
            if s.bytes_total > 0 { format!("{:>3}%", (done * 100 / s.bytes_total).min(100)) } else { "   -".into() };
        let reason = match (&s.reason, &s.message) {
            (Some(r), Some(m)) => format!("{r}: {m}"),
            (Some(r), None) => r.to_string(),
            // Loading while a model server is awaited, Degraded: said without a blocker reason.
            (None, Some(m)) => m.clone(),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<30} {:<16} {:<10} {:<13} {} {pct} {reason}",
            md.spec.node_name,
            md.spec.variant,
            s.active_version.as_deref().unwrap_or("-"),
            format!("{:?}", s.phase),
            bar(done, s.bytes_total, 15)
        );
    }
    if !st.blockers.is_empty() {
        let _ = writeln!(out, "\nBLOCKERS");
        for b in &st.blockers {
            let _ = writeln!(
                out,
                "  {:<30} {:<24} {} ({})",
                b.node,
                b.reason.to_string(),
                b.details,
                age(b.since.as_ref())
            );
        }
    }
    out
}

/// `status NAME [--watch]`.
pub async fn status(args: StatusArgs) -> Result<(), PluginError> {
    let client = client().await?;
    let ns = namespace(&client, &args.target);
    let rollouts: Api<ModelRollout> = Api::namespaced(client.clone(), &ns);
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let r = get_rollout(&rollouts, &ns, &args.name).await?;
        let uid = r.uid().unwrap_or_default();
        let owned: Vec<ModelDeployment> = mds
            .list(&ListParams::default().labels(&format!("peat.dev/model={}", r.spec.model)))
            .await?
            .items
            .into_iter()
            .filter(|m| m.owner_references().iter().any(|o| o.uid == uid))
            .collect();
        let frame = render(&r, &owned);
        if frame != last {
            if args.watch && tty {
                print!("\x1b[H\x1b[2J");
            } else if args.watch && !last.is_empty() {
                println!("---");
            }
            print!("{frame}");
            last = frame;
        }
        if !args.watch {
            return Ok(());
        }
        if let Some(outcome) = watch_outcome(&r) {
            return outcome;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Whether `status --watch` is done with `r`: converged (Ok), or ended short of it (Degraded,
/// RolledBack, Failed: an error, so scripts see it). Only a status of the current spec counts.
fn watch_outcome(r: &ModelRollout) -> Option<Result<(), PluginError>> {
    let st = r.status.as_ref().filter(|s| s.observed_generation == r.metadata.generation)?;
    match st.phase {
        RolloutPhase::Converged => Some(Ok(())),
        RolloutPhase::Degraded | RolloutPhase::RolledBack | RolloutPhase::Failed => {
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready" && !c.message.is_empty());
            let why = match ready {
                Some(c) => format!("{}: {}", c.reason, c.message),
                None => st.blockers.iter().map(|b| format!("{} {}", b.node, b.reason)).collect::<Vec<_>>().join(", "),
            };
            Some(Err(PluginError::Ended { name: r.name_any(), phase: st.phase, why }))
        }
        _ => None,
    }
}

async fn patch_spec(target: &Target, name: &str, patch: serde_json::Value) -> Result<ModelRollout, PluginError> {
    let client = client().await?;
    let ns = namespace(&client, target);
    let api: Api<ModelRollout> = Api::namespaced(client, &ns);
    match api.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": patch}))).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Err(PluginError::NotFound { namespace: ns, name: name.into() }),
        other => Ok(other?),
    }
}

/// `pause NAME`.
pub async fn pause(args: NameArgs) -> Result<(), PluginError> {
    patch_spec(&args.target, &args.name, serde_json::json!({"paused": true})).await?;
    println!("modelrollout {} paused: transfers halt and resume where they stopped", args.name);
    Ok(())
}

/// `resume NAME`.
pub async fn resume(args: NameArgs) -> Result<(), PluginError> {
    patch_spec(&args.target, &args.name, serde_json::json!({"paused": false})).await?;
    println!("modelrollout {} resumed", args.name);
    Ok(())
}

/// The version a rollback without `--to` returns to: the newest converged version before the current one.
pub fn previous_version(r: &ModelRollout) -> Option<String> {
    let history = r.status.as_ref().map(|s| s.history.clone()).unwrap_or_default();
    history.iter().rev().map(|h| h.version.clone()).find(|v| *v != r.spec.version)
}

/// `rollback NAME [--to VERSION]`.
pub async fn rollback(args: RollbackArgs) -> Result<(), PluginError> {
    let client = client().await?;
    let ns = namespace(&client, &args.target);
    let api: Api<ModelRollout> = Api::namespaced(client, &ns);
    let r = get_rollout(&api, &ns, &args.name).await?;
    let to = match args.to {
        Some(v) => v,
        None => previous_version(&r).ok_or_else(|| PluginError::NoHistory(format!("{ns}/{}", args.name)))?,
    };
    api.patch(&args.name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"version": to}}))).await?;
    println!(
        "modelrollout {} rolling back from {} to {to} (nodes that kept {to} switch without a transfer)",
        args.name, r.spec.version
    );
    Ok(())
}

/// `nodes`: capabilities and inventory of every node with an agent.
pub async fn nodes() -> Result<(), PluginError> {
    let client = client().await?;
    let api: Api<ModelNode> = Api::all(client);
    let list = api.list(&ListParams::default()).await?.items;
    print!("{}", render_nodes(&list));
    Ok(())
}

/// The `nodes` table, its columns as wide as their widest cell.
pub fn render_nodes(nodes: &[ModelNode]) -> String {
    let mut rows =
        vec![["NODE", "ARCH", "GPUS", "GPU MEM", "FREE", "PROVIDERS", "MODELS", "HEARTBEAT"].map(String::from)];
    let mut sorted: Vec<&ModelNode> = nodes.iter().collect();
    sorted.sort_by_key(|n| n.name_any());
    for n in sorted {
        let s = n.status.clone().unwrap_or_default();
        rows.push([
            n.name_any(),
            s.arch.unwrap_or_else(|| "-".into()),
            s.gpus.to_string(),
            HumanBytes(s.gpu_memory_bytes.max(0) as u64).to_string(),
            HumanBytes(s.storage_free_bytes.max(0) as u64).to_string(),
            if s.providers.is_empty() { "-".into() } else { s.providers.join(",") },
            s.models_summary.unwrap_or_else(|| "-".into()),
            age(s.last_heartbeat.as_ref()),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    // Numbers right-aligned, text left-aligned; the last column unpadded.
    let right = [false, false, true, true, true, false, false, false];
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = (0..8)
            .map(|c| match (c, right[c]) {
                (7, _) => r[c].clone(),
                (_, true) => format!("{:>w$}", r[c], w = widths[c]),
                _ => format!("{:<w$}", r[c], w = widths[c]),
            })
            .collect();
        out.push_str(&cells.join("  "));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_previous_versions() {
        assert_eq!(bar(1, 4, 8), "[##------]");
        assert_eq!(bar(5, 4, 4), "[####]");
        assert_eq!(bar(0, 0, 3), "[---]");
        assert_eq!(
            (duration(45), duration(90), duration(120), duration(3720)),
            ("45s".into(), "1m 30s".into(), "2m".into(), "1h 2m".into())
        );
        let mut r: ModelRollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "r", "namespace": "ns", "generation": 2},
            "spec": {"model": "m", "version": "3.0.0", "source": {"repository": "reg/m"}, "scope": {"all": {}}},
        }))
        .unwrap();
        assert_eq!(previous_version(&r), None);
        r.status = Some(
            serde_json::from_value(serde_json::json!({"history": [
            {"version": "1.0.0", "digest": "sha256:a"}, {"version": "2.0.0", "digest": "sha256:b"},
            {"version": "3.0.0", "digest": "sha256:c"}]}))
            .unwrap(),
        );
        assert_eq!(previous_version(&r).as_deref(), Some("2.0.0"));
        let screen = render(&r, &[]);
        assert!(screen.contains("ModelRollout ns/r  model m  version 3.0.0"), "{screen}");
        assert!(screen.contains("→ 3.0.0"), "{screen}");
        assert!(screen.contains("not acted on the latest change"), "no observedGeneration yet: {screen}");
    }

    #[test]
    fn a_watch_ends_on_convergence_or_on_an_end_short_of_it_of_the_current_spec() {
        let rollout = |generation: i64, observed: i64, phase: &str| -> ModelRollout {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout",
                "metadata": {"name": "r", "namespace": "ns", "generation": generation},
                "spec": {"model": "m", "version": "1.0.0", "source": {"repository": "reg/m"}, "scope": {"all": {}}},
                "status": {"phase": phase, "observedGeneration": observed, "conditions": [{
                    "type": "Ready", "status": "False", "reason": "FailureThresholdExceeded",
                    "message": "2 of 4 targets failed", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            }))
            .unwrap()
        };
        assert!(matches!(watch_outcome(&rollout(2, 2, "Converged")), Some(Ok(()))));
        assert!(watch_outcome(&rollout(3, 2, "Converged")).is_none(), "converged on the previous spec");
        assert!(watch_outcome(&rollout(2, 2, "Progressing")).is_none());
        assert!(watch_outcome(&rollout(2, 2, "Paused")).is_none(), "a paused rollout may be resumed");
        for phase in ["Degraded", "RolledBack", "Failed"] {
            let err = watch_outcome(&rollout(2, 2, phase)).unwrap().unwrap_err().to_string();
            assert!(err.contains(phase) && err.contains("2 of 4 targets failed"), "{err}");
        }
        assert!(watch_outcome(&rollout(3, 2, "RolledBack")).is_none(), "the end of the previous spec");
    }

    #[test]
    fn with_serving_the_screen_counts_served_and_staged_nodes_and_says_what_a_node_waits_for() {
        let r: ModelRollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "r", "namespace": "ns", "generation": 1},
            "spec": {"model": "m", "version": "2.0.0", "source": {"repository": "reg/m"}, "scope": {"all": {}},
                     "serving": {"port": 8080}},
            "status": {"observedGeneration": 1, "phase": "Progressing", "totalNodes": 2, "converged": 1,
                       "inProgress": 1, "serving": 1, "staged": 1},
        }))
        .unwrap();
        let md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m.n1", "namespace": "ns"},
            "spec": {"nodeName": "n1", "model": "m", "version": "2.0.0", "variant": "cpu", "artifact": "reg/m@sha256:a"},
            "status": {"phase": "Loading", "activeVersion": "2.0.0",
                       "message": "waiting for the model server to serve version 2.0.0: ns/p: connection refused"},
        }))
        .unwrap();
        let screen = render(&r, &[md]);
        assert!(screen.contains("serving 1/2  staged 1"), "{screen}");
        assert!(screen.contains("Loading") && screen.contains("ns/p: connection refused"), "{screen}");
    }

    #[test]
    fn the_nodes_table_aligns_long_cells() {
        let node = |name: &str, providers: &[&str]| -> ModelNode {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode", "metadata": {"name": name},
                "spec": {}, "status": {"arch": "arm64", "gpus": 1, "gpuMemoryBytes": 4294967296_i64, "providers": providers},
            }))
            .unwrap()
        };
        let table = render_nodes(&[node("b", &["cuda", "tensorrt", "cpu"]), node("a-long-name", &["cpu"])]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[1].starts_with("a-long-name  arm64"), "sorted by name: {table}");
        // Every row's MODELS cell ("-") starts under the header, however long PROVIDERS is.
        let models = lines[0].find("MODELS").unwrap();
        for l in &lines[1..] {
            assert_eq!(&l[models - 2..models + 1], "  -", "{table}");
        }
    }
}
