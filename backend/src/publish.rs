//! Publishing a staged volume into a workload's path (a bind of the staging mount, or of the
//! device node for raw block), taking it back out, and finding which volume a path holds.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::error::{Context, Error, Result};
use crate::loopdev::{self, LoopDevice};
use crate::mount;
use crate::node::{
    check_existing_mount, is_device_bind_of, is_loop_mount_of, mkdir_p, remove_dir_if_empty,
    Access, DEFAULT_FLAGS,
};
use crate::pool::Pool;
use crate::validate;

impl Pool {
    /// Publishes a staged volume at `target`: a bind of the staging mount (a directory, created
    /// if missing), or for `Access::Block` a bind of the device node onto a file. `fs_group`, when
    /// given, makes the volume's root directory group-owned and group-writable (setgid, so new
    /// files inherit it): what kubelet's recursive chown would do, at the cost of one chown.
    /// Idempotent; a different volume or mode already at `target` is `AlreadyExists`.
    pub fn publish(
        &self,
        id: &str,
        staging_path: Option<&Path>,
        target: &Path,
        access: &Access,
        read_only: bool,
        fs_group: Option<u32>,
    ) -> Result<()> {
        validate::check_id("volume ID", id)?;
        if let Some(s) = staging_path {
            self.check_node_path("staging path", s)?;
        }
        self.check_node_path("target path", target)?;
        if let Access::Mount { mount_options, .. } = access {
            validate::check_mount_options(mount_options)?;
        }
        let _guard = self.lock_volume(id)?;
        self.get_volume(id)?;
        let devices = loopdev::find(&self.volume_image(id))?;
        let Some(dev) = devices.first() else {
            return Err(Error::precondition(format!(
                "volume {id} is not staged on this node"
            )));
        };
        let table = mount::mounts()?;
        let mut flags = DEFAULT_FLAGS;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }

        if let Some(existing) = mount::mount_at(&table, target) {
            let ours = match access {
                Access::Block => is_device_bind_of(existing, dev),
                Access::Mount { .. } => is_loop_mount_of(existing, dev),
            };
            check_existing_mount("target path", target, existing, ours, id, read_only)?;
            return Ok(());
        }

        match access {
            Access::Block => {
                if let Some(parent) = target.parent() {
                    mkdir_p(parent)?;
                }
                match std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(target)
                {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if std::fs::metadata(target).is_ok_and(|m| m.is_dir()) {
                            return Err(Error::invalid(
                                "target path",
                                format!(
                                    "{} is a directory; a block volume needs a file",
                                    target.display()
                                ),
                            ));
                        }
                    }
                    Err(e) => return Err(e).context(|| format!("create {}", target.display())),
                }
                // nodev would make the bound device node unusable.
                mount::bind(&dev.path(), target, flags & !MsFlags::MS_NODEV)?;
            }
            Access::Mount { mount_options, .. } => {
                let source = match staging_path {
                    Some(s) => {
                        match mount::mount_at(&table, s) {
                            Some(sm) if is_loop_mount_of(sm, dev) => {}
                            _ => {
                                return Err(Error::precondition(format!(
                                    "volume {id} is not staged at {}; stage it first",
                                    s.display()
                                )))
                            }
                        }
                        s.to_path_buf()
                    }
                    None => table
                        .iter()
                        .find(|m| is_loop_mount_of(m, dev) && m.root == Path::new("/"))
                        .map(|m| m.mount_point.clone())
                        .ok_or_else(|| {
                            Error::precondition(format!(
                                "volume {id} is attached but not mounted on this node"
                            ))
                        })?,
                };
                if let Some(gid) = fs_group {
                    if !read_only {
                        apply_fs_group(&source, gid)?;
                    }
                }
                let (extra, _) = mount::split_options(MsFlags::empty(), mount_options);
                mkdir_p(target)?;
                mount::bind(&source, target, flags | extra)?;
            }
        }
        tracing::info!(volume = %id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// Removes the publication at `target`: unmounts it (every stacked mount of this volume) and
    /// removes the directory or file. Not published: nothing to do. Unknown volume: `NotFound`.
    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        validate::check_id("volume ID", id)?;
        self.check_node_path("target path", target)?;
        let _guard = self.lock_volume(id)?;
        self.get_volume(id)?;
        let devices = loopdev::find(&self.volume_image(id))?;
        self.unmount_target(id, &devices, target)?;
        tracing::info!(volume = %id, target = %target.display(), "unpublished");
        Ok(())
    }

    fn unmount_target(&self, id: &str, devices: &[LoopDevice], target: &Path) -> Result<()> {
        // Bounded: a target holds a handful of stacked mounts at most.
        for _ in 0..16 {
            let table = mount::mounts()?;
            let Some(existing) = mount::mount_at(&table, target) else {
                break;
            };
            let ours = devices
                .iter()
                .any(|d| is_loop_mount_of(existing, d) || is_device_bind_of(existing, d));
            if !ours {
                return Err(Error::precondition(format!(
                    "{} holds {}, not volume {id}; leaving it alone",
                    target.display(),
                    existing.source
                )));
            }
            mount::unmount(target)?;
        }
        match std::fs::symlink_metadata(target) {
            Ok(md) if md.is_dir() => remove_dir_if_empty(target),
            Ok(md) if md.is_file() && md.len() == 0 => {
                let _ = std::fs::remove_file(target);
            }
            _ => {}
        }
        Ok(())
    }

    /// Where volume `id` is mounted on this node (its filesystem, binds of it, binds of its
    /// device node), leaving out the paths in `except`. A single-workload access mode uses it
    /// to refuse a second publication.
    pub fn mounts_of(&self, id: &str, except: &[&Path]) -> Result<Vec<PathBuf>> {
        validate::check_id("volume ID", id)?;
        let devices = loopdev::find(&self.volume_image(id))?;
        Ok(mount::mounts()?
            .iter()
            .filter(|m| !except.contains(&m.mount_point.as_path()))
            .filter(|m| {
                devices
                    .iter()
                    .any(|d| is_loop_mount_of(m, d) || is_device_bind_of(m, d))
            })
            .map(|m| m.mount_point.clone())
            .collect())
    }

    /// The volume published or staged at `path` on this node, read back from the kernel: the
    /// mount at `path` → its loop device → the image it is bound to → the volume that owns it.
    pub fn volume_at(&self, path: &Path) -> Result<Option<String>> {
        let table = mount::mounts()?;
        let Some(m) = mount::mount_at(&table, path) else {
            return Ok(None);
        };
        let number = if m.major == loopdev::LOOP_MAJOR {
            m.minor
        } else if let Some(n) = m
            .source
            .strip_prefix("/dev/loop")
            .and_then(|n| n.parse().ok())
        {
            n
        } else if let Some(n) = m
            .fs_type
            .eq("devtmpfs")
            .then(|| m.root.to_str()?.strip_prefix("/loop")?.parse().ok())
            .flatten()
        {
            n
        } else {
            return Ok(None);
        };
        let Some(dev) = loopdev::list()?.into_iter().find(|d| d.number == number) else {
            return Ok(None);
        };
        Ok(self.volume_id_of_image(&dev.backing_file))
    }

    /// FlexVolume `unmount`: unpublishes `target`; when no other mount of the volume is left
    /// besides its staging mount under the pool, unstages it too. A target that is not mounted
    /// (already unmounted, or the node rebooted) only loses its directory.
    pub fn release_target(&self, target: &Path) -> Result<Option<String>> {
        self.check_node_path("target path", target)?;
        let Some(id) = self.volume_at(target)? else {
            remove_dir_if_empty(target);
            return Ok(None);
        };
        self.unpublish(&id, target)?;
        self.release_staging_if_unused(&id)?;
        Ok(Some(id))
    }

    /// Unstages volume `id` from its default staging path (FlexVolume node mode) when no other
    /// mount of it is left; returns whether it did. The check and the unstage hold the volume's
    /// lock together, so a pod publishing meanwhile is never left on a released staging mount.
    pub fn release_staging_if_unused(&self, id: &str) -> Result<bool> {
        let staging = self.default_staging_path(id)?;
        let _guard = self.lock_volume(id)?;
        let table = mount::mounts()?;
        let devices = loopdev::find(&self.volume_image(id))?;
        let other_users = table
            .iter()
            .filter(|m| {
                devices
                    .iter()
                    .any(|d| is_loop_mount_of(m, d) || is_device_bind_of(m, d))
            })
            .any(|m| m.mount_point != staging);
        if other_users {
            return Ok(false);
        }
        self.unstage_locked(id, &staging)?;
        Ok(true)
    }
}

/// Gives group `gid` the volume's root directory (setgid, group rwx): new files inherit the
/// group, so a pod's fsGroup can write without a recursive chown of existing data.
fn apply_fs_group(root: &Path, gid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::chown(root, None, Some(nix::unistd::Gid::from_raw(gid)))
        .context(|| format!("chown {} to group {gid}", root.display()))?;
    let mode = std::fs::metadata(root)
        .context(|| format!("stat {}", root.display()))?
        .permissions()
        .mode();
    std::fs::set_permissions(
        root,
        std::fs::Permissions::from_mode((mode & 0o7777) | 0o2070),
    )
    .context(|| format!("chmod {}", root.display()))
}
