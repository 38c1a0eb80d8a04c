//! What the agent's loop learns from outside a pass, pure: a finished transfer (success, retry
//! with backoff, failure for good) and a switch to a kept version, recorded in the decisions'
//! memory, with the report to write.

use std::time::{Duration, Instant};

use super::decide::{Bytes, Memory, Report};
use super::transfer::{PullPlan, TransferError};
use crate::api::{BlockerReason, DeploymentPhase};

/// What became of a finished transfer.
#[derive(Debug)]
pub enum Verdict {
    /// The deployment moved on to another artifact while it ran, or is gone.
    Stale,
    /// Active now.
    Succeeded(Bytes),
    /// Stopped on purpose (preempted, paused, not wanted); resumes when wanted again.
    Cancelled,
    /// Failed; tried again after `after`.
    Retrying {
        /// The error.
        error: String,
        /// Failed attempts in a row.
        attempt: u32,
        /// When to try again.
        after: Duration,
        /// What to report meanwhile.
        report: Report,
    },
    /// Failed in a way only a new artifact fixes (reported by the next pass).
    Failed {
        /// The error.
        error: String,
    },
}

/// Records a finished transfer of `key` in `memory`: its plan, and success (attempts reset) or
/// failure (retry with backoff, or failed for good). `present`: its deployment still exists.
pub fn on_finished(
    memory: &mut Memory,
    key: &str,
    artifact: &str,
    plan: Option<PullPlan>,
    result: Result<Bytes, TransferError>,
    present: bool,
    now: Instant,
) -> Verdict {
    let Some(t) = memory.get_mut(key).filter(|t| t.artifact == artifact) else { return Verdict::Stale };
    if plan.is_some() {
        t.plan = plan;
    }
    match result {
        Ok(bytes) => {
            t.attempts = 0;
            t.not_before = None;
            t.last_bytes = Some(bytes);
            Verdict::Succeeded(bytes)
        }
        Err(TransferError::Cancelled) => Verdict::Cancelled,
        Err(e) => {
            t.attempts += 1;
            if !present {
                return Verdict::Stale;
            }
            match e.retry_after(t.attempts) {
                Some(after) => {
                    t.not_before = Some(now + after);
                    let message = format!("attempt {} failed: {e}; retrying in {}s", t.attempts, after.as_secs());
                    let phase =
                        if e.is_failure(t.attempts) { DeploymentPhase::Failed } else { DeploymentPhase::Downloading };
                    let report = Report::blocked(phase, e.reason(), message);
                    Verdict::Retrying { error: e.to_string(), attempt: t.attempts, after, report }
                }
                None => {
                    t.failed = Some((e.reason(), e.to_string()));
                    Verdict::Failed { error: e.to_string() }
                }
            }
        }
    }
}

/// Records the outcome of switching `key` to a kept version of `total` bytes: active with nothing
/// fetched, or failed for good. Returns the report to write.
/// With `serving` the version is Loading until its server serves it.
pub fn on_switched(
    memory: &mut Memory,
    key: &str,
    version: &str,
    total: u64,
    serving: bool,
    result: Result<(), String>,
) -> Report {
    let t = memory.entry(key.to_string()).or_default();
    match result {
        Ok(()) => {
            t.last_bytes = Some(Bytes { fetched: 0, reused: total, total });
            let phase = if serving { DeploymentPhase::Loading } else { DeploymentPhase::Operational };
            Report { bytes: t.last_bytes, ..Report::phase(phase) }
        }
        Err(e) => {
            let message = format!("activating kept version {version}: {e}");
            t.failed = Some((BlockerReason::DeploymentFailed, message.clone()));
            Report::blocked(DeploymentPhase::Failed, BlockerReason::DeploymentFailed, message)
        }
    }
}
