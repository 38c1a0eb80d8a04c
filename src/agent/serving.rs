//! Serving, pure: whether the node's model server serves the active version of a deployment with
//! `spec.serving`. [`assess`] goes from the prober's observations over time to a phase — Loading
//! until ready for `minReadySeconds`, Operational, Degraded above `degradedLatencyMilliseconds` or
//! when a server that served stops answering, Failed when not ready within `readyTimeoutSeconds`.
//! The prober that finds and asks the servers is `agent/probe.rs`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::{DeploymentPhase, ServingConsumer, ServingSpec, ServingStatus};

/// Consumers listed in a status (the count is not bounded, the list is).
pub const MAX_LISTED_CONSUMERS: usize = 16;
/// A probe's latency in the status is refreshed at least this often while nothing else changes
/// (every probe would be a status write per second per node).
const LATENCY_REFRESH: Duration = Duration::from_secs(30);

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

/// Observations by deployment key, written by the prober, read by the decision loop.
pub type Observations = Mutex<HashMap<String, Observation>>;

#[cfg(test)]
mod tests;
