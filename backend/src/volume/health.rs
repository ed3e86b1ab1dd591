//! Growing a staged volume's filesystem, its usage, and its health as this node sees it.
//!
//! Usage and condition are reads: they take a [`VolumeMeta`] read without the lock (a stats
//! poll or a listing must never wait behind, or abort because of, a long stage) and one kernel
//! view for the whole call.

use std::path::Path;

use crate::error::{Error, Result};
use crate::fs::{self, Usage};
use crate::host;
use crate::kernel::{is_device_bind_of, is_fs_mount_of, uses, Image, KernelView};
use crate::loopdev;
use crate::meta::VolumeMeta;
use crate::pool::fsops::ImageStat;
use crate::pool::{layout, NodePath, Pool};
use crate::size::{self, SizeRequest};
use crate::validate::{self, FsType};

use super::Volume;

/// A volume's health as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
    /// Why it is abnormal, as one of a fixed set (metrics label by it; `message` is for people).
    pub reason: Option<AbnormalReason>,
}

/// The reasons a volume can be abnormal: a small fixed set, so a metric can count by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbnormalReason {
    /// The image file is gone from the pool.
    ImageMissing,
    /// Staged on this node but its loop device is gone (the node restarted, or someone
    /// detached it).
    DeviceGone,
    /// The filesystem recorded errors (ext4's error state): fsck it.
    FilesystemErrors,
    /// The kernel turned the filesystem read-only after errors.
    FilesystemReadOnly,
    /// The filesystem shut down (xfs answers EIO).
    FilesystemShutdown,
    /// Its metadata cannot be read or names another volume (never a `Condition`: there is no
    /// volume to ask about; listings and scans count it).
    MetadataCorrupt,
    /// Something planted where its image belongs (a symbolic link, a FIFO, a file with other
    /// links): the pool-access layer refuses to use it.
    UntrustedEntry,
    /// The image was deleted while staged: its data lives on only in the loop device.
    ImageDeletedInUse,
    /// The image was replaced by another file while staged: the loop device holds the data.
    ImageReplacedInUse,
    /// The image is shorter than the volume: reads beyond its end fail.
    ImageTruncated,
    /// ext4 aborted its journal after an I/O error (`emergency_ro`).
    FilesystemAborted,
    /// The volume's loop device cannot be read.
    DeviceUnreadable,
    /// This node fenced it (a shared pool: see `volume::fence`): its writes here fail.
    Fenced,
    /// The pool does not answer (a shared pool's client died, I/O errors, a hung mount).
    PoolNotAnswering,
}

impl AbnormalReason {
    pub const ALL: [AbnormalReason; 14] = [
        AbnormalReason::ImageMissing,
        AbnormalReason::DeviceGone,
        AbnormalReason::FilesystemErrors,
        AbnormalReason::FilesystemReadOnly,
        AbnormalReason::FilesystemShutdown,
        AbnormalReason::MetadataCorrupt,
        AbnormalReason::UntrustedEntry,
        AbnormalReason::ImageDeletedInUse,
        AbnormalReason::ImageReplacedInUse,
        AbnormalReason::ImageTruncated,
        AbnormalReason::FilesystemAborted,
        AbnormalReason::DeviceUnreadable,
        AbnormalReason::Fenced,
        AbnormalReason::PoolNotAnswering,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AbnormalReason::ImageMissing => "image_missing",
            AbnormalReason::DeviceGone => "device_gone",
            AbnormalReason::FilesystemErrors => "fs_errors",
            AbnormalReason::FilesystemReadOnly => "fs_read_only",
            AbnormalReason::FilesystemShutdown => "fs_shutdown",
            AbnormalReason::MetadataCorrupt => "metadata_corrupt",
            AbnormalReason::UntrustedEntry => "untrusted_entry",
            AbnormalReason::ImageDeletedInUse => "image_deleted_in_use",
            AbnormalReason::ImageReplacedInUse => "image_replaced_in_use",
            AbnormalReason::ImageTruncated => "image_truncated",
            AbnormalReason::FilesystemAborted => "fs_aborted",
            AbnormalReason::DeviceUnreadable => "device_unreadable",
            AbnormalReason::Fenced => "fenced",
            AbnormalReason::PoolNotAnswering => "pool_not_answering",
        }
    }
}

impl Condition {
    fn ok() -> Condition {
        Condition {
            abnormal: false,
            message: "ok".into(),
            reason: None,
        }
    }

    fn abnormal(reason: AbnormalReason, message: impl Into<String>) -> Condition {
        Condition {
            abnormal: true,
            message: message.into(),
            reason: Some(reason),
        }
    }
}

impl Volume<'_> {
    /// Grows the filesystem of the volume mounted at `path` (a staging or target path; `None`:
    /// wherever it is mounted on this node) to fill its image, refreshing the loop device first;
    /// a block volume, or an unmounted one, only gets its device refreshed. Returns the device
    /// size.
    ///
    /// With `grow_image`, the image first grows to what `size` resolves to: on a node-local pool
    /// (external-resizer has no per-node mode, so the controller cannot reach the node whose pool
    /// holds the image) and for FlexVolume's `expandfs`. Without it, the controller sized the
    /// image, and a `size` above its size is `OutOfRange`.
    pub fn node_expand(
        &mut self,
        path: Option<&NodePath>,
        size: SizeRequest,
        grow_image: bool,
    ) -> Result<u64> {
        let id = self.meta.id.clone();
        let target = size::for_expansion(&id, size, self.meta.size_bytes)?;
        if !grow_image && size.required > self.meta.size_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {id} has {} bytes, less than the required {}; expand it with \
                 ControllerExpandVolume first",
                self.meta.size_bytes, size.required
            )));
        }
        let view = KernelView::read()?;
        // A path that is not this volume is refused before the image grows.
        if let Some(p) = path {
            self.check_expand_path(&view, p)?;
        }
        if grow_image && target > self.meta.size_bytes {
            self.grow_image(target)?;
        }
        let devices = view.devices_of(self.image()?.as_ref());
        let Some(dev) = devices.first() else {
            return Err(Error::precondition(format!(
                "volume {id} is not attached on this node"
            )));
        };
        self.refresh_capacity(dev)?;
        let device = dev.path();
        let device_size = loopdev::device_size(&device)?;
        let mounted = match path {
            Some(p) => view.mount_at(p).filter(|m| is_fs_mount_of(m, dev)),
            None => view.fs_mounts(dev).next(),
        };
        let Some(mnt) = mounted else {
            // A block volume (or one attached but not mounted): the device is all there is.
            return Ok(device_size);
        };
        let fs: FsType = mnt.fs_type.parse()?;
        let current = fs::superblock(&device)?
            .map(|sb| sb.size_bytes)
            .unwrap_or(0);
        if current.saturating_add(fs::grow_slack(fs)) < device_size {
            fs::grow_online(fs, &device, &mnt.mount_point)?;
        }
        Ok(device_size)
    }

    /// `NotFound` unless the volume can be at `path` (CSI NodeExpandVolume: "volume does not
    /// exist on specified volume_path"): the path exists, and when the volume's filesystem is
    /// mounted on this node, `path` is one of those mounts (or, for a block volume, a bind of its
    /// device). Growing a volume because a caller named some other directory would report a
    /// success for a filesystem that did not grow.
    fn check_expand_path(&self, view: &KernelView, path: &NodePath) -> Result<()> {
        let not_here =
            |why: &str| Error::not_found("volume path", format!("{} ({why})", path.display()));
        if !path.is_present()? {
            return Err(not_here("it does not exist"));
        }
        let devices = view.devices_of(self.image()?.as_ref());
        let mounted_somewhere = devices.iter().any(|d| view.fs_mounts(d).next().is_some());
        let here = view
            .mount_at(path)
            .is_some_and(|m| devices.iter().any(|d| uses(m, d)));
        if mounted_somewhere && !here {
            return Err(not_here(&format!(
                "volume {} is not mounted there",
                self.meta.id
            )));
        }
        Ok(())
    }
}

impl Pool {
    /// Volume `id`'s image as the kernel knows it; `None` when it is missing. An entry that is
    /// not a volume image (a symbolic link, a device, ...) is an error naming it.
    pub(crate) fn image_of(&self, id: &crate::VolumeId) -> Result<Option<Image>> {
        let st = self.fs()?.stat_image(&layout::volume_image(id))?;
        Ok(st.map(|st| Image {
            path: self.volume_image(id),
            id: st.id,
        }))
    }

    /// Usage of volume `m` at `path` (a mounted filesystem: bytes and inodes; a published block
    /// device: bytes) and its condition, from one look at the kernel. `NotFound` when the volume
    /// is not at `path`. A filesystem that cannot answer (shut down, I/O errors) reports its
    /// device's size with nothing available, and the condition says why.
    pub fn volume_stats(&self, m: &VolumeMeta, path: &Path) -> Result<(Usage, Condition)> {
        let view = KernelView::read()?;
        let usage = self.usage_in(&view, m, path)?;
        Ok((usage, self.condition_in(Some(&view), m)?))
    }

    fn usage_in(&self, view: &KernelView, m: &VolumeMeta, path: &Path) -> Result<Usage> {
        let not_here = || {
            Error::not_found(
                "volume path",
                format!("{} (volume {} is not mounted there)", path.display(), m.id),
            )
        };
        // Only read, never mounted on: a path the volume can never be at (relative, a system
        // directory) simply does not hold it, which CSI (and csi-sanity) answer NOT_FOUND.
        if validate::check_path("volume path", path, &[]).is_err() {
            return Err(not_here());
        }
        // Where it really is (its parents' links resolved), as mountinfo names it. Whose mount
        // is there comes from mountinfo alone: a path on a shut-down filesystem cannot even be
        // stat'ed, and the volume's image may be gone (its device, bound to the deleted file, is
        // still the volume's).
        let Some((resolved, _)) = host::resolve_for_reading(path) else {
            return Err(not_here());
        };
        let path = resolved.as_path();
        let image = match self.image_of(&m.id) {
            Ok(image) => image,
            Err(e @ Error::Untrusted { .. }) => {
                tracing::warn!(volume = %m.id, error = %e, "image is not usable");
                None
            }
            Err(e) => return Err(e),
        };
        let devices = view.volume_devices(&self.volume_image(&m.id), image.as_ref());
        let at = view.mount_at(path).ok_or_else(not_here)?;
        let device_usage = |dev: &crate::loopdev::LoopDevice| -> Result<Usage> {
            let total = loopdev::device_size(&dev.path())?;
            Ok(Usage {
                total_bytes: total,
                available_bytes: 0,
                used_bytes: total,
                inodes: None,
            })
        };
        // A published block volume is a bind of its device node onto a file.
        if let Some(dev) = devices.iter().find(|d| is_device_bind_of(at, d)) {
            return device_usage(dev);
        }
        let dev = devices
            .iter()
            .find(|d| is_fs_mount_of(at, d))
            .ok_or_else(not_here)?;
        match fs::usage(path) {
            Ok(usage) => Ok(usage),
            Err(e) => {
                tracing::warn!(volume = %m.id, path = %path.display(), error = %e, "the volume's filesystem does not answer");
                device_usage(dev)
            }
        }
    }

    /// Whether volume `m` is healthy on this node: its image exists at its full size, and an
    /// attached filesystem has recorded no errors and was not turned read-only or shut down by
    /// the kernel. Each abnormal condition says what an operator can do.
    pub fn volume_condition(&self, m: &VolumeMeta) -> Result<Condition> {
        self.condition_in(None, m)
    }

    /// [`Pool::volume_condition`] of each volume of a listing, with one look at the kernel.
    pub fn volume_conditions(&self, metas: &[VolumeMeta]) -> Result<Vec<Condition>> {
        let staged_here = metas
            .iter()
            .any(|m| m.staged.iter().any(|h| h.node == *self.node()));
        let view = if staged_here {
            Some(KernelView::read()?)
        } else {
            None
        };
        metas
            .iter()
            .map(|m| self.condition_in(view.as_ref(), m))
            .collect()
    }

    /// The condition of `m`, looking at the kernel (`view`, read here when `None` and needed)
    /// only when the volume is staged on this node.
    fn condition_in(&self, view: Option<&KernelView>, m: &VolumeMeta) -> Result<Condition> {
        self.condition_with(view, m, self.fs()?.stat_image(&layout::volume_image(&m.id)))
    }

    /// [`Pool::condition_in`] with the image already stat'ed (`image`, as
    /// `PoolFs::stat_image` answers): a listing stats it from the entry's directory.
    pub(crate) fn condition_with(
        &self,
        view: Option<&KernelView>,
        m: &VolumeMeta,
        image: Result<Option<ImageStat>>,
    ) -> Result<Condition> {
        use AbnormalReason as R;
        // Shared pools: a pool that stops answering (see `fence`).
        if let Some(c) = self.unreachable_condition() {
            return Ok(c);
        }
        let path = self.volume_image(&m.id);
        let stat = match image {
            Ok(stat) => stat,
            // A planted entry where the image belongs: that is the volume's condition.
            Err(e @ Error::Untrusted { .. }) => {
                return Ok(Condition::abnormal(R::UntrustedEntry, e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let staged_here = m.staged.iter().any(|h| h.node == *self.node());
        let read;
        let view = match (view, staged_here) {
            (_, false) => None,
            (Some(v), true) => Some(v),
            (None, true) => {
                read = KernelView::read()?;
                Some(&read)
            }
        };
        if let Some(dev) = view.and_then(|v| v.stale_devices_of(&path).into_iter().next()) {
            let (reason, how, now) = match stat {
                Some(_) => (
                    R::ImageReplacedInUse,
                    "replaced by another file",
                    format!(" (the file now at {} is not what it wrote)", path.display()),
                ),
                None => (R::ImageDeletedInUse, "deleted", String::new()),
            };
            let dev = dev.path();
            return Ok(Condition::abnormal(
                reason,
                format!(
                    "the image of volume {} was {how} while in use{now}; the volume's data is \
                     still readable from {} until it is unstaged on this node: copy it now (dd \
                     if={} of=<file> bs=4M conv=sparse), then unstage it",
                    m.id,
                    dev.display(),
                    dev.display()
                ),
            ));
        }
        let Some(stat) = stat else {
            // A create interrupted between its metadata and moving its image into place.
            let tmp = layout::volume_image_tmp(&m.id);
            let message = if self.fs()?.exists(&tmp).unwrap_or(false) {
                format!(
                    "image {} is missing: its create was interrupted before {} moved into place; \
                     a repeat of the create finishes it",
                    path.display(),
                    self.fs()?.path(&tmp).display()
                )
            } else {
                format!("image {} is missing", path.display())
            };
            return Ok(Condition::abnormal(R::ImageMissing, message));
        };
        if stat.len < m.size_bytes {
            return Ok(Condition::abnormal(
                R::ImageTruncated,
                format!(
                    "image {} is {} bytes, less than the volume's {}: it was truncated, and reads \
                     beyond its end fail; restore the volume from a snapshot or a backup",
                    path.display(),
                    stat.len,
                    m.size_bytes
                ),
            ));
        }
        let Some(view) = view else {
            return Ok(Condition::ok());
        };
        let image = Image { path, id: stat.id };
        let devices = view.devices_of(Some(&image));
        let Some(dev) = devices.first() else {
            return Ok(Condition::abnormal(
                R::DeviceGone,
                "staged on this node but its loop device is gone (node restarted?)",
            ));
        };
        // Shared pools: fenced on this node (see `fence`).
        if let Some(c) = self.fence_condition(m, dev) {
            return Ok(c);
        }
        // The kernel's own verdicts on a mounted filesystem: aborted after errors (ext4's
        // emergency_ro), turned read-only after errors (errors=remount-ro, btrfs), or shut
        // down (xfs, ext4: every access answers EIO).
        for mnt in view.fs_mounts(dev) {
            let mp = mnt.mount_point.display();
            if mnt.super_options.iter().any(|o| o == "emergency_ro") {
                return Ok(Condition::abnormal(
                    R::FilesystemAborted,
                    format!(
                        "the filesystem at {mp} aborted after an I/O error and is read-only \
                         (emergency_ro); unstage the volume, check it (e2fsck -f), stage it again"
                    ),
                ));
            }
            if mnt.super_read_only() && !dev.read_only {
                return Ok(Condition::abnormal(
                    R::FilesystemReadOnly,
                    format!("the filesystem at {mp} went read-only after errors"),
                ));
            }
            if host::answers_eio(&mnt.mount_point) {
                return Ok(Condition::abnormal(
                    R::FilesystemShutdown,
                    format!(
                        "the filesystem at {mp} has shut down (I/O errors); unstage the volume \
                         and check it before staging it again"
                    ),
                ));
            }
        }
        match fs::superblock(&dev.path()) {
            Ok(Some(sb)) if sb.has_errors => {
                return Ok(Condition::abnormal(
                    R::FilesystemErrors,
                    "the filesystem has recorded errors; run fsck",
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Ok(Condition::abnormal(
                    R::DeviceUnreadable,
                    format!("reading {} fails: {e}", dev.path().display()),
                ));
            }
        }
        Ok(Condition::ok())
    }
}
