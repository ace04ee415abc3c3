//! The `brickfs-csi` executable: the Container Storage Interface driver (see the brickfs-csi
//! crate and docs/kubernetes.md).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "brickfs-csi",
    version,
    about = "The brickfs CSI driver (Kubernetes): Identity, Controller and Node services over a unix socket"
)]
struct Flags {
    /// The socket to serve: `unix:///csi/csi.sock` or a path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Metadata group members, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "BRICKFS_META", value_delimiter = ',', required = true)]
    meta: Vec<std::net::SocketAddr>,
    /// Serve the Controller service (the controller Deployment).
    #[arg(long)]
    controller: bool,
    /// Serve the Node service as this node (the node DaemonSet; Kubernetes' node name).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Where the node plugin keeps the client credentials it was issued (0600 files).
    #[arg(long, default_value = "/var/lib/brickfs-csi")]
    state_dir: std::path::PathBuf,
    /// The mountd executable NodeStage starts (as its own daemon process).
    #[arg(long, default_value = "mountd")]
    mountd: std::path::PathBuf,
    /// The driver's credential: the admin credential (`brickfs cluster credential admin`),
    /// with which the controller provisions and the node plugin gets each volume's client
    /// credential.
    #[arg(long, env = "BRICKFS_CREDENTIAL_FILE")]
    credential_file: Option<std::path::PathBuf>,
    /// The cluster CA certificate (`brickfs cluster ca`), given to every mount too.
    #[arg(long, env = "BRICKFS_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Log filter directives (default `info`; `BRICKFS_LOG` also works).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    brickd::telemetry::init_tracing("info", flags.log.as_deref());
    brickd::telemetry::install_panic_hook();
    if !flags.controller && flags.node_id.is_none() {
        eprintln!("brickfs-csi: give --controller, --node-id NODE, or both");
        return std::process::ExitCode::from(2);
    }
    if let Err(e) = brickfs_proto::rpc::use_credential_file(flags.credential_file.as_deref())
        .and_then(|()| brickfs_proto::tls::use_ca_file(flags.ca_file.as_deref()))
    {
        eprintln!("brickfs-csi: {e}");
        return std::process::ExitCode::from(2);
    }
    let socket = std::path::PathBuf::from(
        flags
            .endpoint
            .strip_prefix("unix://")
            .unwrap_or(&flags.endpoint),
    );
    let cfg = brickfs_csi::Config {
        meta: flags.meta,
        controller: flags.controller,
        node_id: flags.node_id,
        state_dir: flags.state_dir,
        mountd: flags.mountd,
        credential_file: flags.credential_file,
        ca_file: flags.ca_file,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("brickfs-csi: start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let stop = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("stopping (staged mounts keep serving)");
    };
    match rt.block_on(brickfs_csi::serve(cfg, &socket, stop)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("brickfs-csi failed: {e:#}");
            eprintln!("brickfs-csi: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
