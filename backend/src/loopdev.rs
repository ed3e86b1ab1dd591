//! Loop devices: which image is attached where (read back from sysfs, never stored), attach with
//! direct I/O, capacity refresh, detach.

use std::cell::OnceCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{Context, Error, Result};
use crate::sys;

/// Logical block size of every loopvol device. Left to the kernel it follows the backing file's
/// direct-I/O alignment, which changes with the file's state (a reflinked copy on xfs needs 4096
/// where the sparse original took 512): a filesystem made with 1 KiB blocks would then no longer
/// mount. A fixed 4096 keeps every image mountable wherever it is attached.
pub(crate) const BLOCK_SIZE: u32 = 4096;

/// The block major number of loop devices.
pub(crate) const LOOP_MAJOR: u32 = 7;

/// A file's identity: the device of its filesystem and its inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A loop device and the image bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub number: u32,
    /// The path the image had when it was bound (sysfs' `loop/backing_file`).
    pub backing_file: PathBuf,
    pub read_only: bool,
    /// Fenced: its window onto the image was moved past the end ([`cut_off`]), so every I/O
    /// fails. loopvol never sets an offset otherwise.
    pub cut_off: bool,
    /// The identity of the backing file, asked of the device (one ioctl) the first time it is
    /// needed: a different path to the same file (a bind mount of the pool) is still that file.
    backing_id: OnceCell<Option<FileId>>,
}

impl LoopDevice {
    pub(crate) fn new(number: u32, backing_file: PathBuf, read_only: bool) -> LoopDevice {
        LoopDevice {
            number,
            backing_file,
            read_only,
            cut_off: false,
            backing_id: OnceCell::new(),
        }
    }

    /// A device whose backing identity is already known (table tests need no kernel).
    #[cfg(test)]
    pub(crate) fn with_backing_id(self, id: Option<FileId>) -> LoopDevice {
        let _ = self.backing_id.set(id);
        self
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    /// Whether this device is bound to the image at `path` whose identity is `id`.
    pub fn is_backed_by(&self, path: &Path, id: FileId) -> bool {
        self.backing_file == path || self.backing_id() == Some(id)
    }

    fn backing_id(&self) -> Option<FileId> {
        *self.backing_id.get_or_init(|| {
            let dev = File::open(self.path()).ok()?;
            let info = sys::loop_get_status64(dev.as_fd()).ok()?;
            Some(FileId {
                dev: info.lo_device,
                ino: info.lo_inode,
            })
        })
    }
}

fn sys_block() -> &'static Path {
    Path::new("/sys/block")
}

/// Every bound loop device, from `/sys/block/loopN/loop/backing_file`.
pub(crate) fn list() -> Result<Vec<LoopDevice>> {
    let mut devices = Vec::new();
    let entries = std::fs::read_dir(sys_block()).context(|| "read /sys/block".into())?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        // Missing `loop/backing_file` means the device is unbound (or was just detached).
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let read_only =
            std::fs::read_to_string(entry.path().join("ro")).is_ok_and(|s| s.trim() == "1");
        let mut dev = LoopDevice::new(
            number,
            PathBuf::from(backing.trim_end_matches('\n')),
            read_only,
        );
        dev.cut_off = std::fs::read_to_string(entry.path().join("loop/offset"))
            .is_ok_and(|s| s.trim() != "0");
        devices.push(dev);
    }
    devices.sort_by_key(|d| d.number);
    Ok(devices)
}

/// Attaches the open image `backing` (at `image`, for messages) to a free loop device (direct
/// I/O, read-only when asked) and returns it. The device binds the descriptor, never re-opens the
/// path. Not idempotent by itself: callers look in the kernel view first, under the volume's lock.
pub(crate) fn attach(backing: &File, image: &Path, read_only: bool) -> Result<LoopDevice> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context(|| "open /dev/loop-control".into())?;
    let mut flags = sys::LO_FLAGS_DIRECT_IO;
    if read_only {
        flags |= sys::LO_FLAGS_READ_ONLY;
    }
    // The device takes the size the kernel has for the image: on a shared pool, fetch it afresh
    // (another node may have grown it a moment ago).
    sys::refresh_size(backing.as_fd()).context(|| format!("stat {}", image.display()))?;
    // Another process may take the free device between GET_FREE and CONFIGURE: then CONFIGURE says
    // EBUSY and we ask again. The bound keeps a broken kernel from spinning us forever.
    for _ in 0..64 {
        let number =
            sys::loop_ctl_get_free(control.as_fd()).context(|| "get a free loop device".into())?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let dev = match OpenOptions::new().read(true).write(!read_only).open(&path) {
            Ok(dev) => dev,
            // udev or devtmpfs may not have the node yet, or it vanished with a removal: retry.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).context(|| format!("open {}", path.display())),
        };
        match sys::loop_configure(dev.as_fd(), backing.as_fd(), flags, BLOCK_SIZE) {
            Ok(()) => {}
            Err(Errno::EBUSY) => continue,
            // Direct I/O needs the backing filesystem's support (tmpfs has none): fall back to
            // buffered I/O rather than refusing the volume.
            Err(Errno::EINVAL) if flags & sys::LO_FLAGS_DIRECT_IO != 0 => {
                tracing::warn!(image = %image.display(), "direct I/O refused by the pool's filesystem; using buffered I/O");
                flags &= !sys::LO_FLAGS_DIRECT_IO;
                match sys::loop_configure(dev.as_fd(), backing.as_fd(), flags, BLOCK_SIZE) {
                    Ok(()) => {}
                    Err(Errno::EBUSY) => continue,
                    Err(e) => {
                        return Err(e)
                            .context(|| format!("bind {} to {}", image.display(), path.display()))
                    }
                }
            }
            Err(e) => {
                return Err(e).context(|| format!("bind {} to {}", image.display(), path.display()))
            }
        }
        tracing::info!(image = %image.display(), device = %path.display(), read_only, "attached");
        return Ok(LoopDevice::new(number, image.to_path_buf(), read_only));
    }
    Err(Error::Busy(format!(
        "loop devices (could not bind {})",
        image.display()
    )))
}

/// Re-reads the image size into the loop device after the image grew. `image`, the image open
/// (any mode), has its size fetched afresh first (see `sys::refresh_size`).
pub(crate) fn refresh_capacity(dev: &LoopDevice, image: &File) -> Result<()> {
    sys::refresh_size(image.as_fd()).context(|| format!("stat {}", dev.backing_file.display()))?;
    let file = File::open(dev.path()).context(|| format!("open {}", dev.path().display()))?;
    sys::loop_set_capacity(file.as_fd())
        .context(|| format!("refresh capacity of {}", dev.path().display()))
}

/// Where [`cut_off`] moves a device's window: past the end of any image (the kernel takes
/// offsets up to `i64::MAX`), aligned for direct I/O.
const CUT_OFF_OFFSET: u64 = 1 << 62;

/// Fences a loop device at the block layer: its window onto the image moves past the end, so
/// its size becomes 0 and every read and write fails (EIO, ENOSPC) without reaching the image,
/// whatever is mounted on it or holds it open (a btrfs, a raw block user). The kernel waits for
/// the I/O in flight first: once this returns, nothing more of this device reaches the image.
/// Undone only by detaching (the device is this node's no more). Idempotent.
pub(crate) fn cut_off(dev: &LoopDevice) -> Result<()> {
    let path = dev.path();
    let file = File::open(&path).context(|| format!("open {}", path.display()))?;
    // The status asks the backing file for its attributes, which a dead cluster client refuses
    // (ENOTCONN). The new status needs none of it: the kernel takes the offset, the size limit
    // and the few flags a status may change (autoclear, partition scan: none of ours).
    let mut info = match sys::loop_get_status64(file.as_fd()) {
        Ok(info) if info.lo_offset == CUT_OFF_OFFSET => return Ok(()),
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(device = %path.display(), error = %e, "no status; cutting off from scratch");
            sys::LoopInfo64 {
                lo_flags: sys::LO_FLAGS_DIRECT_IO,
                ..sys::LoopInfo64::default()
            }
        }
    };
    info.lo_offset = CUT_OFF_OFFSET;
    sys::loop_set_status64(file.as_fd(), &info)
        .context(|| format!("cut {} off its image", path.display()))
}

/// Detaches a loop device; already detached counts as done.
pub(crate) fn detach(dev: &LoopDevice) -> Result<()> {
    let file = match File::open(dev.path()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context(|| format!("open {}", dev.path().display())),
    };
    match sys::loop_clr_fd(file.as_fd()) {
        Ok(()) | Err(Errno::ENXIO) => {
            tracing::info!(device = %dev.path().display(), "detached");
            Ok(())
        }
        Err(e) => Err(e).context(|| format!("detach {}", dev.path().display())),
    }
}

/// Size in bytes of a block device.
pub(crate) fn device_size(device: &Path) -> Result<u64> {
    let file = File::open(device).context(|| format!("open {}", device.display()))?;
    sys::blkgetsize64(&file).context(|| format!("size of {}", device.display()))
}
