//! The multiplexed transport: a client [`Connection`] that keeps many requests in flight on one
//! TCP stream, a [`Pool`] of connections per peer, and [`serve`], the accept loop that runs a
//! [`Handler`] for every request.
//!
//! Every connection opens with `Hello`/`HelloOk`; when the server holds the cluster key (see
//! [`set_cluster_key`]) both sides prove they hold it too (`HelloOk` carries the server's
//! HMAC over both nonces, `Auth` the client's, `AuthOk` accepts), and a peer without it, or
//! with another cluster's, is refused with a clear error. Frames are read with their lengths checked
//! against [`Limits`] before a buffer is allocated. The data section is read into its own
//! `Bytes` and written straight from the caller's `Bytes`, never copied through bincode.

use crate::cred::{Claim, Credential, Peer, Role};
use crate::error::{ErrorBody, ErrorCode};
use crate::frame::{FrameError, HEADER_LEN, Header, Limits, PROTOCOL_VERSION};
use crate::ids::NodeId;
use crate::msg::{Auth, AuthOk, DecodeError, Hello, HelloOk, Message};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

/// The credential of this process (see [`set_credential`]).
static CREDENTIAL: std::sync::OnceLock<Arc<Credential>> = std::sync::OnceLock::new();

/// Sets what every connection this process makes proves (clients whose
/// `ClientOptions::credential` is unset use it); a server accepts connections with it only when
/// it is the cluster key. Once per process: false if already set.
pub fn set_credential(credential: Credential) -> bool {
    CREDENTIAL.set(Arc::new(credential)).is_ok()
}

/// Makes `key` this process's credential: a node's (see [`set_credential`]).
pub fn set_cluster_key(key: Vec<u8>) -> bool {
    set_credential(Credential::Node(key))
}

/// Reads a cluster key file: its bytes, surrounding whitespace trimmed, at least 16 of them.
/// A file holding an admin or client credential is refused: it is no key.
pub fn load_cluster_key(path: &std::path::Path) -> io::Result<Vec<u8>> {
    match Credential::load(path)? {
        Credential::Node(key) => Ok(key),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds an admin or client credential, not the cluster key",
                path.display()
            ),
        )),
    }
}

/// Loads the credential file (if one is named: a cluster key, an admin or a client
/// credential) and makes it this process's: the error names the file, for programs to print
/// before exiting.
pub fn use_credential_file(path: Option<&std::path::Path>) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let credential =
        Credential::load(path).map_err(|e| format!("credential file {}: {e}", path.display()))?;
    set_credential(credential);
    Ok(())
}

/// The same as [`use_credential_file`] (the flag's older name is `--cluster-key-file`).
pub fn use_cluster_key_file(path: Option<&std::path::Path>) -> Result<(), String> {
    use_credential_file(path)
}

/// The process's credential, if it has one.
pub fn credential() -> Option<Arc<Credential>> {
    CREDENTIAL.get().cloned()
}

/// The process's cluster key, if its credential is one (see [`set_credential`]).
pub fn cluster_key() -> Option<Arc<Vec<u8>>> {
    match CREDENTIAL.get()?.as_ref() {
        Credential::Node(k) => Some(Arc::new(k.clone())),
        _ => None,
    }
}

fn process_key() -> Option<Arc<Vec<u8>>> {
    cluster_key()
}

/// HMAC-SHA256 over role ‖ a ‖ b, not yet finalized.
fn key_mac(key: &[u8], role: &[u8], a: &[u8], b: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(role);
    mac.update(a);
    mac.update(b);
    mac
}

/// HMAC-SHA256(key, role ‖ a ‖ b).
fn key_proof(key: &[u8], role: &[u8], a: &[u8], b: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    key_mac(key, role, a, b).finalize().into_bytes().to_vec()
}

/// Whether `proof` is HMAC-SHA256(key, role ‖ a ‖ b), compared in constant time.
fn key_proof_ok(key: &[u8], role: &[u8], a: &[u8], b: &[u8], proof: &[u8]) -> bool {
    use hmac::Mac;
    key_mac(key, role, a, b).verify_slice(proof).is_ok()
}

fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; 16];
    rand::rng().fill_bytes(&mut n);
    n
}

/// What the client side of the handshake proves with: its credential's secret (if any), its
/// nonce and the TLS channel binding (empty without TLS).
struct Proving<'a> {
    addr: SocketAddr,
    key: Option<Arc<Credential>>,
    my_nonce: &'a [u8],
    binding: &'a [u8],
}

/// Either half of a connection's stream: plain TCP, or TLS over it.
type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

fn plain_halves(stream: TcpStream) -> (BoxRead, BoxWrite) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
}

/// `Hello` as protocol versions up to 11 sent it (before roles), to answer old peers with the
/// versions rather than a decode error.
#[derive(serde::Deserialize)]
struct LegacyHello {
    version_min: u16,
    version_max: u16,
    #[allow(dead_code)]
    peer_name: String,
    #[allow(dead_code)]
    nonce: Vec<u8>,
}

const SERVER_ROLE: &[u8] = b"brickfs-server";
const CLIENT_ROLE: &[u8] = b"brickfs-client";

/// How long a peer may take to send its `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests already in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const SOCKET_BUFFER_BYTES: usize = 256 << 10;

/// An error of one call. [`RpcError::outcome`] tells whether the request may have happened.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("failed to connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {addr} failed: {detail}")]
    Handshake { addr: SocketAddr, detail: String },
    /// The cluster key check failed, one way or the other: retrying cannot help.
    #[error("{addr} refused: {detail}")]
    Unauthorized { addr: SocketAddr, detail: String },
    #[error("connection to {addr} is closed")]
    Closed { addr: SocketAddr },
    #[error("connection to {addr} lost with the request in flight: {detail}")]
    ConnectionLost { addr: SocketAddr, detail: String },
    #[error("no reply from {addr} within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("{0}")]
    Remote(ErrorBody),
    #[error("unexpected reply {got} to {request}")]
    UnexpectedReply {
        request: &'static str,
        got: &'static str,
    },
}

/// What a failed call means for the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing happened: the request was refused or never sent.
    Rejected,
    /// It may or may not have happened (lost connection, timeout): never assume either.
    Unknown,
}

impl RpcError {
    pub fn outcome(&self) -> Outcome {
        match self {
            RpcError::Connect { .. }
            | RpcError::Handshake { .. }
            | RpcError::Unauthorized { .. }
            | RpcError::Closed { .. }
            | RpcError::Remote(_) => Outcome::Rejected,
            RpcError::ConnectionLost { .. }
            | RpcError::Timeout { .. }
            | RpcError::UnexpectedReply { .. } => Outcome::Unknown,
        }
    }

    /// The remote error code, when the peer answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RpcError::Remote(body) => body.kind(),
            RpcError::Unauthorized { .. } => Some(ErrorCode::PermissionDenied),
            _ => None,
        }
    }
}

/// Options of the calling side.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub limits: Limits,
    pub peer_name: String,
    /// Connections a [`Pool`] keeps to each peer.
    pub conns_per_peer: usize,
    /// What to prove; `None`: the process's credential (see [`set_credential`]), if any.
    pub credential: Option<Arc<Credential>>,
    /// The local address to connect from (`None`: the system picks).
    pub local_addr: Option<std::net::IpAddr>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            limits: Limits::default(),
            peer_name: "client".to_string(),
            conns_per_peer: 2,
            credential: None,
            local_addr: None,
        }
    }
}

/// One frame to send: the header and body in one buffer, the data beside it.
struct OutFrame {
    head: Vec<u8>,
    data: Bytes,
}

fn out_frame(request_id: u64, msg: &Message, data: Bytes) -> OutFrame {
    let body = msg.encode_body();
    let header = Header {
        version: PROTOCOL_VERSION,
        kind: msg.kind(),
        request_id,
        body_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        data_len: u32::try_from(data.len()).unwrap_or(u32::MAX),
        data_crc32c: crc32c::crc32c(&data),
    };
    let mut head = Vec::with_capacity(HEADER_LEN + body.len());
    header.encode(&mut head);
    head.extend_from_slice(&body);
    OutFrame { head, data }
}

/// The frame answering request `id` with `reply`; or, when that would exceed the frame
/// limits (a peer's are the same unless configured otherwise, and it would close the
/// connection on such a frame), a `TooLarge` error saying so, for the caller to ask for less
/// at a time (a page) on the same connection.
fn reply_frame(id: u64, reply: &Message, data: Bytes, limits: &Limits) -> OutFrame {
    let frame = out_frame(id, reply, data);
    let body = frame.head.len() - HEADER_LEN;
    if body <= limits.body_max_bytes as usize && frame.data.len() <= limits.data_max_bytes as usize
    {
        return frame;
    }
    let detail = format!(
        "the {} reply would be {body} bytes of body and {} of data, over the frame limits of {} and {}: ask for less at a time",
        reply.name(),
        frame.data.len(),
        limits.body_max_bytes,
        limits.data_max_bytes
    );
    warn!(request = id, "{detail}");
    out_frame(
        id,
        &Message::Error(ErrorBody::new(ErrorCode::TooLarge, detail)),
        Bytes::new(),
    )
}

/// A frame as read from a stream; the data checksum is checked by the reader.
struct InFrame {
    header: Header,
    body: Vec<u8>,
    data: Bytes,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &Limits,
) -> Result<Option<InFrame>, ReadError> {
    let mut raw = [0u8; HEADER_LEN];
    let first = reader.read(&mut raw).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut raw[first..]).await?;
    let header = Header::decode(&raw, limits)?;
    let mut body = vec![0u8; header.body_len as usize];
    reader.read_exact(&mut body).await?;
    let data_len = header.data_len as usize;
    let mut data = BytesMut::with_capacity(data_len);
    while data.len() < data_len {
        let want = (data_len - data.len()) as u64;
        let n = (&mut *reader).take(want).read_buf(&mut data).await?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Some(InFrame {
        header,
        body,
        data: data.freeze(),
    }))
}

/// Sends frames from a channel, flushing whenever the channel runs dry.
async fn write_loop<W: AsyncWrite + Unpin>(writer: W, mut rx: mpsc::Receiver<OutFrame>) {
    let mut writer = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, writer);
    'outer: while let Some(mut frame) = rx.recv().await {
        loop {
            if writer.write_all(&frame.head).await.is_err()
                || writer.write_all(&frame.data).await.is_err()
            {
                break 'outer;
            }
            match rx.try_recv() {
                Ok(next) => frame = next,
                Err(_) => break,
            }
        }
        if writer.flush().await.is_err() {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

type ReplySlot = oneshot::Sender<Result<(Message, Bytes), RpcError>>;

struct Shared {
    addr: SocketAddr,
    pending: Mutex<HashMap<u64, ReplySlot>>,
    closed: AtomicBool,
}

impl Shared {
    fn fail_all(&self, detail: &str) {
        self.closed.store(true, Ordering::SeqCst);
        let drained: Vec<ReplySlot> = match self.pending.lock() {
            Ok(mut map) => map.drain().map(|(_, slot)| slot).collect(),
            Err(_) => Vec::new(),
        };
        for slot in drained {
            let _ = slot.send(Err(RpcError::ConnectionLost {
                addr: self.addr,
                detail: detail.to_string(),
            }));
        }
    }
}

/// A client connection with many requests in flight, matched to replies by request id.
/// Cloning is cheap; the connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    tx: mpsc::Sender<OutFrame>,
    next_id: Arc<AtomicU64>,
    permits: Arc<Semaphore>,
    opts: Arc<ClientOptions>,
    server: HelloOk,
}

impl Connection {
    /// Connects, performs the handshake and starts the reader and writer tasks.
    pub async fn connect(addr: SocketAddr, opts: ClientOptions) -> Result<Connection, RpcError> {
        let dial = async {
            match opts.local_addr {
                None => TcpStream::connect(addr).await,
                Some(ip) => {
                    let sock = if addr.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    sock.bind(SocketAddr::new(ip, 0))?;
                    sock.connect(addr).await
                }
            }
        };
        let stream = tokio::time::timeout(opts.connect_timeout, dial)
            .await
            .map_err(|_| RpcError::Connect {
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| RpcError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        // With a cluster key, everything after the TCP connect is encrypted (see `tls`).
        let key = opts.credential.clone().or_else(credential);
        let (read_half, mut write_half, binding) = if key.is_some() {
            let (tls, binding) =
                tokio::time::timeout(
                    opts.connect_timeout,
                    crate::tls::connect_proving(
                        stream,
                        match key.as_deref() {
                            Some(Credential::Node(k)) => Some(k.as_slice()),
                            _ => None,
                        },
                    ),
                )
                    .await
                    .map_err(|_| RpcError::Handshake {
                        addr,
                        detail: "TLS handshake timed out".into(),
                    })?
                    .map_err(|detail| {
                        if detail.contains("invalid peer certificate") {
                            // Refused for who the node is: retrying cannot help.
                            RpcError::Unauthorized {
                                addr,
                                detail: format!(
                                    "the node's TLS certificate is not from this cluster's CA ({detail}): it belongs to another cluster or holds no cluster key (or the CA file is another cluster's)"
                                ),
                            }
                        } else {
                            RpcError::Handshake {
                                addr,
                                detail: format!(
                                    "{detail} (does the node belong to a cluster with a key?)"
                                ),
                            }
                        }
                    })?;
            let (r, w) = tokio::io::split(tls);
            (Box::new(r) as BoxRead, Box::new(w) as BoxWrite, binding)
        } else {
            let (r, w) = plain_halves(stream);
            (r, w, Vec::new())
        };
        let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half);

        let my_nonce = nonce();
        let hello = Message::Hello(Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            peer_name: opts.peer_name.clone(),
            nonce: my_nonce.clone(),
            claim: key.as_ref().map_or(Claim::Node, |k| k.claim()),
        });
        let frame = out_frame(0, &hello, Bytes::new());
        let handshake = async {
            write_half.write_all(&frame.head).await?;
            write_half.flush().await?;
            read_frame(&mut reader, &opts.limits).await
        };
        let reply = tokio::time::timeout(opts.connect_timeout, handshake)
            .await
            .map_err(|_| RpcError::Handshake {
                addr,
                detail: "no reply to hello".into(),
            })?
            .map_err(|e| RpcError::Handshake {
                addr,
                detail: e.to_string(),
            })?
            .ok_or_else(|| RpcError::Handshake {
                addr,
                detail: "connection closed during handshake".into(),
            })?;
        let server = match Message::decode(reply.header.kind, &reply.body) {
            Ok(Message::HelloOk(ok)) => {
                let proving = Proving {
                    addr,
                    key: key.clone(),
                    my_nonce: &my_nonce,
                    binding: &binding,
                };
                Self::authenticate(&opts, proving, &ok, &mut reader, &mut write_half).await?;
                ok
            }
            Ok(Message::Error(body)) => {
                return Err(RpcError::Handshake {
                    addr,
                    detail: body.to_string(),
                });
            }
            Ok(other) => {
                return Err(RpcError::Handshake {
                    addr,
                    detail: format!("expected HelloOk, got {}", other.name()),
                });
            }
            Err(e) => {
                return Err(RpcError::Handshake {
                    addr,
                    detail: e.to_string(),
                });
            }
        };

        let shared = Arc::new(Shared {
            addr,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(opts.limits.inflight_max.max(1));
        tokio::spawn(write_loop(write_half, rx));
        tokio::spawn(client_read_loop(reader, shared.clone(), opts.limits));
        Ok(Connection {
            shared,
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            permits: Arc::new(Semaphore::new(opts.limits.inflight_max.max(1))),
            opts: Arc::new(opts),
            server,
        })
    }

    /// Checks the server's proof of the cluster key and proves ours (both or neither side
    /// holds one; anything else is refused with the reason).
    async fn authenticate(
        opts: &ClientOptions,
        proving: Proving<'_>,
        ok: &HelloOk,
        reader: &mut BufReader<BoxRead>,
        writer: &mut BoxWrite,
    ) -> Result<(), RpcError> {
        let Proving {
            addr,
            key,
            my_nonce,
            binding,
        } = proving;
        let refuse = |detail: String| RpcError::Unauthorized { addr, detail };
        let key = match (key, ok.proof.is_empty()) {
            (None, true) => return Ok(()),
            (None, false) => {
                return Err(refuse(
                    "the node requires a credential: give this program the cluster key or a credential file (--credential-file, or BRICKFS_CREDENTIAL_FILE)".into(),
                ));
            }
            (Some(_), true) => {
                return Err(refuse(
                    "the node holds no cluster key: it is not part of this cluster (or was started without --cluster-key-file)".into(),
                ));
            }
            (Some(k), false) => k,
        };
        let secret = key.secret();
        if !key_proof_ok(
            secret,
            SERVER_ROLE,
            my_nonce,
            &[&ok.nonce, binding].concat(),
            &ok.proof,
        ) {
            return Err(refuse(match key.as_ref() {
                Credential::Node(_) => {
                    "the node does not hold this cluster's key: it belongs to another cluster"
                        .into()
                }
                _ => "the node could not prove this credential: the credential is not of its cluster (or the node is not the cluster's)".into(),
            }));
        }
        let auth = Message::Auth(Auth {
            proof: key_proof(
                secret,
                CLIENT_ROLE,
                &ok.nonce,
                &[my_nonce, binding].concat(),
            ),
        });
        let frame = out_frame(0, &auth, Bytes::new());
        let exchange = async {
            writer.write_all(&frame.head).await?;
            writer.flush().await?;
            read_frame(reader, &opts.limits).await
        };
        let reply = tokio::time::timeout(opts.connect_timeout, exchange)
            .await
            .map_err(|_| refuse("no answer to the key proof".into()))?
            .map_err(|e| refuse(e.to_string()))?
            .ok_or_else(|| refuse("connection closed during authentication".into()))?;
        match Message::decode(reply.header.kind, &reply.body) {
            Ok(Message::AuthOk(_)) => Ok(()),
            Ok(Message::Error(body)) => Err(refuse(body.to_string())),
            Ok(other) => Err(refuse(format!("expected AuthOk, got {}", other.name()))),
            Err(e) => Err(refuse(e.to_string())),
        }
    }

    /// What the server said in its handshake reply.
    pub fn server(&self) -> &HelloOk {
        &self.server
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst) || self.tx.is_closed()
    }

    /// Sends a request and waits for its reply. An `Error` reply becomes [`RpcError::Remote`].
    pub async fn call(&self, msg: Message, data: Bytes) -> Result<(Message, Bytes), RpcError> {
        let addr = self.shared.addr;
        let timeout = self.opts.request_timeout;
        if self.is_closed() {
            return Err(RpcError::Closed { addr });
        }
        let _permit = tokio::time::timeout(timeout, self.permits.acquire())
            .await
            .map_err(|_| RpcError::Timeout {
                addr,
                after: timeout,
            })?
            .map_err(|_| RpcError::Closed { addr })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (slot, reply) = oneshot::channel();
        match self.shared.pending.lock() {
            Ok(mut map) => {
                map.insert(id, slot);
            }
            Err(_) => return Err(RpcError::Closed { addr }),
        }
        let request = msg.name();
        let frame = out_frame(id, &msg, data);
        let body = frame.head.len() - HEADER_LEN;
        let limits = &self.opts.limits;
        if body > limits.body_max_bytes as usize
            || frame.data.len() > limits.data_max_bytes as usize
        {
            // The peer would close the connection on it, failing every request in flight.
            self.forget(id);
            return Err(RpcError::Remote(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "the {request} request would be {body} bytes of body and {} of data, over the frame limits of {} and {}: send less at a time",
                    frame.data.len(),
                    limits.body_max_bytes,
                    limits.data_max_bytes
                ),
            )));
        }
        if self.tx.send(frame).await.is_err() {
            self.forget(id);
            return Err(RpcError::Closed { addr });
        }
        match tokio::time::timeout(timeout, reply).await {
            Err(_) => {
                self.forget(id);
                Err(RpcError::Timeout {
                    addr,
                    after: timeout,
                })
            }
            Ok(Err(_)) => Err(RpcError::ConnectionLost {
                addr,
                detail: "reader stopped".into(),
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok((Message::Error(body), _)))) => Err(RpcError::Remote(body)),
            Ok(Ok(Ok((Message::HelloOk(_), _)))) => Err(RpcError::UnexpectedReply {
                request,
                got: "HelloOk",
            }),
            Ok(Ok(Ok(reply))) => Ok(reply),
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut map) = self.shared.pending.lock() {
            map.remove(&id);
        }
    }
}

async fn client_read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    shared: Arc<Shared>,
    limits: Limits,
) {
    loop {
        let frame = match read_frame(&mut reader, &limits).await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                shared.fail_all("closed by peer");
                return;
            }
            Err(e) => {
                debug!(addr = %shared.addr, error = %e, "connection failed");
                shared.fail_all(&e.to_string());
                return;
            }
        };
        let id = frame.header.request_id;
        let result = if crc32c::crc32c(&frame.data) != frame.header.data_crc32c {
            Err(RpcError::Remote(ErrorBody::new(
                ErrorCode::DataChecksum,
                "reply data damaged in transit",
            )))
        } else {
            match Message::decode(frame.header.kind, &frame.body) {
                Ok(msg) => Ok((msg, frame.data)),
                Err(e) => Err(RpcError::Remote(ErrorBody::new(
                    ErrorCode::Malformed,
                    format!("reply did not decode: {e}"),
                ))),
            }
        };
        let slot = shared.pending.lock().ok().and_then(|mut m| m.remove(&id));
        match slot {
            Some(slot) => {
                let _ = slot.send(result);
            }
            // The caller gave up (timeout); the late reply is dropped.
            None => debug!(addr = %shared.addr, id, "reply for a request no longer waited on"),
        }
    }
}

/// A pool of connections per peer, replacing dead ones on demand.
pub struct Pool {
    opts: ClientOptions,
    peers: Mutex<HashMap<SocketAddr, PeerConns>>,
    next: AtomicUsize,
}

/// A peer's open connections, and the gate its connects go through one at a time.
#[derive(Default)]
struct PeerConns {
    conns: Vec<Connection>,
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl Pool {
    pub fn new(opts: ClientOptions) -> Pool {
        Pool {
            opts,
            peers: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// A live connection to `addr` when it has `conns_per_peer` already; else the gate to
    /// open one through.
    fn pick(&self, addr: SocketAddr) -> Result<Connection, Arc<tokio::sync::Mutex<()>>> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peer = peers.entry(addr).or_default();
        peer.conns.retain(|c| !c.is_closed());
        if peer.conns.len() < self.opts.conns_per_peer.max(1) {
            return Err(peer.connecting.clone());
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % peer.conns.len();
        Ok(peer.conns[index].clone())
    }

    /// Returns a live connection to `addr`, opening one if the peer has fewer than
    /// `conns_per_peer`. A connect waits only for other connects to the same peer: one to a
    /// peer that does not answer (cut off, its packets dropped) holds up no call to another
    /// (a Raft vote to the rest of the group, say).
    pub async fn get(&self, addr: SocketAddr) -> Result<Connection, RpcError> {
        let gate = match self.pick(addr) {
            Ok(conn) => return Ok(conn),
            Err(gate) => gate,
        };
        let _one_at_a_time = gate.lock().await;
        // Another caller may have connected meanwhile.
        if let Ok(conn) = self.pick(addr) {
            return Ok(conn);
        }
        let conn = Connection::connect(addr, self.opts.clone()).await?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry(addr).or_default().conns.push(conn.clone());
        Ok(conn)
    }

    /// Sends one request to `addr` over a pooled connection.
    pub async fn call(
        &self,
        addr: SocketAddr,
        msg: Message,
        data: Bytes,
    ) -> Result<(Message, Bytes), RpcError> {
        self.get(addr).await?.call(msg, data).await
    }

    /// Drops every connection to `addr` (after the peer restarted, say).
    pub async fn forget(&self, addr: SocketAddr) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }
}

/// Runs futures concurrently on the current task, returning their outputs in order (a
/// request fanned out to several peers).
pub async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// The serving side's request handler.
pub trait Handler: Send + Sync + 'static {
    /// This node's id, sent in the handshake.
    fn node(&self) -> NodeId;

    /// Handles one request. The reply's data section is the returned `Bytes`.
    fn handle(
        &self,
        msg: Message,
        data: Bytes,
    ) -> impl Future<Output = Result<(Message, Bytes), ErrorBody>> + Send;

    /// Handles one request from `peer` (the connection's remote address and the role it
    /// proved); by default as `handle`, for handlers that decide by who asks.
    fn handle_from(
        &self,
        peer: Peer,
        msg: Message,
        data: Bytes,
    ) -> impl Future<Output = Result<(Message, Bytes), ErrorBody>> + Send {
        let _ = peer;
        self.handle(msg, data)
    }
}

/// Accepts connections until `shutdown` turns true, then stops reading new requests, waits
/// (bounded) for those in flight, and returns.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    // Connections open per address (see `Limits::conns_per_peer_max`).
    let open: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let ip = peer.ip().to_canonical();
                    let count = {
                        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                        let n = open.entry(ip).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let slot = OpenSlot { open: open.clone(), ip };
                    let over = count > limits.conns_per_peer_max;
                    let conn = serve_connection(stream, peer, handler.clone(), limits, over, shutdown.clone());
                    tasks.spawn(async move {
                        conn.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    warn!(error = %e, "failed to accept a connection");
                    tokio::task::yield_now().await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        warn!("requests still in flight after the drain timeout; abandoning them");
    }
}

/// One open connection of an address, counted until it closes.
struct OpenSlot {
    open: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves one connection; `over`: its address already has the most connections allowed, so
/// it is refused after its `Hello`.
async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    limits: Limits,
    over: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    // A connection that opens with a TLS handshake gets TLS (clients holding a cluster key);
    // one that opens with a frame is plain.
    let tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, crate::tls::opens_with_tls(&stream)).await {
            Ok(Ok(tls)) => tls,
            _ => return,
        };
    let (read_half, write_half, binding) = if tls {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, crate::tls::accept(stream)).await {
            Ok(Ok((tls, binding))) => {
                let (r, w) = tokio::io::split(tls);
                (Box::new(r) as BoxRead, Box::new(w) as BoxWrite, binding)
            }
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "no TLS handshake within the handshake timeout");
                return;
            }
        }
    } else {
        let (r, w) = plain_halves(stream);
        (r, w, Vec::new())
    };
    let tls_on = !binding.is_empty();
    let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half);
    let (tx, rx) = mpsc::channel::<OutFrame>(limits.inflight_max.max(1));
    let writer = tokio::spawn(write_loop(write_half, rx));

    let reply_error = |id: u64, code: ErrorCode, detail: String| {
        out_frame(
            id,
            &Message::Error(ErrorBody::new(code, detail)),
            Bytes::new(),
        )
    };

    // The handshake: the first frame must be a Hello with a version in common.
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut reader, &limits)).await;
    let first = match first {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "bad frame before handshake");
            let code = match &e {
                ReadError::Frame(f) => frame_error_code(f),
                ReadError::Io(_) => ErrorCode::Malformed,
            };
            let _ = tx.send(reply_error(0, code, e.to_string())).await;
            drop(tx);
            let _ = writer.await;
            return;
        }
        Err(_) => {
            debug!(%peer, "no hello within the handshake timeout");
            return;
        }
    };
    let id = first.header.request_id;
    // Who the peer proved to be: `Open` without a key.
    let mut role = Role::Open;
    match Message::decode(first.header.kind, &first.body) {
        Ok(Message::Hello(hello))
            if hello.version_min <= PROTOCOL_VERSION && PROTOCOL_VERSION <= hello.version_max =>
        {
            if over {
                let detail = format!(
                    "too many connections from {}: this node keeps at most {} from one address",
                    peer.ip(),
                    limits.conns_per_peer_max
                );
                warn!(%peer, name = %hello.peer_name, "refused a connection: {detail}");
                let _ = tx.send(reply_error(id, ErrorCode::Busy, detail)).await;
                drop(tx);
                let _ = writer.await;
                return;
            }
            // The secret of the role the peer claims: derived from the cluster key.
            let key = process_key().map(|k| crate::cred::secret_for(&k, hello.claim));
            let (my_nonce, proof) = match &key {
                Some(k) => {
                    let n = nonce();
                    let p = key_proof(
                        k,
                        SERVER_ROLE,
                        &hello.nonce,
                        &[n.as_slice(), &binding].concat(),
                    );
                    (n, p)
                }
                None => (Vec::new(), Vec::new()),
            };
            let ok = Message::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                node: handler.node(),
                nonce: my_nonce.clone(),
                proof,
            });
            if tx.send(out_frame(id, &ok, Bytes::new())).await.is_err() {
                return;
            }
            if let Some(k) = key {
                // The client proves the claimed role's secret before anything else.
                let next =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut reader, &limits)).await;
                let refusal = match next {
                    Ok(Ok(Some(f))) => match Message::decode(f.header.kind, &f.body) {
                        Ok(Message::Auth(_)) if !tls_on => Some(
                            "this cluster encrypts its connections: the peer proved the key without TLS",
                        ),
                        Ok(Message::Auth(a))
                            if key_proof_ok(
                                &k,
                                CLIENT_ROLE,
                                &my_nonce,
                                &[hello.nonce.as_slice(), &binding].concat(),
                                &a.proof,
                            ) =>
                        {
                            None
                        }
                        Ok(Message::Auth(_)) => Some(match hello.claim {
                            Claim::Node => {
                                "authentication failed: the peer does not hold this cluster's key"
                            }
                            Claim::Admin => {
                                "authentication failed: the peer does not hold this cluster's admin credential"
                            }
                            Claim::Client { .. } => {
                                "authentication failed: the peer's client credential is not of this cluster"
                            }
                        }),
                        _ => Some(
                            "this cluster requires its key: the peer sent no proof (start it with --cluster-key-file)",
                        ),
                    },
                    _ => Some("no key proof received"),
                };
                if let Some(why) = refusal {
                    warn!(%peer, name = %hello.peer_name, claim = ?hello.claim, why, "refused a connection");
                    let _ = tx
                        .send(reply_error(0, ErrorCode::PermissionDenied, why.to_string()))
                        .await;
                    drop(tx);
                    let _ = writer.await;
                    return;
                }
                if tx
                    .send(out_frame(0, &Message::AuthOk(AuthOk {}), Bytes::new()))
                    .await
                    .is_err()
                {
                    return;
                }
                role = hello.claim.role();
            }
            debug!(%peer, name = %hello.peer_name, "handshake done");
        }
        // Another version: a Hello of now, or of protocol 11 or older (no claim).
        other @ (Ok(Message::Hello(_)) | Err(_))
            if let Some((min, max)) = match &other {
                Ok(Message::Hello(h)) => Some((h.version_min, h.version_max)),
                _ if first.header.kind == 1 => crate::msg::decode_body::<LegacyHello>(&first.body)
                    .ok()
                    .map(|old| (old.version_min, old.version_max)),
                _ => None,
            } =>
        {
            let detail =
                format!("peer speaks versions {min}..={max}, this node speaks {PROTOCOL_VERSION}");
            let _ = tx
                .send(reply_error(id, ErrorCode::UnsupportedVersion, detail))
                .await;
            drop(tx);
            let _ = writer.await;
            return;
        }
        _ => {
            let detail = "the first frame must be Hello".to_string();
            let _ = tx.send(reply_error(id, ErrorCode::Malformed, detail)).await;
            drop(tx);
            let _ = writer.await;
            return;
        }
    }

    let from = Peer { addr: peer, role };
    let permits = Arc::new(Semaphore::new(limits.inflight_max.max(1)));
    loop {
        let frame = tokio::select! {
            _ = shutdown.changed() => break,
            read = read_frame(&mut reader, &limits) => read,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(ReadError::Io(e)) => {
                debug!(%peer, error = %e, "connection read failed");
                break;
            }
            Err(ReadError::Frame(e)) => {
                // The stream position is unknown after a bad header: answer and close.
                info!(%peer, error = %e, "closing connection after a bad frame");
                let _ = tx
                    .send(reply_error(0, frame_error_code(&e), e.to_string()))
                    .await;
                break;
            }
        };
        let id = frame.header.request_id;
        let kind = frame.header.kind;
        if crc32c::crc32c(&frame.data) != frame.header.data_crc32c {
            let detail = "request data damaged in transit".to_string();
            if tx
                .send(reply_error(id, ErrorCode::DataChecksum, detail))
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        let msg = match Message::decode(kind, &frame.body) {
            Ok(msg) if !frame.data.is_empty() && !Message::kind_carries_data(kind) => Err((
                ErrorCode::Malformed,
                format!("{} carries no data section", msg.name()),
            )),
            Ok(msg) => Ok(msg),
            Err(DecodeError::UnknownKind(k)) => {
                Err((ErrorCode::UnknownKind, format!("unknown message kind {k}")))
            }
            Err(DecodeError::Malformed(detail)) => Err((ErrorCode::Malformed, detail)),
        };
        let msg = match msg {
            Ok(msg) => msg,
            Err((code, detail)) => {
                debug!(%peer, id, kind, %detail, "refused request");
                if tx.send(reply_error(id, code, detail)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        // Backpressure: stop reading while the connection has its maximum in flight.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let handler = handler.clone();
        let tx = tx.clone();
        // Per request, at DEBUG: `req` (style: fixed span fields) ties a handler's lines to
        // the request and its peer.
        let span = tracing::debug_span!("req", req = id, %peer, kind = msg.name());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let reply = match handler.handle_from(from, msg, frame.data).await {
                    Ok((reply, data)) => reply_frame(id, &reply, data, &limits),
                    Err(body) => out_frame(id, &Message::Error(body), Bytes::new()),
                };
                let _ = tx.send(reply).await;
                drop(permit);
            },
            span,
        ));
    }
    // Let requests in flight finish and their replies go out, then close.
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT,
        permits.acquire_many(limits.inflight_max.max(1) as u32),
    )
    .await;
    drop(tx);
    let _ = writer.await;
}

fn frame_error_code(e: &FrameError) -> ErrorCode {
    match e {
        FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
        FrameError::BodyTooLarge { .. } | FrameError::DataTooLarge { .. } => ErrorCode::TooLarge,
        FrameError::DataChecksum { .. } => ErrorCode::DataChecksum,
        FrameError::BadMagic { .. } | FrameError::HeaderChecksum { .. } => ErrorCode::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{BrickId, Ino, ObjectKey, ObjectVersion, VolumeId};
    use crate::msg::{
        List, ListReply, ListedObject, ObjectState, Ping, Pong, Read, ReadData, Write,
    };

    /// Answers as large as asked: a `List` with `limit` objects, a `Read` with `len_bytes`
    /// bytes of data, anything else with a `Pong`.
    struct AsLargeAsAsked;

    const STATE: ObjectState = ObjectState {
        version: ObjectVersion(1),
        len_bytes: 0,
        tag: 0,
    };

    impl Handler for AsLargeAsAsked {
        fn node(&self) -> NodeId {
            NodeId(7)
        }

        async fn handle(&self, msg: Message, _data: Bytes) -> Result<(Message, Bytes), ErrorBody> {
            Ok(match msg {
                Message::List(l) => {
                    let one = ListedObject {
                        key: ObjectKey {
                            volume: VolumeId(1),
                            ino: Ino(u64::MAX),
                            column: 0,
                        },
                        state: STATE,
                    };
                    let objects = vec![one; l.limit as usize];
                    let reply = ListReply {
                        objects,
                        more: false,
                    };
                    (Message::ListReply(reply), Bytes::new())
                }
                Message::Read(r) => (
                    Message::ReadData(ReadData { state: STATE }),
                    Bytes::from(vec![7u8; r.len_bytes as usize]),
                ),
                _ => (Message::Pong(Pong { node: NodeId(7) }), Bytes::new()),
            })
        }
    }

    fn too_large(r: Result<(Message, Bytes), RpcError>, what: &str) {
        match r {
            Err(RpcError::Remote(body)) if body.is(ErrorCode::TooLarge) => {
                assert!(body.to_string().contains(what), "{body}");
            }
            other => panic!("expected TooLarge naming {what}, got {other:?}"),
        }
    }

    /// A connect to a peer that does not answer holds up no call to another peer on the same
    /// pool (the metadata group's votes share one: a cut-off member must not stall an
    /// election among the others).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_peer_holds_up_no_call_to_another() {
        // Accepts, and never answers the Hello.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Arc::new(AsLargeAsAsked),
            Limits::default(),
            shutdown,
        ));
        let pool = Arc::new(Pool::new(ClientOptions {
            connect_timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        }));
        let stuck = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.call(silent_addr, Message::Ping(Ping {}), Bytes::new())
                    .await
            })
        };
        // Let the stuck call reach its connect first (bounded: it is the next thing it does).
        for _ in 0..100_000 {
            if pool.peers.lock().unwrap().contains_key(&silent_addr) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let pong = pool.call(live, Message::Ping(Ping {}), Bytes::new()).await;
        assert!(matches!(pong, Ok((Message::Pong(_), _))), "{pong:?}");
        assert!(!stuck.is_finished(), "the silent peer answered?");
        stuck.abort();
        keep.abort();
        stop.send(true).unwrap();
        server.await.unwrap();
    }

    /// A reply over the frame limits is answered `TooLarge` in its place, and a request over
    /// them is refused before it is sent: either way the connection, and the requests beside
    /// it, go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_over_the_limits_are_refused_as_too_large_and_the_connection_stays() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Arc::new(AsLargeAsAsked),
            Limits::default(),
            shutdown,
        ));
        let conn = Connection::connect(addr, ClientOptions::default())
            .await
            .unwrap();
        let list = |limit| {
            Message::List(List {
                brick: BrickId(1),
                after: None,
                limit,
            })
        };
        // About 2 MiB of body, twice the limit; beside it, a request that fits.
        let (big, small) = tokio::join!(
            conn.call(list(200_000), Bytes::new()),
            conn.call(list(1_000), Bytes::new())
        );
        too_large(big, "ListReply");
        match small.unwrap() {
            (Message::ListReply(r), _) => assert_eq!(r.objects.len(), 1_000),
            other => panic!("{other:?}"),
        }
        let read = |len_bytes| {
            Message::Read(Read {
                brick: BrickId(1),
                key: ObjectKey {
                    volume: VolumeId(1),
                    ino: Ino(1),
                    column: 0,
                },
                offset_bytes: 0,
                len_bytes,
                repair: false,
            })
        };
        let over = Limits::default().data_max_bytes + 1;
        too_large(conn.call(read(over), Bytes::new()).await, "ReadData");
        let (_, data) = conn.call(read(over - 1), Bytes::new()).await.unwrap();
        assert_eq!(data.len(), over as usize - 1);
        // A request over the limits is the client's to refuse: the server would close on it.
        let write = Message::Write(Write {
            brick: BrickId(1),
            key: ObjectKey {
                volume: VolumeId(1),
                ino: Ino(1),
                column: 0,
            },
            offset_bytes: 0,
            sync: false,
        });
        let huge = Bytes::from(vec![0u8; over as usize]);
        too_large(conn.call(write, huge).await, "Write request");
        let ping = conn.call(Message::Ping(Ping {}), Bytes::new()).await;
        assert!(matches!(ping, Ok((Message::Pong(_), _))), "{ping:?}");
        assert!(!conn.is_closed());
        stop.send(true).unwrap();
        server.await.unwrap();
    }
}
