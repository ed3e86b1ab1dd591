//! Snapshots: independent copies of a volume's image (reflinked where the pool's filesystem can),
//! taken with the volume's filesystem frozen. A snapshot outlives its source. A group snapshot
//! is several snapshots taken at one point in time, each recording the group's ID.
//!
//! Lock order: a snapshot's lock before its source volume's.

use std::collections::BTreeSet;

use crate::copy;
use crate::error::{Error, Result};
use crate::extents;
use crate::freeze;
use crate::ids::{GroupSnapshotId, SnapshotId, VolumeId};
use crate::kernel::KernelView;
use crate::meta::{self, SnapshotMeta};
use crate::observe::CopyKind;
use crate::pool::{fsops::PoolFs, layout, Charge, Pool};
use crate::volume::Volume;
use crate::ErrorKind;

/// What to snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The caller's idempotency key; the snapshot ID is derived from it.
    pub name: String,
    pub source: VolumeId,
}

/// A group snapshot: its ID and its members in ID order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub id: GroupSnapshotId,
    pub members: Vec<SnapshotMeta>,
}

/// One snapshot to take: its ID, its name and its source.
struct Member {
    id: SnapshotId,
    name: String,
    source: VolumeId,
}

impl Pool {
    pub fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotMeta> {
        self.read_snapshot_meta(id)?
            .ok_or_else(|| Error::not_found("snapshot", id.as_str()))
    }

    /// Snapshots `req.source` under `req.name`. Idempotent by name: the same name and source
    /// return the existing snapshot; the same name with another source is `AlreadyExists`.
    pub fn create_snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotMeta> {
        let member = Member {
            id: SnapshotId::for_name(&req.name)?,
            name: req.name.clone(),
            source: req.source.clone(),
        };
        let mut taken = self.create_snapshots(&[member], None)?;
        Ok(taken.remove(0))
    }

    /// Snapshots several volumes at one point in time: all are frozen together, then copied.
    /// Members are named `<group name>/<volume ID>` and carry the group's ID. Idempotent by name:
    /// a repeat must name the same volumes (a group with only some of them committed is an
    /// interrupted earlier call, which this one finishes).
    pub fn create_group_snapshot(&self, name: &str, sources: &[VolumeId]) -> Result<GroupSnapshot> {
        let group_id = GroupSnapshotId::for_name(name)?;
        if sources.is_empty() {
            return Err(Error::invalid("source volume IDs", "must not be empty"));
        }
        let sources: BTreeSet<&VolumeId> = sources.iter().collect();
        match self.group_members(&group_id) {
            Ok(existing) => {
                if existing
                    .iter()
                    .any(|s| !sources.contains(&s.source_volume_id))
                {
                    let have: Vec<&str> = existing
                        .iter()
                        .map(|s| s.source_volume_id.as_str())
                        .collect();
                    return Err(Error::AlreadyExists {
                        what: "group snapshot",
                        id: group_id.to_string(),
                        detail: format!("source volumes ({})", have.join(", ")),
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let members = sources
            .into_iter()
            .map(|v| {
                let member_name = format!("{name}/{v}");
                Ok(Member {
                    id: SnapshotId::for_name(&member_name)?,
                    name: member_name,
                    source: v.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let members = self.create_snapshots(&members, Some(&group_id))?;
        Ok(GroupSnapshot {
            id: group_id,
            members,
        })
    }

    /// Group snapshot `id`. When `expected` is not empty (the CO may name the members it
    /// expects), a group with other members is `InvalidArgument`.
    pub fn get_group_snapshot(
        &self,
        id: &GroupSnapshotId,
        expected: &[SnapshotId],
    ) -> Result<GroupSnapshot> {
        let members = self.group_members(id)?;
        check_members(id, &members, expected)?;
        Ok(GroupSnapshot {
            id: id.clone(),
            members,
        })
    }

    /// Deletes every member of group snapshot `id`; an unknown group succeeds. `expected` as for
    /// [`Pool::get_group_snapshot`], checked before anything is deleted.
    pub fn delete_group_snapshot(
        &self,
        id: &GroupSnapshotId,
        expected: &[SnapshotId],
    ) -> Result<()> {
        let members = match self.group_members(id) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        check_members(id, &members, expected)?;
        for s in &members {
            self.delete_snapshot(&s.id)?;
        }
        tracing::info!(group_snapshot = %id, members = members.len(), "deleted group snapshot");
        Ok(())
    }

    /// The members of group snapshot `id`, in ID order; `NotFound` when there are none.
    fn group_members(&self, id: &GroupSnapshotId) -> Result<Vec<SnapshotMeta>> {
        let members: Vec<SnapshotMeta> = self
            .list_snapshots(None, None, 0)?
            .entries
            .into_iter()
            .filter(|s| s.group_id.as_ref() == Some(id))
            .collect();
        if members.is_empty() {
            return Err(Error::not_found("group snapshot", id.as_str()));
        }
        Ok(members)
    }

    /// Creates (or finds) each member snapshot, all copies made under one freeze.
    fn create_snapshots(
        &self,
        members: &[Member],
        group_id: Option<&GroupSnapshotId>,
    ) -> Result<Vec<SnapshotMeta>> {
        let mut guards = Vec::new();
        for m in members {
            guards.push(self.lock_snapshot(&m.id)?);
        }
        let mut done: Vec<Option<SnapshotMeta>> = Vec::new();
        for m in members {
            match self.read_snapshot_meta(&m.id)? {
                Some(existing)
                    if existing.source_volume_id == m.source && existing.name == m.name =>
                {
                    done.push(Some(existing));
                }
                Some(existing) => {
                    return Err(Error::AlreadyExists {
                        what: "snapshot",
                        id: m.id.to_string(),
                        detail: format!("source (volume {})", existing.source_volume_id),
                    })
                }
                None => done.push(None),
            }
        }
        let todo: Vec<&Member> = members
            .iter()
            .zip(&done)
            .filter(|(_, d)| d.is_none())
            .map(|(m, _)| m)
            .collect();
        if todo.is_empty() {
            return Ok(done.into_iter().flatten().collect());
        }
        let sources: Vec<Volume<'_>> = todo
            .iter()
            .map(|m| self.volume(&m.source))
            .collect::<Result<_>>()?;
        let fs = self.fs()?;
        for m in &todo {
            let dir = layout::snapshot_dir(&m.id);
            if fs.exists(&dir)? {
                self.remove_dir_atomically(&dir)?; // leftovers of an interrupted attempt
            }
            fs.ensure_dir(&dir)?;
        }
        if let Err(e) = self.copy_members(&fs, &todo, &sources) {
            for m in &todo {
                if let Err(undo) = self.remove_dir_atomically(&layout::snapshot_dir(&m.id)) {
                    tracing::warn!(snapshot = %m.id, error = %undo, "could not remove a failed snapshot");
                }
            }
            return Err(e);
        }
        let mut made = sources.iter();
        for (m, slot) in members.iter().zip(done.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let source = made.next().expect("one source per snapshot to take");
            let tmp = layout::snapshot_image_tmp(&m.id);
            if !fs.rename(&tmp, &layout::snapshot_image(&m.id))? {
                return Err(Error::precondition(format!(
                    "the image of snapshot {} vanished before it was committed",
                    m.id
                )));
            }
            let meta = SnapshotMeta {
                schema: meta::SCHEMA_VERSION,
                id: m.id.clone(),
                name: m.name.clone(),
                source_volume_id: m.source.clone(),
                size_bytes: source.meta().size_bytes,
                fs_type: source.meta().fs_type,
                created_unix: meta::now_unix(),
                group_id: group_id.cloned(),
            };
            fs.write_json(&layout::snapshot_meta(&m.id), &meta)?;
            *slot = Some(meta);
        }
        Ok(done.into_iter().flatten().collect())
    }

    /// Copies each member's source into its `image.tmp`, all under one freeze. Each copy is
    /// admitted against what the pool can still promise and made visible before the admission
    /// lock goes: a reflink shares what its source owned alone (the source then owes a copy of
    /// those blocks for its next write over them: charged to the source's allocation); a data
    /// copy takes its space now (charged as space taken, preallocated under the lock and
    /// filled after it).
    fn copy_members(&self, fs: &PoolFs, todo: &[&Member], sources: &[Volume<'_>]) -> Result<()> {
        let view = KernelView::read()?;
        let frozen_sources: Vec<(&VolumeId, _)> = sources
            .iter()
            .map(|v| Ok((v.id(), view.devices_of(v.image()?.as_ref()))))
            .collect::<Result<_>>()?;
        let _frozen = freeze::freeze(&view, &frozen_sources)?;
        let shared_blocks = fs.may_share_blocks();
        let mut to_copy = Vec::new();
        {
            let mut admission = self.admission()?;
            for (m, source) in todo.iter().zip(sources) {
                let image = layout::volume_image(&m.source);
                let input = fs.open_image(&image, true)?;
                let output = fs.create_image(&layout::snapshot_image_tmp(&m.id))?;
                let what = format!("snapshot {} of volume {}", m.id, m.source);
                // Measured before the reflink: what the source owns alone becomes shared.
                let own = fs.image_space(&image, shared_blocks)?.map_or(0, |s| s.own);
                if copy::reflink(&input, &output, CopyKind::Snapshot, &what)? {
                    admission.admit(Charge::new(source.meta().allocation, own), &what)?;
                    tracing::info!(snapshot = %m.id, volume = %m.source, method = ?copy::CopyMethod::Reflink, "copied image");
                } else {
                    let data = extents::data_bytes(&input).map_err(|e| Error::Io {
                        context: format!("map the data of {}", fs.path(&image).display()),
                        source: e,
                    })?;
                    admission.admit(Charge::now(data), &what)?;
                    copy::preallocate(&input, &output, &what)?;
                    to_copy.push((m, input, output, what));
                }
            }
        }
        for (m, input, output, what) in &to_copy {
            copy::copy_data(input, output, CopyKind::Snapshot, what)?;
            tracing::info!(snapshot = %m.id, volume = %m.source, method = ?copy::CopyMethod::Sparse, "copied image");
        }
        for m in todo {
            let tmp = layout::snapshot_image_tmp(&m.id);
            fs.open_image(&tmp, false)?
                .sync_all()
                .map_err(|e| Error::Io {
                    context: format!("fsync {}", fs.path(&tmp).display()),
                    source: e,
                })?;
        }
        Ok(())
    }

    /// Deletes a snapshot; unknown IDs succeed. Volumes restored from it are independent copies,
    /// so a snapshot is never in use.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let dir = layout::snapshot_dir(id);
        if !self.fs()?.exists(&dir)? {
            return Ok(());
        }
        let _guard = self.lock_snapshot(id)?;
        self.remove_dir_atomically(&dir)?;
        tracing::info!(snapshot = %id, "deleted snapshot");
        Ok(())
    }
}

/// The CO may name the members it expects; a list that does not match the group is
/// `InvalidArgument`.
fn check_members(
    id: &GroupSnapshotId,
    members: &[SnapshotMeta],
    expected: &[SnapshotId],
) -> Result<()> {
    if expected.is_empty() {
        return Ok(());
    }
    let have: BTreeSet<&SnapshotId> = members.iter().map(|s| &s.id).collect();
    let want: BTreeSet<&SnapshotId> = expected.iter().collect();
    if have != want {
        let names: Vec<&str> = have.iter().map(|s| s.as_str()).collect();
        return Err(Error::invalid(
            "snapshot IDs",
            format!(
                "they do not match group snapshot {id}, whose members are {}",
                names.join(", ")
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_members() {
        let snap = |id: &str| SnapshotMeta {
            schema: 1,
            id: SnapshotId::try_from(id).unwrap(),
            name: id.into(),
            source_volume_id: VolumeId::try_from("v").unwrap(),
            size_bytes: 1,
            fs_type: None,
            created_unix: 0,
            group_id: None,
        };
        let ids = |list: &[&str]| -> Vec<SnapshotId> {
            list.iter()
                .map(|s| SnapshotId::try_from(*s).unwrap())
                .collect()
        };
        let group = GroupSnapshotId::try_from("g").unwrap();
        let members = [snap("a"), snap("b")];
        // (expected, accepted)
        let table: &[(&[&str], bool)] = &[
            (&[], true),
            (&["a", "b"], true),
            (&["b", "a"], true),
            (&["a"], false),
            (&["a", "b", "c"], false),
            (&["c"], false),
        ];
        for (expected, accepted) in table {
            let got = check_members(&group, &members, &ids(expected));
            assert_eq!(got.is_ok(), *accepted, "{expected:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                assert!(e.to_string().contains("whose members are a, b"), "{e}");
            }
        }
    }
}
