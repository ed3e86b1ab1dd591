//! Growing a staged volume's filesystem, its usage, and its health as this node sees it.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fs;
use crate::loopdev;
use crate::meta::VolumeMeta;
use crate::mount;
use crate::node::{is_device_bind_of, is_loop_mount_of, Condition, Usage};
use crate::pool::Pool;
use crate::validate::{self, FsType};

impl Pool {
    /// Grows the filesystem of volume `id` (mounted at `volume_path`, a staging or target path)
    /// to fill its image, refreshing the loop device first. For a block volume or an unmounted
    /// one only the device grows. Returns the device size.
    pub fn node_expand(&self, id: &str, volume_path: Option<&Path>) -> Result<u64> {
        validate::check_id("volume ID", id)?;
        if let Some(p) = volume_path {
            self.check_node_path("volume path", p)?;
        }
        let _guard = self.lock_volume(id)?;
        self.get_volume(id)?;
        if let Some(p) = volume_path {
            self.check_expand_path(id, p)?;
        }
        let devices = loopdev::find(&self.volume_image(id))?;
        let Some(dev) = devices.first() else {
            return Err(Error::precondition(format!(
                "volume {id} is not attached on this node"
            )));
        };
        loopdev::refresh_capacity(dev)?;
        let device = dev.path();
        let size = loopdev::device_size(&device)?;
        let table = mount::mounts()?;
        let mounted = match volume_path {
            Some(p) => mount::mount_at(&table, p).filter(|m| is_loop_mount_of(m, dev)),
            None => table.iter().find(|m| is_loop_mount_of(m, dev)),
        };
        let Some(mnt) = mounted else {
            // A block volume (or one attached but not mounted): the device is all there is.
            return Ok(size);
        };
        let fs: FsType = mnt.fs_type.parse()?;
        let current = fs::superblock(&device)?
            .map(|sb| sb.size_bytes)
            .unwrap_or(0);
        if current + fs::grow_slack(fs) < size {
            fs::grow_online(fs, &device, &mnt.mount_point)?;
        }
        Ok(size)
    }

    /// Grows volume `id` to at least `size_bytes` and its filesystem with it, all on this node.
    /// On a node-local pool this is the whole expansion: external-resizer has no per-node mode, so
    /// the controller side cannot reach the node whose pool holds the image, and the node grows
    /// the image itself. Where the controller already grew it, the image step is a no-op.
    pub fn node_expand_to(
        &self,
        id: &str,
        volume_path: Option<&Path>,
        size_bytes: u64,
    ) -> Result<u64> {
        let m = self.get_volume(id)?;
        // A path that is not this volume is refused before the image grows.
        if let Some(p) = volume_path {
            self.check_node_path("volume path", p)?;
            self.check_expand_path(id, p)?;
        }
        if size_bytes > m.size_bytes {
            self.expand_volume(id, size_bytes)?;
        }
        self.node_expand(id, volume_path)
    }

    /// `NotFound` unless volume `id` can be at `path` (CSI NodeExpandVolume: "volume does not
    /// exist on specified volume_path"): the path exists, and when the volume's filesystem is
    /// mounted on this node, `path` is one of those mounts (or, for a block volume, a bind of its
    /// device). Growing a volume because a caller named some other directory would report a
    /// success for a filesystem that did not grow.
    fn check_expand_path(&self, id: &str, path: &Path) -> Result<()> {
        let not_here =
            |why: &str| Error::not_found("volume path", format!("{} ({why})", path.display()));
        if !path.exists() {
            return Err(not_here("it does not exist"));
        }
        let devices = loopdev::find(&self.volume_image(id))?;
        let table = mount::mounts()?;
        let mounted_somewhere = table
            .iter()
            .any(|m| devices.iter().any(|d| is_loop_mount_of(m, d)));
        let here = mount::mount_at(&table, path).is_some_and(|m| {
            devices
                .iter()
                .any(|d| is_loop_mount_of(m, d) || is_device_bind_of(m, d))
        });
        if mounted_somewhere && !here {
            return Err(not_here(&format!("volume {id} is not mounted there")));
        }
        Ok(())
    }

    /// Usage of volume `id` at `path`: a mounted filesystem (bytes and inodes) or a published
    /// block device (bytes). `NotFound` when the volume or the path is unknown.
    pub fn volume_usage(&self, id: &str, path: &Path) -> Result<Usage> {
        validate::check_id("volume ID", id)?;
        self.get_volume(id)?;
        let not_here = || {
            Error::not_found(
                "volume path",
                format!("{} (volume {id} is not mounted there)", path.display()),
            )
        };
        // Only read, never mounted on: a path the volume can never be at (relative, a system
        // directory) simply does not hold it, which CSI (and csi-sanity) answer NOT_FOUND.
        if validate::check_path("volume path", path, &[]).is_err() {
            return Err(not_here());
        }
        let md = std::fs::metadata(path).map_err(|_| not_here())?;
        if md.file_type().is_block_device() || md.is_file() {
            // A published block volume is a bind of its device node onto the file; any other
            // file is not this volume.
            let table = mount::mounts()?;
            let at = mount::mount_at(&table, path).ok_or_else(not_here)?;
            let dev = loopdev::find(&self.volume_image(id))?
                .into_iter()
                .find(|d| is_device_bind_of(at, d))
                .ok_or_else(not_here)?;
            let total = loopdev::device_size(&dev.path())?;
            return Ok(Usage {
                total_bytes: total,
                available_bytes: 0,
                used_bytes: total,
                inodes: None,
            });
        }
        let table = mount::mounts()?;
        let devices = loopdev::find(&self.volume_image(id))?;
        let ours = mount::mount_at(&table, path)
            .is_some_and(|m| devices.iter().any(|d| is_loop_mount_of(m, d)));
        if !ours {
            return Err(not_here());
        }
        fs::usage(path)
    }

    /// Whether volume `id` is healthy on this node: its image exists, and an attached filesystem
    /// has recorded no errors.
    pub fn volume_condition(&self, id: &str) -> Result<Condition> {
        self.condition_of(&self.get_volume(id)?)
    }

    /// [`Pool::volume_condition`] of a volume whose metadata the caller already read (a listing
    /// reports every volume's condition without reading each record twice).
    pub fn condition_of(&self, m: &VolumeMeta) -> Result<Condition> {
        let id = m.id.as_str();
        let image = self.volume_image(id);
        if !image.exists() {
            return Ok(Condition {
                abnormal: true,
                message: format!("image {} is missing", image.display()),
            });
        }
        if m.staged.iter().any(|h| h.node == self.node()) {
            let devices = loopdev::find(&image)?;
            let Some(dev) = devices.first() else {
                return Ok(Condition {
                    abnormal: true,
                    message: "staged on this node but its loop device is gone (node restarted?)"
                        .into(),
                });
            };
            if fs::superblock(&dev.path())?.is_some_and(|sb| sb.has_errors) {
                return Ok(Condition {
                    abnormal: true,
                    message: "the filesystem has recorded errors; run fsck".into(),
                });
            }
            // The kernel's own verdicts on a mounted filesystem: turned read-only after errors
            // (ext4 errors=remount-ro, btrfs), or shut down (xfs answers EIO).
            for mnt in mount::mounts()?
                .iter()
                .filter(|mnt| is_loop_mount_of(mnt, dev))
            {
                if mnt.super_read_only() && !dev.read_only {
                    return Ok(Condition {
                        abnormal: true,
                        message: format!(
                            "the filesystem at {} went read-only after errors",
                            mnt.mount_point.display()
                        ),
                    });
                }
                let shut_down = std::fs::metadata(&mnt.mount_point)
                    .is_err_and(|e| e.raw_os_error() == Some(libc::EIO));
                if shut_down {
                    return Ok(Condition {
                        abnormal: true,
                        message: format!(
                            "the filesystem at {} has shut down (I/O errors)",
                            mnt.mount_point.display()
                        ),
                    });
                }
            }
        }
        Ok(Condition {
            abnormal: false,
            message: "ok".into(),
        })
    }
}
