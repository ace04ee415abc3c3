//! What real programs ask of a mount beyond single calls, on real FUSE mounts of one volume
//! through two mountd processes: blocking locks (F_SETLKW and flock) that wait without
//! holding FUSE workers, wake on release, end with EINTR on a signal and leave nothing when
//! their process is killed; counters kept exact by processes on both mounts under a lock;
//! timestamps as ext4 keeps them; open descriptors that outlive their names on another
//! mount while the GC runs; fsync through any descriptor; sizes after truncates on another
//! mount; fallocate modes against a local file; statfs from the bricks' real space.
//!
//! Lock workers are python3 processes (POSIX locks belong to processes, so threads of the
//! test cannot conflict with each other). Every process is stopped by pid, every mount
//! undone by its guard.

mod common;

use brickfs_client::MetaClient;
use brickfs_proto::meta::{MetaRead, MetaReply};
use brickfs_proto::{Ino, VolumeId};
use common::mount::Mount;
use common::*;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

async fn volume_id(meta: &MetaClient) -> VolumeId {
    match meta
        .read(MetaRead::VolumeByName { name: "vol".into() })
        .await
        .unwrap()
    {
        MetaReply::Volume(v) => v.id,
        other => panic!("unexpected {other:?}"),
    }
}

async fn gc_queue(meta: &MetaClient, volume: VolumeId) -> Vec<Ino> {
    match meta
        .read(MetaRead::ListGc {
            volume,
            limit: 1000,
        })
        .await
        .unwrap()
    {
        MetaReply::Gc(items) => items.into_iter().map(|i| i.ino).collect(),
        other => panic!("unexpected {other:?}"),
    }
}

/// A child process killed by pid when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> i32 {
        self.0.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for the process to end, at most `limit`; its exit code (None: killed by a
    /// signal).
    async fn must_exit(&mut self, what: &str, limit: Duration) -> Option<i32> {
        let child = self.0.as_mut().expect("running");
        let status = must_wait_for(what, limit, || {
            let s = child.try_wait().unwrap();
            async move { s }
        })
        .await;
        self.0 = None;
        status.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn python(script: &str, args: &[String]) -> Proc {
    Proc(Some(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (scripts/setup installs it)"),
    ))
}

/// Adds one to a 16-digit counter at the start of a file `n` times, each under an exclusive
/// lock (`posix`: lockf, which is F_SETLKW; `flock`: flock(LOCK_EX)).
const COUNTER: &str = r#"
import fcntl, os, sys
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
for _ in range(n):
    if mode == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    v = int(os.pread(fd, 16, 0))
    os.pwrite(fd, b"%016d" % (v + 1), 0)
    if mode == "posix":
        fcntl.lockf(fd, fcntl.LOCK_UN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
os.close(fd)
"#;

/// Several processes on each of two mounts add to one counter under F_SETLKW, then under
/// flock: every increment is kept (a lock hands over the holder's writes and drops the next
/// holder's stale pages), no waiter crashes the mount, and no lock is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_stay_exact_under_blocking_locks_from_two_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _meta) = must_one_node_volume(dir.path(), "disperse 3", 3, &[]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    const PER_MOUNT: usize = 3;
    const ROUNDS: usize = 20;
    for mode in ["posix", "flock"] {
        let name = format!("counter-{mode}");
        std::fs::write(a.path.join(&name), format!("{:016}", 0)).unwrap();
        let mut procs: Vec<Proc> = Vec::new();
        for m in [&a, &b] {
            for _ in 0..PER_MOUNT {
                let path = m.path.join(&name).display().to_string();
                procs.push(python(
                    COUNTER,
                    &[path, mode.to_string(), ROUNDS.to_string()],
                ));
            }
        }
        for p in &mut procs {
            let code = p
                .must_exit("a counter process", Duration::from_secs(240))
                .await;
            assert_eq!(code, Some(0), "a {mode} counter process failed");
        }
        let want = 2 * PER_MOUNT * ROUNDS;
        for m in [&a, &b] {
            let got = std::fs::read_to_string(m.path.join(&name)).unwrap();
            assert_eq!(
                got.trim().parse::<usize>().unwrap(),
                want,
                "{mode} counter read through {}",
                m.path.display()
            );
        }
        // Nothing is left locked: a non-blocking exclusive lock is granted at once.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(b.path.join(&name))
            .unwrap();
        setlk(&f, nix::libc::F_WRLCK).unwrap();
        // (flock is a whole-file lock of the open file, so it conflicts with our own fcntl
        // lock, as on NFS: that goes first.)
        setlk(&f, nix::libc::F_UNLCK).unwrap();
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
    }
}

/// Appends `n` numbered lines to a file opened O_APPEND, each under lockf (F_SETLKW).
const APPENDER: &str = r#"
import fcntl, os, sys
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
for i in range(n):
    fcntl.lockf(fd, fcntl.LOCK_EX)
    os.write(fd, b"%s %04d\n" % (tag.encode(), i))
    fcntl.lockf(fd, fcntl.LOCK_UN)
os.close(fd)
"#;

/// Processes on two mounts append to one O_APPEND file under a lock: no line overwrites
/// another (the append goes to the end the lock handed over, not the kernel's cached one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_mounts_under_a_lock_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _meta) = must_one_node_volume(dir.path(), "replica 3", 3, &[]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    std::fs::write(a.path.join("log"), b"").unwrap();
    const LINES: usize = 40;
    let mut procs: Vec<Proc> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, tag)| {
            let m = if i % 2 == 0 { &a } else { &b };
            let path = m.path.join("log").display().to_string();
            python(APPENDER, &[path, tag.to_string(), LINES.to_string()])
        })
        .collect();
    for p in &mut procs {
        let code = p.must_exit("an appender", Duration::from_secs(240)).await;
        assert_eq!(code, Some(0));
    }
    for m in [&a, &b] {
        let text = std::fs::read_to_string(m.path.join("log")).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            4 * LINES,
            "lines read through {}",
            m.path.display()
        );
        lines.sort();
        lines.dedup();
        assert_eq!(lines.len(), 4 * LINES, "every line once");
        assert!(lines.iter().all(|l| l.len() == 6), "no torn line");
    }
}

fn setlk(f: &std::fs::File, typ: i32) -> nix::Result<nix::libc::c_int> {
    nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETLK(&lock_range(typ, 0, 0)))
}

/// Waits for a lock (`posix` or `flock`) on a file, appends its pid to a log once it holds
/// it, and lets it go. SIGUSR1 makes the wait end with an exception: exit code 3.
const WAITER: &str = r#"
import fcntl, os, signal, sys
path, mode, log = sys.argv[1], sys.argv[2], sys.argv[3]
class Interrupted(Exception):
    pass
def on_usr1(sig, frame):
    raise Interrupted()
signal.signal(signal.SIGUSR1, on_usr1)
fd = os.open(path, os.O_RDWR)
try:
    if mode == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
except Interrupted:
    sys.exit(3)
with open(log, "a") as f:
    f.write("%d\n" % os.getpid())
os.close(fd)
"#;

/// Whether process `pid` sleeps in system call `nr` (/proc/PID/syscall).
fn in_syscall(pid: i32, nr: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .is_some_and(|first| first == nr.to_string())
}

/// More waiters than the mount has FUSE threads block on a lock held through another mount:
/// the mount keeps serving other callers; a waiter signalled mid-wait gets EINTR and never
/// takes the lock; a waiter killed mid-wait leaves nothing behind; the rest are woken one by
/// one when the holder lets go. For fcntl locks and for flock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waiters_are_interruptible_and_never_hang_the_mount() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _meta) = must_one_node_volume(dir.path(), "replica 3", 3, &[]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start_with(&source, &dir.path().join("mnt-b"), &["--threads", "2"]).await;
    const WAITERS: usize = 8;
    for (mode, syscall) in [
        ("posix", nix::libc::SYS_fcntl),
        ("flock", nix::libc::SYS_flock),
    ] {
        let name = format!("lock-{mode}");
        std::fs::write(a.path.join(&name), b"x").unwrap();
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(a.path.join(&name))
            .unwrap();
        let holder = if mode == "posix" {
            setlk(&holder, nix::libc::F_WRLCK).unwrap();
            Some(holder)
        } else {
            None
        };
        let flock_holder = match holder {
            Some(_) => None,
            None => Some(
                nix::fcntl::Flock::lock(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(a.path.join(&name))
                        .unwrap(),
                    nix::fcntl::FlockArg::LockExclusiveNonblock,
                )
                .map_err(|(_, e)| e)
                .unwrap(),
            ),
        };
        let log: PathBuf = dir.path().join(format!("log-{mode}"));
        std::fs::write(&log, b"").unwrap();
        let mut waiters: Vec<Proc> = (0..WAITERS)
            .map(|_| {
                python(
                    WAITER,
                    &[
                        b.path.join(&name).display().to_string(),
                        mode.to_string(),
                        log.display().to_string(),
                    ],
                )
            })
            .collect();
        for w in &waiters {
            let pid = w.pid();
            must_wait_for(
                "a waiter to block",
                Duration::from_secs(30),
                || async move { in_syscall(pid, syscall).then_some(()) },
            )
            .await;
        }
        // The mount still serves everyone else, with every FUSE thread's worth of waiters.
        let other = b.path.join(format!("other-{mode}"));
        let served = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                std::fs::write(&other, b"still served").unwrap();
                std::fs::read(&other).unwrap()
            }),
        )
        .await
        .expect("the mount answers other callers while waiters wait")
        .unwrap();
        assert_eq!(served, b"still served");

        // Two are signalled, two are killed, all mid-wait.
        waiters[0].signal(Signal::SIGUSR1);
        waiters[1].signal(Signal::SIGUSR1);
        waiters[2].signal(Signal::SIGKILL);
        waiters[3].signal(Signal::SIGKILL);
        for (i, w) in waiters.iter_mut().enumerate().take(4) {
            let code = w
                .must_exit("a signalled waiter to end", Duration::from_secs(30))
                .await;
            assert_eq!(code, if i < 2 { Some(3) } else { None }, "waiter {i}");
        }
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "",
            "nobody got it yet"
        );

        // The holder lets go: the other four are woken and take it in turn.
        drop(holder);
        drop(flock_holder);
        let mut want: Vec<i32> = waiters[4..].iter().map(Proc::pid).collect();
        for w in &mut waiters[4..] {
            let code = w
                .must_exit("a waiter to get the lock", Duration::from_secs(60))
                .await;
            assert_eq!(code, Some(0));
        }
        let mut got: Vec<i32> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(
            got, want,
            "exactly the waiters that kept waiting got the lock"
        );
        // The interrupted and killed waiters left nothing: the lock is free on both mounts.
        for m in [&a, &b] {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.path.join(&name))
                .unwrap();
            setlk(&f, nix::libc::F_WRLCK).unwrap();
            drop(f);
            let f = std::fs::File::open(m.path.join(&name)).unwrap();
            let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| e)
                .unwrap();
            drop(f);
        }
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

fn ctime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec())
}

/// Until the clock has moved past `t` (in ns), so that a new timestamp differs from it.
async fn must_pass(t: i128) {
    must_wait_for("the clock to move", Duration::from_secs(5), || async move {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        (now > t + 10_000_000).then_some(())
    })
    .await;
}

/// Writes (appends, pwrite, through write-behind), truncates and fallocate move mtime and
/// ctime, seen through the writing mount at once and through another after close-to-open;
/// utimensat with UTIME_OMIT keeps a time and UTIME_NOW sets it; a read moves atime the
/// way relatime does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_truncates_and_fallocate_move_mtime_as_on_ext4() {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _meta) = must_one_node_volume(dir.path(), "disperse 3", 3, &[]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let (fa, fb) = (a.path.join("f"), b.path.join("f"));
    std::fs::write(&fa, b"hello").unwrap();
    let before = std::fs::metadata(&fa).unwrap();

    // An append through an open descriptor: visible at once on this mount...
    must_pass(mtime_ns(&before)).await;
    let f = std::fs::OpenOptions::new().append(true).open(&fa).unwrap();
    std::io::Write::write_all(&mut &f, b" world").unwrap();
    let during = std::fs::metadata(&fa).unwrap();
    assert!(mtime_ns(&during) > mtime_ns(&before), "append moves mtime");
    assert!(ctime_ns(&during) > ctime_ns(&before), "append moves ctime");
    drop(f);
    // ...and on the other mount after the close.
    let after_b = std::fs::File::open(&fb).unwrap().metadata().unwrap();
    assert_eq!(after_b.len(), 11);
    assert!(
        mtime_ns(&after_b) > mtime_ns(&before),
        "the other mount sees it"
    );

    // pwrite inside the file (no size change).
    let t0 = std::fs::File::open(&fb).unwrap().metadata().unwrap();
    must_pass(mtime_ns(&t0)).await;
    let f = std::fs::OpenOptions::new().write(true).open(&fb).unwrap();
    f.write_all_at(b"J", 0).unwrap();
    drop(f);
    // Close-to-open: an open on the other mount sees the close's times.
    let t1 = std::fs::File::open(&fa).unwrap().metadata().unwrap();
    assert!(mtime_ns(&t1) > mtime_ns(&t0), "an overwrite moves mtime");
    assert_eq!(std::fs::read(&fa).unwrap(), b"Jello world");

    // truncate, up and down.
    must_pass(mtime_ns(&t1)).await;
    let f = std::fs::OpenOptions::new().write(true).open(&fa).unwrap();
    f.set_len(3).unwrap();
    let t2 = std::fs::metadata(&fa).unwrap();
    assert!(mtime_ns(&t2) > mtime_ns(&t1), "truncate moves mtime");
    assert!(ctime_ns(&t2) > ctime_ns(&t1), "truncate moves ctime");

    // fallocate growing the file.
    must_pass(mtime_ns(&t2)).await;
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 4096).unwrap();
    let t3 = std::fs::metadata(&fa).unwrap();
    assert_eq!(t3.len(), 4096);
    assert!(mtime_ns(&t3) > mtime_ns(&t2), "fallocate moves mtime");
    drop(f);

    // utimensat: set mtime, leave atime (UTIME_OMIT); then UTIME_NOW for both.
    let old = TimeSpec::new(1_000_000_000, 5);
    utimensat(
        nix::fcntl::AT_FDCWD,
        &fa,
        &TimeSpec::UTIME_OMIT,
        &old,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let t4 = std::fs::File::open(&fb).unwrap().metadata().unwrap();
    assert_eq!((t4.mtime(), t4.mtime_nsec()), (1_000_000_000, 5));
    assert_eq!(t4.atime(), t3.atime(), "UTIME_OMIT keeps atime");
    utimensat(
        nix::fcntl::AT_FDCWD,
        &fa,
        &TimeSpec::UTIME_NOW,
        &TimeSpec::UTIME_NOW,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let t5 = std::fs::metadata(&fa).unwrap();
    assert!(mtime_ns(&t5) >= mtime_ns(&t3), "UTIME_NOW sets now");

    // relatime: atime older than mtime moves on the next read.
    utimensat(
        nix::fcntl::AT_FDCWD,
        &fa,
        &TimeSpec::new(1_000, 0),
        &TimeSpec::UTIME_OMIT,
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    std::fs::read(&fa).unwrap();
    must_wait_for("atime to move", Duration::from_secs(10), || {
        let m = std::fs::File::open(&fb).unwrap().metadata().unwrap();
        async move { (m.atime() > 1_000).then_some(()) }
    })
    .await;
}

/// A file open on one mount stays readable and writable after another mount renames a file
/// over it or unlinks it, while the GC runs (a deleted sentinel file is collected meanwhile);
/// its objects go only after its last close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_files_outlive_their_names_on_every_mount() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, meta) = must_one_node_volume(dir.path(), "replica 3", 3, &[]).await;
    let volume = volume_id(&meta).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let data = pattern(3, 0, 3 << 20);
    std::fs::write(a.path.join("victim"), &data).unwrap();
    std::fs::write(a.path.join("unlinked"), &data).unwrap();
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path.join("victim"))
        .unwrap();
    let held_ino = Ino(held.metadata().unwrap().ino());
    let held2 = std::fs::File::open(a.path.join("unlinked")).unwrap();
    let held2_ino = Ino(held2.metadata().unwrap().ino());
    // Replaced and removed through the other mount.
    std::fs::write(b.path.join("new"), b"replacement").unwrap();
    std::fs::rename(b.path.join("new"), b.path.join("victim")).unwrap();
    std::fs::remove_file(b.path.join("unlinked")).unwrap();
    // A sentinel, not held, deleted after them: once the GC collected it, it has run.
    std::fs::write(b.path.join("sentinel"), b"gone soon").unwrap();
    let sentinel = Ino(std::fs::metadata(b.path.join("sentinel")).unwrap().ino());
    std::fs::remove_file(b.path.join("sentinel")).unwrap();
    must_wait_for(
        "the GC to collect the sentinel",
        Duration::from_secs(60),
        || {
            let meta = meta.clone();
            async move {
                let q = gc_queue(&meta, volume).await;
                assert!(
                    !q.contains(&held_ino) && !q.contains(&held2_ino),
                    "held files queued"
                );
                (!q.contains(&sentinel)).then_some(())
            }
        },
    )
    .await;
    std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
    let mut buf = vec![0u8; data.len()];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == data[..], "the replaced file reads what was written");
    held2.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == data[..], "the unlinked file reads what was written");
    // Still writable, and it reads back.
    held.write_all_at(b"still mine", 1 << 20).unwrap();
    held.sync_all().unwrap();
    let mut small = [0u8; 10];
    held.read_exact_at(&mut small, 1 << 20).unwrap();
    assert_eq!(&small, b"still mine");
    // The name is the replacement's on both mounts (a's entry cache lasts its TTL).
    assert!(std::fs::read(b.path.join("victim")).unwrap() == b"replacement");
    let on_a = a.path.join("victim");
    must_wait_for(
        "a to see the new file by name",
        Duration::from_secs(10),
        || {
            let same = std::fs::read(&on_a).unwrap() == b"replacement";
            async move { same.then_some(()) }
        },
    )
    .await;
    // The last close lets them go (the release is batched): they leave the namespace, and
    // the GC queue takes them and empties.
    drop(held);
    drop(held2);
    must_wait_for(
        "the closed files to be collected",
        Duration::from_secs(60),
        || {
            let meta = meta.clone();
            async move {
                let files = match meta
                    .read(MetaRead::Files {
                        volume,
                        after: Ino(0),
                        limit: 100,
                    })
                    .await
                    .unwrap()
                {
                    MetaReply::Files { files, .. } => files,
                    other => panic!("unexpected {other:?}"),
                };
                let q = gc_queue(&meta, volume).await;
                let gone = |ino: Ino| !q.contains(&ino) && files.iter().all(|f| f.ino != ino);
                (gone(held_ino) && gone(held2_ino)).then_some(())
            }
        },
    )
    .await;
}

/// fsync through one descriptor makes durable and visible what another descriptor of the
/// same mount wrote (write-behind included); a truncate through another mount followed by a
/// write below the old end leaves the size the write implies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_covers_every_descriptor_and_sizes_follow_the_last_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _meta) = must_one_node_volume(dir.path(), "disperse 3", 3, &[]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let data = pattern(9, 0, 300 << 10);
    std::fs::write(a.path.join("f"), b"").unwrap();
    let w1 = std::fs::OpenOptions::new()
        .write(true)
        .open(a.path.join("f"))
        .unwrap();
    let w2 = std::fs::OpenOptions::new()
        .write(true)
        .open(a.path.join("f"))
        .unwrap();
    w1.write_all_at(&data, 0).unwrap();
    w2.sync_all().unwrap();
    // Another mount, opening after the fsync, sees every byte.
    assert!(std::fs::read(b.path.join("f")).unwrap() == data[..]);

    // b cuts the file; a (still open) writes below the old end: the size is the write's end.
    std::fs::OpenOptions::new()
        .write(true)
        .open(b.path.join("f"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let a_sees = std::fs::metadata(a.path.join("f")).unwrap().len();
    assert_eq!(a_sees, 0, "a's stat follows b's truncate");
    w1.write_all_at(b"0123456789", 100).unwrap();
    drop(w1);
    drop(w2);
    let got = std::fs::read(b.path.join("f")).unwrap();
    let mut want = vec![0u8; 110];
    want[100..].copy_from_slice(b"0123456789");
    assert_eq!(got, want);
}

/// What fallocate(2) does to a file's bytes, as ext4 does it (the oracle for the mount).
fn fallocate_model(file: &mut Vec<u8>, mode: nix::fcntl::FallocateFlags, off: usize, len: usize) {
    use nix::fcntl::FallocateFlags as F;
    let keep = mode.contains(F::FALLOC_FL_KEEP_SIZE);
    let end = off + len;
    if !keep && end > file.len() {
        file.resize(end, 0);
    }
    if mode.intersects(F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_ZERO_RANGE) {
        let stop = end.min(file.len());
        if off < stop {
            file[off..stop].fill(0);
        }
    }
}

/// fallocate's modes (0, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, with and without KEEP_SIZE) do
/// to a file on every volume type what ext4 does: same size, same bytes, checked against a
/// model of each step. Modes it cannot do answer EOPNOTSUPP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallocate_modes_match_ext4_on_every_volume_type() {
    use nix::fcntl::{FallocateFlags as F, fallocate};
    let dir = tempfile::tempdir().unwrap();
    let kinds: [(&str, usize); 3] = [("", 2), ("replica 3", 3), ("disperse 3", 3)];
    let steps: [(F, usize, usize); 7] = [
        (F::empty(), 0, 100_000),
        (F::FALLOC_FL_KEEP_SIZE, 90_000, 200_000),
        (
            F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
            10_000,
            30_000,
        ),
        (F::FALLOC_FL_ZERO_RANGE, 50_000, 10_000),
        (F::FALLOC_FL_ZERO_RANGE, 115_000, 20_000),
        (
            F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE,
            130_000,
            50_000,
        ),
        (F::empty(), 200_000, 1),
    ];
    for (k, (kind, n)) in kinds.iter().enumerate() {
        let vdir = dir.path().join(format!("v{k}"));
        std::fs::create_dir_all(&vdir).unwrap();
        let (_node, source, _meta) = must_one_node_volume(&vdir, kind, *n, &[]).await;
        let m = Mount::start(&source, &vdir.join("mnt")).await;
        let mut model = pattern(k as u64, 0, 120_000).to_vec();
        let path = m.path.join("f");
        std::fs::write(&path, &model).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        for (mode, off, len) in steps {
            fallocate(&f, mode, off as i64, len as i64)
                .unwrap_or_else(|e| panic!("{kind:?} {mode:?}: {e}"));
            fallocate_model(&mut model, mode, off, len);
            assert_eq!(
                f.metadata().unwrap().len(),
                model.len() as u64,
                "{kind:?} {mode:?}"
            );
            let mut got = vec![0u8; model.len()];
            f.read_exact_at(&mut got, 0).unwrap();
            assert!(got == model, "{kind:?}: bytes after {mode:?} {off} {len}");
        }
        assert_eq!(
            fallocate(&f, F::FALLOC_FL_COLLAPSE_RANGE, 0, 4096).err(),
            Some(nix::errno::Errno::EOPNOTSUPP)
        );
        drop(f);
        assert!(
            std::fs::read(&path).unwrap() == model,
            "{kind:?}: after close"
        );
    }
}

/// statfs reports the bricks' real space through the layout: free below total, and a
/// replica-3 volume of three bricks on one disk shows one disk's worth (a third of the raw
/// space of its three bricks), not three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statfs_reports_real_free_space_through_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source, _meta) = must_one_node_volume(dir.path(), "replica 3", 3, &[]).await;
    let m = Mount::start(&source, &dir.path().join("mnt")).await;
    let disk = nix::sys::statvfs::statvfs(dir.path()).unwrap();
    let vol = nix::sys::statvfs::statvfs(&m.path).unwrap();
    let bytes = |blocks: u64, size: u64| blocks as f64 * size as f64;
    let disk_total = bytes(disk.blocks(), disk.fragment_size());
    let vol_total = bytes(vol.blocks(), vol.fragment_size());
    let vol_free = bytes(vol.blocks_available(), vol.fragment_size());
    assert!(
        (vol_total / disk_total - 1.0).abs() < 0.01,
        "total {vol_total} against one disk's {disk_total}"
    );
    assert!(
        vol_free < vol_total,
        "free {vol_free} below total {vol_total}"
    );
    let disk_free = bytes(disk.blocks_available(), disk.fragment_size());
    assert!(
        (vol_free / disk_free - 1.0).abs() < 0.05,
        "free {vol_free} against the disk's {disk_free}"
    );
}

/// Data that was written never reads back as zeros: with every copy of a file's object gone
/// (what the GC of a live file did), a read through the mount fails with EIO; a sparse
/// striped file and a file only truncated up still read their holes as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_object_reads_as_an_error_never_as_zeros() {
    for (head, n) in [
        ("replica 3", 3),
        ("disperse 3 redundancy 1", 3),
        ("stripe 2", 2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_node, source, meta) = must_one_node_volume(dir.path(), head, n, &[]).await;
        let rec = match meta
            .read(MetaRead::VolumeByName { name: "vol".into() })
            .await
            .unwrap()
        {
            MetaReply::Volume(v) => v,
            other => panic!("unexpected {other:?}"),
        };
        let m = Mount::start(&source, &dir.path().join("mnt")).await;
        // A sparse file: on the striped volume its second column gets no byte written.
        let sparse = m.path.join("sparse");
        {
            let f = std::fs::File::create(&sparse).unwrap();
            f.write_all_at(b"head", 0).unwrap();
            f.write_all_at(b"tail", (3 << 20) - 4).unwrap();
        }
        let grown = m.path.join("grown");
        std::fs::File::create(&grown)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let data = pattern(12, 0, 1 << 20);
        let victim = m.path.join("victim");
        std::fs::write(&victim, &data).unwrap();
        let ino = std::fs::metadata(&victim).unwrap().ino();
        std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
        let got = std::fs::read(&sparse).unwrap();
        assert_eq!(got.len(), 3 << 20, "{head}: sparse size");
        assert!(
            &got[..4] == b"head" && &got[got.len() - 4..] == b"tail",
            "{head}: sparse ends"
        );
        assert!(
            got[4..got.len() - 4].iter().all(|b| *b == 0),
            "{head}: the sparse file's hole reads as zeros"
        );
        let got = std::fs::read(&grown).unwrap();
        assert!(
            got.len() == 1 << 20 && got.iter().all(|b| *b == 0),
            "{head}: a file truncated up reads as zeros"
        );
        assert!(std::fs::read(&victim).unwrap() == data, "{head}: victim");
        // Every copy of the victim's objects goes, on every brick.
        let c = client();
        let mut deleted = 0;
        for b in &rec.bricks {
            let addr = node_addr(&rec, b.brick);
            for column in 0..rec.stripe.max(1) {
                let k = brickfs_proto::ObjectKey {
                    volume: rec.id,
                    ino: Ino(ino),
                    column,
                };
                if c.delete(addr, b.brick, k).await.unwrap() {
                    deleted += 1;
                }
            }
        }
        assert!(deleted >= n.min(2), "{head}: deleted {deleted} objects");
        std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
        let victim2 = victim.clone();
        let r = tokio::task::spawn_blocking(move || std::fs::read(victim2))
            .await
            .unwrap();
        match r {
            Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::EIO), "{head}: {e}"),
            Ok(got) => panic!(
                "{head}: a file whose objects are gone read {} bytes ({} zeros)",
                got.len(),
                got.iter().filter(|b| **b == 0).count()
            ),
        }
        // The mount still serves everything else.
        assert!(std::fs::read(&sparse).unwrap().len() == 3 << 20);
    }
}
