//! The real-environment harness: one etcd + kube-apiserver + kube-controller-manager + registry per
//! test binary, started on first use, and a fresh namespace per test.
//!
//! The processes die with the test binary (PR_SET_PDEATHSIG), also when a test panics or the run
//! is killed; an `atexit` hook removes the state directory, and a later run removes what a killed
//! run left.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};
use peat::testenv::{Binaries, Lifetime, Options, TestEnv};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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
    if let Ok(guard) = CLEANUP.lock()
        && let Some(dir) = guard.as_ref()
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
            let dir = root.join(format!("{}-{}", std::process::id(), env!("CARGO_CRATE_NAME")));
            let binaries = Binaries::ensure(&repo_root()).unwrap_or_else(|e| panic!("{e}"));
            *CLEANUP.lock().unwrap() = Some(dir.clone());
            unsafe { libc::atexit(remove_state_at_exit) };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let opts =
                Options { dir, lifetime: Lifetime::TiedToThisProcess, controller_manager: true, install_crds: true };
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
