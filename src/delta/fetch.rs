//! A delta transfer of one layer: its chunk index from the registry, the chunks the store already
//! holds (in any blob of an earlier version of the model, or any blob whose index is kept) copied
//! locally, only the missing byte ranges fetched (adjacent chunks coalesced into one HTTP Range
//! request), the file rebuilt in order into `tmp/` and verified against the whole-layer digest.
//! Any mismatch or error makes the caller pull the layer whole.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use sha2::Digest;
use tracing::{debug, info};

use super::chunk_index::{ChunkIndex, Params, index_reader};
use crate::agent::pull::{FileLayer, LayerWriter, PullError, Transfer};
use crate::agent::store::Store;
use crate::oci::OciError;

/// Largest chunk index accepted (a 1 GiB file's index is ~2.5 MB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Fetches and checks the chunk index of layer `f`.
pub async fn fetch_index(
    t: &Transfer<'_>,
    r: &Reference,
    digest: &str,
    size: u64,
    f: &FileLayer,
) -> Result<ChunkIndex, PullError> {
    let bad = |why: String| PullError::BadArtifact { artifact: format!("{}@{digest}", r.repository()), why };
    if size > MAX_INDEX_BYTES {
        return Err(bad(format!("chunk index of {size} bytes")));
    }
    let desc = OciDescriptor { digest: digest.to_string(), size: size as i64, ..Default::default() };
    let mut raw = Vec::with_capacity(size as usize);
    tokio::select! {
        _ = t.cancel.cancelled() => return Err(PullError::Cancelled),
        res = t.source.client.pull_blob(r, &desc, &mut raw) => res.map_err(|e| OciError::from_client(digest, e))?,
    }
    t.progress.fetched.fetch_add(raw.len() as u64, Ordering::Relaxed);
    if crate::oci::push::sha256_digest(&raw) != digest {
        return Err(bad("chunk index digest mismatch".into()));
    }
    let index: ChunkIndex = serde_json::from_slice(&raw).map_err(|e| bad(format!("not a chunk index: {e}")))?;
    index.validate(&f.digest, f.size).map_err(bad)?;
    Ok(index)
}

/// Chunks held by the store: hash → (blob file, offset).
pub struct LocalChunks {
    params: Params,
    by_hash: HashMap<String, (PathBuf, u64)>,
}

impl LocalChunks {
    /// Indexes what the store holds with `params`: kept indexes of any blob, and the blobs of the
    /// model's versions on disk (indexed now when no index with these parameters is kept).
    pub async fn build(store: &Store, model: &str, params: Params) -> LocalChunks {
        let store = store.clone();
        let model = model.to_string();
        tokio::task::spawn_blocking(move || LocalChunks::build_blocking(&store, &model, params))
            .await
            .unwrap_or(LocalChunks { params, by_hash: HashMap::new() })
    }

    fn build_blocking(store: &Store, model: &str, params: Params) -> LocalChunks {
        let mut by_hash = HashMap::new();
        let mut blobs: Vec<String> =
            store.state(model).versions.iter().flat_map(|v| v.files.iter().map(|f| f.digest.clone())).collect();
        // Blobs of other models whose index is kept (shared base weights, renamed models).
        if let Ok(rd) = std::fs::read_dir(store.root().join("chunks")) {
            for e in rd.flatten() {
                if let Some(hex) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")) {
                    blobs.push(format!("sha256:{hex}"));
                }
            }
        }
        blobs.sort();
        blobs.dedup();
        for digest in blobs {
            let Ok(blob) = store.blob_path(&digest) else { continue };
            if !blob.exists() {
                continue;
            }
            let Some(index) = local_index(store, &digest, &blob, params) else { continue };
            for (offset, _, hash) in index.spans() {
                by_hash.entry(hash.to_string()).or_insert_with(|| (blob.clone(), offset));
            }
        }
        debug!(chunks = by_hash.len(), "local chunks indexed");
        LocalChunks { params, by_hash }
    }

    /// Whether any chunk of `index` is held locally (with the same parameters).
    pub fn covers_any(&self, index: &ChunkIndex) -> bool {
        index.params() == self.params && index.chunks.iter().any(|c| self.by_hash.contains_key(&c.1))
    }
}

/// The kept index of a local blob with `params`, or a fresh one (kept for next time). None when the
/// blob cannot be read or does not hash to its name.
fn local_index(store: &Store, digest: &str, blob: &std::path::Path, params: Params) -> Option<ChunkIndex> {
    let path = store.chunk_index_path(digest).ok()?;
    if let Some(index) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<ChunkIndex>(&b).ok())
        && index.params() == params
        && index.digest == digest
    {
        return Some(index);
    }
    let file = std::fs::File::open(blob).ok()?;
    let (index, actual) = index_reader(std::io::BufReader::with_capacity(1 << 20, file), params).ok()?;
    if actual != digest {
        return None; // a damaged blob is no source of chunks
    }
    save_index(store, &index);
    Some(index)
}

/// Keeps the (verified) index of a local blob for later delta transfers.
pub fn save_index(store: &Store, index: &ChunkIndex) {
    if let Ok(path) = store.chunk_index_path(&index.digest) {
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec(index).expect("an index serializes")).is_ok() {
            let _ = std::fs::rename(tmp, path);
        }
    }
}

/// A run of chunks with one source.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Run {
    /// Bytes [offset, offset+len) of the layer, fetched with one Range request.
    Remote { offset: u64, len: u64 },
    /// `len` bytes of a local file from `at`.
    Local { path: PathBuf, at: u64, len: u64 },
}

/// Splits the layer into runs from `from` (a chunk boundary): consecutive missing chunks become one
/// Range request, consecutive local chunks contiguous in one file one copy.
fn runs(index: &ChunkIndex, local: &LocalChunks, from: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (offset, len, hash) in index.spans().filter(|s| s.0 >= from) {
        let len = u64::from(len);
        match (local.by_hash.get(hash), out.last_mut()) {
            (None, Some(Run::Remote { len: l, .. })) => *l += len,
            (None, _) => out.push(Run::Remote { offset, len }),
            (Some((path, at)), Some(Run::Local { path: p, at: a, len: l })) if p == path && *a + *l == *at => {
                *l += len;
            }
            (Some((path, at)), _) => out.push(Run::Local { path: path.clone(), at: *at, len }),
        }
    }
    out
}

/// Rebuilds layer `f` from local chunks and ranged fetches of the missing ones; verifies it.
pub async fn fetch_layer_delta(
    t: &Transfer<'_>,
    r: &Reference,
    f: &FileLayer,
    index: &ChunkIndex,
    local: &LocalChunks,
) -> Result<(), PullError> {
    let _only_writer = t.in_flight.lock(&f.digest).await;
    if t.store.has_blob(&f.digest, f.size) {
        t.progress.reused.fetch_add(f.size, Ordering::Relaxed);
        return Ok(());
    }
    let partial = t.store.partial_path(&f.digest)?;
    // A rebuild writes in order: an earlier attempt's prefix up to its last whole chunk stands.
    let have = t.store.partial_len(&f.digest);
    let keep = index.spans().map(|s| s.0).filter(|&o| o <= have).max().unwrap_or(0);
    let plan = runs(index, local, keep);
    let remote: u64 = plan.iter().map(|r| if let Run::Remote { len, .. } = r { *len } else { 0 }).sum();
    info!(layer = %f.title, size = f.size, resumed_at = keep, fetch = remote, requests = plan.iter().filter(|r| matches!(r, Run::Remote { .. })).count(), "delta transfer");
    let writer = LayerWriter::start(partial.clone(), keep);
    let desc = OciDescriptor { digest: f.digest.clone(), size: f.size as i64, ..Default::default() };
    let reference = format!("{}@{}", r.repository(), f.digest);
    let mut reused = 0u64;
    let mut failure = None;
    'runs: for run in plan {
        match run {
            Run::Local { path, at, len } => {
                if !writer.copy(path, at, len).await {
                    break;
                }
                reused += len;
                t.progress.reused.fetch_add(len, Ordering::Relaxed);
            }
            Run::Remote { offset, len } => {
                let response = tokio::select! {
                    _ = t.cancel.cancelled() => { failure = Some(PullError::Cancelled); break 'runs; }
                    res = t.source.client.pull_blob_stream_partial(r, &desc, offset, Some(len)) => res,
                };
                let mut stream = match response {
                    Ok(BlobResponse::Partial(s)) => s.stream,
                    Ok(BlobResponse::Full(_)) => {
                        failure = Some(PullError::BadArtifact {
                            artifact: reference.clone(),
                            why: "the registry does not serve byte ranges".into(),
                        });
                        break;
                    }
                    Err(e) => {
                        failure = Some(OciError::from_client(&reference, e).into());
                        break;
                    }
                };
                let mut got = 0u64;
                loop {
                    let next = tokio::select! {
                        _ = t.cancel.cancelled() => { failure = Some(PullError::Cancelled); break 'runs; }
                        next = stream.next() => next,
                    };
                    match next {
                        None => break,
                        Some(Ok(chunk)) => {
                            got += chunk.len() as u64;
                            if got > len {
                                failure = Some(PullError::Oversize { title: f.title.clone(), declared: len });
                                break 'runs;
                            }
                            if let Some(l) = t.limiter {
                                l.acquire(chunk.len()).await;
                            }
                            t.progress.fetched.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            if !writer.write(chunk).await {
                                break 'runs;
                            }
                        }
                        Some(Err(e)) => {
                            let message = format!("reading a range: {e}");
                            failure = Some(OciError::Unreachable { reference: reference.clone(), message }.into());
                            break 'runs;
                        }
                    }
                }
                if got != len {
                    let message = format!("a range ended after {got} of {len} bytes");
                    failure = Some(OciError::Unreachable { reference: reference.clone(), message }.into());
                    break;
                }
            }
        }
    }
    let finished = writer.finish().await;
    let undo_reuse = |t: &Transfer<'_>| t.progress.reused.fetch_sub(reused, Ordering::Relaxed);
    let hasher = match finished {
        Ok(h) => h,
        Err(e) => {
            undo_reuse(t);
            return Err(e.into());
        }
    };
    if let Some(e) = failure {
        undo_reuse(t);
        return Err(e); // the prefix written so far stays for a resume
    }
    let actual = format!("sha256:{:x}", hasher.finalize());
    if actual != f.digest {
        undo_reuse(t);
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(PullError::DigestMismatch { title: f.title.clone(), expected: f.digest.clone(), actual });
    }
    let synced = partial.clone();
    tokio::task::spawn_blocking(move || std::fs::File::open(synced)?.sync_data())
        .await
        .map_err(std::io::Error::other)??;
    t.store.commit_blob(&f.digest, &partial)?;
    save_index(t.store, index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::chunk_index::{DEFAULT_PARAMS, index_bytes};

    #[test]
    fn runs_coalesce_missing_and_contiguous_local_chunks() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let index = index_bytes(&data, DEFAULT_PARAMS);
        assert!(index.chunks.len() > 4, "{}", index.chunks.len());
        let blob = PathBuf::from("/store/blobs/sha256/a");
        let mut by_hash = HashMap::new();
        // Local: all but chunks 1 and 2.
        for (i, (offset, _, hash)) in index.spans().enumerate() {
            if i != 1 && i != 2 {
                by_hash.insert(hash.to_string(), (blob.clone(), offset));
            }
        }
        let local = LocalChunks { params: DEFAULT_PARAMS, by_hash };
        let spans: Vec<_> = index.spans().collect();
        let r = runs(&index, &local, 0);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0], Run::Local { path: blob.clone(), at: 0, len: u64::from(spans[0].1) });
        assert_eq!(r[1], Run::Remote { offset: spans[1].0, len: u64::from(spans[1].1) + u64::from(spans[2].1) });
        assert!(matches!(&r[2], Run::Local { at, .. } if *at == spans[3].0));
        let total: u64 = r
            .iter()
            .map(|x| match x {
                Run::Local { len, .. } | Run::Remote { len, .. } => *len,
            })
            .sum();
        assert_eq!(total, data.len() as u64);
        // Resuming after the remote run leaves only the local tail.
        assert_eq!(runs(&index, &local, spans[3].0).len(), 1);
    }
}
