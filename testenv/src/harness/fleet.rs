//! Nodes and agents played by the test: Node and ModelNode objects, reported phases, and reading back.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use peat::api::{DeploymentPhase, ModelDeployment, ModelNode, ModelNodeStatus, ModelRollout};

use super::env::eventually;

/// What a simulated node reports.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub arch: String,
    pub gpu_memory: i64,
    pub providers: Vec<String>,
    pub free: i64,
}

impl NodeSpec {
    pub fn new(name: &str, arch: &str, gpu_memory: i64, providers: &[&str]) -> Self {
        NodeSpec {
            name: name.into(),
            labels: vec![],
            arch: arch.into(),
            gpu_memory,
            providers: providers.iter().map(|p| p.to_string()).collect(),
            free: 100 << 30,
        }
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
}

/// Registers a Node (no kubelet) and its ModelNode with a fresh heartbeat, as an agent would.
pub async fn register_node(client: &Client, n: &NodeSpec) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: serde_json::Map<String, serde_json::Value> =
        n.labels.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": labels}});
    nodes
        .patch(&n.name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&node))
        .await
        .expect("creating a Node");
    let mns: Api<ModelNode> = Api::all(client.clone());
    let mn = serde_json::json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelNode", "metadata": {"name": n.name}, "spec": {}});
    mns.patch(&n.name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&mn))
        .await
        .expect("creating a ModelNode");
    let status = ModelNodeStatus {
        arch: Some(n.arch.clone()),
        gpus: i32::from(n.gpu_memory > 0),
        gpu_memory_bytes: n.gpu_memory,
        providers: n.providers.clone(),
        storage_free_bytes: n.free,
        storage_total_bytes: n.free * 2,
        agent_version: Some("test".into()),
        last_heartbeat: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    set_model_node_status(client, &n.name, &status).await;
}

pub async fn set_model_node_status(client: &Client, name: &str, status: &ModelNodeStatus) {
    let mns: Api<ModelNode> = Api::all(client.clone());
    mns.patch_status(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"status": status})))
        .await
        .expect("patching ModelNode status");
}

/// Plays the node's agent: reports a phase and active version for a ModelDeployment.
pub async fn report(client: &Client, ns: &str, md: &str, phase: DeploymentPhase, active: Option<&str>, bytes: i64) {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let mut status = serde_json::json!({
        "phase": phase,
        "bytesTotal": bytes,
        "bytesDone": if phase == DeploymentPhase::Operational { bytes } else { bytes / 2 },
        "lastHeartbeat": Timestamp::now().to_string(),
    });
    if let Some(v) = active {
        status["activeVersion"] = serde_json::json!(v);
    }
    if phase == DeploymentPhase::Failed {
        status["reason"] = serde_json::json!("TransferFailed");
        status["message"] = serde_json::json!("digest mismatch (simulated)");
    }
    api.patch_status(md, &PatchParams::default(), &Patch::Merge(serde_json::json!({"status": status})))
        .await
        .unwrap_or_else(|e| panic!("reporting on {ns}/{md}: {e}"));
}

/// The rollout's ModelDeployments, by node.
pub async fn deployments(
    client: &Client,
    ns: &str,
    model: &str,
) -> std::collections::BTreeMap<String, ModelDeployment> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    api.list(&kube::api::ListParams::default().labels(&format!("peat.dev/model={model}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| (m.spec.node_name.clone(), m))
        .collect()
}

/// Waits until the rollout's status satisfies `pred`.
pub async fn wait_rollout(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&ModelRollout) -> bool,
) -> ModelRollout {
    let api: Api<ModelRollout> = Api::namespaced(client.clone(), ns);
    eventually(what, timeout, || {
        let api = api.clone();
        let pred = &pred;
        async move { api.get(name).await.ok().filter(|r| pred(r)) }
    })
    .await
}

/// Creates a Node object (no kubelet) with labels; its agent publishes the ModelNode.
pub async fn create_node(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
    nodes.patch(name, &PatchParams::apply("peat-test").force(), &Patch::Apply(&node)).await.expect("creating a Node");
}
