//! `peat push` against the real registry: a directory becomes a variant (titled layers, index
//! annotations), variants accumulate in the version's index, a re-push replaces its variant, the
//! result is an ORAS artifact, files are streamed (bounded memory), bad input is refused clearly.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use peat::oci::RegistryAccess;

fn peat_push(dir: &Path, repo: &str, version: &str, extra: &[&str]) -> (bool, String, String, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peat"))
        .arg("push")
        .arg(dir)
        .args(["--repository", repo, "--version", version, "--insecure"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running peat push");
    // Peak RSS from /proc (VmHWM, monotonic) while it runs: wait4's ru_maxrss would also count
    // the test process's own peak, inherited through the exec.
    let pid = child.id();
    let watcher = std::thread::spawn(move || {
        let mut peak = 0u64;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            {
                peak = peak.max(kb * 1024);
            }
            if status.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak
    });
    let stdout = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    let peak = watcher.join().unwrap();
    let ok = child.wait().unwrap().success();
    (ok, stdout, stderr, peak)
}

#[tokio::test]
async fn push_builds_an_index_of_variants_that_oras_can_pull() {
    let ctx = support::ctx("push").await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    let dir = ctx.env.dir.join(format!("{}-src", ctx.ns));
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    // 192 MiB: pushed with bounded memory (checked below), never read whole.
    let big_len = 192u64 << 20;
    std::fs::write(dir.join("model.onnx"), support::pseudo_random(1, big_len as usize)).unwrap();
    std::fs::write(dir.join("tokenizer/vocab.txt"), b"a b c").unwrap();

    let (ok, stdout, stderr, rss) = peat_push(
        &dir,
        &repo,
        "1.0.0",
        &[
            "--variant",
            "fp16-cuda",
            "--precision",
            "float16",
            "--providers",
            "cuda,tensorrt",
            "--min-gpu-memory",
            "4Gi",
            "--platform",
            "linux/arm64",
        ],
    );
    assert!(ok, "peat push failed: {stderr}");
    assert!(rss < 96 << 20, "peat push of a 192 MiB file peaked at {} MiB of memory", rss >> 20);
    let artifact = stdout.trim().to_string();
    assert!(artifact.starts_with(&format!("{repo}@sha256:")), "prints the variant by digest: {artifact}");

    std::fs::write(dir.join("model.onnx"), b"small cpu weights").unwrap();
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "1.0.0", &["--variant", "int8-cpu", "--providers", "cpu"]);
    assert!(ok, "{stderr}");
    // Pushing the same variant again replaces it: still two variants.
    std::fs::write(dir.join("model.onnx"), b"better cpu weights").unwrap();
    let (ok, stdout2, stderr, _) = peat_push(&dir, &repo, "1.0.0", &["--variant", "int8-cpu", "--providers", "cpu"]);
    assert!(ok, "{stderr}");

    let access = RegistryAccess { insecure: true, ..Default::default() };
    let resolved = peat::oci::resolve(&access.client(), &access.auth, &format!("{repo}:1.0.0")).await.unwrap();
    assert_eq!(resolved.variants.len(), 2, "{:?}", resolved.variants);
    let cuda = resolved.variants.iter().find(|v| v.name == "fp16-cuda").unwrap();
    assert_eq!(cuda.precision.as_deref(), Some("float16"));
    assert_eq!(cuda.providers, vec!["cuda", "tensorrt"]);
    assert_eq!(cuda.min_gpu_memory, 4 << 30);
    assert_eq!(cuda.arch.as_deref(), Some("arm64"));
    assert_eq!(cuda.size, big_len + 5);
    let cpu = resolved.variants.iter().find(|v| v.name == "int8-cpu").unwrap();
    assert_eq!(format!("{repo}@{}", cpu.digest), stdout2.trim(), "the re-pushed variant replaced the first");

    // ORAS reads it: the files come out under their titles.
    let out = ctx.env.dir.join(format!("{}-oras", ctx.ns));
    std::fs::create_dir_all(&out).unwrap();
    let o = Command::new(&ctx.env.binaries.oras)
        .current_dir(&out)
        .args(["pull", "--plain-http", stdout2.trim(), "-o", "."])
        .output()
        .unwrap();
    assert!(o.status.success(), "oras pull: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(out.join("model.onnx")).unwrap(), b"better cpu weights");
    assert_eq!(std::fs::read(out.join("tokenizer/vocab.txt")).unwrap(), b"a b c");
}

#[tokio::test]
async fn push_refuses_what_it_cannot_publish_faithfully() {
    let ctx = support::ctx("push-bad").await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    let dir = ctx.env.dir.join(format!("{}-src", ctx.ns));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), b"w").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "1.0.0", &["--variant", "x"]);
    assert!(!ok && stderr.contains("symbolic link"), "{stderr}");

    let (ok, _, stderr, _) = peat_push(&dir.join("missing"), &repo, "1.0.0", &["--variant", "x"]);
    assert!(!ok && stderr.contains("missing"), "{stderr}");

    let empty = ctx.env.dir.join(format!("{}-empty", ctx.ns));
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, stderr, _) = peat_push(&empty, &repo, "1.0.0", &["--variant", "x"]);
    assert!(!ok && stderr.contains("holds no files"), "{stderr}");

    std::fs::remove_file(dir.join("link")).unwrap();
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "1.0.0", &["--variant", "x", "--platform", "arm64"]);
    assert!(!ok && stderr.contains("os/arch"), "{stderr}");
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "1.0.0", &["--variant", "x", "--min-gpu-memory", "lots"]);
    assert!(!ok && stderr.contains("lots"), "{stderr}");
    let (ok, _, stderr, _) = peat_push(&dir, "127.0.0.1:1/models/x", "1.0.0", &["--variant", "x"]);
    assert!(!ok && stderr.contains("127.0.0.1:1"), "a dead registry is named: {stderr}");

    // Patches against versions that are not there, or lack the variant, or are the version itself.
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "1.0.0", &["--variant", "x"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "2.0.0", &["--variant", "x", "--delta-from", "0.9.0"]);
    assert!(!ok && stderr.contains("--delta-from 0.9.0: is not in the registry"), "{stderr}");
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "2.0.0", &["--variant", "y", "--delta-from", "1.0.0"]);
    assert!(!ok && stderr.contains(r#"--delta-from 1.0.0: has no variant "y""#), "{stderr}");
    let (ok, _, stderr, _) = peat_push(&dir, &repo, "2.0.0", &["--variant", "x", "--delta-from", "2.0.0"]);
    assert!(!ok && stderr.contains("the version being pushed"), "{stderr}");
    let access = RegistryAccess { insecure: true, ..Default::default() };
    let resolved = peat::oci::resolve(&access.client(), &access.auth, &format!("{repo}:2.0.0")).await;
    assert!(resolved.is_err(), "a refused push writes no index: {resolved:?}");
}

#[tokio::test]
async fn variants_pushed_at_the_same_moment_all_stay_in_the_index() {
    // A CI matrix: one job per variant, all pushing to one version at once. Each push rewrites the
    // index (no compare-and-swap in the registry API), so without a check afterwards some are lost.
    let ctx = support::ctx("push-concurrent").await;
    let repo = format!("{}/models/{}", ctx.env.registry, ctx.ns);
    let names = ["fp16-cuda", "int8-cpu", "fp32-cpu", "int4-npu", "bf16-rocm", "fp8-cuda"];
    let children: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let dir = ctx.env.dir.join(format!("{}-{name}", ctx.ns));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("model.onnx"), support::pseudo_random(i as u64 + 10, 64 << 10)).unwrap();
            Command::new(env!("CARGO_BIN_EXE_peat"))
                .arg("push")
                .arg(&dir)
                .args(["--repository", &repo, "--version", "1.0.0", "--insecure", "--variant", name])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running peat push")
        })
        .collect();
    // Meanwhile a reader, as a controller resolving the version would: the registry rewrites the
    // tag in place, and a read in that moment is answered 500, which must not reach the reader.
    let access = RegistryAccess { insecure: true, ..Default::default() };
    let pushing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = tokio::spawn({
        let (client, auth, reference, pushing) =
            (access.client(), access.auth.clone(), format!("{repo}:1.0.0"), pushing.clone());
        async move {
            let (mut reads, mut failures) = (0u32, Vec::new());
            while pushing.load(std::sync::atomic::Ordering::Relaxed) {
                reads += 1;
                match peat::oci::resolve(&client, &auth, &reference).await {
                    Ok(_) | Err(peat::oci::OciError::NotFound(_)) => {}
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (reads, failures)
        }
    });
    for child in children {
        let out = tokio::task::spawn_blocking(|| child.wait_with_output()).await.unwrap().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    pushing.store(false, std::sync::atomic::Ordering::Relaxed);
    let (reads, failures) = reader.await.unwrap();
    assert!(failures.is_empty(), "{} of {reads} reads during the pushes failed: {failures:?}", failures.len());
    let resolved = peat::oci::resolve(&access.client(), &access.auth, &format!("{repo}:1.0.0")).await.unwrap();
    let mut listed: Vec<&str> = resolved.variants.iter().map(|v| v.name.as_str()).collect();
    listed.sort();
    let mut want = names.to_vec();
    want.sort();
    assert_eq!(listed, want, "variants lost to concurrent pushes");
}
