//! Registries that require something of their clients: credentials per namespace (Debian's
//! `docker-registry` with htpasswd), rotated pull secrets, and TLS with a private CA.

mod support;

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use oci_client::secrets::RegistryAuth;
use peat::api::{ModelDeployment, ModelRollout, RolloutPhase};
use peat::oci::push::{VariantMeta, push_variant_bytes};
use peat_testenv::{Registry, RegistrySecurity};
use serde_json::json;
use support::{create_node, pseudo_random, start_agent};
use tokio::sync::OnceCell;

const T: Duration = Duration::from_secs(90);

static CONTROLLER: OnceCell<(support::ControllerProc, String)> = OnceCell::const_new();

/// The controller of this binary; returns its namespace (where it copies pull secrets).
async fn controller() -> &'static str {
    let (_, ns) = CONTROLLER
        .get_or_init(|| async {
            let ctx = support::ctx("peat-system").await;
            let c = support::start_controller("controller", &ctx.ns, &[]).await;
            c.wait_leading(T).await;
            (c, ctx.ns)
        })
        .await;
    ns
}

fn cpu() -> VariantMeta {
    VariantMeta { name: "int8-cpu".into(), providers: vec!["cpu".into()], ..Default::default() }
}

/// Writes the pull secret `pull` in `ns` with `user:password` for `registry`.
async fn pull_secret(client: &kube::Client, ns: &str, registry: &str, user: &str, password: &str) {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = json!({"auths": {registry: {"auth": auth}}}).to_string();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pull"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)},
    });
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    api.patch("pull", &PatchParams::apply("peat-test").force(), &Patch::Apply(&secret)).await.expect("a pull secret");
}

async fn apply(client: &kube::Client, ns: &str, spec: serde_json::Value) {
    let rollout =
        json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "m"}, "spec": spec});
    let api: Api<ModelRollout> = Api::namespaced(client.clone(), ns);
    api.patch("m", &PatchParams::apply("peat-test").force(), &Patch::Apply(&rollout)).await.expect("applying");
}

/// The rollout's Ready condition reason, when its status says `pred`.
async fn ready_reason(client: &kube::Client, ns: &str, what: &str, pred: impl Fn(&str) -> bool) -> ModelRollout {
    let api: Api<ModelRollout> = Api::namespaced(client.clone(), ns);
    support::eventually(what, T, || async {
        let r = api.get("m").await.ok()?;
        let ready = r.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?.reason.clone();
        pred(&ready).then_some(r)
    })
    .await
}

#[tokio::test]
async fn credentials_are_per_namespace_and_a_rotated_secret_is_honoured() {
    let peat_ns = controller().await;
    let a = support::ctx("creds-a").await;
    let b = support::ctx("creds-b").await;
    let users = vec![("alice".to_string(), "a-pass".to_string()), ("bob".to_string(), "b-pass".to_string())];
    let security = RegistrySecurity { users, tls: false };
    let registry = Registry::start_secured(&a.env.binaries.registry, &a.env.dir.join(&a.ns).join("registry"), security)
        .await
        .expect("a registry with htpasswd");
    let repo = format!("{}/models/m", registry.addr);
    let auth = RegistryAuth::Basic("alice".into(), "a-pass".into());
    let access = peat::oci::RegistryAccess { insecure: true, auth, ca_bundle: None };
    let files = vec![("model.onnx", pseudo_random(71, 1 << 20))];
    push_variant_bytes(&access.push_client().unwrap(), &access.auth, &repo, "1.0.0", &cpu(), &files)
        .await
        .expect("pushing");

    pull_secret(&a.client, &a.ns, &registry.addr, "alice", "a-pass").await;
    pull_secret(&b.client, &b.ns, &registry.addr, "bob", "wrong").await;
    let (na, nb) = (format!("{}-n", a.ns), format!("{}-n", b.ns));
    for n in [&na, &nb] {
        create_node(&a.client, n, &[]).await;
    }
    let agent_a = start_agent(&na, &a.env.dir.join(&a.ns).join("store"), &[]);
    let _agent_b = start_agent(&nb, &b.env.dir.join(&b.ns).join("store"), &[]);
    let spec = |node: &str| {
        json!({"model": "m", "version": "1.0.0", "scope": {"nodes": [node]},
               "source": {"repository": repo, "insecure": true, "pullSecret": "pull"}})
    };
    apply(&a.client, &a.ns, spec(&na)).await;
    apply(&b.client, &b.ns, spec(&nb)).await;

    // A converges with its credentials; B is refused with its own, whatever A read.
    support::wait_rollout(&a.client, &a.ns, "m", "A converged", T, |r| {
        r.status.as_ref().is_some_and(|s| s.phase == RolloutPhase::Converged && s.converged == 1)
    })
    .await;
    assert!(agent_a.store.join("models/m/current/model.onnx").exists());
    let refused = ready_reason(&b.client, &b.ns, "B refused", |r| r == "RegistryUnauthorized").await;
    let ready = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("refused access"), "{}", ready.message);
    let mds_b: Api<ModelDeployment> = Api::namespaced(b.client.clone(), &b.ns);
    assert!(mds_b.list(&Default::default()).await.unwrap().items.is_empty(), "nothing planned without access");

    // B's secret fixed: the change triggers B's reconcile, which uses it with a client of its own.
    pull_secret(&b.client, &b.ns, &registry.addr, "bob", "b-pass").await;
    support::wait_rollout(&b.client, &b.ns, "m", "B converged after its secret was fixed", T, |r| {
        r.status.as_ref().is_some_and(|s| s.phase == RolloutPhase::Converged && s.converged == 1)
    })
    .await;

    // A's secret rotated to a wrong password: the change triggers A's reconcile, and A's pinned
    // index is not served from what the old credentials read: Ready says the registry refuses.
    pull_secret(&a.client, &a.ns, &registry.addr, "alice", "rotated-wrong").await;
    let r = ready_reason(&a.client, &a.ns, "A refused after the rotation", |r| r == "RegistryUnauthorized").await;
    let st = r.status.unwrap();
    assert_eq!((st.phase, st.converged), (RolloutPhase::Converged, 1), "what is on the nodes stands");

    // The agents read the controller's copies in its namespace; a copy goes with the last rollout naming it.
    let copies: Api<Secret> = Api::namespaced(a.client.clone(), peat_ns);
    let copy_b = peat::api::shared::pull_secret_copy_name(&b.ns, "pull");
    let copy = copies.get(&copy_b).await.expect("B's pull secret copied for the agents");
    assert_eq!(copy.annotations().get("peat.dev/copied-from"), Some(&format!("{}/pull", b.ns)));
    let rollouts_b: Api<ModelRollout> = Api::namespaced(b.client.clone(), &b.ns);
    rollouts_b.delete("m", &Default::default()).await.unwrap();
    support::eventually("B's copy deleted with B's rollout", T, || async {
        matches!(copies.get_opt(&copy_b).await, Ok(None)).then_some(())
    })
    .await;
    let copy_a = peat::api::shared::pull_secret_copy_name(&a.ns, "pull");
    assert!(copies.get_opt(&copy_a).await.unwrap().is_some(), "A's copy stays while A names it");
    // A's secret deleted (revoked): the agents' copy goes at once, not at the next sweep.
    let secrets_a: Api<Secret> = Api::namespaced(a.client.clone(), &a.ns);
    secrets_a.delete("pull", &Default::default()).await.unwrap();
    support::eventually("A's copy deleted with its source", T, || async {
        matches!(copies.get_opt(&copy_a).await, Ok(None)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_tls_registry_with_a_private_ca_is_trusted_with_the_bundle_and_refused_without() {
    controller().await;
    let ctx = support::ctx("tls").await;
    let security = RegistrySecurity { users: vec![], tls: true };
    let registry =
        Registry::start_secured(&ctx.env.binaries.registry, &ctx.env.dir.join(&ctx.ns).join("registry"), security)
            .await
            .expect("a registry serving TLS");
    let ca = registry.ca_pem.clone().expect("its CA");
    let repo = format!("{}/models/m", registry.addr);
    // peat push trusts it with the CA (--ca-file), as the controller and agents will.
    let dir = ctx.env.dir.join(&ctx.ns).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = pseudo_random(81, 1 << 20);
    std::fs::write(dir.join("model.onnx"), &bytes).unwrap();
    let ca_file = ctx.env.dir.join(&ctx.ns).join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let push = |extra: &[&str]| {
        let mut args = vec!["push".to_string(), dir.display().to_string(), "--repository".into(), repo.clone()];
        args.extend(["--version", "1.0.0", "--variant", "int8-cpu", "--providers", "cpu"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(support::peat_binary()).args(&args).output().expect("running peat push")
    };
    let refused = push(&[]);
    assert!(!refused.status.success(), "pushed without trusting the CA");
    let pushed = push(&["--ca-file", &ca_file.display().to_string()]);
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));

    let node = format!("{}-n", ctx.ns);
    create_node(&ctx.client, &node, &[]).await;
    let agent = start_agent(&node, &ctx.env.dir.join(&ctx.ns).join("store"), &[]);
    // Without the bundle: refused, with a message that says what to do.
    let spec = json!({"model": "m", "version": "1.0.0", "scope": {"nodes": [node]}, "source": {"repository": repo}});
    apply(&ctx.client, &ctx.ns, spec.clone()).await;
    let r = ready_reason(&ctx.client, &ctx.ns, "refused without the CA", |r| r == "RegistryUnreachable").await;
    let ready = r.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("not trusted") && ready.message.contains("caBundle"), "{}", ready.message);
    // With it: the controller resolves, the agent pulls through the CA's copy, the bytes arrive.
    let mut with_ca = spec;
    with_ca["source"]["caBundle"] = json!(ca);
    apply(&ctx.client, &ctx.ns, with_ca).await;
    support::wait_rollout(&ctx.client, &ctx.ns, "m", "converged with the CA bundle", T, |r| {
        r.status.as_ref().is_some_and(|s| s.phase == RolloutPhase::Converged && s.converged == 1)
    })
    .await;
    assert!(std::fs::read(agent.store.join("models/m/current/model.onnx")).unwrap() == bytes);
    let md: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let md = md.get(&ModelDeployment::name_for("m", &node)).await.unwrap();
    assert_eq!(md.spec.ca_bundle_secret, Some(peat::api::shared::ca_bundle_copy_name(&ca)), "a name, not the PEM");
}
