//! Serving: whether the node's model server serves the active version, for deployments with
//! `spec.serving`. Three parts:
//! - the consumers: pods that mounted the model through the CSI driver (recorded on disk at
//!   publish, so an agent restart keeps them), or a server on the host network;
//! - the prober (I/O): every interval it asks each consumer whether it serves the active version
//!   (Open Inference Protocol: `load`, then the versioned `ready`; or a plain HTTP GET), and hands
//!   what it saw to the decision loop as an [`Observation`];
//! - [`assess`] (pure): from the observations over time to a phase — Loading until ready for
//!   `minReadySeconds`, Operational, Degraded above `degradedLatencyMilliseconds` or when a server
//!   that served stops answering, Failed when not ready within `readyTimeoutSeconds`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store as Cache;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::act::Wake;
use super::context::Agent;
use super::decide::key_of;
use crate::api::{
    DeploymentPhase, ModelDeployment, ServingConsumer, ServingEndpoint, ServingProtocol, ServingSpec, ServingStatus,
};

/// Consumers listed in a status (the count is not bounded, the list is).
pub const MAX_LISTED_CONSUMERS: usize = 16;
/// Least time between two load requests of one version to one server (doubling per refusal).
const LOAD_RETRY: Duration = Duration::from_secs(5);
/// A probe's latency in the status is refreshed at least this often while nothing else changes
/// (every probe would be a status write per second per node).
const LATENCY_REFRESH: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Consumers

/// A pod that mounted a model through the CSI driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    /// The CSI volume id the kubelet gave the mount.
    pub volume_id: String,
    /// The model it mounts.
    pub model: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid (a new pod of the same name is another consumer).
    pub uid: String,
}

/// The node's consumers, by volume id; each also a file under `<store>/consumers/`, so that an
/// agent restarted while pods run still knows them (the kubelet does not publish again).
pub struct Consumers {
    dir: PathBuf,
    by_volume: Mutex<BTreeMap<String, Consumer>>,
}

fn file_name(volume_id: &str) -> String {
    use sha2::Digest;
    format!("{:x}.json", sha2::Sha256::digest(volume_id.as_bytes()))
}

impl Consumers {
    /// Reads the consumers recorded under `dir` (created if missing); unreadable records are skipped.
    pub fn open(dir: &Path) -> std::io::Result<Consumers> {
        std::fs::create_dir_all(dir)?;
        let mut by_volume = BTreeMap::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let parsed = std::fs::read(entry.path()).ok().and_then(|b| serde_json::from_slice::<Consumer>(&b).ok());
            match parsed {
                Some(c) => {
                    by_volume.insert(c.volume_id.clone(), c);
                }
                None => warn!(file = %entry.path().display(), "skipping an unreadable consumer record"),
            }
        }
        Ok(Consumers { dir: dir.to_path_buf(), by_volume: Mutex::new(by_volume) })
    }

    /// Records a consumer (written before the mount is reported, so a crash cannot lose it).
    pub fn add(&self, consumer: Consumer) -> std::io::Result<()> {
        let path = self.dir.join(file_name(&consumer.volume_id));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&consumer).expect("a consumer serializes"))?;
        std::fs::rename(&tmp, &path)?;
        self.by_volume.lock().expect("consumers lock").insert(consumer.volume_id.clone(), consumer);
        Ok(())
    }

    /// Forgets the consumer of `volume_id`, if any.
    pub fn remove(&self, volume_id: &str) -> std::io::Result<()> {
        self.by_volume.lock().expect("consumers lock").remove(volume_id);
        match std::fs::remove_file(self.dir.join(file_name(volume_id))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The consumers of `model`, in a stable order.
    pub fn of_model(&self, model: &str) -> Vec<Consumer> {
        let all = self.by_volume.lock().expect("consumers lock");
        let mut out: Vec<Consumer> = all.values().filter(|c| c.model == model).cloned().collect();
        out.sort_by(|a, b| (&a.namespace, &a.pod, &a.volume_id).cmp(&(&b.namespace, &b.pod, &b.volume_id)));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Assessment (pure)

/// One server, probed once.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerProbe {
    /// `namespace/pod`, or `host`.
    pub name: String,
    /// `address:port`, once known.
    pub endpoint: Option<String>,
    /// Ready with this latency, or why not.
    pub outcome: Result<Duration, String>,
}

/// What the prober saw of one deployment's servers, for one version.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// The prober's round: the same observation seen by two passes counts once.
    pub round: u64,
    /// The version probed (the active one).
    pub version: String,
    /// Each server probed; empty when there is none.
    pub consumers: Vec<ConsumerProbe>,
    /// Why there is no server, when there is none.
    pub none_because: Option<String>,
}

/// Probes in a row it takes to call a server that served slow or gone, or a slow one fast again:
/// one late answer (a pause, a busy node) is no change of state.
pub const STREAK: u32 = 3;

/// What the agent remembers of one deployment's serving between passes.
#[derive(Clone, Debug)]
pub struct Track {
    /// The version it is about; another version starts afresh.
    pub version: String,
    /// When this agent first saw the version active (the start of `readyTimeoutSeconds`).
    pub activated: Instant,
    /// Since when every server has answered ready, continuously.
    pub ready_since: Option<Instant>,
    /// Whether it was Operational once (then not-ready is Degraded, not Failed).
    pub operational: bool,
    /// The last probe round counted.
    pub round: u64,
    /// Rounds in a row: not all ready; ready but slow; ready and fast.
    pub streaks: (u32, u32, u32),
    /// Slow, as of the streaks (Degraded while Operational).
    pub slow: bool,
    /// The `ready` value last reported, and since when (wall clock, whole seconds: as stored).
    pub ready: Option<(bool, Timestamp)>,
    /// The phase and latency last shown in the status, and when.
    pub shown: Option<(DeploymentPhase, Option<i64>, Instant)>,
    /// The last verdict, kept while a server that served misses fewer than [`STREAK`] probes.
    pub last: Option<Assessment>,
}

impl Track {
    fn new(version: &str, now: Instant) -> Track {
        Track {
            version: version.to_string(),
            activated: now,
            ready_since: None,
            operational: false,
            round: 0,
            streaks: (0, 0, 0),
            slow: false,
            ready: None,
            shown: None,
            last: None,
        }
    }

    /// What an agent that restarted knows from the status it wrote before: the version served
    /// (Operational or Degraded), so a server slow to answer after a reboot is Degraded, not Failed.
    pub fn resumed(version: &str, phase: DeploymentPhase, status: &ServingStatus, now: Instant) -> Option<Track> {
        let served = matches!(phase, DeploymentPhase::Operational | DeploymentPhase::Degraded);
        (served && status.version == version).then(|| Track {
            operational: true,
            ready: status.since.as_ref().map(|t| (status.ready, t.0)),
            shown: Some((phase, status.latency_milliseconds, now)),
            ..Track::new(version, now)
        })
    }
}

/// The verdict of one pass on a deployment whose version is active.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    /// Loading, Operational, Degraded or Failed.
    pub phase: DeploymentPhase,
    /// For a person.
    pub message: Option<String>,
    /// The status's serving section.
    pub status: ServingStatus,
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Judges the servers of `model` at `version` (active on the node) from the latest `observation`.
/// `track` carries the soak, the timeout's start, the streaks and the transitions between passes.
pub fn assess(
    model: &str,
    spec: &ServingSpec,
    version: &str,
    track: &mut Option<Track>,
    observation: Option<&Observation>,
    now: Instant,
    wall: Timestamp,
) -> Assessment {
    if track.as_ref().is_none_or(|t| t.version != version) {
        *track = Some(Track::new(version, now));
    }
    let t = track.as_mut().expect("set above");
    let observation = observation.filter(|o| o.version == version);
    let consumers = observation.map_or(&[][..], |o| &o.consumers[..]);
    let all_ready = !consumers.is_empty() && consumers.iter().all(|c| c.outcome.is_ok());
    let latency = consumers.iter().filter_map(|c| c.outcome.as_ref().ok()).max().copied();
    let measured = latency.map(millis);
    let slow = measured.zip(spec.degraded_latency_milliseconds).is_some_and(|(l, limit)| l > i64::from(limit));
    if let Some(o) = observation.filter(|o| o.round != t.round) {
        t.round = o.round;
        let (failing, slows, fasts) = t.streaks;
        t.streaks = match (all_ready, slow) {
            (false, _) => (failing + 1, 0, 0),
            (true, true) => (0, slows + 1, 0),
            (true, false) => (0, 0, fasts + 1),
        };
        if t.streaks.1 >= STREAK || (slow && !t.operational) {
            t.slow = true;
        }
        if t.streaks.2 >= STREAK || (!slow && !t.operational) {
            t.slow = false;
        }
    }
    // A server that served and misses a probe or two: nothing changes yet.
    if !all_ready
        && t.operational
        && t.streaks.0 < STREAK
        && let Some(last) = &t.last
    {
        return last.clone();
    }
    let why_not = match observation {
        None => "no probe of the model server yet".to_string(),
        Some(o) if o.consumers.is_empty() => o.none_because.clone().unwrap_or_else(|| "no model server".into()),
        Some(o) => o
            .consumers
            .iter()
            .find_map(|c| c.outcome.as_ref().err().map(|e| format!("{}: {e}", c.name)))
            .unwrap_or_default(),
    };
    let (phase, message) = if all_ready {
        let since = *t.ready_since.get_or_insert(now);
        let soak = Duration::from_secs(spec.min_ready_seconds.max(0) as u64);
        if !t.operational && now.duration_since(since) < soak {
            // Unchanged while the soak runs: one status write, not one per probe.
            let msg = format!(
                "version {version} answers ready; Operational once ready for minReadySeconds {} without a break",
                spec.min_ready_seconds
            );
            (DeploymentPhase::Loading, Some(msg))
        } else {
            t.operational = true;
            if t.slow { (DeploymentPhase::Degraded, None) } else { (DeploymentPhase::Operational, None) }
        }
    } else {
        t.ready_since = None;
        let timeout = Duration::from_secs(spec.ready_timeout_seconds.max(1) as u64);
        if t.operational {
            (DeploymentPhase::Degraded, Some(format!("version {version} is no longer served: {why_not}")))
        } else if now.duration_since(t.activated) >= timeout {
            let msg = format!(
                "model {model} version {version} not served within readyTimeoutSeconds {}: {why_not}",
                spec.ready_timeout_seconds
            );
            (DeploymentPhase::Failed, Some(msg))
        } else {
            (
                DeploymentPhase::Loading,
                Some(format!("waiting for the model server to serve version {version}: {why_not}")),
            )
        }
    };
    if t.ready.is_none_or(|(r, _)| r != all_ready) {
        // Whole seconds, as the API stores a Time: the status written reads back equal.
        t.ready = Some((all_ready, Timestamp::from_second(wall.as_second()).unwrap_or(wall)));
    }
    // The latency shown (in the status and a Degraded message) moves with the phase, else at most
    // every LATENCY_REFRESH: every probe would be a status write per second per node.
    let refresh = t
        .shown
        .as_ref()
        .is_none_or(|(shown_phase, _, at)| *shown_phase != phase || now.duration_since(*at) >= LATENCY_REFRESH);
    if refresh {
        t.shown = Some((phase, measured, now));
    }
    let shown = t.shown.as_ref().and_then(|(_, l, _)| *l);
    let message = match (phase, message, shown, spec.degraded_latency_milliseconds) {
        (DeploymentPhase::Degraded, None, Some(l), Some(limit)) => {
            Some(format!("the model server answers ready in {l} ms, above degradedLatencyMilliseconds {limit}"))
        }
        (_, message, _, _) => message,
    };
    let listed = consumers
        .iter()
        .take(MAX_LISTED_CONSUMERS)
        .map(|c| ServingConsumer {
            name: c.name.clone(),
            endpoint: c.endpoint.clone(),
            ready: c.outcome.is_ok(),
            message: c.outcome.as_ref().err().cloned(),
        })
        .collect();
    let status = ServingStatus {
        version: version.to_string(),
        ready: all_ready,
        since: t.ready.map(|(_, at)| Time(at)),
        latency_milliseconds: shown,
        consumers: listed,
    };
    let verdict = Assessment { phase, message, status };
    t.last = Some(verdict.clone());
    verdict
}

// ---------------------------------------------------------------------------------------------
// The prober (I/O)

/// Observations by deployment key, written by the prober, read by the decision loop.
pub type Observations = Mutex<HashMap<String, Observation>>;

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

/// GETs `url`; ready with its latency on 2xx.
async fn probe_ready(http: &reqwest::Client, url: &str, path: &str, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    match http.get(url).timeout(timeout).send().await {
        Ok(r) if r.status().is_success() => Ok(started.elapsed()),
        Ok(r) => Err(refusal(&format!("GET {path}"), r).await),
        Err(e) => Err(error_chain(&e)),
    }
}

/// Asks an Open Inference Protocol server to load `model` (it reads the files the agent placed).
async fn load(http: reqwest::Client, base: String, model: String, timeout: Duration) -> Result<(), String> {
    let path = format!("/v2/repository/models/{model}/load");
    match http.post(format!("{base}{path}")).timeout(timeout).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(refusal(&format!("POST {path}"), r).await),
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
            // The pods that mounted the model (recorded at publish), and those whose spec names it
            // (mounted before this agent recorded mounts, or about to mount it).
            let recorded: std::collections::HashSet<String> =
                agent.consumers.of_model(model).into_iter().map(|c| c.uid).collect();
            for pod in pods.state() {
                let named = pod.spec.as_ref().is_some_and(|s| {
                    s.volumes.iter().flatten().filter_map(|v| v.csi.as_ref()).any(|c| {
                        c.driver == super::csi::DRIVER
                            && c.volume_attributes.as_ref().and_then(|a| a.get(super::csi::MODEL_ATTRIBUTE))
                                == Some(model)
                    })
                });
                if !named && !pod.uid().is_some_and(|u| recorded.contains(&u)) {
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
                        Ok(e) => probe_ready(http, &format!("http://{e}{path}"), path, timeout).await,
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
            let task = tokio::spawn(load(http.clone(), format!("http://{endpoint}"), model.clone(), timeout));
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

#[cfg(test)]
mod tests;
