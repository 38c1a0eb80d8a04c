//! The serving verdicts, over a made-up clock: soak, timeout, latency, a server that goes away.

use super::*;
use crate::api::{ServingEndpoint, ServingProtocol};

fn spec(min_ready: i32, timeout: i32, degraded: Option<i32>) -> ServingSpec {
    ServingSpec {
        protocol: ServingProtocol::OpenInference,
        endpoint: ServingEndpoint::Host,
        port: 8080,
        path: None,
        ready_timeout_seconds: timeout,
        min_ready_seconds: min_ready,
        degraded_latency_milliseconds: degraded,
    }
}

/// A new probe round each call.
fn seen(version: &str, outcome: Result<u64, &str>) -> Observation {
    static ROUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Observation {
        round: ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        version: version.into(),
        consumers: vec![ConsumerProbe {
            name: "host".into(),
            endpoint: Some("127.0.0.1:8080".into()),
            outcome: outcome.map(Duration::from_millis).map_err(str::to_string),
        }],
        none_because: None,
    }
}

struct Clock {
    start: Instant,
    track: Option<Track>,
}

impl Clock {
    fn new() -> Clock {
        Clock { start: Instant::now(), track: None }
    }

    fn at(&mut self, secs: u64, spec: &ServingSpec, version: &str, o: Option<&Observation>) -> Assessment {
        let wall = Timestamp::from_second(1_000_000 + secs as i64).unwrap();
        assess("iris", spec, version, &mut self.track, o, self.start + Duration::from_secs(secs), wall)
    }
}

#[test]
fn operational_only_after_ready_for_min_ready_seconds_without_a_break() {
    let s = spec(10, 300, None);
    let mut c = Clock::new();
    let a = c.at(0, &s, "2.0.0", None);
    assert_eq!(a.phase, DeploymentPhase::Loading);
    assert!(a.message.unwrap().contains("no probe of the model server yet"));
    assert_eq!(c.at(1, &s, "2.0.0", Some(&seen("2.0.0", Ok(5)))).phase, DeploymentPhase::Loading);
    // A break starts the soak over.
    assert_eq!(c.at(8, &s, "2.0.0", Some(&seen("2.0.0", Err("GET … answered 404")))).phase, DeploymentPhase::Loading);
    let a = c.at(9, &s, "2.0.0", Some(&seen("2.0.0", Ok(5))));
    assert_eq!(a.phase, DeploymentPhase::Loading);
    assert!(a.message.unwrap().contains("minReadySeconds 10"));
    assert_eq!(c.at(18, &s, "2.0.0", Some(&seen("2.0.0", Ok(5)))).phase, DeploymentPhase::Loading);
    let a = c.at(19, &s, "2.0.0", Some(&seen("2.0.0", Ok(5))));
    assert_eq!(a.phase, DeploymentPhase::Operational);
    assert!(a.status.ready);
    assert_eq!(a.status.latency_milliseconds, Some(5));
    assert_eq!(a.status.since, Some(Time(Timestamp::from_second(1_000_009).unwrap())));
}

#[test]
fn an_observation_of_another_version_does_not_count() {
    let s = spec(0, 300, None);
    let mut c = Clock::new();
    let a = c.at(0, &s, "2.0.0", Some(&seen("1.0.0", Ok(5))));
    assert_eq!(a.phase, DeploymentPhase::Loading);
    assert!(!a.status.ready);
    assert_eq!(c.at(1, &s, "2.0.0", Some(&seen("2.0.0", Ok(5)))).phase, DeploymentPhase::Operational);
}

#[test]
fn not_served_within_the_ready_timeout_fails_with_the_servers_answer() {
    let s = spec(0, 30, None);
    let mut c = Clock::new();
    let refused = seen("2.0.0", Err("loading version 2.0.0: POST /v2/repository/models/iris/load answered 400"));
    let a = c.at(0, &s, "2.0.0", Some(&refused));
    assert_eq!(a.phase, DeploymentPhase::Loading);
    assert_eq!(c.at(29, &s, "2.0.0", Some(&refused)).phase, DeploymentPhase::Loading);
    let a = c.at(30, &s, "2.0.0", Some(&refused));
    assert_eq!(a.phase, DeploymentPhase::Failed);
    let m = a.message.unwrap();
    assert!(m.contains("not served within readyTimeoutSeconds 30") && m.contains("host: loading version 2.0.0"), "{m}");
    // Another version (a rollback) starts its own timeout.
    assert_eq!(c.at(31, &s, "1.0.0", Some(&seen("1.0.0", Err("404")))).phase, DeploymentPhase::Loading);
    assert_eq!(c.at(32, &s, "1.0.0", Some(&seen("1.0.0", Ok(3)))).phase, DeploymentPhase::Operational);
}

#[test]
fn no_consumer_is_not_serving_and_says_why() {
    let s = spec(0, 5, None);
    let mut c = Clock::new();
    let none = Observation {
        round: 1,
        version: "1.0.0".into(),
        consumers: vec![],
        none_because: Some("no pod on this node mounts model iris".into()),
    };
    let a = c.at(0, &s, "1.0.0", Some(&none));
    assert_eq!(a.phase, DeploymentPhase::Loading);
    assert!(a.message.unwrap().contains("no pod on this node mounts model iris"));
    assert_eq!(c.at(5, &s, "1.0.0", Some(&none)).phase, DeploymentPhase::Failed);
}

#[test]
fn a_server_that_served_and_stops_answering_is_degraded_after_three_probes_not_failed_and_recovers() {
    let s = spec(0, 5, None);
    let mut c = Clock::new();
    let served = c.at(0, &s, "1.0.0", Some(&seen("1.0.0", Ok(4))));
    assert_eq!(served.phase, DeploymentPhase::Operational);
    let gone = || seen("1.0.0", Err("error sending request: connection refused"));
    // One or two missed probes change nothing (not even the status: nothing to write).
    assert_eq!(c.at(1, &s, "1.0.0", Some(&gone())), served);
    assert_eq!(c.at(2, &s, "1.0.0", Some(&gone())), served);
    for t in [3, 10, 100] {
        let a = c.at(t, &s, "1.0.0", Some(&gone()));
        assert_eq!(a.phase, DeploymentPhase::Degraded, "at {t}s");
        let m = a.message.as_deref().unwrap();
        assert!(m.contains("no longer served: host: error sending request: connection refused"), "{m}");
        assert!(!a.status.ready);
        assert_eq!(a.status.consumers[0].message.as_deref(), Some("error sending request: connection refused"));
    }
    assert_eq!(c.at(101, &s, "1.0.0", Some(&seen("1.0.0", Ok(4)))).phase, DeploymentPhase::Operational);
}

#[test]
fn one_observation_seen_by_several_passes_counts_once() {
    let s = spec(0, 300, None);
    let mut c = Clock::new();
    assert_eq!(c.at(0, &s, "1.0.0", Some(&seen("1.0.0", Ok(4)))).phase, DeploymentPhase::Operational);
    let gone = seen("1.0.0", Err("connection refused"));
    for t in 1..10 {
        assert_eq!(c.at(t, &s, "1.0.0", Some(&gone)).phase, DeploymentPhase::Operational, "one round, pass {t}");
    }
}

#[test]
fn slow_answers_degrade_after_three_probes_and_three_fast_ones_restore() {
    let s = spec(0, 300, Some(100));
    let mut c = Clock::new();
    assert_eq!(c.at(0, &s, "1.0.0", Some(&seen("1.0.0", Ok(20)))).phase, DeploymentPhase::Operational);
    assert_eq!(c.at(1, &s, "1.0.0", Some(&seen("1.0.0", Ok(250)))).phase, DeploymentPhase::Operational);
    assert_eq!(c.at(2, &s, "1.0.0", Some(&seen("1.0.0", Ok(250)))).phase, DeploymentPhase::Operational);
    let a = c.at(3, &s, "1.0.0", Some(&seen("1.0.0", Ok(250))));
    assert_eq!(a.phase, DeploymentPhase::Degraded);
    assert_eq!(
        a.message.as_deref(),
        Some("the model server answers ready in 250 ms, above degradedLatencyMilliseconds 100")
    );
    assert_eq!(a.status.latency_milliseconds, Some(250));
    assert!(a.status.ready, "slow is still ready");
    assert_eq!(c.at(4, &s, "1.0.0", Some(&seen("1.0.0", Ok(30)))).phase, DeploymentPhase::Degraded);
    assert_eq!(c.at(5, &s, "1.0.0", Some(&seen("1.0.0", Ok(30)))).phase, DeploymentPhase::Degraded);
    assert_eq!(c.at(6, &s, "1.0.0", Some(&seen("1.0.0", Ok(30)))).phase, DeploymentPhase::Operational);
}

#[test]
fn the_latency_shown_moves_with_the_phase_or_every_thirty_seconds_not_every_probe() {
    let s = spec(0, 300, Some(100));
    let mut c = Clock::new();
    let first = c.at(0, &s, "1.0.0", Some(&seen("1.0.0", Ok(20))));
    let next = c.at(1, &s, "1.0.0", Some(&seen("1.0.0", Ok(23))));
    assert_eq!(first, next, "a new latency alone changes nothing to write");
    for t in 2..5 {
        c.at(t, &s, "1.0.0", Some(&seen("1.0.0", Ok(300))));
    }
    let slow = c.at(5, &s, "1.0.0", Some(&seen("1.0.0", Ok(310))));
    let slower = c.at(6, &s, "1.0.0", Some(&seen("1.0.0", Ok(320))));
    assert_eq!(slow.phase, DeploymentPhase::Degraded);
    assert_eq!(slow, slower, "nor while Degraded");
    let later = c.at(40, &s, "1.0.0", Some(&seen("1.0.0", Ok(330))));
    assert_eq!(later.status.latency_milliseconds, Some(330));
}

#[test]
fn an_agent_that_restarts_goes_on_from_what_it_reported() {
    let s = spec(0, 5, None);
    let reported = ServingStatus {
        version: "1.0.0".into(),
        ready: true,
        since: Some(Time(Timestamp::from_second(1_000_000).unwrap())),
        latency_milliseconds: Some(4),
        consumers: vec![],
    };
    let start = Instant::now();
    let mut track = Track::resumed("1.0.0", DeploymentPhase::Operational, &reported, start);
    assert!(track.is_some());
    assert!(Track::resumed("1.0.0", DeploymentPhase::Loading, &reported, start).is_none(), "not served yet");
    assert!(Track::resumed("2.0.0", DeploymentPhase::Operational, &reported, start).is_none(), "another version");
    // Its server is slow to come back after a reboot, past readyTimeoutSeconds: Degraded, not Failed.
    let mut last = None;
    for t in 1..20 {
        let wall = Timestamp::from_second(1_000_000 + t).unwrap();
        let o = seen("1.0.0", Err("connection refused"));
        let at = start + Duration::from_secs(t as u64);
        last = Some(assess("iris", &s, "1.0.0", &mut track, Some(&o), at, wall).phase);
    }
    assert_eq!(last, Some(DeploymentPhase::Degraded));
}

#[test]
fn the_status_reads_back_equal_to_what_was_written() {
    // Written with a wall clock to the nanosecond, read back as the API stores it: equal, or
    // every pass would write again.
    let s = spec(0, 300, None);
    let mut track = None;
    let wall = Timestamp::from_second(1_000_000).unwrap() + std::time::Duration::from_nanos(123_456_789);
    let a = assess("iris", &s, "1.0.0", &mut track, Some(&seen("1.0.0", Ok(4))), Instant::now(), wall);
    let text = serde_json::to_string(&a.status).unwrap();
    let back: ServingStatus = serde_json::from_str(&text).unwrap();
    assert_eq!(back, a.status, "{text}");
}

#[test]
fn the_ready_path_names_the_model_and_version() {
    let mut s = spec(0, 300, None);
    assert_eq!(s.ready_path("iris", "2.0.0"), "/v2/models/iris/versions/2.0.0/ready");
    s.protocol = ServingProtocol::HttpGet;
    s.path = Some("/models/{model}/{version}/ok".into());
    assert_eq!(s.ready_path("iris", "2.0.0"), "/models/iris/2.0.0/ok");
}
