//! The pool-access layer: the one way into the pool's files. Every read, write, create, rename
//! and removal of a pool entry (metadata, images, entry directories, lock files, trash, node
//! records, listings) goes through a [`PoolFs`], and nothing outside this module calls `std::fs`
//! on a pool path (a test greps the backend's sources for it).
//!
//! The driver trusts the kernel and the pool root it was given, and nothing inside the pool: on a
//! shared pool any node's root, or anyone who can write the export, can plant a symbolic link, a
//! FIFO, a device node, a hard link or garbage anywhere in it. So:
//!
//! - every entry is reached relative to a directory descriptor of the root (opened afresh per
//!   [`PoolFs`], so a remounted pool is seen), with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`; a kernel without `openat2` (before 5.6, or a
//!   seccomp profile that answers ENOSYS) gets a walk that opens one component at a time with
//!   `O_NOFOLLOW` (`Resolver::Walk`, tested by forcing it);
//! - always `O_NONBLOCK | O_CLOEXEC` (a FIFO never blocks an open), then `fstat`: directories
//!   must be directories, images, metadata and lock files regular files, an image its own file
//!   (one link); anything else is [`Error::Untrusted`], naming the entry and what it is;
//! - metadata reads are bounded ([`MAX_METADATA`]); an ESTALE (a record replaced through another
//!   node of a shared pool) re-opens by path from the root, a bounded number of times;
//! - temporary, image and lock files are created `O_CREAT | O_EXCL | O_NOFOLLOW`;
//! - images are opened here and attached from that descriptor (never re-opened by path);
//! - metadata writes cannot fail for lack of space ([`PoolFs::write_json`]).
//!
//! Crates: `rustix` gives every system call used here, safely (`openat2` with `ResolveFlags`,
//! the `*at` calls, `renameat2(RENAME_EXCHANGE)`, `flock` for `lock.rs`). Evaluated and not
//! taken: `cap-std`/`cap-fs-ext` keep opens beneath a directory but follow symbolic links that
//! stay inside it (`FollowSymlinks::No` covers only the last component), so `volumes/<a>` linked
//! to `volumes/<b>` would give two volumes one image; `pathrs` resolves as if the root were a
//! chroot (symlinks followed inside it), its no-symlink mode goes through an `O_PATH` handle and
//! a re-open through procfs (two or three system calls per open where `openat2` is one), and it
//! adds an MPL/LGPL dependency. Written here, because no crate has them: the `O_NOFOLLOW` walk
//! (a dozen lines), the type checks, the bounded and ESTALE-retrying read, the fd-relative tree
//! removal (std's `remove_dir_all` starts from a path whose parents could be swapped), and the
//! space-safe metadata write.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, StatxFlags,
};
use rustix::io::Errno;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};
use crate::loopdev::FileId;

/// The largest metadata record read (or written): a `volume.json` is well under 1 KiB, a few KiB
/// with many holds. A bigger file is refused without being read to its end.
pub(crate) const MAX_METADATA: u64 = 64 * 1024;

/// The size every metadata record file is padded to (JSON allows trailing whitespace, so older
/// releases read it as it is). Records that never change size are rewritten without allocating.
pub(crate) const RECORD_SIZE: usize = 16 * 1024;

/// How often a metadata read that answers ESTALE is re-opened by path before giving up, and the
/// longest pause between tries: about 2 s in all, twice GlusterFS's default cache timeout.
const STALE_TRIES: u32 = 16;
const STALE_MAX_PAUSE: Duration = Duration::from_millis(200);
/// How long [`PoolFs::ensure_dir`] looks again for a directory a cluster filesystem's client
/// does not see yet.
const ENSURE_DIR_WAIT: Duration = Duration::from_secs(10);

/// Set once `openat2` answered ENOSYS: every later open walks.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// How a relative path is resolved beneath the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolver {
    /// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` (Linux 5.6+).
    Openat2,
    /// One `openat(O_NOFOLLOW)` per component: kernels without `openat2`.
    Walk,
}

/// What an entry must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
}

/// An image's length, allocated bytes and identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageStat {
    pub len: u64,
    pub allocated: u64,
    pub id: FileId,
}

/// An image's length and how many of its allocated bytes are its own: not shared with another
/// file (a reflinked snapshot or clone), so a write over them needs no new space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageSpace {
    pub len: u64,
    pub own: u64,
}

/// The pool root, opened: every entry is reached relative to it (see the module documentation).
/// Paths given to its methods are relative to the root and made of plain components (the
/// layout's, built from typed IDs).
#[derive(Debug)]
pub(crate) struct PoolFs {
    root: PathBuf,
    fd: OwnedFd,
    resolver: Resolver,
    /// The pool was on a GlusterFS mount when it was opened ([`on_glusterfs`]): a directory
    /// there that is still on FUSE is not fsynced (see [`syncs_directories`]).
    glusterfs: bool,
    /// The filesystem the pool root was on when the pool was opened ([`Home::of`]).
    home: Option<Home>,
}

/// A filesystem, by its mount and device, with its `statfs(2)` type: what a directory on the
/// same mount is on, known without a `statfs` (which a FUSE client sends to its server: a
/// round trip on GlusterFS for every metadata write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Home {
    mount: MountOf,
    magic: i64,
}

/// The mount and device an open file is on, from the attributes the kernel holds (no round
/// trip): the same pair means the same superblock, so the same filesystem type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MountOf {
    dev: (u32, u32),
    /// `None` before Linux 5.8, where the device alone says it.
    mount_id: Option<u64>,
}

impl MountOf {
    fn of(fd: &OwnedFd) -> Option<MountOf> {
        let st = rfs::statx(
            fd,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
            StatxFlags::TYPE | StatxFlags::MNT_ID,
        )
        .ok()?;
        Some(MountOf {
            dev: (st.stx_dev_major, st.stx_dev_minor),
            mount_id: StatxFlags::from_bits_retain(st.stx_mask)
                .contains(StatxFlags::MNT_ID)
                .then_some(st.stx_mnt_id),
        })
    }
}

impl Home {
    /// The filesystem holding the directory `root`; `None` when the kernel does not say.
    pub(crate) fn of(root: &Path) -> Option<Home> {
        let fd = rfs::open(root, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).ok()?;
        Some(Home {
            mount: MountOf::of(&fd)?,
            magic: fs_magic(&fd)?,
        })
    }
}

impl PoolFs {
    /// Opens the pool root `root` (trusted: symbolic links in it are followed, as the operator
    /// configured it). Fails unless it is a directory.
    pub fn open(root: &Path) -> std::io::Result<PoolFs> {
        let resolver = if NO_OPENAT2.load(Ordering::Relaxed) {
            Resolver::Walk
        } else {
            Resolver::Openat2
        };
        PoolFs::open_with(root, resolver)
    }

    pub fn open_with(root: &Path, resolver: Resolver) -> std::io::Result<PoolFs> {
        let fd = rfs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(PoolFs {
            root: root.to_owned(),
            fd,
            resolver,
            glusterfs: false,
            home: None,
        })
    }

    /// This handle for a pool whose root was on `home` when it was opened: a directory still
    /// on that mount is on that filesystem ([`PoolFs::magic_of`]).
    pub fn at_home(mut self, home: Option<Home>) -> PoolFs {
        self.home = home;
        self
    }

    /// The magic number of the filesystem holding `dir`: the pool's own when `dir` is on the
    /// mount the pool was opened on (known; a pool remounted since is another mount), else
    /// asked with `statfs`.
    fn magic_of(&self, dir: &OwnedFd) -> Option<i64> {
        match self.home {
            Some(home) if MountOf::of(dir) == Some(home.mount) => Some(home.magic),
            _ => fs_magic(dir),
        }
    }

    /// Whether the pool was on a local filesystem ([`is_local_fs`]) when it was opened; not
    /// known counts as not.
    pub fn is_local(&self) -> bool {
        self.home.is_some_and(|home| is_local_fs(Some(home.magic)))
    }

    /// This handle for a pool found on GlusterFS ([`on_glusterfs`]) when it was opened.
    pub fn on_glusterfs(mut self, glusterfs: bool) -> PoolFs {
        self.glusterfs = glusterfs;
        self
    }

    /// The absolute path of `rel`, for messages.
    pub fn path(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Opens `rel` beneath the root, never following a symbolic link anywhere on the way.
    fn resolve(&self, rel: &Path, flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
        let mut flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        // O_PATH takes no other flags (openat2 refuses them); it opens nothing for I/O anyway.
        if !flags.contains(OFlags::PATH) {
            flags |= OFlags::NONBLOCK;
        }
        if self.resolver == Resolver::Openat2 && !NO_OPENAT2.load(Ordering::Relaxed) {
            match rfs::openat2(&self.fd, rel, flags, mode, resolve_flags()) {
                Err(Errno::NOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    tracing::info!(
                        "openat2 is not available: resolving pool paths one component at a time"
                    );
                }
                other => return other.map_err(Into::into),
            }
        }
        walk(self.fd.as_fd(), rel, flags, mode)
    }

    /// [`PoolFs::resolve`], then checks the entry is a `kind`. Errors name the entry: what a
    /// planted entry is ([`Error::Untrusted`]), or the I/O error (ENOENT kept for callers).
    fn open_checked(&self, rel: &Path, flags: OFlags, mode: Mode, kind: Kind) -> Result<OwnedFd> {
        let fd = self
            .resolve(rel, flags, mode)
            .map_err(|e| self.fail(rel, e, "open"))?;
        let st = cached_stat(&fd, None).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        self.check_type(rel, st.mode, kind)?;
        Ok(fd)
    }

    /// Checks that `rel`, whose `st_mode` is `mode`, is a `kind`.
    fn check_type(&self, rel: &Path, mode: u32, kind: Kind) -> Result<()> {
        let ft = FileType::from_raw_mode(mode);
        let ok = match kind {
            Kind::Dir => ft == FileType::Directory,
            Kind::File => ft == FileType::RegularFile,
        };
        if ok {
            return Ok(());
        }
        let want = match kind {
            Kind::Dir => "a directory",
            Kind::File => "a regular file",
        };
        Err(self.untrusted(rel, format!("is {}, not {want}", type_name(ft))))
    }

    fn untrusted(&self, rel: &Path, reason: String) -> Error {
        Error::Untrusted {
            path: self.path(rel),
            reason,
        }
    }

    /// The error for `e` on `rel`: an entry that is not what it must be (a symbolic link on the
    /// way, a FIFO without a reader, ...) is [`Error::Untrusted`], saying what is there.
    fn fail(&self, rel: &Path, e: std::io::Error, what: &str) -> Error {
        let errno = e.raw_os_error().map(Errno::from_raw_os_error);
        match errno {
            Some(Errno::LOOP | Errno::NOTDIR | Errno::XDEV | Errno::NXIO) => {
                self.untrusted(rel, self.describe(rel))
            }
            _ => Error::Io {
                context: format!("{what} {}", self.path(rel).display()),
                source: e,
            },
        }
    }

    /// What is wrong on the way to `rel`: the first component that is not a directory (or, last,
    /// not a regular file), and what it is. Only `lstat`s, for the message.
    fn describe(&self, rel: &Path) -> String {
        let mut prefix = PathBuf::new();
        let parts: Vec<&OsStr> = rel.iter().collect();
        for (i, part) in parts.iter().enumerate() {
            prefix.push(part);
            let Ok(st) = rfs::statat(&self.fd, &prefix, AtFlags::SYMLINK_NOFOLLOW) else {
                break;
            };
            let ft = FileType::from_raw_mode(st.st_mode);
            let last = i + 1 == parts.len();
            if ft == FileType::Symlink {
                let target = rfs::readlinkat(&self.fd, &prefix, Vec::new())
                    .map(|t| format!(" to {:?}", t.to_string_lossy()))
                    .unwrap_or_default();
                return format!(
                    "{} is a symbolic link{target}",
                    self.path(&prefix).display()
                );
            }
            if !last && ft != FileType::Directory {
                return format!(
                    "{} is {}, not a directory",
                    self.path(&prefix).display(),
                    type_name(ft)
                );
            }
            if last {
                return format!("is {}", type_name(ft));
            }
        }
        "is not what the pool holds there".to_owned()
    }

    /// Opens the directory `rel` (for listing, fsync, or as the parent of an entry).
    pub fn open_dir(&self, rel: &Path) -> Result<OwnedFd> {
        self.open_checked(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
            Kind::Dir,
        )
    }

    /// The directory holding `rel` and `rel`'s name in it. The directory is opened `O_PATH`,
    /// resolved and checked like any other: good for the `*at` calls, `fstat` and `fstatfs`,
    /// and on a cluster filesystem no round trip to the server (a directory opened for reading
    /// is one, and another when it is closed). [`PoolFs::fsync_dir`] opens it for its fsync.
    fn parent_of<'a>(&self, rel: &'a Path) -> Result<(OwnedFd, &'a OsStr)> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(self.untrusted(rel, "is not an entry in a directory".into()));
        };
        let dir = if parent.as_os_str().is_empty() {
            rfs::openat(
                &self.fd,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.fail(parent, e.into(), "open"))?
        } else {
            self.open_checked(
                parent,
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
                Kind::Dir,
            )?
        };
        Ok((dir, name))
    }

    /// Makes the entries of directory `dir` (as [`PoolFs::parent_of`] opened it, for `rel`'s
    /// messages), whose filesystem has the magic number `magic`, durable: a rename or create in
    /// it survives a crash once this returns. Nothing to do where a directory's fsync does
    /// nothing ([`syncs_directories`]).
    fn fsync_dir(&self, dir: &OwnedFd, magic: Option<i64>, rel: &Path) -> Result<()> {
        if !self.dirs_need_sync(magic) {
            return Ok(());
        }
        let readable = rfs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| self.fail(rel, e.into(), "open the directory of"))?;
        rfs::fsync(&readable).map_err(|e| self.fail(rel, e.into(), "fsync the directory of"))
    }

    /// Whether fsyncing a directory on a filesystem with the magic number `magic` does
    /// anything: everywhere but on the GlusterFS mount the pool was opened on (a directory there
    /// that is no longer on FUSE, a pool remounted since, is synced).
    fn dirs_need_sync(&self, magic: Option<i64>) -> bool {
        !(self.glusterfs && magic == Some(FUSE_MAGIC))
    }

    /// Whether `rel` exists. A planted entry on the way (a symbolic link, ...) is an error naming
    /// it, not "missing".
    pub fn exists(&self, rel: &Path) -> Result<bool> {
        match self.resolve(rel, OFlags::PATH, Mode::empty()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.fail(rel, e, "look up")),
        }
    }

    /// Creates the directory `rel` unless it exists; either way it must be a directory.
    pub fn ensure_dir(&self, rel: &Path) -> Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        match rfs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(self.fail(rel, e.into(), "create directory")),
        }
        let open = || {
            self.open_checked(
                rel,
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
                Kind::Dir,
            )
            .map(drop)
        };
        // On a cluster filesystem, a directory that mkdir just made or found (EEXIST: another
        // node made it) can still be ENOENT to the next lookup through this node's client (seen
        // on GlusterFS when the servers of a new shared pool start at once, once for longer than
        // 2 s under a loaded machine): look again, bounded (10 s: this runs when a server opens
        // its pool). Each time, make it again (it may really have gone) and read the parent
        // directory, whose listing carries each entry's identity to this node's client.
        let deadline = Instant::now() + ENSURE_DIR_WAIT;
        let mut pause = Duration::from_millis(20);
        loop {
            match open() {
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(STALE_MAX_PAUSE);
                    match rfs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.fail(rel, e.into(), "create directory")),
                    }
                    let listed = rfs::openat(
                        &parent,
                        ".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(std::io::Error::from)
                    .and_then(|dir| read_names(&dir));
                    if let Err(e) = listed {
                        tracing::debug!(dir = %rel.display(), error = %e, "could not list the parent");
                    }
                }
                done => return done,
            }
        }
    }

    /// Whether the directory `rel` is there and writable (a readiness probe).
    pub fn check_writable_dir(&self, rel: &Path) -> std::result::Result<(), String> {
        let dir = self.open_dir(rel).map_err(|e| e.to_string())?;
        rfs::accessat(
            &dir,
            ".",
            rfs::Access::WRITE_OK | rfs::Access::EXEC_OK,
            AtFlags::empty(),
        )
        .map_err(|e| format!("{} is not writable: {e}", self.path(rel).display()))
    }

    /// The names of the entries of directory `rel` that are valid UTF-8, in no particular order.
    pub fn list_names(&self, rel: &Path) -> Result<Vec<String>> {
        let dir = self.open_dir(rel)?;
        Ok(read_names(&dir)
            .map_err(|e| self.fail(rel, e, "read"))?
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect())
    }

    /// Reads a JSON record; `Ok(None)` when it does not exist. A record that is not a regular
    /// file, is larger than [`MAX_METADATA`] or does not parse (or names an invalid ID) is
    /// refused, naming the file. ESTALE is retried (see the module documentation).
    pub fn read_json<T: DeserializeOwned>(&self, rel: &Path) -> Result<Option<T>> {
        let Some(bytes) = self.read_record(rel)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Metadata {
                path: self.path(rel),
                reason: e.to_string(),
            })
    }

    fn read_record(&self, rel: &Path) -> Result<Option<Vec<u8>>> {
        let mut pause = Duration::from_millis(5);
        for attempt in 1..=STALE_TRIES {
            // After an ESTALE, everything is looked up again from the root's path: the stale
            // handle may be any directory on the way.
            let fresh;
            let fs = if attempt == 1 {
                self
            } else {
                fresh = PoolFs::open_with(&self.root, self.resolver)
                    .map_err(|e| self.fail(Path::new(""), e, "open the pool root"))?;
                &fresh
            };
            match fs.read_record_once(rel) {
                Err(e) if is_stale(&e) => {
                    tracing::debug!(path = %self.path(rel).display(), attempt, "stale file handle; re-opening");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(STALE_MAX_PAUSE);
                }
                other => return other,
            }
        }
        Err(Error::Stale {
            path: self.path(rel),
            tries: STALE_TRIES,
        })
    }

    fn read_record_once(&self, rel: &Path) -> Result<Option<Vec<u8>>> {
        let fd = match self.open_checked(rel, OFlags::RDONLY, Mode::empty(), Kind::File) {
            Ok(fd) => fd,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        // The size as the open saw it (the read is bounded whatever it is).
        let size = cached_stat(&fd, None)
            .map_err(|e| self.fail(rel, e.into(), "stat"))?
            .size;
        if size > MAX_METADATA {
            return Err(self.too_large(rel));
        }
        // Room for the whole record and one byte more: one read gets it all (a cluster client
        // may read straight from the server, each read a round trip), the next finds the end.
        let mut bytes = Vec::with_capacity(usize::try_from(size + 1).unwrap_or(0));
        File::from(fd)
            .take(MAX_METADATA + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.fail(rel, e, "read"))?;
        if bytes.len() as u64 > MAX_METADATA {
            return Err(self.too_large(rel));
        }
        Ok(Some(bytes))
    }

    fn too_large(&self, rel: &Path) -> Error {
        self.untrusted(
            rel,
            format!("is larger than {MAX_METADATA} bytes, which no metadata record is"),
        )
    }

    /// Replaces the record `rel` with `value`, atomically and durably, without needing free
    /// space once the record exists: the new JSON is written over a spare copy of the record
    /// (`.<name>.tmp`, the same size, its blocks already allocated), fsynced, and swapped with the
    /// record in one `renameat2(RENAME_EXCHANGE)`; the old record becomes the next spare. A crash
    /// leaves the old record or the new one, never a torn one (only the spare is ever written in
    /// place). Records are padded with whitespace to [`RECORD_SIZE`]. On a local filesystem
    /// without exchange, a rename, then a new spare made best-effort; on a filesystem other nodes
    /// mount, [`PoolFs::write_fresh`] (which needs free space).
    pub fn write_json<T: Serialize>(&self, rel: &Path, value: &T) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(value).map_err(|e| Error::Metadata {
            path: self.path(rel),
            reason: format!("cannot encode: {e}"),
        })?;
        json.push(b'\n');
        if json.len() as u64 > MAX_METADATA {
            return Err(Error::Metadata {
                path: self.path(rel),
                reason: format!("the record would be larger than {MAX_METADATA} bytes"),
            });
        }
        let (dir, name) = self.parent_of(rel)?;
        let spare_name = spare_name(name);
        let spare_rel = rel.with_file_name(&spare_name);
        // The record itself must be a regular file (or missing): never swap a planted entry in.
        match cached_stat(&dir, Some(name)) {
            Ok(st) => self.check_type(rel, st.mode, Kind::File)?,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(self.fail(rel, e.into(), "stat")),
        }
        let magic = self.magic_of(&dir);
        if !exchanges_safely(magic) {
            return self.write_fresh(&dir, magic, name, &spare_name, rel, &spare_rel, &json);
        }
        let spare = self.open_spare(&dir, &spare_name, &spare_rel)?;
        let current = rfs::fstat(&spare)
            .map_err(|e| self.fail(&spare_rel, e.into(), "stat"))?
            .st_size;
        let current = usize::try_from(current).unwrap_or(usize::MAX);
        if current as u64 > MAX_METADATA {
            return Err(self.too_large(&spare_rel));
        }
        // Never shorter than the spare is: a shorter write would leave old bytes after the JSON,
        // and truncating would give back blocks a full pool may not return.
        let len = json.len().max(RECORD_SIZE).max(current);
        json.resize(len, b' ');
        json[len - 1] = b'\n';
        let spare = File::from(spare);
        spare
            .write_all_at(&json, 0)
            .map_err(|e| self.fail(&spare_rel, e, "write"))?;
        spare
            .sync_all()
            .map_err(|e| self.fail(&spare_rel, e, "fsync"))?;
        drop(spare);
        match rfs::renameat_with(&dir, &spare_name, &dir, name, RenameFlags::EXCHANGE) {
            Ok(()) => {}
            // The first write (no record yet), or a filesystem without exchange.
            Err(Errno::NOENT | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                rfs::renameat(&dir, &spare_name, &dir, name)
                    .map_err(|e| self.fail(rel, e.into(), "rename the new record to"))?;
                if let Err(e) = self.make_spare(&dir, &spare_name, &spare_rel) {
                    tracing::warn!(path = %self.path(&spare_rel).display(), error = %e,
                        "no spare metadata record: the next write needs free space");
                }
            }
            Err(e) => return Err(self.fail(rel, e.into(), "replace")),
        }
        self.fsync_dir(&dir, magic, rel)
    }

    /// The write of a record on a filesystem other nodes mount (FUSE, NFS, CephFS): a new file
    /// under the temporary name (created `O_EXCL`, and when one is there, it is removed and
    /// created again: the server resolves both names, so a dentry another node left stale here
    /// cannot alias the record), fsync, rename over the record. Writing over a spare found by name is unsafe there: after another
    /// node's rename, this node's cached name of the spare may denote the live record.
    #[allow(
        clippy::too_many_arguments,
        reason = "the parts of one write, in order"
    )]
    fn write_fresh(
        &self,
        dir: &OwnedFd,
        magic: Option<i64>,
        name: &OsStr,
        tmp_name: &OsStr,
        rel: &Path,
        tmp_rel: &Path,
        json: &[u8],
    ) -> Result<()> {
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC;
        let mode = Mode::from_raw_mode(0o644);
        let create = || {
            rfs::openat2(dir, tmp_name, flags, mode, resolve_flags()).or_else(|e| match e {
                Errno::NOSYS => rfs::openat(dir, tmp_name, flags, mode),
                e => Err(e),
            })
        };
        // Normally there is no temporary file (every write renames its own away): it is removed
        // only when one is in the way, left by a write that stopped half-way.
        let fd = match create() {
            Err(Errno::EXIST) => {
                match rfs::unlinkat(dir, tmp_name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(self.fail(tmp_rel, e.into(), "remove")),
                }
                create()
            }
            other => other,
        }
        .map_err(|e| self.fail(tmp_rel, e.into(), "create"))?;
        let tmp = File::from(fd);
        tmp.write_all_at(json, 0)
            .and_then(|()| tmp.sync_all())
            .map_err(|e| self.fail(tmp_rel, e, "write"))?;
        drop(tmp);
        rfs::renameat(dir, tmp_name, dir, name)
            .map_err(|e| self.fail(rel, e.into(), "rename the new record to"))?;
        self.fsync_dir(dir, magic, rel)
    }

    /// Opens the spare record `name` in `dir`, creating it (`O_EXCL`) when missing.
    fn open_spare(&self, dir: &OwnedFd, name: &OsStr, rel: &Path) -> Result<OwnedFd> {
        let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let open = |extra: OFlags| {
            // openat2 takes a mode only with O_CREAT.
            let mode = if extra.contains(OFlags::CREATE) {
                Mode::from_raw_mode(0o644)
            } else {
                Mode::empty()
            };
            rfs::openat2(dir, name, flags | extra, mode, resolve_flags()).or_else(|e| match e {
                Errno::NOSYS => rfs::openat(dir, name, flags | extra, mode),
                e => Err(e),
            })
        };
        let fd = match open(OFlags::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => open(OFlags::CREATE | OFlags::EXCL)
                .map_err(|e| self.fail(rel, e.into(), "create"))?,
            Err(e) => return Err(self.fail(rel, e.into(), "open")),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        self.check_type(rel, st.st_mode, Kind::File)?;
        check_links(self, rel, &st)?;
        Ok(fd)
    }

    /// A new spare: [`RECORD_SIZE`] bytes of whitespace, written and fsynced (allocated blocks,
    /// not a hole, so overwriting it later allocates nothing).
    fn make_spare(&self, dir: &OwnedFd, name: &OsStr, rel: &Path) -> Result<()> {
        let spare = File::from(self.open_spare(dir, name, rel)?);
        let mut blank = vec![b' '; RECORD_SIZE];
        blank[RECORD_SIZE - 1] = b'\n';
        spare
            .write_all_at(&blank, 0)
            .and_then(|()| spare.sync_all())
            .map_err(|e| self.fail(rel, e, "write"))
    }

    /// fsyncs the directory `rel` so a rename or create in it survives a crash (where that
    /// does anything: [`syncs_directories`]).
    pub fn sync_dir(&self, rel: &Path) -> Result<()> {
        if self.glusterfs {
            let dir = self.open_checked(
                rel,
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
                Kind::Dir,
            )?;
            return self.fsync_dir(&dir, self.magic_of(&dir), rel);
        }
        let dir = self.open_dir(rel)?;
        rfs::fsync(&dir).map_err(|e| self.fail(rel, e.into(), "fsync"))
    }

    /// Reads the small file `rel` (at most `max` bytes) as the pool's filesystem has it now, not
    /// as this node's page cache does; `Ok(None)` when it does not exist. For a file another node
    /// rewrites in place (a lease): its size and inode never change, and a GlusterFS client
    /// keeps serving the pages it cached (measured: the first value read, for ever) unless they
    /// are dropped first.
    pub fn read_uncached(&self, rel: &Path, max: usize) -> Result<Option<Vec<u8>>> {
        let fd = match self.open_checked(rel, OFlags::RDONLY, Mode::empty(), Kind::File) {
            Ok(fd) => fd,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        rfs::fadvise(&fd, 0, None, rfs::Advice::DontNeed)
            .map_err(|e| self.fail(rel, e.into(), "drop the cached pages of"))?;
        let mut bytes = Vec::with_capacity(max);
        File::from(fd)
            .take(u64::try_from(max).unwrap_or(u64::MAX))
            .read_to_end(&mut bytes)
            .map_err(|e| self.fail(rel, e, "read"))?;
        Ok(Some(bytes))
    }

    /// Opens (creating it if needed) a node's lease file `rel`, for rewriting in place.
    pub fn open_lease(&self, rel: &Path) -> Result<File> {
        let fd = self.open_checked(
            rel,
            OFlags::RDWR | OFlags::CREATE,
            Mode::from_raw_mode(0o644),
            Kind::File,
        )?;
        let st = rfs::fstat(&fd).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        check_links(self, rel, &st)?;
        Ok(File::from(fd))
    }

    /// Opens (creating it if needed) the lock file `rel`, for writing (NFS needs that for an
    /// exclusive lock); nothing is ever written to it. One `open(O_CREAT)` without `O_EXCL`: an
    /// existing file is opened as by a plain open (a lock file lives as long as its subject, so
    /// it is there for every call but the first), a missing one is made in the same call (on a
    /// cluster filesystem a failed open first, then a create, is a round trip more). A planted
    /// entry is refused as by every open here: no link is followed (`O_NOFOLLOW`, and openat2's
    /// resolve flags on the way), a FIFO without a reader fails (`O_NONBLOCK`), and what was
    /// opened must be a regular file. A file removed by its last holder between this open and
    /// the lock is seen by the caller ([`PoolFs::names_file`]).
    pub fn open_lock(&self, rel: &Path) -> Result<File> {
        let fd = self
            .resolve(
                rel,
                OFlags::WRONLY | OFlags::CREATE,
                Mode::from_raw_mode(0o644),
            )
            .map_err(|e| self.fail(rel, e, "open lock"))?;
        let st = cached_stat(&fd, None).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        self.check_type(rel, st.mode, Kind::File)?;
        Ok(File::from(fd))
    }

    /// Opens the lock file `rel` for writing when it exists; `Ok(None)` when it does not.
    pub fn open_existing_lock(&self, rel: &Path) -> Result<Option<File>> {
        let fd = match self.resolve(rel, OFlags::WRONLY, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.fail(rel, e, "open lock")),
        };
        let st = cached_stat(&fd, None).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        self.check_type(rel, st.mode, Kind::File)?;
        Ok(Some(File::from(fd)))
    }

    /// Whether `rel` is still the file `file` is open on (same device and inode), and that file
    /// still has a name. The link count is asked of the server (`AT_STATX_FORCE_SYNC`): a FUSE or
    /// NFS client resolves `rel` through the name it cached, which for up to its entry timeout
    /// can still lead to a file another node has removed since (measured on GlusterFS: removed
    /// and made again through one mount, the other resolved the old file by path while a fresh
    /// open found the new one). For files that are made and removed but never renamed (lock
    /// files), a named file that `rel` resolves to is the one at `rel`.
    pub fn names_file(&self, rel: &Path, file: &File) -> bool {
        let mine = match rfs::statx(
            file,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC,
            StatxFlags::INO | StatxFlags::NLINK,
        ) {
            Ok(st) if st.stx_nlink == 0 => return false,
            Ok(st) => (rfs::makedev(st.stx_dev_major, st.stx_dev_minor), st.stx_ino),
            // Before Linux 4.11 (or a seccomp profile without statx): the stat there is.
            Err(Errno::NOSYS) => match rfs::fstat(file) {
                Ok(st) if st.st_nlink == 0 => return false,
                Ok(st) => (st.st_dev, st.st_ino),
                Err(_) => return false,
            },
            Err(_) => return false,
        };
        self.resolves_to(rel, mine)
    }

    /// [`PoolFs::names_file`] for a lock file whose lock this process holds: nobody removes a
    /// lock file without holding its lock, so its link count need not be asked of the server.
    pub fn names_held_file(&self, rel: &Path, file: &File) -> bool {
        rfs::fstat(file).is_ok_and(|st| self.resolves_to(rel, (st.st_dev, st.st_ino)))
    }

    /// Whether `rel` resolves to the file with this (device, inode).
    fn resolves_to(&self, rel: &Path, id: (u64, u64)) -> bool {
        self.resolve(rel, OFlags::PATH, Mode::empty())
            .and_then(|fd| rfs::fstat(&fd).map_err(Into::into))
            .is_ok_and(|st| (st.st_dev, st.st_ino) == id)
    }

    /// Removes the file `rel` (not a directory); missing counts as done.
    pub fn unlink(&self, rel: &Path) -> Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        match rfs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.fail(rel, e.into(), "remove")),
        }
    }

    /// Creates the new, empty image file `rel` (it must not exist), open for reading and writing.
    pub fn create_image(&self, rel: &Path) -> Result<File> {
        self.resolve(
            rel,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(0o600),
        )
        .map(File::from)
        .map_err(|e| self.fail(rel, e, "create"))
    }

    /// Opens an image for reading, and for writing unless `read_only`. It must be a regular file
    /// with one link (its volume's own).
    pub fn open_image(&self, rel: &Path, read_only: bool) -> Result<File> {
        let flags = if read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        let fd = self.open_checked(rel, flags, Mode::empty(), Kind::File)?;
        let st = rfs::fstat(&fd).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        check_links(self, rel, &st)?;
        Ok(File::from(fd))
    }

    /// Stats an image; `None` when it does not exist. A planted entry is an error naming it.
    pub fn stat_image(&self, rel: &Path) -> Result<Option<ImageStat>> {
        let fd = match self.resolve(rel, OFlags::PATH, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.fail(rel, e, "look up")),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        self.check_type(rel, st.st_mode, Kind::File)?;
        check_links(self, rel, &st)?;
        Ok(Some(ImageStat {
            len: u64::try_from(st.st_size).unwrap_or(0),
            allocated: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
            id: FileId {
                dev: st.st_dev,
                ino: st.st_ino,
            },
        }))
    }

    /// Renames `from` to `to` (committing an image, moving a tree to trash); `Ok(false)` when
    /// `from` does not exist.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<bool> {
        let (from_dir, from_name) = self.parent_of(from)?;
        let (to_dir, to_name) = self.parent_of(to)?;
        match rfs::renameat(&from_dir, from_name, &to_dir, to_name) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.fail(from, e.into(), "rename")),
        }
    }

    /// [`PoolFs::remove_tree`] for a directory that should hold just the files `names`: they
    /// are removed by name, then the directory, without reading it (a directory read is a
    /// round trip or more on a cluster filesystem, for names known already). Whatever else is
    /// there (a spare record, a leftover temporary file, an entry of another kind under one of
    /// these names) makes it a full [`PoolFs::remove_tree`].
    pub fn remove_dir_of(&self, rel: &Path, names: &[&str]) -> Result<()> {
        let dir = match self.open_checked(
            rel,
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
            Kind::Dir,
        ) {
            Ok(dir) => dir,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(())
            }
            // Not a directory (a planted link, ...): removed, never followed.
            Err(_) => return self.remove_tree(rel),
        };
        for name in names {
            match rfs::unlinkat(&dir, *name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(_) => return self.remove_tree(rel),
            }
        }
        drop(dir);
        let (parent, name) = self.parent_of(rel)?;
        match rfs::unlinkat(&parent, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(_) => self.remove_tree(rel),
        }
    }

    /// Removes `rel` and, when it is a directory, everything in it, without following a symbolic
    /// link anywhere (links are removed, not followed).
    pub fn remove_tree(&self, rel: &Path) -> Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        remove_entry(dir.as_fd(), name, 0).map_err(|e| self.fail(rel, e, "remove"))
    }

    /// The [`ImageSpace`] of the image `rel`; `None` when it does not exist, an error naming a
    /// planted entry (as [`PoolFs::stat_image`]). With `shared_blocks` false (the pool's
    /// filesystem cannot share blocks, [`PoolFs::may_share_blocks`]) its allocated blocks are all
    /// its own and no extent map is read.
    pub fn image_space(&self, rel: &Path, shared_blocks: bool) -> Result<Option<ImageSpace>> {
        let Some(st) = self.stat_image(rel)? else {
            return Ok(None);
        };
        let allocated = st.allocated.min(st.len);
        let own = if shared_blocks && allocated > 0 {
            let file = self.open_image(rel, true)?;
            crate::extents::own_bytes(&file, st.len)
                .map_err(|e| self.fail(rel, e, "map the extents of"))?
                .unwrap_or(allocated)
        } else {
            allocated
        };
        Ok(Some(ImageSpace { len: st.len, own }))
    }

    /// Whether the pool's filesystem may share blocks between files (reflinks) that an extent
    /// map can show: xfs, btrfs and anything unknown are asked extent by extent; ext4 and tmpfs
    /// never share, FUSE (GlusterFS) cannot reflink, NFS cannot map extents.
    pub fn may_share_blocks(&self) -> bool {
        may_share_blocks(fs_magic(&self.fd))
    }

    /// The size of the pool's filesystem and the space available to us on it, in bytes, and
    /// whether it may share blocks ([`PoolFs::may_share_blocks`]): one `statfs` (a round trip
    /// on a cluster filesystem).
    pub fn size_free_and_sharing(&self) -> Result<(u64, u64, bool)> {
        let st =
            rfs::fstatfs(&self.fd).map_err(|e| self.fail(Path::new(""), e.into(), "statfs"))?;
        #[allow(
            clippy::useless_conversion,
            clippy::unnecessary_cast,
            reason = "the statfs fields' types differ between targets"
        )]
        let (frsize, blocks, avail, magic) = (
            // The kernel fills in the fragment size (the block size where a filesystem has none).
            u64::try_from(if st.f_frsize > 0 {
                st.f_frsize
            } else {
                st.f_bsize
            })
            .unwrap_or(0),
            st.f_blocks as u64,
            st.f_bavail as u64,
            i64::from(st.f_type),
        );
        Ok((
            blocks.saturating_mul(frsize),
            avail.saturating_mul(frsize),
            may_share_blocks(Some(magic)),
        ))
    }
}

/// The configured pool root, resolved: it is trusted (the operator chose it, symbolic links and
/// all), and must be a directory.
pub(crate) fn canonical_root(path: &Path) -> std::result::Result<PathBuf, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("cannot use it: {e}"))?;
    if !md.is_dir() {
        return Err("is not a directory".into());
    }
    path.canonicalize().map_err(|e| e.to_string())
}

/// An image, a record or a spare with more than one link is shared with some other file: never
/// ours to write, attach or copy.
fn check_links(fs: &PoolFs, rel: &Path, st: &rfs::Stat) -> Result<()> {
    if st.st_nlink > 1 {
        return Err(fs.untrusted(
            rel,
            format!("has {} hard links; loopvol's files have one", st.st_nlink),
        ));
    }
    Ok(())
}

/// Whether records in `dir` may be rewritten over a spare and swapped in with
/// `RENAME_EXCHANGE`: on a filesystem this kernel alone mounts (its cache of names is the
/// truth) that has the exchange. Elsewhere (FUSE, NFS, CephFS) [`PoolFs::write_fresh`].
fn exchanges_safely(magic: Option<i64>) -> bool {
    is_local_fs(magic)
}

/// Whether the filesystem with the magic number `magic` is one this kernel keeps on its own
/// block device (ext4, xfs, btrfs) or in memory: its metadata answers without a network.
fn is_local_fs(magic: Option<i64>) -> bool {
    const LOCAL: [i64; 4] = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
    ];
    magic.is_some_and(|m| LOCAL.contains(&m))
}

/// [`PoolFs::may_share_blocks`] for a filesystem with the magic number `magic`.
fn may_share_blocks(magic: Option<i64>) -> bool {
    const NEVER: [i64; 4] = [
        0xEF53,      // ext2/3/4
        0x0102_1994, // tmpfs
        FUSE_MAGIC,
        0x6969, // NFS
    ];
    !magic.is_some_and(|m| NEVER.contains(&m))
}

/// `statfs(2)`'s filesystem type of FUSE filesystems (GlusterFS's client among them).
const FUSE_MAGIC: i64 = 0x6573_5546;

/// The magic number of the filesystem holding `fd` (`statfs(2)`'s type); `None` when it
/// cannot be read.
fn fs_magic(fd: &OwnedFd) -> Option<i64> {
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i32 on 32-bit targets, i64 on 64-bit ones"
    )]
    rfs::fstatfs(fd).ok().map(|st| i64::from(st.f_type))
}

/// Whether the pool at `root` (canonical) is on a GlusterFS mount: a FUSE filesystem (one
/// statfs) whose mount the mount table calls `fuse.glusterfs`.
pub(crate) fn on_glusterfs(root: &Path) -> bool {
    let Ok(fd) = rfs::open(root, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()) else {
        return false;
    };
    if fs_magic(&fd) != Some(FUSE_MAGIC) {
        return false;
    }
    crate::mount::mounts()
        .ok()
        .and_then(|mounts| {
            crate::mount::containing(&mounts, root).map(|m| !syncs_directories(&m.fs_type))
        })
        .unwrap_or(false)
}

/// The type, size and identity of `name` in directory `fd` (the directory itself when `None`),
/// not following a link, as this kernel has them cached (`AT_STATX_DONT_SYNC`). For the checks
/// of what an entry is: an inode's type never changes, and a FUSE or NFS client has the
/// attributes it got when it looked the entry up; an `fstat` there asks the server again (a
/// round trip on GlusterFS, as the attributes of a file just opened are not kept). Sizes, link
/// counts and allocations that must be current are read with `fstat`.
fn cached_stat(fd: &OwnedFd, name: Option<&OsStr>) -> rustix::io::Result<EntryStat> {
    let flags = AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_DONT_SYNC;
    let want = StatxFlags::TYPE | StatxFlags::MODE | StatxFlags::SIZE;
    let st = match name {
        Some(name) => rfs::statx(fd, name, flags, want),
        None => rfs::statx(fd, "", flags | AtFlags::EMPTY_PATH, want),
    };
    match st {
        Ok(st) => Ok(EntryStat {
            mode: st.stx_mode.into(),
            size: st.stx_size,
        }),
        // Before Linux 4.11 (or a seccomp profile without it): the stat that asks.
        Err(Errno::NOSYS) => {
            let st = match name {
                Some(name) => rfs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW)?,
                None => rfs::fstat(fd)?,
            };
            Ok(EntryStat {
                mode: st.st_mode,
                size: u64::try_from(st.st_size).unwrap_or(0),
            })
        }
        Err(e) => Err(e),
    }
}

/// What [`cached_stat`] tells.
struct EntryStat {
    mode: u32,
    size: u64,
}

/// Whether fsync(2) of a directory on a filesystem of mount type `fs_type` makes its entries
/// durable, or does nothing and only costs a round trip. GlusterFS: the FUSE client forwards it
/// to the bricks, whose storage translator (`posix_fsyncdir`) answers success without syncing
/// anything (read in its source; strace of a brick shows no fsync of a directory). A rename
/// there is durable as far as the brick's filesystem makes it (its journal) whatever the client
/// does, and survives the loss of a brick through replication. Everywhere else (local
/// filesystems, NFS, CephFS, whose MDS answers a directory's fsync once its journal holds the
/// rename) it is kept.
pub(crate) fn syncs_directories(fs_type: &str) -> bool {
    fs_type != "fuse.glusterfs"
}

fn spare_name(name: &OsStr) -> OsString {
    let mut spare = OsString::from(".");
    spare.push(name);
    spare.push(".tmp");
    spare
}

fn is_stale(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ESTALE))
}

/// What a file type is called in messages.
pub(crate) fn type_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// Opens `rel` beneath `root` one component at a time, never following a symbolic link: every
/// directory on the way `O_PATH | O_DIRECTORY | O_NOFOLLOW` (a link there fails ENOTDIR), the
/// last with `flags` (which carry `O_NOFOLLOW`: a link there fails ELOOP, or with `O_PATH`
/// opens the link itself, which the caller's type check refuses).
fn walk(root: BorrowedFd<'_>, rel: &Path, flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
    let mut names = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => names.push(n),
            _ => return Err(Errno::INVAL.into()),
        }
    }
    let Some((last, dirs)) = names.split_last() else {
        return Err(Errno::INVAL.into());
    };
    let mut dir: Option<OwnedFd> = None;
    for name in dirs {
        let at = dir.as_ref().map_or(root, |d| d.as_fd());
        let next = rfs::openat(
            at,
            *name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        dir = Some(next);
    }
    let at = dir.as_ref().map_or(root, |d| d.as_fd());
    Ok(rfs::openat(at, *last, flags | OFlags::NOFOLLOW, mode)?)
}

/// The names in the directory open as `dir`, without `.` and `..`.
fn read_names(dir: &OwnedFd) -> std::io::Result<Vec<OsString>> {
    // Through a duplicate of `dir`, from its start: `Dir::read_from` would open the directory
    // again, a round trip to the server on a cluster filesystem (and another to release it).
    let own = dir.try_clone()?;
    rfs::seek(&own, rfs::SeekFrom::Start(0))?;
    let mut names = Vec::new();
    for entry in rfs::Dir::new(own)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`, recursively for a directory, never following a link. Bounded depth:
/// the pool's trees are two levels deep; a deeper one is planted.
fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr, depth: u32) -> std::io::Result<()> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    if depth >= 8 {
        return Err(Errno::LOOP.into());
    }
    let sub = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    for entry in read_names(&sub)? {
        remove_entry(sub.as_fd(), &entry, depth + 1)?;
    }
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Read-only inspection (the admin CLI's `check`) and what `gc` needs to decide on a removal
// ---------------------------------------------------------------------------------------------

/// What a pool entry is, without following a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir,
    File,
    Symlink,
    /// A FIFO, socket or device node: never something loopvol makes.
    Other,
}

impl PoolFs {
    /// What `rel` is (not followed if it is a symbolic link); `None` when it does not exist.
    /// A planted entry on the way to it is an error naming it.
    pub fn entry_kind(&self, rel: &Path) -> Result<Option<EntryKind>> {
        let fd = match self.resolve(rel, OFlags::PATH, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // O_PATH|O_NOFOLLOW opens a symbolic link itself; a link on the way is refused.
            Err(e) => return Err(self.fail(rel, e, "look up")),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        Ok(Some(match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => EntryKind::Dir,
            FileType::RegularFile => EntryKind::File,
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        }))
    }

    /// Whether the regular file `rel` has any data extent (SEEK_DATA finds one).
    pub fn has_data(&self, rel: &Path) -> Result<bool> {
        let fd = self.open_checked(rel, OFlags::RDONLY, Mode::empty(), Kind::File)?;
        match rfs::seek(&fd, rustix::fs::SeekFrom::Data(0)) {
            Ok(_) => Ok(true),
            // Only holes, or an empty file.
            Err(Errno::NXIO) => Ok(false),
            Err(e) => Err(self.fail(rel, e.into(), "look for data in")),
        }
    }

    /// The identity of the file `rel` (any type, not followed); `None` when it does not exist.
    pub fn file_id(&self, rel: &Path) -> Result<Option<FileId>> {
        let fd = match self.resolve(rel, OFlags::PATH, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.fail(rel, e, "look up")),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.fail(rel, e.into(), "stat"))?;
        Ok(Some(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        }))
    }

    /// Size and use of the pool's filesystem, in bytes: (size, used).
    pub fn filesystem_size(&self) -> Result<(u64, u64)> {
        let st =
            rfs::fstatvfs(&self.fd).map_err(|e| self.fail(Path::new(""), e.into(), "statvfs"))?;
        Ok((
            st.f_blocks.saturating_mul(st.f_frsize),
            st.f_blocks
                .saturating_sub(st.f_bfree)
                .saturating_mul(st.f_frsize),
        ))
    }
}

mod stamp;
#[cfg(test)]
pub(crate) use stamp::RACY;
pub(crate) use stamp::{EntryDir, KindDir, Stamp};

#[cfg(test)]
mod tests;
