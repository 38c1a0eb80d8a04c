//! `make demo` runs to its summary: the same command, so the demo cannot quietly rot. And Ctrl-C
//! in the middle of it stops everything it started.
//!
//! Each run starts its own environment under `target/testenv/`, where `make test`'s orphan check
//! looks, pushes, rolls out to three agents, upgrades by delta, rolls back, and tears down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Starts `peat-testenv demo` in `target/testenv/demo-<name>-<pid>`, stdout and stderr to a file.
fn start_demo(name: &str) -> (Child, PathBuf, PathBuf) {
    let dir = peat_testenv::harness::repo_root().join(format!("target/testenv/demo-{name}-{}", std::process::id()));
    let out = dir.with_extension("out");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&out).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_peat-testenv"))
        .args(["demo", "--demo-dir", &dir.display().to_string()])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("starting peat-testenv demo");
    (child, dir, out)
}

fn wait_exit(child: &mut Child, limit: Duration, out: &Path) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo ran past {limit:?}; its output is in {}", out.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the demo left in its directory: only the logs and its marker.
fn assert_torn_down(dir: &Path) {
    let mut left: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [".peat-demo", "logs"], "the demo left more than its logs in {}", dir.display());
    // No process of it runs on: each has the directory in its command line (store, data dir,
    // config) or its environment (KUBECONFIG of the controller and the kubectl commands).
    let needle = dir.display().to_string();
    let alive: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| {
            let read =
                |f: &str| std::fs::read(e.path().join(f)).map(|c| String::from_utf8_lossy(&c).replace('\0', " "));
            let (cmdline, environ) = (read("cmdline").ok()?, read("environ").unwrap_or_default());
            (cmdline.contains(&needle) || environ.contains(&needle)).then_some(cmdline)
        })
        .collect();
    assert!(alive.is_empty(), "processes of the demo outlived it: {alive:#?}");
    // Each agent and the controller were stopped by SIGTERM (not killed with the demo).
    for log in ["controller.log", "agent-edge-orin-1.log", "agent-edge-xavier-2.log", "agent-edge-nano-3.log"] {
        let text = std::fs::read_to_string(dir.join("logs").join(log)).unwrap_or_default();
        assert!(text.contains("shutting down"), "{log} shows no orderly shutdown:\n{text}");
    }
    // The environment's own logs are kept too.
    assert!(dir.join("logs/env").read_dir().is_ok_and(|mut d| d.next().is_some()), "no logs/env in {}", dir.display());
}

#[test]
fn the_demo_runs_to_its_summary_with_every_node_converged() {
    let (mut child, dir, out) = start_demo("full");
    // The demo bounds each stage itself; this only catches a hang outside them.
    let status = wait_exit(&mut child, Duration::from_secs(600), &out);
    let stdout = std::fs::read_to_string(&out).unwrap();
    let summary = stdout.rsplit_once("==> 7/7 summary").map(|(_, s)| s).unwrap_or("");
    assert!(status.success(), "the demo failed ({status}):\n{stdout}");
    assert!(summary.contains("Every node converged"), "{stdout}");

    let rows: Vec<Vec<&str>> = summary.lines().map(|l| l.split_whitespace().collect()).collect();
    // Variant selection: the 4 GiB GPU is below fp16-cuda's 6 GiB, so that node gets int8-cpu.
    let installs: Vec<(&str, &str)> =
        rows.iter().filter(|r| r.get(1) == Some(&"install")).map(|r| (r[0], r[2])).collect();
    assert_eq!(
        installs,
        [("edge-orin-1", "fp16-cuda"), ("edge-xavier-2", "fp16-cuda"), ("edge-nano-3", "int8-cpu")],
        "{summary}"
    );
    // The upgrade moved only the changed chunks: under 15% of its bytes (3 MiB of each 24–48 MiB).
    let share: f64 = summary
        .split_once("already on the nodes: ")
        .and_then(|(_, rest)| rest.split_once('%'))
        .and_then(|(pct, _)| pct.parse().ok())
        .unwrap_or_else(|| panic!("no upgrade share in the summary:\n{summary}"));
    assert!(share > 0.0 && share < 15.0, "{share}% of the upgrade crossed the network:\n{summary}");
    // The rollback fetched nothing on any node.
    let rollbacks: Vec<&Vec<&str>> = rows.iter().filter(|r| r.first() == Some(&"rollback")).collect();
    assert_eq!(rollbacks.len(), 3, "{summary}");
    for r in rollbacks {
        assert_eq!(&r[3..5], ["0", "B"], "rollback moved bytes: {r:?}");
    }
    assert_torn_down(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn ctrl_c_in_the_middle_stops_everything_the_demo_started() {
    let (mut child, dir, out) = start_demo("interrupted");
    // Once the agents and the controller run (step 4 begins), everything is up.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&out).unwrap().contains("==> 4/7") {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the demo ended ({s}) before step 4:\n{}", std::fs::read_to_string(&out).unwrap());
        }
        assert!(Instant::now() < deadline, "no step 4 within 300 s:\n{}", std::fs::read_to_string(&out).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut child, Duration::from_secs(60), &out);
    let output = std::fs::read_to_string(&out).unwrap();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(output.contains("torn down"), "{output}");
    assert_torn_down(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn a_directory_the_demo_did_not_make_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_peat-testenv"))
        .args(["demo", "--demo-dir", &dir.path().display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a demo work directory"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(), "keep me");
}
