//! Who may send what, by network (the `allow-networks` volume option and the cluster map):
//!
//! - a request that reads or changes a volume — its data on the bricks, its namespace, the
//!   volume record a mount opens, an administrative command naming it, or a brick of it
//!   (its listing or scrub state; not its free space, which `peer add` reads before any
//!   rule can exist) — is refused with `PermissionDenied` unless it comes from
//!   an address in the volume's networks or from a node of the cluster map (nodes forward,
//!   heal, collect garbage and move files for every volume);
//! - what only nodes send (member writes between a set's bricks, heal, and the metadata
//!   commands of their duties: heartbeats, damage reports, epochs, GC and rebalance
//!   bookkeeping) is refused from any other address, and heal only ever streams to a node of
//!   the cluster map;
//! - until the rules have been read once, requests of both kinds are refused with `Busy`
//!   (clients retry): the check is closed, not open, after a start.
//!
//! In a cluster with a key, each connection's peer has also proved a role (see
//! `brickfs_proto::cred`), and the role decides first:
//!
//! - a **node** (the cluster key) may send anything;
//! - an **administrator** anything but what only nodes send (the list above, Raft traffic and
//!   heartbeats); it is not held to a volume's networks;
//! - a **client** of volume V, with a credential V still lists, only V's data requests, the
//!   namespace, lock, open-file and session commands of V (`MetaOp::is_client_op`), reads of
//!   V and of the cluster map's nodes and bricks, pings and free space; and only from V's
//!   networks.
//!
//! The rules are read from the metadata group every `REFRESH_EVERY` (see
//! docs/operations.md for the table of who may send what).

use brickfs_client::MetaClient;
use brickfs_proto::cred::{Peer, Role};
use brickfs_proto::meta::{MetaRead, MetaReply, NodeRecord, SetState, VolumeRecord};
use brickfs_proto::msg::{DisperseGeometry, MemberRef, SetRef};
use brickfs_proto::{BrickId, ErrorBody, ErrorCode, Message, VolumeId};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::RwLock;

/// How often the rules are read again.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// An address range: the address and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net(IpAddr, u8);

impl Net {
    /// Parses `ADDR/LEN` (the form the metadata group stores; a bare address is one host).
    pub fn parse(text: &str) -> Option<Net> {
        let (ip, len) = match text.trim().split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
            None => {
                let ip = text.trim().parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Net(ip, len))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, len: u8, width: u8) -> u128 {
            if len == 0 { 0 } else { bits >> (width - len) }
        }
        match (self.0, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u128::from(u32::from(n)), self.1, 32)
                    == masked(u128::from(u32::from(a)), self.1, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.1, 128) == masked(u128::from(a), self.1, 128)
            }
            _ => false,
        }
    }
}

#[derive(Default)]
struct Rules {
    /// Whether the rules have been read at all (before: closed).
    known: bool,
    /// The cluster map's node addresses: always let in.
    nodes: HashSet<IpAddr>,
    /// The nodes' protocol addresses (where heal may stream to).
    node_addrs: HashSet<std::net::SocketAddr>,
    /// Which volume each brick serves.
    brick_volume: HashMap<BrickId, VolumeId>,
    /// Every volume's name, by id.
    names: HashMap<VolumeId, String>,
    /// The client credentials each volume lists.
    credentials: HashMap<VolumeId, HashSet<u64>>,
    /// Every set as the group last said (epoch, primary, members, in sync), by volume and
    /// index; each volume's disperse fragments (data, parity), none for other volumes; each
    /// brick's protocol address. What a client says of a set is checked against them.
    sets: HashMap<(VolumeId, u32), SetState>,
    disperse: HashMap<VolumeId, (u32, u32)>,
    brick_addrs: HashMap<BrickId, std::net::SocketAddr>,
    /// Volumes with `allow-networks`, by id (with their names).
    by_id: HashMap<VolumeId, (String, Vec<Net>)>,
    /// Every volume's id, by name.
    by_name_id: HashMap<String, VolumeId>,
    /// (peer, volume) refusals already logged, so a refused client does not flood the log.
    logged: HashSet<(IpAddr, String)>,
    /// How many times the rules have been read.
    generation: u64,
    /// Refusals not yet confirmed by rules read after them (see `Access::refuse`): the
    /// generation each was first met at.
    unconfirmed: HashMap<(IpAddr, String), u64>,
}

/// The rules this node enforces.
#[derive(Default)]
pub struct Access {
    /// False on a node without a metadata group to read rules from (a bare brick server):
    /// nothing is checked.
    enforce: bool,
    rules: RwLock<Rules>,
    /// Asks the refresher to read the rules now.
    stale: tokio::sync::Notify,
}

/// Which volume a request is about, if any.
enum Target<'a> {
    Id(VolumeId),
    Name(&'a str),
    Brick(BrickId),
}

/// What a request needs.
enum Need<'a> {
    /// Nothing checked here.
    Nothing,
    /// The volume's networks (or a node).
    Volume(Target<'a>),
    /// A node of the cluster map.
    Node,
}

/// What only nodes send besides `Need::Node`'s: Raft traffic and heartbeats (which need no
/// map entry from an address, since a node heartbeats before it is in the map, but need the
/// cluster key).
fn nodes_only(msg: &Message) -> bool {
    match msg {
        Message::RaftRpc(_) => true,
        // A client's command as its node passes it on: no peer sends one itself.
        Message::MetaWrite(w) => matches!(
            w.op,
            brickfs_proto::meta::MetaOp::Heartbeat { .. }
                | brickfs_proto::meta::MetaOp::AsClient { .. }
        ),
        _ => false,
    }
}

/// A request's kind for refusals: the message's, or the metadata command's or read's inside
/// it ("SetVolumeOption", not "MetaWrite").
fn kind_name(msg: &Message) -> String {
    let inner = match msg {
        Message::MetaWrite(w) => format!("{:?}", w.op),
        Message::MetaRead(r) => format!("{:?}", r.read),
        Message::MetaAdmin(a) => format!("{:?}", a.op),
        _ => return msg.name().to_string(),
    };
    let end = inner
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(inner.len());
    format!("{} {}", msg.name(), &inner[..end])
}

/// What a client's request reaches.
enum ClientTarget<'a> {
    /// Nothing of any volume (pings, free space, the cluster map's nodes and bricks, its
    /// own sessions).
    Free,
    Volume(VolumeId),
    Name(&'a str),
    /// Not for clients at all.
    Refused,
}

fn client_target(msg: &Message) -> ClientTarget<'_> {
    use Message::*;
    use brickfs_proto::meta::MetaRead as R;
    let id = match msg {
        Ping(_) | Statfs(_) | ListBricks(_) => return ClientTarget::Free,
        Write(m) => m.key.volume,
        Read(m) => m.key.volume,
        Truncate(m) => m.key.volume,
        Delete(m) => m.key.volume,
        Fsync(m) => m.key.volume,
        Stat(m) => m.key.volume,
        Seal(m) => m.key.volume,
        SetWrite(m) => m.set.volume,
        SetTruncate(m) => m.set.volume,
        DisperseWrite(m) => m.set.volume,
        DisperseTruncate(m) => m.set.volume,
        MetaWrite(w) if w.op.is_client_op() => match w.op.volume() {
            Some(id) => id,
            None => return ClientTarget::Free,
        },
        MetaRead(r) => match &r.read {
            R::VolumeByName { name } => return ClientTarget::Name(name),
            R::ListNodes | R::ListBricks => return ClientTarget::Free,
            other => match other.volume() {
                Some(id) => id,
                None => return ClientTarget::Refused,
            },
        },
        _ => return ClientTarget::Refused,
    };
    ClientTarget::Volume(id)
}

fn need(msg: &Message) -> Need<'_> {
    use Message::*;
    let id = match msg {
        MemberWrite(_) | MemberTruncate(_) | MemberReplace(_) | MemberRollback(_)
        | MemberStat(_) | HealObjects(_) => return Need::Node,
        MetaWrite(w) if w.op.is_node_duty() => return Need::Node,
        List(m) => return Need::Volume(Target::Brick(m.brick)),
        ScrubStatus(m) => return Need::Volume(Target::Brick(m.brick)),
        Write(m) => m.key.volume,
        Read(m) => m.key.volume,
        Truncate(m) => m.key.volume,
        Delete(m) => m.key.volume,
        Fsync(m) => m.key.volume,
        Stat(m) => m.key.volume,
        Seal(m) => m.key.volume,
        SetWrite(m) => m.set.volume,
        SetTruncate(m) => m.set.volume,
        DisperseWrite(m) => m.set.volume,
        DisperseTruncate(m) => m.set.volume,
        MetaWrite(w) => match (w.op.volume(), w.op.volume_name()) {
            (Some(id), _) => id,
            (None, Some(name)) => return Need::Volume(Target::Name(name)),
            (None, None) => return Need::Nothing,
        },
        MetaRead(r) => match &r.read {
            brickfs_proto::meta::MetaRead::VolumeByName { name } => {
                return Need::Volume(Target::Name(name));
            }
            other => match other.volume() {
                Some(id) => id,
                None => return Need::Nothing,
            },
        },
        _ => return Need::Nothing,
    };
    Need::Volume(Target::Id(id))
}

/// Volume `id`'s name when it has allow-networks and they do not hold `peer`.
fn outside_networks(rules: &Rules, id: VolumeId, peer: IpAddr) -> Option<String> {
    let (name, nets) = rules.by_id.get(&id)?;
    (!nets.iter().any(|n| n.contains(peer))).then(|| name.clone())
}

/// What `set_claims` finds.
#[derive(Debug, PartialEq, Eq)]
enum Claims {
    Fine,
    /// An epoch newer than the rules know.
    Ahead(String),
    /// Not the group's word at that epoch: (what, for the log, and why).
    Wrong(String, String),
}

/// Checks a set mutation's claims against the rules (see `Access::check_set_claims`).
fn set_claims(rules: &Rules, msg: &Message) -> Claims {
    use Message::*;
    let (brick, set, members, geometry): (
        BrickId,
        SetRef,
        &[MemberRef],
        Option<&DisperseGeometry>,
    ) = match msg {
        SetWrite(m) => (m.brick, m.set, &m.members, None),
        SetTruncate(m) => (m.brick, m.set, &m.members, None),
        DisperseWrite(m) => (m.brick, m.set, &m.geometry.members, Some(&m.geometry)),
        DisperseTruncate(m) => (m.brick, m.set, &m.geometry.members, Some(&m.geometry)),
        _ => return Claims::Fine,
    };
    let (volume, index, epoch) = (set.volume, set.set, set.epoch);
    let Some(known) = rules.sets.get(&(volume, index)) else {
        return Claims::Ahead(format!(
            "this node does not know set {index} of volume {volume} yet; retry shortly"
        ));
    };
    if epoch < known.epoch {
        return Claims::Fine;
    }
    if epoch > known.epoch {
        return Claims::Ahead(format!(
            "this node knows set {index} of volume {volume} at epoch {} yet, not {epoch}; retry shortly",
            known.epoch
        ));
    }
    let what = format!("set:{volume}:{index}:{epoch}");
    let wrong = |detail: String| {
        Claims::Wrong(
            what.clone(),
            format!("set {index} of volume {volume} at epoch {epoch}: {detail}"),
        )
    };
    if brick != known.primary {
        return wrong(format!(
            "its primary is brick {}, not {brick}",
            known.primary
        ));
    }
    let bricks: Vec<BrickId> = members.iter().map(|m| m.brick).collect();
    match (geometry, rules.disperse.get(&volume)) {
        (None, None) => {
            let others: Vec<BrickId> = known
                .in_sync
                .iter()
                .copied()
                .filter(|b| *b != known.primary)
                .collect();
            if bricks != others {
                return wrong(format!(
                    "the members to forward to are {others:?}, not {bricks:?}"
                ));
            }
        }
        (Some(g), Some(&(k, m))) => {
            let f = brickfs_layout::DISPERSE_FRAGMENT_BYTES;
            if (g.data_fragments, g.parity_fragments, g.fragment_bytes) != (k, m, f) {
                return wrong(format!(
                    "its geometry is {k}+{m} fragments of {f} bytes, not {}+{} of {}",
                    g.data_fragments, g.parity_fragments, g.fragment_bytes
                ));
            }
            if bricks != known.members || g.in_sync != known.in_sync {
                return wrong(format!(
                    "its members are {:?} ({:?} in sync), not {bricks:?} ({:?})",
                    known.members, known.in_sync, g.in_sync
                ));
            }
        }
        (Some(_), None) => return wrong("a replica set takes no disperse mutation".into()),
        (None, Some(_)) => return wrong("a disperse set takes no replica mutation".into()),
    }
    for member in members {
        let at = rules.brick_addrs.get(&member.brick);
        if at.is_none_or(|a| member.addr.parse::<std::net::SocketAddr>().ok() != Some(*a)) {
            return wrong(format!(
                "brick {} is at {}, not {}",
                member.brick,
                at.map_or("no known address".to_string(), |a| a.to_string()),
                member.addr
            ));
        }
    }
    Claims::Fine
}

impl Access {
    /// The rules of a node that reads them from a metadata group (`enforce`), or of one
    /// without a group, which checks nothing.
    pub fn new(enforce: bool) -> Access {
        Access {
            enforce,
            rules: RwLock::default(),
            stale: tokio::sync::Notify::new(),
        }
    }

    /// Refuses `msg` from `from` when its role may not send it, when it touches a volume
    /// whose networks do not hold the peer, or is a node's and the peer is no node (see the
    /// module's documentation).
    pub fn check(&self, from: Peer, msg: &Message) -> Result<(), ErrorBody> {
        let peer = from.addr.ip().to_canonical();
        match from.role {
            Role::Open => {}
            Role::Node => return self.check_heal_target(peer, msg),
            Role::Admin => {
                if matches!(need(msg), Need::Node) || nodes_only(msg) {
                    return Err(self.refuse_now(
                        peer,
                        format!("admin:{}", msg.name()),
                        format!(
                            "{} is sent by the cluster's nodes only, and this connection proved the admin credential, not the cluster key",
                            msg.name()
                        ),
                    ));
                }
                return Ok(());
            }
            Role::Client { volume, id } => return self.check_client(peer, volume, id, msg),
        }
        let need = need(msg);
        if !self.enforce || matches!(need, Need::Nothing) {
            return Ok(());
        }
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if !rules.known {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "this node has not read the cluster's access rules yet; retry shortly",
            ));
        }
        let from_node = rules.nodes.contains(&peer);
        if let Message::HealObjects(h) = msg
            && !h
                .target
                .addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| rules.node_addrs.contains(&a))
        {
            let target = h.target.addr.clone();
            drop(rules);
            return Err(self.refuse(
                peer,
                format!("heal:{target}"),
                format!("heal target {target} is not a node of the cluster map"),
            ));
        }
        if from_node {
            return Ok(());
        }
        let t = match need {
            Need::Nothing => return Ok(()),
            Need::Node => {
                drop(rules);
                return Err(self.refuse(
                    peer,
                    msg.name().to_string(),
                    format!(
                        "{} is sent by the cluster's nodes only, and {peer} is not one",
                        msg.name()
                    ),
                ));
            }
            Need::Volume(t) => t,
        };
        let id = match t {
            Target::Id(id) => Some(id),
            Target::Name(name) => rules.by_name_id.get(name).copied(),
            Target::Brick(b) => rules.brick_volume.get(&b).copied(),
        };
        let outside = id.and_then(|id| outside_networks(&rules, id, peer));
        drop(rules);
        self.within_networks(peer, msg, outside)
    }

    /// The last checks of a request about a volume: the peer in its networks (`outside`:
    /// the name of the volume whose networks do not hold it, see `outside_networks`), then
    /// what it claims of a set.
    fn within_networks(
        &self,
        peer: IpAddr,
        msg: &Message,
        outside: Option<String>,
    ) -> Result<(), ErrorBody> {
        match outside {
            Some(name) => Err(self.refuse(
                peer,
                name.clone(),
                format!("client {peer} is not in the allow-networks of volume {name}"),
            )),
            None => self.check_set_claims(peer, msg),
        }
    }

    /// What a client says of a set when it asks its primary for a mutation (the members to
    /// forward to, with their addresses; a disperse set's geometry) must be what the group
    /// says of the set at that epoch: else the primary would write where, and in the
    /// geometry, the client chose. An epoch the rules do not know yet is `Busy` (and the
    /// rules are read again at once); an older one passes, for the bricks' fences refuse it.
    fn check_set_claims(&self, peer: IpAddr, msg: &Message) -> Result<(), ErrorBody> {
        use Message::*;
        if !matches!(
            msg,
            SetWrite(_) | SetTruncate(_) | DisperseWrite(_) | DisperseTruncate(_)
        ) {
            return Ok(());
        }
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        match set_claims(&rules, msg) {
            Claims::Fine => Ok(()),
            Claims::Ahead(detail) => {
                drop(rules);
                self.stale.notify_one();
                Err(ErrorBody::new(ErrorCode::Busy, detail))
            }
            Claims::Wrong(what, detail) => {
                drop(rules);
                Err(self.refuse_now(peer, what, detail))
            }
        }
    }

    /// Heal streams only to a node of the cluster map, whoever asks.
    fn check_heal_target(&self, peer: IpAddr, msg: &Message) -> Result<(), ErrorBody> {
        let Message::HealObjects(h) = msg else {
            return Ok(());
        };
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if !self.enforce {
            return Ok(());
        }
        if !rules.known {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "this node has not read the cluster map yet: heal waits until it knows where it may stream to",
            ));
        }
        if h.target
            .addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| rules.node_addrs.contains(&a))
        {
            return Ok(());
        }
        let target = h.target.addr.clone();
        drop(rules);
        Err(self.refuse(
            peer,
            format!("heal:{target}"),
            format!("heal target {target} is not a node of the cluster map"),
        ))
    }

    /// What a client of `volume` with credential `id` may send (see the module's
    /// documentation).
    fn check_client(
        &self,
        peer: IpAddr,
        volume: VolumeId,
        id: u64,
        msg: &Message,
    ) -> Result<(), ErrorBody> {
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if !rules.known {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "this node has not read the cluster's access rules yet; retry shortly",
            ));
        }
        // Borrowed, not copied: every request of every client passes here.
        let name: std::borrow::Cow<'_, str> = match rules.names.get(&volume) {
            Some(n) => n.as_str().into(),
            None => volume.to_string().into(),
        };
        if !rules
            .credentials
            .get(&volume)
            .is_some_and(|ids| ids.contains(&id))
        {
            let detail = format!(
                "client credential {id:x} of volume {name} is not listed by the volume (revoked, or the volume is gone)"
            );
            drop(rules);
            return Err(self.refuse(peer, format!("credential:{volume}:{id:x}"), detail));
        }
        let wrong =
            |what: String| format!("a client credential of volume {name} does not reach {what}");
        let refusal = match client_target(msg) {
            ClientTarget::Free => None,
            ClientTarget::Volume(v) if v == volume => None,
            ClientTarget::Volume(v) => Some(wrong(format!(
                "volume {}",
                rules
                    .names
                    .get(&v)
                    .cloned()
                    .unwrap_or_else(|| v.to_string())
            ))),
            ClientTarget::Name(n) if n == &*name => None,
            ClientTarget::Name(n) => Some(wrong(format!("volume {n}"))),
            ClientTarget::Refused => Some(wrong(format!(
                "{}: it is for the cluster's nodes or administrators",
                kind_name(msg)
            ))),
        };
        if let Some(detail) = refusal {
            drop(name);
            drop(rules);
            return Err(self.refuse_now(
                peer,
                format!("client:{volume}:{}", kind_name(msg)),
                detail,
            ));
        }
        // The volume's own networks hold its clients too.
        let outside = outside_networks(&rules, volume, peer);
        drop(name);
        drop(rules);
        self.within_networks(peer, msg, outside)
    }

    /// A refusal that fresher rules cannot change (the role decides it): logged once per
    /// (peer, what), `PermissionDenied` at once.
    fn refuse_now(&self, peer: IpAddr, what: String, detail: String) -> ErrorBody {
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        if rules.logged.len() < 10_000 && rules.logged.insert((peer, what)) {
            tracing::warn!(%peer, "refused: {detail}");
        }
        ErrorBody::new(ErrorCode::PermissionDenied, detail)
    }

    /// A refusal, logged once per (peer, what). The rules may be older than what the peer
    /// knows (a node just added, a volume option just widened): the first refusal of a
    /// (peer, what) is `Busy` and has the rules read again at once; once rules read after it
    /// still refuse, it is `PermissionDenied`.
    fn refuse(&self, peer: IpAddr, what: String, detail: String) -> ErrorBody {
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let generation = rules.generation;
        let key = (peer, what);
        let first = match rules.unconfirmed.get(&key) {
            Some(g) => *g,
            None if rules.unconfirmed.len() < 10_000 => {
                rules.unconfirmed.insert(key.clone(), generation);
                generation
            }
            // Too many to track: refused at once.
            None => generation.wrapping_sub(1),
        };
        if first == generation {
            drop(rules);
            self.stale.notify_one();
            return ErrorBody::new(
                ErrorCode::Busy,
                format!("{detail} (checking the cluster map again; retry)"),
            );
        }
        if rules.logged.len() < 10_000 && rules.logged.insert(key) {
            tracing::warn!(%peer, "refused: {detail}");
        }
        ErrorBody::new(ErrorCode::PermissionDenied, detail)
    }

    /// Waits until a refusal asks for the rules to be read again.
    pub async fn stale(&self) {
        self.stale.notified().await
    }

    /// Whether the rules have been read at least once.
    pub fn known(&self) -> bool {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).known
    }

    /// Reads the rules from the metadata group once.
    pub async fn refresh(&self, meta: &MetaClient) -> Result<(), brickfs_client::MetaError> {
        let (volumes, MetaReply::Nodes(nodes)) = (
            meta.list_volumes().await?,
            meta.read(MetaRead::ListNodes).await?,
        ) else {
            return Ok(());
        };
        self.install(volumes, nodes);
        Ok(())
    }

    /// Replaces the rules with those of `volumes` and `nodes` (what `refresh` read), keeping
    /// the refusals already logged.
    pub fn install(&self, volumes: Vec<VolumeRecord>, nodes: Vec<NodeRecord>) {
        let mut fresh = Rules {
            known: true,
            ..Rules::default()
        };
        for n in nodes {
            if let Ok(addr) = n.addr.parse::<std::net::SocketAddr>() {
                fresh.nodes.insert(addr.ip().to_canonical());
                fresh.node_addrs.insert(addr);
            }
        }
        for v in volumes {
            for b in &v.bricks {
                fresh.brick_volume.insert(b.brick, v.id);
                if let Ok(addr) = brickfs_client::volume::brick_addr(b) {
                    fresh.brick_addrs.insert(b.brick, addr);
                }
            }
            for (i, set) in v.sets.iter().enumerate() {
                fresh.sets.insert((v.id, i as u32), set.clone());
            }
            if v.disperse_data > 0 {
                fresh
                    .disperse
                    .insert(v.id, (v.disperse_data, v.disperse_redundancy));
            }
            fresh.names.insert(v.id, v.name.clone());
            fresh.by_name_id.insert(v.name.clone(), v.id);
            fresh
                .credentials
                .insert(v.id, v.credentials.iter().map(|c| c.id).collect());
            let Some((_, value)) = v.options.iter().find(|(k, _)| k == "allow-networks") else {
                continue;
            };
            let nets: Vec<Net> = value.split(',').filter_map(Net::parse).collect();
            fresh.by_id.insert(v.id, (v.name, nets));
        }
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        fresh.logged = std::mem::take(&mut rules.logged);
        fresh.generation = rules.generation + 1;
        fresh.unconfirmed = std::mem::take(&mut rules.unconfirmed);
        *rules = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before the rules are read, what needs them is refused (`Busy`: clients retry) and the
    /// rest passes; a node without a metadata group checks nothing.
    #[test]
    fn the_check_is_closed_until_the_rules_are_known() {
        use brickfs_proto::msg::{Read, Statfs};
        use brickfs_proto::{BrickId, Ino, ObjectKey};
        let read = Message::Read(Read {
            brick: BrickId(1),
            key: ObjectKey {
                volume: VolumeId(3),
                ino: Ino(2),
                column: 0,
            },
            offset_bytes: 0,
            len_bytes: 1,
            repair: false,
        });
        let statfs = Message::Statfs(Statfs { brick: BrickId(1) });
        let peer = Peer {
            addr: "192.0.2.7:1000".parse().unwrap(),
            role: Role::Open,
        };
        let closed = Access::new(true);
        assert_eq!(
            closed.check(peer, &read).unwrap_err().code,
            ErrorCode::Busy as u16
        );
        assert!(closed.check(peer, &statfs).is_ok());
        closed.rules.write().unwrap().known = true;
        assert!(closed.check(peer, &read).is_ok(), "no rule for the volume");
        assert!(Access::new(false).check(peer, &read).is_ok());
    }

    /// A client's claims about a set pass only as the group made them at that epoch: the
    /// primary, the members to forward to and their addresses, a disperse set's geometry.
    #[test]
    fn set_mutations_must_name_the_sets_as_the_group_has_them() {
        use brickfs_proto::msg::{DisperseGeometry, DisperseWrite, MemberRef, SetRef, SetWrite};
        use brickfs_proto::{Epoch, Ino, ObjectKey};
        let (r, d) = (VolumeId(1), VolumeId(2));
        let b = BrickId;
        let mut rules = Rules {
            known: true,
            ..Rules::default()
        };
        for i in 1..=6 {
            let addr = format!("10.0.0.{i}:7000").parse().unwrap();
            rules.brick_addrs.insert(b(i), addr);
        }
        let state = |members: Vec<BrickId>, in_sync: Vec<BrickId>| SetState {
            primary: members[0],
            members,
            epoch: Epoch(5),
            in_sync,
            full_heal: Vec::new(),
            draining: None,
        };
        rules
            .sets
            .insert((r, 0), state(vec![b(1), b(2), b(3)], vec![b(1), b(3)]));
        rules.sets.insert(
            (d, 0),
            state(vec![b(4), b(5), b(6)], vec![b(4), b(5), b(6)]),
        );
        rules.disperse.insert(d, (2, 1));
        let member = |i: u64| MemberRef {
            brick: b(i),
            addr: format!("10.0.0.{i}:7000"),
        };
        let key = |volume| ObjectKey {
            volume,
            ino: Ino(9),
            column: 0,
        };
        let set_write = |brick, epoch, members| {
            Message::SetWrite(SetWrite {
                brick,
                set: SetRef {
                    volume: r,
                    set: 0,
                    epoch: Epoch(epoch),
                },
                key: key(r),
                offset_bytes: 0,
                sync: false,
                members,
                degraded: true,
            })
        };
        let disperse = |k, members, in_sync| {
            Message::DisperseWrite(DisperseWrite {
                brick: b(4),
                set: SetRef {
                    volume: d,
                    set: 0,
                    epoch: Epoch(5),
                },
                key: key(d),
                offset_bytes: 0,
                sync: false,
                geometry: DisperseGeometry {
                    data_fragments: k,
                    parity_fragments: 1,
                    fragment_bytes: brickfs_layout::DISPERSE_FRAGMENT_BYTES,
                    members,
                    in_sync,
                },
            })
        };
        let wrong = |msg: &Message, why: &str| match set_claims(&rules, msg) {
            Claims::Wrong(_, detail) => assert!(detail.contains(why), "{detail}"),
            other => panic!("{msg:?}: {other:?}"),
        };
        assert_eq!(
            set_claims(&rules, &set_write(b(1), 5, vec![member(3)])),
            Claims::Fine
        );
        wrong(&set_write(b(3), 5, vec![member(1)]), "its primary is brick");
        // Leaving an in-sync member out, or naming one out of sync.
        wrong(&set_write(b(1), 5, vec![]), "the members to forward to");
        wrong(
            &set_write(b(1), 5, vec![member(2)]),
            "the members to forward to",
        );
        let elsewhere = MemberRef {
            brick: b(3),
            addr: "192.0.2.9:7000".into(),
        };
        wrong(&set_write(b(1), 5, vec![elsewhere]), "is at 10.0.0.3:7000");
        // Older epochs are the fences' to refuse; newer ones wait for the rules.
        assert_eq!(
            set_claims(&rules, &set_write(b(2), 4, vec![])),
            Claims::Fine
        );
        assert!(matches!(
            set_claims(&rules, &set_write(b(1), 6, vec![])),
            Claims::Ahead(_)
        ));
        let all = || vec![member(4), member(5), member(6)];
        let in_sync = || vec![b(4), b(5), b(6)];
        assert_eq!(
            set_claims(&rules, &disperse(2, all(), in_sync())),
            Claims::Fine
        );
        wrong(&disperse(1, all(), in_sync()), "its geometry is 2+1");
        wrong(&disperse(2, all(), vec![b(4), b(5)]), "its members are");
        wrong(
            &disperse(2, vec![member(4), member(6), member(5)], in_sync()),
            "its members are",
        );
        rules.sets.clear();
        assert!(matches!(
            set_claims(&rules, &disperse(2, all(), in_sync())),
            Claims::Ahead(_)
        ));
    }

    #[test]
    fn networks_hold_what_their_prefix_says() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = Net::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.255.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(
            n.contains(ip("::ffff:10.1.0.9")),
            "IPv4-mapped addresses count"
        );
        assert!(!n.contains(ip("::1")));
        assert!(Net::parse("0.0.0.0/0").unwrap().contains(ip("192.0.2.1")));
        assert!(Net::parse("127.0.0.2").unwrap().contains(ip("127.0.0.2")));
        assert!(!Net::parse("127.0.0.2").unwrap().contains(ip("127.0.0.3")));
        assert!(Net::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Net::parse("10.0.0.0/33").is_none());
        assert!(Net::parse("nonsense").is_none());
    }
}
