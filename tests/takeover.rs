//! Mounts that outlive their serving process: while a sequential writer (fsync every 32 MiB),
//! a reader (checking every byte, its cwd inside the mount), a lock holder and a blocked lock
//! waiter (F_SETLKW) run as separate processes on one mount,
//!
//! - the mount is upgraded to a freshly started mountd binary (another file), several
//!   times, with `mountd` and with `mountd --daemon`: nothing fails, no fsync reports a
//!   loss, the lock stays held (another mount is refused it), and the waiter gets it once the
//!   holder lets go;
//! - the serving process (the worker) is killed with SIGKILL again and again: the keeper
//!   starts another, every process runs on, and the written file matches the pattern byte
//!   for byte at the end: the writer rewrites from its last good fsync whenever an fsync
//!   reports EIO, so a lost write that no fsync reported would show as a wrong byte.
//!
//! The oracle is the pattern (each MiB names its own index and the seed), checked through a
//! second mount after every process ended.

mod common;

use common::mount::Mount;
use common::*;
use mountd::is_mounted;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Writes 1 MiB chunks at increasing offsets, fsync every 32 (so that at most moments some
/// acknowledged MiB are only in the worker's write-behind); an fsync failing with EIO
/// sends it back to the last good fsync. Any other failure ends it non-zero. It reports
/// `synced eio` in PROGRESS after each fsync and `done LENGTH EIO` at the end.
const WRITER: &str = r#"
import errno, os, sys
path, stop, progress, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
CH = 1 << 20
def chunk(i):
    return (i.to_bytes(8, "little") + seed.to_bytes(8, "little")) * (CH // 16)
def report(text):
    with open(progress + ".tmp", "w") as f:
        f.write(text)
    os.rename(progress + ".tmp", progress)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
off = synced = eio = 0
while True:
    done = os.path.exists(stop) or off >= (1 << 30)
    if not done:
        os.pwrite(fd, chunk(off // CH), off)
        off += CH
    if done or (off // CH) % 32 == 0:
        try:
            os.fsync(fd)
            synced = off
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            eio += 1
            off = synced
            continue
        report(f"{synced} {eio}")
        if done:
            break
os.close(fd)
report(f"done {synced} {eio}")
"#;

/// Reads REF (LEN bytes of the pattern with seed 7) over and over through one descriptor,
/// by a path relative to its cwd inside the mount, and checks every byte; counts passes in
/// PROGRESS. Any error or wrong byte ends it non-zero.
const READER: &str = r#"
import os, sys
d, stop, progress, length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
CH = 1 << 20
os.chdir(d)
fd = os.open("ref", os.O_RDONLY)
passes = 0
while not os.path.exists(stop):
    for i in range(length // CH):
        got = os.pread(fd, CH, i * CH)
        want = (i.to_bytes(8, "little") + (7).to_bytes(8, "little")) * (CH // 16)
        if got != want:
            sys.exit(f"pass {passes}: MiB {i} differs ({len(got)} bytes read)")
    os.stat(".")
    passes += 1
    with open(progress + ".tmp", "w") as f:
        f.write(str(passes))
    os.rename(progress + ".tmp", progress)
os.close(fd)
"#;

/// Takes an exclusive lock on FILE (F_SETLKW), says so in PROGRESS, holds it until STOP,
/// writes a marker beside it, then lets go. With `wait`, it is the waiter instead: it blocks
/// on the lock and checks, once it has it, that the holder let go first.
const LOCKER: &str = r#"
import fcntl, os, sys
path, stop, progress, role = sys.argv[1:5]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
if role == "hold":
    fcntl.lockf(fd, fcntl.LOCK_EX)
    with open(progress, "w") as f:
        f.write("locked")
    while not os.path.exists(stop):
        os.stat(path)
        import time; time.sleep(0.05)
    os.pwrite(fd, b"released", 0)
    os.fsync(fd)
    fcntl.lockf(fd, fcntl.LOCK_UN)
else:
    with open(progress, "w") as f:
        f.write("waiting")
    fcntl.lockf(fd, fcntl.LOCK_EX)
    if os.pread(fd, 8, 0) != b"released":
        sys.exit("got the lock while the holder still had it")
    with open(progress, "w") as f:
        f.write("acquired")
    fcntl.lockf(fd, fcntl.LOCK_UN)
os.close(fd)
"#;

const CH: u64 = 1 << 20;

/// Mount a's session lease: short, so that a session left behind by an earlier process
/// would expire (and its lock with it) within the test.
const LEASE_SECS: u64 = 2;

/// Checks, every 100 ms for two leases and a second, that the holder's lock is still held:
/// an earlier process's session, had it been abandoned rather than taken over, expires
/// within that time and its lock with it.
async fn lock_outlives_the_lease(lockf: &std::fs::File) {
    let until = tokio::time::Instant::now() + Duration::from_secs(2 * LEASE_SECS + 1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while tokio::time::Instant::now() < until {
        tick.tick().await;
        assert!(
            lock_is_held(lockf),
            "the lock went with an old session's lease"
        );
    }
}

fn chunk(i: u64, seed: u64) -> Vec<u8> {
    let mut one = i.to_le_bytes().to_vec();
    one.extend_from_slice(&seed.to_le_bytes());
    one.repeat((CH / 16) as usize)
}

/// The processes of one run, stopped (SIGKILL) by the guard if the test fails first.
struct Procs(Vec<(&'static str, Child)>);

impl Procs {
    fn python(&mut self, name: &'static str, script: &str, args: &[&str]) {
        let child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (scripts/setup installs it)");
        self.0.push((name, child));
    }

    /// Every process still runs.
    fn all_running(&mut self) {
        for (name, c) in &mut self.0 {
            assert!(
                c.try_wait().unwrap().is_none(),
                "{name} ended early: {:?}",
                c.try_wait()
            );
        }
    }

    /// Waits for each to end; each must end with 0.
    fn finish(&mut self) {
        for (name, mut c) in self.0.drain(..) {
            let status = c.wait().unwrap();
            assert!(status.success(), "{name} failed: {status}");
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Keeper processes by pid (those the test did not start as children: `--daemon` ones, and
/// keepers that took over): SIGKILLed by the guard, and the mount detached.
struct Keepers(Vec<i32>, PathBuf);

impl Drop for Keepers {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if is_mounted(&self.1) {
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The children of process `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn read_progress(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The writer's last good fsync offset and EIO count.
fn writer_at(p: &Path) -> (u64, u64) {
    let t = read_progress(p);
    let mut w = t.split_whitespace().filter_map(|x| x.parse::<u64>().ok());
    (w.next().unwrap_or(0), w.next().unwrap_or(0))
}

/// A lock probe from another mount: refused while the holder holds the lock.
fn lock_is_held(f: &std::fs::File) -> bool {
    let lock = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    matches!(
        nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETLK(&lock)),
        Err(nix::errno::Errno::EAGAIN)
    )
}

/// The run's files and processes on mount `a` (checked through mount `b`).
struct Run {
    dir: PathBuf,
    procs: Procs,
    ref_len: u64,
}

impl Run {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    async fn start(dir: &Path, a: &Path) -> Run {
        let ref_len = 24 * CH;
        std::fs::create_dir_all(a.join("d")).unwrap();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(a.join("d/ref")).unwrap();
            for i in 0..ref_len / CH {
                f.write_all(&chunk(i, 7)).unwrap();
            }
            f.sync_all().unwrap();
        }
        let mut run = Run {
            dir: dir.to_path_buf(),
            procs: Procs(Vec::new()),
            ref_len,
        };
        let (stop, big) = (run.p("stop"), a.join("big"));
        let args = |progress: PathBuf| [stop.clone(), progress];
        let [s, wp] = args(run.p("writer"));
        run.procs.python(
            "writer",
            WRITER,
            &[
                big.to_str().unwrap(),
                s.to_str().unwrap(),
                wp.to_str().unwrap(),
                "42",
            ],
        );
        let [s, rp] = args(run.p("reader"));
        run.procs.python(
            "reader",
            READER,
            &[
                a.join("d").to_str().unwrap(),
                s.to_str().unwrap(),
                rp.to_str().unwrap(),
                &ref_len.to_string(),
            ],
        );
        let lockf = a.join("lockf");
        let [s, hp] = args(run.p("holder"));
        run.procs.python(
            "holder",
            LOCKER,
            &[
                lockf.to_str().unwrap(),
                s.to_str().unwrap(),
                hp.to_str().unwrap(),
                "hold",
            ],
        );
        must_wait_for("the holder's lock", Duration::from_secs(30), || async {
            (read_progress(&hp) == "locked").then_some(())
        })
        .await;
        let [s, wtp] = args(run.p("waiter"));
        run.procs.python(
            "waiter",
            LOCKER,
            &[
                lockf.to_str().unwrap(),
                s.to_str().unwrap(),
                wtp.to_str().unwrap(),
                "wait",
            ],
        );
        must_wait_for("the waiter to wait", Duration::from_secs(30), || async {
            (read_progress(&wtp) == "waiting").then_some(())
        })
        .await;
        run.progressed(0, 0).await;
        run
    }

    /// Waits until the writer synced past `synced` (one more fsync) and the reader passed
    /// `passes`.
    async fn progressed(&mut self, synced: u64, passes: u64) -> (u64, u64) {
        let (wp, rp) = (self.p("writer"), self.p("reader"));
        let got = must_wait_for(
            "the writer and reader to go on",
            Duration::from_secs(90),
            || async {
                let (s, _) = writer_at(&wp);
                let r = read_progress(&rp).trim().parse::<u64>().unwrap_or(0);
                (s > synced && r > passes).then_some((s, r))
            },
        )
        .await;
        self.procs.all_running();
        got
    }

    /// Stops every process and checks what they did: the waiter got the lock after the
    /// holder, the writer's file is the pattern. The writer's EIO count.
    async fn finish(mut self, b: &Path) -> u64 {
        std::fs::write(self.p("stop"), b"").unwrap();
        self.procs.finish();
        assert_eq!(read_progress(&self.p("waiter")), "acquired");
        let done = read_progress(&self.p("writer"));
        let mut w = done
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse::<u64>().unwrap());
        let (len, eio) = (w.next().unwrap(), w.next().unwrap());
        assert!(len >= 32 * CH, "the writer wrote only {len} bytes");
        // Through the other mount, after every close: the whole file is the pattern.
        let got = std::fs::read(b.join("big")).unwrap();
        assert_eq!(got.len() as u64, len, "the file's size");
        for i in 0..len / CH {
            let want = chunk(i, 42);
            let at = (i * CH) as usize;
            assert!(
                got[at..at + CH as usize] == want[..],
                "MiB {i} of {} differs (writer saw {eio} EIO)",
                len / CH
            );
        }
        let r = std::fs::read(b.join("d/ref")).unwrap();
        assert_eq!(r.len() as u64, self.ref_len);
        eio
    }
}

/// (a) Upgrades: three times a freshly started binary takes the mount over while the
/// processes run; no call fails and no fsync reports a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_in_place_keep_every_process_running() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _) = must_one_node_volume(dir.path(), "disperse 3", 3, &[]).await;
    let a_path = dir.path().join("mnt-a");
    let mut a =
        Mount::start_with(&source, &a_path, &["--lease-secs", &LEASE_SECS.to_string()]).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let mut keepers = Keepers(Vec::new(), a_path.clone());
    // The new binaries: copies of mountd under other names.
    let bins: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("mountd-v{i}"));
            std::fs::copy(env!("CARGO_BIN_EXE_mountd"), &p).unwrap();
            p
        })
        .collect();
    let lockf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(b.path.join("lockf"))
        .unwrap();
    let mut run = Run::start(dir.path(), &a_path).await;
    assert!(lock_is_held(&lockf));
    let mut old = a.child.take().unwrap();
    let old_worker = children(old.id() as i32);
    assert_eq!(old_worker.len(), 1, "one worker under the keeper");
    let (mut synced, mut passes) = (0, 0);
    let mut foreground: Vec<Child> = Vec::new();
    for round in 0..3 {
        let bin = &bins[round % 2];
        if round == 1 {
            // As a daemon: it returns once it serves the mount.
            let out = Command::new(bin)
                .args(["--daemon", &source, a_path.to_str().unwrap()])
                .args(["--lease-secs", &LEASE_SECS.to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let pid: i32 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .strip_prefix("pid ")
                .and_then(|p| p.parse().ok())
                .expect("the daemon's pid");
            keepers.0.push(pid);
        } else {
            foreground.push(
                Command::new(bin)
                    .arg(&source)
                    .arg(&a_path)
                    .args(["--lease-secs", &LEASE_SECS.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap(),
            );
        }
        // The old keeper hands over and exits 0, leaving the mount mounted.
        let status = must_wait_for("the old mountd to exit", Duration::from_secs(60), || {
            let s = old.try_wait().unwrap();
            async move { s }
        })
        .await;
        assert!(status.success(), "round {round}: old mountd: {status}");
        assert!(is_mounted(&a_path));
        assert!(lock_is_held(&lockf), "round {round}: the lock went");
        (synced, passes) = run.progressed(synced, passes).await;
        // The next round's old keeper: this one (a child, or the daemon by pid).
        if round == 1 {
            let pid = *keepers.0.last().unwrap();
            old = wait_pid_child(pid);
        } else {
            old = foreground.pop().unwrap();
        }
    }
    lock_outlives_the_lease(&lockf).await;
    let eio = run.finish(&b.path).await;
    assert_eq!(eio, 0, "an upgrade lost writes");
    drop(lockf);
    let _ = old.kill();
    let _ = old.wait();
}

/// A `Child`-like wait for a daemon's pid (not this process's child): polls /proc.
fn wait_pid_child(pid: i32) -> Child {
    // A placeholder child that ends when `pid` does: `tail --pid` waits for it.
    Command::new("tail")
        .arg(format!("--pid={pid}"))
        .arg("-f")
        .arg("/dev/null")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// (b) Crashes: the worker is SIGKILLed ten times while the processes run; every process
/// goes on and the written file is the pattern; fsync reported each loss (the writer
/// rewrote from its last good fsync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_nothing_is_lost_silently() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _) = must_one_node_volume(dir.path(), "disperse 3", 3, &[]).await;
    let a_path = dir.path().join("mnt-a");
    let a = Mount::start_with(&source, &a_path, &["--lease-secs", &LEASE_SECS.to_string()]).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let keeper = a.child.as_ref().unwrap().id() as i32;
    let lockf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(b.path.join("lockf"))
        .unwrap();
    let mut run = Run::start(dir.path(), &a_path).await;
    let (mut synced, mut passes) = (0, 0);
    let kills = 10;
    for round in 0..kills {
        let workers = children(keeper);
        assert_eq!(workers.len(), 1, "round {round}: workers {workers:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(workers[0]),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        must_wait_for("a new worker", Duration::from_secs(30), || async {
            let now = children(keeper);
            (now.len() == 1 && now[0] != workers[0]).then_some(())
        })
        .await;
        (synced, passes) = run.progressed(synced, passes).await;
        assert!(lock_is_held(&lockf), "round {round}: the lock went");
    }
    lock_outlives_the_lease(&lockf).await;
    let eio = run.finish(&b.path).await;
    assert!(eio <= kills, "{eio} losses reported for {kills} crashes");
    drop(lockf);
    drop(a);
}
