//! Elasticity in the state machine: adding and draining stripe groups, rebalance runs and the
//! bookkeeping of files moving between groups (`M`: moves in progress, `Q`: the groups a file
//! moved away from, whose bricks keep seals for it until it is deleted).

use super::*;
use brickfs_layout::BrickAddr;
use brickfs_proto::meta::{FileMove, FileSpot, Rebalance, RebalanceProgress, RebalanceState};

pub(super) fn move_key(v: VolumeId, ino: Ino) -> Vec<u8> {
    [b"M".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
}

/// Moves given up whose source may still be frozen (`AbortMove` until `ForgetMove`).
pub(super) fn abandoned_key(v: VolumeId, ino: Ino) -> Vec<u8> {
    [b"A".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
}

/// Finished moves whose source may still hold data (`FinishMove` until `DroppedMove`).
pub(super) fn dropping_key(v: VolumeId, ino: Ino) -> Vec<u8> {
    [b"P".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
}

pub(super) fn moved_from_key(v: VolumeId, ino: Ino) -> Vec<u8> {
    [b"Q".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
}

/// Parses `HOST:PORT:/PATH` words, refusing repeats.
fn parse_bricks(words: &[String]) -> Res<Vec<BrickAddr>> {
    let mut out: Vec<BrickAddr> = Vec::with_capacity(words.len());
    for w in words {
        let b = BrickAddr::parse(w).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        if out.contains(&b) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("brick {b} is named twice"),
            ));
        }
        out.push(b);
    }
    if out.is_empty() {
        return Err(err(ErrorCode::InvalidArgument, "no bricks given"));
    }
    Ok(out)
}

/// The spec words and type of a volume after its bricks changed: the keywords as before, the
/// bricks of its live sets in set order.
fn respec(v: &mut VolumeRecord) -> Res<()> {
    let mut words: Vec<String> = v
        .spec
        .iter()
        .take_while(|w| !w.contains(":/"))
        .cloned()
        .collect();
    for set in &v.sets {
        for m in &set.members {
            if let Some(b) = v.bricks.iter().find(|b| b.brick == *m) {
                words.push(b.addr.clone());
            }
        }
    }
    let spec = VolumeSpec::parse(&words.iter().map(String::as_str).collect::<Vec<_>>())
        .map_err(|e| internal(format!("volume spec after the change: {e}")))?;
    v.type_name = spec.volume_type().name().to_string();
    v.spec = spec.to_words();
    Ok(())
}

/// Files of volume `v` living in (or moving to or from) one of `groups`: how many and the
/// first few inode numbers.
fn files_in_groups(kv: &impl KvRead, v: VolumeId, groups: &[u32]) -> Res<(u64, Vec<Ino>)> {
    let mut n = 0;
    let mut some = Vec::new();
    let mut note = |ino: Ino| {
        n += 1;
        if some.len() < 5 {
            some.push(ino);
        }
    };
    let prefix = [b"I".as_slice(), &v.0.to_be_bytes()].concat();
    for (_, raw) in kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
        let InodeRecord::V1(i) = dec(&raw)?;
        if i.attr.kind == FileKind::File && groups.contains(&i.attr.group) {
            note(i.attr.ino);
        }
    }
    for table in [b"M", b"A", b"P"] {
        let prefix = [table.as_slice(), &v.0.to_be_bytes()].concat();
        for (_, raw) in kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
            let m: FileMove = dec(&raw)?;
            if groups.contains(&m.from) || groups.contains(&m.to) {
                note(m.ino);
            }
        }
    }
    let prefix = [b"G".as_slice(), &v.0.to_be_bytes()].concat();
    for (k, raw) in kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
        let (_, group, _) = dec_gc(&raw)?;
        if groups.contains(&group) {
            note(volume_ino(&k[1..]).map_or(Ino(0), |(_, i)| i));
        }
    }
    Ok((n, some))
}

/// Reads a GC record of either format: size, group, groups moved from.
pub(super) fn dec_gc(raw: &[u8]) -> Res<(u64, u32, Vec<u32>)> {
    Ok(match dec::<GcRecord>(raw)? {
        GcRecord::V1 { size_bytes, group } => (size_bytes, group, Vec::new()),
        GcRecord::V2 {
            size_bytes,
            group,
            moved_from,
        } => (size_bytes, group, moved_from),
    })
}

impl<B: KvRead> Applier<'_, '_, B> {
    /// Resolves bricks named `HOST:PORT:/PATH` to registered bricks in no volume.
    pub(super) fn resolve_free_bricks(&self, addrs: &[BrickAddr]) -> Res<Vec<VolumeBrick>> {
        let nodes: Vec<NodeRecord> = scan_all(self.kv, b"N")?;
        let bricks: Vec<BrickRecord> = scan_all(self.kv, b"B")?;
        let volumes: Vec<VolumeRecord> = scan_all(self.kv, b"V")?;
        let mut resolved = Vec::with_capacity(addrs.len());
        for b in addrs {
            let node = nodes.iter().find(|n| n.addr == b.host).ok_or_else(|| {
                err(
                    ErrorCode::NotFound,
                    format!(
                        "node {} is not a peer (brickfs peer add {})",
                        b.host, b.host
                    ),
                )
            })?;
            let brick = bricks
                .iter()
                .find(|r| r.node == node.id && r.path == b.path)
                .ok_or_else(|| {
                    err(
                        ErrorCode::NotFound,
                        format!("node {} serves no brick at {}", b.host, b.path),
                    )
                })?;
            if let Some(v) = volumes
                .iter()
                .find(|v| v.bricks.iter().any(|vb| vb.brick == brick.id))
            {
                return Err(super::brick_taken(b, v));
            }
            resolved.push(VolumeBrick {
                brick: brick.id,
                node: node.id,
                addr: b.to_string(),
            });
        }
        Ok(resolved)
    }

    pub(super) fn elastic(&mut self, op: &MetaOp) -> Res<MetaReply> {
        match op {
            MetaOp::AddBricks { name, bricks } => self.add_bricks(name, bricks),
            MetaOp::RemoveBricksStart { name, bricks } => self.remove_bricks_start(name, bricks),
            MetaOp::RemoveBricksStop { name } => {
                let mut v = volume_by_name(self.kv, name)?;
                if v.draining.is_empty() {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("volume {name} has no remove-brick in progress"),
                    ));
                }
                v.draining.clear();
                if let Some(r) = &mut v.rebalance
                    && r.drain_only
                    && r.state == RebalanceState::Running
                {
                    r.state = RebalanceState::Stopped;
                }
                tracing::info!(volume = %name, "remove-brick stopped; its groups take files again");
                self.kv.put(keys::volume(v.id), enc(&v));
                Ok(MetaReply::Volume(v))
            }
            MetaOp::RemoveBricksCommit { name } => self.remove_bricks_commit(name),
            MetaOp::RebalanceStart { name } => {
                let v = volume_by_name(self.kv, name)?;
                self.start_rebalance(v, false)
            }
            MetaOp::RebalanceStop { name } => {
                let mut v = volume_by_name(self.kv, name)?;
                match &mut v.rebalance {
                    Some(r) if r.state == RebalanceState::Running => {
                        r.state = RebalanceState::Stopped;
                        r.updated_ns = self.now_ns;
                    }
                    _ => {
                        return Err(err(
                            ErrorCode::InvalidArgument,
                            format!("volume {name} has no rebalance running"),
                        ));
                    }
                }
                tracing::info!(volume = %name, "rebalance stopped");
                self.kv.put(keys::volume(v.id), enc(&v));
                Ok(MetaReply::Volume(v))
            }
            MetaOp::RebalanceReport {
                volume,
                run,
                progress,
                done,
            } => {
                let mut v = check_volume(self.kv, *volume)?;
                if let Some(r) = &mut v.rebalance
                    && r.run == *run
                    && r.state == RebalanceState::Running
                {
                    r.progress = progress.clone();
                    r.updated_ns = self.now_ns;
                    if *done {
                        r.state = RebalanceState::Done;
                        tracing::info!(volume = %v.name, run, moved = progress.moved, bytes = progress.moved_bytes, "rebalance done");
                    }
                    self.kv.put(keys::volume(v.id), enc(&v));
                }
                Ok(MetaReply::Done)
            }
            MetaOp::BeginMove { volume, file } => self.begin_move(*volume, file),
            MetaOp::FinishMove { volume, file } => {
                self.take_move(*volume, file)?;
                let mut i = load_inode(self.kv, *volume, file.ino)?;
                i.attr.group = file.to;
                self.put_inode(*volume, &i);
                let key = moved_from_key(*volume, file.ino);
                let mut from: Vec<u32> = get(self.kv, &key)?.unwrap_or_default();
                from.retain(|g| *g != file.to && *g != file.from);
                from.push(file.from);
                self.kv.put(key, enc(&from));
                self.kv.put(dropping_key(*volume, file.ino), enc(file));
                Ok(MetaReply::Attr(i.attr))
            }
            MetaOp::AbortMove { volume, file } => {
                self.take_move(*volume, file)?;
                self.kv.put(abandoned_key(*volume, file.ino), enc(file));
                Ok(MetaReply::Done)
            }
            MetaOp::ForgetMove { volume, file } | MetaOp::DroppedMove { volume, file } => {
                let key = match op {
                    MetaOp::ForgetMove { .. } => abandoned_key(*volume, file.ino),
                    _ => dropping_key(*volume, file.ino),
                };
                match get::<FileMove>(self.kv, &key)? {
                    Some(m) if m == *file => {
                        self.kv.delete(key);
                        Ok(MetaReply::Done)
                    }
                    _ => Err(err(
                        ErrorCode::NotFound,
                        format!("no such move of inode {} to clean up", file.ino),
                    )),
                }
            }
            other => Err(internal(format!("not an elasticity op: {other:?}"))),
        }
    }

    fn add_bricks(&mut self, name: &str, words: &[String]) -> Res<MetaReply> {
        let mut v = volume_by_name(self.kv, name)?;
        let addrs = parse_bricks(words)?;
        let width = v.set_width();
        let group = width * v.group_width();
        if !addrs.len().is_multiple_of(group) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "{} bricks do not make whole stripe groups: volume {name} adds them {group} at a time (stripe {} x set width {width})",
                    addrs.len(),
                    v.group_width()
                ),
            ));
        }
        if v.bricks.len() + addrs.len() > brickfs_layout::spec::BRICKS_MAX {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "a volume has at most {} bricks",
                    brickfs_layout::spec::BRICKS_MAX
                ),
            ));
        }
        let resolved = self.resolve_free_bricks(&addrs)?;
        let first_group = v.groups();
        for members in resolved.chunks(width) {
            let ids: Vec<_> = members.iter().map(|b| b.brick).collect();
            v.sets.push(SetState {
                primary: ids[0],
                in_sync: ids.clone(),
                members: ids,
                epoch: Epoch(1),
                full_heal: Vec::new(),
                draining: None,
            });
        }
        v.bricks.extend(resolved);
        respec(&mut v)?;
        tracing::info!(volume = %name, bricks = addrs.len(), groups = %format!("{first_group}..{}", v.groups()), kind = %v.type_name, "bricks added");
        self.kv.put(keys::volume(v.id), enc(&v));
        Ok(MetaReply::Volume(v))
    }

    /// The groups that hold exactly the bricks named (every brick of each).
    fn whole_groups(v: &VolumeRecord, words: &[String]) -> Res<Vec<u32>> {
        let addrs = parse_bricks(words)?;
        let mut ids = Vec::new();
        for a in &addrs {
            let b = v
                .bricks
                .iter()
                .find(|b| b.addr == a.to_string())
                .ok_or_else(|| {
                    err(
                        ErrorCode::NotFound,
                        format!("brick {a} is not in volume {}", v.name),
                    )
                })?;
            ids.push(b.brick);
        }
        let s = v.group_width();
        let mut groups = Vec::new();
        for id in &ids {
            let set = v
                .sets
                .iter()
                .position(|x| x.members.contains(id))
                .ok_or_else(|| internal("brick in no set"))?;
            let g = (set / s) as u32;
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        for g in &groups {
            let missing: Vec<String> = v.sets[*g as usize * s..(*g as usize + 1) * s]
                .iter()
                .flat_map(|x| x.members.iter())
                .filter(|m| !ids.contains(m))
                .filter_map(|m| v.bricks.iter().find(|b| b.brick == *m))
                .map(|b| b.addr.clone())
                .collect();
            if !missing.is_empty() {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!(
                        "remove-brick takes whole stripe groups: group {g} also holds {}",
                        missing.join(" ")
                    ),
                ));
            }
        }
        groups.sort_unstable();
        Ok(groups)
    }

    fn remove_bricks_start(&mut self, name: &str, words: &[String]) -> Res<MetaReply> {
        let mut v = volume_by_name(self.kv, name)?;
        if v.status != VolumeStatus::Started {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("volume {name} is not started: its files cannot move"),
            ));
        }
        let groups = Self::whole_groups(&v, words)?;
        let mut draining = v.draining.clone();
        draining.extend(groups.iter().copied());
        draining.sort_unstable();
        draining.dedup();
        let left = (0..v.groups())
            .filter(|g| !v.retired(*g) && !draining.contains(&(*g as u32)))
            .count();
        if left == 0 {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("removing these bricks would leave volume {name} no stripe group"),
            ));
        }
        v.draining = draining;
        tracing::info!(volume = %name, groups = ?groups, "remove-brick started: draining");
        let running = v
            .rebalance
            .as_ref()
            .is_some_and(|r| r.state == RebalanceState::Running);
        if running {
            // A running rebalance moves files off draining groups too.
            self.kv.put(keys::volume(v.id), enc(&v));
            return Ok(MetaReply::Volume(v));
        }
        self.start_rebalance(v, true)
    }

    fn remove_bricks_commit(&mut self, name: &str) -> Res<MetaReply> {
        let mut v = volume_by_name(self.kv, name)?;
        if v.draining.is_empty() {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("volume {name} has no remove-brick in progress (remove-brick ... start)"),
            ));
        }
        let (n, some) = files_in_groups(self.kv, v.id, &v.draining)?;
        if n > 0 {
            return Err(err(
                ErrorCode::NotEmpty,
                format!(
                    "{n} files still live in, move through or wait for removal from groups {:?} (inodes {some:?}...): see remove-brick status",
                    v.draining
                ),
            ));
        }
        let s = v.group_width();
        let mut freed = Vec::new();
        for g in std::mem::take(&mut v.draining) {
            for set in &mut v.sets[g as usize * s..(g as usize + 1) * s] {
                freed.append(&mut set.members);
                set.in_sync.clear();
                set.full_heal.clear();
                set.primary = brickfs_proto::BrickId(0);
                set.epoch = Epoch(set.epoch.0 + 1);
            }
        }
        let freed_addrs: Vec<String> = v
            .bricks
            .iter()
            .filter(|b| freed.contains(&b.brick))
            .map(|b| b.addr.clone())
            .collect();
        v.bricks.retain(|b| !freed.contains(&b.brick));
        respec(&mut v)?;
        if let Some(r) = &mut v.rebalance
            && r.drain_only
            && r.state == RebalanceState::Running
        {
            r.state = RebalanceState::Done;
        }
        tracing::info!(volume = %name, bricks = ?freed_addrs, kind = %v.type_name, "remove-brick committed: the bricks are free");
        self.kv.put(keys::volume(v.id), enc(&v));
        Ok(MetaReply::Volume(v))
    }

    fn start_rebalance(&mut self, mut v: VolumeRecord, drain_only: bool) -> Res<MetaReply> {
        if v.status != VolumeStatus::Started {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("volume {} is not started: start it first", v.name),
            ));
        }
        if let Some(r) = &v.rebalance
            && r.state == RebalanceState::Running
        {
            return Err(err(
                ErrorCode::Exists,
                format!(
                    "volume {} already has a rebalance running (brickfs volume rebalance {} stop)",
                    v.name, v.name
                ),
            ));
        }
        let run = v.rebalance.as_ref().map_or(0, |r| r.run) + 1;
        v.rebalance = Some(Box::new(Rebalance {
            run,
            state: RebalanceState::Running,
            drain_only,
            progress: RebalanceProgress::default(),
            started_ns: self.now_ns,
            updated_ns: self.now_ns,
        }));
        tracing::info!(volume = %v.name, run, drain_only, "rebalance started");
        self.kv.put(keys::volume(v.id), enc(&v));
        Ok(MetaReply::Volume(v))
    }

    fn begin_move(&mut self, volume: VolumeId, file: &FileMove) -> Res<MetaReply> {
        for key in [
            abandoned_key(volume, file.ino),
            dropping_key(volume, file.ino),
        ] {
            if get::<FileMove>(self.kv, &key)?.is_some() {
                return Err(err(
                    ErrorCode::Busy,
                    format!("inode {}: its last move is not cleaned up yet", file.ino),
                ));
            }
        }
        let v = check_volume(self.kv, volume)?;
        if file.from == file.to
            || !v.takes_files(file.to as usize)
            || file.to as usize >= v.groups()
        {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "group {} takes no files (moving from {})",
                    file.to, file.from
                ),
            ));
        }
        let i = load_inode(self.kv, volume, file.ino)?;
        if i.attr.kind != FileKind::File || i.attr.group != file.from {
            return Err(err(
                ErrorCode::StaleRequest,
                format!("inode {} is not a file in group {}", file.ino, file.from),
            ));
        }
        let key = move_key(volume, file.ino);
        if let Some(m) = get::<FileMove>(self.kv, &key)? {
            return Err(err(
                ErrorCode::Busy,
                format!("inode {} is already moving ({} to {})", m.ino, m.from, m.to),
            ));
        }
        self.kv.put(key, enc(file));
        Ok(MetaReply::Done)
    }

    /// Ends a move in progress: it must be this one.
    fn take_move(&mut self, volume: VolumeId, file: &FileMove) -> Res<()> {
        let key = move_key(volume, file.ino);
        match get::<FileMove>(self.kv, &key)? {
            Some(m) if m == *file => {
                self.kv.delete(key);
                Ok(())
            }
            _ => Err(err(
                ErrorCode::NotFound,
                format!(
                    "no move of inode {} from group {} to {} is in progress",
                    file.ino, file.from, file.to
                ),
            )),
        }
    }
}

/// `MetaRead::Files`: regular files after `after` in inode order.
pub(super) fn read_files(kv: &impl KvRead, v: VolumeId, after: Ino, limit: u32) -> Res<MetaReply> {
    check_volume(kv, v)?;
    let prefix = [b"I".as_slice(), &v.0.to_be_bytes()].concat();
    let start = keys::inode(v, after);
    let limit = (limit as usize).clamp(1, READDIR_MAX);
    let page = kv.scan(&prefix, Some(&start), limit).map_err(internal)?;
    let more = page.len() == limit;
    let mut files = Vec::new();
    let mut last = after;
    for (_, raw) in page {
        let InodeRecord::V1(i) = dec(&raw)?;
        last = i.attr.ino;
        if i.attr.kind == FileKind::File {
            files.push(FileSpot {
                ino: i.attr.ino,
                group: i.attr.group,
                size_bytes: i.attr.size_bytes,
            });
        }
    }
    Ok(MetaReply::Files {
        files,
        next: more.then_some(last),
    })
}

/// `MetaRead::Moves`: the moves in progress and the abandoned ones not cleaned up.
pub(super) fn read_moves(kv: &impl KvRead, v: VolumeId) -> Res<MetaReply> {
    let list = |table: &[u8]| -> Res<Vec<FileMove>> {
        let prefix = [table, &v.0.to_be_bytes()].concat();
        let mut out = Vec::new();
        for (_, raw) in kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
            out.push(dec::<FileMove>(&raw)?);
        }
        Ok(out)
    };
    Ok(MetaReply::Moves {
        moving: list(b"M")?,
        abandoned: list(b"A")?,
        dropping: list(b"P")?,
    })
}
