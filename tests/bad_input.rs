//! Invariant 5: bad input never crashes a daemon. Each malformed conversation below gets a
//! clear error frame or a closed connection, and the daemon goes on serving a well-behaved
//! client afterwards.

mod common;

use brickfs_proto::frame::{HEADER_LEN, Header, Limits, PROTOCOL_VERSION, encode_frame};
use brickfs_proto::msg::{Hello, OpenBrick, Ping};
use brickfs_proto::{ErrorBody, ErrorCode, Message};
use common::*;
use rand::RngCore;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn send(s: &mut TcpStream, id: u64, msg: &Message, data: &[u8]) {
    s.write_all(&encode_frame(msg.kind(), id, &msg.encode_body(), data))
        .unwrap();
}

/// Reads one frame; `None` when the server closed the connection.
fn recv(s: &mut TcpStream) -> Option<(Header, Message)> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match s.read(&mut raw[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read failed (the server neither answered nor closed): {e}"),
        }
    }
    let header = Header::decode(&raw, &Limits::default()).expect("server frame header");
    let mut payload = vec![0u8; header.payload_len()];
    s.read_exact(&mut payload).unwrap();
    let msg = Message::decode(header.kind, &payload[..header.body_len as usize]).unwrap();
    Some((header, msg))
}

fn expect_error(reply: Option<(Header, Message)>, code: ErrorCode) -> (Header, ErrorBody) {
    match reply {
        Some((h, Message::Error(body))) if body.is(code) => (h, body),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

/// Reads until the server closes; fails if it keeps the connection open.
fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

fn handshake(s: &mut TcpStream) {
    let hello = Message::Hello(Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        peer_name: "raw".into(),
        nonce: vec![1; 16],
        claim: brickfs_proto::cred::Claim::Node,
    });
    send(s, 0, &hello, &[]);
    match recv(s) {
        Some((_, Message::HelloOk(_))) => {}
        other => panic!("expected HelloOk, got {other:?}"),
    }
}

/// A node with a cluster key refuses a peer whose proof is wrong, or that sends none, with a
/// `PermissionDenied` error and a closed connection — and goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_key_proof_is_refused_by_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let node = brickfs_testkit::Brickd::start(
        &brickd_bin(),
        &dir.path().join("n"),
        &[dir.path().join("b")],
        &["--cluster-key-file", key.to_str().unwrap()],
    )
    .unwrap();
    for proof in [Some(vec![0u8; 32]), None] {
        let mut s = connect(node.addr());
        handshake(&mut s);
        match &proof {
            Some(p) => send(
                &mut s,
                0,
                &Message::Auth(brickfs_proto::msg::Auth { proof: p.clone() }),
                &[],
            ),
            None => send(&mut s, 1, &Message::Ping(Ping {}), &[]),
        }
        let (_, body) = expect_error(recv(&mut s), ErrorCode::PermissionDenied);
        assert!(body.detail.contains("key"), "{body:?}");
        expect_closed(&mut s);
    }
    let c = brickfs_client::BrickClient::new(brickfs_proto::rpc::ClientOptions {
        credential: Some(std::sync::Arc::new(
            brickfs_proto::cred::Credential::load(&key).unwrap(),
        )),
        ..Default::default()
    });
    c.ping(node.addr()).await.unwrap();
}

async fn must_still_serve(addr: SocketAddr) {
    let c = client();
    c.ping(addr)
        .await
        .expect("daemon still serves a good client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (node, brick) = must_start_single(dir.path()).await;
    let addr = node.addr();

    // A request before the handshake is refused and the connection closed.
    let mut s = connect(addr);
    send(&mut s, 1, &Message::Ping(Ping {}), &[]);
    expect_error(recv(&mut s), ErrorCode::Malformed);
    expect_closed(&mut s);
    must_still_serve(addr).await;

    // A Hello for versions this node does not speak.
    let mut s = connect(addr);
    let hello = Message::Hello(Hello {
        version_min: PROTOCOL_VERSION + 1,
        version_max: PROTOCOL_VERSION + 3,
        peer_name: "future".into(),
        nonce: Vec::new(),
        claim: brickfs_proto::cred::Claim::Node,
    });
    send(&mut s, 0, &hello, &[]);
    expect_error(recv(&mut s), ErrorCode::UnsupportedVersion);
    expect_closed(&mut s);

    // An unknown kind is answered, and the connection stays usable.
    let mut s = connect(addr);
    handshake(&mut s);
    s.write_all(&encode_frame(999, 5, b"whatever", &[]))
        .unwrap();
    let (h, _) = expect_error(recv(&mut s), ErrorCode::UnknownKind);
    assert_eq!(h.request_id, 5);
    send(&mut s, 6, &Message::Ping(Ping {}), &[]);
    match recv(&mut s) {
        Some((h, Message::Pong(_))) => assert_eq!(h.request_id, 6),
        other => panic!("expected Pong, got {other:?}"),
    }

    // A body that does not decode, a data section where none belongs, and data damaged in
    // transit: each is answered on the same connection.
    s.write_all(&encode_frame(18, 7, &[0xff; 3], &[])).unwrap();
    expect_error(recv(&mut s), ErrorCode::Malformed);
    send(&mut s, 8, &Message::Ping(Ping {}), b"unexpected data");
    expect_error(recv(&mut s), ErrorCode::Malformed);
    let mut damaged = encode_frame(4, 9, &Message::Ping(Ping {}).encode_body(), b"abc");
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    s.write_all(&damaged).unwrap();
    expect_error(recv(&mut s), ErrorCode::DataChecksum);

    // A brick path with `..`, a relative one, and one that is not served.
    for (path, code) in [
        ("/srv/../etc", ErrorCode::InvalidPath),
        ("brick0", ErrorCode::InvalidPath),
        ("/no/such/brick", ErrorCode::UnknownBrick),
    ] {
        let open = Message::OpenBrick(OpenBrick { path: path.into() });
        send(&mut s, 10, &open, &[]);
        let (_, body) = expect_error(recv(&mut s), code);
        assert!(!body.detail.is_empty());
    }
    // A reply kind sent as a request.
    send(
        &mut s,
        11,
        &Message::Pong(brickfs_proto::msg::Pong {
            node: brickfs_proto::NodeId(1),
        }),
        &[],
    );
    expect_error(recv(&mut s), ErrorCode::Malformed);

    // Disperse geometries no volume can have (which would make the primary allocate GiBs for
    // one stripe): 255+0 members, 16 MiB fragments, a count that does not match.
    let member = |i: u64| brickfs_proto::msg::MemberRef {
        brick: if i == 0 {
            brick
        } else {
            brickfs_proto::BrickId(1000 + i)
        },
        addr: addr.to_string(),
    };
    for (k, m, f, n) in [
        (255, 0, 16 << 20, 255),
        (255, 0, 64 << 10, 255),
        (2, 1, 16 << 20, 3),
        (2, 1, 64 << 10, 2),
    ] {
        let w = Message::DisperseWrite(brickfs_proto::msg::DisperseWrite {
            brick,
            set: brickfs_proto::msg::SetRef {
                volume: brickfs_proto::VolumeId(1),
                set: 0,
                epoch: brickfs_proto::Epoch(1),
            },
            key: key(1, 0),
            offset_bytes: 0,
            sync: false,
            geometry: brickfs_proto::msg::DisperseGeometry {
                data_fragments: k,
                parity_fragments: m,
                fragment_bytes: f,
                members: (0..n).map(member).collect(),
                in_sync: Vec::new(),
            },
        });
        send(&mut s, 11, &w, &[1u8; 4096]);
        let (_, body) = expect_error(recv(&mut s), ErrorCode::InvalidArgument);
        assert!(
            body.detail.contains("geometry"),
            "{k}+{m} x {f}: {}",
            body.detail
        );
    }

    // An oversized length: refused before anything is allocated, then closed.
    let huge = Header {
        version: PROTOCOL_VERSION,
        kind: 20,
        request_id: 12,
        body_len: 16,
        data_len: 1 << 30,
        data_crc32c: 0,
    };
    let mut raw = Vec::new();
    huge.encode(&mut raw);
    s.write_all(&raw).unwrap();
    expect_error(recv(&mut s), ErrorCode::TooLarge);
    expect_closed(&mut s);
    must_still_serve(addr).await;

    // A truncated frame, then the client goes away.
    let mut s = connect(addr);
    handshake(&mut s);
    let frame = encode_frame(4, 13, &Message::Ping(Ping {}).encode_body(), &[]);
    s.write_all(&frame[..HEADER_LEN / 2]).unwrap();
    drop(s);
    let mut s = connect(addr);
    handshake(&mut s);
    let frame = encode_frame(22, 14, &[0u8; 40], &[]);
    s.write_all(&frame[..HEADER_LEN + 10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut s);
    must_still_serve(addr).await;

    // Random garbage, before and after a handshake.
    let mut rng = rand::rng();
    for round in 0..20 {
        let mut garbage = vec![0u8; 1 + (rng.next_u32() as usize % 8192)];
        rng.fill_bytes(&mut garbage);
        let mut s = connect(addr);
        if round % 2 == 1 {
            handshake(&mut s);
        }
        // The server may close while we are still writing: that is a fine answer too.
        let _ = s.write_all(&garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        expect_closed(&mut s);
    }
    must_still_serve(addr).await;
    assert_eq!(node.error_lines(), 0, "{}", node.log_tail(30));
}

/// Many requests in flight on one connection are matched to their replies by request id,
/// whatever order the replies come back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_match_requests_with_many_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (node, brick) = must_start_single(dir.path()).await;
    let addr = node.addr();
    let conn = brickfs_proto::rpc::Connection::connect(addr, Default::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let k = key(1000 + i, 0);
            let len = 1 + (i as usize * 7919) % 300_000;
            let msg = Message::Write(brickfs_proto::msg::Write {
                brick,
                key: k,
                offset_bytes: 0,
                sync: false,
            });
            conn.call(msg, pattern(i, 0, len)).await.unwrap();
            let msg = Message::Read(brickfs_proto::msg::Read {
                brick,
                key: k,
                offset_bytes: 0,
                len_bytes: 1 << 20,
                repair: false,
            });
            let (_, data) = conn.call(msg, bytes::Bytes::new()).await.unwrap();
            assert!(data == pattern(i, 0, len), "object {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A node keeps at most `limits.conns_per_peer_max` connections from one address: one more
/// is refused after its Hello (`Busy`, with the reason), other addresses are served, and a
/// slot freed by a close is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_its_share_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("brickd.toml");
    std::fs::write(&config, "[limits]\nconns_per_peer_max = 3\n").unwrap();
    let node = brickfs_testkit::Brickd::start(
        &brickd_bin(),
        &dir.path().join("data"),
        &[dir.path().join("brick0")],
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let addr = node.addr();
    let from = async |ip: &str| {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let s = sock.connect(addr).await.unwrap().into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = from("127.0.0.2").await;
        handshake(&mut s);
        held.push(s);
    }
    let mut extra = from("127.0.0.2").await;
    let hello = Message::Hello(Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        peer_name: "one too many".into(),
        nonce: vec![1; 16],
        claim: brickfs_proto::cred::Claim::Node,
    });
    send(&mut extra, 0, &hello, &[]);
    let (_, body) = expect_error(recv(&mut extra), ErrorCode::Busy);
    assert!(
        body.detail.contains("too many connections from 127.0.0.2"),
        "{body:?}"
    );
    expect_closed(&mut extra);
    // Another address is served meanwhile.
    handshake(&mut from("127.0.0.1").await);
    // A closed connection frees its slot (once the node has seen the close).
    drop(held.pop());
    must_wait_for("a freed slot", Duration::from_secs(20), || async {
        let mut s = from("127.0.0.2").await;
        send(&mut s, 0, &hello, &[]);
        matches!(recv(&mut s), Some((_, Message::HelloOk(_)))).then_some(())
    })
    .await;
    assert!(
        node.log_tail(100)
            .contains("too many connections from 127.0.0.2"),
        "{}",
        node.log_tail(20)
    );
}
