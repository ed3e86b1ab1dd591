//! Issue 12 through `loopvol-csi`: what the server trusts (the kernel, its pool root) and what it
//! does not (every entry in the pool, every caller's path).

use std::os::unix::fs::symlink;
use std::time::Duration;

use loopvol_e2e::csi::*;
use loopvol_e2e::{require_root, Scratch};
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::{start, MIB};

/// Names in `<pool>/locks` but the pool-wide admission lock (`space.lock`, which stays with the
/// pool).
fn locks(scratch: &Scratch) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(scratch.pool().join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "space.lock")
        .collect();
    names.sort();
    names
}

/// `/var/lib/kubelet -> /data/kubelet`, a real node layout, with `--path-prefix` naming the link:
/// stage, publish, stats, expand, unpublish and unstage all work, and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_kubelet_root_works_end_to_end() {
    if !require_root(&["mkfs.ext4", "blkid", "resize2fs", "e2fsck"]) {
        return;
    }
    let scratch = Scratch::new();
    let real = scratch.path("data/kubelet");
    std::fs::create_dir_all(&real).unwrap();
    let link = scratch.path("var-lib-kubelet");
    symlink(&real, &link).unwrap();
    let kubelet = Kubelet { root: link.clone() };
    let (_server, mut c) = start(&scratch, &[&kubelet.path_prefix_flag()]).await;
    let cap = rwo("ext4");
    let id = c.create("pvc-link", 64 * MIB, cap.clone()).await.volume_id;
    let v = kubelet.pod_volume("pod-1", &id);
    std::fs::create_dir_all(v.target.parent().unwrap()).unwrap();
    c.stage_and_publish(&v, &cap).await;
    std::fs::write(v.target.join("data"), b"through the link").unwrap();
    let stats = ok(
        c.node
            .node_get_volume_stats(stats_req(&id, &v.target))
            .await,
        "NodeGetVolumeStats through the link",
    );
    assert!(!stats.volume_condition.unwrap().abnormal);
    ok(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: v.target.display().to_string(),
                capacity_range: range(64 * MIB, 0),
                ..Default::default()
            })
            .await,
        "NodeExpandVolume through the link",
    );
    c.unpublish_and_unstage(&v).await;
    scratch.assert_clean("after unstage through the link");
    c.call(delete_req(&id)).await.unwrap();
    assert!(locks(&scratch).is_empty(), "{:?}", locks(&scratch));
}

/// A target whose parent is a link out of `--path-prefix`: publish and unpublish are refused
/// (not "OK" with the mount left somewhere); a staging path that is a link is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_leading_out_of_the_prefix_are_refused() {
    if !require_root(&["mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let kubelet = Kubelet::new(&scratch, "kubelet");
    let elsewhere = scratch.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(kubelet.root.join("pods")).unwrap();
    let (_server, mut c) = start(&scratch, &[&kubelet.path_prefix_flag()]).await;
    let cap = rwo("ext4");
    let id = c.create("pvc-esc", 64 * MIB, cap.clone()).await.volume_id;
    let v = kubelet.pod_volume("pod-1", &id);
    c.stage(&id, &v.staging, cap.clone()).await;
    symlink(&elsewhere, kubelet.root.join("pods/evil")).unwrap();
    let target = kubelet.root.join("pods/evil/mount");
    let staging_link = kubelet.root.join("plugins/link");
    symlink(&elsewhere, &staging_link).unwrap();
    let mut t = CallTable::new();
    t.case(
        "publish under a link out of the prefix",
        publish_req(&id, &v.staging, &target, cap.clone(), false),
        Code::InvalidArgument,
    )
    .case(
        "unpublish under a link out of the prefix",
        unpublish_req(&id, &target),
        Code::InvalidArgument,
    )
    .case(
        "stage onto a link",
        stage_req(&id, &staging_link, cap.clone()),
        Code::InvalidArgument,
    );
    tokio::time::timeout(Duration::from_secs(60), t.check(&mut c))
        .await
        .expect("the calls answered in time");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    c.unstage(&id, &v.staging).await;
    scratch.assert_clean("after the refusals");
}

/// One planted entry among the volumes: ListVolumes answers, the bad volume abnormal and named;
/// and create/delete cycles leave `locks/` as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_survive_a_bad_entry_and_locks_go_with_their_volumes() {
    let scratch = Scratch::new();
    let (_server, mut c) = start(&scratch, &[]).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let keep = c.create("pvc-keep", MIB, cap.clone()).await.volume_id;
    let before = locks(&scratch);
    for round in 0..3 {
        let id = c
            .create(&format!("pvc-cycle-{round}"), MIB, cap.clone())
            .await
            .volume_id;
        let snap = ok(
            c.ctl
                .create_snapshot(snapshot_req(&format!("snap-{round}"), &id))
                .await,
            "CreateSnapshot",
        )
        .snapshot
        .unwrap()
        .snapshot_id;
        c.call(delete_snapshot_req(&snap)).await.unwrap();
        c.call(delete_req(&id)).await.unwrap();
        assert_eq!(locks(&scratch), before, "round {round}");
    }
    let bad = c.create("pvc-bad", MIB, cap.clone()).await.volume_id;
    let meta = scratch.pool().join(format!("volumes/{bad}/volume.json"));
    std::fs::remove_file(&meta).unwrap();
    nix::unistd::mkfifo(&meta, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let listed = tokio::time::timeout(
        Duration::from_secs(30),
        c.ctl.list_volumes(pb::ListVolumesRequest::default()),
    )
    .await
    .expect("ListVolumes answered in time");
    let entries = ok(listed, "ListVolumes with a FIFO for a volume.json").entries;
    assert_eq!(entries.len(), 2, "{entries:?}");
    let status = |id: &str| {
        entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == id)
            .and_then(|e| e.status.clone())
            .and_then(|s| s.volume_condition)
            .unwrap_or_else(|| panic!("{id} not listed with a condition: {entries:?}"))
    };
    assert!(!status(&keep).abnormal);
    let cond = status(&bad);
    assert!(
        cond.abnormal && cond.message.contains("volume.json") && cond.message.contains("FIFO"),
        "{cond:?}"
    );
}
