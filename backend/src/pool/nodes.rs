//! The nodes that serve a pool: their records and their leases.
//!
//! ```text
//! <pool>/nodes/<node>    the node record (JSON): boot, attach limit, lease terms; rewritten only
//!                        when one of them changes, so a restart on a full pool writes nothing
//! <pool>/leases/<node>   the lease: a counter the node plugin rewrites in place every interval
//! ```
//!
//! A lease proves only that the node plugin runs and reaches the pool. The controller judges it
//! by watching the counter change on its own monotonic clock ([`LeaseWatch`]); no wall clocks
//! are compared between machines. What the lease is used for (hand-over, self-fencing) is in
//! `volume::fence`.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::ids::NodeName;
use crate::kernel::boot_id;
use crate::meta;

use super::{layout, Pool};

/// How often a node plugin renews its lease, and after how long without a renewal the lease
/// expires. A node fences its volumes when it could not renew for half the timeout; the
/// controller calls a lease expired only after watching it unchanged for the whole timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Let the controller hand a read-write volume over once its node's lease expired, trusting
    /// that the node fenced itself in time (a paused node plugin breaks that assumption). Off:
    /// only a release, a recorded fence, or an operator's `loopvol fence` hands it over.
    pub handover_on_expiry: bool,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
            handover_on_expiry: false,
        }
    }
}

impl LeaseSettings {
    /// The node stops trusting its own lease (and fences) this long after the start of its last
    /// renewal that succeeded.
    pub fn fence_after(&self) -> Duration {
        self.timeout / 2
    }

    /// Refuses settings under which a node would fence after one slow renewal, or renew more
    /// often than is sane.
    pub fn check(&self) -> Result<()> {
        if self.interval < Duration::from_millis(50) {
            return Err(Error::invalid(
                "lease interval",
                format!("{:?} is below 50 ms", self.interval),
            ));
        }
        if self.interval * 4 > self.timeout {
            return Err(Error::invalid(
                "lease timeout",
                format!(
                    "{:?} must be at least 4 lease intervals ({:?}): a node fences after half \
                     the timeout without a renewal, and one slow renewal must not be enough",
                    self.timeout,
                    self.interval * 4
                ),
            ));
        }
        Ok(())
    }
}

/// A lease's terms as the node recorded them (the controller waits the longer of its own and
/// the node's timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl From<&LeaseSettings> for LeaseTerms {
    fn from(s: &LeaseSettings) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        LeaseTerms {
            interval_ms: ms(s.interval),
            timeout_ms: ms(s.timeout),
        }
    }
}

/// What a node records about itself when its plugin starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: NodeName,
    /// When the record was last written (for the operator; nothing compares it).
    #[serde(default)]
    pub registered_unix: u64,
    /// The node's kernel boot ID (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The node's attach limit (`--max-volumes-per-node`); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_volumes: Option<u64>,
    /// The terms of the lease the node plugin keeps; none: it keeps none (FlexVolume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseTerms>,
}

impl NodeRecord {
    /// The same record but for when it was written.
    fn same_as(&self, other: &NodeRecord) -> bool {
        NodeRecord {
            registered_unix: 0,
            ..self.clone()
        } == NodeRecord {
            registered_unix: 0,
            ..other.clone()
        }
    }
}

/// What a node states in its record besides its name and boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub max_volumes: Option<u64>,
    pub lease: Option<LeaseSettings>,
}

impl Pool {
    /// Records that this node serves the pool, with `info`; a node plugin calls it when it
    /// starts. On a shared pool the controller publishes only to registered nodes, so a typo or
    /// a node that never ran the plugin is `NotFound` instead of a claim nobody will ever use.
    /// The record is rewritten only when it changes (a restart, even on a full pool, writes
    /// nothing); returns whether it wrote.
    pub fn register_node_with(&self, info: &NodeInfo) -> Result<bool> {
        let rel = layout::node_record(&self.options.node);
        let fs = self.fs()?;
        let record = NodeRecord {
            node: self.options.node.clone(),
            registered_unix: meta::now_unix(),
            boot_id: boot_id().map(str::to_owned),
            max_volumes: info.max_volumes.filter(|n| *n > 0),
            lease: info.lease.as_ref().map(LeaseTerms::from),
        };
        // An unreadable or corrupt record is replaced.
        if let Ok(Some(old)) = fs.read_json::<NodeRecord>(&rel) {
            if old.same_as(&record) {
                return Ok(false);
            }
        }
        fs.write_json(&rel, &record)?;
        tracing::info!(node = %self.options.node, "recorded this node in the pool");
        Ok(true)
    }

    /// [`Pool::register_node_with`] with nothing but the boot: no lease, no attach limit.
    pub fn register_node(&self) -> Result<()> {
        self.register_node_with(&NodeInfo::default()).map(drop)
    }

    /// `node`'s record; `None` when it never registered.
    pub fn node_record(&self, node: &NodeName) -> Result<Option<NodeRecord>> {
        self.fs()?.read_json(&layout::node_record(node))
    }

    /// `NotFound` unless `node` has registered with [`Pool::register_node`].
    pub fn check_node_registered(&self, node: &NodeName) -> Result<()> {
        if self.fs()?.exists(&layout::node_record(node))? {
            Ok(())
        } else {
            Err(Error::not_found("node", node.as_str()))
        }
    }

    /// `node`'s lease counter; `None` when it has no lease file.
    pub(crate) fn read_lease(&self, node: &NodeName) -> Result<Option<u64>> {
        let rel = layout::lease(node);
        let fs = self.fs()?;
        let Some(bytes) = fs.read_uncached(&rel, LEASE_LEN)? else {
            return Ok(None);
        };
        parse_lease(&bytes)
            .map(Some)
            .ok_or_else(|| Error::Metadata {
                path: fs.path(&rel),
                reason: "not a lease counter".into(),
            })
    }
}

/// A lease file: the counter in 20 decimal digits and a newline, always this long, so every
/// renewal overwrites the same bytes in place and needs no new space.
const LEASE_LEN: usize = 21;

fn format_lease(counter: u64) -> [u8; LEASE_LEN] {
    let mut out = [b'\n'; LEASE_LEN];
    out[..20].copy_from_slice(format!("{counter:020}").as_bytes());
    out
}

fn parse_lease(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// This node's side of its lease: renews it in place. The file is opened by path for every
/// renewal: a descriptor kept open would go on "renewing" a lease file someone removed or
/// replaced, where no controller reads it, and through a cluster client that died it stays dead.
#[derive(Debug)]
pub(crate) struct LeaseWriter {
    rel: PathBuf,
    counter: u64,
}

impl LeaseWriter {
    pub fn new(pool: &Pool) -> LeaseWriter {
        LeaseWriter {
            rel: layout::lease(pool.node()),
            counter: 0,
        }
    }

    /// Writes the next counter value and syncs it (through a cluster client, unsynced data may
    /// sit in the client's cache, unseen by the other nodes). Returns the value written.
    pub fn renew(&mut self, pool: &Pool) -> Result<u64> {
        pool.open_locks.close_idle();
        let fs = pool.fs()?;
        let file = fs.open_lease(&self.rel)?;
        if self.counter == 0 {
            // Go on from what is there: a restarted plugin must still change the counter. A
            // fresh file starts from the clock, different from any counter a controller saw.
            let mut buf = [0u8; LEASE_LEN];
            let n = file.read_at(&mut buf, 0).unwrap_or(0);
            self.counter = parse_lease(&buf[..n]).unwrap_or(0).max(meta::now_unix());
        }
        let next = self.counter.wrapping_add(1);
        let path = fs.path(&self.rel);
        file.write_all_at(&format_lease(next), 0)
            .context(|| format!("renew the lease {}", path.display()))?;
        file.sync_data()
            .context(|| format!("sync the lease {}", path.display()))?;
        self.counter = next;
        Ok(next)
    }
}

/// How another node's lease looks to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// This process does not watch leases (a node plugin, FlexVolume, the admin CLI).
    NotWatched,
    /// The node keeps no lease: its record names none (FlexVolume, an older release).
    Missing,
    /// Not seen to change yet, and unchanged for less than a timeout of this controller's own
    /// watching: not judged yet.
    Unknown {
        watched: Duration,
        timeout: Duration,
    },
    /// Changed within the timeout.
    Live { unchanged: Duration },
    /// Unchanged for at least the timeout.
    Expired { unchanged: Duration },
}

impl LeaseState {
    pub fn is_expired(self) -> bool {
        matches!(self, LeaseState::Expired { .. })
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |d: &Duration| d.as_secs_f64();
        match self {
            LeaseState::NotWatched => write!(f, "its lease is not watched here"),
            LeaseState::Missing => write!(f, "it keeps no lease (no loopvol CSI node plugin runs there)"),
            LeaseState::Unknown { watched, timeout } => write!(
                f,
                "its lease is not judged yet (this controller has watched it for {:.1} s of the {:.1} s it waits)",
                secs(watched),
                secs(timeout)
            ),
            LeaseState::Live { unchanged } => {
                write!(f, "its lease is live (renewed {:.1} s ago)", secs(unchanged))
            }
            LeaseState::Expired { unchanged } => write!(
                f,
                "its lease has expired (not renewed for {:.0} s)",
                secs(unchanged)
            ),
        }
    }
}

/// The controller's view of every node's lease: the last counter seen and since when (its own
/// monotonic clock). A restarted controller knows nothing of the time before it started, so it
/// calls no lease expired before it has watched for a whole timeout.
#[derive(Debug, Default)]
pub(crate) struct LeaseWatch {
    inner: Mutex<Watched>,
}

#[derive(Debug, Default)]
struct Watched {
    started: Option<Instant>,
    /// Per node: the counter, since when it has had that value, and whether it was ever seen
    /// to change (a counter seen only once proves nothing yet).
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    counter: u64,
    since: Instant,
    moved: bool,
}

impl LeaseWatch {
    fn inner(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `node`'s counter as read now.
    pub fn saw(&self, node: &NodeName, counter: u64, now: Instant) {
        let mut w = self.inner();
        w.started.get_or_insert(now);
        let entry = w.seen.entry(node.path_component()).or_insert(Seen {
            counter,
            since: now,
            moved: false,
        });
        if entry.counter != counter {
            *entry = Seen {
                counter,
                since: now,
                moved: true,
            };
        }
    }

    /// Starts the clock (the first round of reading leases).
    pub fn start(&self, now: Instant) {
        self.inner().started.get_or_insert(now);
    }

    /// How `node`'s lease looks at `now`, judged against `timeout`.
    pub fn state(&self, node: &NodeName, timeout: Duration, now: Instant) -> LeaseState {
        let w = self.inner();
        let Some(started) = w.started else {
            return LeaseState::NotWatched;
        };
        let Some(seen) = w.seen.get(&node.path_component()) else {
            // Not read yet (the node registered since the last round, or its lease file is
            // not written yet): nothing to judge by.
            return LeaseState::Unknown {
                watched: now.saturating_duration_since(started),
                timeout,
            };
        };
        // First seen no earlier than the watch started: a whole timeout unchanged is a whole
        // timeout of this controller's own watching.
        let unchanged = now.saturating_duration_since(seen.since);
        if unchanged >= timeout {
            LeaseState::Expired { unchanged }
        } else if seen.moved {
            LeaseState::Live { unchanged }
        } else {
            LeaseState::Unknown {
                watched: now.saturating_duration_since(started),
                timeout,
            }
        }
    }
}

impl Pool {
    /// One round of the controller's lease watch: reads every node's lease counter. The watch
    /// starts with the first round.
    pub fn watch_leases(&self) -> Result<()> {
        self.open_locks.close_idle();
        let now = Instant::now();
        self.health.watch("reading the node leases", || {
            self.leases.start(now);
            for name in self.fs()?.list_names(Path::new("nodes"))? {
                let Some(record) = self.read_node_record_file(&name) else {
                    continue;
                };
                if let Some(counter) = self.read_lease(&record.node)? {
                    self.leases.saw(&record.node, counter, Instant::now());
                }
            }
            Ok(())
        })
    }

    /// Starts the controller's lease watch (one [`Pool::watch_leases`] round every lease
    /// interval) on its own thread, for as long as the process runs.
    pub fn start_lease_watch(self: &std::sync::Arc<Self>) -> std::io::Result<()> {
        let pool = std::sync::Arc::clone(self);
        std::thread::Builder::new()
            .name("loopvol-lease-watch".into())
            .spawn(move || {
                let mut last_error = None;
                loop {
                    let error = pool.watch_leases().err().map(|e| e.to_string());
                    if error != last_error {
                        match &error {
                            Some(e) => tracing::warn!(error = %e, "could not read the node leases"),
                            None => tracing::info!("watching the node leases"),
                        }
                        last_error = error;
                    }
                    std::thread::sleep(pool.options.lease.interval);
                }
            })
            .map(drop)
    }

    /// The record in `nodes/<name>`, if it is one (temporary files and garbage are skipped).
    fn read_node_record_file(&self, name: &str) -> Option<NodeRecord> {
        if name.starts_with('.') {
            return None;
        }
        let record: NodeRecord = self
            .fs()
            .ok()?
            .read_json(&Path::new("nodes").join(name))
            .ok()
            .flatten()?;
        (record.node.path_component() == name).then_some(record)
    }

    /// How `node` (whose record is `record`) keeps its lease, as seen from here: judged
    /// against the longer of this pool's lease timeout and the one the node recorded.
    pub fn lease_state(&self, node: &NodeName, record: Option<&NodeRecord>) -> LeaseState {
        let Some(terms) = record.and_then(|r| r.lease) else {
            return LeaseState::Missing;
        };
        let timeout = self
            .options
            .lease
            .timeout
            .max(Duration::from_millis(terms.timeout_ms));
        self.leases.state(node, timeout, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeName {
        NodeName::try_from(n).unwrap()
    }

    #[test]
    fn lease_files_are_fixed_size() {
        for n in [0, 1, 42, u64::MAX] {
            let bytes = format_lease(n);
            assert_eq!(bytes.len(), LEASE_LEN);
            assert_eq!(parse_lease(&bytes), Some(n));
        }
        assert_eq!(parse_lease(b"garbage"), None);
    }

    #[test]
    fn settings_must_leave_room_for_slow_renewals() {
        LeaseSettings::default().check().unwrap();
        let s = |interval_ms, timeout_ms| LeaseSettings {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            handover_on_expiry: false,
        };
        s(250, 1000).check().unwrap();
        assert!(s(300, 1000).check().is_err());
        assert!(s(10, 1000).check().is_err());
        assert_eq!(s(2000, 30000).fence_after(), Duration::from_secs(15));
    }

    /// The controller's judgement, on its own clock: live while the counter changes, expired
    /// after a whole timeout unchanged, and nothing expired before it watched for a timeout.
    #[test]
    fn lease_watch_judges_on_its_own_clock() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let timeout = Duration::from_secs(10);
        let w = LeaseWatch::default();
        let (a, b) = (node("a"), node("b"));
        assert_eq!(w.state(&a, timeout, at(0)), LeaseState::NotWatched);
        w.start(at(0));
        assert!(matches!(
            w.state(&a, timeout, at(0)),
            LeaseState::Unknown { .. }
        ));
        // A stopped counter, first seen when the controller starts: not expired before the
        // controller itself watched for a timeout.
        w.saw(&a, 7, at(0));
        w.saw(&a, 7, at(5000));
        assert!(matches!(
            w.state(&a, timeout, at(9000)),
            LeaseState::Unknown { .. }
        ));
        assert!(w.state(&a, timeout, at(10_000)).is_expired());
        // A counter that moves stays live.
        w.saw(&b, 1, at(0));
        w.saw(&b, 2, at(9000));
        w.saw(&b, 3, at(18_000));
        assert_eq!(
            w.state(&b, timeout, at(19_000)),
            LeaseState::Live {
                unchanged: Duration::from_secs(1)
            }
        );
        // It expires a whole timeout after its last change, and comes back when it moves.
        assert!(w.state(&b, timeout, at(28_000)).is_expired());
        w.saw(&b, 4, at(30_000));
        assert!(!w.state(&b, timeout, at(30_001)).is_expired());
    }

    #[test]
    fn a_restarted_controller_waits_a_whole_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let w = LeaseWatch::default();
        w.start(t0);
        // The counter may have stopped long before: unknown, not expired, until the controller
        // has watched it for the timeout; and a counter that moves once is live.
        let (a, b) = (node("a"), node("b"));
        w.saw(&a, 7, t0);
        let s = w.state(&a, timeout, t0 + Duration::from_secs(9));
        assert!(matches!(s, LeaseState::Unknown { .. }), "{s:?}");
        assert!(
            s.to_string().contains("watched it for 9.0 s of the 10.0 s"),
            "{s}"
        );
        w.saw(&b, 1, t0);
        w.saw(&b, 2, t0 + Duration::from_secs(1));
        let s = w.state(&b, timeout, t0 + Duration::from_secs(9));
        assert!(matches!(s, LeaseState::Live { .. }), "{s:?}");
        let s = w.state(&a, timeout, t0 + Duration::from_secs(10));
        assert!(s.is_expired(), "{s:?}");
    }
}
