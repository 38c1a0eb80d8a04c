//! sha256 digests as OCI writes them: `sha256:<64 lower-case hex>`.

use sha2::{Digest, Sha256};

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The hex part of a `sha256:` digest, refusing anything else (a digest names files in the store).
pub fn digest_hex(digest: &str) -> std::io::Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) => {
            Ok(hex)
        }
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{digest:?} is not a sha256 digest"))),
    }
}

/// Writes through to `inner` and hashes what it wrote: a file made on the way (a patch, a file
/// rebuilt from one) gets its digest without being read again.
pub struct HashingWriter<W> {
    /// Where the bytes go.
    pub inner: W,
    /// The hash of every byte written so far.
    pub hasher: Sha256,
    /// Bytes written so far.
    pub written: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    /// Starts hashing what goes to `inner`.
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter { inner, hasher: Sha256::new(), written: 0 }
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_in_lower_case_hex() {
        let d = sha256_digest(b"abc");
        assert_eq!(d, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(digest_hex(&d).unwrap().len(), 64);
        assert!(digest_hex(&d.to_uppercase()).is_err());
        assert!(digest_hex("sha512:00").is_err());
        assert!(digest_hex("sha256:../../etc").is_err());
    }

    #[test]
    fn a_hashing_writer_hashes_what_it_wrote() {
        use std::io::Write;
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        assert_eq!((format!("sha256:{:x}", w.hasher.finalize()), w.written), (sha256_digest(b"abc"), 3));
        assert_eq!(w.inner, b"abc");
    }
}
