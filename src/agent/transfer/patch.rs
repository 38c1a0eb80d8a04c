//! A layer rebuilt from a patch (`peat push --delta-from`) against a file the store holds: the
//! patch is fetched like any blob (resumable, verified against its digest, into `blobs/`), applied
//! to the held file into `tmp/`, hashed on the way, and committed only when the result hashes to
//! the layer digest. The patch blob is removed afterwards, used or not.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use oci_client::Reference;
use sha2::Sha256;
use tracing::info;

use super::blob::fetch_blob;
use super::error::TransferError;
use super::plan::{FileLayer, PatchLayer, PullPlan};
use super::session::Transfer;
use super::writer::{claim, verify_and_commit};
use crate::agent::store::Store;
use crate::oci::digest::HashingWriter;
use crate::oci::patch::{PatchParams, apply_patch};

/// The smallest patch of layer `f` whose base file the store holds.
pub(super) fn usable<'p>(store: &Store, plan: &'p PullPlan, f: &FileLayer) -> Option<&'p PatchLayer> {
    let held = |digest: &str| store.blob_path(digest).is_ok_and(|p| p.is_file());
    plan.patches.get(&f.digest)?.iter().filter(|p| held(&p.from)).min_by_key(|p| p.size)
}

/// Fetches patch `p` and rebuilds layer `f` from it and the held file.
pub(super) async fn fetch_layer_patch(
    t: &Transfer<'_>,
    r: &Reference,
    f: &FileLayer,
    p: &PatchLayer,
) -> Result<(), TransferError> {
    let patch_blob = t.store.blob_path(&p.digest)?;
    let result = rebuild(t, r, f, p).await;
    // Used or unusable, the patch has no further use (it is no file of any version).
    let _ = tokio::fs::remove_file(&patch_blob).await;
    result
}

async fn rebuild(t: &Transfer<'_>, r: &Reference, f: &FileLayer, p: &PatchLayer) -> Result<(), TransferError> {
    if !t.store.has_blob(&p.digest, p.size) {
        // What an earlier attempt fetched of the patch came over the wire too.
        t.progress.fetched.fetch_add(t.store.partial_len(&p.digest).min(p.size), Ordering::Relaxed);
        let layer =
            FileLayer { title: format!("{} (patch)", f.title), digest: p.digest.clone(), size: p.size, archive: None };
        fetch_blob(t, r, &layer).await?;
    }
    let Some(claim) = claim(t, f).await? else { return Ok(()) };
    // The layer's own partial (a chunk rebuild's prefix, counted as fetched at the start) is not used.
    t.progress.fetched.fetch_sub(claim.have.min(f.size), Ordering::Relaxed);
    let (old, patch, partial) = (t.store.blob_path(&p.from)?, t.store.blob_path(&p.digest)?, claim.partial.clone());
    let (size, params) = (f.size, p.params);
    info!(layer = %f.title, size, patch = p.size, from = %p.from, "rebuilding the layer from a patch");
    let applied = tokio::task::spawn_blocking(move || apply_file(&old, &patch, &partial, size, params))
        .await
        .map_err(std::io::Error::other)?;
    let result = match applied {
        Ok(hasher) => verify_and_commit(t.store, f, &claim.partial, hasher).await,
        Err(e) => {
            let _ = tokio::fs::remove_file(&claim.partial).await;
            Err(e.into())
        }
    };
    if result.is_ok() {
        t.progress.reused.fetch_add(f.size.saturating_sub(p.size), Ordering::Relaxed);
    }
    result
}

/// Applies the patch at `patch` to the file at `old`, writing `size` bytes to `out`; returns their hash.
fn apply_file(old: &Path, patch: &Path, out: &Path, size: u64, params: PatchParams) -> std::io::Result<Sha256> {
    let base = std::fs::File::open(old)?;
    // SAFETY: blobs are read-only and never written in place (a blob is only ever renamed in or
    // unlinked; an unlinked file stays mapped), so the mapping cannot change under the reader.
    let map = unsafe { memmap2::Mmap::map(&base)? };
    let mut patch = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(patch)?);
    let file = std::fs::File::create(out)?;
    let mut writer = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
    apply_patch(&map, &mut patch, size, &mut writer, params)?;
    writer.flush()?;
    Ok(writer.hasher)
}
