//! The README's quick start as a user runs it: `brickfs-local` starts a node, a disperse 4+2
//! volume and a FUSE mount, benchmarks it and stays up; files go in and out through the mount;
//! `brickfs bench` runs through the mount and through the client library; Ctrl-C leaves
//! nothing mounted or running; a second start finds the data again.

mod common;

use common::*;
use mountd::is_mounted;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `brickfs-local`: its output lines arrive on `lines`. Dropping it kills it and
/// every process it reported, and undoes its mount — failures included.
struct Local {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    pids: Vec<i32>,
    mount: Option<PathBuf>,
}

impl Local {
    fn start(data: &Path, bench_size: &str) -> Local {
        let mut child = Command::new(env!("CARGO_BIN_EXE_brickfs-local"))
            .arg("--data")
            .arg(data)
            .args(["--brickd", env!("CARGO_BIN_EXE_brickd")])
            .args(["--mountd", env!("CARGO_BIN_EXE_mountd")])
            .args(["--bench-size", bench_size])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start brickfs-local");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Local {
            child,
            lines,
            seen: Vec::new(),
            pids: Vec::new(),
            mount: None,
        }
    }

    /// Reads output until a line contains `what` (bounded by `limit`); returns that line.
    fn wait_line(&mut self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(pid) = line
                        .split_once(" pid ")
                        .and_then(|(_, r)| r.split([' ', ':']).next())
                        .and_then(|p| p.parse().ok())
                    {
                        self.pids.push(pid);
                    }
                    if let Some((_, at)) = line.split_once(" mounted at ") {
                        self.mount = Some(PathBuf::from(at.trim()));
                    }
                    self.seen.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {what:?} within {limit:?} ({e}); output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Ctrl-C, then waits (bounded) for the output to end and the process to exit cleanly;
    /// checks that nothing it started is mounted or running any more.
    fn interrupt_and_check(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("still running 60 s after Ctrl-C:\n{}", self.seen.join("\n"))
                }
            }
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}\n{}", self.seen.join("\n"));
        assert!(self.seen.iter().any(|l| l.starts_with("stopped (")));
        if let Some(m) = &self.mount {
            assert!(!is_mounted(m), "{} still mounted", m.display());
        }
        assert!(self.pids.len() >= 2, "pids reported: {:?}", self.pids);
        for p in &self.pids {
            assert!(
                !Path::new(&format!("/proc/{p}")).exists(),
                "process {p} still there after Ctrl-C"
            );
        }
        self.pids.clear();
        self.mount = None;
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(m) = &self.mount
            && is_mounted(m)
        {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = must_ok(args);
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap_or_else(|e| panic!("bench --json printed no rows ({e}):\n{out}"))
}

fn rows_of<'a>(rows: &'a [serde_json::Value], target: &str) -> Vec<&'a serde_json::Value> {
    rows.iter()
        .filter(|r| r["target"].as_str().is_some_and(|t| t.starts_with(target)))
        .collect()
}

/// Checks one target's rows: every test of the suite, figures above zero, sequential bytes as
/// asked; with `vs_disk`, every row carries its ratio to the disk's.
fn check_suite(rows: &[&serde_json::Value], size: u64, streams: &[u64], vs_disk: bool) {
    for test in [
        "seq-write",
        "seq-read",
        "rand-read-4k",
        "file-create",
        "file-stat",
        "file-delete",
    ] {
        let of: Vec<_> = rows.iter().filter(|r| r["test"] == test).collect();
        assert!(!of.is_empty(), "no {test} row in {rows:#?}");
        for r in of {
            assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
            assert_eq!(r.get("vs_disk").is_some(), vs_disk, "{r}");
            if test.starts_with("seq-") {
                let n = r["streams"].as_u64().unwrap();
                assert!(streams.contains(&n));
                assert_eq!(r["bytes"].as_u64().unwrap(), size * n, "{r}");
                assert!(r["mib_s"].as_f64().unwrap() > 0.0);
            }
        }
    }
}

#[test]
fn quick_start_mounts_benchmarks_and_stops_clean() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let mut first = Local::start(&data, "4M");
    let head = first.wait_line("listening on", Duration::from_secs(60));
    let addr = head
        .split_once("listening on ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .expect("address")
        .to_string();
    first.wait_line("created volume vol0", Duration::from_secs(60));
    first.wait_line("mounted at", Duration::from_secs(60));
    first.wait_line("x DISK", Duration::from_secs(120));
    first.wait_line("Ctrl-C stops it.", Duration::from_secs(240));
    assert!(
        first
            .seen
            .iter()
            .any(|l| l.starts_with("mount:") && l.contains("seq-write")),
        "{}",
        first.seen.join("\n")
    );
    let mnt = first.mount.clone().expect("mount point");
    assert!(is_mounted(&mnt));

    // Files in and out through the mount.
    let bytes = pattern(9, 0, 3 << 20);
    let file = mnt.join("hello.bin");
    let mut f = std::fs::File::create(&file).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(std::fs::read(&file).unwrap() == bytes);

    // brickfs bench through the mount, with the raw disk in the same run and a plot.
    let plot = dir.path().join("bench.svg");
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let rows = bench_json(&[
        "--json",
        "bench",
        "--mount",
        mnt.to_str().unwrap(),
        "--size",
        "2M",
        "--streams",
        "1,2",
        "--rand-reads",
        "50",
        "--files",
        "10",
        "--gc-load",
        "128M",
        "--disk",
        disk.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    check_suite(&rows_of(&rows, "disk:"), 2 << 20, &[1, 2], false);
    check_suite(&rows_of(&rows, "mount:"), 2 << 20, &[1, 2], true);
    // The rows measured while the deleted ballast goes, with their ratio to the idle ones;
    // the memory of the daemons (on this machine) in every row.
    for test in ["file-create-gc", "rand-read-4k-gc"] {
        let r = rows_of(&rows, "mount:")
            .into_iter()
            .find(|r| r["test"] == test)
            .unwrap_or_else(|| panic!("no {test} row"));
        assert!(r["vs_idle"].as_f64().unwrap() > 0.0, "{r}");
    }
    for r in rows_of(&rows, "mount:") {
        assert!(r["brickd_rss_mib"].as_f64().unwrap() > 1.0, "{r}");
        assert!(r["mountd_rss_mib"].as_f64().unwrap() > 1.0, "{r}");
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
    // A mount has no stripe counts: one panel, the raw disk's lines in it.
    assert!(svg.contains("disk:") && svg.contains("seq-read"), "{svg}");
    assert!(!svg.contains("stripe count"), "{svg}");
    // The bench leaves nothing behind.
    let left: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["hello.bin".to_string()]);
    assert_eq!(std::fs::read_dir(&disk).unwrap().count(), 0);

    // And straight through the client library, as a sweep would (one volume here).
    let rows = bench_json(&[
        "--json",
        "--meta",
        &addr,
        "bench",
        "--volume",
        "vol0",
        "--size",
        "1M",
        "--streams",
        "2",
        "--rand-reads",
        "20",
        "--files",
        "5",
        "--no-disk",
    ]);
    let lib = rows_of(&rows, "volume:vol0");
    check_suite(&lib, 1 << 20, &[2], false);
    assert!(
        lib.iter()
            .all(|r| r["kind"] == "dispersed 4+2" && r["stripe"] == 1)
    );

    // Bad input is refused with a usage error, before anything runs.
    let (code, _, err) = brickfs(&["bench"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--mount"), "{err}");
    let (code, _, err) = brickfs(&["bench", "--mount", "/", "--size", "12Q"]);
    assert_eq!(code, 2, "{err}");

    first.interrupt_and_check();

    // The second start reuses the group, the volume and the data.
    let mut second = Local::start(&data, "0");
    second.wait_line("rejoined the metadata group", Duration::from_secs(60));
    second.wait_line("reusing volume vol0", Duration::from_secs(60));
    second.wait_line("Ctrl-C stops it.", Duration::from_secs(60));
    let mnt = second.mount.clone().expect("mount point");
    assert!(std::fs::read(mnt.join("hello.bin")).unwrap() == bytes);
    second.interrupt_and_check();
}
