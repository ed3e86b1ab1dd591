//! A volume, reached through [`Pool::volume`]: a handle that holds the volume's lock and its
//! loaded metadata for as long as it lives. Every operation on a volume is a method of the handle
//! and runs under that one lock, so two steps of one caller (stage then publish, unpublish then
//! release the staging mount, check a path then grow) can never be split by another caller.
//!
//! - this file: the handle, lookups, delete, expansion, allocation and controller claims;
//! - `create`: get-or-create by name;
//! - `stage`: attach, format when blank, mount, and the reverse (node side);
//! - `publish`: binds into workloads' paths, and which volume a path holds;
//! - `health`: filesystem growth on the node, usage and condition;
//! - `handover`: who may have a volume of a shared pool (claims against holds, the attach limit,
//!   the operator's fence);
//! - `fence`: a node cutting its own writes to a volume off, and the node's lease keeper.

mod create;
mod fence;
mod handover;
mod health;
mod publish;
mod stage;

use std::os::fd::AsFd;
use std::path::PathBuf;

use crate::error::{Context, Error, Result};
use crate::ids::{NodeName, VolumeId};
use crate::kernel::{Image, KernelView};
use crate::lock::{LockGuard, LockWait};
use crate::loopdev::{self, FileId, LoopDevice};
use crate::meta::{AccessMode, Allocation, FencedBy, Hold, VolumeMeta};
use crate::pool::{layout, Charge, Pool};
use crate::size::{self, SizeRequest};

pub use create::CreateVolume;
pub use fence::NodeGuard;
pub use handover::{FenceCheck, FenceReport};
pub use health::{AbnormalReason, Condition};
pub use publish::Publish;
pub use stage::{Access, Staged};

/// Result of a controller expansion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    pub size_bytes: u64,
    /// The volume has a filesystem (or will have one), which still has to grow on the node that
    /// stages it.
    pub node_expansion_required: bool,
}

/// A volume whose lock this handle holds, with its metadata as loaded under that lock.
#[derive(Debug)]
pub struct Volume<'p> {
    pool: &'p Pool,
    meta: VolumeMeta,
    _guard: LockGuard,
}

impl Pool {
    /// The volume `id`, locked (`Busy` when the lock cannot be had within the pool's wait).
    /// `NotFound` when it has no metadata; then no lock file is made for it either.
    pub fn volume(&self, id: &VolumeId) -> Result<Volume<'_>> {
        self.find_volume(id)?
            .ok_or_else(|| Error::not_found("volume", id.as_str()))
    }

    /// [`Pool::volume`], with `None` for a volume that does not exist.
    pub fn find_volume(&self, id: &VolumeId) -> Result<Option<Volume<'_>>> {
        // Looked for before the lock, so an unknown ID leaves nothing behind; read again under it.
        self.lock_volume_with(id, self.options().lock_wait)
    }

    /// [`Pool::find_volume`], waiting for the lock as `wait` says.
    pub(crate) fn lock_volume_with(
        &self,
        id: &VolumeId,
        wait: LockWait,
    ) -> Result<Option<Volume<'_>>> {
        if !self.fs()?.exists(&layout::volume_meta(id))? {
            return Ok(None);
        }
        let guard = self.lock_volume_waiting(id, wait)?;
        Ok(self.read_volume_meta(id)?.map(|meta| Volume {
            pool: self,
            meta,
            _guard: guard,
        }))
    }

    /// The volume's committed metadata, read without its lock (a listing or a poll must never
    /// wait behind a long stage). For anything that acts on it: [`Pool::volume`].
    pub fn get_volume(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.read_volume_meta(id)?
            .ok_or_else(|| Error::not_found("volume", id.as_str()))
    }

    /// Deletes a volume. Unknown IDs succeed (deletion is idempotent), and the leftovers of an
    /// interrupted create (a directory without metadata, its image unattached and holding no
    /// data) are removed. A volume in use is refused: see [`Volume::delete`]; so is a directory
    /// without metadata whose image is attached or holds data.
    pub fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let dir = layout::volume_dir(id);
        if !self.fs()?.exists(&dir)? {
            return Ok(());
        }
        let guard = self.lock_volume(id)?;
        match self.read_volume_meta(id)? {
            Some(meta) => Volume {
                pool: self,
                meta,
                _guard: guard,
            }
            .delete(),
            // An interrupted create, or a volume that lost its metadata: the kernel and the
            // image decide (see `discard_leftovers`).
            None => self.discard_leftovers(id),
        }
    }

    /// The volume a claim for PV `pv_name` on `node` was made on (FlexVolume `detach` names only
    /// the PV). The volume named like the PV (kubelet's default volume ID) is looked at first,
    /// alone; only when it is not the one is every record read, and a record that cannot be read
    /// is skipped (with a warning), never a failure: one bad volume must not stop every detach.
    pub fn find_claim_by_pv(&self, pv_name: &str, node: &NodeName) -> Result<Option<VolumeId>> {
        let claimed = |m: &VolumeMeta| {
            m.claims
                .iter()
                .any(|h| h.node == *node && h.pv_name.as_deref() == Some(pv_name))
        };
        if let Ok(id) = VolumeId::for_name(pv_name) {
            match self.read_volume_meta(&id) {
                Ok(Some(m)) if claimed(&m) => return Ok(Some(id)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "skipped while looking for a claim")
                }
            }
        }
        let page = self.list_volumes(None, 0)?;
        Ok(page.entries.into_iter().find(|m| claimed(m)).map(|m| m.id))
    }
}

impl<'p> Volume<'p> {
    pub fn id(&self) -> &VolumeId {
        &self.meta.id
    }

    /// The metadata as loaded under the lock, with every change this handle made.
    pub fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    /// Releases the lock and keeps the metadata.
    pub fn into_meta(self) -> VolumeMeta {
        self.meta
    }

    fn save(&self) -> Result<()> {
        self.pool
            .fs()?
            .write_json(&layout::volume_meta(&self.meta.id), &self.meta)
    }

    fn image_path(&self) -> PathBuf {
        self.pool.volume_image(&self.meta.id)
    }

    /// The image as the kernel knows it; `None` when it is missing. An entry that is not a
    /// volume image (a symbolic link, a device, ...) is an error naming it.
    pub(crate) fn image(&self) -> Result<Option<Image>> {
        self.pool.image_of(&self.meta.id)
    }

    /// [`Volume::image`] for a check that must still run when the image is not a proper one:
    /// then it is known by its path alone (a device bound to it before it was replaced).
    fn image_or_path(&self) -> Result<Option<Image>> {
        match self.image() {
            Err(e @ Error::Untrusted { .. }) => {
                tracing::warn!(volume = %self.meta.id, error = %e, "image is not usable");
                Ok(Some(Image {
                    path: self.image_path(),
                    id: FileId { dev: 0, ino: 0 },
                }))
            }
            other => other,
        }
    }

    /// Every loop device of this volume on this node: bound to its image, or to a former image
    /// deleted or replaced while attached (which still holds the volume's data).
    pub(crate) fn devices(&self, view: &KernelView) -> Result<Vec<LoopDevice>> {
        Ok(view.volume_devices(&self.image_path(), self.image_or_path()?.as_ref()))
    }

    /// Deletes the volume. Refused (`FailedPrecondition`) while its data is in use: attached on
    /// this node (the kernel says so, whatever the metadata says), staged on another node, or
    /// claimed by a node. This node's own staging hold does not count when nothing of the
    /// volume is attached here: it is stale (an unstage that could not record its end, a
    /// reboot), and the delete is what frees the space of a full pool.
    pub fn delete(self) -> Result<()> {
        let id = &self.meta.id;
        let view = KernelView::read()?;
        if let Some(dev) = self.devices(&view)?.first() {
            return Err(Error::precondition(format!(
                "volume {id} is in use on this node: attached as {}; unstage it first",
                view.describe(dev)
            )));
        }
        // This node's own hold goes with it (nothing is attached here: checked above); a node
        // an operator declared down unstages nothing any more.
        let here = self.pool.node();
        let declared_down = |h: &&Hold| {
            h.fenced
                .as_ref()
                .is_some_and(|f| f.by == FencedBy::Operator)
        };
        if let Some(h) = self
            .meta
            .staged
            .iter()
            .find(|h| h.node != *here && !declared_down(h))
        {
            return Err(Error::precondition(format!(
                "volume {id} is staged on node {}; unstage it first",
                h.node
            )));
        }
        if let Some(h) = self.meta.claims.first() {
            return Err(Error::precondition(format!(
                "volume {id} is published to node {}; unpublish it first",
                h.node
            )));
        }
        if self.meta.staged.iter().any(|h| h.node == *here) {
            tracing::info!(volume = %id, node = %here, "nothing attached here: this node's staging hold is stale");
        }
        self.pool.remove_dir_atomically(&layout::volume_dir(id))?;
        tracing::info!(volume = %id, "deleted volume");
        Ok(())
    }

    /// Makes the loop device `dev` of this volume take its image's size now: the size fetched
    /// afresh from the pool's filesystem (a cluster client may cache a size another node changed),
    /// then `LOOP_SET_CAPACITY`.
    fn refresh_capacity(&self, dev: &loopdev::LoopDevice) -> Result<()> {
        let image = self
            .pool
            .fs()?
            .open_image(&layout::volume_image(&self.meta.id), true)?;
        loopdev::refresh_capacity(dev, &image)
    }

    /// Grows the image to what `size` resolves to (never shrinks: a smaller size leaves it as it
    /// is) and, when the volume is attached on this node, tells the loop device. The filesystem
    /// grows separately on the node ([`Volume::node_expand`]).
    pub fn expand(&mut self, size: SizeRequest) -> Result<Expanded> {
        if size.required == 0 {
            return Err(Error::invalid("size", "must be greater than zero"));
        }
        let target = size::for_expansion(&self.meta.id, size, self.meta.size_bytes)?;
        self.grow_image(target)?;
        let view = KernelView::read()?;
        for dev in view.devices_of(self.image()?.as_ref()) {
            self.refresh_capacity(&dev)?;
        }
        Ok(Expanded {
            size_bytes: self.meta.size_bytes,
            node_expansion_required: self.meta.fs_type.is_some(),
        })
    }

    /// Grows the image file to `new_size` (and the recorded size with it); smaller or equal: no
    /// change. The growth is admitted against what the pool can still promise, and the image
    /// grows before the metadata: after a crash the image is at least as large as recorded, and
    /// a repeat finishes the job.
    fn grow_image(&mut self, new_size: u64) -> Result<()> {
        let id = self.meta.id.clone();
        let file = self
            .pool
            .fs()?
            .open_image(&layout::volume_image(&id), false)?;
        let current_len = file
            .metadata()
            .context(|| format!("stat image of {id}"))?
            .len();
        if new_size > current_len {
            let mut admission = self.pool.admission()?;
            admission.admit(
                Charge::new(self.meta.allocation, new_size - current_len),
                &format!("growing volume {id}"),
            )?;
            // Longer is what the next admission sees as this volume's promise.
            file.set_len(new_size)
                .context(|| format!("grow image of {id}"))?;
        }
        if self.meta.allocation == Allocation::Thick {
            allocate_all(&file, &id)?;
        }
        if new_size > current_len {
            file.sync_all().context(|| format!("fsync image of {id}"))?;
        }
        if new_size > self.meta.size_bytes {
            self.meta.size_bytes = new_size;
            self.save()?;
            tracing::info!(volume = %id, size = new_size, "expanded volume");
        }
        Ok(())
    }

    /// Changes how the image is allocated. Thin → thick allocates every block now (so the volume
    /// never needs new space for a write, except where it shares blocks with a snapshot or a
    /// clone, which the pool keeps reserved); thick → thin only changes the accounting (space
    /// already allocated stays allocated until the filesystem discards it). Admitted against
    /// what the pool can still promise: a thick volume is never overcommitted. A repeat after a
    /// failed allocation finishes it.
    pub fn set_allocation(&mut self, allocation: Allocation) -> Result<()> {
        let id = self.meta.id.clone();
        let fs = self.pool.fs()?;
        let image = layout::volume_image(&id);
        let missing = || {
            Error::precondition(format!(
                "the image of volume {id} is missing: {}",
                fs.path(&image).display()
            ))
        };
        if self.meta.allocation != allocation {
            let mut admission = self.pool.admission()?;
            let need = fs
                .image_space(&image, fs.may_share_blocks())?
                .map(|s| s.len.saturating_sub(s.own))
                .ok_or_else(missing)?;
            admission.admit(
                Charge::moving(need, self.meta.allocation, allocation),
                &format!("making volume {id} {}", allocation.as_str()),
            )?;
            // Admission reads the class from the metadata: saved before the lock goes.
            let before = self.meta.allocation;
            self.meta.allocation = allocation;
            if let Err(e) = self.save() {
                self.meta.allocation = before;
                return Err(e);
            }
            drop(admission);
            tracing::info!(volume = %id, allocation = allocation.as_str(), "changed allocation");
        }
        if allocation == Allocation::Thick {
            if fs.stat_image(&image)?.is_none() {
                return Err(missing());
            }
            let file = fs.open_image(&image, false)?;
            allocate_all(&file, &id)?;
        }
        Ok(())
    }

    /// Claims the volume for `node` (CSI ControllerPublish, FlexVolume attach). Idempotent; a
    /// claim by another node that cannot share with `mode` is refused (`FailedPrecondition`), and
    /// so is another node's staging hold until that node provably stopped writing (see
    /// `handover`); a different mode on the same node is `AlreadyExists`; a claim beyond the
    /// node's attach limit is `ResourceExhausted`.
    pub fn claim(
        &mut self,
        node: &NodeName,
        mode: AccessMode,
        pv_name: Option<&str>,
    ) -> Result<()> {
        let id = &self.meta.id;
        if let Some(local) = self.meta.node.as_ref().filter(|n| *n != node) {
            return Err(Error::precondition(format!(
                "volume {id} lives in the pool of node {local} and cannot be used on node {node}"
            )));
        }
        if let Some(mine) = self.meta.claims.iter().find(|h| h.node == *node) {
            if mine.mode == mode {
                return Ok(());
            }
            return Err(Error::AlreadyExists {
                what: "claim on volume",
                id: id.to_string(),
                detail: format!(
                    "access mode (node {node} holds it {:?}, asked {:?})",
                    mine.mode, mode
                ),
            });
        }
        check_sharing(id, &self.meta.claims, node, mode, "published")?;
        self.check_staged_elsewhere(node, mode)?;
        let _limit = self.check_attach_limit(node)?;
        self.meta.claims.push(Hold {
            pv_name: pv_name.map(str::to_owned),
            ..Hold::new(node.clone(), mode)
        });
        self.save()?;
        tracing::info!(volume = %self.meta.id, %node, ?mode, "claimed");
        Ok(())
    }

    /// Releases `node`'s claim. Its staging hold stays until the node unstages or fences the
    /// volume: Kubernetes also detaches (force-detach) a node that stopped answering while its
    /// kernel may still write, and the next claim must wait for that (see `handover`). No
    /// claim: nothing to do.
    pub fn release(&mut self, node: &NodeName) -> Result<()> {
        self.release_nodes(std::slice::from_ref(node))
    }

    /// Releases every node's claim (CSI ControllerUnpublish without a node).
    pub fn release_all(&mut self) -> Result<()> {
        let nodes: Vec<NodeName> = self.meta.claims.iter().map(|h| h.node.clone()).collect();
        self.release_nodes(&nodes)
    }

    fn release_nodes(&mut self, nodes: &[NodeName]) -> Result<()> {
        let before = self.meta.claims.len();
        self.meta.claims.retain(|h| !nodes.contains(&h.node));
        if self.meta.claims.len() != before {
            self.save()?;
            for node in nodes {
                tracing::info!(volume = %self.meta.id, %node, "released claim");
            }
        }
        Ok(())
    }
}

/// Refuses `mode` on `node` when another node's hold cannot share with it.
pub(crate) fn check_sharing(
    id: &VolumeId,
    holds: &[Hold],
    node: &NodeName,
    mode: AccessMode,
    verb: &str,
) -> Result<()> {
    if let Some(other) = holds
        .iter()
        .find(|h| h.node != *node && !(h.mode.shares_with(mode)))
    {
        return Err(Error::precondition(format!(
            "volume {id} is {verb} {} on node {}; it must be released there before node {node} can use it",
            other.mode.describe(),
            other.node
        )));
    }
    Ok(())
}

/// Allocates every block of a thick volume's image that is not allocated yet (after a crash, a
/// failed allocation, or a trim), and makes it durable. Allocated and shared blocks are left as
/// they are: the pool keeps their copies reserved.
fn allocate_all(file: &std::fs::File, id: &VolumeId) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = file.metadata().context(|| format!("stat image of {id}"))?;
    if md.blocks().saturating_mul(512) >= md.len() {
        return Ok(());
    }
    fallocate(file, 0, md.len())?;
    file.sync_all().context(|| format!("fsync image of {id}"))
}

pub(crate) fn fallocate(file: &std::fs::File, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let too_big =
        || Error::OutOfRange(format!("{} bytes is too large", offset.saturating_add(len)));
    let offset = i64::try_from(offset).map_err(|_| too_big())?;
    let len_i = i64::try_from(len).map_err(|_| too_big())?;
    nix::fcntl::fallocate(
        file.as_fd(),
        nix::fcntl::FallocateFlags::empty(),
        offset,
        len_i,
    )
    .context(|| format!("allocate {len} bytes"))
}
