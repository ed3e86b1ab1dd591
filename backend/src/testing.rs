//! What the test suites need of the kernel-facing modules, and nothing more: finding, detaching
//! and (for a pool filesystem of their own) attaching loop devices, reading the mount table,
//! mounting and unmounting. Only with the `test-support` feature, which only the test crates
//! enable: the front ends cannot reach `loopdev::attach` or `mount::bind` and skip the locks.

/// Loop devices.
pub mod loopdev {
    use std::path::Path;

    pub use crate::loopdev::LoopDevice;
    use crate::Result;

    /// Every bound loop device.
    pub fn list() -> Result<Vec<LoopDevice>> {
        crate::loopdev::list()
    }

    /// The loop devices bound to the file at `image` (by path or by identity).
    pub fn find(image: &Path) -> Result<Vec<LoopDevice>> {
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = std::fs::metadata(image) else {
            return Ok(Vec::new());
        };
        let id = crate::loopdev::FileId {
            dev: md.dev(),
            ino: md.ino(),
        };
        Ok(list()?
            .into_iter()
            .filter(|d| d.is_backed_by(image, id))
            .collect())
    }

    /// Attaches `image` (any file) to a free loop device.
    pub fn attach(image: &Path, read_only: bool) -> Result<LoopDevice> {
        use crate::error::Context;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image)
            .context(|| format!("open {}", image.display()))?;
        crate::loopdev::attach(&file, image, read_only)
    }

    pub fn detach(dev: &LoopDevice) -> Result<()> {
        crate::loopdev::detach(dev)
    }

    /// Size in bytes of a block device.
    pub fn device_size(device: &Path) -> Result<u64> {
        crate::loopdev::device_size(device)
    }
}

/// The mount table and mount(2).
pub mod mount {
    use std::path::Path;

    use nix::mount::MsFlags;

    pub use crate::mount::MountEntry;
    use crate::Result;

    /// The current mount table.
    pub fn mounts() -> Result<Vec<MountEntry>> {
        crate::mount::mounts()
    }

    /// Parses mountinfo text.
    pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
        crate::mount::parse_mountinfo(text)
    }

    /// The topmost mount at exactly `path`.
    pub fn mount_at<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
        crate::mount::mount_at(table, path)
    }

    /// Mounts the block device `source` of type `fs_type` at `target`.
    pub fn mount_fs(
        source: &Path,
        target: &Path,
        fs_type: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<()> {
        use crate::error::Context;
        let data = (!data.is_empty()).then_some(data);
        nix::mount::mount(Some(source), target, Some(fs_type), flags, data)
            .context(|| format!("mount {} at {}", source.display(), target.display()))
    }

    /// Unmounts the test's own mount at `target`, by its path (not mounted: done; EBUSY
    /// retried a little, as the backend does).
    pub fn unmount(target: &Path) -> Result<()> {
        let flags = nix::mount::MntFlags::UMOUNT_NOFOLLOW;
        crate::mount::retry_busy(&target.display().to_string(), || {
            Ok(nix::mount::umount2(target, flags))
        })
    }

    /// The backend's unmount of a host path: `expected`, a mount the test found at `at`, is
    /// unmounted through the directory `at` was resolved to, and only if it is the mount there.
    /// For tests of what happens when a directory of the path is replaced between the lookup
    /// and the unmount, inside one call.
    pub fn unmount_node_path(at: &crate::NodePath, expected: &MountEntry) -> Result<()> {
        crate::mount::unmount(at, expected)
    }
}

/// Filesystems.
pub mod fs {
    /// Whether this process may grow a mounted ext4 (it needs CAP_SYS_RESOURCE).
    pub fn can_grow_ext4_online() -> bool {
        crate::fs::can_grow_ext4_online()
    }
}
