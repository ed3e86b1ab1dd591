//! Publishing a staged volume into a workload's path (a bind of the staging mount, or of the
//! device node for raw block), taking it back out, and finding which volume a path holds.

use std::path::Path;

use crate::error::{Error, Result};
use crate::host;
use crate::ids::VolumeId;
use crate::kernel::{former_path, is_device_bind_of, is_fs_mount_of, uses, KernelView};
use crate::meta::AccessMode;
use crate::mount;
use crate::plan;
use crate::pool::{NodePath, Pool};
use crate::validate;

use super::stage::{check_existing_mount, Access};
use super::Volume;

/// What to publish, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Where the volume is staged on this node; `None`: wherever its filesystem is mounted
    /// (FlexVolume attach mode, where kubelet chose the device mount path).
    pub staging: Option<NodePath>,
    /// Where the workload gets it: a directory (created if missing), or for `Access::Block` a
    /// file the device node is bound onto.
    pub target: NodePath,
    pub access: Access,
    pub read_only: bool,
    /// The pod's fsGroup: the volume's root becomes group-owned and group-writable (setgid, so
    /// new files inherit it), which is what kubelet's recursive chown would do, at the cost of
    /// one chown.
    pub fs_group: Option<u32>,
    /// One workload at a time (CSI's SINGLE_NODE_SINGLE_WRITER): refused while the volume is
    /// mounted anywhere on this node but its staging path and this target.
    pub exclusive: bool,
}

/// The volume whose filesystem or device is mounted at `path` on this node, read back from the
/// kernel: the mount at `path` → its loop device → the image it is bound to → the volume that
/// owns it (also when that image was deleted or replaced since it was attached).
pub(super) fn volume_mounted_at(pool: &Pool, view: &KernelView, path: &Path) -> Option<VolumeId> {
    let m = view.mount_at(path)?;
    let dev = view.device_of_mount(m)?;
    pool.volume_id_of_image(former_path(&dev.backing_file))
}

impl Pool {
    /// The volume published or staged at `path` on this node (see [`Volume::publish`]); `None`
    /// when nothing of this pool is mounted there.
    pub fn volume_at(&self, path: &Path) -> Result<Option<VolumeId>> {
        Ok(volume_mounted_at(self, &KernelView::read()?, path))
    }

    /// FlexVolume `unmount`: unpublishes `target` and, when no other mount of the volume is left
    /// besides its default staging mount, unstages it too, both under the volume's lock. A target
    /// that is not mounted (already unmounted, or the node rebooted) only loses its directory.
    pub fn release_target(&self, target: &NodePath) -> Result<Option<VolumeId>> {
        let Some(id) = self.volume_at(target)? else {
            target.remove_dir_if_empty();
            return Ok(None);
        };
        let mut volume = self.volume(&id)?;
        volume.unpublish(target)?;
        volume.release_staging_if_unused()?;
        Ok(Some(id))
    }
}

impl Volume<'_> {
    /// Publishes the staged volume at `p.target`: a bind of the staging mount, or for
    /// `Access::Block` a bind of the device node onto a file. Idempotent; a different volume or
    /// mode already at the target is `AlreadyExists`; an exclusive publication while the volume
    /// is in use elsewhere on this node is `FailedPrecondition`.
    pub fn publish(&mut self, p: &Publish) -> Result<()> {
        let id = self.meta.id.clone();
        if let Access::Mount { mount_options, .. } = &p.access {
            validate::check_mount_options(mount_options)?;
        }
        let target: &Path = &p.target;
        let view = KernelView::read()?;
        self.refuse_stale(&view)?;
        let devices = view.devices_of(self.image()?.as_ref());
        let Some(dev) = devices.first() else {
            return Err(Error::precondition(format!(
                "volume {id} is not staged on this node"
            )));
        };
        if dev.cut_off {
            return Err(Error::precondition(format!(
                "volume {id} was fenced on this node; unstage it and stage it again"
            )));
        }
        // Staged read-only (a read-only claim makes a read-only stage): every publication too.
        let read_only = p.read_only || dev.read_only;
        if p.exclusive {
            let mut except = vec![target];
            except.extend(p.staging.as_deref());
            if let Some(other) = view.users(&devices, &except).first() {
                return Err(Error::precondition(format!(
                    "volume {id} is for one workload at a time (SINGLE_NODE_SINGLE_WRITER) and \
                     already published at {}; unpublish it there first",
                    other.mount_point.display()
                )));
            }
        }

        if let Some(existing) = view.mount_at(target) {
            let ours = match p.access {
                Access::Block => is_device_bind_of(existing, dev),
                Access::Mount { .. } => is_fs_mount_of(existing, dev),
            };
            return check_existing_mount("target path", target, existing, ours, &id, read_only);
        }

        match &p.access {
            Access::Block => {
                if !p.read_only {
                    self.record_raw_block()?;
                }
                let mount_point = p.target.create_block_target()?;
                let flags = plan::bind_flags(true, read_only, &[]);
                mount::bind(&dev.path(), &dev.path(), &mount_point, flags)?;
            }
            Access::Mount { mount_options, .. } => {
                // The staged filesystem's root, opened: bound from its descriptor.
                let (source, shown) = match &p.staging {
                    Some(s) => {
                        // Checked through the resolved directory too: the root opened
                        // below is that directory's, the mount checked here.
                        if !view.mount_on(s)?.is_some_and(|sm| is_fs_mount_of(sm, dev)) {
                            return Err(Error::precondition(format!(
                                "volume {id} is not staged at {}; stage it first",
                                s.display()
                            )));
                        }
                        (s.open_dir()?, s.to_path_buf())
                    }
                    None => {
                        let at = view
                            .fs_mounts(dev)
                            .find(|m| m.root == Path::new("/"))
                            .map(|m| m.mount_point.clone())
                            .ok_or_else(|| {
                                Error::precondition(format!(
                                    "volume {id} is attached but not mounted on this node"
                                ))
                            })?;
                        (host::open_mount_root(&at)?, at)
                    }
                };
                if let Some(gid) = p.fs_group.filter(|_| !read_only) {
                    host::apply_fs_group(&source, &shown, gid)?;
                }
                let mount_point = p.target.mkdir_p()?;
                let flags = plan::bind_flags(false, read_only, mount_options);
                mount::bind(&host::proc_fd(&source), &shown, &mount_point, flags)?;
            }
        }
        tracing::info!(volume = %id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// Removes the publication at `target`: unmounts it (every stacked mount of this volume) and
    /// removes the directory or file. Not published: nothing to do.
    pub fn unpublish(&mut self, target: &NodePath) -> Result<()> {
        let id = self.meta.id.clone();
        let mut view = KernelView::read()?;
        // Also a device bound to an image deleted or replaced since: still this volume's.
        let devices = self.devices(&view)?;
        // Bounded: a target holds a handful of stacked mounts at most. Each unmount changes the
        // table, so each round looks again. A directory of the path replaced since it was
        // resolved is refused by `mount_on`; the unmount reaches the mount through the resolved
        // parent, and only if it is still `existing`.
        for _ in 0..16 {
            let Some(existing) = view.mount_on(target)? else {
                break;
            };
            if !devices.iter().any(|d| uses(existing, d)) {
                return Err(Error::precondition(format!(
                    "{} holds {}, not volume {id}; leaving it alone",
                    target.display(),
                    existing.source
                )));
            }
            mount::unmount(target, existing)?;
            view.reread_mounts()?;
        }
        target.remove_target();
        tracing::info!(volume = %id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// FlexVolume node mode's `mount`: stages the volume read-write at its default staging path
    /// (other pods on the node may write, and a blank volume must be formatted) and publishes it
    /// at `p.target`, under this one lock. When either step fails, the staging mount and the loop
    /// device are released unless another pod uses them: kubelet never unmounts a mount that
    /// failed.
    pub fn stage_and_publish(&mut self, p: &Publish) -> Result<()> {
        let staging = self.pool.default_staging_path(&self.meta.id)?;
        let publish = Publish {
            staging: Some(staging.clone()),
            ..p.clone()
        };
        let result = self
            .stage(&staging, &p.access, AccessMode::SingleNodeWriter)
            .and_then(|_| self.publish(&publish));
        if result.is_err() {
            let id = self.meta.id.clone();
            match self.release_staging_if_unused() {
                Ok(released) => {
                    tracing::info!(volume = %id, released, "mount failed; released what no pod uses")
                }
                Err(undo) => {
                    tracing::warn!(volume = %id, error = %undo, "mount failed; could not release the staging mount")
                }
            }
        }
        result
    }

    /// Unstages the volume from its default staging path (FlexVolume node mode) when no other
    /// mount of it is left; returns whether it did.
    pub fn release_staging_if_unused(&mut self) -> Result<bool> {
        let staging = self.pool.default_staging_path(&self.meta.id)?;
        let view = KernelView::read()?;
        let devices = self.devices(&view)?;
        if !view.users(&devices, &[&staging]).is_empty() {
            return Ok(false);
        }
        self.unstage(&staging)?;
        Ok(true)
    }
}
