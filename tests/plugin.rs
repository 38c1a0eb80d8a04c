//! The kubectl-plugin commands (`peat status|rollback|pause|resume|nodes`, also `kubectl peat …`)
//! against the real API server. Rollout status is written by the test (the controller's part is
//! tested elsewhere): what is checked is what the commands show and change.

mod support;

use std::process::Command;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use peat::api::ModelRollout;
use serde_json::json;

fn peat(args: &[&str], kubeconfig: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peat")).args(args).env("KUBECONFIG", kubeconfig).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn status_pause_resume_rollback_and_nodes() {
    let ctx = support::ctx("plugin").await;
    let kc = &ctx.env.kubeconfig;
    let ns = ctx.ns.as_str();
    let api: Api<ModelRollout> = Api::namespaced(ctx.client.clone(), ns);
    let r = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "vision"},
        "spec": {"model": "vision", "version": "3.0.0", "source": {"repository": "reg.example/m"}, "scope": {"all": {}}}});
    let r = api.patch("vision", &PatchParams::apply("peat-test"), &Patch::Apply(&r)).await.unwrap();
    let status = json!({"status": {
        "observedGeneration": r.metadata.generation, "phase": "Progressing", "totalNodes": 2, "converged": 1,
        "inProgress": 1, "versionDistribution": {"3.0.0": 1, "2.0.0": 1}, "estimatedCompletionSeconds": 90,
        "bytesTransferred": 3_000_000, "bytesReused": 1_000_000,
        "history": [{"version": "1.0.0", "digest": "sha256:a"}, {"version": "2.0.0", "digest": "sha256:b"}],
        "blockers": [{"node": format!("{ns}-b"), "reason": "TransferFailed", "details": "registry unreachable: retrying"}]}});
    api.patch_status("vision", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let mds: Api<peat::api::ModelDeployment> = Api::namespaced(ctx.client.clone(), ns);
    let md = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": format!("vision.{ns}-a"), "labels": {"peat.dev/model": "vision"},
                     "ownerReferences": [{"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "name": "vision", "uid": r.uid().unwrap()}]},
        "spec": {"nodeName": format!("{ns}-a"), "model": "vision", "version": "3.0.0", "variant": "fp16-cuda",
                 "artifact": "reg.example/m@sha256:0000000000000000000000000000000000000000000000000000000000000000"}});
    mds.patch(&format!("vision.{ns}-a"), &PatchParams::apply("peat-test"), &Patch::Apply(&md)).await.unwrap();
    mds.patch_status(
        &format!("vision.{ns}-a"),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
        "phase": "Downloading", "activeVersion": "2.0.0", "bytesTotal": 1000, "bytesDone": 250, "bytesReused": 250}})),
    )
    .await
    .unwrap();

    let (ok, out, err) = peat(&["status", "vision", "-n", ns], kc);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("ModelRollout {ns}/vision  model vision  version 3.0.0")), "{out}");
    assert!(out.contains("converged 1/2") && out.contains("ETA 1m 30s"), "{out}");
    assert!(out.contains("→ 3.0.0") && out.contains("2.0.0"), "per-version rows: {out}");
    assert!(
        out.contains(&format!("{ns}-a"))
            && out.contains("fp16-cuda")
            && out.contains("Downloading")
            && out.contains(" 50%"),
        "{out}"
    );
    assert!(
        out.contains("BLOCKERS") && out.contains("TransferFailed") && out.contains("registry unreachable"),
        "{out}"
    );

    let (ok, out, err) = peat(&["pause", "vision", "-n", ns], kc);
    assert!(ok && out.contains("paused"), "{err}");
    assert!(api.get("vision").await.unwrap().spec.paused);
    let (ok, _, err) = peat(&["resume", "vision", "-n", ns], kc);
    assert!(ok, "{err}");
    assert!(!api.get("vision").await.unwrap().spec.paused);

    let (ok, out, err) = peat(&["rollback", "vision", "-n", ns], kc);
    assert!(ok, "{err}");
    assert!(out.contains("from 3.0.0 to 2.0.0"), "{out}");
    assert_eq!(api.get("vision").await.unwrap().spec.version, "2.0.0");
    let (ok, _, err) = peat(&["rollback", "vision", "-n", ns, "--to", "1.0.0"], kc);
    assert!(ok, "{err}");
    assert_eq!(api.get("vision").await.unwrap().spec.version, "1.0.0");

    // Clear errors: a missing rollout, nothing to roll back to.
    let (ok, _, err) = peat(&["status", "nope", "-n", ns], kc);
    assert!(!ok && err.contains(&format!("modelrollout {ns}/nope not found")), "{err}");
    let (ok, _, err) = peat(&["pause", "nope", "-n", ns], kc);
    assert!(!ok && err.contains(&format!("modelrollout {ns}/nope not found")), "{err}");
    let r2 = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "fresh"},
        "spec": {"model": "fresh", "version": "1.0.0", "source": {"repository": "reg.example/f"}, "scope": {"all": {}}}});
    api.patch("fresh", &PatchParams::apply("peat-test"), &Patch::Apply(&r2)).await.unwrap();
    let (ok, _, err) = peat(&["rollback", "fresh", "-n", ns], kc);
    assert!(!ok && err.contains("no earlier converged version"), "{err}");

    // --watch ends by itself once the rollout converged (for the generation it shows).
    let generation = api.get("vision").await.unwrap().metadata.generation;
    api.patch_status(
        "vision",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Converged", "observedGeneration": generation}})),
    )
    .await
    .unwrap();
    let out = Command::new("timeout")
        .args(["30", env!("CARGO_BIN_EXE_peat"), "status", "vision", "-n", ns, "--watch"])
        .env("KUBECONFIG", kc)
        .output()
        .unwrap();
    assert!(out.status.success(), "--watch did not end on a converged rollout: {:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("phase Converged"));

    // nodes: what agents published.
    let node = support::NodeSpec::new(&format!("{ns}-gpu"), "arm64", 8 << 30, &["cpu", "cuda"]);
    support::register_node(&ctx.client, &node).await;
    let (ok, out, err) = peat(&["nodes"], kc);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with(&node.name)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("arm64") && row.contains("8.00 GiB") && row.contains("cpu,cuda"), "{row}");
}

#[tokio::test]
async fn without_a_cluster_the_commands_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, user: {token: t}}]\n",
    )
    .unwrap();
    for args in [&["status", "x"][..], &["nodes"][..], &["pause", "x"][..]] {
        let (ok, _, err) = peat(args, &kc);
        assert!(!ok && err.contains("cannot reach the cluster"), "{args:?}: {err}");
    }
}
