//! The `brickfs` admin CLI.

fn main() -> std::process::ExitCode {
    restore_sigpipe();
    brickfs_cli::main()
}

/// Rust starts programs with SIGPIPE ignored, so printing to a closed pipe
/// (`brickfs volume heal VOL info | head`) makes `println!` panic. Like other command-line
/// tools, the CLI is ended by the signal instead.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first in main, before any thread starts; SIG_DFL installs no handler
    // code of ours.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
