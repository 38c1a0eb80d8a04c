//! The edge-link part of the delta benchmark: the agent in a network namespace behind a veth link
//! shaped with tc TBF (`support::EdgeLink`), upgrading a model from 1.0.0 to versions pushed with
//! `peat push --delta-from 1.0.0`, one per edit pattern and link rate. For each: bytes on the wire
//! ÷ changed bytes (manifest, patches, any chunk index and HTTP headers included) and upgrade time
//! ÷ (changed bytes ÷ link rate); beside them what content-defined chunks alone would fetch.
//! And the full pull of 1.0.0 across the link ÷ `oras pull` of it across the same link, and ÷ the
//! link's own time for the bytes.
//!
//! PEAT_BENCH_LINK_MBIT sets the rates (default `20,100`); the full pulls run at the fastest.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use peat::oci::chunk_index::{DEFAULT_PARAMS, index_bytes};

use super::{FILES, agent_with, deploy, push};
use crate::support;

/// An edit of the model between 1.0.0 and a later version.
#[derive(Clone, Copy)]
enum Pattern {
    /// Runs of this many bytes over 10% of every file.
    Scattered(usize),
    /// 1% of the model inserted in the middle of the first file, shifting what follows.
    Insertion,
    /// One 32 MiB region of the second file (a tensor).
    Tensor,
    /// No file changes.
    Unchanged,
}

impl Pattern {
    fn name(self) -> String {
        match self {
            Pattern::Scattered(run) if run >= 1 << 20 => format!("{} MiB runs over 10%", run >> 20),
            Pattern::Scattered(run) => format!("{} KiB runs over 10%", run >> 10),
            Pattern::Insertion => "1% inserted, shifting the rest".into(),
            Pattern::Tensor => "one 32 MiB tensor".into(),
            Pattern::Unchanged => "unchanged".into(),
        }
    }

    /// File `i` of the version made from `old` by this pattern (new bytes from `seed`), and the
    /// bytes changed in it.
    fn apply(self, i: usize, old: &[u8], seed: u64) -> (Vec<u8>, usize) {
        let mut new = old.to_vec();
        let changed = match self {
            Pattern::Scattered(run) => {
                let regions = old.len() / 10 / run;
                let stride = old.len() / regions;
                for r in 0..regions {
                    let at = r * stride + stride / 3;
                    new[at..at + run].copy_from_slice(&support::pseudo_random(seed + r as u64, run));
                }
                regions * run
            }
            Pattern::Insertion if i == 0 => {
                let len = old.len() * FILES / 100;
                let at = old.len() / 2;
                new.splice(at..at, support::pseudo_random(seed, len));
                len
            }
            Pattern::Tensor if i == 1 => {
                let len = (32 << 20).min(old.len() / 2);
                let at = old.len() / 3;
                new[at..at + len].copy_from_slice(&support::pseudo_random(seed, len));
                len
            }
            _ => 0,
        };
        (new, changed)
    }
}

/// One row of the table.
struct Row {
    pattern: String,
    mbit: u32,
    changed: usize,
    chunks: u64,
    wire: u64,
    took: Duration,
}

/// Bytes a transfer by chunks alone would fetch for `new` against the chunks of 1.0.0 (`known`):
/// its missing chunks and its index.
fn by_chunks(known: &HashSet<String>, new: &[u8]) -> u64 {
    let idx = index_bytes(new, DEFAULT_PARAMS);
    let missing: u64 = idx.chunks.iter().filter(|c| !known.contains(&c.1)).map(|c| u64::from(c.0)).sum();
    missing + serde_json::to_vec(&idx).unwrap().len() as u64
}

fn secs_for(bytes: f64, mbit: u32) -> f64 {
    bytes * 8.0 / (f64::from(mbit) * 1e6)
}

pub async fn run(ctx: &support::Ctx, work: &Path, v1: &[Vec<u8>]) {
    let rates: Vec<u32> = std::env::var("PEAT_BENCH_LINK_MBIT")
        .unwrap_or_else(|_| "20,100".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let fastest = *rates.iter().max().expect("PEAT_BENCH_LINK_MBIT names at least one rate");
    let link = match support::EdgeLink::start(fastest).await {
        Ok(link) => link,
        Err(e) => {
            println!("\nedge link: not measured ({e})");
            return;
        }
    };
    let size: usize = v1.iter().map(Vec::len).sum();
    let repo = format!("{}/models/edge", ctx.env.registry);
    let via = |artifact: &str| artifact.replacen(&ctx.env.registry, &link.registry, 1);
    let write_version = |version: &str, files: &[Vec<u8>]| {
        let dir = work.join(format!("edge-src-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, data) in files.iter().enumerate() {
            std::fs::write(dir.join(format!("part-{i}.safetensors")), data).unwrap();
        }
        dir
    };
    let dir = write_version("1.0.0", v1);
    let first = push(&dir, &repo, "1.0.0", &[]);

    // The full pull of 1.0.0 across the link, by the agent and by `oras pull`.
    let node = agent_with(ctx, "edge", |node| link.start_agent(node, &work.join("store-edge"), &[])).await;
    let before = link.proxy.delivered();
    let full = deploy(ctx, &node, "edge", "1.0.0", &via(&first), true).await;
    let full_wire = link.proxy.delivered() - before;
    let oras_dir = work.join("edge-oras");
    std::fs::create_dir_all(&oras_dir).unwrap();
    let start = Instant::now();
    let out = link
        .command(&ctx.env.binaries.oras)
        .current_dir(&oras_dir)
        .args(["pull", "--plain-http", &via(&first)])
        .output()
        .expect("running oras pull");
    let oras = start.elapsed();
    assert!(out.status.success(), "oras pull: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&oras_dir);
    let _ = std::fs::remove_dir_all(&dir);

    let known: HashSet<String> =
        v1.iter().flat_map(|f| index_bytes(f, DEFAULT_PARAMS).chunks.into_iter().map(|c| c.1)).collect();
    let patterns = [
        Pattern::Scattered(4 << 10),
        Pattern::Scattered(64 << 10),
        Pattern::Scattered(1 << 20),
        Pattern::Insertion,
        Pattern::Tensor,
        Pattern::Unchanged,
    ];
    let mut rows = Vec::new();
    let mut seed = 1_000_000u64;
    for pattern in patterns {
        for &mbit in &rates {
            // New bytes per version: a node must not find one version's edits in another's.
            seed += 100_000;
            let mut files = Vec::new();
            let (mut changed, mut chunks) = (0, 0);
            for (i, old) in v1.iter().enumerate() {
                let (new, c) = pattern.apply(i, old, seed + 10_000 * i as u64);
                changed += c;
                if c > 0 {
                    chunks += by_chunks(&known, &new);
                }
                files.push(new);
            }
            let version = format!("{}.0.0", rows.len() + 2);
            let dir = write_version(&version, &files);
            drop(files);
            let artifact = push(&dir, &repo, &version, &["1.0.0"]);
            let _ = std::fs::remove_dir_all(&dir);
            link.set_rate(mbit).unwrap();
            // Back on 1.0.0 (held: nothing moves), then the upgrade.
            deploy(ctx, &node, "edge", "1.0.0", &via(&first), true).await;
            let before = link.proxy.delivered();
            let took = deploy(ctx, &node, "edge", &version, &via(&artifact), true).await;
            let wire = link.proxy.delivered() - before;
            rows.push(Row { pattern: pattern.name(), mbit, changed, chunks, wire, took });
        }
    }
    drop(node);
    drop(link);

    println!();
    println!(
        "edge link (agent in a network namespace, veth shaped by tc TBF), a {} MiB model of {FILES} files,",
        size >> 20
    );
    println!("upgrades from 1.0.0 by patches pushed with --delta-from 1.0.0:");
    println!(
        "  {:<32} {:>6} {:>12} {:>16} {:>14} {:>9} {:>10} {:>12}",
        "edit", "Mbit/s", "changed MiB", "chunks ÷ changed", "wire ÷ changed", "upgrade", "link time", "time ÷ link"
    );
    for r in &rows {
        let link_time = secs_for(r.changed as f64, r.mbit);
        let (chunks, wire, ratio) = if r.changed == 0 {
            (format!("{} B", r.chunks), format!("{} B", r.wire), "-".to_string())
        } else {
            (
                format!("{:.3}", r.chunks as f64 / r.changed as f64),
                format!("{:.3}", r.wire as f64 / r.changed as f64),
                format!("{:.2}", r.took.as_secs_f64() / link_time),
            )
        };
        println!(
            "  {:<32} {:>6} {:>12.1} {:>16} {:>14} {:>8.2}s {:>9.2}s {:>12}",
            r.pattern,
            r.mbit,
            r.changed as f64 / (1 << 20) as f64,
            chunks,
            wire,
            r.took.as_secs_f64(),
            link_time,
            ratio
        );
    }
    println!("  (goals: wire ÷ changed ≤ 1.10, time ÷ link ≤ 1.3; chunks ÷ changed: what chunks alone would fetch)");
    let link_full = secs_for(size as f64, fastest);
    println!(
        "  full pull of 1.0.0 at {fastest} Mbit/s: agent {:.1} s ({full_wire} bytes), oras pull {:.1} s, the link's time for the bytes {:.1} s",
        full.as_secs_f64(),
        oras.as_secs_f64(),
        link_full
    );
    println!(
        "  full pull ÷ oras pull {:.2}, ÷ link time {:.2}",
        full.as_secs_f64() / oras.as_secs_f64(),
        full.as_secs_f64() / link_full
    );
}
