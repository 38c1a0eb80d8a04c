//! The CRDs on a real kube-apiserver (+ kube-controller-manager for garbage collection).

mod support;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Resource;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::ApiResource;
use peat::api::{ModelDeployment, ModelRollout};
use serde_json::{Value, json};

fn valid_rollout(name: &str) -> Value {
    json!({
        "apiVersion": "peat.dev/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": name},
        "spec": {
            "model": "target-recognition",
            "version": "4.2.1",
            "source": {"repository": "registry.example:5000/models/target-recognition"},
            "variant": {"preferredPrecision": "float16", "maxSizeBytes": 2_000_000_000i64},
            "scope": {"capable": {"minGpuMemory": "4Gi", "cpuArch": "arm64", "minStorage": "500Mi"}},
            "priority": "High",
            "strategy": {"maxParallel": "25%", "failureThreshold": 1, "autoRollback": true}
        }
    })
}

/// Sets `path` (dot-separated, under the object) to `value`; `Value::Null` removes the key.
fn with(mut obj: Value, path: &str, value: Value) -> Value {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap();
    let mut cur = &mut obj;
    for p in parts {
        cur = cur.as_object_mut().unwrap().entry(p).or_insert_with(|| json!({}));
    }
    if value.is_null() {
        cur.as_object_mut().unwrap().remove(last);
    } else {
        cur[last] = value;
    }
    obj
}

fn rollouts(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<ModelRollout>(&()))
}

#[tokio::test]
async fn crds_are_established_and_every_example_applies() {
    let ctx = support::ctx("examples").await;
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    for name in ["modelrollouts.peat.dev", "modeldeployments.peat.dev", "modelnodes.peat.dev"] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is Established");
    }

    let examples = support::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 5, "one example per scope kind at least");
    let mut applied = Vec::new();
    for f in &files {
        let out = support::kubectl(&["apply", "-n", &ctx.ns, "-f", f.to_str().unwrap(), "-o", "name"]);
        assert!(out.status.success(), "{} applies: {}", f.display(), String::from_utf8_lossy(&out.stderr));
        applied.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string));
    }
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let listed = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), applied.len(), "every applied example is stored: {applied:?}");
    // Defaults from the schema land on the stored objects.
    let all = listed.items.iter().find(|r| r.spec.scope.all.is_some()).expect("the scope-all example");
    assert_eq!(all.spec.priority, peat::api::Priority::Normal);
}

#[tokio::test]
async fn invalid_specs_are_refused_with_a_message_naming_the_field() {
    let ctx = support::ctx("invalid-specs").await;
    let api = rollouts(&ctx.client, &ctx.ns);
    let base = valid_rollout("probe");
    // A control: the valid object itself is accepted (so the refusals below are about the change).
    let obj: DynamicObject = serde_json::from_value(base.clone()).unwrap();
    api.create(&PostParams { dry_run: true, ..Default::default() }, &obj).await.expect("the valid rollout is accepted");

    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("two scopes at once", with(base.clone(), "spec.scope.all", json!({})), &["spec.scope", "exactly one of"]),
        ("no scope kind", with(base.clone(), "spec.scope", json!({})), &["spec.scope", "exactly one of"]),
        ("no scope at all", with(base.clone(), "spec.scope", Value::Null), &["spec.scope", "Required"]),
        ("version not semver", with(base.clone(), "spec.version", json!("4.2")), &["spec.version", "semantic version"]),
        (
            "version with build metadata",
            with(base.clone(), "spec.version", json!("4.2.1+build7")),
            &["spec.version", "semantic version"],
        ),
        (
            "maxParallel 0%",
            with(base.clone(), "spec.strategy.maxParallel", json!("0%")),
            &["spec.strategy.maxParallel", "1% to 100%"],
        ),
        (
            "maxParallel 101%",
            with(base.clone(), "spec.strategy.maxParallel", json!("101%")),
            &["spec.strategy.maxParallel", "1% to 100%"],
        ),
        (
            "maxParallel 0",
            with(base.clone(), "spec.strategy.maxParallel", json!(0)),
            &["spec.strategy.maxParallel", "greater than 0"],
        ),
        (
            "failureThreshold negative",
            with(base.clone(), "spec.strategy.failureThreshold", json!(-1)),
            &["spec.strategy.failureThreshold"],
        ),
        (
            "failureThreshold 150%",
            with(base.clone(), "spec.strategy.failureThreshold", json!("150%")),
            &["spec.strategy.failureThreshold"],
        ),
        (
            "maxSizeBytes zero",
            with(base.clone(), "spec.variant.maxSizeBytes", json!(0)),
            &["spec.variant.maxSizeBytes", "greater than 0"],
        ),
        (
            "maxSizeBytes negative",
            with(base.clone(), "spec.variant.maxSizeBytes", json!(-5)),
            &["spec.variant.maxSizeBytes"],
        ),
        (
            "bad quantity",
            with(base.clone(), "spec.scope.capable.minGpuMemory", json!("4 gigs")),
            &["spec.scope.capable.minGpuMemory", "quantity"],
        ),
        (
            "negative quantity",
            with(base.clone(), "spec.scope.capable.minStorage", json!("-1Gi")),
            &["spec.scope.capable.minStorage", "positive quantity"],
        ),
        (
            "unknown priority",
            with(base.clone(), "spec.priority", json!("Urgent")),
            &["spec.priority", "Unsupported value"],
        ),
        (
            "model not DNS-1123",
            with(base.clone(), "spec.model", json!("Target_Recognition")),
            &["spec.model", "DNS-1123"],
        ),
        (
            "variant name with selector fields",
            with(base.clone(), "spec.variant.name", json!("fp16-cuda")),
            &["spec.variant", "cannot be combined"],
        ),
        (
            "In without values",
            with(
                base.clone(),
                "spec.scope",
                json!({"nodeSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}}),
            ),
            &["spec.scope.nodeSelector.matchExpressions[0]", "non-empty values"],
        ),
        (
            "unknown selector operator",
            with(
                base.clone(),
                "spec.scope",
                json!({"nodeSelector": {"matchExpressions": [{"key": "tier", "operator": "Like"}]}}),
            ),
            &["operator", "Unsupported value"],
        ),
        (
            "empty node list",
            with(base.clone(), "spec.scope", json!({"nodes": []})),
            &["spec.scope.nodes", "at least one"],
        ),
        (
            "node name not DNS-1123",
            with(base.clone(), "spec.scope", json!({"nodes": ["Edge_1"]})),
            &["spec.scope.nodes", "node names"],
        ),
        (
            "empty capable",
            with(base.clone(), "spec.scope", json!({"capable": {}})),
            &["spec.scope.capable", "at least one of"],
        ),
        (
            "repository with a tag",
            with(base.clone(), "spec.source.repository", json!("reg:5000/models/x:1.0")),
            &["spec.source.repository", "without scheme, tag or digest"],
        ),
        (
            "repository with a scheme",
            with(base.clone(), "spec.source.repository", json!("https://reg/models/x")),
            &["spec.source.repository"],
        ),
        (
            "caBundle that holds no PEM certificate",
            with(base.clone(), "spec.source.caBundle", json!("not a certificate")),
            &["spec.source.caBundle", "PEM certificates"],
        ),
        (
            "caBundle with insecure",
            with(
                with(
                    base.clone(),
                    "spec.source.caBundle",
                    json!("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----"),
                ),
                "spec.source.insecure",
                json!(true),
            ),
            &["spec.source", "exclude each other"],
        ),
        (
            "repository with a space",
            with(base.clone(), "spec.source.repository", json!("reg:5000/models/target recognition")),
            &["spec.source.repository", "OCI reference grammar"],
        ),
        (
            "repository without a host",
            with(base.clone(), "spec.source.repository", json!("/models/x")),
            &["spec.source.repository", "registry host"],
        ),
        (
            "repository with a port but no host",
            with(base.clone(), "spec.source.repository", json!(":5000/models/x")),
            &["spec.source.repository", "OCI reference grammar"],
        ),
        (
            "repository whose first component is not a host",
            with(base.clone(), "spec.source.repository", json!("models/x")),
            &["spec.source.repository", "must start with a registry host"],
        ),
        (
            "repository with an upper-case path",
            with(base.clone(), "spec.source.repository", json!("reg:5000/Models/X")),
            &["spec.source.repository", "no upper case"],
        ),
        (
            "an HTTP GET probe without a path",
            with(base.clone(), "spec.serving", json!({"protocol": "HttpGet", "port": 8080})),
            &["spec.serving", "serving.path is required with protocol HttpGet"],
        ),
        (
            "a path with the Open Inference Protocol",
            with(base.clone(), "spec.serving", json!({"port": 8080, "path": "/ready"})),
            &["spec.serving", "serving.path is only used with protocol HttpGet"],
        ),
        (
            "a serving port out of range",
            with(base.clone(), "spec.serving", json!({"port": 70000})),
            &["spec.serving.port", "1 to 65535"],
        ),
        (
            "no serving port",
            with(base.clone(), "spec.serving", json!({"protocol": "OpenInference"})),
            &["spec.serving.port", "Required"],
        ),
        (
            "a ready timeout of zero",
            with(base.clone(), "spec.serving", json!({"port": 8080, "readyTimeoutSeconds": 0})),
            &["spec.serving.readyTimeoutSeconds", "1 to 86400"],
        ),
        (
            "an unknown serving protocol",
            with(base.clone(), "spec.serving", json!({"port": 8080, "protocol": "Grpc"})),
            &["spec.serving.protocol", "OpenInference", "HttpGet"],
        ),
    ];
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for (what, obj, expected) in cases {
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        match api.create(&PostParams { dry_run: true, ..Default::default() }, &obj).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{what}: {status:?}");
                for e in expected {
                    if !status.message.contains(e) {
                        failures.push(format!("{what}: message lacks {e:?}: {}", status.message));
                    }
                }
            }
            Err(e) => failures.push(format!("{what}: unexpected error {e}")),
        }
    }
    assert!(failures.is_empty(), "refusals not as expected:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn repositories_in_the_oci_reference_grammar_are_accepted() {
    let ctx = support::ctx("api-repo-ok").await;
    let api = rollouts(&ctx.client, &ctx.ns);
    let accepted = [
        "registry.example:5000/models/target-recognition",
        "registry.example/models/target_recognition",
        "localhost:5000/models/x",
        "localhost/a/b",
        "127.0.0.1:5000/models/x.v2",
        "[::1]:5000/models/x__y",
        "REGISTRY.Example:5000/models/a-b--c",
    ];
    let mut failures = Vec::new();
    for repo in accepted {
        let obj = with(valid_rollout("ok"), "spec.source.repository", json!(repo));
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        if let Err(e) = api.create(&PostParams { dry_run: true, ..Default::default() }, &obj).await {
            failures.push(format!("{repo}: {e}"));
        }
    }
    assert!(failures.is_empty(), "valid repositories refused:\n{}", failures.join("\n"));
}

fn deployment(ns: &str, model: &str, node: &str) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "peat.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": ModelDeployment::name_for(model, node),
            "namespace": ns,
            "labels": {"peat.dev/model": model, "peat.dev/node": node, "peat.dev/version": "1.0.0"}
        },
        "spec": {
            "nodeName": node, "model": model, "version": "1.0.0", "variant": "int8-cpu",
            "artifact": format!("127.0.0.1:5000/models/{model}@sha256:{}", "0".repeat(64))
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn a_field_selector_on_node_name_lists_only_that_nodes_deployments() {
    let ctx = support::ctx("field-selector").await;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for (model, node) in [("vision", "edge-1"), ("speech", "edge-1"), ("vision", "edge-2"), ("vision", "edge-10")] {
        api.create(&PostParams::default(), &deployment(&ctx.ns, model, node)).await.unwrap();
    }
    let mine = api.list(&ListParams::default().fields("spec.nodeName=edge-1")).await.unwrap();
    let mut names: Vec<_> = mine.items.iter().map(|m| m.spec.node_name.clone() + "/" + &m.spec.model).collect();
    names.sort();
    assert_eq!(names, ["edge-1/speech", "edge-1/vision"]);
    // An agent's cluster-wide watch works the same way.
    let all_ns: Api<ModelDeployment> = Api::all(ctx.client.clone());
    let other = all_ns.list(&ListParams::default().fields("spec.nodeName=edge-2")).await.unwrap();
    assert_eq!(other.items.iter().filter(|m| m.metadata.namespace.as_deref() == Some(&ctx.ns)).count(), 1);
}

#[tokio::test]
async fn deleting_a_rollout_garbage_collects_its_deployments() {
    let ctx = support::ctx("gc").await;
    let mr_api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let mr: ModelRollout = serde_json::from_value(valid_rollout("owner")).unwrap();
    let mr = mr_api.create(&PostParams::default(), &mr).await.unwrap();
    let owner = mr.controller_owner_ref(&()).expect("owner reference");

    let md_api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let mut owned = deployment(&ctx.ns, "target-recognition", "edge-1");
    owned.metadata.owner_references = Some(vec![owner]);
    let owned = md_api.create(&PostParams::default(), &owned).await.unwrap();
    // Not owned: must survive, so the test shows the collector acts on owner references only.
    md_api.create(&PostParams::default(), &deployment(&ctx.ns, "other-model", "edge-1")).await.unwrap();

    mr_api.delete("owner", &DeleteParams::background()).await.unwrap();
    let uid = owned.metadata.uid.clone().unwrap();
    support::wait_for(
        md_api.clone(),
        &owned.metadata.name.clone().unwrap(),
        "garbage collection of the owned ModelDeployment",
        Duration::from_secs(60),
        kube::runtime::wait::conditions::is_deleted(&uid),
    )
    .await;
    let left: Vec<_> =
        md_api.list(&ListParams::default()).await.unwrap().items.into_iter().map(|m| m.spec.model).collect();
    assert_eq!(left, ["other-model"]);
}

#[tokio::test]
async fn kubectl_explain_prints_the_field_docs() {
    support::env();
    let out = support::kubectl(&["explain", "modelrollout.spec.scope.capable"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["minGpuMemory", "Least GPU memory", "cpuArch", "aarch64", "minStorage", "Least free storage"] {
        assert!(text.contains(needle), "kubectl explain lacks {needle:?}:\n{text}");
    }
    let out = support::kubectl(&["explain", "modeldeployment.status.bytesReused"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("local chunks or layers"));
    // Short names and the category resolve too.
    let out = support::kubectl(&["get", "mr,md,mn", "-A"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = support::kubectl(&["get", "peat", "-A"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
