//! `brickfs bench`: the large-file I/O benchmark users run on their own nodes.
//!
//! It runs one suite against every target — a mounted directory (`--mount`), volumes through
//! the client library (`--volume`, several make a sweep over volume types and stripe counts)
//! and, first, the raw local disk (`--disk`, a folder on it) — and prints each figure with its
//! ratio to the disk's. The suite: sequential write then read of one file per stream for each
//! stream count asked (`--streams 1,4`), 4 KiB random reads over the files of the largest run,
//! and small-file create, stat and delete. Progress goes to stderr; the table (or `--json`) to
//! stdout; `--plot FILE.svg` draws throughput against streams and against stripe count.
//!
//! Sequential writes end with fsync (inside the timed part). The disk's reads are cold: its
//! files' cached pages are dropped (`posix_fadvise(DONTNEED)`) before reading; a brickfs
//! target's bricks may serve from their own page cache, as they would in use.

use anyhow::Context;
use brickfs_client::{BrickClient, MetaClient, VolumeClient};
use brickfs_proto::meta::{MetaOp, MetaRead};
use brickfs_proto::rpc::ClientOptions;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Bench through this directory: a brickfs mount (or any folder, to compare).
    #[arg(long)]
    pub mount: Option<PathBuf>,
    /// Bench these volumes through the client library (needs --meta); several make a sweep
    /// over volume types and stripe counts, e.g. --volume dist,str4,disp42.
    #[arg(long, value_delimiter = ',')]
    pub volume: Vec<String>,
    /// Bytes each stream writes and then reads (suffixes K, M, G: powers of 1024).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// The numbers of parallel streams to run, e.g. 1,2,4,8.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub streams: Vec<usize>,
    /// Request size of the sequential runs.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub block: u64,
    /// 4 KiB random reads to issue per target (0 skips them).
    #[arg(long, default_value_t = 2000)]
    pub rand_reads: u64,
    /// Small files to create, stat and delete per target (0 skips them).
    #[arg(long, default_value_t = 500)]
    pub files: u64,
    /// Then write this many bytes more (in 64 MiB files), delete them, and measure creates
    /// and 4 KiB random reads again at once, while the cluster removes them (rows
    /// `file-create-gc` and `rand-read-4k-gc`, with their ratio to the idle rows). 0 skips it.
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    pub gc_load: u64,
    /// A folder on the local disk for the raw-disk baseline (default: /var/tmp).
    #[arg(long, default_value = "/var/tmp")]
    pub disk: PathBuf,
    /// Skip the raw-disk baseline (no ratios then).
    #[arg(long)]
    pub no_disk: bool,
    /// Write a plot of throughput against streams and stripe count to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// A size as `parse_size` takes it, or 0 (off).
fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size(s)
}

/// Parses `1048576`, `64K`, `256M`, `2G` (powers of 1024; a trailing `iB`/`B` is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 64K, 256M, 2G)"))?;
    n.checked_mul(1u64 << shift)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: String,
    /// The volume type ("dispersed", ...), "disk" or "mount".
    pub kind: String,
    /// Sets per stripe group of a volume target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripe: Option<u32>,
    pub test: &'static str,
    pub streams: usize,
    pub bytes: u64,
    pub ops: u64,
    pub secs: f64,
    pub mib_s: f64,
    pub iops: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// This figure over the raw disk's for the same test and streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_disk: Option<f64>,
    /// A `-gc` row's figure over the same target's idle one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_idle: Option<f64>,
    /// The peak resident memory (MiB) of the brickd and mountd processes on this machine
    /// during this row's phase (0: none running here).
    pub brickd_rss_mib: f64,
    pub mountd_rss_mib: f64,
}

/// What a suite runs on.
enum Target {
    /// A folder: the local disk (`cold`: drop cached pages before reading) or a mount.
    Dir { root: PathBuf, cold: bool },
    /// A volume through the client library.
    Lib { vol: Arc<VolumeClient> },
}

/// A progress line on stderr (redrawn in place on a terminal).
struct Progress {
    label: std::sync::Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
    start: std::sync::Mutex<Instant>,
    stop: AtomicBool,
    tty: bool,
    /// The largest resident memory seen this phase: brickd's, mountd's (KiB, summed over
    /// the processes of that name on this machine).
    rss_peak: [AtomicU64; 2],
}

/// The daemons whose memory the benchmark watches.
const WATCHED: [&str; 2] = ["brickd", "mountd"];

/// The resident memory (KiB) of every process on this machine named like each of
/// `WATCHED`, summed per name.
fn resident_kib() -> [u64; 2] {
    let mut out = [0; 2];
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let dir = p.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(i) = WATCHED.iter().position(|w| *w == comm.trim()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        if let Some(kib) = status.lines().find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        }) {
            out[i] += kib;
        }
    }
    out
}

impl Progress {
    fn new() -> Arc<Progress> {
        let p = Arc::new(Progress {
            label: std::sync::Mutex::new(String::new()),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            start: std::sync::Mutex::new(Instant::now()),
            stop: AtomicBool::new(false),
            tty: std::io::stderr().is_terminal(),
            rss_peak: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        {
            let p2 = p.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                while !p2.stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let now = tokio::task::spawn_blocking(resident_kib)
                        .await
                        .unwrap_or_default();
                    for (peak, v) in p2.rss_peak.iter().zip(now) {
                        peak.fetch_max(v, Ordering::Relaxed);
                    }
                }
            });
        }
        if p.tty {
            let p2 = p.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                while !p2.stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    p2.draw();
                }
            });
        }
        p
    }

    /// Starts a phase of `total` units (bytes or operations).
    fn phase(&self, label: String, total: u64) {
        if !self.tty {
            eprintln!("bench: {label}");
        }
        *self.label.lock().unwrap_or_else(|p| p.into_inner()) = label;
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        *self.start.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let now = resident_kib();
        for (peak, v) in self.rss_peak.iter().zip(now) {
            peak.store(v, Ordering::Relaxed);
        }
    }

    /// The peak resident memory of brickd and mountd (MiB) since the phase began.
    fn rss_mib(&self) -> [f64; 2] {
        let now = resident_kib();
        let mut out = [0.0; 2];
        for ((o, peak), v) in out.iter_mut().zip(&self.rss_peak).zip(now) {
            *o = peak.fetch_max(v, Ordering::Relaxed).max(v) as f64 / 1024.0;
        }
        out
    }

    fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    fn draw(&self) {
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed).max(1),
        );
        let frac = (done as f64 / total as f64).min(1.0);
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let label = self.label.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let secs = self
            .start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            .as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K[{}{}] {:>3.0}% {label} ({secs:.0} s)",
            "#".repeat(filled),
            ".".repeat(width - filled),
            frac * 100.0
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Latencies of one run, summarized.
fn summarize(mut lat: Vec<Duration>) -> (f64, f64, f64) {
    if lat.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    lat.sort_unstable();
    let at = |q: f64| {
        let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    (at(0.50), at(0.99), at(1.0))
}

/// A small, seedable generator for random offsets (no dependency for one line of math).
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn pattern_block(block: usize, seed: u64) -> bytes::Bytes {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(block);
    while out.len() < block {
        out.extend_from_slice(&next_rand(&mut s).to_le_bytes());
    }
    out.truncate(block);
    bytes::Bytes::from(out)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

impl Target {
    fn stream_name(i: usize) -> String {
        format!(".brickfs-bench-{}-s{i}", std::process::id())
    }

    fn small_name(i: u64) -> String {
        format!(".brickfs-bench-{}-f{i}", std::process::id())
    }

    /// Writes `size` bytes to stream file `i` in `block` requests, then fsyncs it.
    async fn write_stream(
        &self,
        i: usize,
        size: u64,
        block: u64,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Vec<Duration>> {
        let data = pattern_block(block as usize, i as u64 + 7);
        match self {
            Target::Dir { root, cold } => {
                let path = root.join(Self::stream_name(i));
                let cold = *cold;
                tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
                    let mut f = std::fs::File::create(&path)
                        .with_context(|| format!("create {}", path.display()))?;
                    let mut lat = Vec::new();
                    let mut off = 0;
                    while off < size {
                        let n = block.min(size - off) as usize;
                        let t = Instant::now();
                        f.write_all(&data[..n])
                            .with_context(|| format!("write {}", path.display()))?;
                        lat.push(t.elapsed());
                        progress.add(n as u64);
                        off += n as u64;
                    }
                    f.sync_all()
                        .with_context(|| format!("fsync {}", path.display()))?;
                    if cold {
                        drop_cache(&f);
                    }
                    Ok(lat)
                })
                .await?
            }
            Target::Lib { vol, .. } => {
                let name = Self::stream_name(i);
                let root = vol.record().root;
                let fh = vol
                    .create(root, &name, 0o644, false)
                    .await
                    .with_context(|| format!("create {name}"))?;
                // Four requests in flight per stream, as the mount's write-behind keeps.
                let mut lat = Vec::new();
                let mut off = 0;
                while off < size {
                    let mut batch = Vec::new();
                    for _ in 0..4 {
                        if off >= size {
                            break;
                        }
                        let n = block.min(size - off) as usize;
                        let (vol, fh, d) = (vol.clone(), &fh, data.slice(..n));
                        batch.push(async move {
                            let t = Instant::now();
                            vol.write(fh, off, d).await.map(|()| (n, t.elapsed()))
                        });
                        off += n as u64;
                    }
                    for r in brickfs_proto::rpc::join_all(batch).await {
                        let (n, d) = r.with_context(|| format!("write {name}"))?;
                        lat.push(d);
                        progress.add(n as u64);
                    }
                }
                vol.fsync(&fh)
                    .await
                    .with_context(|| format!("fsync {name}"))?;
                vol.close(fh)
                    .await
                    .with_context(|| format!("close {name}"))?;
                Ok(lat)
            }
        }
    }

    /// Reads stream file `i` whole in `block` requests.
    async fn read_stream(
        &self,
        i: usize,
        size: u64,
        block: u64,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Vec<Duration>> {
        match self {
            Target::Dir { root, .. } => {
                let path = root.join(Self::stream_name(i));
                tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
                    let mut f = std::fs::File::open(&path)
                        .with_context(|| format!("open {}", path.display()))?;
                    let mut buf = vec![0u8; block as usize];
                    let mut lat = Vec::new();
                    let mut got = 0;
                    loop {
                        let t = Instant::now();
                        let n = std::io::Read::read(&mut f, &mut buf)
                            .with_context(|| format!("read {}", path.display()))?;
                        lat.push(t.elapsed());
                        if n == 0 {
                            break;
                        }
                        got += n as u64;
                        progress.add(n as u64);
                    }
                    anyhow::ensure!(
                        got == size,
                        "{} read back {got} bytes, not {size}",
                        path.display()
                    );
                    Ok(lat)
                })
                .await?
            }
            Target::Lib { vol, .. } => {
                let name = Self::stream_name(i);
                let fh = vol
                    .open_file(vol.record().root, &name)
                    .await
                    .with_context(|| format!("open {name}"))?;
                let mut lat = Vec::new();
                let mut off = 0;
                while off < size {
                    let mut batch = Vec::new();
                    for _ in 0..4 {
                        if off >= size {
                            break;
                        }
                        let n = block.min(size - off);
                        let (vol, fh) = (vol.clone(), &fh);
                        batch.push(async move {
                            let t = Instant::now();
                            vol.read(fh, off, n).await.map(|b| (b.len(), t.elapsed()))
                        });
                        off += n;
                    }
                    for r in brickfs_proto::rpc::join_all(batch).await {
                        let (n, d) = r.with_context(|| format!("read {name}"))?;
                        lat.push(d);
                        progress.add(n as u64);
                    }
                }
                vol.close(fh).await.ok();
                Ok(lat)
            }
        }
    }

    async fn remove_stream(&self, i: usize) -> anyhow::Result<()> {
        self.remove(&Self::stream_name(i)).await
    }

    async fn remove(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Target::Dir { root, .. } => {
                let path = root.join(name);
                std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
            }
            Target::Lib { vol, .. } => {
                let op = MetaOp::Unlink {
                    volume: vol.record().id,
                    parent: vol.record().root,
                    name: name.to_string(),
                };
                vol.meta()
                    .write(op)
                    .await
                    .map(|_| ())
                    .with_context(|| format!("remove {name}"))
            }
        }
    }

    /// `ops` 4 KiB reads at random 4 KiB-aligned offsets of the `files` stream files, from
    /// `streams` readers at once.
    async fn rand_reads(
        &self,
        files: usize,
        size: u64,
        ops: u64,
        streams: usize,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Vec<Duration>> {
        let pages = (size / 4096).max(1);
        let per = ops.div_ceil(streams as u64);
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..streams {
            let progress = progress.clone();
            let mut seed = 0x9E37_79B9_7F4A_7C15 ^ (s as u64 + 1);
            match self {
                Target::Dir { root, .. } => {
                    let handles: Vec<std::fs::File> = (0..files)
                        .map(|i| {
                            let p = root.join(Self::stream_name(i));
                            std::fs::File::open(&p).with_context(|| format!("open {}", p.display()))
                        })
                        .collect::<anyhow::Result<_>>()?;
                    tasks.spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
                        let mut buf = [0u8; 4096];
                        let mut lat = Vec::new();
                        for _ in 0..per {
                            let f = &handles[(next_rand(&mut seed) % files as u64) as usize];
                            let off = (next_rand(&mut seed) % pages) * 4096;
                            let t = Instant::now();
                            f.read_exact_at(&mut buf, off).context("random read")?;
                            lat.push(t.elapsed());
                            progress.add(1);
                        }
                        Ok(lat)
                    });
                }
                Target::Lib { vol, .. } => {
                    let vol = vol.clone();
                    let mut handles = Vec::new();
                    for i in 0..files {
                        let name = Self::stream_name(i);
                        handles.push(
                            vol.open_file(vol.record().root, &name)
                                .await
                                .with_context(|| format!("open {name}"))?,
                        );
                    }
                    tasks.spawn(async move {
                        let mut lat = Vec::new();
                        for _ in 0..per {
                            let fh = &handles[(next_rand(&mut seed) % files as u64) as usize];
                            let off = (next_rand(&mut seed) % pages) * 4096;
                            let t = Instant::now();
                            let got = vol.read(fh, off, 4096).await.context("random read")?;
                            anyhow::ensure!(got.len() == 4096, "short random read");
                            lat.push(t.elapsed());
                            progress.add(1);
                        }
                        Ok(lat)
                    });
                }
            }
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        Ok(all)
    }

    /// Runs one small-file phase (`create`, `stat` or `delete`) over `n` files from
    /// `streams` workers at once; returns each operation's latency.
    async fn small_files(
        &self,
        phase: &'static str,
        n: u64,
        streams: usize,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..streams as u64 {
            let progress = progress.clone();
            let ids: Vec<u64> = (0..n).filter(|i| i % streams as u64 == s).collect();
            match self {
                Target::Dir { root, .. } => {
                    let root = root.clone();
                    tasks.spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
                        let mut lat = Vec::new();
                        for i in ids {
                            let p = root.join(Self::small_name(i));
                            let t = Instant::now();
                            match phase {
                                "create" => {
                                    std::fs::File::create(&p)
                                        .with_context(|| format!("create {}", p.display()))?;
                                }
                                "stat" => {
                                    std::fs::metadata(&p)
                                        .with_context(|| format!("stat {}", p.display()))?;
                                }
                                _ => std::fs::remove_file(&p)
                                    .with_context(|| format!("delete {}", p.display()))?,
                            }
                            lat.push(t.elapsed());
                            progress.add(1);
                        }
                        Ok(lat)
                    });
                }
                Target::Lib { vol, .. } => {
                    let vol = vol.clone();
                    tasks.spawn(async move {
                        let mut lat = Vec::new();
                        let (volume, root) = (vol.record().id, vol.record().root);
                        for i in ids {
                            let name = Self::small_name(i);
                            let t = Instant::now();
                            match phase {
                                "create" => {
                                    let fh = vol
                                        .create(root, &name, 0o644, true)
                                        .await
                                        .with_context(|| format!("create {name}"))?;
                                    vol.close(fh).await.ok();
                                }
                                "stat" => {
                                    let read = MetaRead::Lookup {
                                        volume,
                                        parent: root,
                                        name: name.clone(),
                                    };
                                    vol.meta()
                                        .read(read)
                                        .await
                                        .with_context(|| format!("stat {name}"))?;
                                }
                                _ => {
                                    let op = MetaOp::Unlink {
                                        volume,
                                        parent: root,
                                        name: name.clone(),
                                    };
                                    vol.meta()
                                        .write(op)
                                        .await
                                        .with_context(|| format!("delete {name}"))?;
                                }
                            }
                            lat.push(t.elapsed());
                            progress.add(1);
                        }
                        Ok(lat)
                    });
                }
            }
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        Ok(all)
    }
}

/// Drops a file's pages from the page cache so that the next read comes from the disk.
fn drop_cache(f: &std::fs::File) {
    let _ = nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

struct Named {
    target: Target,
    name: String,
    kind: String,
    stripe: Option<u32>,
}

/// Runs the suite on one target, appending its rows.
async fn suite(t: &Named, args: &BenchArgs, progress: &Arc<Progress>) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let row =
        |test: &'static str, streams: usize, bytes: u64, took: Duration, lat: Vec<Duration>| {
            let ops = lat.len() as u64;
            let secs = took.as_secs_f64().max(1e-9);
            let (p50, p99, max) = summarize(lat);
            let [brickd_rss_mib, mountd_rss_mib] = progress.rss_mib();
            Row {
                target: t.name.clone(),
                kind: t.kind.clone(),
                stripe: t.stripe,
                test,
                streams,
                bytes,
                ops,
                secs,
                mib_s: mib(bytes) / secs,
                iops: ops as f64 / secs,
                p50_ms: p50,
                p99_ms: p99,
                max_ms: max,
                vs_disk: None,
                vs_idle: None,
                brickd_rss_mib,
                mountd_rss_mib,
            }
        };
    let mut streams = args.streams.clone();
    streams.sort_unstable();
    streams.dedup();
    let top = *streams.last().unwrap_or(&1);
    for (at, &n) in streams.iter().enumerate() {
        let total = args.size * n as u64;
        for test in ["seq-write", "seq-read"] {
            progress.phase(
                format!(
                    "{}: {test}, {n} streams of {:.0} MiB",
                    t.name,
                    mib(args.size)
                ),
                total,
            );
            let start = Instant::now();
            let runs = (0..n).map(|i| {
                let p = progress.clone();
                async move {
                    if test == "seq-write" {
                        t.target.write_stream(i, args.size, args.block, p).await
                    } else {
                        t.target.read_stream(i, args.size, args.block, p).await
                    }
                }
            });
            let mut lat = Vec::new();
            for r in brickfs_proto::rpc::join_all(runs.collect()).await {
                lat.extend(r?);
            }
            rows.push(row(test, n, total, start.elapsed(), lat));
        }
        // The files of the largest run stay for the random reads.
        if at + 1 < streams.len() {
            for i in 0..n {
                t.target.remove_stream(i).await?;
            }
        }
    }
    if args.rand_reads > 0 {
        progress.phase(format!("{}: 4 KiB random reads", t.name), args.rand_reads);
        if let Target::Dir { root, cold: true } = &t.target {
            for i in 0..top {
                if let Ok(f) = std::fs::File::open(root.join(Target::stream_name(i))) {
                    drop_cache(&f);
                }
            }
        }
        let start = Instant::now();
        let lat = t
            .target
            .rand_reads(top, args.size, args.rand_reads, top, progress.clone())
            .await?;
        let bytes = lat.len() as u64 * 4096;
        rows.push(row("rand-read-4k", top, bytes, start.elapsed(), lat));
    }
    // Idle first: the small files before the big files go (their removal is background
    // work the cluster does afterwards).
    if args.files > 0 {
        for phase in ["create", "stat", "delete"] {
            progress.phase(
                format!("{}: {phase} {} small files", t.name, args.files),
                args.files,
            );
            let start = Instant::now();
            let lat = t
                .target
                .small_files(phase, args.files, top, progress.clone())
                .await?;
            let test = match phase {
                "create" => "file-create",
                "stat" => "file-stat",
                _ => "file-delete",
            };
            rows.push(row(test, top, 0, start.elapsed(), lat));
        }
    }
    if args.gc_load > 0 {
        // Ballast written, then deleted: the cluster removes it while creates and reads run.
        let files = args.gc_load.div_ceil(GC_FILE_BYTES) as usize;
        progress.phase(
            format!("{}: write {:.0} MiB to delete", t.name, mib(args.gc_load)),
            files as u64 * GC_FILE_BYTES,
        );
        for batch in (0..files).collect::<Vec<_>>().chunks(top.max(1)) {
            let runs = batch.iter().map(|&j| {
                let p = progress.clone();
                async move {
                    t.target
                        .write_stream(GC_FIRST + j, GC_FILE_BYTES, args.block, p)
                        .await
                }
            });
            for r in brickfs_proto::rpc::join_all(runs.collect()).await {
                r?;
            }
        }
        for j in 0..files {
            t.target.remove_stream(GC_FIRST + j).await?;
        }
        if args.rand_reads > 0 {
            progress.phase(
                format!("{}: 4 KiB random reads while deleting", t.name),
                args.rand_reads,
            );
            let start = Instant::now();
            let lat = t
                .target
                .rand_reads(top, args.size, args.rand_reads, top, progress.clone())
                .await?;
            let bytes = lat.len() as u64 * 4096;
            rows.push(row("rand-read-4k-gc", top, bytes, start.elapsed(), lat));
        }
        if args.files > 0 {
            progress.phase(
                format!(
                    "{}: create {} small files while deleting",
                    t.name, args.files
                ),
                args.files,
            );
            let start = Instant::now();
            let lat = t
                .target
                .small_files("create", args.files, top, progress.clone())
                .await?;
            rows.push(row("file-create-gc", top, 0, start.elapsed(), lat));
            t.target
                .small_files("delete", args.files, top, progress.clone())
                .await?;
        }
    }
    for i in 0..top {
        t.target.remove_stream(i).await?;
    }
    Ok(rows)
}

/// The size of the files `--gc-load` writes and deletes.
const GC_FILE_BYTES: u64 = 64 << 20;
/// The stream number of the first of them (above any stream count).
const GC_FIRST: usize = 1 << 20;

/// Runs `brickfs bench`.
pub async fn run(args: BenchArgs, meta: Option<MetaClient>, json: bool) -> anyhow::Result<()> {
    if args.mount.is_none() && args.volume.is_empty() {
        return Err(crate::UsageError(
            "say what to bench: --mount DIR (a mounted volume) and/or --volume NAME[,NAME...] with --meta".into(),
        )
        .into());
    }
    if args.streams.is_empty() || args.streams.iter().any(|n| *n == 0 || *n > 256) {
        return Err(crate::UsageError("--streams takes numbers from 1 to 256".into()).into());
    }
    if args.block > 64 << 20 {
        return Err(crate::UsageError("--block is at most 64M".into()).into());
    }
    let mut targets = Vec::new();
    if !args.no_disk {
        let root = args
            .disk
            .join(format!(".brickfs-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&root)
            .with_context(|| format!("create {} for the raw-disk baseline", root.display()))?;
        targets.push(Named {
            target: Target::Dir { root, cold: true },
            name: format!("disk:{}", args.disk.display()),
            kind: "disk".into(),
            stripe: None,
        });
    }
    if let Some(m) = &args.mount {
        anyhow::ensure!(m.is_dir(), "{} is not a directory", m.display());
        targets.push(Named {
            target: Target::Dir {
                root: m.clone(),
                cold: false,
            },
            name: format!("mount:{}", m.display()),
            kind: "mount".into(),
            stripe: None,
        });
    }
    if !args.volume.is_empty() {
        let meta = meta.ok_or_else(|| {
            crate::UsageError("--volume needs --meta HOST:PORT (or BRICKFS_META)".into())
        })?;
        let bricks = BrickClient::new(ClientOptions {
            peer_name: "brickfs-bench".into(),
            ..ClientOptions::default()
        });
        for name in &args.volume {
            let vol = VolumeClient::open(meta.clone(), bricks.clone(), name)
                .await
                .with_context(|| format!("open volume {name}"))?;
            let r = vol.record().clone();
            let kind = if r.disperse_data > 0 {
                format!(
                    "{} {}+{}",
                    r.type_name, r.disperse_data, r.disperse_redundancy
                )
            } else if r.replica > 1 {
                format!("{} x{}", r.type_name, r.replica)
            } else {
                r.type_name.clone()
            };
            targets.push(Named {
                target: Target::Lib { vol },
                name: format!("volume:{name}"),
                kind,
                stripe: Some(r.stripe),
            });
        }
    }
    let progress = Progress::new();
    let mut rows = Vec::new();
    let mut failed = None;
    for t in &targets {
        match suite(t, &args, &progress).await {
            Ok(r) => rows.extend(r),
            Err(e) => {
                failed = Some(e.context(format!("bench {}", t.name)));
                break;
            }
        }
    }
    progress.finish();
    // Leave nothing behind, whatever happened.
    for t in &targets {
        for i in 0..args.streams.iter().copied().max().unwrap_or(1) {
            let _ = t.target.remove_stream(i).await;
        }
        if failed.is_some() {
            for i in 0..args.files {
                let _ = t.target.remove(&Target::small_name(i)).await;
            }
        }
        if let Target::Dir { root, cold: true } = &t.target {
            let _ = std::fs::remove_dir_all(root);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    ratios(&mut rows);
    if let Some(path) = &args.plot {
        std::fs::write(path, plot_svg(&rows))
            .with_context(|| format!("write the plot {}", path.display()))?;
        eprintln!("bench: plot written to {}", path.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

/// The main figure of a row: MiB/s for sequential runs, operations per second otherwise.
fn figure(r: &Row) -> f64 {
    if r.test.starts_with("seq-") {
        r.mib_s
    } else {
        r.iops
    }
}

fn ratios(rows: &mut [Row]) {
    let idle: Vec<(String, &'static str, f64)> = rows
        .iter()
        .map(|r| (r.target.clone(), r.test, figure(r)))
        .collect();
    for r in rows.iter_mut() {
        let Some(base) = r.test.strip_suffix("-gc") else {
            continue;
        };
        r.vs_idle = idle
            .iter()
            .find(|(t, test, f)| *t == r.target && *test == base && *f > 0.0)
            .map(|(_, _, f)| figure(r) / f);
    }
    let disk: Vec<(&'static str, usize, f64)> = rows
        .iter()
        .filter(|r| r.kind == "disk")
        .map(|r| (r.test, r.streams, figure(r)))
        .collect();
    for r in rows.iter_mut().filter(|r| r.kind != "disk") {
        r.vs_disk = disk
            .iter()
            .find(|(t, s, _)| *t == r.test && *s == r.streams)
            .filter(|(_, _, f)| *f > 0.0)
            .map(|(_, _, f)| figure(r) / f);
    }
}

fn rss(mib: f64) -> String {
    if mib > 0.0 {
        format!("{mib:.0}")
    } else {
        "-".into()
    }
}

fn print_table(rows: &[Row]) {
    let tw = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let kw = rows.iter().map(|r| r.kind.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<tw$}  {:<kw$}  {:<15} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9}",
        "TARGET",
        "TYPE",
        "TEST",
        "STREAMS",
        "MiB/s",
        "IOPS",
        "p50 ms",
        "p99 ms",
        "max ms",
        "x DISK",
        "brickd MiB",
        "mountd MiB"
    );
    for r in rows {
        let mib = if r.bytes > 0 {
            format!("{:.1}", r.mib_s)
        } else {
            "-".into()
        };
        println!(
            "{:<tw$}  {:<kw$}  {:<15} {:>7} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>9} {:>9}",
            r.target,
            r.kind,
            r.test,
            r.streams,
            mib,
            r.iops,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.vs_disk.map_or("-".into(), |v| format!("{v:.2}")),
            rss(r.brickd_rss_mib),
            rss(r.mountd_rss_mib)
        );
    }
    for r in rows {
        if let Some(v) = r.vs_idle {
            println!(
                "{}: {} while the deleted files go: {v:.2} of idle (p99 {:.1} ms)",
                r.target, r.test, r.p99_ms
            );
        }
    }
}

/// An SVG of sequential throughput: against streams (one line per target and direction) and
/// against stripe count (volume targets, at the largest stream count).
pub fn plot_svg(rows: &[Row]) -> String {
    const W: f64 = 460.0;
    const H: f64 = 300.0;
    const M: f64 = 50.0;
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let seq: Vec<&Row> = rows.iter().filter(|r| r.test.starts_with("seq-")).collect();
    let (ystep, ymax) = round_axis(seq.iter().map(|r| r.mib_s).fold(1.0, f64::max));
    let mut out = String::new();
    let axes = |out: &mut String, x0: f64, title: &str, xlabel: &str, xticks: &[(f64, String)]| {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"18\" font-size=\"13\" text-anchor=\"middle\">{title}</text>\n",
            x0 + W / 2.0
        ));
        out.push_str(&format!(
            "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/><line x1=\"{0}\" y1=\"{3}\" x2=\"{0}\" y2=\"{1}\" stroke=\"black\"/>\n",
            x0 + M,
            H - M + 30.0,
            x0 + W - 10.0,
            30.0
        ));
        let ticks = (ymax / ystep).round() as u32;
        for i in 0..=ticks {
            let v = ystep * f64::from(i);
            let y = H - M + 30.0 - (H - M) * v / ymax;
            out.push_str(&format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text><line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n",
                x0 + M - 4.0,
                y + 4.0,
                x0 + M,
                x0 + W - 10.0
            ));
        }
        for (x, label) in xticks {
            out.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
                H - M + 45.0
            ));
        }
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text><text x=\"{}\" y=\"{}\" transform=\"rotate(-90 {} {})\" text-anchor=\"middle\">MiB/s</text>\n",
            x0 + W / 2.0,
            H - M + 62.0,
            x0 + 14.0,
            H / 2.0,
            x0 + 14.0,
            H / 2.0
        ));
    };
    let ypos = |v: f64| H - M + 30.0 - (H - M) * v / ymax;
    // Panel 1: against streams.
    let mut streams: Vec<usize> = seq.iter().map(|r| r.streams).collect();
    streams.sort_unstable();
    streams.dedup();
    let sx = |s: usize| {
        let i = streams.iter().position(|x| *x == s).unwrap_or(0) as f64;
        let n = (streams.len().max(2) - 1) as f64;
        M + 20.0 + (W - M - 50.0) * i / n
    };
    let ticks: Vec<(f64, String)> = streams.iter().map(|s| (sx(*s), s.to_string())).collect();
    axes(
        &mut out,
        0.0,
        "Sequential throughput against streams",
        "parallel streams",
        &ticks,
    );
    let mut series: Vec<(String, &'static str)> = Vec::new();
    for r in &seq {
        if !series.iter().any(|(t, k)| *t == r.target && *k == r.test) {
            series.push((r.target.clone(), r.test));
        }
    }
    for (n, (target, test)) in series.iter().enumerate() {
        let color = colors[(n / 2) % colors.len()];
        let dash = if *test == "seq-read" {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let pts: Vec<String> = seq
            .iter()
            .filter(|r| r.target == *target && r.test == *test)
            .map(|r| format!("{:.1},{:.1}", sx(r.streams), ypos(r.mib_s)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            pts.join(" ")
        ));
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            out.push_str(&format!(
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>\n"
            ));
        }
        let ly = H + 40.0 + 14.0 * (n as f64);
        out.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{} {}</text>\n",
            M,
            M + 24.0,
            M + 30.0,
            ly + 4.0,
            xml_escape(target),
            test
        ));
    }
    // Panel 2: against stripe count, at the largest stream count; only when volumes with
    // stripe counts were measured.
    let top = streams.last().copied().unwrap_or(1);
    let mut stripes: Vec<u32> = seq.iter().filter_map(|r| r.stripe).collect();
    stripes.sort_unstable();
    stripes.dedup();
    let height = H + 60.0 + 14.0 * series.len().max(2) as f64;
    if stripes.is_empty() {
        return svg(W, height, &out);
    }
    let px = |s: u32| {
        let i = stripes.iter().position(|x| *x == s).unwrap_or(0) as f64;
        let n = (stripes.len().max(2) - 1) as f64;
        W + M + 20.0 + (W - M - 50.0) * i / n
    };
    let ticks: Vec<(f64, String)> = stripes.iter().map(|s| (px(*s), s.to_string())).collect();
    axes(
        &mut out,
        W,
        &format!("Against stripe count ({top} streams)"),
        "stripe count (sets per stripe group)",
        &ticks,
    );
    for (n, test) in ["seq-write", "seq-read"].iter().enumerate() {
        let color = colors[n];
        let mut pts: Vec<(u32, f64, String)> = seq
            .iter()
            .filter(|r| r.test == *test && r.streams == top)
            .filter_map(|r| r.stripe.map(|s| (s, r.mib_s, r.kind.clone())))
            .collect();
        pts.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        for (s, v, kind) in &pts {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"><title>{} {test}: {v:.0} MiB/s</title></circle>\n",
                px(*s),
                ypos(*v),
                xml_escape(kind)
            ));
        }
        let ly = H + 40.0 + 14.0 * n as f64;
        out.push_str(&format!(
            "<circle cx=\"{}\" cy=\"{ly}\" r=\"4\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">volumes, {test}</text>\n",
            W + M + 12.0,
            W + M + 30.0,
            ly + 4.0
        ));
        if let Some(d) = seq
            .iter()
            .find(|r| r.kind == "disk" && r.test == *test && r.streams == top)
        {
            out.push_str(&format!(
                "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-dasharray=\"2,4\"/><text x=\"{}\" y=\"{:.1}\" fill=\"{color}\" text-anchor=\"end\">raw disk {test}</text>\n",
                W + M,
                2.0 * W - 10.0,
                2.0 * W - 12.0,
                ypos(d.mib_s) - 3.0,
                y = ypos(d.mib_s)
            ));
        }
    }
    svg(2.0 * W, height, &out)
}

/// The SVG document around `body` (its height leaves room for the legend: one line per
/// target and direction).
fn svg(width: f64, height: f64, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// A round tick step (1, 2 or 5 times a power of ten, at most eight ticks) for an axis from 0
/// that shows `max`, and the axis' end: the first tick at or above `max` with 5 % room.
fn round_axis(max: f64) -> (f64, f64) {
    let want = (max * 1.05).max(1.0);
    let raw = want / 8.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (want / step).ceil() * step)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in ["", "M", "12Q", "-1", "0", "99999999999T", "1.5G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn percentiles_come_from_sorted_latencies() {
        let lat: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let (p50, p99, max) = summarize(lat);
        assert_eq!((p50, p99, max), (50.0, 99.0, 100.0));
        assert_eq!(summarize(Vec::new()), (0.0, 0.0, 0.0));
    }

    fn row(target: &str, kind: &str, test: &'static str, streams: usize, mib_s: f64) -> Row {
        Row {
            target: target.into(),
            kind: kind.into(),
            stripe: (kind != "disk").then_some(2),
            test,
            streams,
            bytes: 1,
            ops: 1,
            secs: 1.0,
            mib_s,
            iops: mib_s * 10.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            vs_disk: None,
            vs_idle: None,
            brickd_rss_mib: 0.0,
            mountd_rss_mib: 0.0,
        }
    }

    /// Axis ticks are round numbers, and the axis ends at a tick just above the data.
    #[test]
    fn axes_have_round_ticks() {
        for (max, step, top) in [
            (1234.0, 200.0, 1400.0),
            (97.0, 20.0, 120.0),
            (5.0, 1.0, 6.0),
            (2900.0, 500.0, 3500.0),
        ] {
            assert_eq!(round_axis(max), (step, top), "for {max}");
        }
    }

    /// A run without a volume sweep draws one panel; the idle ratio of the rows measured
    /// while deleted files go is their figure over the same target's idle one.
    #[test]
    fn one_panel_without_stripes_and_ratios_to_idle() {
        let mut rows = vec![
            row("mount:/m", "mount", "seq-write", 1, 100.0),
            row("mount:/m", "mount", "file-create", 4, 50.0),
            row("mount:/m", "mount", "file-create-gc", 4, 40.0),
            row("disk:/x", "disk", "file-create-gc", 4, 10.0),
        ];
        for r in &mut rows {
            r.stripe = None;
        }
        ratios(&mut rows);
        let idle: Vec<Option<f64>> = rows.iter().map(|r| r.vs_idle).collect();
        assert_eq!(idle, vec![None, None, Some(0.8), None]);
        let svg = plot_svg(&rows);
        assert!(svg.contains("width=\"460\""), "{svg}");
        assert!(!svg.contains("stripe count"), "{svg}");
        rows[0].stripe = Some(4);
        assert!(plot_svg(&rows).contains("stripe count"));
    }

    #[test]
    fn ratios_compare_like_with_like_and_the_plot_has_every_series() {
        let mut rows = vec![
            row("disk:/x", "disk", "seq-write", 1, 200.0),
            row("disk:/x", "disk", "seq-write", 4, 400.0),
            row("disk:/x", "disk", "file-create", 4, 100.0),
            row("volume:v", "dispersed 4+2", "seq-write", 1, 100.0),
            row("volume:v", "dispersed 4+2", "seq-write", 4, 600.0),
            row("volume:v", "dispersed 4+2", "seq-read", 4, 50.0),
            row("volume:v", "dispersed 4+2", "file-create", 4, 300.0),
        ];
        ratios(&mut rows);
        let vs: Vec<Option<f64>> = rows.iter().map(|r| r.vs_disk).collect();
        assert_eq!(
            vs,
            vec![None, None, None, Some(0.5), Some(1.5), None, Some(3.0)]
        );
        let svg = plot_svg(&rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        assert!(svg.contains("raw disk seq-write"));
    }
}
