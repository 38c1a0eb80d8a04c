//! Registry clients (plain HTTP for `insecure`, docker-config credentials) and resolving a version.

use std::collections::BTreeMap;

use base64::Engine;
use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciManifest;
use oci_client::secrets::RegistryAuth;

use super::layout::VariantInfo;
use super::layout::{LayoutError, variant_from_manifest, variants_from_index};

/// Registry errors, classified for retries.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A reference that does not parse.
    #[error("{reference:?} is not a valid OCI reference: {why}")]
    BadReference {
        /// The reference.
        reference: String,
        /// Why.
        why: String,
    },
    /// The tag or digest does not exist (yet): retry later, someone may push it.
    #[error("{0} not found in the registry")]
    NotFound(String),
    /// The registry refused our credentials.
    #[error("the registry refused access to {reference}: {message}")]
    Unauthorized {
        /// What we asked for.
        reference: String,
        /// The registry's words.
        message: String,
    },
    /// The registry cannot be reached or answered with a server error.
    #[error("registry unreachable for {reference}: {message}")]
    Unreachable {
        /// What we asked for.
        reference: String,
        /// What went wrong.
        message: String,
    },
    /// The artifact breaks the layout contract.
    #[error("{reference}: {source}")]
    Layout {
        /// What we read.
        reference: String,
        /// How it is wrong.
        source: LayoutError,
    },
    /// A pull secret that cannot be used.
    #[error("pull secret: {0}")]
    BadCredentials(String),
    /// A CA bundle that cannot be used.
    #[error("caBundle: {0}")]
    BadCaBundle(String),
    /// A Secret that could not be read (missing for now, or the API server failed): retried, as
    /// it may appear (the controller writes the agents' copies) or the API server may recover.
    #[error("{0}")]
    SecretUnavailable(String),
    /// Anything else the registry client reported.
    #[error("{reference}: {message}")]
    Other {
        /// What we asked for.
        reference: String,
        /// What went wrong.
        message: String,
    },
}

impl OciError {
    /// Classifies an oci-client error for `reference`.
    pub fn from_client(reference: &str, e: OciDistributionError) -> OciError {
        let reference = reference.to_string();
        match e {
            OciDistributionError::ImageManifestNotFoundError(_) => OciError::NotFound(reference),
            OciDistributionError::ServerError { code: 404, .. } => OciError::NotFound(reference),
            OciDistributionError::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                            | oci_client::errors::OciErrorCode::BlobUnknown
                    )
                }) =>
            {
                OciError::NotFound(reference)
            }
            OciDistributionError::AuthenticationFailure(message)
            | OciDistributionError::UnauthorizedError { url: message } => OciError::Unauthorized { reference, message },
            OciDistributionError::ServerError { code: 401 | 403, message, .. } => {
                OciError::Unauthorized { reference, message }
            }
            OciDistributionError::RequestError(e) => OciError::Unreachable { reference, message: request_error(&e) },
            OciDistributionError::ServerError { code, message, .. } if code >= 500 => {
                OciError::Unreachable { reference, message: format!("HTTP {code}: {message}") }
            }
            other => OciError::Other { reference, message: other.to_string() },
        }
    }

    /// Whether waiting and trying again may help (anything but a malformed artifact or reference).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            OciError::BadReference { .. }
                | OciError::Layout { .. }
                | OciError::BadCredentials(_)
                | OciError::BadCaBundle(_)
        )
    }
}

/// How to reach one registry: protocol, credentials, and the CAs to trust besides the system's.
#[derive(Clone, Debug)]
pub struct RegistryAccess {
    /// Plain HTTP.
    pub insecure: bool,
    /// Credentials.
    pub auth: RegistryAuth,
    /// PEM certificates of CAs to trust for this registry's TLS certificate (a private CA).
    pub ca_bundle: Option<String>,
}

impl Default for RegistryAccess {
    fn default() -> Self {
        RegistryAccess { insecure: false, auth: RegistryAuth::Anonymous, ca_bundle: None }
    }
}

impl RegistryAccess {
    /// A client for this access (oci-client keeps tokens per client; make one per registry and
    /// reuse it). A CA bundle that does not parse is an error here (oci-client would silently fall
    /// back to a client that trusts only the system's CAs).
    pub fn try_client(&self) -> Result<oci_client::Client, OciError> {
        oci_client::Client::try_from(self.config()?).map_err(|e| OciError::BadCaBundle(e.to_string()))
    }

    /// [`try_client`](Self::try_client), for an access without a CA bundle or one known to parse.
    pub fn client(&self) -> oci_client::Client {
        self.try_client().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A client that uploads each blob in one streamed PUT (not 4 MiB PATCHes): for `peat push`.
    pub fn push_client(&self) -> Result<oci_client::Client, OciError> {
        let config = ClientConfig { use_monolithic_push: true, ..self.config()? };
        oci_client::Client::try_from(config).map_err(|e| OciError::BadCaBundle(e.to_string()))
    }

    fn config(&self) -> Result<ClientConfig, OciError> {
        let extra_root_certificates = match &self.ca_bundle {
            Some(pem) => pem_certificates(pem)?,
            None => Vec::new(),
        };
        Ok(ClientConfig {
            protocol: if self.insecure { ClientProtocol::Http } else { ClientProtocol::Https },
            // A registry that vanishes must surface as an error to retry, not a hang.
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            extra_root_certificates,
            ..Default::default()
        })
    }
}

/// The certificates of a PEM bundle, one per `BEGIN CERTIFICATE` block.
pub fn pem_certificates(bundle: &str) -> Result<Vec<oci_client::client::Certificate>, OciError> {
    const END: &str = "-----END CERTIFICATE-----";
    let certs: Vec<_> = bundle
        .split_inclusive(END)
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----") && block.trim_end().ends_with(END))
        .map(|block| oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data: block.trim().as_bytes().to_vec(),
        })
        .collect();
    if certs.is_empty() {
        return Err(OciError::BadCaBundle(
            "no PEM certificate (-----BEGIN CERTIFICATE----- … -----END CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(certs)
}

/// A request error with its causes (reqwest's own message omits them: "error sending request"),
/// and what to do when the registry's certificate is not trusted.
fn request_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    let lower = message.to_lowercase();
    if lower.contains("certificate") || lower.contains("unknownissuer") {
        message.push_str(
            " (the registry's TLS certificate is not trusted: give its CA in source.caBundle, or use \
             source.insecure for a lab registry without TLS)",
        );
    }
    message
}

/// Registry clients, one per (registry, protocol, credentials): oci-client keeps the credentials
/// (and tokens) a client first used, so other or rotated credentials need a client of their own.
#[derive(Default)]
pub struct Clients {
    by_access: std::sync::Mutex<std::collections::HashMap<(String, bool, String), oci_client::Client>>,
}

/// A digest naming credentials without holding them (empty for anonymous access).
pub fn auth_fingerprint(auth: &RegistryAuth) -> String {
    match auth {
        RegistryAuth::Anonymous => String::new(),
        RegistryAuth::Basic(u, p) => super::digest::sha256_digest(format!("{u}:{p}").as_bytes()),
        RegistryAuth::Bearer(t) => super::digest::sha256_digest(t.as_bytes()),
    }
}

impl Clients {
    /// The client for `registry` with these credentials and CA bundle (made on first use).
    pub fn get(
        &self,
        registry: &str,
        insecure: bool,
        ca_bundle: Option<&str>,
        auth: &RegistryAuth,
    ) -> Result<oci_client::Client, OciError> {
        let ca = ca_bundle.map(|pem| super::digest::sha256_digest(pem.as_bytes())).unwrap_or_default();
        let key = (registry.to_string(), insecure, format!("{}|{ca}", auth_fingerprint(auth)));
        let mut clients = self.by_access.lock().expect("registry clients lock");
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let access = RegistryAccess { insecure, auth: RegistryAuth::Anonymous, ca_bundle: ca_bundle.map(String::from) };
        let client = access.try_client()?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// Parses a reference, mapping the error.
pub fn parse_reference(reference: &str) -> Result<Reference, OciError> {
    reference
        .parse::<Reference>()
        .map_err(|e| OciError::BadReference { reference: reference.to_string(), why: e.to_string() })
}

/// Credentials for `registry` from a `.dockerconfigjson` document (`auths.<host>.auth`,
/// `username`/`password`, or `identitytoken`); anonymous when it has none for that host.
pub fn auth_from_docker_config(json: &[u8], registry: &str) -> Result<RegistryAuth, OciError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        identitytoken: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    let cfg: DockerConfig =
        serde_json::from_slice(json).map_err(|e| OciError::BadCredentials(format!("not a docker config: {e}")))?;
    let host_of = |key: &str| {
        let k = key.trim_start_matches("https://").trim_start_matches("http://");
        k.split('/').next().unwrap_or(k).to_string()
    };
    let Some(entry) = cfg.auths.iter().find(|(k, _)| host_of(k) == registry).map(|(_, v)| v) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &entry.identitytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(auth) = &entry.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| OciError::BadCredentials(format!("auth for {registry} is not base64: {e}")))?;
        let text = String::from_utf8(raw).map_err(|_| OciError::BadCredentials("auth is not UTF-8".into()))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| OciError::BadCredentials(format!("auth for {registry} is not user:password")))?;
        return Ok(RegistryAuth::Basic(u.into(), p.into()));
    }
    Ok(RegistryAuth::Anonymous)
}

/// Reads a Secret; failing to is `SecretUnavailable` (retried: it may be written soon).
async fn get_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    what: &str,
) -> Result<k8s_openapi::api::core::v1::Secret, OciError> {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), namespace);
    secrets.get(name).await.map_err(|e| OciError::SecretUnavailable(format!("{what} {namespace}/{name}: {e}")))
}

/// Credentials from a `kubernetes.io/dockerconfigjson` (or `.dockercfg`) Secret for `registry`.
pub async fn auth_from_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    registry: &str,
) -> Result<RegistryAuth, OciError> {
    let err = |m: String| OciError::BadCredentials(format!("secret {namespace}/{name}: {m}"));
    let secret = get_secret(client, namespace, name, "pull secret").await?;
    let data = secret.data.unwrap_or_default();
    let raw = data
        .get(".dockerconfigjson")
        .or_else(|| data.get(".dockercfg"))
        .ok_or_else(|| err("has no .dockerconfigjson key".into()))?;
    auth_from_docker_config(&raw.0, registry)
}

/// The text under `key` of Secret `namespace/name` (a CA bundle copy's `ca.crt`).
pub async fn secret_text(client: &kube::Client, namespace: &str, name: &str, key: &str) -> Result<String, OciError> {
    let err = |m: String| OciError::BadCaBundle(format!("secret {namespace}/{name}: {m}"));
    let secret = get_secret(client, namespace, name, "CA bundle").await?;
    let raw = secret.data.unwrap_or_default().remove(key).ok_or_else(|| err(format!("has no {key} key")))?;
    String::from_utf8(raw.0).map_err(|_| err(format!("{key} is not UTF-8")))
}

/// Whether the registry's answer is worth asking again at once: a server error or throttling.
/// Debian's docker-registry (distribution 2.8, filesystem storage) rewrites a tag's link file in
/// place, so reading a tag while a push rewrites it answers 500 "invalid checksum digest format"
/// for that moment (about 1 read in 6 while four writers rewrite one tag, on this machine).
pub fn answered_busy(e: &OciDistributionError) -> bool {
    matches!(e, OciDistributionError::ServerError { code, .. } if *code >= 500 || *code == 429)
}

/// Attempts [`patiently`] makes in all; the waits between them add up to 3.1 s.
const BUSY_ATTEMPTS: u32 = 6;

/// Runs `call` again while the registry [`answered_busy`], waiting 100 ms, then twice as long each
/// time; other errors, and the last busy answer, are returned as they are. `call` must be safe to
/// repeat (reads, uploads of content-addressed blobs, writes of whole manifests).
pub async fn patiently<T, F, Fut>(mut call: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut wait = std::time::Duration::from_millis(100);
    for _ in 1..BUSY_ATTEMPTS {
        match call().await {
            Err(e) if answered_busy(&e) => {
                tracing::debug!(error = %e, ?wait, "the registry answered busy; asking again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            done => return done,
        }
    }
    call().await
}

/// A model version read from the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Digest of what the tag pointed at (the index, or a lone manifest).
    pub digest: String,
    /// Its variants.
    pub variants: Vec<VariantInfo>,
}

/// Reads `<repository>:<tag>` or `<repository>@<digest>`: an image index (one entry per variant) or
/// a single manifest (one variant, e.g. an ORAS artifact).
pub async fn resolve(client: &oci_client::Client, auth: &RegistryAuth, reference: &str) -> Result<Resolved, OciError> {
    resolve_reference(client, auth, &parse_reference(reference)?).await
}

/// `repository` (`host[:port]/path`) at `tag_or_digest` (a digest has a `:`, which no tag has),
/// made from its parts without parsing: for a repository and version the API server has already
/// checked (the ModelRollout schema's rules), or a digest a registry gave. oci-spec's parser
/// compiles its reference regex on first use — 5.4 MiB of heap, held for the life of the process
/// (its tag rule is a Unicode `\w` repeated up to 128 times), measured in the controller with
/// heaptrack. The controller resolves through this; commands that take references from a user
/// (`peat push`, the agent's artifact) keep the parser's checks.
pub fn reference_to(repository: &str, tag_or_digest: &str) -> Reference {
    let (registry, path) = repository.split_once('/').unwrap_or((repository, ""));
    if tag_or_digest.contains(':') {
        Reference::with_digest(registry.into(), path.into(), tag_or_digest.into())
    } else {
        Reference::with_tag(registry.into(), path.into(), tag_or_digest.into())
    }
}

/// [`resolve`] of a reference already made.
pub async fn resolve_reference(
    client: &oci_client::Client,
    auth: &RegistryAuth,
    r: &Reference,
) -> Result<Resolved, OciError> {
    let reference = &r.whole();
    let (manifest, digest) =
        patiently(|| client.pull_manifest(r, auth)).await.map_err(|e| OciError::from_client(reference, e))?;
    let variants = match &manifest {
        OciManifest::ImageIndex(index) => {
            variants_from_index(index).map_err(|source| OciError::Layout { reference: reference.into(), source })?
        }
        OciManifest::Image(m) => vec![
            variant_from_manifest(m, &digest)
                .map_err(|source| OciError::Layout { reference: reference.into(), source })?,
        ],
    };
    Ok(Resolved { digest, variants })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_made_from_parts_equal_the_parsed_ones() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for repo in ["127.0.0.1:5000/models/vision", "registry.example.com/team/models/vision", "localhost/m"] {
            assert_eq!(reference_to(repo, "1.2.0-rc.1"), parse_reference(&format!("{repo}:1.2.0-rc.1")).unwrap());
            assert_eq!(reference_to(repo, &digest), parse_reference(&format!("{repo}@{digest}")).unwrap());
        }
        assert_eq!(reference_to("docker.io/acme/vision", "1.0.0").resolve_registry(), "index.docker.io");
    }

    fn answer(code: u16) -> OciDistributionError {
        OciDistributionError::ServerError { code, url: "http://127.0.0.1/v2/".into(), message: "m".into() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_registry_is_asked_again_and_other_answers_are_final() {
        let calls = std::cell::Cell::new(0);
        let busy_twice = patiently(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n <= 2 { Err(answer(500)) } else { Ok(n) } }
        })
        .await;
        assert_eq!(busy_twice.unwrap(), 3);

        calls.set(0);
        let throttled_always = patiently(|| {
            calls.set(calls.get() + 1);
            async { Err::<(), _>(answer(429)) }
        })
        .await;
        assert!(matches!(throttled_always, Err(OciDistributionError::ServerError { code: 429, .. })));
        assert_eq!(calls.get(), BUSY_ATTEMPTS);

        calls.set(0);
        let missing = patiently(|| {
            calls.set(calls.get() + 1);
            async { Err::<(), _>(answer(404)) }
        })
        .await;
        assert!(missing.is_err());
        assert_eq!(calls.get(), 1, "a 404 is an answer, not a busy registry");
        assert!(!answered_busy(&answer(401)) && answered_busy(&answer(503)));
    }

    #[test]
    fn docker_config_credentials() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("robot:s3cret");
        let json = format!(
            r#"{{"auths": {{"https://reg.example:5000/v1/": {{"auth": "{b64}"}}, "other": {{"username": "u", "password": "p"}}}}}}"#
        );
        assert_eq!(
            format!("{:?}", auth_from_docker_config(json.as_bytes(), "reg.example:5000").unwrap()),
            format!("{:?}", RegistryAuth::Basic("robot".into(), "s3cret".into()))
        );
        assert!(
            matches!(auth_from_docker_config(json.as_bytes(), "other").unwrap(), RegistryAuth::Basic(u, _) if u == "u")
        );
        assert!(matches!(auth_from_docker_config(json.as_bytes(), "nowhere").unwrap(), RegistryAuth::Anonymous));
        assert!(auth_from_docker_config(b"not json", "x").is_err());
        let bad = r#"{"auths": {"x": {"auth": "%%%"}}}"#;
        assert!(matches!(auth_from_docker_config(bad.as_bytes(), "x"), Err(OciError::BadCredentials(_))));
    }
}
