//! The Helm chart: `helm lint` and `helm template` (the pinned helm, `--kube-version` of the test
//! environment) with the default values and each values file in `ci/`; the schema refuses bad
//! values. `tests/chart_install.rs` installs it into the real environment.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn helm(args: &[&str]) -> (bool, String) {
    static HELM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let helm = HELM.get_or_init(|| peat_testenv::Binaries::ensure(&root()).unwrap_or_else(|e| panic!("{e}")).helm);
    let out = Command::new(helm).args(args).current_dir(root()).output().expect("running helm");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const CHART: &str = "charts/peat-operator";
const KUBE: &str = "--kube-version=1.37.2";

/// The rendered objects of the chart with `values` files.
fn render(values: &[&str]) -> Vec<Value> {
    render_with(values.iter().flat_map(|v| ["-f", v]).collect())
}

/// The rendered objects of the chart with `--set` values.
fn render_set(sets: &[&str]) -> Vec<Value> {
    render_with(sets.iter().flat_map(|v| ["--set", v]).collect())
}

fn render_with(extra: Vec<&str>) -> Vec<Value> {
    let mut args = vec!["template", "peat", CHART, KUBE, "--namespace", "peat-system"];
    args.extend(&extra);
    let (ok, text) = helm(&args);
    assert!(ok, "helm template {extra:?}: {text}");
    text.split("\n---")
        .filter(|doc| doc.lines().any(|l| l.starts_with("kind:")))
        .map(|doc| serde_saphyr::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{e}\n{doc}")))
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objs.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

#[test]
fn lint_passes_with_every_values_file() {
    let mut files: Vec<String> = std::fs::read_dir(root().join("charts/peat-operator/ci"))
        .unwrap()
        .map(|e| format!("charts/peat-operator/ci/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for values in std::iter::once("").chain(files.iter().map(String::as_str)) {
        let mut args = vec!["lint", CHART, KUBE, "--strict"];
        if !values.is_empty() {
            args.extend(["-f", values]);
        }
        let (ok, text) = helm(&args);
        assert!(ok && text.contains("0 chart(s) failed"), "helm lint {values}: {text}");
    }
}

#[test]
fn default_values_render_controller_agent_rbac_and_metrics() {
    let objs = render(&[]);
    let controller = find(&objs, "Deployment", "peat-peat-operator-controller").expect("the controller Deployment");
    assert_eq!(controller["spec"]["replicas"], 2, "HA by default");
    let c = &controller["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"controller") && args.contains(&"--leader-elect=true"), "{args:?}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(controller["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
    let spread = &controller["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname", "replicas spread over nodes by default");
    assert_eq!(spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"], "controller");

    let agent = find(&objs, "DaemonSet", "peat-peat-operator-agent").expect("the agent DaemonSet");
    let spec = &agent["spec"]["template"]["spec"];
    assert_eq!(spec["volumes"][0]["hostPath"]["path"], "/var/lib/peat");
    assert_eq!(spec["tolerations"][0]["operator"], "Exists", "runs on tainted edge nodes too");
    let a = &spec["containers"][0];
    assert_eq!(a["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // The CSI driver (default): privileged, the kubelet's directory shared both ways, a CSIDriver.
    assert_eq!(a["securityContext"]["privileged"], true);
    assert!(a["args"].as_array().unwrap().contains(&"--csi-kubelet-dir=/var/lib/kubelet".into()), "{a}");
    let kubelet =
        a["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "kubelet").expect("the kubelet dir");
    assert_eq!(kubelet["mountPropagation"], "Bidirectional");
    assert_eq!(kubelet["mountPath"], "/var/lib/kubelet");
    let driver = find(&objs, "CSIDriver", "models.peat.dev").expect("the CSIDriver");
    assert_eq!(driver["spec"]["volumeLifecycleModes"][0], "Ephemeral");
    assert_eq!(driver["spec"]["podInfoOnMount"], true);
    assert_eq!(driver["spec"]["attachRequired"], false);
    // Without it, no privilege at all.
    let objs_no_csi = render_set(&["agent.csi.enabled=false"]);
    let a = &find(&objs_no_csi, "DaemonSet", "peat-peat-operator-agent").unwrap()["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(a["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(a["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(a["securityContext"].get("privileged").is_none() && !a["args"].to_string().contains("csi"));
    assert!(find(&objs_no_csi, "CSIDriver", "models.peat.dev").is_none());

    // Least privilege: the agent may not create or delete deployments, nor touch rollouts.
    let role = find(&objs, "ClusterRole", "peat-peat-operator-agent").unwrap();
    let rules = role["rules"].as_array().unwrap();
    for r in rules {
        let res: Vec<&str> = r["resources"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        let verbs: Vec<&str> = r["verbs"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert!(!res.iter().any(|x| x.starts_with("modelrollouts")), "{res:?}");
        if res.contains(&"modeldeployments") {
            assert_eq!(verbs, vec!["get", "list", "watch"]);
        }
        assert!(!verbs.contains(&"delete") && !verbs.contains(&"*"), "{verbs:?}");
    }
    assert!(find(&objs, "Role", "peat-peat-operator-leader-election").is_some(), "leases in the release namespace");
    assert!(find(&objs, "Service", "peat-peat-operator-metrics").is_some());
    assert!(!objs.iter().any(|o| o["kind"] == "ServiceMonitor"), "off by default");
}

#[test]
fn values_files_change_what_they_say() {
    let objs = render(&["charts/peat-operator/ci/ha-values.yaml"]);
    assert_eq!(find(&objs, "Deployment", "peat-peat-operator-controller").unwrap()["spec"]["replicas"], 3);
    let agent = find(&objs, "DaemonSet", "peat-peat-operator-agent").unwrap();
    let args = agent["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--max-bandwidth=10Mi") && args.contains("--storage-capacity=20Gi"), "{args}");
    assert_eq!(agent["spec"]["template"]["spec"]["nodeSelector"]["peat.dev/formation"], "alpha");

    // An affinity of one's own replaces the default spreading.
    let objs = render_set(&[
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=tier",
    ]);
    let affinity =
        &find(&objs, "Deployment", "peat-peat-operator-controller").unwrap()["spec"]["template"]["spec"]["affinity"];
    assert!(affinity.get("podAntiAffinity").is_none() && affinity.get("nodeAffinity").is_some(), "{affinity}");

    let objs = render(&["charts/peat-operator/ci/monitoring-values.yaml"]);
    let sm = objs.iter().find(|o| o["kind"] == "ServiceMonitor").expect("a ServiceMonitor when enabled");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");

    let objs = render(&["charts/peat-operator/ci/controller-only-values.yaml"]);
    assert!(!objs.iter().any(|o| o["kind"] == "DaemonSet"));

    let objs = render(&["charts/peat-operator/ci/gpu-values.yaml"]);
    let pod = &find(&objs, "DaemonSet", "peat-peat-operator-agent").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "nvidia");
    let container = &pod["containers"][0];
    assert!(container["args"].as_array().unwrap().contains(&"--providers=cuda,tensorrt,cpu".into()), "{container}");
    assert!(container["env"].as_array().unwrap().iter().any(|e| e["name"] == "NVIDIA_VISIBLE_DEVICES"), "{container}");
    // A runtime class alone (gVisor, Kata) asks nothing of NVIDIA; without one, no runtime class.
    let objs = render_set(&["agent.runtimeClassName=gvisor"]);
    let pod = &find(&objs, "DaemonSet", "peat-peat-operator-agent").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "gvisor");
    assert!(!pod["containers"][0]["env"].to_string().contains("NVIDIA"), "{pod}");
    let objs = render(&[]);
    let pod = &find(&objs, "DaemonSet", "peat-peat-operator-agent").unwrap()["spec"]["template"]["spec"];
    assert!(pod.get("runtimeClassName").is_none() && !pod["containers"][0]["env"].to_string().contains("NVIDIA"));
}

#[test]
fn the_schema_refuses_bad_values() {
    for bad in [
        "controller.replicas=-1",
        "agent.store=relative/path",
        "agent.maxBandwidth=fast",
        "agent.maxBandwidth=10K",
        "controller.logFormat=xml",
        "agent.extraArgs={providers=cuda}",
        "agent.runtimeClassName=NVIDIA_Runtime",
        "agent.runtimeClassName=a..b",
    ] {
        let (ok, text) = helm(&["template", "peat", CHART, KUBE, "--set", bad]);
        assert!(!ok, "{bad} was accepted");
        assert!(text.contains("values don't meet the specifications of the schema"), "{bad}: {text}");
    }
    let (ok, text) = helm(&["template", "peat", CHART, KUBE, "--set", "controler.replicas=1"]);
    assert!(!ok && text.contains("controler"), "a misspelt key is refused: {text}");
}

#[test]
fn the_rendered_arguments_are_ones_peat_accepts() {
    let objs = render(&["charts/peat-operator/ci/ha-values.yaml", "charts/peat-operator/ci/gpu-values.yaml"]);
    for (kind, name) in [("Deployment", "peat-peat-operator-controller"), ("DaemonSet", "peat-peat-operator-agent")] {
        let obj = find(&objs, kind, name).unwrap();
        let args: Vec<String> = obj["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        // No cluster here: past argument parsing (exit 2 is clap's usage error) it fails to connect.
        let out = Command::new(env!("CARGO_BIN_EXE_peat"))
            .args(&args)
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("NODE_NAME", "n")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(2), "{kind} args {args:?} refused: {err}");
        assert!(!out.status.success(), "no cluster, so it must fail to start: {err}");
    }
}
