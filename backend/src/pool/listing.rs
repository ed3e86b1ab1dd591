//! Listings of volumes and snapshots, in ID order, in pages whose tokens survive deletions.

use std::fmt::Display;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::ids::{SnapshotId, VolumeId};
use crate::meta::{SnapshotMeta, VolumeMeta};
use crate::validate;

use super::fsops::PoolFs;
use super::{layout, Pool};

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub entries: Vec<T>,
    /// Token for the next page; `None` at the end.
    pub next_token: Option<String>,
}

const TOKEN_PREFIX: &str = "after:";

/// A volume or snapshot whose record cannot be used (a planted entry, corrupt metadata): its ID
/// (the directory's name) and why, naming the file. Listings report it instead of failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    pub id: String,
    pub reason: String,
}

/// One entry of a listing: the record, or why it cannot be read.
pub type Listed<T> = std::result::Result<T, BadEntry>;

impl Pool {
    /// Sorted IDs of the entries under `kind` that have committed metadata, or something in its
    /// place (reported by the listing as a [`BadEntry`]).
    fn committed_ids(&self, fs: &PoolFs, kind: &str, meta_file: &str) -> Result<Vec<String>> {
        let dir = Path::new(kind);
        let mut ids: Vec<String> = fs
            .list_names(dir)?
            .into_iter()
            .filter(|id| validate::check_id("id", id).is_ok())
            .filter(|id| !matches!(fs.exists(&dir.join(id).join(meta_file)), Ok(false)))
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

    /// Volumes in ID order, a volume whose record cannot be used as a [`BadEntry`] (one bad entry
    /// never fails the listing). `max_entries` 0 means all. An unknown token is
    /// `InvalidArgument` (CSI maps a bad token in a list call to ABORTED).
    pub fn list_volume_entries(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<Listed<VolumeMeta>>> {
        let fs = self.fs()?;
        let ids = self.committed_ids(&fs, "volumes", "volume.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            // `committed_ids` kept only valid IDs.
            let vid = VolumeId::try_from(id)?;
            Ok(listed(id, read_volume_record(&fs, &vid)))
        })
    }

    /// [`Pool::list_volume_entries`] without the bad entries (each is logged as a warning).
    pub fn list_volumes(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<VolumeMeta>> {
        let fs = self.fs()?;
        let ids = self.committed_ids(&fs, "volumes", "volume.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            let vid = VolumeId::try_from(id)?;
            Ok(listed(id, read_volume_record(&fs, &vid)).and_then(skip_bad))
        })
    }

    /// Snapshots in ID order, optionally only those of `source`. CSI has no place for a broken
    /// snapshot in a listing, so a snapshot whose record cannot be used is skipped with a
    /// warning naming the file (one bad entry never fails the listing).
    pub fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<SnapshotMeta>> {
        let fs = self.fs()?;
        let ids = self.committed_ids(&fs, "snapshots", "snapshot.json")?;
        Self::page(ids, starting_token, max_entries, |id| {
            let sid = SnapshotId::try_from(id)?;
            let m = listed(id, read_snapshot_record(&fs, &sid)).and_then(skip_bad);
            Ok(m.filter(|m| source.is_none_or(|s| m.source_volume_id == *s)))
        })
    }

    /// A volume's committed metadata, `None` when there is none; read without its lock (the
    /// record is replaced atomically). Refused as corrupt when it names another volume.
    pub(crate) fn read_volume_meta(&self, id: &VolumeId) -> Result<Option<VolumeMeta>> {
        read_volume_record(&self.fs()?, id)
    }

    /// A snapshot's committed metadata, `None` when there is none.
    pub(crate) fn read_snapshot_meta(&self, id: &SnapshotId) -> Result<Option<SnapshotMeta>> {
        read_snapshot_record(&self.fs()?, id)
    }
}

fn read_volume_record(fs: &PoolFs, id: &VolumeId) -> Result<Option<VolumeMeta>> {
    read_record(
        fs,
        &layout::volume_meta(id),
        id,
        "volume",
        |m: &VolumeMeta| (&m.id, m.check()),
    )
}

fn read_snapshot_record(fs: &PoolFs, id: &SnapshotId) -> Result<Option<SnapshotMeta>> {
    read_record(
        fs,
        &layout::snapshot_meta(id),
        id,
        "snapshot",
        |m: &SnapshotMeta| (&m.id, m.check()),
    )
}

/// A listing's view of one record read: `None` when it vanished meanwhile.
fn listed<T>(id: &str, read: Result<Option<T>>) -> Option<Listed<T>> {
    match read {
        Ok(Some(m)) => Some(Ok(m)),
        Ok(None) => None,
        Err(e) => Some(Err(BadEntry {
            id: id.to_owned(),
            reason: e.to_string(),
        })),
    }
}

fn skip_bad<T>(entry: Listed<T>) -> Option<T> {
    match entry {
        Ok(m) => Some(m),
        Err(bad) => {
            tracing::warn!(id = %bad.id, reason = %bad.reason, "skipped in a listing");
            None
        }
    }
}

/// Reads the record of `what` `id` at `rel`, refused as corrupt when it records another ID or
/// fails `check` (what the typed fields cannot say: names, schema).
fn read_record<T: DeserializeOwned, I: PartialEq + Display>(
    fs: &PoolFs,
    rel: &Path,
    id: &I,
    what: &str,
    id_and_check: impl Fn(&T) -> (&I, std::result::Result<(), String>),
) -> Result<Option<T>> {
    let Some(record) = fs.read_json::<T>(rel)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| Error::Metadata {
        path: fs.path(rel),
        reason,
    };
    let (recorded, checked) = id_and_check(&record);
    if recorded != id {
        return Err(corrupt(format!("it records {what} {recorded}, not {id}")));
    }
    checked.map_err(corrupt)?;
    Ok(Some(record))
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
