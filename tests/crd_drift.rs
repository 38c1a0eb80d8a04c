//! `crds/` (and the chart's copy, once it exists) must equal what `peat crds` generates.

use std::path::Path;

fn check(path: &Path, expected: &str) {
    let on_disk = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        on_disk == expected,
        "{} drifted from the Rust types: run `make crds` and commit the result",
        path.display()
    );
}

#[test]
fn checked_in_crds_equal_the_generated_ones() {
    let expected = peat::api::crds_yaml().expect("CRDs serialize");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    check(&root.join("crds/peat.dev.yaml"), &expected);
    let chart_copy = root.join("charts/peat-operator/crds/peat.dev.yaml");
    if root.join("charts/peat-operator").exists() {
        check(&chart_copy, &expected);
    }
}

#[test]
fn generated_crds_have_the_contract_names() {
    let crds = peat::api::crds();
    let names: Vec<_> = crds.iter().map(|c| c.metadata.name.clone().unwrap_or_default()).collect();
    assert_eq!(names, ["modelrollouts.peat.dev", "modeldeployments.peat.dev", "modelnodes.peat.dev"]);
    let short: Vec<_> = crds.iter().map(|c| c.spec.names.short_names.clone().unwrap_or_default()).collect();
    assert_eq!(short, [vec!["mr"], vec!["md"], vec!["mn"]]);
    for crd in &crds {
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["peat".to_string()][..]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{} has a status subresource",
            crd.spec.names.kind
        );
    }
    assert_eq!(crds[2].spec.scope, "Cluster");
    let selectable = crds[1].spec.versions[0].selectable_fields.clone().unwrap_or_default();
    assert_eq!(selectable.iter().map(|f| f.json_path.as_str()).collect::<Vec<_>>(), [".spec.nodeName"]);
}

/// Every property in every schema carries a description: they become `kubectl explain`.
#[test]
fn every_field_is_documented() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let p = format!("{path}.{name}");
                // metadata/apiVersion/kind are Kubernetes' own.
                let own = !matches!(name.as_str(), "metadata" | "apiVersion" | "kind");
                if own && sub.get("description").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
                    missing.push(p.clone());
                }
                if own {
                    walk(&p, sub, missing);
                }
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in peat::api::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema).unwrap();
        walk(&crd.spec.names.kind, &schema, &mut missing);
    }
    // metav1.Condition's own fields are documented by Kubernetes' descriptions.
    assert!(missing.is_empty(), "fields without a doc comment: {missing:#?}");
}
