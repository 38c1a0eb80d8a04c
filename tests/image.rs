//! `make image` without a container engine: the OCI image layout is well formed (every digest and
//! size checks out, the config's diff_id is the layer's), the same inputs give the same digest, and
//! the layer alone is a root filesystem peat runs in (chroot, as the image's non-root user).

mod support;

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap_or_else(|e| panic!("{digest}: {e}"));
    assert_eq!(format!("{:x}", Sha256::digest(&bytes)), hex, "blob {digest} holds other bytes");
    bytes
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn the_image_layout_is_well_formed_reproducible_and_runs_in_a_chroot() {
    let dir = tempfile::tempdir().unwrap();
    // `make image` packs a release build; the debug one stripped of its debug info stands in for it
    // (the same libraries, a sixth of the bytes to compress).
    let peat = dir.path().join("peat");
    std::fs::copy(support::peat_binary(), &peat).unwrap();
    let strip = std::process::Command::new("strip").arg("--strip-debug").arg(&peat).status().expect("running strip");
    assert!(strip.success());
    let layout = dir.path().join("layout");
    let img = peat_testenv::image::build(&peat, &support::registrar_binary(), &layout, "amd64", "0.0.0-test")
        .expect("building the image");

    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    assert_eq!(json(&std::fs::read(layout.join("oci-layout")).unwrap())["imageLayoutVersion"], "1.0.0");
    let desc = &index["manifests"][0];
    assert_eq!(desc["platform"]["architecture"], "amd64");
    assert_eq!(desc["digest"], img.manifest_digest.as_str());
    let manifest_bytes = blob(&layout, desc["digest"].as_str().unwrap());
    assert_eq!(desc["size"], manifest_bytes.len());
    let manifest = json(&manifest_bytes);
    let config_bytes = blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(manifest["config"]["size"], config_bytes.len());
    let config = json(&config_bytes);
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/peat");
    let layer = blob(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    assert_eq!(manifest["layers"][0]["size"], layer.len());
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(layer.as_slice()).read_to_end(&mut tar).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{:x}", Sha256::digest(&tar)));

    // The same binary gives the same image.
    let again = peat_testenv::image::build(
        &peat,
        &support::registrar_binary(),
        &dir.path().join("again"),
        "amd64",
        "0.0.0-test",
    )
    .unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest, "the image is reproducible");

    // The layer is a root filesystem peat runs in, with nothing from the host: its libraries, its
    // loader and the CA bundle are in it; run as the image's user.
    let rootfs = dir.path().join("rootfs");
    tar::Archive::new(tar.as_slice()).unpack(&rootfs).unwrap();
    for lib in peat_testenv::image::shared_libraries(&peat).unwrap() {
        assert!(rootfs.join(lib.strip_prefix("/").unwrap()).is_file(), "{} is not in the image", lib.display());
    }
    assert!(rootfs.join(peat_testenv::image::CA_BUNDLE).is_file());
    let out = std::process::Command::new("chroot")
        .arg("--userspec=65532:65532")
        .arg(&rootfs)
        .args(["/usr/local/bin/peat", "--version"])
        .output()
        .expect("running chroot (the test environment runs as root)");
    assert!(out.status.success(), "peat in the image's root filesystem: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    // Pushed to the registry (where containerd pulls it from), it is the same manifest.
    let env = support::env();
    let reference = format!("{}/peat:0.0.0-test", env.registry);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pushed = rt.block_on(peat_testenv::image::push(&layout, &reference, true)).expect("pushing the image");
    assert_eq!(pushed, img.manifest_digest);
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    let r: oci_client::Reference = reference.parse().unwrap();
    let (raw, digest) = rt
        .block_on(access.client().pull_manifest_raw(&r, &access.auth, &["application/vnd.oci.image.manifest.v1+json"]))
        .expect("reading it back");
    assert_eq!((digest, raw.to_vec()), (img.manifest_digest.clone(), manifest_bytes));
}

/// The library lookup of cross builds (readelf and a sysroot, for a binary ldd cannot run) finds
/// what ldd finds, run on this machine's own binary and library directory.
#[test]
fn the_cross_build_library_lookup_finds_what_ldd_finds() {
    let peat = support::peat_binary();
    let names = |paths: Vec<std::path::PathBuf>| -> std::collections::BTreeSet<String> {
        paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect()
    };
    let by_ldd = names(peat_testenv::image::shared_libraries(&peat).unwrap());
    let cross =
        peat_testenv::image::cross_shared_libraries(&peat, Path::new("/lib/x86_64-linux-gnu"), "lib/x86_64-linux-gnu")
            .unwrap();
    assert!(
        cross.iter().any(|(in_image, _)| in_image == "lib64/ld-linux-x86-64.so.2"),
        "the interpreter goes where the binary asks for it: {cross:?}"
    );
    assert_eq!(names(cross.into_iter().map(|(_, p)| p).collect()), by_ldd);
}

/// Single-platform layouts merge into one multi-platform layout whose index names each platform's
/// manifest; pushed, the tag names that index and each platform's manifest is there by digest.
#[test]
fn platform_layouts_merge_into_one_index_that_pushes_whole() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tool");
    std::fs::write(&file, b"#!/bin/sh\n").unwrap();
    let mut layouts = Vec::new();
    let mut digests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let out = dir.path().join(arch);
        let img =
            peat_testenv::image::build_static(&[("tool", &file)], &["/tool"], "0:0", &out, arch, "1.0.0").unwrap();
        digests.push(img.manifest_digest);
        layouts.push(out);
    }
    let merged = dir.path().join("multi");
    peat_testenv::image::merge(&layouts, &merged).unwrap();
    let index = json(&std::fs::read(merged.join("index.json")).unwrap());
    let named: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["platform"]["architecture"].as_str().unwrap().into(), d["digest"].as_str().unwrap().into()))
        .collect();
    assert_eq!(named, vec![("amd64".into(), digests[0].clone()), ("arm64".into(), digests[1].clone())]);
    for (_, digest) in &named {
        let manifest = json(&blob(&merged, digest));
        blob(&merged, manifest["config"]["digest"].as_str().unwrap());
        blob(&merged, manifest["layers"][0]["digest"].as_str().unwrap());
    }
    assert!(peat_testenv::image::merge(&[layouts[0].clone(), layouts[0].clone()], &dir.path().join("twice")).is_err());

    let env = support::env();
    let reference = format!("{}/tool:1.0.0", env.registry);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pushed = rt.block_on(peat_testenv::image::push(&merged, &reference, true)).expect("pushing the index");
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    let client = access.client();
    let r: oci_client::Reference = reference.parse().unwrap();
    let (raw, digest) = rt
        .block_on(client.pull_manifest_raw(&r, &access.auth, &["application/vnd.oci.image.index.v1+json"]))
        .expect("reading the index back");
    assert_eq!(digest, pushed);
    let remote = json(&raw);
    assert_eq!(remote["manifests"].as_array().unwrap().len(), 2);
    for (_, d) in &named {
        let by_digest: oci_client::Reference = format!("{}/tool@{d}", env.registry).parse().unwrap();
        let (_, got) = rt
            .block_on(client.pull_manifest_raw(
                &by_digest,
                &access.auth,
                &["application/vnd.oci.image.manifest.v1+json"],
            ))
            .expect("each platform's manifest by digest");
        assert_eq!(&got, d);
    }
}
