//! `make bench` — a full pull of a 1 GiB variant of 4 files from the local registry.
//!
//! Prints the agent's time (ModelDeployment written → Operational: manifest, 4 layers streamed to
//! disk, sha256-verified, fsynced, hard-linked into the version dir, `current` switched) as ratios
//! against, measured in the same run on the same registry and disk:
//! - `oras pull` of the same manifest (built from the Go module proxy);
//! - `skopeo copy` of it to a `dir:` destination (Debian);
//! - the floor: sha256 + write of the same bytes from memory (and, as the agent makes each blob
//!   durable before it counts, the floor plus one fdatasync per file).
//!
//! And the agent's peak RSS during the pull. Each figure is the best of `ROUNDS` rounds.
//! PEAT_BENCH_PULL_MIB sets the variant's size (default 1024).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use peat::api::{DeploymentPhase, ModelDeployment};
use serde_json::json;
use sha2::{Digest, Sha256};

const ROUNDS: usize = 2;
const FILES: usize = 4;

/// Flushes dirty pages, so one measurement does not pay for the previous one's writeback.
fn settle_disk() {
    unsafe { libc::sync() };
}

fn timed(what: &str, cmd: &mut Command) -> Duration {
    settle_disk();
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("running {what}: {e}"));
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}

fn drop_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// sha256 + write of `files` from memory (with `fsync`: + fdatasync per file, as the agent does):
/// what any verified pull must at least do.
fn floor(files: &[Vec<u8>], dir: &Path, fsync: bool) -> Duration {
    use std::io::Write;
    let dir = fresh(dir);
    settle_disk();
    let start = Instant::now();
    for (i, data) in files.iter().enumerate() {
        let mut hasher = Sha256::new();
        let mut f = std::fs::File::create(dir.join(format!("f{i}"))).unwrap();
        for chunk in data.chunks(1 << 20) {
            hasher.update(chunk);
            f.write_all(chunk).unwrap();
        }
        if fsync {
            f.sync_data().unwrap();
        }
        std::hint::black_box(hasher.finalize());
    }
    let took = start.elapsed();
    drop_dir(&dir);
    took
}

async fn agent_pull(ctx: &support::Ctx, round: usize, artifact: &str, work: &Path) -> (Duration, f64, i64) {
    let node = format!("{}-pull-{round}", ctx.ns);
    support::create_node(&ctx.client, &node, &[]).await;
    let store = fresh(&work.join(format!("store-{round}")));
    let mut agent = support::start_agent(&node, &store, &[]);
    // Ready: its ModelNode appeared.
    let mns: Api<peat::api::ModelNode> = Api::all(ctx.client.clone());
    support::eventually("the agent's ModelNode", Duration::from_secs(60), || async {
        mns.get(&node).await.ok().and_then(|m| m.status).map(|_| ())
    })
    .await;
    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let name = ModelDeployment::name_for("bench", &node);
    let md = json!({
        "apiVersion": "peat.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "model": "bench", "version": "1.0.0", "variant": "fp32-cpu",
                 "artifact": artifact, "insecure": true},
    });
    settle_disk();
    let start = Instant::now();
    mds.patch(&name, &PatchParams::apply("peat-bench"), &Patch::Apply(&md)).await.unwrap();
    let deadline = start + Duration::from_secs(600);
    let done = loop {
        let m = mds.get(&name).await.unwrap();
        if let Some(st) = &m.status {
            assert_ne!(st.phase, DeploymentPhase::Failed, "the pull failed: {:?}\n{}", st.message, agent.log_tail());
            if st.phase == DeploymentPhase::Operational {
                break st.bytes_done;
            }
        }
        assert!(Instant::now() < deadline, "no Operational within 600 s\n{}", agent.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = start.elapsed();
    let rss = support::peak_rss_mib(agent.process.pid());
    agent.kill();
    drop_dir(&store);
    (took, rss, done)
}

#[tokio::main]
async fn main() {
    let mib: usize = std::env::var("PEAT_BENCH_PULL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = mib << 20;
    let ctx = support::ctx("bench-pull").await;
    let env = ctx.env;
    // Destinations on tmpfs when it has room: the disk of a VM adds seconds of noise to every
    // figure (writeback), and it is the software's cost that is compared. PEAT_BENCH_PULL_DIR overrides.
    let base = std::env::var_os("PEAT_BENCH_PULL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let shm = Path::new("/dev/shm");
        let room = peat::agent::capabilities::storage(shm).map(|(free, _)| free).unwrap_or(0);
        if room > 4 * size as u64 { shm.to_path_buf() } else { env.dir.clone() }
    });
    let work = fresh(&base.join(format!("peat-bench-pull-{}", std::process::id())));
    let skopeo = which("skopeo").expect("skopeo (Debian package) is needed: make bench installs it");

    // The model: 4 files of size/4 incompressible bytes, pushed from disk with `peat push`.
    let src = fresh(&work.join("model"));
    let files: Vec<Vec<u8>> = (0..FILES).map(|i| support::pseudo_random(100 + i as u64, size / FILES)).collect();
    for (i, data) in files.iter().enumerate() {
        std::fs::write(src.join(format!("part-{i}.safetensors")), data).unwrap();
    }
    let repo = format!("{}/models/bench", env.registry);
    let push_start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_peat"))
        .args([
            "push",
            &src.display().to_string(),
            "--repository",
            &repo,
            "--version",
            "1.0.0",
            "--variant",
            "fp32-cpu",
        ])
        .arg("--insecure")
        .output()
        .expect("running peat push");
    let push_took = push_start.elapsed();
    assert!(out.status.success(), "peat push: {}", String::from_utf8_lossy(&out.stderr));
    let artifact = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let digest = artifact.rsplit_once('@').expect("push prints repo@digest").1.to_string();
    drop_dir(&src);

    let mut agent = (Duration::MAX, 0f64, 0i64);
    let mut oras = Duration::MAX;
    let mut skopeo_t = Duration::MAX;
    let mut floor_t = Duration::MAX;
    let mut floor_sync = Duration::MAX;
    for round in 0..ROUNDS {
        let a = agent_pull(&ctx, round, &artifact, &work).await;
        if a.0 < agent.0 {
            agent.0 = a.0;
        }
        agent.1 = agent.1.max(a.1);
        agent.2 = a.2;

        let dir = fresh(&work.join("oras"));
        oras = oras.min(timed(
            "oras pull",
            Command::new(&env.binaries.oras).current_dir(&dir).args([
                "pull",
                "--plain-http",
                "--no-tty",
                &format!("{repo}@{digest}"),
                "-o",
                ".",
            ]),
        ));
        drop_dir(&dir);

        let dir = work.join("skopeo");
        drop_dir(&dir);
        skopeo_t = skopeo_t.min(timed(
            "skopeo copy",
            Command::new(&skopeo).args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{repo}@{digest}"),
                &format!("dir:{}", dir.display()),
            ]),
        ));
        drop_dir(&dir);

        floor_t = floor_t.min(floor(&files, &work.join("floor"), false));
        floor_sync = floor_sync.min(floor(&files, &work.join("floor"), true));
    }
    drop_dir(&work);

    let secs = |d: Duration| d.as_secs_f64();
    let rate = |d: Duration| size as f64 / (1 << 20) as f64 / secs(d);
    println!();
    println!(
        "pull of a {mib} MiB variant ({FILES} files) from the local registry into {}, best of {ROUNDS}:",
        base.display()
    );
    println!("  peat push (from disk, streamed)     {:>7.2} s  {:>7.0} MiB/s", secs(push_took), rate(push_took));
    println!(
        "  peat agent                          {:>7.2} s  {:>7.0} MiB/s  (bytes fetched {}, peak RSS {:.0} MiB)",
        secs(agent.0),
        rate(agent.0),
        agent.2,
        agent.1
    );
    println!("  oras pull                           {:>7.2} s  {:>7.0} MiB/s", secs(oras), rate(oras));
    println!("  skopeo copy to dir:                 {:>7.2} s  {:>7.0} MiB/s", secs(skopeo_t), rate(skopeo_t));
    println!("  floor: sha256 + write from memory   {:>7.2} s  {:>7.0} MiB/s", secs(floor_t), rate(floor_t));
    println!("  … + fdatasync per file (as agent)   {:>7.2} s  {:>7.0} MiB/s", secs(floor_sync), rate(floor_sync));
    println!("  agent ÷ oras pull     {:.2}", secs(agent.0) / secs(oras));
    println!("  agent ÷ skopeo copy   {:.2}", secs(agent.0) / secs(skopeo_t));
    println!("  agent ÷ floor         {:.2}", secs(agent.0) / secs(floor_t));
    println!("  agent ÷ floor+fsync   {:.2}", secs(agent.0) / secs(floor_sync));
    println!("  agent peak RSS        {:.0} MiB for a {mib} MiB variant", agent.1);
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}
