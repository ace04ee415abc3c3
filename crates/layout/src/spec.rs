//! The volume spec grammar, as GlusterFS has it:
//!
//! ```text
//! [stripe S] [replica R | disperse N redundancy M] HOST:/PATH ...
//! ```
//!
//! Consecutive bricks form sets of width R (replica), N = K+M (disperse) or 1; S consecutive
//! sets form a stripe group; the volume distributes over D = bricks / (S × width) groups.

use std::fmt;

/// Most bricks in one volume.
pub const BRICKS_MAX: usize = 4096;
pub const STRIPE_MAX: u32 = 256;
pub const REPLICA_MAX: u32 = 16;
pub const DISPERSE_MAX: u32 = 64;

/// Why a spec was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("expected a number after '{keyword}', got {got:?}")]
    BadNumber { keyword: &'static str, got: String },
    #[error("'{keyword}' given twice")]
    Repeated { keyword: &'static str },
    #[error("'{keyword}' must come before the bricks (order: stripe, replica or disperse, bricks)")]
    OutOfOrder { keyword: &'static str },
    #[error("{0}")]
    Invalid(String),
    #[error("brick {0:?} is not HOST:/ABSOLUTE/PATH")]
    BadBrick(String),
    #[error("brick {0} appears more than once")]
    DuplicateBrick(String),
    #[error("no bricks given")]
    NoBricks,
    #[error("{bricks} bricks cannot be split into stripe groups of {group} ({what})")]
    NotDivisible {
        bricks: usize,
        group: usize,
        what: String,
    },
}

/// Parses a size such as `4096`, `64KiB`, `16MiB`, `1GiB` (also `K`, `M`, `G`, `T`, `KB`,
/// `MB`, ..., all binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} does not start with a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// One brick of a spec: a node's host (and port) and the brick's folder.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrickAddr {
    pub host: String,
    pub path: String,
}

impl fmt::Display for BrickAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.path)
    }
}

impl BrickAddr {
    /// Parses `HOST:/PATH` (the host may carry a port: `HOST:PORT:/PATH`, or `[::1]:PORT:/PATH`).
    pub fn parse(text: &str) -> Result<BrickAddr, SpecError> {
        let bad = || SpecError::BadBrick(text.to_string());
        let idx = text.find(":/").ok_or_else(bad)?;
        let (host, path) = (&text[..idx], &text[idx + 1..]);
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        let rest = path.strip_prefix('/').ok_or_else(bad)?;
        if rest.is_empty()
            || path.len() > 4096
            || path.contains('\0')
            || rest
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad());
        }
        Ok(BrickAddr {
            host: host.to_string(),
            path: path.to_string(),
        })
    }
}

/// How a set keeps its columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redundancy {
    /// One brick per set.
    None,
    /// R full copies.
    Replica(u32),
    /// K data + M redundancy fragments (Reed-Solomon).
    Disperse { data: u32, redundancy: u32 },
}

/// The nine volume types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeType {
    Distributed,
    Replicated,
    Striped,
    DistributedStriped,
    DistributedReplicated,
    DistributedStripedReplicated,
    StripedReplicated,
    Dispersed,
    DistributedDispersed,
}

impl VolumeType {
    pub fn name(self) -> &'static str {
        match self {
            VolumeType::Distributed => "distributed",
            VolumeType::Replicated => "replicated",
            VolumeType::Striped => "striped",
            VolumeType::DistributedStriped => "distributed-striped",
            VolumeType::DistributedReplicated => "distributed-replicated",
            VolumeType::DistributedStripedReplicated => "distributed-striped-replicated",
            VolumeType::StripedReplicated => "striped-replicated",
            VolumeType::Dispersed => "dispersed",
            VolumeType::DistributedDispersed => "distributed-dispersed",
        }
    }
}

/// A validated volume spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// S: sets per stripe group (1 when not striped).
    pub stripe: u32,
    pub redundancy: Redundancy,
    pub bricks: Vec<BrickAddr>,
}

fn number(keyword: &'static str, word: Option<&&str>) -> Result<u32, SpecError> {
    let got = word.copied().unwrap_or("");
    got.parse::<u32>().map_err(|_| SpecError::BadNumber {
        keyword,
        got: got.to_string(),
    })
}

impl VolumeSpec {
    /// Parses the words after the volume name.
    pub fn parse(words: &[&str]) -> Result<VolumeSpec, SpecError> {
        let mut stripe = None;
        let mut replica = None;
        let mut disperse = None;
        let mut redundancy = None;
        let mut i = 0;
        while i < words.len() {
            let keyword: &'static str = match words[i] {
                "stripe" => "stripe",
                "replica" => "replica",
                "disperse" => "disperse",
                "redundancy" => "redundancy",
                _ => break,
            };
            let n = number(keyword, words.get(i + 1))?;
            let slot = match keyword {
                "stripe" => {
                    if replica.is_some() || disperse.is_some() {
                        return Err(SpecError::OutOfOrder { keyword });
                    }
                    &mut stripe
                }
                "replica" => &mut replica,
                "disperse" => &mut disperse,
                _ => &mut redundancy,
            };
            if slot.replace(n).is_some() {
                return Err(SpecError::Repeated { keyword });
            }
            i += 2;
        }
        let mut bricks = Vec::new();
        for w in &words[i..] {
            if matches!(*w, "stripe" | "replica" | "disperse" | "redundancy") {
                return Err(SpecError::OutOfOrder {
                    keyword: match *w {
                        "stripe" => "stripe",
                        "replica" => "replica",
                        "disperse" => "disperse",
                        _ => "redundancy",
                    },
                });
            }
            let b = BrickAddr::parse(w)?;
            if bricks.contains(&b) {
                return Err(SpecError::DuplicateBrick(b.to_string()));
            }
            bricks.push(b);
        }
        let stripe = match stripe {
            None => 1,
            Some(s) if (2..=STRIPE_MAX).contains(&s) => s,
            Some(s) => {
                return Err(SpecError::Invalid(format!(
                    "stripe count {s} must be 2 to {STRIPE_MAX}"
                )));
            }
        };
        let redundancy = match (replica, disperse, redundancy) {
            (Some(_), Some(_), _) => {
                return Err(SpecError::Invalid(
                    "replica and disperse cannot be combined".into(),
                ));
            }
            (Some(r), None, None) => {
                if !(2..=REPLICA_MAX).contains(&r) {
                    return Err(SpecError::Invalid(format!(
                        "replica count {r} must be 2 to {REPLICA_MAX}"
                    )));
                }
                Redundancy::Replica(r)
            }
            (_, None, Some(_)) => {
                return Err(SpecError::Invalid("redundancy needs disperse".into()));
            }
            (None, Some(n), m) => {
                if stripe > 1 {
                    return Err(SpecError::Invalid(
                        "stripe and disperse cannot be combined".into(),
                    ));
                }
                if !(3..=DISPERSE_MAX).contains(&n) {
                    return Err(SpecError::Invalid(format!(
                        "disperse count {n} must be 3 to {DISPERSE_MAX}"
                    )));
                }
                // GlusterFS's default redundancy: the largest M with 2M < N.
                let m = m.unwrap_or((n - 1) / 2);
                if m < 1 || 2 * m >= n {
                    return Err(SpecError::Invalid(format!(
                        "redundancy {m} must be at least 1 and less than half of disperse {n}"
                    )));
                }
                Redundancy::Disperse {
                    data: n - m,
                    redundancy: m,
                }
            }
            (None, None, None) => Redundancy::None,
        };
        if bricks.is_empty() {
            return Err(SpecError::NoBricks);
        }
        if bricks.len() > BRICKS_MAX {
            return Err(SpecError::Invalid(format!("more than {BRICKS_MAX} bricks")));
        }
        let spec = VolumeSpec {
            stripe,
            redundancy,
            bricks,
        };
        let group = spec.group_width();
        if !spec.bricks.len().is_multiple_of(group) {
            return Err(SpecError::NotDivisible {
                bricks: spec.bricks.len(),
                group,
                what: format!("stripe {} × set width {}", spec.stripe, spec.set_width()),
            });
        }
        Ok(spec)
    }

    /// Bricks per set: R, K+M or 1.
    pub fn set_width(&self) -> usize {
        match self.redundancy {
            Redundancy::None => 1,
            Redundancy::Replica(r) => r as usize,
            Redundancy::Disperse { data, redundancy } => (data + redundancy) as usize,
        }
    }

    /// Bricks per stripe group: S × set width.
    pub fn group_width(&self) -> usize {
        self.stripe as usize * self.set_width()
    }

    /// How many sets.
    pub fn sets(&self) -> usize {
        self.bricks.len() / self.set_width()
    }

    /// D: how many stripe groups the volume distributes over.
    pub fn groups(&self) -> usize {
        self.bricks.len() / self.group_width()
    }

    /// The bricks (indices into `bricks`) of set `set`.
    pub fn set_bricks(&self, set: usize) -> std::ops::Range<usize> {
        let w = self.set_width();
        set * w..(set + 1) * w
    }

    /// The set that holds column `column` of stripe group `group`.
    pub fn set_of(&self, group: usize, column: usize) -> usize {
        group * self.stripe as usize + column
    }

    pub fn volume_type(&self) -> VolumeType {
        let distributed = self.groups() > 1;
        match (self.stripe > 1, self.redundancy, distributed) {
            (false, Redundancy::None, _) => VolumeType::Distributed,
            (false, Redundancy::Replica(_), false) => VolumeType::Replicated,
            (false, Redundancy::Replica(_), true) => VolumeType::DistributedReplicated,
            (true, Redundancy::None, false) => VolumeType::Striped,
            (true, Redundancy::None, true) => VolumeType::DistributedStriped,
            (true, Redundancy::Replica(_), false) => VolumeType::StripedReplicated,
            (true, Redundancy::Replica(_), true) => VolumeType::DistributedStripedReplicated,
            (_, Redundancy::Disperse { .. }, false) => VolumeType::Dispersed,
            (_, Redundancy::Disperse { .. }, true) => VolumeType::DistributedDispersed,
        }
    }

    /// The spec back in the grammar (bricks included).
    pub fn to_words(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.stripe > 1 {
            out.extend(["stripe".to_string(), self.stripe.to_string()]);
        }
        match self.redundancy {
            Redundancy::None => {}
            Redundancy::Replica(r) => out.extend(["replica".to_string(), r.to_string()]),
            Redundancy::Disperse { data, redundancy } => out.extend([
                "disperse".to_string(),
                (data + redundancy).to_string(),
                "redundancy".to_string(),
                redundancy.to_string(),
            ]),
        }
        out.extend(self.bricks.iter().map(|b| b.to_string()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bricks(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{}:/b/{i}", i % 3)).collect()
    }

    fn parse(head: &str, n: usize) -> Result<VolumeSpec, SpecError> {
        let owned = bricks(n);
        let mut words: Vec<&str> = head.split_whitespace().collect();
        words.extend(owned.iter().map(String::as_str));
        VolumeSpec::parse(&words)
    }

    /// Each of the nine types, from the spec that makes it.
    #[test]
    fn nine_types() {
        let cases = [
            ("", 1, VolumeType::Distributed),
            ("", 4, VolumeType::Distributed),
            ("replica 3", 3, VolumeType::Replicated),
            ("stripe 4", 4, VolumeType::Striped),
            ("stripe 2", 4, VolumeType::DistributedStriped),
            ("replica 2", 6, VolumeType::DistributedReplicated),
            (
                "stripe 2 replica 2",
                8,
                VolumeType::DistributedStripedReplicated,
            ),
            ("stripe 2 replica 2", 4, VolumeType::StripedReplicated),
            ("disperse 6 redundancy 2", 6, VolumeType::Dispersed),
            ("disperse 3", 6, VolumeType::DistributedDispersed),
        ];
        for (head, n, want) in cases {
            let spec = parse(head, n).unwrap_or_else(|e| panic!("{head} x{n}: {e}"));
            assert_eq!(spec.volume_type(), want, "{head} x{n}");
            let words = spec.to_words();
            let back =
                VolumeSpec::parse(&words.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            assert_eq!(back, spec);
        }
        let d = parse("disperse 6", 6).unwrap();
        assert_eq!(
            d.redundancy,
            Redundancy::Disperse {
                data: 4,
                redundancy: 2
            }
        );
    }

    #[test]
    fn invalid_specs_have_clear_errors() {
        let cases: [(&str, usize, &str); 12] = [
            ("replica 3", 4, "cannot be split"),
            ("replica 1", 2, "replica count 1"),
            ("stripe 1", 2, "stripe count 1"),
            ("disperse 4 redundancy 2", 4, "less than half"),
            ("disperse 6 redundancy 0", 6, "at least 1"),
            ("redundancy 2", 4, "needs disperse"),
            ("replica 2 disperse 4", 4, "cannot be combined"),
            ("stripe 2 disperse 3", 6, "cannot be combined"),
            ("replica two", 2, "expected a number"),
            ("replica 2 replica 2", 2, "given twice"),
            ("replica 2 stripe 2", 4, "before the bricks"),
            ("", 0, "no bricks"),
        ];
        for (head, n, want) in cases {
            let e = parse(head, n).unwrap_err().to_string();
            assert!(e.contains(want), "{head} x{n}: {e}");
        }
        for bad in [
            "h1",
            "h1:b",
            "h1:/",
            ":/b",
            "h1:/a/../b",
            "h1:/a//b",
            "h1:/a/./b",
        ] {
            assert!(
                matches!(VolumeSpec::parse(&[bad]), Err(SpecError::BadBrick(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            VolumeSpec::parse(&["h:/a", "h:/a"]),
            Err(SpecError::DuplicateBrick(_))
        ));
        let a = BrickAddr::parse("127.0.0.1:24100:/srv/b1").unwrap();
        assert_eq!(
            (a.host.as_str(), a.path.as_str()),
            ("127.0.0.1:24100", "/srv/b1")
        );
    }
}
