//! brickd's configuration: a TOML file, then `BRICKFS_*` variables, then flags, each
//! overriding the one before. Unknown keys are refused; defaults live in [`defaults`]; sizes
//! accept units (`16MiB`). The result is a validated [`Config`].

use anyhow::{Context, bail};
use brickfs_proto::{BrickId, Limits};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Defaults, in one place.
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:24100";
    pub const DATA_DIR: &str = "/var/lib/brickfs";
    pub const LOG_FILTER: &str = "info";
    pub const META_SNAPSHOT_LOGS: u64 = 10_000;
}

/// The command line of `brickd`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "brickd",
    version,
    about = "brickfs node daemon: serves bricks over the brickfs protocol"
)]
pub struct Flags {
    /// A TOML config file (see docs/operations.md).
    #[arg(long, env = "BRICKFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (the chosen one is logged).
    #[arg(long, env = "BRICKFS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A brick folder to serve; repeat for several. Replaces the config file's bricks.
    #[arg(long = "brick", env = "BRICKFS_BRICKS", value_delimiter = ',')]
    pub bricks: Vec<PathBuf>,
    /// The node's own data folder (node id, later the metadata member).
    #[arg(long, env = "BRICKFS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Format brick folders that are empty or missing.
    #[arg(long)]
    pub init: bool,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Log filter directives (default `info`; `BRICKFS_LOG` also works).
    #[arg(long)]
    pub log: Option<String>,
    /// Run a member of the metadata group on this node (state under the data folder).
    #[arg(long, env = "BRICKFS_META")]
    pub meta: bool,
    /// The address other nodes and clients use to reach this node (default: the listen
    /// address; required when listening on 0.0.0.0).
    #[arg(long, env = "BRICKFS_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// Metadata snapshots (and log compaction) every this many log entries.
    #[arg(long)]
    pub meta_snapshot_logs: Option<u64>,
    /// Seconds without a heartbeat after which the metadata leader takes a node's bricks out
    /// of their sets' in-sync members (default 10).
    #[arg(long)]
    pub meta_down_after_secs: Option<u64>,
    /// Milliseconds this node keeps taking set writes without the metadata group acknowledging
    /// its heartbeat (default 5000; keep it well under the group's `meta_down_after_secs`).
    #[arg(long)]
    pub write_lease_ms: Option<u64>,
    /// The bitrot scrubber's read rate per node, with units (default 32MiB; 0 turns it off).
    #[arg(long)]
    pub scrub_rate: Option<String>,
    /// Seconds between the starts of scrub passes over every brick (default 86400).
    #[arg(long)]
    pub scrub_interval_secs: Option<u64>,
    /// Members of the metadata group this node reports its heartbeat to (default: itself when
    /// it runs a member, else none).
    #[arg(long, env = "BRICKFS_META_PEERS", value_delimiter = ',')]
    pub meta_peers: Vec<SocketAddr>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address (default: off).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the provisioning API (HTTP/JSON, see docs/operations.md) on this address
    /// (default: off; needs a metadata member here or `--meta-peers`).
    #[arg(long)]
    pub api_listen: Option<SocketAddr>,
    /// The cluster key file: every connection made or accepted proves this key, and peers
    /// without it are refused (default: none, an open cluster).
    #[arg(long, env = "BRICKFS_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    init: Option<bool>,
    #[serde(default)]
    brick: Vec<FileBrick>,
    limits: Option<FileLimits>,
    meta: Option<bool>,
    advertise: Option<String>,
    meta_snapshot_logs: Option<u64>,
    meta_down_after_secs: Option<u64>,
    scrub_rate: Option<String>,
    scrub_interval_secs: Option<u64>,
    write_lease_ms: Option<u64>,
    #[serde(default)]
    meta_peers: Vec<String>,
    metrics_listen: Option<String>,
    api_listen: Option<String>,
    cluster_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBrick {
    path: PathBuf,
    /// The id the brick folder must carry (`b` and 16 hex digits).
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    body_max: Option<String>,
    data_max: Option<String>,
    inflight_max: Option<usize>,
    conns_per_peer_max: Option<usize>,
}

/// One brick to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrickConfig {
    pub path: PathBuf,
    pub expect_id: Option<BrickId>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub bricks: Vec<BrickConfig>,
    pub init: bool,
    pub limits: Limits,
    /// Run a metadata member.
    pub meta: bool,
    pub advertise: Option<SocketAddr>,
    pub meta_snapshot_logs: u64,
    /// A node silent this long is down (see `--meta-down-after-secs`).
    pub meta_down_after: std::time::Duration,
    /// How long set writes are taken without a heartbeat acknowledged.
    pub write_lease: std::time::Duration,
    /// Bytes per second the scrubber reads (0: off).
    pub scrub_rate: u64,
    /// Time between scrub passes.
    pub scrub_interval: std::time::Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the provisioning API, if anywhere.
    pub api_listen: Option<SocketAddr>,
    /// The cluster key, if the cluster has one.
    pub cluster_key: Option<Vec<u8>>,
    /// Where to send heartbeats (empty: nowhere, or this node's own member).
    pub meta_peers: Vec<SocketAddr>,
}

/// Parses a size such as `4096`, `64KiB`, `16MiB`, `1GiB` (see `brickfs_layout::parse_size`).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    brickfs_layout::parse_size(text).map_err(|e| anyhow::anyhow!(e))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolve {}", path.display()))
}

impl Config {
    /// Builds the configuration from the config file (if any) and the flags.
    pub fn load(flags: &Flags) -> anyhow::Result<Config> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parse config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Self::merge(file, flags)
    }

    fn merge(file: FileConfig, flags: &Flags) -> anyhow::Result<Config> {
        let listen = match (flags.listen, &file.listen) {
            (Some(addr), _) => addr,
            (None, Some(text)) => text
                .parse()
                .with_context(|| format!("listen address {text:?} is not HOST:PORT"))?,
            (None, None) => defaults::LISTEN.parse()?,
        };
        let data_dir = flags
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR));
        let bricks: Vec<BrickConfig> = if !flags.bricks.is_empty() {
            flags
                .bricks
                .iter()
                .map(|p| {
                    Ok(BrickConfig {
                        path: absolute(p)?,
                        expect_id: None,
                    })
                })
                .collect::<anyhow::Result<_>>()?
        } else {
            file.brick
                .iter()
                .map(|b| {
                    let expect_id = match &b.id {
                        Some(text) => Some(BrickId::parse(text).with_context(|| {
                            format!("brick id {text:?} is not b followed by up to 16 hex digits")
                        })?),
                        None => None,
                    };
                    Ok(BrickConfig {
                        path: absolute(&b.path)?,
                        expect_id,
                    })
                })
                .collect::<anyhow::Result<_>>()?
        };
        for (i, b) in bricks.iter().enumerate() {
            if bricks[..i].iter().any(|o| o.path == b.path) {
                bail!("brick {} is listed twice", b.path.display());
            }
            if b.path.parent().is_none() {
                bail!("the root folder cannot be a brick");
            }
        }
        let mut limits = Limits::default();
        if let Some(l) = &file.limits {
            if let Some(text) = &l.body_max {
                limits.body_max_bytes = u32::try_from(parse_size(text)?)
                    .context("limits.body_max must be below 4GiB")?;
            }
            if let Some(text) = &l.data_max {
                limits.data_max_bytes = u32::try_from(parse_size(text)?)
                    .context("limits.data_max must be below 4GiB")?;
            }
            if let Some(n) = l.inflight_max {
                if n == 0 {
                    bail!("limits.inflight_max must be at least 1");
                }
                limits.inflight_max = n;
            }
            if let Some(n) = l.conns_per_peer_max {
                if n == 0 {
                    bail!("limits.conns_per_peer_max must be at least 1");
                }
                limits.conns_per_peer_max = n;
            }
        }
        let advertise = match (flags.advertise, &file.advertise) {
            (Some(a), _) => Some(a),
            (None, Some(text)) => Some(
                text.parse()
                    .with_context(|| format!("advertise address {text:?} is not HOST:PORT"))?,
            ),
            (None, None) => None,
        };
        if let Some(a) = advertise
            && a.ip().is_unspecified()
        {
            bail!("advertise address {a} must be reachable, not unspecified");
        }
        let meta_snapshot_logs = flags
            .meta_snapshot_logs
            .or(file.meta_snapshot_logs)
            .unwrap_or(defaults::META_SNAPSHOT_LOGS);
        if meta_snapshot_logs == 0 {
            bail!("meta_snapshot_logs must be at least 1");
        }
        let down_after_secs = flags
            .meta_down_after_secs
            .or(file.meta_down_after_secs)
            .unwrap_or(10);
        if down_after_secs < 3 {
            bail!(
                "meta_down_after_secs must be at least 3 (nodes send a heartbeat every 2 s), not {down_after_secs}"
            );
        }
        let scrub_rate = match flags.scrub_rate.as_ref().or(file.scrub_rate.as_ref()) {
            Some(text) => brickfs_layout::parse_size(text)
                .map_err(|e| anyhow::anyhow!("scrub_rate {text:?}: {e}"))?,
            None => 32 << 20,
        };
        let scrub_interval_secs = flags
            .scrub_interval_secs
            .or(file.scrub_interval_secs)
            .unwrap_or(86_400)
            .max(1);
        let write_lease_ms = flags.write_lease_ms.or(file.write_lease_ms).unwrap_or(5000);
        if write_lease_ms < 1500 {
            bail!(
                "write_lease_ms must be at least 1500 (heartbeats go every second), not {write_lease_ms}"
            );
        }
        if write_lease_ms >= down_after_secs * 1000 {
            bail!(
                "write_lease_ms ({write_lease_ms}) must be shorter than meta_down_after_secs ({down_after_secs} s): a node must stop taking writes before the group gives its sets away"
            );
        }
        let meta_peers = if !flags.meta_peers.is_empty() {
            flags.meta_peers.clone()
        } else {
            file.meta_peers
                .iter()
                .map(|t| {
                    t.parse()
                        .with_context(|| format!("meta_peers entry {t:?} is not HOST:PORT"))
                })
                .collect::<anyhow::Result<_>>()?
        };
        // An optional address: the flag, else the file's (which must parse).
        let optional_addr =
            |flag: Option<SocketAddr>, text: &Option<String>, key: &str| match (flag, text) {
                (Some(a), _) => Ok(Some(a)),
                (None, Some(t)) => t
                    .parse()
                    .map(Some)
                    .with_context(|| format!("{key} {t:?} is not HOST:PORT")),
                (None, None) => Ok(None),
            };
        let metrics_listen =
            optional_addr(flags.metrics_listen, &file.metrics_listen, "metrics_listen")?;
        let api_listen = optional_addr(flags.api_listen, &file.api_listen, "api_listen")?;
        let cluster_key = match flags
            .cluster_key_file
            .as_ref()
            .or(file.cluster_key_file.as_ref())
        {
            Some(path) => Some(
                brickfs_proto::rpc::load_cluster_key(path)
                    .with_context(|| format!("cluster key file {}", path.display()))?,
            ),
            None => None,
        };
        Ok(Config {
            listen,
            data_dir: absolute(&data_dir)?,
            bricks,
            init: flags.init || file.init.unwrap_or(false),
            limits,
            meta: flags.meta || file.meta.unwrap_or(false),
            advertise,
            meta_snapshot_logs,
            meta_down_after: std::time::Duration::from_secs(down_after_secs),
            write_lease: std::time::Duration::from_millis(write_lease_ms),
            scrub_rate,
            scrub_interval: std::time::Duration::from_secs(scrub_interval_secs),
            meta_peers,
            metrics_listen,
            api_listen,
            cluster_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("brickd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn sizes_accept_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1 G").unwrap(), 1 << 30);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn file_then_flags_override() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            data_dir = "/tmp/x"
            [[brick]]
            path = "/srv/b1"
            id = "b00000000000000ab"
            [limits]
            data_max = "8MiB"
            "#,
        )
        .unwrap();
        let c = Config::merge(file, &flags(&[])).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.bricks[0].expect_id, Some(BrickId(0xab)));
        assert_eq!(c.limits.data_max_bytes, 8 << 20);

        let file: FileConfig = toml::from_str("listen = \"127.0.0.1:9000\"").unwrap();
        let c = Config::merge(
            file,
            &flags(&["--listen", "127.0.0.1:9100", "--brick", "/srv/b2"]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.bricks.len(), 1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("listne = \"x\"").is_err());
        assert!(toml::from_str::<FileConfig>("[[brick]]\npath = \"/a\"\nsize = 3").is_err());
        let file: FileConfig = toml::from_str("listen = \"nowhere\"").unwrap();
        assert!(Config::merge(file, &flags(&[])).is_err());
        let dup = flags(&["--brick", "/srv/b", "--brick", "/srv/b"]);
        assert!(Config::merge(FileConfig::default(), &dup).is_err());
    }
}
