//! A Kubernetes server without CRD selectable fields (before 1.32, the chart supports 1.30+): this
//! test binary's API server gets the ModelDeployment CRD without `selectableFields`, so a field
//! selector on `spec.nodeName` is refused exactly as an older server refuses it. The agent must
//! still find its deployments (by the `peat.dev/node` label) and converge.

mod support;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use peat::api::{ModelDeployment, ModelRollout, RolloutPhase};
use serde_json::json;
use support::{TestVariant, create_node, push_variant, start_agent};

const T: Duration = Duration::from_secs(90);

#[tokio::test]
async fn an_agent_on_a_server_without_selectable_fields_selects_its_deployments_by_label() {
    let ctx = support::ctx("older-kubernetes").await;
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    // The same field manager as the environment's install: fields it no longer applies are removed.
    let mut crd = serde_json::to_value(
        peat::api::crds().into_iter().find(|c| c.spec.names.kind == "ModelDeployment").expect("the CRD"),
    )
    .unwrap();
    for v in crd["spec"]["versions"].as_array_mut().unwrap() {
        v.as_object_mut().unwrap().remove("selectableFields");
    }
    let name = crd["metadata"]["name"].as_str().unwrap().to_string();
    crds.patch(&name, &PatchParams::apply("peat-testenv").force(), &Patch::Apply(&crd))
        .await
        .expect("patching the CRD");
    let deployments: Api<ModelDeployment> = Api::all(ctx.client.clone());
    let refusal = support::eventually("the field selector refused", T, || {
        let deployments = deployments.clone();
        async move {
            match deployments.list_metadata(&ListParams::default().fields("spec.nodeName=x")).await {
                Err(kube::Error::Api(s)) if s.code == 400 => Some(s.message),
                _ => None,
            }
        }
    })
    .await;
    assert!(refusal.contains("field label not supported"), "{refusal}");

    let controller = support::start_controller("controller", &ctx.ns, &[]).await;
    controller.wait_leading(T).await;
    let repo = format!("{}/models/classifier", ctx.env.registry);
    push_variant(&repo, "1.0.0", TestVariant::Int8Cpu).await;
    let node = format!("{}-n1", ctx.ns);
    create_node(&ctx.client, &node, &[]).await;
    let agent = start_agent(&node, &ctx.env.dir.join(&ctx.ns).join("store"), &[]);

    let rollout = json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "classifier"},
        "spec": {"model": "classifier", "version": "1.0.0", "source": {"repository": repo, "insecure": true},
                 "scope": {"nodes": [node]}},
    });
    let rollouts: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    rollouts.patch("classifier", &PatchParams::apply("peat-test"), &Patch::Apply(&rollout)).await.expect("applying");
    let converged =
        support::eventually("the rollout converged", T, || {
            let rollouts = rollouts.clone();
            async move {
                rollouts.get("classifier").await.ok().filter(|r| {
                    r.status.as_ref().is_some_and(|s| s.phase == RolloutPhase::Converged && s.converged == 1)
                })
            }
        })
        .await;
    assert_eq!(converged.status.unwrap().resolved_version.as_deref(), Some("1.0.0"));
    let current = agent.store.join("models/classifier/current");
    assert_eq!(std::fs::read_link(&current).unwrap().to_str(), Some("1.0.0"), "{}", agent.log_tail());
    assert!(
        std::fs::read_to_string(&agent.log).unwrap().contains("selecting ModelDeployments by the peat.dev/node label"),
        "the agent says which selector it uses"
    );
}
