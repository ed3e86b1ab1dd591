//! Listings of volumes and snapshots, in ID order, in pages whose tokens survive deletions.

use std::fmt::Display;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::ids::{SnapshotId, VolumeId};
use crate::meta::{SnapshotMeta, VolumeMeta};
use crate::validate;

use super::{fsops, Pool};

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub entries: Vec<T>,
    /// Token for the next page; `None` at the end.
    pub next_token: Option<String>,
}

const TOKEN_PREFIX: &str = "after:";

impl Pool {
    /// Sorted IDs of the entries under `kind` that have committed metadata.
    fn committed_ids(&self, kind: &str, meta_file: &str) -> Result<Vec<String>> {
        let dir = self.root.join(kind);
        let mut ids: Vec<String> = fsops::list_names(&dir)?
            .into_iter()
            .filter(|id| validate::check_id("id", id).is_ok())
            .filter(|id| fsops::exists(&dir.join(id).join(meta_file)))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Pages through sorted `ids`, loading each entry with `load` (entries deleted meanwhile are
    /// skipped). The token names the last ID returned, so deletions between pages lose nothing.
    fn page<T>(
        ids: Vec<String>,
        starting_token: Option<&str>,
        max_entries: usize,
        mut load: impl FnMut(&str) -> Result<Option<T>>,
    ) -> Result<Page<T>> {
        let start = match starting_token.filter(|t| !t.is_empty()) {
            None => 0,
            Some(token) => {
                let after = token
                    .strip_prefix(TOKEN_PREFIX)
                    .filter(|id| validate::check_id("token", id).is_ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            "starting token",
                            format!("{token:?} was not issued by this driver"),
                        )
                    })?;
                ids.partition_point(|id| id.as_str() <= after)
            }
        };
        let max = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries
        };
        let mut entries = Vec::new();
        let mut last = None;
        let mut iter = ids[start..].iter();
        for id in iter.by_ref() {
            if let Some(entry) = load(id)? {
                entries.push(entry);
                last = Some(id.clone());
                if entries.len() == max {
                    break;
                }
            }
        }
        let more = iter.len() > 0;
        Ok(Page {
            entries,
            next_token: if more {
                last.map(|id| format!("{TOKEN_PREFIX}{id}"))
            } else {
                None
            },
        })
    }

    /// Volumes in ID order. `max_entries` 0 means all. An unknown token is `InvalidArgument`
    /// (CSI maps a bad token in a list call to ABORTED).
    pub fn list_volumes(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<VolumeMeta>> {
        let ids = self.committed_ids("volumes", "volume.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            // `committed_ids` kept only valid IDs.
            let id = VolumeId::try_from(id)?;
            self.read_volume_meta(&id)
        })
    }

    /// Snapshots in ID order, optionally only those of `source`.
    pub fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<SnapshotMeta>> {
        let ids = self.committed_ids("snapshots", "snapshot.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            let id = SnapshotId::try_from(id)?;
            let m = self.read_snapshot_meta(&id)?;
            Ok(m.filter(|m| source.is_none_or(|s| m.source_volume_id == *s)))
        })
    }

    /// A volume's committed metadata, `None` when there is none; read without its lock (the
    /// record is replaced atomically). Refused as corrupt when it names another volume.
    pub(crate) fn read_volume_meta(&self, id: &VolumeId) -> Result<Option<VolumeMeta>> {
        read_record(
            &self.volume_meta_path(id),
            id,
            "volume",
            |m: &VolumeMeta| &m.id,
        )
    }

    /// A snapshot's committed metadata, `None` when there is none.
    pub(crate) fn read_snapshot_meta(&self, id: &SnapshotId) -> Result<Option<SnapshotMeta>> {
        read_record(
            &self.snapshot_meta_path(id),
            id,
            "snapshot",
            |m: &SnapshotMeta| &m.id,
        )
    }
}

/// Reads the record of `what` `id` at `path`, refused as corrupt when it records another ID.
fn read_record<T: DeserializeOwned, I: PartialEq + Display>(
    path: &Path,
    id: &I,
    what: &str,
    id_of: impl Fn(&T) -> &I,
) -> Result<Option<T>> {
    let record: Option<T> = fsops::read_json(path)?;
    match record {
        Some(r) if id_of(&r) != id => Err(Error::Metadata {
            path: path.to_owned(),
            reason: format!("it records {what} {}, not {id}", id_of(&r)),
        }),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_is_stable_and_tokens_are_checked() {
        let ids: Vec<String> = (0..7).map(|i| format!("v{i}")).collect();
        let load = |id: &str| Ok(Some(id.to_owned()));
        let p1 = Pool::page(ids.clone(), None, 3, load).unwrap();
        assert_eq!(p1.entries, ["v0", "v1", "v2"]);
        let t = p1.next_token.unwrap();
        let p2 = Pool::page(ids.clone(), Some(&t), 3, load).unwrap();
        assert_eq!(p2.entries, ["v3", "v4", "v5"]);
        // v3 deleted between pages: the next page still starts after v5.
        let mut fewer = ids.clone();
        fewer.retain(|i| i != "v3");
        let p3 = Pool::page(fewer, p2.next_token.as_deref(), 3, load).unwrap();
        assert_eq!(p3.entries, ["v6"]);
        assert_eq!(p3.next_token, None);
        let all = Pool::page(ids.clone(), None, 0, load).unwrap();
        assert_eq!(all.entries.len(), 7);
        assert!(all.next_token.is_none());
        let exact = Pool::page(ids.clone(), None, 7, load).unwrap();
        assert!(exact.next_token.is_none());
        for bad in ["garbage", "after:../x", "after:"] {
            let err = Pool::page(ids.clone(), Some(bad), 3, load).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }
}
