//! Real loop devices, filesystems and mounts, as root: the mount lifecycle with every call
//! repeated, block volumes, one-workload and reader-only modes, snapshot/restore/clone contents,
//! and expansion online (or, for ext4 without CAP_SYS_RESOURCE, at the next stage).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use loopvol_e2e::csi::*;
use loopvol_e2e::hazard;
use loopvol_e2e::kernel::{self, mount_at};
use loopvol_e2e::{fs_size, fs_tools, loops_under, mounts_under, pattern, require_root, Scratch};
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::{kubelet, start, MIB, NODE};

#[tokio::test]
async fn mount_lifecycle_repeated_ten_times_gives_the_same_results() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[&kubelet(&scratch).path_prefix_flag()]).await;
    let c = &mut csi;
    let cap = mount_cap_with("ext4", Mode::SingleNodeWriter, &["noatime"], "4242");
    let v = kubelet(&scratch).pod_volume("pod-1", "pvc-life");
    let (staging, target) = (&v.staging, &v.target);

    let first = c.create("pvc-life", 64 * MIB, cap.clone()).await;
    for _ in 0..10 {
        assert_eq!(c.create("pvc-life", 64 * MIB, cap.clone()).await, first);
    }
    let id = first.volume_id.clone();

    for _ in 0..10 {
        c.stage(&id, staging, cap.clone()).await;
        let m = mount_at(staging).expect("staged mount");
        assert_eq!(m.fs_type, "ext4");
        for o in ["nodev", "nosuid", "noatime", "rw"] {
            assert!(m.has_option(o), "staging mount lacks {o}: {m:?}");
        }
        assert_eq!(
            scratch.loops_of(&id).len(),
            1,
            "one loop device, whatever the repeats"
        );
        assert_eq!(mounts_under(&scratch.root()).len(), 1);
    }
    // Incompatible repeats at the same staging path.
    assert_code(
        c.node
            .node_stage_volume(stage_req(&id, staging, rwo("xfs")))
            .await,
        Code::AlreadyExists,
        "stage again as another fs type",
    );
    c.create("pvc-other", 64 * MIB, rwo("ext4")).await;
    assert_code(
        c.node
            .node_stage_volume(stage_req("pvc-other", staging, rwo("ext4")))
            .await,
        Code::AlreadyExists,
        "another volume at the same staging path",
    );
    assert!(
        scratch.loops_of("pvc-other").is_empty(),
        "a refused stage left a loop device"
    );

    for _ in 0..10 {
        c.publish(&id, staging, target, cap.clone(), false).await;
        let m = mount_at(target).expect("published mount");
        assert_eq!(m.fs_type, "ext4");
        assert!(m.has_option("nodev") && m.has_option("nosuid"), "{m:?}");
        assert_eq!(mounts_under(&scratch.root()).len(), 2, "no stacked binds");
    }
    // VOLUME_MOUNT_GROUP: the volume's root belongs to the pod's fsGroup, setgid.
    let root = std::fs::metadata(target).unwrap();
    assert_eq!(root.gid(), 4242);
    assert!(root.mode() & 0o2070 == 0o2070, "mode {:o}", root.mode());
    std::fs::write(target.join("data"), b"lifecycle").unwrap();
    assert_code(
        c.node
            .node_publish_volume(publish_req(&id, staging, target, cap.clone(), true))
            .await,
        Code::AlreadyExists,
        "publish the same target read-only",
    );
    // A second pod on the same node.
    let target2 = kubelet(&scratch).target("pod-2", "pvc-life");
    c.publish(&id, staging, &target2, cap.clone(), true).await;
    assert_eq!(std::fs::read(target2.join("data")).unwrap(), b"lifecycle");
    assert!(
        std::fs::write(target2.join("x"), b"x").is_err(),
        "read-only publish is writable"
    );
    c.unpublish(&id, &target2).await;
    assert!(!target2.exists(), "unpublish leaves the target directory");
    // Publishing without staging first: FAILED_PRECONDITION.
    let other_target = kubelet(&scratch).target("pod-3", "pvc-other");
    assert_code(
        c.node
            .node_publish_volume(publish_req(
                "pvc-other",
                &kubelet(&scratch).staging("pvc-other"),
                &other_target,
                rwo("ext4"),
                false,
            ))
            .await,
        Code::FailedPrecondition,
        "publish an unstaged volume",
    );

    for path in [&target, &staging] {
        let stats = ok(
            c.node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: path.display().to_string(),
                    ..Default::default()
                })
                .await,
            "NodeGetVolumeStats",
        );
        let bytes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .unwrap();
        let inodes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Inodes as i32)
            .unwrap();
        assert!(
            bytes.total > 50 * MIB && bytes.total <= 64 * MIB,
            "{bytes:?}"
        );
        assert!(bytes.used > 0 && bytes.available > 0);
        assert!(inodes.total > 0 && inodes.used > 0);
        assert!(!stats.volume_condition.unwrap().abnormal);
    }
    // A directory that exists but is not where the volume is mounted: NOT_FOUND (not an OK for
    // a filesystem that never grew), and the image stays as it was.
    let elsewhere = scratch.path("kubelet/elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: elsewhere.display().to_string(),
                capacity_range: range(128 * MIB, 0),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeExpandVolume at a directory that is not the volume",
    );
    assert_eq!(
        std::fs::metadata(scratch.image(&id)).unwrap().len(),
        64 * MIB as u64
    );
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: elsewhere.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeGetVolumeStats at a directory that is not the volume",
    );
    let got = ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await,
        "ControllerGetVolume",
    );
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, [NODE]);
    assert!(!status.volume_condition.unwrap().abnormal);

    // In use: neither deletion nor unstaging may pull it from under the pod.
    assert_code(
        c.ctl.delete_volume(delete_req(&id)).await,
        Code::FailedPrecondition,
        "delete while published",
    );
    assert_code(
        c.node.node_unstage_volume(unstage_req(&id, staging)).await,
        Code::FailedPrecondition,
        "unstage while published",
    );
    assert!(
        mount_at(staging).is_some(),
        "a refused unstage unmounted the staging path"
    );

    for _ in 0..10 {
        c.unpublish(&id, target).await;
        assert!(mount_at(target).is_none());
        assert!(!target.exists());
    }
    for _ in 0..10 {
        c.unstage(&id, staging).await;
        assert!(mount_at(staging).is_none());
        assert!(
            scratch.loops_of(&id).is_empty(),
            "loop device left after unstage"
        );
    }
    // Staged again later: the data is still there.
    c.stage(&id, staging, cap.clone()).await;
    c.publish(&id, staging, target, cap.clone(), false).await;
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"lifecycle");
    c.unpublish_and_unstage(&v).await;

    for _ in 0..10 {
        ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
    }
    assert!(!scratch.pool().join("volumes").join(&id).exists());
    assert!(mounts_under(&scratch.root()).is_empty());
    assert!(loops_under(&scratch.root()).is_empty());
}

#[tokio::test]
async fn block_volumes_work_end_to_end() {
    if !require_root(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[&kubelet(&scratch).path_prefix_flag()]).await;
    let c = &mut csi;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = c.create("pvc-block", 16 * MIB, cap.clone()).await.volume_id;
    // Where kubelet stages and publishes block volumes.
    let v = PodVolume {
        id: id.clone(),
        staging: scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-block"),
        target: scratch
            .path("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-block/pod-1"),
    };
    let (staging, target) = (&v.staging, &v.target);
    for _ in 0..10 {
        c.stage(&id, staging, cap.clone()).await;
        assert_eq!(scratch.loops_of(&id).len(), 1);
    }
    for _ in 0..10 {
        c.publish(&id, staging, target, cap.clone(), false).await;
        assert!(
            std::fs::metadata(target)
                .unwrap()
                .file_type()
                .is_block_device(),
            "target is not the device"
        );
        assert_eq!(mounts_under(&scratch.root()).len(), 1);
    }
    // Write through the published device file, read it back.
    let data = pattern(64 * 1024, 7);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .unwrap();
        f.write_all_at(&data, MIB as u64).unwrap();
        f.sync_all().unwrap();
    }
    let read_back = |path: &Path| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; data.len()];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, MIB as u64)
            .unwrap();
        buf
    };
    assert_eq!(read_back(target), data);
    // A read-only publication of the same device shows the data. (Writes through it are refused
    // by the container runtime's device rules: a read-only bind cannot stop writes to a device
    // node.)
    let ro_target =
        scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-block/pod-2");
    c.publish(&id, staging, &ro_target, cap.clone(), true).await;
    assert_eq!(read_back(&ro_target), data);
    let m = mount_at(&ro_target).unwrap();
    assert!(m.has_option("ro"), "{m:?}");
    c.unpublish(&id, &ro_target).await;
    // A block volume expands without a filesystem step.
    let grown = ok(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: range(32 * MIB, 0),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await,
        "NodeExpandVolume of a block volume",
    );
    assert_eq!(grown.capacity_bytes, 32 * MIB);
    let dev_size = {
        let f = std::fs::File::open(target).unwrap();
        use std::io::Seek;
        let mut f = f;
        f.seek(std::io::SeekFrom::End(0)).unwrap()
    };
    assert_eq!(
        dev_size,
        32 * MIB as u64,
        "the published device did not grow"
    );
    let stats = ok(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        "NodeGetVolumeStats of a block volume",
    );
    assert_eq!(stats.usage[0].total, 32 * MIB);

    for _ in 0..10 {
        c.unpublish(&id, target).await;
        assert!(!target.exists());
    }
    for _ in 0..10 {
        c.unstage(&id, staging).await;
        assert!(scratch.loops_of(&id).is_empty());
    }
    // The data is in the image: attach again and read it.
    c.stage(&id, staging, cap.clone()).await;
    c.publish(&id, staging, target, cap.clone(), false).await;
    assert_eq!(read_back(target), data);
    c.unpublish_and_unstage(&v).await;
    // A reader-only mode attaches the device itself read-only: no write reaches the image.
    let reader = block_cap(Mode::SingleNodeReaderOnly);
    c.stage(&id, staging, reader.clone()).await;
    c.publish(&id, staging, target, reader.clone(), true).await;
    assert_eq!(read_back(target), data);
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"x", 0)?;
            f.sync_all()
        });
    assert!(refused.is_err(), "a reader-only block volume took a write");
    c.unpublish_and_unstage(&v).await;
    for _ in 0..10 {
        ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
    }
    assert!(mounts_under(&scratch.root()).is_empty());
    assert!(loops_under(&scratch.root()).is_empty());
}

#[tokio::test]
async fn single_node_single_writer_is_published_for_one_workload_at_a_time() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[&kubelet(&scratch).path_prefix_flag()]).await;
    let c = &mut csi;
    // ReadWriteOncePod: Kubernetes sends SINGLE_NODE_SINGLE_WRITER (SINGLE_NODE_MULTI_WRITER is
    // advertised), which the spec defines as one workload at a time.
    let once = mount_cap("ext4", Mode::SingleNodeSingleWriter);
    let id = c.create("pvc-rwop", 16 * MIB, once.clone()).await.volume_id;
    let staging = kubelet(&scratch).staging(&id);
    let (first, second) = (
        kubelet(&scratch).target("pod-1", &id),
        kubelet(&scratch).target("pod-2", &id),
    );
    c.stage(&id, &staging, once.clone()).await;
    for _ in 0..3 {
        c.publish(&id, &staging, &first, once.clone(), false).await;
    }
    assert_code(
        c.node
            .node_publish_volume(publish_req(&id, &staging, &second, once.clone(), false))
            .await,
        Code::FailedPrecondition,
        "a second workload of a SINGLE_NODE_SINGLE_WRITER volume",
    );
    assert!(mount_at(&second).is_none());
    c.unpublish(&id, &first).await;
    c.publish(&id, &staging, &second, once.clone(), false).await;
    // SINGLE_NODE_MULTI_WRITER (ReadWriteOnce) and the older SINGLE_NODE_WRITER share the node.
    for mode in [Mode::SingleNodeMultiWriter, Mode::SingleNodeWriter] {
        c.publish(&id, &staging, &first, mount_cap("ext4", mode), false)
            .await;
        c.unpublish(&id, &first).await;
    }
    c.unpublish(&id, &second).await;
    c.unstage(&id, &staging).await;
    assert!(scratch.loops_of(&id).is_empty());
}

#[tokio::test]
async fn reader_only_modes_stage_and_publish_read_only() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let id = c.create("pvc-ro", 32 * MIB, rwo("ext4")).await.volume_id;
    let v = kubelet(&scratch).pod_volume("p", &id);
    let (staging, target) = (&v.staging, &v.target);
    // Written once read-write...
    c.stage_and_publish(&v, &rwo("ext4")).await;
    std::fs::write(target.join("seed"), b"seed").unwrap();
    c.unpublish_and_unstage(&v).await;
    // ...then used by readers.
    let ro = mount_cap("ext4", Mode::MultiNodeReaderOnly);
    for _ in 0..3 {
        c.stage(&id, staging, ro.clone()).await;
    }
    let m = mount_at(staging).unwrap();
    assert!(
        m.has_option("ro"),
        "reader-only stage is not read-only: {m:?}"
    );
    c.publish(&id, staging, target, ro.clone(), false).await;
    assert_eq!(std::fs::read(target.join("seed")).unwrap(), b"seed");
    let err = std::fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    c.unpublish_and_unstage(&v).await;
    assert!(loops_under(&scratch.root()).is_empty());
    // A blank volume cannot be formatted read-only.
    let blank = c.create("pvc-blank", 32 * MIB, rwo("ext4")).await.volume_id;
    assert_code(
        c.node
            .node_stage_volume(stage_req(&blank, &kubelet(&scratch).staging(&blank), ro))
            .await,
        Code::FailedPrecondition,
        "read-only stage of a blank volume",
    );
}

#[tokio::test]
async fn snapshot_restore_and_clone_preserve_contents() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    let src = c.create("pvc-src", 64 * MIB, cap.clone()).await.volume_id;
    let s = kubelet(&scratch).pod_volume("p0", &src);
    c.stage_and_publish(&s, &cap).await;
    let before = pattern(512 * 1024, 1);
    std::fs::write(s.target.join("data.bin"), &before).unwrap();

    // Snapshot of the mounted volume (frozen while copied), then the source changes.
    let snap = ok(
        c.ctl.create_snapshot(snapshot_req("snap-1", &src)).await,
        "CreateSnapshot",
    )
    .snapshot
    .unwrap();
    assert!(snap.ready_to_use);
    let after = pattern(512 * 1024, 2);
    std::fs::write(s.target.join("data.bin"), &after).unwrap();
    std::fs::write(s.target.join("later.txt"), b"after the snapshot").unwrap();

    // Restore, larger than the snapshot: the filesystem grows when staged.
    let mut r = create_req("pvc-restored", 128 * MIB, cap.clone());
    r.volume_content_source = from_snapshot(&snap.snapshot_id);
    let restored = ok(c.ctl.create_volume(r).await, "restore")
        .volume
        .unwrap()
        .volume_id;
    // Clone of the (mounted, changed) source.
    let mut r = create_req("pvc-clone", 64 * MIB, cap.clone());
    r.volume_content_source = from_volume(&src);
    let clone = ok(c.ctl.create_volume(r).await, "clone")
        .volume
        .unwrap()
        .volume_id;

    let r = kubelet(&scratch).pod_volume("p1", &restored);
    c.stage_and_publish(&r, &cap).await;
    assert!(
        std::fs::read(r.target.join("data.bin")).unwrap() == before,
        "restored contents differ from the snapshot"
    );
    assert!(
        !r.target.join("later.txt").exists(),
        "restore holds a write made after the snapshot"
    );
    assert!(
        fs_size(&r.target) > 100 * MIB as u64,
        "the restored filesystem did not grow to its volume"
    );

    let cl = kubelet(&scratch).pod_volume("p2", &clone);
    c.stage_and_publish(&cl, &cap).await;
    assert!(
        std::fs::read(cl.target.join("data.bin")).unwrap() == after,
        "clone contents differ from the source"
    );
    assert_eq!(
        std::fs::read(cl.target.join("later.txt")).unwrap(),
        b"after the snapshot"
    );
    // Independent copies: writing the clone leaves the source alone.
    std::fs::write(cl.target.join("data.bin"), b"clone only").unwrap();
    assert!(std::fs::read(s.target.join("data.bin")).unwrap() == after);

    for v in [&s, &r, &cl] {
        c.unpublish_and_unstage(v).await;
        ok(c.ctl.delete_volume(delete_req(&v.id)).await, "DeleteVolume");
    }
    ok(
        c.ctl
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await,
        "DeleteSnapshot",
    );
    assert!(loops_under(&scratch.root()).is_empty());
}

/// Stages and publishes a `fs` volume of `initial` bytes, grows it to `grown` and checks the
/// mounted filesystem sees the new size. `shared`: through ControllerExpandVolume first (a
/// shared pool), else NodeExpandVolume alone (a node-local pool grows on its node).
async fn expand_online(fs: &str, initial: i64, grown: i64, shared: bool) {
    let _btrfs = hazard::for_fs(fs);
    let scratch = Scratch::new();
    let extra: &[&str] = if shared { &["--shared-pool"] } else { &[] };
    let (_server, mut csi) = start(&scratch, extra).await;
    let c = &mut csi;
    let cap = rwo(fs);
    let id = c
        .create(&format!("pvc-{fs}"), initial, cap.clone())
        .await
        .volume_id;
    let v = kubelet(&scratch).pod_volume("p", &id);
    if shared {
        // A shared pool stages only what the controller published to the node.
        ok(
            c.ctl
                .controller_publish_volume(controller_publish_req(&id, NODE, cap.clone(), false))
                .await,
            "ControllerPublishVolume",
        );
    }
    c.stage_and_publish(&v, &cap).await;
    let (staging, target) = (&v.staging, &v.target);
    std::fs::write(target.join("keep"), b"kept").unwrap();
    let before = fs_size(target);
    assert!(before <= initial as u64);
    if shared {
        let r = ok(
            c.ctl
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: range(grown, 0),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            "ControllerExpandVolume",
        );
        assert!(r.node_expansion_required);
        assert_eq!(r.capacity_bytes, grown);
        assert_code(
            c.node
                .node_expand_volume(pb::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    capacity_range: range(2 * grown, 0),
                    ..Default::default()
                })
                .await,
            Code::OutOfRange,
            "NodeExpandVolume beyond the controller's size",
        );
    }
    for _ in 0..3 {
        let r = ok(
            c.node
                .node_expand_volume(pb::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: staging.display().to_string(),
                    capacity_range: range(grown, 0),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            "NodeExpandVolume",
        );
        assert_eq!(r.capacity_bytes, grown);
    }
    let after = fs_size(target);
    assert!(
        after > before + (grown - initial) as u64 / 2,
        "{fs}: mounted filesystem {before} -> {after} bytes after growing {initial} -> {grown}"
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"kept");
    let got = ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await,
        "ControllerGetVolume",
    );
    assert_eq!(got.volume.unwrap().capacity_bytes, grown);
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: range(0, initial),
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "NodeExpandVolume with a limit below the size",
    );
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: scratch.path("kubelet/nowhere").display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeExpandVolume at a path that does not exist",
    );
    c.unpublish_and_unstage(&v).await;
    if shared {
        ok(
            c.ctl
                .controller_unpublish_volume(controller_unpublish_req(&id, NODE))
                .await,
            "ControllerUnpublishVolume",
        );
    }
    ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
}

#[tokio::test]
async fn xfs_grows_online_on_its_node() {
    if require_root(fs_tools("xfs")) {
        expand_online("xfs", 300 * MIB, 600 * MIB, false).await;
    }
}

#[tokio::test]
async fn btrfs_grows_online_after_controller_expansion() {
    if require_root(fs_tools("btrfs")) {
        expand_online("btrfs", 256 * MIB, 512 * MIB, true).await;
    }
}

#[tokio::test]
async fn ext4_grows_online_or_says_why_and_grows_at_the_next_stage() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    let id = c.create("pvc-ext4", 64 * MIB, cap.clone()).await.volume_id;
    let v = kubelet(&scratch).pod_volume("p", &id);
    c.stage_and_publish(&v, &cap).await;
    let target = &v.target;
    let before = fs_size(target);
    let expand = pb::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        capacity_range: range(128 * MIB, 0),
        ..Default::default()
    };
    let online = kernel::can_grow_ext4_online();
    let result = c.node.node_expand_volume(expand.clone()).await;
    if online {
        ok(result, "online ext4 growth with CAP_SYS_RESOURCE");
        assert!(fs_size(target) > before + 32 * MIB as u64);
    } else {
        // No CAP_SYS_RESOURCE (as in most containers): a clear refusal, not a silent no-op...
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(
            err.message().contains("CAP_SYS_RESOURCE"),
            "{}",
            err.message()
        );
        assert_eq!(fs_size(target), before);
        // ...and the next stage grows it offline.
        c.unpublish_and_unstage(&v).await;
        c.stage_and_publish(&v, &cap).await;
        assert!(
            fs_size(target) > before + 32 * MIB as u64,
            "ext4 not grown at the next stage: {before} -> {}",
            fs_size(target)
        );
        ok(
            c.node.node_expand_volume(expand).await,
            "NodeExpandVolume once grown",
        );
    }
    c.unpublish_and_unstage(&v).await;
}
