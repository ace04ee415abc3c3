//! openraft storage on RocksDB: the Raft log and the state machine in column families of one
//! database per member.
//!
//! - `log`: entry index (big-endian) → bincode entry. Appends are written with `sync`, and the
//!   flush callback fires only after the write returned, so an entry is durable before openraft
//!   counts it (this is not configurable away).
//! - `raft`: the vote (synced), the committed log id and the last purged log id.
//! - `state`: the state machine's keys (see `sm::keys`), with the last applied log id and the
//!   membership written in the same batch as each apply, so state and position never disagree.
//!
//! Snapshots are files beside the database (`meta-snapshots/`): the `state` column family's
//! pairs, streamed from a RocksDB snapshot as length-prefixed records and closed by a count
//! (see [`SNAPSHOT_MAGIC`]), so building, keeping and sending one costs no memory that grows
//! with the namespace. Installing one replaces the column family in one batch.

// openraft's traits fix the error type (`StorageError`, over 200 bytes); our helpers return it
// too rather than converting at every call.
#![allow(clippy::result_large_err)]

use crate::kv::{KvRead, Overlay};
use crate::sm::{self, keys};
use crate::types::{CommandResult, LogId, StoredMembership, TypeConfig};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::Serialize;
use std::fmt::Debug;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

type SErr = StorageError<u64>;

const CF_LOG: &str = "log";
const CF_RAFT: &str = "raft";
const CF_STATE: &str = "state";

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    brickfs_proto::msg::encode_body(v)
}

fn dec<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    brickfs_proto::msg::decode_body(raw).map_err(|e| e.to_string())
}

/// The write-ahead log files a metadata database keeps at most (about).
const MAX_WAL_BYTES: u64 = 256 << 20;

/// Opens (creating if needed) the metadata database at `path`.
pub fn open_db(path: &Path) -> Result<Arc<DB>, String> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // A column family written little (`raft`) would otherwise keep every write-ahead log file
    // since its last flush: past this total, RocksDB flushes the families holding the oldest.
    opts.set_max_total_wal_size(MAX_WAL_BYTES);
    let cfs = [CF_LOG, CF_RAFT, CF_STATE]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    DB::open_cf_descriptors(&opts, path, cfs)
        .map(Arc::new)
        .map_err(|e| format!("open metadata database {}: {e}", path.display()))
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // The column families are created at open; their absence is a bug.
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} missing"))
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// The first key after every key that starts with `prefix` (`None`: there is none, the
/// prefix is all 0xff or empty).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Committed state as the state machine's logic reads it.
pub struct DbState<'a> {
    db: &'a DB,
}

impl<'a> DbState<'a> {
    pub fn new(db: &'a DB) -> Self {
        DbState { db }
    }
}

impl KvRead for DbState<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.db
            .get_cf(cf(self.db, CF_STATE), key)
            .map_err(|e| e.to_string())
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::kv::Pairs, String> {
        let start = after.unwrap_or(prefix);
        let mut out = Vec::new();
        // Bounded to the prefix: without a bound, a seek steps over every deleted key after
        // the prefix until it finds a live one (a file's open-holder keys, all deleted, made
        // each unlink of a million-file directory scan the tombstones of all later files).
        let mut opts = rocksdb::ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            opts.set_iterate_upper_bound(end);
        }
        for item in self.db.iterator_cf_opt(
            cf(self.db, CF_STATE),
            opts,
            IteratorMode::From(start, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            if Some(&*k) == after {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// The Raft log.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        LogStore { db }
    }

    fn get_raft<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
        self.db
            .get_cf(cf(&self.db, CF_RAFT), key)
            .map_err(|e| StorageIOError::read(any(e)))?
            .map(|raw| dec(&raw).map_err(|e| StorageIOError::read(any(e)).into()))
            .transpose()
    }

    fn put_raft<T: Serialize>(&self, key: &[u8], v: &T, sync: bool) -> Result<(), SErr> {
        let wo = if sync {
            synced()
        } else {
            WriteOptions::default()
        };
        self.db
            .put_cf_opt(cf(&self.db, CF_RAFT), key, enc(v), &wo)
            .map_err(|e| StorageIOError::write(any(e)).into())
    }

    fn last_entry(&self) -> Result<Option<Entry<TypeConfig>>, SErr> {
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End);
        match it.next() {
            Some(Ok((_, v))) => Ok(Some(
                dec(&v).map_err(|e| StorageIOError::read_logs(any(e)))?,
            )),
            Some(Err(e)) => Err(StorageIOError::read_logs(any(e)).into()),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&start.to_be_bytes(), Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
            let index = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StorageIOError::read_logs(any("bad log key")))?,
            );
            if !range.contains(&index) {
                break;
            }
            out.push(dec(&v).map_err(|e| StorageIOError::read_logs(any(e)))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId> = self.get_raft(b"last_purged")?;
        let last = self.last_entry()?.map(|e| e.log_id).or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        self.put_raft(b"vote", vote, true)
            .map_err(|_| StorageIOError::write_vote(any("write vote")).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        self.get_raft(b"vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), SErr> {
        self.put_raft(b"committed", &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, SErr> {
        Ok(self.get_raft::<Option<LogId>>(b"committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        for e in entries {
            batch.put_cf(log, e.log_id.index.to_be_bytes(), enc(&e));
        }
        let db = self.db.clone();
        // The fsync runs off the async workers; the callback fires once the entries are durable.
        let result = tokio::task::spawn_blocking(move || db.write_opt(batch, &synced()))
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg.clone())));
                Err(StorageIOError::write_logs(any(msg)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), SErr> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            log_id.index.to_be_bytes(),
            u64::MAX.to_be_bytes(),
        );
        batch.delete_cf(cf(&self.db, CF_LOG), u64::MAX.to_be_bytes());
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), SErr> {
        // Record the purge point first: a crash between the two writes leaves entries that are
        // simply ignored, never a gap that is not accounted for.
        self.put_raft(b"last_purged", &log_id, true)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            0u64.to_be_bytes(),
            log_id.index.saturating_add(1).to_be_bytes(),
        );
        self.db
            .write(batch)
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
    }
}

/// A snapshot file's first bytes. Then one record per pair (key length and value length as
/// little-endian u32, the key, the value) and, to close it, a length of `u32::MAX` and the
/// count of pairs (u64): a file cut short does not install.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BFSNAP1\n";

struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    path: PathBuf,
}

/// Where a database's snapshot files live: `meta` -> `meta-snapshots`.
fn snapshot_dir(db: &DB) -> PathBuf {
    let mut name = db.path().as_os_str().to_os_string();
    name.push("-snapshots");
    PathBuf::from(name)
}

/// Writes the pairs of `state` as a snapshot file at `path` (synced); returns the applied
/// log id and membership found among them, and the file's size.
fn write_snapshot(
    pairs: impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
    path: &Path,
) -> Result<(Option<LogId>, StoredMembership, u64), String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    out.write_all(SNAPSHOT_MAGIC).map_err(io)?;
    let (mut applied, mut membership, mut count) = (None, StoredMembership::default(), 0u64);
    for item in pairs {
        let (k, v) = item.map_err(|e| e.to_string())?;
        if &*k == keys::APPLIED {
            applied = dec::<Option<LogId>>(&v)?;
        } else if &*k == keys::MEMBERSHIP {
            membership = dec::<StoredMembership>(&v)?;
        }
        let len = |n: usize| u32::try_from(n).map_err(|_| format!("a pair of {n} bytes"));
        out.write_all(&len(k.len())?.to_le_bytes()).map_err(io)?;
        out.write_all(&len(v.len())?.to_le_bytes()).map_err(io)?;
        out.write_all(&k).map_err(io)?;
        out.write_all(&v).map_err(io)?;
        count += 1;
    }
    out.write_all(&u32::MAX.to_le_bytes()).map_err(io)?;
    out.write_all(&count.to_le_bytes()).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    Ok((applied, membership, bytes))
}

/// Reads a snapshot file, handing each pair to `each`; returns the count.
fn read_snapshot(
    file: std::fs::File,
    mut each: impl FnMut(Vec<u8>, Vec<u8>),
) -> Result<u64, String> {
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    let short = |what: &str, e: std::io::Error| format!("snapshot cut short in {what}: {e}");
    input
        .read_exact(&mut magic)
        .map_err(|e| short("its header", e))?;
    if &magic != SNAPSHOT_MAGIC {
        return Err("not a brickfs metadata snapshot (wrong header)".into());
    }
    let mut count = 0u64;
    loop {
        let mut word = [0u8; 4];
        input
            .read_exact(&mut word)
            .map_err(|e| short("a record", e))?;
        let klen = u32::from_le_bytes(word);
        if klen == u32::MAX {
            let mut n = [0u8; 8];
            input
                .read_exact(&mut n)
                .map_err(|e| short("its count", e))?;
            let n = u64::from_le_bytes(n);
            if n != count {
                return Err(format!("snapshot says {n} pairs, holds {count}"));
            }
            if !input.fill_buf().map_err(|e| e.to_string())?.is_empty() {
                return Err("bytes after the snapshot's end".into());
            }
            return Ok(count);
        }
        input
            .read_exact(&mut word)
            .map_err(|e| short("a record", e))?;
        let vlen = u32::from_le_bytes(word);
        let mut k = vec![0u8; klen as usize];
        let mut v = vec![0u8; vlen as usize];
        input.read_exact(&mut k).map_err(|e| short("a key", e))?;
        input.read_exact(&mut v).map_err(|e| short("a value", e))?;
        each(k, v);
        count += 1;
    }
}

/// The state machine.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// The size of the current snapshot's file (0 before the first).
    snapshot_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Counts applied batches that changed a file's locks (and installed snapshots), so that
    /// lock waiters wake when a lock goes instead of polling.
    lock_changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    pub fn new(db: Arc<DB>) -> Self {
        // Snapshots are made again after a start (openraft asks when it needs one): files of
        // an earlier run, or a transfer cut by a crash, go.
        let dir = snapshot_dir(&db);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not clear old metadata snapshots");
        }
        StateMachine {
            db,
            current: Arc::new(Mutex::new(None)),
            snapshot_bytes: Arc::default(),
            lock_changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// The size of the current snapshot (bytes; 0 before the first is made).
    pub fn snapshot_bytes(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.snapshot_bytes.clone()
    }

    /// Fires whenever applied commands change a file's locks.
    pub fn lock_changes(&self) -> Arc<tokio::sync::watch::Sender<u64>> {
        self.lock_changes.clone()
    }

    fn applied(&self) -> Result<(Option<LogId>, StoredMembership), SErr> {
        let state = DbState::new(&self.db);
        let applied = state
            .get(keys::APPLIED)
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?
            .map(|raw| dec::<Option<LogId>>(&raw))
            .transpose()
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?
            .flatten();
        let membership = state
            .get(keys::MEMBERSHIP)
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?
            .map(|raw| dec::<StoredMembership>(&raw))
            .transpose()
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?
            .unwrap_or_default();
        Ok((applied, membership))
    }
}

impl StateMachine {
    /// Makes `stored` the current snapshot; older files go (a transfer still reading one
    /// keeps its open file).
    async fn keep(&self, stored: StoredSnapshot) {
        if let Ok(m) = std::fs::metadata(&stored.path) {
            self.snapshot_bytes
                .store(m.len(), std::sync::atomic::Ordering::Relaxed);
        }
        let mut current = self.current.lock().await;
        if let Some(old) = current.replace(stored)
            && Some(&old.path) != current.as_ref().map(|c| &c.path)
        {
            std::fs::remove_file(&old.path).ok();
        }
    }

    /// A fresh path in the snapshot folder (created if needed).
    fn fresh_path(&self, what: &str) -> Result<PathBuf, String> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = snapshot_dir(&self.db);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(dir.join(format!("{what}-{}-{n}", std::process::id())))
    }
}

async fn open_snapshot(path: &Path) -> Result<tokio::fs::File, String> {
    tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .await
        .map_err(|e| format!("open snapshot {}: {e}", path.display()))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let db = self.db.clone();
        let path = self
            .fresh_path("snap")
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        let (applied, membership, bytes) = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                // Everything the snapshot covers must be durable before the log behind it goes.
                db.flush_wal(true).map_err(|e| e.to_string())?;
                let snap = db.snapshot();
                let written = write_snapshot(
                    snap.iterator_cf(cf(&db, CF_STATE), IteratorMode::Start),
                    &path,
                );
                if written.is_err() {
                    std::fs::remove_file(&path).ok();
                }
                written
            }
        })
        .await
        .map_err(|e| StorageIOError::read_state_machine(any(e)))?
        .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, bytes),
            None => format!("empty-{bytes}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        tracing::info!(snapshot = %meta.snapshot_id, bytes, "built metadata snapshot");
        let file = open_snapshot(&path)
            .await
            .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        self.keep(StoredSnapshot {
            meta: meta.clone(),
            path,
        })
        .await;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), SErr> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let db = self.db.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let base = DbState::new(&db);
            let mut overlay = Overlay::new(&base);
            let mut results = Vec::with_capacity(entries.len());
            for entry in &entries {
                match &entry.payload {
                    EntryPayload::Blank => results.push(Ok(brickfs_proto::meta::MetaReply::Done)),
                    EntryPayload::Normal(cmd) => results.push(sm::apply_command(&mut overlay, cmd)),
                    EntryPayload::Membership(m) => {
                        let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                        overlay.put(keys::MEMBERSHIP.to_vec(), enc(&stored));
                        results.push(Ok(brickfs_proto::meta::MetaReply::Done));
                    }
                }
                overlay.put(keys::APPLIED.to_vec(), enc(&Some(entry.log_id)));
            }
            let mut batch = WriteBatch::default();
            let state = cf(&db, CF_STATE);
            let mut locks_changed = false;
            for (k, v) in overlay.into_changes() {
                locks_changed |= keys::is_locks(&k);
                match v {
                    Some(v) => batch.put_cf(state, k, v),
                    None => batch.delete_cf(state, k),
                }
            }
            db.write(batch).map_err(|e| e.to_string())?;
            Ok::<_, String>((results, locks_changed))
        })
        .await
        .map_err(|e| StorageIOError::write_state_machine(any(e)))?
        .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        let (results, locks_changed) = applied;
        if locks_changed {
            self.lock_changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, SErr> {
        let path = self
            .fresh_path("recv")
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), SErr> {
        let failed = |e: String| StorageIOError::write_snapshot(Some(meta.signature()), any(e));
        let mut file = *snapshot;
        file.flush().await.map_err(|e| failed(e.to_string()))?;
        let file = file.into_std().await;
        // Where the file is: a received one stays as the current snapshot.
        let path = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            file.as_raw_fd()
        }))
        .map_err(|e| failed(format!("where is the received snapshot: {e}")))?;
        let db = self.db.clone();
        let count = tokio::task::spawn_blocking(move || {
            use std::io::Seek;
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(0))
                .map_err(|e| e.to_string())?;
            let state = cf(&db, CF_STATE);
            // One batch: the state is replaced whole or not at all.
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(state, [0u8].as_slice(), [0xffu8; 32].as_slice());
            let count = read_snapshot(file, |k, v| batch.put_cf(state, k, v))?;
            db.write_opt(batch, &synced()).map_err(|e| e.to_string())?;
            Ok::<_, String>(count)
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)?;
        tracing::info!(snapshot = %meta.snapshot_id, keys = count, "installed metadata snapshot");
        self.lock_changes.send_modify(|n| *n = n.wrapping_add(1));
        self.keep(StoredSnapshot {
            meta: meta.clone(),
            path,
        })
        .await;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let current = self.current.lock().await;
        let Some(s) = current.as_ref() else {
            return Ok(None);
        };
        let file = open_snapshot(&s.path)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(s.meta.signature()), any(e)))?;
        Ok(Some(Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(file),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), SErr> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(any(e)))?;
            let db =
                open_db(&dir.path().join("meta")).map_err(|e| StorageIOError::write(any(e)))?;
            Ok((dir, LogStore::new(db.clone()), StateMachine::new(db)))
        }
    }

    #[test]
    fn prefix_ends_bound_exactly_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    /// A scan sees exactly its prefix's live keys however many deleted ones surround them.
    #[test]
    fn scans_keep_to_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("meta")).unwrap();
        let state = cf(&db, CF_STATE);
        for i in 0u8..=255 {
            db.put_cf(state, [b'H', 1, i], [i]).unwrap();
            db.put_cf(state, [b'H', 2, i], [i]).unwrap();
        }
        for i in 0u8..=255 {
            db.delete_cf(state, [b'H', 2, i]).unwrap();
        }
        db.put_cf(state, [b'H', 3], [9]).unwrap();
        db.put_cf(state, [b'H', 1, 0xff, 0xff], [7]).unwrap();
        let kv = DbState::new(&db);
        assert!(kv.scan(&[b'H', 2], None, 1).unwrap().is_empty());
        let h1 = kv.scan(&[b'H', 1], None, usize::MAX).unwrap();
        assert_eq!(h1.len(), 257);
        assert_eq!(h1.last().unwrap().0, vec![b'H', 1, 0xff, 0xff]);
        let after = kv.scan(&[b'H', 1], Some(&[b'H', 1, 0xfe]), 10).unwrap();
        assert_eq!(after.len(), 2);
        assert_eq!(kv.scan(b"H", None, usize::MAX).unwrap().len(), 258);
    }

    /// A snapshot file gives back every pair written, in order, with the applied position and
    /// the membership; one cut short or padded anywhere is refused.
    #[test]
    fn snapshot_files_round_trip_and_refuse_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let applied = Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 77));
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..50_000u32)
            .map(|i| {
                (
                    format!("k{i:08}").into_bytes(),
                    vec![i as u8; (i % 300) as usize],
                )
            })
            .collect();
        pairs.push((keys::APPLIED.to_vec(), enc(&applied)));
        pairs.sort();
        let items = pairs
            .iter()
            .map(|(k, v)| Ok((k.clone().into_boxed_slice(), v.clone().into_boxed_slice())));
        let (got_applied, _, bytes) = write_snapshot(items, &path).unwrap();
        assert_eq!(got_applied, applied);
        assert!(
            bytes > 1 << 20,
            "{bytes} bytes: more than one transfer chunk"
        );
        let mut back = Vec::new();
        let n = read_snapshot(std::fs::File::open(&path).unwrap(), |k, v| {
            back.push((k, v))
        })
        .unwrap();
        assert_eq!(n, pairs.len() as u64);
        assert_eq!(back, pairs);

        let whole = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut");
        for at in [
            0,
            5,
            8,
            13,
            whole.len() / 2,
            whole.len() - 12,
            whole.len() - 1,
        ] {
            std::fs::write(&cut, &whole[..at]).unwrap();
            let r = read_snapshot(std::fs::File::open(&cut).unwrap(), |_, _| ());
            assert!(
                r.is_err(),
                "a file cut at {at} of {} installed",
                whole.len()
            );
        }
        let mut padded = whole.clone();
        padded.push(0);
        std::fs::write(&cut, &padded).unwrap();
        assert!(read_snapshot(std::fs::File::open(&cut).unwrap(), |_, _| ()).is_err());
        let mut wrong = whole;
        wrong[0] ^= 1;
        std::fs::write(&cut, &wrong).unwrap();
        assert!(read_snapshot(std::fs::File::open(&cut).unwrap(), |_, _| ()).is_err());
    }

    /// openraft's own storage conformance suite against the RocksDB log and state machine.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }
}
