//! The pool: a directory holding volumes and snapshots, its locks and its capacity.
//!
//! Layout (stable: both front ends and every release read it):
//! ```text
//! <pool>/volumes/<id>/volume.json, image
//! <pool>/snapshots/<id>/snapshot.json, image
//! <pool>/locks/<kind>-<id>.lock
//! <pool>/staging/<node>/<id>     default staging mounts (FlexVolume node mode)
//! <pool>/trash/                  deletions in progress (rename, then remove)
//! <pool>/nodes/<node>            nodes that serve the pool (registered by their node plugin)
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::lock::{self, LockGuard, LockWait};
use crate::meta::{self, SnapshotMeta, VolumeMeta};
use crate::validate;

/// How a front end runs the pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// This node's name: recorded as a volume's topology (node-local pools) and in holds.
    pub node: String,
    /// The pool is on a filesystem every node mounts: any node may attach any volume, and holds
    /// in the metadata keep a read-write volume on one node at a time.
    pub shared: bool,
    /// How many times the pool's free space may be promised to thin volumes (1.0: never more
    /// than is free).
    pub overcommit: f64,
    pub lock_wait: LockWait,
    /// When not empty, staging and target paths must lie under one of these.
    pub path_prefixes: Vec<PathBuf>,
}

impl PoolOptions {
    pub fn new(node: impl Into<String>) -> Self {
        PoolOptions {
            node: node.into(),
            shared: false,
            overcommit: 1.0,
            lock_wait: LockWait::Bounded(Duration::from_secs(60)),
            path_prefixes: Vec::new(),
        }
    }
}

/// This node's name when none is configured: the host name lower-cased, as kubelet derives its
/// default node name. Both front ends use it, so a volume staged through one is this node's for
/// the other too. `None` when the kernel reports no host name.
pub fn default_node_name() -> Option<String> {
    let uts = nix::sys::utsname::uname().ok()?;
    let name = uts.nodename().to_string_lossy().trim().to_lowercase();
    (!name.is_empty()).then_some(name)
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub entries: Vec<T>,
    /// Token for the next page; `None` at the end.
    pub next_token: Option<String>,
}

/// Capacity as the controller reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Free bytes of the pool's filesystem.
    pub free_bytes: u64,
    /// Bytes thin volumes may still write (their size minus what they already allocated).
    pub thin_unallocated_bytes: u64,
    /// What a new volume may still claim: free × overcommit − thin_unallocated, at least 0.
    pub available_bytes: u64,
}

#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    options: PoolOptions,
}

const TOKEN_PREFIX: &str = "after:";

impl Pool {
    /// Opens the pool at `path`, creating its internal layout if needed. The directory itself must
    /// exist: a missing pool is a configuration error, not something to paper over.
    pub fn open(path: impl AsRef<Path>, options: PoolOptions) -> Result<Pool> {
        let path = path.as_ref();
        let pool_err = |reason: String| Error::Pool {
            path: path.to_owned(),
            reason,
        };
        if path.as_os_str().is_empty() {
            return Err(pool_err("no pool directory configured".into()));
        }
        let md = std::fs::metadata(path).map_err(|e| pool_err(format!("cannot use it: {e}")))?;
        if !md.is_dir() {
            return Err(pool_err("is not a directory".into()));
        }
        validate::check_node("node name", &options.node)?;
        if !(options.overcommit >= 1.0 && options.overcommit.is_finite()) {
            return Err(Error::invalid(
                "overcommit",
                format!("{} (must be ≥ 1.0)", options.overcommit),
            ));
        }
        let root = path.canonicalize().map_err(|e| pool_err(e.to_string()))?;
        for sub in ["volumes", "snapshots", "locks", "staging", "trash", "nodes"] {
            let dir = root.join(sub);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(pool_err(format!("create {}: {e}", dir.display()))),
            }
        }
        let pool = Pool { root, options };
        pool.empty_trash();
        Ok(pool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    pub fn node(&self) -> &str {
        &self.options.node
    }

    pub fn is_shared(&self) -> bool {
        self.options.shared
    }

    fn node_record(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(validate::id_for_name(node))
    }

    /// Records that this node serves the pool; a node plugin calls it when it starts. On a shared
    /// pool the controller publishes only to registered nodes, so a typo or a node that never ran
    /// the plugin is `NotFound` instead of a claim nobody will ever use. Idempotent.
    pub fn register_node(&self) -> Result<()> {
        #[derive(serde::Serialize)]
        struct NodeRecord<'a> {
            node: &'a str,
            registered_unix: u64,
        }
        meta::write(
            &self.node_record(&self.options.node),
            &NodeRecord {
                node: &self.options.node,
                registered_unix: meta::now_unix(),
            },
        )
    }

    /// `NotFound` unless `node` has registered with [`Pool::register_node`].
    pub fn check_node_registered(&self, node: &str) -> Result<()> {
        validate::check_node("node", node)?;
        if self.node_record(node).is_file() {
            Ok(())
        } else {
            Err(Error::not_found("node", node))
        }
    }

    /// A cheap readiness check (CSI Probe): the pool's layout is still in place and writable.
    /// Reads no volume, so it costs the same with 10 or 10 000 volumes.
    pub fn probe(&self) -> Result<()> {
        use nix::unistd::{access, AccessFlags};
        for sub in ["volumes", "snapshots", "locks", "trash"] {
            let dir = self.root.join(sub);
            let is_dir = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir());
            if !is_dir {
                return Err(Error::Pool {
                    path: self.root.clone(),
                    reason: format!("{} is missing", dir.display()),
                });
            }
            if let Err(e) = access(&dir, AccessFlags::W_OK | AccessFlags::X_OK) {
                return Err(Error::Pool {
                    path: self.root.clone(),
                    reason: format!("{} is not writable: {e}", dir.display()),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn volume_dir(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(id)
    }
    pub(crate) fn volume_meta_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("volume.json")
    }
    /// The image file of a volume (whether or not it exists).
    pub fn volume_image(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("image")
    }
    pub(crate) fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }
    pub(crate) fn snapshot_meta_path(&self, id: &str) -> PathBuf {
        self.snapshot_dir(id).join("snapshot.json")
    }
    pub(crate) fn snapshot_image(&self, id: &str) -> PathBuf {
        self.snapshot_dir(id).join("image")
    }

    /// Where a front end without a staging path of its own (FlexVolume node mode) stages a volume.
    pub fn default_staging_path(&self, id: &str) -> Result<PathBuf> {
        validate::check_id("volume ID", id)?;
        // A node name is not always a safe path component (`/` is legal in a CSI node ID).
        let node_dir = validate::id_for_name(&self.options.node);
        Ok(self.root.join("staging").join(node_dir).join(id))
    }

    /// The volume ID whose image is `image`, if it is one of this pool's volume images.
    pub(crate) fn volume_id_of_image(&self, image: &Path) -> Option<String> {
        let rel = image.strip_prefix(self.root.join("volumes")).ok()?;
        let mut parts = rel.components();
        let id = parts.next()?.as_os_str().to_str()?.to_owned();
        (parts.next()?.as_os_str() == "image" && parts.next().is_none()).then_some(id)
    }

    pub(crate) fn lock_volume(&self, id: &str) -> Result<LockGuard> {
        lock::lock(
            &self.root.join("locks").join(format!("v-{id}.lock")),
            &format!("volume {id}"),
            self.options.lock_wait,
        )
    }

    pub(crate) fn lock_snapshot(&self, id: &str) -> Result<LockGuard> {
        lock::lock(
            &self.root.join("locks").join(format!("s-{id}.lock")),
            &format!("snapshot {id}"),
            self.options.lock_wait,
        )
    }

    /// Removes a directory atomically from the listing's point of view (rename into trash), then
    /// deletes it. A crash midway leaves it in trash, emptied at the next open.
    pub(crate) fn remove_dir_atomically(&self, dir: &Path) -> Result<()> {
        let Some(name) = dir.file_name() else {
            return Ok(());
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let trash = self.root.join("trash").join(format!(
            "{}.{}.{nanos}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::rename(dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).context(|| format!("move {} to trash", dir.display())),
        }
        if let Some(parent) = dir.parent() {
            meta::sync_dir(parent)?;
        }
        // Gone from the pool's point of view once renamed. Another process emptying the trash
        // may be removing the same tree; whatever is left is removed at the next open.
        if let Err(e) = std::fs::remove_dir_all(&trash) {
            tracing::warn!(path = %trash.display(), error = %e, "left in trash");
        }
        Ok(())
    }

    fn empty_trash(&self) {
        let Ok(entries) = std::fs::read_dir(self.root.join("trash")) else {
            return;
        };
        for entry in entries.flatten() {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not empty trash");
            }
        }
    }

    /// Sorted IDs of the entries under `kind` that have committed metadata.
    fn committed_ids(&self, kind: &str, meta_file: &str) -> Result<Vec<String>> {
        let dir = self.root.join(kind);
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .context(|| format!("read {}", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate::check_id("id", id).is_ok())
            .filter(|id| dir.join(id).join(meta_file).exists())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Pages through sorted `ids`, loading each entry with `load` (entries deleted meanwhile are
    /// skipped). The token names the last ID returned, so deletions between pages lose nothing.
    fn page<T>(
        ids: Vec<String>,
        starting_token: Option<&str>,
        max_entries: usize,
        mut load: impl FnMut(&str) -> Result<Option<T>>,
    ) -> Result<Page<T>> {
        let start = match starting_token.filter(|t| !t.is_empty()) {
            None => 0,
            Some(token) => {
                let after = token
                    .strip_prefix(TOKEN_PREFIX)
                    .filter(|id| validate::check_id("token", id).is_ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            "starting token",
                            format!("{token:?} was not issued by this driver"),
                        )
                    })?;
                ids.partition_point(|id| id.as_str() <= after)
            }
        };
        let max = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries
        };
        let mut entries = Vec::new();
        let mut last = None;
        let mut iter = ids[start..].iter();
        for id in iter.by_ref() {
            if let Some(entry) = load(id)? {
                entries.push(entry);
                last = Some(id.clone());
                if entries.len() == max {
                    break;
                }
            }
        }
        let more = iter.len() > 0;
        Ok(Page {
            entries,
            next_token: if more {
                last.map(|id| format!("{TOKEN_PREFIX}{id}"))
            } else {
                None
            },
        })
    }

    /// Volumes in ID order. `max_entries` 0 means all. An unknown token is `InvalidArgument`
    /// (CSI maps a bad token in a list call to ABORTED).
    pub fn list_volumes(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<VolumeMeta>> {
        let ids = self.committed_ids("volumes", "volume.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            meta::read(&self.volume_meta_path(id))
        })
    }

    /// Snapshots in ID order, optionally only those of `source_volume_id`.
    pub fn list_snapshots(
        &self,
        source_volume_id: Option<&str>,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<SnapshotMeta>> {
        let ids = self.committed_ids("snapshots", "snapshot.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            let m: Option<SnapshotMeta> = meta::read(&self.snapshot_meta_path(id))?;
            Ok(m.filter(|m| source_volume_id.is_none_or(|s| m.source_volume_id == s)))
        })
    }

    /// Free space, what thin volumes may still claim, and what is left to promise.
    pub fn capacity(&self) -> Result<Capacity> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .context(|| format!("statvfs {}", self.root.display()))?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        // An image's length is its volume's size, so one stat per volume tells what it may still
        // claim: no metadata is read, and a create stays cheap in a pool of thousands of volumes.
        let volumes = self.root.join("volumes");
        let mut unallocated: u64 = 0;
        let entries =
            std::fs::read_dir(&volumes).context(|| format!("read {}", volumes.display()))?;
        for entry in entries.flatten() {
            if let Ok(md) = std::fs::metadata(entry.path().join("image")) {
                unallocated += md.len().saturating_sub(md.blocks() * 512);
            }
        }
        let promisable = (free as f64 * self.options.overcommit) as u64;
        Ok(Capacity {
            free_bytes: free,
            thin_unallocated_bytes: unallocated,
            available_bytes: promisable.saturating_sub(unallocated),
        })
    }

    /// Fails with `NoSpace` unless `bytes` more can be promised.
    pub(crate) fn ensure_room(&self, bytes: u64, for_what: &str) -> Result<()> {
        let cap = self.capacity()?;
        if bytes > cap.available_bytes {
            return Err(Error::NoSpace(format!(
                "{for_what} needs {bytes} bytes but the pool {} can promise only {} \
                 ({} free, {} already promised to thin volumes, overcommit {})",
                self.root.display(),
                cap.available_bytes,
                cap.free_bytes,
                cap.thin_unallocated_bytes,
                self.options.overcommit
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (tempfile::TempDir, Pool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::new("node-a")).unwrap();
        (dir, pool)
    }

    #[test]
    fn missing_or_non_directory_pool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Pool::open(dir.path().join("nope"), PoolOptions::new("n")).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("nope"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = Pool::open(&file, PoolOptions::new("n")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(Pool::open("", PoolOptions::new("n")).is_err());
        assert!(!dir.path().join("nope").exists());
    }

    #[test]
    fn paging_is_stable_and_tokens_are_checked() {
        let ids: Vec<String> = (0..7).map(|i| format!("v{i}")).collect();
        let load = |id: &str| Ok(Some(id.to_owned()));
        let p1 = Pool::page(ids.clone(), None, 3, load).unwrap();
        assert_eq!(p1.entries, ["v0", "v1", "v2"]);
        let t = p1.next_token.unwrap();
        let p2 = Pool::page(ids.clone(), Some(&t), 3, load).unwrap();
        assert_eq!(p2.entries, ["v3", "v4", "v5"]);
        // v3 deleted between pages: the next page still starts after v5.
        let mut fewer = ids.clone();
        fewer.retain(|i| i != "v3");
        let p3 = Pool::page(fewer, p2.next_token.as_deref(), 3, load).unwrap();
        assert_eq!(p3.entries, ["v6"]);
        assert_eq!(p3.next_token, None);
        let all = Pool::page(ids.clone(), None, 0, load).unwrap();
        assert_eq!(all.entries.len(), 7);
        assert!(all.next_token.is_none());
        let exact = Pool::page(ids.clone(), None, 7, load).unwrap();
        assert!(exact.next_token.is_none());
        for bad in ["garbage", "after:../x", "after:"] {
            let err = Pool::page(ids.clone(), Some(bad), 3, load).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn image_paths_map_back_to_ids() {
        let (_d, pool) = pool();
        assert_eq!(
            pool.volume_id_of_image(&pool.volume_image("pvc-1"))
                .as_deref(),
            Some("pvc-1")
        );
        assert_eq!(pool.volume_id_of_image(Path::new("/tmp/x/image")), None);
        assert_eq!(
            pool.volume_id_of_image(&pool.volume_dir("a").join("other")),
            None
        );
        assert!(pool.default_staging_path("../x").is_err());
        let odd = Pool::open(pool.root(), PoolOptions::new("../../etc")).unwrap();
        let staging = odd.default_staging_path("v").unwrap();
        assert!(
            staging.starts_with(pool.root().join("staging")),
            "{}",
            staging.display()
        );
        assert!(Pool::open(pool.root(), PoolOptions::new("")).is_err());
        assert_eq!(
            odd.check_node_registered("../../etc").unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
        odd.register_node().unwrap();
        odd.register_node().unwrap();
        pool.check_node_registered("../../etc").unwrap();
        assert!(pool.check_node_registered("node-a").is_err());
    }
}
