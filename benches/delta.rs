//! `make bench` — delta updates: a 1 GiB model (4 files) whose next version changes 10% of the
//! bytes in scattered ~1 MiB regions (a fine-tune touching some tensors).
//!
//! Prints, measured in the same run:
//! - bytes on the wire for the upgrade (counted by a proxy in front of the registry: headers,
//!   manifest and chunk indexes included) ÷ the changed bytes;
//! - the delta upgrade's time ÷ a full pull of the same version by a node holding nothing;
//! - FastCDC chunking + per-chunk sha256 throughput ÷ plain sha256 throughput on the same bytes;
//! - a chunk size sweep (over-fetch, index size, chunking speed per average size) — the measurement
//!   behind the sizes in `src/oci/chunk_index.rs`;
//! - the edge-link table ([`edge`]): every edit pattern of issue 18 across a shaped link, by patch.
//!
//! PEAT_BENCH_DELTA_MIB sets the model's size (default 1024); PEAT_BENCH_LINK_MBIT the edge
//! link's rates (default `20,100`).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "delta/edge.rs"]
mod edge;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use peat::api::{DeploymentPhase, ModelDeployment};
use peat::oci::chunk_index::{DEFAULT_PARAMS, Params, index_bytes};
use serde_json::json;
use sha2::{Digest, Sha256};

const FILES: usize = 4;

/// `peat push` of `dir` as variant fp32-cpu of `repo:version`, with patches against `delta_from`.
fn push(dir: &Path, repo: &str, version: &str, delta_from: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peat"));
    cmd.arg("push").arg(dir);
    cmd.args(["--repository", repo, "--version", version, "--variant", "fp32-cpu", "--insecure"]);
    if !delta_from.is_empty() {
        cmd.args(["--delta-from", &delta_from.join(",")]);
    }
    let out = cmd.output().expect("running peat push");
    assert!(out.status.success(), "peat push: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes a ModelDeployment of `model` for `artifact` on the agent's node and waits until it is
/// Operational.
async fn deploy(
    ctx: &support::Ctx,
    agent: &support::AgentProc,
    model: &str,
    version: &str,
    artifact: &str,
    delta: bool,
) -> Duration {
    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let name = ModelDeployment::name_for(model, &agent.node);
    let md = json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
        "spec": {"nodeName": agent.node, "model": model, "version": version, "variant": "fp32-cpu",
                 "artifact": artifact, "insecure": true, "delta": delta},
    });
    let start = Instant::now();
    mds.patch(&name, &PatchParams::apply("peat-bench").force(), &Patch::Apply(&md)).await.unwrap();
    loop {
        let m = mds.get(&name).await.unwrap();
        if let Some(st) = &m.status {
            assert_ne!(st.phase, DeploymentPhase::Failed, "{:?}\n{}", st.message, agent.log_tail());
            if st.phase == DeploymentPhase::Operational && st.active_version.as_deref() == Some(version) {
                return start.elapsed();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(900), "no Operational\n{}", agent.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn agent(ctx: &support::Ctx, name: &str, store: &Path) -> support::AgentProc {
    agent_with(ctx, name, |node| support::start_agent(node, store, &[])).await
}

/// A node named after `name` and its agent, started by `start`; waits for the agent's ModelNode.
async fn agent_with(
    ctx: &support::Ctx,
    name: &str,
    start: impl FnOnce(&str) -> support::AgentProc,
) -> support::AgentProc {
    let node = format!("{}-{name}", ctx.ns);
    support::create_node(&ctx.client, &node, &[]).await;
    let a = start(&node);
    let mns: Api<peat::api::ModelNode> = Api::all(ctx.client.clone());
    support::eventually("the agent's ModelNode", Duration::from_secs(60), || async {
        mns.get(&node).await.ok().and_then(|m| m.status).map(|_| ())
    })
    .await;
    a
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Bytes of `new`'s chunks not among `old`'s (what a delta transfer fetches, before coalescing).
fn missing_bytes(old: &[u8], new: &[u8], p: Params) -> (u64, u64) {
    let known: HashSet<String> = index_bytes(old, p).chunks.into_iter().map(|c| c.1).collect();
    let idx = index_bytes(new, p);
    let index_size = serde_json::to_vec(&idx).unwrap().len() as u64;
    (idx.chunks.iter().filter(|c| !known.contains(&c.1)).map(|c| u64::from(c.0)).sum(), index_size)
}

#[tokio::main]
async fn main() {
    let mib: usize = std::env::var("PEAT_BENCH_DELTA_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = mib << 20;
    let ctx = support::ctx("bench-delta").await;
    let base = {
        let shm = Path::new("/dev/shm");
        let room = peat::agent::capabilities::storage(shm).map(|(free, _)| free).unwrap_or(0);
        if room > 6 * size as u64 { shm.to_path_buf() } else { ctx.env.dir.clone() }
    };
    let work: PathBuf = base.join(format!("peat-bench-delta-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);

    // v1: FILES files of size/FILES; v2: 10% of each file changed in ~1 MiB regions.
    let per_file = size / FILES;
    let region = 1 << 20;
    let regions = (per_file / 10).div_ceil(region);
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    let mut changed = 0usize;
    for i in 0..FILES {
        let a = support::pseudo_random(500 + i as u64, per_file);
        let mut b = a.clone();
        let stride = per_file / regions;
        for r in 0..regions {
            let at = r * stride + stride / 4;
            let len = region.min(per_file / 10 - r * region).min(per_file - at);
            b[at..at + len].copy_from_slice(&support::pseudo_random(900 + (i * 1000 + r) as u64, len));
            changed += len;
        }
        v1.push(a);
        v2.push(b);
    }
    let repo = format!("{}/models/bench", ctx.env.registry);
    let mut artifacts = Vec::new();
    for (version, files) in [("1.0.0", &v1), ("2.0.0", &v2)] {
        let dir = work.join(format!("src-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, data) in files.iter().enumerate() {
            std::fs::write(dir.join(format!("part-{i}.safetensors")), data).unwrap();
        }
        artifacts.push(push(&dir, &repo, version, &[]));
        let _ = std::fs::remove_dir_all(&dir);
    }
    let link = support::CountingProxy::start(&ctx.env.registry).await;
    let via = |a: &str| a.replacen(&ctx.env.registry, &link.addr, 1);

    // A node holding 1.0.0 upgrades to 2.0.0 by delta.
    let node = agent(&ctx, "delta", &work.join("store-delta")).await;
    deploy(&ctx, &node, "bench", "1.0.0", &via(&artifacts[0]), true).await;
    let before = link.delivered();
    let delta_time = deploy(&ctx, &node, "bench", "2.0.0", &via(&artifacts[1]), true).await;
    let wire = link.delivered() - before;
    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let st = mds.get(&ModelDeployment::name_for("bench", &node.node)).await.unwrap().status.unwrap();

    // A node holding nothing pulls 2.0.0 whole.
    let fresh = agent(&ctx, "full", &work.join("store-full")).await;
    let before = link.delivered();
    let full_time = deploy(&ctx, &fresh, "bench", "2.0.0", &via(&artifacts[1]), true).await;
    let full_wire = link.delivered() - before;
    drop((node, fresh));

    // Chunking vs sha256 on the same bytes (one file).
    let sample = &v2[0];
    let t = Instant::now();
    std::hint::black_box(Sha256::digest(sample));
    let sha = t.elapsed();
    let t = Instant::now();
    std::hint::black_box(index_bytes(sample, DEFAULT_PARAMS));
    let cdc = t.elapsed();
    let t = Instant::now();
    let p = DEFAULT_PARAMS;
    std::hint::black_box(fastcdc::v2020::FastCDC::new(sample, p.min as usize, p.avg as usize, p.max as usize).count());
    let boundaries = t.elapsed();

    println!();
    println!(
        "delta upgrade of a {mib} MiB model ({FILES} files), 10% changed in {} regions of ≤1 MiB:",
        regions * FILES
    );
    println!("  changed bytes                 {changed}");
    println!(
        "  bytes on the wire (delta)     {wire}   (agent reports fetched {}, reused {})",
        st.bytes_done, st.bytes_reused
    );
    println!("  bytes on the wire (full)      {full_wire}");
    println!("  delta pull                    {:.2} s", delta_time.as_secs_f64());
    println!("  full pull                     {:.2} s", full_time.as_secs_f64());
    println!("  wire ÷ changed bytes          {:.3}", wire as f64 / changed as f64);
    println!("  delta time ÷ full time        {:.2}", delta_time.as_secs_f64() / full_time.as_secs_f64());
    println!(
        "  chunking (FastCDC boundaries) {:.2} GB/s ÷ sha256 {:.2} GB/s = {:.2}",
        gbps(sample.len(), boundaries),
        gbps(sample.len(), sha),
        gbps(sample.len(), boundaries) / gbps(sample.len(), sha)
    );
    println!(
        "  chunk index (boundaries + a sha256 per chunk) {:.2} GB/s ÷ sha256 = {:.2}",
        gbps(sample.len(), cdc),
        gbps(sample.len(), cdc) / gbps(sample.len(), sha)
    );
    println!("  chunk size sweep on one {} MiB file (10% changed):", per_file >> 20);
    println!("    avg      fetched ÷ changed   index bytes   index ÷ file   chunking GB/s");
    let changed_one: usize = changed / FILES;
    for avg in [8u32 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10] {
        let p = Params { min: avg / 4, avg, max: avg * 4 };
        let t = Instant::now();
        let (missing, index_size) = missing_bytes(&v1[0], &v2[0], p);
        let took = t.elapsed() / 2; // two files indexed
        println!(
            "    {:>4} KiB  {:>17.3}   {:>11}   {:>11.4}%   {:>13.2}{}",
            avg >> 10,
            missing as f64 / changed_one as f64,
            index_size,
            100.0 * index_size as f64 / per_file as f64,
            gbps(per_file, took),
            if p == DEFAULT_PARAMS { "   ← peat's" } else { "" }
        );
    }
    drop(v2);
    edge::run(&ctx, &work, &v1).await;
    let _ = std::fs::remove_dir_all(&work);
}
