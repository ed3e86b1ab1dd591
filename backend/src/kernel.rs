//! The kernel's state as one operation sees it: the mount table and every bound loop device,
//! read once at the start of the operation ([`KernelView::read`]) and asked every question that
//! operation has. The predicates that say which mounts and devices belong to a volume are
//! written once, here.
//!
//! An operation reads a new view only after it changed the kernel state itself (an unmount it
//! made) and needs to look again.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::host::{NodePath, Occupant};
use crate::loopdev::{self, FileId, LoopDevice};
use crate::mount::{self, MountEntry};

#[derive(Debug)]
pub(crate) struct KernelView {
    mounts: Vec<MountEntry>,
    loops: Vec<LoopDevice>,
}

/// A volume's image as the kernel knows it: its path in the pool and its identity.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub path: PathBuf,
    pub id: FileId,
}

impl KernelView {
    /// Reads mountinfo and sysfs' loop devices.
    pub fn read() -> Result<KernelView> {
        Ok(KernelView {
            mounts: mount::mounts()?,
            loops: loopdev::list()?,
        })
    }

    /// Reads the mount table again after this operation unmounted something, keeping the loop
    /// devices: an unmount binds or unbinds none (loopvol never sets `LO_FLAGS_AUTOCLEAR`), and
    /// listing them costs a sysfs lookup per loop device on the machine (~0.5 ms with a hundred).
    pub fn reread_mounts(&mut self) -> Result<()> {
        self.mounts = mount::mounts()?;
        Ok(())
    }

    /// The loop devices bound to `image` (normally zero or one), by path or by identity. No
    /// image (it is missing): none.
    pub fn devices_of(&self, image: Option<&Image>) -> Vec<LoopDevice> {
        let Some(image) = image else {
            return Vec::new();
        };
        self.loops
            .iter()
            .filter(|d| d.is_backed_by(&image.path, image.id))
            .cloned()
            .collect()
    }

    /// Loop devices still bound to a former image at `path`, deleted or replaced while attached
    /// (sysfs names it `<path> (deleted)`). They still hold that image's data.
    pub fn stale_devices_of(&self, path: &Path) -> Vec<LoopDevice> {
        let deleted = deleted_name(path);
        self.loops
            .iter()
            .filter(|d| d.backing_file == deleted)
            .cloned()
            .collect()
    }

    /// Every loop device of the volume whose image belongs at `path` (`image`: the file there
    /// now, if any): bound to that image, or to a former one deleted or replaced while attached.
    pub fn volume_devices(&self, path: &Path, image: Option<&Image>) -> Vec<LoopDevice> {
        let mut all = self.devices_of(image);
        for stale in self.stale_devices_of(path) {
            if !all.iter().any(|d| d.number == stale.number) {
                all.push(stale);
            }
        }
        all
    }

    /// `dev` as a message names it: its node, and where it is mounted if anywhere
    /// ("/dev/loop3, mounted at /a, /b").
    pub fn describe(&self, dev: &LoopDevice) -> String {
        let users: Vec<String> = self
            .users(std::slice::from_ref(dev), &[])
            .iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        match users.as_slice() {
            [] => dev.path().display().to_string(),
            _ => format!("{}, mounted at {}", dev.path().display(), users.join(", ")),
        }
    }

    /// Every bound loop device.
    pub fn loops(&self) -> &[LoopDevice] {
        &self.loops
    }

    /// The topmost mount at exactly `path` (later lines stack over earlier ones).
    pub fn mount_at(&self, path: &Path) -> Option<&MountEntry> {
        mount::mount_at(&self.mounts, path)
    }

    /// The topmost mount on the node path `at`, found two ways that must agree: by its resolved
    /// path in mountinfo, and through the directory it was resolved to (the mount ID on the
    /// last component there, [`NodePath::occupant`]). They disagree when a directory of the path
    /// was replaced (a link to somewhere else, a directory moved away with the mount on it)
    /// since it was resolved: then the answer is an error that names both and nothing is
    /// touched. What comes back is what [`mount::unmount`] may unmount.
    pub fn mount_on(&self, at: &NodePath) -> Result<Option<&MountEntry>> {
        let by_path = self.mount_at(at);
        let occupant = at.occupant()?;
        agree(by_path, occupant).map_err(|()| {
            let on_path = match by_path {
                Some(m) => mount::describe(&self.mounts, u64::from(m.id)),
                None => "nothing".to_string(),
            };
            let on_dir = match occupant {
                Occupant::Mount { id } => mount::describe(&self.mounts, id),
                Occupant::Bare | Occupant::Nothing => "nothing".to_string(),
            };
            Error::precondition(format!(
                "{}: mountinfo shows {on_path} there, but the directory the path was resolved to \
                 holds {on_dir}; a directory of the path was replaced since (by a symbolic link, \
                 or moved away); leaving both alone",
                at.display(),
            ))
        })
    }

    /// Every mount that uses one of `devices` (see [`uses`]), except those at `except`.
    pub fn users(&self, devices: &[LoopDevice], except: &[&Path]) -> Vec<&MountEntry> {
        self.mounts
            .iter()
            .filter(|m| !except.contains(&m.mount_point.as_path()))
            .filter(|m| devices.iter().any(|d| uses(m, d)))
            .collect()
    }

    /// The filesystem mounts of `dev` (not binds of its device node).
    pub fn fs_mounts<'a>(&'a self, dev: &'a LoopDevice) -> impl Iterator<Item = &'a MountEntry> {
        self.mounts.iter().filter(move |m| is_fs_mount_of(m, dev))
    }

    /// The loop device a mount is made from: a filesystem on it, or a bind of its device node.
    pub fn device_of_mount(&self, m: &MountEntry) -> Option<&LoopDevice> {
        let by_number = (m.major == loopdev::LOOP_MAJOR).then_some(m.minor);
        let by_source = || m.source.strip_prefix("/dev/loop")?.parse().ok();
        let by_bind = || {
            (m.fs_type == "devtmpfs")
                .then(|| m.root.to_str()?.strip_prefix("/loop")?.parse().ok())
                .flatten()
        };
        let number: u32 = by_number.or_else(by_source).or_else(by_bind)?;
        self.loops.iter().find(|d| d.number == number)
    }
}

/// This machine's kernel boot ID (`/proc/sys/kernel/random/boot_id`): it changes with every
/// boot, so a staging hold stamped with an older one belongs to a kernel that no longer runs.
pub(crate) fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// How sysfs names the backing file of a loop device whose file at `path` was unlinked.
fn deleted_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(" (deleted)");
    PathBuf::from(name)
}

/// The path a loop device's backing file had, with sysfs' ` (deleted)` mark removed: a device
/// bound to a since deleted file is still recognised as bound to the image that was there.
pub(crate) fn former_path(backing: &Path) -> &Path {
    backing
        .to_str()
        .and_then(|s| s.strip_suffix(" (deleted)"))
        .map_or(backing, Path::new)
}

/// Whether the mount mountinfo shows at a path (`by_path`) is the one on the directory the path
/// was resolved to (`occupant`): both nothing, or the same mount.
pub(crate) fn agree(
    by_path: Option<&MountEntry>,
    occupant: Occupant,
) -> std::result::Result<Option<&MountEntry>, ()> {
    match (by_path, occupant) {
        (None, Occupant::Bare | Occupant::Nothing) => Ok(None),
        (Some(m), Occupant::Mount { id }) if u64::from(m.id) == id => Ok(Some(m)),
        _ => Err(()),
    }
}

/// A filesystem mounted from `dev` (or a bind of one). btrfs reports an anonymous device number
/// in mountinfo, so the source path counts as well as the number.
pub(crate) fn is_fs_mount_of(m: &MountEntry, dev: &LoopDevice) -> bool {
    (m.major == loopdev::LOOP_MAJOR && m.minor == dev.number) || Path::new(&m.source) == dev.path()
}

/// A bind of the device node itself (raw block publish): devtmpfs with the node's name as root.
pub(crate) fn is_device_bind_of(m: &MountEntry, dev: &LoopDevice) -> bool {
    m.fs_type == "devtmpfs" && m.root == Path::new(&format!("/loop{}", dev.number))
}

/// Whether mount `m` uses `dev`: its filesystem, a bind of it, or a bind of its device node.
pub(crate) fn uses(m: &MountEntry, dev: &LoopDevice) -> bool {
    is_fs_mount_of(m, dev) || is_device_bind_of(m, dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
300 27 7:3 / /k/globalmount rw,nosuid,nodev - ext4 /dev/loop3 rw
301 27 7:3 / /k/pods/a rw,nosuid,nodev - ext4 /dev/loop3 rw
302 27 0:6 /loop4 /k/pods/dev ro,relatime - devtmpfs devtmpfs rw,size=123k
303 27 0:55 / /k/btrfs rw - btrfs /dev/loop5 rw
";

    fn view() -> KernelView {
        let dev = |number| {
            let image = PathBuf::from(format!("/pool/volumes/v{number}/image"));
            LoopDevice::new(number, image, false).with_backing_id(Some(FileId {
                dev: 1,
                ino: u64::from(number),
            }))
        };
        KernelView {
            mounts: mount::parse_mountinfo(TABLE),
            loops: vec![dev(3), dev(4), dev(5)],
        }
    }

    #[test]
    fn mountinfo_and_the_resolved_directory_must_agree() {
        let v = view();
        let here = v.mount_at(Path::new("/k/pods/a"));
        // (what, mountinfo at the path, the resolved directory, want: `None` for a refusal,
        // else the ID of the mount both show, if any)
        type Row<'a> = (
            &'a str,
            Option<&'a MountEntry>,
            Occupant,
            Option<Option<u32>>,
        );
        let rows: [Row; 7] = [
            ("nothing either way", None, Occupant::Bare, Some(None)),
            ("the path is gone", None, Occupant::Nothing, Some(None)),
            (
                "the same mount",
                here,
                Occupant::Mount { id: 301 },
                Some(Some(301)),
            ),
            (
                "the directory holds another mount than the path shows",
                here,
                Occupant::Mount { id: 300 },
                None,
            ),
            (
                "the path shows a mount the directory does not hold",
                here,
                Occupant::Bare,
                None,
            ),
            (
                "the path shows a mount, the directory is gone",
                here,
                Occupant::Nothing,
                None,
            ),
            (
                "the directory holds a mount the path does not show (moved away)",
                None,
                Occupant::Mount { id: 301 },
                None,
            ),
        ];
        let wrong: Vec<String> = rows
            .iter()
            .filter_map(|(what, by_path, occupant, want)| {
                let got = agree(*by_path, *occupant).ok().map(|m| m.map(|m| m.id));
                (got != *want).then(|| format!("{what}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn whose_mounts() {
        let v = view();
        let d3 = v.loops[0].clone();
        let d4 = v.loops[1].clone();
        let d5 = v.loops[2].clone();
        let users = |devs: &[LoopDevice], except: &[&Path]| -> Vec<PathBuf> {
            v.users(devs, except)
                .iter()
                .map(|m| m.mount_point.clone())
                .collect()
        };
        assert_eq!(
            users(std::slice::from_ref(&d3), &[]),
            [PathBuf::from("/k/globalmount"), PathBuf::from("/k/pods/a")]
        );
        assert_eq!(
            users(std::slice::from_ref(&d3), &[Path::new("/k/globalmount")]),
            [PathBuf::from("/k/pods/a")]
        );
        // A bind of the device node belongs to the device; btrfs by its source path.
        assert_eq!(
            users(std::slice::from_ref(&d4), &[]),
            [PathBuf::from("/k/pods/dev")]
        );
        assert_eq!(
            users(std::slice::from_ref(&d5), &[]),
            [PathBuf::from("/k/btrfs")]
        );
        assert_eq!(v.fs_mounts(&d4).count(), 0);
        // Back from a mount to its device.
        for (path, number) in [("/k/pods/a", 3), ("/k/pods/dev", 4), ("/k/btrfs", 5)] {
            let m = v.mount_at(Path::new(path)).unwrap();
            assert_eq!(
                v.device_of_mount(m).map(|d| d.number),
                Some(number),
                "{path}"
            );
        }
        assert!(v
            .device_of_mount(v.mount_at(Path::new("/")).unwrap())
            .is_none());
        // Devices of an image: by path, or by identity when the pool is reached another way.
        let numbers = |image: &Image| -> Vec<u32> {
            v.devices_of(Some(image)).iter().map(|d| d.number).collect()
        };
        let by_path = Image {
            path: PathBuf::from("/pool/volumes/v4/image"),
            id: FileId { dev: 9, ino: 9 },
        };
        assert_eq!(numbers(&by_path), [4]);
        let by_identity = Image {
            path: PathBuf::from("/elsewhere/image"),
            id: FileId { dev: 1, ino: 5 },
        };
        assert_eq!(numbers(&by_identity), [5]);
        assert!(v.devices_of(None).is_empty());
    }
}
