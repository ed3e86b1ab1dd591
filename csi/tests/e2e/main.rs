//! End-to-end tests of `loopvol-csi`: the binary cargo built for this test run (from the current
//! sources), spawned per test with its own pool and socket, driven over a real Unix socket by
//! tonic clients. They cover, RPC by RPC, the rules of `reference/csi.md`. By what they need:
//!
//! - [`protocol`]: required fields, error codes, idempotency, maximum lengths, paging,
//!   capabilities, snapshots and claims: the controller's answers, no root;
//! - [`process`]: startup, misconfiguration, the socket, logging, path confinement; no root;
//! - [`lifecycle`]: stage, publish, block, snapshots and clones with data, expansion: real loop
//!   devices, filesystems and mounts, as root;
//! - [`recovery`]: calls held in flight on a frozen filesystem, a busy volume, SIGTERM, SIGKILL
//!   and the repeated call that finishes the job; as root;
//! - [`metrics`]: `/metrics` parsed after known operations, its counts compared with them;
//! - [`reboot`]: a simulated node reboot (server killed, mounts and loop devices gone behind
//!   its back): kubelet's re-stage and re-publish, `loopvol check`, nothing formatted;
//! - [`shared_pool`]: a controller and two node plugins on one pool, a volume moving between
//!   nodes and surviving a dead one; as root;
//! - [`partition`]: the same on GlusterFS, partitioned: a stopped plugin, a dead FUSE client, a
//!   force-detach, a hung mount; as root;
//! - [`safety`]: small pools of their own: parallel admission, raw data never formatted, a full
//!   pool, a failed stage undone, the smaller refusals' codes; as root;
//! - [`trust`]: issue 12 through the server: a symlinked kubelet root end to end, paths that
//!   lead out of the prefix, a bad entry in a listing, lock files that go with their volumes.
//!
//! `cargo test -p loopvol-csi --test e2e protocol::` runs one group.

mod lifecycle;
mod metrics;
mod partition;
mod process;
mod protocol;
mod reboot;
mod recovery;
mod safety;
mod shared_pool;
mod trust;

use loopvol_e2e::csi::{Csi, CsiServer, Kubelet};
use loopvol_e2e::Scratch;

/// The binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_loopvol-csi");
/// The node the server serves (node-local pools).
const NODE: &str = "node-a";
const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// Starts the server on `<scratch>/csi.sock` with the scratch pool, this node and `extra` flags,
/// and waits until it listens.
fn start_server(scratch: &Scratch, extra: &[&str]) -> CsiServer {
    let mut args = vec![
        format!("--pool={}", scratch.pool().display()),
        format!("--node-id={NODE}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    CsiServer::start(EXE, scratch, "csi", &args)
}

/// Starts a server with `extra` flags and connects to it.
async fn start(scratch: &Scratch, extra: &[&str]) -> (CsiServer, Csi) {
    let server = start_server(scratch, extra);
    let csi = Csi::connect(&server).await;
    (server, csi)
}

/// The test's kubelet directory, `<scratch>/kubelet`.
fn kubelet(scratch: &Scratch) -> Kubelet {
    Kubelet::new(scratch, "kubelet")
}
