//! The chunk store of one brick.
//!
//! An object `(volume, inode, column)` is a plain file under `objects/XX/YY/` (two levels of
//! directories chosen by a hash of the key). The brick-local RocksDB under `db/` keeps, per
//! object, a record `(version, length)` and one crc32c per [`BLOCK_BYTES`] block.
//!
//! Invariants:
//! - A read verifies the checksum of every block it touches before any byte leaves: a damaged
//!   block is a [`StoreError::Checksum`], never returned.
//! - A block with no checksum record is a hole and must read as zeros; it is verified as such.
//! - A partial-block write verifies the old block before merging, so a new checksum never
//!   blesses damaged bytes.
//! - The version steps by exactly one per mutation.
//! - Durability is explicit: with `sync`, data is fdatasync'ed before the metadata write is
//!   synced, so an acknowledged sync means data and metadata are on disk; `fsync` does the same
//!   for everything written before it.
//!
//! Concurrency: a sharded reader-writer lock per object; mutations hold the write side, reads
//! the read side, so a read never sees data whose checksum is not yet written.

use crate::error::StoreError;
use crate::ident;
use brickfs_proto::{BrickId, Ino, ObjectKey, ObjectVersion, VolumeId};
use bytes::Bytes;
use rocksdb::{DB, IteratorMode, Options, WriteBatch, WriteOptions};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The checksum block: every block of an object has its own crc32c.
pub const BLOCK_BYTES: u64 = 64 << 10;
/// The largest object length accepted (1 PiB), so that offsets never overflow.
pub const OBJECT_MAX_BYTES: u64 = 1 << 50;
/// The most objects one `list` call returns.
pub const LIST_MAX: usize = 10_000;
const LOCK_SHARDS: usize = 256;
/// Free space below which the brick's database takes no more writes (`NoSpace`): RocksDB
/// 7.8 aborts the process on the write after a WAL append failed for a full disk (fixed
/// upstream in 9.x, facebook/rocksdb#12448), so the database must never meet ENOSPC.
const DB_RESERVE_BYTES: u64 = 1 << 20;

/// A block of zeros to compare with (a block without a checksum must be all zeros).
static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// The database key of the last run's journal generation (see `journal_stamp`).
const GENERATION_KEY: &[u8] = b"g";
/// The file that says a brick is open (`close_clean` removes it).
const RUNNING_MARKER: &str = "running";
/// The column bit of a staging object: a replace sent in parts lands beside the object, under
/// this key, until its last part makes it the object (`stage`, `commit_staged`). Listings
/// skip staging objects; deleting an object deletes its staging copy too.
const STAGING_COLUMN: u32 = 1 << 31;

/// The key a replace of `key` sent in parts is staged under.
fn staging_of(key: &ObjectKey) -> ObjectKey {
    ObjectKey {
        column: key.column | STAGING_COLUMN,
        ..*key
    }
}
/// Format 2 records the write's tag; format 1 records (no tag, read as tag 0) are still read.
const META_RECORD_FORMAT: u8 = 2;

/// Which version a mutation gives the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionRule {
    /// The next one, written by the mutation tagged `tag` (a brick used on its own, or a set's
    /// primary).
    Next { tag: u64 },
    /// Exactly `version`, which must follow the version held *as made by mutation `parent`*
    /// (what the primary held before); if the object already holds it from the same mutation
    /// (`tag`), the mutation is a retry and is acknowledged without applying it again. Anything
    /// else (a fork: a deposed primary's write, a copy that missed versions) is refused as a
    /// gap, so a member never applies a mutation to a copy that differs from the primary's
    /// (see `brickfs_set::member::check`).
    Exactly {
        version: ObjectVersion,
        tag: u64,
        parent: u64,
    },
}

impl VersionRule {
    fn core(self) -> brickfs_set::member::Rule {
        match self {
            VersionRule::Next { tag } => brickfs_set::member::Rule::Next { tag },
            VersionRule::Exactly {
                version,
                tag,
                parent,
            } => brickfs_set::member::Rule::Exactly {
                version: version.0,
                tag,
                parent,
            },
        }
    }
}

/// Version, length and writer of an object. `tag` names the mutation that produced `version`
/// (chosen by the primary that ordered it): two copies agree only when both match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub version: ObjectVersion,
    pub len_bytes: u64,
    pub tag: u64,
}

/// Space on the brick's file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStatfs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub avail_bytes: u64,
    pub objects: u64,
}

/// How to open a brick.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    /// Format the folder if it is empty or missing.
    pub init: bool,
    /// Refuse the brick unless its id file holds this id.
    pub expect_id: Option<BrickId>,
}

pub struct BrickStore {
    id: BrickId,
    /// Opened after a stop that was not clean (`unclean_start`).
    unclean: bool,
    root: PathBuf,
    objects_dir: PathBuf,
    db: DB,
    locks: Vec<RwLock<()>>,
    object_count: AtomicU64,
    /// Set by the first failed database write: RocksDB 7.8 aborts the process on the next
    /// write to a log whose append failed, so the brick takes no more writes (reads go on)
    /// until brickd reopens it.
    db_failed: std::sync::atomic::AtomicBool,
    epoch_lock: std::sync::Mutex<()>,
    /// The sets (volume, set) that may have journal entries (see `journal_add`).
    journaled: std::sync::Mutex<std::collections::HashSet<(u64, u32)>>,
    /// The next journal stamp (see `journal_mark`): this run's generation in the high 32
    /// bits, so stamps only grow across restarts.
    journal_stamp: AtomicU64,
    /// The sealed objects (see `seal`), as the database holds them: loaded at open and kept
    /// in step, so that reads and writes check a seal without reading the database.
    seals: RwLock<std::collections::HashMap<ObjectKey, SealState>>,
    /// Where large removed files are cut down in the background (see `trash`).
    trash: crate::trash::Trash,
}

/// A seal on an object whose file moves to another stripe group (rebalance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealState {
    /// Writes and truncates are refused; reads go on.
    Frozen,
    /// The data is gone (the file lives elsewhere): everything is refused.
    Gone,
}

fn decode_seal(raw: &[u8]) -> SealState {
    if raw == [1] {
        SealState::Frozen
    } else {
        SealState::Gone
    }
}

/// Seal keys: `s`, then the object key as in `meta_key`.
fn seal_key(key: &ObjectKey) -> [u8; 21] {
    let mut out = meta_key(key);
    out[0] = b's';
    out
}

/// Undo keys: `u`, then the object key as in `meta_key` (`write_undoable`).
fn undo_key(key: &ObjectKey) -> [u8; 21] {
    let mut out = meta_key(key);
    out[0] = b'u';
    out
}

/// What a write kept of what it overwrote: the version it made (`from`), the state before
/// (`to`: version 0 for no object), and where the bytes it overwrote were (`offset`, `len`,
/// those within the old length). The record is in the database; the bytes, when there are
/// any, in a file beside the object (`undo_path`), checked by `crc` — in the database they
/// would swell its write-ahead log by every overwrite. A write over blocks never written
/// (holes: a write that arrived before the one below it) keeps no bytes: `zeros` says how
/// many bytes at `offset` go back to zeros.
struct Kept {
    from: (u64, u64),
    to: ObjectMeta,
    offset: u64,
    len: u64,
    crc: u32,
    zeros: u64,
}

fn encode_kept(k: &Kept) -> Vec<u8> {
    let mut out = Vec::with_capacity(69);
    out.extend_from_slice(&k.from.0.to_le_bytes());
    out.extend_from_slice(&k.from.1.to_le_bytes());
    out.extend_from_slice(&encode_meta(&k.to));
    out.extend_from_slice(&k.offset.to_le_bytes());
    out.extend_from_slice(&k.len.to_le_bytes());
    out.extend_from_slice(&k.crc.to_le_bytes());
    out.extend_from_slice(&k.zeros.to_le_bytes());
    out
}

fn decode_kept(raw: &[u8]) -> Result<Kept, StoreError> {
    if raw.len() != 61 && raw.len() != 69 {
        return Err(StoreError::Corrupt(format!(
            "undo record of {} bytes",
            raw.len()
        )));
    }
    let u = |r: &[u8]| u64::from_le_bytes(r.try_into().expect("8 bytes"));
    Ok(Kept {
        from: (u(&raw[0..8]), u(&raw[8..16])),
        to: decode_meta(&raw[16..41])?,
        offset: u(&raw[41..49]),
        len: u(&raw[49..57]),
        crc: u32::from_le_bytes(raw[57..61].try_into().expect("4 bytes")),
        zeros: raw.get(61..69).map_or(0, u),
    })
}

fn meta_key(key: &ObjectKey) -> [u8; 21] {
    let mut out = [0u8; 21];
    out[0] = b'o';
    out[1..9].copy_from_slice(&key.volume.0.to_be_bytes());
    out[9..17].copy_from_slice(&key.ino.0.to_be_bytes());
    out[17..21].copy_from_slice(&key.column.to_be_bytes());
    out
}

/// Journal keys: `j`, volume and set (big-endian), then the object key as in `meta_key`.
fn journal_prefix(volume: u64, set: u32) -> [u8; 13] {
    let mut out = [0u8; 13];
    out[0] = b'j';
    out[1..9].copy_from_slice(&volume.to_be_bytes());
    out[9..13].copy_from_slice(&set.to_be_bytes());
    out
}

/// The first journal key past set (`volume`, `set`)'s entries.
fn journal_end(volume: u64, set: u32) -> [u8; 13] {
    match set.checked_add(1) {
        Some(next) => journal_prefix(volume, next),
        None => journal_prefix(volume.saturating_add(1), 0),
    }
}

fn parse_journal_set(raw: &[u8]) -> Option<(u64, u32)> {
    if raw.len() < 13 || raw[0] != b'j' {
        return None;
    }
    Some((
        u64::from_be_bytes(raw[1..9].try_into().ok()?),
        u32::from_be_bytes(raw[9..13].try_into().ok()?),
    ))
}

fn parse_meta_key(raw: &[u8]) -> Option<ObjectKey> {
    if raw.len() != 21 || raw[0] != b'o' {
        return None;
    }
    Some(ObjectKey {
        volume: VolumeId(u64::from_be_bytes(raw[1..9].try_into().ok()?)),
        ino: Ino(u64::from_be_bytes(raw[9..17].try_into().ok()?)),
        column: u32::from_be_bytes(raw[17..21].try_into().ok()?),
    })
}

fn crc_key(key: &ObjectKey, block: u64) -> [u8; 29] {
    let mut out = [0u8; 29];
    out[..21].copy_from_slice(&meta_key(key));
    out[0] = b'c';
    out[21..29].copy_from_slice(&block.to_be_bytes());
    out
}

fn encode_meta(meta: &ObjectMeta) -> [u8; 25] {
    let mut out = [0u8; 25];
    out[0] = META_RECORD_FORMAT;
    out[1..9].copy_from_slice(&meta.version.0.to_le_bytes());
    out[9..17].copy_from_slice(&meta.len_bytes.to_le_bytes());
    out[17..25].copy_from_slice(&meta.tag.to_le_bytes());
    out
}

fn decode_meta(raw: &[u8]) -> Result<ObjectMeta, StoreError> {
    let ok = match raw.first() {
        Some(1) => raw.len() == 17,
        Some(&META_RECORD_FORMAT) => raw.len() == 25,
        _ => false,
    };
    if !ok {
        return Err(StoreError::Corrupt(format!(
            "object record of {} bytes, format {:?}",
            raw.len(),
            raw.first()
        )));
    }
    let version = u64::from_le_bytes(raw[1..9].try_into().unwrap_or_default());
    let len_bytes = u64::from_le_bytes(raw[9..17].try_into().unwrap_or_default());
    let tag = raw
        .get(17..25)
        .map_or(0, |t| u64::from_le_bytes(t.try_into().unwrap_or_default()));
    Ok(ObjectMeta {
        version: ObjectVersion(version),
        len_bytes,
        tag,
    })
}

fn decode_crc(raw: &[u8]) -> Result<u32, StoreError> {
    let arr: [u8; 4] = raw
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("checksum record of {} bytes", raw.len())))?;
    Ok(u32::from_le_bytes(arr))
}

/// fsyncs a directory so that entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync folder", dir, e))
}

/// Reads up to `buf.len()` bytes at `offset`, leaving zeros past the end of the file.
/// Reads `len` bytes at `offset` of a file opened for this read alone into a buffer that is
/// not zeroed first (the read fills it: a fill per request was 5 % of brickd's time on
/// sequential reads); past the file's end the range reads as zeros, as with `read_full_at`.
fn read_fresh(mut file: File, len: usize, offset: u64, path: &Path) -> Result<Vec<u8>, StoreError> {
    use std::io::{Read, Seek, SeekFrom};
    let failed = |e| StoreError::io("read object", path, e);
    let mut buf = Vec::with_capacity(len);
    file.seek(SeekFrom::Start(offset)).map_err(failed)?;
    file.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(failed)?;
    buf.resize(len, 0);
    Ok(buf)
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<(), StoreError> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("read object", path, e)),
        }
    }
    Ok(())
}

impl BrickStore {
    /// Opens the brick at `root`, checking its id file (see [`ident`]).
    pub fn open(root: &Path, opts: StoreOptions) -> Result<BrickStore, StoreError> {
        let id = ident::load_or_format(root, opts.init)?;
        if let Some(expected) = opts.expect_id
            && expected != id
        {
            return Err(StoreError::WrongBrick {
                path: root.to_path_buf(),
                expected,
                found: id,
            });
        }
        let objects_dir = root.join("objects");
        fs::create_dir_all(&objects_dir)
            .map_err(|e| StoreError::io("create objects folder", &objects_dir, e))?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        let db_path = root.join("db");
        let db = DB::open(&db_opts, &db_path)?;

        // The database must belong to this brick: a folder copied from another brick, or a
        // database restored from elsewhere, is refused rather than served.
        match db.get(b"i")? {
            Some(raw) => {
                let found = BrickId(u64::from_le_bytes(raw.as_slice().try_into().map_err(
                    |_| StoreError::Corrupt("brick id record has the wrong length".into()),
                )?));
                if found != id {
                    return Err(StoreError::WrongBrick {
                        path: db_path,
                        expected: id,
                        found,
                    });
                }
            }
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.put_opt(b"i", id.0.to_le_bytes(), &wo)?;
            }
        }

        let mut count = 0u64;
        for item in db.iterator(IteratorMode::From(b"o", rocksdb::Direction::Forward)) {
            let (k, _) = item?;
            if k.first() != Some(&b'o') {
                break;
            }
            if parse_meta_key(&k).is_some_and(|key| key.column & STAGING_COLUMN == 0) {
                count += 1;
            }
        }
        // Which sets have journal entries: one seek per set.
        let mut journaled = std::collections::HashSet::new();
        let mut at = b"j".to_vec();
        loop {
            let Some(item) = db
                .iterator(IteratorMode::From(&at, rocksdb::Direction::Forward))
                .next()
            else {
                break;
            };
            let (k, _) = item?;
            let Some((volume, set)) = parse_journal_set(&k) else {
                break;
            };
            journaled.insert((volume, set));
            at = journal_end(volume, set).to_vec();
        }
        // This run's journal generation: one past the last run's, and never below the clock's
        // seconds, so that it grows even if the disk is too full to record it.
        let last_gen = db
            .get(GENERATION_KEY)?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0);
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let generation = (last_gen + 1).max(now_secs) & 0xFFFF_FFFF;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        if let Err(e) = db.put_opt(GENERATION_KEY, generation.to_le_bytes(), &wo) {
            tracing::warn!(brick = %id, error = %e, "could not record the journal generation");
        }
        let mut seals = std::collections::HashMap::new();
        for item in db.iterator(IteratorMode::From(b"s", rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            if k.first() != Some(&b's') {
                break;
            }
            let mut raw = k.to_vec();
            raw[0] = b'o';
            let key = parse_meta_key(&raw)
                .ok_or_else(|| StoreError::Corrupt(format!("seal key of {} bytes", k.len())))?;
            seals.insert(key, decode_seal(&v));
        }
        // A brick that was not closed cleanly (a crash, a kill, a power loss) may have lost
        // writes that were acknowledged but not synced: say so, until it is closed cleanly.
        let trash = crate::trash::Trash::open(root, id.to_string()).map_err(|e| {
            StoreError::io(
                "open the trash folder",
                root.join(crate::trash::TRASH_DIR),
                e,
            )
        })?;
        let marker = root.join(RUNNING_MARKER);
        let mut unclean = marker.exists();
        // A brick whose disk is full must still open (its set heals it once space returns):
        // without a marker it counts as unclean now, and the next start cannot tell.
        if let Err(e) = File::create(&marker)
            .and_then(|f| f.sync_all())
            .and_then(|()| File::open(root)?.sync_all())
        {
            tracing::warn!(brick = %id, error = %e, "could not write the running marker; treating this start as unclean");
            unclean = true;
        }
        Ok(BrickStore {
            id,
            unclean,
            root: root.to_path_buf(),
            objects_dir,
            db,
            locks: (0..LOCK_SHARDS).map(|_| RwLock::new(())).collect(),
            object_count: AtomicU64::new(count),
            db_failed: std::sync::atomic::AtomicBool::new(false),
            epoch_lock: std::sync::Mutex::new(()),
            journaled: std::sync::Mutex::new(journaled),
            journal_stamp: AtomicU64::new(generation << 32),
            seals: RwLock::new(seals),
            trash,
        })
    }

    /// The object's seal, if any.
    pub fn seal_state(&self, key: &ObjectKey) -> Option<SealState> {
        self.seals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    /// Refuses a mutation of a sealed object, a read of one whose data went.
    fn check_seal(&self, key: &ObjectKey, reading: bool) -> Result<(), StoreError> {
        match self.seal_state(key) {
            None => Ok(()),
            Some(SealState::Frozen) if reading => Ok(()),
            Some(_) => Err(StoreError::Moved { key: *key }),
        }
    }

    /// Sets (or removes) an object's seal, durably, then in memory (called with its lock).
    fn put_seal(&self, key: &ObjectKey, state: Option<SealState>) -> Result<(), StoreError> {
        if self.seal_state(key) == state {
            return Ok(());
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db_room()?;
        let mut seals = self.seals.write().unwrap_or_else(|p| p.into_inner());
        match state {
            Some(st) => {
                let raw = [if st == SealState::Frozen { 1u8 } else { 2 }];
                self.db_usable()?;
                self.db_ok(self.db.put_opt(seal_key(key), raw, &wo))?;
                seals.insert(*key, st);
            }
            None => {
                self.db_usable()?;
                self.db_ok(self.db.delete_opt(seal_key(key), &wo))?;
                seals.remove(key);
            }
        }
        Ok(())
    }

    /// Applies a rebalance seal action (see `brickfs_proto::msg::SealAction`) under the
    /// object's lock, so that it is ordered with the writes this brick applies. Returns the
    /// object's state after it (version 0 when there is no object).
    pub fn seal(
        &self,
        key: &ObjectKey,
        action: brickfs_proto::msg::SealAction,
    ) -> Result<ObjectMeta, StoreError> {
        use brickfs_proto::msg::SealAction;
        let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
        match action {
            SealAction::Freeze => self.put_seal(key, Some(SealState::Frozen))?,
            SealAction::Thaw => {
                if self.seal_state(key) == Some(SealState::Frozen) {
                    self.put_seal(key, None)?;
                }
            }
            SealAction::Drop => {
                self.put_seal(key, Some(SealState::Gone))?;
                self.remove_locked(key)?;
            }
            SealAction::Clear => {
                self.remove_locked(key)?;
                self.put_seal(key, None)?;
            }
        }
        Ok(self.get_meta(key)?.unwrap_or(ObjectMeta {
            version: ObjectVersion(0),
            len_bytes: 0,
            tag: 0,
        }))
    }

    /// Journals object `key` as written while set (`volume`, `set`) was degraded, so that the
    /// heal of the members out of sync compares it (`journal_list`). Called before the write is
    /// applied: a crash in between leaves an entry for an object that did not change, which a
    /// heal finds equal, never a change without its entry.
    pub fn journal_add(&self, volume: u64, set: u32, key: &ObjectKey) -> Result<(), StoreError> {
        let mut k = journal_prefix(volume, set).to_vec();
        k.extend_from_slice(&meta_key(key)[1..]);
        let stamp = self.journal_stamp.fetch_add(1, Ordering::Relaxed);
        self.db_room()?;
        self.db_ok(self.db.put(k, stamp.to_le_bytes()))?;
        self.journaled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((volume, set));
        Ok(())
    }

    /// Forgets the journal of set (`volume`, `set`): a mutation under an epoch at which every
    /// member is in sync says nobody needs it any more. Costs nothing when there is none.
    pub fn journal_forget(&self, volume: u64, set: u32) -> Result<(), StoreError> {
        let mut sets = self.journaled.lock().unwrap_or_else(|p| p.into_inner());
        if !sets.contains(&(volume, set)) {
            return Ok(());
        }
        let (from, to) = (journal_prefix(volume, set), journal_end(volume, set));
        let mut batch = WriteBatch::default();
        batch.delete_range(from, to);
        self.db_room()?;
        self.db_ok(self.db.write(batch))?;
        sets.remove(&(volume, set));
        Ok(())
    }

    /// How many objects are journaled over every set (counting stops at `cap`).
    pub fn journal_len(&self, cap: u64) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self
            .db
            .iterator(IteratorMode::From(b"j", rocksdb::Direction::Forward))
        {
            let (k, _) = item?;
            if k.first() != Some(&b'j') || n >= cap {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// A stamp below every journal entry made from now on: `journal_list` with it as `since`
    /// names only the objects journaled after this call (and the entries it cannot date).
    pub fn journal_mark(&self) -> u64 {
        self.journal_stamp.load(Ordering::Relaxed)
    }

    /// The objects journaled for set (`volume`, `set`) at or after stamp `since` (0: all;
    /// see `journal_mark`), in key order after `after`: at most `limit`, and whether more
    /// follow.
    pub fn journal_list(
        &self,
        volume: u64,
        set: u32,
        after: Option<ObjectKey>,
        limit: usize,
        since: u64,
    ) -> Result<(Vec<ObjectKey>, bool), StoreError> {
        let limit = limit.clamp(1, LIST_MAX);
        let prefix = journal_prefix(volume, set);
        let mut start = prefix.to_vec();
        if let Some(k) = after {
            start.extend_from_slice(&meta_key(&k)[1..]);
            start.push(0);
        }
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, rocksdb::Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            // An entry without a stamp (made by an older brickd) counts as new.
            let stamp = v.as_ref().try_into().map_or(u64::MAX, u64::from_le_bytes);
            if stamp < since {
                continue;
            }
            let mut raw = vec![b'o'];
            raw.extend_from_slice(&k[prefix.len()..]);
            let key = parse_meta_key(&raw)
                .ok_or_else(|| StoreError::Corrupt(format!("journal key of {} bytes", k.len())))?;
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(key);
        }
        Ok((out, false))
    }

    pub fn id(&self) -> BrickId {
        self.id
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn hash(key: &ObjectKey) -> u32 {
        crc32c::crc32c(&meta_key(key)[1..])
    }

    fn lock(&self, key: &ObjectKey) -> &RwLock<()> {
        &self.locks[Self::hash(key) as usize % LOCK_SHARDS]
    }

    /// The file that holds an object.
    pub fn object_path(&self, key: &ObjectKey) -> PathBuf {
        let h = Self::hash(key);
        self.objects_dir
            .join(format!("{:02x}", h & 0xff))
            .join(format!("{:02x}", (h >> 8) & 0xff))
            .join(format!(
                "{:016x}-{:016x}-{:08x}",
                key.volume.0, key.ino.0, key.column
            ))
    }

    fn get_meta(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StoreError> {
        self.db
            .get_pinned(meta_key(key))?
            .map(|raw| decode_meta(&raw))
            .transpose()
    }

    fn open_existing(&self, key: &ObjectKey, write: bool) -> Result<(File, PathBuf), StoreError> {
        let path = self.object_path(key);
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|e| StoreError::io("open object", &path, e))?;
        Ok((file, path))
    }

    /// Opens an object's file for writing, creating it (and its folders) when `create`.
    fn open_for_write(&self, key: &ObjectKey, create: bool) -> Result<(File, PathBuf), StoreError> {
        if !create {
            return self.open_existing(key, true);
        }
        let path = self.object_path(key);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
        };
        match open() {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = path.parent().unwrap_or(&self.objects_dir).to_path_buf();
                fs::create_dir_all(&parent)
                    .map_err(|e| StoreError::io("create object folder", &parent, e))?;
                if let Some(grand) = parent.parent() {
                    sync_dir(grand)?;
                }
                sync_dir(&self.objects_dir)?;
                let f = open().map_err(|e| StoreError::io("create object", &path, e))?;
                Ok((f, path))
            }
            Err(e) => Err(StoreError::io("create object", &path, e)),
        }
    }

    /// Reads block `block` of an object whose length is `len_bytes` and verifies it against its
    /// checksum record (or, with none, that it is all zeros).
    fn read_block_verified(
        &self,
        key: &ObjectKey,
        file: &File,
        path: &Path,
        block: u64,
        len_bytes: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let start = block * BLOCK_BYTES;
        let end = (start + BLOCK_BYTES).min(len_bytes);
        let mut buf = vec![0u8; end.saturating_sub(start) as usize];
        read_full_at(file, &mut buf, start, path)?;
        let stored = self
            .db
            .get_pinned(crc_key(key, block))?
            .map(|raw| decode_crc(&raw))
            .transpose()?;
        self.verify_block(key, block, &buf, stored)?;
        Ok(buf)
    }

    fn verify_block(
        &self,
        key: &ObjectKey,
        block: u64,
        bytes: &[u8],
        stored: Option<u32>,
    ) -> Result<(), StoreError> {
        let ok = match stored {
            Some(crc) => crc32c::crc32c(bytes) == crc,
            None => bytes.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()]),
        };
        if ok {
            Ok(())
        } else {
            tracing::warn!(brick = %self.id, %key, block, "checksum mismatch");
            Err(StoreError::Checksum {
                key: *key,
                block,
                offset_bytes: block * BLOCK_BYTES,
            })
        }
    }

    fn check_range(offset_bytes: u64, len_bytes: u64) -> Result<u64, StoreError> {
        offset_bytes
            .checked_add(len_bytes)
            .filter(|end| *end <= OBJECT_MAX_BYTES)
            .ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "range {offset_bytes}+{len_bytes} exceeds the object limit of {OBJECT_MAX_BYTES} bytes"
                ))
            })
    }

    fn commit(
        &self,
        key: &ObjectKey,
        mut batch: WriteBatch,
        meta: ObjectMeta,
        sync: bool,
    ) -> Result<(), StoreError> {
        batch.put(meta_key(key), encode_meta(&meta));
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db_room()?;
        self.db_ok(self.db.write_opt(batch, &wo))?;
        Ok(())
    }

    /// Refuses every database write once one failed (see `db_failed`).
    fn db_usable(&self) -> Result<(), StoreError> {
        if self.db_failed.load(Ordering::Relaxed) {
            return Err(StoreError::Db(format!(
                "brick {} took no more writes after a database write failed; restart brickd to reopen it",
                self.id
            )));
        }
        Ok(())
    }

    /// A database write's result: a failure stops every later write (see `db_failed`; the
    /// caller checks `db_usable` first).
    fn db_ok<T>(&self, r: Result<T, rocksdb::Error>) -> Result<T, StoreError> {
        r.map_err(|e| {
            if !self.db_failed.swap(true, Ordering::Relaxed) {
                tracing::error!(brick = %self.id, error = %e, "a database write failed: the brick takes no more writes until brickd restarts");
            }
            StoreError::from(e)
        })
    }

    /// Refuses a database write (`NoSpace`) while the brick's disk has less than
    /// `DB_RESERVE_BYTES` free (see there). Removals free their file first and are not held
    /// back.
    fn db_room(&self) -> Result<(), StoreError> {
        self.db_usable()?;
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| StoreError::io("statfs", &self.root, e.into()))?;
        if st.blocks_available().saturating_mul(st.fragment_size()) < DB_RESERVE_BYTES {
            return Err(StoreError::NoSpace {
                path: self.root.clone(),
            });
        }
        Ok(())
    }

    /// Writes `data` at `offset_bytes`, creating the object if needed.
    pub fn write(
        &self,
        key: &ObjectKey,
        offset_bytes: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<ObjectMeta, StoreError> {
        self.write_versioned(key, offset_bytes, data, sync, VersionRule::Next { tag: 0 })
    }

    /// Checks a mutation's version rule against the version held: `Ok(Some(meta))` means the
    /// object already holds that version from that mutation (a retry: acknowledge without
    /// applying); `Ok(None)` means apply, giving the returned version and tag.
    fn check_version(
        key: &ObjectKey,
        old: Option<ObjectMeta>,
        rule: VersionRule,
    ) -> Result<Option<ObjectMeta>, StoreError> {
        let held = old.map_or(brickfs_set::ABSENT, |m| (m.version.0, m.tag));
        match brickfs_set::member::check(held, rule.core()) {
            Ok(brickfs_set::member::Verdict::Retry) => Ok(old),
            Ok(brickfs_set::member::Verdict::Apply(_)) => Ok(None),
            Err(g) => Err(StoreError::VersionGap {
                key: *key,
                have: g.have.0,
                want: g.want,
            }),
        }
    }

    fn rule_tag(rule: VersionRule) -> u64 {
        rule.core().tag()
    }

    /// [`BrickStore::write`] under a version rule.
    pub fn write_versioned(
        &self,
        key: &ObjectKey,
        offset_bytes: u64,
        data: &[u8],
        sync: bool,
        rule: VersionRule,
    ) -> Result<ObjectMeta, StoreError> {
        self.write_inner(key, offset_bytes, data, sync, rule, false)
    }

    /// [`BrickStore::write_versioned`] that keeps what it overwrites (the bytes within the
    /// old length, and the state before), in the same commit as the write, so that the
    /// object can go back to the state before on its own ([`BrickStore::undo`]) until its
    /// next undoable write. A disperse member's writes (`MemberWrite.undo`).
    pub fn write_undoable(
        &self,
        key: &ObjectKey,
        offset_bytes: u64,
        data: &[u8],
        sync: bool,
        rule: VersionRule,
    ) -> Result<ObjectMeta, StoreError> {
        self.write_inner(key, offset_bytes, data, sync, rule, true)
    }

    fn write_inner(
        &self,
        key: &ObjectKey,
        offset_bytes: u64,
        data: &[u8],
        sync: bool,
        rule: VersionRule,
        undoable: bool,
    ) -> Result<ObjectMeta, StoreError> {
        let end = Self::check_range(offset_bytes, data.len() as u64)?;
        let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
        self.check_seal(key, false)?;
        let old = self.get_meta(key)?;
        if let Some(done) = Self::check_version(key, old, rule)? {
            return Ok(done);
        }
        // Before the file changes: a commit refused for room after the bytes went in place
        // would leave the old state over new bytes (a damaged object).
        self.db_room()?;
        let old_len = old.map_or(0, |m| m.len_bytes);
        let new_len = old_len.max(end);
        let (file, path) = self.open_for_write(key, old.is_none())?;
        let mut batch = WriteBatch::default();
        let made = ObjectMeta {
            version: ObjectVersion(old.map_or(0, |m| m.version.0) + 1),
            len_bytes: new_len,
            tag: Self::rule_tag(rule),
        };
        if undoable {
            let kept_end = end.min(old_len);
            let mut kept = Vec::new();
            let mut zeros = 0;
            let holes = offset_bytes < kept_end && {
                let keys: Vec<[u8; 29]> = (offset_bytes / BLOCK_BYTES
                    ..=(kept_end - 1) / BLOCK_BYTES)
                    .map(|b| crc_key(key, b))
                    .collect();
                let mut all = true;
                for c in self.db.multi_get(&keys) {
                    all &= c?.is_none();
                }
                all
            };
            if holes {
                zeros = kept_end - offset_bytes;
            } else if offset_bytes < kept_end {
                for block in offset_bytes / BLOCK_BYTES..=(kept_end - 1) / BLOCK_BYTES {
                    let bytes = self.read_block_verified(key, &file, &path, block, old_len)?;
                    let bs = block * BLOCK_BYTES;
                    let from = offset_bytes.max(bs) - bs;
                    let to = kept_end.min(bs + bytes.len() as u64) - bs;
                    kept.extend_from_slice(&bytes[from as usize..to as usize]);
                }
            }
            let k = Kept {
                from: (made.version.0, made.tag),
                to: old.unwrap_or(ObjectMeta {
                    version: ObjectVersion(0),
                    len_bytes: 0,
                    tag: 0,
                }),
                offset: offset_bytes,
                len: kept.len() as u64,
                crc: crc32c::crc32c(&kept),
                zeros,
            };
            // The bytes go first: a crash before the commit leaves the previous record,
            // which they no longer match (that write can no longer be undone; it was
            // settled, or this one would not have been sent). A write that overwrites
            // nothing (an append) keeps no bytes and leaves an older file as it is: a
            // record of no bytes never reads it, and the next overwrite replaces it.
            let undo_file = self.undo_path(key);
            if !kept.is_empty() {
                let f = File::create(&undo_file)
                    .map_err(|e| StoreError::io("keep undo bytes", &undo_file, e))?;
                f.write_all_at(&kept, 0)
                    .map_err(|e| StoreError::io("keep undo bytes", &undo_file, e))?;
                if sync {
                    f.sync_data()
                        .map_err(|e| StoreError::io("sync undo bytes", &undo_file, e))?;
                }
            }
            batch.put(undo_key(key), encode_kept(&k));
        }

        if !data.is_empty() {
            // The old last block, if partial and wholly before the write, now extends with
            // zeros: its checksum covers more bytes.
            if !old_len.is_multiple_of(BLOCK_BYTES)
                && old_len / BLOCK_BYTES < offset_bytes / BLOCK_BYTES
            {
                let block = old_len / BLOCK_BYTES;
                let mut bytes = self.read_block_verified(key, &file, &path, block, old_len)?;
                bytes.resize(BLOCK_BYTES as usize, 0);
                batch.put(crc_key(key, block), crc32c::crc32c(&bytes).to_le_bytes());
            }
            let first = offset_bytes / BLOCK_BYTES;
            let last = (end - 1) / BLOCK_BYTES;
            for block in first..=last {
                let bs = block * BLOCK_BYTES;
                let be = (bs + BLOCK_BYTES).min(new_len);
                let ds = bs.max(offset_bytes);
                let de = be.min(end);
                let slice = &data[(ds - offset_bytes) as usize..(de - offset_bytes) as usize];
                let crc = if ds == bs && de == be {
                    crc32c::crc32c(slice)
                } else {
                    let mut bytes = if bs < old_len {
                        self.read_block_verified(key, &file, &path, block, old_len)?
                    } else {
                        Vec::new()
                    };
                    bytes.resize((be - bs) as usize, 0);
                    bytes[(ds - bs) as usize..(de - bs) as usize].copy_from_slice(slice);
                    crc32c::crc32c(&bytes)
                };
                batch.put(crc_key(key, block), crc.to_le_bytes());
            }
            file.write_all_at(data, offset_bytes)
                .map_err(|e| StoreError::io("write object", &path, e))?;
        }
        if sync {
            file.sync_data()
                .map_err(|e| StoreError::io("sync object", &path, e))?;
            if old.is_none()
                && let Some(parent) = path.parent()
            {
                sync_dir(parent)?;
            }
        }
        self.commit(key, batch, made, sync)?;
        if old.is_none() {
            self.object_count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(made)
    }

    /// Reads up to `len_bytes` at `offset_bytes`; the result is short at the end of the object.
    pub fn read(
        &self,
        key: &ObjectKey,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(ObjectMeta, Bytes), StoreError> {
        Self::check_range(offset_bytes, len_bytes)?;
        let _guard = self.lock(key).read().unwrap_or_else(|p| p.into_inner());
        self.check_seal(key, true)?;
        let meta = self
            .get_meta(key)?
            .ok_or(StoreError::NotFound { key: *key })?;
        if offset_bytes >= meta.len_bytes || len_bytes == 0 {
            return Ok((meta, Bytes::new()));
        }
        let end = (offset_bytes + len_bytes).min(meta.len_bytes);
        let first = offset_bytes / BLOCK_BYTES;
        let last = (end - 1) / BLOCK_BYTES;
        let rs = first * BLOCK_BYTES;
        let re = ((last + 1) * BLOCK_BYTES).min(meta.len_bytes);
        let (file, path) = self.open_existing(key, false)?;
        let buf = read_fresh(file, (re - rs) as usize, rs, &path)?;
        let keys: Vec<[u8; 29]> = (first..=last).map(|b| crc_key(key, b)).collect();
        let crcs = self.db.multi_get(&keys);
        for (i, crc) in crcs.into_iter().enumerate() {
            let block = first + i as u64;
            let stored = crc?.map(|raw| decode_crc(&raw)).transpose()?;
            let bs = (block - first) * BLOCK_BYTES;
            let be = (bs + BLOCK_BYTES).min(re - rs);
            self.verify_block(key, block, &buf[bs as usize..be as usize], stored)?;
        }
        let out = Bytes::from(buf).slice((offset_bytes - rs) as usize..(end - rs) as usize);
        Ok((meta, out))
    }

    /// Sets the object's length, creating it if needed; bytes past the old end read as zeros.
    pub fn truncate(
        &self,
        key: &ObjectKey,
        len_bytes: u64,
        sync: bool,
    ) -> Result<ObjectMeta, StoreError> {
        self.truncate_versioned(key, len_bytes, sync, VersionRule::Next { tag: 0 })
    }

    /// [`BrickStore::truncate`] under a version rule.
    pub fn truncate_versioned(
        &self,
        key: &ObjectKey,
        len_bytes: u64,
        sync: bool,
        rule: VersionRule,
    ) -> Result<ObjectMeta, StoreError> {
        self.truncate_inner(key, len_bytes, sync, rule, false)
    }

    /// [`BrickStore::truncate_versioned`] that keeps what it cuts off (the bytes past the new
    /// length, copied beside the object a block at a time) and the state before, so that the
    /// object can go back on its own ([`BrickStore::undo`]) like an undoable write. A disperse
    /// member's truncates (`MemberTruncate.undo`).
    pub fn truncate_undoable(
        &self,
        key: &ObjectKey,
        len_bytes: u64,
        sync: bool,
        rule: VersionRule,
    ) -> Result<ObjectMeta, StoreError> {
        self.truncate_inner(key, len_bytes, sync, rule, true)
    }

    fn truncate_inner(
        &self,
        key: &ObjectKey,
        len_bytes: u64,
        sync: bool,
        rule: VersionRule,
        undoable: bool,
    ) -> Result<ObjectMeta, StoreError> {
        Self::check_range(len_bytes, 0)?;
        let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
        self.check_seal(key, false)?;
        let old = self.get_meta(key)?;
        if let Some(done) = Self::check_version(key, old, rule)? {
            return Ok(done);
        }
        // Before the file changes (see `write_inner`).
        self.db_room()?;
        let old_len = old.map_or(0, |m| m.len_bytes);
        let (file, path) = self.open_for_write(key, old.is_none())?;
        let mut batch = WriteBatch::default();
        let made = ObjectMeta {
            version: ObjectVersion(old.map_or(0, |m| m.version.0) + 1),
            len_bytes,
            tag: Self::rule_tag(rule),
        };
        if undoable {
            // The cut-off bytes go to the undo file first, verified, one block at a time
            // (bounded memory whatever the object's size); the record commits with the
            // truncate (a crash before leaves the previous record, which the file no longer
            // matches).
            let undo_file = self.undo_path(key);
            let mut crc = 0u32;
            let mut kept = 0u64;
            if len_bytes < old_len {
                let f = File::create(&undo_file)
                    .map_err(|e| StoreError::io("keep undo bytes", &undo_file, e))?;
                for block in len_bytes / BLOCK_BYTES..old_len.div_ceil(BLOCK_BYTES) {
                    let bytes = self.read_block_verified(key, &file, &path, block, old_len)?;
                    let bs = block * BLOCK_BYTES;
                    let from = (len_bytes.max(bs) - bs) as usize;
                    let part = &bytes[from..];
                    f.write_all_at(part, kept)
                        .map_err(|e| StoreError::io("keep undo bytes", &undo_file, e))?;
                    crc = crc32c::crc32c_append(crc, part);
                    kept += part.len() as u64;
                }
                if sync {
                    f.sync_data()
                        .map_err(|e| StoreError::io("sync undo bytes", &undo_file, e))?;
                }
            }
            let k = Kept {
                from: (made.version.0, made.tag),
                to: old.unwrap_or(ObjectMeta {
                    version: ObjectVersion(0),
                    len_bytes: 0,
                    tag: 0,
                }),
                offset: len_bytes.min(old_len),
                len: kept,
                crc,
                zeros: 0,
            };
            batch.put(undo_key(key), encode_kept(&k));
        } else {
            // A truncate that keeps nothing: what an earlier write kept no longer fits.
            batch.delete(undo_key(key));
            let _ = fs::remove_file(self.undo_path(key));
        }
        if len_bytes < old_len {
            let keep_blocks = len_bytes.div_ceil(BLOCK_BYTES);
            if !len_bytes.is_multiple_of(BLOCK_BYTES) {
                let block = len_bytes / BLOCK_BYTES;
                let mut bytes = self.read_block_verified(key, &file, &path, block, old_len)?;
                bytes.truncate((len_bytes - block * BLOCK_BYTES) as usize);
                batch.put(crc_key(key, block), crc32c::crc32c(&bytes).to_le_bytes());
            }
            let old_blocks = old_len.div_ceil(BLOCK_BYTES);
            batch.delete_range(crc_key(key, keep_blocks), crc_key(key, old_blocks));
        } else if len_bytes > old_len && !old_len.is_multiple_of(BLOCK_BYTES) {
            let block = old_len / BLOCK_BYTES;
            let mut bytes = self.read_block_verified(key, &file, &path, block, old_len)?;
            let block_end = ((block + 1) * BLOCK_BYTES).min(len_bytes);
            bytes.resize((block_end - block * BLOCK_BYTES) as usize, 0);
            batch.put(crc_key(key, block), crc32c::crc32c(&bytes).to_le_bytes());
        }
        file.set_len(len_bytes)
            .map_err(|e| StoreError::io("truncate object", &path, e))?;
        if sync {
            file.sync_all()
                .map_err(|e| StoreError::io("sync object", &path, e))?;
            if old.is_none()
                && let Some(parent) = path.parent()
            {
                sync_dir(parent)?;
            }
        }
        self.commit(key, batch, made, sync)?;
        if old.is_none() {
            self.object_count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(made)
    }

    /// Replaces the object with `data`, which then holds `version`: a heal's copy from an
    /// in-sync member. Durable when it returns.
    pub fn replace(
        &self,
        key: &ObjectKey,
        data: &[u8],
        version: ObjectVersion,
        tag: u64,
    ) -> Result<ObjectMeta, StoreError> {
        // A sealed object is not rebuilt: its file is moving (the mover copies it) or gone.
        {
            let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
            self.check_seal(key, false)?;
            self.remove_locked(key)?;
        }
        let written = self.write_versioned(key, 0, data, true, VersionRule::Next { tag })?;
        let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
        let meta = ObjectMeta {
            version,
            len_bytes: written.len_bytes,
            tag,
        };
        self.commit(key, WriteBatch::default(), meta, true)?;
        Ok(meta)
    }

    /// What the object holds, and the state it can go back to with [`BrickStore::undo`]
    /// (when its last write kept what it overwrote).
    pub fn stat_undo(
        &self,
        key: &ObjectKey,
    ) -> Result<(Option<ObjectMeta>, Option<ObjectMeta>), StoreError> {
        let _guard = self.lock(key).read().unwrap_or_else(|p| p.into_inner());
        let held = self.get_meta(key)?;
        let kept = self.get_kept(key)?;
        let to = match (held, kept) {
            (Some(h), Some(k)) if k.from == (h.version.0, h.tag) => Some(k.to),
            _ => None,
        };
        Ok((held, to))
    }

    /// The file beside an object that holds the bytes its last undoable write overwrote.
    fn undo_path(&self, key: &ObjectKey) -> PathBuf {
        let mut p = self.object_path(key).into_os_string();
        p.push(".undo");
        PathBuf::from(p)
    }

    /// The object's undo record, if its bytes are there (by length: `undo` checks them).
    fn get_kept(&self, key: &ObjectKey) -> Result<Option<Kept>, StoreError> {
        let Some(k) = self
            .db
            .get_pinned(undo_key(key))?
            .map(|raw| decode_kept(&raw))
            .transpose()?
        else {
            return Ok(None);
        };
        if k.len > 0 && fs::metadata(self.undo_path(key)).map_or(true, |m| m.len() != k.len) {
            return Ok(None);
        }
        Ok(Some(k))
    }

    /// Whether the undo file holds exactly the bytes its record names (length and checksum,
    /// read in bounded chunks).
    fn kept_bytes_match(&self, key: &ObjectKey, k: &Kept) -> Result<bool, StoreError> {
        if k.len == 0 {
            return Ok(true);
        }
        let mut crc = 0u32;
        let mut seen = 0u64;
        match self.for_kept_chunks(key, k, |_, chunk| {
            crc = crc32c::crc32c_append(crc, chunk);
            seen += chunk.len() as u64;
            Ok(())
        }) {
            Ok(()) => Ok(seen == k.len && crc == k.crc),
            Err(StoreError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Calls `each` with the undo file's bytes in order, at most 1 MiB at a time, with each
    /// chunk's offset in the kept bytes.
    fn for_kept_chunks(
        &self,
        key: &ObjectKey,
        k: &Kept,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if k.len == 0 {
            return Ok(());
        }
        let path = self.undo_path(key);
        let f = File::open(&path).map_err(|e| StoreError::io("read undo bytes", &path, e))?;
        let mut buf = vec![0u8; (1 << 20).min(k.len) as usize];
        let mut at = 0u64;
        while at < k.len {
            let n = (k.len - at).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], at)
                .map_err(|e| StoreError::io("read undo bytes", &path, e))?;
            each(at, &buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Takes the object back from `from` (version and tag) to `to`, on what the write that
    /// made `from` kept (`write_undoable`; see `MemberRollback`): the overwritten bytes go
    /// back, the length and the state are `to`'s again (version 0: the object goes).
    /// Durable when it returns. An object that holds `to` already is left (a retry); one
    /// that holds anything else, or kept nothing for this, is refused (`VersionGap`). The
    /// caller (the set's primary) orders it with the object's other mutations.
    pub fn undo(
        &self,
        key: &ObjectKey,
        from: (ObjectVersion, u64),
        to: (ObjectVersion, u64),
    ) -> Result<Option<ObjectMeta>, StoreError> {
        let held = self.get_meta(key)?;
        let have = held.map_or(brickfs_set::ABSENT, |m| (m.version.0, m.tag));
        let kept = self.get_kept(key)?;
        let record = kept.as_ref().map(|k| (k.from, (k.to.version.0, k.to.tag)));
        match brickfs_set::member::rollback(have, record, (from.0.0, from.1), (to.0.0, to.1)) {
            Ok(brickfs_set::member::Undo::Done) => return Ok(held),
            Ok(brickfs_set::member::Undo::Apply) => {}
            Err(g) => {
                return Err(StoreError::VersionGap {
                    key: *key,
                    have: g.have.0,
                    want: g.want,
                });
            }
        }
        let k = kept.expect("a record that fits");
        if k.to.version.0 == 0 {
            self.delete(key)?;
            return Ok(None);
        }
        if !self.kept_bytes_match(key, &k)? {
            tracing::warn!(brick = %self.id, %key, "the bytes kept to undo a write do not match its record");
            self.db_usable()?;
            self.db_ok(self.db.delete(undo_key(key)))?;
            return Err(StoreError::VersionGap {
                key: *key,
                have: have.0,
                want: from.0.0,
            });
        }
        self.for_kept_chunks(key, &k, |at, chunk| {
            self.write(key, k.offset + at, chunk, false).map(|_| ())
        })?;
        let zeros = vec![0u8; k.zeros.min(1 << 20) as usize];
        let mut at = 0;
        while at < k.zeros {
            let n = (k.zeros - at).min(zeros.len() as u64) as usize;
            self.write(key, k.offset + at, &zeros[..n], false)?;
            at += n as u64;
        }
        self.truncate(key, k.to.len_bytes, false)?;
        let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
        let (file, path) = self.open_existing(key, false)?;
        file.sync_data()
            .map_err(|e| StoreError::io("sync object", &path, e))?;
        let mut batch = WriteBatch::default();
        batch.delete(undo_key(key));
        self.commit(key, batch, k.to, true)?;
        let _ = fs::remove_file(self.undo_path(key));
        Ok(Some(k.to))
    }

    /// Takes a damaged object out of service: its file moves to `quarantine/` under the brick
    /// (kept for inspection) and its records go, so the set sees it missing and heals it.
    pub fn quarantine(&self, key: &ObjectKey) -> Result<PathBuf, StoreError> {
        let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
        let path = self.object_path(key);
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create quarantine", &dir, e))?;
        let to = dir.join(format!("{}-{}-{}", key.volume.0, key.ino.0, key.column));
        match fs::rename(&path, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("quarantine object", &path, e)),
        }
        let old = self.get_meta(key)?;
        let mut batch = WriteBatch::default();
        batch.delete(meta_key(key));
        batch.delete_range(crc_key(key, 0), crc_key(key, u64::MAX));
        batch.delete(crc_key(key, u64::MAX));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db_usable()?;
        self.db_ok(self.db.write_opt(batch, &wo))?;
        if old.is_some() {
            self.object_count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(to)
    }

    /// Removes an object and its seal (the file was deleted); returns whether it existed.
    pub fn delete(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        let existed = {
            let _guard = self.lock(key).write().unwrap_or_else(|p| p.into_inner());
            let existed = self.remove_locked(key)?;
            self.put_seal(key, None)?;
            existed
        };
        // A replace in parts that never ended leaves its staged copy: it goes too.
        if key.column & STAGING_COLUMN == 0 {
            let staged = staging_of(key);
            let _guard = self
                .lock(&staged)
                .write()
                .unwrap_or_else(|p| p.into_inner());
            self.remove_locked(&staged)?;
        }
        Ok(existed)
    }

    /// One part of a replace sent in parts (objects larger than a frame): `data` at
    /// `offset_bytes` of the object's staged copy; a part at 0 starts the copy afresh. The
    /// object itself is untouched until `commit_staged`. Returns the staged length.
    pub fn stage(
        &self,
        key: &ObjectKey,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<u64, StoreError> {
        let staged = staging_of(key);
        if offset_bytes == 0 {
            let _guard = self
                .lock(&staged)
                .write()
                .unwrap_or_else(|p| p.into_inner());
            self.remove_locked(&staged)?;
        }
        let have = self.get_meta(&staged)?.map_or(0, |m| m.len_bytes);
        if offset_bytes != have {
            return Err(StoreError::InvalidArgument(format!(
                "part at {offset_bytes} of a staged copy of {key} that holds {have} bytes (parts come in order)"
            )));
        }
        let m = self.write_versioned(
            &staged,
            offset_bytes,
            data,
            false,
            VersionRule::Next { tag: 0 },
        )?;
        Ok(m.len_bytes)
    }

    /// Ends a replace sent in parts: the staged copy, which must hold `len_bytes`, becomes the
    /// object at `version` and `tag` in one step (its file renamed over the object's, its
    /// checksums moved). Durable when it returns. A crash part way leaves the object either
    /// as it was or whole and new, or (between the rename and the records) with checksums that
    /// do not match, which reads and the scrubber report as damage: never silently wrong.
    pub fn commit_staged(
        &self,
        key: &ObjectKey,
        len_bytes: u64,
        version: ObjectVersion,
        tag: u64,
    ) -> Result<ObjectMeta, StoreError> {
        let staged = staging_of(key);
        // Both locks, in shard order (one lock when they share a shard).
        let (a, b) = (
            Self::hash(key) as usize % LOCK_SHARDS,
            Self::hash(&staged) as usize % LOCK_SHARDS,
        );
        let _first = self.locks[a.min(b)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let _second = (a != b).then(|| {
            self.locks[a.max(b)]
                .write()
                .unwrap_or_else(|p| p.into_inner())
        });
        self.check_seal(key, false)?;
        let have = self
            .get_meta(&staged)?
            .ok_or(StoreError::NotFound { key: staged })?;
        if have.len_bytes != len_bytes {
            return Err(StoreError::InvalidArgument(format!(
                "the staged copy of {key} holds {} of its {len_bytes} bytes",
                have.len_bytes
            )));
        }
        let (from, to) = (self.object_path(&staged), self.object_path(key));
        File::open(&from)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("sync staged object", &from, e))?;
        let old = self.get_meta(key)?;
        let mut batch = WriteBatch::default();
        batch.delete(undo_key(key));
        let _ = fs::remove_file(self.undo_path(key));
        batch.delete_range(crc_key(key, 0), crc_key(key, u64::MAX));
        let blocks = len_bytes.div_ceil(BLOCK_BYTES);
        let mut block = 0;
        while block < blocks {
            let upto = (block + 4096).min(blocks);
            let keys: Vec<[u8; 29]> = (block..upto).map(|b| crc_key(&staged, b)).collect();
            for (i, crc) in self.db.multi_get(&keys).into_iter().enumerate() {
                if let Some(raw) = crc? {
                    batch.put(crc_key(key, block + i as u64), raw);
                }
            }
            block = upto;
        }
        batch.delete(meta_key(&staged));
        batch.delete_range(crc_key(&staged, 0), crc_key(&staged, u64::MAX));
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| StoreError::io("create object folder", parent, e))?;
        }
        fs::rename(&from, &to).map_err(|e| StoreError::io("install staged object", &to, e))?;
        for dir in [from.parent(), to.parent()].into_iter().flatten() {
            sync_dir(dir)?;
        }
        let meta = ObjectMeta {
            version,
            len_bytes,
            tag,
        };
        self.commit(key, batch, meta, true)?;
        // The staged copy was counted as an object; now it is the object.
        if old.is_some() {
            self.object_count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(meta)
    }

    /// Removes an object's data and records (its lock held); returns whether it existed.
    fn remove_locked(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        let old = self.get_meta(key)?;
        // Large files go through the trash: unlinked at once they would stall the disk.
        let _ = self.trash.discard(&self.undo_path(key));
        let path = self.object_path(key);
        self.trash
            .discard(&path)
            .map_err(|e| StoreError::io("remove object", &path, e))?;
        let mut batch = WriteBatch::default();
        batch.delete(meta_key(key));
        batch.delete(undo_key(key));
        batch.delete_range(crc_key(key, 0), crc_key(key, u64::MAX));
        batch.delete(crc_key(key, u64::MAX));
        self.db_usable()?;
        self.db_ok(self.db.write(batch))?;
        if old.is_some() {
            self.object_count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(old.is_some())
    }

    /// Makes everything written to the object so far durable: data, its folder entry and the
    /// metadata records.
    pub fn fsync(&self, key: &ObjectKey) -> Result<ObjectMeta, StoreError> {
        let _guard = self.lock(key).read().unwrap_or_else(|p| p.into_inner());
        self.check_seal(key, true)?;
        let meta = self
            .get_meta(key)?
            .ok_or(StoreError::NotFound { key: *key })?;
        let (file, path) = self.open_existing(key, false)?;
        file.sync_all()
            .map_err(|e| StoreError::io("sync object", &path, e))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        self.db_usable()?;
        self.db_ok(self.db.flush_wal(true))?;
        Ok(meta)
    }

    pub fn stat(&self, key: &ObjectKey) -> Result<ObjectMeta, StoreError> {
        self.check_seal(key, true)?;
        self.get_meta(key)?
            .ok_or(StoreError::NotFound { key: *key })
    }

    /// Lists objects in key order after `after`, at most `limit` (capped at [`LIST_MAX`]);
    /// the flag tells whether more follow.
    pub fn list(
        &self,
        after: Option<ObjectKey>,
        limit: usize,
    ) -> Result<(Vec<(ObjectKey, ObjectMeta)>, bool), StoreError> {
        let limit = limit.clamp(1, LIST_MAX);
        let start: Vec<u8> = match after {
            Some(k) => {
                let mut s = meta_key(&k).to_vec();
                s.push(0);
                s
            }
            None => b"o".to_vec(),
        };
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, rocksdb::Direction::Forward))
        {
            let (k, v) = item?;
            if k.first() != Some(&b'o') {
                break;
            }
            let key = parse_meta_key(&k)
                .ok_or_else(|| StoreError::Corrupt(format!("object key of {} bytes", k.len())))?;
            if key.column & STAGING_COLUMN != 0 {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((key, decode_meta(&v)?));
        }
        Ok((out, false))
    }

    pub fn statfs(&self) -> Result<StoreStatfs, StoreError> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| StoreError::io("statfs", &self.root, e.into()))?;
        let frsize = st.fragment_size();
        Ok(StoreStatfs {
            total_bytes: st.blocks().saturating_mul(frsize),
            free_bytes: st.blocks_free().saturating_mul(frsize),
            avail_bytes: st.blocks_available().saturating_mul(frsize),
            objects: self.object_count.load(Ordering::Relaxed),
        })
    }

    /// Fences a set's epoch: refuses an epoch older than the newest this brick has seen for the
    /// set, and records a newer one durably before anything is applied under it.
    pub fn fence(&self, volume: u64, set: u32, epoch: u64) -> Result<(), StoreError> {
        let _guard = self.epoch_lock.lock().unwrap_or_else(|p| p.into_inner());
        let key = [b"e".as_slice(), &volume.to_be_bytes(), &set.to_be_bytes()].concat();
        let have = match self.db.get_pinned(&key)? {
            Some(raw) => u64::from_le_bytes(
                raw.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("epoch record".into()))?,
            ),
            None => 0,
        };
        let fence =
            brickfs_set::member::fence(have, epoch).map_err(|s| StoreError::StaleEpoch {
                volume,
                set,
                have: s.have,
                got: s.got,
            })?;
        if let brickfs_set::member::Fence::Record(epoch) = fence {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db_room()?;
            self.db_ok(self.db.put_opt(&key, epoch.to_le_bytes(), &wo))?;
        }
        Ok(())
    }

    /// Flushes the database's write-ahead log to disk (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db_usable()?;
        self.db_ok(self.db.flush_wal(true))?;
        Ok(())
    }

    /// Whether the brick was not closed cleanly before this open (`close_clean`): it may have
    /// lost acknowledged writes that were not synced yet.
    pub fn unclean_start(&self) -> bool {
        self.unclean
    }

    /// Closes the brick cleanly: everything written reaches the disk (the whole file system's
    /// dirty data, `syncfs`), then the running marker goes, so the next open is clean.
    pub fn close_clean(&self) -> Result<(), StoreError> {
        self.flush()?;
        let dir =
            File::open(&self.root).map_err(|e| StoreError::io("open brick", &self.root, e))?;
        nix::unistd::syncfs(&dir)
            .map_err(|e| StoreError::io("syncfs", &self.root, std::io::Error::from(e)))?;
        let marker = self.root.join(RUNNING_MARKER);
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove the running marker", &marker, e)),
        }
        sync_dir(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(ino: u64) -> ObjectKey {
        ObjectKey {
            volume: VolumeId(1),
            ino: Ino(ino),
            column: 0,
        }
    }

    fn must_open(dir: &Path) -> BrickStore {
        BrickStore::open(
            dir,
            StoreOptions {
                init: true,
                expect_id: None,
            },
        )
        .expect("open brick")
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write { offset: u64, len: usize, seed: u8 },
        Truncate { len: u64 },
        Read { offset: u64, len: u64 },
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let edge = prop_oneof![
            0u64..300_000,
            (0u64..5).prop_map(|k| k * BLOCK_BYTES),
            (1u64..5).prop_map(|k| k * BLOCK_BYTES - 1),
            (0u64..5).prop_map(|k| k * BLOCK_BYTES + 1),
        ];
        prop_oneof![
            (edge.clone(), 0usize..200_000, any::<u8>())
                .prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
            edge.clone().prop_map(|len| Op::Truncate { len }),
            (edge, 0u64..300_000).prop_map(|(offset, len)| Op::Read { offset, len }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The store behaves as a plain byte vector across block boundaries, holes and
        /// truncates, and the version steps by one per mutation.
        #[test]
        fn store_matches_byte_vector_model(ops in proptest::collection::vec(op_strategy(), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let store = must_open(&dir.path().join("b"));
            let k = key(1);
            let mut model: Option<Vec<u8>> = None;
            let mut version = 0u64;
            for op in ops {
                match op {
                    Op::Write { offset, len, seed } => {
                        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
                        let meta = store.write(&k, offset, &data, false).unwrap();
                        let m = model.get_or_insert_with(Vec::new);
                        let end = offset as usize + len;
                        if m.len() < end { m.resize(end, 0); }
                        m[offset as usize..end].copy_from_slice(&data);
                        version += 1;
                        prop_assert_eq!(meta.version.0, version);
                        prop_assert_eq!(meta.len_bytes, m.len() as u64);
                    }
                    Op::Truncate { len } => {
                        let meta = store.truncate(&k, len, false).unwrap();
                        model.get_or_insert_with(Vec::new).resize(len as usize, 0);
                        version += 1;
                        prop_assert_eq!(meta.version.0, version);
                    }
                    Op::Read { offset, len } => match &model {
                        None => {
                            let missing = matches!(store.read(&k, offset, len), Err(StoreError::NotFound { .. }));
                            prop_assert!(missing, "a read before any write must be NotFound");
                        }
                        Some(m) => {
                            let (_, got) = store.read(&k, offset, len).unwrap();
                            let s = (offset as usize).min(m.len());
                            let e = (offset as usize + len as usize).min(m.len());
                            prop_assert_eq!(&got[..], &m[s..e]);
                        }
                    },
                }
            }
            if let Some(m) = &model {
                let (_, all) = store.read(&k, 0, m.len() as u64 + 10).unwrap();
                prop_assert_eq!(&all[..], &m[..]);
            }
        }
    }

    /// A flipped byte on disk is a checksum error on read and refuses a partial overwrite of
    /// that block, while a full-block overwrite repairs it.
    #[test]
    fn flipped_byte_is_detected_and_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        let k = key(5);
        let data: Vec<u8> = (0..3 * BLOCK_BYTES as usize).map(|i| i as u8).collect();
        store.write(&k, 0, &data, true).unwrap();
        let path = store.object_path(&k);
        let mut raw = fs::read(&path).unwrap();
        raw[BLOCK_BYTES as usize + 10] ^= 0x01;
        fs::write(&path, &raw).unwrap();

        let err = store.read(&k, 0, data.len() as u64).unwrap_err();
        assert!(
            matches!(err, StoreError::Checksum { block: 1, .. }),
            "{err}"
        );
        // Blocks around the damage still read.
        let (_, first) = store.read(&k, 0, BLOCK_BYTES).unwrap();
        assert_eq!(&first[..], &data[..BLOCK_BYTES as usize]);
        assert!(matches!(
            store.write(&k, BLOCK_BYTES + 1, b"x", false),
            Err(StoreError::Checksum { .. })
        ));
        store
            .write(
                &k,
                BLOCK_BYTES,
                &data[BLOCK_BYTES as usize..2 * BLOCK_BYTES as usize],
                false,
            )
            .unwrap();
        let (_, all) = store.read(&k, 0, data.len() as u64).unwrap();
        assert_eq!(&all[..], &data[..]);
    }

    /// A replace in parts leaves the object as it was until its last part, then installs the
    /// copy whole (bytes, version, tag, checksums) in one step; staged copies are never
    /// listed, parts out of order and wrong lengths are refused, and a delete takes the
    /// staged copy too. Survives a reopen.
    #[test]
    fn replace_in_parts_installs_the_copy_only_at_its_last_part() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("b");
        let store = must_open(&root);
        let k = key(8);
        store.write(&k, 0, &[7u8; 1000], false).unwrap();
        let old = store.stat(&k).unwrap();
        let new: Vec<u8> = (0..3 * BLOCK_BYTES + 123)
            .map(|i| (i % 253) as u8)
            .collect();
        let part = BLOCK_BYTES as usize + 17;
        assert_eq!(store.stage(&k, 0, &new[..part]).unwrap(), part as u64);
        assert!(matches!(
            store.stage(&k, part as u64 + 1, &new[part..]),
            Err(StoreError::InvalidArgument(_))
        ));
        store.stage(&k, part as u64, &new[part..2 * part]).unwrap();
        // Not yet: the object is the old one, and only it is listed.
        assert_eq!(store.stat(&k).unwrap(), old);
        assert_eq!(store.read(&k, 0, 2000).unwrap().1.len(), 1000);
        let (listed, _) = store.list(None, 100).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(matches!(
            store.commit_staged(&k, new.len() as u64, ObjectVersion(9), 77),
            Err(StoreError::InvalidArgument(_))
        ));
        store.stage(&k, 2 * part as u64, &new[2 * part..]).unwrap();
        let meta = store
            .commit_staged(&k, new.len() as u64, ObjectVersion(9), 77)
            .unwrap();
        assert_eq!(
            (meta.version, meta.tag, meta.len_bytes),
            (ObjectVersion(9), 77, new.len() as u64)
        );
        let (m, bytes) = store.read(&k, 0, new.len() as u64).unwrap();
        assert_eq!(m, meta);
        assert!(bytes[..] == new[..], "the installed copy reads back");
        assert_eq!(store.list(None, 100).unwrap().0.len(), 1);
        assert!(
            store
                .commit_staged(&k, new.len() as u64, ObjectVersion(10), 1)
                .is_err(),
            "nothing staged"
        );
        // A fresh copy: started, then the object deleted; nothing is left.
        store.stage(&k, 0, b"partial").unwrap();
        drop(store);
        let store = BrickStore::open(
            &root,
            StoreOptions {
                init: false,
                expect_id: None,
            },
        )
        .unwrap();
        assert!(store.read(&k, 0, new.len() as u64).unwrap().1[..] == new[..]);
        assert!(store.delete(&k).unwrap());
        assert!(matches!(store.stat(&k), Err(StoreError::NotFound { .. })));
        assert!(
            store.commit_staged(&k, 7, ObjectVersion(1), 1).is_err(),
            "the staged copy went too"
        );
        assert!(store.list(None, 100).unwrap().0.is_empty());
    }

    /// Garbage written into a hole (a block with no checksum) is detected too.
    #[test]
    fn damaged_hole_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        let k = key(6);
        store.truncate(&k, 4 * BLOCK_BYTES, false).unwrap();
        let path = store.object_path(&k);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"junk", BLOCK_BYTES * 2 + 7).unwrap();
        assert!(matches!(
            store.read(&k, 0, 4 * BLOCK_BYTES),
            Err(StoreError::Checksum { block: 2, .. })
        ));
    }

    #[test]
    fn list_pages_through_objects_in_order_and_delete_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        for ino in (1..=25).rev() {
            store.write(&key(ino), 0, b"abc", false).unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = store.list(after, 10).unwrap();
            seen.extend(page.iter().map(|(k, _)| k.ino.0));
            after = page.last().map(|(k, _)| *k);
            if !more {
                break;
            }
        }
        assert_eq!(seen, (1..=25).collect::<Vec<_>>());
        assert_eq!(store.statfs().unwrap().objects, 25);
        assert!(store.delete(&key(3)).unwrap());
        assert!(!store.delete(&key(3)).unwrap());
        assert!(matches!(
            store.stat(&key(3)),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.statfs().unwrap().objects, 24);
    }

    #[test]
    fn reopen_keeps_data_and_refuses_wrong_id() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("b");
        let id = {
            let store = must_open(&root);
            store.write(&key(9), 100, b"hello", true).unwrap();
            store.id()
        };
        let store = BrickStore::open(
            &root,
            StoreOptions {
                init: false,
                expect_id: Some(id),
            },
        )
        .unwrap();
        let (meta, data) = store.read(&key(9), 100, 5).unwrap();
        assert_eq!(&data[..], b"hello");
        assert_eq!(meta.len_bytes, 105);
        drop(store);
        let wrong = BrickStore::open(
            &root,
            StoreOptions {
                init: false,
                expect_id: Some(BrickId(id.0 ^ 1)),
            },
        );
        assert!(matches!(wrong, Err(StoreError::WrongBrick { .. })));
    }

    /// The journal lists what was added for one set, in key order, pages with `after`, survives
    /// a reopen, and goes when forgotten (other sets' entries stay).
    #[test]
    fn the_journal_lists_pages_and_forgets_per_set() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("b");
        let store = must_open(&root);
        for i in [5, 1, 3] {
            store.journal_add(7, 0, &key(i)).unwrap();
        }
        store.journal_add(7, 1, &key(9)).unwrap();
        store.journal_add(7, 0, &key(3)).unwrap();
        let (page, more) = store.journal_list(7, 0, None, 2, 0).unwrap();
        assert_eq!((page, more), (vec![key(1), key(3)], true));
        let (page, more) = store.journal_list(7, 0, Some(key(3)), 2, 0).unwrap();
        assert_eq!((page, more), (vec![key(5)], false));
        // Since a mark: only what was journaled after it, across a restart too.
        let mark = store.journal_mark();
        store.journal_add(7, 0, &key(5)).unwrap();
        assert_eq!(
            store.journal_list(7, 0, None, 10, mark).unwrap().0,
            vec![key(5)]
        );
        drop(store);
        let store = must_open(&root);
        assert!(store.journal_mark() > mark);
        store.journal_add(7, 0, &key(1)).unwrap();
        assert_eq!(
            store.journal_list(7, 0, None, 10, mark).unwrap().0,
            vec![key(1), key(5)]
        );
        store.journal_forget(7, 0).unwrap();
        assert_eq!(store.journal_list(7, 0, None, 10, 0).unwrap().0, vec![]);
        assert_eq!(
            store.journal_list(7, 1, None, 10, 0).unwrap().0,
            vec![key(9)]
        );
        store.journal_forget(7, 1).unwrap();
        assert_eq!(store.journal_list(7, 1, None, 10, 0).unwrap().0, vec![]);
    }

    /// Member writes apply only at the next version; a retry of the version held (same tag) is
    /// acknowledged without applying twice; a gap, or the version held written by another
    /// mutation (a fork), is refused. Older epochs are fenced.
    #[test]
    fn versioned_writes_and_epoch_fencing() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        let k = key(1);
        let v = |n| VersionRule::Exactly {
            version: ObjectVersion(n),
            tag: 100 + n,
            parent: if n == 1 { 0 } else { 100 + n - 1 },
        };
        store.write_versioned(&k, 0, b"aaaa", false, v(1)).unwrap();
        assert!(matches!(
            store.write_versioned(&k, 0, b"cc", false, v(3)),
            Err(StoreError::VersionGap {
                have: 1,
                want: 3,
                ..
            })
        ));
        store.write_versioned(&k, 0, b"bb", false, v(2)).unwrap();
        // A retry of version 2 with other bytes changes nothing.
        let again = store.write_versioned(&k, 0, b"zz", false, v(2)).unwrap();
        assert_eq!(again.version.0, 2);
        assert_eq!(&store.read(&k, 0, 4).unwrap().1[..], b"bbaa");
        // Version 2 from another mutation is a fork, not a retry.
        let fork = VersionRule::Exactly {
            version: ObjectVersion(2),
            tag: 7,
            parent: 101,
        };
        assert!(matches!(
            store.write_versioned(&k, 0, b"zz", false, fork),
            Err(StoreError::VersionGap {
                have: 2,
                want: 2,
                ..
            })
        ));
        assert_eq!(&store.read(&k, 0, 4).unwrap().1[..], b"bbaa");
        // Version 3 on top of another mutation's version 2 (a fork the member holds): a gap.
        let other_parent = VersionRule::Exactly {
            version: ObjectVersion(3),
            tag: 103,
            parent: 9,
        };
        assert!(matches!(
            store.truncate_versioned(&k, 1, false, other_parent),
            Err(StoreError::VersionGap {
                have: 2,
                want: 3,
                ..
            })
        ));
        store.truncate_versioned(&k, 1, false, v(3)).unwrap();
        let st = store.stat(&k).unwrap();
        assert_eq!((st.len_bytes, st.tag), (1, 103));
        // A replace installs another copy's version and tag whatever was held.
        store.replace(&k, b"qq", ObjectVersion(2), 55).unwrap();
        let st = store.stat(&k).unwrap();
        assert_eq!((st.version.0, st.len_bytes, st.tag), (2, 2, 55));
        store.fence(7, 0, 2).unwrap();
        store.fence(7, 0, 2).unwrap();
        assert!(matches!(
            store.fence(7, 0, 1),
            Err(StoreError::StaleEpoch {
                have: 2,
                got: 1,
                ..
            })
        ));
        store.fence(7, 1, 1).unwrap();
    }

    /// The rule of version `n` of a chain whose tags are `base + n`.
    fn exactly(base: u64, n: u64) -> VersionRule {
        VersionRule::Exactly {
            version: ObjectVersion(n),
            tag: base + n,
            parent: if n == 1 { 0 } else { base + n - 1 },
        }
    }

    /// An undoable truncate keeps what it cuts off (more than one undo chunk, from mid-block)
    /// and goes back on it; one that grows goes back to the old length; a damaged undo file
    /// is never put back.
    #[test]
    fn an_undoable_truncate_goes_back_to_the_version_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        let k = key(7);
        let rule = |n: u64| exactly(20, n);
        let at = |n: u64| (ObjectVersion(n), 20 + n);
        // Larger than one chunk of the undo file (1 MiB) and not a whole number of blocks.
        let first: Vec<u8> = (0..(3 << 20) + 777u64).map(|i| (i % 253) as u8).collect();
        store
            .write_versioned(&k, 0, &first, false, rule(1))
            .unwrap();
        // Cut mid-block: the tail goes beside the object, the record names the state before.
        let cut = BLOCK_BYTES * 5 + 123;
        let m = store.truncate_undoable(&k, cut, true, rule(2)).unwrap();
        assert_eq!((m.version.0, m.len_bytes), (2, cut));
        let (held, to) = store.stat_undo(&k).unwrap();
        assert_eq!(held.unwrap().len_bytes, cut);
        assert_eq!(
            to.map(|m| (m.version.0, m.len_bytes)),
            Some((1, first.len() as u64))
        );
        assert_eq!(
            std::fs::metadata(store.undo_path(&k)).unwrap().len(),
            first.len() as u64 - cut
        );
        let back = store.undo(&k, at(2), at(1)).unwrap().unwrap();
        assert_eq!((back.version.0, back.tag), (1, 21));
        let (meta, got) = store.read(&k, 0, 8 << 20).unwrap();
        assert_eq!(meta.len_bytes, first.len() as u64);
        assert!(got[..] == first[..], "the cut-off bytes came back");
        // A truncate that grows keeps no bytes and goes back to the old length.
        store
            .truncate_undoable(&k, 5 << 20, false, rule(2))
            .unwrap();
        store.undo(&k, at(2), at(1)).unwrap();
        assert_eq!(store.stat(&k).unwrap().len_bytes, first.len() as u64);
        // A damaged undo file is never put back.
        store.truncate_undoable(&k, 10, false, rule(2)).unwrap();
        let side = store.undo_path(&k);
        let f = std::fs::OpenOptions::new().write(true).open(&side).unwrap();
        f.write_all_at(&[0xAB], 2 << 20).unwrap();
        assert!(matches!(
            store.undo(&k, at(2), at(1)),
            Err(StoreError::VersionGap { .. })
        ));
        assert_eq!(store.stat(&k).unwrap().len_bytes, 10);
    }

    /// An undoable write goes back on its own data: overwritten bytes (across blocks, past
    /// checksummed partial blocks), the length of an append, a create, a hole; only from the
    /// version it made, to the version it replaced; and a copy got whole kept nothing.
    #[test]
    fn an_undoable_write_goes_back_to_the_version_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        let k = key(3);
        let rule = |n: u64| exactly(10, n);
        let at = |n: u64| (ObjectVersion(n), 10 + n);
        let first: Vec<u8> = (0..BLOCK_BYTES * 2 + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        store.write_undoable(&k, 0, &first, false, rule(1)).unwrap();
        // A create goes back to no object.
        assert_eq!(store.stat_undo(&k).unwrap().1.map(|m| m.version.0), Some(0));
        // An overwrite across a block boundary that also appends.
        let over = vec![0xEE; BLOCK_BYTES as usize];
        let off = BLOCK_BYTES + BLOCK_BYTES / 2;
        store
            .write_undoable(&k, off, &over, false, rule(2))
            .unwrap();
        let (held, to) = store.stat_undo(&k).unwrap();
        assert_eq!(held.unwrap().version.0, 2);
        assert_eq!(
            to.map(|m| (m.version.0, m.tag, m.len_bytes)),
            Some((1, 11, first.len() as u64))
        );
        // Only from the version it made to the one it replaced.
        assert!(matches!(
            store.undo(&k, at(2), (ObjectVersion(1), 99)),
            Err(StoreError::VersionGap { .. })
        ));
        assert!(matches!(
            store.undo(&k, (ObjectVersion(2), 99), at(1)),
            Err(StoreError::VersionGap { .. })
        ));
        let back = store.undo(&k, at(2), at(1)).unwrap().unwrap();
        assert_eq!(
            (back.version.0, back.tag, back.len_bytes),
            (1, 11, first.len() as u64)
        );
        assert_eq!(&store.read(&k, 0, 1 << 20).unwrap().1[..], &first[..]);
        // A retry is done; nothing is left to go back to from version 1 (one level).
        assert_eq!(store.undo(&k, at(2), at(1)).unwrap().unwrap().version.0, 1);
        assert_eq!(store.stat_undo(&k).unwrap().1, None);
        // A plain write leaves no record to go back on.
        store.write_versioned(&k, 0, b"x", false, rule(2)).unwrap();
        assert!(store.undo(&k, at(2), at(1)).is_err());
        // A copy got whole (a heal) kept nothing either.
        store.write_undoable(&k, 0, b"y", false, rule(3)).unwrap();
        store.replace(&k, b"zz", ObjectVersion(3), 13).unwrap();
        assert_eq!(store.stat_undo(&k).unwrap().1, None);
        assert!(store.undo(&k, at(3), at(2)).is_err());
        // Kept bytes that no longer match their record are never put back.
        let bent = key(5);
        store
            .write_undoable(&bent, 0, &first, false, rule(1))
            .unwrap();
        store
            .write_undoable(&bent, 10, b"overwrite", false, rule(2))
            .unwrap();
        let side = store.undo_path(&bent);
        let mut raw = std::fs::read(&side).unwrap();
        assert_eq!(&raw[..], &first[10..19]);
        raw[0] ^= 1;
        std::fs::write(&side, &raw).unwrap();
        assert!(matches!(
            store.undo(&bent, at(2), at(1)),
            Err(StoreError::VersionGap { .. })
        ));
        assert_eq!(store.stat_undo(&bent).unwrap().1, None);
        assert_eq!(&store.read(&bent, 10, 9).unwrap().1[..], b"overwrite");
        // A write into a hole (a later block was written first) keeps no bytes, and going
        // back leaves zeros there again.
        let holey = key(6);
        store
            .write_undoable(&holey, BLOCK_BYTES * 4, b"tail", false, rule(1))
            .unwrap();
        store
            .write_undoable(&holey, 100, &first, false, rule(2))
            .unwrap();
        assert!(!store.undo_path(&holey).exists(), "no bytes kept of a hole");
        store.undo(&holey, at(2), at(1)).unwrap();
        let (_, got) = store.read(&holey, 0, 1 << 20).unwrap();
        assert_eq!(got.len() as u64, BLOCK_BYTES * 4 + 4);
        assert!(got[..(BLOCK_BYTES * 4) as usize].iter().all(|b| *b == 0));
        assert_eq!(&got[(BLOCK_BYTES * 4) as usize..], b"tail");
        // Back from a create: the object goes.
        let fresh = key(4);
        store
            .write_undoable(&fresh, 0, b"new", true, rule(1))
            .unwrap();
        assert_eq!(
            store.undo(&fresh, at(1), (ObjectVersion(0), 0)).unwrap(),
            None
        );
        assert!(matches!(
            store.stat(&fresh),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn out_of_range_offsets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = must_open(&dir.path().join("b"));
        assert!(matches!(
            store.write(&key(1), u64::MAX - 1, b"ab", false),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.truncate(&key(1), OBJECT_MAX_BYTES + 1, false),
            Err(StoreError::InvalidArgument(_))
        ));
    }

    /// Seals refuse what they should, and survive a restart (they are kept in the database
    /// and loaded at open).
    #[test]
    fn seals_refuse_and_survive_a_restart() {
        use brickfs_proto::msg::SealAction;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key(1), key(2));
        {
            let s = must_open(dir.path());
            s.write(&a, 0, b"moving", true).unwrap();
            s.write(&b, 0, b"gone", true).unwrap();
            s.seal(&a, SealAction::Freeze).unwrap();
            s.seal(&b, SealAction::Drop).unwrap();
        }
        let s = must_open(dir.path());
        let moved = |r: Result<ObjectMeta, StoreError>| matches!(r, Err(StoreError::Moved { .. }));
        assert!(
            moved(s.write(&a, 0, b"x", false)),
            "a frozen object takes no write"
        );
        assert_eq!(&s.read(&a, 0, 6).unwrap().1[..], b"moving", "but is read");
        assert!(matches!(s.read(&b, 0, 4), Err(StoreError::Moved { .. })));
        assert!(moved(s.stat(&b)));
        s.seal(&a, SealAction::Thaw).unwrap();
        s.write(&a, 0, b"x", false).unwrap();
        s.delete(&b).unwrap();
        assert!(
            matches!(s.stat(&b), Err(StoreError::NotFound { .. })),
            "deleting unseals"
        );
        drop(s);
        let s = must_open(dir.path());
        assert_eq!((s.seal_state(&a), s.seal_state(&b)), (None, None));
    }
}
