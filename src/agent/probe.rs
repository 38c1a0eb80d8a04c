//! The prober: every interval it asks each server of a deployment with `spec.serving` whether it
//! serves the active version (Open Inference Protocol: `load`, then the versioned `ready`; or a
//! plain HTTP GET) and hands what it saw to the decision loop as an [`Observation`]. The servers
//! are the node's pods that mount the model through the CSI driver, or one on the host network.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store as Cache;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::act::Wake;
use super::context::Agent;
use super::decide::key_of;
use super::serving::{ConsumerProbe, Observation};
use crate::api::{ModelDeployment, ServingEndpoint, ServingProtocol, ServingSpec};

/// Least time between two load requests of one version to one server (doubling per refusal).
const LOAD_RETRY: Duration = Duration::from_secs(5);

/// A load request to one server for one version.
struct Load {
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
    at: Instant,
    error: Option<String>,
    /// Refused in a row.
    failures: u32,
}

impl Load {
    /// Least time from the last answer to the next request: 5 s, doubling per refusal, at most 2 min.
    fn retry_after(&self) -> Duration {
        (LOAD_RETRY * 2u32.saturating_pow(self.failures.saturating_sub(1))).min(Duration::from_secs(120))
    }
}

/// The error of a request, with its causes (reqwest's own text stops at "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// An HTTP answer that is not 2xx, as a sentence: its `error` field (Open Inference Protocol
/// servers answer `{"error": …}`), else the last line of its body (a server's traceback ends with
/// the exception), at most 200 characters.
async fn refusal(what: &str, response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default().to_string());
    let detail: String = detail.chars().take(200).collect();
    if detail.is_empty() { format!("{what} answered {status}") } else { format!("{what} answered {status}: {detail}") }
}

/// Sends `method path` to the server at `endpoint`: its latency on 2xx, else why not (the
/// server's refusal, or the connection's error with its causes).
async fn ask(
    http: &reqwest::Client,
    method: reqwest::Method,
    endpoint: &str,
    path: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    match http.request(method.clone(), format!("http://{endpoint}{path}")).timeout(timeout).send().await {
        Ok(r) if r.status().is_success() => Ok(started.elapsed()),
        Ok(r) => Err(refusal(&format!("{method} {path}"), r).await),
        Err(e) => Err(error_chain(&e)),
    }
}

fn host_port(address: &str, port: i32) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

/// A server to probe: its name, and its `address:port` or why it has none yet.
type Server = (String, Result<String, String>);

/// The servers of one deployment, and why there is none when there is none.
fn servers(
    agent: &Agent,
    md: &ModelDeployment,
    spec: &ServingSpec,
    pods: Option<&Cache<Pod>>,
) -> (Vec<Server>, Option<String>) {
    let model = &md.spec.model;
    match spec.endpoint {
        ServingEndpoint::Host => (vec![("host".into(), Ok(host_port(&agent.opts.host_address, spec.port)))], None),
        ServingEndpoint::Consumers => {
            let Some(pods) = pods else {
                let why =
                    "serving.endpoint Consumers needs the CSI driver (peat agent --csi-kubelet-dir); none runs here";
                return (Vec::new(), Some(why.into()));
            };
            // (name, endpoint or why not, declares the serving port)
            let mut found: Vec<(String, Result<String, String>, bool)> = Vec::new();
            // The consumers: the node's pods whose spec mounts the model with the driver (an inline
            // CSI volume is always in the pod's spec — the same volume the kubelet publishes).
            for pod in pods.state() {
                let mounts_model = pod.spec.as_ref().is_some_and(|s| {
                    s.volumes.iter().flatten().filter_map(|v| v.csi.as_ref()).any(|c| {
                        c.driver == super::csi::DRIVER
                            && c.volume_attributes.as_ref().and_then(|a| a.get(super::csi::MODEL_ATTRIBUTE))
                                == Some(model)
                    })
                });
                if !mounts_model {
                    continue;
                }
                let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                let status = pod.status.as_ref();
                let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
                // A pod that ran to its end (a job that read the model) serves nothing, ever.
                if phase == "Succeeded" || phase == "Failed" || pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let declares = pod.spec.as_ref().is_some_and(|s| {
                    s.containers.iter().flat_map(|c| c.ports.iter().flatten()).any(|p| p.container_port == spec.port)
                });
                let endpoint = match status.and_then(|s| s.pod_ip.clone()) {
                    Some(ip) if phase == "Running" => Ok(host_port(&ip, spec.port)),
                    _ => Err(format!("pod is {}", if phase.is_empty() { "starting" } else { phase.as_str() })),
                };
                found.push((name, endpoint, declares));
            }
            // A stable order (the cache's is not): the status lists them, and must not churn.
            found.sort_by(|a, b| a.0.cmp(&b.0));
            // The servers: the running pods that declare the port when some do (a job or a debug
            // pod reading the model is then no server), else every running one; pods still
            // starting (a rolling restart's new pod) count only while none runs.
            let running = |f: &&(String, Result<String, String>, bool)| f.1.is_ok();
            let declaring = found.iter().filter(running).any(|f| f.2);
            let chosen: Vec<&(String, Result<String, String>, bool)> = if found.iter().any(|f| f.1.is_ok()) {
                found.iter().filter(running).filter(|f| f.2 || !declaring).collect()
            } else {
                found.iter().collect()
            };
            let out: Vec<Server> = chosen.into_iter().map(|(n, e, _)| (n.clone(), e.clone())).collect();
            let why = out.is_empty().then(|| {
                format!(
                    "no pod on this node mounts model {model} (a CSI volume of driver {} with volumeAttributes.model: {model})",
                    super::csi::DRIVER
                )
            });
            (out, why)
        }
    }
}

/// Probes, every `interval`, the servers of each deployment with `spec.serving` whose version is
/// active, and wakes the decision loop with what it saw.
pub(super) async fn probe_loop(
    agent: Arc<Agent>,
    cache: Cache<ModelDeployment>,
    pods: Option<Cache<Pod>>,
    wakes: mpsc::UnboundedSender<Wake>,
) {
    let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client without TLS builds");
    // By (model, server, endpoint, version): one server may serve several models.
    let mut loads: HashMap<(String, String, String, String), Load> = HashMap::new();
    // The consumers' addresses come from the node's pods: none is judged before their first list.
    if let Some(pods) = &pods
        && pods.wait_until_ready().await.is_err()
    {
        warn!("the watch of the node's pods ended before its first list: consumers cannot be probed");
        return;
    }
    let mut round: u64 = 0;
    loop {
        round += 1;
        let mut seen: HashMap<String, Observation> = HashMap::new();
        let mut wanted_loads = Vec::new();
        let deployments = cache.state();
        let mine = deployments.iter().filter(|m| {
            m.spec.node_name == agent.opts.node_name
                && m.metadata.deletion_timestamp.is_none()
                && m.spec.serving.is_some()
        });
        for md in mine {
            let spec = md.spec.serving.as_ref().expect("filtered");
            let (model, version) = (&md.spec.model, &md.spec.version);
            if agent.store.current(model).as_deref() != Some(version.as_str()) {
                continue;
            }
            let (found, none_because) = servers(&agent, md, spec, pods.as_ref());
            let path = spec.ready_path(model, version);
            let timeout = Duration::from_secs(spec.ready_timeout_seconds.clamp(1, 10) as u64);
            let probes = found.into_iter().map(|(name, endpoint)| {
                let (http, path) = (&http, &path);
                async move {
                    let outcome = match &endpoint {
                        Ok(e) => ask(http, reqwest::Method::GET, e, path, timeout).await,
                        Err(why) => Err(why.clone()),
                    };
                    ConsumerProbe { name, endpoint: endpoint.ok(), outcome }
                }
            });
            let mut consumers = futures::future::join_all(probes).await;
            for latency in consumers.iter().filter_map(|c| c.outcome.as_ref().ok()) {
                agent.metrics.probe_latency.observe(latency.as_secs_f64());
            }
            if spec.protocol == ServingProtocol::OpenInference {
                for c in consumers.iter_mut() {
                    let (Err(why), Some(endpoint)) = (&c.outcome, &c.endpoint) else { continue };
                    let id = (model.clone(), c.name.clone(), endpoint.clone(), version.clone());
                    let load = loads.get(&id);
                    if let Some(error) = load.and_then(|l| l.error.as_ref()) {
                        c.outcome = Err(format!("loading version {version}: {error} (then {why})"));
                    }
                    // Refused loads are retried less and less often (5 s, 10 s, … up to 2 min).
                    let busy = load.is_some_and(|l| l.task.is_some() || l.at.elapsed() < l.retry_after());
                    if !busy {
                        wanted_loads.push((id, Duration::from_secs(spec.ready_timeout_seconds.max(1) as u64)));
                    }
                }
            }
            seen.insert(key_of(md), Observation { round, version: version.clone(), consumers, none_because });
        }
        for (id, timeout) in wanted_loads {
            let (model, name, endpoint, version) = &id;
            info!(%model, %version, server = %name, %endpoint, "asking the model server to load the model");
            // The server reads the files the agent placed; a slow load runs beside the probes.
            let (http, endpoint, path) =
                (http.clone(), endpoint.clone(), format!("/v2/repository/models/{model}/load"));
            let task =
                tokio::spawn(
                    async move { ask(&http, reqwest::Method::POST, &endpoint, &path, timeout).await.map(|_| ()) },
                );
            let (error, failures) = loads.remove(&id).map_or((None, 0), |l| (l.error, l.failures));
            loads.insert(id, Load { task: Some(task), at: Instant::now(), error, failures });
        }
        for ((model, name, _, version), l) in loads.iter_mut() {
            if l.task.as_ref().is_some_and(|t| t.is_finished()) {
                let result = l.task.take().expect("checked").await.unwrap_or_else(|e| Err(e.to_string()));
                match &result {
                    Ok(()) => debug!(%model, server = %name, %version, "the model server loaded the model"),
                    Err(e) => {
                        warn!(%model, server = %name, %version, error = %e, "the model server did not load the model")
                    }
                }
                l.failures = if result.is_ok() { 0 } else { l.failures + 1 };
                l.error = result.err();
                l.at = Instant::now();
            }
        }
        // Loads no longer probed are forgotten (a later return loads again).
        let probed: std::collections::HashSet<(&str, &str, &str, &str)> = seen
            .iter()
            .filter_map(|(key, o)| {
                let md = deployments.iter().find(|m| key_of(m) == *key)?;
                Some((md.spec.model.as_str(), o))
            })
            .flat_map(|(model, o)| {
                o.consumers
                    .iter()
                    .filter_map(move |c| Some((model, c.name.as_str(), c.endpoint.as_deref()?, o.version.as_str())))
            })
            .collect();
        loads.retain(|(m, n, e, v), l| {
            l.task.is_some() || probed.contains(&(m.as_str(), n.as_str(), e.as_str(), v.as_str()))
        });
        let changed = {
            let mut shared = agent.serving.lock().expect("serving lock");
            let changed = *shared != seen;
            *shared = seen;
            changed
        };
        if changed || !agent.serving.lock().expect("serving lock").is_empty() {
            let _ = wakes.send(Wake::Changed);
        }
        tokio::time::sleep(agent.opts.serving_interval).await;
    }
}
