//! The one way bytes reach the store: a layer is claimed (one writer per digest), its bytes —
//! from the wire or copied from local chunks — appended and hashed off the runtime, and only a
//! file that hashes to the layer digest is committed to `blobs/`. Whole-blob and delta fetches
//! both go through here.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::OwnedMutexGuard;

use super::error::TransferError;
use super::plan::FileLayer;
use super::session::Transfer;
use crate::agent::store::Store;
use crate::oci::OciError;

/// A layer this transfer alone writes now, not yet in the store.
pub(super) struct Claim {
    /// Where its bytes go before they are verified.
    pub(super) partial: PathBuf,
    /// Length of what an earlier attempt left there (may exceed the layer: the caller decides).
    pub(super) have: u64,
    _only_writer: OwnedMutexGuard<()>,
}

/// Takes layer `f` for writing: waits for any other transfer writing it, then finds it either in
/// the store already (`None`: counted as reused) or claimed, with the partial an earlier attempt left.
pub(super) async fn claim(t: &Transfer<'_>, f: &FileLayer) -> Result<Option<Claim>, TransferError> {
    let guard = tokio::select! {
        _ = t.cancel.cancelled() => return Err(TransferError::Cancelled),
        guard = t.in_flight.lock(&f.digest) => guard,
    };
    let have = t.store.partial_len(&f.digest);
    if t.store.has_blob(&f.digest, f.size) {
        // Another transfer fetched it meanwhile: its partial was counted as fetched at the start.
        t.progress.fetched.fetch_sub(have.min(f.size), Ordering::Relaxed);
        t.progress.reused.fetch_add(f.size, Ordering::Relaxed);
        return Ok(None);
    }
    Ok(Some(Claim { partial: t.store.partial_path(&f.digest)?, have, _only_writer: guard }))
}

/// Where [`pump`] puts a response body's bytes: a [`LayerWriter`], or a patch being applied as it comes.
pub(super) trait Sink {
    /// Queues a chunk; false when the sink stopped (the caller learns why from the sink).
    fn put(&self, chunk: bytes::Bytes) -> impl std::future::Future<Output = bool> + Send;
}

impl Sink for LayerWriter {
    fn put(&self, chunk: bytes::Bytes) -> impl std::future::Future<Output = bool> + Send {
        self.write(chunk)
    }
}

/// Moves one response body into `writer`: at most `limit` bytes (more is [`TransferError::Oversize`]
/// of `declared`), paced by the agent's bandwidth cap, counted as fetched, stopped by a cancel.
/// Returns the bytes written; fewer than `limit` when the body ended early or the writer stopped
/// (its error comes from it: [`LayerWriter::finish`]). A read error after all `limit` bytes came is an
/// end (oci-client checks whole responses itself and fails at their end; our hash decides).
pub(super) async fn pump<S, B, E>(
    t: &Transfer<'_>,
    stream: S,
    writer: &impl Sink,
    limit: u64,
    oversize: impl Fn() -> TransferError,
    reference: &str,
) -> Result<u64, TransferError>
where
    S: Stream<Item = Result<B, E>>,
    B: Into<bytes::Bytes>,
    E: std::fmt::Display,
{
    let mut stream = std::pin::pin!(stream);
    let mut got = 0u64;
    loop {
        let next = tokio::select! {
            _ = t.cancel.cancelled() => return Err(TransferError::Cancelled),
            next = stream.next() => next,
        };
        let chunk: bytes::Bytes = match next {
            None => return Ok(got),
            Some(Ok(c)) => c.into(),
            Some(Err(_)) if got == limit => return Ok(got),
            Some(Err(e)) => {
                let message = format!("reading {reference}: {e}");
                return Err(OciError::Unreachable { reference: reference.to_string(), message }.into());
            }
        };
        let n = chunk.len() as u64;
        if got + n > limit {
            return Err(oversize());
        }
        if let Some(l) = t.limiter {
            l.acquire(chunk.len()).await;
        }
        if !writer.put(chunk).await {
            return Ok(got);
        }
        got += n;
        t.progress.fetched.fetch_add(n, Ordering::Relaxed);
    }
}

/// Hashes and appends a layer's bytes on a blocking thread, so the runtime threads only move bytes
/// off the socket (hashing 1 GiB is seconds of CPU).
pub(super) struct LayerWriter {
    tx: tokio::sync::mpsc::Sender<Piece>,
    handle: tokio::task::JoinHandle<std::io::Result<Sha256>>,
}

/// What the writer appends: bytes from the wire, or a range of a local file (a reused chunk).
enum Piece {
    Bytes(bytes::Bytes),
    Copy { path: PathBuf, offset: u64, len: u64 },
}

impl LayerWriter {
    /// Opens `path`, keeps its first `keep` bytes (hashing them) and appends what follows.
    pub(super) fn start(path: PathBuf, keep: u64) -> LayerWriter {
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
    pub(super) async fn write(&self, chunk: bytes::Bytes) -> bool {
        self.tx.send(Piece::Bytes(chunk)).await.is_ok()
    }

    /// Queues a range of a local file.
    pub(super) async fn copy(&self, path: PathBuf, offset: u64, len: u64) -> bool {
        self.tx.send(Piece::Copy { path, offset, len }).await.is_ok()
    }

    /// Waits for everything queued to be written; returns the hash of the whole file.
    pub(super) async fn finish(self) -> std::io::Result<Sha256> {
        drop(self.tx);
        self.handle.await.map_err(std::io::Error::other)?
    }
}

/// The gate into `blobs/`: the whole file's sha256 must be the layer digest (else the partial is
/// removed); then it is made durable and moved in.
pub(super) async fn verify_and_commit(
    store: &Store,
    f: &FileLayer,
    partial: &Path,
    hasher: Sha256,
) -> Result<(), TransferError> {
    let actual = format!("sha256:{:x}", hasher.finalize());
    if actual != f.digest {
        let _ = tokio::fs::remove_file(partial).await;
        return Err(TransferError::DigestMismatch { title: f.title.clone(), expected: f.digest.clone(), actual });
    }
    let synced = partial.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(synced)?.sync_data())
        .await
        .map_err(std::io::Error::other)??;
    store.commit_blob(&f.digest, partial)?;
    Ok(())
}
