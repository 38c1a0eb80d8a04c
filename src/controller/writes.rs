//! Every write the controller makes: ModelDeployments (created, or server-side applied, a few at
//! a time), deletions that tolerate "already gone", the rollout's finalizer, its status (one path)
//! and Events.

use std::collections::BTreeMap;
use std::fmt::Debug;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::warn;

use super::context::Context;
use crate::api::{ModelDeployment, ModelDeploymentSpec, ModelRollout, ModelRolloutStatus};
use crate::plan::strategy::{Plan, controller_uid};

/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "peat-controller";

/// ModelDeployment writes in flight at once within one reconcile: one round trip each, bounded
/// so a big fleet does not flood the API server (its priority-and-fairness limits apply as well).
const WRITE_CONCURRENCY: usize = 16;

/// Deletes `name`; `Ok(false)` when it was already gone.
pub(crate) async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The one way a rollout's status is written: the whole status, server-side applied by
/// [`FIELD_MANAGER`], and only when it differs from what was last written or read. Writing the
/// whole status each time means a field the controller stops setting is removed, not left behind.
pub(crate) struct StatusWriter<'a> {
    rollout: &'a ModelRollout,
    current: Option<ModelRolloutStatus>,
}

impl<'a> StatusWriter<'a> {
    pub(crate) fn new(rollout: &'a ModelRollout) -> Self {
        StatusWriter { rollout, current: rollout.status.clone() }
    }

    /// The status as last written (or read, before any write).
    pub(crate) fn current(&self) -> ModelRolloutStatus {
        self.current.clone().unwrap_or_default()
    }

    pub(crate) async fn write(&mut self, ctx: &Context, status: ModelRolloutStatus) -> Result<(), kube::Error> {
        if self.current.as_ref() == Some(&status) {
            return Ok(()); // nothing changed: no write
        }
        let r = self.rollout;
        let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
        let patch = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "status": status});
        api.patch_status(&r.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.metrics.status_writes.inc();
        self.current = Some(status);
        Ok(())
    }
}

/// Adds `finalizer` to the rollout and returns the rollout as stored with it. The same patch as
/// kube-runtime's `finalizer` helper: a test of the list as read first, so a finalizer someone
/// added meanwhile fails the write (retried) instead of being overwritten.
pub(crate) async fn add_finalizer(
    api: &Api<ModelRollout>,
    r: &ModelRollout,
    finalizer: &str,
) -> Result<ModelRollout, kube::Error> {
    let ops = match &r.metadata.finalizers {
        None => json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                       {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]}]),
        Some(found) => json!([{"op": "test", "path": "/metadata/finalizers", "value": found},
                              {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}]),
    };
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("a well-formed JSON patch");
    api.patch(&r.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch)).await
}

/// Publishes an Event on the rollout (failures are logged, never fatal).
pub(crate) async fn publish(ctx: &Context, r: &ModelRollout, type_: EventType, reason: &str, mut note: String) {
    // The API server refuses event messages over 1024 bytes.
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &r.object_ref(&())).await {
        warn!(error = %e, "publishing an event");
    }
}

/// Makes the rollout's ModelDeployments what `plan` says: applies those that differ from
/// `deployments` (the cache), then deletes those the plan drops.
pub(crate) async fn apply_plan(
    ctx: &Context,
    r: &ModelRollout,
    plan: &Plan,
    deployments: &[std::sync::Arc<ModelDeployment>],
) -> Result<(), kube::Error> {
    let ns = r.namespace().unwrap_or_default();
    let uid = r.uid().unwrap_or_default();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = r.controller_owner_ref(&()).expect("a stored rollout has a uid");
    let existing: BTreeMap<String, &std::sync::Arc<ModelDeployment>> = deployments
        .iter()
        .filter(|md| md.namespace().as_deref() == Some(ns.as_str()))
        .map(|md| (md.name_any(), md))
        .collect();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    // Only what must be written is collected, and each write's future (a few KiB: the request's
    // state) is made when the write starts: collected up front, the futures of a 5,000-node
    // rollout's first reconcile held 15.7 MiB (heaptrack, `make bench`).
    // (Indices, not references, in the stream: a stream item that borrows trips rustc's check of
    // the controller future's Send bound.)
    let todo: Vec<(String, usize, Option<std::sync::Arc<ModelDeployment>>)> = plan
        .apply
        .iter()
        .enumerate()
        .filter_map(|(i, desired)| {
            let name = ModelDeployment::name_for(&desired.model, &desired.node_name);
            match existing.get(&name) {
                Some(md) if same_deployment(md, desired, &uid) => None,
                found => Some((name, i, found.map(|md| (*md).clone()))),
            }
        })
        .collect();
    futures::stream::iter(todo)
        .map(|(name, i, cached)| write_one(ctx, &api, &pp, &ns, &owner, name, &plan.apply[i], cached))
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    futures::stream::iter(0..plan.delete.len())
        .map(|i| delete_one(ctx, &api, &plan.delete[i]))
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Deletes one ModelDeployment, counting the write only when it was there.
async fn delete_one(ctx: &Context, api: &Api<ModelDeployment>, name: &str) -> Result<(), kube::Error> {
    if delete_if_present(api, name).await? {
        ctx.metrics.deployment_writes.inc();
    }
    Ok(())
}

/// Writes one ModelDeployment (its body built here, when the write starts): created when the
/// cache has none by that name, server-side applied when it has one — unless the write removes
/// fields, then merge-patched.
///
/// Why three kinds of write: creating costs the API server less than applying (no read of the
/// absent object, no merge), and a rollout's first reconcile creates a deployment per node. But a
/// create leaves its fields to an Update-operation entry of [`FIELD_MANAGER`], which a later apply
/// by the same manager shares rather than replaces: a field the apply no longer sets (a `serving`
/// or a `maxSizeBytes` dropped from the rollout) would stay, and could make the result invalid
/// (a `serving.path` without `protocol: HttpGet`). A merge patch with those fields set to null
/// removes them whoever owns them. The fields to remove are read from the cache; should it be
/// behind, the write leaves one behind (or fails), the watch brings the deployment as it is, and
/// the next reconcile removes it.
#[allow(clippy::too_many_arguments)]
async fn write_one(
    ctx: &Context,
    api: &Api<ModelDeployment>,
    pp: &PatchParams,
    ns: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    name: String,
    desired: &ModelDeploymentSpec,
    cached: Option<std::sync::Arc<ModelDeployment>>,
) -> Result<(), kube::Error> {
    let obj = deployment_object(&name, ns, owner, desired);
    match cached {
        None => {
            let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match api.create(&post, &obj).await {
                Ok(_) => {}
                // There already (the cache is behind, or someone else made it): applied instead,
                // and both requests counted.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    ctx.metrics.deployment_writes.inc();
                    api.patch(&name, pp, &Patch::Apply(&obj)).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Some(found) => match removing(&found.spec, desired) {
            None => {
                api.patch(&name, pp, &Patch::Apply(&obj)).await?;
            }
            Some(spec) => {
                let patch = json!({"metadata": {"labels": obj.metadata.labels, "ownerReferences": obj.metadata.owner_references},
                                   "spec": spec});
                let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
                api.patch(&name, &pp, &Patch::Merge(&patch)).await?;
            }
        },
    }
    ctx.metrics.deployment_writes.inc();
    Ok(())
}

/// When `desired` lacks fields `found` has (at any depth): the merge patch that makes `found`
/// `desired`, the removed fields as nulls. `None` when nothing is removed.
fn removing(found: &ModelDeploymentSpec, desired: &ModelDeploymentSpec) -> Option<serde_json::Value> {
    /// Sets to null, in `to`, what `from` has and `to` lacks; true when it set any.
    fn nulls(from: &serde_json::Value, to: &mut serde_json::Value) -> bool {
        let (Some(from), Some(to)) = (from.as_object(), to.as_object_mut()) else { return false };
        let mut any = false;
        for (key, was) in from {
            match to.get_mut(key) {
                Some(now) => any |= nulls(was, now),
                None => {
                    to.insert(key.clone(), serde_json::Value::Null);
                    any = true;
                }
            }
        }
        any
    }
    let found = serde_json::to_value(found).ok()?;
    let mut patch = serde_json::to_value(desired).ok()?;
    nulls(&found, &mut patch).then_some(patch)
}

fn deployment_object(
    name: &str,
    ns: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    desired: &ModelDeploymentSpec,
) -> ModelDeployment {
    let mut md = ModelDeployment::new(name, desired.clone());
    md.metadata.namespace = Some(ns.into());
    md.metadata.labels = Some(desired.labels());
    md.metadata.owner_references = Some(vec![owner.clone()]);
    md
}

/// Whether the cached deployment `existing` is what applying `spec` for `owner_uid` would write.
fn same_deployment(existing: &ModelDeployment, spec: &ModelDeploymentSpec, owner_uid: &str) -> bool {
    let labels = match &existing.metadata.labels {
        None => true, // dropped by watches::trim_labels as written for existing.spec, which equals spec
        // Labels others added are left alone: requiring their absence would rewrite the
        // deployment at every reconcile, as an apply does not remove another manager's labels.
        Some(found) => spec.labelled_in(found),
    };
    existing.spec == *spec && controller_uid(existing) == Some(owner_uid) && labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fixtures::owned;

    #[test]
    fn fields_a_write_removes_are_nulls_of_a_merge_patch_at_any_depth() {
        let plain = owned("uid-vision", "edge-1", "1.0.0", "sha256:aa", None).spec;
        let serving: crate::api::ServingSpec =
            serde_json::from_value(json!({"protocol": "HttpGet", "port": 8080, "path": "/ready"})).unwrap();
        let full =
            ModelDeploymentSpec { max_size_bytes: Some(1 << 30), serving: Some(serving.clone()), ..plain.clone() };
        // Nothing removed (the same, a new version, fields added): an apply does it.
        assert_eq!(removing(&full, &full), None);
        assert_eq!(removing(&full, &ModelDeploymentSpec { version: "2.0.0".into(), ..full.clone() }), None);
        assert_eq!(removing(&plain, &full), None);
        // A whole field, and a field inside one.
        let patch = removing(&full, &plain).expect("fields removed");
        assert_eq!((&patch["maxSizeBytes"], &patch["serving"]), (&json!(null), &json!(null)));
        assert_eq!(patch["version"], json!("1.0.0"), "the patch sets the rest as desired");
        let open = crate::api::ServingSpec { path: None, protocol: Default::default(), ..serving };
        let patch =
            removing(&full, &ModelDeploymentSpec { serving: Some(open), ..full.clone() }).expect("path removed");
        assert_eq!(patch["serving"]["path"], json!(null));
        assert_eq!(patch["serving"]["port"], json!(8080));
        assert_eq!(patch["maxSizeBytes"], json!(1 << 30));
    }

    #[test]
    fn a_deployment_is_written_again_unless_its_labels_are_as_written() {
        let mut md = owned("uid-vision", "edge-1", "1.0.0", "sha256:aa", None);
        let spec = md.spec.clone();
        // Cached with labels as written (the watch dropped them): the same.
        md.metadata.labels = None;
        assert!(same_deployment(&md, &spec, "uid-vision"));
        assert!(!same_deployment(&md, &ModelDeploymentSpec { version: "2.0.0".into(), ..spec.clone() }, "uid-vision"));
        assert!(!same_deployment(&md, &spec, "uid-other"));
        // Cached with labels that differ, or none at all (kept by the watch): written again.
        md.metadata.labels = Some(Default::default());
        assert!(!same_deployment(&md, &spec, "uid-vision"));
        md.metadata.labels = Some(spec.labels());
        assert!(same_deployment(&md, &spec, "uid-vision"));
        // A label someone added changes nothing.
        md.labels_mut().insert("team".into(), "vision".into());
        assert!(same_deployment(&md, &spec, "uid-vision"));
    }
}
