//! Logging and the panic hook shared by the daemons.

use tracing_subscriber::EnvFilter;

/// Starts tracing to stderr. `filter` (or `BRICKFS_LOG`) overrides the default directives.
pub fn init_tracing(default_filter: &str, filter: Option<&str>) {
    let directives = filter
        .map(str::to_string)
        .or_else(|| std::env::var("BRICKFS_LOG").ok())
        .unwrap_or_else(|| default_filter.to_string());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Logs a panic and aborts: the daemon restarts in a known state and heal repairs the damage;
/// continuing could return wrong bytes.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(panic = %info, %backtrace, "panic, aborting");
        eprintln!("panic: {info}");
        std::process::abort();
    }));
}
