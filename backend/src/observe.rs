//! What the backend tells a front end's metrics about the work it does, without knowing how
//! they are kept: a process-wide [`Observer`] (the CSI server installs one that feeds its
//! Prometheus registry; FlexVolume and the admin CLI install none). Events are reported where
//! the work happens (a format in `fs`, a copy in `copy`, a contended lock in `lock`), so no
//! caller can forget them. With no observer installed an event costs one atomic load.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::copy::CopyMethod;
use crate::validate::FsType;

/// Why an image is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CopyKind {
    /// A volume into a new snapshot (CreateSnapshot, group snapshots).
    Snapshot,
    /// A snapshot into a new volume (restore).
    Restore,
    /// A volume into a new volume (clone).
    Clone,
}

impl CopyKind {
    pub const ALL: [CopyKind; 3] = [CopyKind::Snapshot, CopyKind::Restore, CopyKind::Clone];

    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Snapshot => "snapshot",
            CopyKind::Restore => "restore",
            CopyKind::Clone => "clone",
        }
    }
}

/// How a wait for a busy lock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockOutcome {
    /// The lock was had after waiting for another holder.
    Acquired,
    /// The wait policy gave up: the caller gets `Busy` (CSI: ABORTED).
    Busy,
}

impl LockOutcome {
    pub const ALL: [LockOutcome; 2] = [LockOutcome::Acquired, LockOutcome::Busy];

    pub fn as_str(self) -> &'static str {
        match self {
            LockOutcome::Acquired => "acquired",
            LockOutcome::Busy => "busy",
        }
    }
}

/// Receives the backend's events. Called on the thread doing the work: keep it cheap and
/// never block (a counter increment, a histogram observation).
pub trait Observer: Send + Sync {
    /// mkfs ran on a volume's device (`ok`: it succeeded) and took `elapsed`.
    fn format(&self, fs: FsType, ok: bool, elapsed: Duration);
    /// An image was copied with `method`: `bytes` of data (copied, or shared by a reflink) in
    /// `elapsed`.
    fn copy(&self, kind: CopyKind, method: CopyMethod, bytes: u64, elapsed: Duration);
    /// A lock was found held by another caller; after `waited` the wait ended with `outcome`.
    /// Locks had at the first try are not reported.
    fn lock_wait(&self, outcome: LockOutcome, waited: Duration);
}

static OBSERVER: OnceLock<Arc<dyn Observer>> = OnceLock::new();

/// Installs the process's observer. Once per process: a second call is refused (returns false)
/// and leaves the first in place.
pub fn install(observer: Arc<dyn Observer>) -> bool {
    OBSERVER.set(observer).is_ok()
}

fn with(f: impl FnOnce(&dyn Observer)) {
    if let Some(o) = OBSERVER.get() {
        f(o.as_ref());
    }
}

pub(crate) fn format(fs: FsType, ok: bool, elapsed: Duration) {
    with(|o| o.format(fs, ok, elapsed));
}

pub(crate) fn copy(kind: CopyKind, method: CopyMethod, bytes: u64, elapsed: Duration) {
    with(|o| o.copy(kind, method, bytes, elapsed));
}

pub(crate) fn lock_wait(outcome: LockOutcome, waited: Duration) {
    with(|o| o.lock_wait(outcome, waited));
}
