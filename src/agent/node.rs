//! The agent's own Node: its capability annotations, read at start and followed while the agent
//! runs, so what the ModelNode reports changes without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::capabilities::{Capabilities, capability_annotations, detect};
use super::context::Agent;
use super::options::Options;

/// The Node's capability annotations (`peat.dev/arch` …), or none when the Node does not exist.
/// At start; later changes are followed by [`follow_capability_annotations`]. Until the Node can be
/// read it retries: starting without the annotations would publish wrong capabilities (a Jetson
/// without its GPU).
pub(super) async fn read_capability_annotations(client: &Client, node: &str) -> Option<BTreeMap<String, String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut wait = Duration::from_secs(1);
    loop {
        match nodes.get_opt(node).await {
            Ok(Some(n)) => return Some(capability_annotations(n.annotations())),
            Ok(None) => {
                warn!(node, "no Node of this name: capabilities from flags and detection only");
                return None;
            }
            Err(e) => {
                warn!(node, error = %e, retry_in = ?wait, "reading the Node for its capability annotations failed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Detects the capabilities with the flags, then `annotations`, over what is detected; says which
/// annotations were malformed. (NVML calls block: run off the runtime.)
pub(super) async fn detect_capabilities(opts: &Options, annotations: &BTreeMap<String, String>) -> Capabilities {
    let (overrides, problems) = opts.capabilities.with_annotations(annotations);
    for p in problems {
        warn!(node = %opts.node_name, "ignoring a capability annotation: {p}");
    }
    tokio::task::spawn_blocking(move || detect(&overrides)).await.expect("capability detection does not panic")
}

/// Watches this node's Node and, when its capability annotations change from `last`, recomputes
/// what the ModelNode reports and writes it at once (no agent restart needed). Other Node changes
/// (the kubelet's status, our own labels) are ignored.
pub(super) async fn follow_capability_annotations(
    agent: Arc<Agent>,
    mut last: Option<BTreeMap<String, String>>,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", agent.opts.node_name));
    let mut events = std::pin::pin!(watcher(nodes, wc).default_backoff().applied_objects());
    loop {
        let node = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.next() => match ev {
                Some(Ok(node)) => node,
                Some(Err(e)) => {
                    warn!(error = %e, "watching the Node for capability annotations");
                    continue;
                }
                None => return,
            },
        };
        let now = capability_annotations(node.annotations());
        if last.as_ref() == Some(&now) {
            continue;
        }
        let caps = detect_capabilities(&agent.opts, &now).await;
        last = Some(now);
        let changed = {
            let mut current = agent.caps.lock().expect("caps lock");
            std::mem::replace(&mut *current, caps.clone()) != caps
        };
        if changed {
            info!(node = %agent.opts.node_name, ?caps, "capability annotations changed");
            agent.inventory_changed.notify_one();
        }
    }
}

/// How the agent selects its ModelDeployments: by the `spec.nodeName` field where the API server
/// supports CRD selectable fields (Kubernetes 1.32+, beta in 1.31), else by the `peat.dev/node`
/// label the controller sets (node names of at most 63 characters, the limit of a label value).
/// Decided once at start by asking the server; a refusal of the field names the fallback in the log.
pub(super) async fn deployments_selector(client: &Client, node: &str) -> anyhow::Result<watcher::Config> {
    use crate::api::ModelDeployment;
    use crate::api::shared::LABEL_NODE;
    use kube::api::ListParams;
    let api: Api<ModelDeployment> = Api::all(client.clone());
    let by_field = format!("spec.nodeName={node}");
    let mut wait = Duration::from_secs(1);
    loop {
        match api.list_metadata(&ListParams::default().fields(&by_field).limit(1)).await {
            Ok(_) => return Ok(watcher::Config::default().fields(&by_field)),
            Err(kube::Error::Api(s)) if field_selector_unsupported(s.code, &s.message) => {
                if node.len() > 63 {
                    anyhow::bail!(
                        "this API server cannot select ModelDeployments by spec.nodeName (CRD selectable fields need \
                         Kubernetes 1.32+), and the node name {node:?} is longer than the 63 characters of the \
                         {LABEL_NODE} label: upgrade the cluster or use a shorter node name"
                    );
                }
                info!(
                    node,
                    "the API server has no CRD selectable fields: selecting ModelDeployments by the {LABEL_NODE} label"
                );
                return Ok(watcher::Config::default().labels(&format!("{LABEL_NODE}={node}")));
            }
            Err(e) => {
                warn!(node, error = %e, retry_in = ?wait, "asking the API server how to select ModelDeployments failed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The API server's answer to a field selector on a field the CRD does not make selectable.
fn field_selector_unsupported(code: u16, message: &str) -> bool {
    code == 400 && message.contains("field label not supported")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_refused_field_label_means_no_selectable_fields() {
        assert!(super::field_selector_unsupported(400, "field label not supported: spec.nodeName"));
        assert!(!super::field_selector_unsupported(403, "forbidden"));
        assert!(!super::field_selector_unsupported(400, "unable to parse requirement"));
    }
}
