//! Node side: attach, stage (format when blank, mount), unstage, detach.
//!
//! Every operation is declarative: it reads the kernel's state once, does only the missing
//! steps, and so finishes what a crashed earlier call left half done. What to do with the
//! device (format or not) and how to mount it are decided in `plan`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::extents;
use crate::fs;
use crate::host::MountPoint;
use crate::kernel::{is_fs_mount_of, KernelView};
use crate::loopdev::{self, LoopDevice};
use crate::meta::{AccessMode, Hold};
use crate::mount::{self, MountEntry};
use crate::plan::{self, FormatInputs, FormatPlan, GrowPlan};
use crate::pool::{layout, NodePath};
use crate::validate::{self, FsType};

use super::handover::live_holds;
use super::{check_sharing, Volume};
use crate::kernel::boot_id;

/// How a volume is presented to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A filesystem. `fs_type` None: whatever the volume holds or records, else ext4.
    Mount {
        fs_type: Option<FsType>,
        mount_options: Vec<String>,
    },
    /// The raw block device.
    Block,
}

/// What stage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub device: PathBuf,
    /// Set when this call formatted the device.
    pub formatted: Option<FsType>,
}

/// A mount already at `path` is fine only when it is this volume (`ours`) in the asked mode: then
/// the call is a repeat. Anything else is `AlreadyExists`, naming what is there.
pub(super) fn check_existing_mount(
    what: &'static str,
    path: &Path,
    existing: &MountEntry,
    ours: bool,
    id: &crate::VolumeId,
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

impl Volume<'_> {
    /// Refuses (naming them) when mounts other than those at `except` use any of `devices`.
    fn refuse_if_used(
        &self,
        view: &KernelView,
        devices: &[LoopDevice],
        except: &[&Path],
    ) -> Result<()> {
        let users: Vec<String> = view
            .users(devices, except)
            .iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        Err(Error::precondition(format!(
            "volume {} is still mounted at {}; unpublish it first",
            self.meta.id,
            users.join(", ")
        )))
    }

    /// Records this node's staging hold in `mode`, refusing when another node holds the volume
    /// in a mode that cannot share (holds their nodes fenced no longer count). On a node-local
    /// pool the volume must live on this node. With `format`, the same write records that
    /// loopvol is about to format the volume with it (see [`Volume::format_recorded`]).
    fn hold(&mut self, mode: AccessMode, format: Option<FsType>) -> Result<()> {
        let node = self.pool.node().clone();
        let id = &self.meta.id;
        if let Some(local) = self.meta.node.as_ref().filter(|n| **n != node) {
            return Err(Error::precondition(format!(
                "volume {id} lives in the pool of node {local}, not on node {node}"
            )));
        }
        check_sharing(id, &live_holds(&self.meta.staged), &node, mode, "staged")?;
        // The controller's claims count too: a volume published read-write to another node is
        // that node's even before it stages it.
        check_sharing(id, &self.meta.claims, &node, mode, "published")?;
        // Stamped with this boot: once the node boots again, the hold is known to be stale.
        let hold = Hold {
            boot: boot_id().map(str::to_owned),
            ..Hold::new(node.clone(), mode)
        };
        let mut changed = true;
        match self.meta.staged.iter_mut().find(|h| h.node == node) {
            Some(h) if *h == hold => changed = false,
            Some(h) => *h = hold,
            None => self.meta.staged.push(hold),
        }
        if let Some(fs) = format {
            changed |= self.meta.formatting != Some(fs) || self.meta.blank;
            self.meta.formatting = Some(fs);
            self.meta.blank = false;
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }

    fn drop_hold(&mut self) -> Result<()> {
        let before = self.meta.staged.len();
        let node = self.pool.node().clone();
        self.meta.staged.retain(|h| h.node != node);
        if self.meta.staged.len() != before {
            self.save()?;
        }
        Ok(())
    }

    /// Records this node's hold in `mode` and returns the volume's loop device, attaching the
    /// image if needed (read-only for `ReadOnly`). Every refusal (image missing or deleted while
    /// attached, another node's hold, the device in use in the other mode) comes before anything
    /// is written, so a refused call leaves neither a hold nor a device behind. The hold is
    /// written before the attach: a crash in between leaves a hold and no device, never a device
    /// no hold accounts for. `format`: the format this stage has already decided on (recorded
    /// with the hold, in one write).
    fn hold_and_attach(
        &mut self,
        view: &KernelView,
        mode: AccessMode,
        format: Option<FsType>,
    ) -> Result<LoopDevice> {
        let id = self.meta.id.clone();
        let read_only = mode == AccessMode::ReadOnly;
        self.refuse_stale(view)?;
        let Some(image) = self.image()? else {
            return Err(Error::precondition(format!(
                "the image of volume {id} is missing: {}",
                self.image_path().display()
            )));
        };
        let mut reusable = None;
        let mut stale = Vec::new();
        for dev in view.devices_of(Some(&image)) {
            if dev.read_only == read_only && !dev.cut_off {
                reusable = Some(dev);
                continue;
            }
            let users = view.users(std::slice::from_ref(&dev), &[]);
            if let Some(user) = users.first().filter(|_| dev.cut_off) {
                return Err(Error::precondition(format!(
                    "volume {id} was fenced on this node ({} is cut off from its image) and is \
                     still mounted at {}; unstage it first",
                    dev.path().display(),
                    user.mount_point.display()
                )));
            }
            if !users.is_empty() {
                let how = |ro: bool| AccessMode::single_node(ro).describe();
                return Err(Error::precondition(format!(
                    "volume {id} is in use {} as {}; it cannot also be used {}",
                    how(dev.read_only),
                    dev.path().display(),
                    how(read_only),
                )));
            }
            stale.push(dev);
        }
        self.hold(mode, format)?;
        // Left attached in the other mode by an earlier, finished use (or fenced and no longer
        // used): reattach.
        for dev in &stale {
            loopdev::detach(dev)?;
        }
        match reusable {
            Some(dev) => Ok(dev),
            None => {
                // Attached from this descriptor: the image is never re-opened by path.
                let file = self
                    .pool
                    .fs()?
                    .open_image(&layout::volume_image(&id), read_only)?;
                loopdev::attach(&file, &image.path, read_only)
            }
        }
    }

    /// Refuses to use the volume while a loop device on this node is still bound to a former
    /// image of it (deleted or replaced while attached): that device holds the data a workload
    /// wrote, and a new stage would attach whatever file is there now.
    pub(super) fn refuse_stale(&self, view: &KernelView) -> Result<()> {
        let Some(dev) = view.stale_devices_of(&self.image_path()).into_iter().next() else {
            return Ok(());
        };
        Err(Error::precondition(format!(
            "the image of volume {} was deleted or replaced while attached as {} on this node; \
             its data is readable from {} until the volume is unstaged here (copy it first: dd \
             if={} of=<file> bs=4M conv=sparse); unstage it before using the volume again",
            self.meta.id,
            dev.path().display(),
            dev.path().display(),
            dev.path().display(),
        )))
    }

    /// Attaches the volume as a loop device on this node and returns it (FlexVolume
    /// `waitforattach`; the first step of stage). Idempotent.
    pub fn attach(&mut self, read_only: bool) -> Result<PathBuf> {
        let mode = self.stage_mode(AccessMode::single_node(read_only))?;
        let view = KernelView::read()?;
        Ok(self.hold_and_attach(&view, mode, None)?.path())
    }

    /// Records that the volume is used as a raw block device: from now on its content is the
    /// workload's, with no signature loopvol could check, so it is never formatted.
    pub(super) fn record_raw_block(&mut self) -> Result<()> {
        if self.meta.raw_block && !self.meta.blank && self.meta.formatting.is_none() {
            return Ok(());
        }
        self.meta.raw_block = true;
        self.meta.blank = false;
        self.meta.formatting = None;
        self.save()
    }

    /// Stages the volume at `staging`: attach, format when blank, mount (for `Access::Block`,
    /// attach only). Idempotent: a repeat with the same arguments finds the work done; a
    /// different volume or mode already at the path is `AlreadyExists`. Never formats a device
    /// that may hold data ([`plan::format_plan`]). A failure leaves what it did; front ends use
    /// [`Volume::stage_or_release`].
    pub fn stage(
        &mut self,
        staging: &NodePath,
        access: &Access,
        mode: AccessMode,
    ) -> Result<Staged> {
        self.stage_steps(staging, access, mode, &mut StageSteps::default())
    }

    fn stage_steps(
        &mut self,
        staging: &NodePath,
        access: &Access,
        mode: AccessMode,
        done: &mut StageSteps,
    ) -> Result<Staged> {
        let id = self.meta.id.clone();
        if let Access::Mount { mount_options, .. } = access {
            validate::check_mount_options(mount_options)?;
            if mode == AccessMode::MultiNodeWriter {
                return Err(Error::invalid(
                    "access mode",
                    "a filesystem cannot be written by several nodes at once; use a block volume",
                ));
            }
        }
        let mode = self.stage_mode(mode)?;
        let read_only = mode == AccessMode::ReadOnly;
        let view = KernelView::read()?;
        self.refuse_stale(&view)?;
        let existing = view.mount_at(staging);
        // Something else at the staging path (another volume, or this one in the other mode):
        // refuse before recording a hold or attaching, so the refusal leaves nothing behind.
        if let (Access::Mount { .. }, Some(existing)) = (access, existing) {
            let ours = view
                .devices_of(self.image()?.as_ref())
                .iter()
                .any(|d| is_fs_mount_of(existing, d));
            check_existing_mount("staging path", staging, existing, ours, &id, read_only)?;
        }
        let intent = match (access, existing) {
            (Access::Mount { fs_type, .. }, None) => {
                self.format_before_attach(&view, *fs_type, read_only)
            }
            _ => None,
        };
        let dev = self.hold_and_attach(&view, mode, intent)?;
        // Recorded once the device is there and before it is handed out (a refused stage
        // records nothing).
        if *access == Access::Block && !read_only {
            self.record_raw_block()?;
        }
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

        if let Some(existing) = existing {
            // Attaching changed no mount: the view still holds.
            let ours = is_fs_mount_of(existing, &dev);
            check_existing_mount("staging path", staging, existing, ours, &id, read_only)?;
            if let Some(want) = fs_type.filter(|f| f.as_str() != existing.fs_type) {
                return Err(Error::AlreadyExists {
                    what: "staging path",
                    id: staging.display().to_string(),
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
        let (fs, formatted) = match intent {
            // Decided before the attach, and recorded with the hold.
            Some(fs) => {
                self.format_recorded(&device, fs, fs::format, true)?;
                (fs, Some(fs))
            }
            None => self.plan_and_format(&device, *fs_type, read_only)?,
        };

        let device_size = loopdev::device_size(&device)?;
        let fs_size = if formatted.is_none() && !read_only {
            fs::superblock(&device)?.map(|sb| sb.size_bytes)
        } else {
            None
        };
        let grow = plan::grow_plan(fs, formatted.is_some(), read_only, fs_size, device_size);
        if grow == GrowPlan::OfflineBeforeMount {
            fs::grow_ext4_offline(&device)?;
        }
        let mount_point = staging.mkdir_p()?;
        let try_mount = |options: &[String]| {
            let how = plan::staging_mount(fs, read_only, options);
            mount::mount_fs(&device, &mount_point, fs.as_str(), how.flags, &how.data)
        };
        if let Err(e) = try_mount(mount_options) {
            return Err(self.explain_mount_failure(e, fs, mount_options, &try_mount, &mount_point));
        }
        drop(mount_point);
        done.mounted = true;
        if grow == GrowPlan::OnlineAfterMount {
            fs::grow_online(fs, &device, staging)?;
        }
        tracing::info!(volume = %id, device = %device.display(), staging = %staging.display(), %fs, read_only, "staged");
        Ok(Staged { device, formatted })
    }

    /// The filesystem a stage that attaches the device now will format it with, decided before
    /// the attach when the image provably holds nothing: no data extent at all (`SEEK_DATA`), so
    /// the device this call binds reads as zeros and `blkid` can find no signature on it (on a
    /// cluster filesystem `blkid` costs tens of reads through the network, as long as mkfs).
    /// The plan is then the one `blkid`'s "nothing" would give. `None` when the device must be
    /// probed after the attach: something has the image attached on this node already (its
    /// page cache may hold what the image does not yet), the image holds data or its map
    /// cannot tell, or the plan is anything but a format (a refusal then comes, as always,
    /// from what the attached device holds).
    fn format_before_attach(
        &self,
        view: &KernelView,
        requested: Option<FsType>,
        read_only: bool,
    ) -> Option<FsType> {
        let image = self.image().ok()??;
        if !view.devices_of(Some(&image)).is_empty() {
            return None;
        }
        let data_bytes = self.image_data_bytes().filter(|n| *n == 0)?;
        match self.format_decision(&fs::Content::Blank, requested, read_only, Some(data_bytes)) {
            FormatPlan::Format(fs) => Some(fs),
            _ => None,
        }
    }

    /// Probes the attached `device` (blkid, then the image's data map when blkid finds
    /// nothing), decides, and formats when the plan says so. Returns the filesystem to mount
    /// and whether this call made it.
    fn plan_and_format(
        &mut self,
        device: &Path,
        requested: Option<FsType>,
        read_only: bool,
    ) -> Result<(FsType, Option<FsType>)> {
        let content = fs::probe(device)?;
        // The image's extent map is the second witness, asked only when blkid finds nothing.
        let data_bytes = if content == fs::Content::Blank {
            self.image_data_bytes()
        } else {
            None
        };
        match self.format_decision(&content, requested, read_only, data_bytes) {
            FormatPlan::Use(fs) => Ok((fs, None)),
            FormatPlan::Format(fs) => {
                self.format_recorded(device, fs, fs::format, false)?;
                Ok((fs, Some(fs)))
            }
            FormatPlan::FinishInterruptedFormat(fs) => {
                tracing::warn!(volume = %self.meta.id, ?content, %fs, "finishing an interrupted format");
                self.format_recorded(device, fs, fs::reformat_interrupted, false)?;
                Ok((fs, Some(fs)))
            }
            FormatPlan::Refuse(why) => Err(Error::precondition(why)),
        }
    }

    /// [`plan::format_plan`] for what the device holds and the metadata records.
    fn format_decision(
        &self,
        content: &fs::Content,
        requested: Option<FsType>,
        read_only: bool,
        data_bytes: Option<u64>,
    ) -> FormatPlan {
        plan::format_plan(
            &self.meta.id,
            &FormatInputs {
                content,
                in_progress: self.meta.formatting,
                requested,
                recorded: self.meta.fs_type,
                read_only,
                data_bytes,
                recorded_blank: self.meta.blank,
                raw_block: self.meta.raw_block,
                source: self.meta.source.as_ref(),
            },
        )
    }

    /// The bytes of data in the volume's image; `None` when its data map cannot tell: it could
    /// not be read, or the whole image is one data range, which is also what a filesystem
    /// without `SEEK_DATA` support answers (then the metadata's record decides).
    fn image_data_bytes(&self) -> Option<u64> {
        let file = self
            .pool
            .fs()
            .and_then(|fs| fs.open_image(&layout::volume_image(&self.meta.id), true))
            .ok()?;
        let len = file.metadata().ok()?.len();
        match extents::data_bytes(&file) {
            Ok(n) if n == len && len > 0 => None,
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(volume = %self.meta.id, error = %e, "cannot map the image's data");
                None
            }
        }
    }

    /// mount(2) answers EINVAL both for an option the filesystem does not take and for a device
    /// it cannot mount. When the caller gave options, finds out which: mounts without them (and
    /// unmounts again), then with each alone. A caller's option at fault is `InvalidArgument`
    /// naming its key (never its value); anything else is the original error.
    fn explain_mount_failure(
        &self,
        err: Error,
        fs: FsType,
        options: &[String],
        try_mount: &dyn Fn(&[String]) -> Result<()>,
        staging: &MountPoint,
    ) -> Error {
        let einval = matches!(&err, Error::Sys { source, .. } if *source == nix::Error::EINVAL);
        if !einval || options.is_empty() {
            return err;
        }
        let mounts = |opts: &[String]| match try_mount(opts) {
            Ok(()) => mount::unmount_made(staging).map(|()| true),
            Err(_) => Ok(false),
        };
        if !matches!(mounts(&[]), Ok(true)) {
            return err;
        }
        for option in options {
            if matches!(mounts(std::slice::from_ref(option)), Ok(false)) {
                let key = option.split('=').next().unwrap_or(option);
                return Error::invalid(
                    "mount options",
                    format!(
                        "{fs} does not accept mount option {key:?} (mount(2) says EINVAL); \
                         volume {} is not staged",
                        self.meta.id
                    ),
                );
            }
        }
        err
    }

    /// [`Volume::stage`], and when it fails, undoes it: unmounts what it mounted, then detaches
    /// the loop device and drops this node's hold unless something else uses the device.
    /// Kubernetes takes a failed stage for "not staged" and never unstages it, so a leftover
    /// device or hold would outlive the pod and block the volume's deletion. Both front ends
    /// stage through this.
    pub fn stage_or_release(
        &mut self,
        staging: &NodePath,
        access: &Access,
        mode: AccessMode,
    ) -> Result<Staged> {
        let mut done = StageSteps::default();
        let err = match self.stage_steps(staging, access, mode, &mut done) {
            Ok(staged) => return Ok(staged),
            Err(e) => e,
        };
        if let Err(undo) = self.undo_stage(staging, &done) {
            tracing::warn!(volume = %self.meta.id, error = %undo, "stage failed; could not undo all of it");
        }
        Err(err)
    }

    /// Unmounts what the failed stage mounted, then releases the volume's loop device and this
    /// node's hold when no mount uses the device (FlexVolume's `waitforattach` attached it for
    /// this very stage; kubelet calls `unmountdevice` only for a path that mounted).
    fn undo_stage(&mut self, staging: &NodePath, done: &StageSteps) -> Result<()> {
        let id = self.meta.id.clone();
        let mut view = KernelView::read()?;
        let devices = self.devices(&view)?;
        if done.mounted {
            // The mount this stage made: the volume's filesystem on the staging path.
            if let Some(ours) = view
                .mount_on(staging)?
                .filter(|m| devices.iter().any(|d| is_fs_mount_of(m, d)))
            {
                mount::unmount(staging, ours)?;
                view.reread_mounts()?;
            }
            staging.remove_dir_if_empty();
        }
        if !view.users(&devices, &[]).is_empty() {
            return Ok(()); // another stage or publication of the volume uses it
        }
        for dev in &devices {
            loopdev::detach(dev)?;
            tracing::info!(volume = %id, device = %dev.path().display(), "stage failed; detached the loop device");
        }
        self.drop_hold()?;
        Ok(())
    }

    /// Formats `device` with `fs` under a record in the metadata: written before mkfs (with the
    /// hold when `recorded`, else here) and cleared after, so a crash in between is recognised
    /// as our own unfinished format.
    fn format_recorded(
        &mut self,
        device: &Path,
        fs: FsType,
        mkfs: fn(&Path, FsType) -> Result<()>,
        recorded: bool,
    ) -> Result<()> {
        debug_assert!(!recorded || self.meta.formatting == Some(fs));
        if !recorded {
            self.meta.formatting = Some(fs);
            self.meta.blank = false;
            self.save()?;
        }
        mkfs(device, fs)?;
        self.meta.formatting = None;
        self.meta.fs_type = Some(fs);
        self.save()
    }

    /// Unstages the volume from `staging`: unmounts it and detaches the loop device when nothing
    /// else uses it, then drops this node's hold. Not staged: nothing to do. The kernel comes
    /// first and the metadata last; once nothing of the volume is mounted or attached here, the
    /// unstage has happened, and a hold that cannot be dropped (a full pool) is left as a warning:
    /// a stale hold of this node blocks neither a delete nor this node's next stage. Also when
    /// the image was deleted or replaced while staged (its device is still recognised).
    pub fn unstage(&mut self, staging: &NodePath) -> Result<()> {
        let id = self.meta.id.clone();
        let mut view = KernelView::read()?;
        let devices = self.devices(&view)?;
        let mut unmounted = false;
        if let Some(existing) = view.mount_on(staging)? {
            if !devices.iter().any(|d| is_fs_mount_of(existing, d)) {
                return Err(Error::precondition(format!(
                    "{} holds {}, not volume {id}; leaving it alone",
                    staging.display(),
                    existing.source
                )));
            }
            // Still published somewhere: refuse before unmounting anything, so the volume stays
            // staged for its publications (and for new ones).
            self.refuse_if_used(&view, &devices, &[staging])?;
            mount::unmount(staging, existing)?;
            unmounted = true;
        }
        staging.remove_dir_if_empty();
        // The unmount changed the table (and a stacked mount may remain): look again.
        if unmounted {
            view.reread_mounts()?;
        }
        self.detach_unused(&view, &devices)?;
        self.drop_hold_or_warn();
        tracing::info!(volume = %id, staging = %staging.display(), "unstaged");
        Ok(())
    }

    /// Drops this node's hold once the kernel has nothing of the volume here; a failure to
    /// record it is logged, not returned (see [`Volume::unstage`]).
    fn drop_hold_or_warn(&mut self) {
        if let Err(e) = self.drop_hold() {
            tracing::warn!(volume = %self.meta.id, error = %e, "nothing of the volume is left on this node, but its hold could not be dropped from the metadata; it is stale and blocks nothing here");
        }
    }

    /// Detaches each of `devices` once no mount uses any of them; a device still in use stays,
    /// with an error that names its users.
    fn detach_unused(&self, view: &KernelView, devices: &[LoopDevice]) -> Result<()> {
        self.refuse_if_used(view, devices, &[])?;
        for dev in devices {
            loopdev::detach(dev)?;
        }
        Ok(())
    }

    /// Detaches the volume's loop device on this node when nothing mounts it (FlexVolume
    /// `unmountdevice` after the unmount; CSI block unstage) and drops this node's hold.
    pub fn detach(&mut self) -> Result<()> {
        let view = KernelView::read()?;
        let devices = self.devices(&view)?;
        self.detach_unused(&view, &devices)?;
        self.drop_hold_or_warn();
        Ok(())
    }
}

/// What one stage did that its undo must take back beyond the device and the hold.
#[derive(Debug, Default)]
struct StageSteps {
    /// The call mounted the staging path (a later step failed: an online grow).
    mounted: bool,
}
