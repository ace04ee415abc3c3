//! Mutual authentication with the cluster key, over real connections: clients and nodes that
//! hold the key get in; a client without it, one with another cluster's key, a node of
//! another cluster and a node without a key are each refused with a clear reason; the CLI
//! takes the key from a file; the metadata group forms and serves with it.

mod common;

use brickfs_client::BrickClient;
use brickfs_proto::cred::Credential;
use brickfs_proto::rpc::{ClientOptions, load_cluster_key};
use brickfs_testkit::Brickd;
use common::*;
use std::path::Path;
use std::sync::Arc;

fn keyed(key: Option<&Path>) -> BrickClient {
    BrickClient::new(ClientOptions {
        peer_name: "auth-test".into(),
        credential: key.map(|k| Arc::new(Credential::load(k).unwrap())),
        ..ClientOptions::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_the_cluster_key_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (dir.path().join("key"), dir.path().join("other"));
    std::fs::write(&key, "c2VjcmV0LWNsdXN0ZXIta2V5LW9uZQ==\n").unwrap();
    std::fs::write(&other, "YW5vdGhlci1jbHVzdGVyLWtleS10d28=\n").unwrap();
    let start = |name: &str, extra: &[&str]| {
        let d = dir.path().join(name);
        Brickd::start(&brickd_bin(), &d, &[d.join("b0")], extra).unwrap()
    };
    let k = key.to_str().unwrap();
    let a = start("a", &["--meta", "--cluster-key-file", k]);
    let foreign = start("f", &["--cluster-key-file", other.to_str().unwrap()]);
    let open = start("o", &[]);

    // The key holder gets in; the others are told why not.
    keyed(Some(&key)).ping(a.addr()).await.unwrap();
    let e = keyed(None).ping(a.addr()).await.unwrap_err().to_string();
    assert!(e.contains("requires a credential"), "{e}");
    let e = keyed(Some(&other))
        .ping(a.addr())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to another cluster"), "{e}");
    let e = keyed(Some(&key))
        .ping(open.addr())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no cluster key"), "{e}");
    // A keyless node still serves keyless clients (an open cluster).
    keyed(None).ping(open.addr()).await.unwrap();

    // The CLI with the key file forms the group and adds the node; without it, it is refused.
    let a_addr = a.addr().to_string();
    must_ok(&["--cluster-key-file", k, "cluster", "init", &a_addr]);
    let with = |args: &[&str]| {
        let mut v = vec!["--cluster-key-file", k, "--meta", a_addr.as_str()];
        v.extend_from_slice(args);
        brickfs(&v)
    };
    let (code, out, err) = with(&["peer", "add", &a_addr]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = brickfs(&["--meta", &a_addr, "peer", "list"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("requires a credential"), "{err}");
    // A node of another cluster cannot be added: the group cannot authenticate it.
    let f_addr = foreign.addr().to_string();
    let (code, _, err) = with(&["peer", "add", &f_addr]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another cluster"), "{err}");
    let (code, _, err) = brickfs(&["--cluster-key-file", "/nonexistent/key", "peer", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("credential file"), "{err}");
    // The refusals are logged by the node that refused.
    assert!(
        a.log_tail(200).contains("refused a connection"),
        "{}",
        a.log_tail(50)
    );
}

/// A client library whose connections come from `from` (another loopback address), proving
/// the process's credential (none in these tests).
fn clients_from(
    node: std::net::SocketAddr,
    from: &str,
) -> (brickfs_client::MetaClient, BrickClient) {
    clients_proving(node, from, None)
}

/// One brickd with a metadata member and bricks `n/b0`, `n/b1` in a temporary folder,
/// initialised and added as a peer: the folder, the node and an admin client at 127.0.0.1.
async fn must_one_node() -> (tempfile::TempDir, Brickd, brickfs_client::MetaClient) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("n");
    let node = Brickd::start(
        &brickd_bin(),
        &d,
        &[d.join("b0"), d.join("b1")],
        &["--meta"],
    )
    .unwrap();
    let (admin, _) = clients_from(node.addr(), "127.0.0.1");
    admin
        .admin(brickfs_proto::meta::AdminOp::Init)
        .await
        .unwrap();
    brickfs_client::admin::peer_add(&admin, &client(), node.addr())
        .await
        .unwrap();
    must_serve_reads(node.addr()).await;
    (dir, node, admin)
}

/// `allow-networks`: a client outside a volume's networks cannot open it, read its objects on
/// a brick, or go on writing through a volume it opened before the rule; one inside can; the
/// nodes themselves always can; other volumes are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_a_volumes_networks_are_refused() {
    use brickfs_client::VolumeClient;
    use brickfs_proto::ErrorCode;
    use brickfs_proto::meta::MetaOp;
    let (dir, node, admin) = must_one_node().await;
    let d = dir.path().join("n");
    for (name, brick) in [("guarded", &d.join("b0")), ("open", &d.join("b1"))] {
        let spec = vec![format!("{}:{}", node.addr(), brick.display())];
        brickfs_client::admin::volume_create(&admin, name, &spec)
            .await
            .unwrap();
        admin
            .write(MetaOp::StartVolume { name: name.into() })
            .await
            .unwrap();
    }
    let set = |value: &str| MetaOp::SetVolumeOption {
        name: "guarded".into(),
        key: "allow-networks".into(),
        value: value.into(),
    };
    let root = brickfs_proto::Ino(1);

    // Before the rule: a client at 127.0.0.2 opens the volume and writes a file.
    let (m2, b2) = clients_from(node.addr(), "127.0.0.2");
    let early = VolumeClient::open(m2.clone(), b2.clone(), "guarded")
        .await
        .unwrap();
    early.set_retry_window(std::time::Duration::from_secs(2));
    let fh = early.create(root, "f", 0o644, true).await.unwrap();
    early.write(&fh, 0, pattern(1, 0, 5000)).await.unwrap();
    early.fsync(&fh).await.unwrap();

    admin.write(set("127.0.0.3/32, 10.0.0.0/8")).await.unwrap();
    // Refused once the node has read the rule (it reads it every 2 s).
    let e = must_wait_for(
        "the rule to apply",
        std::time::Duration::from_secs(20),
        || {
            let (m2, b2) = (m2.clone(), b2.clone());
            async move { VolumeClient::open(m2, b2, "guarded").await.err() }
        },
    )
    .await;
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    assert!(
        e.to_string()
            .contains("not in the allow-networks of volume guarded"),
        "{e}"
    );
    // Data already open is refused too, at once (not retried), and so is a raw brick read.
    let e = early.write(&fh, 0, pattern(2, 0, 10)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    let e = early.read(&fh, 0, 10).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    let rec = early.record().clone();
    let b = rec.bricks[0].brick;
    let key = brickfs_proto::ObjectKey {
        volume: rec.id,
        ino: fh.attr.ino,
        column: 0,
    };
    let e = b2.read(node.addr(), b, key, 0, 10).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    // Another volume is not guarded.
    VolumeClient::open(m2.clone(), b2.clone(), "open")
        .await
        .unwrap();

    // A client inside the networks, and the node's own address, get in.
    let (m3, b3) = clients_from(node.addr(), "127.0.0.3");
    let inside = VolumeClient::open(m3, b3, "guarded").await.unwrap();
    let f = inside.open_file(root, "f").await.unwrap();
    assert!(inside.read(&f, 0, 5000).await.unwrap() == pattern(1, 0, 5000));
    let (m1, b1) = clients_from(node.addr(), "127.0.0.1");
    VolumeClient::open(m1, b1, "guarded").await.unwrap();

    // Widening the rule lets the first client back in.
    admin.write(set("127.0.0.0/8")).await.unwrap();
    must_wait_for("the wider rule", std::time::Duration::from_secs(20), || {
        let (m2, b2) = (m2.clone(), b2.clone());
        async move { VolumeClient::open(m2, b2, "guarded").await.ok() }
    })
    .await;
    early.write(&fh, 0, pattern(2, 0, 10)).await.unwrap();
}

/// A loopback relay to `to` that keeps every byte its clients send.
async fn spawn_tap(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let keep = keep.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    keep.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (at, seen)
}

/// With a cluster key, connections are TLS: the bytes a client sends start with a TLS record
/// and never show the data written; without a key the same write crosses in the clear (the
/// control that shows the tap sees data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_key_encrypts_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "c2VjcmV0LWNsdXN0ZXIta2V5LW9uZQ==\n").unwrap();
    let start = |name: &str, extra: &[&str]| {
        let d = dir.path().join(name);
        Brickd::start(&brickd_bin(), &d, &[d.join("b0")], extra).unwrap()
    };
    let keyed_node = start("k", &["--cluster-key-file", key.to_str().unwrap()]);
    let open_node = start("o", &[]);
    let secret = bytes::Bytes::from(b"a-very-recognizable-secret-payload-0123456789".repeat(100));
    for (node, client, encrypted) in [
        (&keyed_node, keyed(Some(&key)), true),
        (&open_node, keyed(None), false),
    ] {
        let (tap, seen) = spawn_tap(node.addr()).await;
        let brick = client.list_bricks(tap).await.unwrap()[0].id;
        let k = brickfs_proto::ObjectKey {
            volume: brickfs_proto::VolumeId(1),
            ino: brickfs_proto::Ino(7),
            column: 0,
        };
        client
            .write(tap, brick, k, 0, secret.clone(), true)
            .await
            .unwrap();
        let (_, back) = client
            .read(tap, brick, k, 0, secret.len() as u32)
            .await
            .unwrap();
        assert!(back == secret);
        let sent = seen.lock().unwrap().clone();
        let shows = sent.windows(32).any(|w| w == &secret[..32]);
        assert_eq!(
            sent.first() == Some(&0x16),
            encrypted,
            "first byte {:?}",
            sent.first()
        );
        assert_eq!(
            shows,
            !encrypted,
            "the payload crossed {}",
            if shows { "in the clear" } else { "hidden" }
        );
    }
}

/// One HTTP request over TLS (or plain TCP): status, headers (lower case) and body.
async fn https(
    at: std::net::SocketAddr,
    tls: bool,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut conn: Box<dyn brickfs_proto::http::Stream> = if tls {
        Box::new(brickfs_proto::tls::connect(tcp).await.unwrap().0)
    } else {
        Box::new(tcp)
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// In a cluster with a key, the metrics endpoint and the provisioning API speak HTTPS only and
/// want the endpoint's token (from `brickfs cluster token`); each refusal says why; a client
/// can check that the server holds the key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_of_a_keyed_cluster_want_https_and_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "c2VjcmV0LWNsdXN0ZXIta2V5LW9uZQ==\n").unwrap();
    let d = dir.path().join("n");
    let k = key.to_str().unwrap();
    let node = Brickd::start(
        &brickd_bin(),
        &d,
        &[d.join("b0")],
        &[
            "--meta",
            "--cluster-key-file",
            k,
            "--api-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    let api = must_log_addr(&node, "provisioning API listening addr=").await;
    let metrics = must_log_addr(&node, "metrics listening addr=").await;
    let addr = node.addr().to_string();
    must_ok(&["--cluster-key-file", k, "cluster", "init", &addr]);
    let token = |endpoint: &str| {
        must_ok(&["--cluster-key-file", k, "cluster", "token", endpoint])
            .trim()
            .to_string()
    };
    let (api_token, metrics_token) = (token("api"), token("metrics"));
    assert_ne!(api_token, metrics_token);
    let (code, _, err) = brickfs(&["cluster", "token", "api"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--credential-file"), "{err}");
    // The admin credential gives the same tokens (an administrator holds no key).
    let admin = dir.path().join("admin.cred");
    std::fs::write(
        &admin,
        must_ok(&["--credential-file", k, "cluster", "credential", "admin"]),
    )
    .unwrap();
    let a = admin.to_str().unwrap();
    let admin_token = must_ok(&["--credential-file", a, "cluster", "token", "api"]);
    assert_eq!(admin_token.trim(), api_token);

    for (at, path, right, wrong) in [
        (api, "/v1/volumes", &api_token, &metrics_token),
        (metrics, "/metrics", &metrics_token, &api_token),
    ] {
        let (status, _, body) = https(at, false, "GET", path, &[], "").await;
        assert_eq!(status, 426, "{body}");
        assert!(body.contains("use https"), "{body}");
        let (status, _, body) = https(at, true, "GET", path, &[], "").await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("brickfs cluster token"), "{body}");
        let bad = format!("Bearer {wrong}");
        let (status, _, body) = https(at, true, "GET", path, &[("Authorization", &bad)], "").await;
        assert_eq!(status, 401, "{body}");
        let good = format!("Bearer {right}");
        let (status, headers, body) = https(
            at,
            true,
            "GET",
            path,
            &[("Authorization", &good), ("X-Brickfs-Nonce", "n-123")],
            "",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let endpoint = if path == "/metrics" { "metrics" } else { "api" };
        let want =
            brickfs_proto::http::server_proof(&load_cluster_key(&key).unwrap(), endpoint, "n-123");
        assert!(
            headers.contains(&("x-brickfs-proof".to_string(), want)),
            "{headers:?}"
        );
    }

    // The endpoints' certificates are the cluster CA's: curl checks them with `--cacert` (no
    // -k), and a CA of another cluster fails the check.
    let ca = dir.path().join("ca.pem");
    must_ok(&[
        "--credential-file",
        k,
        "cluster",
        "ca",
        "--out",
        ca.to_str().unwrap(),
    ]);
    let pem = std::fs::read_to_string(&ca).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, "YW5vdGhlci1jbHVzdGVyLWtleS10d28=\n").unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(
        &other_ca,
        must_ok(&[
            "--credential-file",
            other_key.to_str().unwrap(),
            "cluster",
            "ca",
        ]),
    )
    .unwrap();
    let curl = |ca: &std::path::Path, url: String| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(ca)
            .args(["-H", &format!("Authorization: Bearer {api_token}")])
            .arg(url)
            .output()
            .expect("curl (scripts/setup installs it)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = curl(&ca, format!("https://{api}/v1/volumes"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with('['), "{out}");
    let (code, out, err) = curl(&ca, format!("https://localhost:{}/v1/volumes", api.port()));
    assert_eq!(code, Some(0), "by name too: {out}{err}");
    let (code, out, err) = curl(&other_ca, format!("https://{api}/v1/volumes"));
    assert_eq!(code, Some(60), "another cluster's CA: {out}{err}");
    // The protocol's TLS too: checked against the CA, the node passes; against another
    // cluster's, it does not.
    let der = brickfs_proto::tls::der_of(&pem).unwrap();
    let tcp = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    brickfs_proto::tls::connect_checking(tcp, der)
        .await
        .unwrap();
    let other_der =
        brickfs_proto::tls::der_of(&std::fs::read_to_string(&other_ca).unwrap()).unwrap();
    let tcp = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    let e = brickfs_proto::tls::connect_checking(tcp, other_der)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");

    // The API makes a volume with its first client credential, lists, rotates and revokes
    // credentials.
    must_ok(&[
        "--credential-file",
        a,
        "--meta",
        &addr,
        "peer",
        "add",
        &addr,
    ]);
    let bearer = format!("Bearer {api_token}");
    let auth = [("Authorization", bearer.as_str())];
    let call = async |method: &str, path: &str, body: &str| {
        let (status, _, body) = https(api, true, method, path, &auth, body).await;
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body}"));
        (status, json)
    };
    let (status, v) = call(
        "POST",
        "/v1/volumes",
        r#"{"name": "pvc-1", "size_bytes": 1048576, "class": "distribute"}"#,
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let first = v["credential"].as_str().unwrap().to_string();
    assert!(first.starts_with("brickfs-client-1:"), "{v}");
    assert!(
        v["mount"]["command"]
            .as_str()
            .unwrap()
            .contains("--credential-file"),
        "{v}"
    );
    let (status, list) = call("GET", "/v1/volumes/pvc-1/credentials", "").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let first_id = list[0]["id"].as_str().unwrap().to_string();
    let (status, rotated) = call(
        "POST",
        "/v1/volumes/pvc-1/credentials",
        r#"{"label": "rotated", "replace": true}"#,
    )
    .await;
    assert_eq!(status, 201, "{rotated}");
    assert_eq!(
        rotated["revoked"],
        serde_json::json!([first_id]),
        "{rotated}"
    );
    assert_ne!(rotated["credential"].as_str().unwrap(), first);
    let new_id = rotated["id"].as_str().unwrap().to_string();
    let (status, list) = call("GET", "/v1/volumes/pvc-1/credentials", "").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list[0]["label"], "rotated", "{list}");
    let (status, out) = call(
        "DELETE",
        &format!("/v1/volumes/pvc-1/credentials/{new_id}"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let (status, out) = call(
        "DELETE",
        &format!("/v1/volumes/pvc-1/credentials/{new_id}"),
        "",
    )
    .await;
    assert_eq!(status, 404, "{out}");
    let (status, out) = call("POST", "/v1/volumes/nope/credentials", "").await;
    assert_eq!(status, 404, "{out}");
    // A mistyped or misspelt field is refused, never read as the default (a rotation that
    // would revoke nothing); so are names a mount source or a URL cannot carry, with 400.
    for (body, why) in [
        (
            r#"{"label": "x", "replace": "yes"}"#,
            "must be true or false",
        ),
        (r#"{"lable": "typo"}"#, "unknown field \"lable\""),
        (r#"{"label": "bell\u0007"}"#, "no control characters"),
        ("[]", "must be a JSON object"),
    ] {
        let (status, out) = call("POST", "/v1/volumes/pvc-1/credentials", body).await;
        assert_eq!(status, 400, "{body}: {out}");
        assert!(
            out["error"].as_str().unwrap().contains(why),
            "{body}: {out}"
        );
    }
    for name in ["a b", "-rf", "a:b", "../pvc-1", ""] {
        let body = serde_json::json!({"name": name, "size_bytes": 1, "class": "distribute"});
        let (status, out) = call("POST", "/v1/volumes", &body.to_string()).await;
        assert_eq!(status, 400, "{name:?}: {out}");
    }
    let (status, list) = call("GET", "/v1/volumes/pvc-1/credentials", "").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "nothing was made: {list}"
    );
}

/// What only nodes send is refused from any other address, with a logged reason: member
/// traffic, heal, and the metadata commands of node duties. Heal only ever streams to a node
/// of the cluster map, whoever asks. Administrative commands naming a volume, and listings of
/// a volume's bricks, are held to the volume's networks like its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_only_nodes_send_is_refused_from_elsewhere() {
    use brickfs_proto::meta::MetaOp;
    use brickfs_proto::msg::{HealObjects, MemberRef, MemberStat, SetRef};
    use brickfs_proto::{Epoch, ErrorCode, Ino, Message, ObjectKey};
    let (dir, node, admin) = must_one_node().await;
    let d = dir.path().join("n");
    let spec = vec![
        "replica".to_string(),
        "2".to_string(),
        format!("{}:{}", node.addr(), d.join("b0").display()),
        format!("{}:{}", node.addr(), d.join("b1").display()),
    ];
    let v = brickfs_client::admin::volume_create(&admin, "v", &spec)
        .await
        .unwrap();
    admin
        .write(MetaOp::SetVolumeOption {
            name: "v".into(),
            key: "allow-networks".into(),
            value: "127.0.0.3/32".into(),
        })
        .await
        .unwrap();
    let brick = v.bricks[0].brick;
    let set = SetRef {
        volume: v.id,
        set: 0,
        epoch: Epoch(1),
    };
    let key = ObjectKey {
        volume: v.id,
        ino: Ino(9),
        column: 0,
    };
    let member_stat = Message::MemberStat(MemberStat { brick, set, key });
    let heal = |to: String| {
        Message::HealObjects(HealObjects {
            brick,
            set,
            target: MemberRef {
                brick: v.bricks[1].brick,
                addr: to,
            },
            geometry: None,
            after: None,
            limit: 10,
            barrier: false,
            journal: false,
            since: 0,
        })
    };
    let (m2, b2) = clients_from(node.addr(), "127.0.0.2");
    let (_, b1) = clients_from(node.addr(), "127.0.0.1");
    // A first refusal is `Busy` while the node reads the cluster map again; then it stands.
    let refused = async |from: &BrickClient, msg: Message| {
        must_wait_for("a refusal", std::time::Duration::from_secs(20), || async {
            match from
                .pool()
                .call(node.addr(), msg.clone(), Default::default())
                .await
            {
                Err(e) if e.code() == Some(ErrorCode::Busy) => None,
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
                    Some(e.to_string())
                }
                Ok(r) => panic!("{msg:?} answered {r:?}"),
            }
        })
        .await
    };
    // The node reads the rules every 2 s: wait until the volume's are in force.
    must_wait_for(
        "the volume's rules",
        std::time::Duration::from_secs(20),
        || async {
            b2.list(node.addr(), brick, None, 10)
                .await
                .err()
                .filter(|e| e.code() == Some(ErrorCode::PermissionDenied))
        },
    )
    .await;

    let e = refused(&b2, member_stat.clone()).await;
    assert!(
        e.contains("MemberStat is sent by the cluster's nodes only"),
        "{e}"
    );
    let e = refused(&b2, heal(node.addr().to_string())).await;
    assert!(e.contains("nodes only"), "{e}");
    // From the node's own address, a heal towards an address outside the map is refused.
    let e = refused(&b1, heal("127.0.0.9:7".into())).await;
    assert!(e.contains("not a node of the cluster map"), "{e}");
    // ...and one towards the node itself is not (the objects heal or are missing).
    let ok = b1
        .pool()
        .call(
            node.addr(),
            heal(node.addr().to_string()),
            Default::default(),
        )
        .await;
    assert!(
        ok.as_ref().err().and_then(|e| e.code()) != Some(ErrorCode::PermissionDenied),
        "{ok:?}"
    );
    // Node duties in the metadata group.
    for op in [
        MetaOp::GcDoneMany {
            volume: v.id,
            inos: Vec::new(),
        },
        MetaOp::DetectFailures { down_after_ms: 0 },
        MetaOp::VolumePurged { volume: v.id },
    ] {
        let e = m2.write(op.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{op:?}: {e}");
    }
    // An outsider cannot open the volume's rules to itself, nor stop or delete it.
    for op in [
        MetaOp::SetVolumeOption {
            name: "v".into(),
            key: "allow-networks".into(),
            value: "0.0.0.0/0".into(),
        },
        MetaOp::StartVolume { name: "v".into() },
        MetaOp::DeleteVolume { name: "v".into() },
    ] {
        let e = m2.write(op.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{op:?}: {e}");
        assert!(e.to_string().contains("allow-networks of volume v"), "{e}");
    }
    // Inside the networks, the listing is answered.
    let (_, b3) = clients_from(node.addr(), "127.0.0.3");
    b3.list(node.addr(), brick, None, 10).await.unwrap();
    let log = node.log_tail(400);
    assert!(
        log.contains("refused: MemberStat is sent by the cluster's nodes only"),
        "{log}"
    );
}

/// A client library whose connections come from `from` and prove `credential`.
fn clients_as(
    node: std::net::SocketAddr,
    from: &str,
    credential: &Credential,
) -> (brickfs_client::MetaClient, BrickClient) {
    clients_proving(node, from, Some(Arc::new(credential.clone())))
}

/// A metadata client and a brick client connecting from `from`, proving `credential`.
fn clients_proving(
    node: std::net::SocketAddr,
    from: &str,
    credential: Option<Arc<Credential>>,
) -> (brickfs_client::MetaClient, BrickClient) {
    let ip: std::net::IpAddr = from.parse().unwrap();
    let meta = brickfs_client::MetaClient::new(
        vec![node],
        brickfs_client::MetaClientOptions {
            client_name: format!("client at {from}"),
            deadline: std::time::Duration::from_secs(5),
            local_addr: Some(ip),
            credential: credential.clone(),
            ..Default::default()
        },
    );
    let bricks = BrickClient::new(ClientOptions {
        peer_name: format!("client at {from}"),
        local_addr: Some(ip),
        credential,
        ..ClientOptions::default()
    });
    (meta, bricks)
}

/// The three roles of a keyed cluster, over real connections: an administrator (the admin
/// credential) makes volumes and client credentials but sends no node duty and cannot
/// register an address that does not prove the key; a client credential reaches its own
/// volume's data and namespace and nothing else, only from the volume's networks, and stops
/// working when revoked or rotated out; a forged credential does not get in. Every refusal
/// is `PermissionDenied`, says why, and is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_what_it_may_and_nothing_else() {
    use brickfs_client::VolumeClient;
    use brickfs_proto::cred::{admin_secret, client_secret};
    use brickfs_proto::meta::{AdminOp, MetaOp, MetaRead, NodeRecord, RaftRpc, RaftRpcKind};
    use brickfs_proto::msg::{IssueCredential, MemberStat, SetRef};
    use brickfs_proto::{Epoch, ErrorCode, Ino, Message, NodeId, ObjectKey};
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "cm9sZXMtdGVzdC1jbHVzdGVyLWtleS0xMjM0NQ==\n").unwrap();
    let key = load_cluster_key(&key_file).unwrap();
    let d = dir.path().join("n");
    let node = Brickd::start(
        &brickd_bin(),
        &d,
        &[d.join("b0"), d.join("b1")],
        &["--meta", "--cluster-key-file", key_file.to_str().unwrap()],
    )
    .unwrap();
    let at = node.addr();
    let admin_cred = Credential::Admin(admin_secret(&key));
    let (admin, admin_b) = clients_as(at, "127.0.0.1", &admin_cred);
    admin.admin(AdminOp::Init).await.unwrap();
    // `peer add` as an administrator: the node proves the key, so it is registered.
    brickfs_client::admin::peer_add(&admin, &admin_b, at)
        .await
        .unwrap();
    must_serve_reads_with(at, admin_b.clone()).await;
    for (name, b) in [("a", "b0"), ("b", "b1")] {
        let spec = vec![format!("{at}:{}", d.join(b).display())];
        brickfs_client::admin::volume_create(&admin, name, &spec)
            .await
            .unwrap();
        admin
            .write(MetaOp::StartVolume { name: name.into() })
            .await
            .unwrap();
    }
    let issue = async |volume: &str, replace: bool| {
        admin_b
            .issue_credential(
                at,
                IssueCredential {
                    volume: volume.into(),
                    label: "test".into(),
                    replace,
                },
            )
            .await
            .unwrap()
    };
    let issued = issue("a", false).await;
    let cred_a = Credential::parse(issued.credential.as_bytes()).unwrap();
    assert_eq!(
        cred_a,
        Credential::Client {
            volume: issued.volume,
            id: issued.id,
            secret: client_secret(&key, issued.volume, issued.id),
        }
    );
    // The refusal of a role stands at once; one that fresher rules might lift (a credential
    // just made, networks just widened) is `Busy` first, then stands.
    let refused = async |from: &BrickClient, msg: Message| {
        must_wait_for("a refusal", std::time::Duration::from_secs(20), || async {
            match from.pool().call(at, msg.clone(), Default::default()).await {
                Err(e) if e.code() == Some(ErrorCode::Busy) => None,
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
                    Some(e.to_string())
                }
                Ok(r) => panic!("{msg:?} answered {r:?}"),
            }
        })
        .await
    };
    // A refusal that follows a change of the rules: answered until the node rereads them
    // (every 2 s).
    let refused_soon = async |from: &BrickClient, msg: Message| {
        must_wait_for("a refusal", std::time::Duration::from_secs(20), || async {
            match from.pool().call(at, msg.clone(), Default::default()).await {
                Err(e) if e.code() == Some(ErrorCode::Busy) => None,
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
                    Some(e.to_string())
                }
                Ok(_) => None,
            }
        })
        .await
    };
    let meta_write = |op: MetaOp| {
        Message::MetaWrite(brickfs_proto::meta::MetaWrite {
            session: brickfs_proto::meta::SessionId(1),
            seq: 1,
            acked_below: 0,
            op,
        })
    };
    let meta_read = |read: MetaRead| Message::MetaRead(brickfs_proto::meta::MetaReadReq { read });

    // The client of `a` works with `a`: open, create, write, read back.
    let (cm, cb) = clients_as(at, "127.0.0.2", &cred_a);
    let vol_a = must_wait_for(
        "the new credential",
        std::time::Duration::from_secs(20),
        || {
            let (cm, cb) = (cm.clone(), cb.clone());
            async move { VolumeClient::open(cm, cb, "a").await.ok() }
        },
    )
    .await;
    let fh = vol_a.create(Ino(1), "f", 0o644, true).await.unwrap();
    vol_a
        .write(&fh, 0, bytes::Bytes::from_static(b"mine"))
        .await
        .unwrap();
    vol_a.fsync(&fh).await.unwrap();
    assert_eq!(&vol_a.read(&fh, 0, 4).await.unwrap()[..], b"mine");
    let id_a = vol_a.record().id;

    // A session is bound to the credential that opened it: another credential of `a` can
    // neither keep it alive, close it, nor write in it; its own session works.
    let other = issue("a", false).await;
    let cred_other = Credential::parse(other.credential.as_bytes()).unwrap();
    let (om, ob) = clients_as(at, "127.0.0.2", &cred_other);
    let theirs = cm.session_id().expect("the client of a opened a session");
    let in_session = |op: MetaOp| {
        Message::MetaWrite(brickfs_proto::meta::MetaWrite {
            session: theirs,
            seq: 1,
            acked_below: 0,
            op,
        })
    };
    let mkdir = MetaOp::Mkdir {
        volume: id_a,
        parent: Ino(1),
        name: "theirs".into(),
        mode: 0o755,
        umask: 0,
        uid: 0,
        gid: 0,
    };
    for op in [MetaOp::KeepAlive, MetaOp::CloseSession, mkdir] {
        let e = refused(&ob, in_session(op.clone())).await;
        assert!(
            e.contains(&format!(
                "session {theirs} was not opened with this client credential"
            )),
            "{op:?}: {e}"
        );
    }
    om.write(MetaOp::KeepAlive).await.unwrap();
    assert_ne!(om.session_id(), Some(theirs));
    // Each client reads its volume's record with its own credential alone in it.
    for (meta, mine) in [(&cm, issued.id), (&om, other.id)] {
        let reply = meta
            .read(MetaRead::VolumeByName { name: "a".into() })
            .await
            .unwrap();
        let brickfs_proto::meta::MetaReply::Volume(v) = reply else {
            panic!("{reply:?}")
        };
        let ids: Vec<u64> = v.credentials.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![mine]);
    }
    cm.write(MetaOp::KeepAlive).await.unwrap();
    assert_eq!(
        cm.session_id(),
        Some(theirs),
        "the first session was not closed"
    );
    admin
        .write(MetaOp::RevokeCredential {
            name: "a".into(),
            id: other.id,
        })
        .await
        .unwrap();

    let vol_b = brickfs_client::admin::volume_info(&admin, "b")
        .await
        .unwrap();
    // What a client says of its own set is checked against the group: a primary told to
    // forward the client's write to another volume's brick refuses.
    let set_a = vol_a.sets()[0].clone();
    let forged_members = Message::SetWrite(brickfs_proto::msg::SetWrite {
        brick: set_a.primary,
        set: SetRef {
            volume: id_a,
            set: 0,
            epoch: set_a.epoch,
        },
        key: ObjectKey {
            volume: id_a,
            ino: Ino(999),
            column: 0,
        },
        offset_bytes: 0,
        sync: false,
        members: vec![brickfs_proto::msg::MemberRef {
            brick: vol_b.bricks[0].brick,
            addr: at.to_string(),
        }],
        degraded: false,
    });
    let e = refused(&cb, forged_members).await;
    assert!(e.contains("the members to forward to are [], not"), "{e}");

    // ...and with nothing else.
    let member_stat = Message::MemberStat(MemberStat {
        brick: vol_b.bricks[0].brick,
        set: SetRef {
            volume: vol_b.id,
            set: 0,
            epoch: Epoch(1),
        },
        key: ObjectKey {
            volume: vol_b.id,
            ino: Ino(1),
            column: 0,
        },
    });
    let read_b = Message::Read(brickfs_proto::msg::Read {
        brick: vol_b.bricks[0].brick,
        key: ObjectKey {
            volume: vol_b.id,
            ino: Ino(2),
            column: 0,
        },
        offset_bytes: 0,
        len_bytes: 1,
        repair: false,
    });
    let client_refusals: Vec<(Message, &str)> = vec![
        (
            meta_read(MetaRead::VolumeByName { name: "b".into() }),
            "does not reach volume b",
        ),
        (read_b.clone(), "does not reach volume b"),
        (
            meta_read(MetaRead::GetAttr {
                volume: vol_b.id,
                ino: Ino(1),
            }),
            "does not reach volume b",
        ),
        (
            meta_write(MetaOp::Mkdir {
                volume: vol_b.id,
                parent: Ino(1),
                name: "x".into(),
                mode: 0o755,
                umask: 0,
                uid: 0,
                gid: 0,
            }),
            "does not reach volume b",
        ),
        (meta_read(MetaRead::ListVolumes), "MetaRead ListVolumes"),
        (
            meta_write(MetaOp::SetVolumeOption {
                name: "a".into(),
                key: "allow-networks".into(),
                value: "0.0.0.0/0".into(),
            }),
            "MetaWrite SetVolumeOption",
        ),
        (
            meta_write(MetaOp::StopVolume { name: "a".into() }),
            "MetaWrite StopVolume",
        ),
        (
            meta_write(MetaOp::RevokeCredential {
                name: "a".into(),
                id: issued.id,
            }),
            "MetaWrite RevokeCredential",
        ),
        (
            meta_write(MetaOp::RegisterNode {
                node: NodeRecord {
                    id: NodeId(7),
                    addr: "127.0.0.2:9".into(),
                    last_heartbeat_ms: 0,
                },
            }),
            "MetaWrite RegisterNode",
        ),
        (
            meta_write(MetaOp::GcDoneMany {
                volume: id_a,
                inos: Vec::new(),
            }),
            "MetaWrite GcDoneMany",
        ),
        (
            Message::MetaAdmin(brickfs_proto::meta::MetaAdmin {
                op: AdminOp::Status,
            }),
            "MetaAdmin Status",
        ),
        (
            Message::RaftRpc(RaftRpc {
                kind: RaftRpcKind::Vote,
            }),
            "RaftRpc",
        ),
        (member_stat.clone(), "MemberStat"),
        (
            Message::OpenBrick(brickfs_proto::msg::OpenBrick {
                path: d.join("b1").display().to_string(),
            }),
            "OpenBrick",
        ),
        (
            Message::List(brickfs_proto::msg::List {
                brick: vol_b.bricks[0].brick,
                after: None,
                limit: 10,
            }),
            "List",
        ),
        (
            Message::ScrubStatus(brickfs_proto::msg::ScrubStatus {
                brick: vol_a.record().bricks[0].brick,
            }),
            "ScrubStatus",
        ),
        (
            Message::HealObjects(brickfs_proto::msg::HealObjects {
                brick: vol_a.record().bricks[0].brick,
                set: SetRef {
                    volume: id_a,
                    set: 0,
                    epoch: Epoch(1),
                },
                target: brickfs_proto::msg::MemberRef {
                    brick: vol_b.bricks[0].brick,
                    addr: at.to_string(),
                },
                geometry: None,
                after: None,
                limit: 10,
                barrier: false,
                journal: false,
                since: 0,
            }),
            "HealObjects",
        ),
        (meta_read(MetaRead::ListSessions), "MetaRead ListSessions"),
        (
            meta_read(MetaRead::VolumesPage {
                after: None,
                limit: 10,
            }),
            "MetaRead VolumesPage",
        ),
        (
            meta_write(MetaOp::CreateVolume {
                name: "c".into(),
                spec: vec![format!("{at}:/nowhere")],
            }),
            "MetaWrite CreateVolume",
        ),
        (
            meta_write(MetaOp::RegisterBrick {
                brick: brickfs_proto::meta::BrickRecord {
                    id: brickfs_proto::BrickId(5),
                    node: NodeId(7),
                    path: "/x".into(),
                    capacity_bytes: 1,
                },
            }),
            "MetaWrite RegisterBrick",
        ),
        (
            meta_write(MetaOp::RemoveNode { node: NodeId(7) }),
            "MetaWrite RemoveNode",
        ),
        (
            meta_write(MetaOp::RotateCredential {
                name: "a".into(),
                credential: brickfs_proto::meta::ClientCredential {
                    id: 5,
                    created_ms: 0,
                    label: String::new(),
                },
            }),
            "MetaWrite RotateCredential",
        ),
        (
            meta_write(MetaOp::DetectFailures { down_after_ms: 0 }),
            "MetaWrite DetectFailures",
        ),
        (
            meta_write(MetaOp::ExpireSessions),
            "MetaWrite ExpireSessions",
        ),
        (
            meta_write(MetaOp::AsClient {
                volume: id_a,
                credential: issued.id,
                op: Box::new(MetaOp::KeepAlive),
            }),
            "MetaWrite AsClient",
        ),
        (
            Message::IssueCredential(IssueCredential {
                volume: "a".into(),
                label: String::new(),
                replace: false,
            }),
            "IssueCredential",
        ),
    ];
    for (msg, why) in client_refusals {
        let e = refused(&cb, msg.clone()).await;
        assert!(e.contains(why), "{msg:?}: {e}");
        assert!(e.contains("client credential of volume a"), "{e}");
    }

    // An administrator sends no node duty and no Raft traffic.
    for msg in [
        member_stat.clone(),
        meta_write(MetaOp::Heartbeat { node: NodeId(1) }),
        meta_write(MetaOp::DetectFailures { down_after_ms: 0 }),
        Message::RaftRpc(RaftRpc {
            kind: RaftRpcKind::AppendEntries,
        }),
    ] {
        let e = refused(&admin_b, msg.clone()).await;
        assert!(
            e.contains("admin credential, not the cluster key"),
            "{msg:?}: {e}"
        );
    }
    // ...nor registers an address that cannot prove the key (its own, say).
    let squatter = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let e = admin
        .write(MetaOp::RegisterNode {
            node: NodeRecord {
                id: NodeId(77),
                addr: squatter.local_addr().unwrap().to_string(),
                last_heartbeat_ms: 0,
            },
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    assert!(
        e.to_string().contains("did not prove the cluster key"),
        "{e}"
    );
    drop(squatter);
    // ...while it can read any volume (`volume info`, benchmarks).
    VolumeClient::open(admin.clone(), admin_b.clone(), "b")
        .await
        .unwrap();

    // A forged client credential (right ids, wrong secret) does not get in.
    let forged = Credential::Client {
        volume: id_a,
        id: issued.id,
        secret: vec![7; 32],
    };
    let (_, fb) = clients_as(at, "127.0.0.2", &forged);
    let e = fb.ping(at).await.unwrap_err().to_string();
    assert!(e.contains("could not prove this credential"), "{e}");

    // The client's volume networks hold it too.
    admin
        .write(MetaOp::SetVolumeOption {
            name: "a".into(),
            key: "allow-networks".into(),
            value: "127.0.0.3/32".into(),
        })
        .await
        .unwrap();
    let e = refused(&cb, read_b.clone()).await;
    assert!(e.contains("does not reach volume b"), "{e}");
    let stat_a = meta_read(MetaRead::GetAttr {
        volume: id_a,
        ino: Ino(1),
    });
    let e = refused_soon(&cb, stat_a.clone()).await;
    assert!(e.contains("not in the allow-networks of volume a"), "{e}");
    let (_, cb3) = clients_as(at, "127.0.0.3", &cred_a);
    cb3.pool()
        .call(at, stat_a.clone(), Default::default())
        .await
        .unwrap();

    // Rotation: a new credential, the old one revoked; requests with the old one (on a
    // connection already open) are refused, the new one works.
    let rotated = issue("a", true).await;
    assert_eq!(rotated.revoked, vec![issued.id]);
    let e = refused_soon(&cb3, stat_a.clone()).await;
    assert!(e.contains("is not listed by the volume"), "{e}");
    let cred_new = Credential::parse(rotated.credential.as_bytes()).unwrap();
    let (_, nb) = clients_as(at, "127.0.0.3", &cred_new);
    must_wait_for(
        "the rotated credential",
        std::time::Duration::from_secs(20),
        || {
            let nb = nb.clone();
            let stat_a = stat_a.clone();
            async move { nb.pool().call(at, stat_a, Default::default()).await.ok() }
        },
    )
    .await;
    // Revoking it with the CLI-visible command leaves the volume without credentials.
    admin
        .write(MetaOp::RevokeCredential {
            name: "a".into(),
            id: rotated.id,
        })
        .await
        .unwrap();
    let e = refused_soon(&nb, stat_a.clone()).await;
    assert!(e.contains("is not listed by the volume"), "{e}");

    let log = node.log_tail(800);
    for line in [
        "refused: a client credential of volume a does not reach volume b",
        "refused: MemberStat is sent by the cluster's nodes only, and this connection proved the admin credential",
        "refused a connection",
        "issued a client credential",
        "refused to register a node that did not prove the cluster key",
    ] {
        assert!(log.contains(line), "{line} not in:\n{log}");
    }
}

/// The credentials end to end, as an operator uses them: the CLI derives the admin
/// credential from the key, creates volumes with it (each prints its first client credential,
/// once), and a FUSE mount presenting a client credential serves its own volume, cannot mount
/// another, and is refused (EACCES) once the credential is revoked with the CLI. A client
/// credential cannot run administrative commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_with_a_client_credential_serves_its_volume_until_revoked() {
    use common::mount::Mount;
    let dir = tempfile::tempdir().unwrap();
    let (node, key, admin) =
        must_keyed_node(dir.path(), "bW91bnQtY3JlZGVudGlhbC10ZXN0LWtleS0xMg==\n");
    let d = dir.path().join("n");
    let at = node.addr().to_string();
    let k = key.to_str().unwrap();
    let a = admin.to_str().unwrap();
    let as_admin = |args: &[&str]| {
        let mut v = vec!["--credential-file", a, "--meta", at.as_str()];
        v.extend_from_slice(args);
        must_ok(&v)
    };
    as_admin(&["peer", "add", &at]);
    let mut creds = Vec::new();
    for (name, b) in [("a", "b0"), ("b", "b1")] {
        let brick = format!("{at}:{}", d.join(b).display());
        let out = as_admin(&["volume", "create", name, &brick]);
        assert!(out.contains("shown this once"), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("brickfs-client-1:"))
            .unwrap_or_else(|| panic!("no credential in: {out}"));
        let file = dir.path().join(format!("{name}.cred"));
        std::fs::write(&file, line).unwrap();
        creds.push(file);
        as_admin(&["volume", "start", name]);
    }
    let cred_a = creds[0].to_str().unwrap();
    let listed = as_admin(&["volume", "credential", "a", "list"]);
    let id = listed.split_whitespace().next().unwrap().to_string();
    assert!(listed.contains("made with the volume"), "{listed}");

    // The client credential serves its volume through FUSE.
    let mnt = dir.path().join("mnt");
    let ca = dir.path().join("ca.pem");
    must_ok(&[
        "--credential-file",
        k,
        "cluster",
        "ca",
        "--out",
        ca.to_str().unwrap(),
    ]);
    let mut m = Mount::start_with(
        &format!("{at}/a"),
        &mnt,
        &[
            "--credential-file",
            cred_a,
            "--ca-file",
            ca.to_str().unwrap(),
        ],
    )
    .await;
    std::fs::write(mnt.join("f"), b"through the mount").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"through the mount");
    // A client asking what only administrators may see is told it was refused, not that
    // the bricks are offline.
    let (_, out, err) = brickfs(&[
        "--credential-file",
        cred_a,
        "--meta",
        at.as_str(),
        "volume",
        "bitrot",
        "a",
        "status",
    ]);
    assert!(
        out.contains("refused:") && !out.contains("offline"),
        "{out}{err}"
    );

    // ...and not another volume: mountd says why and exits.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mountd"))
        .arg(format!("{at}/b"))
        .arg(dir.path().join("mnt-b"))
        .args(["--credential-file", cred_a, "--timeout-secs", "5"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("does not reach volume b"), "{err}");

    // Nor the volume's administration.
    let (code, _, err) = brickfs(&[
        "--credential-file",
        cred_a,
        "--meta",
        &at,
        "volume",
        "set",
        "a",
        "allow-networks",
        "0.0.0.0/0",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("does not reach MetaWrite SetVolumeOption"),
        "{err}"
    );

    // A second mount of `a` with a credential of its own, writing all along: the first one's
    // revocation does not touch it.
    let out = as_admin(&["volume", "credential", "a", "new", "--label", "second"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("brickfs-client-1:"))
        .unwrap_or_else(|| panic!("no credential in: {out}"));
    let cred_2 = dir.path().join("a2.cred");
    std::fs::write(&cred_2, line).unwrap();
    let mnt2 = dir.path().join("mnt2");
    let mut m2 = Mount::start_with(
        &format!("{at}/a"),
        &mnt2,
        &[
            "--credential-file",
            cred_2.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
        ],
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (mnt2.join("log"), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            let mut chunks = 0u32;
            // Bounded: the test stops it within seconds.
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && chunks < 100_000 {
                f.write_all(&[chunks as u8; 4096]).unwrap();
                f.sync_data().unwrap();
                chunks += 1;
            }
            chunks
        })
    };

    // Revoked with the CLI: the mount is refused from then on (EACCES), within seconds.
    as_admin(&["volume", "credential", "a", "revoke", &id]);
    let e = must_wait_for(
        "the revocation to reach the node",
        std::time::Duration::from_secs(30),
        || async {
            let n = rand::random::<u32>();
            std::fs::write(mnt.join(format!("g{n}")), b"x").err()
        },
    )
    .await;
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let chunks = writer
        .join()
        .expect("every write of the second mount succeeded");
    let log = std::fs::read(mnt2.join("log")).unwrap();
    assert_eq!(log.len(), chunks as usize * 4096);
    assert!(
        log.chunks(4096)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == i as u8)),
        "the second mount's file holds what it wrote"
    );
    assert_eq!(std::fs::read(mnt2.join("f")).unwrap(), b"through the mount");
    let listed = as_admin(&["volume", "credential", "a", "list"]);
    assert!(
        !listed.contains(&id) && listed.contains("second"),
        "{listed}"
    );
    m2.stop();
    m.stop();
    assert!(
        node.log_tail(400).contains("is not listed by the volume"),
        "{}",
        node.log_tail(50)
    );
}
