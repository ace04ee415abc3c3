//! The `brickd` executable: parse flags, start tracing, install the panic hook, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let flags = brickd::config::Flags::parse();
    brickd::telemetry::init_tracing(brickd::config::defaults::LOG_FILTER, flags.log.as_deref());
    brickd::telemetry::install_panic_hook();
    let config = match brickd::config::Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("failed to load the configuration: {e:#}");
            eprintln!("brickd: invalid configuration: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if flags.check_config {
        eprintln!("{config:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    match brickd::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("failed to run: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
