//! Mutual authentication with the cluster key, over real connections: clients and nodes that
//! hold the key get in; a client without it, one with another cluster's key, a node of
//! another cluster and a node without a key are each refused with a clear reason; the CLI
//! takes the key from a file; the metadata group forms and serves with it.

mod common;

use brickfs_client::BrickClient;
use brickfs_proto::rpc::{ClientOptions, load_cluster_key};
use brickfs_testkit::Brickd;
use common::*;
use std::path::Path;
use std::sync::Arc;

fn keyed(key: Option<&Path>) -> BrickClient {
    BrickClient::new(ClientOptions {
        peer_name: "auth-test".into(),
        cluster_key: key.map(|k| Arc::new(load_cluster_key(k).unwrap())),
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
    assert!(e.contains("requires the cluster key"), "{e}");
    let e = keyed(Some(&other))
        .ping(a.addr())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not hold this cluster's key"), "{e}");
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
    assert!(err.contains("requires the cluster key"), "{err}");
    // A node of another cluster cannot be added: the group cannot authenticate it.
    let f_addr = foreign.addr().to_string();
    let (code, _, err) = with(&["peer", "add", &f_addr]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another cluster"), "{err}");
    let (code, _, err) = brickfs(&["--cluster-key-file", "/nonexistent/key", "peer", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cluster key file"), "{err}");
    // The refusals are logged by the node that refused.
    assert!(
        a.log_tail(200).contains("refused a connection"),
        "{}",
        a.log_tail(50)
    );
}
