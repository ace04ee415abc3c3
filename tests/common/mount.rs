//! A mountd process and its mount point, for the tests: SIGKILLed and detached when dropped.

use super::must_wait_for;
use mountd::is_mounted;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A mountd started by a test, by its child process.
pub struct Mount {
    pub child: Option<Child>,
    pub path: PathBuf,
}

impl Mount {
    pub async fn start(source: &str, path: &Path) -> Mount {
        Self::start_with(source, path, &[]).await
    }

    pub async fn start_with(source: &str, path: &Path, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mountd"))
            .arg(source)
            .arg(path)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mountd");
        let m = Mount {
            child: Some(child),
            path: path.to_path_buf(),
        };
        must_wait_for("the mount", Duration::from_secs(30), || async {
            is_mounted(&m.path).then_some(())
        })
        .await;
        m
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = child.wait().ok();
        if is_mounted(&self.path) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
        status
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.path) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
