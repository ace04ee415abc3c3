//! The provisioning API over real HTTP: a volume of a durability class and size is created
//! from free bricks, listed, mounted with what the API says, and deleted; bad requests get
//! clear errors with the right status.

mod common;

use brickfs_client::{MetaClient, MetaClientOptions, admin};
use brickfs_proto::meta::AdminOp;
use brickfs_testkit::Brickd;
use common::*;
use mountd::is_mounted;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::Duration;

/// One request: the status code and the JSON body.
fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, text) = raw.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, serde_json::from_str(text).expect("a JSON body"))
}

async fn api(addr: std::net::SocketAddr, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (m, p) = (method.to_string(), path.to_string());
    let b = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    tokio::task::spawn_blocking(move || call(addr, &m, &p, &b))
        .await
        .unwrap()
}

/// Stops mountd by pid and undoes the mount, failures included.
struct MountGuard(std::process::Child, std::path::PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
        if is_mounted(&self.1) {
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_provisioned_mounted_and_deleted_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let bricks: Vec<_> = (0..4).map(|i| dir.path().join(format!("b{i}"))).collect();
    let node = Brickd::start(
        &brickd_bin(),
        &dir.path().join("node"),
        &bricks,
        &["--meta", "--api-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let at = must_log_addr(&node, "provisioning API listening addr=").await;
    let meta = MetaClient::new(vec![node.addr()], MetaClientOptions::default());
    meta.admin(AdminOp::Init).await.unwrap();
    admin::peer_add(&meta, &client(), node.addr())
        .await
        .unwrap();

    let req = json!({"name": "pvc-a", "size_bytes": 1 << 20, "class": "replicate-3"});
    let (status, v) = api(at, "POST", "/v1/volumes", req.clone()).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (v["type"].as_str(), v["bricks"].as_u64()),
        (Some("replicated"), Some(3))
    );
    assert_eq!(v["status"], "Started", "{v}");
    let source = v["mount"]["source"].as_str().unwrap().to_string();
    assert_eq!(source, format!("{}/pvc-a", node.addr()));

    // Refusals, each with its reason.
    let (status, v) = api(at, "POST", "/v1/volumes", req).await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = api(
        at,
        "POST",
        "/v1/volumes",
        json!({"name": "x", "size_bytes": 1, "class": "raid5"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("unknown class"),
        "{v}"
    );
    let (status, v) = api(at, "POST", "/v1/volumes", json!({"name": "x"})).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = api(
        at,
        "POST",
        "/v1/volumes",
        json!({"name": "x", "size_bytes": 1, "class": "disperse-4+2"}),
    )
    .await;
    assert_eq!(status, 507, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("needs 6 free bricks"),
        "{v}"
    );
    let (status, v) = api(
        at,
        "POST",
        "/v1/volumes",
        json!({"name": "x", "size_bytes": 1u64 << 62, "class": "distribute"}),
    )
    .await;
    assert_eq!(status, 507, "{v}");
    let (status, v) = api(at, "POST", "/v1/volumes/pvc-a/expand", Value::Null).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = api(
        at,
        "POST",
        "/v1/volumes/nope/expand",
        json!({"size_bytes": 1}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = api(at, "PUT", "/v1/volumes", Value::Null).await;
    assert_eq!(status, 405);
    let (status, _) = api(at, "GET", "/nothing", Value::Null).await;
    assert_eq!(status, 404);

    let (status, list) = api(at, "GET", "/v1/volumes", Value::Null).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, vec!["pvc-a"]);

    // Mounted as the API says, it holds files.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mountd"))
        .arg(&source)
        .arg(&mnt)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = MountGuard(child, mnt.clone());
    must_wait_for("the mount", Duration::from_secs(30), || async {
        is_mounted(&mnt).then_some(())
    })
    .await;
    let data = pattern(4, 0, 300_000);
    std::fs::write(mnt.join("f"), &data).unwrap();
    assert!(std::fs::read(mnt.join("f")).unwrap() == data);
    drop(guard);

    let (status, v) = api(at, "DELETE", "/v1/volumes/pvc-a", Value::Null).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = api(at, "GET", "/v1/volumes/pvc-a", Value::Null).await;
    assert_eq!(status, 404);
    let (status, _) = api(at, "DELETE", "/v1/volumes/pvc-a", Value::Null).await;
    assert_eq!(status, 404);
    // The list shows it deleting until the leader has removed its objects (the file written
    // above) from its bricks; then they are free again.
    must_wait_for(
        "the deleted volume's objects to go",
        Duration::from_secs(60),
        || async {
            let (status, list) = api(at, "GET", "/v1/volumes", Value::Null).await;
            assert_eq!(status, 200, "{list}");
            let listed = list.as_array().unwrap();
            if let Some(v) = listed.iter().find(|v| v["name"] == "pvc-a") {
                assert_eq!(v["status"], "Deleting", "{v}");
                return None;
            }
            Some(())
        },
    )
    .await;
    let (status, v) = api(
        at,
        "POST",
        "/v1/volumes",
        json!({"name": "pvc-b", "size_bytes": 1024, "class": "replicate-2"}),
    )
    .await;
    assert_eq!(status, 201, "{v}");

    // Expanding: a size it holds adds nothing and says what it holds; one more byte adds a
    // whole group of free bricks (and starts a rebalance); past the free bricks is 507.
    let (status, v) = api(
        at,
        "POST",
        "/v1/volumes/pvc-b/expand",
        json!({"size_bytes": 1}),
    )
    .await;
    assert_eq!((status, v["added_bricks"].as_u64()), (200, Some(0)), "{v}");
    let holds = v["size_bytes"].as_u64().unwrap();
    assert!(holds > 0, "{v}");
    let more = json!({"size_bytes": holds + 1});
    let (status, v) = api(at, "POST", "/v1/volumes/pvc-b/expand", more).await;
    assert_eq!((status, v["added_bricks"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(v["type"], "distributed-replicated", "{v}");
    assert_eq!(v["size_bytes"].as_u64(), Some(2 * holds), "{v}");
    let huge = json!({"size_bytes": 10 * holds});
    let (status, v) = api(at, "POST", "/v1/volumes/pvc-b/expand", huge).await;
    assert_eq!(status, 507, "{v}");
    assert!(v["error"].as_str().unwrap().contains("free bricks"), "{v}");
}
