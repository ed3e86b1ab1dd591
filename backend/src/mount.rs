//! Mount state read from `/proc/self/mountinfo` (the kernel's truth) and changed with mount(2).

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Context, Error, Result};
use crate::host::{MountPoint, NodePath, Occupant, Spot};

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
            target.path().display()
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
    .context(|| format!("bind {} onto {}", shown.display(), target.path().display()))?;
    if flags.is_empty() {
        return Ok(());
    }
    // The bind just made is the topmost mount on the mount point: remembered by its ID, so the
    // undo below detaches that mount and nothing else.
    let occupant = target.spot().occupant().inspect_err(|_| {
        // Not identified, so not undone by ID: never leave a writable bind where a read-only
        // one was asked for, so the topmost mount on the directory we opened goes, which is the
        // bind this call just made.
        // The /proc/self/fd link is followed to that directory (no UMOUNT_NOFOLLOW here).
        if let Err(undo) = nix::mount::umount2(&target.proc_path(), MntFlags::MNT_DETACH) {
            tracing::warn!(target = %target.path().display(), error = %undo, "could not detach a bind it could not identify");
        }
    })?;
    let made = match occupant {
        Occupant::Mount { id } => id,
        other => {
            return Err(Error::precondition(format!(
                "{}: no mount on it right after a bind onto it ({other:?}); was it unmounted meanwhile?",
                target.path().display()
            )))
        }
    };
    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
    let result = target.reopen().and_then(|bound| {
        nix::mount::mount(
            None::<&str>,
            &crate::host::proc_fd(&bound),
            None::<&str>,
            remount,
            None::<&str>,
        )
        .context(|| format!("remount bind {} with {flags:?}", target.path().display()))
    });
    if let Err(e) = result {
        // Never leave a writable bind where a read-only one was asked for.
        let detach = MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW;
        if let Err(undo) = unmount_spot(target.spot(), made, detach) {
            tracing::warn!(target = %target.path().display(), error = %undo, "could not detach the bind whose flags failed");
        }
        return Err(e);
    }
    Ok(())
}

/// Unmounts `expected`, the mount the caller found on `at` (through
/// [`crate::kernel::KernelView::mount_on`], which checks that mountinfo and the resolved
/// directory agree), through the resolved parent directory: see [`unmount_spot`]. A directory
/// above `at` that is gone counts as nothing there.
pub(crate) fn unmount(at: &NodePath, expected: &MountEntry) -> Result<()> {
    let id = u64::from(expected.id);
    match at.spot()? {
        Some(spot) => unmount_spot(&spot, id, MntFlags::UMOUNT_NOFOLLOW),
        None => gone_from(&at.display().to_string(), id),
    }
}

/// Unmounts the mount that was just made on the opened mount point `at` (a trial mount).
pub(crate) fn unmount_made(at: &MountPoint) -> Result<()> {
    match at.spot().occupant()? {
        Occupant::Mount { id } => unmount_spot(at.spot(), id, MntFlags::UMOUNT_NOFOLLOW),
        _ => Ok(()),
    }
}

/// Whether the mount a caller means is the one on the spot: the decision [`unmount_spot`]
/// makes before every umount2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnmountVerdict {
    /// `expected` is the topmost mount there: unmount it.
    Unmount,
    /// Nothing is mounted there (or nothing is there): unmounted already, unless the mount
    /// lives on somewhere else (its directory was moved away).
    NotThere,
    /// Another mount is on top there: leave everything alone.
    Other { id: u64 },
}

pub(crate) fn unmount_verdict(expected: u64, occupant: Occupant) -> UnmountVerdict {
    match occupant {
        Occupant::Mount { id } if id == expected => UnmountVerdict::Unmount,
        Occupant::Mount { id } => UnmountVerdict::Other { id },
        Occupant::Bare | Occupant::Nothing => UnmountVerdict::NotThere,
    }
}

/// Unmounts the mount `expected` (by its mountinfo ID) from `spot`, through
/// `/proc/self/fd/<parent>/<name>`: the parent directory is the one the path was resolved to,
/// whatever was renamed or swapped for a link in the path's text since, and the last component
/// is not followed. Before every attempt the mount on the spot must be `expected`: another
/// mount there (stacked on it, or found there because a directory was replaced) is refused and
/// left alone. Nothing mounted there: done (EINVAL and ENOENT from umount2 too), unless
/// `expected` is still mounted elsewhere: then the path no longer leads to it, and the error
/// says where it is.
///
/// EBUSY is retried for a short, bounded time: a process forked by any thread of ours (mkfs,
/// blkid) holds copies of our descriptors until its exec, which can make a mount briefly busy.
pub(crate) fn unmount_spot(spot: &Spot, expected: u64, flags: MntFlags) -> Result<()> {
    let shown = spot.path.display().to_string();
    retry_busy(&shown, || {
        match unmount_verdict(expected, spot.occupant()?) {
            UnmountVerdict::Unmount => Ok(nix::mount::umount2(&spot.proc_path(), flags)),
            UnmountVerdict::NotThere => gone_from(&shown, expected).map(Ok),
            UnmountVerdict::Other { id } => {
                let table = mounts()?;
                Err(Error::precondition(format!(
                    "{shown}: {} is on it, not {} that was found there; was a directory of the \
                     path replaced, or something mounted over it? leaving both alone",
                    describe(&table, id),
                    describe(&table, expected)
                )))
            }
        }
    })
}

/// Mount `id` as a message names it: "mount 301 (ext4 of /dev/loop3, at /k/pods/a)".
pub(crate) fn describe(table: &[MountEntry], id: u64) -> String {
    match table.iter().find(|m| u64::from(m.id) == id) {
        Some(m) => format!(
            "mount {id} ({} of {}, at {})",
            m.fs_type,
            m.source,
            m.mount_point.display()
        ),
        None => format!("mount {id} (not in mountinfo)"),
    }
}

/// `expected` is not on the path `shown` (any more): fine when it is gone, refused when it is
/// still mounted somewhere else (a directory of the path was moved away with it).
fn gone_from(shown: &str, expected: u64) -> Result<()> {
    let table = mounts()?;
    if !table.iter().any(|m| u64::from(m.id) == expected) {
        return Ok(());
    }
    Err(Error::precondition(format!(
        "{shown}: the mount found there, {}, is no longer where the path leads; was a \
         directory of the path replaced? leaving it mounted",
        describe(&table, expected)
    )))
}

/// Runs `attempt` (one umount2) until it is not EBUSY, a bounded number of times with a growing
/// pause; EINVAL (not a mount point) and ENOENT count as done, lasting EBUSY is
/// FAILED_PRECONDITION.
pub(crate) fn retry_busy(
    shown: &str,
    mut attempt: impl FnMut() -> Result<nix::Result<()>>,
) -> Result<()> {
    let mut backoff = std::time::Duration::from_millis(5);
    for tries in 0.. {
        match attempt()? {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()),
            Err(nix::Error::EBUSY) if tries < 8 => {
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            Err(nix::Error::EBUSY) => {
                return Err(Error::precondition(format!(
                    "{shown} is busy: a process still uses it"
                )))
            }
            Err(e) => return Err(e).context(|| format!("unmount {shown}")),
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
    fn unmounts_only_the_mount_it_was_told() {
        use UnmountVerdict::*;
        let rows = [
            (
                "the expected mount is on top",
                Occupant::Mount { id: 300 },
                Unmount,
            ),
            (
                "another mount stacked over it, or found through a replaced directory",
                Occupant::Mount { id: 301 },
                Other { id: 301 },
            ),
            ("nothing mounted on the directory", Occupant::Bare, NotThere),
            ("the directory is gone", Occupant::Nothing, NotThere),
        ];
        let wrong: Vec<String> = rows
            .iter()
            .filter(|(_, occupant, want)| unmount_verdict(300, *occupant) != *want)
            .map(|(what, occupant, want)| {
                format!(
                    "{what}: got {:?}, want {want:?}",
                    unmount_verdict(300, *occupant)
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trail\\04"), "trail\\04");
    }
}
