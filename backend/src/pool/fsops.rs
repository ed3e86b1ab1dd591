//! The one way into the pool's files: every read, write, create, rename and removal of a pool
//! entry (metadata, images, entry directories, lock files, trash, node records, listings) goes
//! through these functions, and nothing outside this module calls `std::fs` on a pool path.
//!
//! Path-based for now. Issue 12 re-implements this module relative to a directory descriptor of
//! the pool root (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, file types checked after
//! open, bounded metadata reads) without changing its callers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Context, Error, Result};
use crate::loopdev::FileId;

/// Creates the directory `dir` unless it exists.
pub(crate) fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `dir` and any missing parents.
pub(crate) fn create_dirs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).context(|| format!("create {}", dir.display()))
}

/// Whether `path` exists (a file, a directory, anything).
pub(crate) fn exists(path: &Path) -> bool {
    path.exists()
}

/// Whether `path` is a directory we may write into (a readiness probe).
pub(crate) fn check_writable_dir(dir: &Path) -> std::result::Result<(), String> {
    use nix::unistd::{access, AccessFlags};
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(format!("{} is missing", dir.display()));
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| format!("{} is not writable: {e}", dir.display()))
}

/// Reads a JSON record; `Ok(None)` when the file does not exist. A record that does not parse
/// (or names an invalid ID) is corrupt metadata, naming the file.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context(|| format!("read {}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Metadata {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Replaces `path` with `value` atomically and durably (temp file, fsync, rename, fsync of the
/// directory): a crash leaves the old record or the new one.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::Metadata {
            path: path.to_owned(),
            reason: "not a file in a directory".into(),
        });
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Metadata {
        path: path.to_owned(),
        reason: format!("cannot encode: {e}"),
    })?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .context(|| format!("create {}", tmp.display()))?;
    file.write_all(&json)
        .context(|| format!("write {}", tmp.display()))?;
    file.sync_all()
        .context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename or create in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("fsync {}", dir.display()))
}

/// Opens (creating if needed) the lock file at `path`.
pub(crate) fn open_lock(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .context(|| format!("open lock {}", path.display()))
}

/// Creates the new, empty image file `path` (it must not exist), open for writing.
pub(crate) fn create_image(path: &Path) -> Result<File> {
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .context(|| format!("create {}", path.display()))
}

/// Opens an image for reading, and for writing unless `read_only`.
pub(crate) fn open_image(path: &Path, read_only: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .context(|| format!("open image {}", path.display()))
}

/// An image's length and allocated bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageStat {
    pub len: u64,
    pub allocated: u64,
    pub id: FileId,
}

/// Stats an image; `None` when it does not exist (or cannot be reached).
pub(crate) fn stat_image(path: &Path) -> Option<ImageStat> {
    let md = std::fs::metadata(path).ok()?;
    Some(ImageStat {
        len: md.len(),
        allocated: md.blocks().saturating_mul(512),
        id: FileId {
            dev: md.dev(),
            ino: md.ino(),
        },
    })
}

/// An image's length and how many of its allocated bytes are its own: not shared with another
/// file (a reflinked snapshot or clone), so a write over them needs no new space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageSpace {
    pub len: u64,
    pub own: u64,
}

/// The [`ImageSpace`] of the image at `path`; `None` when it does not exist (or cannot be
/// reached). Where the pool's filesystem cannot share blocks (`shared_blocks` false), its
/// allocated blocks are all its own and no extent map is read.
pub(crate) fn image_space(path: &Path, shared_blocks: bool) -> Option<ImageSpace> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not through a symlink, and no FIFO or device: a link planted in the pool is no image.
    let md = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())?;
    let allocated = md.blocks().saturating_mul(512).min(md.len());
    if !shared_blocks || allocated == 0 {
        return Some(ImageSpace {
            len: md.len(),
            own: allocated,
        });
    }
    let own = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()
        .and_then(|file| crate::extents::own_bytes(&file, md.len()).ok().flatten())
        .unwrap_or(allocated);
    Some(ImageSpace { len: md.len(), own })
}

/// Whether the filesystem holding `dir` may share blocks between files (reflinks) that an extent
/// map can show. ext4 and tmpfs never share; FUSE (GlusterFS) cannot reflink; NFS cannot map
/// extents. Anything else (xfs, btrfs) is asked extent by extent.
pub(crate) fn may_share_blocks(dir: &Path) -> bool {
    use nix::sys::statfs::{
        statfs, EXT4_SUPER_MAGIC, FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC, TMPFS_MAGIC,
    };
    statfs(dir).map_or(true, |st| {
        let t = st.filesystem_type();
        ![EXT4_SUPER_MAGIC, TMPFS_MAGIC, FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC].contains(&t)
    })
}

/// Renames `from` to `to` (committing an image, moving a tree to trash).
pub(crate) fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)
}

/// Removes a tree; what cannot be removed is left for the next attempt.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(path)
}

/// The names of the entries of `dir` that are valid UTF-8, in no particular order.
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)
        .context(|| format!("read {}", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

/// The paths of every entry of `dir`; none when it cannot be read.
pub(crate) fn list_paths(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The size of the filesystem holding `path` and the space available to us on it, in bytes.
#[allow(
    clippy::useless_conversion,
    reason = "fsblkcnt_t and c_ulong are u32 on 32-bit targets"
)]
pub(crate) fn fs_size_and_free(path: &Path) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).context(|| format!("statvfs {}", path.display()))?;
    let frsize = u64::from(st.fragment_size());
    Ok((
        u64::from(st.blocks()).saturating_mul(frsize),
        u64::from(st.blocks_available()).saturating_mul(frsize),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{NodeName, SnapshotId, VolumeId};
    use crate::meta::{AccessMode, Allocation, Hold, VolumeMeta, VolumeSource, SCHEMA_VERSION};
    use crate::validate::FsType;

    #[test]
    fn metadata_round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume.json");
        assert!(read_json::<VolumeMeta>(&path).unwrap().is_none());
        let node = NodeName::try_from("n1").unwrap();
        let meta = VolumeMeta {
            schema: SCHEMA_VERSION,
            id: VolumeId::try_from("v").unwrap(),
            name: "v".into(),
            size_bytes: 1 << 30,
            fs_type: Some(FsType::Xfs),
            allocation: Allocation::Thin,
            source: Some(VolumeSource::Snapshot(SnapshotId::try_from("s").unwrap())),
            node: Some(node.clone()),
            created_unix: 1,
            claims: vec![Hold {
                node,
                mode: AccessMode::ReadOnly,
                pv_name: Some("pv".into()),
            }],
            staged: vec![],
            formatting: None,
            blank: true,
            raw_block: true,
        };
        write_json(&path, &meta).unwrap();
        assert_eq!(read_json::<VolumeMeta>(&path).unwrap().unwrap(), meta);
        assert!(!dir.path().join(".volume.json.tmp").exists());
        // Each corruption is refused naming the file: bad JSON, and IDs that are not IDs.
        let good = std::fs::read_to_string(&path).unwrap();
        let corruptions = [
            "{not json".to_owned(),
            good.replace("\"id\": \"v\"", "\"id\": \"../../x\""),
            good.replace(
                "\"kind\": \"snapshot\",\n    \"id\": \"s\"",
                "\"kind\": \"snapshot\",\n    \"id\": \"a/b\"",
            ),
            good.replace("\"node\": \"n1\"", "\"node\": \"\""),
        ];
        for text in corruptions {
            assert_ne!(text, good, "the corruption did not apply");
            std::fs::write(&path, &text).unwrap();
            let err = read_json::<VolumeMeta>(&path).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("corrupt metadata") && msg.contains("volume.json"),
                "{text}: {msg}"
            );
        }
    }
}
