//! Freezing a volume's mounted filesystem while its image is copied, so a snapshot or clone holds a
//! consistent filesystem (FIFREEZE flushes dirty data and blocks new writes until the thaw).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use crate::error::{Context, Result};
use crate::loopdev;
use crate::meta::VolumeSource;
use crate::mount;
use crate::pool::Pool;
use crate::sys;

/// Frozen filesystems; thawed on drop, whatever happened in between.
pub(crate) struct Frozen {
    dirs: Vec<(PathBuf, File)>,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (path, dir) in self.dirs.drain(..).rev() {
            if let Err(e) = sys::fithaw(dir.as_fd()) {
                tracing::error!(mount = %path.display(), error = %e, "could not thaw filesystem");
            } else {
                tracing::debug!(mount = %path.display(), "thawed");
            }
        }
    }
}

/// Freezes the writable mounted filesystem of each listed volume that is attached on this node.
/// (On a shared pool a volume staged on another node cannot be frozen from here; its copy is
/// crash-consistent, like a power cut.)
pub(crate) fn freeze_volumes(pool: &Pool, ids: &[&str]) -> Result<Frozen> {
    let mut frozen = Frozen { dirs: Vec::new() };
    let table = mount::mounts()?;
    for id in ids {
        for dev in loopdev::find(&pool.volume_image(id))? {
            if dev.read_only {
                continue;
            }
            // One mount per filesystem is enough: freezing acts on the superblock.
            let Some(m) = table
                .iter()
                .find(|m| m.source == dev.path().to_string_lossy() && !m.read_only())
            else {
                continue;
            };
            let dir = File::open(&m.mount_point)
                .context(|| format!("open {}", m.mount_point.display()))?;
            sys::fifreeze(dir.as_fd()).context(|| format!("freeze {}", m.mount_point.display()))?;
            tracing::debug!(volume = %id, mount = %m.mount_point.display(), "frozen");
            frozen.dirs.push((m.mount_point.clone(), dir));
        }
    }
    Ok(frozen)
}

/// Runs `copy` with the source volume (if the source is a volume) frozen.
pub(crate) fn with_frozen<T>(
    pool: &Pool,
    source: Option<&VolumeSource>,
    copy: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let _frozen = match source {
        Some(VolumeSource::Volume(id)) => Some(freeze_volumes(pool, &[id.as_str()])?),
        _ => None,
    };
    copy()
}
