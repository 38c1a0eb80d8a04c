//! What the agent's loop and its transfer tasks share.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::{Client, ResourceExt};
use oci_client::secrets::RegistryAuth;

use super::capabilities::Capabilities;
use super::metrics::Metrics;
use super::options::Options;
use super::store::Store;
use super::transfer::{self, RateLimiter, Source, TransferError};
use crate::api::ModelDeployment;
use crate::api::shared::pull_secret_copy_name;
use crate::oci::client::{Clients, OciError, auth_from_secret, parse_reference, secret_text};

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "peat-agent";

/// Shared by the loop and the transfer tasks.
pub(crate) struct Agent {
    pub(super) client: Client,
    pub(super) opts: Options,
    pub(super) store: Store,
    /// What the ModelNode reports; changes when the Node's capability annotations do.
    pub(super) caps: Mutex<Capabilities>,
    pub(super) limiter: Option<RateLimiter>,
    pub(super) metrics: Metrics,
    /// Registry clients by registry and credentials.
    pub(super) clients: Clients,
    /// Layers being downloaded (one writer per digest).
    pub(super) in_flight: transfer::InFlight,
    /// Layer digests of each running transfer's plan: garbage collection keeps them.
    pub(super) pinned: Mutex<HashMap<String, HashSet<String>>>,
    /// (model, version) the node's ModelDeployments ask for, as of the loop's last pass.
    pub(super) wanted: Mutex<crate::agent::store::Versions>,
    /// Serializes changes of the store's model directories (activation, pruning, collection).
    pub(super) store_lock: tokio::sync::Mutex<()>,
    /// Wakes the heartbeat early (the inventory changed).
    pub(super) inventory_changed: tokio::sync::Notify,
    /// What the prober last saw of the model servers, by deployment key.
    pub(super) serving: super::serving::Observations,
}

impl Agent {
    pub(super) async fn source_for(&self, md: &ModelDeployment) -> Result<Source, TransferError> {
        let r = parse_reference(&md.spec.artifact)?;
        let registry = r.resolve_registry().to_string();
        let ns = md.namespace().unwrap_or_default();
        let auth = match (&md.spec.pull_secret, &self.opts.secret_namespace) {
            (Some(name), Some(copies)) => {
                let copy = pull_secret_copy_name(&ns, name);
                // A missing copy is retried (SecretUnavailable): the controller may not have written it yet.
                auth_from_secret(&self.client, copies, &copy, &registry).await.map_err(|e| {
                    let about = format!("the controller's copy of pull secret {ns}/{name}");
                    match e {
                        OciError::SecretUnavailable(m) => OciError::SecretUnavailable(format!("{about}: {m}")),
                        OciError::BadCredentials(m) => OciError::BadCredentials(format!("{about}: {m}")),
                        other => other,
                    }
                })?
            }
            (Some(name), None) => auth_from_secret(&self.client, &ns, name, &registry).await?,
            (None, _) => RegistryAuth::Anonymous,
        };
        let ca_bundle = match (&md.spec.ca_bundle_secret, &self.opts.secret_namespace) {
            (Some(name), Some(copies)) => Some(secret_text(&self.client, copies, name, "ca.crt").await?),
            (Some(name), None) => {
                let why = format!(
                    "the CA bundle copy {name} is in the controller's namespace: start the agent with --secret-namespace"
                );
                return Err(OciError::BadCaBundle(why).into());
            }
            (None, _) => None,
        };
        let client = self.clients.get(&registry, md.spec.insecure, ca_bundle.as_deref(), &auth)?;
        Ok(Source { client, auth })
    }
}
