//! What a pass learns from outside: a finished transfer, a switch to a kept version; and the
//! small pure helpers.

use std::time::{Duration, Instant};

use super::*;
use crate::agent::outcome::{Verdict, on_finished, on_switched};

#[test]
fn switching_to_a_kept_version_reports_what_happened() {
    let mut memory = Memory::new();
    let ok = on_switched(&mut memory, "ns/d", "1", 10, false, Ok(()));
    assert_eq!(ok.phase, DeploymentPhase::Operational);
    assert_eq!(ok.bytes, Some(Bytes { fetched: 0, reused: 10, total: 10 }));
    // With spec.serving the switch only stages it: the server has yet to load it.
    let staged = on_switched(&mut memory, "ns/d", "1", 10, true, Ok(()));
    assert_eq!(staged.phase, DeploymentPhase::Loading);
    let bad = on_switched(&mut memory, "ns/d", "1", 10, false, Err("disk on fire".into()));
    assert_eq!((bad.phase, bad.reason), (DeploymentPhase::Failed, Some(BlockerReason::DeploymentFailed)));
    assert!(memory["ns/d"].failed.is_some(), "remembered: not tried again until the deployment changes");
}

#[test]
fn failed_transfers_are_retried_with_backoff_and_reported() {
    let unreachable = || TransferError::Registry(OciError::Unreachable { reference: "r".into(), message: "m".into() });
    let missing = || TransferError::Registry(OciError::NotFound("r@d".into()));
    let full = || TransferError::InsufficientStorage { needed: 10, free: 1 };
    // (error, attempts before) → retry after, reported phase (Failed counts toward the threshold)
    let cases: Vec<(TransferError, u32, Duration, DeploymentPhase)> = vec![
        (unreachable(), 0, Duration::from_secs(2), DeploymentPhase::Downloading),
        (unreachable(), 3, Duration::from_secs(16), DeploymentPhase::Downloading),
        (unreachable(), 20, Duration::from_secs(60), DeploymentPhase::Downloading),
        (missing(), 0, Duration::from_secs(2), DeploymentPhase::Downloading),
        (missing(), 4, Duration::from_secs(300), DeploymentPhase::Failed),
        (full(), 0, Duration::from_secs(60), DeploymentPhase::Failed),
        (TransferError::Io(std::io::Error::other("eio")), 0, Duration::from_secs(2), DeploymentPhase::Downloading),
    ];
    for (error, before, after, phase) in cases {
        let what = error.to_string();
        let mut memory = Memory::new();
        memory.insert("ns/d".into(), Tracked { artifact: "a".into(), attempts: before, ..Default::default() });
        let now = Instant::now();
        match on_finished(&mut memory, "ns/d", "a", None, Err(error), true, now) {
            Verdict::Retrying { after: got, report, attempt, .. } => {
                assert_eq!((got, report.phase, attempt), (after, phase, before + 1), "{what} after {before}");
                assert_eq!(memory["ns/d"].not_before, Some(now + after));
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn a_success_resets_the_attempts_and_remembers_the_bytes() {
    let mut memory = Memory::new();
    memory.insert("ns/d".into(), Tracked { artifact: "a".into(), attempts: 4, ..Default::default() });
    let bytes = Bytes { fetched: 5, reused: 5, total: 10 };
    assert!(matches!(
        on_finished(&mut memory, "ns/d", "a", None, Ok(bytes), true, Instant::now()),
        Verdict::Succeeded(_)
    ));
    assert_eq!((memory["ns/d"].attempts, memory["ns/d"].last_bytes), (0, Some(bytes)));
}

#[test]
fn a_transfer_that_finished_after_its_deployment_moved_on_changes_nothing() {
    // (artifact remembered, deployment present) → stale
    for (remembered, present) in [("b", true), ("a", false)] {
        let mut memory = Memory::new();
        memory.insert("ns/d".into(), Tracked { artifact: remembered.into(), ..Default::default() });
        let e = TransferError::Registry(OciError::NotFound("r".into()));
        let v = on_finished(&mut memory, "ns/d", "a", None, Err(e), present, Instant::now());
        assert!(matches!(v, Verdict::Stale), "remembered {remembered}, present {present}");
    }
    let mut memory = Memory::new();
    assert!(matches!(
        on_finished(&mut memory, "ns/gone", "a", None, Ok(Bytes::default()), true, Instant::now()),
        Verdict::Stale
    ));
}

#[test]
fn label_values_follow_the_kubernetes_rules() {
    let cases = [
        ("1.0.0", true),
        ("v1_rc-2", true),
        ("", false),
        ("-1", false),
        ("1.", false),
        ("1+build", false),
        (&"9".repeat(64), false),
        (&"9".repeat(63), true),
    ];
    for (v, ok) in cases {
        assert_eq!(label_value(v).is_some(), ok, "{v:?}");
    }
}

#[test]
fn artifacts_are_read_by_digest() {
    assert_eq!(artifact_digest("reg/m@sha256:abc"), Some("sha256:abc"));
    assert_eq!(artifact_digest("reg/m:1"), None);
    assert_eq!(key_of(&md("d", "m", "1", Normal, 1)), "ns/d");
}
