//! One transfer of a variant into the store: its plan (the manifest, by digest), then each missing
//! file layer — by delta where the artifact has chunk indexes and the store holds some of the
//! chunks, else whole — streamed into `tmp/`, verified, and moved into `blobs/`. Partial downloads
//! resume; layers already in the store are not fetched; nothing unverified ever leaves `tmp/`.
//!
//! ```text
//! mod (orchestration, errors, limits) ─┬─> plan   (manifest → files)
//!                                      ├─> blob   (a layer whole) ──┐
//!                                      └─> delta  (a layer by chunks)┴─> writer (claim, pump, verify, commit)
//! ```

mod blob;
pub mod delta;
pub mod plan;
mod writer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::Reference;
use tokio_util::sync::CancellationToken;

pub use plan::{FileLayer, PullPlan, Source, fetch_plan, plan_from_manifest};

use crate::agent::store::Store;
use crate::api::BlockerReason;
use crate::oci::OciError;
use crate::oci::chunk_index::ChunkIndex;
use crate::oci::client::parse_reference;
use delta::LocalChunks;

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

/// Bytes moved by a pull, read by the status reporter while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes received from the registry (this pull, plus partials fetched before a restart).
    pub fetched: AtomicU64,
    /// Bytes taken from the store instead of the wire.
    pub reused: AtomicU64,
    /// Bytes of the plan.
    pub total: AtomicU64,
}

/// Paces downloads to a byte rate shared by every transfer of the agent.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_second: f64,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter for `bytes_per_second`.
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        RateLimiter { bytes_per_second: bytes_per_second.max(1) as f64, next: tokio::sync::Mutex::new(Instant::now()) }
    }

    async fn acquire(&self, bytes: usize) {
        let start = {
            let mut next = self.next.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
}

/// What a transfer needs besides the plan.
pub struct Transfer<'a> {
    /// The store.
    pub store: &'a Store,
    /// Registry access.
    pub source: &'a Source,
    /// Progress counters.
    pub progress: &'a Progress,
    /// Stops the transfer (the partial stays for later).
    pub cancel: &'a CancellationToken,
    /// Optional bandwidth cap.
    pub limiter: Option<&'a RateLimiter>,
    /// Most bytes the store may occupy (`--storage-capacity`).
    pub capacity: Option<u64>,
    /// Layers being downloaded by any transfer of the agent.
    pub in_flight: &'a InFlight,
    /// Fetch only the chunks the store lacks, where the artifact has chunk indexes.
    pub delta: bool,
    /// The model (its earlier versions' files are indexed for delta transfers).
    pub model: &'a str,
}

/// One download per layer digest at a time, agent-wide: two transfers sharing a layer (a common
/// tokenizer) must not write one partial file together. The second waits, then finds the blob.
#[derive(Debug, Default)]
pub struct InFlight {
    locks: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl InFlight {
    async fn lock(&self, digest: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.locks.lock().expect("in-flight lock").entry(digest.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// Whether some transfer is downloading `digest` now.
    pub fn is_busy(&self, digest: &str) -> bool {
        self.locks.lock().expect("in-flight lock").get(digest).is_some_and(|m| m.try_lock().is_err())
    }
}

/// Layers of one pull fetched at the same time.
const LAYERS_IN_FLIGHT: usize = 3;

/// Fetches every file layer of `plan` not already in the store, verified, into `blobs/`.
pub async fn fetch_layers(t: &Transfer<'_>, plan: &PullPlan) -> Result<(), TransferError> {
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    let mut reused = 0;
    let mut fetched_before = 0;
    for f in &plan.files {
        if !seen.insert(f.digest.clone()) {
            continue;
        }
        if t.store.has_blob(&f.digest, f.size) {
            reused += f.size;
        } else {
            fetched_before += t.store.partial_len(&f.digest).min(f.size);
            missing.push(f);
        }
    }
    t.progress.total.store(plan.total(), Ordering::Relaxed);
    t.progress.reused.store(reused, Ordering::Relaxed);
    t.progress.fetched.store(fetched_before, Ordering::Relaxed);
    let needed: u64 = missing.iter().map(|f| f.size).sum::<u64>() - fetched_before;
    let (free, _) = t.store.space(t.capacity)?;
    if needed > free {
        discard_partials(t.store, t.in_flight, plan);
        return Err(TransferError::InsufficientStorage { needed, free });
    }
    let r = parse_reference(&plan.artifact)?;
    // Delta: the chunk indexes of the missing layers, and the chunks the store holds.
    let mut indexes = std::collections::HashMap::new();
    if t.delta {
        for f in &missing {
            let Some((digest, size)) = plan.chunk_indexes.get(&f.digest) else { continue };
            match delta::fetch_index(t, &r, digest, *size, f).await {
                Ok(index) => {
                    indexes.insert(f.digest.clone(), index);
                }
                Err(TransferError::Cancelled) => return Err(TransferError::Cancelled),
                Err(e) => tracing::warn!(layer = %f.title, error = %e, "chunk index unusable; pulling the layer whole"),
            }
        }
    }
    let local = match indexes.values().next() {
        // Only worth indexing the store when there is something in it.
        Some(_) if t.store.models().is_empty() && t.store.referenced_blobs().is_empty() => None,
        Some(first) => {
            let targets: Vec<_> = indexes.values().collect();
            Some(LocalChunks::build(t.store, t.model, first.params(), &targets).await)
        }
        None => None,
    };
    // A few layers at once: one stream rarely fills a link (or a core hashing), several do.
    // (Futures made up front: a mapping closure inside the stream defeats `Send` inference in tokio::spawn.)
    let futures: Vec<_> =
        missing.into_iter().map(|f| fetch_layer(t, &r, f, indexes.get(&f.digest), local.as_ref())).collect();
    let mut fetches = futures::stream::iter(futures).buffer_unordered(LAYERS_IN_FLIGHT);
    while let Some(result) = fetches.next().await {
        match result {
            Ok(()) => {}
            Err(TransferError::Io(e)) if is_enospc(&e) => {
                drop(fetches);
                discard_partials(t.store, t.in_flight, plan);
                let free = t.store.space(t.capacity).map(|s| s.0).unwrap_or(0);
                return Err(TransferError::InsufficientStorage { needed, free });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One layer: by delta when it has a chunk index and the store holds some of its chunks, falling
/// back to a whole pull on any mismatch or error; else whole.
async fn fetch_layer(
    t: &Transfer<'_>,
    r: &Reference,
    f: &FileLayer,
    index: Option<&ChunkIndex>,
    local: Option<&LocalChunks>,
) -> Result<(), TransferError> {
    if let (Some(index), Some(local)) = (index, local)
        && local.covers_any(index)
    {
        match delta::fetch_layer_delta(t, r, f, index, local).await {
            Ok(()) => return Ok(()),
            // The rebuild's partial was removed (under the layer's lock): start over, whole.
            Err(e) if delta::falls_back(&e) => {
                tracing::warn!(layer = %f.title, error = %e, "delta transfer failed; pulling the layer whole");
            }
            // An outage, a cancel, a full disk: the partial rebuild stays, the retry resumes it.
            Err(e) => return Err(e),
        }
    }
    blob::fetch_blob(t, r, f).await?;
    // Its index is kept: a later version's delta transfer reuses this blob's chunks without
    // re-chunking it.
    if let Some(index) = index {
        delta::save_index(t.store, index);
    }
    Ok(())
}

/// Removes the plan's partial downloads (after running out of space: nothing half-written stays).
pub fn discard_partials(store: &Store, in_flight: &InFlight, plan: &PullPlan) {
    for f in plan.files.iter().filter(|f| !in_flight.is_busy(&f.digest)) {
        if let Ok(p) = store.partial_path(&f.digest) {
            let _ = std::fs::remove_file(p);
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
