//! The pool: a directory holding volumes and snapshots, its layout, its locks, its listings, its
//! capacity and the records of the nodes that serve it. Volumes are reached through
//! [`Pool::volume`] (a locked handle); snapshots through the functions in `snapshot`.
//!
//! Layout (stable: both front ends and every release read it):
//! ```text
//! <pool>/volumes/<id>/volume.json, image
//! <pool>/snapshots/<id>/snapshot.json, image
//! <pool>/locks/<kind>-<id>.lock
//! <pool>/staging/<node>/<id>     default staging mounts (FlexVolume node mode)
//! <pool>/trash/                  deletions in progress (rename, then remove)
//! <pool>/nodes/<node>            nodes that serve the pool (registered by their node plugin)
//! <pool>/leases/<node>           their leases (see `nodes`)
//! ```
//! Every file-system access to these entries goes through [`fsops`].

mod capacity;
mod coherence;
pub(crate) mod fsops;
mod index;
mod listing;
pub(crate) mod nodes;
pub(crate) mod watchdog;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host;
pub use crate::host::NodePath;
use crate::ids::{NodeName, SnapshotId, VolumeId};
use crate::lock::{self, LockGuard, LockWait};
use fsops::PoolFs;

pub use capacity::Capacity;
pub(crate) use capacity::Charge;
pub use listing::{BadEntry, Listed, ListedVolume, Page};
pub use nodes::{LeaseSettings, LeaseState, LeaseTerms, NodeInfo, NodeRecord};

/// How a front end runs the pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// This node's name: recorded as a volume's topology (node-local pools) and in holds.
    pub node: NodeName,
    /// The pool is on a filesystem every node mounts: any node may attach any volume, and holds
    /// in the metadata keep a read-write volume on one node at a time.
    pub shared: bool,
    /// How many times the pool's free space may be promised to thin volumes (1.0: never more
    /// than is free).
    pub overcommit: f64,
    pub lock_wait: LockWait,
    /// When not empty, staging and target paths must lie under one of these.
    pub path_prefixes: Vec<PathBuf>,
    /// The node leases of a shared pool (see `pool::nodes`).
    pub lease: LeaseSettings,
}

impl PoolOptions {
    pub fn new(node: NodeName) -> Self {
        PoolOptions {
            node,
            shared: false,
            overcommit: 1.0,
            lock_wait: LockWait::Bounded(Duration::from_secs(60)),
            path_prefixes: Vec::new(),
            lease: LeaseSettings::default(),
        }
    }
}

/// This node's name when none is configured: the host name lower-cased, as kubelet derives its
/// default node name. Both front ends use it, so a volume staged through one is this node's for
/// the other too. `None` when the kernel reports no usable host name.
pub fn default_node_name() -> Option<NodeName> {
    let uts = nix::sys::utsname::uname().ok()?;
    let name = uts.nodename().to_string_lossy().trim().to_lowercase();
    NodeName::parse("host name", name).ok()
}

#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    options: PoolOptions,
    /// Whether the pool answers, as the background work and the requests saw it.
    pub(crate) health: watchdog::PoolHealth,
    /// The other nodes' leases, when this process watches them (a controller).
    pub(crate) leases: nodes::LeaseWatch,
    /// The pool was on GlusterFS when it was opened (see `fsops::syncs_directories`).
    glusterfs: bool,
    /// The filesystem the root was on when the pool was opened (see `fsops::Home`).
    home: Option<fsops::Home>,
    /// What the listings remember between calls, checked against the pool on every use.
    index: index::Index,
    /// Lock files released by this pool's calls, kept open for the next ones.
    pub(crate) open_locks: Arc<lock::OpenLocks>,
}

const SUBDIRS: [&str; 7] = [
    "volumes",
    "snapshots",
    "locks",
    "staging",
    "trash",
    "nodes",
    "leases",
];

/// Where each entry is, relative to the pool root: what the pool-access layer ([`fsops`]) takes.
/// Every path is built from fixed names and typed IDs (one plain component each).
pub(crate) mod layout {
    use std::path::{Path, PathBuf};

    use crate::ids::{NodeName, SnapshotId, VolumeId};

    pub fn volume_dir(id: &VolumeId) -> PathBuf {
        Path::new("volumes").join(id.as_str())
    }
    pub fn volume_meta(id: &VolumeId) -> PathBuf {
        volume_dir(id).join("volume.json")
    }
    pub fn volume_image(id: &VolumeId) -> PathBuf {
        volume_dir(id).join("image")
    }
    /// An image being made (create, copy): committed by a rename to `image`.
    pub fn volume_image_tmp(id: &VolumeId) -> PathBuf {
        volume_dir(id).join("image.tmp")
    }
    pub fn snapshot_dir(id: &SnapshotId) -> PathBuf {
        Path::new("snapshots").join(id.as_str())
    }
    pub fn snapshot_meta(id: &SnapshotId) -> PathBuf {
        snapshot_dir(id).join("snapshot.json")
    }
    pub fn snapshot_image(id: &SnapshotId) -> PathBuf {
        snapshot_dir(id).join("image")
    }
    pub fn snapshot_image_tmp(id: &SnapshotId) -> PathBuf {
        snapshot_dir(id).join("image.tmp")
    }
    /// The lock of volume `id`, which is also the lock of the name that maps to it.
    pub fn volume_lock(id: &VolumeId) -> PathBuf {
        Path::new("locks").join(format!("v-{id}.lock"))
    }
    pub fn snapshot_lock(id: &SnapshotId) -> PathBuf {
        Path::new("locks").join(format!("s-{id}.lock"))
    }
    pub fn node_record(node: &NodeName) -> PathBuf {
        Path::new("nodes").join(node.path_component())
    }
    pub fn lease(node: &NodeName) -> PathBuf {
        Path::new("leases").join(node.path_component())
    }
    /// The lock of a node's claims (its attach limit is counted under it).
    pub fn node_lock(node: &NodeName) -> PathBuf {
        Path::new("locks").join(format!("n-{}.lock", node.path_component()))
    }
    /// Where this node stages volumes for a front end without staging paths of its own.
    pub fn staging_dir(node: &NodeName) -> PathBuf {
        Path::new("staging").join(node.path_component())
    }
    pub fn trash() -> &'static Path {
        Path::new("trash")
    }
}

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
        let root = fsops::canonical_root(path).map_err(pool_err)?;
        if !(options.overcommit >= 1.0 && options.overcommit.is_finite()) {
            return Err(Error::invalid(
                "overcommit",
                format!("{} (must be ≥ 1.0)", options.overcommit),
            ));
        }
        if options.shared {
            options.lease.check()?;
            coherence::check_shared(&root).map_err(pool_err)?;
        }
        let pool = Pool::new(root, options);
        let fs = pool.fs()?;
        for sub in SUBDIRS {
            fs.ensure_dir(Path::new(sub))
                .map_err(|e| pool_err(e.to_string()))?;
        }
        pool.empty_trash(&fs);
        Ok(pool)
    }

    /// Opens an existing pool to read it (the admin CLI): nothing is created, repaired or
    /// emptied. A directory that lacks the layout a front end creates (`volumes/`,
    /// `snapshots/`, `locks/`) is not a loopvol pool, and is refused rather than "repaired".
    pub fn open_existing(path: impl AsRef<Path>, options: PoolOptions) -> Result<Pool> {
        let path = path.as_ref();
        let pool_err = |reason: String| Error::Pool {
            path: path.to_owned(),
            reason,
        };
        if path.as_os_str().is_empty() {
            return Err(pool_err("no pool directory configured".into()));
        }
        let root = fsops::canonical_root(path).map_err(pool_err)?;
        if options.shared {
            coherence::check_shared(&root).map_err(pool_err)?;
        }
        let pool = Pool::new(root, options);
        let fs = pool.fs()?;
        let mut missing = Vec::new();
        for sub in ["volumes", "snapshots", "locks"] {
            if !fs
                .exists(Path::new(sub))
                .map_err(|e| pool_err(e.to_string()))?
            {
                missing.push(format!("{sub}/"));
            }
        }
        if !missing.is_empty() {
            return Err(pool_err(format!(
                "is not a loopvol pool: it has no {} (loopvol-csi and loopvol-flexvolume lay a \
                 pool out when they first open it)",
                missing.join(", ")
            )));
        }
        Ok(pool)
    }

    fn new(root: PathBuf, options: PoolOptions) -> Pool {
        Pool {
            glusterfs: fsops::on_glusterfs(&root),
            home: fsops::Home::of(&root),
            root,
            options,
            health: Default::default(),
            leases: Default::default(),
            index: index::Index::default(),
            open_locks: Default::default(),
        }
    }

    /// The pool root, opened afresh (so a pool remounted under us is seen): every access to an
    /// entry goes through it.
    pub(crate) fn fs(&self) -> Result<PoolFs> {
        PoolFs::open(&self.root)
            .map(|fs| fs.on_glusterfs(self.glusterfs).at_home(self.home))
            .map_err(|e| Error::Pool {
                path: self.root.clone(),
                reason: format!("cannot open it: {e}"),
            })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    pub fn node(&self) -> &NodeName {
        &self.options.node
    }

    pub fn is_shared(&self) -> bool {
        self.options.shared
    }

    /// Resolves a caller's staging or target path and checks it against the pool's rules (see
    /// [`NodePath`]).
    pub fn node_path(&self, what: &'static str, path: impl Into<PathBuf>) -> Result<NodePath> {
        let rules = host::Rules {
            prefixes: &self.options.path_prefixes,
            pool: &self.root,
        };
        NodePath::resolve(what, &path.into(), &rules)
    }

    /// A cheap readiness check (CSI Probe): the pool's layout is still in place and writable.
    /// Reads no volume, so it costs the same with 10 or 10 000 volumes.
    pub fn probe(&self) -> Result<()> {
        let fs = self.fs()?;
        for sub in ["volumes", "snapshots", "locks", "trash"] {
            fs.check_writable_dir(Path::new(sub))
                .map_err(|reason| Error::Pool {
                    path: self.root.clone(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// The image file of a volume (whether or not it exists), as the kernel names it.
    pub fn volume_image(&self, id: &VolumeId) -> PathBuf {
        self.root.join(layout::volume_image(id))
    }

    /// Where a front end without a staging path of its own (FlexVolume node mode) stages a
    /// volume: `staging/<node>/<id>` in the pool, reached through the pool-access layer (a link
    /// planted there is refused), so the prefixes (kubelet's directories) do not apply to it.
    pub fn default_staging_path(&self, id: &VolumeId) -> Result<NodePath> {
        let fs = self.fs()?;
        let dir = layout::staging_dir(&self.options.node);
        fs.ensure_dir(&dir)?;
        let fd = fs.open_dir(&dir)?;
        Ok(NodePath::in_pool_dir(
            fd,
            fs.path(&dir),
            std::ffi::OsStr::new(id.as_str()),
        ))
    }

    /// The volume ID whose image is `image`, if it is one of this pool's volume images.
    pub(crate) fn volume_id_of_image(&self, image: &Path) -> Option<VolumeId> {
        let rel = image.strip_prefix(self.root.join("volumes")).ok()?;
        let mut parts = rel.components();
        let id = parts.next()?.as_os_str().to_str()?;
        let id = VolumeId::try_from(id).ok()?;
        (parts.next()?.as_os_str() == "image" && parts.next().is_none()).then_some(id)
    }

    /// The lock of volume `id`, which is also the lock of the name that maps to it.
    pub(crate) fn lock_volume(&self, id: &VolumeId) -> Result<LockGuard> {
        lock::lock(
            &self.fs()?,
            &self.open_locks,
            &layout::volume_lock(id),
            &layout::volume_dir(id),
            &format!("volume {id}"),
            self.options.lock_wait,
        )
    }

    /// The lock of volume `id`, waiting as `wait` says, if its lock file is there; `None`,
    /// creating nothing, when it is not.
    pub(crate) fn lock_existing_volume(
        &self,
        id: &VolumeId,
        wait: LockWait,
    ) -> Result<Option<LockGuard>> {
        lock::lock_existing(
            &self.fs()?,
            &self.open_locks,
            &layout::volume_lock(id),
            &layout::volume_dir(id),
            &format!("volume {id}"),
            wait,
        )
    }

    /// The lock of volume `id`, waiting as `wait` says rather than as the pool does.
    pub(crate) fn lock_volume_waiting(&self, id: &VolumeId, wait: LockWait) -> Result<LockGuard> {
        lock::lock(
            &self.fs()?,
            &self.open_locks,
            &layout::volume_lock(id),
            &layout::volume_dir(id),
            &format!("volume {id}"),
            wait,
        )
    }

    /// The lock of `node`'s claims (its attach limit is checked under it).
    pub(crate) fn lock_node(&self, node: &NodeName, wait: LockWait) -> Result<LockGuard> {
        lock::lock(
            &self.fs()?,
            &self.open_locks,
            &layout::node_lock(node),
            &layout::node_record(node),
            &format!("the claims of node {node}"),
            wait,
        )
    }

    pub(crate) fn lock_snapshot(&self, id: &SnapshotId) -> Result<LockGuard> {
        lock::lock(
            &self.fs()?,
            &self.open_locks,
            &layout::snapshot_lock(id),
            &layout::snapshot_dir(id),
            &format!("snapshot {id}"),
            self.options.lock_wait,
        )
    }

    /// Removes the directory `dir` (relative to the root) atomically from the listing's point of
    /// view (rename into trash), then deletes it. A crash midway leaves it in trash, emptied at
    /// the next open.
    pub(crate) fn remove_dir_atomically(&self, dir: &Path) -> Result<()> {
        let Some(name) = dir.file_name() else {
            return Ok(());
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let trash = layout::trash().join(format!(
            "{}.{}.{nanos}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let fs = self.fs()?;
        if !fs.rename(dir, &trash)? {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            fs.sync_dir(parent)?;
        }
        // Gone from the pool's point of view once renamed. Another process emptying the trash
        // may be removing the same tree; whatever is left is removed at the next open. A
        // volume's or snapshot's directory holds its image and its record.
        let files: &[&str] = match dir.parent().and_then(Path::to_str) {
            Some("volumes") => &["image", "volume.json"],
            Some("snapshots") => &["image", "snapshot.json"],
            _ => &[],
        };
        if let Err(e) = fs.remove_dir_of(&trash, files) {
            tracing::warn!(path = %fs.path(&trash).display(), error = %e, "left in trash");
        }
        Ok(())
    }

    fn empty_trash(&self, fs: &PoolFs) {
        let names = match fs.list_names(layout::trash()) {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "could not list trash");
                return;
            }
        };
        for name in names {
            let entry = layout::trash().join(name);
            if let Err(e) = fs.remove_tree(&entry) {
                tracing::warn!(path = %fs.path(&entry).display(), error = %e, "could not empty trash");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeName {
        NodeName::try_from(n).unwrap()
    }

    fn pool() -> (tempfile::TempDir, Pool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::new(node("node-a"))).unwrap();
        (dir, pool)
    }

    #[test]
    fn missing_or_non_directory_pool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Pool::open(dir.path().join("nope"), PoolOptions::new(node("n"))).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("nope"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = Pool::open(&file, PoolOptions::new(node("n"))).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(Pool::open("", PoolOptions::new(node("n"))).is_err());
        assert!(!dir.path().join("nope").exists());
        let mut bad = PoolOptions::new(node("n"));
        bad.overcommit = 0.5;
        assert!(Pool::open(dir.path(), bad).is_err());
    }

    /// Looking a volume up takes its lock file when it is there and makes none for an unknown
    /// ID; a lock file left by a volume that is gone is removed by the lookup that finds it.
    #[test]
    fn volume_lookups_make_no_lock_file_and_remove_stale_ones() {
        let (dir, pool) = pool();
        let id = VolumeId::try_from("ghost").unwrap();
        let lock = dir.path().join("locks/v-ghost.lock");
        assert!(pool.find_volume(&id).unwrap().is_none());
        assert!(!lock.exists(), "an unknown ID made a lock file");
        std::fs::write(&lock, b"").unwrap();
        assert_eq!(
            pool.volume(&id).unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
        assert!(!lock.exists(), "a stale lock file stayed");
    }

    #[test]
    fn image_paths_map_back_to_ids() {
        let (_d, pool) = pool();
        let id = VolumeId::try_from("pvc-1").unwrap();
        assert_eq!(pool.volume_id_of_image(&pool.volume_image(&id)), Some(id));
        assert_eq!(pool.volume_id_of_image(Path::new("/tmp/x/image")), None);
        let a = VolumeId::try_from("a").unwrap();
        assert_eq!(
            pool.volume_id_of_image(&pool.root().join(layout::volume_dir(&a)).join("other")),
            None
        );
        assert_eq!(
            pool.volume_id_of_image(&pool.root().join("volumes/.x/image")),
            None
        );
    }

    #[test]
    fn node_names_are_safe_path_components() {
        let (_d, pool) = pool();
        let odd = Pool::open(pool.root(), PoolOptions::new(node("../../etc"))).unwrap();
        let v = VolumeId::try_from("v").unwrap();
        let staging = odd.default_staging_path(&v).unwrap();
        assert!(
            staging.starts_with(pool.root().join("staging"))
                && staging.parent().unwrap().parent() == Some(&pool.root().join("staging")),
            "{}",
            staging.display()
        );
        assert_eq!(
            odd.check_node_registered(&node("../../etc"))
                .unwrap_err()
                .kind(),
            crate::ErrorKind::NotFound
        );
        odd.register_node().unwrap();
        odd.register_node().unwrap();
        pool.check_node_registered(&node("../../etc")).unwrap();
        assert!(pool.check_node_registered(&node("node-a")).is_err());
        assert_eq!(
            std::fs::read_dir(pool.root().join("nodes"))
                .unwrap()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count(),
            1
        );
    }

    #[test]
    fn node_paths_follow_the_pool_rules() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = PoolOptions::new(node("n"));
        options.path_prefixes = vec![PathBuf::from("/var/lib/kubelet")];
        let pool = Pool::open(dir.path(), options).unwrap();
        pool.node_path("target path", "/var/lib/kubelet/pods/x")
            .unwrap();
        for bad in [
            "/tmp/x",
            "relative",
            "/var/lib/kubelet",
            "/etc/x",
            "/var/lib/kubelet/../x",
        ] {
            let err = pool.node_path("target path", bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
            assert!(err.to_string().contains("target path"), "{err}");
        }
    }
}
