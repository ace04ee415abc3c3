//! Prometheus metrics over real HTTP: brickd counts what it serves (per message kind: calls,
//! errors, bytes, a latency histogram) and shows its bricks, lease and Raft state; anything but
//! `GET /metrics` is a 404.

mod common;

use brickfs_client::{MetaClient, MetaClientOptions, admin};
use brickfs_proto::meta::AdminOp;
use brickfs_testkit::Brickd;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

/// One HTTP/1.1 request to `addr`: the status line and the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP reply");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of the sample `name` (with its labels, exactly as rendered).
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brickd_serves_prometheus_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = Brickd::start(
        &brickd_bin(),
        &dir.path().join("data"),
        &[dir.path().join("b0")],
        &["--meta", "--metrics-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let maddr = must_log_addr(&node, "metrics listening addr=").await;
    let meta = MetaClient::new(vec![node.addr()], MetaClientOptions::default());
    meta.admin(AdminOp::Init).await.unwrap();
    admin::peer_add(&meta, &client(), node.addr())
        .await
        .unwrap();
    must_serve_reads(node.addr()).await;
    let c = client();
    let brick = c.list_bricks(node.addr()).await.unwrap()[0].id;
    let data = pattern(3, 0, 100_000);
    c.write(node.addr(), brick, key(1, 0), 0, data.clone(), false)
        .await
        .unwrap();
    c.read(node.addr(), brick, key(1, 0), 0, 100_000)
        .await
        .unwrap();
    c.read(node.addr(), brick, key(2, 0), 0, 10)
        .await
        .unwrap_err();

    let body = must_wait_for(
        "a leader in the metrics",
        Duration::from_secs(30),
        || async {
            let (status, body) = tokio::task::spawn_blocking(move || http_get(maddr, "/metrics"))
                .await
                .unwrap();
            assert!(status.contains("200"), "{status}");
            (sample(&body, "brickd_raft_is_leader") == Some(1.0)).then_some(body)
        },
    )
    .await;
    let at_least = |name: &str, min: f64| {
        let v = sample(&body, name).unwrap_or_else(|| panic!("{name} missing:\n{body}"));
        assert!(v >= min, "{name} = {v}, expected at least {min}");
    };
    at_least("brickd_ops_total{op=\"Write\"}", 1.0);
    at_least("brickd_bytes_in_total{op=\"Write\"}", 100_000.0);
    at_least("brickd_ops_total{op=\"Read\"}", 2.0);
    at_least("brickd_bytes_out_total{op=\"Read\"}", 100_000.0);
    at_least("brickd_op_errors_total{op=\"Read\"}", 1.0);
    at_least("brickd_op_seconds_count{op=\"Write\"}", 1.0);
    at_least("brickd_op_seconds_bucket{op=\"Write\",le=\"+Inf\"}", 1.0);
    at_least("brickd_ops_total{op=\"MetaAdmin\"}", 1.0);
    at_least("brickd_raft_term", 1.0);
    assert_eq!(sample(&body, "brickd_lease_held"), Some(1.0));
    at_least("brickd_raft_commit_index", 1.0);
    let b = format!("{{brick=\"{brick}\"}}");
    at_least(&format!("brickd_brick_objects{b}"), 1.0);
    at_least(&format!("brickd_brick_avail_bytes{b}"), 1.0);
    assert_eq!(
        sample(&body, &format!("brickd_heal_journal_objects{b}")),
        Some(0.0)
    );
    assert!(body.contains("# TYPE brickd_op_seconds histogram"));

    let (status, _) = tokio::task::spawn_blocking(move || http_get(maddr, "/other"))
        .await
        .unwrap();
    assert!(status.contains("404"), "{status}");
}
