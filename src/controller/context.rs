//! What every reconcile shares: the client, the four caches, the resolver, metrics.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use super::{metrics, resolve};
use crate::api::{ModelDeployment, ModelNode, ModelNodeStatus, ModelRollout};
use crate::plan::scope::NodeFacts;

/// Shared state of the reconciler.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) rollouts: Store<ModelRollout>,
    pub(crate) deployments: Store<ModelDeployment>,
    pub(crate) model_nodes: Store<ModelNode>,
    pub(crate) nodes: Store<super::watches::NodeMeta>,
    pub(crate) recorder: Recorder,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) resolver: resolve::Resolver,
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    pub(crate) heartbeat_timeout: Duration,
    /// Where pull secrets are copied for the agents.
    pub(crate) secret_namespace: String,
    /// Copies written by this process: name → fingerprint of what was written.
    pub(crate) secret_copies: Mutex<HashMap<String, String>>,
}

impl Context {
    /// Every Node and ModelNode in the caches, shared: hold them while [`node_facts`] borrows.
    pub(crate) fn node_objects(&self) -> NodeObjects {
        NodeObjects { nodes: self.nodes.state(), model_nodes: self.model_nodes.state() }
    }
}

/// A snapshot of the Node and ModelNode caches (shared objects, nothing copied).
pub(crate) struct NodeObjects {
    nodes: Vec<Arc<super::watches::NodeMeta>>,
    model_nodes: Vec<Arc<ModelNode>>,
}

impl NodeObjects {
    /// Everything known of every node: Node labels joined with ModelNode status, borrowed (names
    /// too: this runs at every reconcile, for every node).
    pub(crate) fn node_facts(&self) -> BTreeMap<Cow<'_, str>, NodeFacts<'_>> {
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let mut out: BTreeMap<Cow<'_, str>, NodeFacts<'_>> = BTreeMap::new();
        for n in &self.nodes {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            let labels = n.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
            out.insert(
                Cow::Borrowed(name),
                NodeFacts { name: Cow::Borrowed(name), labels: Cow::Borrowed(labels), capabilities: None },
            );
        }
        static NO_STATUS: std::sync::LazyLock<ModelNodeStatus> = std::sync::LazyLock::new(ModelNodeStatus::default);
        for mn in &self.model_nodes {
            let name = mn.metadata.name.as_deref().unwrap_or_default();
            let e = out
                .entry(Cow::Borrowed(name))
                .or_insert_with(|| NodeFacts { name: Cow::Borrowed(name), ..Default::default() });
            e.capabilities = Some(Cow::Borrowed(mn.status.as_ref().unwrap_or(&NO_STATUS)));
        }
        out
    }
}

/// `namespace/name` of a rollout, for logs and claims.
pub(crate) fn key(r: &ModelRollout) -> String {
    format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any())
}
