//! status: aggregate per-node ModelDeployment states into a rollout's convergence.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::{Blocker, BlockerReason, DeploymentPhase, ModelDeployment};

/// At most this many blockers are listed in status; `blockerCounts` counts them all.
pub const MAX_LISTED_BLOCKERS: usize = 20;

/// A blocker decided by planning before any transfer (capabilities, a competing rollout, a silent node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedBlocker {
    /// The typed reason.
    pub reason: BlockerReason,
    /// What exactly, for a person.
    pub message: String,
}

/// One node in a rollout's scope, as planning sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetView {
    /// The node.
    pub node: String,
    /// Set when planning already knows this node cannot progress.
    pub planned_blocker: Option<PlannedBlocker>,
    /// Bytes the node is expected to fetch while it has not reported a size (the chosen variant's size).
    pub expected_bytes: u64,
}

/// How far a rollout has converged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Convergence {
    /// Nodes in scope.
    pub total: i32,
    /// Active version is the target, and Operational or Degraded.
    pub converged: i32,
    /// Downloading or Loading the target.
    pub in_progress: i32,
    /// Everything else that has not failed.
    pub pending: i32,
    /// Failed on the target.
    pub failed: i32,
    /// Target version active and its model server answers ready for it (`spec.serving`).
    pub serving: i32,
    /// Target version active on disk but not served (no `spec.serving`, loading, soaking, or a server not answering).
    pub staged: i32,
    /// Active version → number of targets running it.
    pub version_distribution: BTreeMap<String, i32>,
    /// Blocked targets, oldest first, at most [`MAX_LISTED_BLOCKERS`].
    pub blockers: Vec<Blocker>,
    /// Blocked targets per reason (all of them).
    pub blocker_counts: BTreeMap<String, i32>,
    /// Bytes still to come for the targets that are neither converged nor failed.
    pub remaining_bytes: u64,
    /// Targets not done whose agent is silent (NetworkPartition); their bytes are not in `remaining_bytes`.
    pub partitioned: i32,
    /// Bytes fetched over the network for the target version.
    pub bytes_transferred: i64,
    /// Bytes reused from local data for the target version.
    pub bytes_reused: i64,
}

impl Convergence {
    /// The Converged rule: every target converged and none failed. A rollout with no targets is
    /// not converged: it has done nothing, and `kubectl wait` must not report success for a scope
    /// that matched no node (a typo in a formation name, say).
    pub fn is_converged(&self) -> bool {
        self.total > 0 && self.converged == self.total && self.failed == 0
    }

    /// `converged/total`, the printer column.
    pub fn ratio(&self) -> String {
        format!("{}/{}", self.converged, self.total)
    }
}

/// How one target counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    /// Runs the target version.
    Converged,
    /// Downloading or loading the target version.
    InProgress,
    /// Not started, waiting, or blocked before a transfer.
    Pending,
    /// Gave up on the target version.
    Failed,
}

/// Classifies a node's ModelDeployment against the rollout's target version. A deployment that still
/// asks for another version (the controller has not advanced it yet) counts as pending, whatever its phase.
pub fn classify(target_version: &str, deployment: Option<&ModelDeployment>) -> TargetState {
    let Some(md) = deployment else {
        return TargetState::Pending;
    };
    let Some(status) = &md.status else {
        return TargetState::Pending;
    };
    let active_is_target = status.active_version.as_deref() == Some(target_version);
    if md.spec.version != target_version {
        return TargetState::Pending;
    }
    match status.phase {
        DeploymentPhase::Failed => TargetState::Failed,
        DeploymentPhase::Operational | DeploymentPhase::Degraded if active_is_target => TargetState::Converged,
        DeploymentPhase::Downloading | DeploymentPhase::Loading => TargetState::InProgress,
        _ => TargetState::Pending,
    }
}

/// For a node whose ModelDeployment asks for the target version and has it active (Loading while its
/// server is probed, Operational or Degraded): whether its model server answers ready for it.
/// None when the target version is not active there (or failed).
pub fn serving_state(target_version: &str, deployment: Option<&ModelDeployment>) -> Option<bool> {
    let md = deployment?;
    let status = md.status.as_ref()?;
    let active = md.spec.version == target_version && status.active_version.as_deref() == Some(target_version);
    let staged =
        matches!(status.phase, DeploymentPhase::Loading | DeploymentPhase::Operational | DeploymentPhase::Degraded);
    if !(active && staged) {
        return None;
    }
    // Soaking (Loading while ready) is not serving yet: minReadySeconds has not passed.
    let converged = matches!(status.phase, DeploymentPhase::Operational | DeploymentPhase::Degraded);
    Some(converged && status.serving.as_ref().is_some_and(|s| s.ready && s.version == target_version))
}

/// Aggregates the targets of a rollout of `model` at `target_version`.
///
/// `deployments` may hold ModelDeployments of any model: they are keyed by (model, node), so two
/// models on one node with the same version string never count for each other (the origin's
/// tracker keyed entries by version and did). `previous` blockers keep their `since`.
pub fn aggregate<D: AsRef<ModelDeployment>>(
    model: &str,
    target_version: &str,
    targets: &[TargetView],
    deployments: &[D],
    previous: &[Blocker],
    now: Timestamp,
) -> Convergence {
    let by_node: HashMap<(&str, &str), &ModelDeployment> = deployments
        .iter()
        .map(AsRef::as_ref)
        .map(|md| ((md.spec.model.as_str(), md.spec.node_name.as_str()), md))
        .collect();
    let since_of: HashMap<(&str, BlockerReason), &Option<Time>> =
        previous.iter().map(|b| ((b.node.as_str(), b.reason), &b.since)).collect();

    let mut c = Convergence { total: targets.len() as i32, ..Default::default() };
    let mut blockers = Vec::new();
    for target in targets {
        let md = by_node.get(&(model, target.node.as_str())).copied();
        let state = classify(target_version, md);
        match state {
            TargetState::Converged => c.converged += 1,
            TargetState::InProgress => c.in_progress += 1,
            TargetState::Pending => c.pending += 1,
            TargetState::Failed => c.failed += 1,
        }
        let status = md.and_then(|m| m.status.as_ref());
        let for_target = md.is_some_and(|m| m.spec.version == target_version);
        match serving_state(target_version, md) {
            Some(true) => c.serving += 1,
            Some(false) => c.staged += 1,
            None => {}
        }
        if let Some(active) = status.and_then(|s| s.active_version.as_ref()) {
            *c.version_distribution.entry(active.clone()).or_default() += 1;
        }
        if let (true, Some(s)) = (for_target, status) {
            c.bytes_transferred += s.bytes_done.max(0);
            c.bytes_reused += s.bytes_reused.max(0);
        }
        let silent = target.planned_blocker.as_ref().is_some_and(|b| b.reason == BlockerReason::NetworkPartition);
        if silent && matches!(state, TargetState::InProgress | TargetState::Pending) {
            c.partitioned += 1;
        } else if matches!(state, TargetState::InProgress | TargetState::Pending) {
            c.remaining_bytes += match (for_target, status) {
                (true, Some(s)) if s.bytes_total > 0 => (s.bytes_total - s.bytes_done - s.bytes_reused).max(0) as u64,
                _ => target.expected_bytes,
            };
        }
        if state == TargetState::Converged {
            continue;
        }
        let reported = status.and_then(|s| s.reason.map(|r| (r, s.message.clone().unwrap_or_default())));
        let blocker = target.planned_blocker.as_ref().map(|p| (p.reason, p.message.clone())).or(if for_target {
            reported
        } else {
            None
        });
        if let Some((reason, details)) = blocker {
            let since = since_of.get(&(target.node.as_str(), reason)).and_then(|s| (*s).clone()).unwrap_or(Time(now));
            *c.blocker_counts.entry(reason.as_str().to_string()).or_default() += 1;
            blockers.push(Blocker { node: target.node.clone(), reason, since: Some(since), details });
        }
    }
    blockers.sort_by(|a, b| (&a.since, &a.node).cmp(&(&b.since, &b.node)));
    blockers.truncate(MAX_LISTED_BLOCKERS);
    c.blockers = blockers;
    c
}

/// A point on a rollout's transfer curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThroughputSample {
    /// When.
    pub at: Timestamp,
    /// Bytes done (fetched + reused) by then.
    pub bytes: u64,
}

/// Bytes per second between two samples; none when time did not advance or nothing moved.
pub fn throughput(earlier: ThroughputSample, later: ThroughputSample) -> Option<f64> {
    let seconds = (later.at.as_millisecond() - earlier.at.as_millisecond()) as f64 / 1000.0;
    let bytes = later.bytes.checked_sub(earlier.bytes)?;
    (seconds > 0.0 && bytes > 0).then(|| bytes as f64 / seconds)
}

/// A rollout's transfer progress, kept in its status between reconciles (and leaders).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    /// Bytes done (fetched + reused) by the targets.
    pub done: u64,
    /// When `done` last grew.
    pub at: Option<Timestamp>,
    /// Smoothed rate as of `at`, bytes/s.
    pub rate: Option<f64>,
}

/// Without progress the rate used for the ETA halves every this many seconds.
pub const STALL_HALF_LIFE_SECONDS: f64 = 30.0;

/// The progress after observing `done` bytes at `now`: the rate is smoothed when bytes moved,
/// left as it was when they did not (a stall), and the sample restarts when `done` went down
/// (a new target version).
pub fn advance(prev: Progress, done: u64, now: Timestamp) -> Progress {
    match prev.at {
        Some(at) if done > prev.done => {
            let new = throughput(ThroughputSample { at, bytes: prev.done }, ThroughputSample { at: now, bytes: done });
            // Exponential smoothing: one slow sample does not swing the ETA.
            let rate = match (prev.rate, new) {
                (Some(r), Some(n)) => Some(0.7 * r + 0.3 * n),
                (r, n) => n.or(r),
            };
            Progress { done, at: Some(now), rate }
        }
        Some(_) if done == prev.done => prev,
        _ => Progress { done, at: Some(now), rate: prev.rate },
    }
}

/// The rate to expect from now: the smoothed rate, halved for every whole
/// [`STALL_HALF_LIFE_SECONDS`] since bytes last moved. In whole steps, so that the ETA (and the
/// status) changes once per step during a stall, not at every reconcile.
pub fn expected_rate(p: &Progress, now: Timestamp) -> Option<f64> {
    let rate = p.rate?;
    let stalled = p.at.map_or(0.0, |at| ((now.as_millisecond() - at.as_millisecond()).max(0) as f64) / 1000.0);
    Some(rate * 0.5f64.powf((stalled / STALL_HALF_LIFE_SECONDS).floor()))
}

/// Seconds until the remaining bytes arrive at the observed rate. Zero when nothing remains; none
/// when bytes remain but no rate has been observed (an ETA made up from nothing is worse than none).
pub fn estimate_completion_seconds(remaining_bytes: u64, bytes_per_second: Option<f64>) -> Option<i64> {
    if remaining_bytes == 0 {
        return Some(0);
    }
    let rate = bytes_per_second.filter(|r| r.is_finite() && *r > 0.0)?;
    Some((remaining_bytes as f64 / rate).ceil() as i64)
}

/// Nodes whose active version of `model` is `version` and Operational (the origin's `nodes_with_version`).
pub fn nodes_with_version<D: AsRef<ModelDeployment>>(model: &str, version: &str, deployments: &[D]) -> Vec<String> {
    let mut nodes: Vec<String> = deployments
        .iter()
        .map(AsRef::as_ref)
        .filter(|md| md.spec.model == model)
        .filter(|md| {
            md.status.as_ref().is_some_and(|s| {
                s.active_version.as_deref() == Some(version) && s.phase == DeploymentPhase::Operational
            })
        })
        .map(|md| md.spec.node_name.clone())
        .collect();
    nodes.sort();
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ModelDeploymentStatus;

    fn md(model: &str, node: &str, version: &str, status: Option<ModelDeploymentStatus>) -> ModelDeployment {
        let mut m = ModelDeployment::new(
            &ModelDeployment::name_for(model, node),
            crate::plan::fixtures::deployment_spec(node, model, version, &format!("reg/{model}@sha256:00")),
        );
        m.status = status;
        m
    }

    fn st(phase: DeploymentPhase, active: Option<&str>) -> ModelDeploymentStatus {
        ModelDeploymentStatus { phase, active_version: active.map(Into::into), ..Default::default() }
    }

    fn target(node: &str) -> TargetView {
        TargetView { node: node.into(), planned_blocker: None, expected_bytes: 1000 }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn serving_counts_nodes_whose_server_serves_the_target_and_staged_the_rest_with_it_active() {
        use DeploymentPhase::*;
        let served = |phase, version: &str, ready| ModelDeploymentStatus {
            serving: Some(crate::api::ServingStatus { version: version.into(), ready, ..Default::default() }),
            ..st(phase, Some(version))
        };
        let targets: Vec<_> = ["a", "b", "c", "d", "e", "f"].iter().map(|n| target(n)).collect();
        let mds = vec![
            md("m", "a", "2.0.0", Some(served(Operational, "2.0.0", true))),
            md("m", "b", "2.0.0", Some(served(Degraded, "2.0.0", false))), // its server stopped answering
            md("m", "c", "2.0.0", Some(served(Loading, "2.0.0", true))),   // soaking
            md("m", "d", "2.0.0", Some(st(Operational, Some("2.0.0")))),   // no spec.serving: staged on disk
            md("m", "e", "2.0.0", Some(served(Operational, "1.0.0", true))), // still on the old version
            md("m", "f", "2.0.0", Some(served(Failed, "2.0.0", false))),
        ];
        let c = aggregate("m", "2.0.0", &targets, &mds, &[], now());
        assert_eq!((c.serving, c.staged), (1, 3), "{c:?}");
        assert_eq!(c.converged, 3, "Operational or Degraded on the target, served or not");
    }

    #[test]
    fn counts_add_up_and_follow_the_phase_rules() {
        use DeploymentPhase::*;
        let targets: Vec<_> = ["a", "b", "c", "d", "e", "f", "g", "h"].iter().map(|n| target(n)).collect();
        let mds = vec![
            md("m", "a", "2.0.0", Some(st(Operational, Some("2.0.0")))),
            md("m", "b", "2.0.0", Some(st(Degraded, Some("2.0.0")))),
            md("m", "c", "2.0.0", Some(st(Downloading, Some("1.0.0")))),
            md("m", "d", "2.0.0", Some(st(Loading, Some("1.0.0")))),
            md("m", "e", "2.0.0", Some(st(Failed, Some("1.0.0")))),
            // Still asks for the old version: pending, even though Operational.
            md("m", "f", "1.0.0", Some(st(Operational, Some("1.0.0")))),
            md("m", "g", "2.0.0", None),
            // h has no deployment at all.
        ];
        let c = aggregate("m", "2.0.0", &targets, &mds, &[], now());
        assert_eq!((c.total, c.converged, c.in_progress, c.pending, c.failed), (8, 2, 2, 3, 1));
        assert_eq!(c.converged + c.in_progress + c.pending + c.failed, c.total);
        assert_eq!(c.version_distribution, BTreeMap::from([("1.0.0".into(), 4), ("2.0.0".into(), 2)]));
        assert!(!c.is_converged());
        assert_eq!(c.ratio(), "2/8");
    }

    #[test]
    fn operational_on_another_active_version_is_not_converged() {
        let mds = vec![md("m", "a", "2.0.0", Some(st(DeploymentPhase::Operational, Some("1.0.0"))))];
        let c = aggregate("m", "2.0.0", &[target("a")], &mds, &[], now());
        assert_eq!((c.converged, c.pending), (0, 1));
    }

    #[test]
    fn converged_rule() {
        let mds = vec![
            md("m", "a", "2.0.0", Some(st(DeploymentPhase::Operational, Some("2.0.0")))),
            md("m", "b", "2.0.0", Some(st(DeploymentPhase::Degraded, Some("2.0.0")))),
        ];
        let c = aggregate("m", "2.0.0", &[target("a"), target("b")], &mds, &[], now());
        assert!(c.is_converged());
        assert_eq!(c.remaining_bytes, 0);
        // One failure anywhere: not converged.
        let mut mds = mds;
        mds.push(md("m", "c", "2.0.0", Some(st(DeploymentPhase::Failed, None))));
        let c = aggregate("m", "2.0.0", &[target("a"), target("b"), target("c")], &mds, &[], now());
        assert!(!c.is_converged());
        // No targets: not converged.
        assert!(!aggregate("m", "2.0.0", &[], &[] as &[ModelDeployment], &[], now()).is_converged());
    }

    #[test]
    fn two_models_on_one_node_with_the_same_version_are_counted_separately() {
        // The origin keyed node entries by version: "vision 1.0.0 Operational" made
        // "speech 1.0.0" look converged on the same node. Keyed by (model, node) here.
        let mds = vec![
            md("vision", "edge-1", "1.0.0", Some(st(DeploymentPhase::Operational, Some("1.0.0")))),
            md("speech", "edge-1", "1.0.0", Some(st(DeploymentPhase::Failed, None))),
        ];
        let vision = aggregate("vision", "1.0.0", &[target("edge-1")], &mds, &[], now());
        let speech = aggregate("speech", "1.0.0", &[target("edge-1")], &mds, &[], now());
        assert_eq!((vision.converged, vision.failed), (1, 0));
        assert_eq!((speech.converged, speech.failed), (0, 1));
        assert_eq!(vision.version_distribution, BTreeMap::from([("1.0.0".into(), 1)]));
        assert!(speech.version_distribution.is_empty());
        assert_eq!(nodes_with_version("vision", "1.0.0", &mds), ["edge-1"]);
        assert!(nodes_with_version("speech", "1.0.0", &mds).is_empty());
    }

    #[test]
    fn blockers_come_from_planning_and_from_agent_reports() {
        let mut failed = st(DeploymentPhase::Failed, Some("1.0.0"));
        failed.reason = Some(BlockerReason::TransferFailed);
        failed.message = Some("digest mismatch".into());
        let mds = vec![md("m", "a", "2.0.0", Some(failed))];
        let mut b = target("b");
        b.planned_blocker =
            Some(PlannedBlocker { reason: BlockerReason::InsufficientGpuMemory, message: "needs 4GiB".into() });
        let c = aggregate("m", "2.0.0", &[target("a"), b], &mds, &[], now());
        assert_eq!(c.blockers.len(), 2);
        assert_eq!(c.blockers[0].node, "a");
        assert_eq!(c.blockers[0].reason, BlockerReason::TransferFailed);
        assert_eq!(c.blockers[0].details, "digest mismatch");
        assert_eq!(c.blockers[1].reason, BlockerReason::InsufficientGpuMemory);
        assert_eq!(c.blocker_counts.get("TransferFailed"), Some(&1));
        assert_eq!(c.blocker_counts.get("InsufficientGpuMemory"), Some(&1));
    }

    #[test]
    fn a_planned_blocker_wins_over_a_report_and_converged_nodes_are_never_blockers() {
        let mut downloading = st(DeploymentPhase::Downloading, None);
        downloading.reason = Some(BlockerReason::NodeBusy);
        let mds = vec![
            md("m", "a", "2.0.0", Some(downloading)),
            md("m", "b", "2.0.0", Some(st(DeploymentPhase::Operational, Some("2.0.0")))),
        ];
        let partition =
            PlannedBlocker { reason: BlockerReason::NetworkPartition, message: "no heartbeat for 90s".into() };
        let mut a = target("a");
        a.planned_blocker = Some(partition.clone());
        let mut b = target("b");
        b.planned_blocker = Some(partition);
        let c = aggregate("m", "2.0.0", &[a, b], &mds, &[], now());
        assert_eq!(c.blockers.len(), 1);
        assert_eq!((c.blockers[0].node.as_str(), c.blockers[0].reason), ("a", BlockerReason::NetworkPartition));
    }

    #[test]
    fn blocker_list_is_bounded_but_counts_are_complete_and_since_is_kept() {
        let targets: Vec<_> = (0..50)
            .map(|i| TargetView {
                node: format!("n{i:02}"),
                planned_blocker: Some(PlannedBlocker {
                    reason: BlockerReason::InsufficientStorage,
                    message: String::new(),
                }),
                expected_bytes: 10,
            })
            .collect();
        let earlier = Time(Timestamp::from_second(1_700_000_000).unwrap());
        let previous = vec![Blocker {
            node: "n42".into(),
            reason: BlockerReason::InsufficientStorage,
            since: Some(earlier.clone()),
            details: String::new(),
        }];
        let c = aggregate("m", "1.0.0", &targets, &[] as &[ModelDeployment], &previous, now());
        assert_eq!(c.blockers.len(), MAX_LISTED_BLOCKERS);
        assert_eq!(c.blocker_counts.get("InsufficientStorage"), Some(&50));
        // Oldest first: the one seen before leads the list with its original time.
        assert_eq!(c.blockers[0].node, "n42");
        assert_eq!(c.blockers[0].since, Some(earlier));
        assert_eq!(c.blockers[1].since, Some(Time(now())));
        assert_eq!(c.pending, 50);
        assert_eq!(c.remaining_bytes, 500);
    }

    #[test]
    fn a_reason_left_from_an_older_version_is_not_a_blocker_for_the_new_one() {
        let mut old = st(DeploymentPhase::Failed, Some("1.0.0"));
        old.reason = Some(BlockerReason::TransferFailed);
        let mds = vec![md("m", "a", "1.0.0", Some(old))];
        let c = aggregate("m", "2.0.0", &[target("a")], &mds, &[], now());
        assert!(c.blockers.is_empty());
        assert_eq!((c.pending, c.failed), (1, 0));
    }

    #[test]
    fn bytes_and_remaining_bytes() {
        let mut a = st(DeploymentPhase::Downloading, None);
        a.bytes_total = 1000;
        a.bytes_done = 300;
        a.bytes_reused = 200;
        let mut b = st(DeploymentPhase::Operational, Some("2.0.0"));
        b.bytes_total = 1000;
        b.bytes_done = 100;
        b.bytes_reused = 900;
        let mds = vec![md("m", "a", "2.0.0", Some(a)), md("m", "b", "2.0.0", Some(b))];
        let c = aggregate("m", "2.0.0", &[target("a"), target("b"), target("c")], &mds, &[], now());
        assert_eq!((c.bytes_transferred, c.bytes_reused), (400, 1100));
        // a: 1000-300-200 = 500 to go; c: nothing reported, the expected 1000; b is done.
        assert_eq!(c.remaining_bytes, 1500);
    }

    #[test]
    fn eta_from_observed_throughput() {
        let t0 = ThroughputSample { at: Timestamp::from_second(100).unwrap(), bytes: 1_000 };
        let t1 = ThroughputSample { at: Timestamp::from_second(110).unwrap(), bytes: 11_000 };
        let rate = throughput(t0, t1);
        assert_eq!(rate, Some(1000.0));
        assert_eq!(estimate_completion_seconds(25_500, rate), Some(26));
        assert_eq!(estimate_completion_seconds(0, None), Some(0));
    }

    #[test]
    fn no_eta_when_it_cannot_be_computed() {
        let t0 = ThroughputSample { at: Timestamp::from_second(100).unwrap(), bytes: 1_000 };
        assert_eq!(throughput(t0, t0), None, "no time passed");
        let stalled = ThroughputSample { at: Timestamp::from_second(200).unwrap(), bytes: 1_000 };
        assert_eq!(throughput(t0, stalled), None, "nothing moved");
        let restarted = ThroughputSample { at: Timestamp::from_second(200).unwrap(), bytes: 10 };
        assert_eq!(throughput(t0, restarted), None, "counter went backwards");
        assert_eq!(estimate_completion_seconds(100, None), None);
        assert_eq!(estimate_completion_seconds(100, Some(0.0)), None);
        assert_eq!(estimate_completion_seconds(100, Some(f64::NAN)), None);
    }
}
