//! Advisory per-volume and per-snapshot locks (flock), shared by every process on the node and,
//! on a shared pool whose filesystem supports it (NFSv4, CephFS, GlusterFS), across nodes.
//!
//! A lock file lives only as long as its subject (the volume, snapshot or name): the guard of a
//! subject that is gone removes the file while it still holds the lock, and whoever waited on the
//! old file finds, once it gets the lock, that the path no longer names the file it locked and
//! starts over. So `locks/` never grows with deleted volumes, and the unlink never races a
//! waiter into holding a lock nobody else can see.
//!
//! Releasing is an explicit `LOCK_UN`, then closing the file. The unlock is what makes the
//! release synchronous on a FUSE filesystem: there closing only queues the release (FUSE_RELEASE
//! is sent asynchronously, measured on GlusterFS: the lock is still held for a moment after
//! `close` returns), so the next call on the volume, in this process or on another node, could
//! find it held and be refused as busy. The unlock's error is ignored (on a dead FUSE client it
//! fails with ENOTCONN; the close still drops the lock): a guard never fails (or panics, as
//! nix's `Flock` does) in `Drop`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

use crate::error::{Context, Error, Result};
use crate::observe::{self, LockOutcome};
use crate::pool::fsops::PoolFs;

/// How a caller waits for a busy lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once with `Busy` (CSI: the CO retries on ABORTED).
    Try,
    /// Wait up to this long, then fail with `Busy` (FlexVolume: one call per process, must end).
    Bounded(Duration),
}

/// A held lock; released on drop (by closing its file), which never fails.
#[derive(Debug)]
pub struct LockGuard {
    file: Option<File>,
    cleanup: Option<Cleanup>,
}

/// What a guard needs to remove its lock file once the subject is gone.
#[derive(Debug)]
struct Cleanup {
    root: PathBuf,
    lock: PathBuf,
    subject: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        if let Some(c) = &self.cleanup {
            // Any doubt (the pool does not answer, a planted entry) keeps the file: a lock file
            // too many is harmless, a lock file removed under a live subject is not.
            if let Ok(fs) = PoolFs::open(&c.root) {
                if matches!(fs.exists(&c.subject), Ok(false)) && fs.names_file(&c.lock, &file) {
                    match fs.unlink(&c.lock) {
                        Ok(()) => {
                            tracing::debug!(lock = %fs.path(&c.lock).display(), "removed the lock file of a subject that is gone")
                        }
                        Err(e) => tracing::warn!(error = %e, "could not remove a lock file"),
                    }
                }
            }
        }
        if let Err(e) = flock(&file, FlockOperation::Unlock) {
            tracing::debug!(error = %e, "unlock failed; the close drops the lock");
        }
        drop(file);
    }
}

/// Locks the lock file `lock` of the pool open as `fs` exclusively, for the subject named `what`
/// whose entry is `subject` (both relative to the pool root). The lock file is created when
/// missing and removed, on release, when `subject` is gone.
pub(crate) fn lock(
    fs: &PoolFs,
    lock: &Path,
    subject: &Path,
    what: &str,
    wait: LockWait,
) -> Result<LockGuard> {
    lock_file(fs, lock, subject, what, wait, || {
        fs.open_lock(lock).map(Some)
    })?
    .ok_or_else(|| Error::Busy(what.to_owned()))
}

/// [`lock`] when the lock file is there already; `Ok(None)`, creating nothing, when it is not
/// (or goes while this waits for it: its subject went with it).
pub(crate) fn lock_existing(
    fs: &PoolFs,
    lock: &Path,
    subject: &Path,
    what: &str,
    wait: LockWait,
) -> Result<Option<LockGuard>> {
    lock_file(fs, lock, subject, what, wait, || {
        fs.open_existing_lock(lock)
    })
}

fn lock_file(
    fs: &PoolFs,
    lock: &Path,
    subject: &Path,
    what: &str,
    wait: LockWait,
    open: impl Fn() -> Result<Option<File>>,
) -> Result<Option<LockGuard>> {
    let deadline = match wait {
        LockWait::Try => None,
        LockWait::Bounded(d) => Some(Instant::now() + d),
    };
    // Bounded: each round means the file was removed under us by a holder whose subject was gone.
    for _ in 0..64 {
        let Some(file) = open()? else {
            return Ok(None);
        };
        wait_for(&file, deadline, what, &fs.path(lock))?;
        if fs.names_file(lock, &file) {
            return Ok(Some(LockGuard {
                file: Some(file),
                cleanup: Some(Cleanup {
                    root: fs.path(Path::new("")),
                    lock: lock.to_owned(),
                    subject: subject.to_owned(),
                }),
            }));
        }
    }
    Err(Error::Busy(what.to_owned()))
}

/// Takes the exclusive flock of `file`, failing at once or waiting until `deadline`.
fn wait_for(file: &File, deadline: Option<Instant>, what: &str, path: &Path) -> Result<()> {
    let mut backoff = Duration::from_millis(2);
    // Set when the lock was found held: the wait is reported to the metrics however it ends.
    let mut contended: Option<Instant> = None;
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                if let Some(since) = contended {
                    observe::lock_wait(LockOutcome::Acquired, since.elapsed());
                }
                return Ok(());
            }
            Err(Errno::WOULDBLOCK) => {
                let since = *contended.get_or_insert_with(Instant::now);
                match deadline {
                    Some(d) if Instant::now() < d => {
                        // flock has no timed wait; a short capped backoff keeps latency low.
                        std::thread::sleep(
                            backoff.min(d.saturating_duration_since(Instant::now())),
                        );
                        backoff = (backoff * 2).min(Duration::from_millis(50));
                    }
                    _ => {
                        observe::lock_wait(LockOutcome::Busy, since.elapsed());
                        return Err(Error::Busy(what.to_owned()));
                    }
                }
            }
            Err(Errno::INTR) => continue,
            Err(e) => {
                return Err(std::io::Error::from(e)).context(|| format!("lock {}", path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_in(dir: &Path, what: &str, wait: LockWait) -> Result<LockGuard> {
        let fs = PoolFs::open(dir).unwrap();
        super::lock(&fs, Path::new("v.lock"), Path::new("v"), what, wait)
    }

    #[test]
    fn second_holder_is_busy_until_release() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("v")).unwrap();
        let first = lock_in(dir.path(), "volume v", LockWait::Try).unwrap();
        let err = lock_in(dir.path(), "volume v", LockWait::Try).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Busy);
        assert!(err.to_string().contains("volume v"));
        let err = lock_in(
            dir.path(),
            "volume v",
            LockWait::Bounded(Duration::from_millis(30)),
        )
        .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Busy);
        drop(first);
        lock_in(dir.path(), "volume v", LockWait::Try).unwrap();
        // The subject exists: its lock file stays.
        assert!(dir.path().join("v.lock").exists());
    }

    #[test]
    fn bounded_wait_gets_lock_when_released() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("v")).unwrap();
        let first = lock_in(dir.path(), "v", LockWait::Try).unwrap();
        let waiter = {
            let path = dir.path().to_owned();
            std::thread::spawn(move || {
                lock_in(&path, "v", LockWait::Bounded(Duration::from_secs(20))).map(drop)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(first);
        waiter.join().unwrap().unwrap();
    }

    /// The lock file of a subject that is gone goes with the last holder, and a waiter on the
    /// removed file starts over on a new one instead of holding a lock nobody else sees.
    #[test]
    fn lock_files_of_gone_subjects_are_removed_without_a_race() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_in(dir.path(), "v", LockWait::Try).unwrap();
        assert!(dir.path().join("v.lock").exists());
        let waiter = {
            let path = dir.path().to_owned();
            std::thread::spawn(move || {
                let guard = lock_in(&path, "v", LockWait::Bounded(Duration::from_secs(20)))?;
                // Whoever holds it holds the file the path names.
                let fs = PoolFs::open(&path).unwrap();
                assert!(fs.names_file(Path::new("v.lock"), guard.file.as_ref().unwrap()));
                std::fs::create_dir(path.join("v")).unwrap();
                drop(guard);
                Ok::<_, Error>(())
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        // No subject: released and removed.
        drop(first);
        waiter.join().unwrap().unwrap();
        // The waiter made the subject, so its lock file stayed.
        assert!(dir.path().join("v.lock").exists());
        std::fs::remove_dir(dir.path().join("v")).unwrap();
        drop(lock_in(dir.path(), "v", LockWait::Try).unwrap());
        assert!(!dir.path().join("v.lock").exists());
    }
}
