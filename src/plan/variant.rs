//! select: which variant of a model version each node gets.

use std::cmp::Reverse;

use crate::api::{BlockerReason, ModelNodeStatus, VariantSpec};

use super::scope::normalize_arch;

pub use crate::oci::layout::VariantInfo;

/// Why no variant fits a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectionBlocker {
    /// The typed reason.
    pub reason: BlockerReason,
    /// What exactly, for a person.
    pub message: String,
}

fn blocked(reason: BlockerReason, message: String) -> SelectionBlocker {
    SelectionBlocker { reason, message }
}

fn has_provider(list: &[String], p: &str) -> bool {
    list.iter().any(|x| x.eq_ignore_ascii_case(p))
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b}B") } else { format!("{v:.1}{}", UNITS[i]) }
}

/// Picks the variant a node gets, or says why none fits.
///
/// A variant fits when its arch (if any) is the node's, the node has every provider it lists, it
/// has every `requiredProviders` entry, the node's GPU memory is at least its `min-gpu-memory`, and
/// its size is within `maxSizeBytes` and the node's free storage. An explicit `variant.name` must
/// fit or the node is blocked. Among fitting variants: `preferredPrecision` first, then one that
/// uses an accelerator the node has, then the smallest (then the name, for a stable choice).
///
/// The reason, when nothing fits, names the first check that emptied the candidate list, so a node
/// that is the wrong kind reads `IncompatibleCapabilities` even when it is also short of storage.
pub fn select_variant<'a>(
    spec: Option<&VariantSpec>,
    variants: &'a [VariantInfo],
    node: &ModelNodeStatus,
) -> Result<&'a VariantInfo, SelectionBlocker> {
    let default_spec = VariantSpec::default();
    let spec = spec.unwrap_or(&default_spec);
    let mut candidates: Vec<&VariantInfo> = match &spec.name {
        Some(name) => {
            let named: Vec<_> = variants.iter().filter(|v| &v.name == name).collect();
            if named.is_empty() {
                let available: Vec<_> = variants.iter().map(|v| v.name.as_str()).collect();
                return Err(blocked(
                    BlockerReason::IncompatibleCapabilities,
                    format!("variant {name:?} is not in the image index (it has: {})", available.join(", ")),
                ));
            }
            named
        }
        None => variants.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(blocked(BlockerReason::IncompatibleCapabilities, "the image index lists no variants".into()));
    }

    let node_arch = node.arch.as_deref().map(normalize_arch);
    let required = spec.required_providers.as_deref().unwrap_or_default();
    let compatible: Vec<&VariantInfo> = candidates
        .iter()
        .copied()
        .filter(|v| v.arch.as_deref().is_none_or(|a| node_arch.as_deref() == Some(normalize_arch(a).as_str())))
        .filter(|v| v.providers.iter().all(|p| has_provider(&node.providers, p)))
        .filter(|v| required.iter().all(|p| has_provider(&v.providers, p)))
        .collect();
    if compatible.is_empty() {
        let what: Vec<String> = candidates
            .iter()
            .map(|v| format!("{} ({}/{})", v.name, v.arch.as_deref().unwrap_or("any"), v.providers.join("+")))
            .collect();
        let mut msg = format!(
            "node is {}/{}; no variant runs there: {}",
            node_arch.as_deref().unwrap_or("unknown-arch"),
            if node.providers.is_empty() { "no providers".to_string() } else { node.providers.join("+") },
            what.join(", ")
        );
        if !required.is_empty() {
            msg.push_str(&format!("; requiredProviders: {}", required.join(", ")));
        }
        return Err(blocked(BlockerReason::IncompatibleCapabilities, msg));
    }
    candidates = compatible;

    let gpu = node.gpu_memory_bytes.max(0) as u64;
    let gpu_ok: Vec<_> = candidates.iter().copied().filter(|v| v.min_gpu_memory <= gpu).collect();
    if gpu_ok.is_empty() {
        let least = candidates.iter().map(|v| v.min_gpu_memory).min().unwrap_or_default();
        return Err(blocked(
            BlockerReason::InsufficientGpuMemory,
            format!("needs {} of GPU memory, node has {}", human_bytes(least), human_bytes(gpu)),
        ));
    }
    candidates = gpu_ok;

    if let Some(max) = spec.max_size_bytes {
        let max = max.max(0) as u64;
        let small: Vec<_> = candidates.iter().copied().filter(|v| v.size <= max).collect();
        if small.is_empty() {
            let least = candidates.iter().map(|v| v.size).min().unwrap_or_default();
            return Err(blocked(
                BlockerReason::IncompatibleCapabilities,
                format!(
                    "the smallest fitting variant is {}, over maxSizeBytes {}",
                    human_bytes(least),
                    human_bytes(max)
                ),
            ));
        }
        candidates = small;
    }

    let free = node.storage_available_bytes();
    let stored: Vec<_> = candidates.iter().copied().filter(|v| v.size <= free).collect();
    if stored.is_empty() {
        let least = candidates.iter().map(|v| v.size).min().unwrap_or_default();
        return Err(blocked(
            BlockerReason::InsufficientStorage,
            format!(
                "needs {}, {} free (counting kept versions the node may evict)",
                human_bytes(least),
                human_bytes(free)
            ),
        ));
    }

    let preferred = spec.preferred_precision.as_deref();
    Ok(stored
        .into_iter()
        .min_by_key(|v| {
            let precision_match =
                preferred.is_some_and(|p| v.precision.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(p)));
            (Reverse(precision_match), Reverse(v.uses_accelerator()), v.size, v.name.clone())
        })
        .expect("non-empty"))
}

/// Whether an index read from the tag again may replace the pinned one: it keeps every pinned
/// variant byte for byte (same name, same manifest digest) and adds at least one. Nodes already
/// served keep their bytes; only nodes no pinned variant fits gain. A tag re-pushed with changed
/// variants does not qualify (the pin exists so that every node of a version gets the same bytes).
pub fn extends(pinned: &[VariantInfo], fresh: &[VariantInfo]) -> bool {
    fresh.len() > pinned.len() && pinned.iter().all(|p| fresh.iter().any(|f| f.name == p.name && f.digest == p.digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;
    const MI: u64 = 1 << 20;

    fn variant(
        name: &str,
        precision: &str,
        providers: &[&str],
        gpu: u64,
        size: u64,
        arch: Option<&str>,
    ) -> VariantInfo {
        VariantInfo {
            name: name.into(),
            digest: format!("sha256:{name}"),
            precision: Some(precision.into()),
            providers: providers.iter().map(|p| p.to_string()).collect(),
            min_gpu_memory: gpu,
            size,
            arch: arch.map(Into::into),
        }
    }

    fn catalogue() -> Vec<VariantInfo> {
        vec![
            variant("fp16-cuda", "float16", &["cuda"], 4 * GI, 900 * MI, None),
            variant("fp32-cuda", "float32", &["cuda"], 8 * GI, 1800 * MI, None),
            variant("int8-cpu", "int8", &["cpu"], 0, 250 * MI, None),
            variant("fp32-cpu", "float32", &["cpu"], 0, 1000 * MI, None),
        ]
    }

    fn node(arch: &str, providers: &[&str], gpu: u64, free: u64) -> ModelNodeStatus {
        ModelNodeStatus {
            arch: Some(arch.into()),
            gpus: i32::from(gpu > 0),
            gpu_memory_bytes: gpu as i64,
            providers: providers.iter().map(|p| p.to_string()).collect(),
            storage_free_bytes: free as i64,
            ..Default::default()
        }
    }

    fn spec() -> VariantSpec {
        VariantSpec::default()
    }

    fn pick(
        spec: Option<&VariantSpec>,
        variants: &[VariantInfo],
        n: &ModelNodeStatus,
    ) -> Result<String, SelectionBlocker> {
        select_variant(spec, variants, n).map(|v| v.name.clone())
    }

    #[test]
    fn gpu_node_gets_the_accelerated_variant_over_a_smaller_cpu_one() {
        let jetson = node("arm64", &["cpu", "cuda"], 8 * GI, 20 * GI);
        // fp16-cuda and fp32-cuda both fit; cuda beats cpu; among cuda the smaller wins.
        assert_eq!(pick(None, &catalogue(), &jetson).unwrap(), "fp16-cuda");
    }

    #[test]
    fn cpu_node_gets_the_smallest_cpu_variant() {
        let gateway = node("amd64", &["cpu"], 0, 20 * GI);
        assert_eq!(pick(None, &catalogue(), &gateway).unwrap(), "int8-cpu");
    }

    #[test]
    fn preferred_precision_comes_first() {
        let gateway = node("amd64", &["cpu"], 0, 20 * GI);
        let s = VariantSpec { preferred_precision: Some("float32".into()), ..spec() };
        assert_eq!(pick(Some(&s), &catalogue(), &gateway).unwrap(), "fp32-cpu");
        // Preference beats the accelerator rule too: a GPU node asked for int8 gets the cpu int8 variant.
        let big = node("amd64", &["cpu", "cuda"], 80 * GI, 500 * GI);
        let s = VariantSpec { preferred_precision: Some("int8".into()), ..spec() };
        assert_eq!(pick(Some(&s), &catalogue(), &big).unwrap(), "int8-cpu");
        // A preference nothing matches is only a preference.
        let s = VariantSpec { preferred_precision: Some("bfloat16".into()), ..spec() };
        assert_eq!(pick(Some(&s), &catalogue(), &big).unwrap(), "fp16-cuda");
    }

    #[test]
    fn required_providers_filter() {
        let gateway = node("amd64", &["cpu"], 0, 20 * GI);
        let s = VariantSpec { required_providers: Some(vec!["cuda".into()]), ..spec() };
        let err = pick(Some(&s), &catalogue(), &gateway).unwrap_err();
        assert_eq!(err.reason, BlockerReason::IncompatibleCapabilities);
        assert!(err.message.contains("requiredProviders: cuda"), "{}", err.message);
        let big = node("amd64", &["cpu", "cuda"], 80 * GI, 500 * GI);
        assert_eq!(pick(Some(&s), &catalogue(), &big).unwrap(), "fp16-cuda");
    }

    #[test]
    fn variant_platform_arch_must_match_with_aliases() {
        let variants = vec![
            variant("trt-orin", "float16", &["cuda"], 2 * GI, 500 * MI, Some("arm64")),
            variant("int8-x86", "int8", &["cpu"], 0, 300 * MI, Some("amd64")),
        ];
        assert_eq!(pick(None, &variants, &node("aarch64", &["cpu", "cuda"], 8 * GI, 10 * GI)).unwrap(), "trt-orin");
        assert_eq!(pick(None, &variants, &node("x86_64", &["cpu", "cuda"], 8 * GI, 10 * GI)).unwrap(), "int8-x86");
        let err = pick(None, &variants, &node("riscv64", &["cpu"], 0, 10 * GI)).unwrap_err();
        assert_eq!(err.reason, BlockerReason::IncompatibleCapabilities);
        assert!(err.message.contains("riscv64"), "{}", err.message);
    }

    #[test]
    fn max_size_bytes_filters() {
        let gateway = node("amd64", &["cpu"], 0, 20 * GI);
        let s = VariantSpec {
            preferred_precision: Some("float32".into()),
            max_size_bytes: Some((500 * MI) as i64),
            ..spec()
        };
        assert_eq!(pick(Some(&s), &catalogue(), &gateway).unwrap(), "int8-cpu");
        let s = VariantSpec { max_size_bytes: Some((100 * MI) as i64), ..spec() };
        let err = pick(Some(&s), &catalogue(), &gateway).unwrap_err();
        assert_eq!(err.reason, BlockerReason::IncompatibleCapabilities);
        assert!(err.message.contains("maxSizeBytes"), "{}", err.message);
    }

    #[test]
    fn explicit_name_is_chosen_when_it_fits() {
        let big = node("amd64", &["cpu", "cuda"], 80 * GI, 500 * GI);
        let s = VariantSpec { name: Some("fp32-cpu".into()), ..spec() };
        assert_eq!(pick(Some(&s), &catalogue(), &big).unwrap(), "fp32-cpu");
    }

    #[test]
    fn explicit_name_that_does_not_fit_blocks_instead_of_falling_back() {
        let gateway = node("amd64", &["cpu"], 0, 20 * GI);
        let s = VariantSpec { name: Some("fp16-cuda".into()), ..spec() };
        assert_eq!(pick(Some(&s), &catalogue(), &gateway).unwrap_err().reason, BlockerReason::IncompatibleCapabilities);
        let small_gpu = node("arm64", &["cpu", "cuda"], 6 * GI, 20 * GI);
        let s = VariantSpec { name: Some("fp32-cuda".into()), ..spec() };
        assert_eq!(pick(Some(&s), &catalogue(), &small_gpu).unwrap_err().reason, BlockerReason::InsufficientGpuMemory);
        let s = VariantSpec { name: Some("no-such".into()), ..spec() };
        let err = pick(Some(&s), &catalogue(), &small_gpu).unwrap_err();
        assert!(err.message.contains("not in the image index"), "{}", err.message);
    }

    #[test]
    fn insufficient_gpu_memory_when_only_gpu_variants_are_compatible() {
        let variants = vec![variant("fp16-cuda", "float16", &["cuda"], 4 * GI, 900 * MI, None)];
        let err = pick(None, &variants, &node("arm64", &["cpu", "cuda"], 2 * GI, 20 * GI)).unwrap_err();
        assert_eq!(err.reason, BlockerReason::InsufficientGpuMemory);
        assert!(err.message.contains("4.0GiB") && err.message.contains("2.0GiB"), "{}", err.message);
    }

    #[test]
    fn a_small_gpu_falls_back_to_cpu_when_a_cpu_variant_exists() {
        let n = node("arm64", &["cpu", "cuda"], 2 * GI, 20 * GI);
        assert_eq!(pick(None, &catalogue(), &n).unwrap(), "int8-cpu");
    }

    #[test]
    fn insufficient_storage_when_nothing_fits_on_disk() {
        let n = node("amd64", &["cpu"], 0, 100 * MI);
        let err = pick(None, &catalogue(), &n).unwrap_err();
        assert_eq!(err.reason, BlockerReason::InsufficientStorage);
        assert!(err.message.contains("250.0MiB") && err.message.contains("100.0MiB free"), "{}", err.message);
        // Storage excludes only the variants that do not fit: a smaller one is still chosen.
        let n = node("amd64", &["cpu", "cuda"], 80 * GI, 500 * MI);
        assert_eq!(pick(None, &catalogue(), &n).unwrap(), "int8-cpu");
    }

    #[test]
    fn incompatible_when_node_lacks_every_provider() {
        let n = node("amd64", &[], 0, 20 * GI);
        let err = pick(None, &catalogue(), &n).unwrap_err();
        assert_eq!(err.reason, BlockerReason::IncompatibleCapabilities);
        assert!(err.message.contains("no providers"), "{}", err.message);
    }

    #[test]
    fn an_empty_index_blocks() {
        let err = pick(None, &[], &node("amd64", &["cpu"], 0, GI)).unwrap_err();
        assert_eq!(err.reason, BlockerReason::IncompatibleCapabilities);
    }

    #[test]
    fn equal_candidates_are_chosen_by_name_so_the_choice_is_stable() {
        let variants =
            vec![variant("b-cpu", "int8", &["cpu"], 0, 100, None), variant("a-cpu", "int8", &["cpu"], 0, 100, None)];
        assert_eq!(pick(None, &variants, &node("amd64", &["cpu"], 0, GI)).unwrap(), "a-cpu");
    }

    #[test]
    fn an_index_that_adds_variants_extends_the_pinned_one_a_changed_variant_does_not() {
        let pinned = vec![catalogue()[0].clone()];
        assert!(extends(&pinned, &catalogue()), "fp16-cuda kept, three added");
        assert!(!extends(&pinned, &pinned), "nothing added");
        let mut changed = catalogue();
        changed[0].digest = "sha256:rebuilt".into();
        assert!(!extends(&pinned, &changed), "fp16-cuda re-pushed with other bytes");
        assert!(!extends(&catalogue(), &pinned), "variants removed");
        let renamed = vec![VariantInfo { name: "fp16".into(), ..catalogue()[0].clone() }, catalogue()[2].clone()];
        assert!(!extends(&pinned, &renamed), "the same bytes under another name");
    }
}
