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
//! Snapshots are a bincode image of the `state` column family taken from a RocksDB snapshot;
//! installing one replaces the column family in one batch.

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
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
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

/// Opens (creating if needed) the metadata database at `path`.
pub fn open_db(path: &Path) -> Result<Arc<DB>, String> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
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
        for item in self.db.iterator_cf(
            cf(self.db, CF_STATE),
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

/// The snapshot image.
#[derive(Serialize, Deserialize)]
struct SnapshotImage {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The state machine.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// Counts applied batches that changed a file's locks (and installed snapshots), so that
    /// lock waiters wake when a lock goes instead of polling.
    lock_changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    pub fn new(db: Arc<DB>) -> Self {
        StateMachine {
            db,
            current: Arc::new(Mutex::new(None)),
            lock_changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
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

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let db = self.db.clone();
        let (image, applied, membership) = tokio::task::spawn_blocking(move || {
            // Everything the snapshot covers must be durable before the log behind it goes.
            db.flush_wal(true).map_err(|e| e.to_string())?;
            let snap = db.snapshot();
            let mut pairs = Vec::new();
            for item in snap.iterator_cf(cf(&db, CF_STATE), IteratorMode::Start) {
                let (k, v) = item.map_err(|e| e.to_string())?;
                pairs.push((k.to_vec(), v.to_vec()));
            }
            let find = |key: &[u8]| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let applied = find(keys::APPLIED)
                .map(|raw| dec::<Option<LogId>>(&raw))
                .transpose()?
                .flatten();
            let membership = find(keys::MEMBERSHIP)
                .map(|raw| dec::<StoredMembership>(&raw))
                .transpose()?
                .unwrap_or_default();
            Ok::<_, String>((enc(&SnapshotImage { pairs }), applied, membership))
        })
        .await
        .map_err(|e| StorageIOError::read_state_machine(any(e)))?
        .map_err(|e| StorageIOError::read_state_machine(any(e)))?;
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, image.len()),
            None => format!("empty-{}", image.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        tracing::info!(snapshot = %meta.snapshot_id, bytes = image.len(), "built metadata snapshot");
        *self.current.lock().await = Some(StoredSnapshot {
            meta: meta.clone(),
            data: image.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(image)),
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let image: SnapshotImage = dec(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        let db = self.db.clone();
        let count = image.pairs.len();
        tokio::task::spawn_blocking(move || {
            let state = cf(&db, CF_STATE);
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(state, [0u8].as_slice(), [0xffu8; 32].as_slice());
            for (k, v) in image.pairs {
                batch.put_cf(state, k, v);
            }
            db.write_opt(batch, &synced()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        tracing::info!(snapshot = %meta.snapshot_id, keys = count, "installed metadata snapshot");
        self.lock_changes.send_modify(|n| *n = n.wrapping_add(1));
        *self.current.lock().await = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(self.current.lock().await.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
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

    /// openraft's own storage conformance suite against the RocksDB log and state machine.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }
}
