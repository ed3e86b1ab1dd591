//! Controller-side volume operations: create (blank, from a snapshot, clone), get, delete, expand,
//! change allocation, and node claims. Each validates its input before taking a lock, then checks
//! the real state and finishes whatever an interrupted earlier call left half done.

use std::fs::OpenOptions;
use std::os::fd::AsFd;

use crate::copy;
use crate::error::{Context, Error, Result};
use crate::freeze;
use crate::loopdev;
use crate::meta::{self, AccessMode, Allocation, Hold, VolumeMeta, VolumeSource};
use crate::pool::Pool;
use crate::validate::{self, FsType};

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    /// The caller's idempotency key; the volume ID is derived from it.
    pub name: String,
    pub size_bytes: u64,
    pub fs_type: Option<FsType>,
    pub allocation: Allocation,
    pub source: Option<VolumeSource>,
}

/// Result of a controller expansion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    pub size_bytes: u64,
    /// The filesystem still has to grow on the node that stages the volume.
    pub node_expansion_required: bool,
}

fn fallocate(file: &std::fs::File, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    nix::fcntl::fallocate(
        file.as_fd(),
        nix::fcntl::FallocateFlags::empty(),
        offset as i64,
        len as i64,
    )
    .context(|| format!("allocate {len} bytes"))
}

impl Pool {
    /// The volume's committed metadata.
    pub fn get_volume(&self, id: &str) -> Result<VolumeMeta> {
        validate::check_id("volume ID", id)?;
        meta::read(&self.volume_meta_path(id))?.ok_or_else(|| Error::not_found("volume", id))
    }

    /// Creates a volume, or returns the existing one of the same name when compatible.
    ///
    /// Idempotent by name: same name and compatible request → the same volume; same name with a
    /// different size, fs type, allocation or source → `AlreadyExists`. Safe when interrupted:
    /// metadata is written last, so a half-made volume is made again from scratch.
    pub fn create_volume(&self, req: &CreateVolume) -> Result<VolumeMeta> {
        validate::check_name("volume name", &req.name)?;
        if req.size_bytes == 0 {
            return Err(Error::invalid("size", "must be greater than zero"));
        }
        match &req.source {
            Some(VolumeSource::Snapshot(s)) => validate::check_id("source snapshot ID", s)?,
            Some(VolumeSource::Volume(v)) => validate::check_id("source volume ID", v)?,
            None => {}
        }
        let id = validate::id_for_name(&req.name);
        let _guard = self.lock_volume(&id)?;

        if let Some(existing) = meta::read::<VolumeMeta>(&self.volume_meta_path(&id))? {
            return check_compatible(existing, req);
        }

        // Source first: its size bounds ours, and a missing source is NOT_FOUND before anything
        // is written.
        let (source_image, source_size, source_fs, _source_guard) = match &req.source {
            None => (None, 0, None, None),
            Some(VolumeSource::Snapshot(sid)) => {
                let guard = self.lock_snapshot(sid)?;
                let snap = self.get_snapshot(sid)?;
                (
                    Some(self.snapshot_image(sid)),
                    snap.size_bytes,
                    snap.fs_type,
                    Some(guard),
                )
            }
            Some(VolumeSource::Volume(vid)) => {
                if *vid == id {
                    return Err(Error::invalid(
                        "source volume ID",
                        "a volume cannot be its own source",
                    ));
                }
                let guard = self.lock_volume(vid)?;
                let src = self.get_volume(vid)?;
                (
                    Some(self.volume_image(vid)),
                    src.size_bytes,
                    src.fs_type,
                    Some(guard),
                )
            }
        };
        if req.size_bytes < source_size {
            return Err(Error::OutOfRange(format!(
                "requested {} bytes is smaller than the source's {source_size}",
                req.size_bytes
            )));
        }
        let fs_type = req.fs_type.or(source_fs);
        if let (Some(want), Some(have)) = (req.fs_type, source_fs) {
            if want != have {
                return Err(Error::invalid(
                    "filesystem type",
                    format!("{want} requested but the source holds {have}"),
                ));
            }
        }

        let room = match req.allocation {
            Allocation::Thin => req.size_bytes,
            Allocation::Thick => req.size_bytes,
        };
        self.ensure_room(room, &format!("volume {id}"))?;

        let dir = self.volume_dir(&id);
        // Leftovers of an interrupted create (no metadata was committed) are discarded.
        if dir.exists() {
            self.remove_dir_atomically(&dir)?;
        }
        std::fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        let tmp = dir.join("image.tmp");
        match &source_image {
            Some(src) => {
                let method =
                    freeze::with_frozen(self, req.source.as_ref(), || copy::copy_image(src, &tmp))?;
                tracing::info!(volume = %id, ?method, "copied source image");
            }
            None => {
                std::fs::File::create_new(&tmp).context(|| format!("create {}", tmp.display()))?;
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&tmp)
            .context(|| format!("open {}", tmp.display()))?;
        file.set_len(req.size_bytes)
            .context(|| format!("size {}", tmp.display()))?;
        if req.allocation == Allocation::Thick {
            fallocate(&file, 0, req.size_bytes)?;
        }
        file.sync_all()
            .context(|| format!("fsync {}", tmp.display()))?;
        std::fs::rename(&tmp, self.volume_image(&id))
            .context(|| format!("commit image of {id}"))?;

        let meta = VolumeMeta {
            schema: meta::SCHEMA_VERSION,
            id: id.clone(),
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            fs_type,
            allocation: req.allocation,
            source: req.source.clone(),
            node: (!self.is_shared()).then(|| self.node().to_owned()),
            created_unix: meta::now_unix(),
            claims: Vec::new(),
            staged: Vec::new(),
            formatting: None,
        };
        meta::write(&self.volume_meta_path(&id), &meta)?;
        tracing::info!(volume = %id, size = req.size_bytes, allocation = req.allocation.as_str(), "created volume");
        Ok(meta)
    }

    /// Deletes a volume. Unknown IDs succeed (deletion is idempotent). A volume attached on this
    /// node, staged on any node, or claimed by a node is refused: its data is in use.
    pub fn delete_volume(&self, id: &str) -> Result<()> {
        validate::check_id("volume ID", id)?;
        let _guard = self.lock_volume(id)?;
        let dir = self.volume_dir(id);
        if let Some(m) = meta::read::<VolumeMeta>(&self.volume_meta_path(id))? {
            if let Some(dev) = loopdev::find(&self.volume_image(id))?.first() {
                return Err(Error::precondition(format!(
                    "volume {id} is in use: attached as {} on this node; unstage it first",
                    dev.path().display()
                )));
            }
            if let Some(h) = m.staged.first() {
                return Err(Error::precondition(format!(
                    "volume {id} is staged on node {}; unstage it first",
                    h.node
                )));
            }
            if let Some(h) = m.claims.first() {
                return Err(Error::precondition(format!(
                    "volume {id} is published to node {}; unpublish it first",
                    h.node
                )));
            }
        }
        self.remove_dir_atomically(&dir)?;
        tracing::info!(volume = %id, "deleted volume");
        Ok(())
    }

    /// Grows the image to `new_size` (never shrinks: a smaller or equal size returns the current
    /// one) and, when the volume is attached on this node, tells the loop device. The filesystem
    /// grows separately on the node ([`Pool::node_expand`]).
    pub fn expand_volume(&self, id: &str, new_size: u64) -> Result<Expanded> {
        validate::check_id("volume ID", id)?;
        if new_size == 0 {
            return Err(Error::invalid("size", "must be greater than zero"));
        }
        let _guard = self.lock_volume(id)?;
        let mut m = self.get_volume(id)?;
        let image = self.volume_image(id);
        let file = OpenOptions::new()
            .write(true)
            .open(&image)
            .context(|| format!("open image of volume {id}"))?;
        let current_len = file
            .metadata()
            .context(|| format!("stat image of {id}"))?
            .len();
        if new_size > m.size_bytes {
            self.ensure_room(new_size - m.size_bytes, &format!("growing volume {id}"))?;
        }
        // The image grows before the metadata: after a crash the image is at least as large as
        // recorded, and a repeat finishes the job.
        if new_size > current_len {
            file.set_len(new_size)
                .context(|| format!("grow image of {id}"))?;
            if m.allocation == Allocation::Thick {
                fallocate(&file, current_len, new_size - current_len)?;
            }
            file.sync_all().context(|| format!("fsync image of {id}"))?;
        }
        if new_size > m.size_bytes {
            m.size_bytes = new_size;
            meta::write(&self.volume_meta_path(id), &m)?;
            tracing::info!(volume = %id, size = new_size, "expanded volume");
        }
        for dev in loopdev::find(&image)? {
            loopdev::refresh_capacity(&dev)?;
        }
        Ok(Expanded {
            size_bytes: m.size_bytes,
            node_expansion_required: true,
        })
    }

    /// Changes how a volume's image is allocated. Thin → thick allocates every block now (so the
    /// volume can no longer run out of pool space); thick → thin only changes the accounting
    /// (space already allocated stays allocated until the filesystem discards it).
    pub fn set_allocation(&self, id: &str, allocation: Allocation) -> Result<VolumeMeta> {
        validate::check_id("volume ID", id)?;
        let _guard = self.lock_volume(id)?;
        let mut m = self.get_volume(id)?;
        if m.allocation == allocation {
            return Ok(m);
        }
        if allocation == Allocation::Thick {
            let image = self.volume_image(id);
            let allocated = std::os::unix::fs::MetadataExt::blocks(
                &std::fs::metadata(&image).context(|| format!("stat image of {id}"))?,
            ) * 512;
            let missing = m.size_bytes.saturating_sub(allocated);
            let free = self.capacity()?.free_bytes;
            if missing > free {
                return Err(Error::NoSpace(format!(
                    "allocating volume {id} needs {missing} more bytes; the pool has {free} free"
                )));
            }
            let file = OpenOptions::new()
                .write(true)
                .open(&image)
                .context(|| format!("open image of {id}"))?;
            // FALLOC_FL_KEEP_SIZE not needed: we allocate exactly the current length.
            fallocate(&file, 0, m.size_bytes)?;
            file.sync_all().context(|| format!("fsync image of {id}"))?;
        }
        m.allocation = allocation;
        meta::write(&self.volume_meta_path(id), &m)?;
        tracing::info!(volume = %id, allocation = allocation.as_str(), "changed allocation");
        Ok(m)
    }

    /// Claims the volume for `node` (CSI ControllerPublish, FlexVolume attach). Idempotent; a
    /// claim by another node that cannot share with `mode` is refused (`FailedPrecondition`), and
    /// a different mode on the same node is `AlreadyExists`.
    pub fn claim(
        &self,
        id: &str,
        node: &str,
        mode: AccessMode,
        pv_name: Option<&str>,
    ) -> Result<VolumeMeta> {
        validate::check_id("volume ID", id)?;
        validate::check_node("node", node)?;
        let _guard = self.lock_volume(id)?;
        let mut m = self.get_volume(id)?;
        if let Some(local) = m.node.as_deref().filter(|n| *n != node) {
            return Err(Error::precondition(format!(
                "volume {id} lives in the pool of node {local} and cannot be used on node {node}"
            )));
        }
        if let Some(mine) = m.claims.iter().find(|h| h.node == node) {
            if mine.mode == mode {
                return Ok(m);
            }
            return Err(Error::AlreadyExists {
                what: "claim on volume",
                id: id.to_owned(),
                detail: format!(
                    "access mode (node {node} holds it {:?}, asked {:?})",
                    mine.mode, mode
                ),
            });
        }
        check_sharing(id, &m.claims, node, mode, "published")?;
        m.claims.push(Hold {
            node: node.to_owned(),
            mode,
            pv_name: pv_name.map(str::to_owned),
        });
        meta::write(&self.volume_meta_path(id), &m)?;
        tracing::info!(volume = %id, node, ?mode, "claimed");
        Ok(m)
    }

    /// Releases `node`'s claim, and with it that node's staging hold. The controller's release is
    /// authoritative: Kubernetes detaches from a node once it no longer uses the volume or is
    /// declared dead, and a dead node's stale hold must not lock the volume out of every other
    /// node. Unknown volume or no claim: nothing to do.
    pub fn release_claim(&self, id: &str, node: &str) -> Result<()> {
        validate::check_id("volume ID", id)?;
        let _guard = self.lock_volume(id)?;
        let Some(mut m) = meta::read::<VolumeMeta>(&self.volume_meta_path(id))? else {
            return Ok(());
        };
        let before = (m.claims.len(), m.staged.len());
        m.claims.retain(|h| h.node != node);
        m.staged.retain(|h| h.node != node);
        if (m.claims.len(), m.staged.len()) != before {
            meta::write(&self.volume_meta_path(id), &m)?;
            tracing::info!(volume = %id, node, "released claim");
        }
        Ok(())
    }

    /// The volume a claim for PV `pv_name` was made on (FlexVolume `detach` names only the PV).
    pub fn find_claim_by_pv(&self, pv_name: &str, node: &str) -> Result<Option<String>> {
        let page = self.list_volumes(None, 0)?;
        Ok(page
            .entries
            .into_iter()
            .find(|m| {
                m.claims
                    .iter()
                    .any(|h| h.node == node && h.pv_name.as_deref() == Some(pv_name))
            })
            .map(|m| m.id))
    }
}

/// Refuses `mode` on `node` when another node's hold cannot share with it.
pub(crate) fn check_sharing(
    id: &str,
    holds: &[Hold],
    node: &str,
    mode: AccessMode,
    verb: &str,
) -> Result<()> {
    if let Some(other) = holds
        .iter()
        .find(|h| h.node != node && !(h.mode.shares_with(mode)))
    {
        let how = match other.mode {
            AccessMode::ReadOnly => "read-only",
            AccessMode::SingleNodeWriter => "read-write",
            AccessMode::MultiNodeWriter => "multi-writer",
        };
        return Err(Error::precondition(format!(
            "volume {id} is {verb} {how} on node {}; it must be released there before node {node} can use it",
            other.node
        )));
    }
    Ok(())
}

fn check_compatible(existing: VolumeMeta, req: &CreateVolume) -> Result<VolumeMeta> {
    let mismatch = |detail: String| {
        Err(Error::AlreadyExists {
            what: "volume",
            id: existing.id.clone(),
            detail,
        })
    };
    if existing.name != req.name {
        return mismatch(format!("name ({:?})", existing.name));
    }
    if existing.size_bytes != req.size_bytes {
        return mismatch(format!(
            "size ({} bytes, asked {})",
            existing.size_bytes, req.size_bytes
        ));
    }
    if req.fs_type.is_some() && existing.fs_type != req.fs_type {
        return mismatch(format!("filesystem type ({:?})", existing.fs_type));
    }
    if existing.allocation != req.allocation {
        return mismatch(format!("allocation ({})", existing.allocation.as_str()));
    }
    if existing.source != req.source {
        return mismatch(format!("source ({:?})", existing.source));
    }
    Ok(existing)
}
