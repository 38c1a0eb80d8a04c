//! `make demo` runs to its summary: the same command, so the demo cannot quietly rot.
//!
//! It starts its own environment (under `target/testenv/`, where `make test`'s orphan check looks),
//! pushes, rolls out to three agents, upgrades by delta, rolls back, and tears everything down.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_runs_to_its_summary_with_every_node_converged() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/testenv/demo-{}", std::process::id()));
    let out = dir.with_extension("out");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&out).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_peat-testenv"))
        .args(["demo", "--demo-dir", &dir.display().to_string()])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("starting peat-testenv demo");
    // The demo bounds each stage itself; this only catches a hang outside them.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo ran past 10 minutes; its output is in {}", out.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = std::fs::read_to_string(&out).unwrap();
    let summary = stdout.rsplit_once("==> 7/7 summary").map(|(_, s)| s).unwrap_or("");
    assert!(status.success(), "the demo failed ({status}):\n{stdout}");
    assert!(summary.contains("Every node converged"), "{stdout}");

    // The upgrade moved only the changed chunks: under 15% of its bytes (3 MiB of each 24–48 MiB).
    let share: f64 = summary
        .split_once("already on the nodes: ")
        .and_then(|(_, rest)| rest.split_once('%'))
        .and_then(|(pct, _)| pct.parse().ok())
        .unwrap_or_else(|| panic!("no upgrade share in the summary:\n{summary}"));
    assert!(share > 0.0 && share < 15.0, "{share}% of the upgrade crossed the network:\n{summary}");
    // The rollback fetched nothing on any node; each node has an install, an upgrade and a rollback row.
    let rollbacks: Vec<&str> = summary.lines().filter(|l| l.contains(" rollback ")).collect();
    assert_eq!(rollbacks.len(), 3, "{summary}");
    for row in rollbacks {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[3..5], ["0", "B"], "rollback moved bytes: {row}");
    }
    // Torn down: only the logs stay.
    let left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["logs"], "the demo left more than its logs in {}", dir.display());
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&out).unwrap();
}
