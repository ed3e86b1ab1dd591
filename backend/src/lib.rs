//! loopvol's storage backend: volumes as sparse image files in a pool directory, attached as
//! loop devices, formatted and mounted. Both front ends (FlexVolume, CSI) only translate to and
//! from this API; all storage work, validation, policy and locking happens here.
//!
//! The kernel is the source of truth for what is attached (sysfs) and mounted (mountinfo); the
//! metadata for what should exist. Every operation is idempotent and finishes what an interrupted
//! earlier call left half done.
//!
//! Where things are decided (see `docs/design.md` for the whole map):
//! - [`ids`]: what a valid volume, snapshot or node name is;
//! - `size`: what size a request resolves to;
//! - `plan`: format or not, and how a staging mount or a publication is mounted;
//! - `pool`: the layout, listings, capacity and locks; `pool::fsops`: every access to the pool's
//!   files;
//! - `volume`: the locked [`Volume`] handle and every operation on a volume;
//! - `kernel`: one view of mounts and loop devices per operation, and which of them are whose.

#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

mod cmd;
mod copy;
pub mod error;
mod extents;
mod freeze;
mod fs;
mod host;
pub mod ids;
pub mod inspect;
mod kernel;
mod lock;
mod loopdev;
mod meta;
mod mount;
pub mod observe;
mod plan;
mod pool;
mod size;
mod snapshot;
#[allow(unsafe_code)] // the one place for ioctls; every block has a SAFETY comment
mod sys;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod validate;
mod volume;

/// Table tests: every row checked, one failure listing every wrong row.
#[cfg(test)]
mod table {
    use std::fmt::Debug;

    /// Runs `f` on each row's input and fails once, naming every row whose result is not the
    /// expected one.
    pub(crate) fn check<I: Debug, O: Debug + PartialEq>(
        rows: impl IntoIterator<Item = (I, O)>,
        f: impl Fn(&I) -> O,
    ) {
        let wrong: Vec<String> = rows
            .into_iter()
            .filter_map(|(input, want)| {
                let got = f(&input);
                (got != want).then(|| format!("{input:?}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{} rows wrong:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
}

/// Names both front ends and the tools agree on (deployments depend on them).
pub mod names {
    /// The CSI driver name `loopvol-csi` reports by default.
    pub const CSI_DRIVER: &str = "csi.loopvol.io";
    /// The FlexVolume driver name in PVs (installed as `loopvol~loopvol/loopvol`).
    pub const FLEX_DRIVER: &str = "loopvol/loopvol";
    /// The topology key of a volume in a node-local pool: its value is the node whose pool holds
    /// the image.
    pub const TOPOLOGY_KEY: &str = "topology.loopvol.io/node";
}

pub use copy::CopyMethod;
pub use error::{Error, ErrorKind, Result};
pub use fs::{InodeUsage, Usage};
pub use ids::{GroupSnapshotId, NodeName, SnapshotId, VolumeId};
pub use lock::LockWait;
pub use meta::{
    AccessMode, Allocation, Fenced, FencedBy, Hold, SnapshotMeta, VolumeMeta, VolumeSource,
};
pub use pool::watchdog::HUNG_AFTER as POOL_DEADLINE;
pub use pool::{
    default_node_name, BadEntry, Capacity, LeaseSettings, LeaseState, LeaseTerms, Listed,
    ListedVolume, NodeInfo, NodePath, NodeRecord, Page, Pool, PoolOptions,
};
pub use size::{min_size, SizeRequest, BLOCK, DEFAULT_SIZE};
pub use snapshot::{GroupSnapshot, SnapshotRequest};
pub use sys::limit_malloc_arenas;
pub use validate::FsType;
pub use volume::{
    AbnormalReason, Access, Condition, CreateVolume, Expanded, FenceCheck, FenceReport, NodeGuard,
    Publish, Staged, Volume,
};
