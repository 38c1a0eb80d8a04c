//! What the agent writes: ModelDeployment status, the ModelNode (capabilities, storage,
//! inventory, heartbeat) and the Node's model labels.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::context::{Agent, FIELD_MANAGER};
use super::decide::{Report, key_of};
use super::store::VersionRecord;
use crate::api::{ModelDeployment, ModelNode, ModelNodeStatus, NodeModel};

/// Writes a ModelDeployment's status from the store's view of its model plus `report`,
/// unless the status already says exactly that.
pub(super) async fn write_status(agent: &Agent, md: &ModelDeployment, report: &Report) {
    let state = agent.store.state(&md.spec.model);
    let current = agent.store.current(&md.spec.model);
    let active = current.as_ref().and_then(|v| state.get(v));
    let mut previous: Vec<&VersionRecord> =
        state.versions.iter().filter(|v| Some(&v.version) != current.as_ref()).collect();
    previous.sort_by_key(|v| std::cmp::Reverse(v.activated_at));
    let previous: Vec<String> = previous.into_iter().map(|v| v.version.clone()).collect();
    let old = md.status.clone().unwrap_or_default();
    let same = old.phase == report.phase
        && old.reason == report.reason
        && old.message == report.message
        && old.active_version.as_deref() == active.map(|a| a.version.as_str())
        && old.active_digest.as_deref() == active.map(|a| a.digest.as_str())
        && old.previous_versions == previous
        && old.observed_generation == md.metadata.generation
        && old.serving == report.serving
        && report.bytes.is_none_or(|b| {
            (old.bytes_done, old.bytes_reused, old.bytes_total) == (b.fetched as i64, b.reused as i64, b.total as i64)
        });
    if same {
        return;
    }
    let mut status = serde_json::json!({
        "phase": report.phase,
        "reason": report.reason,
        "message": report.message,
        "activeVersion": active.map(|a| a.version.clone()),
        "activeDigest": active.map(|a| a.digest.clone()),
        "previousVersions": previous,
        "lastHeartbeat": Time(Timestamp::now()),
        "observedGeneration": md.metadata.generation,
        "serving": serving_patch(report.serving.as_ref()),
    });
    if let Some(b) = report.bytes {
        status["bytesDone"] = b.fetched.into();
        status["bytesReused"] = b.reused.into();
        status["bytesTotal"] = b.total.into();
    }
    let api: Api<ModelDeployment> = Api::namespaced(agent.client.clone(), &md.namespace().unwrap_or_default());
    // A merge patch: fields not named (bytes while unknown) keep their values.
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    match api.patch_status(&md.name_any(), &PatchParams::default(), &patch).await {
        Ok(_) => debug!(md = %key_of(md), phase = ?report.phase, "status written"),
        Err(e) => warn!(md = %key_of(md), error = %e, "writing status failed"),
    }
}

/// The serving section as a merge patch: fields that are absent now are nulled (a merge patch
/// keeps what it does not name), the consumers list is replaced whole.
fn serving_patch(serving: Option<&crate::api::ServingStatus>) -> serde_json::Value {
    let Some(s) = serving else { return serde_json::Value::Null };
    let mut v = serde_json::to_value(s).expect("a serving status serializes");
    for (field, empty) in [
        ("since", serde_json::Value::Null),
        ("latencyMilliseconds", serde_json::Value::Null),
        ("consumers", serde_json::json!([])),
    ] {
        v.as_object_mut().expect("an object").entry(field).or_insert(empty);
    }
    v
}

/// Creates the node's ModelNode (owned by the Node when it exists, so it goes with it).
pub(super) async fn publish_model_node(agent: &Agent) -> anyhow::Result<()> {
    let node = &agent.opts.node_name;
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let owner = match nodes.get_opt(node).await? {
        Some(n) => serde_json::json!([{
            "apiVersion": "v1", "kind": "Node", "name": node, "uid": n.metadata.uid,
        }]),
        None => {
            warn!(%node, "no Node object of this name: the ModelNode will not be removed with it");
            serde_json::json!([])
        }
    };
    let api: Api<ModelNode> = Api::all(agent.client.clone());
    let mn = serde_json::json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode",
        "metadata": {"name": node, "ownerReferences": owner},
        "spec": {},
    });
    api.patch(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&mn)).await?;
    write_heartbeat(agent).await
}

async fn write_heartbeat(agent: &Agent) -> anyhow::Result<()> {
    let (free, total) = agent.store.space(agent.opts.storage_capacity).unwrap_or((0, 0));
    let mut models = Vec::new();
    let mut summary = Vec::new();
    for (model, (state, current)) in agent.store.inventory() {
        for v in &state.versions {
            let active = current.as_deref() == Some(v.version.as_str());
            if active {
                summary.push(format!("{model}={}", v.version));
            }
            models.push(NodeModel {
                model: model.clone(),
                version: v.version.clone(),
                digest: Some(v.digest.clone()),
                active,
                retained: state.retained,
            });
        }
    }
    let caps = agent.caps.lock().expect("caps lock").clone();
    let status = ModelNodeStatus {
        arch: Some(caps.arch),
        gpus: caps.gpus,
        gpu_memory_bytes: caps.gpu_memory_bytes,
        providers: caps.providers,
        storage_free_bytes: free as i64,
        storage_reclaimable_bytes: agent.store.reclaimable(&agent.wanted.lock().expect("wanted lock").clone()) as i64,
        storage_total_bytes: total as i64,
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        last_heartbeat: Some(Time(Timestamp::now())),
        models,
        models_summary: (!summary.is_empty()).then(|| summary.join(",")),
    };
    let api: Api<ModelNode> = Api::all(agent.client.clone());
    let body = serde_json::json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode", "status": status});
    api.patch_status(&agent.opts.node_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

pub(super) async fn heartbeat_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(agent.opts.heartbeat_interval) => {}
            _ = agent.inventory_changed.notified() => {}
        }
        if let Err(e) = write_heartbeat(&agent).await {
            warn!(error = %e, "writing the ModelNode heartbeat failed");
        }
    }
}

/// Sets the Node's `models.peat.dev/<model>` labels to exactly `labels` (server-side apply: labels
/// this manager set before and leaves out now are removed).
pub(super) async fn apply_node_labels(agent: &Agent, labels: &BTreeMap<String, String>) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": agent.opts.node_name, "labels": labels},
    });
    nodes.patch(&agent.opts.node_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}
