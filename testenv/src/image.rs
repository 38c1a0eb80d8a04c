//! `make image`: the peat image without a container engine. The binary, the shared libraries
//! `ldd` says it loads (at the paths it loads them from, the ELF interpreter included), the CSI
//! driver's registrar (a static Go binary) and the system's CA bundle go into one deterministic layer (sorted, mtime 0, owned by root); with an OCI
//! image config (non-root user 65532, entrypoint `/usr/local/bin/peat`) and manifest it is written
//! as an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), which `crane`, `skopeo`,
//! `ctr import` and registries take. The Dockerfile gives the same files from Debian's packages.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{TestEnvError, io};

/// Where the peat binary lives in the image.
pub const BINARY_PATH: &str = "usr/local/bin/peat";
/// Where the CSI driver's registrar (`registrar/`, a static Go binary) lives in the image.
pub const REGISTRAR_PATH: &str = "usr/local/bin/peat-csi-registrar";
/// The system CA bundle, for HTTPS registries.
pub const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// The image's user (non-root; the chart sets the agent's).
pub const USER: &str = "65532:65532";

/// What was built.
#[derive(Debug)]
pub struct Image {
    /// The layout directory.
    pub layout: PathBuf,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Bytes of the compressed layer.
    pub layer_size: u64,
    /// Bytes of the files in it.
    pub content_size: u64,
    /// Paths in the layer (relative to `/`).
    pub paths: Vec<String>,
}

enum Entry {
    Dir(u32),
    File { from: PathBuf, mode: u32 },
    Link(String),
}

/// The shared objects `binary` loads, as `ldd` lists them: (path it is loaded from).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, TestEnvError> {
    let out = std::process::Command::new("ldd").arg(binary).output().map_err(io("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(TestEnvError::Build(format!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr))));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            Some("not") => return Err(TestEnvError::Build(format!("ldd: a library is missing: {line}"))),
            _ => {} // linux-vdso.so.1: in the kernel
        }
    }
    Ok(libs)
}

/// The shared objects `binary` (of another architecture, which `ldd` cannot run) needs, found as
/// the dynamic loader would: its ELF interpreter and, from `readelf -d`, each `NEEDED` library and
/// theirs, searched in `lib_dir` (a cross sysroot's, e.g. `/usr/aarch64-linux-gnu/lib`). Returns
/// (path in the image, file): the interpreter at the path the binary names, the libraries in
/// `image_lib_dir` (Debian's multiarch directory, which the loader searches by default).
pub fn cross_shared_libraries(
    binary: &Path,
    lib_dir: &Path,
    image_lib_dir: &str,
) -> Result<Vec<(String, PathBuf)>, TestEnvError> {
    let readelf = |args: &[&str], file: &Path| -> Result<String, TestEnvError> {
        let out = std::process::Command::new("readelf").args(args).arg(file).output().map_err(io("running readelf"))?;
        if !out.status.success() {
            return Err(TestEnvError::Build(format!(
                "readelf {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // "[Requesting program interpreter: /lib/ld-linux-aarch64.so.1]"
    let headers = readelf(&["-lW"], binary)?;
    let Some(interp) = headers.split("program interpreter: ").nth(1).and_then(|r| r.split(']').next()) else {
        return Ok(Vec::new()); // static
    };
    let interp_name = Path::new(interp).file_name().expect("a file name").to_string_lossy().to_string();
    let mut found = vec![(interp.trim_start_matches('/').to_string(), lib_dir.join(&interp_name))];
    let mut queue = vec![binary.to_path_buf()];
    let mut seen = std::collections::BTreeSet::from([interp_name]);
    while let Some(file) = queue.pop() {
        // " 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]"
        for line in readelf(&["-dW"], &file)?.lines().filter(|l| l.contains("(NEEDED)")) {
            let Some(name) = line.split('[').nth(1).and_then(|r| r.split(']').next()) else { continue };
            if !seen.insert(name.to_string()) {
                continue;
            }
            let path = lib_dir.join(name);
            if !path.exists() {
                return Err(TestEnvError::Build(format!(
                    "{name}, which {} needs, is not in {}",
                    file.display(),
                    lib_dir.display()
                )));
            }
            found.push((format!("{}/{name}", image_lib_dir.trim_matches('/')), path.clone()));
            queue.push(path);
        }
    }
    if let Some((_, missing)) = found.iter().find(|(_, p)| !p.exists()) {
        return Err(TestEnvError::Build(format!("the ELF interpreter {} is missing", missing.display())));
    }
    Ok(found)
}

/// Where a cross build for `arch` finds its target's libraries, and where they go in the image.
fn cross_libraries(arch: &str) -> Result<(PathBuf, &'static str), TestEnvError> {
    match arch {
        "arm64" => Ok((PathBuf::from("/usr/aarch64-linux-gnu/lib"), "lib/aarch64-linux-gnu")),
        other => Err(TestEnvError::Build(format!("no cross sysroot known for {other} (amd64 and arm64 are)"))),
    }
}

/// This machine's architecture, GOARCH-style.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Builds the image of `binary` (and the CSI `registrar`) into the OCI layout `out` (replaced), for `arch` (GOARCH-style):
/// the libraries are the ones `ldd` lists on this machine's architecture, and those of the cross
/// sysroot (`readelf`) for another.
pub fn build(binary: &Path, registrar: &Path, out: &Path, arch: &str, version: &str) -> Result<Image, TestEnvError> {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    put(&mut entries, BINARY_PATH, Entry::File { from: binary.to_path_buf(), mode: 0o755 });
    put(&mut entries, "usr/local/bin/kubectl-peat", Entry::Link("peat".into()));
    put(&mut entries, REGISTRAR_PATH, Entry::File { from: registrar.to_path_buf(), mode: 0o755 });
    let libraries = if arch == host_arch() {
        let libs = shared_libraries(binary)?;
        libs.into_iter().map(|l| (l.strip_prefix("/").expect("absolute").display().to_string(), l)).collect()
    } else {
        let (lib_dir, image_lib_dir) = cross_libraries(arch)?;
        cross_shared_libraries(binary, &lib_dir, image_lib_dir)?
    };
    for (rel, lib) in libraries {
        put(&mut entries, &rel, Entry::File { from: lib, mode: 0o755 });
    }
    let ca = Path::new("/").join(CA_BUNDLE);
    if !ca.exists() {
        return Err(TestEnvError::Build(format!("{} is missing: apt-get install ca-certificates", ca.display())));
    }
    put(&mut entries, CA_BUNDLE, Entry::File { from: ca, mode: 0o644 });
    entries.insert("tmp/".into(), Entry::Dir(0o1777));

    let config = json!({
        "User": USER,
        "Entrypoint": ["/usr/local/bin/peat"],
        "Cmd": ["--help"],
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
        "Labels": {"org.opencontainers.image.title": "peat-operator", "org.opencontainers.image.version": version},
    });
    write_layout(&entries, config, out, arch, version)
}

/// An image of a few static files (`(path in the image, file)`, executable) run as `entrypoint`
/// by `user`: the pause image of a real node's sandboxes, a busybox for its test pods.
pub fn build_static(
    files: &[(&str, &Path)],
    entrypoint: &[&str],
    user: &str,
    out: &Path,
    arch: &str,
    version: &str,
) -> Result<Image, TestEnvError> {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for (path, from) in files {
        put(&mut entries, path, Entry::File { from: from.to_path_buf(), mode: 0o755 });
    }
    entries.insert("tmp/".into(), Entry::Dir(0o1777));
    let config = json!({"User": user, "Entrypoint": entrypoint, "Env": ["PATH=/bin:/usr/bin"]});
    write_layout(&entries, config, out, arch, version)
}

fn put(entries: &mut BTreeMap<String, Entry>, path: &str, e: Entry) {
    let mut p = Path::new(path).parent();
    while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
        entries.entry(format!("{}/", dir.display())).or_insert(Entry::Dir(0o755));
        p = dir.parent();
    }
    entries.insert(path.to_string(), e);
}

/// Writes `entries` as the one layer of an image with the OCI `config` section, as a layout.
fn write_layout(
    entries: &BTreeMap<String, Entry>,
    config: serde_json::Value,
    out: &Path,
    arch: &str,
    version: &str,
) -> Result<Image, TestEnvError> {
    // The layer: deterministic (sorted, mtime 0, root-owned), so the same inputs give the same digest.
    let mut tar = tar::Builder::new(Vec::new());
    let mut content_size = 0;
    for (path, e) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty()).map_err(io("writing the layer"))?;
            }
            Entry::File { from, mode } => {
                let bytes = std::fs::read(from).map_err(io(format!("reading {}", from.display())))?;
                content_size += bytes.len() as u64;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(bytes.len() as u64);
                tar.append_data(&mut h, path, bytes.as_slice()).map_err(io("writing the layer"))?;
            }
            Entry::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target).map_err(io("writing the layer"))?;
            }
        }
    }
    let layer_tar = tar.into_inner().map_err(io("writing the layer"))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer_tar).map_err(io("compressing the layer"))?;
    let layer = gz.finish().map_err(io("compressing the layer"))?;

    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer_tar))]},
        "history": [{"created_by": "peat-testenv image (make image)"}],
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha256_hex(&layer)), "size": layer.len()}],
        "annotations": {"org.opencontainers.image.version": version},
    }))
    .expect("json");
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": version},
        }],
    }))
    .expect("json");

    let _ = std::fs::remove_dir_all(out);
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io("creating the layout"))?;
    for blob in [&layer, &config, &manifest] {
        std::fs::write(blobs.join(sha256_hex(blob)), blob).map_err(io("writing a blob"))?;
    }
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io("writing oci-layout"))?;
    std::fs::write(out.join("index.json"), index).map_err(io("writing index.json"))?;
    Ok(Image {
        layout: out.to_path_buf(),
        manifest_digest,
        layer_size: layer.len() as u64,
        content_size,
        paths: entries.keys().cloned().collect(),
    })
}

/// Merges single-platform layouts (`make image`, `make image ARCH=arm64`) into the multi-platform
/// layout `out` (replaced): every blob, and one index naming each manifest with its platform.
pub fn merge(layouts: &[PathBuf], out: &Path) -> Result<Vec<serde_json::Value>, TestEnvError> {
    let _ = std::fs::remove_dir_all(out);
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io("creating the layout"))?;
    let mut manifests = Vec::new();
    for layout in layouts {
        for (digest, desc) in index_manifests(layout)? {
            if manifests.iter().any(|m: &serde_json::Value| m["platform"] == desc["platform"]) {
                return Err(TestEnvError::Build(format!("two layouts are for {}", desc["platform"])));
            }
            let manifest = read_blob(layout, &digest)?;
            let referenced: serde_json::Value = serde_json::from_slice(&manifest)
                .map_err(|e| TestEnvError::Build(format!("manifest {digest}: {e}")))?;
            let mut digests = vec![digest.clone()];
            digests.extend(referenced["config"]["digest"].as_str().map(String::from));
            for l in referenced["layers"].as_array().into_iter().flatten() {
                digests.extend(l["digest"].as_str().map(String::from));
            }
            for d in digests {
                let hex = d.trim_start_matches("sha256:");
                std::fs::copy(layout.join("blobs/sha256").join(hex), blobs.join(hex))
                    .map_err(io(format!("copying blob {d}")))?;
            }
            manifests.push(desc);
        }
    }
    let index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io("writing oci-layout"))?;
    std::fs::write(out.join("index.json"), serde_json::to_vec_pretty(&index).expect("json"))
        .map_err(io("writing index.json"))?;
    Ok(manifests)
}

const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>, TestEnvError> {
    let path = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    std::fs::read(&path).map_err(io(format!("reading {}", path.display())))
}

/// The manifests a layout's index.json names: (digest, descriptor).
fn index_manifests(layout: &Path) -> Result<Vec<(String, serde_json::Value)>, TestEnvError> {
    let path = layout.join("index.json");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?)
            .map_err(|e| TestEnvError::Build(format!("{}: {e}", path.display())))?;
    let manifests: Vec<_> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d["digest"].as_str()?.to_string(), d.clone())))
        .collect();
    if manifests.is_empty() {
        return Err(TestEnvError::Build(format!("{} names no manifest", path.display())));
    }
    Ok(manifests)
}

/// Pushes the image of the layout `layout` to `reference` (`host[:port]/repository:tag`; plain HTTP
/// when `insecure`): each manifest's blobs, then the manifest — under the tag for a single-platform
/// layout; by digest, followed by an image index under the tag, for a multi-platform one. Returns
/// the digest the tag names.
pub async fn push(layout: &Path, reference: &str, insecure: bool) -> Result<String, TestEnvError> {
    let registry_error =
        |e: oci_client::errors::OciDistributionError| TestEnvError::Build(format!("pushing to {reference}: {e}"));
    let r: oci_client::Reference =
        reference.parse().map_err(|e| TestEnvError::Build(format!("{reference:?} is no image reference: {e}")))?;
    let access = peat::oci::RegistryAccess { insecure, ..Default::default() };
    let client = access.try_client().map_err(|e| TestEnvError::Build(e.to_string()))?;
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    client.auth(&r, &auth, oci_client::RegistryOperation::Push).await.map_err(registry_error)?;
    let manifests = index_manifests(layout)?;
    let single = manifests.len() == 1;
    for (digest, _) in &manifests {
        let manifest_bytes = read_blob(layout, digest)?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| TestEnvError::Build(format!("manifest: {e}")))?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        for d in std::iter::once(&manifest["config"]).chain(layers.iter()).filter_map(|d| d["digest"].as_str()) {
            client.push_blob(&r, read_blob(layout, d)?, d).await.map_err(registry_error)?;
        }
        let target = if single {
            r.clone()
        } else {
            oci_client::Reference::with_digest(r.registry().into(), r.repository().into(), digest.clone())
        };
        let media_type = http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE);
        client.push_manifest_raw(&target, manifest_bytes, media_type).await.map_err(registry_error)?;
    }
    if single {
        return Ok(manifests[0].0.clone());
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests.iter().map(|(_, d)| d).collect::<Vec<_>>(),
    }))
    .expect("json");
    let digest = format!("sha256:{}", sha256_hex(&index));
    let media_type = http::HeaderValue::from_static(INDEX_MEDIA_TYPE);
    client.push_manifest_raw(&r, index, media_type).await.map_err(registry_error)?;
    Ok(digest)
}

/// Builds the CSI driver's registrar (`registrar/`, Go) for `arch` into `out_dir`: a static binary.
pub fn build_registrar(repo_root: &Path, out_dir: &Path, arch: &str) -> Result<PathBuf, TestEnvError> {
    let out = out_dir.join(format!("peat-csi-registrar-{arch}"));
    let status = std::process::Command::new("go")
        .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(repo_root.join("registrar"))
        .env("CGO_ENABLED", "0")
        .env("GOARCH", arch)
        .env("GOFLAGS", "-mod=mod")
        .status()
        .map_err(io("running go build (the registrar)"))?;
    if !status.success() {
        return Err(TestEnvError::Build(format!("go build of registrar/ exited with {status}")));
    }
    Ok(out)
}
