//! The chunk store's errors, and their wire codes.

use brickfs_proto::{BrickId, ErrorBody, ErrorCode, ObjectKey};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("brick folder {path} is not usable: {detail}")]
    NotFormatted { path: PathBuf, detail: String },
    #[error("brick folder {path} holds brick {found}, expected {expected}")]
    WrongBrick {
        path: PathBuf,
        expected: BrickId,
        found: BrickId,
    },
    #[error("brick id file {path} is damaged: {detail}")]
    BadIdFile { path: PathBuf, detail: String },
    #[error("object {key} not found")]
    NotFound { key: ObjectKey },
    #[error("checksum mismatch in object {key} at block {block} (offset {offset_bytes})")]
    Checksum {
        key: ObjectKey,
        block: u64,
        offset_bytes: u64,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no space left on brick at {path}")]
    NoSpace { path: PathBuf },
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stale epoch {got} for set {set} of volume {volume}: this brick has seen {have}")]
    StaleEpoch {
        volume: u64,
        set: u32,
        have: u64,
        got: u64,
    },
    #[error("object {key} is at version {have}, cannot apply version {want}")]
    VersionGap {
        key: ObjectKey,
        have: u64,
        want: u64,
    },
    #[error("object {key} is sealed: its file moved (or is moving) to another stripe group")]
    Moved { key: ObjectKey },
    #[error("brick database: {0}")]
    Db(String),
    #[error("brick metadata is damaged: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Wraps an I/O error, turning ENOSPC into its own variant.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        let path = path.into();
        if source.raw_os_error() == Some(nix::libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            return StoreError::NoSpace { path };
        }
        StoreError::Io { op, path, source }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFormatted { .. }
            | StoreError::WrongBrick { .. }
            | StoreError::BadIdFile { .. } => ErrorCode::UnknownBrick,
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Checksum { .. } => ErrorCode::ChecksumMismatch,
            StoreError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            StoreError::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            StoreError::VersionGap { .. } => ErrorCode::VersionGap,
            StoreError::Moved { .. } => ErrorCode::Moved,
            StoreError::NoSpace { .. } => ErrorCode::NoSpace,
            StoreError::Io { .. } | StoreError::Db(_) | StoreError::Corrupt(_) => ErrorCode::Io,
        }
    }

    pub fn to_wire(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let text = e.into_string();
        if text.contains("No space left") {
            return StoreError::NoSpace {
                path: PathBuf::from("(brick database)"),
            };
        }
        StoreError::Db(text)
    }
}
