//! POSIX ACLs as Linux stores them in the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes, and the rules that tie them to the mode:
//! the mode's group bits are the ACL's mask (or its owning-group entry when there is no mask),
//! a chmod rewrites those entries, and a new file or directory inherits its parent's default
//! ACL masked by the mode it was created with (the umask is then not applied).
//!
//! The kernel enforces ACLs (mountd asks for `FUSE_POSIX_ACL`); this module only keeps them and
//! the mode consistent, exactly as `fs/posix_acl.c` does for a local filesystem.

/// The extended attribute holding a file's access ACL.
pub const ACCESS_XATTR: &str = "system.posix_acl_access";
/// The extended attribute holding a directory's default ACL.
pub const DEFAULT_XATTR: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER_BYTES: usize = 4;
const ENTRY_BYTES: usize = 8;
/// The id of entries that name no user or group.
const UNDEFINED_ID: u32 = u32::MAX;

/// The kinds of ACL entries, with the tag values of the Linux xattr format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tag {
    UserObj = 0x01,
    User = 0x02,
    GroupObj = 0x04,
    Group = 0x08,
    Mask = 0x10,
    Other = 0x20,
}

impl Tag {
    fn from_u16(v: u16) -> Option<Tag> {
        Some(match v {
            0x01 => Tag::UserObj,
            0x02 => Tag::User,
            0x04 => Tag::GroupObj,
            0x08 => Tag::Group,
            0x10 => Tag::Mask,
            0x20 => Tag::Other,
            _ => return None,
        })
    }
}

/// One ACL entry: who (tag and, for named users and groups, the id) and what (rwx bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tag: Tag,
    pub perm: u16,
    pub id: u32,
}

/// A valid ACL: entries in the order Linux keeps them (by tag, then by id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    pub entries: Vec<Entry>,
}

/// Why an ACL value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("ACL value of {0} bytes is not a version-2 header and whole entries")]
    Shape(usize),
    #[error("ACL version {0} (only 2 is known)")]
    Version(u32),
    #[error("unknown ACL tag {0:#x}")]
    Tag(u16),
    #[error("ACL permission {0:#o} has bits beyond rwx")]
    Perm(u16),
    #[error("ACL entries are not in order, or one is repeated")]
    Order,
    #[error("ACL lacks an owner, owning group or other entry, or a mask it needs")]
    Missing,
}

impl Acl {
    /// Parses the xattr value. `Ok(None)` is the empty ACL (a header and no entries), which
    /// means "remove".
    pub fn parse(raw: &[u8]) -> Result<Option<Acl>, AclError> {
        if raw.len() < HEADER_BYTES || !(raw.len() - HEADER_BYTES).is_multiple_of(ENTRY_BYTES) {
            return Err(AclError::Shape(raw.len()));
        }
        let version = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(AclError::Version(version));
        }
        let mut entries = Vec::new();
        for e in raw[HEADER_BYTES..].chunks_exact(ENTRY_BYTES) {
            let tag_raw = u16::from_le_bytes([e[0], e[1]]);
            let tag = Tag::from_u16(tag_raw).ok_or(AclError::Tag(tag_raw))?;
            let perm = u16::from_le_bytes([e[2], e[3]]);
            if perm & !0o7 != 0 {
                return Err(AclError::Perm(perm));
            }
            let id = match tag {
                Tag::User | Tag::Group => u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                _ => UNDEFINED_ID,
            };
            entries.push(Entry { tag, perm, id });
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let acl = Acl { entries };
        acl.validate()?;
        Ok(Some(acl))
    }

    /// The rules of `posix_acl_valid`: sorted by tag and id, one of each base entry, a mask
    /// whenever there are named entries.
    fn validate(&self) -> Result<(), AclError> {
        let ordered = self.entries.windows(2).all(|w| match (w[0].tag, w[1].tag) {
            (a, b) if a == b => matches!(a, Tag::User | Tag::Group) && w[0].id < w[1].id,
            (a, b) => a < b,
        });
        if !ordered {
            return Err(AclError::Order);
        }
        let has = |t| self.entries.iter().any(|e| e.tag == t);
        let named = has(Tag::User) || has(Tag::Group);
        if !has(Tag::UserObj)
            || !has(Tag::GroupObj)
            || !has(Tag::Other)
            || (named && !has(Tag::Mask))
        {
            return Err(AclError::Missing);
        }
        Ok(())
    }

    /// The xattr value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + ENTRY_BYTES * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&(e.tag as u16).to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// The permission bits (0o777) this ACL gives the mode, and whether the ACL says nothing
    /// more than those bits (then it need not be stored).
    pub fn mode_bits(&self) -> (u32, bool) {
        let mut mode = 0u32;
        let mut equivalent = true;
        for e in &self.entries {
            let p = u32::from(e.perm);
            match e.tag {
                Tag::UserObj => mode |= p << 6,
                Tag::GroupObj => {
                    if !self.entries.iter().any(|m| m.tag == Tag::Mask) {
                        mode |= p << 3;
                    }
                }
                Tag::Mask => {
                    mode |= p << 3;
                    equivalent = false;
                }
                Tag::Other => mode |= p,
                Tag::User | Tag::Group => equivalent = false,
            }
        }
        (mode, equivalent)
    }

    /// A chmod: the owner, mask (or owning group) and other entries take the new mode's bits
    /// (`posix_acl_chmod`).
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.entries.iter().any(|e| e.tag == Tag::Mask);
        for e in &mut self.entries {
            match e.tag {
                Tag::UserObj => e.perm = ((mode >> 6) & 7) as u16,
                Tag::Mask => e.perm = ((mode >> 3) & 7) as u16,
                Tag::GroupObj if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
                Tag::Other => e.perm = (mode & 7) as u16,
                _ => {}
            }
        }
    }

    /// A new inode's access ACL from its parent's default ACL (`posix_acl_create_masq`): the
    /// ACL and the requested mode restrict each other. Returns the resulting mode (with the
    /// bits above 0o777 kept) and whether the ACL says more than the mode.
    pub fn create_masq(&mut self, mode: u32) -> (u32, bool) {
        let mut m = mode & 0o777;
        let mut equivalent = true;
        let mut group_obj = None;
        let mut mask = None;
        for (i, e) in self.entries.iter_mut().enumerate() {
            match e.tag {
                Tag::UserObj => {
                    e.perm &= ((m >> 6) & 7) as u16;
                    m &= (u32::from(e.perm) << 6) | !0o700;
                }
                Tag::User | Tag::Group => equivalent = false,
                Tag::GroupObj => group_obj = Some(i),
                Tag::Other => {
                    e.perm &= (m & 7) as u16;
                    m &= u32::from(e.perm) | !0o007;
                }
                Tag::Mask => {
                    mask = Some(i);
                    equivalent = false;
                }
            }
        }
        if let Some(i) = mask.or(group_obj) {
            let e = &mut self.entries[i];
            e.perm &= ((m >> 3) & 7) as u16;
            m &= (u32::from(e.perm) << 3) | !0o070;
        }
        ((mode & !0o777) | m, !equivalent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(Tag, u16, u32)]) -> Acl {
        Acl {
            entries: entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect(),
        }
    }

    fn base(u: u16, g: u16, o: u16) -> Acl {
        acl(&[
            (Tag::UserObj, u, UNDEFINED_ID),
            (Tag::GroupObj, g, UNDEFINED_ID),
            (Tag::Other, o, UNDEFINED_ID),
        ])
    }

    #[test]
    fn round_trips_through_the_xattr_format() {
        let a = acl(&[
            (Tag::UserObj, 7, UNDEFINED_ID),
            (Tag::User, 5, 1000),
            (Tag::User, 4, 1001),
            (Tag::GroupObj, 5, UNDEFINED_ID),
            (Tag::Group, 6, 50),
            (Tag::Mask, 7, UNDEFINED_ID),
            (Tag::Other, 0, UNDEFINED_ID),
        ]);
        let raw = a.encode();
        assert_eq!(raw.len(), 4 + 7 * 8);
        assert_eq!(&raw[..4], &[2, 0, 0, 0]);
        assert_eq!(Acl::parse(&raw).unwrap(), Some(a));
        assert_eq!(Acl::parse(&[2, 0, 0, 0]).unwrap(), None);
    }

    #[test]
    fn refuses_malformed_values() {
        let good = base(6, 4, 4).encode();
        assert_eq!(Acl::parse(&good[..7]), Err(AclError::Shape(7)));
        let mut v1 = good.clone();
        v1[0] = 1;
        assert_eq!(Acl::parse(&v1), Err(AclError::Version(1)));
        let mut bad_perm = good.clone();
        bad_perm[6] = 0o10;
        assert_eq!(Acl::parse(&bad_perm), Err(AclError::Perm(0o10)));
        let unordered = acl(&[
            (Tag::GroupObj, 4, UNDEFINED_ID),
            (Tag::UserObj, 6, UNDEFINED_ID),
            (Tag::Other, 4, UNDEFINED_ID),
        ]);
        assert_eq!(Acl::parse(&unordered.encode()), Err(AclError::Order));
        let no_mask = acl(&[
            (Tag::UserObj, 6, UNDEFINED_ID),
            (Tag::User, 6, 7),
            (Tag::GroupObj, 4, UNDEFINED_ID),
            (Tag::Other, 4, UNDEFINED_ID),
        ]);
        assert_eq!(Acl::parse(&no_mask.encode()), Err(AclError::Missing));
        let twice = acl(&[
            (Tag::UserObj, 6, UNDEFINED_ID),
            (Tag::User, 6, 7),
            (Tag::User, 4, 7),
            (Tag::GroupObj, 4, UNDEFINED_ID),
            (Tag::Mask, 6, UNDEFINED_ID),
            (Tag::Other, 4, UNDEFINED_ID),
        ]);
        assert_eq!(Acl::parse(&twice.encode()), Err(AclError::Order));
    }

    #[test]
    fn mode_bits_come_from_the_mask_when_there_is_one() {
        assert_eq!(base(6, 4, 0).mode_bits(), (0o640, true));
        let a = acl(&[
            (Tag::UserObj, 7, UNDEFINED_ID),
            (Tag::User, 7, 1000),
            (Tag::GroupObj, 0, UNDEFINED_ID),
            (Tag::Mask, 5, UNDEFINED_ID),
            (Tag::Other, 1, UNDEFINED_ID),
        ]);
        assert_eq!(a.mode_bits(), (0o751, false));
    }

    #[test]
    fn chmod_rewrites_the_mask_not_the_owning_group() {
        let mut a = acl(&[
            (Tag::UserObj, 7, UNDEFINED_ID),
            (Tag::User, 7, 1000),
            (Tag::GroupObj, 5, UNDEFINED_ID),
            (Tag::Mask, 7, UNDEFINED_ID),
            (Tag::Other, 5, UNDEFINED_ID),
        ]);
        a.chmod(0o640);
        assert_eq!(a.mode_bits(), (0o640, false));
        assert_eq!(a.entries[2].perm, 5, "owning group entry untouched");
        let mut b = base(7, 7, 7);
        b.chmod(0o600);
        assert_eq!(b.mode_bits(), (0o600, true));
    }

    #[test]
    fn inheritance_masks_acl_and_mode_by_each_other() {
        // A default ACL giving user 1000 rwx, the group r-x, others nothing; open(0666).
        let mut a = acl(&[
            (Tag::UserObj, 7, UNDEFINED_ID),
            (Tag::User, 7, 1000),
            (Tag::GroupObj, 5, UNDEFINED_ID),
            (Tag::Mask, 7, UNDEFINED_ID),
            (Tag::Other, 0, UNDEFINED_ID),
        ]);
        let (mode, extended) = a.create_masq(0o100666);
        assert!(extended);
        assert_eq!(mode, 0o100660);
        assert_eq!(a.mode_bits(), (0o660, false));
        assert_eq!(
            a.entries[1].perm, 7,
            "named entries are kept, the mask limits them"
        );
        // A minimal default ACL only restricts the mode.
        let mut b = base(7, 5, 5);
        assert_eq!(b.create_masq(0o40777), (0o40755, false));
    }
}
