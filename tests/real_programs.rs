//! Real programs on a mount, each beside the same run on a local directory (the judge): two
//! sqlite writers on two mounts in rollback-journal mode; git init, add, commit, gc and fsck;
//! tar extracting a small C tree and make building it twice (the second does nothing,
//! touching one source rebuilds just it); rsync -a twice (the second transfers nothing);
//! cp -a keeping xattrs and ACLs. A failing program's output is shown.

mod common;

use brickfs_testkit::Brickd;
use common::mount::Mount;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs a bash script in `dir` (with `$OTHER` set to `other`); its stdout, or a panic with
/// everything it printed.
fn must_script(what: &str, dir: &Path, other: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("OTHER", other)
        .env("GIT_AUTHOR_NAME", "brickfs")
        .env("GIT_AUTHOR_EMAIL", "test@brickfs.invalid")
        .env("GIT_COMMITTER_NAME", "brickfs")
        .env("GIT_COMMITTER_EMAIL", "test@brickfs.invalid")
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{what} in {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` on a local directory and on the mount (both with a second directory: a
/// local one, or the same volume through a second mount); both outputs must match.
fn must_match_local(what: &str, local: (&Path, &Path), mounted: (&Path, &Path), script: &str) {
    let want = must_script(what, local.0, local.1, script);
    let got = must_script(what, mounted.0, mounted.1, script);
    assert_eq!(
        got, want,
        "{what}: the mount's output against a local directory's"
    );
}

/// A volume, two mounts of it, and local directories to run the same scripts in.
struct Setup {
    _dir: tempfile::TempDir,
    _node: Brickd,
    a: Mount,
    b: Mount,
    local_a: std::path::PathBuf,
    local_b: std::path::PathBuf,
}

async fn must_setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (node, source, _meta) = must_one_node_volume(dir.path(), "replica 3", 3, &[]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    let local_a = dir.path().join("local-a");
    let local_b = dir.path().join("local-b");
    std::fs::create_dir_all(&local_a).unwrap();
    std::fs::create_dir_all(&local_b).unwrap();
    Setup {
        _dir: dir,
        _node: node,
        a,
        b,
        local_a,
        local_b,
    }
}

/// Two sqlite3 writer processes, one per mount (rollback journal, fcntl locks, a busy
/// timeout), each commit rows one transaction at a time: every committed row is there and
/// `PRAGMA integrity_check` says ok. On a local directory "the other mount" is the same
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writers_on_two_mounts_keep_every_committed_row() {
    let s = must_setup().await;
    let script = r#"
cat > writer.py <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
for i in range(int(sys.argv[3])):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t(writer, n) VALUES (?, ?)", (sys.argv[2], i))
    db.execute("COMMIT")
db.close()
EOF
python3 -c 'import sqlite3; db = sqlite3.connect("db.sqlite"); db.execute("CREATE TABLE t(writer TEXT, n INT)"); db.commit()'
python3 writer.py "$PWD/db.sqlite" a 40 & pa=$!
python3 writer.py "$OTHER/db.sqlite" b 40 & pb=$!
wait $pa; wait $pb
python3 -c '
import sqlite3
db = sqlite3.connect("db.sqlite")
print(db.execute("PRAGMA integrity_check").fetchone()[0])
for w, c, s in db.execute("SELECT writer, COUNT(*), SUM(n) FROM t GROUP BY writer ORDER BY writer"):
    print(w, c, s)
'
"#;
    must_match_local(
        "sqlite",
        (&s.local_a, &s.local_a),
        (&s.a.path, &s.b.path),
        script,
    );
}

/// git init, add, commit, gc, fsck and log on the mount give what they give locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_init_commit_gc_and_fsck_work_as_locally() {
    let s = must_setup().await;
    let script = r#"
git init -q -b main repo
cd repo
for i in $(seq 1 30); do printf 'line %s\n' $(seq 1 $i) > "file$i.txt"; done
git add .
git commit -q -m first
for i in $(seq 1 10); do echo "change $i" >> file1.txt; git commit -q -am "change $i"; done
git gc -q
git fsck --full --strict 2>&1
git log --format=%s | wc -l
git count-objects -v | grep -E '^(count|in-pack|garbage)'
git status --porcelain
"#;
    must_match_local(
        "git",
        (&s.local_a, &s.local_b),
        (&s.a.path, &s.b.path),
        script,
    );
}

/// tar extracts a small C tree; make builds it, does nothing the second time, and rebuilds
/// just the touched source the third; the program runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_and_make_rebuild_exactly_what_changed() {
    let s = must_setup().await;
    // The tree is made locally (in $OTHER), tarred, and extracted where the build runs.
    let script = r#"
src="$OTHER/src-$$"
mkdir -p "$src/tree"
for i in 1 2 3 4; do printf 'int f%s(void) { return %s; }\n' $i $i > "$src/tree/f$i.c"; done
printf 'int f1(void); int f2(void); int f3(void); int f4(void);\n#include <stdio.h>\nint main(void) { printf("%%d\\n", f1() + f2() + f3() + f4()); return 0; }\n' > "$src/tree/main.c"
printf 'OBJS = main.o f1.o f2.o f3.o f4.o\nprog: $(OBJS)\n\tcc -o prog $(OBJS)\n%%.o: %%.c\n\tcc -c -o $@ $<\n' > "$src/tree/Makefile"
tar -C "$src" -cf "$src/tree.tar" tree
tar -xf "$src/tree.tar"
rm -rf "$src"
cd tree
make -s 2>&1 | sort
./prog
echo second:
make 2>&1 | grep -v '^make' | sort || true
make -q && echo up to date
touch f3.c
echo third:
make 2>&1 | sort
./prog
"#;
    must_match_local(
        "tar and make",
        (&s.local_a, &s.local_b),
        (&s.a.path, &s.b.path),
        script,
    );
}

/// rsync -a into the mount transfers everything once and nothing the second time; cp -a
/// keeps modes, times, xattrs and ACLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_twice_transfers_nothing_and_cp_a_keeps_xattrs_and_acls() {
    let s = must_setup().await;
    let script = r#"
src="$OTHER/tree-$$"
mkdir -p "$src/d/e"
for i in $(seq 1 20); do head -c $((i * 1000)) /dev/zero | tr '\0' "x" > "$src/d/f$i"; done
printf 'big' > "$src/d/e/g"
chmod 640 "$src/d/f3"
ln -s f1 "$src/d/link"
setfattr -n user.color -v blue "$src/d/f1"
setfacl -m u:nobody:r "$src/d/f2"
touch -d 2001-02-03 "$src/d/f4"
rsync -a "$src/d/" copy/
echo again: $(rsync -ai "$src/d/" copy/ | wc -l)
rsync -a --stats "$src/d/" copy/ | grep -E 'Number of regular files transferred'
cp -a "$src/d" kept
getfattr -n user.color --only-values kept/f1; echo
getfacl -cp kept/f2 2>/dev/null | grep nobody
stat -c '%a %s %F' kept/f3 kept/link copy/f3
stat -c '%a %Y %s' kept/f4 copy/f4
for f in f3 f5; do
  [ "$(stat -c %Y "$src/d/$f")" = "$(stat -c %Y "kept/$f")" ] && echo "$f time kept by cp"
  [ "$(stat -c %Y "$src/d/$f")" = "$(stat -c %Y "copy/$f")" ] && echo "$f time kept by rsync"
done
diff -r "$src/d" copy && diff -r "$src/d" kept && echo same
rm -rf "$src"
"#;
    must_match_local(
        "rsync and cp -a",
        (&s.local_a, &s.local_b),
        (&s.a.path, &s.b.path),
        script,
    );
}
