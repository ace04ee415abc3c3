//! Real FUSE mounts of a volume through mountd: files written through one mount read back
//! byte for byte through another (close-to-open), namespace calls give Linux's errnos, and
//! SIGTERM unmounts. Every mount is undone by a guard, failures included.

mod common;

use brickfs_testkit::Brickd;
use common::mount::Mount;
use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A running mountd; dropping it stops it by pid and makes sure nothing stays mounted.
use mountd::is_mounted;

/// A daemonized mountd (by pid) and its mount point: SIGKILLed and detached when dropped.
struct DaemonGuard(i32, PathBuf);

impl DaemonGuard {
    /// The guard of the daemon a successful `--daemon` run (or helper run) left, by the pid it
    /// printed.
    fn from_output(out: &std::process::Output, path: &Path) -> DaemonGuard {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .strip_prefix("pid ")
            .and_then(|p| p.parse().ok())
            .expect("the daemon's pid");
        DaemonGuard(pid, path.to_path_buf())
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
        if is_mounted(&self.1) {
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// One node and a started dispersed 2+1 volume "vol" over three bricks.
async fn must_volume_here(dir: &Path) -> (Brickd, String) {
    let (node, source, _) = must_one_node_volume(dir, "disperse 3", 3, &[]).await;
    (node, source)
}

fn setlk(f: &std::fs::File, typ: i32, start: i64, len: i64) -> nix::Result<nix::libc::c_int> {
    nix::fcntl::fcntl(
        f,
        nix::fcntl::FcntlArg::F_SETLK(&lock_range(typ, start, len)),
    )
}

/// A POSIX lock taken through one mount blocks a conflicting lock through another; F_GETLK
/// reports it; unlocking lets the other in; and when the holder's mountd dies, its lock goes
/// with its session's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_locks_hold_across_mounts_and_die_with_their_holder() {
    use nix::libc::{F_RDLCK, F_UNLCK, F_WRLCK};
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let mut a = Mount::start_with(&source, &dir.path().join("mnt-a"), &["--lease-secs", "2"]).await;
    let b = Mount::start_with(&source, &dir.path().join("mnt-b"), &["--lease-secs", "2"]).await;
    std::fs::write(a.path.join("f"), b"0123456789").unwrap();
    let fa = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path.join("f"))
        .unwrap();
    let fb = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.path.join("f"))
        .unwrap();

    setlk(&fa, F_WRLCK, 0, 100).unwrap();
    assert_eq!(setlk(&fb, F_RDLCK, 50, 10), Err(nix::errno::Errno::EAGAIN));
    let mut probe = lock_range(F_WRLCK, 60, 1);
    nix::fcntl::fcntl(&fb, nix::fcntl::FcntlArg::F_GETLK(&mut probe)).unwrap();
    assert_eq!(
        (probe.l_type as i32, probe.l_start, probe.l_len),
        (F_WRLCK, 0, 100)
    );
    // Unlock the middle: the rest stays locked.
    setlk(&fa, F_UNLCK, 40, 30).unwrap();
    setlk(&fb, F_RDLCK, 50, 10).unwrap();
    assert_eq!(setlk(&fb, F_WRLCK, 30, 20), Err(nix::errno::Errno::EAGAIN));
    setlk(&fb, F_UNLCK, 0, 0).unwrap();

    // The holder dies: its lock goes when its lease runs out.
    setlk(&fa, F_WRLCK, 200, 100).unwrap();
    assert_eq!(setlk(&fb, F_WRLCK, 250, 1), Err(nix::errno::Errno::EAGAIN));
    drop(fa);
    // Closing released a's locks: b gets the range, lets it go, and a takes it again.
    setlk(&fb, F_WRLCK, 250, 1).unwrap();
    setlk(&fb, F_UNLCK, 0, 0).unwrap();
    let fa = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path.join("f"))
        .unwrap();
    setlk(&fa, F_WRLCK, 200, 100).unwrap();
    assert_eq!(setlk(&fb, F_WRLCK, 250, 1), Err(nix::errno::Errno::EAGAIN));
    if let Some(mut child) = a.child.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    must_wait_for(
        "the dead holder's lock to go",
        Duration::from_secs(30),
        || async { setlk(&fb, F_WRLCK, 250, 1).ok() },
    )
    .await;
    drop(fa);
    drop(a);
    drop(b);
}

/// Runs a shell command as another user (setpriv from util-linux); returns its exit code and
/// stderr.
fn as_user(uid: u32, script: &str) -> (i32, String) {
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ])
        .output()
        .expect("run setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Permission checks by uid and gid as non-root users: mode bits on directories and files, the
/// sticky bit protecting other users' files, chown refused to non-owners, and setgid
/// directories passing their group on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_hold_for_non_root_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let m = Mount::start(&source, &dir.path().join("mnt")).await;
    let p = m.path.clone();
    let q = |name: &str| p.join(name).display().to_string();
    std::fs::create_dir(p.join("private")).unwrap();
    std::fs::set_permissions(p.join("private"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, err) = as_user(1000, &format!("touch {}/x", q("private")));
    assert_ne!(code, 0, "a user wrote into root's 0755 directory");
    assert!(err.contains("Permission denied"), "{err}");

    std::fs::create_dir(p.join("tmp")).unwrap();
    std::fs::set_permissions(p.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (code, err) = as_user(
        1000,
        &format!(
            "echo mine > {}/mine && chmod 600 {}/mine",
            q("tmp"),
            q("tmp")
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::metadata(p.join("tmp/mine")).unwrap().uid(), 1000);
    let (code, err) = as_user(1001, &format!("cat {}/mine", q("tmp")));
    assert_ne!(code, 0, "another user read a 0600 file");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, err) = as_user(1001, &format!("rm -f {}/mine", q("tmp")));
    assert_ne!(
        code, 0,
        "the sticky bit did not protect another user's file"
    );
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _) = as_user(1001, &format!("chown 1001 {}/mine", q("tmp")));
    assert_ne!(code, 0, "a non-owner changed a file's owner");
    let (code, err) = as_user(1000, &format!("rm {}/mine", q("tmp")));
    assert_eq!(code, 0, "the owner could not remove its file: {err}");

    std::fs::create_dir(p.join("shared")).unwrap();
    std::os::unix::fs::chown(p.join("shared"), None, Some(4242)).unwrap();
    std::fs::set_permissions(p.join("shared"), std::fs::Permissions::from_mode(0o2777)).unwrap();
    let (code, err) = as_user(
        1000,
        &format!("touch {}/f && mkdir {}/d", q("shared"), q("shared")),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::metadata(p.join("shared/f")).unwrap().gid(), 4242);
    let d = std::fs::metadata(p.join("shared/d")).unwrap();
    assert_eq!(d.gid(), 4242);
    assert_ne!(
        d.mode() & 0o2000,
        0,
        "setgid not inherited by a subdirectory"
    );
}

/// Runs a command as root and returns its stdout, failing the test with its stderr.
fn must_run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// POSIX ACLs through setfacl/getfacl, enforced for non-root users: a named-user entry lets
/// one user in and not another; chmod narrows the mask and so the entry; a directory's default
/// ACL is inherited by new files (the umask then does not apply) and new subdirectories; the
/// ACLs are seen through a second mount; removing them takes the access away again; malformed
/// ACLs and default ACLs on files are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_acls_are_kept_inherited_and_enforced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let f = a.path.join("secret");
    let fs = f.to_str().unwrap();
    std::fs::write(&f, b"for 1000 only").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    let read_as =
        |uid: u32, path: &Path| as_user(uid, &format!("cat {} >/dev/null", path.display()));
    assert_ne!(read_as(1000, &f).0, 0, "0640 root file readable by a user");

    must_run("setfacl", &["-m", "u:1000:r", fs]);
    assert_eq!(read_as(1000, &f), (0, String::new()));
    let (code, err) = read_as(1001, &f);
    assert_ne!(code, 0, "a user without an entry read the file");
    assert!(err.contains("Permission denied"), "{err}");
    let acl = must_run("getfacl", &["-cpn", fs]);
    assert!(acl.contains("user:1000:r--"), "{acl}");
    assert!(acl.contains("mask::r--"), "{acl}");
    // The mode's group bits show the mask.
    let mode = std::fs::metadata(&f).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o640);
    // Through the other mount too.
    let other = b.path.join("secret");
    assert_eq!(read_as(1000, &other), (0, String::new()));
    assert_ne!(read_as(1001, &other).0, 0);

    // chmod narrows the mask, and the mask limits the named entry.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let acl = must_run("getfacl", &["-cpn", fs]);
    assert!(acl.contains("mask::---"), "{acl}");
    assert_ne!(read_as(1000, &f).0, 0, "the mask did not limit the entry");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(read_as(1000, &f), (0, String::new()));
    // Removing the ACL takes the access away.
    must_run("setfacl", &["-b", fs]);
    assert_ne!(read_as(1000, &f).0, 0, "access stayed after setfacl -b");
    assert!(!must_run("getfacl", &["-cpn", fs]).contains("user:1000"));

    // Default ACLs are inherited; the umask does not apply under them.
    let d = a.path.join("team");
    let ds = d.to_str().unwrap();
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    must_run(
        "setfacl",
        &["-m", "u:1000:rwx", "-d", "-m", "u:1000:rwx", ds],
    );
    must_run("setfacl", &["-m", "u:1000:rwx", ds]);
    let (code, err) = as_user(
        1000,
        &format!("umask 077 && echo hi > {ds}/new && mkdir {ds}/sub"),
    );
    assert_eq!(code, 0, "{err}");
    let new = d.join("new");
    assert_eq!(
        std::fs::metadata(&new).unwrap().mode() & 0o777,
        0o664,
        "the default ACL, not the umask, shapes a new file's mode"
    );
    let acl = must_run("getfacl", &["-cpn", new.to_str().unwrap()]);
    assert!(acl.contains("user:1000:rwx"), "{acl}");
    assert!(acl.contains("mask::rw-"), "{acl}");
    assert_eq!(read_as(1001, &new), (0, String::new()));
    let sub = must_run("getfacl", &["-cpnd", d.join("sub").to_str().unwrap()]);
    assert!(
        sub.contains("user:1000:rwx"),
        "subdirectory lost the default ACL: {sub}"
    );

    // Bad input: a default ACL on a file, and a malformed ACL value.
    let out = Command::new("setfacl")
        .args(["-d", "-m", "u:1000:r", fs])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a default ACL was set on a file");
    let out = Command::new("setfattr")
        .args(["-n", "system.posix_acl_access", "-v", "0x020000000100", fs])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Invalid argument"), "{err}");
    drop(a);
    drop(b);
}

/// flock(2) holds across mounts: an exclusive lock through one mount makes a non-blocking
/// lock through the other fail with EWOULDBLOCK and a blocking one wait; closing lets the
/// other in; and a holder process that dies (its files closed by the kernel) lets go too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flock_holds_across_mounts_and_dies_with_its_holder() {
    use nix::fcntl::{Flock, FlockArg};
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    std::fs::write(a.path.join("f"), b"x").unwrap();
    let open = |p: &Path| std::fs::File::open(p.join("f")).unwrap();

    let held = Flock::lock(open(&a.path), FlockArg::LockExclusiveNonblock).unwrap();
    let (_, e) = Flock::lock(open(&b.path), FlockArg::LockExclusiveNonblock).unwrap_err();
    assert_eq!(e, nix::errno::Errno::EWOULDBLOCK);
    let (_, e) = Flock::lock(open(&b.path), FlockArg::LockSharedNonblock).unwrap_err();
    assert_eq!(e, nix::errno::Errno::EWOULDBLOCK);
    // Shared locks share; an unlock lets the other mount in.
    let held = held.unlock().unwrap();
    let s1 = Flock::lock(held, FlockArg::LockSharedNonblock).unwrap();
    let s2 = Flock::lock(open(&b.path), FlockArg::LockSharedNonblock).unwrap();
    let (_, e) = Flock::lock(open(&b.path), FlockArg::LockExclusiveNonblock).unwrap_err();
    assert_eq!(e, nix::errno::Errno::EWOULDBLOCK);
    drop(s1);
    drop(s2);

    // A blocking lock through mount b waits for the holder on mount a to close.
    let held = Flock::lock(open(&a.path), FlockArg::LockExclusiveNonblock).unwrap();
    let bp = b.path.clone();
    let waiter = std::thread::spawn(move || {
        let f = std::fs::File::open(bp.join("f")).unwrap();
        Flock::lock(f, FlockArg::LockExclusive)
            .map(|_| ())
            .map_err(|(_, e)| e)
    });
    assert!(!waiter.is_finished());
    drop(held);
    must_wait_for(
        "the blocked flock to be granted",
        Duration::from_secs(30),
        || async { waiter.is_finished().then_some(()) },
    )
    .await;
    waiter.join().unwrap().unwrap();

    // A holder process that dies lets go.
    let mut holder = Command::new("flock")
        .args([
            "-x",
            "-o",
            a.path.join("f").to_str().unwrap(),
            "-c",
            "echo locked; exec cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "locked\n");
    let (_, e) = Flock::lock(open(&b.path), FlockArg::LockExclusiveNonblock).unwrap_err();
    assert_eq!(e, nix::errno::Errno::EWOULDBLOCK);
    // Kill flock(1) itself, the only process with the locked file open (-o), then end its
    // command by closing its input.
    holder.kill().unwrap();
    holder.wait().unwrap();
    drop(holder.stdin.take());
    let got = must_wait_for(
        "the dead holder's flock to go",
        Duration::from_secs(30),
        || async { Flock::lock(open(&b.path), FlockArg::LockExclusiveNonblock).ok() },
    )
    .await;
    drop(got);
    drop(a);
    drop(b);
}

/// `mountd --daemon` returns once the volume is mounted, as mount(8) expects of a helper, and
/// the daemon it leaves unmounts on SIGTERM; a bad source is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_mode_returns_once_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let path = dir.path().join("mnt");
    std::fs::create_dir_all(&path).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mountd"))
        .args(["--daemon", &source, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever happens next, the daemon and its mount go.
    let _stop = DaemonGuard::from_output(&out, &path);
    let pid = _stop.0;
    assert!(is_mounted(&path));
    std::fs::write(path.join("f"), b"daemon").unwrap();
    assert_eq!(std::fs::read(path.join("f")).unwrap(), b"daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    must_wait_for("the daemon to unmount", Duration::from_secs(30), || async {
        (!is_mounted(&path)).then_some(())
    })
    .await;

    let bad = Command::new(env!("CARGO_BIN_EXE_mountd"))
        .args(["--daemon", "no-volume-here", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_share_files_with_posix_errnos() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let mut a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let (pa, pb) = (a.path.clone(), b.path.clone());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(mounts.contains("brickfs:vol "), "{mounts}");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&*pa.to_string_lossy()) && l.contains(" fuse.brickfs ")),
        "{mounts}"
    );

    // Data written and closed through one mount reads back through the other.
    let data = pattern(1, 0, 3 << 20);
    std::fs::write(pa.join("f"), &data).unwrap();
    assert!(std::fs::read(pb.join("f")).unwrap() == data);
    // Overwrite in the middle and append, then read both ways.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(pa.join("f"))
            .unwrap();
        f.seek(SeekFrom::Start(100_000)).unwrap();
        f.write_all(b"middle").unwrap();
        f.sync_all().unwrap();
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(pa.join("f"))
            .unwrap();
        f.write_all(b"tail").unwrap();
    }
    let mut model = data.to_vec();
    model[100_000..100_006].copy_from_slice(b"middle");
    model.extend_from_slice(b"tail");
    let mut got = Vec::new();
    std::fs::File::open(pb.join("f"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == model, "read through the other mount differs");

    // A reader's readahead never hides a write made through the same mount.
    {
        let mut r = std::fs::File::open(pa.join("f")).unwrap();
        let mut head = [0u8; 100];
        r.read_exact(&mut head).unwrap();
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(pa.join("f"))
            .unwrap();
        w.seek(SeekFrom::Start(200)).unwrap();
        w.write_all(b"ZZ").unwrap();
        let mut next = [0u8; 102];
        r.read_exact(&mut next).unwrap();
        assert_eq!(
            &next[100..],
            b"ZZ",
            "stale readahead after a write through the same mount"
        );
        model[200..202].copy_from_slice(b"ZZ");
    }

    // Namespace calls and their errnos.
    std::fs::create_dir(pa.join("d")).unwrap();
    std::fs::write(pa.join("d/x"), b"x").unwrap();
    assert_eq!(errno(std::fs::create_dir(pa.join("d"))), nix::libc::EEXIST);
    assert_eq!(
        errno(std::fs::remove_dir(pa.join("d"))),
        nix::libc::ENOTEMPTY
    );
    assert_eq!(errno(std::fs::remove_file(pa.join("d"))), nix::libc::EISDIR);
    assert_eq!(errno(std::fs::read(pa.join("nope"))), nix::libc::ENOENT);
    assert_eq!(
        errno(std::fs::write(pa.join("f/under-a-file"), b"")),
        nix::libc::ENOTDIR
    );
    assert_eq!(
        errno(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(pa.join("f"))
        ),
        nix::libc::EEXIST
    );
    std::fs::rename(pa.join("d/x"), pa.join("y")).unwrap();
    assert!(!pb.join("d/x").exists());
    assert_eq!(std::fs::read(pb.join("y")).unwrap(), b"x");
    std::fs::hard_link(pa.join("y"), pa.join("y2")).unwrap();
    assert_eq!(std::fs::metadata(pa.join("y")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("y", pa.join("l")).unwrap();
    assert_eq!(
        std::fs::read_link(pb.join("l")).unwrap(),
        PathBuf::from("y")
    );
    std::fs::remove_dir(pa.join("d")).unwrap();
    std::fs::remove_file(pa.join("y2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pa.join("f"))
        .unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert!(std::fs::read(pb.join("f")).unwrap() == model[..10]);
    let mut names: Vec<String> = std::fs::read_dir(&pb)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["f", "l", "y"]);

    // Close-to-open: a file that grew and changed through one mount reads whole through the
    // other right after the close, even while the other holds its old attributes in cache.
    for round in 1..=5usize {
        let before = std::fs::metadata(pb.join("c2o")).map_or(0, |m| m.len());
        assert_eq!(before as usize, (round - 1) * 1000);
        std::fs::write(pa.join("c2o"), vec![round as u8; round * 1000]).unwrap();
        let got = std::fs::read(pb.join("c2o")).unwrap();
        assert!(
            got == vec![round as u8; round * 1000],
            "round {round}: read {} bytes of {}",
            got.len(),
            round * 1000
        );
    }

    // Write-behind keeps the order of overlapping writes: a long sequential run, then
    // overwrites across it (some overlapping each other and still in flight), then a read
    // through the same handle's mount and through the other after close.
    {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut model = pattern(9, 0, 20 << 20).to_vec();
        let mut f = std::fs::File::create(pa.join("wb")).unwrap();
        f.write_all(&model).unwrap();
        for i in 0..200u64 {
            let len = rng.random_range(1..300_000usize);
            let off = rng.random_range(0..(22 << 20) - len);
            let data = pattern(100 + i, off as u64, len);
            f.seek(SeekFrom::Start(off as u64)).unwrap();
            f.write_all(&data).unwrap();
            if model.len() < off + len {
                model.resize(off + len, 0);
            }
            model[off..off + len].copy_from_slice(&data);
        }
        assert!(
            std::fs::read(pa.join("wb")).unwrap() == model,
            "read back through the writer's mount"
        );
        drop(f);
        assert!(
            std::fs::read(pb.join("wb")).unwrap() == model,
            "read back through the other mount"
        );
        std::fs::remove_file(pa.join("wb")).unwrap();
    }

    // A large directory lists completely and with attributes (readdir and readdirplus) through
    // the other mount, while it changes.
    std::fs::create_dir(pa.join("big")).unwrap();
    for i in 0..1500 {
        std::fs::write(pa.join(format!("big/{i:05}")), vec![7u8; i % 7]).unwrap();
    }
    let mut seen = 0;
    for e in std::fs::read_dir(pb.join("big")).unwrap() {
        let e = e.unwrap();
        let i: usize = e.file_name().to_str().unwrap().parse().unwrap();
        assert_eq!(e.metadata().unwrap().len(), (i % 7) as u64, "entry {i}");
        if seen == 700 {
            std::fs::write(pa.join("big/zz-added-while-listing"), b"").unwrap();
        }
        seen += 1;
    }
    assert_eq!(seen, 1500, "a listing lost or repeated names");
    assert_eq!(std::fs::read_dir(pb.join("big")).unwrap().count(), 1501);

    // SIGTERM unmounts cleanly.
    let status = a.stop().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&pa));
    drop(b);
    assert!(!is_mounted(&pb));
}

/// One step's outcome: a short description of what succeeded, or the errno.
type Outcome = Result<String, i32>;

fn io<T>(r: std::io::Result<T>, show: impl FnOnce(T) -> String) -> Outcome {
    r.map(show).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn nx<T>(r: nix::Result<T>) -> Outcome {
    r.map(|_| String::new()).map_err(|e| e as i32)
}

/// A tool's exit code and its stderr with the root taken out.
fn tool(root: &Path, cmd: &str, args: &[String]) -> Outcome {
    let out = Command::new(cmd).args(args).output().expect("run a tool");
    // getfattr names files without the leading slash.
    let r = root.to_string_lossy();
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace(&*r, "ROOT")
            .replace(r.trim_start_matches('/'), "ROOT")
    };
    match out.status.code() {
        Some(0) => Ok(text(&out.stdout)),
        code => Ok(format!("exit {code:?}: {}", text(&out.stderr))),
    }
}

/// The conformance script: namespace, open-flag, rename, link, symlink and xattr calls, most of
/// them failing, run in `root`; returns each step's name and outcome, then a listing of what
/// is left (kind, mode, nlink, size of files).
fn conformance_script(root: &Path) -> Vec<(String, Outcome)> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    use std::fs;
    use std::os::unix::fs::OpenOptionsExt;
    let p = |s: &str| root.join(s);
    let s = |s: &str| root.join(s).display().to_string();
    let mut out: Vec<(String, Outcome)> = Vec::new();
    let mut step = |name: &str, r: Outcome| out.push((name.to_string(), r));
    let ok = |_| String::new();
    let rename2 =
        |a: &str, b: &str, f: RenameFlags| nx(renameat2(AT_FDCWD, &p(a), AT_FDCWD, &p(b), f));

    step("mkdir d", io(fs::create_dir(p("d")), ok));
    step("mkdir d again", io(fs::create_dir(p("d")), ok));
    step(
        "mkdir under missing",
        io(fs::create_dir(p("missing/x")), ok),
    );
    step("write d/f", io(fs::write(p("d/f"), b"hello"), ok));
    step("rmdir non-empty", io(fs::remove_dir(p("d")), ok));
    step("unlink a directory", io(fs::remove_file(p("d")), ok));
    step("rmdir a file", io(fs::remove_dir(p("d/f")), ok));
    step(
        "open under a file",
        io(fs::File::open(p("d/f/x")), |_| String::new()),
    );
    step(
        "O_CREAT|O_EXCL on a file",
        io(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p("d/f")),
            |_| String::new(),
        ),
    );
    step(
        "open a directory for writing",
        io(fs::OpenOptions::new().write(true).open(p("d")), |_| {
            String::new()
        }),
    );
    step(
        "O_DIRECTORY on a file",
        io(
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECTORY)
                .open(p("d/f")),
            |_| String::new(),
        ),
    );
    step(
        "read_dir of a file",
        io(fs::read_dir(p("d/f")), |_| String::new()),
    );
    step("rmdir d/.", io(fs::remove_dir(p("d/.")), ok));
    step("unlink missing", io(fs::remove_file(p("nope")), ok));
    step(
        "truncate a directory",
        nx(nix::unistd::truncate(&p("d"), 0)),
    );
    step("name too long", io(fs::write(p(&"a".repeat(256)), b""), ok));
    step(
        "name of 255 bytes",
        io(fs::write(p(&"b".repeat(255)), b""), ok),
    );

    step("mkdir d/sub", io(fs::create_dir(p("d/sub")), ok));
    step(
        "rename into own subdir",
        io(fs::rename(p("d"), p("d/sub/x")), ok),
    );
    step(
        "rename file over dir",
        io(fs::rename(p("d/f"), p("d/sub")), ok),
    );
    step("mkdir e", io(fs::create_dir(p("e")), ok));
    step("rename dir over file", io(fs::rename(p("e"), p("d/f")), ok));
    step("mkdir g/h", io(fs::create_dir_all(p("g/h")), ok));
    step(
        "rename dir over non-empty dir",
        io(fs::rename(p("e"), p("g")), ok),
    );
    step(
        "rename dir over empty dir",
        io(fs::rename(p("e"), p("d/sub")), ok),
    );
    step("rename missing", io(fs::rename(p("nope"), p("nope2")), ok));
    step("rename onto itself", io(fs::rename(p("d/f"), p("d/f")), ok));
    step(
        "noreplace onto existing",
        rename2("d/f", "g/h", RenameFlags::RENAME_NOREPLACE),
    );
    step(
        "noreplace to new",
        rename2("d/f", "d/f2", RenameFlags::RENAME_NOREPLACE),
    );
    step(
        "exchange with missing",
        rename2("d/f2", "nope", RenameFlags::RENAME_EXCHANGE),
    );
    step(
        "exchange file and dir",
        rename2("d/f2", "g/h", RenameFlags::RENAME_EXCHANGE),
    );
    step(
        "exchange back",
        rename2("d/f2", "g/h", RenameFlags::RENAME_EXCHANGE),
    );
    step("rename back", io(fs::rename(p("d/f2"), p("d/f")), ok));

    step(
        "hard link a directory",
        io(fs::hard_link(p("d"), p("dl")), ok),
    );
    step(
        "hard link onto existing",
        io(fs::hard_link(p("d/f"), p("g/h")), ok),
    );
    step(
        "hard link missing",
        io(fs::hard_link(p("nope"), p("x")), ok),
    );
    step("hard link", io(fs::hard_link(p("d/f"), p("f-link")), ok));
    step(
        "symlink onto existing",
        io(std::os::unix::fs::symlink("x", p("d/f")), ok),
    );
    step(
        "readlink of a file",
        io(fs::read_link(p("d/f")), |t| t.display().to_string()),
    );
    step(
        "symlink",
        io(std::os::unix::fs::symlink("d/f", p("sl")), ok),
    );
    step(
        "read through symlink",
        io(fs::read(p("sl")), |b| String::from_utf8_lossy(&b).into()),
    );
    step(
        "symlink loop a",
        io(std::os::unix::fs::symlink("loop-b", p("loop-a")), ok),
    );
    step(
        "symlink loop b",
        io(std::os::unix::fs::symlink("loop-a", p("loop-b")), ok),
    );
    step(
        "open a symlink loop",
        io(fs::File::open(p("loop-a")), |_| String::new()),
    );
    step(
        "mkfifo",
        nx(nix::unistd::mkfifo(
            &p("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )),
    );

    step(
        "O_TRUNC",
        io(
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(p("d/f")),
            |f| {
                f.metadata()
                    .map(|m| m.len().to_string())
                    .unwrap_or_default()
            },
        ),
    );
    step("write again", io(fs::write(p("d/f"), b"0123456789"), ok));
    step(
        "O_APPEND",
        io(
            fs::OpenOptions::new()
                .append(true)
                .open(p("d/f"))
                .and_then(|mut f| f.write_all(b"+tail")),
            ok,
        ),
    );
    step(
        "read back",
        io(fs::read(p("d/f")), |b| String::from_utf8_lossy(&b).into()),
    );
    step(
        "extend with truncate",
        io(
            fs::OpenOptions::new()
                .write(true)
                .open(p("d/f"))
                .and_then(|f| f.set_len(20)),
            ok,
        ),
    );
    step(
        "read back sparse tail",
        io(fs::read(p("d/f")), |b| format!("{b:?}")),
    );
    step(
        "utimes on missing",
        nx(nix::sys::stat::utimes(
            &p("nope"),
            &nix::sys::time::TimeVal::new(1, 0),
            &nix::sys::time::TimeVal::new(1, 0),
        )),
    );

    // A file unlinked while open stays usable through its descriptor until closed.
    let mut tmp = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p("tmpfile"))
        .expect("create tmpfile");
    step("write before unlink", io(tmp.write_all(b"kept "), ok));
    step("unlink an open file", io(fs::remove_file(p("tmpfile")), ok));
    step(
        "lookup after unlink",
        io(fs::metadata(p("tmpfile")), |_| String::new()),
    );
    step("write after unlink", io(tmp.write_all(b"alive"), ok));
    step("fsync after unlink", io(tmp.sync_all(), ok));
    step(
        "fstat after unlink",
        io(tmp.metadata(), |m| {
            format!("nlink={} size={}", m.nlink(), m.len())
        }),
    );
    step(
        "read after unlink",
        io(
            tmp.seek(SeekFrom::Start(0)).and_then(|_| {
                let mut text = String::new();
                tmp.read_to_string(&mut text).map(|_| text)
            }),
            |t| t,
        ),
    );
    drop(tmp);
    step("recreate the name", io(fs::write(p("tmpfile"), b"new"), ok));
    step(
        "read the new file",
        io(fs::read(p("tmpfile")), |b| {
            String::from_utf8_lossy(&b).into()
        }),
    );

    let f = s("d/f");
    let args = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    step(
        "setfattr user.k",
        tool(root, "setfattr", &args(&["-n", "user.k", "-v", "v1", &f])),
    );
    step(
        "getfattr user.k",
        tool(
            root,
            "getfattr",
            &args(&["-n", "user.k", "--only-values", &f]),
        ),
    );
    step(
        "getfattr missing",
        tool(root, "getfattr", &args(&["-n", "user.nope", &f])),
    );
    step(
        "setfattr -x missing",
        tool(root, "setfattr", &args(&["-x", "user.nope", &f])),
    );
    step(
        "setfattr unknown namespace",
        tool(root, "setfattr", &args(&["-n", "bogus.k", "-v", "1", &f])),
    );
    step(
        "setfattr system.other",
        tool(
            root,
            "setfattr",
            &args(&["-n", "system.other", "-v", "1", &f]),
        ),
    );
    step(
        "setfattr trusted.k",
        tool(root, "setfattr", &args(&["-n", "trusted.k", "-v", "t", &f])),
    );
    step(
        "setfattr user.k on a symlink",
        tool(
            root,
            "setfattr",
            &args(&["-h", "-n", "user.k", "-v", "1", &s("sl")]),
        ),
    );
    step(
        "getfattr -d",
        tool(root, "getfattr", &args(&["-d", "-m", "-", &f])),
    );
    step(
        "setfattr -x user.k",
        tool(root, "setfattr", &args(&["-x", "user.k", &f])),
    );

    // What is left.
    let mut listing = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let size = if m.is_dir() { 0 } else { m.len() };
            listing.push(format!(
                "{rel} mode={:o} nlink={} size={size}",
                m.mode(),
                m.nlink()
            ));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    listing.sort();
    for l in listing {
        step("left", Ok(l));
    }
    out
}

/// Every call of the conformance script gives through a mount exactly what it gives on the
/// local disk (ext4 here): the same errnos for each failure, the same results, the same tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errnos_match_a_local_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let m = Mount::start(&source, &dir.path().join("mnt")).await;
    let local = dir.path().join("local");
    std::fs::create_dir(&local).unwrap();
    let want = conformance_script(&local);
    let got = conformance_script(&m.path);
    assert_eq!(want.len(), got.len(), "{want:#?}\n{got:#?}");
    let differ: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("{}: local {:?}, brickfs {:?}", w.0, w.1, g.1))
        .collect();
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    // The script is not trivially passing: most of its steps fail on the local disk.
    assert!(want.iter().filter(|(_, r)| r.is_err()).count() >= 25);
}

/// When every server is gone, calls through the mount fail (ENOTCONN for the namespace, EIO
/// for data) within the mount's timeout instead of hanging; when the servers come back, the
/// same mount works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_in_bounded_time_when_servers_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, source) = must_volume_here(dir.path()).await;
    let m = Mount::start_with(&source, &dir.path().join("mnt"), &["--timeout-secs", "2"]).await;
    std::fs::write(m.path.join("f"), b"before").unwrap();
    std::fs::write(m.path.join("w"), b"").unwrap();
    let mut open = std::fs::File::open(m.path.join("f")).unwrap();
    // A write accepted into write-behind fails at fsync or close, never silently. (Another
    // file than the one read below: the kernel would serve those reads from the pages the
    // write left in its cache.)
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path.join("w"))
        .unwrap();
    node.sigkill().unwrap();

    let p = m.path.clone();
    let calls = std::thread::spawn(move || {
        let wrote = w.write_all(&[1u8; 1 << 20]).and_then(|()| w.sync_all());
        let lookup = std::fs::metadata(p.join("never-seen")).map(|_| ());
        let create = std::fs::write(p.join("new"), b"x");
        let mut buf = Vec::new();
        let read = open.read_to_end(&mut buf).map(|_| ());
        [
            ("write and fsync", wrote),
            ("lookup", lookup),
            ("create", create),
            ("read", read),
        ]
        .map(|(call, r)| (call, r.map_err(|e| e.raw_os_error())))
    });
    // Generous against a 2 s timeout; without one, calls hang for good.
    must_wait_for("calls to fail", Duration::from_secs(60), || async {
        calls.is_finished().then_some(())
    })
    .await;
    for (call, r) in calls.join().unwrap() {
        let errno = r.expect_err(call);
        assert!(
            errno == Some(nix::libc::ENOTCONN) || errno == Some(nix::libc::EIO),
            "{call}: {errno:?}"
        );
    }

    node.restart().unwrap();
    must_wait_for(
        "the mount to work again",
        Duration::from_secs(60),
        || async { std::fs::read(m.path.join("f")).ok() },
    )
    .await;
    assert_eq!(std::fs::read(m.path.join("f")).unwrap(), b"before");
    std::fs::write(m.path.join("after"), b"after").unwrap();
    drop(m);
}

/// Whether a process is gone (or a zombie nobody has reaped yet).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// mountd run as mount(8) runs a helper for `mount -t fuse.brickfs` and fstab lines
/// (`mount.fuse.brickfs SOURCE DIR -o OPTIONS -n -t fuse.brickfs`): it returns once mounted,
/// honours its own -o options and ignores generic ones; umount(8) from outside ends the
/// daemon; a bad option value is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_helper_runs_as_mount8_calls_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let sbin = dir.path().join("sbin");
    std::fs::create_dir(&sbin).unwrap();
    let helper = sbin.join("mount.fuse.brickfs");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mountd"), &helper).unwrap();
    let path = dir.path().join("mnt");
    std::fs::create_dir(&path).unwrap();
    let mnt = path.to_str().unwrap();

    let bad = Command::new(&helper)
        .args([
            &source,
            mnt,
            "-o",
            "rw,timeout=soon",
            "-n",
            "-t",
            "fuse.brickfs",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("timeout=soon"));
    assert!(!is_mounted(&path));

    let out = Command::new(&helper)
        .args([
            &source,
            mnt,
            "-o",
            "rw,_netdev,noatime,timeout=5,lease=10",
            "-n",
            "-t",
            "fuse.brickfs",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _stop = DaemonGuard::from_output(&out, &path);
    let pid = _stop.0;
    assert!(is_mounted(&path));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let after = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    assert_eq!(after("--timeout-secs").as_deref(), Some("5"), "{args:?}");
    assert_eq!(after("--lease-secs").as_deref(), Some("10"), "{args:?}");
    std::fs::write(path.join("f"), b"via the helper").unwrap();
    assert_eq!(std::fs::read(path.join("f")).unwrap(), b"via the helper");

    let umount = Command::new("umount").arg(&path).output().unwrap();
    assert!(
        umount.status.success(),
        "{}",
        String::from_utf8_lossy(&umount.stderr)
    );
    must_wait_for(
        "the daemon to exit after umount",
        Duration::from_secs(30),
        || async { process_gone(pid).then_some(()) },
    )
    .await;
    assert!(!is_mounted(&path));
}

/// mountd serves Prometheus metrics of its volume calls: writes, reads and fsyncs counted with
/// their bytes and a latency histogram, over real HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mountd_serves_prometheus_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    // A free port for the metrics listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mnt = dir.path().join("mnt");
    let _m = Mount::start_with(&source, &mnt, &["--metrics-listen", &port.to_string()]).await;
    let data = pattern(8, 0, 1 << 20);
    let f = mnt.join("m.bin");
    {
        let mut w = std::fs::File::create(&f).unwrap();
        w.write_all(&data).unwrap();
        w.sync_all().unwrap();
    }
    assert!(std::fs::read(&f).unwrap() == data);
    let body = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(port).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert!(value("mountd_ops_total{op=\"write\"}") >= 1.0);
    assert!(value("mountd_bytes_in_total{op=\"write\"}") >= f64::from(1u32 << 20));
    assert!(value("mountd_bytes_out_total{op=\"read\"}") >= f64::from(1u32 << 20));
    assert!(value("mountd_op_seconds_count{op=\"fsync\"}") >= 1.0);
    assert_eq!(value("mountd_op_errors_total{op=\"write\"}"), 0.0);
}

/// The counters of a mount's metrics endpoint at `port`, by full name (labels included).
fn scrape(port: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(port).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw.lines()
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            Some((name.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A sequential reader of a file whose pages are not cached: the kernel asks in 1 MiB
/// requests (the mount raises its readahead from the kernel's 128 KiB), and the mount's
/// window turns them into a few large reads from the bricks even though the kernel sends
/// several at once, out of order. Counted by the mount's own metrics; the bytes are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_reach_the_bricks_in_large_windows() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mnt = dir.path().join("mnt");
    let _m = Mount::start_with(&source, &mnt, &["--metrics-listen", &port.to_string()]).await;
    const MIB: usize = 1 << 20;
    let data = pattern(9, 0, 32 * MIB);
    let f = mnt.join("seq.bin");
    std::fs::write(&f, &data).unwrap();
    let f2 = f.clone();
    let (before, got, after) = tokio::task::spawn_blocking(move || {
        // Drop the file's cached pages: a fresh open of another mount would not have them.
        std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
        let before = scrape(port);
        let got = std::fs::read(&f2).unwrap();
        (before, got, scrape(port))
    })
    .await
    .unwrap();
    assert!(got == data, "the bytes read back differ");
    let delta = |name: &str| {
        after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
    };
    let fuse_reads = delta("mountd_fuse_ops_total{op=\"read\"}");
    let volume_reads = delta("mountd_ops_total{op=\"read\"}");
    // 32 MiB: 32 requests of 1 MiB (256 with the kernel's 128 KiB readahead); 8 windows of
    // 4 MiB and the last window's fetch ahead (one per request when they do not share one).
    assert!(
        (32.0..=40.0).contains(&fuse_reads),
        "{fuse_reads} FUSE reads for 32 MiB"
    );
    assert!(
        (1.0..=12.0).contains(&volume_reads),
        "{volume_reads} volume reads for 32 MiB"
    );
}

/// File capabilities go when a file is written, as on a local filesystem, although the mount
/// answers the kernel's check before each write from what it learnt: a capability set
/// through this mount is seen at the next write (and so removed by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_drops_file_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let mnt = dir.path().join("mnt");
    let _m = Mount::start(&source, &mnt).await;
    let f = mnt.join("tool");
    let path = f.to_str().unwrap().to_string();
    let mut w = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&f)
        .unwrap();
    w.write_all(b"first").unwrap();
    // cap_net_bind_service+p, as a version 2 vfs_cap_data.
    let caps = "0x0100000200040000000000000000000000000000";
    tokio::task::spawn_blocking(move || {
        must_run(
            "setfattr",
            &["-n", "security.capability", "-v", caps, &path],
        );
        let shown = must_run(
            "getfattr",
            &["-e", "hex", "-n", "security.capability", &path],
        );
        assert!(shown.contains(caps), "{shown}");
        w.write_all(b" second").unwrap();
        let out = Command::new("getfattr")
            .args(["-n", "security.capability", &path])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the capability survived a write: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"first second");
}

/// Directory quotas through the CLI and a mount: a limit counts what the tree holds, writing
/// past it fails with EDQUOT (at the write, or at fsync for a mount that had not seen the
/// quota yet) and never leaves more than the limit counted; other trees are not limited;
/// deleting gives room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_quotas_refuse_writes_past_their_limit() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (node, source) = must_volume_here(dir.path()).await;
    let meta = node.addr().to_string();
    let quota_args = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--meta", meta.as_str(), "volume", "quota", "vol"];
        v.extend_from_slice(args);
        v.into_iter().map(String::from).collect()
    };
    let cli = |args: &[&str]| must_ok(&quota_args(args));
    let used = || -> (u64, u64) {
        assert!(cli(&["list"]).contains("/q"));
        let json = must_ok(&[
            "--json",
            "--meta",
            meta.as_str(),
            "volume",
            "quota",
            "vol",
            "list",
        ]);
        let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
        (
            rows[0]["used_bytes"].as_u64().unwrap(),
            rows[0]["limit_bytes"].as_u64().unwrap(),
        )
    };
    let m = Mount::start(&source, &dir.path().join("mnt")).await;
    std::fs::create_dir(m.path.join("q")).unwrap();
    std::fs::write(m.path.join("q/small"), pattern(1, 0, 100_000)).unwrap();
    let (code, _, err) = brickfs(&quota_args(&["limit-usage", "/nope", "1MiB"]));
    assert_ne!(code, 0);
    assert!(err.contains("no such directory"), "{err}");
    let (code, _, err) = brickfs(&quota_args(&["limit-usage", "/q", "lots"]));
    assert_eq!(code, 2, "{err}");
    cli(&["limit-usage", "/q", "1MiB"]);
    assert_eq!(used(), (100_000, 1 << 20));

    // Past the limit: EDQUOT, from this mount (which may not have seen the quota yet) and
    // from one mounted after it.
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    for (i, mnt) in [&m, &b].into_iter().enumerate() {
        let path = mnt.path.join(format!("q/big{i}"));
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = pattern(2, 0, 128 << 10);
        let mut failed = None;
        for _ in 0..16 {
            if let Err(e) = f.write_all(&chunk) {
                failed = Some(e);
                break;
            }
        }
        let failed = failed
            .or_else(|| f.sync_all().err())
            .expect("a write past the quota");
        assert_eq!(failed.raw_os_error(), Some(nix::libc::EDQUOT), "{failed}");
        drop(f);
        let (u, limit) = used();
        assert!(u <= limit, "{u} bytes counted over the limit of {limit}");
        std::fs::remove_file(&path).unwrap();
    }
    // The bytes under the limit landed; deleting gives the room back once the mounts have
    // released the closed files (releases go out in batches).
    must_wait_for(
        "deleting to give the room back",
        Duration::from_secs(20),
        || async { (used().0 == 100_000).then_some(()) },
    )
    .await;
    // Another tree is not limited; within the limit writes go on.
    std::fs::write(m.path.join("free"), pattern(3, 0, 2 << 20)).unwrap();
    std::fs::write(b.path.join("q/fits"), pattern(4, 0, 500_000)).unwrap();
    assert_eq!(used().0, 600_000);
    cli(&["remove", "/q"]);
    std::fs::write(b.path.join("q/big"), pattern(5, 0, 2 << 20)).unwrap();
}

/// At a quota, with write-behind: a write across the limit keeps its bytes up to the limit
/// (in-place bytes too); a shrinking truncate works while an EDQUOT is pending; the handle
/// whose bytes were dropped is told, whoever else syncs the file first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_edges_keep_every_byte_that_fits_and_tell_who_lost_bytes() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (node, source) = must_volume_here(dir.path()).await;
    let meta = node.addr().to_string();
    let m = Mount::start(&source, &dir.path().join("mnt")).await;
    const LIM: u64 = 1 << 20;
    for d in ["q1", "q2", "q3"] {
        std::fs::create_dir(m.path.join(d)).unwrap();
        must_ok(&[
            "--meta",
            meta.as_str(),
            "volume",
            "quota",
            "vol",
            "limit-usage",
            &format!("/{d}"),
            "1MiB",
        ]);
    }
    // A mount made after the quotas knows them from the start (one made before notices
    // within 5 s).
    drop(m);
    let m = Mount::start(&source, &dir.path().join("mnt2")).await;
    // Across the limit: 'S' lands up to the limit, over 'A' as well.
    let f = std::fs::File::create(m.path.join("q1/straddle")).unwrap();
    f.write_all_at(&vec![b'A'; (LIM - 1000) as usize], 0)
        .unwrap();
    f.sync_all().unwrap();
    let wrote = f.write_all_at(&[b'S'; 3000], LIM - 2000);
    let told = wrote.err().or_else(|| f.sync_all().err()).expect("EDQUOT");
    assert_eq!(told.raw_os_error(), Some(nix::libc::EDQUOT), "{told}");
    drop(f);
    let back = std::fs::read(m.path.join("q1/straddle")).unwrap();
    assert_eq!(back.len() as u64, LIM, "kept up to the limit");
    assert!(back[..(LIM - 2000) as usize].iter().all(|b| *b == b'A'));
    assert!(back[(LIM - 2000) as usize..].iter().all(|b| *b == b'S'));

    // An overwrite inside the file, behind a refused append, still lands.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path.join("q1/straddle"))
        .unwrap();
    let _ = f
        .seek(SeekFrom::End(0))
        .and_then(|_| f.write_all(&vec![b'Z'; 512 << 10]));
    f.write_all_at(&[b'x'; 4096], 0).unwrap();
    let _ = f.sync_all();
    drop(f);
    let back = std::fs::read(m.path.join("q1/straddle")).unwrap();
    assert_eq!(back.len() as u64, LIM);
    assert!(
        back[..4096].iter().all(|b| *b == b'x'),
        "the overwrite was dropped"
    );
    // A shrinking truncate is not blocked by an EDQUOT still to be told.
    let mut f = std::fs::File::create(m.path.join("q2/shrink")).unwrap();
    let _ = f.write_all(&vec![7u8; 2 << 20]);
    f.set_len(256 << 10).unwrap();
    let _ = f.sync_all();
    drop(f);
    assert_eq!(
        std::fs::metadata(m.path.join("q2/shrink")).unwrap().len(),
        256 << 10
    );

    // Two descriptors: the one whose bytes were dropped is told, even when the other
    // syncs the file first.
    let path = m.path.join("q3/two");
    let a = std::fs::File::create(&path).unwrap();
    let b = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    a.write_all_at(&vec![1u8; 600 << 10], 0).unwrap();
    let _ = b.write_all_at(&vec![2u8; 600 << 10], 600 << 10);
    let _ = a.sync_all();
    let told_b = b.sync_all().err();
    let closed_b = nix::unistd::close(std::os::fd::IntoRawFd::into_raw_fd(b)).err();
    assert!(
        told_b.is_some() || closed_b.is_some(),
        "the descriptor whose bytes past the limit were dropped was told nothing"
    );
    drop(a);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), LIM);
}

/// A mountd ends when every mount of its filesystem is gone, not when its mount point is
/// unmounted: a bind mount elsewhere keeps it serving; a new mount at the same path is not
/// its own (it neither waits for it nor unmounts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mountd_serves_its_own_mounts_until_the_last_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, source) = must_volume_here(dir.path()).await;
    let p = dir.path().join("p");
    let q = dir.path().join("q");
    let mut first = Mount::start(&source, &p).await;
    std::fs::write(p.join("f"), b"kept").unwrap();
    std::fs::create_dir_all(&q).unwrap();
    // The bind is undone on failure too.
    struct Unbind(PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            if is_mounted(&self.0) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    let _unbind = Unbind(q.clone());
    nix::mount::mount(
        Some(&p),
        &q,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    // The kernel may hold the mount busy a moment after the write's close (its release
    // is asynchronous): bounded retries.
    must_wait_for("p to unmount", Duration::from_secs(20), || async {
        nix::mount::umount2(&p, nix::mount::MntFlags::empty()).ok()
    })
    .await;
    // The bind at q still reaches the filesystem: the daemon keeps serving it.
    for _ in 0..3 {
        assert_eq!(std::fs::read(q.join("f")).unwrap(), b"kept");
    }
    assert!(first.child.as_mut().unwrap().try_wait().unwrap().is_none());
    // A second mount at p, by another daemon.
    let second = Mount::start(&source, &p).await;
    must_wait_for("q to unmount", Duration::from_secs(20), || async {
        nix::mount::umount2(&q, nix::mount::MntFlags::empty()).ok()
    })
    .await;
    let pid = first.child.as_ref().unwrap().id() as i32;
    must_wait_for(
        "the first mountd to exit",
        Duration::from_secs(20),
        || async move {
            // An exited child stays a zombie until the guard reaps it.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z ")).then_some(())
        },
    )
    .await;
    assert!(first.child.as_mut().unwrap().try_wait().unwrap().is_some());
    // Its end took nothing of the second's.
    assert_eq!(std::fs::read(p.join("f")).unwrap(), b"kept");
    assert!(is_mounted(&second.path));
}
