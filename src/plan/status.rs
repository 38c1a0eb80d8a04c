//! status: the rollout's phase, conditions, history and counts, from the plan and its convergence.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::shared::condition;
use crate::api::{HistoryEntry, ModelRollout, ModelRolloutStatus, RolloutPhase};

use super::convergence::{Convergence, Progress, advance, estimate_completion_seconds, expected_rate};
use super::strategy::EffectiveTarget;

/// History keeps this many converged versions.
pub const MAX_HISTORY: usize = 10;

/// Why the source could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceProblem {
    /// CamelCase reason for the Ready condition (`RegistryUnreachable`, `VersionNotFound`, …).
    pub reason: String,
    /// For a person.
    pub message: String,
}

/// Everything the status step reads.
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    /// The rollout, with its current status.
    pub rollout: &'a ModelRollout,
    /// What it converges to, when the source was read.
    pub target: Option<&'a EffectiveTarget>,
    /// Why the source could not be read, if so.
    pub source_problem: Option<SourceProblem>,
    /// Why the spec cannot be acted on, if so (a scope the API server should have refused).
    pub invalid_spec: Option<String>,
    /// The aggregate of its targets.
    pub convergence: Option<&'a Convergence>,
    /// Nodes other rollouts hold: (node, holder).
    pub conflicts: &'a [(String, String)],
    /// The version that aborted, if any (`status.abortedVersion` to write).
    pub aborted_version: Option<String>,
    /// Targets started on the target version and not yet done (from the plan).
    pub in_flight: usize,
    /// Now.
    pub now: Timestamp,
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    // The transition time moves only when the status flips (API conventions).
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// "N node(s) held for model M by A, B, C and 4 more": bounded, whatever the number of holders.
pub fn conflict_message(model: &str, conflicts: &[(String, String)]) -> String {
    let mut holders: Vec<&str> = conflicts.iter().map(|(_, h)| h.as_str()).collect();
    holders.sort();
    holders.dedup();
    let shown = holders.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    let more = if holders.len() > 3 { format!(" and {} more", holders.len() - 3) } else { String::new() };
    format!("{} node(s) held for model {model} by {shown}{more}", conflicts.len())
}

/// The previous status with only the Ready condition changed: a registry outage must not erase
/// what is known of the targets.
pub fn with_source_problem(
    prev: &ModelRolloutStatus,
    problem: &SourceProblem,
    generation: Option<i64>,
    now: Timestamp,
) -> ModelRolloutStatus {
    let mut s = prev.clone();
    s.estimated_completion_seconds = None;
    let ready =
        condition(&prev.conditions, condition::READY, false, &problem.reason, problem.message.clone(), generation, now);
    s.conditions.retain(|c| c.type_ != condition::READY);
    s.conditions.insert(0, ready);
    s
}

/// Computes the rollout's next status.
pub fn rollout_status(input: &StatusInput<'_>) -> ModelRolloutStatus {
    let r = input.rollout;
    let spec = &r.spec;
    let prev = r.status.clone().unwrap_or_default();
    let generation = r.metadata.generation;
    let empty = Convergence::default();
    let c = input.convergence.unwrap_or(&empty);
    let rolling_back = input.target.is_some_and(|t| t.rolling_back);
    let aborted = input.aborted_version.as_deref() == Some(spec.version.as_str());

    let mut s = ModelRolloutStatus {
        observed_generation: generation,
        resolved_digest: prev.resolved_digest.clone(),
        resolved_version: prev.resolved_version.clone(),
        aborted_version: input.aborted_version.clone(),
        total_nodes: c.total,
        converged: c.converged,
        in_progress: c.in_progress,
        pending: c.pending,
        failed: c.failed,
        serving: c.serving,
        staged: c.staged,
        converged_ratio: Some(c.ratio()),
        version_distribution: c.version_distribution.clone(),
        blockers: c.blockers.clone(),
        blocker_counts: c.blocker_counts.clone(),
        bytes_transferred: c.bytes_transferred,
        bytes_reused: c.bytes_reused,
        history: prev.history.clone(),
        ..Default::default()
    };
    if let Some(t) = input.target.filter(|t| !t.rolling_back && t.version == spec.version) {
        s.resolved_version = Some(t.version.clone());
        s.resolved_digest = Some(t.digest.clone());
    }
    let converged = input.convergence.is_some_and(Convergence::is_converged);
    if converged
        && let Some(t) = input.target
        && !t.rolling_back
        && s.history.last().is_none_or(|h| h.version != t.version || h.digest != t.digest)
    {
        s.history.retain(|h| h.version != t.version);
        s.history.push(HistoryEntry {
            version: t.version.clone(),
            digest: t.digest.clone(),
            completed_at: Some(Time(input.now)),
        });
        let excess = s.history.len().saturating_sub(MAX_HISTORY);
        s.history.drain(..excess);
    }
    // Progress, from the previous status: the rate and its time survive a restart or a failover.
    let before = Progress {
        done: (prev.bytes_transferred + prev.bytes_reused).max(0) as u64,
        at: prev.last_progress_time.as_ref().map(|t| t.0),
        rate: prev.transfer_rate_bytes_per_second.filter(|r| *r > 0).map(|r| r as f64),
    };
    let progress = match input.convergence {
        Some(_) => advance(before, (c.bytes_transferred + c.bytes_reused).max(0) as u64, input.now),
        // No aggregate (the source could not be read): the byte counts are not written, so the
        // next sample starts afresh; the rate stays.
        None => Progress { at: None, ..before },
    };
    s.last_progress_time = progress.at.map(MicroTime);
    s.transfer_rate_bytes_per_second = progress.rate.map(|r| r.round() as i64).filter(|r| *r > 0);
    s.partitioned_nodes = c.partitioned;
    // Only silent nodes left: no time can be promised.
    let only_silent = c.remaining_bytes == 0 && c.partitioned > 0;
    if input.convergence.is_some() && !converged && !spec.paused && !aborted && !only_silent {
        s.estimated_completion_seconds =
            estimate_completion_seconds(c.remaining_bytes, expected_rate(&progress, input.now));
    }

    s.phase = if let Some(_why) = &input.invalid_spec {
        RolloutPhase::Failed
    } else if aborted && rolling_back && converged {
        RolloutPhase::RolledBack
    } else if aborted {
        RolloutPhase::Degraded
    } else if spec.paused {
        RolloutPhase::Paused
    } else if input.target.is_none() {
        RolloutPhase::Pending
    } else if converged {
        RolloutPhase::Converged
    } else if c.total == 0 || (c.converged + c.in_progress + c.failed == 0 && input.in_flight == 0) {
        RolloutPhase::Pending
    } else {
        RolloutPhase::Progressing
    };

    let (ready, ready_reason, ready_msg) = if let Some(why) = &input.invalid_spec {
        (false, "InvalidSpec".to_string(), why.clone())
    } else if let Some(p) = &input.source_problem {
        (false, p.reason.clone(), p.message.clone())
    } else if !input.conflicts.is_empty() {
        (false, "Conflict".into(), conflict_message(&spec.model, input.conflicts))
    } else if c.total == 0 && input.target.is_some() {
        (false, "NoTargets".into(), "the scope matches no node with a peat agent".into())
    } else {
        let v = input.target.map(|t| format!("{} ({})", t.version, t.digest)).unwrap_or_default();
        (true, "Resolved".into(), format!("source resolved to {v}"))
    };
    let progressing = !converged && !spec.paused && !aborted && input.target.is_some() && c.total > 0;
    let (prog_reason, prog_msg) = if spec.paused {
        ("Paused", "spec.paused is true: no transfer starts, running ones halt".to_string())
    } else if aborted {
        ("Aborted", format!("failure threshold crossed for {}", spec.version))
    } else if converged {
        ("Converged", format!("all {} targets run {}", c.total, spec.version))
    } else {
        (
            "Progressing",
            format!(
                "{} converged, {} in progress, {} pending, {} failed of {}",
                c.converged, c.in_progress, c.pending, c.failed, c.total
            ),
        )
    };
    let (conv_reason, conv_msg) = if converged {
        (
            "AllTargetsConverged",
            format!(
                "{}/{} targets run {}",
                c.converged,
                c.total,
                input.target.map(|t| t.version.as_str()).unwrap_or("")
            ),
        )
    } else if c.total == 0 {
        ("NoTargets", "no target to converge".to_string())
    } else {
        ("NotConverged", format!("{}/{} targets converged, {} failed", c.converged, c.total, c.failed))
    };
    // Converged means spec.version everywhere: a rollback converging is not.
    let converged_cond = converged && !rolling_back;
    let (degraded, deg_reason, deg_msg) = if let Some(why) = &input.invalid_spec {
        (true, "InvalidSpec", why.clone())
    } else if aborted && rolling_back {
        let back = input.target.map(|t| t.version.as_str()).unwrap_or("");
        let done = if converged { "rolled back" } else { "rolling back" };
        (true, "RolledBack", format!("{} aborted on its failure threshold; {done} to {back}", spec.version))
    } else if aborted {
        (
            true,
            "FailureThresholdExceeded",
            format!("{} aborted on its failure threshold: {} targets failed", spec.version, c.failed),
        )
    } else if c.failed > 0 {
        (true, "TargetsFailed", format!("{} of {} targets failed", c.failed, c.total))
    } else {
        (false, "Healthy", "no target failed".to_string())
    };
    let pc = &prev.conditions;
    s.conditions = vec![
        condition(pc, condition::READY, ready, &ready_reason, ready_msg, generation, input.now),
        condition(pc, condition::PROGRESSING, progressing, prog_reason, prog_msg, generation, input.now),
        condition(pc, condition::CONVERGED, converged_cond, conv_reason, conv_msg, generation, input.now),
        condition(pc, condition::DEGRADED, degraded, deg_reason, deg_msg, generation, input.now),
    ];
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AllNodes, ModelRolloutSpec, ModelSource, ScopeSpec};

    fn rollout(paused: bool) -> ModelRollout {
        let mut r = ModelRollout::new(
            "r",
            ModelRolloutSpec {
                model: "m".into(),
                version: "2.0.0".into(),
                source: ModelSource { repository: "reg/m".into(), ..Default::default() },
                variant: None,
                scope: ScopeSpec { all: Some(AllNodes {}), ..Default::default() },
                priority: Default::default(),
                strategy: None,
                delta: None,
                paused,
                deletion_policy: Default::default(),
                serving: None,
            },
        );
        r.metadata.generation = Some(7);
        r
    }

    fn target(rolling_back: bool) -> EffectiveTarget {
        EffectiveTarget {
            version: if rolling_back { "1.0.0" } else { "2.0.0" }.into(),
            digest: "sha256:idx".into(),
            variants: vec![],
            rolling_back,
        }
    }

    fn conv(total: i32, converged: i32, failed: i32) -> Convergence {
        Convergence {
            total,
            converged,
            failed,
            pending: total - converged - failed,
            remaining_bytes: 100,
            ..Default::default()
        }
    }

    fn input<'a>(r: &'a ModelRollout, t: Option<&'a EffectiveTarget>, c: Option<&'a Convergence>) -> StatusInput<'a> {
        StatusInput {
            rollout: r,
            target: t,
            source_problem: None,
            invalid_spec: None,
            convergence: c,
            conflicts: &[],
            aborted_version: None,
            in_flight: 1,
            now: Timestamp::from_second(1_800_000_000).unwrap(),
        }
    }

    fn cond<'a>(s: &'a ModelRolloutStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn converged_sets_the_condition_history_and_phase() {
        let r = rollout(false);
        let t = target(false);
        let c = conv(3, 3, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&c)));
        assert_eq!(s.phase, RolloutPhase::Converged);
        assert_eq!(cond(&s, condition::CONVERGED).status, "True");
        assert_eq!(cond(&s, condition::CONVERGED).observed_generation, Some(7));
        assert_eq!(s.history.len(), 1);
        assert_eq!((s.resolved_version.as_deref(), s.resolved_digest.as_deref()), (Some("2.0.0"), Some("sha256:idx")));
        // Computing again from that status changes nothing: no timestamp churn, no write.
        let mut r2 = r.clone();
        r2.status = Some(s.clone());
        let later =
            StatusInput { now: Timestamp::from_second(1_800_000_999).unwrap(), ..input(&r2, Some(&t), Some(&c)) };
        assert_eq!(rollout_status(&later), s);
    }

    /// A rollout whose status says `rate` bytes/s as of `at` seconds after 1_800_000_000, with `done` bytes.
    fn with_progress(mut r: ModelRollout, rate: i64, at: i64, done: i64) -> ModelRollout {
        r.status = Some(ModelRolloutStatus {
            transfer_rate_bytes_per_second: Some(rate),
            last_progress_time: Some(MicroTime(Timestamp::from_second(1_800_000_000 + at).unwrap())),
            bytes_transferred: done,
            ..Default::default()
        });
        r
    }

    #[test]
    fn the_eta_goes_on_from_the_status_decays_while_stalled_and_leaves_silent_nodes_out() {
        let t = target(false);
        let mut c = conv(4, 1, 0);
        c.remaining_bytes = 1000;
        // From the status alone (a new leader): 1000 bytes at 10 B/s.
        let r = with_progress(rollout(false), 10, 0, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&c)));
        assert_eq!((s.estimated_completion_seconds, s.transfer_rate_bytes_per_second), (Some(100), Some(10)));
        // No byte for 30 s, then 60 s: the expected rate halves each time, the ETA grows.
        let r = with_progress(rollout(false), 10, -30, 0);
        assert_eq!(rollout_status(&input(&r, Some(&t), Some(&c))).estimated_completion_seconds, Some(200));
        let r = with_progress(rollout(false), 10, -60, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&c)));
        assert_eq!(s.estimated_completion_seconds, Some(400));
        assert_eq!(s.last_progress_time, r.status.unwrap().last_progress_time, "a stall keeps the last progress");
        // Bytes moved: 300 in 10 s since the last progress → 0.7·10 + 0.3·30 = 16 B/s.
        let mut c2 = c.clone();
        c2.bytes_transferred = 300;
        let r = with_progress(rollout(false), 10, -10, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&c2)));
        assert_eq!((s.transfer_rate_bytes_per_second, s.estimated_completion_seconds), (Some(16), Some(63)));
        // Silent nodes: counted apart; only they left → no ETA.
        let mut silent = conv(2, 1, 0);
        (silent.remaining_bytes, silent.partitioned) = (0, 1);
        let r = with_progress(rollout(false), 10, 0, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&silent)));
        assert_eq!((s.partitioned_nodes, s.estimated_completion_seconds), (1, None));
    }

    #[test]
    fn progressing_with_an_eta_and_degraded_on_failures() {
        let r = with_progress(rollout(false), 10, 0, 0);
        let t = target(false);
        let c = conv(4, 1, 1);
        let s = rollout_status(&input(&r, Some(&t), Some(&c)));
        assert_eq!(s.phase, RolloutPhase::Progressing);
        assert_eq!(s.estimated_completion_seconds, Some(10));
        assert_eq!(cond(&s, condition::DEGRADED).reason, "TargetsFailed");
        assert_eq!(cond(&s, condition::CONVERGED).status, "False");
        assert_eq!(s.converged_ratio.as_deref(), Some("1/4"));
    }

    #[test]
    fn paused_aborted_and_rolled_back() {
        let r = rollout(true);
        let t = target(false);
        let c = conv(2, 0, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&c)));
        assert_eq!(s.phase, RolloutPhase::Paused);
        assert_eq!(cond(&s, condition::PROGRESSING).reason, "Paused");
        assert_eq!(s.estimated_completion_seconds, None);

        let r = rollout(false);
        let aborted = StatusInput { aborted_version: Some("2.0.0".into()), ..input(&r, Some(&t), Some(&c)) };
        let s = rollout_status(&aborted);
        assert_eq!(s.phase, RolloutPhase::Degraded);
        assert_eq!(cond(&s, condition::DEGRADED).reason, "FailureThresholdExceeded");

        let back = target(true);
        let done = conv(2, 2, 0);
        let s = rollout_status(&StatusInput {
            aborted_version: Some("2.0.0".into()),
            ..input(&r, Some(&back), Some(&done))
        });
        assert_eq!(s.phase, RolloutPhase::RolledBack);
        assert_eq!(cond(&s, condition::DEGRADED).reason, "RolledBack");
        assert_eq!(cond(&s, condition::CONVERGED).status, "False", "the desired version does not run");
        assert!(s.history.is_empty(), "a rollback is not a new converged version");
    }

    #[test]
    fn source_problems_conflicts_and_empty_scopes_show_on_ready() {
        let r = rollout(false);
        let problem = StatusInput {
            source_problem: Some(SourceProblem {
                reason: "VersionNotFound".into(),
                message: "reg/m:2.0.0 not found".into(),
            }),
            ..input(&r, None, None)
        };
        let s = rollout_status(&problem);
        assert_eq!((s.phase, cond(&s, condition::READY).reason.as_str()), (RolloutPhase::Pending, "VersionNotFound"));

        let t = target(false);
        let c = conv(1, 0, 0);
        let conflicts = vec![("n1".to_string(), "other/r".to_string())];
        let s = rollout_status(&StatusInput { conflicts: &conflicts, ..input(&r, Some(&t), Some(&c)) });
        assert_eq!(cond(&s, condition::READY).reason, "Conflict");
        assert!(cond(&s, condition::READY).message.contains("other/r"));

        let none = conv(0, 0, 0);
        let s = rollout_status(&input(&r, Some(&t), Some(&none)));
        assert_eq!((s.phase, cond(&s, condition::READY).reason.as_str()), (RolloutPhase::Pending, "NoTargets"));
        assert_eq!(cond(&s, condition::CONVERGED).status, "False");
    }
}
