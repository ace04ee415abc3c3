//! Tidy: the rules of `docs/architecture.md` and the style guide that a machine can check —
//! dependency arrows between crates, a module doc on every crate, every crate named in the
//! architecture document, and no bare sleeps or ignored tests in the test suites.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The clone under test: cargo runs test binaries from the package root and says where it is
/// (a binary built from another clone sharing the target folder must not check that one).
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// Package name → (manifest path, names of normal (non-dev) dependencies).
fn packages() -> BTreeMap<String, (PathBuf, Vec<String>)> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut map = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        map.insert(
            p["name"].as_str().unwrap().to_string(),
            (PathBuf::from(p["manifest_path"].as_str().unwrap()), deps),
        );
    }
    map
}

#[test]
fn dependency_arrows_point_one_way() {
    let pkgs = packages();
    let workspace: Vec<&String> = pkgs.keys().collect();
    let uses = |pkg: &str, dep: &str| pkgs[pkg].1.iter().any(|d| d == dep);
    for base in ["brickfs-proto", "brickfs-layout", "brickfs-erasure"] {
        for other in &workspace {
            assert!(!uses(base, other), "{base} must not depend on {other}");
        }
    }
    for pure in ["brickfs-layout", "brickfs-erasure"] {
        assert!(!uses(pure, "tokio"), "{pure} must do no I/O (no tokio)");
    }
    for (name, (_, deps)) in &pkgs {
        if deps.iter().any(|d| d == "rocksdb") {
            assert!(
                name == "brickfs-meta" || name == "brickfs-brick",
                "only meta and brick touch RocksDB, not {name}"
            );
        }
        if deps.iter().any(|d| d == "fuser") {
            assert_eq!(name, "mountd", "only mountd touches fuser");
        }
        // The root package's brickfs-local launcher supervises brickd with testkit; no
        // library crate may use it outside dev-dependencies.
        assert!(
            name == "brickfs" || !deps.iter().any(|d| d == "brickfs-testkit"),
            "{name} uses testkit outside dev-dependencies"
        );
    }
    assert!(!uses("brickfs-brick", "brickfs-meta") && !uses("brickfs-meta", "brickfs-brick"));
    for lower in ["brickfs-brick", "brickfs-meta", "brickfs-proto"] {
        assert!(
            !uses(lower, "brickfs-client"),
            "{lower} must not depend on client"
        );
    }
}

#[test]
fn every_crate_has_a_module_doc_and_is_in_the_architecture() {
    let architecture = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    for (name, (manifest, _)) in packages() {
        if name == "brickfs" {
            continue;
        }
        let dir = manifest.parent().unwrap();
        let lib = dir.join("src/lib.rs");
        let text = std::fs::read_to_string(&lib)
            .unwrap_or_else(|e| panic!("{name} has no src/lib.rs: {e}"));
        assert!(
            text.trim_start().starts_with("//!"),
            "{} lacks a //! module doc",
            lib.display()
        );
        let rel = dir
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            architecture.contains(&name) || architecture.contains(&format!("{rel}/")),
            "docs/architecture.md does not name {name} ({rel})"
        );
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn tests_have_no_sleeps_or_ignored_tests() {
    // Sleeps are banned in test code (wait on readiness instead); library code may back off.
    let mut test_files = Vec::new();
    rust_files(&root().join("tests"), &mut test_files);
    for krate in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        rust_files(&krate.path().join("tests"), &mut test_files);
    }
    let mut all_files = Vec::new();
    rust_files(&root().join("crates"), &mut all_files);
    all_files.extend(test_files.iter().cloned());
    // Built from pieces so that this file does not match itself.
    let sleeps = [
        format!("thread::{}(", "sleep"),
        format!("time::{}(", "sleep"),
    ];
    let skips = [format!("#[{}", "ignore"), format!("#[{}", "should_panic")];
    for f in &test_files {
        let text = std::fs::read_to_string(f).unwrap();
        for b in &sleeps {
            assert!(!text.contains(b.as_str()), "{} contains {b}", f.display());
        }
    }
    for f in &all_files {
        let text = std::fs::read_to_string(f).unwrap();
        for b in &skips {
            assert!(!text.contains(b.as_str()), "{} contains {b}", f.display());
        }
    }
}
