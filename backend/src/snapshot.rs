//! Snapshots: independent copies of a volume's image (reflinked where the pool's filesystem can),
//! taken with the volume's filesystem frozen. A snapshot outlives its source.

use crate::copy;
use crate::error::{Context, Error, Result};
use crate::freeze;
use crate::meta::{self, SnapshotMeta, VolumeMeta};
use crate::pool::Pool;
use crate::validate;

impl Pool {
    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotMeta> {
        validate::check_id("snapshot ID", id)?;
        meta::read(&self.snapshot_meta_path(id))?.ok_or_else(|| Error::not_found("snapshot", id))
    }

    /// Snapshots volume `source_id` under `name`. Idempotent by name: the same name and source
    /// return the existing snapshot; the same name with another source is `AlreadyExists`.
    pub fn create_snapshot(&self, name: &str, source_id: &str) -> Result<SnapshotMeta> {
        validate::check_name("snapshot name", name)?;
        validate::check_id("source volume ID", source_id)?;
        let id = validate::id_for_name(name);
        let mut group =
            self.create_snapshots(&[(id, name.to_owned(), source_id.to_owned())], None)?;
        Ok(group.remove(0))
    }

    /// Snapshots several volumes at one point in time: all are frozen together, then copied.
    /// Members are named `<group name>/<volume ID>` and carry the group's ID.
    pub fn create_group_snapshot(
        &self,
        name: &str,
        source_ids: &[String],
    ) -> Result<(String, Vec<SnapshotMeta>)> {
        validate::check_name("group snapshot name", name)?;
        if source_ids.is_empty() {
            return Err(Error::invalid("source volume IDs", "must not be empty"));
        }
        let mut sorted = source_ids.to_vec();
        sorted.sort();
        sorted.dedup();
        for s in &sorted {
            validate::check_id("source volume ID", s)?;
        }
        let group_id = validate::id_for_name(name);
        // Idempotent by name: a repeat must name the same volumes. Members already committed
        // must all be among the requested ones (a subset is an interrupted earlier call that
        // this one finishes).
        match self.get_group_snapshot(&group_id) {
            Ok(existing) => {
                let have: Vec<&str> = existing
                    .iter()
                    .map(|s| s.source_volume_id.as_str())
                    .collect();
                if have.iter().any(|v| !sorted.iter().any(|s| s == v)) {
                    return Err(Error::AlreadyExists {
                        what: "group snapshot",
                        id: group_id,
                        detail: format!("source volumes ({})", have.join(", ")),
                    });
                }
            }
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let members: Vec<(String, String, String)> = sorted
            .iter()
            .map(|v| {
                let member_name = format!("{name}/{v}");
                (validate::id_for_name(&member_name), member_name, v.clone())
            })
            .collect();
        let snaps = self.create_snapshots(&members, Some(&group_id))?;
        Ok((group_id, snaps))
    }

    /// The members of group snapshot `group_id`, in ID order.
    pub fn get_group_snapshot(&self, group_id: &str) -> Result<Vec<SnapshotMeta>> {
        validate::check_id("group snapshot ID", group_id)?;
        let members: Vec<SnapshotMeta> = self
            .list_snapshots(None, None, 0)?
            .entries
            .into_iter()
            .filter(|s| s.group_id.as_deref() == Some(group_id))
            .collect();
        if members.is_empty() {
            return Err(Error::not_found("group snapshot", group_id));
        }
        Ok(members)
    }

    /// Creates (or finds) each `(id, name, source)` snapshot, all copies made under one freeze.
    fn create_snapshots(
        &self,
        members: &[(String, String, String)],
        group_id: Option<&str>,
    ) -> Result<Vec<SnapshotMeta>> {
        // Lock order everywhere: snapshot, then volume.
        let mut guards = Vec::new();
        for (id, _, _) in members {
            guards.push(self.lock_snapshot(id)?);
        }
        let mut done: Vec<Option<SnapshotMeta>> = Vec::new();
        for (id, name, source) in members {
            match meta::read::<SnapshotMeta>(&self.snapshot_meta_path(id))? {
                Some(existing)
                    if existing.source_volume_id == *source && existing.name == *name =>
                {
                    done.push(Some(existing))
                }
                Some(existing) => {
                    return Err(Error::AlreadyExists {
                        what: "snapshot",
                        id: id.clone(),
                        detail: format!("source (volume {})", existing.source_volume_id),
                    })
                }
                None => done.push(None),
            }
        }
        let todo: Vec<usize> = (0..members.len()).filter(|i| done[*i].is_none()).collect();
        if todo.is_empty() {
            return Ok(done.into_iter().flatten().collect());
        }
        let mut sources: Vec<VolumeMeta> = Vec::new();
        for i in &todo {
            let source = &members[*i].2;
            guards.push(self.lock_volume(source)?);
            sources.push(self.get_volume(source)?);
        }
        // Without reflinks a copy takes the source's allocated bytes.
        let needed: u64 = todo
            .iter()
            .map(|i| allocated_bytes(&self.volume_image(&members[*i].2)))
            .sum();
        let free = self.capacity()?.free_bytes;
        if needed > free {
            return Err(Error::NoSpace(format!(
                "snapshot needs up to {needed} bytes; the pool has {free} free"
            )));
        }
        for i in &todo {
            let dir = self.snapshot_dir(&members[*i].0);
            if dir.exists() {
                self.remove_dir_atomically(&dir)?; // leftovers of an interrupted attempt
            }
            std::fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        }
        {
            let ids: Vec<&str> = todo.iter().map(|i| members[*i].2.as_str()).collect();
            let _frozen = freeze::freeze_volumes(self, &ids)?;
            for i in &todo {
                let (id, _, source) = &members[*i];
                let tmp = self.snapshot_dir(id).join("image.tmp");
                let method = copy::copy_image(&self.volume_image(source), &tmp)?;
                tracing::info!(snapshot = %id, volume = %source, ?method, "copied image");
            }
        }
        for (k, i) in todo.iter().enumerate() {
            let (id, name, source) = &members[*i];
            let tmp = self.snapshot_dir(id).join("image.tmp");
            std::fs::rename(&tmp, self.snapshot_image(id))
                .context(|| format!("commit image of snapshot {id}"))?;
            let m = SnapshotMeta {
                schema: meta::SCHEMA_VERSION,
                id: id.clone(),
                name: name.clone(),
                source_volume_id: source.clone(),
                size_bytes: sources[k].size_bytes,
                fs_type: sources[k].fs_type,
                created_unix: meta::now_unix(),
                group_id: group_id.map(str::to_owned),
            };
            meta::write(&self.snapshot_meta_path(id), &m)?;
            done[*i] = Some(m);
        }
        Ok(done.into_iter().flatten().collect())
    }

    /// Deletes a snapshot; unknown IDs succeed. Volumes restored from it are independent copies,
    /// so a snapshot is never in use.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        validate::check_id("snapshot ID", id)?;
        let _guard = self.lock_snapshot(id)?;
        self.remove_dir_atomically(&self.snapshot_dir(id))?;
        tracing::info!(snapshot = %id, "deleted snapshot");
        Ok(())
    }
}

fn allocated_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}
