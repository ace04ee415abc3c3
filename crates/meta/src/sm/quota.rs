//! Directory quotas (`U` keys): a directory with a limit counts the bytes of the regular files
//! below it — their size, charged to the directory a file was created in or last renamed to
//! (`InodeV1::parent`; a hard link elsewhere is not charged again) and every directory above.
//! A change that would take a directory past its limit is refused with `QuotaExceeded`
//! (EDQUOT); shrinking and removing are never refused.

use super::*;
use brickfs_proto::meta::QuotaInfo;

pub(super) fn quota_key(v: VolumeId, dir: Ino) -> Vec<u8> {
    [b"U".as_slice(), &v.0.to_be_bytes(), &dir.0.to_be_bytes()].concat()
}

fn quota_prefix(v: VolumeId) -> Vec<u8> {
    [b"U".as_slice(), &v.0.to_be_bytes()].concat()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum QuotaRecord {
    V1 {
        limit_bytes: u64,
        used_bytes: u64,
        /// The path it was set on, for listing.
        path: String,
    },
}

/// Whether the volume has any quota (one seek).
fn any_quota(kv: &impl KvRead, v: VolumeId) -> Res<bool> {
    Ok(!kv
        .scan(&quota_prefix(v), None, 1)
        .map_err(internal)?
        .is_empty())
}

impl<B: KvRead> Applier<'_, '_, B> {
    /// The directories with a quota at and above `dir` (none when `dir` is unknown, 0).
    fn quota_chain(&self, v: VolumeId, dir: Ino) -> Res<Vec<(Ino, QuotaRecord)>> {
        if dir == Ino(0) || !any_quota(self.kv, v)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut d = dir;
        for _ in 0..100_000 {
            if let Some(q) = get::<QuotaRecord>(self.kv, &quota_key(v, d))? {
                out.push((d, q));
            }
            if d == ROOT_INO {
                return Ok(out);
            }
            // A directory gone (a hard link's first directory removed) ends the chain.
            match get::<InodeRecord>(self.kv, &keys::inode(v, d))? {
                Some(InodeRecord::V1(i)) => d = i.parent,
                None => return Ok(out),
            }
        }
        Err(internal("directory tree has a cycle"))
    }

    /// Adds `delta` bytes to every quota at and above `dir`; a growth that takes one past its
    /// limit is refused (nothing changes).
    pub(super) fn charge(&mut self, v: VolumeId, dir: Ino, delta: i128) -> Res<()> {
        if delta == 0 {
            return Ok(());
        }
        let chain = self.quota_chain(v, dir)?;
        for (
            _,
            QuotaRecord::V1 {
                limit_bytes,
                used_bytes,
                path,
            },
        ) in &chain
        {
            if delta > 0 && i128::from(*used_bytes) + delta > i128::from(*limit_bytes) {
                return Err(err(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "directory {path} would hold {} bytes, over its quota of {limit_bytes}",
                        i128::from(*used_bytes) + delta
                    ),
                ));
            }
        }
        for (
            d,
            QuotaRecord::V1 {
                limit_bytes,
                used_bytes,
                path,
            },
        ) in chain
        {
            let used = (i128::from(used_bytes) + delta).clamp(0, i128::from(u64::MAX)) as u64;
            let rec = QuotaRecord::V1 {
                limit_bytes,
                used_bytes: used,
                path,
            };
            self.kv.put(quota_key(v, d), enc(&rec));
        }
        Ok(())
    }

    /// Moves the bytes an entry stands for (a file's size, a directory's whole tree) from
    /// the quotas above `from` to those above `to` (a rename).
    pub(super) fn move_charge(
        &mut self,
        v: VolumeId,
        entry: &InodeV1,
        from: Ino,
        to: Ino,
    ) -> Res<()> {
        if from == to || !any_quota(self.kv, v)? {
            return Ok(());
        }
        let bytes = match entry.attr.kind {
            FileKind::File => i128::from(entry.attr.size_bytes),
            FileKind::Dir => i128::from(self.tree_bytes(v, entry.attr.ino, false)?),
            _ => 0,
        };
        self.charge(v, from, -bytes)?;
        self.charge(v, to, bytes)
    }

    /// The bytes of the regular files in the tree under `dir` (each inode once). With `adopt`,
    /// files whose charged directory is unknown (made before quotas kept it) are given the one
    /// they are found in.
    fn tree_bytes(&mut self, v: VolumeId, dir: Ino, adopt: bool) -> Res<u64> {
        let mut total = 0u64;
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let prefix = keys::dir_prefix(v, d);
            for (_, raw) in self.kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
                let e: DentryV1 = dec(&raw)?;
                match e.kind {
                    FileKind::Dir => stack.push(e.ino),
                    FileKind::File if seen.insert(e.ino) => {
                        let mut i = load_inode(self.kv, v, e.ino)?;
                        total = total.saturating_add(i.attr.size_bytes);
                        if adopt && i.parent == Ino(0) {
                            i.parent = d;
                            self.put_inode(v, &i);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(total)
    }

    /// `MetaOp::SetQuota`: sets (or with `None` removes) the limit of directory `dir`.
    pub(super) fn set_quota(
        &mut self,
        v: VolumeId,
        dir: Ino,
        path: &str,
        limit: Option<u64>,
    ) -> Res<MetaReply> {
        load_dir(self.kv, v, dir)?;
        let key = quota_key(v, dir);
        match limit {
            Some(limit_bytes) => {
                let used_bytes = match get::<QuotaRecord>(self.kv, &key)? {
                    Some(QuotaRecord::V1 { used_bytes, .. }) => used_bytes,
                    None => self.tree_bytes(v, dir, true)?,
                };
                let rec = QuotaRecord::V1 {
                    limit_bytes,
                    used_bytes,
                    path: path.to_string(),
                };
                self.kv.put(key, enc(&rec));
                tracing::info!(volume = %v, %dir, path, limit_bytes, used_bytes, "directory quota set");
            }
            None => {
                if get::<QuotaRecord>(self.kv, &key)?.is_none() {
                    return Err(err(ErrorCode::NotFound, format!("{path} has no quota")));
                }
                self.kv.delete(key);
                tracing::info!(volume = %v, %dir, path, "directory quota removed");
            }
        }
        // The `quota` option tells clients to commit sizes before they write past the end.
        let mut vol = check_volume(self.kv, v)?;
        vol.options.retain(|(k, _)| k != "quota");
        if any_quota(self.kv, v)? {
            vol.options.push(("quota".into(), "on".into()));
            vol.options.sort();
        }
        self.kv.put(keys::volume(v), enc(&vol));
        Ok(MetaReply::Done)
    }
}

/// `MetaRead::Quotas`.
pub(super) fn read_quotas(kv: &impl KvRead, v: VolumeId) -> Res<MetaReply> {
    let mut out = Vec::new();
    for (k, raw) in kv
        .scan(&quota_prefix(v), None, usize::MAX)
        .map_err(internal)?
    {
        let QuotaRecord::V1 {
            limit_bytes,
            used_bytes,
            path,
        } = dec(&raw)?;
        let dir = volume_ino(&k[1..]).map_or(Ino(0), |(_, i)| i);
        out.push(QuotaInfo {
            dir,
            path,
            limit_bytes,
            used_bytes,
        });
    }
    Ok(MetaReply::Quotas(out))
}
