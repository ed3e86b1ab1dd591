//! Filesystems on a volume's device: what is there (blkid, superblocks), format when blank, grow,
//! statistics.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::cmd;
use crate::error::{Context, Error, Result};
use crate::validate::FsType;

/// What `blkid` finds on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    Blank,
    Filesystem(String),
    /// A partition table or other non-filesystem signature: data we must not overwrite.
    Other(String),
}

/// Probes the device directly (`-p`: no cache, so a just-written filesystem is seen).
pub(crate) fn probe(device: &Path) -> Result<Content> {
    let dev = device.to_string_lossy();
    let out = cmd::run_raw("blkid", &["-p", "-o", "export", &dev], cmd::DEFAULT_TIMEOUT)?;
    match out.status.code() {
        // blkid exits 2 when it finds no signature at all.
        Some(2) => Ok(Content::Blank),
        Some(0) => Ok(parse_blkid_export(&out.stdout)),
        _ => Err(cmd::failure("blkid", &out)),
    }
}

fn parse_blkid_export(text: &str) -> Content {
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    if let Some(t) = value("TYPE") {
        Content::Filesystem(t)
    } else if let Some(pt) = value("PTTYPE") {
        Content::Other(format!("partition table {pt}"))
    } else {
        Content::Other("an unknown signature".to_owned())
    }
}

/// Formats a blank device. Callers must have seen [`Content::Blank`] under the volume's lock.
/// No discard (a thin image has nothing to discard) and lazy inode tables: mkfs of a 100 GiB
/// volume takes well under a second.
pub(crate) fn format(device: &Path, fs: FsType) -> Result<()> {
    mkfs(device, fs, false)
}

/// Formats over whatever an interrupted [`format`] of this same volume left (a partial
/// filesystem that blkid may recognise). Only for a device whose metadata records that loopvol
/// itself was formatting it, so it never held user data.
pub(crate) fn reformat_interrupted(device: &Path, fs: FsType) -> Result<()> {
    mkfs(device, fs, true)
}

fn mkfs(device: &Path, fs: FsType, force: bool) -> Result<()> {
    let dev = device.to_string_lossy();
    let mut args: Vec<&str> = vec!["-q"];
    match fs {
        // 4 KiB blocks whatever the device says: the image must mount on any loop device.
        FsType::Ext4 => args.extend([
            "-b",
            "4096",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
        ]),
        FsType::Xfs | FsType::Btrfs => args.push("-K"),
    }
    if force {
        args.push(if fs == FsType::Ext4 { "-F" } else { "-f" });
    }
    args.push(&dev);
    let start = std::time::Instant::now();
    let made = cmd::run(&format!("mkfs.{fs}"), &args);
    crate::observe::format(fs, made.is_ok(), start.elapsed());
    made?;
    tracing::info!(device = %dev, fs = %fs, force, "formatted");
    Ok(())
}

/// Mount data every mount of `fs` needs: clones and restored snapshots of an xfs volume share its
/// UUID, and xfs refuses a second mount of the same UUID without `nouuid`.
pub(crate) fn required_mount_data(fs: FsType) -> &'static [&'static str] {
    match fs {
        FsType::Xfs => &["nouuid"],
        FsType::Ext4 | FsType::Btrfs => &[],
    }
}

/// What the on-disk superblock says (read directly: no tool, no cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub fs: FsType,
    pub size_bytes: u64,
    /// The filesystem recorded errors (ext4: error state or error count).
    pub has_errors: bool,
}

fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .context(|| format!("read superblock at {offset}"))?;
    Ok(buf)
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(
        b[at..at + 4].try_into().expect("4 bytes"),
    ))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes(
        b[at..at + 4].try_into().expect("4 bytes"),
    ))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses an ext4 superblock (the 1024 bytes at offset 1024).
fn parse_ext4(sb: &[u8]) -> Option<Superblock> {
    if sb.len() < 0x198 || sb[0x38..0x3A] != [0x53, 0xEF] {
        return None;
    }
    let log_block = le32(sb, 0x18);
    let block_size = 1024u64.checked_shl(u32::try_from(log_block).ok()?)?;
    let incompat = le32(sb, 0x60);
    let mut blocks = le32(sb, 0x04);
    if incompat & 0x80 != 0 {
        blocks |= le32(sb, 0x150) << 32;
    }
    let state = u16::from_le_bytes([sb[0x3A], sb[0x3B]]);
    let error_count = le32(sb, 0x194);
    Some(Superblock {
        fs: FsType::Ext4,
        size_bytes: blocks * block_size,
        has_errors: state & 0x2 != 0 || error_count > 0,
    })
}

/// Parses an xfs superblock (offset 0).
fn parse_xfs(sb: &[u8]) -> Option<Superblock> {
    if sb.len() < 16 || &sb[0..4] != b"XFSB" {
        return None;
    }
    Some(Superblock {
        fs: FsType::Xfs,
        size_bytes: be32(sb, 4) * be64(sb, 8),
        has_errors: false,
    })
}

/// Parses a btrfs superblock (offset 64 KiB).
fn parse_btrfs(sb: &[u8]) -> Option<Superblock> {
    if sb.len() < 0x78 || &sb[0x40..0x48] != b"_BHRfS_M" {
        return None;
    }
    Some(Superblock {
        fs: FsType::Btrfs,
        size_bytes: le64(sb, 0x70),
        has_errors: false,
    })
}

/// Reads the superblock of whichever supported filesystem is on `device`.
pub(crate) fn superblock(device: &Path) -> Result<Option<Superblock>> {
    let file = File::open(device).context(|| format!("open {}", device.display()))?;
    let size = crate::loopdev::device_size(device)?;
    if size >= 2048 {
        if let Some(sb) = parse_ext4(&read_at(&file, 1024, 1024)?) {
            return Ok(Some(sb));
        }
        if let Some(sb) = parse_xfs(&read_at(&file, 0, 512)?) {
            return Ok(Some(sb));
        }
    }
    if size >= 65536 + 4096 {
        if let Some(sb) = parse_btrfs(&read_at(&file, 65536, 4096)?) {
            return Ok(Some(sb));
        }
    }
    Ok(None)
}

/// How far a filesystem may stay below its device before we call it "not grown": xfs cannot use
/// a tail smaller than its minimum allocation group (16 MiB); the others fill the device to a block.
pub(crate) fn grow_slack(fs: FsType) -> u64 {
    match fs {
        FsType::Xfs => 16 << 20,
        FsType::Ext4 | FsType::Btrfs => 1 << 20,
    }
}

/// Whether this process may grow a mounted ext4 (the resize ioctl needs CAP_SYS_RESOURCE).
pub(crate) fn can_grow_ext4_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Grows a mounted filesystem to fill its device.
pub(crate) fn grow_online(fs: FsType, device: &Path, mount_point: &Path) -> Result<()> {
    let mp = mount_point.to_string_lossy();
    match fs {
        FsType::Ext4 => {
            if !can_grow_ext4_online() {
                return Err(Error::precondition(format!(
                    "cannot grow the mounted ext4 filesystem at {mp}: online ext4 resize needs \
                     CAP_SYS_RESOURCE, which this process lacks; the filesystem is grown offline \
                     the next time the volume is staged"
                )));
            }
            cmd::run("resize2fs", &[&device.to_string_lossy()])
        }
        FsType::Xfs => cmd::run("xfs_growfs", &[&mp]),
        FsType::Btrfs => cmd::run("btrfs", &["filesystem", "resize", "max", &mp]),
    }?;
    tracing::info!(device = %device.display(), mount_point = %mp, fs = %fs, "grew filesystem online");
    Ok(())
}

/// Grows an unmounted ext4 filesystem to fill its device (xfs and btrfs only grow mounted, so
/// callers grow those right after mounting).
pub(crate) fn grow_ext4_offline(device: &Path) -> Result<()> {
    let dev = device.to_string_lossy();
    // resize2fs insists on a fresh check first; -p repairs only what is safe without asking.
    let out = cmd::run_raw("e2fsck", &["-f", "-p", &dev], cmd::DEFAULT_TIMEOUT)?;
    // 0: clean, 1: errors corrected. Anything else needs a human.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(cmd::failure("e2fsck", &out));
    }
    cmd::run("resize2fs", &[&dev])?;
    tracing::info!(device = %dev, "grew ext4 offline");
    Ok(())
}

/// Usage of a mounted filesystem or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    /// Inode counts; `None` for a block device.
    pub inodes: Option<InodeUsage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InodeUsage {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// statvfs of a mounted filesystem.
#[allow(
    clippy::useless_conversion,
    reason = "fsblkcnt_t, fsfilcnt_t and c_ulong are u32 on 32-bit targets"
)]
pub(crate) fn usage(path: &Path) -> Result<Usage> {
    let st = nix::sys::statvfs::statvfs(path).context(|| format!("statvfs {}", path.display()))?;
    let frsize = u64::from(st.fragment_size());
    let bytes = |blocks| u64::from(blocks).saturating_mul(frsize);
    let total = bytes(st.blocks());
    let free = bytes(st.blocks_free());
    let files = u64::from(st.files());
    let files_free = u64::from(st.files_free());
    Ok(Usage {
        total_bytes: total,
        available_bytes: bytes(st.blocks_available()),
        used_bytes: total.saturating_sub(free),
        inodes: Some(InodeUsage {
            total: files,
            free: files_free,
            used: files.saturating_sub(files_free),
        }),
    })
}

/// Shuts down the filesystem mounted at `mount_point` (a fence): committing its log first with
/// `flush_log` (`sys::FS_SHUTDOWN_LOGFLUSH`), else at once (`sys::FS_SHUTDOWN_NOLOGFLUSH`).
/// `Ok(false)` when the filesystem has no shutdown (btrfs); already shut down counts as done.
pub(crate) fn shutdown(mount_point: &Path, flush_log: bool) -> Result<bool> {
    use std::os::fd::AsFd;
    let dir = match File::open(mount_point) {
        Ok(dir) => dir,
        // xfs answers EIO once it is shut down.
        Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(true),
        Err(e) => return Err(e).context(|| format!("open {}", mount_point.display())),
    };
    let flags = if flush_log {
        crate::sys::FS_SHUTDOWN_LOGFLUSH
    } else {
        crate::sys::FS_SHUTDOWN_NOLOGFLUSH
    };
    match crate::sys::fs_shutdown(dir.as_fd(), flags) {
        Ok(()) | Err(nix::errno::Errno::EIO) => Ok(true),
        Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP) => Ok(false),
        Err(e) => {
            Err(e).context(|| format!("shut down the filesystem at {}", mount_point.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export() {
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nUUID=x\nTYPE=xfs\n"),
            Content::Filesystem("xfs".into())
        );
        assert!(
            matches!(parse_blkid_export("PTUUID=1\nPTTYPE=gpt\n"), Content::Other(s) if s.contains("gpt"))
        );
        assert!(matches!(
            parse_blkid_export("DEVNAME=/dev/loop0\n"),
            Content::Other(_)
        ));
    }

    #[test]
    fn ext4_superblock() {
        let mut sb = vec![0u8; 1024];
        sb[0x38] = 0x53;
        sb[0x39] = 0xEF;
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        let parsed = parse_ext4(&sb).unwrap();
        assert_eq!(parsed.size_bytes, 4096 * 1000);
        assert!(!parsed.has_errors);
        sb[0x194] = 3;
        assert!(parse_ext4(&sb).unwrap().has_errors);
        sb[0x38] = 0;
        assert!(parse_ext4(&sb).is_none());
    }

    #[test]
    fn xfs_and_btrfs_superblocks() {
        let mut x = vec![0u8; 512];
        x[0..4].copy_from_slice(b"XFSB");
        x[4..8].copy_from_slice(&4096u32.to_be_bytes());
        x[8..16].copy_from_slice(&10u64.to_be_bytes());
        assert_eq!(parse_xfs(&x).unwrap().size_bytes, 40960);
        let mut b = vec![0u8; 4096];
        b[0x40..0x48].copy_from_slice(b"_BHRfS_M");
        b[0x70..0x78].copy_from_slice(&(1u64 << 30).to_le_bytes());
        assert_eq!(parse_btrfs(&b).unwrap().size_bytes, 1 << 30);
    }
}
