//! Delta updates on the real registry, controller and agents: a node holding version N fetches
//! only what N+1 changed — by chunks against any earlier bytes, by a patch (`peat push
//! --delta-from`) against the exact earlier file. Bytes on the wire are counted by a proxy in
//! front of each test's own registry (`support::CountingProxy`): headers, manifests, chunk
//! indexes and patches included.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use peat::api::{ModelDeployment, ModelRollout, RolloutPhase};
use peat::oci::chunk_index::{DEFAULT_PARAMS, MAX_CHUNK, index_bytes};
use peat::oci::push::VariantMeta;
use peat_testenv::Registry;
use serde_json::json;
use support::{AgentProc, CountingProxy, create_node, pseudo_random, push_files, start_agent};
use tokio::sync::OnceCell;

const T: Duration = Duration::from_secs(90);
const MI: usize = 1 << 20;

static CONTROLLER: OnceCell<support::ControllerProc> = OnceCell::const_new();

struct Setup {
    ctx: support::Ctx,
    registry: Registry,
    link: CountingProxy,
    dir: PathBuf,
}

async fn setup(test: &str) -> Setup {
    CONTROLLER
        .get_or_init(|| async {
            let ctx = support::ctx("peat-system").await;
            let c = support::start_controller("controller", &ctx.ns, &[]).await;
            c.wait_leading(T).await;
            c
        })
        .await;
    let ctx = support::ctx(test).await;
    let dir = ctx.env.dir.join(&ctx.ns);
    let registry = Registry::start(&ctx.env.binaries.registry, &dir.join("registry")).await.expect("a registry");
    let link = CountingProxy::start(&registry.addr).await;
    Setup { ctx, registry, link, dir }
}

fn cpu() -> VariantMeta {
    VariantMeta { name: "int8-cpu".into(), providers: vec!["cpu".into()], ..Default::default() }
}

impl Setup {
    /// Pushes straight to the registry (not through the counted link).
    fn repo(&self) -> String {
        format!("{}/models/m", self.registry.addr)
    }

    async fn agent(&self) -> AgentProc {
        let node = format!("{}-n", self.ctx.ns);
        create_node(&self.ctx.client, &node, &[]).await;
        start_agent(&node, &self.dir.join("store"), &[])
    }

    /// Rolls `version` out to the agent's node through the counted link; returns the bytes it moved.
    async fn roll(&self, agent: &AgentProc, version: &str, delta: bool) -> u64 {
        let before = self.link.delivered();
        let api: Api<ModelRollout> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        let obj = json!({"apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout", "metadata": {"name": "m"},
            "spec": {"model": "m", "version": version, "delta": {"enabled": delta},
                     "source": {"repository": format!("{}/models/m", self.link.addr), "insecure": true},
                     "scope": {"nodes": [agent.node]}}});
        api.patch("m", &PatchParams::apply("peat-test").force(), &Patch::Apply(&obj)).await.expect("applying");
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Ok(r) = api.get("m").await
                && let Some(s) = &r.status
                && s.phase == RolloutPhase::Converged
                && s.resolved_version.as_deref() == Some(version)
                && s.observed_generation == r.metadata.generation
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{version} did not converge\n{}", agent.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.link.delivered() - before
    }

    async fn status(&self, agent: &AgentProc) -> peat::api::ModelDeploymentStatus {
        let api: Api<ModelDeployment> = Api::namespaced(self.ctx.client.clone(), &self.ctx.ns);
        api.get(&ModelDeployment::name_for("m", &agent.node)).await.unwrap().status.unwrap()
    }
}

/// `len` bytes changed in `regions` equal regions spread evenly over `data`.
fn scatter_changes(data: &[u8], regions: usize, len: usize, seed: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    let stride = data.len() / regions;
    for r in 0..regions {
        let at = r * stride + stride / 3;
        out[at..at + len].copy_from_slice(&pseudo_random(seed + r as u64, len));
    }
    out
}

/// Pushes `files` as variant int8-cpu of `version` with the `peat push` CLI, with patches against
/// the versions in `delta_from` (comma-separated, may be empty).
fn push_cli(s: &Setup, version: &str, files: &[(&str, Vec<u8>)], delta_from: &str) {
    let dir = s.dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    for (title, bytes) in files {
        std::fs::write(dir.join(title), bytes).unwrap();
    }
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_peat"));
    cmd.arg("push").arg(&dir).args(["--repository", &s.repo(), "--version", version]);
    cmd.args(["--variant", "int8-cpu", "--providers", "cpu", "--insecure"]);
    if !delta_from.is_empty() {
        cmd.args(["--delta-from", delta_from]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "peat push {version}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Flips the byte at 1 MiB of the held 1.0.0 `weights.bin` (the blob and the version file are one inode).
fn damage_held_copy(store: &Path) {
    let path = store.join("models/m/1.0.0/weights.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[MI] ^= 0xff;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, &bytes).unwrap();
}

/// Files in the store's `blobs/`.
fn blob_count(store: &Path) -> usize {
    std::fs::read_dir(store.join("blobs/sha256")).unwrap().count()
}

fn index_len(data: &[u8]) -> u64 {
    serde_json::to_vec(&index_bytes(data, DEFAULT_PARAMS)).unwrap().len() as u64
}

fn assert_current(store: &Path, files: &[(&str, Vec<u8>)]) {
    let current = store.join("models/m/current");
    for (title, bytes) in files {
        assert!(std::fs::read(current.join(title)).unwrap() == *bytes, "{title} differs from what was pushed");
    }
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum()
    }
    assert_eq!(count(&current), files.len(), "exactly the version's files");
}

#[tokio::test]
async fn scattered_changes_fetch_only_the_changed_chunks() {
    let s = setup("delta-scattered").await;
    let v1 = pseudo_random(1, 64 * MI);
    // 10% of the bytes, in 8 regions of 800 KiB spread over the file (a fine-tune touching tensors).
    let region = 64 * MI / 80;
    let v2 = scatter_changes(&v1, 8, region, 100);
    let changed = (8 * region) as f64;
    push_files(&s.repo(), "1.0.0", cpu(), &[("weights.bin", v1.clone())]).await;
    push_files(&s.repo(), "2.0.0", cpu(), &[("weights.bin", v2.clone())]).await;
    let agent = s.agent().await;
    let full = s.roll(&agent, "1.0.0", true).await;
    assert!(full >= v1.len() as u64, "the first pull is whole");
    let wire = s.roll(&agent, "2.0.0", true).await;
    let bound = 1.15 * changed + index_len(&v2) as f64;
    println!("delta: {wire} bytes on the wire for {changed} changed bytes (bound {bound:.0})");
    assert!(wire as f64 <= bound, "{wire} bytes on the wire > 1.15 × {changed} changed + the index");
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    let st = s.status(&agent).await;
    assert!(st.bytes_reused as f64 >= 0.85 * v2.len() as f64, "reused {} of {}", st.bytes_reused, v2.len());
    assert!(st.bytes_done as u64 <= wire && (st.bytes_done + st.bytes_reused) as u64 >= v2.len() as u64, "{st:?}");
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    let r = api.get("m").await.unwrap().status.unwrap();
    assert!(r.bytes_reused >= st.bytes_reused, "the rollout aggregates bytesReused: {}", r.bytes_reused);
}

#[tokio::test]
async fn insertions_appends_renames_and_removals() {
    let s = setup("delta-shapes").await;
    let a1 = pseudo_random(11, 16 * MI);
    let b1 = pseudo_random(12, 8 * MI);
    let c = pseudo_random(13, 4 * MI);
    let d = pseudo_random(14, 2 * MI);
    // a: three 1 KiB insertions shift everything after them; b: 1 MiB appended; c: renamed; d: removed.
    let mut a2 = a1.clone();
    for at in [12 * MI, 8 * MI, 3 * MI] {
        a2.splice(at..at, pseudo_random(at as u64, 1024));
    }
    let mut b2 = b1.clone();
    b2.extend(pseudo_random(15, MI));
    let v1 = vec![("a.bin", a1), ("b.bin", b1), ("c.bin", c.clone()), ("d.bin", d)];
    let v2 = vec![("a.bin", a2.clone()), ("b.bin", b2.clone()), ("renamed/c.bin", c)];
    push_files(&s.repo(), "1.0.0", cpu(), &v1).await;
    push_files(&s.repo(), "2.0.0", cpu(), &v2).await;
    let agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    let wire = s.roll(&agent, "2.0.0", true).await;
    assert_current(&agent.store, &v2);
    // Changed: 3 KiB inserted + 1 MiB appended; each of the 4 edits costs at most the chunks around it.
    let changed = 3 * 1024 + MI as u64;
    let bound = changed + 4 * 2 * u64::from(MAX_CHUNK) + index_len(&a2) + index_len(&b2);
    println!("shapes: {wire} bytes on the wire for {changed} changed bytes (bound {bound})");
    assert!(wire <= bound, "{wire} > {bound}");
}

#[tokio::test]
async fn a_corrupted_local_chunk_falls_back_to_a_full_pull() {
    let s = setup("delta-corrupt").await;
    let v1 = pseudo_random(21, 16 * MI);
    let v2 = scatter_changes(&v1, 4, MI / 2, 200);
    push_files(&s.repo(), "1.0.0", cpu(), &[("weights.bin", v1.clone())]).await;
    push_files(&s.repo(), "2.0.0", cpu(), &[("weights.bin", v2.clone())]).await;
    let agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    // Damage the local copy of 1.0.0 in a region 2.0.0 reuses (the blob and the version file are one inode).
    damage_held_copy(&agent.store);
    let wire = s.roll(&agent, "2.0.0", true).await;
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    assert!(wire >= v2.len() as u64, "fell back to a full pull: {wire} bytes");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("delta transfer failed; pulling the layer whole"), "the fallback is logged");
}

#[tokio::test]
async fn an_artifact_without_chunk_indexes_is_pulled_whole() {
    let s = setup("delta-oras").await;
    let v1 = pseudo_random(31, 8 * MI);
    let v2 = scatter_changes(&v1, 4, MI / 5, 300);
    let src = s.dir.join("oras");
    std::fs::create_dir_all(&src).unwrap();
    for (version, data) in [("1.0.0", &v1), ("2.0.0", &v2)] {
        std::fs::write(src.join("weights.bin"), data).unwrap();
        let out = std::process::Command::new(&s.ctx.env.binaries.oras)
            .current_dir(&src)
            .args(["push", "--plain-http", &format!("{}:{version}", s.repo()), "weights.bin"])
            .output()
            .unwrap();
        assert!(out.status.success(), "oras push: {}", String::from_utf8_lossy(&out.stderr));
    }
    let agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    let wire = s.roll(&agent, "2.0.0", true).await;
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    assert!(wire >= v2.len() as u64, "no index, so a whole pull: {wire}");
}

#[tokio::test]
async fn delta_disabled_pulls_whole() {
    let s = setup("delta-off").await;
    let v1 = pseudo_random(41, 8 * MI);
    let v2 = scatter_changes(&v1, 4, MI / 5, 400);
    push_files(&s.repo(), "1.0.0", cpu(), &[("weights.bin", v1.clone())]).await;
    push_files(&s.repo(), "2.0.0", cpu(), &[("weights.bin", v2.clone())]).await;
    let agent = s.agent().await;
    s.roll(&agent, "1.0.0", false).await;
    let wire = s.roll(&agent, "2.0.0", false).await;
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    assert!(wire >= v2.len() as u64, "spec.delta.enabled: false pulls whole: {wire}");
    assert_eq!(s.status(&agent).await.bytes_reused, 0);
}

#[tokio::test]
async fn a_delta_rebuild_resumes_after_the_agent_is_killed() {
    let s = setup("delta-resume").await;
    let v1 = pseudo_random(51, 64 * MI);
    let region = 64 * MI / 80;
    let v2 = scatter_changes(&v1, 8, region, 500);
    let changed = (8 * region) as f64;
    push_files(&s.repo(), "1.0.0", cpu(), &[("weights.bin", v1.clone())]).await;
    push_files(&s.repo(), "2.0.0", cpu(), &[("weights.bin", v2.clone())]).await;
    let mut agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    // 2 MiB/s: the 6.4 MiB of changes take about 3 s; kill the agent three quarters through the rebuild.
    s.link.set_rate(2 * MI as u64);
    let before = s.link.delivered();
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    api.patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"version": "2.0.0"}}))).await.unwrap();
    support::partial_over(&agent.store, (48 * MI) as u64, "the rebuild three quarters done").await;
    agent.kill();
    s.link.set_rate(0);
    agent.restart();
    s.roll(&agent, "2.0.0", true).await;
    let total = s.link.delivered() - before;
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    // Without a resume, the ~5 MB fetched before the kill would be fetched again. Allowed: the index
    // twice, and a megabyte in flight (socket and writer buffers) lost to the SIGKILL.
    let bound = 1.15 * changed + 2.0 * index_len(&v2) as f64 + MI as f64;
    println!("resumed delta: {total} bytes on the wire for {changed} changed (bound {bound:.0})");
    assert!(total as f64 <= bound, "{total} bytes: the rebuild did not resume");
}

#[tokio::test]
async fn small_scattered_edits_cost_about_their_bytes_by_patch() {
    let s = setup("delta-patch").await;
    let size = 32 * MI;
    let v1 = pseudo_random(61, size);
    // 10% of the bytes in 4 KiB runs (819 of them: chunks would fetch ~8× that), then, for 3.0.0,
    // 10% in 64 KiB runs (51: ~1.8× by chunks).
    let (small, large) = (4 << 10, 64 << 10);
    let v2 = scatter_changes(&v1, size / 10 / small, small, 600);
    let v3 = scatter_changes(&v2, size / 10 / large, large, 100_000); // seeds unlike v2's: new bytes
    push_cli(&s, "1.0.0", &[("weights.bin", v1.clone())], "");
    push_cli(&s, "2.0.0", &[("weights.bin", v2.clone())], "1.0.0");
    push_cli(&s, "3.0.0", &[("weights.bin", v3.clone())], "2.0.0,1.0.0");
    let agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    for (version, data, run) in [("2.0.0", &v2, small), ("3.0.0", &v3, large)] {
        let changed = (size / 10 / run * run) as f64;
        let wire = s.roll(&agent, version, true).await;
        println!("{run}-byte edits: {wire} bytes on the wire for {changed} changed ({:.3})", wire as f64 / changed);
        assert!(wire as f64 <= 1.15 * changed, "{run}-byte edits: {wire} bytes on the wire > 1.15 × {changed}");
        assert_current(&agent.store, &[("weights.bin", data.clone())]);
        let st = s.status(&agent).await;
        assert!(
            st.bytes_done as u64 <= wire && (st.bytes_done + st.bytes_reused) as u64 >= data.len() as u64,
            "{st:?}"
        );
    }
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert_eq!(log.matches("rebuilding the layer from a patch").count(), 2, "both upgrades came by patch");
    // One blob per version held, no patch left behind.
    assert_eq!(blob_count(&agent.store), 3, "the patches were removed once applied");
}

#[tokio::test]
async fn a_patch_against_a_damaged_file_falls_back_to_a_whole_pull() {
    let s = setup("delta-patch-damaged").await;
    let v1 = pseudo_random(71, 8 * MI);
    let v2 = scatter_changes(&v1, 40, 4 << 10, 800);
    push_cli(&s, "1.0.0", &[("weights.bin", v1.clone())], "");
    push_cli(&s, "2.0.0", &[("weights.bin", v2.clone())], "1.0.0");
    let agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    // Damage the held copy of 1.0.0 (blob and version file are one inode): the patch rebuilds other bytes.
    damage_held_copy(&agent.store);
    let wire = s.roll(&agent, "2.0.0", true).await;
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    assert!(wire >= v2.len() as u64, "fell back to a whole pull: {wire} bytes");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("patch unusable; pulling the layer whole"), "the fallback is logged");
    assert_eq!(blob_count(&agent.store), 2, "the unusable patch was removed");
}

#[tokio::test]
async fn a_patch_download_resumes_after_the_agent_is_killed() {
    let s = setup("delta-patch-resume").await;
    let v1 = pseudo_random(81, 64 * MI);
    let region = 64 * MI / 80;
    let v2 = scatter_changes(&v1, 8, region, 900);
    let changed = (8 * region) as f64;
    push_cli(&s, "1.0.0", &[("weights.bin", v1.clone())], "");
    push_cli(&s, "2.0.0", &[("weights.bin", v2.clone())], "1.0.0");
    let mut agent = s.agent().await;
    s.roll(&agent, "1.0.0", true).await;
    // 2 MiB/s: the 6.4 MiB patch takes about 3 s; kill the agent three quarters through it.
    s.link.set_rate(2 * MI as u64);
    let before = s.link.delivered();
    let api: Api<ModelRollout> = Api::namespaced(s.ctx.client.clone(), &s.ctx.ns);
    api.patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"version": "2.0.0"}}))).await.unwrap();
    let three_quarters = (0.75 * changed) as u64;
    support::eventually("three quarters of the patch delivered", T, || async {
        (s.link.delivered() - before > three_quarters).then_some(())
    })
    .await;
    agent.kill();
    s.link.set_rate(0);
    agent.restart();
    s.roll(&agent, "2.0.0", true).await;
    let total = s.link.delivered() - before;
    assert_current(&agent.store, &[("weights.bin", v2.clone())]);
    // Without a resume, the ~4.8 MB fetched before the kill would be fetched again. Allowed: a
    // megabyte in flight (socket and channel buffers) lost to the SIGKILL.
    let bound = 1.15 * changed + MI as f64;
    println!("resumed patch: {total} bytes on the wire for {changed} changed (bound {bound:.0})");
    assert!(total as f64 <= bound, "{total} bytes: the patch download did not resume");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("rebuilding the layer from a patch"), "the restarted agent used the patch");
}
