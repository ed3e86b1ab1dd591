//! Test support shared by every end-to-end test of the workspace: `csi/tests`,
//! `flexvolume/tests`, `migrate/tests`, and the backend's and deployment's tests here in
//! `tests/tests/`.
//!
//! - [`gate`]: a test that needs root or a tool runs, or fails saying what it needs, or (only
//!   when the run opts out with `LOOPVOL_TEST_SKIP_ROOT=1`) skips saying why;
//! - [`scratch`]: a temporary pool per test, and the cleanup of exactly what the test made;
//! - [`kernel`]: loop devices and mounts as tests see them (the one adapter to the backend's
//!   low-level modules);
//! - [`binaries`]: the workspace's binaries, built from the current sources;
//! - [`csi`]: the `loopvol-csi` process, a client, request builders, tables of calls;
//! - [`flex`]: `loopvol-flexvolume` run as kubelet runs it, and kubelet's options;
//! - [`gluster`]: a GlusterFS volume mounted twice, as the shared pool of two nodes; [`hazard`]:
//!   tests that must not overlap (mkfs.btrfs beside a dead FUSE mount);
//! - [`admin`]: the admin CLI `loopvol` run on a test's pool; [`openmetrics`]: a strict parser
//!   of what `/metrics` and `loopvol metrics` write, and a scrape of `/metrics`;
//! - [`poll`], [`data`], [`freeze`]: waiting on conditions, test data, calls held in flight;
//! - [`small_fs`]: a small filesystem of the test's own, to fill; [`workload`]: writes and
//!   syncs, and what it synced checked afterwards (fencing);
//! - [`bench`]: the benchmarks' statistics (interleaved pairs, median ratio and spread).

pub mod admin;
pub mod bench;
pub mod binaries;
pub mod csi;
pub mod data;
pub mod flex;
pub mod freeze;
pub mod gate;
pub mod gluster;
pub mod hazard;
pub mod kernel;
pub mod openmetrics;
pub mod poll;
pub mod scratch;
pub mod small_fs;
pub mod workload;

pub use binaries::{binary, run};
pub use csi::CsiServer;
pub use data::{fs_size, pattern, write_synced};
pub use gate::{fs_tools, require_root, SKIP_ROOT};
pub use poll::{poll_until, poll_until_async};
pub use scratch::{cleanup_under, loops_under, mounts_under, Scratch};
