//! `peat push DIR --repository R --version V --variant NAME …`: publish a model directory as a variant.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use oci_client::secrets::RegistryAuth;

use crate::oci::RegistryAccess;
use crate::oci::client::{auth_from_docker_config, parse_reference};
use crate::oci::push::{PushProgress, VariantMeta, model_files, push_dir};
use crate::units::parse_quantity;

/// Arguments of `peat push`.
#[derive(Clone, Debug, clap::Args)]
pub struct PushArgs {
    /// The model directory: every regular file under it becomes a layer titled with its relative path.
    pub dir: PathBuf,
    /// OCI repository, e.g. `registry.example:5000/models/target-recognition`.
    #[arg(long)]
    pub repository: String,
    /// Model version: the tag of the image index the variant is added to.
    #[arg(long)]
    pub version: String,
    /// Variant name (`fp16-cuda`, `int8-cpu` …); an existing variant of that name is replaced.
    #[arg(long)]
    pub variant: String,
    /// Numeric precision (`float16`, `int8` …).
    #[arg(long)]
    pub precision: Option<String>,
    /// Execution providers the variant needs, comma-separated (`cuda,tensorrt`).
    #[arg(long, value_delimiter = ',')]
    pub providers: Vec<String>,
    /// Least GPU memory the variant needs (`4Gi`, `512Mi`, bytes).
    #[arg(long, value_parser = parse_quantity)]
    pub min_gpu_memory: Option<u64>,
    /// `os/arch` for an architecture-specific variant (`linux/arm64`).
    #[arg(long)]
    pub platform: Option<String>,
    /// Earlier versions (of the same variant) to publish patches against, comma-separated or
    /// repeated: a node holding one of them fetches about the changed bytes of each file
    /// (docs/delta.md). Each must be in the registry; files it lacks or that did not change get none.
    #[arg(long, value_delimiter = ',')]
    pub delta_from: Vec<String>,
    /// Plain HTTP to the registry (a lab registry without TLS).
    #[arg(long)]
    pub insecure: bool,
    /// PEM file of CAs to trust for the registry's TLS certificate (a private CA).
    #[arg(long, conflicts_with = "insecure")]
    pub ca_file: Option<PathBuf>,
    /// Docker config with credentials (default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
    #[arg(long, env = "PEAT_REGISTRY_CONFIG")]
    pub registry_config: Option<PathBuf>,
}

fn docker_config_path(explicit: Option<&PathBuf>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.clone());
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

struct Bar(ProgressBar);

impl PushProgress for Bar {
    fn hashed(&self, _: u64) {}
    fn uploaded(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn patching(&self, title: &str, from: &str) {
        self.0.set_message(format!("patching {title} against {from}"));
    }
}

/// Runs `peat push`; prints the variant manifest's digest.
pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    let (os, arch) = match &args.platform {
        None => (None, None),
        Some(p) => match p.split_once('/') {
            Some((os, arch)) if !os.is_empty() && !arch.is_empty() => (Some(os.to_string()), Some(arch.to_string())),
            _ => anyhow::bail!("--platform {p:?} is not os/arch (e.g. linux/arm64)"),
        },
    };
    let meta = VariantMeta {
        name: args.variant.clone(),
        precision: args.precision.clone(),
        providers: args.providers.iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect(),
        min_gpu_memory: args.min_gpu_memory.unwrap_or(0),
        arch,
        os,
    };
    let registry = parse_reference(&format!("{}:{}", args.repository, args.version))?.resolve_registry().to_string();
    let auth = match docker_config_path(args.registry_config.as_ref()) {
        Some(path) if path.exists() => {
            let raw = std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            auth_from_docker_config(&raw, &registry)?
        }
        Some(path) if args.registry_config.is_some() => anyhow::bail!("{} does not exist", path.display()),
        _ => RegistryAuth::Anonymous,
    };
    let files = model_files(&args.dir)?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("pushing {} files", files.len()));
        bar
    } else {
        ProgressBar::hidden()
    };
    let ca_bundle = match &args.ca_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading --ca-file {}: {e}", p.display()))?)
        }
        None => None,
    };
    let access = RegistryAccess { insecure: args.insecure, auth: auth.clone(), ca_bundle };
    let client = access.push_client()?;
    let delta_from: Vec<String> =
        args.delta_from.iter().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
    if delta_from.contains(&args.version) {
        anyhow::bail!("--delta-from {}: that is the version being pushed", args.version);
    }
    let progress = Arc::new(Bar(bar.clone()));
    let digest =
        push_dir(&client, &auth, &args.repository, &args.version, &meta, &args.dir, &delta_from, progress).await;
    bar.finish_and_clear();
    let digest = digest?;
    eprintln!(
        "pushed {} ({} files, {} bytes) as variant {:?} of {}:{}",
        digest,
        files.len(),
        total,
        meta.name,
        args.repository,
        args.version
    );
    println!("{}@{digest}", args.repository);
    Ok(())
}
