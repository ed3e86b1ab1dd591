//! Holding a call in flight: freeze the filesystem it writes to (writes then wait in the kernel),
//! and see when a process's thread is waiting there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::binaries::run;
use crate::poll::poll_until;

/// A frozen filesystem (FIFREEZE via `fsfreeze`), thawed on drop even when a test fails.
pub struct Frozen(PathBuf);

impl Frozen {
    #[track_caller]
    pub fn freeze(mount_point: &Path) -> Frozen {
        let (code, _, err) = run(std::process::Command::new("fsfreeze")
            .arg("--freeze")
            .arg(mount_point));
        assert_eq!(
            code,
            0,
            "fsfreeze --freeze {}: {err}",
            mount_point.display()
        );
        Frozen(mount_point.to_owned())
    }

    /// Thaws now (dropping does the same).
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = run(std::process::Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0));
    }
}

/// Waits (up to 20 s) until `n` threads of process `pid` are blocked on frozen filesystems:
/// asleep uninterruptibly (state D) in the kernel's wait for a frozen superblock (a brief D
/// state during other I/O does not count).
#[track_caller]
pub fn wait_for_blocked_threads(pid: u32, n: usize) {
    let on_freeze = |task: &Path| {
        let in_d = std::fs::read_to_string(task.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('D'))
            })
            .unwrap_or(false);
        // wchan names the wait: percpu_rwsem_wait (sb_start_write) on current kernels.
        let wchan = std::fs::read_to_string(task.join("wchan")).unwrap_or_default();
        in_d && ["percpu_rwsem", "percpu_down", "sb_start", "freeze"]
            .iter()
            .any(|w| wchan.contains(w))
    };
    poll_until(
        Duration::from_secs(20),
        &format!("{n} thread(s) of process {pid} blocked on a frozen filesystem"),
        || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
            tasks.flatten().filter(|t| on_freeze(&t.path())).count() >= n
        },
    );
}
