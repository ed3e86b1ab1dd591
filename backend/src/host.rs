//! The node's own directories that volumes are staged and published at (kubelet's, or the
//! pool's `staging/`): a caller's path resolved once into a [`NodePath`], the mount points made
//! under it, and what a publication needs done to the volume's root.
//!
//! No caller's path is trusted. [`NodePath::resolve`] opens the deepest existing directory above
//! the path's last component with `O_PATH`, following symbolic links as the kernel would for
//! kubelet (a kubelet root that is a link, `/var/lib/kubelet -> /data/kubelet`, is a real
//! layout), reads back where that really is (`/proc/self/fd/N`), and checks the resolved path:
//! under the allowed prefixes (themselves resolved), not a system directory, neither inside nor
//! above the pool. The last component itself is never followed. Directories still missing are
//! created relative to that descriptor, one `O_NOFOLLOW` step at a time, and mounts go onto the
//! descriptor of the final directory (`/proc/self/fd/N`), so nothing can be swapped in between
//! the check and the mount. Every later lookup (mountinfo, unpublish, unstage, stats, expand)
//! uses the resolved path, which is what mountinfo shows; a lookup that leads to an unmount also
//! asks the resolved directory itself which mount is on the last component ([`Spot::occupant`]),
//! and refuses when that and mountinfo disagree. Unmounts go through the resolved parent
//! (`/proc/self/fd/<parent>/<name>`, [`Spot::proc_path`]), never through the path's text.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;

use crate::error::{Context, Error, Result};
use crate::validate;

/// A staging or target path on this node, resolved once and checked: see the module
/// documentation. It dereferences to the resolved path. Made by [`crate::Pool::node_path`] (and,
/// for the pool's own staging directories, by the pool); node operations take only these.
#[derive(Debug, Clone)]
pub struct NodePath {
    /// Where the path really is: its parents' links resolved, its last component as given.
    resolved: PathBuf,
    /// The deepest directory above the last component that existed, opened `O_PATH` when the path
    /// was resolved.
    anchor: Arc<OwnedFd>,
    /// The components below the anchor (the missing directories, then the last component).
    below: Vec<OsString>,
}

impl PartialEq for NodePath {
    fn eq(&self, other: &Self) -> bool {
        self.resolved == other.resolved
    }
}
impl Eq for NodePath {}

impl std::hash::Hash for NodePath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.resolved.hash(state);
    }
}

impl NodePath {
    pub fn as_path(&self) -> &Path {
        &self.resolved
    }
}

impl AsRef<Path> for NodePath {
    fn as_ref(&self) -> &Path {
        &self.resolved
    }
}

impl std::ops::Deref for NodePath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.resolved
    }
}

/// What a resolved node path must satisfy.
pub(crate) struct Rules<'a> {
    /// When not empty, the path must lie strictly under one of these (resolved before use).
    pub prefixes: &'a [PathBuf],
    /// The pool root: a mount inside it would hide volumes, one above it the whole pool.
    pub pool: &'a Path,
}

impl NodePath {
    /// Resolves and checks the caller's path `given` (what it is: `what`, for messages).
    pub(crate) fn resolve(what: &'static str, given: &Path, rules: &Rules<'_>) -> Result<NodePath> {
        // The text first: absolute, normalized, no NUL, not a system directory as written.
        validate::check_path(what, given, &[])?;
        let (Some(parent), Some(name)) = (given.parent(), given.file_name()) else {
            return Err(Error::invalid(what, "must not be /"));
        };
        let mut missing = Vec::new();
        let mut at = parent;
        let anchor = loop {
            match rfs::open(
                at,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => break fd,
                Err(Errno::NOENT) => {
                    let (Some(up), Some(component)) = (at.parent(), at.file_name()) else {
                        return Err(Error::invalid(what, "no part of it exists"));
                    };
                    missing.push(component.to_owned());
                    at = up;
                }
                Err(e) => {
                    return Err(Error::invalid(
                        what,
                        format!(
                            "{}: {} cannot be resolved: {e}",
                            given.display(),
                            at.display()
                        ),
                    ))
                }
            }
        };
        missing.reverse();
        let base = fd_path(&anchor).context(|| format!("resolve {}", given.display()))?;
        let mut resolved = base;
        for c in &missing {
            resolved.push(c);
        }
        resolved.push(name);
        check_resolved(what, given, &resolved, rules)?;
        let mut below = missing;
        below.push(name.to_owned());
        let path = NodePath {
            resolved,
            anchor: Arc::new(anchor),
            below,
        };
        // The last component is never followed: a link there is refused, whatever it names. (A
        // mount point that answers EIO, a shut-down filesystem, must still be unstaged.)
        if let Ok(Some(ft)) = path.final_type() {
            if ft == FileType::Symlink {
                return Err(Error::invalid(
                    what,
                    format!(
                        "{} is a symbolic link; loopvol mounts only on a real directory or file",
                        given.display()
                    ),
                ));
            }
        }
        Ok(path)
    }

    /// A directory under the pool's `staging/` (the pool layer opened `dir` beneath the root,
    /// refusing links): the path is `dir_path/name`.
    pub(crate) fn in_pool_dir(dir: OwnedFd, dir_path: PathBuf, name: &OsStr) -> NodePath {
        NodePath {
            resolved: dir_path.join(name),
            anchor: Arc::new(dir),
            below: vec![name.to_owned()],
        }
    }

    /// Opens the directory holding the last component, walking from the anchor without following
    /// links; `None` when a directory on the way does not exist. With `create`, missing
    /// directories are made (mode 0750).
    fn parent_dir(&self, create: bool) -> Result<Option<OwnedFd>> {
        let mut dir: Option<OwnedFd> = None;
        let (_, dirs) = self
            .below
            .split_last()
            .expect("a node path has a last component");
        for c in dirs {
            let at = dir.as_ref().map_or(self.anchor.as_fd(), |d| d.as_fd());
            if create {
                match rfs::mkdirat(at, c, Mode::from_raw_mode(0o750)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.io(e, "create a directory of")),
                }
            }
            match rfs::openat(
                at,
                c,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => dir = Some(fd),
                Err(Errno::NOENT) if !create => return Ok(None),
                Err(Errno::NOTDIR | Errno::LOOP) => return Err(self.swapped(c)),
                Err(e) => return Err(self.io(e, "open a directory of")),
            }
        }
        Ok(Some(match dir {
            Some(d) => d,
            None => rfs::openat(
                &*self.anchor,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io(e, "open the parent of"))?,
        }))
    }

    fn name(&self) -> &OsStr {
        self.below.last().expect("a node path has a last component")
    }

    fn io(&self, e: Errno, what: &str) -> Error {
        Error::Io {
            context: format!("{what} {}", self.resolved.display()),
            source: e.into(),
        }
    }

    fn swapped(&self, c: &OsStr) -> Error {
        Error::precondition(format!(
            "{}: {:?} is not a directory (was it replaced by a symbolic link?); refusing to go on",
            self.resolved.display(),
            c
        ))
    }

    /// What the last component is now (not followed); `None` when it or a parent is missing.
    fn final_type(&self) -> Result<Option<FileType>> {
        let Some(parent) = self.parent_dir(false)? else {
            return Ok(None);
        };
        match rfs::statat(&parent, self.name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io(e, "stat")),
        }
    }

    /// Whether something is at the path (not following a link there).
    pub(crate) fn is_present(&self) -> Result<bool> {
        // Something that answers an error (EIO from a shut-down filesystem) is there.
        Ok(!matches!(self.final_type(), Ok(None)))
    }

    /// The last component, reached through its parent directory opened from the resolved
    /// anchor without following a link; `None` when a directory above it is missing.
    pub(crate) fn spot(&self) -> Result<Option<Spot>> {
        Ok(self.parent_dir(false)?.map(|parent| Spot {
            parent,
            name: self.name().to_owned(),
            path: self.resolved.clone(),
        }))
    }

    /// What is mounted on the last component, seen from the resolved directory (not from the
    /// path's text, which a replaced directory makes lead elsewhere).
    pub(crate) fn occupant(&self) -> Result<Occupant> {
        match self.spot()? {
            Some(spot) => spot.occupant(),
            None => Ok(Occupant::Nothing),
        }
    }

    /// Creates the directory (and its parents, mode 0750) and opens it to mount onto.
    pub(crate) fn mkdir_p(&self) -> Result<MountPoint> {
        let parent = self.parent_dir(true)?.expect("created");
        match rfs::mkdirat(&parent, self.name(), Mode::from_raw_mode(0o750)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(self.io(e, "create directory")),
        }
        let mp = self.open_at(parent)?;
        match mp.file_type()? {
            FileType::Directory => Ok(mp),
            other => Err(Error::precondition(format!(
                "{} is {}, not a directory",
                self.resolved.display(),
                crate::pool::fsops::type_name(other)
            ))),
        }
    }

    /// Makes the file a raw block volume is bound onto (its parents too) and opens it. An
    /// existing file is reused; a directory there is `InvalidArgument`.
    pub(crate) fn create_block_target(&self) -> Result<MountPoint> {
        let parent = self.parent_dir(true)?.expect("created");
        match rfs::openat(
            &parent,
            self.name(),
            OFlags::WRONLY
                | OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NOFOLLOW
                | OFlags::CLOEXEC
                | OFlags::NONBLOCK,
            Mode::from_raw_mode(0o640),
        ) {
            Ok(_) | Err(Errno::EXIST) => {}
            Err(e) => return Err(self.io(e, "create")),
        }
        let mp = self.open_at(parent)?;
        match mp.file_type()? {
            FileType::Directory => Err(Error::invalid(
                "target path",
                format!(
                    "{} is a directory; a block volume needs a file",
                    self.resolved.display()
                ),
            )),
            FileType::RegularFile | FileType::BlockDevice => Ok(mp),
            other => Err(Error::precondition(format!(
                "{} is {}; a block volume is bound onto a regular file",
                self.resolved.display(),
                crate::pool::fsops::type_name(other)
            ))),
        }
    }

    /// Opens the last component (not followed) in `parent`.
    fn open_at(&self, parent: OwnedFd) -> Result<MountPoint> {
        let fd = rfs::openat(
            &parent,
            self.name(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(e, "open"))?;
        Ok(MountPoint {
            spot: Spot {
                parent,
                name: self.name().to_owned(),
                path: self.resolved.clone(),
            },
            fd,
        })
    }

    /// The directory opened for reading (the root of a staged volume, to apply an fsGroup to):
    /// what is mounted there now.
    pub(crate) fn open_dir(&self) -> Result<OwnedFd> {
        let parent = self
            .parent_dir(false)?
            .ok_or_else(|| Error::not_found("directory", self.resolved.display().to_string()))?;
        rfs::openat(
            &parent,
            self.name(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(e, "open"))
    }

    /// Removes the directory if it is empty; anything else is left as it is.
    pub(crate) fn remove_dir_if_empty(&self) {
        let Ok(Some(parent)) = self.parent_dir(false) else {
            return;
        };
        match rfs::unlinkat(&parent, self.name(), AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => {
                tracing::debug!(path = %self.resolved.display(), error = %e, "left directory in place")
            }
        }
    }

    /// Removes what a publication made here once it is unmounted: its empty directory, or the
    /// empty file a block volume was bound onto. Anything else stays.
    pub(crate) fn remove_target(&self) {
        let Ok(Some(parent)) = self.parent_dir(false) else {
            return;
        };
        let Ok(st) = rfs::statat(&parent, self.name(), AtFlags::SYMLINK_NOFOLLOW) else {
            return;
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => self.remove_dir_if_empty(),
            FileType::RegularFile if st.st_size == 0 => {
                let _ = rfs::unlinkat(&parent, self.name(), AtFlags::empty());
            }
            _ => {}
        }
    }
}

/// What sits on a path's last component, seen from its parent directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Occupant {
    /// Nothing: the last component, or a directory above it, is missing.
    Nothing,
    /// A file or directory with nothing mounted on it.
    Bare,
    /// The topmost mount on it, by its ID (mountinfo's first field).
    Mount { id: u64 },
}

/// What is on a directory entry, from the mount IDs of its parent directory and of the entry
/// (looked up in that parent, so crossing into whatever is mounted on it): a mount of its own
/// exactly when they differ.
pub(crate) fn occupant_of(parent_mount: u64, entry_mount: u64) -> Occupant {
    if entry_mount == parent_mount {
        Occupant::Bare
    } else {
        Occupant::Mount { id: entry_mount }
    }
}

/// A path's last component reached through its parent directory, opened once: what is on it,
/// and the path umount2 reaches exactly it by.
#[derive(Debug)]
pub(crate) struct Spot {
    parent: OwnedFd,
    name: OsString,
    /// The resolved path, for messages.
    pub path: PathBuf,
}

impl Spot {
    /// `/proc/self/fd/<parent>/<name>`: the magic link is an intermediate component, followed to
    /// exactly the opened parent directory whatever became of its path; `name` is then looked up
    /// in it (and, with `UMOUNT_NOFOLLOW`, never followed if it is a link).
    pub fn proc_path(&self) -> PathBuf {
        proc_fd(&self.parent).join(&self.name)
    }

    /// What is on the entry now (see [`occupant_of`]).
    pub fn occupant(&self) -> Result<Occupant> {
        let entry = match rfs::openat(
            &self.parent,
            &self.name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Occupant::Nothing),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("open {}", self.path.display()),
                    source: e.into(),
                })
            }
        };
        let parent = self.parent.as_fd();
        Ok(occupant_of(
            mount_id(parent, &self.path)?,
            mount_id(entry.as_fd(), &self.path)?,
        ))
    }
}

/// The ID of the mount the open file `fd` is on, as mountinfo numbers it: `statx`'s
/// `STATX_MNT_ID`, or, when the filesystem answers no `statx` (a shut-down xfs says EIO, a dead
/// FUSE client ENOTCONN), the `mnt_id` the kernel shows in `/proc/self/fdinfo`, which asks the
/// filesystem nothing.
fn mount_id(fd: BorrowedFd<'_>, shown: &Path) -> Result<u64> {
    if let Ok(st) = rfs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID) {
        if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
            return Ok(st.stx_mnt_id);
        }
    }
    let info = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&info).context(|| format!("read {info}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            Error::precondition(format!(
                "{}: the kernel names no mount ID for it ({info} has no mnt_id)",
                shown.display()
            ))
        })
}

/// A mount point opened from a [`NodePath`]: mounts go onto its descriptor.
#[derive(Debug)]
pub(crate) struct MountPoint {
    spot: Spot,
    fd: OwnedFd,
}

impl MountPoint {
    /// The resolved path, for messages (mountinfo shows the mount there).
    pub fn path(&self) -> &Path {
        &self.spot.path
    }

    /// The name in its parent directory: what is mounted on it, and how to unmount that.
    pub fn spot(&self) -> &Spot {
        &self.spot
    }

    /// The path mount(2) reaches this very directory or file by, whatever happens to the path's
    /// parents meanwhile.
    pub fn proc_path(&self) -> PathBuf {
        proc_fd(&self.fd)
    }

    fn file_type(&self) -> Result<FileType> {
        let st = rfs::fstat(&self.fd).context(|| format!("stat {}", self.path().display()))?;
        Ok(FileType::from_raw_mode(st.st_mode))
    }

    /// Opens the name again in the same parent: after a mount onto it, the root of that mount
    /// (the lookup crosses into it), to change the mount's flags.
    pub fn reopen(&self) -> Result<OwnedFd> {
        rfs::openat(
            &self.spot.parent,
            &self.spot.name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .context(|| format!("open {}", self.path().display()))
    }
}

/// `/proc/self/fd/N` for `fd`.
pub(crate) fn proc_fd(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Where the directory open as `fd` is, as the kernel names it.
fn fd_path(fd: &OwnedFd) -> std::io::Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let target = rfs::readlink(proc_fd(fd), Vec::new())?;
    Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
}

/// The checks on a resolved path (see the module documentation).
fn check_resolved(
    what: &'static str,
    given: &Path,
    resolved: &Path,
    rules: &Rules<'_>,
) -> Result<()> {
    let shown = || {
        if resolved == given {
            given.display().to_string()
        } else {
            format!("{} (resolved: {})", given.display(), resolved.display())
        }
    };
    let text = resolved.as_os_str().as_encoded_bytes();
    if !resolved.is_absolute() || text.ends_with(b" (deleted)") {
        return Err(Error::invalid(
            what,
            format!(
                "{} was removed while it was being resolved",
                given.display()
            ),
        ));
    }
    if let Some(dir) = validate::system_dir(resolved) {
        return Err(Error::invalid(
            what,
            format!("{} is in system directory {dir}", shown()),
        ));
    }
    if resolved.starts_with(rules.pool) || rules.pool.starts_with(resolved) {
        return Err(Error::invalid(
            what,
            format!(
                "{} is inside or above the pool {}; volumes are never mounted there",
                shown(),
                rules.pool.display()
            ),
        ));
    }
    if !rules.prefixes.is_empty() {
        let under = |p: &Path| resolved.starts_with(p) && resolved != p;
        let inside = rules.prefixes.iter().any(|p| {
            // The prefix as configured, and where it really is (kubelet's root may be a link).
            under(p) || std::fs::canonicalize(p).is_ok_and(|c| under(&c))
        });
        if !inside {
            let allowed: Vec<String> = rules
                .prefixes
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::invalid(
                what,
                format!(
                    "{} is outside the allowed directories {}",
                    shown(),
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// What a volume path a caller names is, for a stats call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    Missing,
    /// A file or a device node: where a block volume is published.
    FileOrDevice,
    Directory,
}

/// A caller's volume path for a read (stats): its parents' links resolved like
/// [`NodePath::resolve`]'s, its last component not followed, and what is there. `None` when it
/// cannot be resolved (it does not exist, or is no path at all).
pub(crate) fn resolve_for_reading(path: &Path) -> Option<(PathBuf, PathKind)> {
    let (parent, name) = (path.parent()?, path.file_name()?);
    let dir = rfs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let resolved = fd_path(&dir).ok()?.join(name);
    let kind = match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(_) => PathKind::Missing,
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => PathKind::Directory,
            FileType::RegularFile | FileType::BlockDevice => PathKind::FileOrDevice,
            _ => PathKind::Missing,
        },
    };
    Some((resolved, kind))
}

/// Opens the root of the filesystem mounted at `mount_point` (a path mountinfo gave: the
/// kernel's), for binding from and for an fsGroup.
pub(crate) fn open_mount_root(mount_point: &Path) -> Result<OwnedFd> {
    rfs::open(
        mount_point,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .context(|| format!("open {}", mount_point.display()))
}

/// Whether the filesystem mounted at `mount_point` answers EIO (the kernel shut it down).
pub(crate) fn answers_eio(mount_point: &Path) -> bool {
    std::fs::metadata(mount_point).is_err_and(|e| e.raw_os_error() == Some(libc::EIO))
}

/// Gives group `gid` the volume's root directory open as `root` (setgid, group rwx): new files
/// inherit the group, so a pod's fsGroup can write without a recursive chown of existing data.
pub(crate) fn apply_fs_group(root: &OwnedFd, shown: &Path, gid: u32) -> Result<()> {
    rfs::fchown(root, None, Some(rfs::Gid::from_raw(gid)))
        .context(|| format!("chown {} to group {gid}", shown.display()))?;
    let mode = rfs::fstat(root)
        .context(|| format!("stat {}", shown.display()))?
        .st_mode;
    rfs::fchmod(root, Mode::from_raw_mode((mode & 0o7777) | 0o2070))
        .context(|| format!("chmod {}", shown.display()))
}
