//! Message kinds and their bodies. Kind numbers are explicit and never reused; a retired kind
//! stays listed in `docs/protocol.md` as reserved.
//!
//! Bulk data never goes through bincode: a `Write` request and a `ReadData` reply carry their
//! bytes in the frame's data section, which the transport hands over as `bytes::Bytes`.

use crate::error::ErrorBody;
use crate::ids::{BrickId, NodeId, ObjectKey, ObjectVersion};
use serde::{Deserialize, Serialize};

/// The bincode configuration used for every body. Changing it changes the wire format.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<{ 1 << 20 }>()
}

/// Encodes a body with the protocol's bincode configuration. The decoding limit does not
/// apply here: a body larger than a peer accepts is the sender's to refuse (see
/// `rpc::serve`, which answers `TooLarge` in place of such a reply), not to truncate.
pub fn encode_body<T: Serialize>(value: &T) -> Vec<u8> {
    let config = bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding();
    // Serializing our own plain data types into a Vec cannot fail.
    bincode::serde::encode_to_vec(value, config).unwrap_or_default()
}

/// Decodes a body, refusing trailing bytes.
pub fn decode_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, bincode_config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the body",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Why a body did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("malformed body: {0}")]
    Malformed(String),
}

/// The first message on every connection, from the side that connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The lowest and highest protocol versions the caller speaks.
    pub version_min: u16,
    pub version_max: u16,
    /// A free-form name for logs ("client", "cli", "brickd n…").
    pub peer_name: String,
    /// Fresh random bytes the server's proof of the cluster key covers.
    pub nonce: Vec<u8>,
    /// The role whose secret the proofs are made with (a peer without a credential: `Node`,
    /// proving nothing).
    pub claim: crate::cred::Claim,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    pub version: u16,
    pub node: NodeId,
    /// Empty when the node holds no cluster key; else fresh bytes for the client's proof and
    /// the server's proof: HMAC-SHA256(key, "brickfs-server" ‖ client nonce ‖ this nonce).
    pub nonce: Vec<u8>,
    pub proof: Vec<u8>,
}

/// The client's proof of the cluster key: HMAC-SHA256(key, "brickfs-client" ‖ server nonce ‖
/// client nonce). Sent right after `HelloOk` when the server holds a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub proof: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub node: NodeId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListBricks {}

/// What a node says about one brick it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickInfo {
    pub id: BrickId,
    /// The brick's folder on the node, absolute.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickList {
    pub bricks: Vec<BrickInfo>,
}

/// Resolve a brick by its folder path on the node (the `HOST:/PATH` of a volume spec).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenBrick {
    pub path: String,
}

/// Version and length of an object on one brick; `tag` names the mutation that wrote that
/// version (two copies at one version agree only if their tags match).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectState {
    pub version: ObjectVersion,
    pub len_bytes: u64,
    pub tag: u64,
}

/// Write the frame's data section at `offset_bytes`. With `sync`, the reply means the data and
/// its metadata are on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub brick: BrickId,
    pub key: ObjectKey,
    pub offset_bytes: u64,
    pub sync: bool,
}

/// A read of an object. A brick out of sync with its set refuses client reads (`StaleEpoch`:
/// read another member); `repair` reads — a primary rebuilding or healing, which checks
/// versions itself — are served whatever the brick's standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    pub brick: BrickId,
    pub key: ObjectKey,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    pub repair: bool,
}

/// The reply to `Read`: the bytes are in the data section, short at the end of the object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadData {
    pub state: ObjectState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncate {
    pub brick: BrickId,
    pub key: ObjectKey,
    pub len_bytes: u64,
    pub sync: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub brick: BrickId,
    pub key: ObjectKey,
}

/// What `Seal` does to an object of a file that moves to another stripe group (rebalance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SealAction {
    /// Refuse writes and truncates (`Moved`); reads go on while the mover copies.
    Freeze,
    /// Undo `Freeze` (the move was abandoned): writes go on here.
    Thaw,
    /// The file lives elsewhere now: remove the data and refuse reads too (`Moved`).
    Drop,
    /// The file is moving here: remove any seal and any leftover data.
    Clear,
}

/// Seals (or unseals) an object on one brick, for moving files between stripe groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub brick: BrickId,
    pub key: ObjectKey,
    pub action: SealAction,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub existed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fsync {
    pub brick: BrickId,
    pub key: ObjectKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub brick: BrickId,
    pub key: ObjectKey,
}

/// List objects in key order, starting after `after`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct List {
    pub brick: BrickId,
    pub after: Option<ObjectKey>,
    pub limit: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedObject {
    pub key: ObjectKey,
    pub state: ObjectState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub objects: Vec<ListedObject>,
    /// True when more objects follow the last one listed.
    pub more: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statfs {
    pub brick: BrickId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatfsReply {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub avail_bytes: u64,
    pub objects: u64,
}

/// Another in-sync member of a set, as the primary forwards to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRef {
    pub brick: BrickId,
    pub addr: String,
}

/// A write to a set, sent to its primary: the primary orders it, gives it the object's next
/// version, applies it and forwards it to `members`; the reply means every in-sync member has
/// applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetWrite {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub offset_bytes: u64,
    pub sync: bool,
    pub members: Vec<MemberRef>,
    /// Some member of the set is out of sync: the write is journaled for its heal.
    pub degraded: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTruncate {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub len_bytes: u64,
    pub sync: bool,
    pub members: Vec<MemberRef>,
    /// As in `SetWrite`.
    pub degraded: bool,
}

/// Which set, under which epoch: a member refuses an epoch older than the newest it has seen
/// for the set (fencing a stale primary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRef {
    pub volume: crate::ids::VolumeId,
    pub set: u32,
    pub epoch: crate::ids::Epoch,
}

/// The primary's forward of a write to one member, with the version the primary assigned; the
/// member applies it only if it holds exactly the version before (or already holds this one
/// from the same mutation, `tag`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberWrite {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub offset_bytes: u64,
    pub version: ObjectVersion,
    pub tag: u64,
    /// The tag of the version before `version` on the primary: the member applies only on
    /// top of exactly that (else `VersionGap`, and the primary sends its whole copy).
    pub parent_tag: u64,
    pub sync: bool,
    /// The set has members out of sync: the member journals the object for their heal (and
    /// otherwise forgets what it journaled for the set: everyone is in sync).
    pub degraded: bool,
    /// Keep what the write overwrites (a disperse fragment), so that the member can go back
    /// to the version before on its own (`MemberRollback`) until the object's next mutation.
    pub undo: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberTruncate {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub len_bytes: u64,
    pub version: ObjectVersion,
    pub tag: u64,
    /// The tag of the version before `version` on the primary: the member applies only on
    /// top of exactly that (else `VersionGap`, and the primary sends its whole copy).
    pub parent_tag: u64,
    pub sync: bool,
    /// The set has members out of sync: the member journals the object for their heal (and
    /// otherwise forgets what it journaled for the set: everyone is in sync).
    pub degraded: bool,
    /// Keep what the truncate cuts off (a disperse fragment), so that the member can go back
    /// to the version before on its own (`MemberRollback`) until the object's next mutation.
    pub undo: bool,
}

/// The geometry of a disperse set: K data and M parity fragments of `fragment_bytes` each per
/// stripe; `members` lists all K+M members in fragment order (the primary among them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisperseGeometry {
    pub data_fragments: u32,
    pub parity_fragments: u32,
    pub fragment_bytes: u32,
    pub members: Vec<MemberRef>,
    /// The members that take fragments (the set's in-sync members); the others are out of
    /// sync and skipped until healed. Empty means every member.
    pub in_sync: Vec<BrickId>,
}

/// A write to a column of a disperse set, sent to its primary: the primary reads the old
/// stripes a partial write touches (read-modify-write), encodes, and writes fragment i of every
/// touched stripe to member i under the object's next version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisperseWrite {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    /// Offset in the column's data (not in a fragment).
    pub offset_bytes: u64,
    pub sync: bool,
    pub geometry: DisperseGeometry,
}

/// Sets the data length of a column of a disperse set (zeroing the tail of its last stripe).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisperseTruncate {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub len_bytes: u64,
    pub sync: bool,
    pub geometry: DisperseGeometry,
}

/// Heal, sent to a set's primary: bring `target` (a member out of sync) up to date with the
/// set, object by object in key order after `after`, at most `limit` objects. Each object is
/// copied under its ordering lock (a replica: the primary's bytes; disperse: the target's
/// fragment, rebuilt from the in-sync members) when the target's version or length differs.
/// With `barrier`, the primary first fences itself at `set.epoch` (so writes under an older
/// epoch stop) and holds every ordering lock for the whole call, which then covers every
/// object (`limit` ignored): afterwards the target equals the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealObjects {
    pub brick: BrickId,
    pub set: SetRef,
    pub target: MemberRef,
    /// For a disperse set, its geometry (the target's fragment index is its place in
    /// `members`); `None` for a replica set.
    pub geometry: Option<DisperseGeometry>,
    pub after: Option<ObjectKey>,
    pub limit: u32,
    pub barrier: bool,
    /// Only the objects the primary journaled as written while the set was degraded (a
    /// returning member), instead of every object (a replaced or damaged one).
    pub journal: bool,
    /// With `journal`: only the objects journaled at or after this mark (a `Healed.mark` of
    /// an earlier pass; 0: all), so that a barrier pass covers what changed since the bulk
    /// passes began and nothing older.
    pub since: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healed {
    /// Objects looked at, and copied.
    pub scanned: u64,
    pub copied: u64,
    pub bytes: u64,
    /// The last object looked at; more follow when `more`.
    pub last: Option<ObjectKey>,
    pub more: bool,
    /// The primary's journal mark taken before this pass looked at anything: objects
    /// written after it are journaled at or after it (see `HealObjects.since`).
    pub mark: u64,
}

/// A repair's or heal's copy of a whole object to a member, sent in parts of at most
/// `REPLACE_PART_BYTES` in order: the part at `offset_bytes` of an object of `total_bytes`.
/// Parts are staged beside the member's object; the last one makes the copy the object, which
/// then holds `version` (the set's). A copy in one part replaces at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReplace {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub version: ObjectVersion,
    pub tag: u64,
    pub offset_bytes: u64,
    pub total_bytes: u64,
}

/// A disperse primary undoes a write that failed or reached fewer than K members: a member
/// that applied version `from` (with `from_tag`) and kept what it overwrote
/// (`MemberWrite.undo`) goes back to `to` (with `to_tag`; version 0: no object) on its own
/// data. One that holds `to` already answers as done; anything else is `VersionGap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRollback {
    pub brick: BrickId,
    pub set: SetRef,
    pub key: ObjectKey,
    pub from: ObjectVersion,
    pub from_tag: u64,
    pub to: ObjectVersion,
    pub to_tag: u64,
}

/// What a member holds of an object and what it could go back to (`MemberStatReply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStat {
    pub brick: BrickId,
    /// The member is fenced at this set epoch before it answers (a reconcile's read).
    pub set: SetRef,
    pub key: ObjectKey,
}

/// `state` is what the member holds (version 0: nothing); `undo`, when it kept what its last
/// write overwrote, the state it can go back to with `MemberRollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatReply {
    pub state: ObjectState,
    pub undo: Option<ObjectState>,
}

/// The largest part of a `MemberReplace` (well below the frame's data limit).
pub const REPLACE_PART_BYTES: u64 = 8 << 20;

/// How a brick's background scrubber is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    pub brick: BrickId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Whole passes over the brick finished since the node started.
    pub passes: u64,
    pub objects_scanned: u64,
    pub bytes_scanned: u64,
    /// Objects found damaged (and quarantined, for their set to heal).
    pub damaged_found: u64,
    /// The most recent damaged objects, newest last.
    pub recent_damaged: Vec<ObjectKey>,
    /// The rate limit, in bytes per second (0: the scrubber is off).
    pub rate_bytes_per_sec: u64,
}

/// Asks a node to make a client credential of `volume` (administrators only, in a keyed
/// cluster): it lists a fresh id for the volume and answers with the credential's text, which
/// nothing keeps. `replace`: the volume's other credentials are revoked in the same step
/// (rotation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueCredential {
    pub volume: String,
    pub label: String,
    pub replace: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialIssued {
    pub volume: crate::ids::VolumeId,
    pub id: u64,
    /// The one-line text a client's credential file holds.
    pub credential: String,
    /// The ids revoked with it (`replace`).
    pub revoked: Vec<u64>,
}

macro_rules! messages {
    ($($num:literal => $variant:ident($body:ty), data: $data:literal;)*) => {
        /// Every message, by kind number.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Message {
            $($variant($body),)*
        }

        impl Message {
            /// Every kind number in use, for tests and documentation.
            pub const KINDS: &'static [(u16, &'static str, bool)] = &[
                $(($num, stringify!($variant), $data),)*
            ];

            /// The message's kind number.
            pub fn kind(&self) -> u16 {
                match self {
                    $(Message::$variant(_) => $num,)*
                }
            }

            /// The message's name, for logs and errors.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Message::$variant(_) => stringify!($variant),)*
                }
            }

            /// Whether this kind carries a data section; a frame of any other kind with data
            /// is malformed.
            pub fn kind_carries_data(kind: u16) -> bool {
                match kind {
                    $($num => $data,)*
                    _ => false,
                }
            }

            /// Encodes the body.
            pub fn encode_body(&self) -> Vec<u8> {
                match self {
                    $(Message::$variant(body) => encode_body(body),)*
                }
            }

            /// Decodes a body of the given kind.
            pub fn decode(kind: u16, body: &[u8]) -> Result<Message, DecodeError> {
                match kind {
                    $($num => Ok(Message::$variant(decode_body::<$body>(body)?)),)*
                    other => Err(DecodeError::UnknownKind(other)),
                }
            }
        }
    };
}

messages! {
    1 => Hello(Hello), data: false;
    2 => HelloOk(HelloOk), data: false;
    3 => Error(ErrorBody), data: false;
    4 => Ping(Ping), data: false;
    5 => Pong(Pong), data: false;
    6 => Auth(Auth), data: false;
    7 => AuthOk(AuthOk), data: false;
    16 => ListBricks(ListBricks), data: false;
    17 => BrickList(BrickList), data: false;
    18 => OpenBrick(OpenBrick), data: false;
    19 => BrickOpened(BrickInfo), data: false;
    20 => Write(Write), data: true;
    21 => Written(ObjectState), data: false;
    22 => Read(Read), data: false;
    23 => ReadData(ReadData), data: true;
    24 => Truncate(Truncate), data: false;
    25 => Truncated(ObjectState), data: false;
    26 => Delete(Delete), data: false;
    27 => Deleted(Deleted), data: false;
    28 => Fsync(Fsync), data: false;
    29 => Synced(ObjectState), data: false;
    30 => Stat(Stat), data: false;
    31 => StatReply(ObjectState), data: false;
    32 => List(List), data: false;
    33 => ListReply(ListReply), data: false;
    34 => Statfs(Statfs), data: false;
    35 => StatfsReply(StatfsReply), data: false;
    36 => SetWrite(SetWrite), data: true;
    37 => SetTruncate(SetTruncate), data: false;
    38 => MemberWrite(MemberWrite), data: true;
    39 => MemberTruncate(MemberTruncate), data: false;
    40 => DisperseWrite(DisperseWrite), data: true;
    41 => DisperseTruncate(DisperseTruncate), data: false;
    42 => HealObjects(HealObjects), data: false;
    43 => HealReply(Healed), data: false;
    44 => MemberReplace(MemberReplace), data: true;
    45 => ScrubStatus(ScrubStatus), data: false;
    46 => ScrubReply(ScrubReport), data: false;
    48 => MetaWrite(crate::meta::MetaWrite), data: false;
    49 => MetaRead(crate::meta::MetaReadReq), data: false;
    50 => MetaOk(crate::meta::MetaReply), data: false;
    51 => MetaRedirect(crate::meta::MetaRedirect), data: false;
    52 => MetaAdmin(crate::meta::MetaAdmin), data: false;
    53 => GroupStatus(crate::meta::GroupStatus), data: false;
    54 => RaftRpc(crate::meta::RaftRpc), data: true;
    55 => RaftRpcReply(crate::meta::RaftRpcReply), data: true;
    56 => Seal(Seal), data: false;
    57 => Sealed(ObjectState), data: false;
    58 => MemberRollback(MemberRollback), data: false;
    59 => MemberStat(MemberStat), data: false;
    60 => MemberStatReply(MemberStatReply), data: false;
    61 => IssueCredential(IssueCredential), data: false;
    62 => CredentialIssued(CredentialIssued), data: false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Ino, VolumeId};

    fn key() -> ObjectKey {
        ObjectKey {
            volume: VolumeId(3),
            ino: Ino(77),
            column: 2,
        }
    }

    fn check_round_trip(msg: Message) {
        let body = msg.encode_body();
        let back = Message::decode(msg.kind(), &body).expect("decodes");
        assert_eq!(back, msg);
    }

    #[test]
    fn every_kind_round_trips() {
        let samples = vec![
            Message::Hello(Hello {
                version_min: 1,
                version_max: 1,
                peer_name: "t".into(),
                nonce: vec![7; 16],
                claim: crate::cred::Claim::Client {
                    volume: VolumeId(4),
                    id: 9,
                },
            }),
            Message::Auth(Auth {
                proof: vec![1, 2, 3],
            }),
            Message::Error(ErrorBody::new(crate::ErrorCode::NotFound, "x")),
            Message::Write(Write {
                brick: BrickId(9),
                key: key(),
                offset_bytes: u64::MAX,
                sync: true,
            }),
            Message::Read(Read {
                brick: BrickId(9),
                key: key(),
                offset_bytes: 1 << 40,
                len_bytes: 1 << 20,
                repair: true,
            }),
            Message::Seal(Seal {
                brick: BrickId(2),
                key: key(),
                action: SealAction::Drop,
            }),
            Message::List(List {
                brick: BrickId(1),
                after: Some(key()),
                limit: 10,
            }),
            Message::ListReply(ListReply {
                objects: vec![ListedObject {
                    key: key(),
                    state: ObjectState {
                        version: ObjectVersion(4),
                        len_bytes: 5,
                        tag: 77,
                    },
                }],
                more: true,
            }),
            Message::MemberStatReply(MemberStatReply {
                state: ObjectState {
                    version: ObjectVersion(9),
                    len_bytes: 4096,
                    tag: 3,
                },
                undo: Some(ObjectState {
                    version: ObjectVersion(8),
                    len_bytes: 0,
                    tag: 2,
                }),
            }),
        ];
        for msg in samples {
            check_round_trip(msg);
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// For every kind, any body decodes to a message of that kind or to `Malformed`:
        /// never a panic, another kind, or a huge allocation (bodies claiming long vectors
        /// are in the mix). A body that decodes re-encodes to the same message, and none of
        /// its strict prefixes decodes: a cut body is an error, never another message.
        #[test]
        fn every_kind_decodes_any_body_to_its_kind_or_an_error(
            body in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..256),
                // Mostly zeros and ones: empty vectors, first variants, small numbers, so
                // that bodies of every kind decode often enough to test the rest.
                proptest::collection::vec(0u8..3, 0..96),
                // A long-vector claim (a varint of u64::MAX) after a few small bytes.
                proptest::collection::vec(0u8..2, 0..8).prop_map(|mut v| {
                    v.push(253);
                    v.extend_from_slice(&u64::MAX.to_le_bytes());
                    v
                }),
            ]
        ) {
            for (num, name, _) in Message::KINDS {
                match Message::decode(*num, &body) {
                    Ok(msg) => {
                        prop_assert_eq!(msg.kind(), *num);
                        let again = Message::decode(*num, &msg.encode_body());
                        prop_assert_eq!(again.as_ref(), Ok(&msg), "{} re-encoded", name);
                        for cut in 0..body.len() {
                            prop_assert!(
                                Message::decode(*num, &body[..cut]).is_err(),
                                "{} decoded from {} of {} bytes", name, cut, body.len()
                            );
                        }
                    }
                    Err(DecodeError::Malformed(_)) => {}
                    Err(e) => prop_assert!(false, "{}: {}", name, e),
                }
            }
        }
    }

    #[test]
    fn kind_numbers_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (num, name, _) in Message::KINDS {
            assert!(seen.insert(*num), "kind {num} ({name}) used twice");
        }
    }

    #[test]
    fn trailing_and_unknown_are_errors() {
        let mut body = Message::Ping(Ping {}).encode_body();
        body.push(0);
        assert!(matches!(
            Message::decode(4, &body),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            Message::decode(999, &[]),
            Err(DecodeError::UnknownKind(999))
        );
    }
}
