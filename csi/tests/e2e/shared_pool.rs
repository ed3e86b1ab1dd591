//! The shared-pool deployment of `loopvol-csi`, run for real on this machine, as root: one pool
//! served by three processes with `--shared-pool`, a controller (`ctl`) and two node plugins
//! (`node-a`, `node-b`), each on its own Unix socket, driven over those sockets the way the
//! external-attacher and two kubelets would. It covers the claim that keeps a read-write-once
//! volume on one node, the staging hold behind it, moving a volume between nodes with its data,
//! read-only sharing across nodes, and the failover of a node that died holding the volume (its
//! server SIGKILLed, its kernel state gone).
//!
//! One scenario, two pools ([`Pools`]): one directory all three servers share, and a real cluster
//! filesystem, a GlusterFS volume (see `loopvol_e2e::gluster`) mounted twice, node-a's server and
//! the controller on mount A, node-b's on mount B. The two mounts cache independently, so what
//! one node wrote reaches the other the way it would between machines.
//!
//! The "nodes" share one kernel here: node-a's loop devices and mounts are visible to node-b's
//! server. Each node gets its own kubelet directory (`<scratch>/node-a`, `<scratch>/node-b`,
//! enforced with `--path-prefix`), and what a dead node would lose with its machine is removed by
//! the test, for that node's paths only.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use loopvol_e2e::csi::*;
use loopvol_e2e::gluster::{self, GlusterPool, Node};
use loopvol_e2e::kernel::{self, mount_at, LoopDevice};
use loopvol_e2e::{
    cleanup_under, fs_tools, loops_under, mounts_under, pattern, poll_until_async, require_root,
    write_synced, Scratch,
};
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::{EXE, MIB};

/// Where the scenario's pool is.
#[derive(Clone, Copy)]
enum Pools<'a> {
    /// The scratch pool: one directory, one path for all three servers.
    Local,
    /// The two mounts of a GlusterFS volume: the controller and node-a on A, node-b on B.
    Gluster(&'a GlusterPool<'a>),
}

impl Pools<'_> {
    /// The pool as `node` (a server name) sees it.
    fn pool_of(self, scratch: &Scratch, node: &str) -> PathBuf {
        match self {
            Pools::Local => scratch.pool(),
            Pools::Gluster(gp) if node == "node-b" => gp.pool(Node::B),
            Pools::Gluster(gp) => gp.pool(Node::A),
        }
    }

    /// Loop devices attached to volume `id`'s image, through any of the pool's paths (a device
    /// attached through one GlusterFS mount has that mount's device number: the other mount's
    /// path does not match it).
    fn loops_of(self, scratch: &Scratch, id: &str) -> Vec<LoopDevice> {
        let Pools::Gluster(gp) = self else {
            return scratch.loops_of(id);
        };
        let mut found: Vec<LoopDevice> = [Node::A, Node::B]
            .into_iter()
            .flat_map(|n| kernel::loops_backing(&gp.pool(n).join("volumes").join(id).join("image")))
            .collect();
        found.sort_by_key(|d| d.number);
        found.dedup_by_key(|d| d.number);
        found
    }

    /// The mounts under the scratch dir that are the pool itself.
    fn own_mounts(self) -> Vec<PathBuf> {
        match self {
            Pools::Local => Vec::new(),
            Pools::Gluster(gp) => [Node::A, Node::B]
                .map(|n| gp.mount_point(n).to_path_buf())
                .into(),
        }
    }
}

/// Lease terms for the tests: short enough that an operator's fence (which watches a lease for
/// two intervals) costs half a second, and a lease's expiry 8 s; long enough that slow renewals
/// on a busy machine (seen: more than 2 s between two renewals through GlusterFS under a full
/// test run) never make a node fence (after 4 s without one).
pub(crate) const LEASE_FLAGS: [&str; 2] = ["--lease-interval=0.25", "--lease-timeout=8"];

/// Spawns `loopvol-csi --shared-pool` named `name` over the pool as it sees it, with the test
/// lease terms and `extra` flags; does not wait for it to listen.
fn spawn_server(scratch: &Scratch, pools: Pools, name: &str, extra: &[String]) -> CsiServer {
    let mut args = vec![
        format!("--pool={}", pools.pool_of(scratch, name).display()),
        "--shared-pool".to_owned(),
    ];
    args.extend(LEASE_FLAGS.map(str::to_owned));
    args.extend_from_slice(extra);
    CsiServer::spawn(EXE, scratch, name, &args)
}

/// One node's kubelet paths for the volume: everything under `<scratch>/<node>`.
struct NodePaths {
    root: PathBuf,
    staging: PathBuf,
    target: PathBuf,
}

impl NodePaths {
    fn new(scratch: &Scratch, node: &str, id: &str) -> NodePaths {
        let kubelet = Kubelet::new(scratch, node);
        NodePaths {
            staging: kubelet.staging(id),
            target: kubelet.target("pod-1", id),
            root: kubelet.root,
        }
    }
}

fn cap(mode: Mode) -> pb::VolumeCapability {
    mount_cap("ext4", mode)
}

fn controller_publish(
    id: &str,
    node: &str,
    mode: Mode,
    readonly: bool,
) -> pb::ControllerPublishVolumeRequest {
    controller_publish_req(id, node, cap(mode), readonly)
}

/// The controller releases `from`'s claim (ControllerUnpublish) and gives `to` a read-write one.
async fn move_claim(ctl: &mut Csi, id: &str, from: &str, to: &str) {
    ok(
        ctl.ctl
            .controller_unpublish_volume(controller_unpublish_req(id, from))
            .await,
        &format!("ControllerUnpublish {from}"),
    );
    ok(
        ctl.ctl
            .controller_publish_volume(controller_publish(id, to, Mode::SingleNodeWriter, false))
            .await,
        &format!("ControllerPublish to {to} once {from} was released"),
    );
}

/// NodeStage + NodePublish on one node.
async fn stage_and_publish(c: &mut Csi, id: &str, p: &NodePaths, mode: Mode, readonly: bool) {
    c.stage(id, &p.staging, cap(mode)).await;
    c.publish(id, &p.staging, &p.target, cap(mode), readonly)
        .await;
    assert_eq!(
        mount_at(&p.target).map(|m| m.has_option("ro")),
        Some(readonly),
        "{} after publish (read-only: {readonly})",
        p.target.display()
    );
}

/// NodeUnpublish on one node; its target is then unmounted.
async fn unpublish(c: &mut Csi, id: &str, p: &NodePaths) {
    c.unpublish(id, &p.target).await;
    assert_eq!(mount_at(&p.target), None, "{}", p.target.display());
}

/// NodeUnpublish + NodeUnstage on one node; its paths are then free of mounts.
async fn unpublish_and_unstage(c: &mut Csi, id: &str, p: &NodePaths) {
    unpublish(c, id, p).await;
    c.unstage(id, &p.staging).await;
    assert_eq!(mounts_under(&p.root), Vec::<PathBuf>::new());
}

#[track_caller]
fn assert_erofs(result: std::io::Result<impl std::fmt::Debug>, what: &str) {
    match result {
        Ok(v) => panic!("{what}: a write on a read-only publication succeeded: {v:?}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
    }
}

#[tokio::test]
async fn shared_pool_moves_a_volume_between_nodes_and_survives_a_dead_node() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    scenario(&Scratch::new(), Pools::Local).await;
}

/// GlusterFS with its default volume options (what an operator gets) serves a `volume.json`
/// replaced through one mount stale through the other for up to a second (quick-read,
/// open-behind, md-cache): claims would be judged on old data. Every server of a shared pool
/// there refuses to start, naming the `gluster volume set` commands; once they are run (on the
/// live volume: mounted clients pick them up), the same servers start and the whole scenario
/// runs.
#[tokio::test]
async fn shared_pool_on_glusterfs_needs_the_coherent_options_then_moves_a_volume() {
    if !require_root(fs_tools("ext4")) || !gluster::require_gluster() {
        return;
    }
    let scratch = Scratch::new();
    let gp = GlusterPool::start(&scratch);
    let pools = Pools::Gluster(&gp);
    for name in ["ctl", "node-a"] {
        let mut server = spawn_server(&scratch, pools, name, &[format!("--node-id={name}")]);
        let status = server.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(1), "{name}: {}", server.log_text());
        let log = server.log_text();
        for (option, value) in gluster::COHERENT {
            let command = format!("gluster volume set {} {option} {value}", gp.volume());
            assert!(
                log.contains(&command),
                "{name} does not name {command:?}:\n{log}"
            );
        }
    }
    for (key, value) in gluster::COHERENT {
        gp.set_option(key, value);
    }
    for node in [Node::A, Node::B] {
        gp.wait_for_graph_without(
            node,
            &[
                "performance/quick-read",
                "performance/open-behind",
                "performance/md-cache",
            ],
        );
    }
    scenario(&scratch, pools).await;
}

/// On GlusterFS with the options under which a metadata file replaced through one mount reads
/// fresh through the other at once (`gluster::COHERENT`) from the start.
#[tokio::test]
async fn shared_pool_on_coherent_glusterfs_moves_a_volume_between_nodes_and_survives_a_dead_node() {
    if !require_root(fs_tools("ext4")) || !gluster::require_gluster() {
        return;
    }
    let scratch = Scratch::new();
    let gp = GlusterPool::start_with(&scratch, gluster::COHERENT);
    scenario(&scratch, Pools::Gluster(&gp)).await;
}

async fn scenario(scratch: &Scratch, pools: Pools<'_>) {
    let started = Instant::now();
    let prefix = |node: &str| format!("--path-prefix={}", scratch.path(node).display());
    let mut servers = [
        spawn_server(
            scratch,
            pools,
            "ctl",
            &["--mode=controller".into(), "--node-id=ctl".into()],
        ),
        spawn_server(
            scratch,
            pools,
            "node-a",
            &[
                "--mode=node".into(),
                "--node-id=node-a".into(),
                prefix("node-a"),
            ],
        ),
        spawn_server(
            scratch,
            pools,
            "node-b",
            &[
                "--mode=node".into(),
                "--node-id=node-b".into(),
                prefix("node-b"),
            ],
        ),
    ];
    for s in &mut servers {
        s.wait_listening();
    }
    let [ctl_server, a_server, b_server] = &mut servers;
    let mut ctl = Csi::connect(ctl_server).await;
    let mut a = Csi::connect(a_server).await;
    let mut b = Csi::connect(b_server).await;
    let rwo = Mode::SingleNodeWriter;
    let rox = Mode::MultiNodeReaderOnly;

    // 1. CreateVolume on the controller: a shared pool's volume has no node topology.
    let vol = ctl.create("pvc-shared", 64 * MIB, cap(rwo)).await;
    assert!(
        vol.accessible_topology.is_empty(),
        "{:?}",
        vol.accessible_topology
    );
    assert_eq!(vol.capacity_bytes, 64 * MIB);
    let id = vol.volume_id;
    let pa = NodePaths::new(scratch, "node-a", &id);
    let pb_ = NodePaths::new(scratch, "node-b", &id);

    // 2. The claim: read-write on node-a keeps node-b out, and says who has it.
    ok(
        ctl.ctl
            .controller_publish_volume(controller_publish(&id, "node-a", rwo, false))
            .await,
        "ControllerPublish to node-a",
    );
    assert_refused(
        ctl.ctl
            .controller_publish_volume(controller_publish(&id, "node-b", rwo, false))
            .await,
        Code::FailedPrecondition,
        "node-a",
        "ControllerPublish read-write to node-b while node-a has it",
    );

    // 3. node-a stages, publishes and writes.
    stage_and_publish(&mut a, &id, &pa, rwo, false).await;
    let data = pattern(3 * 1024 * 1024 + 17, 0x5a);
    write_synced(&pa.target.join("data.bin"), &data);

    // 4. node-b staging anyway (no claim, the staging hold of node-a): refused, and it leaves
    // nothing behind for node-b: no mount, no extra loop device.
    assert_eq!(pools.loops_of(scratch, &id).len(), 1, "node-a's device");
    assert_refused(
        b.node
            .node_stage_volume(stage_req(&id, &pb_.staging, cap(rwo)))
            .await,
        Code::FailedPrecondition,
        "node-a",
        "NodeStage on node-b while node-a has it staged",
    );
    assert_eq!(mounts_under(&pb_.root), Vec::<PathBuf>::new());
    assert_eq!(
        pools.loops_of(scratch, &id).len(),
        1,
        "the refused stage attached a device"
    );
    assert!(
        !pb_.staging.exists(),
        "the refused stage created {}",
        pb_.staging.display()
    );
    assert_eq!(std::fs::read(pa.target.join("data.bin")).unwrap(), data);

    // 5. The move: node-a lets go, the controller releases it, node-b takes it with the data.
    unpublish_and_unstage(&mut a, &id, &pa).await;
    assert!(
        pools.loops_of(scratch, &id).is_empty(),
        "node-a left its device"
    );
    move_claim(&mut ctl, &id, "node-a", "node-b").await;
    stage_and_publish(&mut b, &id, &pb_, rwo, false).await;
    assert_eq!(
        std::fs::read(pb_.target.join("data.bin")).unwrap(),
        data,
        "the data node-a wrote, read on node-b"
    );

    // 6. Read-only sharing: both nodes at once, neither can write.
    unpublish_and_unstage(&mut b, &id, &pb_).await;
    ok(
        ctl.ctl
            .controller_unpublish_volume(controller_unpublish_req(&id, "node-b"))
            .await,
        "ControllerUnpublish node-b",
    );
    for node in ["node-a", "node-b"] {
        ok(
            ctl.ctl
                .controller_publish_volume(controller_publish(&id, node, rox, true))
                .await,
            &format!("read-only ControllerPublish to {node}"),
        );
    }
    let published = ok(
        ctl.ctl.controller_get_volume(get_volume_req(&id)).await,
        "ControllerGetVolume",
    );
    let mut nodes = published.status.unwrap().published_node_ids;
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);
    stage_and_publish(&mut a, &id, &pa, rox, true).await;
    stage_and_publish(&mut b, &id, &pb_, rox, true).await;
    for p in [&pa, &pb_] {
        assert_eq!(std::fs::read(p.target.join("data.bin")).unwrap(), data);
        assert_erofs(
            std::fs::write(p.target.join("new.bin"), b"x"),
            "create a file",
        );
        assert_erofs(
            std::fs::OpenOptions::new()
                .write(true)
                .open(p.target.join("data.bin")),
            "open the file for writing",
        );
    }
    unpublish(&mut a, &id, &pa).await;
    unpublish(&mut b, &id, &pb_).await;
    if let Pools::Local = pools {
        // One kernel for both "nodes": the two reader stagings mount the same read-only loop device
        // (the backend finds a volume's devices by its image's inode), so each node's unstage sees
        // the other node's staging mount as a user of its device and, rightly for a single machine,
        // refuses to unmount or detach. On separate machines neither would see the other's mount.
        let refusal = |other: &NodePaths| other.staging.display().to_string();
        assert_refused(
            a.node
                .node_unstage_volume(unstage_req(&id, &pa.staging))
                .await,
            Code::FailedPrecondition,
            &refusal(&pb_),
            "node-a's unstage while node-b's staging mount shares its device (one kernel)",
        );
        assert_refused(
            b.node
                .node_unstage_volume(unstage_req(&id, &pb_.staging))
                .await,
            Code::FailedPrecondition,
            &refusal(&pa),
            "node-b's unstage while node-a's staging mount shares its device (one kernel)",
        );
        assert!(
            mount_at(&pa.staging).is_some() && mount_at(&pb_.staging).is_some(),
            "a refused unstage unmounted its staging path"
        );
        // What node-a's machine would not show node-b: node-a's staging mount goes by hand, then
        // node-b unstages for real (its device now unused: detached), and node-a's unstage finds
        // nothing left to do but drop its hold.
        nix::mount::umount(&pa.staging).expect("unmount node-a's staging path");
        ok(
            b.node
                .node_unstage_volume(unstage_req(&id, &pb_.staging))
                .await,
            "node-b's unstage once node-a's mount is gone",
        );
        ok(
            a.node
                .node_unstage_volume(unstage_req(&id, &pa.staging))
                .await,
            "node-a's unstage with nothing mounted",
        );
    } else {
        // Through two mounts each node attaches its own device through its own mount (the
        // backend matches devices by the image's device and inode, and each mount has its own
        // device number), as on two machines: each node's unstage succeeds and detaches its own.
        assert_eq!(
            pools.loops_of(scratch, &id).len(),
            2,
            "one read-only device per node"
        );
        for (c, p, node) in [(&mut a, &pa, "node-a"), (&mut b, &pb_, "node-b")] {
            ok(
                c.node
                    .node_unstage_volume(unstage_req(&id, &p.staging))
                    .await,
                &format!("{node}'s reader unstage"),
            );
        }
    }
    assert_eq!(mounts_under(&pa.root), Vec::<PathBuf>::new());
    assert_eq!(mounts_under(&pb_.root), Vec::<PathBuf>::new());
    assert!(
        pools.loops_of(scratch, &id).is_empty(),
        "a reader left a device"
    );
    for node in ["node-a", "node-b"] {
        ok(
            ctl.ctl
                .controller_unpublish_volume(controller_unpublish_req(&id, node))
                .await,
            &format!("ControllerUnpublish {node} (reader)"),
        );
    }

    // 7. Failover: node-a has it read-write, writes more, and dies.
    ok(
        ctl.ctl
            .controller_publish_volume(controller_publish(&id, "node-a", rwo, false))
            .await,
        "ControllerPublish read-write to node-a again",
    );
    stage_and_publish(&mut a, &id, &pa, rwo, false).await;
    let more = pattern(1024 * 1024 + 5, 0xa5);
    write_synced(&pa.target.join("more.bin"), &more);
    a_server.signal(nix::sys::signal::Signal::SIGKILL);
    let status = a_server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        None,
        "node-a not killed by the signal: {status}"
    );
    drop(a);
    // Its machine is gone: so are its mounts and its loop device (removed here, node-a's only).
    assert_eq!(
        mounts_under(&pa.root).len(),
        2,
        "node-a's staging and target"
    );
    cleanup_under(&pa.root);
    assert_eq!(mounts_under(&pa.root), Vec::<PathBuf>::new());
    let left = pools.loops_of(scratch, &id);
    assert_eq!(left.len(), 1, "node-a's device");
    kernel::detach(&left[0]).expect("detach node-a's device");
    assert!(pools.loops_of(scratch, &id).is_empty());
    // Until the controller releases node-a, node-b cannot have the volume...
    assert_refused(
        ctl.ctl
            .controller_publish_volume(controller_publish(&id, "node-b", rwo, false))
            .await,
        Code::FailedPrecondition,
        "node-a",
        "ControllerPublish to node-b while dead node-a still has the claim",
    );
    assert_refused(
        b.node
            .node_stage_volume(stage_req(&id, &pb_.staging, cap(rwo)))
            .await,
        Code::FailedPrecondition,
        "node-a",
        "NodeStage on node-b while dead node-a still holds it",
    );
    // ...nor once it did (a force-detach proves nothing: node-a's kernel may still write), for
    // as long as node-a keeps its staging hold...
    ok(
        ctl.ctl
            .controller_unpublish_volume(controller_unpublish_req(&id, "node-a"))
            .await,
        "ControllerUnpublish node-a (force-detach)",
    );
    assert_refused(
        ctl.ctl
            .controller_publish_volume(controller_publish(&id, "node-b", rwo, false))
            .await,
        Code::FailedPrecondition,
        "still staged read-write on node node-a",
        "ControllerPublish to node-b while dead node-a keeps its staging hold",
    );
    // ...until an operator declares node-a down (`loopvol fence node-a`): its lease stands
    // still, so the fence goes through and node-b gets the volume.
    let fenced = loopvol_e2e::admin::Admin::built(pools.pool_of(scratch, "ctl"), "operator")
        .json(&["fence", "node-a"], 0);
    assert_eq!(fenced["released"][0], id.as_str(), "{fenced}");
    assert_eq!(fenced["busy"].as_array().map(Vec::len), Some(0), "{fenced}");
    move_claim(&mut ctl, &id, "node-a", "node-b").await;
    stage_and_publish(&mut b, &id, &pb_, rwo, false).await;
    assert_eq!(std::fs::read(pb_.target.join("data.bin")).unwrap(), data);
    assert_eq!(
        std::fs::read(pb_.target.join("more.bin")).unwrap(),
        more,
        "what node-a wrote before it died"
    );
    write_synced(&pb_.target.join("after.bin"), b"node-b writes");

    // 8. Cleanup through the API, then the servers stop cleanly.
    unpublish_and_unstage(&mut b, &id, &pb_).await;
    ok(
        ctl.ctl
            .controller_unpublish_volume(controller_unpublish_req(&id, "node-b"))
            .await,
        "ControllerUnpublish node-b",
    );
    ok(ctl.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
    assert!(
        !pools
            .pool_of(scratch, "ctl")
            .join("volumes")
            .join(&id)
            .exists(),
        "the volume's directory outlived DeleteVolume"
    );
    // Nothing but the pool itself stays mounted.
    let mut left = mounts_under(&scratch.root());
    left.retain(|m| !pools.own_mounts().contains(m));
    assert_eq!(left, Vec::<PathBuf>::new());
    assert_eq!(loops_under(&scratch.root()), Vec::<PathBuf>::new());
    drop((ctl, b));
    ctl_server.stop().await;
    b_server.stop().await;
    eprintln!("shared-pool scenario took {:?}", started.elapsed());
}

/// A node plugin restarts on a full pool (issue 9): its node record is rewritten only when what
/// it records changed, so an unchanged restart writes nothing; a change is written over the
/// record's spare (no space needed); a record it cannot write is a warning, not a crash loop.
/// Its lease goes on renewing in place.
#[tokio::test]
async fn a_node_plugin_starts_on_a_full_pool() {
    if !require_root(&["mkfs.ext4"]) {
        return;
    }
    let scratch = Scratch::new();
    let fs = loopvol_e2e::small_fs::SmallFs::ext4(&scratch, "full-pool", 16 << 20);
    let pool = fs.path().to_path_buf();
    let args = |limit: &str| -> Vec<String> {
        let mut a = vec![
            format!("--pool={}", pool.display()),
            "--shared-pool".into(),
            "--mode=node".into(),
            "--node-id=node-a".into(),
            format!("--max-volumes-per-node={limit}"),
        ];
        a.extend(LEASE_FLAGS.map(str::to_owned));
        a
    };
    let mut first = CsiServer::start(EXE, &scratch, "first", &args("2"));
    first.stop().await;
    fs.fill();
    let lease = pool.join("leases/node-a");
    let before = std::fs::read(&lease).unwrap();
    // The same settings: starts, writes no record, renews its lease.
    let mut same = CsiServer::start(EXE, &scratch, "same", &args("2"));
    poll_until_async(
        Duration::from_secs(10),
        "a renewal on the full pool",
        || std::future::ready(std::fs::read(&lease).unwrap() != before),
    )
    .await;
    let log = same.log_text();
    assert!(
        !log.contains("recorded this node") && !log.contains("could not record"),
        "{log}"
    );
    same.stop().await;
    // Another attach limit: the record is rewritten over its spare, which needs no space.
    let mut changed = CsiServer::start(EXE, &scratch, "changed", &args("3"));
    assert!(
        changed
            .log_text()
            .contains("recorded this node in the pool"),
        "{}",
        changed.log_text()
    );
    changed.stop().await;
    // A record that cannot be written at all (something planted in its place): a warning, and
    // the plugin serves what is staged.
    let record = pool.join("nodes/node-a");
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir(&record).unwrap();
    let mut unwritable = CsiServer::start(EXE, &scratch, "unwritable", &args("4"));
    let mut csi = Csi::connect(&unwritable).await;
    ok(csi.id.probe(pb::ProbeRequest {}).await, "Probe");
    assert!(
        unwritable
            .log_text()
            .contains("could not record this node in the pool"),
        "{}",
        unwritable.log_text()
    );
    drop(csi);
    unwritable.stop().await;
}
