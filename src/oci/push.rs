//! Publishing a variant: file layers, its manifest, and the version's image index (added or replaced).

use std::collections::BTreeMap;

use futures::StreamExt;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageIndex, OciImageManifest,
    OciManifest, Platform,
};
use oci_client::secrets::RegistryAuth;

use super::client::{OciError, parse_reference, patiently};
use super::digest::sha256_digest;
use super::layout::*;

mod patches;

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
    /// `platform.os` when `arch` is set (default `linux`).
    pub os: Option<String>,
}

/// One file of a variant, already in the registry.
fn file_layer(path: &str, digest: String, size: u64) -> OciDescriptor {
    OciDescriptor {
        media_type: MEDIA_MODEL_FILE.into(),
        digest,
        size: size as i64,
        urls: None,
        annotations: Some(BTreeMap::from([(ANN_TITLE.to_string(), path.to_string())])),
        artifact_type: None,
    }
}

/// Pushes a file's chunk index as a blob; returns its layer descriptor (no title: not a file).
async fn push_chunk_index(
    client: &oci_client::Client,
    r: &oci_client::Reference,
    index: &super::chunk_index::ChunkIndex,
) -> Result<OciDescriptor, OciDistributionError> {
    let json = serde_json::to_vec(index).expect("an index serializes");
    let digest = sha256_digest(&json);
    if !patiently(|| client.blob_exists(r, &digest)).await? {
        patiently(|| client.push_blob(r, json.clone(), &digest)).await?;
    }
    Ok(OciDescriptor {
        media_type: MEDIA_CHUNK_INDEX.into(),
        digest,
        size: json.len() as i64,
        urls: None,
        annotations: Some(BTreeMap::from([(ANN_CHUNKS_OF.to_string(), index.digest.clone())])),
        artifact_type: None,
    })
}

/// Pushes in-memory files as a variant of `<repository>:<version>` and adds it to (or replaces it in)
/// the version's index. Returns the variant manifest's digest. For small artifacts (tests, the demo);
/// [`push_dir`] streams files from disk.
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
    let mut layers = Vec::new();
    let mut indexes = Vec::new();
    let err = |e| OciError::from_client(&tag_ref, e);
    for (path, data) in files {
        let digest = sha256_digest(data);
        client.push_blob(&r, data.clone(), &digest).await.map_err(err)?;
        layers.push(file_layer(path, digest, data.len() as u64));
        let index = super::chunk_index::index_bytes(data, super::chunk_index::DEFAULT_PARAMS);
        indexes.push(push_chunk_index(client, &r, &index).await.map_err(err)?);
    }
    layers.extend(indexes);
    push_variant_manifest(client, auth, repository, version, meta, layers).await
}

/// Errors of [`push_dir`] (besides the registry's).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Reading the model directory failed, or it holds something that cannot be pushed.
    #[error("{path}: {message}")]
    Local {
        /// The file or directory.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] OciError),
    /// A version given to patch from cannot be used.
    #[error("--delta-from {version}: {message}")]
    DeltaBase {
        /// The version.
        version: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A regular file of a model directory: its path relative to the directory (with `/`), and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFile {
    /// Relative path, the layer's title.
    pub title: String,
    /// Absolute path on disk.
    pub path: std::path::PathBuf,
    /// Bytes.
    pub size: u64,
}

/// Lists the regular files under `dir`, sorted by title. Symbolic links and special files are
/// refused: a title must name bytes that are in the artifact, and the agent refuses links anyway.
pub fn model_files(dir: &std::path::Path) -> Result<Vec<ModelFile>, PushError> {
    let local =
        |path: &std::path::Path, message: String| PushError::Local { path: path.display().to_string(), message };
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| local(&d, e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| local(&d, e.to_string()))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| local(&path, e.to_string()))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(dir).expect("walked from dir");
                let title = rel
                    .components()
                    .map(|c| c.as_os_str().to_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| local(&path, "the file name is not UTF-8".into()))?
                    .join("/");
                out.push(ModelFile { title, path, size: meta.len() });
            } else {
                return Err(local(
                    &path,
                    "is a symbolic link or special file; only regular files can be pushed".into(),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(local(dir, "holds no files".into()));
    }
    out.sort_by(|a, b| a.title.cmp(&b.title));
    Ok(out)
}

/// Counts bytes read for hashing.
struct ProgressReader<R> {
    inner: R,
    progress: std::sync::Arc<dyn PushProgress>,
}

impl<R: std::io::Read> std::io::Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.hashed(n as u64);
        Ok(n)
    }
}

/// Progress callbacks of [`push_dir`]: bytes hashed, then bytes uploaded (or skipped as already present).
pub trait PushProgress: Send + Sync {
    /// Bytes read for hashing.
    fn hashed(&self, bytes: u64);
    /// Bytes sent to the registry, or found there already.
    fn uploaded(&self, bytes: u64);
    /// A patch of `title` against the same file of version `from` is being made.
    fn patching(&self, _title: &str, _from: &str) {}
}

/// Pushes the files under `dir` as a variant of `<repository>:<version>`, streaming each file from
/// disk (a multi-GB file is never held in memory); blobs the registry already has are not sent
/// again. With `delta_from`, each changed file also gets a patch against the same file of the same
/// variant of each of those versions. Returns the variant manifest's digest.
#[allow(clippy::too_many_arguments)]
pub async fn push_dir(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    repository: &str,
    version: &str,
    meta: &VariantMeta,
    dir: &std::path::Path,
    delta_from: &[String],
    progress: std::sync::Arc<dyn PushProgress>,
) -> Result<String, PushError> {
    let files = model_files(dir)?;
    let tag_ref = format!("{repository}:{version}");
    let r = parse_reference(&tag_ref)?;
    client.store_auth_if_needed(r.resolve_registry(), auth).await;
    let oci = |e| PushError::Registry(OciError::from_client(&tag_ref, e));
    let bases = patches::bases(client, auth, repository, &meta.name, delta_from).await?;
    let mut layers = Vec::new();
    let mut indexes = Vec::new();
    let mut pushed = Vec::new();
    for f in &files {
        let local = |e: std::io::Error| PushError::Local { path: f.path.display().to_string(), message: e.to_string() };
        // One read of the file for its digest and its chunk index, off the runtime.
        let (path, p) = (f.path.clone(), progress.clone());
        let (index, digest) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            let reader = ProgressReader { inner: std::io::BufReader::with_capacity(1 << 20, file), progress: p };
            super::chunk_index::index_reader(reader, super::chunk_index::DEFAULT_PARAMS)
        })
        .await
        .map_err(|e| local(std::io::Error::other(e)))?
        .map_err(local)?;
        push_file_blob(client, &r, &f.path, &digest, f.size, Some(&progress)).await?;
        layers.push(file_layer(&f.title, digest.clone(), f.size));
        indexes.push(push_chunk_index(client, &r, &index).await.map_err(oci)?);
        pushed.push(patches::Pushed { file: f, digest });
    }
    layers.extend(indexes);
    layers.extend(patches::push_patches(client, repository, &pushed, &bases, progress.as_ref()).await?);
    Ok(push_variant_manifest(client, auth, repository, version, meta, layers).await?)
}

/// Uploads the file at `path` as blob `digest` unless the registry has it, streaming it from disk.
async fn push_file_blob(
    client: &oci_client::Client,
    r: &oci_client::Reference,
    path: &std::path::Path,
    digest: &str,
    size: u64,
    progress: Option<&std::sync::Arc<dyn PushProgress>>,
) -> Result<(), PushError> {
    let reference = r.whole(); // names the registry: a dead one is recognised by its address
    let oci = |e| PushError::Registry(OciError::from_client(&reference, e));
    if patiently(|| client.blob_exists(r, digest)).await.map_err(oci)? {
        progress.inspect(|p| p.uploaded(size));
        return Ok(());
    }
    // Each attempt streams the file from its start (a busy registry drops the upload).
    patiently(|| async {
        let file = tokio::fs::File::open(path).await.map_err(OciDistributionError::IoError)?;
        let p = progress.cloned();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
            let chunk = chunk?;
            p.as_ref().inspect(|p| p.uploaded(chunk.len() as u64));
            Ok(chunk)
        });
        client.push_blob_stream(r, stream, digest, Some(size)).await
    })
    .await
    .map_err(|e| match e {
        OciDistributionError::IoError(e) => {
            PushError::Local { path: path.display().to_string(), message: e.to_string() }
        }
        e => oci(e),
    })?;
    Ok(())
}

/// Writes a variant manifest over `layers` (already pushed) and adds it to, or replaces it in, the
/// image index `<repository>:<version>`. Returns the manifest's digest.
pub async fn push_variant_manifest(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    repository: &str,
    version: &str,
    meta: &VariantMeta,
    layers: Vec<OciDescriptor>,
) -> Result<String, OciError> {
    let tag_ref = format!("{repository}:{version}");
    let r = parse_reference(&tag_ref)?;
    client.store_auth_if_needed(r.resolve_registry(), auth).await;
    let err = |e| OciError::from_client(&tag_ref, e);
    let size = declared_size(&layers).map_err(|why| OciError::Layout {
        reference: tag_ref.clone(),
        source: LayoutError::BadSizes { digest: "(being pushed)".into(), why },
    })?;
    let config_digest = sha256_digest(EMPTY_CONFIG);
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: EMPTY_MEDIA_TYPE.into(),
            digest: config_digest.clone(),
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
    // Concurrent pushes upload the same blobs (this empty config above all); while the registry
    // commits one of those uploads, a manifest naming the blob can be refused as
    // MANIFEST_BLOB_UNKNOWN. That passes within moments: upload the config again and retry.
    for attempt in 1u64.. {
        patiently(|| client.push_blob(&r, EMPTY_CONFIG.to_vec(), &config_digest)).await.map_err(err)?;
        let pushed = patiently(|| {
            client.push_manifest_raw(
                &by_digest,
                manifest_bytes.clone(),
                OCI_IMAGE_MEDIA_TYPE.parse().expect("static media type"),
            )
        })
        .await;
        match pushed {
            Ok(_) => break,
            Err(oci_client::errors::OciDistributionError::ServerError { code: 400, ref message, .. })
                if message.contains("MANIFEST_BLOB_UNKNOWN") && attempt < 5 =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(err(e)),
        }
    }

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
            os: meta.os.clone().unwrap_or_else(|| "linux".into()).as_str().into(),
            os_version: None,
            os_features: None,
            variant: None,
            features: None,
        }),
        annotations: Some(ann),
        artifact_type: Some(ARTIFACT_TYPE.into()),
    };
    // Read-modify-write of the index, and the registry API has no compare-and-swap: a push of
    // another variant of this version at the same moment may read the index before this write and
    // replace it. So, after a moment, check that the variant is still listed, and add it back if
    // not. (Listed with another digest means a later push of the same variant: that one stands.)
    for attempt in 1..=INDEX_ATTEMPTS {
        let mut index = read_index(client, auth, &r, &tag_ref).await?.unwrap_or_else(|| OciImageIndex {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
            manifests: Vec::new(),
            artifact_type: None,
            annotations: None,
        });
        index.manifests.retain(|m| variant_of(m) != Some(&meta.name));
        index.manifests.push(entry.clone());
        patiently(|| client.push_manifest_list(&r, auth, index.clone())).await.map_err(err)?;
        tokio::time::sleep(settle_time()).await;
        let listed = read_index(client, auth, &r, &tag_ref)
            .await?
            .is_some_and(|index| index.manifests.iter().any(|m| variant_of(m) == Some(&meta.name)));
        if listed {
            return Ok(manifest_digest);
        }
        tracing::info!(index = %tag_ref, variant = %meta.name, attempt, "a concurrent push replaced the index; adding the variant again");
    }
    Err(OciError::Other {
        reference: tag_ref,
        message: format!(
            "concurrent pushes replaced the index {INDEX_ATTEMPTS} times without variant {:?}; push the variants one after another",
            meta.name
        ),
    })
}

/// Times a push writes the index before it gives up on keeping its variant in it.
const INDEX_ATTEMPTS: u32 = 5;

/// How long after writing the index a push looks again: longer than another push's read-to-write
/// gap, and jittered so that two pushes do not look in lockstep.
fn settle_time() -> std::time::Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    std::time::Duration::from_millis(500 + u64::from(nanos % 500))
}

fn variant_of(m: &ImageIndexEntry) -> Option<&String> {
    m.annotations.as_ref().and_then(|a| a.get(ANN_VARIANT))
}

/// The image index at `r`: none when the tag is missing or holds a lone manifest. Any other error
/// is returned, so that an index with other variants is never replaced by one holding this alone.
async fn read_index(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    r: &oci_client::Reference,
    tag_ref: &str,
) -> Result<Option<OciImageIndex>, OciError> {
    match patiently(|| client.pull_manifest(r, auth)).await {
        Ok((OciManifest::ImageIndex(index), _)) => Ok(Some(index)),
        Ok((OciManifest::Image(_), _)) => Ok(None),
        Err(e) => match OciError::from_client(tag_ref, e) {
            OciError::NotFound(_) => Ok(None),
            other => Err(other),
        },
    }
}
