//! Advisory per-volume locks (flock), shared by every process on the node and, on a shared pool
//! whose filesystem supports it (NFSv4, CephFS, GlusterFS), across nodes. The lock files are
//! opened by the pool's access module; this is only the waiting.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Context, Error, Result};
use crate::observe::{self, LockOutcome};

/// How a caller waits for a busy lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once with `Busy` (CSI: the CO retries on ABORTED).
    Try,
    /// Wait up to this long, then fail with `Busy` (FlexVolume: one call per process, must end).
    Bounded(Duration),
}

/// Held lock; released on drop.
#[derive(Debug)]
pub struct LockGuard {
    _lock: Flock<File>,
}

/// Locks the open lock file `file` (at `path`, for messages) exclusively, for the subject named
/// `what`.
pub(crate) fn lock(file: File, path: &Path, what: &str, wait: LockWait) -> Result<LockGuard> {
    let deadline = match wait {
        LockWait::Try => None,
        LockWait::Bounded(d) => Some(Instant::now() + d),
    };
    let mut backoff = Duration::from_millis(2);
    let mut file = file;
    // Set when the lock was found held: the wait is reported to the metrics however it ends.
    let mut contended: Option<Instant> = None;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                if let Some(since) = contended {
                    observe::lock_wait(LockOutcome::Acquired, since.elapsed());
                }
                return Ok(LockGuard { _lock: lock });
            }
            Err((f, errno)) => {
                file = f;
                if errno == Errno::EWOULDBLOCK && contended.is_none() {
                    contended = Some(Instant::now());
                }
                match errno {
                    Errno::EWOULDBLOCK => match deadline {
                        Some(d) if Instant::now() < d => {
                            // flock has no timed wait; a short capped backoff keeps latency low.
                            std::thread::sleep(
                                backoff.min(d.saturating_duration_since(Instant::now())),
                            );
                            backoff = (backoff * 2).min(Duration::from_millis(50));
                        }
                        _ => {
                            let since = contended.unwrap_or_else(Instant::now);
                            observe::lock_wait(LockOutcome::Busy, since.elapsed());
                            return Err(Error::Busy(what.to_owned()));
                        }
                    },
                    Errno::EINTR => continue,
                    e => return Err(e).context(|| format!("lock {}", path.display())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(path: &Path, what: &str, wait: LockWait) -> Result<LockGuard> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap();
        super::lock(file, path, what, wait)
    }

    #[test]
    fn second_holder_is_busy_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.lock");
        let first = lock(&path, "volume v", LockWait::Try).unwrap();
        let err = lock(&path, "volume v", LockWait::Try).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Busy);
        assert!(err.to_string().contains("volume v"));
        let err = lock(
            &path,
            "volume v",
            LockWait::Bounded(Duration::from_millis(30)),
        )
        .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Busy);
        drop(first);
        lock(&path, "volume v", LockWait::Try).unwrap();
    }

    #[test]
    fn bounded_wait_gets_lock_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.lock");
        let first = lock(&path, "v", LockWait::Try).unwrap();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                lock(&path, "v", LockWait::Bounded(Duration::from_secs(20))).map(drop)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(first);
        waiter.join().unwrap().unwrap();
    }
}
