//! brickfs-csi: a Container Storage Interface driver (spec v1, gRPC over a unix socket), so
//! that a Kubernetes PersistentVolumeClaim gets a brickfs share on whichever node its pod runs.
//!
//! - Identity: always.
//! - Controller (`--controller`): creates, expands, lists and deletes claims through the
//!   metadata group, as a whole volume per claim (the provisioning API's logic, in process)
//!   or as a directory with a quota in a shared volume. A claim's capacity is always a quota:
//!   on the volume's root, or on the claim's directory.
//! - Node (`--node-id`): NodeStage starts `mountd --daemon` at the staging path (its own
//!   process, not a child of the plugin: a restarted plugin finds the mount serving and adopts
//!   it); NodePublish bind-mounts the staged mount (or the claim's directory in it) at the
//!   pod's path, read-only when asked.
//!
//! Every call is idempotent and answers the spec's status codes.

pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("csi.v1");
}

pub mod cluster;
mod controller;
mod node;
pub mod spec;

use brickfs_client::{MetaClient, MetaClientOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The plugin's name (GetPluginInfo; the CSIDriver object's name).
pub const DRIVER_NAME: &str = "csi.brickfs.io";

/// How the driver is started.
#[derive(Clone, Debug)]
pub struct Config {
    /// Metadata group members.
    pub meta: Vec<SocketAddr>,
    /// Serve the Controller service.
    pub controller: bool,
    /// Serve the Node service as this node.
    pub node_id: Option<String>,
    /// Where the node keeps its per-volume client credentials (0600).
    pub state_dir: PathBuf,
    /// The mountd executable NodeStage starts.
    pub mountd: PathBuf,
    /// The credential the driver holds (`--credential-file`): the admin credential for the
    /// controller; the node plugin issues each volume's client credential with it.
    pub credential_file: Option<PathBuf>,
    /// The cluster CA, given to every mount.
    pub ca_file: Option<PathBuf>,
}

/// The metadata client every service shares.
pub fn meta_client(cfg: &Config) -> MetaClient {
    MetaClient::new(
        cfg.meta.clone(),
        MetaClientOptions {
            client_name: format!(
                "brickfs-csi:{}",
                cfg.node_id.as_deref().unwrap_or("controller")
            ),
            ..MetaClientOptions::default()
        },
    )
}

/// Serves the CSI services `cfg` names on the unix socket `socket` until `stop` resolves.
pub async fn serve(
    cfg: Config,
    socket: &Path,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if socket.exists() {
        // A socket left by a plugin that was killed: nothing listens on it any more.
        std::fs::remove_file(socket)
            .with_context(|| format!("remove the old socket {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("make {}", parent.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("listen on {}", socket.display()))?;
    let meta = meta_client(&cfg);
    let identity = pb::identity_server::IdentityServer::new(Identity {
        controller: cfg.controller,
    });
    let mut router = tonic::transport::Server::builder().add_service(identity);
    if cfg.controller {
        router = router.add_service(pb::controller_server::ControllerServer::new(
            controller::Controller::new(meta.clone()),
        ));
    }
    if let Some(node_id) = cfg.node_id.clone() {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("make {}", cfg.state_dir.display()))?;
        let n = node::NodeService::new(meta, node_id, &cfg);
        n.adopt();
        router = router.add_service(pb::node_server::NodeServer::new(n));
    }
    tracing::info!(
        socket = %socket.display(),
        controller = cfg.controller,
        node = cfg.node_id.as_deref().unwrap_or("-"),
        "brickfs-csi serving"
    );
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop,
        )
        .await
        .context("serve gRPC")?;
    Ok(())
}

struct Identity {
    controller: bool,
}

#[tonic::async_trait]
impl pb::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: tonic::Request<pb::GetPluginInfoRequest>,
    ) -> Result<tonic::Response<pb::GetPluginInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: tonic::Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::GetPluginCapabilitiesResponse>, tonic::Status> {
        use pb::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
        let mut capabilities = vec![pb::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        }];
        if self.controller {
            capabilities.push(pb::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            });
        }
        Ok(tonic::Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _: tonic::Request<pb::ProbeRequest>,
    ) -> Result<tonic::Response<pb::ProbeResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ProbeResponse {
            ready: Some(true),
        }))
    }
}

/// A gRPC channel to a driver's unix socket (for tests and tools; the kubelet and the
/// sidecars bring their own).
pub async fn connect(socket: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(channel)
}
pub use tonic;
