//! brickd refuses to start on a folder that is not its brick (not formatted, a disk that is
//! not mounted, another brick) and on a bad config, with a clear message and a non-zero exit.

mod common;

use common::brickd_bin;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs brickd to completion (it must exit by itself within the deadline) and returns its
/// exit code and stderr.
fn run_brickd(args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(brickd_bin())
        .args(args)
        .env_remove("BRICKFS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("brickd {args:?} did not exit");
        }
    }
}

#[test]
fn refuses_unformatted_or_foreign_bricks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let listen = ["--listen", "127.0.0.1:0", "--data-dir", data];

    // An empty folder without --init: perhaps an unmounted disk.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, err) = run_brickd(&[&listen[..], &["--brick", empty.to_str().unwrap()]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not mounted"), "{err}");

    // A folder with other files, even with --init.
    let used = dir.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("precious"), b"data").unwrap();
    let (code, err) =
        run_brickd(&[&listen[..], &["--init", "--brick", used.to_str().unwrap()]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(used.join("precious")).unwrap(), b"data");

    // A config that expects a brick id other than the one on disk.
    let brick = dir.path().join("brick");
    brickfs_brick::ident::load_or_format(&brick, true).unwrap();
    let config = dir.path().join("brickd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {data:?}\n[[brick]]\npath = {:?}\nid = \"b0000000000000001\"\n",
            brick.to_str().unwrap()
        ),
    )
    .unwrap();
    let (code, err) = run_brickd(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("expected b0000000000000001"), "{err}");
}

#[test]
fn bad_config_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("brickd.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nbricks = [\"/x\"]\n").unwrap();
    let (code, err) = run_brickd(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field"), "{err}");

    let (code, err) = run_brickd(&["--listen", "not-an-address"]);
    assert_eq!(code, Some(2), "{err}");

    std::fs::write(&config, "[limits]\ndata_max = \"12 parsecs\"\n").unwrap();
    let (code, err) = run_brickd(&["--config", config.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown size unit"), "{err}");
}
