//! The admin endpoints: `/livez`, `/readyz` (ready once every watch has its initial list), `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Shared state of the admin server.
#[derive(Clone)]
pub struct Admin {
    /// Set once every watch has listed.
    pub ready: Arc<AtomicBool>,
    /// The metrics registry.
    pub registry: Arc<Registry>,
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the initial lists")
    }
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &admin.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}

/// Serves the admin endpoints on `addr` until `shutdown`; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    admin: Admin,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series the Grafana dashboard (`dashboards/peat-operator.json`) queries is one the
    /// controller or the agent exports: renaming a metric must not silently blank a panel.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let mut registry = Registry::default();
        let c = crate::controller::metrics::Metrics::new(&mut registry);
        let a = crate::agent::metrics::Metrics::new(&mut registry);
        // Families show only once they have a series.
        let rollout = crate::controller::metrics::RolloutLabels { namespace: "ns".into(), name: "r".into() };
        for family in [&c.converged, &c.failed, &c.total] {
            family.get_or_create(&rollout).set(1);
        }
        c.errors.get_or_create(&crate::controller::metrics::ErrorLabels { category: "kube" }).inc();
        a.transfers.get_or_create(&crate::agent::metrics::ResultLabels { result: "succeeded" }).inc();
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
}
