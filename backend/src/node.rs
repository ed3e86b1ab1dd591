//! Node-side operations: attach, stage (format if blank, mount), unstage, detach. Publishing is
//! in `publish`, growth, usage and health in `health`.
//!
//! Every operation is declarative: it reads the kernel's state (sysfs for loop devices, mountinfo
//! for mounts, the device for its filesystem), does only the missing steps, and so finishes what
//! a crashed earlier call left half done. Every mutation holds the volume's lock.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::error::{Context, Error, Result};
use crate::fs::{self, Content};
use crate::loopdev::{self, LoopDevice};
use crate::meta::{self, AccessMode, Hold, VolumeMeta};
use crate::mount::{self, MountEntry};
use crate::pool::Pool;
use crate::validate::{self, FsType};
use crate::volume::check_sharing;

/// How a volume is presented to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A filesystem. `fs_type` None: whatever the volume was created with, else ext4.
    Mount {
        fs_type: Option<FsType>,
        mount_options: Vec<String>,
    },
    /// The raw block device.
    Block,
}

/// Flags every loopvol mount gets unless the caller's options say otherwise: a volume must not
/// smuggle device nodes or setuid binaries into a pod.
pub(crate) const DEFAULT_FLAGS: MsFlags = MsFlags::MS_NODEV.union(MsFlags::MS_NOSUID);

/// What stage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub device: PathBuf,
    /// Set when this call formatted the device.
    pub formatted: Option<FsType>,
}

/// Volume usage for stats calls.
pub use crate::fs::Usage;

/// A volume's health as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// A filesystem mounted from `dev` (or a bind of one). btrfs reports an anonymous device number
/// in mountinfo, so the source path counts as well as the number.
pub(crate) fn is_loop_mount_of(m: &MountEntry, dev: &LoopDevice) -> bool {
    (m.major == loopdev::LOOP_MAJOR && m.minor == dev.number) || Path::new(&m.source) == dev.path()
}

/// A bind of the device node itself (raw block publish): devtmpfs with the node's name as root.
pub(crate) fn is_device_bind_of(m: &MountEntry, dev: &LoopDevice) -> bool {
    m.fs_type == "devtmpfs" && m.root == Path::new(&format!("/loop{}", dev.number))
}

/// A mount already at `path` is fine only when it is this volume (`ours`) in the asked mode: then
/// the call is a repeat. Anything else is `AlreadyExists`, naming what is there.
pub(crate) fn check_existing_mount(
    what: &'static str,
    path: &Path,
    existing: &MountEntry,
    ours: bool,
    id: &str,
    read_only: bool,
) -> Result<()> {
    let conflict = |detail: String| {
        Err(Error::AlreadyExists {
            what,
            id: path.display().to_string(),
            detail,
        })
    };
    if !ours {
        return conflict(format!(
            "content: it already holds {} ({})",
            existing.source, existing.fs_type
        ));
    }
    if existing.read_only() != read_only {
        let mode = if existing.read_only() {
            "read-only"
        } else {
            "read-write"
        };
        return conflict(format!("mode: volume {id} is mounted there {mode}"));
    }
    Ok(())
}

/// Refuses (naming them) when mounts other than `except` use any of `devices`: a filesystem
/// mount or bind of the volume, or a bind of its device node.
pub(crate) fn refuse_if_used(
    id: &str,
    table: &[MountEntry],
    devices: &[LoopDevice],
    except: Option<&Path>,
) -> Result<()> {
    let users: Vec<String> = table
        .iter()
        .filter(|m| Some(m.mount_point.as_path()) != except)
        .filter(|m| {
            devices
                .iter()
                .any(|d| is_loop_mount_of(m, d) || is_device_bind_of(m, d))
        })
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(Error::precondition(format!(
        "volume {id} is still mounted at {}; unpublish it first",
        users.join(", ")
    )))
}

pub(crate) fn mkdir_p(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(path)
        .context(|| format!("create directory {}", path.display()))
}

pub(crate) fn remove_dir_if_empty(path: &Path) {
    match std::fs::remove_dir(path) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) => {}
        Err(e) => tracing::debug!(path = %path.display(), error = %e, "left directory in place"),
    }
}

impl Pool {
    pub(crate) fn check_node_path(&self, what: &'static str, path: &Path) -> Result<()> {
        validate::check_path(what, path, &self.options().path_prefixes)
    }

    /// Records `node`'s staging hold in the metadata, refusing when another node holds the volume
    /// in a mode that cannot share. On a node-local pool the volume must live on this node.
    fn hold_for_this_node(&self, m: &mut VolumeMeta, mode: AccessMode) -> Result<()> {
        let node = self.node().to_owned();
        if let Some(local) = m.node.as_deref().filter(|n| *n != node) {
            return Err(Error::precondition(format!(
                "volume {} lives in the pool of node {local}, not on node {node}",
                m.id
            )));
        }
        check_sharing(&m.id, &m.staged, &node, mode, "staged")?;
        // The controller's claims count too: a volume published read-write to another node is
        // that node's even before it stages it.
        check_sharing(&m.id, &m.claims, &node, mode, "published")?;
        let hold = Hold {
            node: node.clone(),
            mode,
            pv_name: None,
        };
        match m.staged.iter_mut().find(|h| h.node == node) {
            Some(h) if *h == hold => return Ok(()),
            Some(h) => *h = hold,
            None => m.staged.push(hold),
        }
        meta::write(&self.volume_meta_path(&m.id), m)
    }

    fn drop_hold_for_this_node(&self, m: &mut VolumeMeta) -> Result<()> {
        let before = m.staged.len();
        m.staged.retain(|h| h.node != self.node());
        if m.staged.len() != before {
            meta::write(&self.volume_meta_path(&m.id), m)?;
        }
        Ok(())
    }

    /// Records this node's hold in `mode` and returns the volume's loop device, attaching the
    /// image if needed (read-only for `ReadOnly`). Every refusal (image missing, another node's
    /// hold, the device in use in the other mode) comes before anything is written, so a refused
    /// call leaves neither a hold nor a device behind. The hold is written before the attach: a
    /// crash in between leaves a hold and no device, never a device no hold accounts for.
    fn hold_and_attach(&self, m: &mut VolumeMeta, mode: AccessMode) -> Result<LoopDevice> {
        let id = m.id.clone();
        let read_only = mode == AccessMode::ReadOnly;
        let image = self.volume_image(&id);
        if !image.exists() {
            return Err(Error::precondition(format!(
                "the image of volume {id} is missing: {}",
                image.display()
            )));
        }
        let table = mount::mounts()?;
        let mut reusable = None;
        let mut stale = Vec::new();
        for dev in loopdev::find(&image)? {
            if dev.read_only == read_only {
                reusable = Some(dev);
                continue;
            }
            let in_use = table
                .iter()
                .any(|m| is_loop_mount_of(m, &dev) || is_device_bind_of(m, &dev));
            if in_use {
                let how = |ro: bool| if ro { "read-only" } else { "read-write" };
                return Err(Error::precondition(format!(
                    "volume {id} is in use {} as {}; it cannot also be used {}",
                    how(dev.read_only),
                    dev.path().display(),
                    how(read_only),
                )));
            }
            stale.push(dev);
        }
        self.hold_for_this_node(m, mode)?;
        // Left attached in the other mode by an earlier, finished use: reattach.
        for dev in &stale {
            loopdev::detach(dev)?;
        }
        match reusable {
            Some(dev) => Ok(dev),
            None => loopdev::attach(&image, read_only),
        }
    }

    /// Attaches volume `id` as a loop device on this node and returns it (FlexVolume
    /// `waitforattach`; the first step of stage). Idempotent.
    pub fn attach_volume(&self, id: &str, read_only: bool) -> Result<PathBuf> {
        validate::check_id("volume ID", id)?;
        let _guard = self.lock_volume(id)?;
        let mut m = self.get_volume(id)?;
        let mode = if read_only {
            AccessMode::ReadOnly
        } else {
            AccessMode::SingleNodeWriter
        };
        Ok(self.hold_and_attach(&mut m, mode)?.path())
    }

    /// Stages volume `id` at `staging_path`: attach, format when blank, mount (for `Access::Block`,
    /// attach only). Idempotent: a repeat with the same arguments finds the work done; a different
    /// volume or mode already at the path is `AlreadyExists`. Never formats a device that holds
    /// anything: a filesystem of another type, a partition table or unknown data is refused.
    pub fn stage(
        &self,
        id: &str,
        staging_path: &Path,
        access: &Access,
        read_only: bool,
    ) -> Result<Staged> {
        self.stage_with_mode(
            id,
            staging_path,
            access,
            if read_only {
                AccessMode::ReadOnly
            } else {
                AccessMode::SingleNodeWriter
            },
        )
    }

    /// [`Pool::stage`] with an explicit access mode (multi-node writers for shared block volumes).
    pub fn stage_with_mode(
        &self,
        id: &str,
        staging_path: &Path,
        access: &Access,
        mode: AccessMode,
    ) -> Result<Staged> {
        validate::check_id("volume ID", id)?;
        self.check_node_path("staging path", staging_path)?;
        if let Access::Mount { mount_options, .. } = access {
            validate::check_mount_options(mount_options)?;
            if mode == AccessMode::MultiNodeWriter {
                return Err(Error::invalid(
                    "access mode",
                    "a filesystem cannot be written by several nodes at once; use a block volume",
                ));
            }
        }
        let read_only = mode == AccessMode::ReadOnly;
        let _guard = self.lock_volume(id)?;
        let mut m = self.get_volume(id)?;
        // Something else at the staging path (another volume, or this one in the other mode):
        // refuse before recording a hold or attaching, so the refusal leaves nothing behind.
        if matches!(access, Access::Mount { .. }) {
            let table = mount::mounts()?;
            if let Some(existing) = mount::mount_at(&table, staging_path) {
                let ours = loopdev::find(&self.volume_image(id))?
                    .iter()
                    .any(|d| is_loop_mount_of(existing, d));
                check_existing_mount("staging path", staging_path, existing, ours, id, read_only)?;
            }
        }
        let dev = self.hold_and_attach(&mut m, mode)?;
        let Access::Mount {
            fs_type,
            mount_options,
        } = access
        else {
            return Ok(Staged {
                device: dev.path(),
                formatted: None,
            });
        };

        let table = mount::mounts()?;
        if let Some(existing) = mount::mount_at(&table, staging_path) {
            let ours = is_loop_mount_of(existing, &dev);
            check_existing_mount("staging path", staging_path, existing, ours, id, read_only)?;
            if let Some(want) = fs_type.filter(|f| f.as_str() != existing.fs_type) {
                return Err(Error::AlreadyExists {
                    what: "staging path",
                    id: staging_path.display().to_string(),
                    detail: format!(
                        "filesystem: volume {id} is staged there as {}, asked {want}",
                        existing.fs_type
                    ),
                });
            }
            return Ok(Staged {
                device: dev.path(),
                formatted: None,
            });
        }

        let device = dev.path();
        let mut formatted = None;
        let content = fs::probe(&device)?;
        let fs = match (content, m.formatting) {
            (_, Some(_)) | (Content::Blank, None) if read_only => {
                return Err(Error::precondition(format!(
                    "volume {id} holds no filesystem yet and is staged read-only, so it cannot be formatted"
                )));
            }
            (Content::Blank, _) => {
                let fs = fs_type
                    .or(m.formatting)
                    .or(m.fs_type)
                    .unwrap_or(FsType::Ext4);
                self.format_recorded(&mut m, &device, fs, fs::format)?;
                formatted = Some(fs);
                fs
            }
            // Our own mkfs was interrupted (the record says so): whatever it left is no data.
            (content, Some(interrupted)) => {
                tracing::warn!(volume = %id, ?content, fs = %interrupted, "finishing an interrupted format");
                self.format_recorded(&mut m, &device, interrupted, fs::reformat_interrupted)?;
                formatted = Some(interrupted);
                interrupted
            }
            (Content::Filesystem(found), None) => {
                let have: FsType = found.parse().map_err(|_| {
                    Error::precondition(format!(
                        "volume {id} holds a {found} filesystem, which loopvol does not mount; refusing to touch it"
                    ))
                })?;
                if let Some(want) = fs_type.filter(|w| *w != have) {
                    return Err(Error::precondition(format!(
                        "volume {id} already holds a {have} filesystem; {want} was asked for and the volume will not be reformatted"
                    )));
                }
                have
            }
            (Content::Other(what), None) => {
                return Err(Error::precondition(format!(
                    "volume {id} holds {what}, not a filesystem; refusing to format it"
                )))
            }
        };

        // A grow that could not finish while mounted (ext4 without CAP_SYS_RESOURCE, or a crash)
        // is finished here, before the filesystem is in use.
        let device_size = loopdev::device_size(&device)?;
        let needs_grow = formatted.is_none()
            && !read_only
            && fs::superblock(&device)?
                .is_some_and(|sb| sb.size_bytes + fs::grow_slack(fs) < device_size);
        if needs_grow && fs == FsType::Ext4 {
            fs::grow_ext4_offline(&device)?;
        }

        mkdir_p(staging_path)?;
        let mut options = mount_options.clone();
        if read_only {
            options.push("ro".into());
        }
        let (flags, data) = mount::split_options(DEFAULT_FLAGS, &options);
        let mut data_parts: Vec<&str> = fs::required_mount_data(fs).to_vec();
        if !data.is_empty() {
            data_parts.push(&data);
        }
        if read_only && fs == FsType::Xfs {
            // A read-only loop device cannot replay a dirty log.
            data_parts.push("norecovery");
        }
        mount::mount_fs(
            &device,
            staging_path,
            fs.as_str(),
            flags,
            &data_parts.join(","),
        )?;
        if needs_grow && fs != FsType::Ext4 {
            fs::grow_online(fs, &device, staging_path)?;
        }
        tracing::info!(volume = %id, device = %device.display(), staging = %staging_path.display(), fs = %fs, read_only, "staged");
        Ok(Staged { device, formatted })
    }

    /// Formats `device` with `fs` under a record in the metadata: written before mkfs and cleared
    /// after, so a crash in between is recognised as our own unfinished format.
    fn format_recorded(
        &self,
        m: &mut VolumeMeta,
        device: &Path,
        fs: FsType,
        mkfs: fn(&Path, FsType) -> Result<()>,
    ) -> Result<()> {
        m.formatting = Some(fs);
        meta::write(&self.volume_meta_path(&m.id), m)?;
        mkfs(device, fs)?;
        m.formatting = None;
        m.fs_type = Some(fs);
        meta::write(&self.volume_meta_path(&m.id), m)
    }

    /// Unstages volume `id` from `staging_path`: unmounts it and detaches the loop device when
    /// nothing else uses it. Not staged: nothing to do. Unknown volume: `NotFound`.
    pub fn unstage(&self, id: &str, staging_path: &Path) -> Result<()> {
        validate::check_id("volume ID", id)?;
        self.check_node_path("staging path", staging_path)?;
        let _guard = self.lock_volume(id)?;
        self.unstage_locked(id, staging_path)
    }

    /// [`Pool::unstage`] for a caller that holds the volume's lock.
    pub(crate) fn unstage_locked(&self, id: &str, staging_path: &Path) -> Result<()> {
        let mut m = self.get_volume(id)?;
        let devices = loopdev::find(&self.volume_image(id))?;
        let table = mount::mounts()?;
        if let Some(existing) = mount::mount_at(&table, staging_path) {
            if !devices.iter().any(|d| is_loop_mount_of(existing, d)) {
                return Err(Error::precondition(format!(
                    "{} holds {}, not volume {id}; leaving it alone",
                    staging_path.display(),
                    existing.source
                )));
            }
            // Still published somewhere: refuse before unmounting anything, so the volume stays
            // staged for its publications (and for new ones).
            refuse_if_used(id, &table, &devices, Some(staging_path))?;
            mount::unmount(staging_path)?;
        }
        remove_dir_if_empty(staging_path);
        self.detach_if_unused(id, &devices)?;
        self.drop_hold_for_this_node(&mut m)?;
        tracing::info!(volume = %id, staging = %staging_path.display(), "unstaged");
        Ok(())
    }

    /// Detaches each device no mount uses any more; a device still in use stays, with an error
    /// that names its users.
    fn detach_if_unused(&self, id: &str, devices: &[LoopDevice]) -> Result<()> {
        refuse_if_used(id, &mount::mounts()?, devices, None)?;
        for dev in devices {
            loopdev::detach(dev)?;
        }
        Ok(())
    }

    /// Detaches volume `id`'s loop device on this node when nothing mounts it (FlexVolume
    /// `unmountdevice` after the unmount; CSI block unstage) and drops this node's hold.
    pub fn detach_volume(&self, id: &str) -> Result<()> {
        validate::check_id("volume ID", id)?;
        let _guard = self.lock_volume(id)?;
        let mut m = self.get_volume(id)?;
        self.detach_if_unused(id, &loopdev::find(&self.volume_image(id))?)?;
        self.drop_hold_for_this_node(&mut m)
    }
}
