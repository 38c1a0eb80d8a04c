//! A whole layer from the registry, resumed with HTTP Range from the partial an earlier attempt left.

use std::sync::atomic::Ordering;

use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;

use super::error::TransferError;
use super::plan::FileLayer;
use super::session::Transfer;
use super::writer::{LayerWriter, claim, pump, verify_and_commit};
use crate::oci::OciError;

/// Fetches layer `f` whole (or its rest) into the store, verified.
pub(super) async fn fetch_blob(t: &Transfer<'_>, r: &Reference, f: &FileLayer) -> Result<(), TransferError> {
    let Some(claim) = claim(t, f).await? else { return Ok(()) };
    let partial = claim.partial.clone();
    let mut offset = if claim.have > f.size { 0 } else { claim.have };
    let reference = format!("{}@{}", r.whole().split('@').next().unwrap_or_default(), f.digest);
    let mut stream = None;
    if offset < f.size {
        let desc = OciDescriptor { digest: f.digest.clone(), size: f.size as i64, ..Default::default() };
        let response = tokio::select! {
            _ = t.cancel.cancelled() => return Err(TransferError::Cancelled),
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
    let pumped = match stream {
        Some(stream) => {
            let oversize = || TransferError::Oversize { title: f.title.clone(), declared: f.size };
            pump(t, stream, &writer, f.size - offset, oversize, &reference).await
        }
        None => Ok(0),
    };
    let hasher = writer.finish().await?;
    match pumped {
        Ok(n) => offset += n,
        Err(e @ TransferError::Oversize { .. }) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        Err(e) => return Err(e), // the partial stays for a resume
    }
    if offset < f.size {
        // A clean end before the declared size: the registry's blob is shorter than its descriptor
        // (a cut connection surfaces as a read error). Resuming would only ask past its end.
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(TransferError::BadArtifact {
            artifact: reference,
            why: format!("{}: the registry's blob ended after {offset} of the {} declared bytes", f.title, f.size),
        });
    }
    verify_and_commit(t.store, f, &partial, hasher).await
}
