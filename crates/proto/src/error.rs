//! The one error-code enum that travels on the wire, and the one function that maps a code to
//! an errno. Codes have fixed numbers that are never reused.

use serde::{Deserialize, Serialize};

/// A closed set of error codes with fixed wire numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A body that does not decode, or a frame that breaks the protocol's rules.
    Malformed = 1,
    /// A message kind this peer does not know.
    UnknownKind = 2,
    /// No protocol version in common.
    UnsupportedVersion = 3,
    /// A length over a hard limit.
    TooLarge = 4,
    /// The object, brick or entry does not exist.
    NotFound = 5,
    /// The thing to create already exists.
    Exists = 6,
    /// An argument is out of its valid range.
    InvalidArgument = 7,
    /// A path or name that is not allowed (`..`, relative, NUL, too long).
    InvalidPath = 8,
    /// Stored bytes do not match their checksum: the data is damaged and was not returned.
    ChecksumMismatch = 9,
    /// A local I/O error on the serving node.
    Io = 10,
    /// The disk is full.
    NoSpace = 11,
    /// The request names a brick this node does not serve.
    UnknownBrick = 12,
    /// The request carries an epoch older than the receiver's (fencing).
    StaleEpoch = 13,
    /// Retry elsewhere: this node is not the leader or primary; the detail may hold a hint.
    NotLeader = 14,
    /// Retry later: a limit was reached.
    Busy = 15,
    /// The node is shutting down and takes no new work.
    ShuttingDown = 16,
    /// A bug or an unexpected condition on the serving node.
    Internal = 17,
    /// Writes are refused (below quorum, or read-only).
    ReadOnly = 18,
    /// Not allowed.
    PermissionDenied = 19,
    /// Data carried by the frame does not match its checksum (damaged in transit).
    DataChecksum = 20,
    /// Not a directory (ENOTDIR).
    NotDir = 21,
    /// Is a directory (EISDIR).
    IsDir = 22,
    /// Directory not empty (ENOTEMPTY).
    NotEmpty = 23,
    /// A name longer than 255 bytes (ENAMETOOLONG).
    NameTooLong = 24,
    /// Across volumes (EXDEV).
    CrossDevice = 25,
    /// A conflicting lock is held (EAGAIN for a non-blocking lock).
    WouldBlock = 26,
    /// The session's lease ran out or the session is unknown; open a new one.
    SessionExpired = 27,
    /// No such attribute (ENODATA).
    NoData = 28,
    /// The request was already answered and its answer forgotten (a retry from too long ago).
    StaleRequest = 29,
    /// Too many links (EMLINK).
    TooManyLinks = 30,
    /// A member's copy of an object is not at the version before the one it was sent: it
    /// missed writes and needs healing.
    VersionGap = 31,
    /// Not built (yet) for this kind of volume or request.
    NotSupported = 32,
    /// The object was sealed because its file is moving to another stripe group (rebalance):
    /// read the file's group again and retry there.
    Moved = 33,
    /// A directory's quota would be exceeded.
    QuotaExceeded = 34,
    /// A file holds the most byte-range locks it may (`ENOLCK`).
    TooManyLocks = 35,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 35] = [
        ErrorCode::Malformed,
        ErrorCode::UnknownKind,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::InvalidArgument,
        ErrorCode::InvalidPath,
        ErrorCode::ChecksumMismatch,
        ErrorCode::Io,
        ErrorCode::NoSpace,
        ErrorCode::UnknownBrick,
        ErrorCode::StaleEpoch,
        ErrorCode::NotLeader,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::ReadOnly,
        ErrorCode::PermissionDenied,
        ErrorCode::DataChecksum,
        ErrorCode::NotDir,
        ErrorCode::IsDir,
        ErrorCode::NotEmpty,
        ErrorCode::NameTooLong,
        ErrorCode::CrossDevice,
        ErrorCode::WouldBlock,
        ErrorCode::SessionExpired,
        ErrorCode::NoData,
        ErrorCode::StaleRequest,
        ErrorCode::TooManyLinks,
        ErrorCode::VersionGap,
        ErrorCode::NotSupported,
        ErrorCode::Moved,
        ErrorCode::QuotaExceeded,
        ErrorCode::TooManyLocks,
    ];

    /// The code's wire number.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a wire number, or `None` for a number this build does not know.
    pub fn from_u16(raw: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_u16() == raw)
    }
}

/// Maps a wire error number to an errno. This is the only such mapping: the FUSE layer calls
/// nothing else. A number this build does not know becomes EIO with a warning.
pub fn errno_for_code(raw: u16) -> i32 {
    let Some(code) = ErrorCode::from_u16(raw) else {
        tracing::warn!(code = raw, "unknown error code from peer, answering EIO");
        return libc::EIO;
    };
    match code {
        ErrorCode::Malformed | ErrorCode::UnknownKind | ErrorCode::UnsupportedVersion => {
            libc::EPROTO
        }
        ErrorCode::TooLarge => libc::EFBIG,
        ErrorCode::NotFound => libc::ENOENT,
        ErrorCode::Exists => libc::EEXIST,
        ErrorCode::InvalidArgument | ErrorCode::InvalidPath => libc::EINVAL,
        ErrorCode::ChecksumMismatch
        | ErrorCode::Io
        | ErrorCode::Internal
        | ErrorCode::DataChecksum => libc::EIO,
        ErrorCode::NoSpace => libc::ENOSPC,
        ErrorCode::UnknownBrick => libc::ENXIO,
        ErrorCode::StaleEpoch => libc::ESTALE,
        ErrorCode::NotLeader | ErrorCode::Busy => libc::EAGAIN,
        ErrorCode::ShuttingDown => libc::ENOTCONN,
        ErrorCode::ReadOnly => libc::EROFS,
        ErrorCode::PermissionDenied => libc::EACCES,
        ErrorCode::NotDir => libc::ENOTDIR,
        ErrorCode::IsDir => libc::EISDIR,
        ErrorCode::NotEmpty => libc::ENOTEMPTY,
        ErrorCode::NameTooLong => libc::ENAMETOOLONG,
        ErrorCode::CrossDevice => libc::EXDEV,
        ErrorCode::WouldBlock => libc::EAGAIN,
        ErrorCode::SessionExpired => libc::ESTALE,
        ErrorCode::NoData => libc::ENODATA,
        ErrorCode::StaleRequest => libc::EIO,
        ErrorCode::TooManyLinks => libc::EMLINK,
        ErrorCode::VersionGap => libc::EIO,
        ErrorCode::NotSupported => libc::EOPNOTSUPP,
        ErrorCode::Moved => libc::ESTALE,
        ErrorCode::QuotaExceeded => libc::EDQUOT,
        ErrorCode::TooManyLocks => libc::ENOLCK,
    }
}

/// An error as it travels on the wire: a code number and a human-readable detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{} (code {code}): {detail}", code_name(*code))]
pub struct ErrorBody {
    pub code: u16,
    pub detail: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.as_u16(),
            detail: detail.into(),
        }
    }

    /// The typed code, or `None` if the peer sent a number this build does not know.
    pub fn kind(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }

    pub fn is(&self, code: ErrorCode) -> bool {
        self.code == code.as_u16()
    }
}

fn code_name(raw: u16) -> String {
    match ErrorCode::from_u16(raw) {
        Some(code) => format!("{code:?}"),
        None => "UnknownCode".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_have_distinct_numbers() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()), "duplicate number for {code:?}");
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(9999), None);
    }

    #[test]
    fn errno_mapping_covers_unknown_codes() {
        assert_eq!(errno_for_code(ErrorCode::NotFound.as_u16()), libc::ENOENT);
        assert_eq!(errno_for_code(ErrorCode::NoSpace.as_u16()), libc::ENOSPC);
        assert_eq!(
            errno_for_code(ErrorCode::ChecksumMismatch.as_u16()),
            libc::EIO
        );
        assert_eq!(errno_for_code(4242), libc::EIO);
    }
}
