//! resolve: a rollout's source → the pinned index digest and its variants.
//!
//! A tag is read from the registry once per version and pinned in `status.resolvedDigest`; after
//! that the index is read by digest, and indexes by digest are immutable, so they are cached: a
//! registry outage does not disturb a rollout whose version is already resolved.

use std::collections::HashMap;
use std::sync::Mutex;

use oci_client::secrets::RegistryAuth;

use crate::api::ModelRollout;
use crate::oci::client::{OciError, RegistryAccess, auth_from_secret, parse_reference};
use crate::oci::{Resolved, resolve};

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
            ResolveError::Registry(_) => "RegistryError",
            ResolveError::PullSecret { .. } => "PullSecretUnusable",
        }
    }
}

/// Resolves sources, caching indexes by digest and clients per registry.
#[derive(Default)]
pub struct Resolver {
    by_digest: Mutex<HashMap<String, Resolved>>,
    clients: Mutex<HashMap<(String, bool), oci_client::Client>>,
}

impl Resolver {
    fn client(&self, registry: &str, insecure: bool) -> oci_client::Client {
        let mut clients = self.clients.lock().expect("resolver lock");
        clients
            .entry((registry.to_string(), insecure))
            .or_insert_with(|| RegistryAccess { insecure, auth: RegistryAuth::Anonymous }.client())
            .clone()
    }

    async fn auth(
        &self,
        client: &kube::Client,
        rollout: &ModelRollout,
        registry: &str,
    ) -> Result<RegistryAuth, ResolveError> {
        let Some(name) = rollout.spec.source.pull_secret.as_deref() else { return Ok(RegistryAuth::Anonymous) };
        let ns = rollout.metadata.namespace.as_deref().unwrap_or("default");
        auth_from_secret(client, ns, name, registry).await.map_err(|e| match e {
            OciError::BadCredentials(message) => ResolveError::PullSecret { name: name.to_string(), message },
            other => ResolveError::Registry(other),
        })
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
        if let Some(d) = pinned_digest
            && let Some(hit) = self.by_digest.lock().expect("resolver lock").get(&format!("{repo}@{d}"))
        {
            return Ok(hit.clone());
        }
        let reference = match pinned_digest {
            Some(d) => format!("{repo}@{d}"),
            None => format!("{repo}:{version}"),
        };
        let registry = parse_reference(&reference)?.resolve_registry().to_string();
        let auth = self.auth(client, rollout, &registry).await?;
        let oci = self.client(&registry, rollout.spec.source.insecure);
        let resolved = resolve(&oci, &auth, &reference).await?;
        self.by_digest.lock().expect("resolver lock").insert(format!("{repo}@{}", resolved.digest), resolved.clone());
        Ok(resolved)
    }
}
