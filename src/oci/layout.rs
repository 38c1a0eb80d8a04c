//! The OCI layout contract: media types and annotations, and reading variants out of an index.

use oci_client::manifest::{OciImageIndex, OciImageManifest};

/// Annotation on an index entry: the variant's name.
pub const ANN_VARIANT: &str = "peat.dev/variant";
/// Annotation on an index entry: numeric precision (`float16`, `int8`, …).
pub const ANN_PRECISION: &str = "peat.dev/precision";
/// Annotation on an index entry: comma-separated execution providers the variant needs.
pub const ANN_PROVIDERS: &str = "peat.dev/providers";
/// Annotation on an index entry: least GPU memory, bytes.
pub const ANN_MIN_GPU_MEMORY: &str = "peat.dev/min-gpu-memory";
/// Annotation on an index entry: total size of the variant's files, bytes.
pub const ANN_SIZE: &str = "peat.dev/size";
/// Layer annotation: the file's path relative to the model directory (ORAS convention).
pub const ANN_TITLE: &str = "org.opencontainers.image.title";
/// Media type of a chunk-index layer.
pub const MEDIA_CHUNK_INDEX: &str = "application/vnd.peat.chunk-index.v1+json";
/// Chunk-index layer annotation: the digest of the layer it indexes.
pub const ANN_CHUNKS_OF: &str = "peat.dev/chunks-of";
/// Media type of a patch layer: a file's bytes as a patch against one exact earlier file
/// ([`crate::oci::patch`]), for nodes that hold that file.
pub const MEDIA_PATCH: &str = "application/vnd.peat.patch.v1+zstd";
/// Patch layer annotation: the digest of the file layer the patch rebuilds.
pub const ANN_PATCH_OF: &str = "peat.dev/patch-of";
/// Patch layer annotation: the digest of the earlier file it applies to.
pub const ANN_PATCH_FROM: &str = "peat.dev/patch-from";
/// Patch layer annotation: bytes of the new file per frame ([`crate::oci::patch::PatchParams::segment`]).
pub const ANN_PATCH_SEGMENT: &str = "peat.dev/patch-segment";
/// Patch layer annotation: old bytes either side of a frame ([`crate::oci::patch::PatchParams::margin`]).
pub const ANN_PATCH_MARGIN: &str = "peat.dev/patch-margin";
/// Media type of a model file layer pushed by peat.
pub const MEDIA_MODEL_FILE: &str = "application/vnd.peat.model.file.v1";
/// Artifact type of a peat variant manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.peat.model.v1";
/// Name given to the only variant of an artifact that is a plain manifest (e.g. pushed by `oras push`).
pub const DEFAULT_VARIANT: &str = "default";

/// An index entry or manifest that breaks the layout contract.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// An annotation holds something that is not what the contract says.
    #[error("index entry {digest}: annotation {key}={value:?} is not {expected}")]
    BadAnnotation {
        /// The entry's digest.
        digest: String,
        /// The annotation key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// Two entries claim the same variant name.
    #[error("the index lists variant {0:?} twice")]
    DuplicateVariant(String),
    /// The index has no entries.
    #[error("the index lists no manifests")]
    Empty,
    /// The layers' declared sizes are negative or add up past what any disk holds (2^64 bytes).
    #[error("manifest {digest}: the layers' declared sizes {why}")]
    BadSizes {
        /// The manifest's digest.
        digest: String,
        /// What is wrong with them.
        why: &'static str,
    },
}

/// Whether a layer helps transfers (a chunk index, a patch) rather than being a file of the model.
pub fn is_transfer_aid(layer: &oci_client::manifest::OciDescriptor) -> bool {
    layer.media_type == MEDIA_CHUNK_INDEX || layer.media_type == MEDIA_PATCH
}

/// The bytes a manifest's file layers declare (chunk indexes and patches excluded): sizes come
/// from the registry, so a negative one or a sum that overflows is refused, never wrapped or
/// panicked on.
pub fn declared_size(layers: &[oci_client::manifest::OciDescriptor]) -> Result<u64, &'static str> {
    layers.iter().filter(|l| !is_transfer_aid(l)).try_fold(0u64, |sum, l| {
        let size = u64::try_from(l.size).map_err(|_| "include a negative size")?;
        sum.checked_add(size).ok_or("add up to more than 2^64 bytes")
    })
}

fn parse_u64(digest: &str, key: &'static str, value: &str) -> Result<u64, LayoutError> {
    value.trim().parse().map_err(|_| LayoutError::BadAnnotation {
        digest: digest.into(),
        key,
        value: value.into(),
        expected: "a byte count",
    })
}

/// Reads the variants of a model version from its image index.
///
/// An entry without `peat.dev/variant` is named after its platform (`linux-arm64`) or, failing that,
/// its position, so a plain multi-arch index still works; without `peat.dev/size` its size is the
/// size of the manifest (small), which the agent corrects once it reads the manifest.
pub fn variants_from_index(index: &OciImageIndex) -> Result<Vec<VariantInfo>, LayoutError> {
    if index.manifests.is_empty() {
        return Err(LayoutError::Empty);
    }
    let mut out: Vec<VariantInfo> = Vec::with_capacity(index.manifests.len());
    for (i, entry) in index.manifests.iter().enumerate() {
        let ann = entry.annotations.clone().unwrap_or_default();
        let arch = entry.platform.as_ref().map(|p| p.architecture.to_string()).filter(|a| !a.is_empty());
        let name = ann.get(ANN_VARIANT).cloned().unwrap_or_else(|| match &entry.platform {
            Some(p) => format!("{}-{}", p.os, p.architecture),
            None if index.manifests.len() == 1 => DEFAULT_VARIANT.to_string(),
            None => format!("variant-{i}"),
        });
        if out.iter().any(|v| v.name == name) {
            return Err(LayoutError::DuplicateVariant(name));
        }
        let providers = ann
            .get(ANN_PROVIDERS)
            .map(|p| p.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        let min_gpu_memory = match ann.get(ANN_MIN_GPU_MEMORY) {
            Some(v) => parse_u64(&entry.digest, ANN_MIN_GPU_MEMORY, v)?,
            None => 0,
        };
        let size = match ann.get(ANN_SIZE) {
            Some(v) => parse_u64(&entry.digest, ANN_SIZE, v)?,
            None => entry.size.max(0) as u64,
        };
        out.push(VariantInfo {
            name,
            digest: entry.digest.clone(),
            precision: ann.get(ANN_PRECISION).cloned(),
            providers,
            min_gpu_memory,
            size,
            arch,
        });
    }
    Ok(out)
}

/// An archive layer, unpacked into the version directory instead of stored as one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Archive {
    /// A tar.
    Tar,
    /// A gzip-compressed tar.
    TarGzip,
    /// A zstd-compressed tar.
    TarZstd,
}

/// ORAS marks a pushed directory (a tar+gzip layer) with this annotation.
pub const ANN_ORAS_UNPACK: &str = "io.deis.oras.content.unpack";

/// Whether a layer is an archive to unpack: a ModelPack layer (`application/vnd.cncf.model.*.tar`,
/// `.tar+gzip`, `.tar+zstd`) or a directory pushed by ORAS (`io.deis.oras.content.unpack: "true"`).
pub fn layer_archive(layer: &oci_client::manifest::OciDescriptor) -> Option<Archive> {
    let mt = layer.media_type.as_str();
    let oras_dir = layer.annotations.as_ref().and_then(|a| a.get(ANN_ORAS_UNPACK)).is_some_and(|v| v == "true");
    let model_pack = mt.starts_with("application/vnd.cncf.model.");
    if !(oras_dir || model_pack) {
        return None;
    }
    if mt.ends_with(".tar") || mt.ends_with("tar") && oras_dir {
        Some(Archive::Tar)
    } else if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") {
        Some(Archive::TarGzip)
    } else if mt.ends_with("tar+zstd") {
        Some(Archive::TarZstd)
    } else {
        None
    }
}

/// The relative path a layer's file takes in the model directory: `org.opencontainers.image.title`
/// (peat, ORAS), else a CNCF ModelPack `…model.filepath` annotation. Chunk indexes and patches
/// have none.
pub fn layer_title(layer: &oci_client::manifest::OciDescriptor) -> Option<&str> {
    if is_transfer_aid(layer) {
        return None;
    }
    let ann = layer.annotations.as_ref()?;
    ann.get(ANN_TITLE)
        .or_else(|| ann.iter().find(|(k, _)| k.ends_with(".model.filepath")).map(|(_, v)| v))
        .map(String::as_str)
}

/// A plain manifest (an ORAS or ModelPack artifact without an index) as the one variant of its version.
pub fn variant_from_manifest(manifest: &OciImageManifest, digest: &str) -> Result<VariantInfo, LayoutError> {
    let ann = manifest.annotations.clone().unwrap_or_default();
    let size =
        declared_size(&manifest.layers).map_err(|why| LayoutError::BadSizes { digest: digest.to_string(), why })?;
    Ok(VariantInfo {
        name: ann.get(ANN_VARIANT).cloned().unwrap_or_else(|| DEFAULT_VARIANT.to_string()),
        digest: digest.to_string(),
        precision: ann.get(ANN_PRECISION).cloned(),
        providers: Vec::new(),
        min_gpu_memory: 0,
        size,
        arch: None,
    })
}

/// One variant of a model version, as read from the image index (DESIGN §6 annotations).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VariantInfo {
    /// `peat.dev/variant`.
    pub name: String,
    /// Digest of the variant's manifest.
    pub digest: String,
    /// `peat.dev/precision`.
    pub precision: Option<String>,
    /// `peat.dev/providers`: every execution provider the variant needs.
    pub providers: Vec<String>,
    /// `peat.dev/min-gpu-memory`, bytes (0: no GPU needed).
    pub min_gpu_memory: u64,
    /// `peat.dev/size`, bytes.
    pub size: u64,
    /// `platform.architecture`, when the variant is arch-specific.
    pub arch: Option<String>,
}

impl VariantInfo {
    /// Whether the variant runs on an accelerator (a provider other than `cpu`).
    pub fn uses_accelerator(&self) -> bool {
        self.providers.iter().any(|p| !p.eq_ignore_ascii_case("cpu"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::manifest::ImageIndexEntry;
    use std::collections::BTreeMap;

    fn entry(digest: &str, ann: &[(&str, &str)]) -> ImageIndexEntry {
        ImageIndexEntry {
            media_type: oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into(),
            digest: digest.into(),
            size: 512,
            platform: None,
            annotations: Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
            artifact_type: None,
        }
    }

    fn index(entries: Vec<ImageIndexEntry>) -> OciImageIndex {
        OciImageIndex {
            schema_version: 2,
            media_type: Some(oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
            manifests: entries,
            artifact_type: None,
            annotations: None,
        }
    }

    #[test]
    fn reads_the_contract_annotations() {
        let idx = index(vec![
            entry(
                "sha256:aa",
                &[
                    (ANN_VARIANT, "fp16-cuda"),
                    (ANN_PRECISION, "float16"),
                    (ANN_PROVIDERS, "cuda, tensorrt"),
                    (ANN_MIN_GPU_MEMORY, "4294967296"),
                    (ANN_SIZE, "900000000"),
                ],
            ),
            entry("sha256:bb", &[(ANN_VARIANT, "int8-cpu"), (ANN_PROVIDERS, "cpu"), (ANN_SIZE, "250000000")]),
        ]);
        let v = variants_from_index(&idx).unwrap();
        assert_eq!(v[0].name, "fp16-cuda");
        assert_eq!(v[0].providers, ["cuda", "tensorrt"]);
        assert_eq!(v[0].min_gpu_memory, 4 << 30);
        assert_eq!(v[0].size, 900_000_000);
        assert_eq!(v[0].precision.as_deref(), Some("float16"));
        assert_eq!((v[1].name.as_str(), v[1].min_gpu_memory, v[1].digest.as_str()), ("int8-cpu", 0, "sha256:bb"));
    }

    #[test]
    fn refuses_bad_numbers_and_duplicate_names() {
        let idx = index(vec![entry("sha256:aa", &[(ANN_VARIANT, "x"), (ANN_SIZE, "big")])]);
        assert!(matches!(variants_from_index(&idx), Err(LayoutError::BadAnnotation { key: ANN_SIZE, .. })));
        let idx = index(vec![entry("sha256:aa", &[(ANN_VARIANT, "x")]), entry("sha256:bb", &[(ANN_VARIANT, "x")])]);
        assert_eq!(variants_from_index(&idx), Err(LayoutError::DuplicateVariant("x".into())));
        assert_eq!(variants_from_index(&index(vec![])), Err(LayoutError::Empty));
    }

    #[test]
    fn an_unannotated_single_entry_is_the_default_variant() {
        let v = variants_from_index(&index(vec![entry("sha256:aa", &[])])).unwrap();
        assert_eq!((v[0].name.as_str(), v[0].size), (DEFAULT_VARIANT, 512));
    }

    #[test]
    fn declared_sizes_that_overflow_or_go_negative_are_refused() {
        let l = |size: i64, media: &str| oci_client::manifest::OciDescriptor {
            media_type: media.into(),
            size,
            ..Default::default()
        };
        assert_eq!(
            declared_size(&[
                l(10, MEDIA_MODEL_FILE),
                l(5, MEDIA_MODEL_FILE),
                l(99, MEDIA_CHUNK_INDEX),
                l(7, MEDIA_PATCH)
            ]),
            Ok(15)
        );
        assert!(
            declared_size(&[l(i64::MAX, MEDIA_MODEL_FILE), l(i64::MAX, MEDIA_MODEL_FILE), l(2, MEDIA_MODEL_FILE)])
                .is_err()
        );
        assert!(declared_size(&[l(-1, MEDIA_MODEL_FILE)]).is_err());
        let m = OciImageManifest { layers: vec![l(i64::MAX, "x"), l(i64::MAX, "x"), l(2, "x")], ..Default::default() };
        let err = variant_from_manifest(&m, "sha256:m").unwrap_err();
        assert!(err.to_string().contains("more than 2^64 bytes"), "{err}");
    }
}
