//! What every reconcile shares: the client, the four caches, the resolver, metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use super::{metrics, resolve};
use crate::api::{ModelDeployment, ModelNode, ModelRollout};
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
    /// Everything known of every node: Node labels joined with ModelNode status.
    pub(crate) fn node_facts(&self) -> BTreeMap<String, NodeFacts> {
        let mut out: BTreeMap<String, NodeFacts> = BTreeMap::new();
        for n in self.nodes.state() {
            let name = n.name_any();
            out.insert(name.clone(), NodeFacts { name, labels: n.labels().clone(), capabilities: None });
        }
        for mn in self.model_nodes.state() {
            let name = mn.name_any();
            let e = out.entry(name.clone()).or_insert_with(|| NodeFacts { name, ..Default::default() });
            e.capabilities = Some(mn.status.clone().unwrap_or_default());
        }
        out
    }
}

/// `namespace/name` of a rollout, for logs and claims.
pub(crate) fn key(r: &ModelRollout) -> String {
    format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any())
}
