//! loopvol's storage backend: volumes as sparse image files in a pool directory, attached as
//! loop devices, formatted and mounted. Both front ends (FlexVolume, CSI) only translate to and
//! from this API; all storage work, validation and locking happens here.
//!
//! The kernel is the source of truth for what is attached (sysfs) and mounted (mountinfo); the
//! metadata for what should exist. Every operation is idempotent and finishes what an interrupted
//! earlier call left half done.

mod cmd;
mod copy;
pub mod error;
mod freeze;
pub mod fs;
mod health;
mod lock;
pub mod loopdev;
pub mod meta;
pub mod mount;
mod node;
mod pool;
mod publish;
mod snapshot;
#[allow(unsafe_code)] // the one place for ioctls; every block has a SAFETY comment
mod sys;
pub mod validate;
mod volume;

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
pub use lock::LockWait;
pub use meta::{AccessMode, Allocation, Hold, SnapshotMeta, VolumeMeta, VolumeSource};
pub use node::{Access, Condition, Staged, Usage};
pub use pool::{default_node_name, Capacity, Page, Pool, PoolOptions};
pub use validate::FsType;
pub use volume::{CreateVolume, Expanded};
