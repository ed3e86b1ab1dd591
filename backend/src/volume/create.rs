//! Creating a volume by name, blank or as a copy of a snapshot or another volume. Get-or-create
//! is one call under the name's lock (which is the volume's lock: the ID is derived from the
//! name), so two callers racing on one name make one volume.

use crate::copy;
use crate::error::{Error, Result};
use crate::extents;
use crate::freeze;
use crate::ids::VolumeId;
use crate::kernel::KernelView;
use crate::meta::{self, Allocation, VolumeMeta, VolumeSource};
use crate::observe::CopyKind;
use crate::pool::{layout, Charge, Pool};
use crate::size::{self, SizeRequest};
use crate::validate::FsType;

use super::{fallocate, Volume};

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    /// The caller's idempotency key; the volume ID is derived from it ([`VolumeId::for_name`]).
    pub name: String,
    /// The size range; see `size` for how it resolves (4 KiB blocks, per-fs minimum, 1 GiB or the
    /// source's size by default).
    pub size: SizeRequest,
    /// Recorded only when asked; otherwise the first format decides (and records) it.
    pub fs_type: Option<FsType>,
    /// `None`: thin for a new volume, whatever an existing one has.
    pub allocation: Option<Allocation>,
    pub source: Option<VolumeSource>,
}

impl CreateVolume {
    /// A new, empty volume `name` of at least `bytes`, nothing else asked (thin, its filesystem
    /// left to the first stage).
    pub fn blank(name: impl Into<String>, bytes: u64) -> CreateVolume {
        CreateVolume {
            name: name.into(),
            size: SizeRequest::at_least(bytes),
            fs_type: None,
            allocation: None,
            source: None,
        }
    }
}

impl Pool {
    /// Creates a volume, or returns the existing one of the same name when it is compatible.
    ///
    /// Idempotent by name: same name and a compatible request (its size range admits the
    /// existing size; same fs type, allocation and source where asked) → the same volume; same
    /// name otherwise → `AlreadyExists`. Safe when interrupted: the image is made and synced
    /// first, then the metadata is written. A copy is made as `image.tmp` and moved into place
    /// after the metadata; a blank image is made in place (see `make_image`). A volume
    /// interrupted before its metadata is made again from scratch; after it, a repeat finishes
    /// the move.
    pub fn create_volume(&self, req: &CreateVolume) -> Result<VolumeMeta> {
        let id = VolumeId::for_name(&req.name)?;
        let _guard = self.lock_volume(&id)?;
        let found = self.whats_named(&id)?;
        if let Named::Volume(existing) = found {
            self.finish_create(&id)?;
            return check_compatible(existing, req);
        }
        self.create_locked(&id, req, found)
    }

    /// The volume named `req.name`, as it is when it exists (whatever `req` says), else created
    /// from `req`; locked either way (FlexVolume: "use this volume, creating it if absent").
    pub fn open_or_create_volume(&self, req: &CreateVolume) -> Result<Volume<'_>> {
        let id = VolumeId::for_name(&req.name)?;
        let guard = self.lock_volume(&id)?;
        let meta = match self.whats_named(&id)? {
            Named::Volume(existing) => {
                self.finish_create(&id)?;
                existing
            }
            found => self.create_locked(&id, req, found)?,
        };
        Ok(Volume {
            pool: self,
            meta,
            _guard: guard,
        })
    }

    /// What is there under volume `id`'s name, by the volume's directory first: a name that was
    /// never used (the usual create) is one lookup, and on a cluster filesystem every lookup of
    /// a missing name is a round trip to the server (nothing caches an absence).
    fn whats_named(&self, id: &VolumeId) -> Result<Named> {
        if !self.fs()?.exists(&layout::volume_dir(id))? {
            return Ok(Named::Nothing);
        }
        Ok(match self.read_volume_meta(id)? {
            Some(meta) => Named::Volume(meta),
            None => Named::Leftovers,
        })
    }

    /// Finishes a create interrupted after its metadata was committed: the image, complete and
    /// durable before the metadata was written, only has to be moved into place.
    fn finish_create(&self, id: &VolumeId) -> Result<()> {
        let fs = self.fs()?;
        let (image, tmp) = (layout::volume_image(id), layout::volume_image_tmp(id));
        if fs.exists(&image)? || !fs.rename(&tmp, &image)? {
            return Ok(());
        }
        fs.sync_dir(&layout::volume_dir(id))?;
        tracing::info!(volume = %id, "finished an interrupted create");
        Ok(())
    }

    /// Discards what an interrupted create left of volume `id` (a directory without metadata),
    /// unless the kernel or the image says it is a volume that lost its metadata: a loop device
    /// bound to its image (now or before the image was deleted), or data in its image. Those are
    /// refused (`FailedPrecondition`) saying what to do: without its metadata nothing else tells
    /// that the data is wanted. The caller holds the volume's lock.
    pub(crate) fn discard_leftovers(&self, id: &VolumeId) -> Result<()> {
        let fs = self.fs()?;
        let (dir, image) = (layout::volume_dir(id), layout::volume_image(id));
        let current = match self.image_of(id) {
            Ok(current) => current,
            // A planted entry is nobody's image; the kernel is still asked about the path.
            Err(e @ Error::Untrusted { .. }) => {
                tracing::warn!(volume = %id, error = %e, "not an image");
                None
            }
            Err(e) => return Err(e),
        };
        let view = KernelView::read()?;
        if let Some(dev) = view
            .volume_devices(&self.volume_image(id), current.as_ref())
            .first()
        {
            return Err(Error::precondition(format!(
                "volume {id} has no volume.json, but its image is in use on this node: attached \
                 as {}. loopvol will not discard a volume in use; unmount and detach it \
                 (umount; losetup -d {}), then copy its data off or write its volume.json back",
                view.describe(dev),
                dev.path().display(),
            )));
        }
        if current.is_some() {
            let file = fs.open_image(&image, true)?;
            let data = extents::data_bytes(&file).map_err(|e| {
                io_error(e, format!("map the data of {}", fs.path(&image).display()))
            })?;
            if data > 0 {
                return Err(Error::precondition(format!(
                    "volume {id} has no volume.json, but its image {} holds {data} bytes of \
                     data; loopvol will not discard it. If the data is wanted, copy it off (cp \
                     --sparse=always) or write the volume's volume.json back; if not, remove {} \
                     and retry",
                    fs.path(&image).display(),
                    fs.path(&dir).display()
                )));
            }
        }
        self.remove_dir_atomically(&dir)
    }

    /// Creates volume `id` for `req`; the caller holds its lock and found no metadata.
    fn create_locked(&self, id: &VolumeId, req: &CreateVolume, found: Named) -> Result<VolumeMeta> {
        // Source first: its size is the default and the floor, and a missing source is
        // NOT_FOUND before anything is written. Its lock is held until the copy is done.
        let source = match &req.source {
            None => None,
            Some(VolumeSource::Snapshot(sid)) => {
                let guard = self.lock_snapshot(sid)?;
                let snap = self.get_snapshot(sid)?;
                Some(Source {
                    image: layout::snapshot_image(sid),
                    size: snap.size_bytes,
                    fs: snap.fs_type,
                    volume: None,
                    _snapshot_guard: Some(guard),
                })
            }
            Some(VolumeSource::Volume(vid)) => {
                if vid == id {
                    return Err(Error::invalid(
                        "source volume ID",
                        "a volume cannot be its own source",
                    ));
                }
                let volume = self.volume(vid)?;
                Some(Source {
                    image: layout::volume_image(vid),
                    size: volume.meta.size_bytes,
                    fs: volume.meta.fs_type,
                    volume: Some(volume),
                    _snapshot_guard: None,
                })
            }
        };
        let source_fs = source.as_ref().and_then(|s| s.fs);
        if let (Some(want), Some(have)) = (req.fs_type, source_fs) {
            if want != have {
                return Err(Error::invalid(
                    "filesystem type",
                    format!("{want} requested but the source holds {have}"),
                ));
            }
        }
        let fs_type = req.fs_type.or(source_fs);
        let source_size = source.as_ref().map(|s| s.size);
        let size = size::for_create(req.size, source_size, fs_type)?;
        if let Some(source_size) = source_size.filter(|s| size < *s) {
            return Err(Error::OutOfRange(format!(
                "requested {size} bytes is smaller than the source's {source_size}"
            )));
        }
        let allocation = req.allocation.unwrap_or_default();

        let dir = layout::volume_dir(id);
        if let Named::Leftovers = found {
            self.discard_leftovers(id)?;
        }
        if let Err(e) = self.make_image(id, size, allocation, source.as_ref()) {
            // Nothing was committed; a create that fails undoes what it made (the caller may
            // never retry), and the next attempt starts from scratch.
            if let Err(undo) = self.remove_dir_atomically(&dir) {
                tracing::warn!(volume = %id, error = %undo, "could not remove a failed create");
            }
            return Err(e);
        }

        let meta = VolumeMeta {
            schema: meta::SCHEMA_VERSION,
            id: id.clone(),
            name: req.name.clone(),
            size_bytes: size,
            fs_type,
            allocation,
            source: req.source.clone(),
            node: (!self.is_shared()).then(|| self.node().clone()),
            created_unix: meta::now_unix(),
            claims: Vec::new(),
            staged: Vec::new(),
            formatting: None,
            blank: source.is_none(),
            raw_block: false,
        };
        // The metadata after the image, durable, is in its place (a blank one) or beside it
        // (`image.tmp`, a copy): a repeat then finishes an interrupted commit, and a directory
        // without metadata holds no data of a copy in `image`.
        let fs = self.fs()?;
        if source.is_none() {
            fs.sync_dir(&dir)?;
        }
        fs.write_json(&layout::volume_meta(id), &meta)?;
        if source.is_some() {
            self.finish_create(id)?;
        }
        tracing::info!(volume = %id, size, allocation = allocation.as_str(), "created volume");
        Ok(meta)
    }

    /// Makes the image of new volume `id` in its directory, which it creates: admitted against
    /// what the pool can still promise (its size, and what a volume it is reflinked from then
    /// shares), sized or reflinked under the admission lock, then the data copied and the
    /// blocks allocated without it. A copy is made as `image.tmp`, moved into place once the
    /// metadata is written: a directory without metadata whose `image` holds data is a volume
    /// that lost its metadata, never discarded, and an interrupted copy must not look like one.
    /// A blank image is made in place: interrupted, it holds no data, and a directory without
    /// metadata whose image holds none is discarded like any interrupted create (on a cluster
    /// filesystem the move is a round trip to the server, and a rename there costs a millisecond).
    fn make_image(
        &self,
        id: &VolumeId,
        size: u64,
        allocation: Allocation,
        source: Option<&Source<'_>>,
    ) -> Result<()> {
        let what = format!("volume {id}");
        let kind = match source.map(|s| s.volume.is_some()) {
            Some(true) => CopyKind::Clone,
            _ => CopyKind::Restore,
        };
        let fs = self.fs()?;
        let tmp = match source {
            Some(_) => layout::volume_image_tmp(id),
            None => layout::volume_image(id),
        };
        let tmp_shown = fs.path(&tmp);
        // The source's image is opened (and checked) before anything is made.
        let input = source.map(|s| fs.open_image(&s.image, true)).transpose()?;
        // A mounted source volume is frozen while it is copied, so the copy holds a consistent
        // filesystem. Frozen before the admission lock: freezing flushes.
        let _frozen = match source.and_then(|s| s.volume.as_ref()) {
            Some(v) => {
                let view = KernelView::read()?;
                let devices = view.devices_of(v.image()?.as_ref());
                Some(freeze::freeze(&view, &[(v.id(), devices)])?)
            }
            None => None,
        };
        let file;
        let mut copy_from = None;
        {
            // The promises are read before the volume's directory takes its block: a request of
            // exactly what GetCapacity reported is admitted.
            let mut admission = self.admission()?;
            let mut charge = Charge::new(allocation, size);
            if source.is_none() {
                // Refused before anything is made.
                admission.admit(charge, &what)?;
            }
            fs.ensure_dir(&layout::volume_dir(id))?;
            file = fs.create_image(&tmp)?;
            if let (Some(src), Some(input)) = (source, input.as_ref()) {
                // What a source volume owns alone now, it shares with the copy after a reflink:
                // a write over it then needs new space, which the pool keeps for it.
                let source_own = match &src.volume {
                    Some(_) => fs
                        .image_space(&src.image, fs.may_share_blocks())?
                        .map_or(0, |s| s.own),
                    None => 0,
                };
                if copy::reflink(input, &file, kind, &format!("the source of {what}"))? {
                    if let Some(v) = &src.volume {
                        charge = charge.plus(Charge::new(v.meta.allocation, source_own));
                    }
                    tracing::info!(volume = %id, method = ?copy::CopyMethod::Reflink, "copied source image");
                } else {
                    copy_from = Some(input);
                }
                admission.admit(charge, &what)?;
            }
            // Its full length is what the next admission sees as this volume's promise.
            file.set_len(size).map_err(|e| {
                let why = if e.raw_os_error() == Some(libc::EFBIG) {
                    format!(
                        "{size} bytes is more than the pool's filesystem holds in one file; \
                         size {}",
                        tmp_shown.display()
                    )
                } else {
                    format!("size {}", tmp_shown.display())
                };
                io_error(e, why)
            })?;
        }
        if let Some(input) = copy_from {
            copy::copy_data(input, &file, kind, &format!("the source of {what}"))?;
            tracing::info!(volume = %id, method = ?copy::CopyMethod::Sparse, "copied source image");
        }
        if allocation == Allocation::Thick {
            fallocate(&file, 0, size)?;
        }
        file.sync_all()
            .map_err(|e| io_error(e, format!("fsync {}", tmp_shown.display())))
    }
}

/// The source of a copy, locked until the copy is committed.
/// What a create finds under the volume's name before it makes anything.
enum Named {
    /// No directory: the name was never used, or its volume was deleted.
    Nothing,
    /// A directory without committed metadata: what an interrupted create left.
    Leftovers,
    Volume(VolumeMeta),
}

struct Source<'p> {
    /// Relative to the pool root.
    image: std::path::PathBuf,
    size: u64,
    fs: Option<FsType>,
    volume: Option<Volume<'p>>,
    _snapshot_guard: Option<crate::lock::LockGuard>,
}

fn io_error(source: std::io::Error, context: String) -> Error {
    Error::Io { context, source }
}

fn check_compatible(existing: VolumeMeta, req: &CreateVolume) -> Result<VolumeMeta> {
    let mismatch = |detail: String| {
        Err(Error::AlreadyExists {
            what: "volume",
            id: existing.id.to_string(),
            detail,
        })
    };
    if existing.name != req.name {
        return mismatch(format!("name ({:?})", existing.name));
    }
    if !req.size.admits(existing.size_bytes) {
        let limit = match req.size.limit {
            0 => "no limit".to_owned(),
            l => format!("at most {l}"),
        };
        return mismatch(format!(
            "size ({} bytes, asked at least {}, {limit})",
            existing.size_bytes, req.size.required
        ));
    }
    if req.fs_type.is_some() && existing.fs_type != req.fs_type {
        return mismatch(format!("filesystem type ({:?})", existing.fs_type));
    }
    if req.allocation.is_some_and(|a| a != existing.allocation) {
        return mismatch(format!("allocation ({})", existing.allocation.as_str()));
    }
    if existing.source != req.source {
        return mismatch(format!("source ({:?})", existing.source));
    }
    Ok(existing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SnapshotId;
    use crate::ErrorKind;

    fn existing() -> VolumeMeta {
        VolumeMeta {
            schema: 1,
            id: VolumeId::try_from("v").unwrap(),
            name: "v".into(),
            size_bytes: 8192,
            fs_type: Some(FsType::Ext4),
            allocation: Allocation::Thin,
            source: None,
            node: None,
            created_unix: 0,
            claims: vec![],
            staged: vec![],
            formatting: None,
            blank: false,
            raw_block: false,
        }
    }

    #[test]
    fn repeats_are_compatible_or_already_exist() {
        let base = CreateVolume {
            name: "v".into(),
            size: SizeRequest::at_least(8192),
            fs_type: None,
            allocation: None,
            source: None,
        };
        let snap = SnapshotId::try_from("s").unwrap();
        // (change to the request, compatible)
        let table: Vec<(CreateVolume, bool)> = vec![
            (base.clone(), true),
            (
                CreateVolume {
                    size: SizeRequest::at_least(5000),
                    ..base.clone()
                },
                true,
            ),
            (
                CreateVolume {
                    size: SizeRequest::default(),
                    ..base.clone()
                },
                true,
            ),
            (
                CreateVolume {
                    size: SizeRequest {
                        required: 4096,
                        limit: 8192,
                    },
                    ..base.clone()
                },
                true,
            ),
            (
                CreateVolume {
                    size: SizeRequest::at_least(8193),
                    ..base.clone()
                },
                false,
            ),
            (
                CreateVolume {
                    size: SizeRequest {
                        required: 0,
                        limit: 4096,
                    },
                    ..base.clone()
                },
                false,
            ),
            (
                CreateVolume {
                    fs_type: Some(FsType::Ext4),
                    ..base.clone()
                },
                true,
            ),
            (
                CreateVolume {
                    fs_type: Some(FsType::Xfs),
                    ..base.clone()
                },
                false,
            ),
            (
                CreateVolume {
                    allocation: Some(Allocation::Thin),
                    ..base.clone()
                },
                true,
            ),
            (
                CreateVolume {
                    allocation: Some(Allocation::Thick),
                    ..base.clone()
                },
                false,
            ),
            (
                CreateVolume {
                    source: Some(VolumeSource::Snapshot(snap)),
                    ..base.clone()
                },
                false,
            ),
            (
                CreateVolume {
                    name: "other".into(),
                    ..base.clone()
                },
                false,
            ),
        ];
        let mut wrong = Vec::new();
        for (req, compatible) in table {
            let got = check_compatible(existing(), &req);
            match (&got, compatible) {
                (Ok(_), true) => {}
                (Err(e), false) if e.kind() == ErrorKind::AlreadyExists => {}
                _ => wrong.push(format!("{req:?}: {got:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
