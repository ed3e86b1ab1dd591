//! What a listing needs to tell whether an entry changed since it last read it, at the cost of
//! a stat: the [`Stamp`] of a directory or a record, and an entry's files stat'ed from one
//! descriptor of the entry's directory ([`PoolFs::entry_files`]).
//!
//! The rules of the layer hold: no symbolic link is followed (the entry directory is opened with
//! `openat2(RESOLVE_NO_SYMLINKS)`, its files are `statx`'ed `AT_SYMLINK_NOFOLLOW` by name in it),
//! and anything that is not plainly what loopvol makes (a link, a FIFO, an image with other
//! links, an error) is left to the checked slow path, which says what it is. Every stat asks for
//! fresh attributes (`AT_STATX_FORCE_SYNC`): on NFS and FUSE (GlusterFS) the kernel asks the
//! server instead of answering from its attribute cache; local filesystems ignore the flag.

use std::time::{Duration, SystemTime};

use rustix::fs::{Statx, StatxFlags, StatxTimestamp};

use super::*;

/// How long after its last change an entry's stamp stays in doubt. Timestamps have a granularity
/// (a kernel tick on most local filesystems, a second on some), so two changes within one tick
/// can leave equal stamps: a stamp read within this window of its change is not trusted later
/// (git's "racily clean" rule). On a shared pool the timestamp may come from another node's
/// clock: the window also covers the clocks' skew (NTP keeps it to milliseconds).
pub(crate) const RACY: Duration = Duration::from_secs(2);

/// The identity and last change of a file or directory: equal stamps mean the same inode,
/// unchanged since (a write changes its mtime, a rename in a directory the directory's, a link
/// count or mode change the ctime), when the stamp was [settled](Stamp::settled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: (u32, u32),
    ino: u64,
    mode: u16,
    nlink: u32,
    size: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
}

impl Stamp {
    fn of(st: &Statx) -> Stamp {
        let time = |t: StatxTimestamp| (t.tv_sec, t.tv_nsec);
        Stamp {
            dev: (st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mode: st.stx_mode,
            nlink: st.stx_nlink,
            size: st.stx_size,
            mtime: time(st.stx_mtime),
            ctime: time(st.stx_ctime),
        }
    }

    /// Whether the last change was more than [`RACY`] before `read_at`, the time the stat (and
    /// whatever was read with it) was taken. Only a settled stamp may vouch for a copy later: a
    /// second change within the same timestamp tick would leave the stamp as it is.
    pub fn settled(&self, read_at: SystemTime) -> bool {
        let last = self.mtime.max(self.ctime);
        let Ok(secs) = u64::try_from(last.0) else {
            // Before 1970: nothing writes such times but a hand; never trusted.
            return false;
        };
        let changed = Duration::new(secs, last.1.min(999_999_999));
        read_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|now| now.saturating_sub(changed) > RACY)
    }

    /// A stamp for table tests: a regular file changed at `secs` (mtime and ctime).
    #[cfg(test)]
    pub fn changed_at(ino: u64, secs: i64, nanos: u32) -> Stamp {
        Stamp {
            dev: (0, 1),
            ino,
            mode: 0o100_644,
            nlink: 1,
            size: 0,
            mtime: (secs, nanos),
            ctime: (secs, nanos),
        }
    }
}

/// A directory of entries (`volumes/`, `snapshots/`) opened for one listing, with its stamp.
#[derive(Debug)]
pub(crate) struct KindDir {
    fd: OwnedFd,
    rel: PathBuf,
    pub stamp: Stamp,
}

/// An entry's files as one listing saw them, when they are plainly what loopvol makes: the
/// entry a directory, its record a regular file or missing (a create not committed yet), its
/// image a regular file with one link or missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryFiles {
    pub record: Option<Stamp>,
    pub image: Option<ImageStat>,
}

/// `statx` with fresh attributes, never following a link at `name`.
fn statx_fresh(dir: BorrowedFd<'_>, name: &str) -> std::result::Result<Statx, Errno> {
    rfs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_FORCE_SYNC,
        StatxFlags::BASIC_STATS,
    )
}

/// A regular file at `name` in `dir`: `Some(None)` when missing, `None` when it is something
/// else or cannot be stat'ed (the slow path says what).
fn regular_file(dir: BorrowedFd<'_>, name: &str) -> Option<Option<Statx>> {
    match statx_fresh(dir, name) {
        Ok(st) if FileType::from_raw_mode(st.stx_mode.into()) == FileType::RegularFile => {
            Some(Some(st))
        }
        Ok(_) => None,
        Err(Errno::NOENT) => Some(None),
        Err(_) => None,
    }
}

impl PoolFs {
    /// Opens the directory `rel` (`volumes`, `snapshots`) for a listing: read-only (NFS
    /// revalidates a directory on open), with its stamp.
    pub fn open_kind(&self, rel: &Path) -> Result<KindDir> {
        let fd = self.open_dir(rel)?;
        let st = rfs::statx(
            &fd,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC,
            StatxFlags::BASIC_STATS,
        )
        .map_err(|e| self.fail(rel, e.into(), "stat"))?;
        Ok(KindDir {
            fd,
            rel: rel.to_owned(),
            stamp: Stamp::of(&st),
        })
    }

    /// The names in `dir` that are valid UTF-8, in no particular order.
    pub fn kind_names(&self, dir: &KindDir) -> Result<Vec<String>> {
        Ok(read_names(&dir.fd)
            .map_err(|e| self.fail(&dir.rel, e, "read"))?
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect())
    }

    /// The entry `id` in `dir`, opened to stat its files (see [`EntryDir`]); `None` when it is
    /// not a directory (the checked path says what it is). `id` is one plain component (a
    /// validated ID).
    pub fn open_entry(&self, dir: &KindDir, id: &str) -> Option<EntryDir> {
        open_entry(dir, id).map(|fd| EntryDir { fd })
    }

    /// The files `record` and (when given) `image` of the entry `id` in `dir`, from one
    /// descriptor of the entry's directory: three or four system calls, no path walked twice.
    /// `None` when the entry is anything but plain (see [`EntryFiles`]), or cannot be looked at:
    /// the caller takes the checked path, which names what is wrong.
    pub fn entry_files(
        &self,
        dir: &KindDir,
        id: &str,
        record: &str,
        image: Option<&str>,
    ) -> Option<EntryFiles> {
        let entry = self.open_entry(dir, id)?;
        let record = entry.record(record)?;
        let image = match image {
            None => None,
            Some(name) => entry.image(name)?,
        };
        Some(EntryFiles { record, image })
    }
}

/// An entry directory (`volumes/<id>`), opened `O_PATH` without following a link: its files are
/// stat'ed by name in it (`AT_SYMLINK_NOFOLLOW`, fresh attributes), one system call each.
#[derive(Debug)]
pub(crate) struct EntryDir {
    fd: OwnedFd,
}

impl EntryDir {
    /// The stamp of the record `name`: `Some(None)` when missing, `None` when it is not a regular
    /// file (or cannot be stat'ed).
    pub fn record(&self, name: &str) -> Option<Option<Stamp>> {
        Some(regular_file(self.fd.as_fd(), name)?.map(|st| Stamp::of(&st)))
    }

    /// The image `name`, as [`PoolFs::stat_image`] has it when it is a regular file with one
    /// link; `Some(None)` when missing; `None` otherwise (a file shared with another, which the
    /// checked path refuses naming its links, or anything else).
    pub fn image(&self, name: &str) -> Option<Option<ImageStat>> {
        image_at(self.fd.as_fd(), name)
    }
}

/// The entry directory `id` in `dir`, opened `O_PATH`; `None` when it is not a directory.
fn open_entry(dir: &KindDir, id: &str) -> Option<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rfs::openat2(&dir.fd, id, flags, Mode::empty(), resolve_flags()) {
        // One component opened O_NOFOLLOW: openat alone follows no link either.
        Err(Errno::NOSYS) => rfs::openat(&dir.fd, id, flags, Mode::empty()),
        other => other,
    }
    .ok()
}

/// The image `name` in the entry directory `entry`, as [`PoolFs::stat_image`] has it when it is
/// a regular file with one link; `Some(None)` when missing; `None` otherwise (a file shared with
/// another, which the checked path refuses naming its links, or anything else).
fn image_at(entry: BorrowedFd<'_>, name: &str) -> Option<Option<ImageStat>> {
    match regular_file(entry, name)? {
        None => Some(None),
        Some(st) if st.stx_nlink != 1 => None,
        Some(st) => Some(Some(ImageStat {
            len: st.stx_size,
            allocated: st.stx_blocks.saturating_mul(512),
            id: FileId {
                dev: rfs::makedev(st.stx_dev_major, st.stx_dev_minor),
                ino: st.stx_ino,
            },
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_settled_only_after_the_racy_window() {
        let at = |secs: u64, nanos: u32| SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        let changed = Stamp::changed_at(1, 1_000, 500);
        crate::table::check(
            [
                (at(1_000, 500), false),
                (at(1_001, 0), false),
                (at(1_002, 500), false),
                (at(1_002, 501), true),
                (at(5_000, 0), true),
                // A change in the future of this node's clock: not settled.
                (at(999, 0), false),
            ],
            |read_at| changed.settled(*read_at),
        );
        // The later of mtime and ctime counts (a link count change moves only ctime).
        let mut linked = changed;
        linked.ctime = (1_010, 0);
        assert!(!linked.settled(at(1_011, 0)));
        assert!(!Stamp::changed_at(1, -5, 0).settled(at(1_000, 0)));
    }
}
