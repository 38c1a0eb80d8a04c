//! A delta transfer of one layer: its chunk index from the registry, the chunks the store already
//! holds (in any blob of an earlier version of the model, or any blob whose index is kept) copied
//! locally, only the missing byte ranges fetched (adjacent chunks coalesced into one HTTP Range
//! request), the file rebuilt in order into `tmp/` and verified against the whole-layer digest.
//! Any mismatch or error makes the caller pull the layer whole.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use tracing::{debug, info};

use super::error::{TransferError, is_enospc};
use super::plan::FileLayer;
use super::session::Transfer;
use super::writer::{LayerWriter, claim, pump, verify_and_commit};
use crate::agent::store::Store;
use crate::oci::OciError;
use crate::oci::chunk_index::{ChunkIndex, Params, index_reader};
use crate::oci::digest::sha256_digest;

/// Largest chunk index accepted (a 1 GiB file's index is ~2.5 MB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Fetches and checks the chunk index of layer `f`.
pub async fn fetch_index(
    t: &Transfer<'_>,
    r: &Reference,
    digest: &str,
    size: u64,
    f: &FileLayer,
) -> Result<ChunkIndex, TransferError> {
    let bad = |why: String| TransferError::BadArtifact { artifact: format!("{}@{digest}", r.repository()), why };
    if size > MAX_INDEX_BYTES {
        return Err(bad(format!("chunk index of {size} bytes")));
    }
    let desc = OciDescriptor { digest: digest.to_string(), size: size as i64, ..Default::default() };
    let mut raw = Vec::with_capacity(size as usize);
    tokio::select! {
        _ = t.cancel.cancelled() => return Err(TransferError::Cancelled),
        res = t.source.client.pull_blob(r, &desc, &mut raw) => res.map_err(|e| OciError::from_client(digest, e))?,
    }
    t.progress.fetched.fetch_add(raw.len() as u64, Ordering::Relaxed);
    if sha256_digest(&raw) != digest {
        return Err(bad("chunk index digest mismatch".into()));
    }
    let index: ChunkIndex = serde_json::from_slice(&raw).map_err(|e| bad(format!("not a chunk index: {e}")))?;
    index.validate(&f.digest, f.size).map_err(bad)?;
    Ok(index)
}

/// A chunk hash as bytes (32, not a 64-character string: an index of the store holds one per 32 KiB).
type Hash = [u8; 32];

fn hash_of(hex: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Chunks held by the store that the layers being pulled need: hash → (source file, offset).
pub struct LocalChunks {
    params: Params,
    files: Vec<(String, PathBuf)>,
    by_hash: HashMap<Hash, (u32, u64)>,
}

impl LocalChunks {
    /// Finds, among what the store holds, the chunks `targets` need: kept indexes of any blob
    /// (with `params`), and the blobs of the model's versions on disk (indexed now when no index
    /// with these parameters is kept). Memory is proportional to the targets' chunks.
    pub async fn build(store: &Store, model: &str, params: Params, targets: &[&ChunkIndex]) -> LocalChunks {
        let wanted: std::collections::HashSet<Hash> =
            targets.iter().flat_map(|i| i.chunks.iter().filter_map(|c| hash_of(&c.1))).collect();
        let store = store.clone();
        let model = model.to_string();
        tokio::task::spawn_blocking(move || LocalChunks::build_blocking(&store, &model, params, &wanted))
            .await
            .unwrap_or(LocalChunks { params, files: Vec::new(), by_hash: HashMap::new() })
    }

    fn build_blocking(
        store: &Store,
        model: &str,
        params: Params,
        wanted: &std::collections::HashSet<Hash>,
    ) -> LocalChunks {
        let mut by_hash = HashMap::new();
        let mut files = Vec::new();
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
            let id = files.len() as u32;
            let mut used = false;
            for (offset, _, hash) in index.spans() {
                if let Some(h) = hash_of(hash).filter(|h| wanted.contains(h)) {
                    by_hash.entry(h).or_insert_with(|| {
                        used = true;
                        (id, offset)
                    });
                }
            }
            if used {
                files.push((digest, blob));
            }
        }
        debug!(chunks = by_hash.len(), "local chunks found");
        LocalChunks { params, files, by_hash }
    }

    /// Whether any chunk of `index` is held locally (with the same parameters).
    pub fn covers_any(&self, index: &ChunkIndex) -> bool {
        index.params() == self.params
            && index.chunks.iter().any(|c| hash_of(&c.1).is_some_and(|h| self.by_hash.contains_key(&h)))
    }

    fn get(&self, hex: &str) -> Option<(&PathBuf, u64)> {
        let (id, offset) = self.by_hash.get(&hash_of(hex)?)?;
        Some((&self.files[*id as usize].1, *offset))
    }

    /// Forgets the kept indexes of every source: after a rebuild from them failed its digest check,
    /// they are recomputed from the blobs (and a damaged blob then is no source).
    fn distrust(&self, store: &Store) {
        for (digest, _) in &self.files {
            if let Ok(p) = store.chunk_index_path(digest) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Whether a failed delta transfer should give way to a whole pull (its partial removed): the
/// rebuilt bytes were wrong, the registry cannot serve ranges, the index or a local source is
/// unusable. An outage, a cancel or a full disk keep the partial rebuild for the retry.
pub fn falls_back(e: &TransferError) -> bool {
    match e {
        TransferError::DigestMismatch { .. } | TransferError::BadArtifact { .. } | TransferError::Oversize { .. } => {
            true
        }
        TransferError::Io(io) => !is_enospc(io),
        _ => false,
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
        match (local.get(hash), out.last_mut()) {
            (None, Some(Run::Remote { len: l, .. })) => *l += len,
            (None, _) => out.push(Run::Remote { offset, len }),
            (Some((path, at)), Some(Run::Local { path: p, at: a, len: l })) if p == path && *a + *l == at => {
                *l += len;
            }
            (Some((path, at)), _) => out.push(Run::Local { path: path.clone(), at, len }),
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
) -> Result<(), TransferError> {
    let Some(claim) = claim(t, f).await? else { return Ok(()) };
    let partial = claim.partial.clone();
    // The partial's bytes were counted as fetched before the transfer began; recount them below.
    let have = claim.have.min(f.size);
    t.progress.fetched.fetch_sub(have, Ordering::Relaxed);
    // A rebuild writes in order: an earlier attempt's prefix up to its last whole chunk stands.
    let keep = index.spans().map(|s| s.0).filter(|&o| o <= have).max().unwrap_or(0);
    let mut reused = 0u64;
    for (_, len, hash) in index.spans().take_while(|s| s.0 < keep) {
        if local.get(hash).is_some() {
            reused += u64::from(len);
        } else {
            t.progress.fetched.fetch_add(u64::from(len), Ordering::Relaxed);
        }
    }
    t.progress.reused.fetch_add(reused, Ordering::Relaxed);
    let plan = runs(index, local, keep);
    let remote: u64 = plan.iter().map(|r| if let Run::Remote { len, .. } = r { *len } else { 0 }).sum();
    info!(layer = %f.title, size = f.size, resumed_at = keep, fetch = remote, requests = plan.iter().filter(|r| matches!(r, Run::Remote { .. })).count(), "delta transfer");
    let writer = LayerWriter::start(partial.clone(), keep);
    let desc = OciDescriptor { digest: f.digest.clone(), size: f.size as i64, ..Default::default() };
    let reference = format!("{}@{}", r.repository(), f.digest);
    let mut failure = None;
    for run in plan {
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
                    _ = t.cancel.cancelled() => { failure = Some(TransferError::Cancelled); break; }
                    res = t.source.client.pull_blob_stream_partial(r, &desc, offset, Some(len)) => res,
                };
                let stream = match response {
                    Ok(BlobResponse::Partial(s)) => s.stream,
                    Ok(BlobResponse::Full(_)) => {
                        let why = "the registry does not serve byte ranges".into();
                        failure = Some(TransferError::BadArtifact { artifact: reference.clone(), why });
                        break;
                    }
                    Err(e) => {
                        failure = Some(OciError::from_client(&reference, e).into());
                        break;
                    }
                };
                let oversize = || TransferError::Oversize { title: f.title.clone(), declared: len };
                match pump(t, stream, &writer, len, oversize, &reference).await {
                    Ok(got) if got == len => {}
                    Ok(got) => {
                        // Ended early, or the writer stopped (then finish() says why).
                        let message = format!("a range ended after {got} of {len} bytes");
                        failure = Some(OciError::Unreachable { reference: reference.clone(), message }.into());
                        break;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
    }
    let result = match (writer.finish().await, failure) {
        (Err(e), _) => Err(e.into()),
        (Ok(_), Some(e)) => Err(e),
        (Ok(hasher), None) => verify_and_commit(t.store, f, &partial, hasher).await,
    };
    match result {
        Ok(()) => {
            save_index(t.store, index);
            Ok(())
        }
        Err(e) => {
            // Not reused after all; bytes that came over the wire stay counted (they did).
            t.progress.reused.fetch_sub(reused, Ordering::Relaxed);
            if falls_back(&e) {
                // Removed while this transfer still holds the layer: the whole pull starts clean.
                let _ = tokio::fs::remove_file(&partial).await;
                if matches!(e, TransferError::DigestMismatch { .. }) {
                    local.distrust(t.store);
                }
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::chunk_index::{DEFAULT_PARAMS, index_bytes};

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
                by_hash.insert(hash_of(hash).unwrap(), (0u32, offset));
            }
        }
        let local = LocalChunks { params: DEFAULT_PARAMS, files: vec![("sha256:a".into(), blob.clone())], by_hash };
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

    #[test]
    fn what_gives_way_to_a_whole_pull() {
        let mismatch = TransferError::DigestMismatch { title: "t".into(), expected: "a".into(), actual: "b".into() };
        assert!(falls_back(&mismatch));
        assert!(falls_back(&TransferError::Io(std::io::Error::from(std::io::ErrorKind::NotFound))), "a source went");
        let outage = TransferError::Registry(OciError::Unreachable { reference: "r".into(), message: "m".into() });
        assert!(!falls_back(&outage), "an outage keeps the rebuild for the retry");
        assert!(!falls_back(&TransferError::Cancelled));
        assert!(!falls_back(&TransferError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC))));
        assert_eq!(hash_of(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(hash_of("abc"), None);
    }
}
