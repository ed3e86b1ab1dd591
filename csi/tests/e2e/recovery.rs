//! Calls held in flight and crashes, as root: a filesystem the test freezes holds a call inside
//! the kernel while the test retries it (ABORTED), gives up on it, signals the server (SIGTERM
//! lets it finish; SIGKILL kills it half done) and repeats it to see the job finished.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use loopvol_e2e::csi::*;
use loopvol_e2e::freeze::{wait_for_blocked_threads, Frozen};
use loopvol_e2e::kernel::{self, mount_at};
use loopvol_e2e::{loops_under, mounts_under, poll_until_async, require_root, run, Scratch};
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::{kubelet, start, MIB};

/// Creates volume `name` and stages it for pod "p": where a held NodePublish starts from.
async fn create_and_stage(
    c: &mut Csi,
    scratch: &Scratch,
    name: &str,
    cap: &pb::VolumeCapability,
) -> PodVolume {
    let id = c.create(name, 32 * MIB, cap.clone()).await.volume_id;
    let v = kubelet(scratch).pod_volume("p", &id);
    c.stage(&v.id, &v.staging, cap.clone()).await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_call_on_a_busy_volume_is_aborted_while_others_proceed() {
    if !require_root(&["fsfreeze", "mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    let pa = create_and_stage(c, &scratch, "pvc-a", &cap).await;
    let (a, a_stage, a_target) = (&pa.id, &pa.staging, &pa.target);
    let b = c.create("pvc-b", 32 * MIB, cap.clone()).await.volume_id;

    // Hold a NodePublish of A in flight: it applies the pod's fsGroup to the volume's root, and
    // that write waits while the filesystem is frozen.
    let frozen = Frozen::freeze(a_stage);
    let with_group = mount_cap_with("ext4", Mode::SingleNodeWriter, &[], "4242");
    let first = {
        let mut node = c.node.clone();
        let req = publish_req(a, a_stage, a_target, with_group.clone(), false);
        tokio::spawn(async move { node.node_publish_volume(req).await })
    };
    wait_for_blocked_threads(server.pid(), 1);

    // The same call again (a CO retrying after its timeout), and other calls on A: ABORTED.
    let mut t = CallTable::new();
    t.case(
        "the same publish while the first is in flight",
        publish_req(a, a_stage, a_target, with_group.clone(), false),
        Code::Aborted,
    )
    .case("unstage A", unstage_req(a, a_stage), Code::Aborted)
    .case("delete A", delete_req(a), Code::Aborted);
    t.check(c).await;
    assert!(
        !first.is_finished(),
        "the first call finished while A was frozen"
    );

    // Another volume is not held up.
    let other = async {
        let pb_ = kubelet(&scratch).pod_volume("p", &b);
        c.stage_and_publish(&pb_, &cap).await;
        c.unpublish_and_unstage(&pb_).await;
    };
    tokio::time::timeout(Duration::from_secs(60), other)
        .await
        .expect("a call on another volume waited for the busy one");
    assert!(!first.is_finished());

    // A caller that gives up (its deadline passes) does not release the volume: the work goes on
    // in the background, and a retry is ABORTED until it ends.
    let pv = create_and_stage(c, &scratch, "pvc-c", &cap).await;
    let frozen_v = Frozen::freeze(&pv.staging);
    let publish_v = publish_req(&pv.id, &pv.staging, &pv.target, with_group.clone(), false);
    let mut impatient = tonic::Request::new(publish_v.clone());
    impatient.set_timeout(Duration::from_millis(300));
    let gave_up = c.node.node_publish_volume(impatient).await.unwrap_err();
    assert!(
        matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gave_up:?}"
    );
    wait_for_blocked_threads(server.pid(), 2);
    let err = c
        .node
        .node_publish_volume(publish_v.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert!(err.message().contains("in progress"), "{}", err.message());
    frozen_v.thaw();
    // ABORTED until the abandoned publish ends, then done.
    poll_until_async(
        Duration::from_secs(30),
        "the publish after the abandoned one",
        || {
            let (mut node, retry) = (c.node.clone(), publish_v.clone());
            async move {
                match node.node_publish_volume(retry).await {
                    Ok(_) => true,
                    Err(e) if e.code() == Code::Aborted => false,
                    Err(e) => panic!("publish after the abandoned one: {e:?}"),
                }
            }
        },
    )
    .await;
    assert_eq!(std::fs::metadata(&pv.target).unwrap().gid(), 4242);
    assert!(
        server.log_text().contains("Cancelled"),
        "{}",
        server.log_text()
    );
    c.unpublish_and_unstage(&pv).await;

    // The same answer across processes: the backend's lock, held here by the test.
    let held = scratch.hold_volume_lock(&b);
    assert_code(
        c.node
            .node_stage_volume(stage_req(&b, &kubelet(&scratch).staging(&b), cap.clone()))
            .await,
        Code::Aborted,
        "stage B while another process holds its lock",
    );
    drop(held);

    frozen.thaw();
    let done = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("first call")
        .unwrap();
    ok(done, "the held publish, once the filesystem thawed");
    assert_eq!(std::fs::metadata(a_target).unwrap().gid(), 4242);
    // Now the retry is just a repeat.
    c.publish(a, a_stage, a_target, with_group, false).await;
    c.unpublish_and_unstage(&pa).await;
    assert!(loops_under(&scratch.root()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_call_in_flight_finish_then_removes_the_socket() {
    if !require_root(&["fsfreeze", "mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (mut server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = mount_cap_with("ext4", Mode::SingleNodeWriter, &[], "777");
    let pa = create_and_stage(c, &scratch, "pvc-a", &cap).await;
    let frozen = Frozen::freeze(&pa.staging);
    let first = {
        let mut node = c.node.clone();
        let req = publish_req(&pa.id, &pa.staging, &pa.target, cap.clone(), false);
        tokio::spawn(async move { node.node_publish_volume(req).await })
    };
    wait_for_blocked_threads(server.pid(), 1);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    // The socket goes at once (no new connections)...
    poll_until_async(
        Duration::from_secs(20),
        "the socket gone after SIGTERM",
        || std::future::ready(!server.socket.exists()),
    )
    .await;
    // ...but the process stays until the call in flight is done.
    assert!(server.is_running(), "exited with a call in flight");
    assert!(!first.is_finished());
    frozen.thaw();
    let done = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("first call")
        .unwrap();
    ok(done, "the call in flight at SIGTERM");
    assert_eq!(
        mount_at(&pa.target).map(|m| m.fs_type).as_deref(),
        Some("ext4")
    );
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!server.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stage_then_the_same_call_finishes_the_job() {
    if !require_root(&["fsfreeze", "mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (mut server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    // The staging path lies on a filesystem the test freezes (itself a loopvol volume), so the
    // stage stops after attaching and formatting, at creating the staging directory: there
    // the server is killed.
    let parent = c
        .create("pvc-parent", 32 * MIB, cap.clone())
        .await
        .volume_id;
    let parent_stage = kubelet(&scratch).staging(&parent);
    c.stage(&parent, &parent_stage, cap.clone()).await;
    let id = c
        .create("pvc-victim", 32 * MIB, cap.clone())
        .await
        .volume_id;
    let victim_stage = parent_stage.join("victim/globalmount");

    let frozen = Frozen::freeze(&parent_stage);
    let doomed = {
        let mut node = c.node.clone();
        let req = stage_req(&id, &victim_stage, cap.clone());
        tokio::spawn(async move { node.node_stage_volume(req).await })
    };
    wait_for_blocked_threads(server.pid(), 1);
    server.signal(nix::sys::signal::Signal::SIGKILL);
    frozen.thaw(); // the kill takes effect once the blocked thread leaves the kernel
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), None, "not killed by the signal: {status}");
    assert!(
        doomed.await.unwrap().is_err(),
        "the killed call reported success"
    );

    // Half done: attached and formatted, not mounted.
    let devices = scratch.loops_of(&id);
    assert_eq!(devices.len(), 1, "the killed stage attached the volume");
    let uuid_of = |dev: &kernel::LoopDevice| {
        run(Command::new("blkid")
            .args(["-p", "-s", "UUID", "-o", "value"])
            .arg(dev.path()))
        .1
        .trim()
        .to_owned()
    };
    let uuid = uuid_of(&devices[0]);
    assert!(
        !uuid.is_empty(),
        "the killed stage had formatted the volume"
    );
    assert!(mount_at(&victim_stage).is_none());
    assert!(server.socket.exists(), "a killed server leaves its socket");

    // Restarted (replacing the stale socket), the same call finishes the job.
    server.restart();
    let mut c = Csi::connect(&server).await;
    for _ in 0..3 {
        c.stage(&id, &victim_stage, cap.clone()).await;
    }
    let staged = mount_at(&victim_stage).expect("staged after the restart");
    assert_eq!(staged.fs_type, "ext4");
    assert_eq!(
        scratch.loops_of(&id),
        devices,
        "the restart attached a second loop device"
    );
    assert_eq!(uuid_of(&devices[0]), uuid, "the volume was formatted again");
    c.unstage(&id, &victim_stage).await;
    c.unstage(&parent, &parent_stage).await;
    assert!(loops_under(&scratch.root()).is_empty());
    assert!(mounts_under(&scratch.root()).is_empty());
    // Deleted, the volumes leave no lock file behind, the killed call's included.
    for v in [&id, &parent] {
        c.call(delete_req(v)).await.unwrap();
    }
    let locks: Vec<_> = std::fs::read_dir(scratch.pool().join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        // The pool-wide admission lock stays with the pool.
        .filter(|n| n != "space.lock")
        .collect();
    assert!(locks.is_empty(), "lock files left: {locks:?}");
}
