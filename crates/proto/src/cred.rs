//! Who a peer is and what it proves it with: the three roles of a keyed cluster.
//!
//! - **Node**: holds the cluster key itself. Raft traffic, member writes, heal, node
//!   registration and every other node duty; everything else too.
//! - **Administrator**: holds the admin credential, HMAC-SHA256(key, "brickfs-admin-credential"),
//!   which `brickfs cluster credential admin` prints. The CLI's administrative commands, the
//!   provisioning API and any volume's data; no node duty, no Raft traffic.
//! - **Client** of one volume: holds a client credential of that volume,
//!   HMAC-SHA256(key, "brickfs-client-credential" ‖ volume ‖ id) for an `id` the metadata group
//!   lists for the volume (made by `brickfs volume credential VOLUME new`, shown once,
//!   revoked by removing the id). Its own volume's data and namespace and nothing else.
//!
//! No secret is stored anywhere but in the credential files: a node derives the secret of the
//! role a peer claims from the cluster key, and both sides prove they hold it in the handshake
//! (see `rpc`). A credential's text form is one line: `brickfs-admin-1:HEX` or
//! `brickfs-client-1:VOLUME:ID:HEX` (volume and id in hex). A file holding anything else is a
//! cluster key.

use crate::ids::VolumeId;
use serde::{Deserialize, Serialize};
use std::io;

const ADMIN_PREFIX: &str = "brickfs-admin-1:";
const CLIENT_PREFIX: &str = "brickfs-client-1:";

/// What a peer proves in the handshake.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The cluster key itself: a node.
    Node(Vec<u8>),
    /// The admin secret.
    Admin(Vec<u8>),
    /// A client secret of one volume.
    Client {
        volume: VolumeId,
        id: u64,
        secret: Vec<u8>,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        match self {
            Credential::Node(_) => write!(f, "Credential::Node"),
            Credential::Admin(_) => write!(f, "Credential::Admin"),
            Credential::Client { volume, id, .. } => {
                write!(f, "Credential::Client({volume}, {id:x})")
            }
        }
    }
}

/// Who a peer says it is in its `Hello`; its proof is made with that role's secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Claim {
    Node,
    Admin,
    Client { volume: VolumeId, id: u64 },
}

/// Who a connection's peer proved to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A cluster without a key: nobody proves anything, only the networks are checked.
    Open,
    Node,
    Admin,
    Client {
        volume: VolumeId,
        id: u64,
    },
}

impl Role {
    /// For logs and refusals.
    pub fn describe(&self) -> String {
        match self {
            Role::Open => "a peer of a cluster without a key".into(),
            Role::Node => "a node".into(),
            Role::Admin => "an administrator".into(),
            Role::Client { volume, id } => {
                format!("a client of volume {volume} (credential {id:x})")
            }
        }
    }
}

/// A request's peer: its address and what it proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub role: Role,
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// The admin secret of the cluster with `key`.
pub fn admin_secret(key: &[u8]) -> Vec<u8> {
    mac(key, &[b"brickfs-admin-credential"])
}

/// The secret of client credential `id` of `volume` in the cluster with `key`.
pub fn client_secret(key: &[u8], volume: VolumeId, id: u64) -> Vec<u8> {
    mac(
        key,
        &[
            b"brickfs-client-credential",
            &volume.0.to_be_bytes(),
            &id.to_be_bytes(),
        ],
    )
}

/// The secret a peer claiming `claim` must prove, in the cluster with `key`.
pub fn secret_for(key: &[u8], claim: Claim) -> Vec<u8> {
    match claim {
        Claim::Node => key.to_vec(),
        Claim::Admin => admin_secret(key),
        Claim::Client { volume, id } => client_secret(key, volume, id),
    }
}

impl Claim {
    /// The role a peer has once it proved this claim.
    pub fn role(self) -> Role {
        match self {
            Claim::Node => Role::Node,
            Claim::Admin => Role::Admin,
            Claim::Client { volume, id } => Role::Client { volume, id },
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

impl Credential {
    pub fn claim(&self) -> Claim {
        match self {
            Credential::Node(_) => Claim::Node,
            Credential::Admin(_) => Claim::Admin,
            Credential::Client { volume, id, .. } => Claim::Client {
                volume: *volume,
                id: *id,
            },
        }
    }

    /// What the handshake's proofs are made with.
    pub fn secret(&self) -> &[u8] {
        match self {
            Credential::Node(k) | Credential::Admin(k) => k,
            Credential::Client { secret, .. } => secret,
        }
    }

    /// The one-line text form of an admin or client credential (a cluster key has none: its
    /// file is the key).
    pub fn to_text(&self) -> Option<String> {
        match self {
            Credential::Node(_) => None,
            Credential::Admin(s) => Some(format!("{ADMIN_PREFIX}{}", hex(s))),
            Credential::Client { volume, id, secret } => Some(format!(
                "{CLIENT_PREFIX}{:x}:{id:x}:{}",
                volume.0,
                hex(secret)
            )),
        }
    }

    /// Parses a credential file's contents: an admin or client credential, or else a cluster
    /// key (at least 16 bytes once surrounding whitespace is trimmed).
    pub fn parse(raw: &[u8]) -> Result<Credential, String> {
        let text = raw.trim_ascii();
        let bad = |what: &str| {
            format!("not a valid {what} credential (it is one line, as brickfs printed it)")
        };
        if let Some(rest) = text.strip_prefix(ADMIN_PREFIX.as_bytes()) {
            let secret = std::str::from_utf8(rest)
                .ok()
                .and_then(unhex)
                .filter(|s| s.len() == 32)
                .ok_or_else(|| bad("admin"))?;
            return Ok(Credential::Admin(secret));
        }
        if let Some(rest) = text.strip_prefix(CLIENT_PREFIX.as_bytes()) {
            let rest = std::str::from_utf8(rest).map_err(|_| bad("client"))?;
            let mut parts = rest.split(':');
            let (Some(v), Some(i), Some(s), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad("client"));
            };
            let volume = u64::from_str_radix(v, 16).map_err(|_| bad("client"))?;
            let id = u64::from_str_radix(i, 16).map_err(|_| bad("client"))?;
            let secret = unhex(s)
                .filter(|s| s.len() == 32)
                .ok_or_else(|| bad("client"))?;
            return Ok(Credential::Client {
                volume: VolumeId(volume),
                id,
                secret,
            });
        }
        if text.len() < 16 {
            return Err(format!(
                "holds {} bytes, fewer than 16: neither a credential nor a cluster key (make a key with: head -c 32 /dev/urandom | base64 > FILE)",
                text.len()
            ));
        }
        Ok(Credential::Node(text.to_vec()))
    }

    /// Reads a credential file (see [`Credential::parse`]).
    pub fn load(path: &std::path::Path) -> io::Result<Credential> {
        let raw = std::fs::read(path)?;
        Credential::parse(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_as_text_and_bad_text_is_refused() {
        let key = b"0123456789abcdef0123456789abcdef";
        let admin = Credential::Admin(admin_secret(key));
        let client = Credential::Client {
            volume: VolumeId(0xfeed),
            id: 0xabc,
            secret: client_secret(key, VolumeId(0xfeed), 0xabc),
        };
        for c in [&admin, &client] {
            let text = c.to_text().unwrap();
            assert_eq!(&Credential::parse(text.as_bytes()).unwrap(), c);
            assert_eq!(
                &Credential::parse(format!("  {text}\n").as_bytes()).unwrap(),
                c
            );
            assert!(!format!("{c:?}").contains(&hex(c.secret())));
            // Cut or altered text is refused, not read as a key.
            let cut = &text[..text.len() - 2];
            assert!(Credential::parse(cut.as_bytes()).is_err(), "{cut}");
        }
        assert!(Credential::parse(b"brickfs-client-1:1:2").is_err());
        assert!(Credential::parse(b"brickfs-client-1:zz:2:00").is_err());
        assert!(Credential::parse(b"short").is_err());
        assert_eq!(
            Credential::parse(key).unwrap(),
            Credential::Node(key.to_vec())
        );
        // Each role's secret differs, and a client's differs per volume and id.
        let secrets = [
            secret_for(key, Claim::Node),
            secret_for(key, Claim::Admin),
            secret_for(
                key,
                Claim::Client {
                    volume: VolumeId(1),
                    id: 1,
                },
            ),
            secret_for(
                key,
                Claim::Client {
                    volume: VolumeId(1),
                    id: 2,
                },
            ),
            secret_for(
                key,
                Claim::Client {
                    volume: VolumeId(2),
                    id: 1,
                },
            ),
        ];
        for (i, a) in secrets.iter().enumerate() {
            for b in &secrets[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
