//! Listings of volumes and snapshots, in ID order, in pages whose tokens survive creations and
//! deletions. The IDs and the records come through the pool's [`index`](super::index): a page
//! costs a few stats per entry it returns, whatever the size of the pool.

use std::fmt::Display;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::ids::{SnapshotId, VolumeId};
use crate::kernel::KernelView;
use crate::meta::{SnapshotMeta, VolumeMeta};
use crate::validate;
use crate::volume::Condition;

use super::fsops::{EntryDir, ImageStat, KindDir, PoolFs, Stamp};
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

/// A volume of a listing, with its condition on this node.
#[derive(Debug, Clone)]
pub struct ListedVolume {
    pub meta: Arc<VolumeMeta>,
    pub condition: Condition,
}

impl Pool {
    /// Pages through the IDs of `kind` (`volumes`, `snapshots`) as the index has them, loading
    /// each entry with `load` (given the kind's directory, opened for this listing, the ID and
    /// its position in the index's list).
    fn page_of<T: Send>(
        &self,
        fs: &PoolFs,
        kind: Kind,
        read_at: SystemTime,
        starting_token: Option<&str>,
        max_entries: usize,
        load: impl Fn(&KindDir, usize, &str) -> Result<Option<T>> + Sync,
    ) -> Result<Page<T>> {
        let dir = fs.open_kind(Path::new(kind.dir()))?;
        let ids = match kind {
            Kind::Volumes => self.index.volumes().ids(fs, &dir, read_at)?,
            Kind::Snapshots => self.index.snapshots().ids(fs, &dir, read_at)?,
        };
        let fan = Fanout::for_pool(fs);
        Self::page(&ids, starting_token, max_entries, fan, |i, id| {
            load(&dir, i, id)
        })
    }

    /// Pages through sorted `ids`, loading each entry with `load` (given its position and ID;
    /// entries deleted meanwhile, or not committed yet, are skipped). The token names the last
    /// ID returned, so a page starts where the last one ended whatever was created or deleted
    /// meanwhile (see [`Pool::list_volume_entries`] for what paging guarantees). A page that
    /// takes every ID left is loaded by several threads (its cost is stats, in the kernel).
    fn page<T: Send>(
        ids: &[String],
        starting_token: Option<&str>,
        max_entries: usize,
        fan: Fanout,
        load: impl Fn(usize, &str) -> Result<Option<T>> + Sync,
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
        let rest = ids.len() - start;
        if max_entries == 0 || max_entries >= rest {
            return Ok(Page {
                entries: load_all(ids, start, fan, &load)?,
                next_token: None,
            });
        }
        let mut entries = Vec::new();
        let mut last = None;
        let mut iter = ids.iter().enumerate().skip(start);
        for (i, id) in iter.by_ref() {
            if let Some(entry) = load(i, id)? {
                entries.push(entry);
                last = Some(id);
                if entries.len() == max_entries {
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

    /// The volume `id` as a listing sees it: its record (the one the index remembers when its
    /// stamp is unchanged, else read now), and its image as stat'ed now when the entry is
    /// plainly loopvol's (`None`: not looked at; the condition asks the checked path). `None`
    /// when it has no committed record.
    fn listed_volume(
        &self,
        fs: &PoolFs,
        dir: &KindDir,
        (pos, id): (usize, &str),
        read_at: SystemTime,
    ) -> Result<Option<Listed<Found>>> {
        let vid = VolumeId::try_from(id)?; // the index keeps only valid IDs
        let Some(files) = fs.entry_files(dir, id, "volume.json", Some("image")) else {
            // Not plainly an entry of ours: the checked path says what it is.
            self.index.volumes().forget(id, pos);
            let read = read_volume_record(fs, &vid).map(|m| m.map(Arc::new));
            return Ok(listed(id, read).map(|l| l.map(|meta| Found { meta, image: None })));
        };
        let Some(stamp) = files.record else {
            self.index.volumes().forget(id, pos);
            return Ok(None);
        };
        let image = Some(files.image);
        let read = self.volume_record(fs, (pos, &vid), stamp, read_at);
        Ok(listed(id, read).map(|l| l.map(|meta| Found { meta, image })))
    }

    /// Volume `id`'s record (at `pos` in the index's IDs) whose stamp is `stamp`: the one the
    /// index remembers with that stamp, else read now (and remembered when settled). `None` when
    /// it vanished meanwhile.
    fn volume_record(
        &self,
        fs: &PoolFs,
        (pos, id): (usize, &VolumeId),
        stamp: Stamp,
        read_at: SystemTime,
    ) -> Result<Option<Arc<VolumeMeta>>> {
        if let Some(meta) = self.index.volumes().record(id.as_str(), pos, &stamp) {
            return Ok(Some(meta));
        }
        let read = read_volume_record(fs, id).map(|m| m.map(Arc::new));
        match &read {
            Ok(Some(meta)) => self
                .index
                .volumes()
                .remember(id.as_str(), pos, stamp, meta, read_at),
            _ => self.index.volumes().forget(id.as_str(), pos),
        }
        read
    }

    /// Volumes in ID order, a volume whose record cannot be used as a [`BadEntry`] (one bad entry
    /// never fails the listing). `max_entries` 0 means all. An unknown token is
    /// `InvalidArgument` (CSI maps a bad token in a list call to ABORTED).
    ///
    /// **Paging** (what CSI asks: "the CO SHALL NOT expect a consistent view" across pages, and
    /// may see volumes created or deleted meanwhile, or not): a token is the last ID returned,
    /// so pages never repeat a volume, and every volume that exists from the first page to the
    /// last is listed exactly once, in ID order. A volume created meanwhile is listed when its ID
    /// sorts after the page it was created behind (else by the next listing); one deleted
    /// meanwhile is listed only if it was before it was deleted. Tokens hold no state: any
    /// server of the pool (a new controller leader, a restarted one) continues a listing.
    pub fn list_volume_entries(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<Listed<VolumeMeta>>> {
        let page = self.volume_page(starting_token, max_entries)?;
        Ok(map_page(page, |found| Arc::unwrap_or_clone(found.meta)))
    }

    /// [`Pool::list_volume_entries`] without the bad entries (each is logged as a warning).
    pub fn list_volumes(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<VolumeMeta>> {
        let page = self.list_volume_entries(starting_token, max_entries)?;
        Ok(Page {
            entries: page.entries.into_iter().filter_map(skip_bad).collect(),
            next_token: page.next_token,
        })
    }

    /// [`Pool::list_volume_entries`] with each volume's condition on this node, from one look at
    /// the kernel for the whole page (read only when a volume of the page is staged here).
    pub fn list_volumes_with_conditions(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<Listed<ListedVolume>>> {
        let page = self.volume_page(starting_token, max_entries)?;
        let staged_here = page
            .entries
            .iter()
            .flatten()
            .any(|f| f.meta.staged.iter().any(|h| h.node == *self.node()));
        let view = staged_here.then(KernelView::read).transpose()?;
        let fs = self.fs()?;
        let mut entries = Vec::with_capacity(page.entries.len());
        for entry in page.entries {
            entries.push(match entry {
                Err(bad) => Err(bad),
                Ok(Found { meta, image }) => {
                    let image = match image {
                        Some(stat) => Ok(stat),
                        None => fs.stat_image(&layout::volume_image(&meta.id)),
                    };
                    let condition = self.condition_with(view.as_ref(), &meta, image)?;
                    Ok(ListedVolume { meta, condition })
                }
            });
        }
        Ok(Page {
            entries,
            next_token: page.next_token,
        })
    }

    fn volume_page(
        &self,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<Listed<Found>>> {
        let read_at = SystemTime::now();
        let fs = self.fs()?;
        self.page_of(
            &fs,
            Kind::Volumes,
            read_at,
            starting_token,
            max_entries,
            |dir, pos, id| self.listed_volume(&fs, dir, (pos, id), read_at),
        )
    }

    /// Snapshots in ID order, optionally only those of `source`. CSI has no place for a broken
    /// snapshot in a listing, so a snapshot whose record cannot be used is skipped with a
    /// warning naming the file (one bad entry never fails the listing). Paging as for volumes
    /// ([`Pool::list_volume_entries`]).
    pub fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        starting_token: Option<&str>,
        max_entries: usize,
    ) -> Result<Page<SnapshotMeta>> {
        let read_at = SystemTime::now();
        let fs = self.fs()?;
        let page = self.page_of(
            &fs,
            Kind::Snapshots,
            read_at,
            starting_token,
            max_entries,
            |dir, pos, id| {
                let m = self
                    .listed_snapshot(&fs, dir, (pos, id), read_at)?
                    .and_then(skip_bad);
                Ok(m.filter(|m| source.is_none_or(|s| m.source_volume_id == *s)))
            },
        )?;
        Ok(Page {
            entries: page.entries.into_iter().map(Arc::unwrap_or_clone).collect(),
            next_token: page.next_token,
        })
    }

    /// The snapshot `id` as a listing sees it (see [`Pool::listed_volume`]).
    fn listed_snapshot(
        &self,
        fs: &PoolFs,
        dir: &KindDir,
        (pos, id): (usize, &str),
        read_at: SystemTime,
    ) -> Result<Option<Listed<Arc<SnapshotMeta>>>> {
        let sid = SnapshotId::try_from(id)?;
        let read = || read_snapshot_record(fs, &sid).map(|m| m.map(Arc::new));
        let Some(files) = fs.entry_files(dir, id, "snapshot.json", None) else {
            self.index.snapshots().forget(id, pos);
            return Ok(listed(id, read()));
        };
        let Some(stamp) = files.record else {
            self.index.snapshots().forget(id, pos);
            return Ok(None);
        };
        if let Some(meta) = self.index.snapshots().record(id, pos, &stamp) {
            return Ok(Some(Ok(meta)));
        }
        let read = read();
        match &read {
            Ok(Some(meta)) => self
                .index
                .snapshots()
                .remember(id, pos, stamp, meta, read_at),
            _ => self.index.snapshots().forget(id, pos),
        }
        Ok(listed(id, read))
    }

    /// The volume directories as the index has them, for a pass over every volume (capacity):
    /// the IDs without reading the directory unless it changed.
    pub(crate) fn volume_dirs(&self, fs: &PoolFs) -> Result<VolumeDirs> {
        let read_at = SystemTime::now();
        let dir = fs.open_kind(Path::new(Kind::Volumes.dir()))?;
        let ids = self.index.volumes().ids(fs, &dir, read_at)?;
        Ok(VolumeDirs { dir, ids, read_at })
    }

    /// The record of the volume at `pos` in `dirs`, whose directory is open as `entry`: the one
    /// the index remembers when its stamp is unchanged, else read now. `None` when it has none,
    /// or it is not plainly a record (the checked path is the caller's).
    pub(crate) fn indexed_volume(
        &self,
        fs: &PoolFs,
        dirs: &VolumeDirs,
        entry: &EntryDir,
        (pos, id): (usize, &VolumeId),
    ) -> Option<Arc<VolumeMeta>> {
        let stamp = entry.record("volume.json")??;
        self.volume_record(fs, (pos, id), stamp, dirs.read_at)
            .ok()
            .flatten()
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

/// How a pass over a pool's entries ([`load_all`]) is spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fanout {
    threads: usize,
    /// The fewest entries a pass spreads over threads.
    from: usize,
}

impl Fanout {
    /// For the filesystem the pool is on. Locally an entry costs microseconds of CPU (stats, in
    /// the kernel): a few threads, for long passes only. On a cluster filesystem it costs round
    /// trips to the server (about 0.4 ms an entry on GlusterFS) during which a thread only
    /// waits: many threads, from a few dozen entries on (measured on GlusterFS: a create's
    /// admission over 1 000 volumes took 0.49 s on one thread).
    pub(crate) fn for_pool(fs: &PoolFs) -> Fanout {
        if fs.is_local() {
            Fanout {
                threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
                from: 1024,
            }
        } else {
            Fanout {
                threads: 16,
                from: 32,
            }
        }
    }
}

/// Loads every entry of `ids` from `start`, in order, skipping those `load` finds nothing for:
/// on several threads when there are many (each takes a contiguous run of IDs).
pub(super) fn load_all<T: Send>(
    ids: &[String],
    start: usize,
    fan: Fanout,
    load: &(impl Fn(usize, &str) -> Result<Option<T>> + Sync),
) -> Result<Vec<T>> {
    let run = |from: usize, to: usize| -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(to - from);
        for (i, id) in ids.iter().enumerate().take(to).skip(from) {
            out.extend(load(i, id)?);
        }
        Ok(out)
    };
    let rest = ids.len() - start;
    if fan.threads < 2 || rest < fan.from {
        return run(start, ids.len());
    }
    let chunk = rest.div_ceil(fan.threads);
    let parts: Vec<Result<Vec<T>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (start..ids.len())
            .step_by(chunk)
            .map(|from| s.spawn(move || run(from, (from + chunk).min(ids.len()))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut entries = Vec::with_capacity(rest);
    for part in parts {
        entries.extend(part?);
    }
    Ok(entries)
}

/// The volume directories of one pass over the pool (see [`Pool::volume_dirs`]).
pub(crate) struct VolumeDirs {
    pub dir: KindDir,
    pub ids: Arc<[String]>,
    read_at: SystemTime,
}

/// A committed volume as a listing found it.
struct Found {
    meta: Arc<VolumeMeta>,
    /// Its image as stat'ed with the record, when the entry is plainly loopvol's; `None`: not
    /// looked at (the condition asks the checked path).
    image: Option<Option<ImageStat>>,
}

/// The two kinds of entry a listing pages through.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Volumes,
    Snapshots,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Volumes => "volumes",
            Kind::Snapshots => "snapshots",
        }
    }
}

fn map_page<A, B>(page: Page<Listed<A>>, f: impl Fn(A) -> B) -> Page<Listed<B>> {
    Page {
        entries: page.entries.into_iter().map(|e| e.map(&f)).collect(),
        next_token: page.next_token,
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
mod tests;
