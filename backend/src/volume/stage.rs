//! Node side: attach, stage (format when blank, mount), unstage, detach.
//!
//! Every operation is declarative: it reads the kernel's state once, does only the missing
//! steps, and so finishes what a crashed earlier call left half done. What to do with the
//! device (format or not) and how to mount it are decided in `plan`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fs;
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
    /// pool the volume must live on this node.
    fn hold(&mut self, mode: AccessMode) -> Result<()> {
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
        match self.meta.staged.iter_mut().find(|h| h.node == node) {
            Some(h) if *h == hold => return Ok(()),
            Some(h) => *h = hold,
            None => self.meta.staged.push(hold),
        }
        self.save()
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
    /// image if needed (read-only for `ReadOnly`). Every refusal (image missing, another node's
    /// hold, the device in use in the other mode) comes before anything is written, so a refused
    /// call leaves neither a hold nor a device behind. The hold is written before the attach: a
    /// crash in between leaves a hold and no device, never a device no hold accounts for.
    fn hold_and_attach(&mut self, view: &KernelView, mode: AccessMode) -> Result<LoopDevice> {
        let id = self.meta.id.clone();
        let read_only = mode == AccessMode::ReadOnly;
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
        self.hold(mode)?;
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

    /// Attaches the volume as a loop device on this node and returns it (FlexVolume
    /// `waitforattach`; the first step of stage). Idempotent.
    pub fn attach(&mut self, read_only: bool) -> Result<PathBuf> {
        let mode = self.stage_mode(AccessMode::single_node(read_only))?;
        let view = KernelView::read()?;
        Ok(self.hold_and_attach(&view, mode)?.path())
    }

    /// Stages the volume at `staging`: attach, format when blank, mount (for `Access::Block`,
    /// attach only). Idempotent: a repeat with the same arguments finds the work done; a
    /// different volume or mode already at the path is `AlreadyExists`. Never formats a device
    /// that holds anything ([`plan::format_plan`]).
    pub fn stage(
        &mut self,
        staging: &NodePath,
        access: &Access,
        mode: AccessMode,
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
        let dev = self.hold_and_attach(&view, mode)?;
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
        let content = fs::probe(&device)?;
        let decision = plan::format_plan(
            &id,
            &FormatInputs {
                content: &content,
                in_progress: self.meta.formatting,
                requested: *fs_type,
                recorded: self.meta.fs_type,
                read_only,
            },
        );
        let (fs, formatted) = match decision {
            FormatPlan::Use(fs) => (fs, None),
            FormatPlan::Format(fs) => {
                self.format_recorded(&device, fs, fs::format)?;
                (fs, Some(fs))
            }
            FormatPlan::FinishInterruptedFormat(fs) => {
                tracing::warn!(volume = %id, ?content, %fs, "finishing an interrupted format");
                self.format_recorded(&device, fs, fs::reformat_interrupted)?;
                (fs, Some(fs))
            }
            FormatPlan::Refuse(why) => return Err(Error::precondition(why)),
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
        let how = plan::staging_mount(fs, read_only, mount_options);
        mount::mount_fs(&device, &mount_point, fs.as_str(), how.flags, &how.data)?;
        drop(mount_point);
        if grow == GrowPlan::OnlineAfterMount {
            fs::grow_online(fs, &device, staging)?;
        }
        tracing::info!(volume = %id, device = %device.display(), staging = %staging.display(), %fs, read_only, "staged");
        Ok(Staged { device, formatted })
    }

    /// [`Volume::stage`], and when it fails, releases what nothing uses: the loop device and this
    /// node's hold, unless a volume is mounted at `staging` (FlexVolume `mountdevice`: kubelet
    /// never calls `unmountdevice` for a path that did not mount, so a device left attached would
    /// outlive the pod).
    pub fn stage_or_release(
        &mut self,
        staging: &NodePath,
        access: &Access,
        mode: AccessMode,
    ) -> Result<Staged> {
        let err = match self.stage(staging, access, mode) {
            Ok(staged) => return Ok(staged),
            Err(e) => e,
        };
        let id = self.meta.id.clone();
        let volume_there = KernelView::read()
            .map(|view| super::publish::volume_mounted_at(self.pool, &view, staging).is_some())
            .unwrap_or(true);
        if !volume_there {
            match self.detach() {
                Ok(()) => tracing::info!(volume = %id, "stage failed; detached the loop device"),
                Err(undo) => {
                    tracing::info!(volume = %id, error = %undo, "stage failed; loop device left attached")
                }
            }
        }
        Err(err)
    }

    /// Formats `device` with `fs` under a record in the metadata: written before mkfs and cleared
    /// after, so a crash in between is recognised as our own unfinished format.
    fn format_recorded(
        &mut self,
        device: &Path,
        fs: FsType,
        mkfs: fn(&Path, FsType) -> Result<()>,
    ) -> Result<()> {
        self.meta.formatting = Some(fs);
        self.save()?;
        mkfs(device, fs)?;
        self.meta.formatting = None;
        self.meta.fs_type = Some(fs);
        self.save()
    }

    /// Unstages the volume from `staging`: unmounts it and detaches the loop device when nothing
    /// else uses it, then drops this node's hold. Not staged: nothing to do.
    pub fn unstage(&mut self, staging: &NodePath) -> Result<()> {
        let id = self.meta.id.clone();
        let view = KernelView::read()?;
        let devices = view.devices_of(self.image_or_path()?.as_ref());
        let mut unmounted = false;
        if let Some(existing) = view.mount_at(staging) {
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
            mount::unmount(staging)?;
            unmounted = true;
        }
        staging.remove_dir_if_empty();
        // The unmount changed the table (and a stacked mount may remain): look again.
        let after = if unmounted { KernelView::read()? } else { view };
        self.detach_unused(&after, &devices)?;
        self.drop_hold()?;
        tracing::info!(volume = %id, staging = %staging.display(), "unstaged");
        Ok(())
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
        let devices = view.devices_of(self.image_or_path()?.as_ref());
        self.detach_unused(&view, &devices)?;
        self.drop_hold()
    }
}
