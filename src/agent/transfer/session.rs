//! What a running transfer shares: its source, store, limits, progress counters and the
//! agent-wide lock per layer digest.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::plan::Source;
use crate::agent::store::Store;

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

    pub(super) async fn acquire(&self, bytes: usize) {
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
    /// Serializes changes of the store's model directories (eviction takes it).
    pub store_lock: &'a tokio::sync::Mutex<()>,
    /// (model, version) that ModelDeployments on this node ask for: eviction leaves them.
    pub wanted: &'a std::sync::Mutex<crate::agent::store::Versions>,
    /// Layer digests of every running transfer's plan: eviction leaves them.
    pub pinned: &'a std::sync::Mutex<std::collections::HashMap<String, HashSet<String>>>,
}

/// One download per layer digest at a time, agent-wide: two transfers sharing a layer (a common
/// tokenizer) must not write one partial file together. The second waits, then finds the blob.
#[derive(Debug, Default)]
pub struct InFlight {
    locks: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl InFlight {
    pub(super) async fn lock(&self, digest: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.locks.lock().expect("in-flight lock").entry(digest.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// Whether some transfer is downloading `digest` now.
    pub fn is_busy(&self, digest: &str) -> bool {
        self.locks.lock().expect("in-flight lock").get(digest).is_some_and(|m| m.try_lock().is_err())
    }
}
