//! The CSI driver `models.peat.dev`: ephemeral inline volumes that mount a model of this node's
//! store read-only into a pod, instead of a hostPath (which Pod Security `baseline` forbids).
//!
//! ```yaml
//! volumes: [{name: model, csi: {driver: models.peat.dev, readOnly: true, volumeAttributes: {model: M}}}]
//! ```
//! mounts the model's directory: `current/` in it is the active version, and follows activations
//! and rollbacks (the link is relative, so it resolves inside the mount). A pod whose model is not
//! active on its node yet waits in ContainerCreating: the publish fails with a message the kubelet
//! shows as a `FailedMount` Event, and it retries.
//!
//! The agent serves CSI Identity and Node on `<kubelet dir>/plugins/models.peat.dev/csi.sock`; the
//! chart's `peat-csi-registrar` sidecar (`registrar/`, Go) registers that socket with the kubelet
//! (the kubelet's plugin watcher sends an HTTP/2 `:authority` that tonic's h2 refuses; its CSI
//! client does not). The kubelet calls only the Node RPCs (no staging: NodeGetCapabilities says none).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use super::context::Agent;
use super::store::is_safe_component;

/// Generated from `proto/` by build.rs.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    /// CSI spec v1.
    pub mod csi {
        tonic::include_proto!("csi.v1");
    }
}

use proto::csi::identity_server::{Identity, IdentityServer};
use proto::csi::node_server::{Node, NodeServer};
use proto::csi::*;

/// The driver's name (the `CSIDriver` object's, and `csi.driver` in pods).
pub const DRIVER: &str = "models.peat.dev";
/// The volume attribute naming the model.
pub const MODEL_ATTRIBUTE: &str = "model";
/// The driver's socket, under the kubelet's directory (where the registrar says it is).
fn socket(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir.join("plugins").join(DRIVER).join("csi.sock")
}

/// The driver's services, for one node.
#[derive(Clone)]
pub struct Driver {
    agent: Arc<Agent>,
}

impl Driver {
    fn node(&self) -> &str {
        &self.agent.opts.node_name
    }
}

/// The model a publish asks for, checked: a pod's author chose it.
fn requested_model(context: &HashMap<String, String>) -> Result<&str, Status> {
    let model = context.get(MODEL_ATTRIBUTE).map(String::as_str).ok_or_else(|| {
        Status::invalid_argument(format!("volumeAttributes.{MODEL_ATTRIBUTE} is required: the model to mount"))
    })?;
    let dns_label = model.len() <= 63
        && model.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !model.starts_with('-')
        && !model.ends_with('-');
    if !dns_label || !is_safe_component(model) {
        return Err(Status::invalid_argument(format!("{model:?} is no model name (a DNS-1123 label)")));
    }
    Ok(model)
}

fn is_mounted(target: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| Path::new(&p.replace("\\040", " ")) == target)
}

fn c_path(p: &Path) -> Result<std::ffi::CString, Status> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Status::invalid_argument(format!("{} has a NUL byte", p.display())))
}

/// Bind-mounts `source` on `target`, read-only (a bind mount takes its flags in a second call).
fn bind_read_only(source: &Path, target: &Path) -> Result<(), Status> {
    let (src, dst) = (c_path(source)?, c_path(target)?);
    let fail = |what: &str| {
        Status::internal(format!(
            "{what} {} on {}: {}",
            source.display(),
            target.display(),
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: mount(2) with valid C strings and no data.
    unsafe {
        if libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
            return Err(fail("bind-mounting"));
        }
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        if libc::mount(std::ptr::null(), dst.as_ptr(), std::ptr::null(), flags, std::ptr::null()) != 0 {
            let e = fail("making read-only");
            libc::umount2(dst.as_ptr(), libc::MNT_DETACH);
            return Err(e);
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Node for Driver {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let model = requested_model(&req.volume_context)?;
        if !req.readonly {
            return Err(Status::invalid_argument(format!(
                "the {DRIVER} volume of model {model} is read-only: set csi.readOnly: true"
            )));
        }
        let target = PathBuf::from(&req.target_path);
        if !target.is_absolute() {
            return Err(Status::invalid_argument("target_path must be absolute"));
        }
        let store = &self.agent.store;
        let Some(active) = store.current(model) else {
            // The kubelet retries (with backoff) and shows this as the pod's FailedMount Event.
            return Err(Status::unavailable(format!(
                "model {model} is not active on node {} yet: the pod starts once a ModelRollout brings it here \
                 (kubectl get modeldeployments -A -l peat.dev/model={model})",
                self.node()
            )));
        };
        let pod = req.volume_context.get("csi.storage.k8s.io/pod.name").cloned().unwrap_or_default();
        let namespace = req.volume_context.get("csi.storage.k8s.io/pod.namespace").cloned().unwrap_or_default();
        if is_mounted(&target) {
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
        bind_read_only(&store.model_dir(model), &target)?;
        info!(model, active, pod = %format!("{namespace}/{pod}"), target = %target.display(), "model volume mounted");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let target = PathBuf::from(request.into_inner().target_path);
        if is_mounted(&target) {
            let t = c_path(&target)?;
            // SAFETY: umount2 with a valid C string.
            if unsafe { libc::umount2(t.as_ptr(), 0) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(Status::internal(format!("unmounting {}: {e}", target.display())));
            }
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Status::internal(format!("removing {}: {e}", target.display()))),
        }
        info!(target = %target.display(), "model volume unmounted");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse { node_id: self.node().to_string(), ..Default::default() }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // None: no NodeStageVolume, no volume stats.
        Ok(Response::new(NodeGetCapabilitiesResponse::default()))
    }

    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("models.peat.dev has no staging"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("models.peat.dev has no staging"))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("models.peat.dev reports no volume stats"))
    }

    async fn node_get_volume_health(
        &self,
        _: Request<NodeGetVolumeHealthRequest>,
    ) -> Result<Response<NodeGetVolumeHealthResponse>, Status> {
        Err(Status::unimplemented("models.peat.dev reports no volume health"))
    }

    async fn node_get_storage_health(
        &self,
        _: Request<NodeGetStorageHealthRequest>,
    ) -> Result<Response<NodeGetStorageHealthResponse>, Status> {
        Err(Status::unimplemented("models.peat.dev reports no storage health"))
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("model volumes do not grow"))
    }
}

#[tonic::async_trait]
impl Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse::default()))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

/// Serves the driver on `<kubelet_dir>/plugins/models.peat.dev/csi.sock` until `shutdown`, then
/// removes the socket.
pub(crate) async fn serve(agent: Arc<Agent>, kubelet_dir: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    let socket = socket(kubelet_dir);
    let dir = socket.parent().expect("a socket in a directory");
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    // A socket of an earlier run.
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", socket.display()))?;
    info!(socket = %socket.display(), driver = DRIVER, "serving the CSI driver");
    let driver = Driver { agent };
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(driver.clone()))
        .add_service(NodeServer::new(driver))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown.cancelled())
        .await;
    let _ = std::fs::remove_file(&socket);
    result.map_err(|e| anyhow::anyhow!("the CSI driver's server: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_names_a_model_by_a_dns_label_and_nothing_else() {
        let ctx = |m: &str| HashMap::from([(MODEL_ATTRIBUTE.to_string(), m.to_string())]);
        assert_eq!(requested_model(&ctx("target-recognition")).unwrap(), "target-recognition");
        for bad in ["", "../etc", "a/b", "current", "Upper", "-x", "x-", ".hidden", &"a".repeat(64)] {
            let e = requested_model(&ctx(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let e = requested_model(&HashMap::new()).unwrap_err();
        assert!(e.message().contains("volumeAttributes.model is required"), "{}", e.message());
    }
}
