//! What the node can run: architecture, GPUs (NVML when present), execution providers, storage —
//! detected, overridden by flags and by the Node's `peat.dev/` annotations, which are followed live.

use std::collections::BTreeMap;
use std::path::Path;

use crate::units::parse_quantity;

/// Flags that replace detected values (tests give each agent process a different node this way).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Architecture to report instead of the detected one (GOARCH names: amd64, arm64 …).
    #[arg(long = "arch")]
    pub arch: Option<String>,
    /// Number of GPUs to report instead of NVML's count.
    #[arg(long = "gpus")]
    pub gpus: Option<i32>,
    /// GPU memory to report (per GPU, the largest), e.g. `8Gi`, instead of NVML's.
    #[arg(long = "gpu-memory", value_parser = parse_quantity)]
    pub gpu_memory: Option<u64>,
    /// Execution providers to report instead of the derived ones (`cpu`, plus `cuda` with a GPU).
    #[arg(long = "providers", value_delimiter = ',')]
    pub providers: Option<Vec<String>>,
}

/// Node annotations an administrator sets where detection cannot see (Jetson has no NVML) or where
/// one DaemonSet serves differing nodes: `kubectl annotate node jetson-1 peat.dev/gpu-memory=8Gi`.
pub const ANNOTATION_ARCH: &str = "peat.dev/arch";
/// See [`ANNOTATION_ARCH`]: the GPU count.
pub const ANNOTATION_GPUS: &str = "peat.dev/gpus";
/// See [`ANNOTATION_ARCH`]: memory of the largest GPU (`8Gi`).
pub const ANNOTATION_GPU_MEMORY: &str = "peat.dev/gpu-memory";
/// See [`ANNOTATION_ARCH`]: execution providers, comma-separated.
pub const ANNOTATION_PROVIDERS: &str = "peat.dev/providers";

/// Every capability annotation.
const ANNOTATIONS: [&str; 4] = [ANNOTATION_ARCH, ANNOTATION_GPUS, ANNOTATION_GPU_MEMORY, ANNOTATION_PROVIDERS];

/// The capability annotations among a Node's annotations.
pub fn capability_annotations(all: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    all.iter().filter(|(k, _)| ANNOTATIONS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl Overrides {
    /// These overrides, with the node's `peat.dev/…` annotations filling what no flag sets (a flag
    /// wins over an annotation, an annotation over detection). A malformed annotation is left out
    /// and named in the returned problems, so the agent can say so and run on.
    pub fn with_annotations(&self, annotations: &BTreeMap<String, String>) -> (Overrides, Vec<String>) {
        let mut out = self.clone();
        let mut problems = Vec::new();
        let get = |k: &str| annotations.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        if out.arch.is_none()
            && let Some(v) = get(ANNOTATION_ARCH)
        {
            if v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.arch = Some(crate::plan::scope::normalize_arch(v));
            } else {
                problems.push(format!("{ANNOTATION_ARCH}={v:?} is not an architecture name (amd64, arm64 …)"));
            }
        }
        if out.gpus.is_none()
            && let Some(v) = get(ANNOTATION_GPUS)
        {
            match v.parse::<i32>() {
                Ok(n) if n >= 0 => out.gpus = Some(n),
                _ => problems.push(format!("{ANNOTATION_GPUS}={v:?} is not a count of GPUs")),
            }
        }
        if out.gpu_memory.is_none()
            && let Some(v) = get(ANNOTATION_GPU_MEMORY)
        {
            match parse_quantity(v) {
                Ok(n) => out.gpu_memory = Some(n),
                Err(e) => problems.push(format!("{ANNOTATION_GPU_MEMORY}={v:?}: {e}")),
            }
        }
        if out.providers.is_none()
            && let Some(v) = get(ANNOTATION_PROVIDERS)
        {
            let list: Vec<String> = v.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
            if list.is_empty() {
                problems.push(format!("{ANNOTATION_PROVIDERS}={v:?} names no provider"));
            } else {
                out.providers = Some(list);
            }
        }
        (out, problems)
    }
}

/// The node's capabilities as published in its ModelNode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// GOARCH-style architecture.
    pub arch: String,
    /// GPUs.
    pub gpus: i32,
    /// Memory of the largest GPU, bytes.
    pub gpu_memory_bytes: i64,
    /// Execution providers.
    pub providers: Vec<String>,
}

/// GPU count and largest memory from NVML; none when the library or a GPU is absent (not an error).
fn nvml_gpus() -> Option<(i32, i64)> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let count = nvml.device_count().ok()?;
    let mut largest = 0i64;
    for i in 0..count {
        if let Ok(mem) = nvml.device_by_index(i).and_then(|d| d.memory_info()) {
            largest = largest.max(mem.total as i64);
        }
    }
    Some((count as i32, largest))
}

/// Detects the node's capabilities, with `overrides` taking precedence.
pub fn detect(overrides: &Overrides) -> Capabilities {
    let arch = overrides.arch.clone().unwrap_or_else(|| crate::plan::scope::normalize_arch(std::env::consts::ARCH));
    // "No GPU" said outright also means no GPU memory, whatever NVML would report.
    let no_gpu = overrides.gpus == Some(0);
    let gpu = if no_gpu || (overrides.gpus.is_some() && overrides.gpu_memory.is_some()) { None } else { nvml_gpus() };
    let gpus = overrides.gpus.or(gpu.map(|g| g.0)).unwrap_or(0);
    let gpu_memory_bytes = overrides.gpu_memory.map(|m| m as i64).or(gpu.map(|g| g.1)).unwrap_or(0);
    let providers = overrides.providers.clone().unwrap_or_else(|| {
        let mut p = vec!["cpu".to_string()];
        if gpus > 0 {
            p.push("cuda".into());
        }
        p
    });
    Capabilities { arch, gpus, gpu_memory_bytes, providers }
}

/// Free (for unprivileged writers) and total bytes of the filesystem holding `path`.
pub fn storage(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_and_providers_follow_gpus() {
        let o = Overrides { arch: Some("arm64".into()), gpus: Some(1), gpu_memory: Some(8 << 30), providers: None };
        let c = detect(&o);
        assert_eq!((c.arch.as_str(), c.gpus, c.gpu_memory_bytes), ("arm64", 1, 8 << 30));
        assert_eq!(c.providers, vec!["cpu".to_string(), "cuda".to_string()]);
        let c = detect(&Overrides { gpus: Some(0), gpu_memory: Some(0), ..Default::default() });
        assert_eq!(c.providers, vec!["cpu".to_string()]);
        // No GPU means no GPU memory, without asking NVML.
        let c = detect(&Overrides { gpus: Some(0), ..Default::default() });
        assert_eq!((c.gpus, c.gpu_memory_bytes), (0, 0));
        assert!(!c.arch.is_empty() && c.arch != "x86_64");
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn node_annotations_fill_what_no_flag_sets() {
        let ann = annotations(&[
            (ANNOTATION_ARCH, "aarch64"),
            (ANNOTATION_GPUS, "1"),
            (ANNOTATION_GPU_MEMORY, "8Gi"),
            (ANNOTATION_PROVIDERS, "cuda, tensorrt,cpu"),
            ("other.example/key", "not ours"),
        ]);
        assert_eq!(capability_annotations(&ann).len(), 4, "only the capability annotations");
        let (o, problems) = Overrides::default().with_annotations(&ann);
        assert!(problems.is_empty(), "{problems:?}");
        let c = detect(&o);
        assert_eq!((c.arch.as_str(), c.gpus, c.gpu_memory_bytes), ("arm64", 1, 8 << 30));
        assert_eq!(c.providers, ["cuda", "tensorrt", "cpu"]);

        // A flag wins over the annotation.
        let flags = Overrides { gpu_memory: Some(4 << 30), ..Default::default() };
        let (o, _) = flags.with_annotations(&ann);
        assert_eq!(o.gpu_memory, Some(4 << 30));

        // Malformed values are named and left out; the rest still applies.
        let bad = annotations(&[
            (ANNOTATION_GPUS, "two"),
            (ANNOTATION_GPU_MEMORY, "lots"),
            (ANNOTATION_PROVIDERS, " , "),
            (ANNOTATION_ARCH, "arm64"),
        ]);
        let (o, problems) = Overrides::default().with_annotations(&bad);
        assert_eq!((o.gpus, o.gpu_memory, o.providers, o.arch.as_deref()), (None, None, None, Some("arm64")));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("peat.dev/gpus=\"two\""), "{problems:?}");
        assert!(problems[2].contains("names no provider"), "{problems:?}");
        let (o, problems) = Overrides::default().with_annotations(&annotations(&[(ANNOTATION_ARCH, "arm 64")]));
        assert_eq!((o.arch, problems.len()), (None, 1));
    }

    #[test]
    fn storage_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = storage(dir.path()).unwrap();
        assert!(total > 0 && free <= total);
        assert!(storage(Path::new("/no/such/dir")).is_err());
    }
}
