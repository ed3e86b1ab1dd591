//! What the tests see of the kernel: loop devices, the mount table, filesystem capabilities.
//! The ONE module of this test code that reaches into the backend's low-level modules (through
//! `loopvol::testing`, the `test-support` feature), so a change there is a change here alone.

use std::path::{Path, PathBuf};

/// A bound loop device: `path()` is its node, `backing_file` its image as sysfs names it.
pub use loopvol::testing::loopdev::LoopDevice;

/// Every bound loop device (none when sysfs cannot be read).
pub fn loop_devices() -> Vec<LoopDevice> {
    loopvol::testing::loopdev::list().unwrap_or_default()
}

/// The loop devices bound to `image`, found as the backend finds them (by the image's inode).
pub fn loops_backing(image: &Path) -> Vec<LoopDevice> {
    loopvol::testing::loopdev::find(image)
        .unwrap_or_else(|e| panic!("loop devices of {}: {e}", image.display()))
}

/// Attaches the file `image` to a free loop device (a test's own pool filesystem).
pub fn attach(image: &Path) -> LoopDevice {
    loopvol::testing::loopdev::attach(image, false)
        .unwrap_or_else(|e| panic!("attach {}: {e}", image.display()))
}

/// Mounts the block device `device` (a filesystem of type `fs_type`) at `target`.
pub fn mount_device(device: &Path, target: &Path, fs_type: &str) {
    loopvol::testing::mount::mount_fs(device, target, fs_type, nix::mount::MsFlags::empty(), "")
        .unwrap_or_else(|e| panic!("mount {} at {}: {e}", device.display(), target.display()))
}

/// Detaches `dev` (already detached counts as done).
pub fn detach(dev: &LoopDevice) -> Result<(), String> {
    loopvol::testing::loopdev::detach(dev).map_err(|e| e.to_string())
}

/// One line of this process's mountinfo, as much of it as the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The per-mount options (`ro`, `nodev`, `noatime`...).
    pub options: Vec<String>,
}

impl Mount {
    pub fn has_option(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }
}

/// The mount table, in mountinfo order (later lines stack over earlier ones). Empty when it
/// cannot be read.
pub fn mounts() -> Vec<Mount> {
    loopvol::testing::mount::mounts()
        .unwrap_or_default()
        .into_iter()
        .map(|m| Mount {
            mount_point: m.mount_point,
            fs_type: m.fs_type,
            options: m.options,
        })
        .collect()
}

/// The topmost mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<Mount> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

/// Whether this process may grow a mounted ext4 (the resize ioctl needs CAP_SYS_RESOURCE).
pub fn can_grow_ext4_online() -> bool {
    loopvol::testing::fs::can_grow_ext4_online()
}
