//! The node's model store on disk.
//!
//! ```text
//! <root>/blobs/sha256/<hex>            verified layer contents (read-only; only complete, verified blobs)
//! <root>/tmp/<hex>.partial             a download in progress (resumed with HTTP Range after a restart)
//! <root>/models/<model>/<version>/…    the files of one version: hard links into blobs/
//! <root>/models/<model>/current        symlink to <version>, switched atomically (rename over it)
//! <root>/models/<model>/.peat-state.json  versions on disk, their manifest digests and files
//! ```
//! A version directory appears by one rename of a complete staging directory, so a version dir
//! that exists is whole; `current` only ever points at such a directory.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::DeletionPolicy;
use crate::oci::digest::digest_hex;
use crate::oci::layout::Archive;

mod evict;
pub use evict::Versions;
pub mod unpack;

/// One file of a version on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path relative to the version directory (the layer's title).
    pub title: String,
    /// Layer digest (`sha256:…`).
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// An archive unpacked into the version directory (then `title` only names the layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<Archive>,
}

/// One version of a model on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionRecord {
    /// The version.
    pub version: String,
    /// Digest of the variant manifest the files came from.
    pub digest: String,
    /// Its files.
    pub files: Vec<FileRecord>,
    /// Last activation, seconds since the epoch (0 = never active): the most recent are kept.
    #[serde(default)]
    pub activated_at: i64,
}

/// What the store holds of one model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelState {
    /// Versions on disk.
    pub versions: Vec<VersionRecord>,
    /// What to do when no ModelDeployment holds the model any more (the holder's policy, recorded
    /// on disk so that a deletion seen only after an agent restart is still honoured).
    #[serde(default)]
    pub on_release: DeletionPolicy,
    /// Held by no ModelDeployment and kept (`Retain`): unmanaged until a rollout adopts it.
    #[serde(default)]
    pub retained: bool,
}

impl ModelState {
    /// The record of `version`, if on disk.
    pub fn get(&self, version: &str) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }
}

/// Whether `s` can name a directory of the store: model ids and versions.
pub fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s != "current"
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

/// Checks a layer title: a relative path that stays inside the model directory.
pub fn validate_title(title: &str) -> Result<PathBuf, String> {
    if title.is_empty() {
        return Err("an empty file name".into());
    }
    if title.contains('\0') || title.contains('\\') {
        return Err(format!("{title:?} holds a NUL or backslash"));
    }
    let path = Path::new(title);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir if title.starts_with("./") => {}
            _ => return Err(format!("{title:?} escapes the model directory (absolute path or '..')")),
        }
    }
    if out.as_os_str().is_empty() || title.split('/').any(|p| p == "..") {
        return Err(format!("{title:?} escapes the model directory"));
    }
    Ok(out)
}

/// The store under one root directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Store {
    /// Opens (creating) the store at `root`, and removes what an interrupted activation left:
    /// staging and trash directories, and version directories its state file does not list.
    pub fn open(root: &Path) -> io::Result<Store> {
        let root = std::path::absolute(root)?;
        for d in ["blobs/sha256", "tmp", "models", "chunks"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let store = Store { root };
        for model in store.models() {
            let state = store.state(&model);
            let current = store.current(&model);
            for e in std::fs::read_dir(store.model_dir(&model))?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let listed = state.get(&name).is_some() || current.as_deref() == Some(name.as_str());
                let leftover = name.starts_with(".staging-") || name.starts_with(".trash-") || name == ".current.tmp";
                let unlisted_version = e.file_type().is_ok_and(|t| t.is_dir()) && !name.starts_with('.') && !listed;
                if leftover || unlisted_version {
                    let path = e.path();
                    let _ = if path.is_dir() && !path.is_symlink() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a verified blob lives.
    pub fn blob_path(&self, digest: &str) -> io::Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// Where a partial download of a blob lives.
    pub fn partial_path(&self, digest: &str) -> io::Result<PathBuf> {
        Ok(self.root.join("tmp").join(format!("{}.partial", digest_hex(digest)?)))
    }

    /// Where the chunk index of a local blob is kept (for delta transfers of later versions).
    pub fn chunk_index_path(&self, digest: &str) -> io::Result<PathBuf> {
        Ok(self.root.join("chunks").join(format!("{}.json", digest_hex(digest)?)))
    }

    /// Whether a verified blob of this digest and size is in the store.
    pub fn has_blob(&self, digest: &str, size: u64) -> bool {
        self.blob_path(digest).ok().and_then(|p| std::fs::metadata(p).ok()).is_some_and(|m| m.len() == size)
    }

    /// Bytes of a partial download on disk.
    pub fn partial_len(&self, digest: &str) -> u64 {
        self.partial_path(digest).ok().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len())
    }

    /// Moves a verified download into `blobs/` (read-only: version dirs hard-link it).
    pub fn commit_blob(&self, digest: &str, partial: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(partial, std::fs::Permissions::from_mode(0o444))?;
        std::fs::rename(partial, self.blob_path(digest)?)?;
        Ok(())
    }

    /// The directory of `model`: its versions and the `current` link.
    pub fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join("models").join(model)
    }

    /// Directory of one version's files.
    pub fn version_dir(&self, model: &str, version: &str) -> PathBuf {
        self.model_dir(model).join(version)
    }

    fn state_path(&self, model: &str) -> PathBuf {
        self.model_dir(model).join(".peat-state.json")
    }

    /// What the store holds of `model` (empty when nothing).
    pub fn state(&self, model: &str) -> ModelState {
        std::fs::read(self.state_path(model)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_state(&self, model: &str, state: &ModelState) -> io::Result<()> {
        let path = self.state_path(model);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(state).expect("state serializes"))?;
        std::fs::rename(tmp, path)
    }

    /// The active version of `model` (the target of `current`).
    pub fn current(&self, model: &str) -> Option<String> {
        let target = std::fs::read_link(self.model_dir(model).join("current")).ok()?;
        target.file_name()?.to_str().map(str::to_string)
    }

    /// Models with a directory in the store.
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.root.join("models"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Builds `models/<model>/<version>/` from verified blobs (hard links; a copy across
    /// filesystems) in a staging directory, then renames it into place. A version directory
    /// holding other content (another digest) is replaced without `current` ever dangling.
    pub fn materialize(&self, model: &str, record: &VersionRecord) -> io::Result<()> {
        let model_dir = self.model_dir(model);
        std::fs::create_dir_all(&model_dir)?;
        let staging = model_dir.join(format!(".staging-{}", record.version));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir(&staging)?;
        if let Err(e) = self.fill(&staging, record) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        let final_dir = self.version_dir(model, &record.version);
        let mut state = self.state(model);
        if final_dir.exists() {
            // Same version name, other bytes: swap the two directories in one step, so `current`
            // (which names the version) never points at nothing; then drop the old contents.
            match exchange(&staging, &final_dir) {
                Ok(()) => std::fs::remove_dir_all(&staging)?,
                // A filesystem without RENAME_EXCHANGE: two renames (a moment without the version).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                    let trash = model_dir.join(format!(".trash-{}", record.version));
                    let _ = std::fs::remove_dir_all(&trash);
                    std::fs::rename(&final_dir, &trash)?;
                    std::fs::rename(&staging, &final_dir)?;
                    std::fs::remove_dir_all(&trash)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            std::fs::rename(&staging, &final_dir)?;
        }
        state.versions.retain(|v| v.version != record.version);
        state.versions.push(record.clone());
        self.save_state(model, &state)
    }

    /// Puts a version's files into `staging`: plain files as hard links to their verified blobs (a
    /// copy across filesystems), archives unpacked. No two layers may give one path.
    fn fill(&self, staging: &Path, record: &VersionRecord) -> io::Result<()> {
        let mut unpacked = unpack::Unpacked::default();
        for f in record.files.iter().filter(|f| f.archive.is_none()) {
            let rel = validate_title(&f.title).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let dest = staging.join(&rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let blob = self.blob_path(&f.digest)?;
            if std::fs::hard_link(&blob, &dest).is_err() {
                std::fs::copy(&blob, &dest)?;
            }
            unpacked.taken.insert(rel);
        }
        for f in &record.files {
            if let Some(archive) = f.archive {
                unpack::unpack(&self.blob_path(&f.digest)?, archive, f.size, &f.title, staging, &mut unpacked)?;
            }
        }
        unpack::check_links(staging, &unpacked)
    }

    fn point_current(&self, model: &str, target: &str) -> io::Result<()> {
        debug_assert!(is_safe_component(target));
        let dir = self.model_dir(model);
        let tmp = dir.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, dir.join("current"))
    }

    /// Makes `version` (already materialized) the active one: one atomic rename of the symlink.
    pub fn activate(&self, model: &str, version: &str) -> io::Result<()> {
        let mut state = self.state(model);
        // Strictly increasing per model, even for activations within one second.
        let latest = state.versions.iter().map(|v| v.activated_at).max().unwrap_or(0);
        let Some(rec) = state.versions.iter_mut().find(|v| v.version == version) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{model} {version} is not in the store")));
        };
        if !self.version_dir(model, version).is_dir() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{model} {version}: directory missing")));
        }
        rec.activated_at = now_seconds().max(latest + 1);
        self.point_current(model, version)?;
        self.save_state(model, &state)
    }

    /// Keeps the active version and the `keep` most recently active others of `model`; removes the rest.
    /// Returns the versions removed.
    pub fn prune(&self, model: &str, keep: usize) -> io::Result<Vec<String>> {
        let mut state = self.state(model);
        let current = self.current(model);
        let mut others: Vec<&VersionRecord> =
            state.versions.iter().filter(|v| Some(&v.version) != current.as_ref()).collect();
        others.sort_by_key(|v| std::cmp::Reverse(v.activated_at));
        let drop: Vec<String> = others.iter().skip(keep).map(|v| v.version.clone()).collect();
        if drop.is_empty() {
            return Ok(drop);
        }
        for v in &drop {
            let dir = self.version_dir(model, v);
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
        }
        state.versions.retain(|v| !drop.contains(&v.version));
        self.save_state(model, &state)?;
        Ok(drop)
    }

    /// Records that a ModelDeployment holds `model` with `policy` (no longer retained, if it was).
    pub fn hold(&self, model: &str, policy: DeletionPolicy) -> io::Result<()> {
        let mut state = self.state(model);
        state.on_release = policy;
        state.retained = false;
        self.save_state(model, &state)
    }

    /// Records that no ModelDeployment holds `model` and that it stays (unmanaged).
    pub fn retain(&self, model: &str) -> io::Result<()> {
        let mut state = self.state(model);
        state.retained = true;
        self.save_state(model, &state)
    }

    /// Removes everything of `model`: its versions and `current`.
    pub fn remove_model(&self, model: &str) -> io::Result<()> {
        let dir = self.model_dir(model);
        // The symlink first: nothing may find a half-removed version through it.
        let _ = std::fs::remove_file(dir.join("current"));
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every blob digest some version on disk uses.
    pub fn referenced_blobs(&self) -> HashSet<String> {
        self.models()
            .iter()
            .flat_map(|m| self.state(m).versions)
            .flat_map(|v| v.files.into_iter().map(|f| f.digest))
            .collect()
    }

    /// Removes blobs no version uses and that `keep` does not name (digests of transfers under
    /// way), and, with `partials`, partial downloads `keep` does not name. Returns the bytes freed.
    pub fn collect_garbage(&self, keep: &HashSet<String>, partials: bool) -> io::Result<u64> {
        let mut wanted = self.referenced_blobs();
        wanted.extend(keep.iter().cloned());
        let wanted_hex: HashSet<&str> = wanted.iter().filter_map(|d| digest_hex(d).ok()).collect();
        let mut freed = 0;
        let mut dirs = vec![(self.root.join("blobs/sha256"), ""), (self.root.join("chunks"), ".json")];
        if partials {
            dirs.push((self.root.join("tmp"), ".partial"));
        }
        for (dir, suffix) in dirs {
            for e in std::fs::read_dir(&dir)?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let hex = name.strip_suffix(suffix).unwrap_or(&name);
                if !wanted_hex.contains(hex) && !name.ends_with(".tmp") {
                    freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                    match std::fs::remove_file(e.path()) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
        }
        Ok(freed)
    }

    /// Bytes the store occupies: blobs and partial downloads (version dirs are hard links to blobs).
    pub fn usage(&self) -> u64 {
        ["blobs/sha256", "tmp"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.root.join(d)).ok())
            .flat_map(|rd| rd.flatten())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Free and total bytes for the store: its filesystem's, or within `capacity` when the store
    /// may use only that much of it.
    pub fn space(&self, capacity: Option<u64>) -> io::Result<(u64, u64)> {
        let (free, total) = super::capabilities::storage(&self.root)?;
        Ok(match capacity {
            Some(cap) => (free.min(cap.saturating_sub(self.usage())), total.min(cap)),
            None => (free, total),
        })
    }

    /// Per model: versions on disk with their digests, and the active one.
    pub fn inventory(&self) -> BTreeMap<String, (ModelState, Option<String>)> {
        self.models().into_iter().map(|m| (m.clone(), (self.state(&m), self.current(&m)))).collect()
    }
}

/// Atomically exchanges two directories (`renameat2(RENAME_EXCHANGE)`, Linux 3.15+ on ext4, xfs,
/// btrfs, tmpfs …).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths, AT_FDCWD for both.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests;
