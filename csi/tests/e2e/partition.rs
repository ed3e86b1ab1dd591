//! Partitions on a real cluster filesystem (issue 13, item 7): a GlusterFS volume mounted twice
//! (see `loopvol_e2e::gluster`), node-a's plugin on mount A, node-b's and the controller's on
//! mount B, the driver with its default settings except short lease terms
//! (`shared_pool::LEASE_FLAGS`: renewed every 0.25 s, a node fences after 4 s without a
//! renewal, a lease expires after 8 s). In each, node-a stages a volume read-write with a
//! workload writing and syncing, then loses the volume to node-b the way a partition makes it:
//!
//! - (a) node-a's plugin is stopped (SIGSTOP) and the controller force-detaches it: node-b is
//!   refused for as long as node-a stays stopped; once resumed, node-a finds its claim gone and
//!   fences itself; then node-b gets the volume;
//! - (b) node-a's FUSE client dies: node-a reports the volume abnormal within seconds and cannot
//!   record a fence; the hand-over needs an operator's `loopvol fence node-a`;
//! - (c) a force-detach with node-a's plugin running: node-a fences itself before node-b can have
//!   the volume.
//!
//! Each ends the same way: the filesystem checks clean, node-b reads every byte node-a's workload
//! synced, and nothing node-b writes is lost when node-a unstages later. A fourth test hangs
//! node-a's mount (its FUSE client stopped) and checks that node-a's server still answers, within
//! seconds, with the reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use loopvol_e2e::admin::Admin;
use loopvol_e2e::csi::*;
use loopvol_e2e::gluster::{self, GlusterPool, Node};
use loopvol_e2e::kernel;
use loopvol_e2e::workload::{assert_synced_blocks, Workload};
use loopvol_e2e::{
    cleanup_under, fs_tools, pattern, poll_until_async, require_root, run, write_synced, Scratch,
};
use nix::sys::signal::Signal;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::shared_pool::LEASE_FLAGS;

/// The lease timeout `LEASE_FLAGS` sets.
const LEASE_EXPIRY: Duration = Duration::from_secs(8);
use crate::{EXE, MIB};

fn cap() -> pb::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

/// The three servers over the GlusterFS volume, and a client of each.
struct Cluster {
    /// The pool through mount A (node-a's) and mount B (node-b's and the controller's).
    pool_a: PathBuf,
    pool_b: PathBuf,
    /// Kept running for the test (killed on drop).
    _ctl_server: CsiServer,
    a_server: CsiServer,
    _b_server: CsiServer,
    ctl: Csi,
    a: Csi,
    b: Csi,
    id: String,
    pa: PodVolume,
    pb: PodVolume,
}

impl Cluster {
    async fn start(scratch: &Scratch, gp: &GlusterPool<'_>, name: &str) -> Cluster {
        let server = |name: &str, node: Node, extra: &[String]| {
            let mut args = vec![
                format!("--pool={}", gp.pool(node).display()),
                "--shared-pool".to_owned(),
                format!("--node-id={name}"),
            ];
            args.extend(LEASE_FLAGS.map(str::to_owned));
            args.extend_from_slice(extra);
            CsiServer::spawn(EXE, scratch, name, &args)
        };
        let node = |name: &str| {
            vec![
                "--mode=node".to_owned(),
                format!("--path-prefix={}", scratch.path(name).display()),
            ]
        };
        let mut servers = [
            server("ctl", Node::B, &["--mode=controller".to_owned()]),
            server("node-a", Node::A, &node("node-a")),
            server("node-b", Node::B, &node("node-b")),
        ];
        for s in &mut servers {
            s.wait_listening();
        }
        let [ctl_server, a_server, b_server] = servers;
        let mut ctl = Csi::connect(&ctl_server).await;
        let a = Csi::connect(&a_server).await;
        let b = Csi::connect(&b_server).await;
        let id = ctl.create(name, 64 * MIB, cap()).await.volume_id;
        let pa = Kubelet::new(scratch, "node-a").pod_volume("pod-a", &id);
        let pb = Kubelet::new(scratch, "node-b").pod_volume("pod-b", &id);
        Cluster {
            pool_a: gp.pool(Node::A),
            pool_b: gp.pool(Node::B),
            _ctl_server: ctl_server,
            a_server,
            _b_server: b_server,
            ctl,
            a,
            b,
            id,
            pa,
            pb,
        }
    }

    async fn publish(&mut self, node: &str) -> Result<(), tonic::Status> {
        self.ctl
            .ctl
            .controller_publish_volume(controller_publish_req(&self.id, node, cap(), false))
            .await
            .map(drop)
    }

    async fn unpublish(&mut self, node: &str) {
        ok(
            self.ctl
                .ctl
                .controller_unpublish_volume(controller_unpublish_req(&self.id, node))
                .await,
            &format!("ControllerUnpublish {node}"),
        );
    }

    /// node-a has the volume read-write, with a workload that synced a few blocks.
    async fn node_a_writing(&mut self) -> Workload {
        ok(
            self.publish("node-a").await.map(tonic::Response::new),
            "ControllerPublish to node-a",
        );
        self.a.stage_and_publish(&self.pa, &cap()).await;
        // About 6 MiB/s at most: the 64 MiB volume holds a minute of it.
        let workload = Workload::paced(self.pa.target.join("workload"), Duration::from_millis(10));
        poll_until_async(Duration::from_secs(20), "the workload syncing", || {
            std::future::ready(workload.synced() >= 4 || workload.failed())
        })
        .await;
        assert!(!workload.failed(), "the workload failed before any fence");
        workload
    }

    /// The pool as an operator's `loopvol` command on node-b's machine opens it.
    fn operator(&self) -> loopvol::Pool {
        let mut options = loopvol::PoolOptions::new("operator".parse().unwrap());
        options.shared = true;
        loopvol::Pool::open(&self.pool_b, options).expect("open the pool through mount B")
    }

    /// The staging hold of `node` as the pool records it.
    fn hold(&self, node: &str) -> Option<loopvol::Hold> {
        let id = self.id.parse().unwrap();
        let meta = self.operator().get_volume(&id).expect("read the volume");
        meta.staged.into_iter().find(|h| h.node == *node)
    }

    /// node-a's loop device for the volume (attached through mount A), by sysfs' backing path.
    fn node_a_device(&self) -> Option<kernel::LoopDevice> {
        let image = self.pool_a.join("volumes").join(&self.id).join("image");
        kernel::loop_devices()
            .into_iter()
            .find(|d| d.backing_file == image)
    }

    /// ControllerPublish to node-b is refused (naming node-a) for `during`, polled; the first
    /// refusal and the last.
    async fn node_b_refused_for(&mut self, during: Duration) -> (String, String) {
        let until = Instant::now() + during;
        let mut seen: Vec<String> = Vec::new();
        while Instant::now() < until {
            match self.publish("node-b").await {
                Ok(()) => {
                    panic!("node-b got the volume while node-a may write (refusals: {seen:?})")
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
                    assert!(s.message().contains("node node-a"), "{}", s.message());
                    seen.push(s.message().to_owned());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let first = seen.first().cloned().unwrap_or_default();
        (first, seen.pop().unwrap_or_default())
    }

    /// Waits (bounded) until ControllerPublish to node-b succeeds.
    async fn node_b_gets_it(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = match self.publish("node-b").await {
                Ok(()) => return,
                Err(s) => s.message().to_owned(),
            };
            assert!(
                Instant::now() < deadline,
                "node-b never got the volume: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// node-b stages the volume: every block node-a synced is there; node-b writes a file of
    /// its own.
    async fn node_b_takes_over(&mut self, synced: u64) -> Vec<u8> {
        self.b.stage_and_publish(&self.pb, &cap()).await;
        let got = std::fs::read(self.pb.target.join("workload")).unwrap();
        assert_synced_blocks(&got, synced, "node-a's workload read on node-b");
        let mine = pattern(3 * MIB as usize, 0xb);
        write_synced(&self.pb.target.join("by-node-b"), &mine);
        mine
    }

    /// node-b's file is intact, node-b lets go, and the filesystem checks clean.
    async fn node_b_finishes(&mut self, mine: &[u8]) {
        assert!(
            std::fs::read(self.pb.target.join("by-node-b")).unwrap() == mine,
            "what node-b wrote, after node-a's unstage"
        );
        self.b.unpublish_and_unstage(&self.pb).await;
        self.unpublish("node-b").await;
        let image = self.pool_b.join("volumes").join(&self.id).join("image");
        let (code, out, err) = run(std::process::Command::new("e2fsck").arg("-fn").arg(&image));
        assert_eq!(
            code, 0,
            "e2fsck of the image after the partition:\n{out}\n{err}"
        );
    }

    /// node-b takes the volume over (every synced block there), writes, and node-a's kubelet
    /// unstages later: nothing of node-b's goes, and the filesystem checks clean.
    async fn node_b_takes_over_then_node_a_unstages(&mut self, synced: u64) {
        let mine = self.node_b_takes_over(synced).await;
        self.a.unpublish_and_unstage(&self.pa.clone()).await;
        self.node_b_finishes(&mine).await;
    }

    async fn stats_a(&mut self) -> Result<pb::NodeGetVolumeStatsResponse, tonic::Status> {
        self.a
            .node
            .node_get_volume_stats(stats_req(&self.id, &self.pa.target))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// A FUSE client paused (SIGSTOP) until [`Paused::resume`] or the drop.
struct Paused<'g, 's> {
    gp: &'g mut GlusterPool<'s>,
    node: Node,
    paused: bool,
}

impl<'g, 's> Paused<'g, 's> {
    fn new(gp: &'g mut GlusterPool<'s>, node: Node) -> Self {
        gp.pause_client(node);
        Paused {
            gp,
            node,
            paused: true,
        }
    }

    fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            self.gp.resume_client(self.node);
        }
    }
}

impl Drop for Paused<'_, '_> {
    fn drop(&mut self) {
        self.resume();
    }
}

fn gate() -> bool {
    require_root(fs_tools("ext4")) && gluster::require_gluster()
}

/// The condition node-a reports for the volume.
async fn condition_a(c: &mut Cluster) -> pb::VolumeCondition {
    ok(
        c.stats_a().await.map(tonic::Response::new),
        "NodeGetVolumeStats on node-a",
    )
    .volume_condition
    .expect("a condition")
}

/// (a) node-a's plugin stopped (SIGSTOP), the controller force-detaches it.
#[tokio::test]
async fn partition_a_stopped_plugin_fences_itself_when_it_resumes() {
    if !gate() {
        return;
    }
    let scratch = Scratch::new();
    let gp = GlusterPool::start_with(&scratch, gluster::COHERENT);
    let mut c = Cluster::start(&scratch, &gp, "pvc-a").await;
    let mut workload = c.node_a_writing().await;
    // Through the other mount node-a's lease is seen moving (read as the controller reads it).
    let watcher = c.operator();
    let node_a: loopvol::NodeName = "node-a".parse().unwrap();
    let record = watcher.node_record(&node_a).unwrap();
    poll_until_async(
        Duration::from_secs(10),
        "node-a's lease live through mount B",
        || {
            watcher.watch_leases().unwrap();
            let state = watcher.lease_state(&node_a, record.as_ref());
            std::future::ready(matches!(state, loopvol::LeaseState::Live { .. }))
        },
    )
    .await;
    c.a_server.signal(Signal::SIGSTOP);
    c.unpublish("node-a").await;
    // Refused for as long as node-a stays stopped: past its lease's expiry too (the default:
    // no hand-over at expiry; a stopped plugin cannot fence).
    let (_, last) = c
        .node_b_refused_for(LEASE_EXPIRY + Duration::from_secs(1))
        .await;
    assert!(
        last.contains("has expired") && last.contains("loopvol fence node-a"),
        "{last}"
    );
    assert!(
        !workload.failed(),
        "node-a's kernel writes on while its plugin is stopped"
    );
    c.a_server.signal(Signal::SIGCONT);
    // node-a finds its claim gone and fences itself: its writes fail, the fence is recorded,
    // its volume reports abnormal.
    let (synced, error) = workload.wait_failed_async(Duration::from_secs(20)).await;
    eprintln!("node-a's workload synced {synced} blocks, then: {error}");
    c.node_b_gets_it().await;
    assert!(
        c.node_a_device().is_some_and(|d| d.cut_off),
        "node-a's device"
    );
    // Whichever it noticed first once resumed: its lease lapsed, or its claim is gone.
    let fenced = c
        .hold("node-a")
        .and_then(|h| h.fenced)
        .expect("node-a's fence recorded");
    assert_eq!(fenced.by, loopvol::FencedBy::Node, "{fenced:?}");
    assert!(
        fenced.reason.contains("claim") || fenced.reason.contains("could not renew"),
        "{fenced:?}"
    );
    let condition = condition_a(&mut c).await;
    assert!(
        condition.abnormal && condition.message.contains("fenced on this node"),
        "{condition:?}"
    );
    c.node_b_takes_over_then_node_a_unstages(synced).await;
}

/// (b) node-a's FUSE client killed: node-a cannot reach the pool, so it cannot record a fence.
#[tokio::test]
async fn partition_b_dead_client_needs_an_operator_fence() {
    if !gate() {
        return;
    }
    let scratch = Scratch::new();
    let mut gp = GlusterPool::start_with(&scratch, gluster::COHERENT);
    let mut c = Cluster::start(&scratch, &gp, "pvc-b").await;
    let mut workload = c.node_a_writing().await;
    let killed_at = Instant::now();
    gp.kill_client(Node::A);
    let (synced, error) = workload.wait_failed_async(Duration::from_secs(20)).await;
    eprintln!("node-a's workload synced {synced} blocks, then: {error}");
    // node-a reports the volume abnormal, with the reason, within seconds; its probe fails.
    poll_until_async(Duration::from_secs(10), "node-a reporting the pool", || {
        let mut a = c.a.clone();
        let (id, target) = (c.id.clone(), c.pa.target.clone());
        async move {
            a.node
                .node_get_volume_stats(stats_req(&id, &target))
                .await
                .ok()
                .and_then(|r| r.into_inner().volume_condition)
                .filter(|cond| cond.abnormal)
        }
    })
    .await;
    let reported = killed_at.elapsed();
    let condition = condition_a(&mut c).await;
    assert!(
        condition.message.contains("not answering") || condition.message.contains("fenced"),
        "{condition:?}"
    );
    eprintln!(
        "node-a reported {:?} {reported:?} after the kill",
        condition.message
    );
    assert_code(
        c.a.id.probe(pb::ProbeRequest {}).await,
        Code::FailedPrecondition,
        "node-a's Probe with its pool gone",
    );
    // node-a fences itself on its own clock (it cannot renew), but cannot tell the pool: the
    // controller keeps node-b out, past the lease's expiry.
    c.unpublish("node-a").await;
    let (_, last) = c
        .node_b_refused_for(LEASE_EXPIRY + Duration::from_secs(1))
        .await;
    assert!(
        last.contains("has expired") && last.contains("loopvol fence node-a"),
        "{last}"
    );
    assert!(c.hold("node-a").unwrap().fenced.is_none());
    // The operator declares node-a down (its lease stands still: accepted).
    let fenced = Admin::built(&c.pool_b, "operator").json(&["fence", "node-a"], 0);
    assert_eq!(fenced["released"][0], c.id.as_str(), "{fenced}");
    c.node_b_gets_it().await;
    let mine = c.node_b_takes_over(synced).await;
    // node-a's machine is restarted later: its mounts and its loop device go (here by hand,
    // node-a's only). Nothing of node-b's goes with them.
    let device = c.node_a_device().expect("node-a's device");
    assert!(
        device.cut_off,
        "node-a fenced on its own clock; its log:\n{}",
        c.a_server.log_text()
    );
    c.a_server.signal(Signal::SIGKILL);
    cleanup_under(&scratch.path("node-a"));
    kernel::detach(&device).expect("detach node-a's device");
    c.node_b_finishes(&mine).await;
    drop(gp);
}

/// (c) A force-detach with node-a's plugin running: it fences itself before node-b can stage.
#[tokio::test]
async fn partition_c_force_detach_fences_before_node_b_can_stage() {
    if !gate() {
        return;
    }
    let scratch = Scratch::new();
    let gp = GlusterPool::start_with(&scratch, gluster::COHERENT);
    let mut c = Cluster::start(&scratch, &gp, "pvc-c").await;
    let mut workload = c.node_a_writing().await;
    c.unpublish("node-a").await;
    c.node_b_gets_it().await;
    // The moment node-b may have it, node-a has already fenced: recorded, device cut off.
    let fenced = c
        .hold("node-a")
        .and_then(|h| h.fenced)
        .expect("node-a's fence recorded");
    assert_eq!(fenced.by, loopvol::FencedBy::Node, "{fenced:?}");
    assert!(
        c.node_a_device().is_some_and(|d| d.cut_off),
        "node-a's device"
    );
    let (synced, error) = workload.wait_failed_async(Duration::from_secs(5)).await;
    eprintln!("node-a's workload synced {synced} blocks, then: {error}");
    c.node_b_takes_over_then_node_a_unstages(synced).await;
}

/// A hung mount: node-a's FUSE client stopped (SIGSTOP), so every call on node-a's pool blocks.
/// node-a's server still answers, within seconds: NodeGetVolumeStats OK with the volume abnormal
/// and the reason, and Probe failing; after half the lease timeout node-a fences on its own clock,
/// the mount still hanging. Once the mount answers again the probe passes; the volume stays
/// fenced, and says why.
#[tokio::test]
async fn a_hung_pool_is_reported_within_seconds() {
    if !gate() {
        return;
    }
    let scratch = Scratch::new();
    let mut gp = GlusterPool::start_with(&scratch, gluster::COHERENT);
    let mut c = Cluster::start(&scratch, &gp, "pvc-hung").await;
    ok(
        c.publish("node-a").await.map(tonic::Response::new),
        "ControllerPublish to node-a",
    );
    c.a.stage_and_publish(&c.pa.clone(), &cap()).await;
    write_synced(&c.pa.target.join("before"), b"before the hang");
    assert!(!condition_a(&mut c).await.abnormal);
    // Resumed however the test ends, before the servers go: a server waiting on the hung mount
    // cannot even be killed.
    let mut paused = Paused::new(&mut gp, Node::A);
    let hung_at = Instant::now();
    // Each call answers within the pool's deadline (3 s) and a margin, whatever the mount does.
    let bound = loopvol::POOL_DEADLINE + Duration::from_secs(3);
    poll_until_async(
        Duration::from_secs(15),
        "node-a reporting the hung pool",
        || {
            let mut a = c.a.clone();
            let (id, target) = (c.id.clone(), c.pa.target.clone());
            async move {
                let asked = Instant::now();
                let reply = tokio::time::timeout(
                    bound,
                    a.node.node_get_volume_stats(stats_req(&id, &target)),
                )
                .await
                .expect("NodeGetVolumeStats on node-a hung with its pool")
                .expect("NodeGetVolumeStats on node-a")
                .into_inner();
                assert!(asked.elapsed() < bound);
                reply
                    .volume_condition
                    .filter(|cond| cond.abnormal && cond.message.contains("not answering"))
            }
        },
    )
    .await;
    eprintln!(
        "node-a reported the hung pool {:?} after the hang",
        hung_at.elapsed()
    );
    let probe = tokio::time::timeout(bound, c.a.id.probe(pb::ProbeRequest {}))
        .await
        .expect("Probe on node-a hung with its pool");
    assert_code(
        probe,
        Code::FailedPrecondition,
        "node-a's Probe on a hung pool",
    );
    // Half the lease timeout without a renewal: node-a fences on its own clock while the pool
    // still hangs. Seen in the kernel's mount table and node-a's log (nothing of the test may
    // touch the hung mount: it would hang with it).
    let staging = c.pa.staging.clone();
    poll_until_async(
        LEASE_EXPIRY,
        "node-a's filesystem shut down while the pool hangs",
        || {
            // mountinfo only: ext4 shows `shutdown` in its options from the moment it stops.
            let shut = loopvol::testing::mount::mounts().is_ok_and(|table| {
                table.iter().any(|m| {
                    m.mount_point == staging && m.super_options.iter().any(|o| o == "shutdown")
                })
            });
            std::future::ready(shut && c.a_server.log_text().contains("could not renew its lease"))
        },
    )
    .await;
    eprintln!(
        "node-a fenced itself {:?} after the hang began",
        hung_at.elapsed()
    );
    paused.resume();
    poll_until_async(
        Duration::from_secs(20),
        "node-a's Probe once the pool answers",
        || {
            let mut a = c.a.clone();
            async move { a.id.probe(pb::ProbeRequest {}).await.is_ok() }
        },
    )
    .await;
    poll_until_async(Duration::from_secs(10), "node-a's volume fenced", || {
        let mut a = c.a.clone();
        let (id, target) = (c.id.clone(), c.pa.target.clone());
        async move {
            let cond = a
                .node
                .node_get_volume_stats(stats_req(&id, &target))
                .await
                .expect("NodeGetVolumeStats on node-a")
                .into_inner()
                .volume_condition
                .expect("a condition");
            cond.abnormal && cond.message.contains("could not renew its lease")
        }
    })
    .await;
    c.a.unpublish_and_unstage(&c.pa.clone()).await;
    c.unpublish("node-a").await;
}
