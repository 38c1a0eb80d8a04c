//! Publishing a variant: file layers, its manifest, and the version's image index (added or replaced).

use std::collections::BTreeMap;

use oci_client::manifest::{
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageIndex, OciImageManifest,
    OciManifest, Platform,
};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};

use super::client::{OciError, parse_reference};
use super::layout::*;

/// The empty JSON config of an artifact manifest (OCI 1.1 `application/vnd.oci.empty.v1+json`).
const EMPTY_CONFIG: &[u8] = b"{}";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// What describes a variant in the index.
#[derive(Clone, Debug, Default)]
pub struct VariantMeta {
    /// `peat.dev/variant`.
    pub name: String,
    /// `peat.dev/precision`.
    pub precision: Option<String>,
    /// `peat.dev/providers`.
    pub providers: Vec<String>,
    /// `peat.dev/min-gpu-memory`, bytes.
    pub min_gpu_memory: u64,
    /// `platform.architecture` (GOARCH), for arch-specific variants.
    pub arch: Option<String>,
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Pushes in-memory files as a variant of `<repository>:<version>` and adds it to (or replaces it in)
/// the version's index. Returns the variant manifest's digest. For small artifacts (tests, the demo);
/// `peat push` streams files from disk.
pub async fn push_variant_bytes(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    repository: &str,
    version: &str,
    meta: &VariantMeta,
    files: &[(&str, Vec<u8>)],
) -> Result<String, OciError> {
    let tag_ref = format!("{repository}:{version}");
    let r = parse_reference(&tag_ref)?;
    client.store_auth_if_needed(r.resolve_registry(), auth).await;
    let err = |e| OciError::from_client(&tag_ref, e);
    let mut layers = Vec::new();
    for (path, data) in files {
        let digest = sha256_digest(data);
        client.push_blob(&r, data.clone(), &digest).await.map_err(err)?;
        layers.push(OciDescriptor {
            media_type: MEDIA_MODEL_FILE.into(),
            digest,
            size: data.len() as i64,
            urls: None,
            annotations: Some(BTreeMap::from([(ANN_TITLE.to_string(), path.to_string())])),
            artifact_type: None,
        });
    }
    let config_digest = sha256_digest(EMPTY_CONFIG);
    client.push_blob(&r, EMPTY_CONFIG.to_vec(), &config_digest).await.map_err(err)?;
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: EMPTY_MEDIA_TYPE.into(),
            digest: config_digest,
            size: EMPTY_CONFIG.len() as i64,
            urls: None,
            annotations: None,
            artifact_type: None,
        },
        layers,
        subject: None,
        artifact_type: Some(ARTIFACT_TYPE.into()),
        annotations: Some(BTreeMap::from([(ANN_VARIANT.to_string(), meta.name.clone())])),
    };
    let manifest_bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let manifest_digest = sha256_digest(&manifest_bytes);
    let by_digest = parse_reference(&format!("{repository}@{manifest_digest}"))?;
    client
        .push_manifest_raw(&by_digest, manifest_bytes.clone(), OCI_IMAGE_MEDIA_TYPE.parse().expect("static media type"))
        .await
        .map_err(err)?;

    let size: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let mut ann = BTreeMap::from([
        (ANN_VARIANT.to_string(), meta.name.clone()),
        (ANN_SIZE.to_string(), size.to_string()),
        (ANN_MIN_GPU_MEMORY.to_string(), meta.min_gpu_memory.to_string()),
    ]);
    if let Some(p) = &meta.precision {
        ann.insert(ANN_PRECISION.into(), p.clone());
    }
    if !meta.providers.is_empty() {
        ann.insert(ANN_PROVIDERS.into(), meta.providers.join(","));
    }
    let entry = ImageIndexEntry {
        media_type: OCI_IMAGE_MEDIA_TYPE.into(),
        digest: manifest_digest.clone(),
        size: manifest_bytes.len() as i64,
        platform: meta.arch.as_ref().map(|a| Platform {
            architecture: a.as_str().into(),
            os: "linux".into(),
            os_version: None,
            os_features: None,
            variant: None,
            features: None,
        }),
        annotations: Some(ann),
        artifact_type: Some(ARTIFACT_TYPE.into()),
    };
    // Read-modify-write of the index: add the variant or replace the entry of the same name.
    // Only a missing tag (or a lone manifest there) starts a new index: any other error must not
    // replace an existing index, with its other variants, by one holding this variant alone.
    let existing = match client.pull_manifest(&r, auth).await {
        Ok((OciManifest::ImageIndex(index), _)) => Some(index),
        Ok((OciManifest::Image(_), _)) => None,
        Err(e) => match OciError::from_client(&tag_ref, e) {
            OciError::NotFound(_) => None,
            other => return Err(other),
        },
    };
    let mut index = match existing {
        Some(index) => index,
        None => OciImageIndex {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
            manifests: Vec::new(),
            artifact_type: None,
            annotations: None,
        },
    };
    index.manifests.retain(|m| m.annotations.as_ref().and_then(|a| a.get(ANN_VARIANT)) != Some(&meta.name));
    index.manifests.push(entry);
    client.push_manifest_list(&r, auth, index).await.map_err(err)?;
    Ok(manifest_digest)
}
