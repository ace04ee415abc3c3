//! `brickfs volume quota VOL limit-usage PATH SIZE | remove PATH | list`: directory quotas.

use super::{UsageError, print_json};
use anyhow::Context;
use brickfs_client::MetaClient;
use brickfs_proto::meta::{FileKind, MetaOp, MetaRead, MetaReply};
use brickfs_proto::{ErrorCode, Ino};
use serde::Serialize;

/// The directory a volume path names (`/` is the root).
async fn resolve_dir(
    m: &MetaClient,
    volume: brickfs_proto::VolumeId,
    path: &str,
) -> anyhow::Result<Ino> {
    if !path.starts_with('/') {
        return Err(UsageError(format!("{path:?} is not an absolute path in the volume")).into());
    }
    let mut at = Ino(1);
    for name in path.split('/').filter(|c| !c.is_empty()) {
        let attr = match m
            .read(MetaRead::Lookup {
                volume,
                parent: at,
                name: name.to_string(),
            })
            .await
        {
            Ok(MetaReply::Attr(a)) => a,
            Ok(other) => anyhow::bail!("unexpected answer {other:?}"),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                anyhow::bail!("{path}: no such directory in the volume")
            }
            Err(e) => return Err(e).with_context(|| format!("look up {path}")),
        };
        if attr.kind != FileKind::Dir {
            anyhow::bail!("{path}: {name} is not a directory");
        }
        at = attr.ino;
    }
    Ok(at)
}

#[derive(Serialize)]
struct QuotaRow {
    path: String,
    limit_bytes: u64,
    used_bytes: u64,
    available_bytes: u64,
}

pub async fn quota(m: &MetaClient, name: &str, args: &[String], json: bool) -> anyhow::Result<()> {
    let v = super::admin::volume_info(m, name)
        .await
        .with_context(|| format!("get volume {name}"))?;
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let usage =
        || UsageError("quota takes: limit-usage PATH SIZE | remove PATH | list".to_string());
    match words.as_slice() {
        ["limit-usage", path, size] => {
            let limit = brickfs_layout::parse_size(size).map_err(UsageError)?;
            let dir = resolve_dir(m, v.id, path).await?;
            m.write(MetaOp::SetQuota {
                volume: v.id,
                dir,
                path: path.to_string(),
                limit_bytes: Some(limit),
            })
            .await
            .with_context(|| format!("set the quota of {path}"))?;
            println!("volume quota: {name}: {path} limited to {limit} bytes");
        }
        ["remove", path] => {
            let dir = resolve_dir(m, v.id, path).await?;
            m.write(MetaOp::SetQuota {
                volume: v.id,
                dir,
                path: path.to_string(),
                limit_bytes: None,
            })
            .await
            .with_context(|| format!("remove the quota of {path}"))?;
            println!("volume quota: {name}: {path} has no quota now");
        }
        ["list"] => {
            let MetaReply::Quotas(q) = m.read(MetaRead::Quotas { volume: v.id }).await? else {
                anyhow::bail!("unexpected answer to Quotas");
            };
            let rows: Vec<QuotaRow> = q
                .into_iter()
                .map(|q| QuotaRow {
                    available_bytes: q.limit_bytes.saturating_sub(q.used_bytes),
                    path: q.path,
                    limit_bytes: q.limit_bytes,
                    used_bytes: q.used_bytes,
                })
                .collect();
            if json {
                return print_json(&rows);
            }
            let w = rows.iter().map(|r| r.path.len()).max().unwrap_or(4).max(4);
            println!(
                "{:<w$}  {:>16} {:>16} {:>16}",
                "Path", "Limit", "Used", "Available"
            );
            for r in rows {
                println!(
                    "{:<w$}  {:>16} {:>16} {:>16}",
                    r.path, r.limit_bytes, r.used_bytes, r.available_bytes
                );
            }
        }
        _ => return Err(usage().into()),
    }
    Ok(())
}
