//! The store on a temporary directory.

use super::*;

fn put_blob(store: &Store, data: &[u8]) -> String {
    let digest = crate::oci::digest::sha256_digest(data);
    let partial = store.partial_path(&digest).unwrap();
    std::fs::write(&partial, data).unwrap();
    store.commit_blob(&digest, &partial).unwrap();
    digest
}

fn record(version: &str, files: &[(&str, &str, u64)]) -> VersionRecord {
    VersionRecord {
        version: version.into(),
        digest: format!("sha256:{}", "0".repeat(64)),
        files: files
            .iter()
            .map(|(t, d, s)| FileRecord { title: t.to_string(), digest: d.to_string(), size: *s, archive: None })
            .collect(),
        activated_at: 0,
    }
}

#[test]
fn titles_that_escape_are_refused() {
    for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\\b", "a\0b"] {
        assert!(validate_title(bad).is_err(), "{bad:?} should be refused");
    }
    assert_eq!(validate_title("a/b.onnx").unwrap(), PathBuf::from("a/b.onnx"));
    assert_eq!(validate_title("./model.onnx").unwrap(), PathBuf::from("model.onnx"));
    assert!(digest_hex("sha256:../../x").is_err());
    assert!(!is_safe_component("../x") && !is_safe_component(".hidden") && is_safe_component("4.2.1-rc.1"));
    assert!(!is_safe_component("current"), "would collide with the symlink");
}

#[test]
fn eviction_takes_the_least_recently_active_kept_versions_that_make_room_and_never_the_active() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a1, a2, shared, b1) =
        (put_blob(&store, b"a one"), put_blob(&store, b"a two"), put_blob(&store, b"cfg"), put_blob(&store, b"b1"));
    for (v, d) in [("1", &a1), ("2", &a2)] {
        store.materialize("a", &record(v, &[("w", d, 100), ("c", &shared, 50)])).unwrap();
        store.activate("a", v).unwrap();
    }
    store.materialize("b", &record("1", &[("w", &b1, 30)])).unwrap();
    store.activate("b", "1").unwrap();
    store.materialize("b", &record("0", &[("w", &shared, 50)])).unwrap(); // never active: first to go
    // Only the kept a 1 frees its own blob; the shared one is still used by a 2.
    assert_eq!(store.reclaimable(&Versions::new()), 100);
    assert!(
        store.evict_for(500, 10, &HashSet::new(), &Versions::new()).unwrap().is_empty(),
        "cannot make room: nothing goes"
    );
    assert!(
        store.evict_for(100, 10, &HashSet::from([a1.clone()]), &Versions::new()).unwrap().is_empty(),
        "a protected blob stays"
    );
    let rollback = Versions::from([("a".to_string(), "1".to_string())]);
    let kept = store.evict_for(100, 10, &HashSet::new(), &rollback).unwrap();
    assert!(kept.is_empty(), "a version a deployment asks for stays: {kept:?}");
    assert_eq!(store.reclaimable(&rollback), 0);
    assert_eq!(store.evict_for(100, 10, &HashSet::new(), &Versions::new()).unwrap(), ["b 0", "a 1"]);
    assert!(!store.has_blob(&a1, 5) && store.has_blob(&shared, 3) && store.has_blob(&a2, 5));
    assert_eq!((store.current("a").as_deref(), store.current("b").as_deref()), (Some("2"), Some("1")));
    assert!(!store.version_dir("a", "1").exists() && store.state("a").get("1").is_none());
    assert_eq!(store.reclaimable(&Versions::new()), 0, "only active versions left");
}

#[test]
fn materialize_activate_prune_and_collect() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = put_blob(&store, b"weights v1");
    let b = put_blob(&store, b"weights v2");
    let cfg = put_blob(&store, b"{}");
    for (v, d) in [("1.0.0", &a), ("2.0.0", &b), ("3.0.0", &a)] {
        store.materialize("m", &record(v, &[("model.onnx", d, 10), ("cfg/config.json", &cfg, 2)])).unwrap();
        store.activate("m", v).unwrap();
        assert_eq!(store.current("m").as_deref(), Some(v));
        let read = std::fs::read(dir.path().join("models/m/current/model.onnx")).unwrap();
        assert_eq!(read, std::fs::read(store.blob_path(d).unwrap()).unwrap());
    }
    // Keep one besides the active: 2.0.0 (more recent) stays, 1.0.0 goes.
    assert_eq!(store.prune("m", 1).unwrap(), vec!["1.0.0".to_string()]);
    assert!(!store.version_dir("m", "1.0.0").exists() && store.version_dir("m", "2.0.0").exists());
    let orphan = put_blob(&store, b"nobody wants me");
    std::fs::write(store.partial_path(&orphan).unwrap(), b"part").unwrap();
    let freed = store.collect_garbage(&HashSet::new(), true).unwrap();
    assert_eq!(freed, 15 + 4);
    assert!(store.has_blob(&a, 10) && store.has_blob(&b, 10) && !store.has_blob(&orphan, 15));
    store.remove_model("m").unwrap();
    assert!(store.models().is_empty());
    store.collect_garbage(&HashSet::new(), true).unwrap();
    assert!(!store.has_blob(&a, 10));
}

#[test]
fn same_version_other_bytes_is_replaced_while_current_stays_valid() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = put_blob(&store, b"aaaa");
    let b = put_blob(&store, b"bbbb");
    store.materialize("m", &record("1.0.0", &[("w", &a, 4)])).unwrap();
    store.activate("m", "1.0.0").unwrap();
    store.materialize("m", &record("1.0.0", &[("w", &b, 4)])).unwrap();
    assert_eq!(store.current("m").as_deref(), Some("1.0.0"));
    assert_eq!(std::fs::read(dir.path().join("models/m/current/w")).unwrap(), b"bbbb");
    assert_eq!(store.state("m").versions.len(), 1);
}

#[test]
fn reopening_removes_what_an_interrupted_activation_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = put_blob(&store, b"aaaa");
    store.materialize("m", &record("1.0.0", &[("w", &a, 4)])).unwrap();
    store.activate("m", "1.0.0").unwrap();
    for leftover in [".staging-2.0.0", ".trash-1.0.0", "3.0.0"] {
        std::fs::create_dir_all(dir.path().join("models/m").join(leftover).join("x")).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path().join("models/m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, vec![".peat-state.json", "1.0.0", "current"]);
    assert_eq!(store.current("m").as_deref(), Some("1.0.0"));
}
