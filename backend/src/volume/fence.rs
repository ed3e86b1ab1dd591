//! A node cutting its own writes to a volume off, before another node may have it, and the
//! node plugin's lease keeper that decides when.
//!
//! A node fences a volume it has attached when it finds, in the pool, that it may no longer
//! write it: its claim was released while it is still staged here (a force-detach), or its
//! staging hold was marked fenced (an operator declared the node down; the controller handed the
//! volume over at the lease's expiry). It fences every volume it has attached when it could not
//! renew its lease for half the lease timeout: by then the controller may be about to call the
//! lease expired. Fencing, strongest first, without waiting on the pool:
//!
//! 1. the filesystem is shut down (`FS_IOC_SHUTDOWN`: ext4, xfs), committing its log first so that
//!    an fsync racing the fence either fails or is on disk (at once, without the commit, when that
//!    waits on a pool that hangs); every call on it then fails with EIO and nothing more of it
//!    reaches the device;
//! 2. the loop device is cut off its image (`loop::cut_off`): its size becomes 0, so no read or
//!    write of any user (btrfs, which has no shutdown; a raw block volume; an open descriptor)
//!    reaches the image again. The kernel waits for the I/O in flight first, which a hung pool
//!    may never finish: this step runs on its own thread, bounded;
//! 3. the image is synced through a descriptor of our own, so nothing of it stays in the cluster
//!    client's write cache;
//! 4. once the fence is in effect (shut down, or cut off), it is recorded in the volume's metadata
//!    (this node's hold, marked fenced) when the pool answers: that record is what lets the
//!    controller hand the volume over.
//!
//! What remains after a fence: the mounts (until kubelet unpublishes and unstages; a repeated
//! stage is refused until then), page-cache data no application synced (never promised), and
//! for a pool that hangs, writes the cluster client already accepted before the cut-off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fs::Usage;
use crate::ids::{NodeName, VolumeId};
use crate::kernel::{is_device_bind_of, KernelView};
use crate::lock::LockWait;
use crate::loopdev::{self, LoopDevice};
use crate::meta::{self, Fenced, FencedBy, VolumeMeta};
use crate::pool::fsops::PoolFs;
use crate::pool::nodes::LeaseWriter;
use crate::pool::{layout, watchdog, Pool};
use crate::{fs, ErrorKind};

use super::handover::own;
use super::health::{AbnormalReason, Condition};

/// How long a fence waits for the loop device's cut-off (the I/O in flight) before it reports
/// and goes on; the cut-off itself keeps running.
const CUT_OFF_WAIT: Duration = Duration::from_secs(2);

/// How long a fence waits for a shutdown without flushing, after one that flushes did not come
/// back.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// Why this node must fence the volume `m` it has attached, or None while it may keep it. Only
/// volumes this node holds are its to judge (`m` names this node's staging hold).
pub(crate) fn fence_reason(m: &VolumeMeta, node: &NodeName, shared: bool) -> Option<String> {
    let hold = own(&m.staged, node)?;
    if let Some(f) = &hold.fenced {
        return Some(format!("it was fenced {}: {}", f.by.describe(), f.reason));
    }
    if shared && own(&m.claims, node).is_none() {
        return Some(
            "its claim for this node was released (ControllerUnpublishVolume: a force-detach?) \
             while it is still staged here"
                .into(),
        );
    }
    None
}

/// Whether the kernel shows the filesystem mounted at any of `mounts` as shut down (ext4's
/// `shutdown` option in mountinfo).
fn shows_shutdown(mounts: &[PathBuf]) -> bool {
    crate::mount::mounts().is_ok_and(|table| {
        table.iter().any(|m| {
            mounts.contains(&m.mount_point) && m.super_options.iter().any(|o| o == "shutdown")
        })
    })
}

/// Where `dev`'s filesystem is mounted on this node.
fn mounts_of(view: &KernelView, dev: &LoopDevice) -> Vec<PathBuf> {
    view.fs_mounts(dev).map(|m| m.mount_point.clone()).collect()
}

/// Shuts down the filesystem mounted at the first of `mounts` that takes it (they are mounts of
/// one device): `Some(true)` shut down, `Some(false)` it has no shutdown (btrfs), `None` no
/// mount or every attempt failed.
fn shut_down(id: &VolumeId, mounts: &[PathBuf], flush_log: bool) -> Option<bool> {
    for m in mounts {
        tracing::warn!(volume = %id, mount = %m.display(), flush_log, "shutting the filesystem down");
        match fs::shutdown(m, flush_log) {
            Ok(true) => {
                tracing::warn!(volume = %id, mount = %m.display(), flush_log, "filesystem shut down");
                return Some(true);
            }
            Ok(false) => {
                tracing::warn!(volume = %id, "the filesystem has no shutdown: the device's cut-off fences it");
                return Some(false);
            }
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, "could not shut the filesystem down")
            }
        }
    }
    None
}

/// The boot-time clock: it counts a suspended machine's sleep, which the monotonic clock does
/// not, and another node's clock runs meanwhile.
fn boottime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

impl Pool {
    /// This pool's loop devices on this node: bound to one of its volume images (by path) and,
    /// when the node confines its paths, not mounted only outside them (on a test machine the
    /// other "nodes" share the kernel).
    fn devices_here(&self, view: &KernelView) -> Vec<(VolumeId, LoopDevice)> {
        let prefixes = &self.options().path_prefixes;
        let staging = self.root().join("staging");
        view.loops()
            .iter()
            .filter_map(|dev| Some((self.volume_id_of_image(&dev.backing_file)?, dev.clone())))
            .filter(|(_, dev)| {
                let users = view.users(std::slice::from_ref(dev), &[]);
                prefixes.is_empty()
                    || users.is_empty()
                    || users.iter().any(|m| {
                        m.mount_point.starts_with(&staging)
                            || prefixes.iter().any(|p| m.mount_point.starts_with(p))
                    })
            })
            .collect()
    }

    /// Cuts this node's writes to volume `id` on `dev` off (see the module's documentation),
    /// steps 1 to 3; returns whether the fence is in effect (the filesystem shut down, or the
    /// device cut off): only then may it be recorded. Logged as an error: a fence is an event an
    /// operator must see.
    ///
    /// The steps run on their own thread: the filesystem is shut down committing its log (an
    /// fsync that raced the fence then either failed or is on disk), the device cut off, the image
    /// synced. Each of them may wait on a pool that hangs: when the shutdown has not come back
    /// within [`CUT_OFF_WAIT`], the filesystem is shut down at once, without flushing.
    fn fence_device(
        &self,
        id: &VolumeId,
        dev: &LoopDevice,
        mounts: &[PathBuf],
        reason: &str,
    ) -> bool {
        tracing::error!(volume = %id, device = %dev.path().display(), reason, "fencing the volume: this node stops writing it");
        enum Step {
            Shut(Option<bool>),
            Cut(bool),
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (dev, root, volume) = (dev.clone(), self.root().to_owned(), id.clone());
        let helper_mounts = mounts.to_vec();
        let spawned = std::thread::Builder::new()
            .name("loopvol-fence".into())
            .spawn(move || {
                let _ = tx.send(Step::Shut(shut_down(&volume, &helper_mounts, true)));
                let cut = loopdev::cut_off(&dev);
                match &cut {
                    Ok(()) => tracing::warn!(volume = %volume, device = %dev.path().display(), "cut off its image"),
                    Err(e) => tracing::error!(volume = %volume, error = %e, "could not cut the device off its image"),
                }
                // Whatever the cluster client still caches of the image goes out now.
                let synced = PoolFs::open(&root)
                    .map_err(|e| Error::Io {
                        context: format!("open the pool {}", root.display()),
                        source: e,
                    })
                    .and_then(|fs| fs.open_image(&layout::volume_image(&volume), true))
                    .and_then(|f| {
                        f.sync_all().map_err(|e| Error::Io {
                            context: format!("sync the image of {volume}"),
                            source: e,
                        })
                    });
                if let Err(e) = synced {
                    tracing::warn!(volume = %volume, error = %e, "could not sync the image after the fence");
                }
                let _ = tx.send(Step::Cut(cut.is_ok()));
            });
        if let Err(e) = spawned {
            tracing::error!(volume = %id, error = %e, "could not start the fence's thread");
            return false;
        }
        let deadline = std::time::Instant::now() + CUT_OFF_WAIT;
        let (mut shut, mut cut) = (None, false);
        let mut answered = false;
        while let Ok(step) =
            rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            match step {
                Step::Shut(s) => {
                    shut = s;
                    answered = true;
                }
                Step::Cut(c) => {
                    cut = c;
                    break;
                }
            }
        }
        if !answered && !mounts.is_empty() {
            // ext4 refused new calls before its commit started; xfs forces its log first. Either
            // way now at once: even that may write (ext4 records the abort in its journal's
            // superblock), so on a thread of its own as well, waited for a moment.
            tracing::error!(volume = %id, "the filesystem's shutdown waits on the pool: shutting it down without flushing");
            let (tx, rx) = std::sync::mpsc::channel();
            let (volume, mounts) = (id.clone(), mounts.to_vec());
            let spawned = std::thread::Builder::new()
                .name("loopvol-fence-now".into())
                .spawn(move || {
                    let _ = tx.send(shut_down(&volume, &mounts, false));
                });
            if spawned.is_ok() {
                shut = rx.recv_timeout(SHUTDOWN_WAIT).ok().flatten();
            }
        } else if !cut {
            tracing::error!(volume = %id, "the device's cut-off is still waiting for I/O in flight to the pool");
        }
        // ext4 stops taking calls the moment its shutdown starts, before the journal I/O that a
        // pool which hangs never finishes: the kernel shows it in the mount's options.
        shut == Some(true) || cut || shows_shutdown(mounts)
    }

    /// Marks this node's staging hold of `id` fenced, for `reason`: from then on the hold no
    /// longer keeps the volume from another node. No hold: nothing keeps it already.
    fn record_fence(&self, volume: &mut super::Volume<'_>, reason: &str) -> Result<bool> {
        let node = self.node().clone();
        let Some(hold) = volume.meta.staged.iter_mut().find(|h| h.node == node) else {
            return Ok(false);
        };
        if hold.fenced.is_some() {
            return Ok(false);
        }
        hold.fenced = Some(Fenced {
            by: FencedBy::Node,
            reason: reason.to_owned(),
            at_unix: meta::now_unix(),
        });
        volume.save()?;
        tracing::warn!(volume = %volume.meta.id, "recorded the fence in the pool");
        Ok(true)
    }

    /// The condition of a volume whose device `dev` is this node's, when it was fenced: cut off
    /// here, or this node's hold marked fenced.
    pub(super) fn fence_condition(&self, m: &VolumeMeta, dev: &LoopDevice) -> Option<Condition> {
        let hold = own(&m.staged, self.node()).and_then(|h| h.fenced.as_ref());
        if !dev.cut_off && hold.is_none() {
            return None;
        }
        let why = hold.map_or_else(
            || "it was cut off its image on this node".to_owned(),
            |f| format!("{} ({})", f.reason, f.by.describe()),
        );
        Some(Condition {
            abnormal: true,
            message: format!(
                "fenced on this node: {why}; its writes here fail. Another node may have it now: \
                 unstage it here"
            ),
            reason: Some(AbnormalReason::Fenced),
        })
    }

    /// The condition of every volume while the pool does not answer.
    pub(super) fn unreachable_condition(&self) -> Option<Condition> {
        self.health.not_answering().map(|reason| Condition {
            abnormal: true,
            message: format!("{reason} ({})", self.root().display()),
            reason: Some(AbnormalReason::PoolNotAnswering),
        })
    }
}

impl Pool {
    /// A readiness check that never waits on a pool known not to answer: the background work's
    /// verdict first (see `pool::watchdog`), then [`Pool::probe`].
    pub fn ready(&self) -> Result<()> {
        if let Some(reason) = self.health.not_answering() {
            return Err(Error::Pool {
                path: self.root().to_owned(),
                reason,
            });
        }
        self.probe()
    }

    /// A request gave up after waiting `waited` on the pool for `what`: until the next call on
    /// the pool succeeds, the pool counts as not answering.
    pub fn note_hung(&self, what: &str, waited: Duration) {
        self.health.note_hung(what, waited);
    }

    /// NodeGetVolumeStats: [`Pool::volume_stats`] of volume `id` at `path`, that answers even
    /// when the pool does not, or the volume was fenced here: the usage from the kernel and the
    /// volume's own filesystem, and an abnormal condition saying why.
    pub fn volume_stats_checked(&self, id: &VolumeId, path: &Path) -> Result<(Usage, Condition)> {
        if let Some(c) = self.unreachable_condition() {
            return self.volume_stats_offline(id, path, c.message);
        }
        let meta = match self.get_volume(id) {
            Ok(m) => m,
            Err(e) => {
                let Some(reason) = watchdog::unreachable(&e) else {
                    return Err(e);
                };
                self.health.note_failure(reason);
                let message = self
                    .unreachable_condition()
                    .map_or_else(|| e.to_string(), |c| c.message);
                return self.volume_stats_offline(id, path, message);
            }
        };
        match self.volume_stats(&meta, path) {
            Ok(stats) => Ok(stats),
            Err(e) => {
                // A fenced filesystem answers EIO: the volume is still there, abnormal.
                let view = KernelView::read()?;
                let fenced = view
                    .mount_at(path)
                    .and_then(|m| view.device_of_mount(m))
                    .and_then(|dev| self.fence_condition(&meta, dev));
                match fenced {
                    Some(c) => self.stats_from_kernel(id, path, c),
                    None => Err(e),
                }
            }
        }
    }

    /// The usage of volume `id` at `path` from the kernel alone (the mount there, its loop
    /// device and the image path it was bound to), with the volume abnormal because the pool
    /// does not answer (`reason` says how). `NotFound` when `path` does not hold the volume.
    pub fn volume_stats_offline(
        &self,
        id: &VolumeId,
        path: &Path,
        reason: String,
    ) -> Result<(Usage, Condition)> {
        let condition = Condition {
            abnormal: true,
            message: reason,
            reason: Some(AbnormalReason::PoolNotAnswering),
        };
        self.stats_from_kernel(id, path, condition)
    }

    /// [`Pool::volume_stats_offline`] with the condition given.
    fn stats_from_kernel(
        &self,
        id: &VolumeId,
        path: &Path,
        condition: Condition,
    ) -> Result<(Usage, Condition)> {
        let view = KernelView::read()?;
        let not_here = || {
            Error::not_found(
                "volume path",
                format!("{} (volume {id} is not mounted there)", path.display()),
            )
        };
        let m = view.mount_at(path).ok_or_else(not_here)?;
        let dev = view.device_of_mount(m).ok_or_else(not_here)?;
        if self.volume_id_of_image(&dev.backing_file).as_ref() != Some(id) {
            return Err(not_here());
        }
        let usage = if is_device_bind_of(m, dev) {
            let total = loopdev::device_size(&dev.path()).unwrap_or(0);
            Usage {
                total_bytes: total,
                available_bytes: 0,
                used_bytes: total,
                inodes: None,
            }
        } else {
            // A filesystem that was shut down may refuse even statfs: nothing to report then.
            fs::usage(path).unwrap_or(Usage {
                total_bytes: 0,
                available_bytes: 0,
                used_bytes: 0,
                inodes: None,
            })
        };
        Ok((usage, condition))
    }
}

/// A fence this process started.
#[derive(Debug, Clone)]
struct Attempt {
    reason: String,
    /// The filesystem shut down or the device cut off (see `Pool::fence_device`).
    in_effect: bool,
}

/// A node plugin's keeper of its lease and judge of its volumes, on two threads: the worker
/// renews the lease and checks the volumes this node has attached every interval (the only
/// thread that calls into the pool); the watch only reads the clock and the kernel, so it fences
/// on time even while the worker hangs in a pool that stopped answering.
#[derive(Debug)]
pub struct NodeGuard {
    pool: Arc<Pool>,
    writer: Mutex<LeaseWriter>,
    /// Boot-time clock at the start of the last renewal that succeeded (or at the start).
    renewed: Mutex<Duration>,
    /// The fences this process started, per volume and device: why, and whether it is in
    /// effect (to record it once the pool answers, and never to start one twice).
    fenced: Mutex<HashMap<(VolumeId, u32), Attempt>>,
    /// The last renewal's error, logged when it changes.
    last_error: Mutex<Option<String>>,
    /// Set by [`NodeGuard::stop`]: the threads end at their next round.
    stopped: AtomicBool,
}

impl NodeGuard {
    pub fn new(pool: Arc<Pool>) -> Arc<NodeGuard> {
        Arc::new(NodeGuard {
            writer: Mutex::new(LeaseWriter::new(&pool)),
            pool,
            renewed: Mutex::new(boottime()),
            fenced: Mutex::default(),
            last_error: Mutex::default(),
            stopped: AtomicBool::new(false),
        })
    }

    /// Runs a first round, then starts the worker and the watch (see [`NodeGuard`]); they run
    /// until [`NodeGuard::stop`] (a server: as long as the process). The first round comes
    /// before the caller serves anything: a node plugin answers its first call with its lease
    /// renewed in the pool, and the volumes it left attached before a restart judged (fenced
    /// when their claims went meanwhile) before a call can use them.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let settings = self.pool.options().lease;
        self.tick();
        let worker = Arc::clone(self);
        std::thread::Builder::new()
            .name("loopvol-lease".into())
            .spawn(move || loop {
                std::thread::sleep(settings.interval);
                if worker.stopped.load(Ordering::Relaxed) {
                    break;
                }
                worker.tick();
            })?;
        let watch = Arc::clone(self);
        let period = settings.interval.min(settings.fence_after() / 4);
        std::thread::Builder::new()
            .name("loopvol-fence-watch".into())
            .spawn(move || {
                while !watch.stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    watch.fence_if_lapsed();
                }
            })?;
        Ok(())
    }

    /// Ends the threads [`NodeGuard::start`] started, at their next round.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One round of the worker: fence everything if the lease lapsed, renew it, then judge each
    /// volume this node has attached and record the fences the pool has not heard of.
    pub fn tick(&self) {
        // A panic (a lock guard on a dead mount, say) must not end the thread that fences.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.fence_if_lapsed();
            self.renew();
            if self.pool.health.not_answering().is_none() {
                if let Err(e) = self.judge_volumes() {
                    tracing::warn!(error = %e, "could not check this node's volumes");
                }
            }
        })) {
            tracing::error!(?panic, "the lease keeper's round panicked");
        }
    }

    fn renew(&self) {
        let started = boottime();
        let result = self.pool.health.watch("renewing this node's lease", || {
            Self::lock(&self.writer).renew(&self.pool)
        });
        let error = match result {
            Ok(_) => {
                let mut renewed = Self::lock(&self.renewed);
                *renewed = (*renewed).max(started);
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let mut last = Self::lock(&self.last_error);
        if *last != error {
            match &error {
                Some(e) => tracing::warn!(error = %e, "could not renew this node's lease"),
                None => tracing::info!("renewing this node's lease again"),
            }
            *last = error;
        }
    }

    /// How long since the start of the last renewal that succeeded.
    fn unrenewed(&self) -> Duration {
        boottime().saturating_sub(*Self::lock(&self.renewed))
    }

    /// Fences every volume this node has attached once it could not renew its lease for half the
    /// timeout. Reads only the clock and the kernel.
    pub fn fence_if_lapsed(&self) {
        let settings = self.pool.options().lease;
        let unrenewed = self.unrenewed();
        if unrenewed <= settings.fence_after() {
            return;
        }
        let Ok(view) = KernelView::read() else {
            return;
        };
        let error = Self::lock(&self.last_error).clone();
        let reason =
            format!(
            "this node could not renew its lease for {:.1} s (it fences after {:.1} s, half the \
             lease timeout){}",
            unrenewed.as_secs_f64(),
            settings.fence_after().as_secs_f64(),
            error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
        // All at once: each fence waits a moment on a pool that hangs, none on another.
        let devices: Vec<(VolumeId, LoopDevice, Vec<PathBuf>)> = self
            .pool
            .devices_here(&view)
            .into_iter()
            .filter(|(_, d)| !d.cut_off)
            .map(|(id, dev)| {
                let mounts = mounts_of(&view, &dev);
                (id, dev, mounts)
            })
            .collect();
        std::thread::scope(|scope| {
            for (id, dev, mounts) in devices {
                let reason = &reason;
                scope.spawn(move || self.fence_once(&id, &dev, &mounts, reason));
            }
        });
    }

    /// Fences volume `id` on `dev` unless this process started that fence already (a cut-off may
    /// still wait on the pool: it is not started twice); returns whether it is in effect.
    fn fence_once(
        &self,
        id: &VolumeId,
        dev: &LoopDevice,
        mounts: &[PathBuf],
        reason: &str,
    ) -> bool {
        let key = (id.clone(), dev.number);
        {
            let mut fenced = Self::lock(&self.fenced);
            if let Some(before) = fenced.get(&key) {
                return before.in_effect;
            }
            // Claimed before the fence starts: the other thread does not start it too.
            fenced.insert(
                key.clone(),
                Attempt {
                    reason: reason.to_owned(),
                    in_effect: false,
                },
            );
        }
        // Not under the map's lock: the other thread must not wait for a fence.
        let in_effect = self.pool.fence_device(id, dev, mounts, reason);
        if let Some(a) = Self::lock(&self.fenced).get_mut(&key) {
            a.in_effect = in_effect;
        }
        in_effect
    }

    /// Checks each volume this node has attached against the pool: fences those it may no
    /// longer write (see [`fence_reason`]) and records fences the pool has not heard of.
    fn judge_volumes(&self) -> Result<()> {
        let pool = &self.pool;
        let node = pool.node().clone();
        let view = KernelView::read()?;
        let here = pool.devices_here(&view);
        // Devices gone (unstaged) take their fences with them.
        Self::lock(&self.fenced)
            .retain(|(id, number), _| here.iter().any(|(i, d)| i == id && d.number == *number));
        for (id, dev) in here {
            let key = (id.clone(), dev.number);
            let meta = match pool.get_volume(&id) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if own(&meta.staged, &node).is_some_and(|h| h.fenced.is_some()) && dev.cut_off {
                continue;
            }
            let attempt = Self::lock(&self.fenced).get(&key).cloned();
            // Why: a fence of this process (in effect now, or the kernel shows the cut-off), or a
            // reason found in the pool.
            let reason = match attempt {
                Some(a) if a.in_effect || dev.cut_off => a.reason,
                Some(_) => continue,
                None if dev.cut_off => "it was found cut off its image on this node".into(),
                None => match fence_reason(&meta, &node, pool.is_shared()) {
                    Some(r) => r,
                    None => continue,
                },
            };
            // Judged again under the lock: the read above may predate a change in flight.
            let mut volume = match pool.lock_volume_with(&id, LockWait::Try) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) if e.kind() == ErrorKind::Busy => continue,
                Err(e) => return Err(e),
            };
            let fenced_here = dev.cut_off || Self::lock(&self.fenced).contains_key(&key);
            if !fenced_here {
                if fence_reason(&volume.meta, &node, pool.is_shared()).is_none() {
                    continue;
                }
                if !self.fence_once(&id, &dev, &mounts_of(&view, &dev), &reason) {
                    // A cut-off still waiting on the pool: recorded once the kernel shows it.
                    continue;
                }
            }
            pool.record_fence(&mut volume, &reason)?;
        }
        Ok(())
    }

    /// How long the lease went unrenewed, for tests and metrics.
    pub fn unrenewed_for(&self) -> Duration {
        self.unrenewed()
    }
}
