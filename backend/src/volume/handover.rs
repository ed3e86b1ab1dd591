//! Who may have a volume of a shared pool: the cross-checks between the controller's claims and
//! the nodes' staging holds, the attach limit, and the hand-over of a read-write volume from one
//! node to another.
//!
//! A read-write volume moves to another node only once the node that had it provably stopped
//! writing: it unstaged (its hold is gone), it fenced itself and recorded so (`fence`), it
//! rebooted since it staged (its record names another boot), or an operator declared it down
//! ([`Pool::fence_node`]). A released claim proves nothing: Kubernetes force-detaches a node
//! that stopped answering while its kernel may still be writing, and a stopped lease only proves
//! that the plugin stopped renewing. Only a cluster that accepts the bounded-pause assumption
//! lets the controller hand over at the lease's expiry (`LeaseSettings::handover_on_expiry`).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::ids::{NodeName, VolumeId};
use crate::lock::{LockGuard, LockWait};
use crate::meta::{self, AccessMode, Fenced, FencedBy, Hold, VolumeMeta};
use crate::pool::{LeaseState, Pool};

use super::{check_sharing, Volume};

/// How another node's staging hold stands against a node that wants the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// That node may still be writing: the hold keeps the volume.
    Blocks,
    /// That node (or the controller, at lease expiry) fenced it.
    Fenced,
    /// That node booted again since it staged: the kernel that wrote is gone.
    Rebooted,
    /// Its lease expired and the cluster hands over then.
    LeaseExpired,
}

/// The standing of `hold` (another node's staging hold), given that node's current boot as its
/// record says, its lease as this process sees it, and whether hand-over at expiry is allowed.
pub(crate) fn standing(
    hold: &Hold,
    current_boot: Option<&str>,
    lease: LeaseState,
    handover_on_expiry: bool,
) -> Standing {
    if hold.fenced.is_some() {
        return Standing::Fenced;
    }
    if let (Some(then), Some(now)) = (hold.boot.as_deref(), current_boot) {
        if then != now {
            return Standing::Rebooted;
        }
    }
    if handover_on_expiry && lease.is_expired() {
        return Standing::LeaseExpired;
    }
    Standing::Blocks
}

/// Why node `wanted_by` cannot have volume `id` while `holder` keeps its staging hold.
fn still_staged(id: &VolumeId, hold: &Hold, lease: LeaseState, wanted_by: &NodeName) -> Error {
    let other = &hold.node;
    Error::precondition(format!(
        "volume {id} is still staged {} on node {other}, and {lease}; node {wanted_by} can have \
         it once {other} unstages it or fences itself (a node plugin fences a volume whose claim \
         was released within a lease interval). If {other} is down, declare it so with \
         `loopvol fence {other}` (as Kubernetes' node.kubernetes.io/out-of-service taint does)",
        hold.mode.describe()
    ))
}

impl Volume<'_> {
    /// Controller side: refuses `node` in `mode` while another node's staging hold that cannot
    /// share with it still counts (see [`standing`]). Holds of rebooted nodes are dropped, and
    /// holds of expired leases are marked fenced when the cluster hands over then; the caller
    /// saves.
    pub(super) fn check_staged_elsewhere(
        &mut self,
        node: &NodeName,
        mode: AccessMode,
    ) -> Result<()> {
        let handover_on_expiry = self.pool.options().lease.handover_on_expiry;
        let mut rebooted = Vec::new();
        let mut expired = Vec::new();
        for hold in &self.meta.staged {
            if hold.node == *node || hold.mode.shares_with(mode) || hold.fenced.is_some() {
                continue;
            }
            let record = self.pool.node_record(&hold.node).ok().flatten();
            let lease = self.pool.lease_state(&hold.node, record.as_ref());
            let boot = record.as_ref().and_then(|r| r.boot_id.as_deref());
            match standing(hold, boot, lease, handover_on_expiry) {
                Standing::Blocks => return Err(still_staged(&self.meta.id, hold, lease, node)),
                Standing::Fenced => {}
                Standing::Rebooted => rebooted.push(hold.node.clone()),
                Standing::LeaseExpired => expired.push((hold.node.clone(), lease)),
            }
        }
        let id = self.meta.id.clone();
        self.meta.staged.retain(|h| !rebooted.contains(&h.node));
        for other in rebooted {
            tracing::warn!(volume = %id, node = %other, "dropped the staging hold of a node that rebooted since it staged");
        }
        for (other, lease) in expired {
            if let Some(h) = self.meta.staged.iter_mut().find(|h| h.node == other) {
                h.fenced = Some(Fenced {
                    by: FencedBy::LeaseExpiry,
                    reason: format!("the controller handed it over to node {node}: {lease}"),
                    at_unix: meta::now_unix(),
                });
            }
            tracing::warn!(volume = %id, node = %other, %lease, "handing over at lease expiry");
        }
        Ok(())
    }

    /// Controller side: when `node` recorded an attach limit, holds that node's claim lock and
    /// refuses (`ResourceExhausted`) a new claim beyond the limit. The lock serialises claims
    /// for one node across volumes until the caller saved its claim.
    pub(super) fn check_attach_limit(&self, node: &NodeName) -> Result<Option<LockGuard>> {
        let Some(max) = self.pool.node_record(node)?.and_then(|r| r.max_volumes) else {
            return Ok(None);
        };
        let guard = self.pool.lock_node(node, self.pool.options().lock_wait)?;
        let id = &self.meta.id;
        let published = self
            .pool
            .list_volumes(None, 0)?
            .entries
            .iter()
            .filter(|m| m.id != *id && m.claims.iter().any(|h| h.node == *node))
            .count();
        if u64::try_from(published).unwrap_or(u64::MAX) >= max {
            return Err(Error::Limit(format!(
                "node {node} has {published} volumes published, its maximum \
                 (--max-volumes-per-node {max}); volume {id} can be published there once one of \
                 them is unpublished"
            )));
        }
        Ok(Some(guard))
    }

    /// Node side, on a shared pool: the mode this node may stage the volume in. It needs this
    /// node's claim (ControllerPublishVolume, FlexVolume attach), and a read-only claim makes a
    /// read-only stage whatever was asked. A hold this node fenced must be unstaged first.
    pub(super) fn stage_mode(&self, asked: AccessMode) -> Result<AccessMode> {
        if !self.pool.is_shared() {
            return Ok(asked);
        }
        let node = self.pool.node();
        let id = &self.meta.id;
        if let Some(fenced) = own(&self.meta.staged, node).and_then(|h| h.fenced.as_ref()) {
            return Err(Error::precondition(format!(
                "volume {id} was fenced on node {node} ({}); unstage it here before staging it \
                 again",
                fenced.reason
            )));
        }
        // Another node that has it in a mode that excludes this one is the first thing to say.
        check_sharing(id, &live_holds(&self.meta.staged), node, asked, "staged")?;
        match own(&self.meta.claims, node) {
            None => {
                let published: Vec<String> = self
                    .meta
                    .claims
                    .iter()
                    .map(|h| format!("node {} {}", h.node, h.mode.describe()))
                    .collect();
                Err(Error::precondition(format!(
                    "volume {id} is not published to node {node}{}: ControllerPublishVolume \
                     (FlexVolume attach) must claim it for this node before it is staged here",
                    if published.is_empty() {
                        String::new()
                    } else {
                        format!(" (it is published to {})", published.join(", "))
                    }
                )))
            }
            Some(claim) if claim.mode == AccessMode::ReadOnly && asked != AccessMode::ReadOnly => {
                tracing::info!(volume = %id, "published read-only to this node: staging read-only");
                Ok(AccessMode::ReadOnly)
            }
            Some(_) => Ok(asked),
        }
    }
}

/// `node`'s hold in `holds`.
pub(crate) fn own<'h>(holds: &'h [Hold], node: &NodeName) -> Option<&'h Hold> {
    holds.iter().find(|h| h.node == *node)
}

/// The staging holds that still keep a volume: those nobody fenced.
pub(crate) fn live_holds(holds: &[Hold]) -> Vec<Hold> {
    holds
        .iter()
        .filter(|h| h.fenced.is_none())
        .cloned()
        .collect()
}

/// What an operator's `loopvol fence NODE` released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceReport {
    /// Volumes whose claims of the node were dropped or whose holds of it were marked fenced.
    pub released: Vec<VolumeId>,
    /// Volumes another call held locked throughout: run the fence again.
    pub busy: Vec<VolumeId>,
}

/// Whether [`Pool::fence_node`] first checks that the node's lease stands still.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceCheck {
    /// Watch the lease for two of the node's renewal intervals: if it moves, the node plugin is
    /// running and reaches the pool, so the node is not down (refused).
    LeaseStill,
    /// The operator insists (the node's lease file is not its own, say).
    Force,
}

impl Pool {
    /// An operator's assertion that `node` is down for good (powered off, isolated, its kernel
    /// gone): drops every claim it has in the pool and marks its staging holds fenced, so its
    /// read-write volumes can move to other nodes. This is loopvol's
    /// `node.kubernetes.io/out-of-service` taint, and the operator's word is the proof that the
    /// node writes no more: run it only when that is true. A node that comes back finds its
    /// holds fenced and fences what it still has staged; its holds go when it unstages. With
    /// [`FenceCheck::LeaseStill`] a node whose lease still moves is refused.
    pub fn fence_node(&self, node: &NodeName, check: FenceCheck) -> Result<FenceReport> {
        if check == FenceCheck::LeaseStill {
            self.check_lease_still(node)?;
        }
        let mut report = FenceReport::default();
        for m in self.list_volumes(None, 0)?.entries {
            if !holds_of(&m, node) {
                continue;
            }
            let mut volume =
                match self.lock_volume_with(&m.id, LockWait::Bounded(Duration::from_secs(10))) {
                    Ok(Some(v)) => v,
                    Ok(None) => continue,
                    Err(e) if e.kind() == crate::ErrorKind::Busy => {
                        report.busy.push(m.id);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            if !holds_of(&volume.meta, node) {
                continue;
            }
            volume.meta.claims.retain(|h| h.node != *node);
            for hold in volume.meta.staged.iter_mut().filter(|h| h.node == *node) {
                hold.fenced.get_or_insert_with(|| Fenced {
                    by: FencedBy::Operator,
                    reason: format!("an operator declared node {node} down"),
                    at_unix: meta::now_unix(),
                });
            }
            volume.save()?;
            tracing::warn!(volume = %m.id, %node, "operator fence: released the node's claims, fenced its holds");
            report.released.push(m.id);
        }
        Ok(report)
    }

    /// Refuses when `node`'s lease changes within two of its renewal intervals.
    fn check_lease_still(&self, node: &NodeName) -> Result<()> {
        let record = self.node_record(node)?;
        let interval = record
            .as_ref()
            .and_then(|r| r.lease)
            .map(|t| Duration::from_millis(t.interval_ms))
            .unwrap_or(self.options().lease.interval);
        let before = self.read_lease(node)?;
        std::thread::sleep(interval * 2);
        let after = self.read_lease(node)?;
        if after.is_some() && after != before {
            return Err(Error::precondition(format!(
                "node {node} renewed its lease within the last {:.1} s: its node plugin runs and \
                 reaches the pool, so it is not down. It fences by itself what it no longer may \
                 write; fence it only once it is really down",
                (interval * 2).as_secs_f64()
            )));
        }
        Ok(())
    }
}

/// Whether `node` has a claim on `m`, or a staging hold not yet fenced.
fn holds_of(m: &VolumeMeta, node: &NodeName) -> bool {
    m.claims.iter().any(|h| h.node == *node)
        || m.staged
            .iter()
            .any(|h| h.node == *node && h.fenced.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(boot: Option<&str>, fenced: bool) -> Hold {
        let mut h = Hold::new(
            NodeName::try_from("node-a").unwrap(),
            AccessMode::SingleNodeWriter,
        );
        h.boot = boot.map(str::to_owned);
        h.fenced = fenced.then(|| Fenced {
            by: FencedBy::Node,
            reason: "claim released".into(),
            at_unix: 1,
        });
        h
    }

    /// The hand-over rule, case by case: only a fence, a reboot, or (when allowed) an expired
    /// lease lets another node have a volume staged read-write elsewhere.
    #[test]
    fn who_may_take_a_staged_volume() {
        let live = LeaseState::Live {
            unchanged: Duration::from_secs(1),
        };
        let expired = LeaseState::Expired {
            unchanged: Duration::from_secs(40),
        };
        let unknown = LeaseState::Unknown {
            watched: Duration::from_secs(3),
            timeout: Duration::from_secs(30),
        };
        use Standing::*;
        crate::table::check(
            [
                // (hold's boot, fenced, node's boot now, lease, hand over at expiry)
                ((Some("b1"), false, Some("b1"), live, false), Blocks),
                ((Some("b1"), false, Some("b1"), expired, false), Blocks),
                ((Some("b1"), false, Some("b1"), unknown, true), Blocks),
                (
                    (Some("b1"), false, Some("b1"), LeaseState::Missing, true),
                    Blocks,
                ),
                (
                    (Some("b1"), false, Some("b1"), LeaseState::NotWatched, true),
                    Blocks,
                ),
                ((Some("b1"), false, Some("b1"), expired, true), LeaseExpired),
                ((Some("b1"), true, Some("b1"), live, false), Fenced),
                ((None, true, None, live, false), Fenced),
                ((Some("b1"), false, Some("b2"), live, false), Rebooted),
                // Unknown boots prove nothing.
                ((None, false, Some("b2"), live, false), Blocks),
                ((Some("b1"), false, None, live, false), Blocks),
            ],
            |&(boot, fenced, now, lease, expiry)| standing(&hold(boot, fenced), now, lease, expiry),
        );
    }
}
