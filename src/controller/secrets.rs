//! Pull secrets for the agents. Agents may read Secrets only in the peat namespace
//! (`--secret-namespace`); the controller copies each Secret a rollout names there (named by
//! [`pull_secret_copy_name`]) before it writes the deployments that need it, rewrites the copy when
//! the source changes, and deletes copies no rollout names any more.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::context::Context;
use super::writes::{FIELD_MANAGER, delete_if_present};
use crate::api::ModelRollout;
use crate::api::shared::pull_secret_copy_name;

/// Label on every copy (how the sweep finds them).
pub const LABEL_COPY: &str = "peat.dev/pull-secret-copy";
/// Annotation naming the copied Secret, `<namespace>/<name>`.
pub const ANNOTATION_SOURCE: &str = "peat.dev/copied-from";

/// Copies the rollout's pull secret, when it names one, into the peat namespace; writes only when
/// the copy would change. A missing source is left to the resolver, which reports it.
pub(crate) async fn copy_pull_secret(ctx: &Context, r: &ModelRollout) -> Result<(), kube::Error> {
    let (Some(name), Some(ns)) = (r.spec.source.pull_secret.as_deref(), r.namespace()) else { return Ok(()) };
    let Some(source) = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get_opt(name).await? else {
        return Ok(());
    };
    let copy = pull_secret_copy_name(&ns, name);
    let body = json!({"type": source.type_, "data": source.data});
    let fingerprint = format!("{:x}", Sha256::digest(body.to_string().as_bytes()));
    if ctx.secret_copies.lock().expect("copies lock").get(&copy) == Some(&fingerprint) {
        return Ok(());
    }
    let obj = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": copy, "namespace": ctx.secret_namespace,
                     "labels": {LABEL_COPY: "true"}, "annotations": {ANNOTATION_SOURCE: format!("{ns}/{name}")}},
        "type": body["type"], "data": body["data"],
    });
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.secret_namespace);
    api.patch(&copy, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
    info!(source = %format!("{ns}/{name}"), copy = %format!("{}/{copy}", ctx.secret_namespace), "pull secret copied for the agents");
    ctx.secret_copies.lock().expect("copies lock").insert(copy, fingerprint);
    Ok(())
}

/// Deletes the copies no rollout names any more (`leaving`: the uid of a rollout being deleted,
/// which no longer counts).
pub(crate) async fn sweep_pull_secret_copies(ctx: &Context, leaving: Option<&str>) {
    let wanted: HashSet<String> = ctx
        .rollouts
        .state()
        .iter()
        .filter(|r| r.uid().as_deref() != leaving && r.metadata.deletion_timestamp.is_none())
        .filter_map(|r| Some(pull_secret_copy_name(&r.namespace()?, r.spec.source.pull_secret.as_deref()?)))
        .collect();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.secret_namespace);
    let copies = match api.list_metadata(&ListParams::default().labels(&format!("{LABEL_COPY}=true"))).await {
        Ok(l) => l.items,
        Err(e) => return warn!(error = %e, "listing pull secret copies failed"),
    };
    for copy in copies.iter().map(|c| c.name_any()).filter(|c| !wanted.contains(c)) {
        match delete_if_present(&api, &copy).await {
            Ok(_) => {
                ctx.secret_copies.lock().expect("copies lock").remove(&copy);
                info!(copy = %format!("{}/{copy}", ctx.secret_namespace), "pull secret copy deleted: no rollout names it");
            }
            Err(e) => warn!(%copy, error = %e, "deleting a pull secret copy failed"),
        }
    }
}
