//! The pool's space model, in one place: what every volume may still take from the pool, what
//! the pool can still promise, and the admission that hands promises out.
//!
//! **What a volume may still take** (its *need*) is its size minus the bytes its image owns
//! alone: holes (a thin volume's unwritten space, or a thick one's trimmed blocks) and blocks it
//! shares with a snapshot or a clone (a write over a shared block is copied first: new space).
//! Shared blocks are read from the extent map (`FIEMAP_EXTENT_SHARED`); on filesystems that
//! cannot share (ext4) the allocated block count is all a volume's own. Snapshots need nothing:
//! they are never written. An image being made (`image.tmp`) counts at its full length, as thick.
//!
//! **The promise** (checked by every admission, reported by GetCapacity, one function for both):
//! ```text
//! usable  = free − reserve
//! hard    = usable − Σ need(thick)          thick is never overcommitted: hard ≥ 0
//! thin    ≤ hard × overcommit               overcommit applies to thin promises only
//! ```
//! A new thin volume of `x` fits while `Σ need(thin) + x ≤ hard × overcommit`; a thick one (or
//! anything that takes space now: a data copy) while `x ≤ hard − Σ need(thin) / overcommit`.
//! With overcommit 1 (the default) every promise is backed: every write that can still come to
//! any volume has its bytes free, so no volume, thick or thin, fails a write for lack of space.
//!
//! **Admission**: create, clone, restore, snapshot, expansion and allocation changes take the
//! pool-wide admission lock (`locks/space.lock`, a flock: across processes and, on a shared
//! pool, across nodes), compute the promises, check their charge and make it visible on disk
//! (an image at its full length, a reflink, a preallocated copy, a grown image) before releasing
//! it. The lock is never held around mkfs or a copy of data.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::lock::{self, LockGuard, LockWait};
use crate::meta::Allocation;

use super::fsops::ImageSpace;
use super::{layout, Pool};

const MIB: u64 = 1 << 20;
/// Never promised: room for metadata writes and for the pool filesystem's own bookkeeping (its
/// journal, extent and reference-count trees, which grow as shared blocks are copied).
const RESERVE_MIN: u64 = 16 * MIB;
const RESERVE_MAX: u64 = 1024 * MIB;
/// How long an admission waits for another one (each holds the lock for milliseconds).
const ADMISSION_WAIT: Duration = Duration::from_secs(30);

/// Capacity as the controller reports it, and as admission checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Free bytes of the pool's filesystem.
    pub free_bytes: u64,
    /// Free bytes never promised (1 % of the pool's filesystem, 16 MiB to 1 GiB).
    pub reserve_bytes: u64,
    /// What thick volumes may still take: their holes and the blocks they share.
    pub thick_unbacked_bytes: u64,
    /// What thin volumes may still take: their size minus what they own.
    pub thin_unallocated_bytes: u64,
    /// The largest new thin volume the pool admits now.
    pub available_bytes: u64,
    /// The largest new thick volume (or data copy) the pool admits now.
    pub available_thick_bytes: u64,
}

impl Capacity {
    /// The largest new volume of `allocation` the pool admits now.
    pub fn available(&self, allocation: Allocation) -> u64 {
        match allocation {
            Allocation::Thin => self.available_bytes,
            Allocation::Thick => self.available_thick_bytes,
        }
    }
}

/// What an operation adds to (negative: takes from) what thick and thin volumes may still take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Charge {
    thick: i128,
    thin: i128,
}

impl Charge {
    /// `bytes` more that a volume of `allocation` may take.
    pub fn new(allocation: Allocation, bytes: u64) -> Charge {
        let bytes = i128::from(bytes);
        match allocation {
            Allocation::Thick => Charge {
                thick: bytes,
                thin: 0,
            },
            Allocation::Thin => Charge {
                thick: 0,
                thin: bytes,
            },
        }
    }

    /// Space taken now (a copy of data): it must be free beyond every promise, like thick.
    pub fn now(bytes: u64) -> Charge {
        Charge::new(Allocation::Thick, bytes)
    }

    /// `bytes` a volume may take moving from one allocation to the other.
    pub fn moving(bytes: u64, from: Allocation, to: Allocation) -> Charge {
        let out = Charge::new(from, bytes);
        Charge::new(to, bytes).plus(Charge {
            thick: -out.thick,
            thin: -out.thin,
        })
    }

    /// The same charge where needs are not told apart (at overcommit 1, where it makes no
    /// difference): all of it thick.
    fn unclassified(self) -> Charge {
        Charge {
            thick: self.thick + self.thin,
            thin: 0,
        }
    }

    pub fn plus(self, other: Charge) -> Charge {
        Charge {
            thick: self.thick + other.thick,
            thin: self.thin + other.thin,
        }
    }

    /// Whether the charge asks no more backing than it frees: thick needs nothing more, and
    /// thin needs no more than thick frees (thick backs `overcommit` times as much thin).
    fn adds_nothing(self, overcommit_milli: u64) -> bool {
        self.thick <= 0 && self.thick * i128::from(overcommit_milli) + self.thin * 1000 <= 0
    }

    fn describe(self) -> String {
        let part = |n: i128, class: &str| (n > 0).then(|| format!("{n} bytes {class}"));
        [part(self.thick, "thick"), part(self.thin, "thin")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

/// The promises as numbers: the pure arithmetic of the model (table-tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Promises {
    /// Free bytes minus the reserve.
    usable: u64,
    thick: u64,
    thin: u64,
    /// The overcommit factor in thousandths (≥ 1000): integer arithmetic, exact at any size.
    overcommit_milli: u64,
}

fn clamp(n: i128) -> u64 {
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}

impl Promises {
    fn hard(&self) -> Option<u64> {
        self.usable.checked_sub(self.thick)
    }

    /// The largest thin charge admitted now.
    fn available_thin(&self) -> u64 {
        let Some(hard) = self.hard() else { return 0 };
        let promisable = u128::from(hard) * u128::from(self.overcommit_milli) / 1000;
        u64::try_from(promisable.saturating_sub(u128::from(self.thin))).unwrap_or(u64::MAX)
    }

    /// The largest thick charge (or space taken now) admitted now.
    fn available_thick(&self) -> u64 {
        let Some(hard) = self.hard() else { return 0 };
        let milli = u128::from(self.overcommit_milli);
        let backing_thin = (u128::from(self.thin) * 1000).div_ceil(milli);
        u64::try_from(u128::from(hard).saturating_sub(backing_thin)).unwrap_or(u64::MAX)
    }

    /// Whether every promise still holds with `c` added. A charge that adds nothing (a second
    /// snapshot of an unchanged volume, a thick volume turned thin) is always admitted.
    fn admits(&self, c: Charge) -> bool {
        if c.adds_nothing(self.overcommit_milli) {
            return true;
        }
        let thick = clamp(i128::from(self.thick) + c.thick);
        let thin = clamp(i128::from(self.thin) + c.thin);
        let Some(hard) = self.usable.checked_sub(thick) else {
            return false;
        };
        u128::from(thin) * 1000 <= u128::from(hard) * u128::from(self.overcommit_milli)
    }

    fn add(&mut self, c: Charge) {
        self.thick = clamp(i128::from(self.thick) + c.thick);
        self.thin = clamp(i128::from(self.thin) + c.thin);
    }
}

/// The factor in thousandths, rounded down (a factor below 1 is refused when the pool opens).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a finite factor ≥ 1; `as` saturates the product at u64::MAX"
)]
fn overcommit_milli(overcommit: f64) -> u64 {
    ((overcommit * 1000.0).floor() as u64).max(1000)
}

/// What the pool's filesystem keeps back from every promise.
fn reserve(fs_size: u64) -> u64 {
    (fs_size / 100).clamp(RESERVE_MIN, RESERVE_MAX)
}

/// The metadata field the model needs, and nothing else (read only for images that still need
/// space, where the class matters).
#[derive(Deserialize)]
struct AllocationOnly {
    #[serde(default)]
    allocation: Allocation,
}

impl Pool {
    /// Free space, what thick and thin volumes may still take, and what is left to promise.
    /// The same numbers admission checks, read without its lock.
    pub fn capacity(&self) -> Result<Capacity> {
        let (free, reserve, promises, _) = self.promises(true)?;
        Ok(Capacity {
            free_bytes: free,
            reserve_bytes: reserve,
            thick_unbacked_bytes: promises.thick,
            thin_unallocated_bytes: promises.thin,
            available_bytes: promises.available_thin(),
            available_thick_bytes: promises.available_thick(),
        })
    }

    /// Reads the pool: its filesystem's free space and every image's need. With `classify`
    /// false and no overcommit, needs are not told apart by allocation (that reads every
    /// volume's metadata): at overcommit 1 the split changes no answer, only how it is reported.
    fn promises(&self, classify: bool) -> Result<(u64, u64, Promises, bool)> {
        let overcommit_milli = overcommit_milli(self.options.overcommit);
        let classify = classify || overcommit_milli != 1000;
        let fs = self.fs()?;
        let (size, free, shared_blocks) = fs.size_free_and_sharing()?;
        let reserve = reserve(size);
        // A planted entry (not a volume ID, a link, a device) is no volume's image: it promises
        // nothing, and is reported by the listings.
        let space = |rel: &Path| match fs.image_space(rel, shared_blocks) {
            Ok(space) => space,
            Err(e) => {
                tracing::debug!(error = %e, "not counted as an image");
                None
            }
        };
        // The IDs and records from the listings' index; each volume's files stat'ed from one
        // descriptor of its directory, when they are plainly images (else the checked path); the
        // volumes looked at on several threads (their cost is stats, in the kernel).
        let volumes = self.volume_dirs(&fs)?;
        // What volume `id` may still take: (thick, thin).
        let need_of = |pos: usize, id: &str| -> Result<Option<(u64, u64)>> {
            let Ok(id) = VolumeId::try_from(id) else {
                return Ok(None);
            };
            let entry = fs.open_entry(&volumes.dir, id.as_str());
            let space = |name: &str, rel: &Path| match entry.as_ref().and_then(|e| e.image(name)) {
                Some(None) => None,
                Some(Some(st)) if !(shared_blocks && st.allocated > 0) => Some(ImageSpace {
                    len: st.len,
                    own: st.allocated.min(st.len),
                }),
                _ => space(rel),
            };
            // An image being made (a copy, as `image.tmp`, renamed to `image` once committed)
            // counts at its full length, as thick: whatever it becomes, it was admitted for that
            // much. A volume with an image is making none, so `image.tmp` is looked up only when
            // `image` is missing (on a cluster filesystem a lookup of a missing name is a round
            // trip to the server, one per volume and pass); when neither is there, `image` is
            // looked at again: the commit's rename may have come between the two lookups.
            let image_rel = layout::volume_image(&id);
            let (making, image) = match space("image", &image_rel) {
                Some(image) => (0, Some(image)),
                None => match space("image.tmp", &layout::volume_image_tmp(&id)) {
                    Some(tmp) => (tmp.len.saturating_sub(tmp.own), None),
                    None => (0, space("image", &image_rel)),
                },
            };
            let Some(image) = image else {
                return Ok(Some((making, 0)));
            };
            let need = image.len.saturating_sub(image.own);
            if need == 0 || !classify {
                return Ok(Some((making.saturating_add(need), 0)));
            }
            // Unreadable metadata (or none yet: a create committing it) counts as thick.
            let class = entry
                .as_ref()
                .and_then(|e| self.indexed_volume(&fs, &volumes, e, (pos, &id)))
                .map(|m| m.allocation)
                .or_else(|| {
                    fs.read_json::<AllocationOnly>(&layout::volume_meta(&id))
                        .ok()
                        .flatten()
                        .map(|m| m.allocation)
                })
                .unwrap_or(Allocation::Thick);
            Ok(Some(match class {
                Allocation::Thick => (making.saturating_add(need), 0),
                Allocation::Thin => (making, need),
            }))
        };
        let (mut thick, mut thin) = (0u64, 0u64);
        let fan = super::listing::Fanout::for_pool(&fs);
        for (k, t) in super::listing::load_all(&volumes.ids, 0, fan, &need_of)? {
            thick = thick.saturating_add(k);
            thin = thin.saturating_add(t);
        }
        let promises = Promises {
            usable: free.saturating_sub(reserve),
            thick,
            thin,
            overcommit_milli,
        };
        Ok((free, reserve, promises, classify))
    }

    /// Takes the pool's admission lock and reads the promises under it. Hold the result only
    /// around checking a charge and making it visible on disk.
    pub(crate) fn admission(&self) -> Result<Admission<'_>> {
        // Its subject is the volumes directory, which is always there: the file stays.
        let guard = lock::lock(
            &self.fs()?,
            &self.open_locks,
            Path::new("locks/space.lock"),
            Path::new("volumes"),
            "the pool's space admission",
            LockWait::Bounded(ADMISSION_WAIT),
        )?;
        let (free, reserve, promises, classified) = self.promises(false)?;
        Ok(Admission {
            pool: self,
            free,
            reserve,
            promises,
            classified,
            _guard: guard,
        })
    }
}

/// The pool's admission lock, with the promises as read under it and every charge admitted
/// since. Dropping it releases the lock.
pub(crate) struct Admission<'p> {
    pool: &'p Pool,
    free: u64,
    reserve: u64,
    promises: Promises,
    /// Whether thick and thin needs were told apart (else all count as thick: overcommit 1).
    classified: bool,
    _guard: LockGuard,
}

impl Admission<'_> {
    /// Admits `charge` (for what `what` names) or refuses it with `NoSpace`, naming the numbers.
    /// The caller makes the charge visible on disk before dropping the admission.
    pub fn admit(&mut self, charge: Charge, what: &str) -> Result<()> {
        let charge = if self.classified {
            charge
        } else {
            charge.unclassified()
        };
        let p = &self.promises;
        if !p.admits(charge) {
            let (thin, thick) = (p.available_thin(), p.available_thick());
            let (room, owed) = if self.classified {
                (
                    format!("{thin} more bytes thin or {thick} thick"),
                    format!(
                        "{} owed to thick volumes, {} promised to thin volumes",
                        p.thick, p.thin
                    ),
                )
            } else {
                (
                    format!("{thin} more bytes"),
                    format!("{} promised to volumes", p.thick),
                )
            };
            return Err(Error::NoSpace(format!(
                "{what} needs {} but the pool {} can promise only {room} ({} free, {} kept in \
                 reserve, {owed}, overcommit {})",
                charge.describe(),
                self.pool.root.display(),
                self.free,
                self.reserve,
                self.pool.options.overcommit,
            )));
        }
        self.promises.add(charge);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Allocation::{Thick, Thin};

    const GIB: u64 = 1 << 30;

    fn promises(usable: u64, thick: u64, thin: u64, overcommit: f64) -> Promises {
        Promises {
            usable,
            thick,
            thin,
            overcommit_milli: overcommit_milli(overcommit),
        }
    }

    /// (usable, thick, thin, overcommit) → (available thin, available thick)
    #[test]
    fn available_space() {
        type Row = ((u64, u64, u64, f64), (u64, u64));
        let table: &[Row] = &[
            // An empty pool promises what is usable, either way.
            ((10 * GIB, 0, 0, 1.0), (10 * GIB, 10 * GIB)),
            ((10 * GIB, 0, 0, 3.0), (30 * GIB, 10 * GIB)),
            // Thick needs come off at face value, before overcommit.
            ((10 * GIB, 4 * GIB, 0, 1.0), (6 * GIB, 6 * GIB)),
            ((10 * GIB, 4 * GIB, 0, 2.0), (12 * GIB, 6 * GIB)),
            // Thin promises are backed by hard / overcommit.
            ((10 * GIB, 4 * GIB, 6 * GIB, 1.0), (0, 0)),
            ((10 * GIB, 4 * GIB, 6 * GIB, 2.0), (6 * GIB, 3 * GIB)),
            ((10 * GIB, 0, 15 * GIB, 1.5), (0, 0)),
            ((10 * GIB, 0, 14 * GIB, 1.5), (GIB, GIB * 2 / 3)),
            // Over-promised (the pool shrank under its promises): nothing more.
            ((GIB, 2 * GIB, 0, 4.0), (0, 0)),
            ((GIB, 0, 5 * GIB, 4.0), (0, 0)),
            // Huge factors saturate instead of overflowing.
            ((u64::MAX, 0, 0, 1e30), (u64::MAX, u64::MAX)),
        ];
        let rows = table.iter().map(|&(input, want)| (input, want));
        crate::table::check(rows, |&(usable, thick, thin, oc)| {
            let p = promises(usable, thick, thin, oc);
            (p.available_thin(), p.available_thick())
        });
    }

    /// GetCapacity and admission agree: a charge of exactly what is available is admitted, one
    /// byte more is not, in either class, for every state of a grid.
    #[test]
    fn admission_agrees_with_capacity() {
        let mut wrong = Vec::new();
        for usable in [0, 1, 999, 5 * GIB, 10 * GIB + 7] {
            for thick in [0, 1, 3 * GIB, 11 * GIB] {
                for thin in [0, 7, 2 * GIB, 25 * GIB] {
                    for oc in [1.0, 1.001, 2.5, 4.0] {
                        let p = promises(usable, thick, thin, oc);
                        for (class, avail) in
                            [(Thin, p.available_thin()), (Thick, p.available_thick())]
                        {
                            let fits = avail == 0 || p.admits(Charge::new(class, avail));
                            let over = p.admits(Charge::new(class, avail + 1));
                            if !fits || over {
                                wrong.push(format!("{p:?} {class:?} {avail}: {fits} {over}"));
                            }
                        }
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn charges() {
        let mut p = promises(10 * GIB, 0, 0, 1.0);
        assert!(p.admits(Charge::new(Thin, 6 * GIB)));
        p.add(Charge::new(Thin, 6 * GIB));
        assert!(!p.admits(Charge::new(Thick, 5 * GIB)));
        // Moving a need between classes adds nothing at overcommit 1.
        assert!(p.admits(Charge::moving(3 * GIB, Thin, Thick)));
        p.add(Charge::moving(3 * GIB, Thin, Thick));
        assert_eq!((p.thick, p.thin), (3 * GIB, 3 * GIB));
        // A charge that adds nothing is admitted even to a full pool.
        let full = promises(GIB, 2 * GIB, 0, 1.0);
        assert!(full.admits(Charge::default()));
        assert!(full.admits(Charge::moving(GIB, Thick, Thin)));
        assert!(!full.admits(Charge::new(Thin, 1)));
        // Thin → thick under overcommit needs the backing thin lacked.
        let over = promises(10 * GIB, 0, 20 * GIB, 2.0);
        assert!(!over.admits(Charge::moving(GIB, Thin, Thick)));
        assert_eq!(
            Charge::new(Thick, 5).plus(Charge::new(Thin, 7)).describe(),
            "5 bytes thick and 7 bytes thin"
        );
    }

    /// At overcommit 1 the split between thick and thin changes no answer: admission may skip
    /// reading every volume's metadata.
    #[test]
    fn at_overcommit_one_the_split_does_not_matter() {
        let charges = [
            Charge::new(Thin, GIB),
            Charge::new(Thick, 3 * GIB),
            Charge::moving(2 * GIB, Thin, Thick),
            Charge::moving(2 * GIB, Thick, Thin),
            Charge::new(Thin, GIB).plus(Charge::new(Thick, GIB)),
        ];
        let mut wrong = Vec::new();
        // Each state holds at least what the charges move out of a class.
        for (thick, thin) in [(2 * GIB, 2 * GIB), (3 * GIB, 5 * GIB), (8 * GIB, 2 * GIB)] {
            let split = promises(10 * GIB, thick, thin, 1.0);
            let merged = promises(10 * GIB, thick + thin, 0, 1.0);
            for c in charges {
                if split.admits(c) != merged.admits(c.unclassified())
                    || split.available_thin() != merged.available_thin()
                {
                    wrong.push(format!("{split:?} {c:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn reserve_is_bounded() {
        assert_eq!(reserve(300 * MIB), RESERVE_MIN);
        assert_eq!(reserve(100 * GIB), GIB.min(RESERVE_MAX));
        assert_eq!(reserve(10 * GIB), 10 * GIB / 100);
    }
}

/// The promises counted from a pool on disk: an image being made counts, as thick, while the
/// volume has no image; once it has one, a stray `image.tmp` beside it promises nothing.
#[cfg(test)]
mod on_disk {
    use crate::ids::NodeName;
    use crate::pool::{Pool, PoolOptions};
    use crate::volume::CreateVolume;

    const MIB: u64 = 1 << 20;

    fn sparse(path: &std::path::Path, len: u64) {
        std::fs::File::create(path).unwrap().set_len(len).unwrap();
    }

    #[test]
    fn an_image_being_made_counts_until_the_volume_has_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = PoolOptions::new(NodeName::try_from("node-a").unwrap());
        options.overcommit = 1e6; // thin volumes on whatever the test's disk has free
        let pool = Pool::open(dir.path(), options).unwrap();
        pool.create_volume(&CreateVolume::blank("a", MIB)).unwrap();
        let before = pool.capacity().unwrap().thick_unbacked_bytes;
        // A copy in progress: `image.tmp`, no image, no record yet.
        let making = dir.path().join("volumes/making");
        std::fs::create_dir(&making).unwrap();
        sparse(&making.join("image.tmp"), 64 * MIB);
        let cap = pool.capacity().unwrap().thick_unbacked_bytes;
        assert_eq!(cap, before + 64 * MIB);
        // Moved into place (no record yet: counted as thick), it counts once, as the image.
        std::fs::rename(making.join("image.tmp"), making.join("image")).unwrap();
        assert_eq!(cap, pool.capacity().unwrap().thick_unbacked_bytes);
        // A volume with an image makes none: a stray `image.tmp` beside it is nobody's promise.
        sparse(&dir.path().join("volumes/a/image.tmp"), 64 * MIB);
        assert_eq!(cap, pool.capacity().unwrap().thick_unbacked_bytes);
    }
}
