//! The four watches: each keeps a cache (reflector store) for the whole life of the process and
//! broadcasts the rollouts its events concern. Every replica keeps them warm, leader or not. A
//! fifth, of pull secrets' metadata, only triggers.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::api::{ModelDeployment, ModelNode, ModelRollout, ModelRolloutSpec};

/// The rollouts to reconcile, from any watch.
pub(crate) type Triggers = broadcast::Sender<ObjectRef<ModelRollout>>;

/// The caches the reconciler reads.
#[derive(Clone)]
pub(crate) struct Caches {
    pub(crate) rollouts: Store<ModelRollout>,
    pub(crate) deployments: Store<ModelDeployment>,
    pub(crate) model_nodes: Store<ModelNode>,
    pub(crate) nodes: Store<NodeMeta>,
}

/// A Node's metadata (the controller reads its labels only).
pub(crate) type NodeMeta = kube::core::PartialObjectMeta<Node>;

/// Starts the four watches on `tasks`; their events go to `triggers`.
pub(crate) fn start(
    client: &Client,
    heartbeat_timeout: Duration,
    triggers: &Triggers,
    tasks: &mut JoinSet<()>,
) -> Caches {
    let rollouts = watch(
        client,
        |r: &mut ModelRollout| r.metadata.managed_fields = None,
        |_| None,
        |r: &ModelRollout| vec![ObjectRef::from_obj(r)],
        triggers,
        tasks,
    );
    let of_model = rollouts.clone();
    // A deployment concerns every rollout of its model: its owner, and rivals waiting for the node.
    // What the controller never reads is dropped before caching (see `keep_identity`), and
    // labels as the controller writes them (see `trim_labels`).
    let deployments = watch(
        client,
        |md: &mut ModelDeployment| {
            keep_identity(&mut md.metadata);
            trim_labels(md);
        },
        |_| None,
        move |md: &ModelDeployment| concerned(&of_model, |r| r.spec.model == md.spec.model),
        triggers,
        tasks,
    );
    let of_node = rollouts.clone();
    // Heartbeats alone do not trigger (staleness is rechecked on a timer); capability changes do.
    let model_nodes = watch(
        client,
        |mn: &mut ModelNode| keep_identity(&mut mn.metadata),
        model_node_fingerprint(heartbeat_timeout),
        move |mn: &ModelNode| {
            let node = mn.name_any();
            concerned(&of_node, |r| scope_may_include(&r.spec, &node))
        },
        triggers,
        tasks,
    );
    let of_labels = rollouts.clone();
    // Nodes matter for their labels only: a metadata-only watch (the API server sends no spec or
    // status, which kubelets update constantly), only name and labels cached (not even the
    // type, which every PartialObjectMeta repeats), and only label changes trigger.
    // (kube: an Api of PartialObjectMeta lists and watches metadata only.)
    let nodes = watch(
        client,
        |n: &mut NodeMeta| {
            n.types = None;
            keep_identity(&mut n.metadata);
        },
        |n: &NodeMeta| kube::runtime::predicates::labels(n),
        move |n: &NodeMeta| {
            let node = n.name_any();
            concerned(&of_labels, |r| r.spec.scope.capable.is_none() && scope_may_include(&r.spec, &node))
        },
        triggers,
        tasks,
    );
    watch_pull_secrets(client, rollouts.clone(), triggers, tasks);
    Caches { rollouts, deployments, model_nodes, nodes }
}

/// A change of a pull secret triggers the rollouts that name it, so a rotated or fixed secret is
/// used at once (not at the next periodic look). Metadata only: the controller caches no secret.
fn watch_pull_secrets(client: &Client, rollouts: Store<ModelRollout>, triggers: &Triggers, tasks: &mut JoinSet<()>) {
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::PartialObjectMeta;
    let api = Api::<PartialObjectMeta<Secret>>::all(client.clone());
    let config = watcher::Config::default().fields("type=kubernetes.io/dockerconfigjson").any_semantic();
    let stream = watcher::watcher(api, config).default_backoff().touched_objects();
    let tx = triggers.clone();
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let secret = match ev {
                Ok(s) => s,
                Err(e) => {
                    warn!(kind = "Secret", error = %e, "watch error (retrying with backoff)");
                    continue;
                }
            };
            let (ns, name) = (secret.namespace(), secret.name_any());
            for r in concerned(&rollouts, |r| {
                r.namespace() == ns && r.spec.source.pull_secret.as_deref() == Some(name.as_str())
            }) {
                let _ = tx.send(r);
            }
        }
    });
}

/// Ready once every watch has its initial list: sets `ready` (for /readyz) and the returned signal.
/// One waiter per store: a store's readiness wakes only the waiter that polled it last
/// (kube-runtime's DelayedInit holds one oneshot waker), so everything else waits on this signal.
pub(crate) fn readiness(caches: &Caches, ready: Arc<AtomicBool>) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let c = caches.clone();
    tokio::spawn(async move {
        for store_ready in [
            c.rollouts.wait_until_ready().await,
            c.deployments.wait_until_ready().await,
            c.model_nodes.wait_until_ready().await,
            c.nodes.wait_until_ready().await,
        ] {
            if store_ready.is_err() {
                return; // a reflector ended: stay unready
            }
        }
        ready.store(true, Ordering::Release);
        let _ = tx.send(true);
        info!("initial lists complete: ready");
    });
    rx
}

/// One watch of every `K` in the cluster: `modify` trims objects before they are cached,
/// `fingerprint` filters updates (see [`forward_changes`]), `concerns` maps an object to rollouts.
fn watch<K>(
    client: &Client,
    modify: impl FnMut(&mut K) + Send + 'static,
    fingerprint: impl Fn(&K) -> Option<u64> + Send + 'static,
    concerns: impl Fn(&K) -> Vec<ObjectRef<ModelRollout>> + Send + 'static,
    triggers: &Triggers,
    tasks: &mut JoinSet<()>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(modify)
        .reflect(writer);
    tasks.spawn(forward_changes(
        stream,
        fingerprint,
        concerns,
        triggers.clone(),
        K::kind(&K::DynamicType::default()).to_string(),
    ));
    store
}

/// Keeps of an object's metadata what the controller reads of ModelDeployments, ModelNodes and
/// Nodes: name, namespace, labels, deletion timestamp, and the controlling owner reference
/// (kind, name, uid). uid, resourceVersion, managedFields (a few KiB per object), annotations,
/// timestamps and the rest go before caching, so the store's keys hold no resourceVersion or uid
/// either (kube's ObjectRef copies both from the object): ~1 KiB less per cached object, at
/// 10,000 nodes three objects each. The watch resumes from the resourceVersions it saw before
/// this trim, which applies to its output only.
fn keep_identity(meta: &mut ObjectMeta) {
    let found = std::mem::take(meta);
    meta.name = found.name;
    meta.namespace = found.namespace;
    meta.labels = found.labels;
    meta.deletion_timestamp = found.deletion_timestamp;
    meta.owner_references = found
        .owner_references
        .map(|refs| {
            refs.into_iter()
                .filter(|o| o.controller == Some(true))
                .map(|o| OwnerReference { api_version: String::new(), block_owner_deletion: None, ..o })
                .collect::<Vec<_>>()
        })
        .filter(|refs| !refs.is_empty());
}

/// Drops a ModelDeployment's labels when every label its spec gives is there with its value
/// ([`crate::api::ModelDeploymentSpec::labelled_in`]): nothing else of them is
/// read, and `labels: None` in the cache means "as the controller writes them" (labels others
/// added may be there too). Otherwise they stay as found (`Some`, possibly empty), and the
/// deployment is written again (see `writes::same_deployment`). A label map costs ~600 bytes per
/// object (a B-tree node and six strings): 6 MiB of a 10,000-node rollout's cache.
fn trim_labels(md: &mut ModelDeployment) {
    let found = md.metadata.labels.take().unwrap_or_default();
    if !md.spec.labelled_in(&found) {
        md.metadata.labels = Some(found);
    }
}

fn concerned(rollouts: &Store<ModelRollout>, pred: impl Fn(&ModelRollout) -> bool) -> Vec<ObjectRef<ModelRollout>> {
    rollouts.state().iter().filter(|r| pred(r)).map(|r| ObjectRef::from_obj(&**r)).collect()
}

/// Whether a rollout's scope depends on Node labels or ModelNode facts of nodes it does not name.
fn scope_may_include(spec: &ModelRolloutSpec, node: &str) -> bool {
    match &spec.scope.nodes {
        Some(names) => names.iter().any(|n| n == node),
        None => true,
    }
}

/// Fingerprint of what planning reads from a ModelNode. Heartbeats alone do not change it, except
/// the first heartbeat after a silence longer than the timeout: a node back from a partition must
/// be re-planned at once (its going silent is caught by the reconciler's recheck timer).
fn model_node_fingerprint(timeout: Duration) -> impl Fn(&ModelNode) -> Option<u64> {
    let revivals: Mutex<HashMap<String, (Option<Timestamp>, u64)>> = Mutex::new(HashMap::new());
    move |mn: &ModelNode| {
        use std::hash::{Hash, Hasher};
        let s = mn.status.clone().unwrap_or_default();
        let hb = s.last_heartbeat.as_ref().map(|t| t.0);
        let mut seen = revivals.lock().expect("fingerprint lock");
        let entry = seen.entry(mn.name_any()).or_insert((None, 0));
        let silent_before = match (entry.0, hb) {
            (Some(prev), Some(now)) => now.as_millisecond() - prev.as_millisecond() > timeout.as_millis() as i64,
            (None, Some(_)) => true,
            _ => false,
        };
        if silent_before {
            entry.1 += 1;
        }
        if hb.is_some() {
            entry.0 = hb;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let available = s.storage_available_bytes() / (64 << 20);
        (s.arch, s.gpus, s.gpu_memory_bytes, s.providers, available, entry.1).hash(&mut h);
        Some(h.finish())
    }
}

/// Drives a reflector stream and broadcasts the rollouts each event concerns. When `fingerprint`
/// gives a value, an update whose fingerprint did not change is not forwarded (a heartbeat, a
/// kubelet status update); deletions always are.
async fn forward_changes<K, S>(
    stream: S,
    fingerprint: impl Fn(&K) -> Option<u64>,
    map: impl Fn(&K) -> Vec<ObjectRef<ModelRollout>>,
    tx: broadcast::Sender<ObjectRef<ModelRollout>>,
    kind: String,
) where
    K: kube::Resource,
    S: futures::Stream<Item = Result<WatchEvent<K>, watcher::Error>>,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let (obj, deleted) = match ev {
            Ok(WatchEvent::Apply(o) | WatchEvent::InitApply(o)) => (o, false),
            Ok(WatchEvent::Delete(o)) => (o, true),
            Ok(_) => continue,
            Err(e) => {
                warn!(%kind, error = %e, "watch error (retrying with backoff)");
                continue;
            }
        };
        let id = format!(
            "{}/{}",
            obj.meta().namespace.clone().unwrap_or_default(),
            obj.meta().name.clone().unwrap_or_default()
        );
        if deleted {
            seen.remove(&id);
        } else if let Some(fp) = fingerprint(&obj)
            && seen.insert(id, fp) == Some(fp)
        {
            continue;
        }
        for r in map(&obj) {
            let _ = tx.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fixtures::owned;

    /// A deployment as the API server holds it after the controller's apply.
    fn as_applied() -> ModelDeployment {
        let mut md = owned("uid-vision", "edge-1", "1.0.0", "sha256:aa", None);
        md.metadata.labels = Some(md.spec.labels());
        md
    }

    #[test]
    fn labels_as_written_are_not_cached() {
        let mut md = as_applied();
        trim_labels(&mut md);
        assert_eq!(md.metadata.labels, None);

        // Labels someone added do not matter: nothing reads them.
        let mut added = as_applied();
        added.labels_mut().insert("team".into(), "vision".into());
        trim_labels(&mut added);
        assert_eq!(added.metadata.labels, None);

        let mut edited = as_applied();
        edited.labels_mut().insert("peat.dev/version".into(), "0.9.0".into());
        trim_labels(&mut edited);
        assert_eq!(edited.labels().get("peat.dev/version").map(String::as_str), Some("0.9.0"));

        // No labels on the server: cached as Some(empty), which is not "as written".
        let mut bare = as_applied();
        bare.metadata.labels = None;
        trim_labels(&mut bare);
        assert_eq!(bare.metadata.labels, Some(Default::default()));
    }

    #[test]
    fn only_what_the_controller_reads_is_cached() {
        let mut md = owned("uid-vision", "edge-1", "1.0.0", "sha256:aa", None);
        let m = &mut md.metadata;
        m.uid = Some("uid-md".into());
        m.resource_version = Some("4711".into());
        m.generation = Some(3);
        m.annotations = Some([("a".to_string(), "b".to_string())].into());
        m.managed_fields = Some(vec![Default::default()]);
        m.labels = Some([("peat.dev/model".to_string(), "vision".to_string())].into());
        m.owner_references.as_mut().unwrap().push(OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "not-the-controller".into(),
            uid: "uid-cm".into(),
            controller: None,
            block_owner_deletion: None,
        });
        keep_identity(&mut md.metadata);
        let m = &md.metadata;
        assert_eq!((m.name.as_deref(), m.namespace.as_deref()), (Some("vision.edge-1"), Some("ml")));
        assert_eq!(m.labels.as_ref().map(|l| l.len()), Some(1));
        assert_eq!((&m.uid, &m.resource_version, &m.generation), (&None, &None, &None));
        assert_eq!((&m.annotations, &m.managed_fields), (&None, &None));
        // The controlling owner stays, as planning and the orphan sweep read it.
        assert_eq!(crate::plan::strategy::controller_uid(&md), Some("uid-vision"));
        let owners = md.owner_references();
        assert_eq!(owners.len(), 1);
        assert_eq!((owners[0].name.as_str(), owners[0].kind.as_str()), ("vision", "ModelRollout"));
    }
}
