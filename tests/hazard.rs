//! Tests that must not overlap, whichever test processes of the run they are in.
//!
//! mkfs.btrfs resolves the backing file of every mounted loop device to make sure it is not about
//! to format one of them, and gives up ("cannot check mount status of /dev/loopN: Transport
//! endpoint is not connected") when one of those files sits on a FUSE mount whose client is dead.
//! The GlusterFS tests that kill a client leave exactly that behind until they end, so a test that
//! formats btrfs waits for them, and they wait for it. (On a real node the same holds while a
//! partitioned GlusterFS mount still has a fenced volume mounted: the README says so.)
//!
//! The lock is a `flock` on one file in the temporary directory, shared by the btrfs tests and
//! exclusive for a dead client; the kernel drops it when the test's file closes, however it ends.

use std::fs::File;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

/// Held while the hazard (or the test that cannot stand it) lasts; dropping it releases.
#[derive(Debug)]
pub struct Hazard {
    _lock: Flock<File>,
}

fn lock_path() -> PathBuf {
    std::env::temp_dir().join("loopvol-test-dead-fuse-mounts.lock")
}

fn take(how: FlockArg) -> Hazard {
    let path = lock_path();
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let lock =
        Flock::lock(file, how).unwrap_or_else(|(_, e)| panic!("flock {}: {e}", path.display()));
    Hazard { _lock: lock }
}

/// Taken before a FUSE client is killed with loop devices on its files still mounted; waits for
/// every test that formats btrfs to end first.
pub fn dead_fuse_mount() -> Hazard {
    take(FlockArg::LockExclusive)
}

/// Taken by a test that runs mkfs.btrfs, for as long as it runs; waits while a dead FUSE mount
/// is around.
pub fn formats_btrfs() -> Hazard {
    take(FlockArg::LockShared)
}

/// [`formats_btrfs`] when `fs` is btrfs, nothing otherwise: for tests run once per filesystem.
pub fn for_fs(fs: &str) -> Option<Hazard> {
    (fs == "btrfs").then(formats_btrfs)
}
