//! The `mountd` executable (also installed as `mount.brickfs` / `mount.fuse.brickfs`): parse
//! flags, start tracing, mount, and unmount on SIGTERM or Ctrl-C.

use clap::Parser;

#[derive(Parser)]
#[command(name = "mountd", version, about = "Mount a brickfs volume with FUSE")]
struct Flags {
    /// What to mount: HOST:PORT[,HOST:PORT...]/VOLUME (members of the metadata group).
    source: String,
    /// Where to mount it.
    mountpoint: std::path::PathBuf,
    /// FUSE dispatch threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Session lease in seconds: after this long without contact the cluster drops this
    /// mount's locks.
    #[arg(long, default_value_t = 30)]
    lease_secs: u64,
    /// Mount options as `mount -o` passes them (accepted for the mount helper; ignored).
    #[arg(short = 'o')]
    options: Option<String>,
    /// Log filter directives (default `info`; `BRICKFS_LOG` also works).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    brickd::telemetry::init_tracing("info", flags.log.as_deref());
    brickd::telemetry::install_panic_hook();
    let source = match mountd::Source::parse(&flags.source) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mountd: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(signals) = signals else {
        eprintln!("mountd: failed to start the signal runtime");
        return std::process::ExitCode::FAILURE;
    };
    std::thread::spawn(move || {
        signals.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        });
        let _ = stop_tx.send(());
    });
    let lease = std::time::Duration::from_secs(flags.lease_secs.max(1));
    match mountd::run(source, &flags.mountpoint, flags.threads, lease, stop_rx) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("failed to mount: {e:#}");
            eprintln!("mountd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
