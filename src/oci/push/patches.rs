//! `peat push --delta-from VERSION…`: for each file of the new variant whose title the same variant
//! of VERSION also has (with other bytes), a patch against that exact file ([`crate::oci::patch`]),
//! pushed as an extra layer. A node holding the old file fetches the patch instead of the chunks
//! (docs/delta.md: chunks fetch 8× the changed bytes for scattered 4 KiB edits, a patch ~1.00×).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::secrets::RegistryAuth;

use super::{ModelFile, PushError, PushProgress, push_file_blob};
use crate::oci::client::{OciError, parse_reference, patiently};
use crate::oci::digest::HashingWriter;
use crate::oci::layout::*;
use crate::oci::patch::{DEFAULT_PATCH_PARAMS, PatchParams, make_patch};

/// A patch no smaller than this share of its file is not pushed: fetching the file's chunks costs
/// about as much, and every node would still have to apply it.
const WORTH_IT: f64 = 0.9;

/// A file pushed as a layer: where it is, and its digest.
pub(super) struct Pushed<'a> {
    pub(super) file: &'a ModelFile,
    pub(super) digest: String,
}

/// Removes the scratch directory however the push ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files of the same variant in an earlier version, to patch against.
pub(super) struct Base {
    version: String,
    reference: oci_client::Reference,
    /// Title → (layer digest, size).
    files: BTreeMap<String, (String, u64)>,
}

/// Reads the variant `variant` of each of `versions` (before anything is uploaded: a mistyped
/// version is refused at once).
pub(super) async fn bases(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    repository: &str,
    variant: &str,
    versions: &[String],
) -> Result<Vec<Base>, PushError> {
    let mut out = Vec::new();
    for version in versions {
        let (reference, files) = base_files(client, auth, repository, version, variant).await?;
        out.push(Base { version: version.clone(), reference, files });
    }
    Ok(out)
}

/// Makes and pushes the patch layers of `files` against each of `bases`.
pub(super) async fn push_patches(
    client: &oci_client::Client,
    repository: &str,
    files: &[Pushed<'_>],
    bases: &[Base],
    progress: &dyn PushProgress,
) -> Result<Vec<OciDescriptor>, PushError> {
    if bases.is_empty() {
        return Ok(Vec::new());
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("peat-push-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).map_err(|e| local(&scratch.0, e))?;
    let mut layers = Vec::new();
    let mut made = HashSet::new();
    for b in bases {
        for f in files {
            let Some((old_digest, old_size)) = b.files.get(&f.file.title) else { continue };
            if *old_digest == f.digest || *old_size == 0 || !made.insert((old_digest.clone(), f.digest.clone())) {
                continue;
            }
            progress.patching(&f.file.title, &b.version);
            let base = scratch.0.join("base");
            fetch_base(client, &b.reference, old_digest, *old_size, &base).await?;
            let patch_path = scratch.0.join("patch");
            let (len, digest) = make_patch_file(&base, &f.file.path, f.file.size, &patch_path).await?;
            let _ = std::fs::remove_file(&base);
            if len as f64 >= WORTH_IT * f.file.size as f64 {
                tracing::info!(file = %f.file.title, from = %b.version, len, "the patch is about as large as the file; not pushed");
                continue;
            }
            let r = parse_reference(&format!("{repository}@{digest}"))?;
            push_file_blob(client, &r, &patch_path, &digest, len, None).await?;
            let _ = std::fs::remove_file(&patch_path);
            layers.push(patch_layer(digest, len, &f.digest, old_digest, DEFAULT_PATCH_PARAMS));
        }
    }
    Ok(layers)
}

fn local(path: &Path, e: impl std::fmt::Display) -> PushError {
    PushError::Local { path: path.display().to_string(), message: e.to_string() }
}

/// The descriptor of a patch layer (no title: `oras pull` and older agents ignore it).
fn patch_layer(digest: String, len: u64, of: &str, from: &str, params: PatchParams) -> OciDescriptor {
    OciDescriptor {
        media_type: MEDIA_PATCH.into(),
        digest,
        size: len as i64,
        urls: None,
        annotations: Some(BTreeMap::from([
            (ANN_PATCH_OF.to_string(), of.to_string()),
            (ANN_PATCH_FROM.to_string(), from.to_string()),
            (ANN_PATCH_SEGMENT.to_string(), params.segment.to_string()),
            (ANN_PATCH_MARGIN.to_string(), params.margin.to_string()),
        ])),
        artifact_type: None,
    }
}

/// The files (title → digest, size) of variant `variant` of `<repository>:<version>`.
async fn base_files(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    repository: &str,
    version: &str,
    variant: &str,
) -> Result<(oci_client::Reference, BTreeMap<String, (String, u64)>), PushError> {
    let tag_ref = format!("{repository}:{version}");
    let r = parse_reference(&tag_ref)?;
    let base = |message: String| PushError::DeltaBase { version: version.to_string(), message };
    let pulled = patiently(|| client.pull_manifest(&r, auth)).await;
    let manifest = match pulled.map_err(|e| OciError::from_client(&tag_ref, e)) {
        Ok((OciManifest::Image(m), _)) => m,
        Ok((OciManifest::ImageIndex(index), _)) => {
            let variants = variants_from_index(&index).map_err(|e| base(e.to_string()))?;
            let Some(v) = variants.iter().find(|v| v.name == variant) else {
                let names: Vec<_> = variants.iter().map(|v| v.name.as_str()).collect();
                return Err(base(format!("has no variant {variant:?} (it has {names:?})")));
            };
            let by_digest = format!("{repository}@{}", v.digest);
            let r = parse_reference(&by_digest)?;
            match patiently(|| client.pull_manifest(&r, auth)).await {
                Ok((OciManifest::Image(m), _)) => m,
                Ok(_) => return Err(base(format!("{by_digest} is not an image manifest"))),
                Err(e) => return Err(OciError::from_client(&by_digest, e).into()),
            }
        }
        Err(OciError::NotFound(_)) => return Err(base("is not in the registry".into())),
        Err(e) => return Err(e.into()),
    };
    let files = manifest
        .layers
        .iter()
        .filter(|l| layer_archive(l).is_none() && l.size >= 0)
        .filter_map(|l| Some((layer_title(l)?.to_string(), (l.digest.clone(), l.size as u64))))
        .collect();
    Ok((r, files))
}

/// Downloads the old file (the registry client checks its digest).
async fn fetch_base(
    client: &oci_client::Client,
    r: &oci_client::Reference,
    digest: &str,
    size: u64,
    to: &Path,
) -> Result<(), PushError> {
    let desc = OciDescriptor { digest: digest.to_string(), size: size as i64, ..Default::default() };
    patiently(|| async {
        let mut file = tokio::fs::File::create(to).await.map_err(OciDistributionError::IoError)?;
        client.pull_blob(r, &desc, &mut file).await?;
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(OciDistributionError::IoError)
    })
    .await
    .map_err(|e| match e {
        OciDistributionError::IoError(e) => local(to, e),
        e => OciError::from_client(&format!("{}@{digest}", r.repository()), e).into(),
    })
}

/// Writes the patch from `old` to `new` into `out`; returns its length and digest.
async fn make_patch_file(old: &Path, new: &Path, new_size: u64, out: &Path) -> Result<(u64, String), PushError> {
    let (old, new, out) = (old.to_path_buf(), new.to_path_buf(), out.to_path_buf());
    let shown = new.clone();
    tokio::task::spawn_blocking(move || {
        let base = std::fs::File::open(&old).map_err(|e| local(&old, e))?;
        // SAFETY: the scratch file is ours alone and not written while mapped.
        let map = unsafe { memmap2::Mmap::map(&base) }.map_err(|e| local(&old, e))?;
        let mut reader =
            std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&new).map_err(|e| local(&new, e))?);
        let file = std::fs::File::create(&out).map_err(|e| local(&out, e))?;
        let mut writer = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let len =
            make_patch(&map, &mut reader, new_size, &mut writer, DEFAULT_PATCH_PARAMS).map_err(|e| local(&new, e))?;
        std::io::Write::flush(&mut writer).map_err(|e| local(&out, e))?;
        Ok((len, format!("sha256:{:x}", sha2::Digest::finalize(writer.hasher))))
    })
    .await
    .map_err(|e| local(&shown, e))?
}
