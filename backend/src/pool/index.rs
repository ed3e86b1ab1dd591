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

use std::collections::HashMap;
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
            .field("volumes", &lock(&self.volumes).records.len())
            .field("snapshots", &lock(&self.snapshots).records.len())
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
    ids: Option<Ids>,
    records: HashMap<String, Record<M>>,
}

impl<M> Default for Entries<M> {
    fn default() -> Self {
        Entries {
            ids: None,
            records: HashMap::new(),
        }
    }
}

/// The valid IDs in a directory, sorted, as of a settled stamp of the directory.
struct Ids {
    stamp: Stamp,
    sorted: Arc<[String]>,
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
        if let Some(ids) = self.ids.as_ref().filter(|ids| ids.stamp == dir.stamp) {
            return Ok(Arc::clone(&ids.sorted));
        }
        let mut names: Vec<String> = fs
            .kind_names(dir)?
            .into_iter()
            .filter(|id| validate::check_id("id", id).is_ok())
            .collect();
        names.sort_unstable();
        let sorted: Arc<[String]> = names.into();
        // Records of entries gone from the directory are dropped with the old list.
        self.records
            .retain(|id, _| sorted.binary_search(id).is_ok());
        self.ids = dir.stamp.settled(read_at).then(|| Ids {
            stamp: dir.stamp,
            sorted: Arc::clone(&sorted),
        });
        Ok(sorted)
    }

    /// The record of `id` remembered with exactly this stamp.
    pub fn record(&self, id: &str, stamp: &Stamp) -> Option<Arc<M>> {
        self.records
            .get(id)
            .filter(|r| r.stamp == *stamp)
            .map(|r| Arc::clone(&r.meta))
    }

    /// Remembers the record of `id`, read after its stamp was taken (at `read_at` or later):
    /// only when the stamp was settled then; otherwise anything remembered is dropped, and the
    /// next listing reads it again.
    pub fn remember(&mut self, id: &str, stamp: Stamp, meta: &Arc<M>, read_at: SystemTime) {
        if stamp.settled(read_at) {
            let meta = Arc::clone(meta);
            match self.records.get_mut(id) {
                Some(r) => *r = Record { stamp, meta },
                None => {
                    self.records.insert(id.to_owned(), Record { stamp, meta });
                }
            }
        } else {
            self.forget(id);
        }
    }

    /// Drops what is remembered of `id` (it vanished, or is not plainly a record any more).
    pub fn forget(&mut self, id: &str) {
        self.records.remove(id);
    }

    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settled_records_are_remembered() {
        use std::time::Duration;
        let mut e: Entries<String> = Entries::default();
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let v1 = Arc::new("v1".to_owned());
        let stamp = Stamp::changed_at(7, 100, 0);
        // Read within the racy window of its change: not remembered.
        e.remember("a", stamp, &v1, at(101));
        assert!(e.record("a", &stamp).is_none());
        e.remember("a", stamp, &v1, at(200));
        assert_eq!(e.record("a", &stamp).as_deref(), Some(&"v1".to_owned()));
        // Another stamp (a new inode, a later change) is not this record.
        assert!(e.record("a", &Stamp::changed_at(8, 100, 0)).is_none());
        assert!(e.record("a", &Stamp::changed_at(7, 100, 1)).is_none());
        // A racy read of a changed record drops the old one.
        let changed = Stamp::changed_at(7, 300, 0);
        e.remember("a", changed, &v1, at(300));
        assert!(e.record("a", &stamp).is_none() && e.record("a", &changed).is_none());
        assert_eq!(e.remembered(), 0);
    }
}
