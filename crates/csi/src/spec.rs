//! The driver's pure rules: volume ids, StorageClass parameters, capacities, capabilities and
//! list tokens. Nothing here does I/O, so every rule is a unit test.

use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::{CapacityRange, VolumeCapability, volume_capability};
use sha2::Digest;

/// What a claim is given when it asks for no size: 1 GiB.
pub const DEFAULT_BYTES: u64 = 1 << 30;

/// What a CSI volume id names. Volume names hold only letters, digits, `.`, `_` and `-`, so
/// `/` separates the parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeRef {
    /// A whole brickfs volume per claim: `v/NAME`. Its capacity is the quota on its root.
    Whole { volume: String },
    /// A directory per claim in a shared volume: `d/SHARED/DIR`, the directory `/DIR` with a
    /// quota as its capacity.
    Dir { volume: String, dir: String },
}

impl VolumeRef {
    /// Parses an id; `None` for text this driver never made (an unknown volume).
    pub fn parse(id: &str) -> Option<VolumeRef> {
        let mut parts = id.split('/');
        let r = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("v"), Some(v), None, None) => VolumeRef::Whole {
                volume: v.to_string(),
            },
            (Some("d"), Some(v), Some(d), None) => VolumeRef::Dir {
                volume: v.to_string(),
                dir: d.to_string(),
            },
            _ => return None,
        };
        let ok = |s: &str| brickfs_meta_name_ok(s);
        match &r {
            VolumeRef::Whole { volume } if ok(volume) => Some(r),
            VolumeRef::Dir { volume, dir } if ok(volume) && ok(dir) => Some(r),
            _ => None,
        }
    }

    pub fn id(&self) -> String {
        match self {
            VolumeRef::Whole { volume } => format!("v/{volume}"),
            VolumeRef::Dir { volume, dir } => format!("d/{volume}/{dir}"),
        }
    }

    /// The brickfs volume a mount of this claim mounts.
    pub fn volume(&self) -> &str {
        match self {
            VolumeRef::Whole { volume } | VolumeRef::Dir { volume, .. } => volume,
        }
    }

    /// The path in the volume whose quota is the claim's capacity: also the directory a
    /// publish of the claim shows (mountinfo's root field).
    pub fn quota_path(&self) -> String {
        match self {
            VolumeRef::Whole { .. } => "/".to_string(),
            VolumeRef::Dir { dir, .. } => format!("/{dir}"),
        }
    }
}

/// The metadata group's rule for volume names (`check_volume_name`); claim directories
/// follow it too.
pub fn brickfs_meta_name_ok(name: &str) -> bool {
    brickfs_meta::sm::check_volume_name(name).is_ok()
}

/// The brickfs name of a claim the CO calls `csi_name`: the name itself when it is a valid
/// volume name (Kubernetes' `pvc-UUID` is), otherwise `csi-` and a digest of it, so that the
/// same CO name always maps to the same volume (idempotent creates).
pub fn claim_name(csi_name: &str) -> String {
    if brickfs_meta_name_ok(csi_name) && csi_name.len() <= 100 {
        return csi_name.to_string();
    }
    let digest = sha2::Sha256::digest(csi_name.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("csi-{hex}")
}

/// How a StorageClass provisions its claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provision {
    /// A volume of a durability class (`type`: `distribute`, `replicate-N`, `disperse-K+M`),
    /// striped over `stripe` sets when more than 1.
    Volume { class: String, stripe: u32 },
    /// A directory with a quota inside the existing volume `shared`.
    Directory { shared: String },
}

/// Reads a StorageClass's parameters: `mode` (`volume`, the default, or `directory`), `type`
/// (default `replicate-3`) and `stripe` (default 1) for volumes, `volume` (the shared volume)
/// for directories. Any other key is refused, so that a typo does not silently give another
/// layout.
pub fn provision(params: &std::collections::HashMap<String, String>) -> Result<Provision, String> {
    for k in params.keys() {
        // Kubernetes' external-provisioner adds its own `csi.storage.k8s.io/...` keys.
        if !matches!(k.as_str(), "mode" | "type" | "stripe" | "volume")
            && !k.starts_with("csi.storage.k8s.io/")
        {
            return Err(format!(
                "unknown StorageClass parameter {k:?} (mode, type, stripe, volume)"
            ));
        }
    }
    match params.get("mode").map(String::as_str).unwrap_or("volume") {
        "volume" => {
            if params.contains_key("volume") {
                return Err("parameter volume is for mode: directory".into());
            }
            let stripe = match params.get("stripe") {
                None => 1,
                Some(s) => s
                    .parse::<u32>()
                    .ok()
                    .filter(|s| *s >= 1)
                    .ok_or_else(|| format!("stripe {s:?} is not a count of sets"))?,
            };
            Ok(Provision::Volume {
                class: params
                    .get("type")
                    .cloned()
                    .unwrap_or_else(|| "replicate-3".into()),
                stripe,
            })
        }
        "directory" => {
            if params.contains_key("type") || params.contains_key("stripe") {
                return Err(
                    "parameters type and stripe are for mode: volume (a directory takes its shared volume's layout)"
                        .into(),
                );
            }
            let shared = params
                .get("volume")
                .ok_or("mode: directory needs parameter volume: the shared volume's name")?;
            if !brickfs_meta_name_ok(shared) {
                return Err(format!("{shared:?} is not a volume name"));
            }
            Ok(Provision::Directory {
                shared: shared.clone(),
            })
        }
        other => Err(format!("unknown mode {other:?} (volume or directory)")),
    }
}

impl Provision {
    /// The mark a claim made this way carries (see `cluster::MARK`).
    pub fn mark(&self, csi_name: &str) -> serde_json::Value {
        match self {
            Provision::Volume { class, stripe } => serde_json::json!({
                "csi_name": csi_name, "mode": "volume", "type": class, "stripe": stripe,
            }),
            Provision::Directory { shared } => serde_json::json!({
                "csi_name": csi_name, "mode": "directory", "volume": shared,
            }),
        }
    }

    /// Whether a claim marked `mark` was made this way (an idempotent create, or a
    /// ValidateVolumeCapabilities with parameters).
    pub fn matches(&self, mark: &serde_json::Value) -> bool {
        let fresh = self.mark("");
        ["mode", "type", "stripe", "volume"]
            .iter()
            .all(|k| fresh.get(*k) == mark.get(*k))
    }
}

/// The bytes a claim gets for `range`: the required size, else the limit, else
/// [`DEFAULT_BYTES`] (capped by the limit). Negative values or a limit below the required size
/// are refused (OUT_OF_RANGE).
pub fn capacity(range: Option<&CapacityRange>) -> Result<u64, String> {
    let Some(r) = range else {
        return Ok(DEFAULT_BYTES);
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err("capacity_range values must not be negative".into());
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if lim > 0 && req > lim {
        return Err(format!(
            "required_bytes {req} is more than limit_bytes {lim}"
        ));
    }
    Ok(match (req, lim) {
        (0, 0) => DEFAULT_BYTES,
        (0, l) => l.min(DEFAULT_BYTES),
        (r, _) => r,
    })
}

/// Whether an existing claim of `have` bytes satisfies `range` (an idempotent create).
pub fn fits(have: u64, range: Option<&CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    let (req, lim) = (r.required_bytes.max(0) as u64, r.limit_bytes.max(0) as u64);
    have >= req && (lim == 0 || have <= lim)
}

/// Checks one capability: a filesystem mount (any `fs_type` but `brickfs` or empty is
/// refused, as is a block device) with a known access mode. Returns whether the mode is
/// read-only.
pub fn check_capability(c: &VolumeCapability) -> Result<bool, String> {
    match &c.access_type {
        Some(volume_capability::AccessType::Mount(m)) => {
            if !matches!(m.fs_type.as_str(), "" | "brickfs" | "fuse.brickfs") {
                return Err(format!(
                    "fs_type {:?}: brickfs volumes are brickfs filesystems",
                    m.fs_type
                ));
            }
        }
        Some(volume_capability::AccessType::Block(_)) => {
            return Err("block access is not offered: brickfs volumes are filesystems".into());
        }
        None => return Err("a capability names mount or block access".into()),
    }
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::Unknown => Err("a capability names an access mode".into()),
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Ok(true),
        Mode::SingleNodeWriter
        | Mode::MultiNodeSingleWriter
        | Mode::MultiNodeMultiWriter
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(false),
    }
}

/// Checks a list of capabilities (at least one); true when every one is read-only.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<bool, String> {
    if caps.is_empty() {
        return Err("volume_capabilities is empty".into());
    }
    let mut read_only = true;
    for c in caps {
        read_only &= check_capability(c)?;
    }
    Ok(read_only)
}

/// One page of `ids` (sorted) for ListVolumes: the ids after `token` (the last id of the
/// page before; empty is the start), at most `max` (0: all). Returns the page and the next
/// token (empty at the end). Claims deleted or made between pages shift nothing: a page
/// starts after a name, not at a position. A token that is no id is refused (ABORTED in the
/// spec).
pub fn page(ids: &[String], token: &str, max: i32) -> Result<(Vec<String>, String), String> {
    if max < 0 {
        return Err(format!("max_entries {max} is negative"));
    }
    if !token.is_empty() && VolumeRef::parse(token).is_none() {
        return Err(format!(
            "starting_token {token:?} was not given by this driver"
        ));
    }
    let start = if token.is_empty() {
        0
    } else {
        ids.partition_point(|i| i.as_str() <= token)
    };
    let end = if max == 0 {
        ids.len()
    } else {
        (start + max as usize).min(ids.len())
    };
    let next = if end < ids.len() && end > start {
        ids[end - 1].clone()
    } else {
        String::new()
    };
    Ok((ids[start..end].to_vec(), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

    fn cap(mode: Mode, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn ids_round_trip_and_refuse_what_the_driver_never_made() {
        for r in [
            VolumeRef::Whole {
                volume: "pvc-1".into(),
            },
            VolumeRef::Dir {
                volume: "shared".into(),
                dir: "pvc-2".into(),
            },
        ] {
            assert_eq!(VolumeRef::parse(&r.id()), Some(r));
        }
        for bad in [
            "", "v/", "v/a/b", "d/a", "d/a/../x", "x/a", "v/../etc", "d/a/b/c", "d/a/.b",
        ] {
            assert_eq!(VolumeRef::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn claim_names_are_stable_and_valid() {
        assert_eq!(claim_name("pvc-0a1b"), "pvc-0a1b");
        let odd = claim_name("sanity test/volume ü");
        assert!(brickfs_meta_name_ok(&odd), "{odd}");
        assert_eq!(odd, claim_name("sanity test/volume ü"));
        assert_ne!(odd, claim_name("sanity test/volume u"));
        assert!(brickfs_meta_name_ok(&claim_name(&"x".repeat(500))));
    }

    #[test]
    fn parameters_choose_the_mode_and_refuse_typos() {
        let p = |kv: &[(&str, &str)]| {
            provision(
                &kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            p(&[]),
            Ok(Provision::Volume {
                class: "replicate-3".into(),
                stripe: 1
            })
        );
        assert_eq!(
            p(&[("type", "disperse-4+2")]),
            Ok(Provision::Volume {
                class: "disperse-4+2".into(),
                stripe: 1
            })
        );
        assert_eq!(
            p(&[("type", "distribute"), ("stripe", "4")]),
            Ok(Provision::Volume {
                class: "distribute".into(),
                stripe: 4
            })
        );
        assert!(p(&[("stripe", "0")]).is_err());
        assert!(p(&[("stripe", "many")]).is_err());
        assert!(p(&[("mode", "directory"), ("volume", "s"), ("stripe", "2")]).is_err());
        assert_eq!(
            p(&[("mode", "directory"), ("volume", "shared")]),
            Ok(Provision::Directory {
                shared: "shared".into()
            })
        );
        assert!(p(&[("mode", "directory")]).is_err());
        assert!(p(&[("mode", "directory"), ("volume", "a/b")]).is_err());
        assert!(p(&[("mode", "directory"), ("volume", "s"), ("type", "x")]).is_err());
        assert!(p(&[("tpye", "distribute")]).is_err());
        assert!(p(&[("mode", "block")]).is_err());
        assert!(p(&[("csi.storage.k8s.io/pvc/name", "x")]).is_ok());
    }

    #[test]
    fn capacities() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(capacity(None), Ok(DEFAULT_BYTES));
        assert_eq!(capacity(Some(&r(0, 0))), Ok(DEFAULT_BYTES));
        assert_eq!(capacity(Some(&r(5, 0))), Ok(5));
        assert_eq!(capacity(Some(&r(0, 7))), Ok(7));
        assert_eq!(capacity(Some(&r(5, 5))), Ok(5));
        assert!(capacity(Some(&r(6, 5))).is_err());
        assert!(capacity(Some(&r(-1, 0))).is_err());
        assert!(fits(10, Some(&r(10, 0))));
        assert!(fits(10, Some(&r(5, 10))));
        assert!(!fits(10, Some(&r(11, 0))));
        assert!(!fits(10, Some(&r(1, 9))));
    }

    #[test]
    fn capabilities() {
        assert_eq!(
            check_capability(&cap(Mode::MultiNodeMultiWriter, "")),
            Ok(false)
        );
        assert_eq!(
            check_capability(&cap(Mode::SingleNodeWriter, "brickfs")),
            Ok(false)
        );
        assert_eq!(
            check_capability(&cap(Mode::MultiNodeReaderOnly, "")),
            Ok(true)
        );
        assert!(check_capability(&cap(Mode::Unknown, "")).is_err());
        assert!(check_capability(&cap(Mode::SingleNodeWriter, "ext4")).is_err());
        let block = VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert!(check_capability(&block).is_err());
        assert!(check_capabilities(&[]).is_err());
        assert_eq!(
            check_capabilities(&[
                cap(Mode::MultiNodeReaderOnly, ""),
                cap(Mode::SingleNodeWriter, "")
            ]),
            Ok(false)
        );
    }

    #[test]
    fn pages_cover_every_id_once() {
        let ids: Vec<String> = (0..7).map(|i| format!("v/{i}")).collect();
        for max in 1..9 {
            let (mut seen, mut token) = (Vec::new(), String::new());
            for _ in 0..20 {
                let (page, next) = page(&ids, &token, max).unwrap();
                assert!(page.len() <= max as usize);
                seen.extend(page);
                if next.is_empty() {
                    break;
                }
                token = next;
            }
            assert_eq!(seen, ids, "max {max}");
        }
        assert_eq!(page(&ids, "", 0).unwrap().0.len(), 7);
        assert!(page(&ids, "8", 1).is_err());
        assert!(page(&ids, "abc", 1).is_err());
        assert!(page(&ids, "", -1).is_err());
        // A claim deleted between pages skips nothing that is left.
        let (first, token) = page(&ids, "", 3).unwrap();
        assert_eq!(token, "v/2");
        let fewer: Vec<String> = ids.iter().filter(|i| *i != &first[2]).cloned().collect();
        let (second, _) = page(&fewer, &token, 3).unwrap();
        assert_eq!(second, vec!["v/3", "v/4", "v/5"]);
        // A made mark says how the claim was made.
        let how = Provision::Volume {
            class: "replicate-3".into(),
            stripe: 1,
        };
        assert!(how.matches(&how.mark("pvc-1")));
        assert!(
            !Provision::Volume {
                class: "distribute".into(),
                stripe: 1
            }
            .matches(&how.mark("pvc-1"))
        );
        assert!(!Provision::Directory { shared: "s".into() }.matches(&how.mark("pvc-1")));
    }
}
