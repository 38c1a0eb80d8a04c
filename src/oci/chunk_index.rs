//! Content-defined chunk indexes (FastCDC 2020 boundaries + a sha256 per chunk) of model files.
//!
//! Pushed as an extra layer per file (`application/vnd.peat.chunk-index.v1+json`, annotation
//! `peat.dev/chunks-of: <layer digest>`, no title). An agent holding any earlier bytes indexes them
//! with the same parameters and fetches only the chunks it lacks.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Chunk size parameters (bytes).
///
/// Chosen by measurement (`make bench`, the delta benchmark's chunk size sweep: a 256 MiB file with
/// 10% changed in 1 MiB regions, min = avg/4 and max = avg×4 as the FastCDC paper suggests):
///
/// | avg | bytes fetched ÷ changed | index ÷ file |
/// |---|---|---|
/// | 8 KiB | 1.016 | 0.75% |
/// | 16 KiB | 1.030 | 0.38% |
/// | 32 KiB | 1.053 | 0.19% |
/// | 64 KiB | 1.146 | 0.10% |
/// | 128 KiB | 1.246 | 0.05% |
///
/// Over-fetch grows with the average chunk (about one chunk per changed region), the index as its
/// inverse, chunking speed does not move (0.5 GB/s with the per-chunk sha256, for all five). 32 KiB
/// keeps the fetch within ~5% of the changed bytes for regions of a megabyte (a tensor) with an
/// index of 0.2% of the file; 64 KiB would sit at the 15% budget, 16 KiB doubles the index.
pub const MIN_CHUNK: u32 = 8 * 1024;
/// Average chunk size.
pub const AVG_CHUNK: u32 = 32 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: u32 = 128 * 1024;

/// The algorithm name recorded in an index; others are not understood (full pull).
pub const ALGORITHM: &str = "fastcdc-2020";

/// A chunk index of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkIndex {
    /// Always `fastcdc-2020`.
    pub algorithm: String,
    /// FastCDC minimum chunk size.
    pub min_size: u32,
    /// FastCDC average chunk size.
    pub avg_size: u32,
    /// FastCDC maximum chunk size.
    pub max_size: u32,
    /// Digest of the whole file (the layer it indexes).
    pub digest: String,
    /// Size of the whole file.
    pub size: u64,
    /// The chunks in order: (length, sha256 hex). Offsets are the running sum of lengths.
    pub chunks: Vec<(u32, String)>,
}

/// Chunk parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Params {
    /// Minimum.
    pub min: u32,
    /// Average.
    pub avg: u32,
    /// Maximum.
    pub max: u32,
}

/// The parameters peat pushes with.
pub const DEFAULT_PARAMS: Params = Params { min: MIN_CHUNK, avg: AVG_CHUNK, max: MAX_CHUNK };

impl ChunkIndex {
    /// Its parameters.
    pub fn params(&self) -> Params {
        Params { min: self.min_size, avg: self.avg_size, max: self.max_size }
    }

    /// Checks that the index describes `digest` of `size` bytes with parameters we can reproduce.
    pub fn validate(&self, digest: &str, size: u64) -> Result<(), String> {
        if self.algorithm != ALGORITHM {
            return Err(format!("unknown chunking algorithm {:?}", self.algorithm));
        }
        if self.digest != digest || self.size != size {
            return Err(format!("indexes {} ({} bytes), not {digest} ({size} bytes)", self.digest, self.size));
        }
        let p = self.params();
        if !(64..=1 << 20).contains(&p.min) || !(256..=4 << 20).contains(&p.avg) || !(1024..=16 << 20).contains(&p.max)
        {
            return Err(format!("chunk sizes {p:?} out of FastCDC's range"));
        }
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.0)).sum();
        if total != size {
            return Err(format!("chunks add up to {total} bytes, not {size}"));
        }
        if self.chunks.iter().any(|c| c.0 == 0 || c.1.len() != 64) {
            return Err("an empty chunk or a malformed hash".into());
        }
        Ok(())
    }

    /// (offset, length, hash) of each chunk.
    pub fn spans(&self) -> impl Iterator<Item = (u64, u32, &str)> {
        self.chunks.iter().scan(0u64, |offset, (len, hash)| {
            let at = *offset;
            *offset += u64::from(*len);
            Some((at, *len, hash.as_str()))
        })
    }
}

/// Chunks `reader` and hashes each chunk; also returns the sha256 of the whole stream (one pass).
pub fn index_reader<R: Read>(reader: R, params: Params) -> std::io::Result<(ChunkIndex, String)> {
    let mut whole = Sha256::new();
    let mut size = 0u64;
    let mut chunks = Vec::new();
    let cdc = fastcdc::v2020::StreamCDC::new(reader, params.min as usize, params.avg as usize, params.max as usize);
    for chunk in cdc {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })?;
        whole.update(&chunk.data);
        size += chunk.length as u64;
        chunks.push((chunk.length as u32, format!("{:x}", Sha256::digest(&chunk.data))));
    }
    let digest = format!("sha256:{:x}", whole.finalize());
    let index = ChunkIndex {
        algorithm: ALGORITHM.into(),
        min_size: params.min,
        avg_size: params.avg,
        max_size: params.max,
        digest: digest.clone(),
        size,
        chunks,
    };
    Ok((index, digest))
}

/// The index of in-memory bytes.
pub fn index_bytes(data: &[u8], params: Params) -> ChunkIndex {
    index_reader(data, params).expect("reading memory does not fail").0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn an_index_covers_the_file_and_resynchronizes_after_an_insertion() {
        let a = bytes(1, 2 << 20);
        let ia = index_bytes(&a, DEFAULT_PARAMS);
        ia.validate(&crate::oci::digest::sha256_digest(&a), a.len() as u64).unwrap();
        assert!(ia.chunks.iter().all(|c| c.0 <= MAX_CHUNK));
        let mut b = a.clone();
        b.splice(1_000_000..1_000_000, bytes(2, 1000));
        let ib = index_bytes(&b, DEFAULT_PARAMS);
        let known: std::collections::HashSet<&str> = ia.chunks.iter().map(|c| c.1.as_str()).collect();
        let new_bytes: u64 = ib.chunks.iter().filter(|c| !known.contains(c.1.as_str())).map(|c| u64::from(c.0)).sum();
        assert!(new_bytes < 1000 + 3 * u64::from(MAX_CHUNK), "only chunks around the insertion differ: {new_bytes}");
        let offsets: Vec<u64> = ib.spans().map(|s| s.0).collect();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn invalid_indexes_are_refused() {
        let a = bytes(3, 100_000);
        let d = crate::oci::digest::sha256_digest(&a);
        let i = index_bytes(&a, DEFAULT_PARAMS);
        assert!(i.validate(&d, 99_999).is_err());
        assert!(i.validate("sha256:00", 100_000).is_err());
        let mut bad = i.clone();
        bad.chunks.pop();
        assert!(bad.validate(&d, 100_000).is_err());
        let mut bad = i.clone();
        bad.algorithm = "rabin".into();
        assert!(bad.validate(&d, 100_000).is_err());
    }
}
