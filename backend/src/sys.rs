//! The only module with `unsafe`: thin, safe wrappers over the ioctls loopvol needs (loop devices,
//! filesystem freeze and shutdown, reflink, extent maps, block device size). Each wrapper takes
//! owned or borrowed file descriptors, so the kernel never sees a closed or foreign descriptor.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::errno::Errno;

const LOOP_SET_CAPACITY: u32 = 0x4C07;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;

pub(crate) const LO_FLAGS_READ_ONLY: u32 = 1;
/// FS_SHUTDOWN_FLAGS_LOGFLUSH (= EXT4_GOING_FLAGS_LOGFLUSH = XFS_FSOP_GOING_FLAGS_LOGFLUSH):
/// commit the log, then stop (ext4 refuses new calls first). An fsync racing the shutdown then
/// either fails or has its transaction on disk: with NOLOGFLUSH, ext4 can answer such an fsync
/// success while its transaction is dropped with the aborted journal (seen: the last synced
/// block's size update lost). It writes to the device, so it may wait on a pool that hangs.
pub(crate) const FS_SHUTDOWN_LOGFLUSH: u32 = 1;
/// FS_SHUTDOWN_FLAGS_NOLOGFLUSH (= EXT4_GOING_FLAGS_NOLOGFLUSH = XFS_FSOP_GOING_FLAGS_NOLOGFLUSH):
/// stop at once, flushing neither data nor the journal (DEFAULT, which freezes and syncs, is not
/// used): what was committed replays on the next mount.
pub(crate) const FS_SHUTDOWN_NOLOGFLUSH: u32 = 2;
pub(crate) const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        // SAFETY: LoopInfo64 is plain old data (integers and byte arrays); all-zero is valid and is
        // what the kernel expects for "no offset, no limit, no encryption".
        unsafe { std::mem::zeroed() }
    }
}

/// `struct loop_config` from `<linux/loop.h>` (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

nix::ioctl_none_bad!(ioctl_loop_ctl_get_free, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(ioctl_loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_none_bad!(ioctl_loop_clr_fd, LOOP_CLR_FD);
nix::ioctl_none_bad!(ioctl_loop_set_capacity, LOOP_SET_CAPACITY);
nix::ioctl_read_bad!(ioctl_loop_get_status64, LOOP_GET_STATUS64, LoopInfo64);
nix::ioctl_write_ptr_bad!(ioctl_loop_set_status64, LOOP_SET_STATUS64, LoopInfo64);
// FS_IOC_SHUTDOWN (<linux/fs.h>, 6.x), the same number as XFS_IOC_GOINGDOWN and EXT4_IOC_SHUTDOWN:
// _IOR('X', 125, __u32), although the kernel reads the flags from user memory.
nix::ioctl_read!(ioctl_fs_shutdown, b'X', 125, u32);
nix::ioctl_readwrite!(ioctl_fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(ioctl_fithaw, b'X', 120, libc::c_int);
nix::ioctl_write_int!(ioctl_ficlone, 0x94, 9);
nix::ioctl_read!(ioctl_blkgetsize64, 0x12, 114, u64);
nix::ioctl_readwrite!(ioctl_fiemap, b'f', 11, FiemapHeader);

/// Asks `/dev/loop-control` for a free loop device number (the kernel creates one if needed).
pub(crate) fn loop_ctl_get_free(control: BorrowedFd<'_>) -> Result<u32, Errno> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is a live descriptor for the borrow.
    let n = unsafe { ioctl_loop_ctl_get_free(control.as_raw_fd()) }?;
    u32::try_from(n).map_err(|_| Errno::EINVAL)
}

/// Binds `backing` to the loop device `loop_dev` in one step, with `flags` (LO_FLAGS_*) and
/// logical block size `block_size`. Fails with EBUSY when another process bound the device first.
pub(crate) fn loop_configure(
    loop_dev: BorrowedFd<'_>,
    backing: BorrowedFd<'_>,
    flags: u32,
    block_size: u32,
) -> Result<(), Errno> {
    let config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd()).map_err(|_| Errno::EBADF)?,
        block_size,
        info: LoopInfo64 {
            lo_flags: flags,
            ..LoopInfo64::default()
        },
        reserved: [0; 8],
    };
    // SAFETY: `config` is a fully initialised loop_config that outlives the call; the kernel only
    // reads it. Both descriptors are live for the duration of the borrow, and the kernel takes its
    // own reference on `backing`, so closing ours afterwards is fine.
    unsafe { ioctl_loop_configure(loop_dev.as_raw_fd(), &config) }.map(drop)
}

/// Unbinds a loop device (the kernel defers it until the last opener closes).
pub(crate) fn loop_clr_fd(loop_dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument; the descriptor is live for the borrow.
    unsafe { ioctl_loop_clr_fd(loop_dev.as_raw_fd()) }.map(drop)
}

/// Makes the loop device re-read its backing file's size.
pub(crate) fn loop_set_capacity(loop_dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: LOOP_SET_CAPACITY takes no argument; the descriptor is live for the borrow.
    unsafe { ioctl_loop_set_capacity(loop_dev.as_raw_fd()) }.map(drop)
}

/// Reads a loop device's status; ENXIO means nothing is bound to it.
pub(crate) fn loop_get_status64(loop_dev: BorrowedFd<'_>) -> Result<LoopInfo64, Errno> {
    let mut info = LoopInfo64::default();
    // SAFETY: the kernel writes one loop_info64 into `info`, which is valid, writable and sized
    // for exactly that; the descriptor is live for the borrow.
    unsafe { ioctl_loop_get_status64(loop_dev.as_raw_fd(), &mut info) }?;
    Ok(info)
}

/// Replaces a loop device's status (offset, size limit, settable flags) with `info`; the kernel
/// flushes and drops the device's page cache and waits for the I/O in flight first.
pub(crate) fn loop_set_status64(loop_dev: BorrowedFd<'_>, info: &LoopInfo64) -> Result<(), Errno> {
    // SAFETY: `info` is a fully initialised loop_info64 that outlives the call; the kernel only
    // reads it. The descriptor is live for the borrow.
    unsafe { ioctl_loop_set_status64(loop_dev.as_raw_fd(), info) }.map(drop)
}

/// Shuts down the filesystem mounted at the directory `dir`: from then on every call on it fails
/// with EIO. ENOTTY: the filesystem has no shutdown (btrfs, as of Linux 6.18).
pub(crate) fn fs_shutdown(dir: BorrowedFd<'_>, flags: u32) -> Result<(), Errno> {
    let mut flags = flags;
    // SAFETY: the kernel reads one u32 of flags from the pointer, which is valid and aligned for
    // the call; the descriptor is live for the borrow.
    unsafe { ioctl_fs_shutdown(dir.as_raw_fd(), &mut flags) }.map(drop)
}

/// Asks the filesystem of the open file `file` for its size afresh (statx with
/// AT_STATX_FORCE_SYNC): a FUSE client (GlusterFS) otherwise keeps the size it cached for up to
/// its attribute timeout, and a loop device bound (or resized) now would take a size another
/// node changed since.
pub(crate) fn refresh_size(file: BorrowedFd<'_>) -> Result<u64, Errno> {
    // SAFETY: statx is a plain data struct; all-zero is a valid value for the kernel to fill.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated empty string (AT_EMPTY_PATH: the descriptor itself),
    // the descriptor is live for the borrow, and `st` is valid and writable for one statx.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_FORCE_SYNC,
            libc::STATX_SIZE,
            &mut st,
        )
    };
    Errno::result(r).map(|_| st.stx_size)
}

/// Freezes the filesystem mounted at the directory `dir` (open any file on it).
pub(crate) fn fifreeze(dir: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its argument; we still pass a valid int pointer. Descriptor live.
    unsafe { ioctl_fifreeze(dir.as_raw_fd(), &mut unused) }.map(drop)
}

/// Thaws a filesystem frozen by [`fifreeze`].
pub(crate) fn fithaw(dir: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut unused: libc::c_int = 0;
    // SAFETY: as for FIFREEZE.
    unsafe { ioctl_fithaw(dir.as_raw_fd(), &mut unused) }.map(drop)
}

/// Makes `dest` share all of `src`'s extents (reflink). EOPNOTSUPP, EXDEV or EINVAL mean the
/// filesystem cannot, and the caller copies instead.
pub(crate) fn ficlone(dest: BorrowedFd<'_>, src: BorrowedFd<'_>) -> Result<(), Errno> {
    let src = libc::c_ulong::try_from(src.as_raw_fd()).map_err(|_| Errno::EBADF)?;
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both are live.
    unsafe { ioctl_ficlone(dest.as_raw_fd(), src) }.map(drop)
}

/// Size in bytes of the block device open at `dev`.
pub(crate) fn blkgetsize64(dev: impl AsFd) -> Result<u64, Errno> {
    let mut size: u64 = 0;
    // SAFETY: the kernel writes one u64 into `size`; the descriptor is live for the call.
    unsafe { ioctl_blkgetsize64(dev.as_fd().as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// `struct fiemap` from `<linux/fiemap.h>` without its trailing extent array (FS_IOC_FIEMAP is
/// numbered with the size of this header).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent`: one mapped range of a file.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FiemapExtent {
    pub fe_logical: u64,
    pub fe_physical: u64,
    pub fe_length: u64,
    fe_reserved64: [u64; 2],
    pub fe_flags: u32,
    fe_reserved: [u32; 3],
}

const _: () = assert!(std::mem::size_of::<FiemapHeader>() == 32);
const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);

/// The last extent of the file.
pub(crate) const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Data location unknown (delayed allocation): not on disk yet.
pub(crate) const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
/// Space shared with other files (reflinks, snapshots).
pub(crate) const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// How many extents one FS_IOC_FIEMAP call maps at most.
const FIEMAP_BATCH_COUNT: u32 = 128;
const FIEMAP_BATCH: usize = FIEMAP_BATCH_COUNT as usize;

/// The header and room for [`FIEMAP_BATCH`] extents, laid out as the kernel expects.
#[repr(C)]
struct FiemapBuffer {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// Maps the extents of the open file `file` that end after byte `start` (up to 128 of them, in
/// order) into `out`, which it clears first. No flags: the kernel reports what is on disk now,
/// delayed allocations as `FIEMAP_EXTENT_UNKNOWN`.
pub(crate) fn fiemap(
    file: BorrowedFd<'_>,
    start: u64,
    out: &mut Vec<FiemapExtent>,
) -> Result<(), Errno> {
    let mut buf = Box::new(FiemapBuffer {
        header: FiemapHeader {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_extent_count: FIEMAP_BATCH_COUNT,
            ..FiemapHeader::default()
        },
        extents: [FiemapExtent::default(); FIEMAP_BATCH],
    });
    let whole: *mut FiemapBuffer = &mut *buf;
    // SAFETY: `whole` points to a fiemap header followed by exactly `fm_extent_count` extent
    // slots, as FS_IOC_FIEMAP requires; the kernel writes at most that many extents and the
    // mapped count into it, and the buffer outlives the call. The pointer is derived from the
    // whole buffer, so the writes past the header stay within what it may reach. The
    // descriptor is live for the borrow.
    unsafe { ioctl_fiemap(file.as_raw_fd(), whole.cast::<FiemapHeader>()) }?;
    let mapped = usize::try_from(buf.header.fm_mapped_extents)
        .map_err(|_| Errno::EOVERFLOW)?
        .min(FIEMAP_BATCH);
    out.clear();
    out.extend_from_slice(&buf.extents[..mapped]);
    Ok(())
}

/// Makes a child started from `cmd` die (SIGKILL) when the thread that started it dies, so a
/// killed driver leaves no mkfs writing to a device behind the volume's released lock.
pub(crate) fn kill_child_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: prctl(PR_SET_PDEATHSIG) is one, and it allocates nothing and touches no
    // state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        })
    };
}

/// Caps glibc's malloc arenas at `arenas`, unless the operator set `MALLOC_ARENA_MAX` (glibc
/// reads it itself). A server answers each call on a blocking thread, and glibc gives busy
/// threads arenas of their own (up to 8 per CPU) that keep what they freed: after 32 concurrent
/// lifecycles and a listing of 10 000 volumes the CSI server peaked at 30.9 MiB, with 2 arenas
/// at 25.4 MiB, and served as many lifecycles per second. Call it first thing in `main`, before
/// any thread starts. Returns whether the cap was set; other C libraries have no such knob.
pub fn limit_malloc_arenas(arenas: i32) -> bool {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets one of the allocator's tuning parameters; M_ARENA_MAX with a
        // positive count is valid on every glibc, and it touches no memory of ours.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = arenas;
        false
    }
}
