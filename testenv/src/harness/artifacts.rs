//! Model versions pushed to the test registry.

/// Pushes a two-variant model version (fp16-cuda needing 4 GiB GPU memory, int8-cpu) to the registry.
pub async fn push_two_variants(repository: &str, version: &str) -> (String, String) {
    let gpu = push_variant(repository, version, TestVariant::Fp16Cuda).await;
    let cpu = push_variant(repository, version, TestVariant::Int8Cpu).await;
    (gpu, cpu)
}

/// The two variants the tests push: `fp16-cuda` (cuda, 4 GiB of GPU memory, two files) and `int8-cpu`.
#[derive(Clone, Copy, Debug)]
pub enum TestVariant {
    Fp16Cuda,
    Int8Cpu,
}

/// Pushes one variant of `repository:version` (added to the version's index); returns its manifest digest.
pub async fn push_variant(repository: &str, version: &str, variant: TestVariant) -> String {
    use peat::oci::push::{VariantMeta, push_variant_bytes};
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    let client = access.client();
    let (name, precision, provider, min_gpu_memory, extra) = match variant {
        TestVariant::Fp16Cuda => ("fp16-cuda", "float16", "cuda", 4u64 << 30, true),
        TestVariant::Int8Cpu => ("int8-cpu", "int8", "cpu", 0, false),
    };
    let meta = VariantMeta {
        name: name.into(),
        precision: Some(precision.into()),
        providers: vec![provider.into()],
        min_gpu_memory,
        arch: None,
        os: None,
    };
    let mut files = vec![("model.onnx", format!("{provider} weights {version}").into_bytes())];
    if extra {
        files.push(("config.json", b"{}".to_vec()));
    }
    push_variant_bytes(&client, &access.auth, repository, version, &meta, &files)
        .await
        .unwrap_or_else(|e| panic!("pushing {name}: {e}"))
}

/// Pushes in-memory files as one variant of `repository:version`.
pub async fn push_files(
    repository: &str,
    version: &str,
    meta: peat::oci::push::VariantMeta,
    files: &[(&str, Vec<u8>)],
) -> String {
    let access = peat::oci::RegistryAccess { insecure: true, ..Default::default() };
    peat::oci::push::push_variant_bytes(&access.client(), &access.auth, repository, version, &meta, files)
        .await
        .unwrap_or_else(|e| panic!("pushing {repository}:{version}: {e}"))
}
