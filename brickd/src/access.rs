//! Per-volume client networks (the `allow-networks` volume option): a request that reads or
//! changes a volume — its data on the bricks, its namespace in the metadata group, or the
//! volume record a mount opens — is refused with `PermissionDenied` unless it comes from an
//! address in the volume's networks or from a node of the cluster map (nodes forward, heal,
//! collect garbage and move files for every volume). The rules are read from the metadata
//! group every `REFRESH_EVERY`; before the first read nothing is refused.

use brickfs_client::MetaClient;
use brickfs_proto::meta::{MetaRead, MetaReply};
use brickfs_proto::{ErrorBody, ErrorCode, Message, VolumeId};
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
    /// The cluster map's node addresses: always let in.
    nodes: HashSet<IpAddr>,
    /// Volumes with `allow-networks`, by id and by name.
    by_id: HashMap<VolumeId, (String, Vec<Net>)>,
    by_name: HashMap<String, Vec<Net>>,
    /// (peer, volume) refusals already logged, so a refused client does not flood the log.
    logged: HashSet<(IpAddr, String)>,
}

/// The rules this node enforces.
#[derive(Default)]
pub struct Access {
    rules: RwLock<Rules>,
}

/// Which volume a request is about, if any.
enum Target<'a> {
    Id(VolumeId),
    Name(&'a str),
}

fn target(msg: &Message) -> Option<Target<'_>> {
    use Message::*;
    let id = match msg {
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
        MetaWrite(w) => w.op.volume()?,
        MetaRead(r) => match &r.read {
            brickfs_proto::meta::MetaRead::VolumeByName { name } => {
                return Some(Target::Name(name));
            }
            other => other.volume()?,
        },
        _ => return None,
    };
    Some(Target::Id(id))
}

impl Access {
    /// Refuses `msg` from `peer` when it touches a volume whose networks do not hold the peer.
    pub fn check(&self, peer: IpAddr, msg: &Message) -> Result<(), ErrorBody> {
        let Some(t) = target(msg) else {
            return Ok(());
        };
        let peer = peer.to_canonical();
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if rules.nodes.contains(&peer) {
            return Ok(());
        }
        let (name, nets) = match t {
            Target::Id(id) => match rules.by_id.get(&id) {
                Some((name, nets)) => (name.clone(), nets),
                None => return Ok(()),
            },
            Target::Name(name) => match rules.by_name.get(name) {
                Some(nets) => (name.to_string(), nets),
                None => return Ok(()),
            },
        };
        if nets.iter().any(|n| n.contains(peer)) {
            return Ok(());
        }
        drop(rules);
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        if rules.logged.len() < 10_000 && rules.logged.insert((peer, name.clone())) {
            tracing::warn!(%peer, volume = %name, "refused a client outside the volume's allow-networks");
        }
        Err(ErrorBody::new(
            ErrorCode::PermissionDenied,
            format!("client {peer} is not in the allow-networks of volume {name}"),
        ))
    }

    /// Reads the rules from the metadata group once.
    pub async fn refresh(&self, meta: &MetaClient) -> Result<(), brickfs_client::MetaError> {
        let (MetaReply::Volumes(volumes), MetaReply::Nodes(nodes)) = (
            meta.read(MetaRead::ListVolumes).await?,
            meta.read(MetaRead::ListNodes).await?,
        ) else {
            return Ok(());
        };
        let mut fresh = Rules::default();
        for n in nodes {
            if let Ok(addr) = n.addr.parse::<std::net::SocketAddr>() {
                fresh.nodes.insert(addr.ip().to_canonical());
            }
        }
        for v in volumes {
            let Some((_, value)) = v.options.iter().find(|(k, _)| k == "allow-networks") else {
                continue;
            };
            let nets: Vec<Net> = value.split(',').filter_map(Net::parse).collect();
            fresh.by_name.insert(v.name.clone(), nets.clone());
            fresh.by_id.insert(v.id, (v.name, nets));
        }
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        fresh.logged = std::mem::take(&mut rules.logged);
        *rules = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
