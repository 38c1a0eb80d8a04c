//! Binary patches of a model file against one exact earlier file: zstd frames that use the old
//! bytes as a reference prefix (`zstd --patch-from`), so a patch costs about the changed bytes
//! whatever the edit pattern — where content-defined chunks cost a chunk per edit (docs/delta.md,
//! *Limits*: 4 KiB edits over 10% of a file fetch 8.3× the changed bytes by chunks, 1.003× by patch).
//!
//! The new file is cut into segments of [`PatchParams::segment`] bytes, each its own frame, and
//! each frame's prefix is the old file's bytes around the segment's position
//! ([`PatchParams::margin`] either side). Bounded both ways: applying a frame holds one segment
//! (zstd's window buffer is capped by the frame's content size; the prefix is only read), and
//! making one indexes segment + 2 × margin of the old file, not all of it. Content that moved
//! further than the margin costs its bytes (the patch grows; the caller compares sizes).
//!
//! `peat push --delta-from VERSION` publishes patches as extra layers (`crate::oci::layout::MEDIA_PATCH`);
//! the agent applies one when it holds the exact file the patch was made against.

use std::io::{self, BufRead, Read, Write};
use std::ops::Range;

/// How a patch was cut: the same values must apply it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchParams {
    /// Bytes of the new file per frame.
    pub segment: u64,
    /// Bytes of the old file either side of a segment's position in its prefix.
    pub margin: u64,
}

/// What peat pushes with: 32 MiB frames (what applying one holds in memory), old bytes within
/// 64 MiB either side (an insertion of up to 64 MiB costs only its own bytes).
pub const DEFAULT_PATCH_PARAMS: PatchParams = PatchParams { segment: 32 << 20, margin: 64 << 20 };

/// zstd level of patches: the match finding against the prefix is what makes them small; higher
/// levels barely shrink weights (which hardly compress) and cost much more time.
const LEVEL: i32 = 3;

impl PatchParams {
    /// Params read from a manifest, or None when applying them would hold too much: a frame is
    /// at most 256 MiB and its prefix at most 1 GiB + 2 × 256 MiB (the decoder's window reaches
    /// over both: less than 2 GiB, zstd's largest).
    pub fn checked(segment: u64, margin: u64) -> Option<PatchParams> {
        (segment > 0 && segment <= 256 << 20 && margin <= 512 << 20).then_some(PatchParams { segment, margin })
    }

    /// The old file's bytes that are frame `k`'s prefix.
    fn prefix(&self, k: u64, old_len: u64) -> Range<usize> {
        let start = (k * self.segment).saturating_sub(self.margin).min(old_len);
        let end = ((k + 1) * self.segment).saturating_add(self.margin).min(old_len);
        start as usize..end as usize
    }
}

/// Window log of a frame: reaching from its end back to its prefix's start.
fn window_log(prefix_len: usize, segment_len: u64) -> u32 {
    let reach = prefix_len as u64 + segment_len;
    (64 - reach.max(1).leading_zeros()).clamp(10, 31)
}

/// Writes the patch that turns `old` into the `new_len` bytes read from `new`. Returns the
/// patch's length.
pub fn make_patch(
    old: &[u8],
    new: &mut impl Read,
    new_len: u64,
    out: &mut impl Write,
    params: PatchParams,
) -> io::Result<u64> {
    let mut written = Counted { inner: out, count: 0 };
    let mut segment = Vec::new();
    let frames = new_len.div_ceil(params.segment).max(1);
    for k in 0..frames {
        let len = params.segment.min(new_len - k * params.segment);
        segment.clear();
        new.take(len).read_to_end(&mut segment)?;
        if segment.len() as u64 != len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the new file is shorter than its size"));
        }
        let prefix = &old[params.prefix(k, old.len() as u64)];
        let mut enc = zstd::stream::write::Encoder::with_ref_prefix(&mut written, LEVEL, prefix)?;
        enc.window_log(window_log(prefix.len(), len))?;
        enc.long_distance_matching(true)?;
        enc.set_pledged_src_size(Some(len))?;
        enc.include_checksum(false)?; // the caller checks the whole file's sha256
        enc.write_all(&segment)?;
        enc.finish()?;
    }
    Ok(written.count)
}

/// Applies a patch made by [`make_patch`] against `old` with the same `params`, writing the
/// `new_len` bytes of the new file to `out`. A patch that does not fit (truncated, cut with other
/// params, made against other bytes) fails or yields other bytes: the caller verifies the digest.
pub fn apply_patch(
    old: &[u8],
    patch: &mut impl BufRead,
    new_len: u64,
    out: &mut impl Write,
    params: PatchParams,
) -> io::Result<()> {
    let frames = new_len.div_ceil(params.segment).max(1);
    for k in 0..frames {
        let len = params.segment.min(new_len - k * params.segment);
        let prefix = &old[params.prefix(k, old.len() as u64)];
        let mut dec = zstd::stream::read::Decoder::with_ref_prefix(&mut *patch, prefix)?.single_frame();
        dec.window_log_max(window_log(prefix.len(), len))?;
        let copied = io::copy(&mut (&mut dec).take(len + 1), out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("patch frame {k} holds {copied} bytes, not {len}"),
            ));
        }
    }
    if !patch.fill_buf()?.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bytes after the patch's last frame"));
    }
    Ok(())
}

/// Counts what goes through (the patch's length; its caller may hash it too).
struct Counted<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic bytes that do not compress (like weights, as far as zstd is concerned).
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// `run`-byte edits over a tenth of `old`, one per `10 × run` bytes.
    fn scattered(old: &[u8], run: usize) -> (Vec<u8>, u64) {
        let mut new = old.to_vec();
        let mut changed = 0;
        for (i, at) in (0..=old.len() - run * 10).step_by(run * 10).enumerate() {
            let at = at + (i * 7919) % (run * 9);
            new[at..at + run].copy_from_slice(&noise(run, at as u64 + 1));
            changed += run as u64;
        }
        (new, changed)
    }

    const SMALL: PatchParams = PatchParams { segment: 1 << 20, margin: 2 << 20 };

    fn round_trip(old: &[u8], new: &[u8], params: PatchParams) -> u64 {
        let mut patch = Vec::new();
        let len = make_patch(old, &mut &new[..], new.len() as u64, &mut patch, params).unwrap();
        assert_eq!(len, patch.len() as u64);
        let mut out = Vec::new();
        apply_patch(old, &mut &patch[..], new.len() as u64, &mut out, params).unwrap();
        assert!(out == new, "the patch rebuilds the new file");
        len
    }

    #[test]
    fn scattered_small_edits_cost_about_their_bytes() {
        let old = noise(6 << 20, 1);
        for run in [4 << 10, 64 << 10] {
            let (new, changed) = scattered(&old, run);
            let patch = round_trip(&old, &new, SMALL);
            let ratio = patch as f64 / changed as f64;
            assert!(ratio < 1.02, "{run}-byte edits: patch {patch} ÷ changed {changed} = {ratio:.3}");
        }
    }

    #[test]
    fn an_insertion_costs_its_bytes_within_the_margin_and_more_beyond() {
        let old = noise(6 << 20, 2);
        let inserted = noise(256 << 10, 3);
        let mut new = old[..(2 << 20)].to_vec();
        new.extend_from_slice(&inserted);
        new.extend_from_slice(&old[(2 << 20)..]);
        let patch = round_trip(&old, &new, SMALL);
        assert!((patch as f64) < inserted.len() as f64 * 1.05, "within the margin: patch {patch}");
        // The same shift with a margin smaller than it: what moved out of reach is sent whole.
        let narrow = PatchParams { segment: 1 << 20, margin: 64 << 10 };
        let patch = round_trip(&old, &new, narrow);
        assert!(patch > (1 << 20), "beyond the margin the moved bytes are sent: patch {patch}");
    }

    #[test]
    fn unchanged_empty_and_grown_files_round_trip() {
        let old = noise(3 << 20, 4);
        assert!(round_trip(&old, &old, SMALL) < 4096, "an unchanged file patches to almost nothing");
        round_trip(&old, &[], SMALL);
        round_trip(&[], &old, SMALL);
        let mut grown = old.clone();
        grown.extend_from_slice(&noise(5 << 20, 5));
        round_trip(&old, &grown, SMALL);
    }

    #[test]
    fn a_patch_that_does_not_fit_fails_or_yields_other_bytes() {
        let old = noise(3 << 20, 6);
        let (new, _) = scattered(&old, 4 << 10);
        let mut patch = Vec::new();
        make_patch(&old, &mut &new[..], new.len() as u64, &mut patch, SMALL).unwrap();
        let apply = |base: &[u8], patch: &[u8], params| {
            let mut out = Vec::new();
            apply_patch(base, &mut &patch[..], new.len() as u64, &mut out, params).map(|()| out)
        };
        assert!(apply(&old, &patch[..patch.len() - 10], SMALL).is_err(), "truncated");
        let mut longer = patch.clone();
        longer.extend_from_slice(b"junk");
        assert!(apply(&old, &longer, SMALL).is_err(), "trailing bytes");
        // Another base: zstd has no checksum here (the caller hashes), so other bytes may come out.
        let other = noise(3 << 20, 7);
        assert_ne!(apply(&other, &patch, SMALL).ok(), Some(new.clone()), "another base");
    }
}
