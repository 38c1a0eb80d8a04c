//! `helm install` of the chart into the real environment (every object created; no kubelet, so no
//! pod runs), and node confinement: the agent's service account, impersonated with the node-name
//! extra a pod-bound token carries, may write its own node's objects and is denied another's; it
//! reads Secrets in the release namespace only (`kubectl auth can-i`).

mod support;

use std::process::Command;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::json;

const RELEASE: &str = "peat";

fn helm(args: &[&str]) -> (bool, String) {
    let env = support::env();
    let out = Command::new(&env.binaries.helm)
        .args(args)
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .current_dir(support::repo_root())
        .output()
        .expect("running helm");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A merge patch sent as the agent's service account bound to `node` (or to no node).
async fn as_agent(
    client: &kube::Client,
    ns: &str,
    node: Option<&str>,
    url: &str,
    body: serde_json::Value,
) -> Result<(), String> {
    let mut req = http::Request::patch(url)
        .header("Content-Type", "application/merge-patch+json")
        .header("Impersonate-User", format!("system:serviceaccount:{ns}:{RELEASE}-peat-operator-agent"))
        .header("Impersonate-Group", "system:serviceaccounts")
        .header("Impersonate-Group", format!("system:serviceaccounts:{ns}"))
        .header("Impersonate-Group", "system:authenticated");
    if let Some(n) = node {
        req = req.header("Impersonate-Extra-authentication.kubernetes.io%2fnode-name", n);
    }
    let req = req.body(serde_json::to_vec(&body).unwrap()).unwrap();
    match client.request::<serde_json::Value>(req).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} {}", e.code, e.message)),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn helm_install_creates_everything_and_confines_agents_to_their_node() {
    let ctx = support::ctx("chart-install").await;
    let ns = ctx.ns.as_str();
    let (ok, text) = helm(&["install", RELEASE, "charts/peat-operator", "--namespace", ns]);
    assert!(ok, "helm install: {text}");

    let client = ctx.client.clone();
    let name = format!("{RELEASE}-peat-operator");
    for (group, version, kind, plural, namespaced, obj) in [
        ("apps", "v1", "Deployment", "deployments", true, format!("{name}-controller")),
        ("apps", "v1", "DaemonSet", "daemonsets", true, format!("{name}-agent")),
        ("", "v1", "ServiceAccount", "serviceaccounts", true, format!("{name}-agent")),
        ("", "v1", "ServiceAccount", "serviceaccounts", true, format!("{name}-controller")),
        ("", "v1", "Service", "services", true, format!("{name}-metrics")),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false, format!("{name}-agent")),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            format!("{name}-controller"),
        ),
        ("rbac.authorization.k8s.io", "v1", "Role", "roles", true, format!("{name}-leader-election")),
        ("rbac.authorization.k8s.io", "v1", "Role", "roles", true, format!("{name}-agent-pull-secrets")),
        (
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicy",
            "validatingadmissionpolicies",
            false,
            format!("{name}-agent-node-confinement"),
        ),
        (
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicyBinding",
            "validatingadmissionpolicybindings",
            false,
            format!("{name}-agent-node-confinement"),
        ),
    ] {
        let ar = ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() { version.into() } else { format!("{group}/{version}") },
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> =
            if namespaced { Api::namespaced_with(client.clone(), ns, &ar) } else { Api::all_with(client.clone(), &ar) };
        assert!(api.get_opt(&obj).await.unwrap().is_some(), "{kind} {obj} was not created");
    }

    // Secrets: the agent may read the controller's pull secret copies in the release namespace, and
    // no other Secret (this one, in another namespace, is unrelated).
    let other = support::ctx("chart-install-other").await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &other.ns);
    let unrelated =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "unrelated"}, "stringData": {"k": "v"}});
    secrets.patch("unrelated", &PatchParams::apply("peat-test"), &Patch::Apply(&unrelated)).await.unwrap();
    let agent_sa = format!("system:serviceaccount:{ns}:{name}-agent");
    let can_i = |what: &str, in_ns: &str| {
        let out = support::kubectl(&["auth", "can-i", "get", what, "-n", in_ns, "--as", &agent_sa]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    support::eventually("the agent's Role in force", std::time::Duration::from_secs(30), || async {
        (can_i("secrets", ns) == "yes").then_some(())
    })
    .await;
    assert_eq!(can_i("secret/unrelated", &other.ns), "no", "an agent reads an unrelated Secret");
    assert_eq!(can_i("secrets", "default"), "no");
    let controller_sa = format!("system:serviceaccount:{ns}:{name}-controller");
    let out = support::kubectl(&["auth", "can-i", "create", "secrets", "-n", ns, "--as", &controller_sa]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes", "the controller writes the copies");

    // Two nodes with their ModelNodes and one ModelDeployment each.
    let (a, b) = (format!("{ns}-a"), format!("{ns}-b"));
    for n in [&a, &b] {
        support::register_node(&client, &support::NodeSpec::new(n, "amd64", 0, &["cpu"])).await;
        let mds: Api<peat::api::ModelDeployment> = Api::namespaced(client.clone(), ns);
        let md = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": format!("m.{n}")},
            "spec": {"nodeName": n, "model": "m", "version": "1.0.0", "variant": "v",
                     "artifact": format!("reg/m@sha256:{}", "0".repeat(64))}});
        mds.patch(&format!("m.{n}"), &PatchParams::apply("peat-test"), &Patch::Apply(&md)).await.unwrap();
    }
    let mn = |n: &str| format!("/apis/peat.dev/v1alpha1/modelnodes/{n}/status");
    let md = |n: &str| format!("/apis/peat.dev/v1alpha1/namespaces/{ns}/modeldeployments/m.{n}/status");
    let node = |n: &str| format!("/api/v1/nodes/{n}");
    let status = json!({"status": {"gpus": 0}});
    let md_status = json!({"status": {"phase": "Downloading"}});
    let label = json!({"metadata": {"labels": {"models.peat.dev/m": "1.0.0"}}});

    // The API server enforces a new policy once its informers have it: wait for the first denial.
    support::eventually("the node-confinement policy in force", std::time::Duration::from_secs(30), || {
        let (client, url) = (client.clone(), mn(&b));
        let (a, status) = (a.clone(), status.clone());
        async move { as_agent(&client, ns, Some(&a), &url, status).await.err() }
    })
    .await;
    // Its own node: allowed, with the policy in force (RBAC alone would allow these anyway).
    as_agent(&client, ns, Some(&a), &mn(&a), status.clone()).await.expect("its own ModelNode");
    as_agent(&client, ns, Some(&a), &md(&a), md_status.clone()).await.expect("its own ModelDeployment status");
    as_agent(&client, ns, Some(&a), &node(&a), label.clone()).await.expect("its own Node's labels");
    // Another node: denied, with a message that says why.
    for (what, url, body) in [
        ("ModelNode", mn(&b), status.clone()),
        ("ModelDeployment", md(&b), md_status.clone()),
        ("Node", node(&b), label.clone()),
    ] {
        let err = as_agent(&client, ns, Some(&a), &url, body).await.expect_err(&format!("node {b}'s {what}"));
        assert!(err.starts_with("403"), "{what}: {err}");
        assert!(
            err.contains(&format!("the peat agent of node {a} may not write")) && err.contains(&b),
            "{what}: {err}"
        );
    }
    // A token not bound to a node writes nothing.
    let err = as_agent(&client, ns, None, &mn(&a), status).await.expect_err("an unbound token");
    assert!(err.contains("not bound to a node"), "{err}");

    let (ok, text) = helm(&["uninstall", RELEASE, "--namespace", ns]);
    assert!(ok, "helm uninstall: {text}");
}
