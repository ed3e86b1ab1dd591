//! The node's own directories that volumes are staged and published at (kubelet's, or the
//! pool's `staging/`): creating and removing mount points, and what a publication needs done to
//! the volume's root. Every path here already passed [`crate::NodePath`]'s checks.
//!
//! Issue 12 resolves these paths once (`O_PATH`) and mounts onto the resolved descriptor; this
//! module is where that goes.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use crate::error::{Context, Error, Result};

/// Creates the directory `path` and its parents (mode 0750 for those it makes).
pub(crate) fn mkdir_p(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(path)
        .context(|| format!("create directory {}", path.display()))
}

/// Removes the directory `path` if it is empty; anything else is left as it is.
pub(crate) fn remove_dir_if_empty(path: &Path) {
    match std::fs::remove_dir(path) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) => {}
        Err(e) => tracing::debug!(path = %path.display(), error = %e, "left directory in place"),
    }
}

/// Makes the file a raw block volume is bound onto (its parent too). An existing file is
/// reused; a directory there is `InvalidArgument`.
pub(crate) fn create_block_target(target: &Path) -> Result<()> {
    if let Some(parent) = target.parent() {
        mkdir_p(parent)?;
    }
    match std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(target)
    {
        Ok(_) => Ok(()),
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
            Ok(())
        }
        Err(e) => Err(e).context(|| format!("create {}", target.display())),
    }
}

/// Removes what a publication made at `target` once it is unmounted: its empty directory, or
/// the empty file a block volume was bound onto. Anything else stays.
pub(crate) fn remove_target(target: &Path) {
    match std::fs::symlink_metadata(target) {
        Ok(md) if md.is_dir() => remove_dir_if_empty(target),
        Ok(md) if md.is_file() && md.len() == 0 => {
            let _ = std::fs::remove_file(target);
        }
        _ => {}
    }
}

/// Whether something exists at `path`.
pub(crate) fn exists(path: &Path) -> bool {
    path.exists()
}

/// What a volume path a caller names is, for a stats call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    Missing,
    /// A file or a device node: where a block volume is published.
    FileOrDevice,
    Directory,
}

pub(crate) fn kind_of(path: &Path) -> PathKind {
    match std::fs::metadata(path) {
        Err(_) => PathKind::Missing,
        Ok(md) if md.file_type().is_block_device() || md.is_file() => PathKind::FileOrDevice,
        Ok(_) => PathKind::Directory,
    }
}

/// Whether the filesystem mounted at `mount_point` answers EIO (the kernel shut it down).
pub(crate) fn answers_eio(mount_point: &Path) -> bool {
    std::fs::metadata(mount_point).is_err_and(|e| e.raw_os_error() == Some(libc::EIO))
}

/// Gives group `gid` the volume's root directory (setgid, group rwx): new files inherit the
/// group, so a pod's fsGroup can write without a recursive chown of existing data.
pub(crate) fn apply_fs_group(root: &Path, gid: u32) -> Result<()> {
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
