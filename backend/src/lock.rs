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
//!
//! A released lock file stays open for a while ([`OpenLocks`]): the next lock of the same file by
//! this pool locks it again without opening it. On a cluster filesystem an open and a close are
//! a round trip each to the server (on GlusterFS about 0.4 ms of a 0.6 ms lock cycle), and a
//! volume's calls come in quick succession. Reuse changes nothing of what a lock proves: the file
//! is locked first and then checked, as a freshly opened one is, to still have a name (asked of
//! the server) and to be the file its path names ([`PoolFs::names_file`]). A kept file another
//! node removed is seen there even while this node's cached name still leads to it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

/// A held lock; released on drop (unlocked, and its file kept open for reuse or closed), which
/// never fails.
#[derive(Debug)]
pub struct LockGuard {
    file: Option<File>,
    cleanup: Option<Cleanup>,
    /// Where the file goes once unlocked, if it is still the subject's lock file.
    reuse: Arc<OpenLocks>,
}

/// Lock files a pool has released and keeps open for its next lock of the same file.
///
/// At most [`OpenLocks::KEEP`] files, none idle longer than [`OpenLocks::IDLE`]: a file kept open
/// holds the pool's filesystem busy (an unmount waits for the pool to be dropped), and on NFS a
/// lock file another node removed lives on as `.nfsXXXX` while it is open here. A kept file is
/// never trusted: it is locked and then checked against its path like a new one, and any doubt
/// (another file there now, an error) closes it and opens the path afresh, which also sees a
/// pool remounted under a running server.
#[derive(Debug, Default)]
pub(crate) struct OpenLocks {
    files: Mutex<Vec<KeptLock>>,
}

#[derive(Debug)]
struct KeptLock {
    lock: PathBuf,
    file: File,
    since: Instant,
}

impl OpenLocks {
    const KEEP: usize = 64;
    const IDLE: Duration = Duration::from_secs(30);

    /// A kept file of `lock`, taken out: while the caller has it no one else in this process can
    /// lock through it (two locks through one open file would not exclude each other).
    fn take(&self, lock: &Path) -> Option<File> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|k| k.since.elapsed() < Self::IDLE);
        let at = files.iter().rposition(|k| k.lock == lock)?;
        Some(files.swap_remove(at).file)
    }

    /// Closes the files kept longer than [`OpenLocks::IDLE`]; the pool's background rounds call
    /// it, so a server with no calls holds nothing for long either.
    pub(crate) fn close_idle(&self) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|k| k.since.elapsed() < Self::IDLE);
    }

    fn keep(&self, lock: PathBuf, file: File) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|k| k.since.elapsed() < Self::IDLE);
        if files.len() >= Self::KEEP {
            let oldest = (0..files.len()).min_by_key(|&i| files[i].since);
            if let Some(i) = oldest {
                files.swap_remove(i);
            }
        }
        files.push(KeptLock {
            lock,
            file,
            since: Instant::now(),
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.files.lock().unwrap().len()
    }
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
        let mut reusable = true;
        if let Some(c) = &self.cleanup {
            // Any doubt (the pool does not answer, a planted entry) keeps the file: a lock file
            // too many is harmless, a lock file removed under a live subject is not.
            match PoolFs::open(&c.root) {
                Ok(fs) => match fs.exists(&c.subject) {
                    Ok(false) if fs.names_held_file(&c.lock, &file) => {
                        reusable = false;
                        match fs.unlink(&c.lock) {
                            Ok(()) => {
                                tracing::debug!(lock = %fs.path(&c.lock).display(), "removed the lock file of a subject that is gone")
                            }
                            Err(e) => tracing::warn!(error = %e, "could not remove a lock file"),
                        }
                    }
                    Ok(true) => {}
                    // The subject is gone (its file is someone else's to remove) or unknown.
                    _ => reusable = false,
                },
                Err(_) => reusable = false,
            }
        }
        if let Err(e) = flock(&file, FlockOperation::Unlock) {
            tracing::debug!(error = %e, "unlock failed; the close drops the lock");
            reusable = false;
        }
        match &self.cleanup {
            Some(c) if reusable => self.reuse.keep(c.lock.clone(), file),
            _ => drop(file),
        }
    }
}

/// Locks the lock file `lock` of the pool open as `fs` exclusively, for the subject named `what`
/// whose entry is `subject` (both relative to the pool root). The lock file is created when
/// missing and removed, on release, when `subject` is gone.
///
/// `reuse`: the pool's released lock files, taken from and given back to.
pub(crate) fn lock(
    fs: &PoolFs,
    reuse: &Arc<OpenLocks>,
    lock: &Path,
    subject: &Path,
    what: &str,
    wait: LockWait,
) -> Result<LockGuard> {
    lock_file(fs, reuse, lock, subject, what, wait, || {
        fs.open_lock(lock).map(Some)
    })?
    .ok_or_else(|| Error::Busy(what.to_owned()))
}

/// [`lock`] when the lock file is there already; `Ok(None)`, creating nothing, when it is not
/// (or goes while this waits for it: its subject went with it).
pub(crate) fn lock_existing(
    fs: &PoolFs,
    reuse: &Arc<OpenLocks>,
    lock: &Path,
    subject: &Path,
    what: &str,
    wait: LockWait,
) -> Result<Option<LockGuard>> {
    lock_file(fs, reuse, lock, subject, what, wait, || {
        fs.open_existing_lock(lock)
    })
}

fn lock_file(
    fs: &PoolFs,
    reuse: &Arc<OpenLocks>,
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
    let mut kept = reuse.take(lock);
    // Bounded: each round means the file was removed under us by a holder whose subject was gone
    // (or a kept file was no longer the lock file).
    for _ in 0..64 {
        let (file, was_kept) = match kept.take() {
            Some(file) => (file, true),
            None => match open()? {
                Some(file) => (file, false),
                None => return Ok(None),
            },
        };
        match wait_for(&file, deadline, what, &fs.path(lock)) {
            Ok(()) => {}
            // A kept file on a mount that is gone (remounted, or its client restarted): the path
            // decides.
            Err(Error::Io { .. }) if was_kept => continue,
            Err(e) => return Err(e),
        }
        if fs.names_file(lock, &file) {
            return Ok(Some(LockGuard {
                file: Some(file),
                cleanup: Some(Cleanup {
                    root: fs.path(Path::new("")),
                    lock: lock.to_owned(),
                    subject: subject.to_owned(),
                }),
                reuse: Arc::clone(reuse),
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
        lock_reusing(dir, &Default::default(), what, wait)
    }

    fn lock_reusing(
        dir: &Path,
        reuse: &Arc<OpenLocks>,
        what: &str,
        wait: LockWait,
    ) -> Result<LockGuard> {
        let fs = PoolFs::open(dir).unwrap();
        super::lock(&fs, reuse, Path::new("v.lock"), Path::new("v"), what, wait)
    }

    fn inode(file: &File) -> u64 {
        rustix::fs::fstat(file).unwrap().st_ino
    }

    /// Whether a new open of `dir/v.lock` finds it locked (as another process would).
    fn locked_for_others(dir: &Path) -> bool {
        let other = File::options()
            .write(true)
            .open(dir.join("v.lock"))
            .unwrap();
        match flock(&other, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => false,
            Err(Errno::WOULDBLOCK) => true,
            Err(e) => panic!("flock: {e}"),
        }
    }

    /// A released lock file is locked again without an open, and still excludes: a second lock
    /// in the same process while the kept file is in use opens its own and finds it busy.
    #[test]
    fn released_lock_files_are_reused_and_still_exclude() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("v")).unwrap();
        let reuse = Arc::new(OpenLocks::default());
        let first = lock_reusing(dir.path(), &reuse, "v", LockWait::Try).unwrap();
        let ino = inode(first.file.as_ref().unwrap());
        drop(first);
        assert_eq!(reuse.len(), 1);
        let again = lock_reusing(dir.path(), &reuse, "v", LockWait::Try).unwrap();
        assert_eq!(reuse.len(), 0, "the kept file is in use");
        assert_eq!(inode(again.file.as_ref().unwrap()), ino);
        let err = lock_reusing(dir.path(), &reuse, "v", LockWait::Try).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Busy);
        // And for another process: another open of the file finds it locked.
        assert!(locked_for_others(dir.path()));
        drop(again);
        assert_eq!(reuse.len(), 1);
        // Released: the kept file holds no lock.
        assert!(!locked_for_others(dir.path()));
    }

    /// A kept file whose path now names another file (removed and made again by someone else)
    /// is closed, and the lock is taken on the file the path names.
    #[test]
    fn a_kept_file_that_is_no_longer_the_lock_file_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("v")).unwrap();
        let reuse = Arc::new(OpenLocks::default());
        drop(lock_reusing(dir.path(), &reuse, "v", LockWait::Try).unwrap());
        assert_eq!(reuse.len(), 1);
        std::fs::remove_file(dir.path().join("v.lock")).unwrap();
        std::fs::write(dir.path().join("v.lock"), "").unwrap();
        let fresh = std::fs::metadata(dir.path().join("v.lock")).unwrap();
        let guard = lock_reusing(dir.path(), &reuse, "v", LockWait::Try).unwrap();
        assert_eq!(
            inode(guard.file.as_ref().unwrap()),
            std::os::unix::fs::MetadataExt::ino(&fresh)
        );
        // Another holder of the path's file is excluded.
        assert!(locked_for_others(dir.path()));
        drop(guard);
    }

    /// The lock file of a subject that is gone is removed and closed, never kept.
    #[test]
    fn lock_files_of_gone_subjects_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reuse = Arc::new(OpenLocks::default());
        drop(lock_reusing(dir.path(), &reuse, "v", LockWait::Try).unwrap());
        assert_eq!(reuse.len(), 0);
        assert!(!dir.path().join("v.lock").exists());
    }

    #[test]
    fn at_most_keep_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fs = PoolFs::open(dir.path()).unwrap();
        let reuse = Arc::new(OpenLocks::default());
        for i in 0..OpenLocks::KEEP + 5 {
            std::fs::create_dir(dir.path().join(format!("v{i}"))).unwrap();
            let lock = PathBuf::from(format!("v{i}.lock"));
            let subject = PathBuf::from(format!("v{i}"));
            drop(super::lock(&fs, &reuse, &lock, &subject, "v", LockWait::Try).unwrap());
        }
        assert_eq!(reuse.len(), OpenLocks::KEEP);
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
