//! The Argo CD health check of ModelRollout (`argocd/resource_customizations/peat.dev/ModelRollout/
//! health.lua`), run with Debian's `lua5.1` (the Lua version Argo CD embeds) over its
//! `health_test.yaml` cases, the way Argo CD's own resource-customization tests run them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("argocd/resource_customizations/peat.dev/ModelRollout")
}

fn lua() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("lua5.1")).find(|p| p.is_file()))
        .expect("lua5.1 is not installed (make test installs Debian's lua5.1)")
}

/// A JSON value as a Lua table constructor (JSON null becomes nil, as Argo CD's conversion does).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let escaped: String = s
                .chars()
                .map(|c| match c {
                    '\\' => "\\\\".to_string(),
                    '"' => "\\\"".to_string(),
                    '\n' => "\\n".to_string(),
                    c => c.to_string(),
                })
                .collect();
            format!("\"{escaped}\"")
        }
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_literal(&Value::String(k.clone())), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs health.lua on `obj`; returns (status, message).
fn health(obj: &Value) -> (String, String) {
    let script = std::fs::read_to_string(dir().join("health.lua")).unwrap();
    let program = format!(
        "obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nio.write(tostring(hs.status), \"\\n\", tostring(hs.message), \"\\n\")\n",
        lua_literal(obj)
    );
    let out = Command::new(lua()).args(["-e", &program]).output().expect("running lua5.1");
    assert!(out.status.success(), "health.lua failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (lines.next().unwrap_or_default().to_string(), lines.next().unwrap_or_default().to_string())
}

#[test]
fn every_case_of_health_test_yaml() {
    let cases = yaml(&dir().join("health_test.yaml"));
    let tests = cases["tests"].as_array().expect("health_test.yaml lists tests");
    assert!(tests.len() >= 6, "Healthy, Progressing, Degraded and Suspended are all covered");
    let mut seen = std::collections::BTreeSet::new();
    for case in tests {
        let input = case["inputPath"].as_str().expect("inputPath");
        let want = (
            case["healthStatus"]["status"].as_str().unwrap().to_string(),
            case["healthStatus"]["message"].as_str().unwrap_or_default().to_string(),
        );
        let got = health(&yaml(&dir().join(input)));
        assert_eq!(got, want, "{input}");
        seen.insert(want.0);
    }
    let statuses: Vec<&str> = seen.iter().map(String::as_str).collect();
    assert_eq!(statuses, vec!["Degraded", "Healthy", "Progressing", "Suspended"]);
}

#[test]
fn the_status_the_controller_writes_is_read_as_it_means() {
    // A real status shape from the API types, not hand-written YAML: Converged → Healthy.
    let status = peat::api::ModelRolloutStatus {
        observed_generation: Some(1),
        phase: peat::api::RolloutPhase::Converged,
        total_nodes: 2,
        converged: 2,
        ..Default::default()
    };
    let mut obj =
        serde_json::json!({"metadata": {"name": "r", "generation": 1}, "spec": {"model": "m", "version": "1.0.0"}});
    obj["status"] = serde_json::to_value(&status).unwrap();
    obj["status"]["conditions"] =
        serde_json::json!([{"type": "Converged", "status": "True", "message": "all 2 targets run 1.0.0"}]);
    assert_eq!(health(&obj), ("Healthy".into(), "all 2 targets run 1.0.0".into()));
    obj["spec"]["paused"] = Value::Bool(true);
    assert_eq!(health(&obj).0, "Suspended");
}
