//! A layer rebuilt from a patch (`peat push --delta-from`) against a file the store holds. The
//! patch is applied while it downloads — its bytes go both to `tmp/<patch>.partial` (so an
//! interrupted download resumes) and to the decoder, which writes the layer into its own partial,
//! hashing it — so on a slow link the rebuild ends moments after the last patch byte arrives.
//! Only a result that hashes to the layer digest is committed; the patch's partial is removed
//! afterwards, used or unusable.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use sha2::Sha256;
use tracing::info;

use super::error::TransferError;
use super::plan::{FileLayer, PatchLayer, PullPlan};
use super::session::Transfer;
use super::writer::{Sink, claim, pump, verify_and_commit};
use crate::agent::store::Store;
use crate::oci::OciError;
use crate::oci::digest::HashingWriter;
use crate::oci::patch::{PatchParams, apply_patch};

/// The smallest patch of layer `f` whose base file the store holds.
pub(super) fn usable<'p>(store: &Store, plan: &'p PullPlan, f: &FileLayer) -> Option<&'p PatchLayer> {
    let held = |digest: &str| store.blob_path(digest).is_ok_and(|p| p.is_file());
    plan.patches.get(&f.digest)?.iter().filter(|p| held(&p.from)).min_by_key(|p| p.size)
}

/// Fetches patch `p` and rebuilds layer `f` from it and the held file as it comes.
pub(super) async fn fetch_layer_patch(
    t: &Transfer<'_>,
    r: &Reference,
    f: &FileLayer,
    p: &PatchLayer,
) -> Result<(), TransferError> {
    let Some(claim) = claim(t, f).await? else { return Ok(()) };
    // The layer's own partial (a chunk rebuild's prefix, counted as fetched at the start) is not
    // used; what an earlier attempt fetched of the patch is, and came over the wire.
    t.progress.fetched.fetch_sub(claim.have.min(f.size), Ordering::Relaxed);
    let patch_partial = t.store.partial_path(&p.digest)?;
    let mut have = t.store.partial_len(&p.digest);
    if have >= p.size {
        have = 0; // all of it and yet no layer: it did not apply; fetch it again
    }
    let reference = format!("{}@{}", r.repository(), p.digest);
    let desc = OciDescriptor { digest: p.digest.clone(), size: p.size as i64, ..Default::default() };
    let response = tokio::select! {
        _ = t.cancel.cancelled() => return Err(TransferError::Cancelled),
        res = t.source.client.pull_blob_stream_partial(r, &desc, have, None) => res,
    };
    let stream = match response {
        Ok(BlobResponse::Partial(s)) => s.stream,
        Ok(BlobResponse::Full(s)) => {
            have = 0; // the registry ignored the range: from the start
            s.stream
        }
        Err(e) => {
            // 416: the partial is longer than the registry's blob; it cannot be resumed.
            if matches!(e, oci_client::errors::OciDistributionError::ServerError { code: 416, .. }) {
                let _ = tokio::fs::remove_file(&patch_partial).await;
            }
            return Err(OciError::from_client(&reference, e).into());
        }
    };
    t.progress.fetched.fetch_add(have, Ordering::Relaxed);
    info!(layer = %f.title, size = f.size, patch = p.size, resumed_at = have, from = %p.from, "rebuilding the layer from a patch");
    let applier = Applier::start(Job {
        old: t.store.blob_path(&p.from)?,
        patch: patch_partial.clone(),
        keep: have,
        out: claim.partial.clone(),
        size: f.size,
        params: p.params,
    });
    let oversize = || TransferError::Oversize { title: format!("{} (patch)", f.title), declared: p.size };
    let pumped = pump(t, stream, &applier, p.size - have, oversize, &reference).await;
    // Fewer bytes than asked are a cut response, unless the decoder quit first (then its error says why).
    let decoder_quit = applier.tx.is_closed();
    let applied = applier.finish().await;
    let result = match pumped {
        Ok(n) if n == p.size - have => match applied {
            Ok(hasher) => verify_and_commit(t.store, f, &claim.partial, hasher).await,
            Err(e) => Err(e.into()),
        },
        Ok(_) if decoder_quit => Err(applied.err().unwrap_or_else(|| std::io::Error::other("the decoder quit")).into()),
        Ok(n) => {
            let message = format!("the patch ended after {} of {} bytes", have + n, p.size);
            Err(OciError::Unreachable { reference, message }.into())
        }
        Err(e) => Err(e),
    };
    match &result {
        Ok(()) => {
            t.progress.reused.fetch_add(f.size.saturating_sub(p.size), Ordering::Relaxed);
            let _ = tokio::fs::remove_file(&patch_partial).await;
        }
        Err(e) => {
            // What the decoder wrote of the layer is no prefix anything could resume from.
            let _ = tokio::fs::remove_file(&claim.partial).await;
            // A patch that does not fit (or a damaged base) is not tried again; after an outage,
            // a cancel or a full disk its partial stays for the retry to resume.
            if super::delta::falls_back(e) {
                let _ = tokio::fs::remove_file(&patch_partial).await;
            }
        }
    }
    result
}

/// What the applier thread does.
struct Job {
    /// The held file the patch applies to.
    old: PathBuf,
    /// The patch's partial download: its first `keep` bytes are fed first, then what arrives is
    /// appended to it and fed.
    patch: PathBuf,
    keep: u64,
    /// The layer's partial.
    out: PathBuf,
    size: u64,
    params: PatchParams,
}

/// Applies a patch on a blocking thread as its bytes arrive.
struct Applier {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    handle: tokio::task::JoinHandle<std::io::Result<Sha256>>,
}

impl Applier {
    fn start(job: Job) -> Applier {
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let handle = tokio::task::spawn_blocking(move || job.run(rx));
        Applier { tx, handle }
    }

    /// Waits for the decoder to end (the sender is dropped: no more bytes); returns the hash of
    /// the layer it wrote.
    async fn finish(self) -> std::io::Result<Sha256> {
        drop(self.tx);
        self.handle.await.map_err(std::io::Error::other)?
    }
}

impl Sink for Applier {
    async fn put(&self, chunk: bytes::Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }
}

impl Job {
    fn run(self, rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> std::io::Result<Sha256> {
        let base = std::fs::File::open(&self.old)?;
        // SAFETY: blobs are read-only and never written in place (a blob is only ever renamed in
        // or unlinked; an unlinked file stays mapped), so the mapping cannot change under the reader.
        let map = unsafe { memmap2::Mmap::map(&base)? };
        let saved = std::fs::OpenOptions::new().create(true).truncate(false).append(true).open(&self.patch)?;
        saved.set_len(self.keep)?;
        let prefix = std::fs::File::open(&self.patch)?.take(self.keep);
        let arriving =
            Arriving { rx, saved: std::io::BufWriter::with_capacity(256 << 10, saved), chunk: bytes::Bytes::new() };
        let mut patch = std::io::BufReader::with_capacity(1 << 20, prefix.chain(arriving));
        let file = std::fs::File::create(&self.out)?;
        // Decoding, and hashing + writing, on two threads: on a slow link what is left after the
        // patch's last byte (the frames after the last change: copies of held bytes) takes the
        // longer of the two, not their sum.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let sink = std::thread::spawn(move || -> std::io::Result<Sha256> {
            let mut writer = HashingWriter::new(file);
            for block in rx {
                writer.write_all(&block)?;
            }
            Ok(writer.hasher)
        });
        let mut blocks = Blocks { tx, block: Vec::with_capacity(BLOCK) };
        let applied = apply_patch(&map, &mut patch, self.size, &mut blocks, self.params).and_then(|()| blocks.flush());
        drop(blocks); // ends the sink's input
        let hashed = sink.join().map_err(|_| std::io::Error::other("the writer thread panicked"))?;
        // The writer's error first: a full disk stops the decoder too, with a vaguer one.
        let hasher = hashed?;
        applied.map(|()| hasher)
    }
}

/// Bytes per block handed from the decoder to the writer thread.
const BLOCK: usize = 1 << 20;

/// The decoder's output, in blocks to the writer thread.
struct Blocks {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    block: Vec<u8>,
}

impl Write for Blocks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BLOCK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        self.tx.send(block).map_err(|_| std::io::Error::other("the writer thread stopped"))
    }
}

/// The patch's bytes as they arrive, each saved to its partial before the decoder reads it.
struct Arriving {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    saved: std::io::BufWriter<std::fs::File>,
    chunk: bytes::Bytes,
}

impl Read for Arriving {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.saved.write_all(&chunk)?;
                    self.chunk = chunk;
                }
                None => {
                    self.saved.flush()?;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::patch::tests::noise;

    /// A patch fed in pieces, resumed from a saved prefix, rebuilds the file; the partial holds the
    /// whole patch afterwards.
    #[tokio::test]
    async fn a_patch_applies_as_it_arrives_and_resumes_from_its_saved_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let params = PatchParams { segment: 1 << 20, margin: 1 << 20 };
        let old = noise(3 << 20, 1);
        let mut new = old.clone();
        new[100_000..104_096].copy_from_slice(&noise(4096, 2));
        new[2_500_000..2_600_000].copy_from_slice(&noise(100_000, 3));
        let mut patch = Vec::new();
        crate::oci::patch::make_patch(&old, &mut &new[..], new.len() as u64, &mut patch, params).unwrap();
        std::fs::write(dir.path().join("old"), &old).unwrap();
        let keep = patch.len() / 3;
        std::fs::write(dir.path().join("patch"), &patch[..keep]).unwrap();
        let applier = Applier::start(Job {
            old: dir.path().join("old"),
            patch: dir.path().join("patch"),
            keep: keep as u64,
            out: dir.path().join("out"),
            size: new.len() as u64,
            params,
        });
        for piece in patch[keep..].chunks(7000) {
            assert!(applier.put(bytes::Bytes::copy_from_slice(piece)).await);
        }
        let hasher = applier.finish().await.unwrap();
        assert!(std::fs::read(dir.path().join("out")).unwrap() == new, "the file is rebuilt");
        use sha2::Digest;
        assert_eq!(format!("sha256:{:x}", hasher.finalize()), crate::oci::digest::sha256_digest(&new));
        assert!(std::fs::read(dir.path().join("patch")).unwrap() == patch, "the partial holds the whole patch");
        // A patch cut short fails (the caller keeps its partial and resumes).
        let applier = Applier::start(Job {
            old: dir.path().join("old"),
            patch: dir.path().join("patch2"),
            keep: 0,
            out: dir.path().join("out2"),
            size: new.len() as u64,
            params,
        });
        assert!(applier.put(bytes::Bytes::copy_from_slice(&patch[..keep])).await);
        assert!(applier.finish().await.is_err());
    }
}
