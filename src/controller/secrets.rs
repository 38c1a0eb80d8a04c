//! Pull secrets and CA bundles for the agents. Agents may read Secrets only in the peat namespace
//! (`--secret-namespace`); the controller copies there each pull secret a rollout names (named by
//! [`pull_secret_copy_name`]) and each `source.caBundle` (content-addressed, [`ca_bundle_copy_name`])
//! before it writes the deployments that need them, rewrites a pull secret's copy when the source
//! changes, and deletes copies no rollout needs any more.

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
use crate::api::shared::{ca_bundle_copy_name, pull_secret_copy_name};

/// Label on every copy (how the sweep finds them).
pub const LABEL_COPY: &str = "peat.dev/copy";
/// Annotation naming the copied Secret, `<namespace>/<name>`.
pub const ANNOTATION_SOURCE: &str = "peat.dev/copied-from";

/// Copies the rollouts's CA bundle and pull secret (those it has) for the agents.
pub(crate) async fn copy_for_agents(ctx: &Context, r: &ModelRollout) -> Result<(), kube::Error> {
    copy_ca_bundle(ctx, r).await?;
    copy_pull_secret(ctx, r).await
}

/// Writes the rollout's `source.caBundle` as a Secret (key `ca.crt`) in the peat namespace, once
/// (the name is the content's hash).
async fn copy_ca_bundle(ctx: &Context, r: &ModelRollout) -> Result<(), kube::Error> {
    use base64::Engine;
    let Some(pem) = r.spec.source.ca_bundle.as_deref() else { return Ok(()) };
    let copy = ca_bundle_copy_name(pem);
    if ctx.secret_copies.lock().expect("copies lock").contains_key(&copy) {
        return Ok(());
    }
    let obj = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": copy, "namespace": ctx.secret_namespace, "labels": {LABEL_COPY: "true"}},
        "type": "Opaque",
        "data": {"ca.crt": base64::engine::general_purpose::STANDARD.encode(pem)},
    });
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.secret_namespace);
    api.patch(&copy, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
    ctx.secret_copies.lock().expect("copies lock").insert(copy, String::new());
    Ok(())
}

/// Copies the rollout's pull secret, when it names one, into the peat namespace; writes only when
/// the copy would change. A missing source is left to the resolver, which reports it.
async fn copy_pull_secret(ctx: &Context, r: &ModelRollout) -> Result<(), kube::Error> {
    let (Some(name), Some(ns)) = (r.spec.source.pull_secret.as_deref(), r.namespace()) else { return Ok(()) };
    let copy = pull_secret_copy_name(&ns, name);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.secret_namespace);
    let Some(source) = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get_opt(name).await? else {
        // Gone (revoked): so is the agents' copy; the resolver says what is missing.
        if delete_if_present(&api, &copy).await? {
            ctx.secret_copies.lock().expect("copies lock").remove(&copy);
            info!(copy = %format!("{}/{copy}", ctx.secret_namespace), "copy deleted: its pull secret is gone");
        }
        return Ok(());
    };
    // Only what a registry client reads: a rollout naming some other Secret copies nothing else.
    let data: std::collections::BTreeMap<_, _> = source
        .data
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == ".dockerconfigjson" || k == ".dockercfg")
        .collect();
    let body = json!({"type": source.type_, "data": data});
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
    api.patch(&copy, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
    info!(source = %format!("{ns}/{name}"), copy = %format!("{}/{copy}", ctx.secret_namespace), "pull secret copied for the agents");
    ctx.secret_copies.lock().expect("copies lock").insert(copy, fingerprint);
    Ok(())
}

/// Deletes the copies no rollout needs any more (`leaving`: the uid of a rollout being deleted,
/// which no longer counts).
pub(crate) async fn sweep_pull_secret_copies(ctx: &Context, leaving: Option<&str>) {
    let wanted: HashSet<String> = ctx
        .rollouts
        .state()
        .iter()
        .filter(|r| r.uid().as_deref() != leaving && r.metadata.deletion_timestamp.is_none())
        .flat_map(|r| {
            let pull =
                r.namespace().zip(r.spec.source.pull_secret.clone()).map(|(ns, n)| pull_secret_copy_name(&ns, &n));
            let ca = r.spec.source.ca_bundle.as_deref().map(ca_bundle_copy_name);
            pull.into_iter().chain(ca)
        })
        .collect();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.secret_namespace);
    let copies = match api.list_metadata(&ListParams::default().labels(&format!("{LABEL_COPY}=true"))).await {
        Ok(l) => l.items,
        Err(e) => return warn!(error = %e, "listing the copies for the agents failed"),
    };
    for copy in copies.iter().map(|c| c.name_any()).filter(|c| !wanted.contains(c)) {
        match delete_if_present(&api, &copy).await {
            Ok(_) => {
                ctx.secret_copies.lock().expect("copies lock").remove(&copy);
                info!(copy = %format!("{}/{copy}", ctx.secret_namespace), "copy deleted: no rollout needs it");
            }
            Err(e) => warn!(%copy, error = %e, "deleting a copy failed"),
        }
    }
}
