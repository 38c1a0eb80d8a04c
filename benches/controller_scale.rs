//! `make bench` — controller at scale, on the real environment.
//!
//! Registers N Nodes + ModelNodes, applies one rollout (maxParallel 100%) and prints:
//! - time until all N ModelDeployments exist ÷ the time this benchmark takes to create N such
//!   objects itself (the floors: one after another, and 16 in flight like the controller; also,
//!   for reference, 16 server-side applies in flight). Each side is measured twice, the faster
//!   counting (on a 2-core machine shared with the API server and etcd, runs vary by 20–40 %): the
//!   floors before the controller starts and after it stopped, the controller's creates for two
//!   rollouts (another model the second time). The controller's creates and the in-flight floors
//!   are each timed from the first request until a watch of the objects' metadata has seen the last;
//! - API write requests per node by the controller;
//! - the controller's peak RSS;
//! - the lag between the last simulated agent report and the Converged status;
//! - the controller's CPU seconds during a report storm (every node's status written at once).
//!
//! N = 1000, 5000, then 10000, each when the one before finished in reasonable time
//! (PEAT_BENCH_NODES overrides). Each size removes its objects before the next starts.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use peat::api::shared::LABEL_MODEL;
use peat::api::{DeploymentPhase, ModelDeployment, ModelRollout};
use serde_json::json;

const CONCURRENCY: usize = 32;

async fn write_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("API server /metrics");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let writes = ["verb=\"POST\"", "verb=\"PUT\"", "verb=\"PATCH\"", "verb=\"APPLY\"", "verb=\"DELETE\""];
        if !line.contains("group=\"peat.dev\"") || !writes.iter().any(|w| line.contains(w)) {
            continue;
        }
        let resource = line.split("resource=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        let sub = line.split("subresource=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
        let v: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(if sub.is_empty() { resource.to_string() } else { format!("{resource}/{sub}") }).or_default() += v;
    }
    out
}

async fn run(n: usize, last: bool) -> Duration {
    let bench_start = Instant::now();
    let ctx = support::ctx(&format!("bench-{n}")).await;
    let client = ctx.client.clone();
    let repo = format!("{}/models/bench{n}", ctx.env.registry);
    support::push_two_variants(&repo, "1.0.0").await;
    let prefix = format!("b{n}");
    let nodes: Vec<String> = (0..n).map(|i| format!("{prefix}-node-{i:05}")).collect();
    let t = Instant::now();
    futures::stream::iter(nodes.iter().map(|name| {
        let client = client.clone();
        let prefix = prefix.clone();
        async move {
            let spec = support::NodeSpec::new(name, "amd64", 0, &["cpu"]).label("bench", &prefix);
            support::register_node(&client, &spec).await;
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    println!("  registered {n} Nodes + ModelNodes in {:.1} s", t.elapsed().as_secs_f64());

    // The floors: the same objects written directly by this process, 16 in flight like the
    // controller — created, and (for reference, not a goal) server-side applied as the
    // controller writes them. Measured before the controller starts and again after it stopped;
    // the objects of the first measurement are deleted before the controller starts, as it
    // caches every ModelDeployment and would count scaffolding as its own.
    let floor_ns = support::ctx(&format!("bench-floor-{n}")).await;
    let floor_api: Api<ModelDeployment> = Api::namespaced(client.clone(), &floor_ns.ns);
    let before = in_flight_floors(&floor_api, &repo, &nodes, "a").await;
    for model in ["floor-par-a", "floor-ssa-a"] {
        delete_each(&floor_api, nodes.iter().map(|node| ModelDeployment::name_for(model, node))).await;
    }

    let system = support::ctx(&format!("bench-system-{n}")).await;
    // The simulated nodes heartbeat once, at registration; at 10,000 nodes registering and the
    // run take longer than the default 90 s heartbeat timeout, and every node would look partitioned.
    let controller =
        support::start_controller(&format!("bench-controller-{n}"), &system.ns, &["--heartbeat-timeout", "1h"]).await;
    controller.wait_leading(Duration::from_secs(60)).await;
    let writes_before = write_requests(&client).await;
    let pid = controller.process.pid();
    let rss_idle = support::rss_mib(pid);

    let md_api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ctx.ns);
    let rollouts: Api<ModelRollout> = Api::namespaced(client.clone(), &ctx.ns);
    let cpu_at_apply = cpu_seconds(pid);
    let creates = apply_and_time(&rollouts, "scale", "m", &repo, &prefix, n).await;
    let create_cpu = cpu_seconds(pid) - cpu_at_apply;

    // Simulated agents: every node reports Operational — a report storm, N status writes as fast
    // as this process makes them; the controller's CPU time is read around it.
    let cpu_before = cpu_seconds(pid);
    let storm = Instant::now();
    let names: Vec<String> = md_api
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}=m")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|m| m.metadata.name)
        .collect();
    futures::stream::iter(names.iter().map(|name| {
        let client = client.clone();
        let ns = ctx.ns.clone();
        async move { support::report(&client, &ns, name, DeploymentPhase::Operational, Some("1.0.0"), 1000).await }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let last_report = Instant::now();
    let storm_time = storm.elapsed();
    let converged_at = {
        let s = watcher::watcher(rollouts.clone(), watcher::Config::default().fields("metadata.name=scale"))
            .applied_objects();
        let mut s = std::pin::pin!(s);
        let wait = async {
            while let Some(r) = s.try_next().await.expect("rollout watch") {
                let converged = r.status.as_ref().is_some_and(|st| {
                    st.conditions.iter().any(|c| c.type_ == "Converged" && c.status == "True")
                        && st.converged as usize == n
                });
                if converged {
                    return Instant::now();
                }
            }
            panic!("watch ended")
        };
        tokio::time::timeout(Duration::from_secs(600), wait).await.expect("Converged within 10 min")
    };
    let lag = converged_at.saturating_duration_since(last_report);
    let storm_cpu = cpu_seconds(pid) - cpu_before;
    let writes_after = write_requests(&client).await;
    let delta: BTreeMap<String, f64> = writes_after
        .iter()
        .map(|(k, v)| (k.clone(), v - writes_before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    // Only the controller's writes: the agents' status reports are the simulation's, not the controller's.
    let controller_writes = controller.metric("peat_controller_deployment_writes_total").await.unwrap_or(0.0)
        + controller.metric("peat_controller_status_writes_total").await.unwrap_or(0.0);
    let rss = support::peak_rss_mib(pid);
    let rss_now = support::rss_mib(pid);
    let (anon, file) = (support::status_mib(pid, "RssAnon:"), support::status_mib(pid, "RssFile:"));
    // The creates once more, by a second rollout (another model, the same nodes): the floors are
    // measured twice and the faster counts, so the controller's creates are too.
    let again = apply_and_time(&rollouts, "scale-again", "m2", &repo, &prefix, n).await;

    drop(controller);
    // The floors once more, now that the controller has stopped, and one after another.
    let t = Instant::now();
    for node in &nodes {
        floor_api.create(&PostParams::default(), &floor_object(&repo, node, "floor-seq")).await.expect("direct create");
    }
    let floor = t.elapsed();
    let after = in_flight_floors(&floor_api, &repo, &nodes, "b").await;
    // The faster of the two measurements of each: the API server slows as etcd fills, so a floor
    // measured only before (or only after) would favour one side.
    let floor_parallel = before.0.min(after.0);
    let floor_apply = before.1.min(after.1);

    let create_time = creates.all.min(again.all);
    println!(
        "  all {n} ModelDeployments exist after {:.2} s (first/second rollout {:.2}/{:.2} s); floor: direct creates one by one {:.2} s (ratio {:.2}), 16 in flight {:.2} s (ratio {:.2}; before/after the controller {:.2}/{:.2} s)",
        create_time.as_secs_f64(),
        creates.all.as_secs_f64(),
        again.all.as_secs_f64(),
        floor.as_secs_f64(),
        create_time.as_secs_f64() / floor.as_secs_f64(),
        floor_parallel.as_secs_f64(),
        create_time.as_secs_f64() / floor_parallel.as_secs_f64(),
        before.0.as_secs_f64(),
        after.0.as_secs_f64()
    );
    println!(
        "  (16 applies in flight {:.2} s: controller ÷ that {:.2}; controller CPU while creating {create_cpu:.2} s; the first deployment after {:.2} s)",
        floor_apply.as_secs_f64(),
        create_time.as_secs_f64() / floor_apply.as_secs_f64(),
        creates.first.as_secs_f64()
    );
    println!(
        "  API write requests per node: {:.2} by the controller ({controller_writes:.0} writes); all peat.dev writes in the window: {delta:?}",
        controller_writes / n as f64
    );
    println!(
        "  controller peak RSS: {rss:.1} MiB ({rss_now:.1} MiB once Converged: {anon:.1} anonymous, {file:.1} file-backed; {rss_idle:.1} MiB with the nodes cached, before the rollout)"
    );
    println!("  lag from the last agent report to Converged: {:.2} s", lag.as_secs_f64());
    println!(
        "  report storm: {n} status reports in {:.1} s; controller CPU {storm_cpu:.2} s from the storm's start to Converged",
        storm_time.as_secs_f64()
    );
    if !last {
        // Nothing of this size stays for the next: its controller would cache and reconcile it.
        let gone = json!({"metadata": {"finalizers": null}});
        for rollout in ["scale", "scale-again"] {
            rollouts.patch(rollout, &PatchParams::default(), &Patch::Merge(&gone)).await.unwrap();
        }
        delete_each(&rollouts, ["scale".to_string(), "scale-again".to_string()]).await;
        delete_each(&md_api, names).await;
        delete_each(&md_api, nodes.iter().map(|node| ModelDeployment::name_for("m2", node))).await;
        for model in ["floor-seq", "floor-par-b", "floor-ssa-b"] {
            delete_each(&floor_api, nodes.iter().map(|node| ModelDeployment::name_for(model, node))).await;
        }
        delete_each(&Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()), nodes.clone()).await;
        delete_each(&Api::<peat::api::ModelNode>::all(client.clone()), nodes).await;
    }
    bench_start.elapsed()
}

/// How long a rollout's deployments took to appear, from its apply.
struct Creates {
    /// Until the first.
    first: Duration,
    /// Until the n-th.
    all: Duration,
}

/// Applies rollout `name` of `model` (maxParallel 100%) to the benchmark's `n` nodes and times its
/// ModelDeployments' creation, by the same kind of watch that times the floors.
async fn apply_and_time(
    rollouts: &Api<ModelRollout>,
    name: &str,
    model: &str,
    repo: &str,
    prefix: &str,
    n: usize,
) -> Creates {
    let arrived = Arrivals::watch(rollouts.clone().into_client(), rollouts.namespace().unwrap(), model, n).await;
    let rollout = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": name},
        "spec": {"model": model, "version": "1.0.0", "source": {"repository": repo, "insecure": true},
                 "scope": {"nodeSelector": {"matchLabels": {"bench": prefix}}}, "strategy": {"maxParallel": "100%"}}});
    let applied = Instant::now();
    rollouts.patch(name, &PatchParams::apply("bench").force(), &Patch::Apply(&rollout)).await.unwrap();
    let (first, all) = arrived.all().await;
    Creates { first: first - applied, all: all - applied }
}

/// A ModelDeployment like the controller's, of another model (so that it holds no node against
/// the rollout).
fn floor_object(repo: &str, node: &str, model: &str) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": ModelDeployment::name_for(model, node), "labels": {"peat.dev/model": model, "peat.dev/node": node, "peat.dev/version": "1.0.0"}},
        "spec": {"nodeName": node, "model": model, "version": "1.0.0", "variant": "int8-cpu",
                 "artifact": format!("{repo}@sha256:{}", "0".repeat(64)), "insecure": true}
    }))
    .unwrap()
}

/// Times writing one such object per node, 16 in flight: created (models `floor-par-<tag>`), then
/// server-side applied (`floor-ssa-<tag>`). Each is timed like the controller: until a watch of
/// the objects' metadata has seen the last.
async fn in_flight_floors(api: &Api<ModelDeployment>, repo: &str, nodes: &[String], tag: &str) -> (Duration, Duration) {
    let ns = api.namespace().unwrap();
    let model = format!("floor-par-{tag}");
    let arrived = Arrivals::watch(api.clone().into_client(), ns, &model, nodes.len()).await;
    let t = Instant::now();
    futures::stream::iter(nodes.iter().map(|node| {
        let obj = floor_object(repo, node, &model);
        async move { api.create(&PostParams::default(), &obj).await.expect("direct create") }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    let create = arrived.all().await.1 - t;
    let model = format!("floor-ssa-{tag}");
    let arrived = Arrivals::watch(api.clone().into_client(), ns, &model, nodes.len()).await;
    let t = Instant::now();
    futures::stream::iter(nodes.iter().map(|node| {
        let obj = floor_object(repo, node, &model);
        async move {
            let name = obj.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&obj)).await.expect("direct apply")
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    (create, arrived.all().await.1 - t)
}

/// A watch of ModelDeployments' metadata that says when it has seen the first and the n-th new
/// one. The controller's creates and the floors are both timed by one, so that neither is charged
/// alone for the watch the measurement needs (the API server sends it every object).
struct Arrivals {
    task: tokio::task::JoinHandle<()>,
    done: tokio::sync::oneshot::Receiver<(Instant, Instant)>,
}

impl Arrivals {
    /// Starts watching the ModelDeployments of `model` in `ns`, and returns once the watch has
    /// listed what exists.
    async fn watch(client: kube::Client, ns: &str, model: &str, n: usize) -> Arrivals {
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        // (kube: an Api of PartialObjectMeta lists and watches metadata only.)
        let meta: Api<kube::core::PartialObjectMeta<ModelDeployment>> = Api::namespaced(client, ns);
        let stream = watcher::watcher(meta, watcher::Config::default().labels(&format!("{LABEL_MODEL}={model}")));
        let task = tokio::spawn(async move {
            let (mut listed_tx, mut done_tx) = (Some(listed_tx), Some(done_tx));
            let mut seen = std::collections::HashSet::new();
            let mut first = None;
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(md)) if listed_tx.is_none() => {
                        let first = *first.get_or_insert_with(Instant::now);
                        seen.insert(md.metadata.name.unwrap_or_default());
                        if seen.len() == n
                            && let Some(tx) = done_tx.take()
                        {
                            let _ = tx.send((first, Instant::now()));
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), listed).await.expect("watch listed within 60 s").unwrap();
        Arrivals { task, done }
    }

    /// When the first and the n-th object appeared; fails after 10 minutes.
    async fn all(self) -> (Instant, Instant) {
        let seen = tokio::time::timeout(Duration::from_secs(600), self.done)
            .await
            .expect("all objects within 10 min")
            .expect("the watch ended");
        self.task.abort();
        seen
    }
}

/// Deletes the named objects (none has a finalizer), a few at a time: one request deleting a
/// collection of 20,000 outlasts the API server's request timeout.
async fn delete_each<K>(api: &Api<K>, names: impl IntoIterator<Item = String>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(names.into_iter().map(|name| async move {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => panic!("deleting {name}: {e}"),
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
}

/// User + system CPU seconds of process `pid` so far (/proc/<pid>/stat, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of proc(5); the state, field 3, is index 0 here.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = match std::env::var("PEAT_BENCH_NODES") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![1000, 5000, 10000],
    };
    for (i, n) in sizes.iter().enumerate() {
        println!("controller_scale: {n} nodes");
        let took = run(*n, i + 1 == sizes.len()).await;
        println!("  (this size took {:.0} s in all)", took.as_secs_f64());
        // A larger size only when this one finished in reasonable time: a slow machine prints the
        // figures it has and stops.
        if i + 1 < sizes.len() && took > Duration::from_secs(120 * (*n as u64 / 1000).max(1)) {
            println!("controller_scale: skipping larger sizes ({:.0} s for {n} nodes)", took.as_secs_f64());
            break;
        }
    }
}
