//! Throughput and metadata rates through a FUSE mount, measured with fio (from Debian), each
//! as a ratio to the same fio job on the raw local disk in the same run: sequential 1 MiB
//! write and read of a large file with 1 and 4 jobs, 4 KiB random reads, and file create,
//! stat and delete rates. The volume is dispersed 4+2 over six bricks of one brickd on
//! loopback (the quick start's default), so every byte written lands 1.5 times on the disk.
//!
//! Run: `cargo bench --bench mount_fio` (`BRICKFS_BENCH_MIB`, default 2048, per sequential
//! case; `BRICKFS_BENCH_FILES`, default 2000, for the metadata cases; `BRICKFS_BENCH_SPEC` for
//! another layout over the six bricks, e.g. `stripe 6`; `BRICKFS_BENCH_DIR` to choose the
//! disk).

#![allow(clippy::print_stdout)]

use brickfs_client::{MetaClient, MetaClientOptions, admin};
use brickfs_proto::meta::{AdminOp, MetaOp};
use brickfs_testkit::Brickd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mountd serving the volume; dropping it unmounts and stops it.
struct Mount {
    child: Child,
    path: PathBuf,
}

use mountd::is_mounted;

impl Drop for Mount {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        if is_mounted(&self.path) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// One fio job's figures: MiB/s, operations per second, and completion latency percentiles
/// (p50, p99) in microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    mib_s: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs fio with `args` in `dir` and reads its JSON report.
fn fio(dir: &Path, name: &str, args: &[String]) -> Figures {
    let out = Command::new("fio")
        .arg(format!("--name={name}"))
        .arg(format!("--directory={}", dir.display()))
        .arg("--output-format=json")
        .arg("--group_reporting")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run fio (scripts/setup installs it)");
    assert!(out.status.success(), "fio {name} failed");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let job = &json["jobs"][0];
    let side = if job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0 {
        &job["write"]
    } else {
        &job["read"]
    };
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Figures {
        mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20),
        iops: side["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    }
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// The cases, each run in `dir` (the raw disk or the mount), in order: the reads and random
/// reads use the files the writes leave.
fn cases(dir: &Path, mib: u64, files: u64) -> Vec<(String, Figures)> {
    let mut out = Vec::new();
    for jobs in [1u64, 4] {
        let size = format!("--size={}m", mib / jobs);
        let n = format!("--numjobs={jobs}");
        let common = s(&["--bs=1m", "--ioengine=psync", "--end_fsync=1"]);
        let mut w = common.clone();
        w.extend([size.clone(), n.clone(), "--rw=write".into()]);
        out.push((
            format!("seq write 1 MiB, {jobs} job(s)"),
            fio(dir, &format!("seq{jobs}"), &w),
        ));
        let mut r = s(&["--bs=1m", "--ioengine=psync", "--invalidate=1"]);
        r.extend([size, n, "--rw=read".into()]);
        out.push((
            format!("seq read 1 MiB, {jobs} job(s)"),
            fio(dir, &format!("seq{jobs}"), &r),
        ));
    }
    out.push((
        "random read 4 KiB, 4 jobs, 15 s".into(),
        fio(
            dir,
            "seq4",
            &s(&[
                "--bs=4k",
                "--rw=randread",
                "--ioengine=psync",
                "--numjobs=4",
                &format!("--size={}m", mib / 4),
                "--time_based",
                "--runtime=15",
                "--invalidate=1",
            ]),
        ),
    ));
    let meta = |engine: &str| {
        s(&[
            &format!("--ioengine={engine}"),
            "--filesize=4k",
            "--bs=4k",
            "--openfiles=1",
            &format!("--nrfiles={files}"),
            "--fallocate=none",
        ])
    };
    for (label, engine) in [
        ("create empty files", "filecreate"),
        ("stat files", "filestat"),
        ("delete files", "filedelete"),
    ] {
        out.push((label.into(), fio(dir, "meta", &meta(engine))));
    }
    for f in std::fs::read_dir(dir).unwrap() {
        let _ = std::fs::remove_file(f.unwrap().path());
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: u64 = std::env::var("BRICKFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let files: u64 = std::env::var("BRICKFS_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let spec = std::env::var("BRICKFS_BENCH_SPEC").unwrap_or("disperse 6 redundancy 2".into());
    let base = std::env::var("BRICKFS_BENCH_DIR").unwrap_or("/var/tmp".into());
    let dir = tempfile::tempdir_in(base).unwrap();

    let raw = dir.path().join("raw");
    std::fs::create_dir(&raw).unwrap();
    println!("raw disk: {}", raw.display());
    let started = Instant::now();
    let raw_figures = cases(&raw, mib, files);
    println!("  ({:.0} s)", started.elapsed().as_secs_f64());

    let bricks: Vec<_> = (0..6).map(|i| dir.path().join(format!("b{i}"))).collect();
    let brickd = PathBuf::from(env!("CARGO_BIN_EXE_brickd"));
    let node = Brickd::start(&brickd, &dir.path().join("node"), &bricks, &["--meta"]).unwrap();
    let meta = MetaClient::new(vec![node.addr()], MetaClientOptions::default());
    meta.admin(AdminOp::Init).await.unwrap();
    let bc = brickfs_client::BrickClient::new(Default::default());
    admin::peer_add(&meta, &bc, node.addr()).await.unwrap();
    let mut words: Vec<String> = spec.split_whitespace().map(str::to_string).collect();
    words.extend(
        bricks
            .iter()
            .map(|b| format!("{}:{}", node.addr(), b.display())),
    );
    admin::volume_create(&meta, "bench", &words).await.unwrap();
    meta.write(MetaOp::StartVolume {
        name: "bench".into(),
    })
    .await
    .unwrap();
    let path = dir.path().join("mnt");
    std::fs::create_dir(&path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mountd"))
        .arg(format!("{}/bench", node.addr()))
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mount = Mount {
        child,
        path: path.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !is_mounted(&path) {
        assert!(Instant::now() < deadline, "mountd did not mount");
        tick.tick().await;
    }
    println!("mount ({spec}): {}", path.display());
    let started = Instant::now();
    let fs_figures = cases(&path, mib, files);
    println!("  ({:.0} s)", started.elapsed().as_secs_f64());
    drop(mount);
    drop(node);

    println!(
        "\n{:<34} {:>16} {:>16} {:>7}   {:>18}",
        "case", "raw disk", "brickfs mount", "ratio", "brickfs p50/p99 µs"
    );
    for ((name, r), (_, b)) in raw_figures.iter().zip(&fs_figures) {
        let (rv, bv, unit) = if name.starts_with("seq") {
            (r.mib_s, b.mib_s, "MiB/s")
        } else {
            (r.iops, b.iops, "op/s")
        };
        println!(
            "{name:<34} {rv:>10.0} {unit:<5} {bv:>10.0} {unit:<5} {:>7.2}   {:>8.0} / {:<8.0}",
            bv / rv,
            b.p50_us,
            b.p99_us
        );
    }
}
