//! Mount state read from `/proc/self/mountinfo` (the kernel's truth) and changed with mount(2).

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Context, Error, Result};
use crate::host::MountPoint;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    /// Device number of the mounted filesystem (for a bind of a device node: the devtmpfs's).
    pub major: u32,
    pub minor: u32,
    /// Path inside the filesystem that is mounted here (`/` unless this is a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Options of the filesystem itself (shared by every mount of it): `ro` here on a filesystem
    /// mounted read-write means the kernel turned it read-only after errors.
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    pub fn super_read_only(&self) -> bool {
        self.super_options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped (the kernel does not write them).
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let id = l.next()?.parse().ok()?;
    let parent = l.next()?.parse().ok()?;
    let (major, minor) = l.next()?.split_once(':')?;
    let root = PathBuf::from(unescape(l.next()?));
    let mount_point = PathBuf::from(unescape(l.next()?));
    let options = l.next()?.split(',').map(str::to_owned).collect();
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_owned();
    let source = unescape(r.next()?);
    let super_options = r
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(MountEntry {
        super_options,
        id,
        parent,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        options,
        fs_type,
        source,
    })
}

/// The mount `path` is on: the deepest mount point above it (the last one mounted there).
pub(crate) fn containing<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
}

/// The current mount table.
pub(crate) fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context(|| "read /proc/self/mountinfo".into())?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `path`, if any (later lines stack over earlier ones).
pub(crate) fn mount_at<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|m| m.mount_point == path)
}

/// Mounts `source` (a block device) of type `fs_type` onto the opened mount point `target`
/// (through its descriptor: nothing swapped into the path since it was resolved can get it).
pub(crate) fn mount_fs(
    source: &Path,
    target: &MountPoint,
    fs_type: &str,
    flags: MsFlags,
    data: &str,
) -> Result<()> {
    let data = (!data.is_empty()).then_some(data);
    nix::mount::mount(
        Some(source),
        &target.proc_path(),
        Some(fs_type),
        flags,
        data,
    )
    .context(|| {
        format!(
            "mount {} ({fs_type}) at {}",
            source.display(),
            target.path.display()
        )
    })
}

/// Bind-mounts `source` (a path the kernel names: `/proc/self/fd/N` of an opened directory, or a
/// device node; `shown` for messages) onto the opened mount point `target`, then applies `flags`
/// (read-only, nodev, ...) to the bind: a bind ignores flags on its first call, so they need a
/// remount of the bind itself, reached by opening the name again in the same parent.
pub(crate) fn bind(source: &Path, shown: &Path, target: &MountPoint, flags: MsFlags) -> Result<()> {
    nix::mount::mount(
        Some(source),
        &target.proc_path(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .context(|| format!("bind {} onto {}", shown.display(), target.path.display()))?;
    if !flags.is_empty() {
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
        let result = target.reopen().and_then(|bound| {
            nix::mount::mount(
                None::<&str>,
                &crate::host::proc_fd(&bound),
                None::<&str>,
                remount,
                None::<&str>,
            )
            .context(|| format!("remount bind {} with {flags:?}", target.path.display()))
        });
        if let Err(e) = result {
            // Never leave a writable bind where a read-only one was asked for.
            let _ = nix::mount::umount2(
                &target.path,
                MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
            );
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target`; EINVAL (not a mount point) and ENOENT count as already done.
///
/// EBUSY is retried for a short, bounded time: a process forked by any thread of ours (mkfs,
/// blkid) holds copies of our descriptors until its exec, which can make a mount briefly busy.
pub(crate) fn unmount(target: &Path) -> Result<()> {
    let mut backoff = std::time::Duration::from_millis(5);
    for attempt in 0.. {
        match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()),
            Err(nix::Error::EBUSY) if attempt < 8 => {
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            Err(nix::Error::EBUSY) => {
                return Err(Error::precondition(format!(
                    "{} is busy: a process still uses it",
                    target.display()
                )))
            }
            Err(e) => return Err(e).context(|| format!("unmount {}", target.display())),
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
300 27 7:3 / /var/lib/kubelet/plugins/x/globalmount rw,nosuid,nodev,relatime shared:5 - ext4 /dev/loop3 rw
301 27 7:3 / /var/lib/kubelet/pods/u/volumes/a\\040b ro,nosuid,nodev,relatime shared:5 - ext4 /dev/loop3 rw
302 27 0:6 /loop4 /var/lib/kubelet/pods/u/volumeDevices/dev ro,relatime - devtmpfs devtmpfs rw,size=123k
bogus line
";

    #[test]
    fn parses_mountinfo() {
        let table = parse_mountinfo(SAMPLE);
        assert_eq!(table.len(), 4);
        let m = &table[2];
        assert_eq!((m.major, m.minor), (7, 3));
        assert_eq!(
            m.mount_point,
            Path::new("/var/lib/kubelet/pods/u/volumes/a b")
        );
        assert!(m.read_only());
        assert_eq!(m.source, "/dev/loop3");
        assert_eq!(table[3].root, Path::new("/loop4"));
        assert_eq!(table[3].fs_type, "devtmpfs");
        assert_eq!(table[3].super_options, ["rw", "size=123k"]);
        assert!(mount_at(&table, Path::new("/var/lib/kubelet/plugins/x/globalmount")).is_some());
        assert!(mount_at(&table, Path::new("/nope")).is_none());
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trail\\04"), "trail\\04");
    }
}
