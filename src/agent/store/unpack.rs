//! Archive layers (ModelPack `…tar`, `…tar+gzip`, `…tar+zstd`; directories pushed by ORAS) are
//! unpacked into a version's staging directory with the guarantees plain files have: every path
//! stays inside it, links only point inside it, no devices, FIFOs or hard links, no entry replaces
//! another file, and the bytes written are bounded. The archive blob itself was verified against its
//! digest before this runs; anything refused leaves the staging directory to be discarded.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use crate::oci::layout::Archive;

use super::validate_title;

/// Most bytes a compressed archive may unpack to, per byte of the archive (a decompression bomb
/// stops here, not at a full disk).
pub const MAX_EXPANSION: u64 = 64;

/// Bytes counted per archive entry besides its content (its tar header): a flood of empty files
/// is bounded like bytes are.
const ENTRY_COST: u64 = 512;

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// What the layers of one version have put into its staging directory so far.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// Paths written (files and links), relative.
    pub taken: HashSet<PathBuf>,
    /// Symbolic links made by archives, relative: nothing is written through them.
    pub links: Vec<PathBuf>,
}

/// Once every layer is in: each link, followed to its end (through other links), must land inside
/// `dest` on something that exists. Checked after all layers, as a later link can change where an
/// earlier one leads.
pub fn check_links(dest: &Path, unpacked: &Unpacked) -> io::Result<()> {
    let root = dest.canonicalize()?;
    for link in &unpacked.links {
        match dest.join(link).canonicalize() {
            Ok(end) if end.starts_with(&root) => {}
            Ok(_) => return Err(refused(format!("link {:?} leads outside the model directory", link.display()))),
            Err(_) => {
                return Err(refused(format!("link {:?} leads to nothing in the model directory", link.display())));
            }
        }
    }
    Ok(())
}

/// Unpacks `blob` (an `archive` of `declared` bytes, titled `title`) into `dest`; `unpacked` holds
/// what other layers put there and gains this archive's entries. Returns the bytes of its files.
pub fn unpack(
    blob: &Path,
    archive: Archive,
    declared: u64,
    title: &str,
    dest: &Path,
    unpacked: &mut Unpacked,
) -> io::Result<u64> {
    // A malformed archive (it passed its digest check) is the artifact's fault: InvalidData.
    let malformed = |e: io::Error| refused(format!("archive {title} is not a valid tar: {e}"));
    let file = std::fs::File::open(blob)?;
    let (reader, limit): (Box<dyn Read>, u64) = match archive {
        Archive::Tar => (Box::new(file), declared),
        Archive::TarGzip => (Box::new(flate2::read::GzDecoder::new(file)), declared.saturating_mul(MAX_EXPANSION)),
        Archive::TarZstd => (Box::new(zstd::stream::read::Decoder::new(file)?), declared.saturating_mul(MAX_EXPANSION)),
    };
    let mut tar = tar::Archive::new(reader);
    // Bytes counted against the limit (content and entries), and the content alone (returned).
    let mut written: u64 = 0;
    let mut content: u64 = 0;
    let too_much = |limit: u64| {
        refused(format!(
            "archive {title} unpacks to more than {limit} bytes (declared {declared} bytes{})",
            if archive == Archive::Tar { "" } else { ", at most 64 times that unpacked" }
        ))
    };
    for entry in tar.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let raw = entry.path().map_err(malformed)?.into_owned();
        let shown = raw.display().to_string();
        let kind = entry.header().entry_type();
        // "./" alone (the archive's root) is no entry of its own.
        if raw.components().all(|c| matches!(c, Component::CurDir)) && kind.is_dir() {
            continue;
        }
        let rel = validate_title(shown.trim_end_matches('/'))
            .map_err(|e| refused(format!("archive {title}: entry {shown:?}: {e}")))?;
        written = written.saturating_add(ENTRY_COST);
        if written > limit {
            return Err(too_much(limit));
        }
        // Nothing is written through a link an archive made.
        if unpacked.links.iter().any(|l| rel.starts_with(l) && rel != *l) {
            return Err(refused(format!("archive {title}: entry {shown:?} goes through a link")));
        }
        let path = dest.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if unpacked.taken.contains(&rel) || path.symlink_metadata().is_ok() {
            return Err(refused(format!("archive {title}: {shown:?} would replace a file of the version")));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let size = entry.header().size().map_err(malformed)?;
            written = written.saturating_add(size);
            if written > limit {
                return Err(too_much(limit));
            }
            let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
            let mut body = (&mut entry).take(size);
            let copied = copy_entry(&mut body, &mut out).map_err(|e| match e {
                // Reading failed: the archive is cut short or corrupt; writing failed: the disk.
                Side::Read(e) => malformed(e),
                Side::Write(e) => e,
            })?;
            content += copied;
            if copied != size {
                return Err(refused(format!("archive {title}: entry {shown:?} is truncated")));
            }
            // Permissions: read for all, the owner's execute bit kept (scripts); never set-id.
            let exec = entry.header().mode().unwrap_or(0o644) & 0o100 != 0;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(malformed)?
                .ok_or_else(|| refused(format!("archive {title}: link {shown:?} has no target")))?
                .into_owned();
            if !stays_inside(&rel, &target) {
                return Err(refused(format!(
                    "archive {title}: link {shown:?} → {:?} points outside the model directory",
                    target.display()
                )));
            }
            std::os::unix::fs::symlink(&target, &path)?;
            unpacked.links.push(rel.clone());
        } else {
            let what = match kind {
                tar::EntryType::Link => "a hard link",
                tar::EntryType::Char | tar::EntryType::Block => "a device",
                tar::EntryType::Fifo => "a FIFO",
                _ => "of an unsupported type",
            };
            return Err(refused(format!(
                "archive {title}: entry {shown:?} is {what}: only files, directories and links inside are unpacked"
            )));
        }
        unpacked.taken.insert(rel);
    }
    Ok(content)
}

enum Side {
    Read(io::Error),
    Write(io::Error),
}

/// Copies an entry's bytes, telling a read error (the archive) from a write error (the disk).
fn copy_entry(from: &mut impl Read, to: &mut impl io::Write) -> Result<u64, Side> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Side::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(Side::Write)?;
        total += n as u64;
    }
}

/// Whether the relative link `target`, read from the directory of `link`, stays inside the root.
fn stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry with a raw name (no checks, as a hostile packer would write it).
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn tar_of(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            raw_entry(&mut b, name, *kind, *link, data);
        }
        b.into_inner().unwrap()
    }

    fn try_unpack(bytes: &[u8], archive: Archive, declared: u64) -> (io::Result<u64>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, bytes).unwrap();
        let dest = dir.path().join("v");
        std::fs::create_dir(&dest).unwrap();
        let mut unpacked = Unpacked { taken: HashSet::from([PathBuf::from("model.onnx")]), links: vec![] };
        let r = unpack(&blob, archive, declared, "layer", &dest, &mut unpacked)
            .and_then(|n| check_links(&dest, &unpacked).map(|()| n));
        (r, dir)
    }

    #[test]
    fn files_directories_and_inner_links_unpack() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let t = tar_of(&[
            ("./", Directory, None, b""),
            ("cfg/", Directory, None, b""),
            ("cfg/config.json", Regular, None, b"{}"),
            ("weights.bin", Regular, None, b"1234"),
            ("cfg/latest", Symlink, Some("../weights.bin"), b""),
        ]);
        let (r, dir) = try_unpack(&t, Archive::Tar, t.len() as u64);
        assert_eq!(r.unwrap(), 6);
        let v = dir.path().join("v");
        assert_eq!(std::fs::read(v.join("cfg/config.json")).unwrap(), b"{}");
        assert_eq!(std::fs::read(v.join("cfg/latest")).unwrap(), b"1234", "the link resolves inside");
    }

    #[test]
    fn hostile_archives_are_refused_with_a_message() {
        use tar::EntryType::{Block, Char, Fifo, Link, Regular, Symlink};
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("parent path", tar_of(&[("../evil", Regular, None, b"x")]), "escapes"),
            ("absolute path", tar_of(&[("/etc/evil", Regular, None, b"x")]), "escapes"),
            ("link out", tar_of(&[("l", Symlink, Some("../../etc/passwd"), b"")]), "outside"),
            ("absolute link", tar_of(&[("l", Symlink, Some("/etc/passwd"), b"")]), "outside"),
            ("hard link", tar_of(&[("h", Link, Some("/etc/passwd"), b"")]), "hard link"),
            ("char device", tar_of(&[("d", Char, None, b"")]), "device"),
            ("block device", tar_of(&[("d", Block, None, b"")]), "device"),
            ("fifo", tar_of(&[("f", Fifo, None, b"")]), "FIFO"),
            (
                "write through a link",
                tar_of(&[("l", Symlink, Some("."), b""), ("l/x", Regular, None, b"x")]),
                "through a link",
            ),
            ("another layer's file", tar_of(&[("model.onnx", Regular, None, b"x")]), "replace"),
            (
                "a chain of links that climbs out",
                tar_of(&[("a/b/up", Symlink, Some("../.."), b""), ("esc", Symlink, Some("a/b/up/.."), b"")]),
                "leads outside",
            ),
            ("a link to nothing", tar_of(&[("l", Symlink, Some("missing"), b"")]), "leads to nothing"),
            ("twice", tar_of(&[("a", Regular, None, b"x"), ("a", Regular, None, b"y")]), "replace"),
        ];
        for (what, t, expected) in cases {
            let (r, _dir) = try_unpack(&t, Archive::Tar, t.len() as u64);
            let e = r.expect_err(what);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            assert!(e.to_string().contains(expected), "{what}: {e}");
        }
        // A tar declaring less than it holds, and a compression bomb.
        let t = tar_of(&[("w", Regular, None, &[0u8; 4096])]);
        assert!(try_unpack(&t, Archive::Tar, 1000).0.unwrap_err().to_string().contains("more than 1000 bytes"));
        let bomb = tar_of(&[("w", Regular, None, &vec![0u8; 8 << 20])]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        io::Write::write_all(&mut gz, &bomb).unwrap();
        let gz = gz.finish().unwrap();
        assert!(gz.len() * 64 < 8 << 20, "a bomb: {} bytes", gz.len());
        let e = try_unpack(&gz, Archive::TarGzip, gz.len() as u64).0.unwrap_err();
        assert!(e.to_string().contains("at most 64 times"), "{e}");
    }

    #[test]
    fn links_stay_inside_or_are_refused() {
        assert!(stays_inside(Path::new("a/b"), Path::new("c")));
        assert!(stays_inside(Path::new("a/b"), Path::new("../c")));
        assert!(!stays_inside(Path::new("a/b"), Path::new("../../c")));
        assert!(!stays_inside(Path::new("b"), Path::new("../c")));
        assert!(!stays_inside(Path::new("b"), Path::new("/etc/passwd")));
        assert!(stays_inside(Path::new("b"), Path::new("./c/../d")));
    }
}
