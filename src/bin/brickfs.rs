//! The `brickfs` admin CLI.

fn main() -> std::process::ExitCode {
    brickfs_cli::main()
}
