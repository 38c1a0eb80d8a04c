//! What a transfer fetches: a variant manifest, read by digest and checked against the safety
//! rules, becomes a plan of file layers (and their chunk indexes and patches).

use std::collections::{BTreeMap, HashSet};

use oci_client::manifest::{IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;

use super::error::TransferError;
use crate::agent::store::{FileRecord, validate_title};
use crate::oci::OciError;
use crate::oci::client::parse_reference;
use crate::oci::digest::{digest_hex, sha256_digest};
use crate::oci::layout::{
    ANN_CHUNKS_OF, ANN_PATCH_FROM, ANN_PATCH_MARGIN, ANN_PATCH_OF, ANN_PATCH_SEGMENT, Archive, MEDIA_CHUNK_INDEX,
    MEDIA_PATCH, layer_archive, layer_title,
};
use crate::oci::patch::PatchParams;

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

/// A patch layer: file `of`'s bytes as a patch against file `from`, for a store that holds `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchLayer {
    /// The patch's layer digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// The digest of the earlier file it applies to.
    pub from: String,
    /// How it was cut.
    pub params: PatchParams,
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
    /// Patch layers by the digest of the file layer they rebuild (against different earlier files).
    pub patches: BTreeMap<String, Vec<PatchLayer>>,
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

    /// Layer digests: files and patches (garbage collection leaves a patch's partial download in
    /// `tmp/` alone while the transfer runs, so an interrupted one resumes).
    pub fn digests(&self) -> HashSet<String> {
        let patches = self.patches.values().flatten().map(|p| p.digest.clone());
        self.files.iter().map(|f| f.digest.clone()).chain(patches).collect()
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
    let patches = patch_layers(manifest, &files);
    let plan = PullPlan {
        artifact: artifact.to_string(),
        manifest_digest: manifest_digest.to_string(),
        files,
        chunk_indexes,
        patches,
    };
    if let Some(max) = max_size
        && plan.total() > max
    {
        return Err(TransferError::TooLarge { size: plan.total(), max });
    }
    Ok(plan)
}

/// The manifest's usable patch layers, by the file they rebuild. Patches are optional like chunk
/// indexes: one with a malformed annotation, bounds that would make applying it hold too much, or
/// no smaller than its file is ignored (that file is fetched by chunks or whole).
fn patch_layers(manifest: &OciImageManifest, files: &[FileLayer]) -> BTreeMap<String, Vec<PatchLayer>> {
    let mut out: BTreeMap<String, Vec<PatchLayer>> = BTreeMap::new();
    for l in manifest.layers.iter().filter(|l| l.media_type == MEDIA_PATCH && l.size > 0) {
        let Some(ann) = &l.annotations else { continue };
        let number = |key: &str| ann.get(key).and_then(|v| v.trim().parse::<u64>().ok());
        let (Some(of), Some(from)) = (ann.get(ANN_PATCH_OF), ann.get(ANN_PATCH_FROM)) else { continue };
        let Some(params) =
            number(ANN_PATCH_SEGMENT).zip(number(ANN_PATCH_MARGIN)).and_then(|(s, m)| PatchParams::checked(s, m))
        else {
            continue;
        };
        let valid = [&l.digest, of, from].iter().all(|d| digest_hex(d).is_ok()) && of != from;
        let smaller = files.iter().any(|f| &f.digest == of && f.archive.is_none() && (l.size as u64) < f.size);
        if valid && smaller {
            out.entry(of.clone()).or_default().push(PatchLayer {
                digest: l.digest.clone(),
                size: l.size as u64,
                from: from.clone(),
                params,
            });
        }
    }
    out
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

    #[test]
    fn patches_are_planned_only_when_well_formed_and_smaller_than_their_file() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let patch = |digest: char, of: char, from: &str, size: i64, segment: &str| OciDescriptor {
            media_type: MEDIA_PATCH.into(),
            digest: d(digest),
            size,
            annotations: Some(BTreeMap::from([
                (ANN_PATCH_OF.to_string(), d(of)),
                (ANN_PATCH_FROM.to_string(), from.to_string()),
                (ANN_PATCH_SEGMENT.to_string(), segment.to_string()),
                (ANN_PATCH_MARGIN.to_string(), "1048576".to_string()),
            ])),
            ..Default::default()
        };
        let mut file = layer(Some("w.bin"), 1000);
        file.digest = d('f');
        let m = manifest(vec![
            file,
            patch('1', 'f', &d('0'), 100, "1048576"),                 // usable
            patch('2', 'f', &d('9'), 1000, "1048576"),                // as large as the file
            patch('3', 'f', "sha256:nope", 100, "1048576"),           // base is no digest
            patch('4', 'f', &d('8'), 100, "0"),                       // no frames
            patch('5', 'f', &d('7'), 100, &(1u64 << 40).to_string()), // frames too large to hold
            patch('6', 'e', &d('0'), 100, "1048576"),                 // of a file not in the manifest
            patch('7', 'f', &d('f'), 100, "1048576"),                 // against itself
        ]);
        let plan = plan_from_manifest("r@d", "d", &m, None).unwrap();
        assert_eq!(plan.files.len(), 1, "patches are not files");
        let got: Vec<_> = plan.patches.values().flatten().map(|p| p.digest.clone()).collect();
        assert_eq!(got, vec![d('1')]);
        assert_eq!(plan.patches[&d('f')][0].from, d('0'));
        assert!(
            plan.digests().contains(&d('1')),
            "a plan's digests include its patches (kept from garbage collection)"
        );
    }
}
