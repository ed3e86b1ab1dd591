//! Creating a volume by name, blank or as a copy of a snapshot or another volume. Get-or-create
//! is one call under the name's lock (which is the volume's lock: the ID is derived from the
//! name), so two callers racing on one name make one volume.

use crate::copy;
use crate::error::{Error, Result};
use crate::freeze;
use crate::ids::VolumeId;
use crate::kernel::KernelView;
use crate::meta::{self, Allocation, VolumeMeta, VolumeSource};
use crate::observe::CopyKind;
use crate::pool::{layout, Pool};
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

impl Pool {
    /// Creates a volume, or returns the existing one of the same name when it is compatible.
    ///
    /// Idempotent by name: same name and a compatible request (its size range admits the
    /// existing size; same fs type, allocation and source where asked) → the same volume; same
    /// name otherwise → `AlreadyExists`. Safe when interrupted: metadata is written last, so a
    /// half-made volume is made again from scratch.
    pub fn create_volume(&self, req: &CreateVolume) -> Result<VolumeMeta> {
        let id = VolumeId::for_name(&req.name)?;
        let _guard = self.lock_volume(&id)?;
        if let Some(existing) = self.read_volume_meta(&id)? {
            return check_compatible(existing, req);
        }
        self.create_locked(&id, req)
    }

    /// The volume named `req.name`, as it is when it exists (whatever `req` says), else created
    /// from `req`; locked either way (FlexVolume: "use this volume, creating it if absent").
    pub fn open_or_create_volume(&self, req: &CreateVolume) -> Result<Volume<'_>> {
        let id = VolumeId::for_name(&req.name)?;
        let guard = self.lock_volume(&id)?;
        let meta = match self.read_volume_meta(&id)? {
            Some(existing) => existing,
            None => self.create_locked(&id, req)?,
        };
        Ok(Volume {
            pool: self,
            meta,
            _guard: guard,
        })
    }

    /// Creates volume `id` for `req`; the caller holds its lock and found no metadata.
    fn create_locked(&self, id: &VolumeId, req: &CreateVolume) -> Result<VolumeMeta> {
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
        // Thin or thick, the volume is promised its whole size.
        self.ensure_room(size, &format!("volume {id}"))?;

        let fs = self.fs()?;
        // The source's image is opened (and checked) before anything is made.
        let input = source
            .as_ref()
            .map(|src| fs.open_image(&src.image, true))
            .transpose()?;
        let dir = layout::volume_dir(id);
        // Leftovers of an interrupted create (no metadata was committed) are discarded.
        if fs.exists(&dir)? {
            self.remove_dir_atomically(&dir)?;
        }
        fs.ensure_dir(&dir)?;
        let made = self.fill_new_volume(&fs, id, req, size, fs_type, allocation, source, input);
        if made.is_err() {
            // A create that fails undoes what it made: the caller may never retry.
            if let Err(e) = self.remove_dir_atomically(&dir) {
                tracing::warn!(volume = %id, error = %e, "could not remove a failed create");
            }
        }
        made
    }

    /// Makes the image of new volume `id` in its (new, empty) directory and commits its metadata.
    #[allow(clippy::too_many_arguments)]
    fn fill_new_volume(
        &self,
        fs: &crate::pool::fsops::PoolFs,
        id: &VolumeId,
        req: &CreateVolume,
        size: u64,
        fs_type: Option<FsType>,
        allocation: Allocation,
        source: Option<Source<'_>>,
        input: Option<std::fs::File>,
    ) -> Result<VolumeMeta> {
        let tmp = layout::volume_image_tmp(id);
        let tmp_shown = fs.path(&tmp);
        let file = fs.create_image(&tmp)?;
        if let (Some(src), Some(input)) = (&source, input) {
            // A mounted source volume is frozen while it is copied, so the copy holds a
            // consistent filesystem.
            let _frozen = match &src.volume {
                Some(v) => {
                    let view = KernelView::read()?;
                    let devices = view.devices_of(v.image()?.as_ref());
                    Some(freeze::freeze(&view, &[(v.id(), devices)])?)
                }
                None => None,
            };
            let kind = match src.volume {
                Some(_) => CopyKind::Clone,
                None => CopyKind::Restore,
            };
            let method =
                copy::copy_image(&input, &file, kind, &format!("the source of volume {id}"))?;
            tracing::info!(volume = %id, ?method, "copied source image");
        }
        file.set_len(size)
            .map_err(|e| io_error(e, format!("size {}", tmp_shown.display())))?;
        if allocation == Allocation::Thick {
            fallocate(&file, 0, size)?;
        }
        file.sync_all()
            .map_err(|e| io_error(e, format!("fsync {}", tmp_shown.display())))?;
        if !fs.rename(&tmp, &layout::volume_image(id))? {
            return Err(Error::precondition(format!(
                "{} vanished before it was committed",
                tmp_shown.display()
            )));
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
        };
        fs.write_json(&layout::volume_meta(id), &meta)?;
        tracing::info!(volume = %id, size, allocation = allocation.as_str(), "created volume");
        Ok(meta)
    }
}

/// The source of a copy, locked until the copy is committed.
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
