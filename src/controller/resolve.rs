//! resolve: a rollout's source → the pinned index digest and its variants.
//!
//! A tag is read from the registry once per version and pinned in `status.resolvedDigest`; after
//! that the index is read by digest, and indexes by digest are immutable, so they are cached: a
//! registry outage does not disturb a rollout whose version is already resolved. The cache is keyed
//! by the credentials too: a rollout whose pull secret the registry refuses never resolves from what
//! another namespace's credentials read. The pull secret is read at each resolution (a changed one
//! triggers a reconcile, see `watches`), so a rotated secret is used at once, with a client of its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::ResourceExt;
use tokio::time::Instant;

use oci_client::secrets::RegistryAuth;

use crate::api::ModelRollout;
use crate::oci::Resolved;
use crate::oci::client::{Clients, OciError, auth_fingerprint, auth_from_secret, reference_to, resolve_reference};

/// Why a source could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The registry said no, or could not be reached.
    #[error(transparent)]
    Registry(#[from] OciError),
    /// The pull secret could not be read.
    #[error("pull secret {name}: {message}")]
    PullSecret {
        /// Its name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl ResolveError {
    /// A CamelCase reason for the Ready condition.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::Registry(OciError::NotFound(_)) => "VersionNotFound",
            ResolveError::Registry(OciError::Unreachable { .. }) => "RegistryUnreachable",
            ResolveError::Registry(OciError::Unauthorized { .. }) => "RegistryUnauthorized",
            ResolveError::Registry(OciError::Layout { .. }) => "InvalidArtifact",
            ResolveError::Registry(OciError::BadReference { .. }) => "InvalidReference",
            ResolveError::Registry(OciError::BadCaBundle(_)) => "CaBundleUnusable",
            ResolveError::Registry(_) => "RegistryError",
            ResolveError::PullSecret { .. } => "PullSecretUnusable",
        }
    }
}

/// The first look at a tag again after it was read; each later one waits twice as long, up to
/// [`TAG_RECHECK_MAX`].
pub const TAG_RECHECK_FIRST: Duration = Duration::from_secs(10);
/// The longest wait between two looks at a tag while a node waits for a variant.
pub const TAG_RECHECK_MAX: Duration = Duration::from_secs(300);

/// What a version's tag says now, next to the index pinned for it.
#[derive(Debug)]
pub enum TagNow {
    /// Not due for a look, unchanged, or unreadable: the pin stands.
    Same,
    /// The tag's index keeps every pinned variant byte for byte and adds some: it may replace the pin.
    Extended(Resolved),
    /// The tag moved to an index that changes pinned variants (said once per digest): the pin stands.
    Moved(String),
}

/// When to look at a rollout's tag again.
struct Recheck {
    due: Instant,
    attempts: u32,
    moved_reported: Option<String>,
}

/// Resolves sources, caching indexes by (credentials, digest) and clients per (registry, credentials).
#[derive(Default)]
pub struct Resolver {
    /// By `<credentials fingerprint>|<repository>@<digest>`.
    by_digest: Mutex<HashMap<String, Resolved>>,
    clients: Clients,
    /// By `uid/version`: the tag's next look while a node waits for a variant.
    rechecks: Mutex<HashMap<String, Recheck>>,
}

/// Names the credentials and the trusted CAs a read was made with (not the secrets themselves).
fn access_fingerprint(rollout: &ModelRollout, auth: &RegistryAuth) -> String {
    let ca = rollout.spec.source.ca_bundle.as_deref().map(crate::api::shared::ca_bundle_copy_name);
    format!("{}|{}", auth_fingerprint(auth), ca.unwrap_or_default())
}

fn recheck_key(rollout: &ModelRollout, version: &str) -> String {
    format!("{}/{version}", rollout.uid().unwrap_or_default())
}

impl Resolver {
    /// The rollout's registry and the credentials its pull secret holds for it.
    async fn access(
        &self,
        client: &kube::Client,
        rollout: &ModelRollout,
    ) -> Result<(String, RegistryAuth), ResolveError> {
        let repo = &rollout.spec.source.repository;
        let registry = reference_to(repo, "latest").resolve_registry().to_string();
        let Some(name) = rollout.spec.source.pull_secret.as_deref() else {
            return Ok((registry, RegistryAuth::Anonymous));
        };
        let ns = rollout.metadata.namespace.as_deref().unwrap_or("default");
        let auth = auth_from_secret(client, ns, name, &registry).await.map_err(|e| match e {
            OciError::BadCredentials(message) | OciError::SecretUnavailable(message) => {
                ResolveError::PullSecret { name: name.to_string(), message }
            }
            other => ResolveError::Registry(other),
        })?;
        Ok((registry, auth))
    }

    /// Reads `<repository>@<digest>` (cached) or `<repository>:<version>`.
    pub async fn resolve(
        &self,
        client: &kube::Client,
        rollout: &ModelRollout,
        version: &str,
        pinned_digest: Option<&str>,
    ) -> Result<Resolved, ResolveError> {
        let repo = &rollout.spec.source.repository;
        if let Some(d) = pinned_digest {
            let (_, auth) = self.access(client, rollout).await?;
            let key = format!("{}|{repo}@{d}", access_fingerprint(rollout, &auth));
            if let Some(hit) = self.by_digest.lock().expect("resolver lock").get(&key) {
                return Ok(hit.clone());
            }
        }
        let resolved = match pinned_digest {
            Some(d) => self.read(client, rollout, d).await?,
            None => {
                let resolved = self.read(client, rollout, version).await?;
                // Just read: should a node wait for a variant, the next look comes later.
                let first = Recheck { due: Instant::now() + TAG_RECHECK_FIRST, attempts: 0, moved_reported: None };
                self.rechecks.lock().expect("resolver lock").insert(recheck_key(rollout, version), first);
                resolved
            }
        };
        Ok(resolved)
    }

    /// Reads the rollout's repository at a version or digest from the registry (no cache), and
    /// caches the index by its digest.
    async fn read(
        &self,
        client: &kube::Client,
        rollout: &ModelRollout,
        tag_or_digest: &str,
    ) -> Result<Resolved, ResolveError> {
        let (registry, auth) = self.access(client, rollout).await?;
        let source = &rollout.spec.source;
        let oci = self.clients.get(&registry, source.insecure, source.ca_bundle.as_deref(), &auth)?;
        let resolved = resolve_reference(&oci, &auth, &reference_to(&source.repository, tag_or_digest)).await?;
        let key = format!("{}|{}@{}", access_fingerprint(rollout, &auth), source.repository, resolved.digest);
        self.by_digest.lock().expect("resolver lock").insert(key, resolved.clone());
        Ok(resolved)
    }

    /// Reads `<repository>:<version>` again, when due, for a rollout with a node that no variant of
    /// the pinned index fits: the variants of a version may be pushed one after another (one CI job
    /// each), and the tag may have been read between two pushes. Looks [`TAG_RECHECK_FIRST`] after
    /// the tag was read, then twice as long each time up to [`TAG_RECHECK_MAX`]; returns what the
    /// tag says and when the next look is due.
    pub async fn recheck_tag(
        &self,
        client: &kube::Client,
        rollout: &ModelRollout,
        version: &str,
        pinned: &Resolved,
    ) -> (TagNow, Duration) {
        let key = recheck_key(rollout, version);
        let now = Instant::now();
        let wait = {
            let mut rechecks = self.rechecks.lock().expect("resolver lock");
            let e = rechecks.entry(key.clone()).or_insert(Recheck { due: now, attempts: 0, moved_reported: None });
            if now < e.due {
                return (TagNow::Same, e.due - now);
            }
            e.attempts += 1;
            let wait = TAG_RECHECK_FIRST.saturating_mul(1 << (e.attempts - 1).min(8)).min(TAG_RECHECK_MAX);
            e.due = now + wait;
            wait
        };
        let fresh = match self.read(client, rollout, version).await {
            Ok(fresh) if fresh.digest != pinned.digest => fresh,
            Ok(_) => return (TagNow::Same, wait),
            Err(e) => {
                tracing::debug!(error = %e, "re-reading the tag failed: the pinned index stands");
                return (TagNow::Same, wait);
            }
        };
        let mut rechecks = self.rechecks.lock().expect("resolver lock");
        let Some(e) = rechecks.get_mut(&key) else { return (TagNow::Same, wait) };
        if crate::plan::variant::extends(&pinned.variants, &fresh.variants) {
            // More variants may follow soon: look again as after a first read.
            e.attempts = 0;
            e.due = now + TAG_RECHECK_FIRST;
            (TagNow::Extended(fresh), TAG_RECHECK_FIRST)
        } else if e.moved_reported.as_deref() == Some(fresh.digest.as_str()) {
            (TagNow::Same, wait)
        } else {
            e.moved_reported = Some(fresh.digest.clone());
            (TagNow::Moved(fresh.digest), wait)
        }
    }

    /// Forgets a deleted rollout's schedules.
    pub fn forget(&self, uid: &str) {
        let prefix = format!("{uid}/");
        self.rechecks.lock().expect("resolver lock").retain(|k, _| !k.starts_with(&prefix));
    }
}
