//! What a transfer fetches: a variant manifest, read by digest and checked against the safety
//! rules, becomes a plan of file layers (and their chunk indexes).

use std::collections::{BTreeMap, HashSet};

use oci_client::manifest::{IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;

use super::error::TransferError;
use crate::agent::store::{FileRecord, validate_title};
use crate::oci::OciError;
use crate::oci::client::parse_reference;
use crate::oci::digest::{digest_hex, sha256_digest};
use crate::oci::layout::{ANN_CHUNKS_OF, Archive, MEDIA_CHUNK_INDEX, layer_archive, layer_title};

/// One file of a variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLayer {
    /// Relative path (validated).
    pub title: String,
    /// Layer digest.
    pub digest: String,
    /// Declared size.
    pub size: u64,
    /// An archive to unpack (ModelPack tar layers, ORAS directories); `title` then names the layer.
    pub archive: Option<Archive>,
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
    pub chunk_indexes: BTreeMap<String, (String, u64)>,
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
            .map(|f| FileRecord { title: f.title.clone(), digest: f.digest.clone(), size: f.size, archive: f.archive })
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
) -> Result<PullPlan, TransferError> {
    let bad = |why: String| TransferError::BadArtifact { artifact: artifact.to_string(), why };
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
        files.push(FileLayer {
            title,
            digest: layer.digest.clone(),
            size: layer.size as u64,
            archive: layer_archive(layer),
        });
    }
    // An archive's title names the layer, not a path: its entries are checked when unpacked.
    for f in files.iter().filter(|f| f.archive.is_none()) {
        if files.iter().any(|g| g.archive.is_none() && g.title.starts_with(&format!("{}/", f.title))) {
            return Err(bad(format!("{:?} is both a file and a directory", f.title)));
        }
    }
    if files.is_empty() {
        return Err(bad("no layer carries a file title (org.opencontainers.image.title)".into()));
    }
    // Sizes come from the registry: a sum past 2^64 is refused here, so every later sum of them holds.
    if files.iter().try_fold(0u64, |sum, f| sum.checked_add(f.size)).is_none() {
        return Err(bad("the layers' declared sizes add up to more than 2^64 bytes".into()));
    }
    // Chunk indexes are optional: a layer without one (or with a malformed one) is pulled whole.
    let chunk_indexes = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == MEDIA_CHUNK_INDEX && l.size > 0 && digest_hex(&l.digest).is_ok())
        .filter_map(|l| {
            let of = l.annotations.as_ref()?.get(ANN_CHUNKS_OF)?;
            Some((of.clone(), (l.digest.clone(), l.size as u64)))
        })
        .collect();
    let plan =
        PullPlan { artifact: artifact.to_string(), manifest_digest: manifest_digest.to_string(), files, chunk_indexes };
    if let Some(max) = max_size
        && plan.total() > max
    {
        return Err(TransferError::TooLarge { size: plan.total(), max });
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
pub async fn fetch_plan(source: &Source, artifact: &str, max_size: Option<u64>) -> Result<PullPlan, TransferError> {
    let r = parse_reference(artifact)?;
    let Some(expected) = r.digest().map(str::to_string) else {
        return Err(TransferError::BadArtifact { artifact: artifact.into(), why: "not referenced by digest".into() });
    };
    let (raw, _) = source
        .client
        .pull_manifest_raw(&r, &source.auth, &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE])
        .await
        .map_err(|e| OciError::from_client(artifact, e))?;
    let actual = sha256_digest(&raw);
    if actual != expected {
        return Err(TransferError::DigestMismatch { title: "manifest".into(), expected, actual });
    }
    let manifest: OciImageManifest = serde_json::from_slice(&raw).map_err(|e| TransferError::BadArtifact {
        artifact: artifact.into(),
        why: format!("not an image manifest: {e}"),
    })?;
    plan_from_manifest(artifact, &expected, &manifest, max_size)
}

#[cfg(test)]
mod tests {
    use oci_client::manifest::OciDescriptor;

    use super::*;
    use crate::api::BlockerReason;
    use crate::oci::layout::ANN_TITLE;

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
        assert!(matches!(
            plan_from_manifest("r@d", "d", &ok, Some(9)),
            Err(TransferError::TooLarge { size: 10, max: 9 })
        ));
        for bad in [
            manifest(vec![layer(Some("../etc/x"), 1)]),
            manifest(vec![layer(Some("/abs"), 1)]),
            manifest(vec![layer(Some("a"), 1), layer(Some("a"), 1)]),
            manifest(vec![layer(Some("a"), 1), layer(Some("a/b"), 1)]),
            manifest(vec![layer(Some("a"), -1)]),
            manifest(vec![layer(None, 1)]),
            manifest(vec![layer(Some("a"), i64::MAX), layer(Some("b"), i64::MAX), layer(Some("c"), 2)]),
        ] {
            let err = plan_from_manifest("r@d", "d", &bad, None).unwrap_err();
            assert!(matches!(err, TransferError::BadArtifact { .. }), "{err}");
            assert_eq!(err.reason(), BlockerReason::TransferFailed);
            assert_eq!(err.retry_after(1), None);
        }
        // Chunk indexes are not files, even with a title.
        let mut idx = layer(Some("x"), 3);
        idx.media_type = MEDIA_CHUNK_INDEX.into();
        let plan = plan_from_manifest("r@d", "d", &manifest(vec![idx, layer(Some("y"), 1)]), None).unwrap();
        assert_eq!(plan.files.iter().map(|f| f.title.as_str()).collect::<Vec<_>>(), vec!["y"]);
    }
}
