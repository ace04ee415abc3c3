//! The brick id file. A brick folder carries `brickfs-brick.id`, written once when the brick is
//! formatted; a daemon refuses a folder without it (an unformatted folder, or the empty mount
//! point of a disk that is not mounted) and a folder whose id is not the one expected.

use crate::error::StoreError;
use brickfs_proto::BrickId;
use std::fs;
use std::io::Write;
use std::path::Path;

/// The id file's name inside a brick folder.
pub const ID_FILE: &str = "brickfs-brick.id";
const HEADER_LINE: &str = "brickfs brick";

/// Reads the id of the brick at `root`, formatting an empty or missing folder when `init` is
/// set. Refuses a non-empty folder without an id file even with `init`: it may hold data of
/// something else.
pub fn load_or_format(root: &Path, init: bool) -> Result<BrickId, StoreError> {
    let id_path = root.join(ID_FILE);
    match fs::read_to_string(&id_path) {
        Ok(text) => {
            return parse(&text).ok_or_else(|| StoreError::BadIdFile {
                path: id_path.clone(),
                detail: "expected 'brickfs brick' then 'id = b<16 hex digits>'".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError::Io {
                op: "read brick id file",
                path: id_path,
                source,
            });
        }
    }
    let empty = match fs::read_dir(root) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(source) => {
            return Err(StoreError::Io {
                op: "list brick folder",
                path: root.to_path_buf(),
                source,
            });
        }
    };
    if !init {
        return Err(StoreError::NotFormatted {
            path: root.to_path_buf(),
            detail: if empty {
                "no brick id file: the folder is not a brick, or its disk is not mounted; \
                 pass --init to format an empty folder"
                    .into()
            } else {
                "no brick id file and the folder is not empty: refusing to use it".into()
            },
        });
    }
    if !empty {
        return Err(StoreError::NotFormatted {
            path: root.to_path_buf(),
            detail: "cannot format a folder that is not empty".into(),
        });
    }
    let id = BrickId(rand::random::<u64>().max(1));
    write_id_file(root, id)?;
    tracing::info!(brick = %id, path = %root.display(), "formatted a new brick");
    Ok(id)
}

fn parse(text: &str) -> Option<BrickId> {
    let mut lines = text.lines();
    if lines.next()?.trim() != HEADER_LINE {
        return None;
    }
    let line = lines.next()?;
    let (name, value) = line.split_once('=')?;
    if name.trim() != "id" {
        return None;
    }
    BrickId::parse(value.trim())
}

fn write_id_file(root: &Path, id: BrickId) -> Result<(), StoreError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    };
    fs::create_dir_all(root).map_err(io("create brick folder", root))?;
    let tmp = root.join(format!("{ID_FILE}.tmp"));
    let mut file = fs::File::create(&tmp).map_err(io("create brick id file", &tmp))?;
    file.write_all(format!("{HEADER_LINE}\nid = {id}\n").as_bytes())
        .map_err(io("write brick id file", &tmp))?;
    file.sync_all().map_err(io("sync brick id file", &tmp))?;
    let final_path = root.join(ID_FILE);
    fs::rename(&tmp, &final_path).map_err(io("rename brick id file", &final_path))?;
    crate::store::sync_dir(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_only_empty_folders_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let brick = dir.path().join("b1");
        assert!(matches!(
            load_or_format(&brick, false),
            Err(StoreError::NotFormatted { .. })
        ));
        let id = load_or_format(&brick, true).unwrap();
        assert_eq!(load_or_format(&brick, false).unwrap(), id);

        let other = dir.path().join("b2");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("stray"), b"x").unwrap();
        assert!(matches!(
            load_or_format(&other, true),
            Err(StoreError::NotFormatted { .. })
        ));

        fs::write(brick.join(ID_FILE), b"garbage").unwrap();
        assert!(matches!(
            load_or_format(&brick, false),
            Err(StoreError::BadIdFile { .. })
        ));
    }
}
