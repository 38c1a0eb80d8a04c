//! One real environment per test binary, started on first use; a namespace per test; waiting.
//!
//! The processes die with the test binary (PR_SET_PDEATHSIG), also when a test panics or the run
//! is killed; an `atexit` hook removes the state directory, and a later run removes what a killed
//! run left.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::{Binaries, Lifetime, Options, TestEnv};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testenv/ is inside the repository").to_path_buf()
}

/// The CSI driver's registrar (`registrar/`, Go), built once per test binary into target/registrar.
pub fn registrar_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            crate::image::build_registrar(&root, &root.join("target/registrar"), "amd64")
                .unwrap_or_else(|e| panic!("building the registrar: {e}"))
        })
        .clone()
}

/// The `peat` binary of this build: next to the running test or benchmark binary (Cargo builds
/// the package's binaries before its integration tests and benchmarks), or `$PEAT_BIN`.
pub fn peat_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PEAT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the running binary's path");
    let mut dir = exe.parent().expect("a binary lives in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps/ lives in a profile directory");
    }
    let peat = dir.join("peat");
    assert!(peat.exists(), "no peat binary at {} (build it: cargo build --bin peat)", peat.display());
    peat
}

/// Name of the running test binary without Cargo's hash (`controller-1a2b…` → `controller`).
fn test_binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_deref().and_then(Path::file_stem).map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
        _ => stem,
    }
}

fn state_root() -> PathBuf {
    repo_root().join("target/testenv")
}

static ENV: OnceLock<TestEnv> = OnceLock::new();
static CLEANUP: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_state_at_exit() {
    // Kill the children first so nothing writes into the directory while it goes.
    if let Some(env) = ENV.get() {
        for p in &env.processes {
            unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
        }
    }
    // PEAT_KEEP_TESTENV=1 keeps logs and state for a look after the run.
    if let Ok(guard) = CLEANUP.lock()
        && let Some(dir) = guard.as_ref()
        && std::env::var_os("PEAT_KEEP_TESTENV").is_none()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes state directories of earlier runs whose process is gone (a run killed before `atexit`).
fn remove_stale_state(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid: Option<u32> = name.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The environment of this test binary, started on first use.
pub fn env() -> &'static TestEnv {
    ENV.get_or_init(|| {
        // Started on a thread of its own: the caller is usually inside a test's tokio runtime.
        std::thread::spawn(|| {
            let root = state_root();
            remove_stale_state(&root);
            let dir = root.join(format!("{}-{}", std::process::id(), test_binary_name()));
            let binaries = Binaries::ensure(&repo_root()).unwrap_or_else(|e| panic!("{e}"));
            *CLEANUP.lock().unwrap() = Some(dir.clone());
            unsafe { libc::atexit(remove_state_at_exit) };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let opts = Options {
                dir,
                lifetime: Lifetime::TiedToThisProcess,
                controller_manager: true,
                install_crds: true,
                cluster: None,
            };
            rt.block_on(TestEnv::start(binaries, opts)).unwrap_or_else(|e| panic!("starting the test environment: {e}"))
        })
        .join()
        .expect("the test environment failed to start")
    })
}

/// What one test gets: a client and a namespace of its own.
pub struct Ctx {
    pub env: &'static TestEnv,
    pub client: Client,
    pub ns: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace named after the test.
pub async fn ctx(test: &str) -> Ctx {
    let env = env();
    let client = env.client().await.expect("client");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let slug: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let mut ns = format!("{}-{n}", slug.trim_matches('-'));
    ns.truncate(63);
    let ns = ns.trim_end_matches('-').to_string();
    let api: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
    api.create(&PostParams::default(), &obj).await.expect("creating the test namespace");
    Ctx { env, client, ns }
}

/// Waits for `cond` on an object, failing loudly after `timeout`.
pub async fn wait_for<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl kube::runtime::wait::Condition<K>,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    match tokio::time::timeout(timeout, kube::runtime::wait::await_condition(api, name, cond)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("watching {name} for {what}: {e}"),
        Err(_) => panic!("timed out after {timeout:?} waiting for {name}: {what}"),
    }
}

/// Runs kubectl (the one built for the environment) against it.
pub fn kubectl(args: &[&str]) -> std::process::Output {
    let env = env();
    std::process::Command::new(&env.binaries.kubectl)
        .env("KUBECONFIG", &env.kubeconfig)
        .args(args)
        .output()
        .expect("running kubectl")
}

/// Polls `f` until it returns Some, failing after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
