//! Freezing a volume's mounted filesystem while its image is copied, so a snapshot or clone holds a
//! consistent filesystem (FIFREEZE flushes dirty data and blocks new writes until the thaw).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use crate::error::{Context, Result};
use crate::ids::VolumeId;
use crate::kernel::KernelView;
use crate::loopdev::LoopDevice;
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

/// Freezes the writable mounted filesystem on each of the listed volumes' loop devices (their
/// devices on this node, as `view` found them). On a shared pool a volume staged on another node
/// cannot be frozen from here; its copy is crash-consistent, like a power cut.
pub(crate) fn freeze(
    view: &KernelView,
    volumes: &[(&VolumeId, Vec<LoopDevice>)],
) -> Result<Frozen> {
    let mut frozen = Frozen { dirs: Vec::new() };
    for (id, devices) in volumes {
        for dev in devices.iter().filter(|d| !d.read_only) {
            // One mount per filesystem is enough: freezing acts on the superblock.
            let Some(m) = view.fs_mounts(dev).find(|m| !m.read_only()) else {
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
