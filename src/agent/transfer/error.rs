//! The one error type of a transfer, whole or delta, classified for retries and blockers.

use std::time::Duration;

use crate::api::BlockerReason;
use crate::oci::OciError;

/// Why a transfer did not complete (whole or delta, one type).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The registry refused, failed or could not be reached.
    #[error(transparent)]
    Registry(#[from] OciError),
    /// The artifact breaks the layout contract or a safety rule.
    #[error("invalid artifact {artifact}: {why}")]
    BadArtifact {
        /// The reference.
        artifact: String,
        /// What is wrong.
        why: String,
    },
    /// A layer's bytes do not hash to its digest (they were discarded).
    #[error("{title}: digest mismatch (expected {expected}, got {actual}); the bytes were discarded")]
    DigestMismatch {
        /// The file.
        title: String,
        /// The descriptor's digest.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The registry sent more bytes than the layer's descriptor declares.
    #[error("{title}: the registry sent more than the {declared} bytes the descriptor declares")]
    Oversize {
        /// The file.
        title: String,
        /// Declared size.
        declared: u64,
    },
    /// The artifact is larger than `maxSizeBytes`.
    #[error("the artifact is {size} bytes, more than maxSizeBytes {max}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The store's filesystem lacks the space.
    #[error("needs {needed} more bytes in the store, {free} free")]
    InsufficientStorage {
        /// Bytes still to write.
        needed: u64,
        /// Free bytes.
        free: u64,
    },
    /// A local file operation failed.
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    /// The transfer was stopped (paused, preempted, or no longer wanted); its partial stays.
    #[error("cancelled")]
    Cancelled,
}

/// Consecutive failures after which a registry error other than an outage is reported as Failed
/// (a deleted blob, refused credentials): it keeps being retried, slowly, in case it is fixed.
pub const ATTEMPTS_BEFORE_FAILED: u32 = 5;

/// Whether an I/O error says the filesystem is full.
pub(crate) fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull
}

impl TransferError {
    /// The blocker reason to report.
    pub fn reason(&self) -> BlockerReason {
        match self {
            TransferError::InsufficientStorage { .. } => BlockerReason::InsufficientStorage,
            TransferError::Io(e) if is_enospc(e) => BlockerReason::InsufficientStorage,
            TransferError::Io(_) => BlockerReason::DeploymentFailed,
            _ => BlockerReason::TransferFailed,
        }
    }

    /// Whether the `attempt`-th failure in a row is reported as Failed (counted by the rollout's
    /// failure threshold) rather than as a blocker of a transfer that goes on. An unreachable
    /// registry is an outage, never a failure.
    pub fn is_failure(&self, attempt: u32) -> bool {
        match self {
            TransferError::Registry(OciError::Unreachable { .. }) | TransferError::Cancelled => false,
            TransferError::Registry(_) | TransferError::Io(_) => {
                attempt >= ATTEMPTS_BEFORE_FAILED || self.reason() == BlockerReason::InsufficientStorage
            }
            _ => true,
        }
    }

    /// When to try again after the `attempt`-th failure in a row; none for failures that only a
    /// change of the artifact can fix (a bad digest, a bad title, too large).
    pub fn retry_after(&self, attempt: u32) -> Option<Duration> {
        let backoff = Duration::from_secs((1u64 << attempt.min(6)).min(60));
        match self {
            TransferError::Registry(OciError::Unreachable { .. }) => Some(backoff),
            TransferError::Registry(e) if e.is_transient() && attempt >= ATTEMPTS_BEFORE_FAILED => {
                Some(Duration::from_secs(300))
            }
            TransferError::Registry(e) if e.is_transient() => Some(backoff),
            TransferError::InsufficientStorage { .. } => Some(Duration::from_secs(60)),
            TransferError::Io(e) if is_enospc(e) => Some(Duration::from_secs(60)),
            TransferError::Io(_) => Some(backoff),
            TransferError::Cancelled => Some(Duration::ZERO),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let unreachable = TransferError::Registry(OciError::Unreachable { reference: "r".into(), message: "m".into() });
        assert_eq!(unreachable.retry_after(0), Some(Duration::from_secs(1)));
        assert_eq!(unreachable.retry_after(20), Some(Duration::from_secs(60)));
        let full = TransferError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.reason(), BlockerReason::InsufficientStorage);
        let mismatch = TransferError::DigestMismatch { title: "t".into(), expected: "a".into(), actual: "b".into() };
        assert_eq!((mismatch.reason(), mismatch.retry_after(0)), (BlockerReason::TransferFailed, None));
        assert!(mismatch.is_failure(1));
        // An outage is never a failure; a missing blob or refused credentials become one after a few tries.
        assert!(!unreachable.is_failure(100));
        let missing = TransferError::Registry(OciError::NotFound("r@d".into()));
        assert!(!missing.is_failure(1) && missing.is_failure(ATTEMPTS_BEFORE_FAILED));
        assert_eq!(missing.retry_after(ATTEMPTS_BEFORE_FAILED), Some(Duration::from_secs(300)));
        assert!(full.is_failure(1), "a full disk is reported at once");
    }
}
