//! One transfer of a variant into the store: its plan (the manifest, by digest), then each missing
//! file layer — from a patch where the artifact has one against a file the store holds, else by
//! chunks where it has chunk indexes and the store holds some of the chunks, else whole —
//! written into `tmp/`, verified, and moved into `blobs/`. Partial downloads resume; layers
//! already in the store are not fetched; nothing unverified ever leaves `tmp/`.
//!
//! ```text
//! mod (orchestration) ─┬─> plan   (manifest → files)
//!                       ├─> patch  (a layer from a patch) ─┐
//!                       ├─> blob   (a layer whole) ────────┤
//!                       └─> delta  (a layer by chunks) ────┴─> writer (claim, pump, verify, commit)
//! every one of them ──> error (TransferError), session (Transfer, limits, progress)
//! ```

mod blob;
pub mod delta;
mod error;
mod patch;
pub mod plan;
mod session;
mod writer;

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use oci_client::Reference;

pub(crate) use error::is_enospc;
pub use error::{ATTEMPTS_BEFORE_FAILED, TransferError};
pub use plan::{FileLayer, PatchLayer, PullPlan, Source, fetch_plan, plan_from_manifest};
pub use session::{InFlight, Progress, RateLimiter, Transfer};

use crate::agent::store::Store;
use crate::oci::chunk_index::ChunkIndex;
use crate::oci::client::parse_reference;
use delta::LocalChunks;

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
    // Archives take their space twice: the blob, and the files unpacked from it (estimated at the
    // archive's size; a compressed one may unpack to more, and a full disk then ends the same way).
    let unpacked: u64 = plan.files.iter().filter(|f| f.archive.is_some()).map(|f| f.size).sum();
    let needed: u64 = (missing.iter().map(|f| f.size).sum::<u64>() - fetched_before).saturating_add(unpacked);
    let (mut free, _) = t.store.space(t.capacity)?;
    if needed > free {
        // Disk pressure: kept versions that are not active go (least recently active first) when
        // that makes room; never the active one, nor a layer some running transfer needs.
        let evicted = {
            let _guard = t.store_lock.lock().await;
            let protect: HashSet<String> = t.pinned.lock().expect("pinned lock").values().flatten().cloned().collect();
            let wanted = t.wanted.lock().expect("wanted lock").clone();
            t.store.evict_for(needed, free, &protect, &wanted)?
        };
        if !evicted.is_empty() {
            tracing::info!(?evicted, needed, free, "evicted kept versions to make room");
            free = t.store.space(t.capacity)?.0;
        }
    }
    if needed > free {
        discard_partials(t.store, t.in_flight, plan);
        return Err(TransferError::InsufficientStorage { needed, free });
    }
    let r = parse_reference(&plan.artifact)?;
    // Delta: a patch against a file the store holds, else the chunk indexes of the missing layers
    // and the chunks the store holds (a layer with a patch needs no index: it costs wire bytes).
    let patches: std::collections::HashMap<&str, &PatchLayer> = if t.delta {
        missing.iter().filter_map(|f| Some((f.digest.as_str(), patch::usable(t.store, plan, f)?))).collect()
    } else {
        Default::default()
    };
    let mut indexes = std::collections::HashMap::new();
    if t.delta {
        for f in missing.iter().filter(|f| !patches.contains_key(f.digest.as_str())) {
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
    let futures: Vec<_> = missing
        .into_iter()
        .map(|f| {
            let how = match patches.get(f.digest.as_str()) {
                Some(p) => Delta::Patch(p),
                None => Delta::Chunks(indexes.get(&f.digest), local.as_ref()),
            };
            fetch_layer(t, &r, f, how)
        })
        .collect();
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

/// How a layer may come other than whole.
enum Delta<'a> {
    /// From a patch against a file the store holds.
    Patch(&'a PatchLayer),
    /// By chunks, when it has a chunk index and the store holds some of its chunks.
    Chunks(Option<&'a ChunkIndex>, Option<&'a LocalChunks>),
}

/// One layer: from a patch or by chunks, falling back to a whole pull on any mismatch or error
/// that a retry would not mend; else whole.
async fn fetch_layer(t: &Transfer<'_>, r: &Reference, f: &FileLayer, how: Delta<'_>) -> Result<(), TransferError> {
    let (index, local) = match how {
        Delta::Chunks(index, local) => (index, local),
        Delta::Patch(p) => {
            match patch::fetch_layer_patch(t, r, f, p).await {
                Ok(()) => return Ok(()),
                Err(e) if delta::falls_back(&e) => {
                    tracing::warn!(layer = %f.title, error = %e, "patch unusable; pulling the layer whole");
                }
                // An outage, a cancel, a full disk: the retry fetches the patch again (resuming it).
                Err(e) => return Err(e),
            }
            (None, None)
        }
    };
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
