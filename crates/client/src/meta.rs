//! The metadata client: finds the leader, follows redirects, retries with backoff until a
//! deadline, and gives every write a (session, sequence) so that a retry after a leader change
//! is applied once and answered with its first result. Reads go to the leader, which confirms
//! its leadership (read index) before answering, so they are linearizable.

use brickfs_proto::meta::{
    AdminOp, GroupStatus, MetaAdmin, MetaOp, MetaRead, MetaReadReq, MetaReply, MetaWrite,
    SessionId, SessionInfo, VolumeRecord,
};
use brickfs_proto::rpc::{ClientOptions, Outcome, Pool, RpcError};
use brickfs_proto::{ErrorBody, ErrorCode, Message};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a metadata call failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The group answered with an error: nothing happened (POSIX-shaped code inside).
    #[error("{0}")]
    Rejected(ErrorBody),
    /// No answer before the deadline. A write may or may not have been applied.
    #[error("metadata group unavailable after {elapsed:?} ({attempts} attempts): {last}")]
    Unavailable {
        elapsed: Duration,
        attempts: u32,
        last: String,
        outcome: Outcome,
    },
}

impl MetaError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            MetaError::Rejected(b) => b.kind(),
            MetaError::Unavailable { .. } => None,
        }
    }
}

/// Retry policy.
#[derive(Clone, Debug)]
pub struct MetaClientOptions {
    /// Give up after this long.
    pub deadline: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The lease of the session this client opens.
    pub lease: Duration,
    pub client_name: String,
    /// The local address to connect from (`None`: the system picks).
    pub local_addr: Option<std::net::IpAddr>,
    /// What to prove (`None`: the process's credential, if any).
    pub credential: Option<Arc<brickfs_proto::cred::Credential>>,
}

impl Default for MetaClientOptions {
    fn default() -> Self {
        MetaClientOptions {
            deadline: Duration::from_secs(30),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            lease: Duration::from_secs(30),
            client_name: "client".into(),
            local_addr: None,
            credential: None,
        }
    }
}

struct SessionState {
    id: SessionId,
    next_seq: u64,
    /// Sequence numbers below this were announced to the session journal, if there is one.
    reserved: u64,
    /// Sequence numbers sent whose answer has not arrived.
    outstanding: BTreeSet<u64>,
}

struct State {
    members: Vec<SocketAddr>,
    leader: Option<SocketAddr>,
    next_member: usize,
    session: Option<SessionState>,
    journal: Option<SessionJournal>,
}

/// Told, before the session uses them, the session's id and the sequence number below which
/// every number it sends lies (`MetaClient::set_session_journal`).
pub type SessionJournal = Arc<dyn Fn(SessionId, u64) + Send + Sync>;

/// Sequence numbers announced to a session journal at a time.
const SEQ_BLOCK: u64 = 1 << 16;

/// A client of the metadata group. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct MetaClient {
    pool: Arc<Pool>,
    opts: MetaClientOptions,
    state: Arc<Mutex<State>>,
    session_open: Arc<tokio::sync::Mutex<()>>,
}

enum Attempt {
    Done(MetaReply),
    Rejected(ErrorBody),
    Status(GroupStatus),
    Redirect(Option<SocketAddr>),
    Retry(String, Outcome),
}

impl MetaClient {
    /// A client for the group whose members (some or all) are `members`.
    pub fn new(members: Vec<SocketAddr>, opts: MetaClientOptions) -> MetaClient {
        let pool = Arc::new(Pool::new(ClientOptions {
            peer_name: opts.client_name.clone(),
            // A member that does not answer within this is tried no longer: the next one is
            // (a cut-off leader must not hold a client for long; a retried write is
            // exactly-once through the session).
            request_timeout: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(2),
            conns_per_peer: 1,
            local_addr: opts.local_addr,
            credential: opts.credential.clone(),
            ..ClientOptions::default()
        }));
        MetaClient {
            pool,
            opts,
            state: Arc::new(Mutex::new(State {
                members,
                leader: None,
                next_member: 0,
                session: None,
                journal: None,
            })),
            session_open: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target(&self) -> Option<SocketAddr> {
        let mut s = self.lock();
        if let Some(l) = s.leader {
            return Some(l);
        }
        if s.members.is_empty() {
            return None;
        }
        let i = s.next_member % s.members.len();
        s.next_member += 1;
        Some(s.members[i])
    }

    fn note_leader(&self, leader: Option<SocketAddr>) {
        let mut s = self.lock();
        s.leader = leader;
        if let Some(l) = leader
            && !s.members.contains(&l)
        {
            s.members.push(l);
        }
    }

    /// The members this client knows (those it was given and leaders it was sent to).
    pub fn members(&self) -> Vec<SocketAddr> {
        self.lock().members.clone()
    }

    /// The leader this client talks to now, if it knows one.
    pub fn leader(&self) -> Option<SocketAddr> {
        self.lock().leader
    }

    async fn attempt(&self, addr: SocketAddr, msg: Message) -> Attempt {
        match self.pool.call(addr, msg, Bytes::new()).await {
            Ok((Message::MetaOk(reply), _)) => Attempt::Done(reply),
            Ok((Message::GroupStatus(st), _)) => Attempt::Status(st),
            Ok((Message::MetaRedirect(r), _)) => {
                Attempt::Redirect(r.leader_addr.and_then(|a| a.parse().ok()))
            }
            Ok((other, _)) => Attempt::Retry(
                format!("unexpected reply {}", other.name()),
                Outcome::Unknown,
            ),
            Err(RpcError::Remote(body))
                if matches!(
                    body.kind(),
                    Some(
                        ErrorCode::NotLeader
                            | ErrorCode::Busy
                            | ErrorCode::ShuttingDown
                            | ErrorCode::UnknownKind
                    )
                ) =>
            {
                // UnknownKind: a node without a metadata member. Busy: a leader change in
                // progress. Neither applied the request.
                Attempt::Retry(body.to_string(), Outcome::Rejected)
            }
            Err(RpcError::Remote(body)) => Attempt::Rejected(body),
            // A cluster key mismatch: no other member will think differently.
            Err(e @ RpcError::Unauthorized { .. }) => {
                Attempt::Rejected(ErrorBody::new(ErrorCode::PermissionDenied, e.to_string()))
            }
            Err(e) => {
                let outcome = e.outcome();
                self.pool.forget(addr).await;
                Attempt::Retry(format!("{addr}: {e}"), outcome)
            }
        }
    }

    /// Sends `msg` to the leader until it answers or the deadline passes.
    async fn call(&self, msg: Message) -> Result<Attempt, MetaError> {
        let start = Instant::now();
        let mut backoff = self.opts.backoff_min;
        let mut attempts = 0u32;
        let mut outcome = Outcome::Rejected;
        let mut last = String::from("no member answered");
        loop {
            if start.elapsed() >= self.opts.deadline {
                return Err(MetaError::Unavailable {
                    elapsed: start.elapsed(),
                    attempts,
                    last,
                    outcome,
                });
            }
            attempts += 1;
            let Some(addr) = self.target() else {
                return Err(MetaError::Unavailable {
                    elapsed: start.elapsed(),
                    attempts,
                    last: "no metadata members known".into(),
                    outcome,
                });
            };
            let remaining = self.opts.deadline.saturating_sub(start.elapsed());
            let attempt =
                match tokio::time::timeout(remaining, self.attempt(addr, msg.clone())).await {
                    Ok(a) => a,
                    Err(_) => Attempt::Retry(
                        format!("{addr}: no answer before the deadline"),
                        Outcome::Unknown,
                    ),
                };
            match attempt {
                Attempt::Redirect(Some(leader)) if Some(leader) != self.leader() => {
                    tracing::debug!(%addr, %leader, "following leader hint");
                    self.note_leader(Some(leader));
                    continue;
                }
                Attempt::Redirect(_) => {
                    self.note_leader(None);
                    last = format!("{addr} knows no leader");
                }
                Attempt::Rejected(body) => {
                    self.note_leader(Some(addr));
                    return Err(MetaError::Rejected(body));
                }
                Attempt::Retry(why, o) => {
                    self.note_leader(None);
                    if o == Outcome::Unknown {
                        outcome = Outcome::Unknown;
                    }
                    last = why;
                }
                done => {
                    self.note_leader(Some(addr));
                    return Ok(done);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.opts.backoff_max);
        }
    }

    async fn session(&self) -> Result<SessionId, MetaError> {
        if let Some(s) = &self.lock().session {
            return Ok(s.id);
        }
        let _guard = self.session_open.lock().await;
        if let Some(s) = &self.lock().session {
            return Ok(s.id);
        }
        let info = self.open_session().await?;
        Ok(info.id)
    }

    /// Opens this client's session (done lazily by the first write).
    pub async fn open_session(&self) -> Result<SessionInfo, MetaError> {
        let op = MetaOp::OpenSession {
            client: self.opts.client_name.clone(),
            lease_ms: self.opts.lease.as_millis() as u64,
        };
        let msg = Message::MetaWrite(MetaWrite {
            session: SessionId(0),
            seq: 0,
            acked_below: 0,
            op,
        });
        match self.finish(self.call(msg).await?)? {
            MetaReply::Session(info) => {
                let mut s = self.lock();
                s.session = Some(SessionState {
                    id: info.id,
                    next_seq: 1,
                    reserved: 1,
                    outstanding: BTreeSet::new(),
                });
                Self::reserve(&mut s);
                Ok(info)
            }
            other => Err(MetaError::Rejected(ErrorBody::new(
                ErrorCode::Internal,
                format!("unexpected answer to OpenSession: {other:?}"),
            ))),
        }
    }

    fn finish(&self, a: Attempt) -> Result<MetaReply, MetaError> {
        match a {
            Attempt::Done(reply) => Ok(reply),
            Attempt::Status(st) => Err(MetaError::Rejected(ErrorBody::new(
                ErrorCode::Internal,
                format!("unexpected status {st:?}"),
            ))),
            Attempt::Rejected(body) => Err(MetaError::Rejected(body)),
            Attempt::Redirect(_) | Attempt::Retry(..) => Err(MetaError::Rejected(ErrorBody::new(
                ErrorCode::Internal,
                "retry escaped the retry loop",
            ))),
        }
    }

    /// Applies a write exactly once.
    pub async fn write(&self, op: MetaOp) -> Result<MetaReply, MetaError> {
        match self.write_in_session(op.clone()).await {
            // The session's lease ran out (the client was idle or cut off): nothing was applied,
            // so open a new session and try once more. Locks of the old session are gone, as
            // they are when a lease expires.
            Err(MetaError::Rejected(body)) if body.is(ErrorCode::SessionExpired) => {
                tracing::warn!(client = %self.opts.client_name, "session expired; opening a new one");
                self.lock().session = None;
                self.write_in_session(op).await
            }
            other => other,
        }
    }

    /// Renews this client's session every `every` until the client is dropped everywhere else;
    /// a mount runs it so that its session and locks outlive idle periods.
    pub fn spawn_keepalive(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.state);
        let (pool, opts, open) = (
            self.pool.clone(),
            self.opts.clone(),
            self.session_open.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let client = MetaClient {
                    pool: pool.clone(),
                    opts: opts.clone(),
                    state,
                    session_open: open.clone(),
                };
                if let Err(e) = client.write(MetaOp::KeepAlive).await {
                    tracing::warn!(error = %e, "failed to renew the session lease");
                }
            }
        })
    }

    async fn write_in_session(&self, op: MetaOp) -> Result<MetaReply, MetaError> {
        let session = self.session().await?;
        let (seq, acked_below) = {
            let mut s = self.lock();
            let st = s.session.as_mut().ok_or_else(|| {
                MetaError::Rejected(ErrorBody::new(ErrorCode::SessionExpired, "session closed"))
            })?;
            let seq = st.next_seq;
            st.next_seq += 1;
            st.outstanding.insert(seq);
            let acked_below = st.outstanding.first().copied().unwrap_or(seq);
            if seq >= st.reserved {
                Self::reserve(&mut s);
            }
            (seq, acked_below)
        };
        let msg = Message::MetaWrite(MetaWrite {
            session,
            seq,
            acked_below,
            op,
        });
        let result = self.call(msg).await;
        // Answered or given up (`call` retries within its deadline; nobody asks for this
        // sequence number again): the group may forget its answer. A copy of the request still
        // on its way arrives below `acked_below` and is refused (`StaleRequest`), never
        // applied, so acknowledging an unknown outcome is safe — and keeping it outstanding
        // would pin every later answer of the session in the group's reply cache for good.
        if let Some(st) = self.lock().session.as_mut() {
            st.outstanding.remove(&seq);
        }
        self.finish(result?)
    }

    /// A write outside any session (node registration and heartbeats): not deduplicated, so
    /// only for operations that may safely apply twice.
    pub async fn write_unsessioned(&self, op: MetaOp) -> Result<MetaReply, MetaError> {
        let msg = Message::MetaWrite(MetaWrite {
            session: SessionId(0),
            seq: 0,
            acked_below: 0,
            op,
        });
        let r = self.call(msg).await?;
        self.finish(r)
    }

    /// A linearizable read.
    pub async fn read(&self, read: MetaRead) -> Result<MetaReply, MetaError> {
        let r = self.call(Message::MetaRead(MetaReadReq { read })).await?;
        self.finish(r)
    }

    /// Every volume, in id order, read a page at a time (`MetaRead::VolumesPage`): each page
    /// is one linearizable read, so a volume made or deleted meanwhile may or may not be
    /// listed, but none is listed twice.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let read = MetaRead::VolumesPage { after, limit: 1024 };
            match self.read(read).await? {
                MetaReply::VolumePage { volumes, next } => {
                    all.extend(volumes);
                    match next {
                        Some(n) => after = Some(n),
                        None => return Ok(all),
                    }
                }
                other => {
                    return Err(MetaError::Rejected(ErrorBody::new(
                        ErrorCode::Internal,
                        format!("unexpected answer to VolumesPage: {other:?}"),
                    )));
                }
            }
        }
    }

    /// Cluster administration (init, add or remove a member).
    pub async fn admin(&self, op: AdminOp) -> Result<MetaReply, MetaError> {
        let r = self.call(Message::MetaAdmin(MetaAdmin { op })).await?;
        self.finish(r)
    }

    /// Asks one member directly what it knows of the group (no redirect).
    pub async fn status_of(&self, addr: SocketAddr) -> Result<GroupStatus, MetaError> {
        let msg = Message::MetaAdmin(MetaAdmin {
            op: AdminOp::Status,
        });
        match self.pool.call(addr, msg, Bytes::new()).await {
            Ok((Message::GroupStatus(st), _)) => Ok(st),
            Ok((other, _)) => Err(MetaError::Rejected(ErrorBody::new(
                ErrorCode::Internal,
                format!("unexpected reply {}", other.name()),
            ))),
            Err(RpcError::Remote(b)) => Err(MetaError::Rejected(b)),
            Err(e) => Err(MetaError::Unavailable {
                elapsed: Duration::ZERO,
                attempts: 1,
                last: e.to_string(),
                outcome: e.outcome(),
            }),
        }
    }

    /// The session id, once opened.
    pub fn session_id(&self) -> Option<SessionId> {
        self.lock().session.as_ref().map(|s| s.id)
    }

    /// Announces the next block of sequence numbers to the journal (before they are used).
    fn reserve(s: &mut State) {
        let Some(st) = s.session.as_mut() else { return };
        st.reserved = st.next_seq.max(st.reserved) + SEQ_BLOCK;
        if let Some(j) = &s.journal {
            j(st.id, st.reserved);
        }
    }

    /// Tells `journal` the session's id and a bound on its sequence numbers whenever the
    /// session opens and before each block of numbers is used, so that a process taking the
    /// session over after this one died (`adopt_session`) starts above every number this one
    /// sent: a number sent twice would be answered from the group's reply cache.
    pub fn set_session_journal(&self, journal: SessionJournal) {
        let mut s = self.lock();
        s.journal = Some(journal);
        Self::reserve(&mut s);
    }

    /// Continues session `id`, opened by another client (a mount's earlier process), at
    /// sequence number `next_seq`, which must lie above every number that client sent: its
    /// locks and open-file holds stay this client's. If the session expired meanwhile, the
    /// first write opens a new one (as after any expiry).
    pub fn adopt_session(&self, id: SessionId, next_seq: u64) {
        let mut s = self.lock();
        s.session = Some(SessionState {
            id,
            next_seq,
            reserved: next_seq,
            outstanding: BTreeSet::new(),
        });
        Self::reserve(&mut s);
    }

    /// The session's id and the sequence number this client sends next.
    pub fn session_position(&self) -> Option<(SessionId, u64)> {
        self.lock().session.as_ref().map(|s| (s.id, s.next_seq))
    }
}
