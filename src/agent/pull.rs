//! Fetching a variant: its manifest by digest, then each file layer streamed to `tmp/`, verified,
//! and moved into `blobs/`. Partial downloads resume with HTTP Range; layers already in the store
//! are not fetched; nothing unverified ever leaves `tmp/`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::manifest::{IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::store::{FileRecord, Store, digest_hex, validate_title};
use crate::api::BlockerReason;
use crate::oci::OciError;
use crate::oci::client::parse_reference;
use crate::oci::layout::layer_title;

/// Why a pull did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
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

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull
}

impl PullError {
    /// The blocker reason to report.
    pub fn reason(&self) -> BlockerReason {
        match self {
            PullError::InsufficientStorage { .. } => BlockerReason::InsufficientStorage,
            PullError::Io(e) if is_enospc(e) => BlockerReason::InsufficientStorage,
            PullError::Io(_) => BlockerReason::DeploymentFailed,
            _ => BlockerReason::TransferFailed,
        }
    }

    /// Whether the `attempt`-th failure in a row is reported as Failed (counted by the rollout's
    /// failure threshold) rather than as a blocker of a transfer that goes on. An unreachable
    /// registry is an outage, never a failure.
    pub fn is_failure(&self, attempt: u32) -> bool {
        match self {
            PullError::Registry(OciError::Unreachable { .. }) | PullError::Cancelled => false,
            PullError::Registry(_) | PullError::Io(_) => {
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
            PullError::Registry(OciError::Unreachable { .. }) => Some(backoff),
            PullError::Registry(e) if e.is_transient() && attempt >= ATTEMPTS_BEFORE_FAILED => {
                Some(Duration::from_secs(300))
            }
            PullError::Registry(e) if e.is_transient() => Some(backoff),
            PullError::InsufficientStorage { .. } => Some(Duration::from_secs(60)),
            PullError::Io(e) if is_enospc(e) => Some(Duration::from_secs(60)),
            PullError::Io(_) => Some(backoff),
            PullError::Cancelled => Some(Duration::ZERO),
            _ => None,
        }
    }
}

/// One file of a variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLayer {
    /// Relative path (validated).
    pub title: String,
    /// Layer digest.
    pub digest: String,
    /// Declared size.
    pub size: u64,
}

/// What a pull of one variant manifest fetches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullPlan {
    /// `<repository>@<manifest digest>`.
    pub artifact: String,
    /// The manifest digest.
    pub manifest_digest: String,
    /// Its files.
    pub files: Vec<FileLayer>,
    /// Chunk-index layers by the digest of the file layer they index: (index digest, size).
    pub chunk_indexes: std::collections::BTreeMap<String, (String, u64)>,
}

impl PullPlan {
    /// Sum of the files' sizes.
    pub fn total(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The files as the store records them.
    pub fn records(&self) -> Vec<FileRecord> {
        self.files
            .iter()
            .map(|f| FileRecord { title: f.title.clone(), digest: f.digest.clone(), size: f.size })
            .collect()
    }

    /// Layer digests.
    pub fn digests(&self) -> HashSet<String> {
        self.files.iter().map(|f| f.digest.clone()).collect()
    }
}

/// Checks a manifest's file layers against the safety rules and `max_size`.
pub fn plan_from_manifest(
    artifact: &str,
    manifest_digest: &str,
    manifest: &OciImageManifest,
    max_size: Option<u64>,
) -> Result<PullPlan, PullError> {
    let bad = |why: String| PullError::BadArtifact { artifact: artifact.to_string(), why };
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for layer in &manifest.layers {
        let Some(title) = layer_title(layer) else { continue };
        let path = validate_title(title).map_err(|e| bad(format!("layer {}: {e}", layer.digest)))?;
        let title = path.to_str().expect("validated titles are UTF-8").to_string();
        digest_hex(&layer.digest).map_err(|e| bad(e.to_string()))?;
        if layer.size < 0 {
            return Err(bad(format!("layer {title} declares a negative size")));
        }
        // "a" and "a/b" cannot both be files; neither can a title appear twice.
        if !seen.insert(title.clone()) {
            return Err(bad(format!("two layers are titled {title:?}")));
        }
        files.push(FileLayer { title, digest: layer.digest.clone(), size: layer.size as u64 });
    }
    for f in &files {
        if files.iter().any(|g| g.title.starts_with(&format!("{}/", f.title))) {
            return Err(bad(format!("{:?} is both a file and a directory", f.title)));
        }
    }
    if files.is_empty() {
        return Err(bad("no layer carries a file title (org.opencontainers.image.title)".into()));
    }
    // Chunk indexes are optional: a layer without one (or with a malformed one) is pulled whole.
    let chunk_indexes = manifest
        .layers
        .iter()
        .filter(|l| {
            l.media_type == crate::oci::layout::MEDIA_CHUNK_INDEX && l.size > 0 && digest_hex(&l.digest).is_ok()
        })
        .filter_map(|l| {
            let of = l.annotations.as_ref()?.get(crate::oci::layout::ANN_CHUNKS_OF)?;
            Some((of.clone(), (l.digest.clone(), l.size as u64)))
        })
        .collect();
    let plan =
        PullPlan { artifact: artifact.to_string(), manifest_digest: manifest_digest.to_string(), files, chunk_indexes };
    if let Some(max) = max_size
        && plan.total() > max
    {
        return Err(PullError::TooLarge { size: plan.total(), max });
    }
    Ok(plan)
}

/// Where to pull from.
#[derive(Clone)]
pub struct Source {
    /// A client for the registry (keeps its tokens).
    pub client: oci_client::Client,
    /// Credentials.
    pub auth: RegistryAuth,
}

/// Reads the variant manifest `artifact` (`<repository>@sha256:…`), checking its digest.
pub async fn fetch_plan(source: &Source, artifact: &str, max_size: Option<u64>) -> Result<PullPlan, PullError> {
    let r = parse_reference(artifact)?;
    let Some(expected) = r.digest().map(str::to_string) else {
        return Err(PullError::BadArtifact { artifact: artifact.into(), why: "not referenced by digest".into() });
    };
    let (raw, _) = source
        .client
        .pull_manifest_raw(&r, &source.auth, &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE])
        .await
        .map_err(|e| OciError::from_client(artifact, e))?;
    let actual = crate::oci::push::sha256_digest(&raw);
    if actual != expected {
        return Err(PullError::DigestMismatch { title: "manifest".into(), expected, actual });
    }
    let manifest: OciImageManifest = serde_json::from_slice(&raw).map_err(|e| PullError::BadArtifact {
        artifact: artifact.into(),
        why: format!("not an image manifest: {e}"),
    })?;
    plan_from_manifest(artifact, &expected, &manifest, max_size)
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

    pub(crate) async fn acquire(&self, bytes: usize) {
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
    pub(crate) async fn lock(&self, digest: &str) -> tokio::sync::OwnedMutexGuard<()> {
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
pub async fn fetch_layers(t: &Transfer<'_>, plan: &PullPlan) -> Result<(), PullError> {
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
        return Err(PullError::InsufficientStorage { needed, free });
    }
    let r = parse_reference(&plan.artifact)?;
    // Delta: the chunk indexes of the missing layers, and the chunks the store holds.
    let mut indexes = std::collections::HashMap::new();
    if t.delta {
        for f in &missing {
            let Some((digest, size)) = plan.chunk_indexes.get(&f.digest) else { continue };
            match crate::delta::fetch::fetch_index(t, &r, digest, *size, f).await {
                Ok(index) => {
                    indexes.insert(f.digest.clone(), index);
                }
                Err(PullError::Cancelled) => return Err(PullError::Cancelled),
                Err(e) => tracing::warn!(layer = %f.title, error = %e, "chunk index unusable; pulling the layer whole"),
            }
        }
    }
    let local = match indexes.values().next() {
        // Only worth indexing the store when there is something in it.
        Some(_) if t.store.models().is_empty() && t.store.referenced_blobs().is_empty() => None,
        Some(first) => {
            let targets: Vec<_> = indexes.values().collect();
            Some(crate::delta::fetch::LocalChunks::build(t.store, t.model, first.params(), &targets).await)
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
            Err(PullError::Io(e)) if is_enospc(&e) => {
                drop(fetches);
                discard_partials(t.store, t.in_flight, plan);
                let free = t.store.space(t.capacity).map(|s| s.0).unwrap_or(0);
                return Err(PullError::InsufficientStorage { needed, free });
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
    index: Option<&crate::delta::chunk_index::ChunkIndex>,
    local: Option<&crate::delta::fetch::LocalChunks>,
) -> Result<(), PullError> {
    if let (Some(index), Some(local)) = (index, local)
        && local.covers_any(index)
    {
        match crate::delta::fetch::fetch_layer_delta(t, r, f, index, local).await {
            Ok(()) => return Ok(()),
            // The rebuild's partial was removed (under the layer's lock): start over, whole.
            Err(e) if crate::delta::fetch::falls_back(&e) => {
                tracing::warn!(layer = %f.title, error = %e, "delta transfer failed; pulling the layer whole");
            }
            // An outage, a cancel, a full disk: the partial rebuild stays, the retry resumes it.
            Err(e) => return Err(e),
        }
    }
    fetch_blob(t, r, f).await?;
    // Its index is kept: a later version's delta transfer reuses this blob's chunks without
    // re-chunking it.
    if let Some(index) = index {
        crate::delta::fetch::save_index(t.store, index);
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

/// Hashes and appends a layer's bytes on a blocking thread, so the runtime threads only move bytes
/// off the socket (hashing 1 GiB is seconds of CPU).
pub(crate) struct LayerWriter {
    tx: tokio::sync::mpsc::Sender<Piece>,
    handle: tokio::task::JoinHandle<std::io::Result<Sha256>>,
}

/// What the writer appends: bytes from the wire, or a range of a local file (a reused chunk).
pub(crate) enum Piece {
    Bytes(bytes::Bytes),
    Copy { path: std::path::PathBuf, offset: u64, len: u64 },
}

impl LayerWriter {
    /// Opens `path`, keeps its first `keep` bytes (hashing them) and appends what follows.
    pub(crate) fn start(path: std::path::PathBuf, keep: u64) -> LayerWriter {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(16);
        let handle = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, Write};
            let mut hasher = Sha256::new();
            let mut file =
                std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
            file.set_len(keep)?;
            if keep > 0 {
                let mut buf = vec![0u8; 1 << 20];
                let mut existing = (&file).take(keep);
                loop {
                    let n = existing.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
            }
            file.seek(std::io::SeekFrom::End(0))?;
            // A small buffer: what it holds is lost to a SIGKILL and fetched again after the restart.
            let mut out = std::io::BufWriter::with_capacity(256 << 10, file);
            let mut buf = Vec::new();
            while let Some(piece) = rx.blocking_recv() {
                match piece {
                    Piece::Bytes(chunk) => {
                        out.write_all(&chunk)?;
                        hasher.update(&chunk);
                    }
                    Piece::Copy { path, offset, len } => {
                        let mut src = std::fs::File::open(&path)?;
                        src.seek(std::io::SeekFrom::Start(offset))?;
                        let mut src = src.take(len);
                        buf.resize(1 << 20, 0);
                        let mut copied = 0;
                        loop {
                            let n = src.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            out.write_all(&buf[..n])?;
                            hasher.update(&buf[..n]);
                            copied += n as u64;
                        }
                        if copied != len {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!("{} is shorter than a chunk it should hold", path.display()),
                            ));
                        }
                    }
                }
            }
            out.flush()?;
            Ok(hasher)
        });
        LayerWriter { tx, handle }
    }

    /// Queues a chunk; false when the writer stopped (its error comes from [`LayerWriter::finish`]).
    pub(crate) async fn write(&self, chunk: bytes::Bytes) -> bool {
        self.tx.send(Piece::Bytes(chunk)).await.is_ok()
    }

    /// Queues a range of a local file.
    pub(crate) async fn copy(&self, path: std::path::PathBuf, offset: u64, len: u64) -> bool {
        self.tx.send(Piece::Copy { path, offset, len }).await.is_ok()
    }

    /// Waits for everything queued to be written; returns the hash of the whole file.
    pub(crate) async fn finish(self) -> std::io::Result<Sha256> {
        drop(self.tx);
        self.handle.await.map_err(std::io::Error::other)?
    }
}

async fn fetch_blob(t: &Transfer<'_>, r: &Reference, f: &FileLayer) -> Result<(), PullError> {
    let _only_writer = tokio::select! {
        _ = t.cancel.cancelled() => return Err(PullError::Cancelled),
        guard = t.in_flight.lock(&f.digest) => guard,
    };
    if t.store.has_blob(&f.digest, f.size) {
        // Another transfer fetched it meanwhile.
        t.progress.fetched.fetch_sub(t.store.partial_len(&f.digest).min(f.size), Ordering::Relaxed);
        t.progress.reused.fetch_add(f.size, Ordering::Relaxed);
        return Ok(());
    }
    let partial = t.store.partial_path(&f.digest)?;
    let mut offset = t.store.partial_len(&f.digest);
    if offset > f.size {
        offset = 0;
    }
    let reference = format!("{}@{}", r.whole().split('@').next().unwrap_or_default(), f.digest);
    let mut stream = None;
    if offset < f.size {
        let desc = OciDescriptor { digest: f.digest.clone(), size: f.size as i64, ..Default::default() };
        let response = tokio::select! {
            _ = t.cancel.cancelled() => return Err(PullError::Cancelled),
            res = t.source.client.pull_blob_stream_partial(r, &desc, offset, None) => res,
        };
        let response = match response {
            Ok(r) => r,
            // 416: the partial is longer than the registry's blob: it cannot be resumed; start over.
            Err(oci_client::errors::OciDistributionError::ServerError { code: 416, .. }) if offset > 0 => {
                let _ = tokio::fs::remove_file(&partial).await;
                t.progress.fetched.fetch_sub(offset, Ordering::Relaxed);
                let message = "the partial download is longer than the registry's blob; starting over".into();
                return Err(OciError::Unreachable { reference, message }.into());
            }
            Err(e) => return Err(OciError::from_client(&reference, e).into()),
        };
        stream = Some(match response {
            BlobResponse::Partial(s) => s.stream,
            BlobResponse::Full(s) => {
                // The registry ignored the range: start over.
                t.progress.fetched.fetch_sub(offset, Ordering::Relaxed);
                offset = 0;
                s.stream
            }
        });
    }
    let writer = LayerWriter::start(partial.clone(), offset);
    let mut failure: Option<PullError> = None;
    if let Some(mut stream) = stream {
        loop {
            let next = tokio::select! {
                _ = t.cancel.cancelled() => {
                    failure = Some(PullError::Cancelled);
                    break;
                }
                next = stream.next() => next,
            };
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                // oci-client verifies whole (200) responses itself and fails at their end: our own
                // hash below says what happened.
                Some(Err(_)) if offset == f.size => break,
                Some(Err(e)) => {
                    let message = format!("reading the blob: {e}");
                    failure = Some(OciError::Unreachable { reference: reference.clone(), message }.into());
                    break;
                }
            };
            if offset + chunk.len() as u64 > f.size {
                failure = Some(PullError::Oversize { title: f.title.clone(), declared: f.size });
                break;
            }
            if let Some(l) = t.limiter {
                l.acquire(chunk.len()).await;
            }
            let n = chunk.len() as u64;
            if !writer.write(chunk).await {
                break; // the writer failed: finish() returns why
            }
            offset += n;
            t.progress.fetched.fetch_add(n, Ordering::Relaxed);
        }
    }
    let hasher = writer.finish().await?;
    match failure {
        Some(e @ PullError::Oversize { .. }) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        Some(e) => return Err(e), // the partial stays for a resume
        None => {}
    }
    if offset < f.size {
        // A clean end before the declared size: the registry's blob is shorter than its descriptor
        // (a cut connection surfaces as a stream error above). Resuming would only ask past its end.
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(PullError::BadArtifact {
            artifact: reference,
            why: format!("{}: the registry's blob ended after {offset} of the {} declared bytes", f.title, f.size),
        });
    }
    verify_and_commit(t.store, f, &partial, hasher).await
}

/// The gate into `blobs/`: the whole file's sha256 must be the layer digest (else the partial is
/// removed); then it is made durable and moved in.
pub(crate) async fn verify_and_commit(
    store: &Store,
    f: &FileLayer,
    partial: &std::path::Path,
    hasher: Sha256,
) -> Result<(), PullError> {
    let actual = format!("sha256:{:x}", hasher.finalize());
    if actual != f.digest {
        let _ = tokio::fs::remove_file(partial).await;
        return Err(PullError::DigestMismatch { title: f.title.clone(), expected: f.digest.clone(), actual });
    }
    let synced = partial.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(synced)?.sync_data())
        .await
        .map_err(std::io::Error::other)??;
    store.commit_blob(&f.digest, partial)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::oci::layout::{ANN_TITLE, MEDIA_CHUNK_INDEX};

    fn layer(title: Option<&str>, size: i64) -> OciDescriptor {
        OciDescriptor {
            media_type: "application/octet-stream".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size,
            annotations: title.map(|t| BTreeMap::from([(ANN_TITLE.to_string(), t.to_string())])),
            ..Default::default()
        }
    }

    fn manifest(layers: Vec<OciDescriptor>) -> OciImageManifest {
        OciImageManifest { layers, ..Default::default() }
    }

    #[test]
    fn plans_refuse_unsafe_or_oversized_artifacts() {
        let ok = manifest(vec![layer(Some("model.onnx"), 10), layer(None, 5)]);
        let plan = plan_from_manifest("r@d", "d", &ok, Some(10)).unwrap();
        assert_eq!(plan.files.len(), 1);
        assert!(matches!(plan_from_manifest("r@d", "d", &ok, Some(9)), Err(PullError::TooLarge { size: 10, max: 9 })));
        for bad in [
            manifest(vec![layer(Some("../etc/x"), 1)]),
            manifest(vec![layer(Some("/abs"), 1)]),
            manifest(vec![layer(Some("a"), 1), layer(Some("a"), 1)]),
            manifest(vec![layer(Some("a"), 1), layer(Some("a/b"), 1)]),
            manifest(vec![layer(Some("a"), -1)]),
            manifest(vec![layer(None, 1)]),
        ] {
            let err = plan_from_manifest("r@d", "d", &bad, None).unwrap_err();
            assert!(matches!(err, PullError::BadArtifact { .. }), "{err}");
            assert_eq!(err.reason(), BlockerReason::TransferFailed);
            assert_eq!(err.retry_after(1), None);
        }
        // Chunk indexes are not files, even with a title.
        let mut idx = layer(Some("x"), 3);
        idx.media_type = MEDIA_CHUNK_INDEX.into();
        let plan = plan_from_manifest("r@d", "d", &manifest(vec![idx, layer(Some("y"), 1)]), None).unwrap();
        assert_eq!(plan.files.iter().map(|f| f.title.as_str()).collect::<Vec<_>>(), vec!["y"]);
    }

    #[test]
    fn errors_are_classified() {
        let unreachable = PullError::Registry(OciError::Unreachable { reference: "r".into(), message: "m".into() });
        assert_eq!(unreachable.retry_after(0), Some(Duration::from_secs(1)));
        assert_eq!(unreachable.retry_after(20), Some(Duration::from_secs(60)));
        let full = PullError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.reason(), BlockerReason::InsufficientStorage);
        let mismatch = PullError::DigestMismatch { title: "t".into(), expected: "a".into(), actual: "b".into() };
        assert_eq!((mismatch.reason(), mismatch.retry_after(0)), (BlockerReason::TransferFailed, None));
        assert!(mismatch.is_failure(1));
        // An outage is never a failure; a missing blob or refused credentials become one after a few tries.
        assert!(!unreachable.is_failure(100));
        let missing = PullError::Registry(OciError::NotFound("r@d".into()));
        assert!(!missing.is_failure(1) && missing.is_failure(ATTEMPTS_BEFORE_FAILED));
        assert_eq!(missing.retry_after(ATTEMPTS_BEFORE_FAILED), Some(Duration::from_secs(300)));
        assert!(full.is_failure(1), "a full disk is reported at once");
    }
}
