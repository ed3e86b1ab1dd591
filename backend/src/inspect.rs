//! Read-only inspection of a pool and of this node's kernel state, for an operator (the admin
//! CLI's `list`, `inspect`, `check`, `metrics`) and for the metrics' gauges: one [`Scan`] reads
//! every entry of the pool once (metadata as committed, without locks, so a scan never waits
//! behind a long stage nor makes one fail) and the kernel once, and says what is inconsistent,
//! why, and what to do ([`Finding`]).
//!
//! [`Pool::collect_garbage`] removes only what a finding marks removable ([`Fix`]), and only
//! after checking again, under the entry's lock where it has one, that it still is: no
//! committed metadata, no data extent in any file (SEEK_DATA), no file attached to a loop
//! device. It never detaches, unmounts or edits metadata: those are the driver's calls to make.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::ids::{NodeName, SnapshotId, VolumeId};
use crate::kernel::{is_device_bind_of, KernelView};
use crate::loopdev::{FileId, LoopDevice};
use crate::meta::{SnapshotMeta, VolumeMeta};
use crate::pool::fsops::{EntryKind, PoolFs};
use crate::pool::{layout, Capacity, Pool};
use crate::validate;
use crate::volume::{AbnormalReason, Condition};

/// A metadata record's spare (`PoolFs::write_json` keeps `.<name>.tmp` beside a record: the
/// space its next write needs, and where an interrupted write was). Metadata, never data.
fn is_metadata_spare(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp") && name.len() > ".tmp".len() + 1
}

/// An image file as the pool holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    /// Its length: the volume's size.
    pub size_bytes: u64,
    /// What the pool's filesystem has allocated for it.
    pub allocated_bytes: u64,
}

/// A loop device on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub path: PathBuf,
    /// Its backing file as the kernel names it.
    pub backing_file: PathBuf,
    pub read_only: bool,
}

/// How a mount uses a volume's loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    /// The device's filesystem (a staging mount, or a bind of one).
    Filesystem,
    /// A bind of the device node itself (a raw block publication).
    DeviceBind,
}

/// A mount on this node that uses a pool device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub device: PathBuf,
    pub fs_type: String,
    pub read_only: bool,
    pub kind: MountKind,
}

/// What a volume is on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VolumeState {
    /// In the pool; nothing of it on this node.
    Created,
    /// A loop device on this node that no hold of this node accounts for.
    Attached,
    /// This node holds it and has its loop device (staged, or attached for a block volume).
    Staged,
    /// Staged, and mounted somewhere besides its staging mount (a workload uses it).
    Published,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Created => "created",
            VolumeState::Attached => "attached",
            VolumeState::Staged => "staged",
            VolumeState::Published => "published",
        }
    }
}

/// One volume, as the pool and this node's kernel see it.
#[derive(Debug, Clone)]
pub struct VolumeReport {
    pub meta: VolumeMeta,
    pub image: Option<ImageInfo>,
    pub devices: Vec<DeviceInfo>,
    pub mounts: Vec<MountInfo>,
    pub state: VolumeState,
    pub condition: Condition,
}

impl VolumeReport {
    /// Whether this node holds it (a staging hold in its metadata).
    pub fn held_by(&self, node: &NodeName) -> bool {
        self.meta.staged.iter().any(|h| h.node == *node)
    }
}

/// One snapshot, as the pool holds it.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub meta: SnapshotMeta,
    pub image: Option<ImageInfo>,
}

/// What kind of inconsistency a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// A loop device backed by a pool file that no hold of this node accounts for.
    UnheldDevice,
    /// A mount of a pool device that no hold of this node accounts for.
    UnexplainedMount,
    /// This node's hold on a volume whose loop device is gone (after a reboot).
    StaleHold,
    /// A volume or snapshot directory without committed metadata (an interrupted create).
    OrphanEntry,
    /// A temp image an interrupted copy left beside a committed one.
    TempFile,
    /// A deletion that was interrupted after it was committed.
    Trash,
    /// A volume whose condition is abnormal.
    AbnormalVolume,
    /// Metadata that cannot be read, or names another entry.
    CorruptMetadata,
    /// Something loopvol never makes where its entries live.
    UnknownEntry,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::UnheldDevice => "unheld-device",
            FindingKind::UnexplainedMount => "unexplained-mount",
            FindingKind::StaleHold => "stale-hold",
            FindingKind::OrphanEntry => "orphan-entry",
            FindingKind::TempFile => "temp-file",
            FindingKind::Trash => "trash",
            FindingKind::AbnormalVolume => "abnormal-volume",
            FindingKind::CorruptMetadata => "corrupt-metadata",
            FindingKind::UnknownEntry => "unknown-entry",
        }
    }
}

/// What `gc` may remove for a finding; it checks again before it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// A volume directory without metadata: removed under the volume's lock.
    VolumeDir(VolumeId),
    /// A snapshot directory without metadata: removed under the snapshot's lock.
    SnapshotDir(SnapshotId),
    /// A temp file in a volume's directory, removed under the volume's lock.
    VolumeTemp(VolumeId, String),
    /// A temp file in a snapshot's directory, removed under the snapshot's lock.
    SnapshotTemp(SnapshotId, String),
    /// An entry of `trash/` (relative to the pool root).
    Trash(PathBuf),
}

/// One inconsistency: what, why, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// What it is about: a path, a device, a volume ID.
    pub subject: String,
    pub volume: Option<VolumeId>,
    pub why: String,
    pub action: String,
    /// What `gc` removes for it; `None`: it is left to the driver or to the operator.
    pub fix: Option<Fix>,
}

/// Size and use of the pool's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesystemUsage {
    pub size_bytes: u64,
    pub used_bytes: u64,
}

/// How far a scan got (for a progress line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub what: &'static str,
    pub done: usize,
    pub total: usize,
}

/// The pool and this node's kernel, read once.
#[derive(Debug, Clone)]
pub struct Scan {
    pub node: NodeName,
    pub root: PathBuf,
    pub capacity: Capacity,
    pub filesystem: FilesystemUsage,
    pub volumes: Vec<VolumeReport>,
    pub snapshots: Vec<SnapshotReport>,
    pub findings: Vec<Finding>,
    pub elapsed: Duration,
}

/// The counts the metrics export, from a [`Scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub capacity: Capacity,
    pub filesystem: FilesystemUsage,
    /// Volumes with committed metadata (the whole pool, every node's).
    pub volumes: u64,
    /// Volumes this node holds and has attached.
    pub staged: u64,
    /// Staged volumes a workload uses (mounted besides the staging mount).
    pub published: u64,
    pub snapshots: u64,
    /// Abnormal volumes by reason; every reason present, 0 when none.
    pub abnormal: BTreeMap<AbnormalReason, u64>,
}

impl Scan {
    /// The counts the metrics export.
    pub fn census(&self) -> Census {
        let mut abnormal: BTreeMap<AbnormalReason, u64> =
            AbnormalReason::ALL.iter().map(|r| (*r, 0)).collect();
        for v in &self.volumes {
            if let Some(r) = v.condition.reason {
                *abnormal.entry(r).or_default() += 1;
            }
        }
        let corrupt = self
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::CorruptMetadata && f.volume.is_some())
            .count();
        *abnormal.entry(AbnormalReason::MetadataCorrupt).or_default() += corrupt as u64;
        let count = |f: &dyn Fn(&VolumeReport) -> bool| -> u64 {
            self.volumes.iter().filter(|v| f(v)).count() as u64
        };
        Census {
            capacity: self.capacity,
            filesystem: self.filesystem,
            volumes: self.volumes.len() as u64 + corrupt as u64,
            staged: count(&|v| matches!(v.state, VolumeState::Staged | VolumeState::Published)),
            published: count(&|v| v.state == VolumeState::Published),
            snapshots: self.snapshots.len() as u64,
            abnormal,
        }
    }

    /// The volume `id`, if the scan found it.
    pub fn volume(&self, id: &VolumeId) -> Option<&VolumeReport> {
        self.volumes.iter().find(|v| v.meta.id == *id)
    }
}

/// What is on the pool's filesystem for one entry directory.
struct EntryFiles {
    /// Regular files by name.
    files: Vec<String>,
    /// Anything else (directories, symlinks, FIFOs) by name.
    other: Vec<String>,
}

fn entry_files(fs: &PoolFs, dir: &Path) -> EntryFiles {
    let mut files = Vec::new();
    let mut other = Vec::new();
    for name in fs.list_names(dir).unwrap_or_default() {
        match fs.entry_kind(&dir.join(&name)) {
            Ok(Some(EntryKind::File)) => files.push(name),
            _ => other.push(name),
        }
    }
    files.sort();
    other.sort();
    EntryFiles { files, other }
}

/// Every file identity in the pool's entries, to find the loop devices bound to them even when
/// the kernel names the file by another path (the pool reached through a bind mount).
#[derive(Default)]
struct PoolFiles {
    by_id: HashMap<FileId, PathBuf>,
}

impl PoolFiles {
    fn add(&mut self, fs: &PoolFs, rel: &Path) {
        if let Ok(Some(id)) = fs.file_id(rel) {
            self.by_id.insert(id, fs.path(rel));
        }
    }
}

/// The image at `rel`, when it is one (a planted entry there is no image: the volume's
/// condition says so).
fn image_info(fs: &PoolFs, rel: &Path) -> Option<ImageInfo> {
    let st = fs.stat_image(rel).ok()??;
    Some(ImageInfo {
        path: fs.path(rel),
        size_bytes: st.len,
        allocated_bytes: st.allocated,
    })
}

fn device_info(d: &LoopDevice) -> DeviceInfo {
    DeviceInfo {
        path: d.path(),
        backing_file: d.backing_file.clone(),
        read_only: d.read_only,
    }
}

fn mounts_of(view: &KernelView, devices: &[LoopDevice]) -> Vec<MountInfo> {
    view.users(devices, &[])
        .into_iter()
        .filter_map(|m| {
            let dev = devices.iter().find(|d| crate::kernel::uses(m, d))?;
            Some(MountInfo {
                mount_point: m.mount_point.clone(),
                device: dev.path(),
                fs_type: m.fs_type.clone(),
                read_only: m.read_only(),
                kind: if is_device_bind_of(m, dev) {
                    MountKind::DeviceBind
                } else {
                    MountKind::Filesystem
                },
            })
        })
        .collect()
}

/// The state of a volume on this node, from its hold and what the kernel shows.
fn state_of(held: bool, devices: &[DeviceInfo], mounts: &[MountInfo]) -> VolumeState {
    if devices.is_empty() {
        return VolumeState::Created;
    }
    if !held {
        return VolumeState::Attached;
    }
    // Staging mounts the filesystem once; every publication is a bind of it (or of the device
    // node): a second use is a workload's.
    let fs_mounts = mounts
        .iter()
        .filter(|m| m.kind == MountKind::Filesystem)
        .count();
    let binds = mounts.len() - fs_mounts;
    if binds > 0 || fs_mounts > 1 {
        VolumeState::Published
    } else {
        VolumeState::Staged
    }
}

/// Why the pool file `rel` may not be removed by `gc`: it has data, is attached, or is not a
/// regular file. `None`: removable.
fn keep_file(fs: &PoolFs, rel: &Path, view: &KernelView) -> Option<String> {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match fs.entry_kind(rel) {
        Ok(None) => return None, // gone already
        Ok(Some(EntryKind::File)) => {}
        Ok(Some(_)) => return Some(format!("{name} is not a regular file")),
        Err(e) => return Some(e.to_string()),
    }
    if let Ok(Some(id)) = fs.file_id(rel) {
        let path = fs.path(rel);
        if let Some(d) = view.loops().iter().find(|d| d.is_backed_by(&path, id)) {
            return Some(format!("{name} is attached as {}", d.path().display()));
        }
    }
    if is_metadata_spare(&name) {
        return None;
    }
    match fs.has_data(rel) {
        Ok(false) => None,
        Ok(true) => Some(format!("{name} holds data")),
        Err(e) => Some(format!("{name} cannot be checked for data: {e}")),
    }
}

/// Why the pool entry `rel` (a directory tree or a file) may not be removed: what [`keep_file`]
/// says of any file in it, or something in it loopvol never makes. `None`: removable.
fn keep_entry(fs: &PoolFs, rel: &Path, view: &KernelView, depth: usize) -> Option<String> {
    match fs.entry_kind(rel) {
        Ok(None) => None,
        Ok(Some(EntryKind::File)) => keep_file(fs, rel, view),
        Ok(Some(EntryKind::Dir)) if depth < 4 => {
            let names = match fs.list_names(rel) {
                Ok(names) => names,
                Err(e) => return Some(e.to_string()),
            };
            names
                .iter()
                .find_map(|n| keep_entry(fs, &rel.join(n), view, depth + 1))
        }
        Ok(Some(_)) => Some(format!(
            "{} is not a regular file or directory",
            fs.path(rel).display()
        )),
        Err(e) => Some(e.to_string()),
    }
}

impl Pool {
    /// Size and use of the pool's filesystem (statvfs of its root).
    pub fn filesystem_usage(&self) -> Result<FilesystemUsage> {
        let (size_bytes, used_bytes) = self.fs()?.filesystem_size()?;
        Ok(FilesystemUsage {
            size_bytes,
            used_bytes,
        })
    }

    /// Reads the whole pool and this node's kernel state once, and lists what is inconsistent.
    /// Takes no lock and changes nothing. `progress` hears how far it got.
    pub fn scan(&self, progress: &mut dyn FnMut(Progress)) -> Result<Scan> {
        let start = Instant::now();
        let fs = self.fs()?;
        let view = KernelView::read()?;
        let node = self.node().clone();
        let mut findings = Vec::new();
        let mut files = PoolFiles::default();

        // Volumes.
        let vol_dir = Path::new("volumes");
        let mut names = fs.list_names(vol_dir)?;
        names.sort();
        let total = names.len();
        let mut metas = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if i % 64 == 0 {
                progress(Progress {
                    what: "volumes",
                    done: i,
                    total,
                });
            }
            let Some(id) = checked_entry::<VolumeId>(&fs, vol_dir, name, &mut findings) else {
                continue;
            };
            let dir = layout::volume_dir(&id);
            let entry = entry_files(&fs, &dir);
            for f in entry.files.iter().filter(|f| !f.ends_with(".json")) {
                files.add(&fs, &dir.join(f));
            }
            match self.read_volume_meta(&id) {
                // Metadata and no image: a create interrupted between committing its metadata
                // and moving its image into place; `image.tmp` *is* the volume's image, and the
                // create's repeat moves it (never a temp file to remove).
                Ok(Some(meta)) if !entry.files.iter().any(|f| f == "image") => metas.push(meta),
                Ok(Some(meta)) => {
                    temp_findings(&fs, &dir, &entry, Some(&id), &mut findings, |n| {
                        Fix::VolumeTemp(id.clone(), n)
                    });
                    metas.push(meta);
                }
                Ok(None) => {
                    findings.push(orphan_finding(&fs, &dir, &entry, &view, Some(&id), || {
                        Fix::VolumeDir(id.clone())
                    }))
                }
                Err(e) => findings.push(Finding {
                    kind: FindingKind::CorruptMetadata,
                    subject: fs.path(&layout::volume_meta(&id)).display().to_string(),
                    volume: Some(id.clone()),
                    why: e.to_string(),
                    action: "read the file: fix it by hand from what the volume is (its image, \
                             `blkid` of it, the PV), or restore it from a backup; the driver \
                             refuses the volume until then"
                        .into(),
                    fix: None,
                }),
            }
        }
        progress(Progress {
            what: "volumes",
            done: total,
            total,
        });

        // Snapshots.
        let snap_dir = Path::new("snapshots");
        let mut names = fs.list_names(snap_dir)?;
        names.sort();
        let mut snapshots = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if i % 64 == 0 {
                progress(Progress {
                    what: "snapshots",
                    done: i,
                    total: names.len(),
                });
            }
            let Some(id) = checked_entry::<SnapshotId>(&fs, snap_dir, name, &mut findings) else {
                continue;
            };
            let dir = layout::snapshot_dir(&id);
            let entry = entry_files(&fs, &dir);
            for f in entry.files.iter().filter(|f| !f.ends_with(".json")) {
                files.add(&fs, &dir.join(f));
            }
            match self.read_snapshot_meta(&id) {
                Ok(Some(meta)) => {
                    temp_findings(&fs, &dir, &entry, None, &mut findings, |n| {
                        Fix::SnapshotTemp(id.clone(), n)
                    });
                    snapshots.push(SnapshotReport {
                        image: image_info(&fs, &layout::snapshot_image(&id)),
                        meta,
                    });
                }
                Ok(None) => findings.push(orphan_finding(&fs, &dir, &entry, &view, None, || {
                    Fix::SnapshotDir(id.clone())
                })),
                Err(e) => findings.push(Finding {
                    kind: FindingKind::CorruptMetadata,
                    subject: fs.path(&layout::snapshot_meta(&id)).display().to_string(),
                    volume: None,
                    why: e.to_string(),
                    action: "read the file and fix it by hand, or delete the snapshot through \
                             Kubernetes once nothing restores from it"
                        .into(),
                    fix: None,
                }),
            }
        }

        // Each volume on this node.
        let conditions = self.volume_conditions(&metas)?;
        let mut volumes = Vec::with_capacity(metas.len());
        let mut explained: Vec<u32> = Vec::new();
        for (meta, condition) in metas.into_iter().zip(conditions) {
            let image = image_info(&fs, &layout::volume_image(&meta.id));
            let kernel_image = self.image_of(&meta.id).ok().flatten();
            let loops = view.devices_of(kernel_image.as_ref());
            let devices: Vec<DeviceInfo> = loops.iter().map(device_info).collect();
            let mounts = mounts_of(&view, &loops);
            let held = meta.staged.iter().any(|h| h.node == node);
            let state = state_of(held, &devices, &mounts);
            explained.extend(loops.iter().map(|d| d.number));
            let id = meta.id.clone();
            if state == VolumeState::Attached {
                for (d, l) in devices.iter().zip(&loops) {
                    unheld_device(
                        &mut findings,
                        &view,
                        l,
                        Some(&id),
                        &format!(
                            "{} is bound to the image of volume {id}, but node {node} holds no \
                             staging of it",
                            d.path.display()
                        ),
                    );
                }
            }
            if condition.abnormal {
                findings.push(abnormal_finding(&id, &node, &condition));
            }
            volumes.push(VolumeReport {
                meta,
                image,
                devices,
                mounts,
                state,
                condition,
            });
        }

        // Loop devices bound to pool files that are no volume's image.
        let root = self.root();
        for d in view.loops() {
            if explained.contains(&d.number) {
                continue;
            }
            let named = Path::new(
                d.backing_file
                    .to_string_lossy()
                    .trim_end_matches(" (deleted)"),
            )
            .starts_with(root);
            let known = files
                .by_id
                .iter()
                .find(|(id, path)| d.is_backed_by(path, **id))
                .map(|(_, p)| p.clone());
            if !named && known.is_none() {
                continue;
            }
            let file = known.unwrap_or_else(|| d.backing_file.clone());
            unheld_device(
                &mut findings,
                &view,
                d,
                None,
                &format!(
                    "{} is bound to {}, which is no volume's image",
                    d.path().display(),
                    file.display()
                ),
            );
        }

        // Trash.
        let mut trash = fs.list_names(layout::trash())?;
        trash.sort();
        for name in trash {
            let rel = layout::trash().join(name);
            let keep = keep_entry(&fs, &rel, &view, 0);
            findings.push(Finding {
                kind: FindingKind::Trash,
                subject: fs.path(&rel).display().to_string(),
                volume: None,
                why: "a deletion was committed (moved to trash) but not finished".into(),
                action: match &keep {
                    None => "`loopvol gc --yes` removes it (so does the next start of the driver)"
                        .into(),
                    Some(why) => format!(
                        "{why}: gc leaves it; the next start of loopvol-csi (or any FlexVolume \
                         call) finishes the deletion, or remove it by hand once nothing uses it"
                    ),
                },
                fix: keep.is_none().then(|| Fix::Trash(rel.clone())),
            });
        }
        findings.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));

        Ok(Scan {
            node,
            root: root.to_owned(),
            capacity: self.capacity()?,
            filesystem: self.filesystem_usage()?,
            volumes,
            snapshots,
            findings,
            elapsed: start.elapsed(),
        })
    }

    /// Removes what the findings of `scan` mark removable ([`Fix`]), each checked again first
    /// (under its entry's lock where it has one, when `apply`). With `apply` false, only says
    /// what it would do, and takes no lock. Never waits for a lock: a busy entry is skipped.
    pub fn collect_garbage(&self, scan: &Scan, apply: bool) -> Result<Vec<GcOutcome>> {
        let fs = self.fs()?;
        let view = KernelView::read()?;
        let mut out = Vec::new();
        for f in &scan.findings {
            let Some(fix) = &f.fix else { continue };
            let (rel, result) = self.fix(&fs, fix, &view, apply);
            out.push(GcOutcome {
                kind: f.kind,
                path: fs.path(&rel),
                result,
            });
        }
        Ok(out)
    }

    fn fix(&self, fs: &PoolFs, fix: &Fix, view: &KernelView, apply: bool) -> (PathBuf, GcResult) {
        let skip = |why: String| GcResult::Skipped(why);
        match fix {
            Fix::VolumeDir(id) => {
                let dir = layout::volume_dir(id);
                let result = (|| {
                    // A dry run takes no lock (it must not even make a lock file).
                    let _guard = match apply {
                        true => Some(self.lock_volume(id).map_err(|e| skip(e.to_string()))?),
                        false => None,
                    };
                    if fs.exists(&layout::volume_meta(id)).unwrap_or(true) {
                        return Err(skip("it has metadata now".into()));
                    }
                    self.remove_checked_tree(fs, &dir, view, apply)
                })();
                (dir, result.unwrap_or_else(|r| r))
            }
            Fix::SnapshotDir(id) => {
                let dir = layout::snapshot_dir(id);
                let result = (|| {
                    let _guard = match apply {
                        true => Some(self.lock_snapshot(id).map_err(|e| skip(e.to_string()))?),
                        false => None,
                    };
                    if fs.exists(&layout::snapshot_meta(id)).unwrap_or(true) {
                        return Err(skip("it has metadata now".into()));
                    }
                    self.remove_checked_tree(fs, &dir, view, apply)
                })();
                (dir, result.unwrap_or_else(|r| r))
            }
            Fix::VolumeTemp(id, name) => {
                let rel = layout::volume_dir(id).join(name);
                let result = match apply.then(|| self.lock_volume(id)).transpose() {
                    Ok(_guard) => remove_checked_file(fs, &rel, view, apply),
                    Err(e) => skip(e.to_string()),
                };
                (rel, result)
            }
            Fix::SnapshotTemp(id, name) => {
                let rel = layout::snapshot_dir(id).join(name);
                let result = match apply.then(|| self.lock_snapshot(id)).transpose() {
                    Ok(_guard) => remove_checked_file(fs, &rel, view, apply),
                    Err(e) => skip(e.to_string()),
                };
                (rel, result)
            }
            Fix::Trash(rel) => {
                let result = match keep_entry(fs, rel, view, 0) {
                    Some(why) => skip(why),
                    None if !apply => GcResult::WouldRemove,
                    None => match fs.remove_tree(rel) {
                        Ok(()) => GcResult::Removed,
                        Err(e) => skip(format!("cannot remove it: {e}")),
                    },
                };
                (rel.clone(), result)
            }
        }
    }

    /// Removes the entry directory `dir` (the caller holds its lock) when nothing in it has
    /// data or is attached.
    fn remove_checked_tree(
        &self,
        fs: &PoolFs,
        dir: &Path,
        view: &KernelView,
        apply: bool,
    ) -> std::result::Result<GcResult, GcResult> {
        if let Some(why) = keep_entry(fs, dir, view, 0) {
            return Err(GcResult::Skipped(why));
        }
        if !apply {
            return Ok(GcResult::WouldRemove);
        }
        self.remove_dir_atomically(dir)
            .map(|()| GcResult::Removed)
            .map_err(|e| GcResult::Skipped(format!("cannot remove it: {e}")))
    }
}

fn remove_checked_file(fs: &PoolFs, rel: &Path, view: &KernelView, apply: bool) -> GcResult {
    if let Some(why) = keep_file(fs, rel, view) {
        return GcResult::Skipped(why);
    }
    if !apply {
        return GcResult::WouldRemove;
    }
    match fs.unlink(rel) {
        Ok(()) => GcResult::Removed,
        Err(e) => GcResult::Skipped(format!("cannot remove it: {e}")),
    }
}

/// What `gc` did (or would do) about one finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOutcome {
    pub kind: FindingKind,
    pub path: PathBuf,
    pub result: GcResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcResult {
    /// Dry run: it would be removed.
    WouldRemove,
    Removed,
    /// Left alone, and why.
    Skipped(String),
}

/// The ID of the entry `name` under `kind` (`volumes` or `snapshots`), or an unknown-entry
/// finding when it is not a directory with a valid ID for a name.
fn checked_entry<I: for<'a> TryFrom<&'a str>>(
    fs: &PoolFs,
    kind: &Path,
    name: &str,
    findings: &mut Vec<Finding>,
) -> Option<I> {
    let rel = kind.join(name);
    let unknown = |why: String| Finding {
        kind: FindingKind::UnknownEntry,
        subject: fs.path(&rel).display().to_string(),
        volume: None,
        why,
        action: "loopvol never makes it and ignores it; look at what it is and remove it by \
                 hand if nothing needs it (gc never removes what it does not know)"
            .into(),
        fix: None,
    };
    let kind = kind.display();
    if validate::check_id("id", name).is_err() {
        findings.push(unknown(format!("{name:?} in {kind}/ is not a valid ID")));
        return None;
    }
    match fs.entry_kind(&rel) {
        Ok(Some(EntryKind::Dir)) => {}
        Ok(Some(k)) => {
            findings.push(unknown(format!(
                "{kind}/{name} is a {} where loopvol keeps directories",
                match k {
                    EntryKind::File => "file",
                    EntryKind::Symlink => "symbolic link",
                    _ => "special file",
                }
            )));
            return None;
        }
        Ok(None) => return None, // removed meanwhile
        Err(e) => {
            findings.push(unknown(e.to_string()));
            return None;
        }
    }
    I::try_from(name).ok()
}

/// Temp images in a committed entry's directory (an interrupted copy's; a committed entry never
/// keeps one). Metadata spares are not findings: the pool-access layer keeps them on purpose.
fn temp_findings(
    fs: &PoolFs,
    dir: &Path,
    entry: &EntryFiles,
    volume: Option<&VolumeId>,
    findings: &mut Vec<Finding>,
    fix: impl Fn(String) -> Fix,
) {
    for name in entry.files.iter().filter(|n| n.as_str() == "image.tmp") {
        findings.push(Finding {
            kind: FindingKind::TempFile,
            subject: fs.path(&dir.join(name)).display().to_string(),
            volume: volume.cloned(),
            why: "an interrupted copy left its temp image beside the committed one".into(),
            action: "`loopvol gc --yes` removes it unless it holds data or is attached".into(),
            fix: Some(fix(name.clone())),
        });
    }
}

/// A directory without metadata: removable when nothing in it has data or is attached.
fn orphan_finding(
    fs: &PoolFs,
    dir: &Path,
    entry: &EntryFiles,
    view: &KernelView,
    volume: Option<&VolumeId>,
    fix: impl FnOnce() -> Fix,
) -> Finding {
    let keep = keep_entry(fs, dir, view, 0);
    let holds = if entry.files.is_empty() && entry.other.is_empty() {
        "nothing".to_owned()
    } else {
        [entry.files.clone(), entry.other.clone()]
            .concat()
            .join(", ")
    };
    Finding {
        kind: FindingKind::OrphanEntry,
        subject: fs.path(dir).display().to_string(),
        volume: volume.cloned(),
        why: format!(
            "no committed metadata: a create was interrupted before it finished (it holds {holds})"
        ),
        action: match &keep {
            None => "`loopvol gc --yes` removes it; a repeat of the create makes it again".into(),
            Some(why) => format!(
                "{why}: gc leaves it; look at it (an interrupted clone or restore?) and remove it \
                 by hand once nothing needs it"
            ),
        },
        fix: keep.is_none().then(fix),
    }
}

/// A loop device no hold accounts for, and the mounts of it.
fn unheld_device(
    findings: &mut Vec<Finding>,
    view: &KernelView,
    dev: &LoopDevice,
    volume: Option<&VolumeId>,
    why: &str,
) {
    let mounts = mounts_of(view, std::slice::from_ref(dev));
    findings.push(Finding {
        kind: FindingKind::UnheldDevice,
        subject: dev.path().display().to_string(),
        volume: volume.cloned(),
        why: why.to_owned(),
        action: if mounts.is_empty() {
            format!(
                "nothing mounts it: if no process uses it (`fuser -v {0}`), detach it with \
                 `losetup -d {0}`",
                dev.path().display()
            )
        } else {
            "it is mounted (see the unexplained mounts): find who mounted it, unmount it if no \
             workload uses it, then detach it"
                .into()
        },
        fix: None,
    });
    for m in mounts {
        findings.push(Finding {
            kind: FindingKind::UnexplainedMount,
            subject: m.mount_point.display().to_string(),
            volume: volume.cloned(),
            why: format!(
                "{} is mounted here ({}), but no hold of this node accounts for it",
                m.device.display(),
                m.fs_type
            ),
            action: format!(
                "if no pod uses it, unmount it (`umount {}`)",
                m.mount_point.display()
            ),
            fix: None,
        });
    }
}

fn abnormal_finding(id: &VolumeId, node: &NodeName, c: &Condition) -> Finding {
    let (kind, action) = match c.reason {
        Some(AbnormalReason::DeviceGone) => (
            FindingKind::StaleHold,
            format!(
                "node {node} holds it but nothing is attached (after a reboot): if a pod here \
                 still uses it, kubelet stages it again and the hold is current again; if not, \
                 unstaging it (or, in FlexVolume attach mode, detaching it) clears the hold"
            ),
        ),
        Some(AbnormalReason::ImageMissing) => (
            FindingKind::AbnormalVolume,
            "the data is gone from the pool: restore the image from a backup or a snapshot, \
             or delete the volume"
                .to_owned(),
        ),
        Some(AbnormalReason::FilesystemErrors) => (
            FindingKind::AbnormalVolume,
            "stop its pods, unstage it, then `fsck` its image (attach it with `losetup`)"
                .to_owned(),
        ),
        Some(AbnormalReason::FilesystemReadOnly | AbnormalReason::FilesystemShutdown) => (
            FindingKind::AbnormalVolume,
            "look at the kernel log (`dmesg`): the pool's filesystem or disk may be failing; \
             then stop its pods, unstage and fsck it"
                .to_owned(),
        ),
        Some(
            AbnormalReason::ImageDeletedInUse
            | AbnormalReason::ImageReplacedInUse
            | AbnormalReason::FilesystemAborted
            | AbnormalReason::DeviceUnreadable,
        ) => (
            FindingKind::AbnormalVolume,
            "the message says what to do: copy the data from the loop device it names before \
             unstaging, or unstage and check the filesystem"
                .to_owned(),
        ),
        Some(AbnormalReason::ImageTruncated) => (
            FindingKind::AbnormalVolume,
            "part of the data is gone from the pool: restore the image from a backup or a \
             snapshot, or delete the volume"
                .to_owned(),
        ),
        Some(AbnormalReason::UntrustedEntry) => (
            FindingKind::AbnormalVolume,
            "something was planted where its image belongs: look at it (`ls -l`), move it away, \
             and restore the image"
                .to_owned(),
        ),
        Some(AbnormalReason::Fenced) => (
            FindingKind::AbnormalVolume,
            "this node fenced it (another node may have it now): unpublish and unstage it here"
                .to_owned(),
        ),
        Some(AbnormalReason::PoolNotAnswering) => (
            FindingKind::AbnormalVolume,
            "the pool does not answer: repair its mount (the cluster filesystem's client)"
                .to_owned(),
        ),
        Some(AbnormalReason::MetadataCorrupt) | None => {
            (FindingKind::AbnormalVolume, "see the message".to_owned())
        }
    };
    Finding {
        kind,
        subject: id.to_string(),
        volume: Some(id.clone()),
        why: c.message.clone(),
        action,
        fix: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: &str) -> DeviceInfo {
        DeviceInfo {
            path: PathBuf::from(n),
            backing_file: PathBuf::from("/p/volumes/v/image"),
            read_only: false,
        }
    }

    fn mount(kind: MountKind) -> MountInfo {
        MountInfo {
            mount_point: PathBuf::from("/m"),
            device: PathBuf::from("/dev/loop1"),
            fs_type: "ext4".into(),
            read_only: false,
            kind,
        }
    }

    #[test]
    fn states() {
        use MountKind::*;
        use VolumeState::*;
        let d = || vec![dev("/dev/loop1")];
        // (held, devices, mounts) → state
        crate::table::check(
            [
                ((false, vec![], vec![]), Created),
                ((true, vec![], vec![]), Created),
                ((false, d(), vec![]), Attached),
                ((false, d(), vec![mount(Filesystem)]), Attached),
                ((true, d(), vec![]), Staged),
                ((true, d(), vec![mount(Filesystem)]), Staged),
                (
                    (true, d(), vec![mount(Filesystem), mount(Filesystem)]),
                    Published,
                ),
                ((true, d(), vec![mount(DeviceBind)]), Published),
            ],
            |(held, devices, mounts)| state_of(*held, devices, mounts),
        );
    }

    #[test]
    fn metadata_temp_names() {
        crate::table::check(
            [
                (".volume.json.tmp", true),
                (".snapshot.json.tmp", true),
                (".node-a.tmp", true),
                ("volume.json", false),
                ("image.tmp", false),
                (".tmp", false),
            ],
            |n| is_metadata_spare(n),
        );
    }
}
