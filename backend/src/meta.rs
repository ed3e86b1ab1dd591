//! Volume and snapshot metadata: what *should* exist (the kernel says what does). One JSON file
//! per volume or snapshot, read and written only through the pool's access module
//! (`pool::fsops`), atomically. Every ID in a record is a typed ID, so a record naming an invalid
//! one fails to load as corrupt.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{GroupSnapshotId, NodeName, SnapshotId, VolumeId};
use crate::validate::FsType;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Sparse image: space is taken as data is written.
    #[default]
    Thin,
    /// Every block allocated up front (fallocate): writes never fail for lack of pool space.
    Thick,
}

impl std::str::FromStr for Allocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "thin" => Ok(Allocation::Thin),
            "thick" => Ok(Allocation::Thick),
            other => Err(Error::invalid(
                "allocation",
                format!("{other:?} (thin or thick)"),
            )),
        }
    }
}

impl Allocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Thin => "thin",
            Allocation::Thick => "thick",
        }
    }
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "id")]
pub enum VolumeSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

/// How a node uses a volume it holds (staged or claimed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    /// Read-write, one node at a time.
    SingleNodeWriter,
    /// Read-only; any number of nodes.
    ReadOnly,
    /// Read-write on many nodes at once: only for block volumes whose users coordinate.
    MultiNodeWriter,
}

impl AccessMode {
    /// One node: read-only or read-write.
    pub fn single_node(read_only: bool) -> AccessMode {
        if read_only {
            AccessMode::ReadOnly
        } else {
            AccessMode::SingleNodeWriter
        }
    }

    /// How a message names the mode.
    pub fn describe(self) -> &'static str {
        match self {
            AccessMode::ReadOnly => "read-only",
            AccessMode::SingleNodeWriter => "read-write",
            AccessMode::MultiNodeWriter => "multi-writer",
        }
    }

    /// Whether a holder in mode `self` on one node tolerates a holder in `other` on another node.
    pub fn shares_with(self, other: AccessMode) -> bool {
        use AccessMode::*;
        matches!(
            (self, other),
            (ReadOnly, ReadOnly) | (MultiNodeWriter, MultiNodeWriter)
        )
    }
}

/// A node's hold on a volume: a controller claim (CSI ControllerPublish, FlexVolume attach) or a
/// node's staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub node: NodeName,
    pub mode: AccessMode,
    /// The PV the claim was made for: FlexVolume's `detach` names only the PV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pv_name: Option<String>,
    /// A staging hold: the kernel boot of the node that staged it. A node whose record names
    /// another boot since has rebooted, and its old kernel writes nothing any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    /// A staging hold whose node cut its writes off (see `volume::fence`): it no longer keeps
    /// the volume from another node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<Fenced>,
}

impl Hold {
    /// A hold of `node` in `mode`, for nothing else.
    pub fn new(node: NodeName, mode: AccessMode) -> Hold {
        Hold {
            node,
            mode,
            pv_name: None,
            boot: None,
            fenced: None,
        }
    }
}

/// Who cut a node's writes to a volume off, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    pub by: FencedBy,
    /// For the operator: what made the node (or the controller) fence it.
    pub reason: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FencedBy {
    /// The node itself, after shutting the filesystem down and cutting the loop device off.
    Node,
    /// The controller, at the lease's expiry, when the cluster allows hand-over then
    /// (`--handover-on-lease-expiry`): it relies on the node having fenced itself in time.
    LeaseExpiry,
    /// An operator who declared the node down (`loopvol fence NODE`).
    Operator,
}

impl FencedBy {
    pub fn describe(self) -> &'static str {
        match self {
            FencedBy::Node => "by the node itself",
            FencedBy::LeaseExpiry => "by the controller at the lease's expiry",
            FencedBy::Operator => "by an operator who declared the node down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub schema: u32,
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    /// The filesystem to create on first stage; `None` for a volume created for raw block use
    /// or with no preference (then the stage request decides).
    #[serde(default)]
    pub fs_type: Option<FsType>,
    #[serde(default)]
    pub allocation: Allocation,
    #[serde(default)]
    pub source: Option<VolumeSource>,
    /// For a node-local pool: the node whose pool holds the image.
    #[serde(default)]
    pub node: Option<NodeName>,
    pub created_unix: u64,
    /// Controller claims (who may attach it).
    #[serde(default)]
    pub claims: Vec<Hold>,
    /// Nodes that have it staged now.
    #[serde(default)]
    pub staged: Vec<Hold>,
    /// Set while loopvol formats the volume: a crash mid-mkfs leaves a partial filesystem that
    /// must be formatted again, not mistaken for user data (or refused as such).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatting: Option<FsType>,
    /// Nothing but zeros since it was created blank (no source): loopvol has not formatted it and
    /// no workload had its raw device. With the image's extent map, a witness that formatting it
    /// loses nothing. `false` for volumes made before it was recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blank: bool,
    /// Staged or published as a raw block device at least once: whatever it holds carries no
    /// filesystem signature, so loopvol never formats it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw_block: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub schema: u32,
    pub id: SnapshotId,
    pub name: String,
    pub source_volume_id: VolumeId,
    pub size_bytes: u64,
    #[serde(default)]
    pub fs_type: Option<FsType>,
    pub created_unix: u64,
    /// Set for members of a group snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<GroupSnapshotId>,
}

/// What the typed fields of a record cannot say about it: a schema this release reads, names
/// within the caller's limits. (Every ID and node name is typed, so deserializing checked those.)
fn check_record(schema: u32, name: &str, holds: &[&Hold]) -> std::result::Result<(), String> {
    if schema == 0 || schema > SCHEMA_VERSION {
        return Err(format!(
            "schema {schema} is not one this release reads (1 to {SCHEMA_VERSION})"
        ));
    }
    crate::validate::check_name("name", name).map_err(|e| e.to_string())?;
    for pv in holds.iter().filter_map(|h| h.pv_name.as_deref()) {
        crate::validate::check_name("PV name", pv).map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl VolumeMeta {
    /// See [`check_record`]; read_record refuses a record that fails it as corrupt.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let holds: Vec<&Hold> = self.claims.iter().chain(&self.staged).collect();
        check_record(self.schema, &self.name, &holds)
    }
}

impl SnapshotMeta {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        check_record(self.schema, &self.name, &[])
    }
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharing_rules() {
        use AccessMode::*;
        assert!(ReadOnly.shares_with(ReadOnly));
        assert!(MultiNodeWriter.shares_with(MultiNodeWriter));
        assert!(!SingleNodeWriter.shares_with(ReadOnly));
        assert!(!ReadOnly.shares_with(SingleNodeWriter));
        assert!(!SingleNodeWriter.shares_with(SingleNodeWriter));
    }
}
