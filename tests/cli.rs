//! The `brickfs` CLI against a real one-node cluster: cluster init, peer add, volume create
//! with GlusterFS grammar, info as JSON, options, start/stop/delete rules, and clear errors
//! with the right exit codes for bad specs and bricks already in use.

mod common;

use brickfs_testkit::Brickd;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let bricks = [dir.path().join("b0"), dir.path().join("b1")];
    let node = Brickd::start(
        &brickd_bin(),
        &dir.path().join("node"),
        &bricks,
        &["--meta"],
    )
    .unwrap();
    let addr = node.addr().to_string();
    let b0 = format!("{addr}:{}", bricks[0].display());
    let b1 = format!("{addr}:{}", bricks[1].display());
    let with = |rest: &[&str]| -> Vec<String> {
        ["--meta", addr.as_str()]
            .iter()
            .chain(rest)
            .map(|s| s.to_string())
            .collect()
    };

    must_ok(&["cluster", "init", &addr]);
    let out = must_ok(&with(&["peer", "add", &addr]));
    assert!(out.contains("with 2 bricks"), "{out}");
    must_ok(&with(&["volume", "create", "v", "replica", "2", &b0, &b1]));

    let info: serde_json::Value =
        serde_json::from_str(&must_ok(&with(&["--json", "volume", "info", "v"]))).unwrap();
    assert_eq!(info["type_name"], "replicated");
    assert_eq!(info["bricks"].as_array().unwrap().len(), 2);
    assert_eq!(info["sets"][0]["epoch"], 1);
    assert_eq!(info["status"], "Created");

    // Output into a pipe nobody reads any more (`| head`) ends the CLI quietly, as the
    // signal ends other tools: no panic.
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brickfs"))
        .args(with(&["volume", "heal", "v", "info"]))
        .stdout(std::process::Stdio::from(w))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(nix::libc::SIGPIPE), "{err}");

    // A spec that does not divide, and a brick already in use: clear errors, right exit codes.
    let (code, _, err) = brickfs(&with(&["volume", "create", "w", "replica", "3", &b0]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be split"), "{err}");
    let (code, _, err) = brickfs(&with(&["volume", "create", "w", &b0]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already in volume"), "{err}");
    let (code, _, err) = brickfs(&["volume", "list"]);
    assert_eq!(code, 2, "{err}");

    must_ok(&with(&["volume", "start", "v"]));
    must_ok(&with(&["volume", "set", "v", "stripe-unit", "1MiB"]));
    let out = must_ok(&with(&["volume", "get", "v", "stripe-unit"]));
    assert_eq!(out.trim(), "stripe-unit 1048576");
    let (code, _, err) = brickfs(&with(&["volume", "set", "v", "quorum", "9"]));
    assert_eq!(code, 1);
    assert!(err.contains("set width 2"), "{err}");
    let out = must_ok(&with(&["volume", "status", "v"]));
    assert_eq!(out.matches(" Y ").count(), 2, "{out}");
    let (code, _, err) = brickfs(&with(&["volume", "delete", "v"]));
    assert_eq!(code, 1);
    assert!(err.contains("stop volume"), "{err}");
    must_ok(&with(&["volume", "stop", "v"]));
    must_ok(&with(&["volume", "delete", "v"]));
    assert!(must_ok(&with(&["volume", "list"])).contains("No volumes"));
    // The node reports heartbeats to its own member once it is a peer.
    must_wait_for(
        "a heartbeat",
        std::time::Duration::from_secs(20),
        || async {
            let (code, out, _) = brickfs(&with(&["--json", "peer", "list"]));
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (code == 0 && v[0][0]["last_heartbeat_ms"].as_u64()? > 0).then_some(())
        },
    )
    .await;
    assert!(must_ok(&with(&["peer", "list"])).contains("  up"));
    let status: serde_json::Value =
        serde_json::from_str(&must_ok(&["--json", "cluster", "status", &addr])).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 1);
    assert_eq!(node.error_lines(), 0, "{}", node.log_tail(20));
}
