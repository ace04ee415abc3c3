//! brickfs-proto: the one wire protocol of every hop (client↔brick, client↔meta, brick↔brick,
//! cli↔brickd).
//!
//! It owns the frame format ([`frame`]), the message kinds and bodies ([`msg`]), the closed
//! error-code enum ([`error`]), the identifier newtypes ([`ids`]) and the multiplexed transport
//! ([`rpc`]): one TCP connection carries many requests at once, matched by request id, with a
//! version handshake first and hard limits checked before any allocation.
//!
//! It must never hold I/O policy: which peer to ask, when to retry and how long to wait are
//! the caller's choices (see `brickfs-client`). The frame and message code is sans-IO; only
//! [`rpc`] touches sockets. Read `docs/protocol.md` next: it is normative.

pub mod cred;
pub mod error;
pub mod frame;
pub mod http;
pub mod ids;
pub mod meta;
pub mod metrics;
pub mod msg;
pub mod rpc;
pub mod tls;

pub use error::{ErrorBody, ErrorCode, errno_for_code};
pub use frame::{FrameError, Header, Limits, PROTOCOL_VERSION};
pub use ids::*;
pub use msg::Message;
