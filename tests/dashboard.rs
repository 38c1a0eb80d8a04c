//! The Grafana dashboard and the exported metrics agree (a unit check, kept beside the tests
//! because it reads both the controller's and the agent's metrics, which `admin` must not import).

use prometheus_client::registry::Registry;

/// Every series the Grafana dashboard (`dashboards/peat-operator.json`) queries is one the
/// controller or the agent exports: renaming a metric must not silently blank a panel.
#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let mut registry = Registry::default();
    let c = peat::controller::metrics::Metrics::new(&mut registry);
    let a = peat::agent::metrics::Metrics::new(&mut registry);
    // Families show only once they have a series.
    let rollout = peat::controller::metrics::RolloutLabels { namespace: "ns".into(), name: "r".into() };
    for family in [&c.converged, &c.failed, &c.total, &c.serving] {
        family.get_or_create(&rollout).set(1);
    }
    c.errors.get_or_create(&peat::controller::metrics::ErrorLabels { category: "kube" }).inc();
    a.transfers.get_or_create(&peat::agent::metrics::ResultLabels { result: "succeeded" }).inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut exported = std::collections::BTreeSet::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = line.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        match kind {
            "counter" => exported.insert(format!("{name}_total")),
            "histogram" => ["_bucket", "_sum", "_count"].iter().all(|s| exported.insert(format!("{name}{s}"))),
            _ => exported.insert(name.to_string()),
        };
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../dashboards/peat-operator.json")).expect("the dashboard is JSON");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("peat_") {
                    assert!(
                        exported.contains(word),
                        "panel {:?} queries {word}, which nothing exports ({exported:?})",
                        panel["title"]
                    );
                    queried += 1;
                }
            }
        }
    }
    assert!(queried >= 10, "the dashboard covers the controller and the agent: {exported:?}");
}
