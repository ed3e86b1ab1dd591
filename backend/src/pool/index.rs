//! The listings' memory between calls: the sorted IDs of `volumes/` and `snapshots/`, and each
//! committed record as last read. With it a page costs in proportion to the page (no directory
//! read, no sort), and a listing a few stats per entry instead of a read and a parse of each
//! record.
//!
//! Nothing here is believed on its own: the pool stays the truth, and is asked on every call.
//! - The IDs are read again when their directory's [`Stamp`] changed (creating, removing or
//!   renaming an entry changes it) or was not settled when they were read.
//! - A record is read again when its stamp (a `statx` from the entry's directory, no link
//!   followed) changed or was not settled when it was read. loopvol replaces a record by a
//!   rename (a new inode), and any write changes the stamp's times.
//! - What a volume's condition needs (its image) is stat'ed by every listing, never remembered.
//! - Anything that is not plainly what loopvol makes, or any error, takes the checked path of the
//!   pool-access layer, and is never remembered.
//!
//! So an entry made or removed behind the index's back (by another process, another node of a
//! shared pool, an operator, a crash half-way) is seen by the next call, and nothing here outlives
//! the process: a new one starts empty and fills it from the pool. Memory: an ID and a record per
//! entry (a few hundred bytes; about 5 MiB for 10 000 volumes).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::error::Result;
use crate::meta::{SnapshotMeta, VolumeMeta};
use crate::validate;

use super::fsops::{KindDir, PoolFs, Stamp};

/// What the listings remember of a pool.
#[derive(Default)]
pub(crate) struct Index {
    volumes: Mutex<Entries<VolumeMeta>>,
    snapshots: Mutex<Entries<SnapshotMeta>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("volumes", &lock(&self.volumes).ids.len())
            .field("snapshots", &lock(&self.snapshots).ids.len())
            .finish()
    }
}

impl Index {
    pub fn volumes(&self) -> MutexGuard<'_, Entries<VolumeMeta>> {
        lock(&self.volumes)
    }

    pub fn snapshots(&self) -> MutexGuard<'_, Entries<SnapshotMeta>> {
        lock(&self.snapshots)
    }
}

/// A panic elsewhere while holding the lock leaves nothing half-updated that matters: every
/// entry is checked against the pool before use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The IDs and records of one kind of entry.
pub(crate) struct Entries<M> {
    /// The directory's stamp when `ids` was read, if it was settled then (else the next call
    /// reads the IDs again).
    stamp: Option<Stamp>,
    /// The valid IDs last read, sorted.
    ids: Arc<[String]>,
    /// The record remembered for each ID of `ids`, at the same position.
    records: Vec<Option<Record<M>>>,
}

impl<M> Default for Entries<M> {
    fn default() -> Self {
        Entries {
            stamp: None,
            ids: Arc::from([]),
            records: Vec::new(),
        }
    }
}

/// A record as read when its stamp was settled.
struct Record<M> {
    stamp: Stamp,
    meta: Arc<M>,
}

impl<M> Entries<M> {
    /// The valid IDs in `dir` (opened for this listing at `read_at` or later), sorted: the ones
    /// remembered when the directory is unchanged since a settled read, else read now.
    pub fn ids(
        &mut self,
        fs: &PoolFs,
        dir: &KindDir,
        read_at: SystemTime,
    ) -> Result<Arc<[String]>> {
        if self.stamp == Some(dir.stamp) {
            return Ok(Arc::clone(&self.ids));
        }
        let mut names: Vec<String> = fs
            .kind_names(dir)?
            .into_iter()
            .filter(|id| validate::check_id("id", id).is_ok())
            .collect();
        names.sort_unstable();
        // Records move to their IDs' new positions; those of entries gone are dropped.
        let mut old = std::mem::take(&mut self.records)
            .into_iter()
            .zip(self.ids.iter());
        let mut next = old.next();
        let mut records = Vec::with_capacity(names.len());
        for id in &names {
            while next
                .as_ref()
                .is_some_and(|(_, old_id)| old_id.as_str() < id.as_str())
            {
                next = old.next();
            }
            records.push(match next.take() {
                Some((record, old_id)) if old_id == id => {
                    next = old.next();
                    record
                }
                other => {
                    next = other;
                    None
                }
            });
        }
        self.ids = names.into();
        self.records = records;
        self.stamp = dir.stamp.settled(read_at).then_some(dir.stamp);
        Ok(Arc::clone(&self.ids))
    }

    /// Where `id` is in the current IDs: at `hint` (its position in the list the caller got
    /// from [`Entries::ids`]) unless another call read the IDs again meanwhile.
    fn slot(&self, id: &str, hint: usize) -> Option<usize> {
        if self.ids.get(hint).is_some_and(|at| at == id) {
            return Some(hint);
        }
        self.ids.binary_search_by(|at| at.as_str().cmp(id)).ok()
    }

    /// The record of `id` (at `hint`) remembered with exactly this stamp.
    pub fn record(&self, id: &str, hint: usize, stamp: &Stamp) -> Option<Arc<M>> {
        let slot = self.slot(id, hint)?;
        self.records[slot]
            .as_ref()
            .filter(|r| r.stamp == *stamp)
            .map(|r| Arc::clone(&r.meta))
    }

    /// Remembers the record of `id` (at `hint`), read after its stamp was taken (at `read_at`
    /// or later): only when the stamp was settled then; otherwise anything remembered is
    /// dropped, and the next listing reads it again.
    pub fn remember(
        &mut self,
        id: &str,
        hint: usize,
        stamp: Stamp,
        meta: &Arc<M>,
        read_at: SystemTime,
    ) {
        if let Some(slot) = self.slot(id, hint) {
            self.records[slot] = stamp.settled(read_at).then(|| Record {
                stamp,
                meta: Arc::clone(meta),
            });
        }
    }

    /// Drops what is remembered of `id` (it vanished, or is not plainly a record any more).
    pub fn forget(&mut self, id: &str, hint: usize) {
        if let Some(slot) = self.slot(id, hint) {
            self.records[slot] = None;
        }
    }

    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.records.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn with_ids(ids: &[&str]) -> Entries<String> {
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        Entries {
            stamp: None,
            records: ids.iter().map(|_| None).collect(),
            ids: ids.into(),
        }
    }

    #[test]
    fn only_settled_records_are_remembered() {
        let mut e = with_ids(&["a", "b"]);
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let v1 = Arc::new("v1".to_owned());
        let stamp = Stamp::changed_at(7, 100, 0);
        // Read within the racy window of its change: not remembered.
        e.remember("a", 0, stamp, &v1, at(101));
        assert!(e.record("a", 0, &stamp).is_none());
        e.remember("a", 0, stamp, &v1, at(200));
        assert_eq!(e.record("a", 0, &stamp).as_deref(), Some(&"v1".to_owned()));
        // A wrong hint still finds it; an ID not in the list has nothing.
        assert!(e.record("a", 1, &stamp).is_some() && e.record("c", 0, &stamp).is_none());
        // Another stamp (a new inode, a later change) is not this record.
        assert!(e.record("a", 0, &Stamp::changed_at(8, 100, 0)).is_none());
        assert!(e.record("a", 0, &Stamp::changed_at(7, 100, 1)).is_none());
        // A racy read of a changed record drops the old one.
        let changed = Stamp::changed_at(7, 300, 0);
        e.remember("a", 0, changed, &v1, at(300));
        assert!(e.record("a", 0, &stamp).is_none() && e.record("a", 0, &changed).is_none());
        assert_eq!(e.remembered(), 0);
    }

    #[test]
    fn records_follow_their_ids_when_the_ids_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("volumes")).unwrap();
        let fs = PoolFs::open(dir.path()).unwrap();
        let make = |names: &[&str]| {
            for n in names {
                std::fs::create_dir(dir.path().join("volumes").join(n)).unwrap();
            }
        };
        make(&["b", "d", "f"]);
        let later = SystemTime::now() + Duration::from_secs(60);
        let mut e: Entries<String> = Entries::default();
        let kind = fs.open_kind(Path::new("volumes")).unwrap();
        assert_eq!(&*e.ids(&fs, &kind, later).unwrap(), ["b", "d", "f"]);
        let stamp = Stamp::changed_at(1, 1, 0);
        for (i, id) in ["b", "d", "f"].iter().enumerate() {
            e.remember(id, i, stamp, &Arc::new(id.to_string()), later);
        }
        make(&["a", "c", "e"]);
        std::fs::remove_dir(dir.path().join("volumes/d")).unwrap();
        // Not re-read while the directory's stamp is the one remembered.
        assert_eq!(e.ids(&fs, &kind, later).unwrap().len(), 3);
        let kind = fs.open_kind(Path::new("volumes")).unwrap();
        let ids = e.ids(&fs, &kind, later).unwrap();
        assert_eq!(&*ids, ["a", "b", "c", "e", "f"]);
        let kept: Vec<Option<String>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| e.record(id, i, &stamp).map(|m| m.to_string()))
            .collect();
        assert_eq!(kept, [None, Some("b".into()), None, None, Some("f".into())]);
        assert_eq!(e.remembered(), 2);
    }
}
