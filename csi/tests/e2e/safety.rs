//! Data safety over the wire, as root, on small pools with filesystems of their own: parallel
//! CreateVolume calls against one pool's promises, raw data never formatted, a pool that fills
//! up under an overcommitted thin volume (the node is not wedged), a failed stage that undoes
//! itself, and the codes of the smaller refusals.

use std::os::unix::fs::FileExt;
use std::path::Path;

use loopvol_e2e::csi::*;
use loopvol_e2e::{fs_tools, loops_under, pattern, require_root, CsiServer, Scratch};
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::{kubelet, EXE, MIB, NODE};

/// A server on `pool` (a pool directory of the test's own) with `extra` flags.
async fn start_on(scratch: &Scratch, pool: &Path, extra: &[&str]) -> (CsiServer, Csi) {
    let mut args = vec![
        format!("--pool={}", pool.display()),
        format!("--node-id={NODE}"),
        kubelet(scratch).path_prefix_flag(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = CsiServer::start(EXE, scratch, "csi", &args);
    let csi = Csi::connect(&server).await;
    (server, csi)
}

async fn available(c: &mut Csi, allocation: &str) -> i64 {
    ok(
        c.ctl
            .get_capacity(pb::GetCapacityRequest {
                volume_capabilities: vec![rwo("ext4")],
                parameters: params(&[("allocation", allocation)]),
                ..Default::default()
            })
            .await,
        "GetCapacity",
    )
    .available_capacity
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let f = std::fs::File::open(path).unwrap();
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// `--overcommit 1`: eight CreateVolume calls at once, each for 60 MiB, on a pool that can
/// promise a few of them. Exactly as many as GetCapacity said fit are admitted; the others are
/// RESOURCE_EXHAUSTED; afterwards GetCapacity agrees with what is left, in both allocations.
#[tokio::test]
async fn parallel_creates_admit_exactly_what_fits() {
    if !require_root(&["mkfs.ext4"]) {
        return;
    }
    let scratch = Scratch::new();
    let pool = scratch.small_pool("ext4", 300);
    let (_server, mut csi) = start_on(&scratch, &pool, &["--overcommit=1"]).await;
    let before = available(&mut csi, "thin").await;
    let fits = before / (60 * MIB);
    assert!((2..8).contains(&fits), "{before} bytes free to promise");
    let calls = (0..8).map(|i| {
        let mut ctl = csi.ctl.clone();
        let allocation = if i % 2 == 0 { "thin" } else { "thick" };
        async move {
            let mut r = create_req(&format!("race-{i}"), 60 * MIB, rwo("ext4"));
            r.parameters = params(&[("allocation", allocation)]);
            ctl.create_volume(r).await
        }
    });
    let results = futures_join_all(calls).await;
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Code::ResourceExhausted, "{}", r.message());
        assert!(r.message().contains("can promise only"), "{}", r.message());
    }
    assert_eq!(
        i64::try_from(admitted).unwrap(),
        fits,
        "{before} bytes could be promised: {results:?}"
    );
    for allocation in ["thin", "thick"] {
        let left = available(&mut csi, allocation).await;
        assert!(
            left < 60 * MIB && left >= before - fits * 60 * MIB - 4 * MIB,
            "{allocation}: {left}"
        );
    }
}

/// Runs the futures at once (a join of all, in order) without another dependency.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("the call's task"));
    }
    out
}

/// The scenario: random data written through a raw block publish, then the volume staged
/// as a filesystem: refused (FAILED_PRECONDITION, saying why), the data intact; the same for a
/// filesystem volume restored from the block volume's snapshot.
#[tokio::test]
async fn raw_block_data_is_never_formatted() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start_on(&scratch, &scratch.pool(), &[]).await;
    let c = &mut csi;
    let k = kubelet(&scratch);
    let block = block_cap(Mode::SingleNodeWriter);
    let id = c.create("pvc-raw", 64 * MIB, block.clone()).await.volume_id;
    let v = k.pod_volume("pod-1", &id);
    c.stage_and_publish(&v, &block).await;
    let data = pattern(4 << 20, 9);
    write_at(&v.target, 0, &data);
    c.unpublish_and_unstage(&v).await;

    assert_refused(
        c.node
            .node_stage_volume(stage_req(&id, &v.staging, rwo("ext4")))
            .await,
        Code::FailedPrecondition,
        "was used as a raw block device",
        "stage a raw volume as a filesystem",
    );
    assert!(
        loops_under(&scratch.root()).is_empty(),
        "a refused stage left a device"
    );

    let snap = ok(
        c.ctl.create_snapshot(snapshot_req("raw-snap", &id)).await,
        "snapshot",
    )
    .snapshot
    .unwrap();
    let mut r = create_req("pvc-restored", 64 * MIB, rwo("ext4"));
    r.volume_content_source = from_snapshot(&snap.snapshot_id);
    let restored = ok(c.ctl.create_volume(r).await, "restore")
        .volume
        .unwrap()
        .volume_id;
    let w = k.pod_volume("pod-2", &restored);
    assert_refused(
        c.node
            .node_stage_volume(stage_req(&restored, &w.staging, rwo("ext4")))
            .await,
        Code::FailedPrecondition,
        "created from snapshot",
        "stage a restored raw volume as a filesystem",
    );
    // Both still hold the bytes, read back through a block stage.
    for (id, v) in [(&id, &v), (&restored, &w)] {
        c.stage_and_publish(v, &block).await;
        assert!(
            read_at(&v.target, 0, data.len()) == data,
            "{id}: data differs"
        );
        c.unpublish_and_unstage(v).await;
    }
    scratch.assert_clean("after the block stages");
}

/// An overcommitted thin volume fills its pool: its ext4 aborts its journal (emergency_ro), and
/// NodeGetVolumeStats says so (OK, abnormal). The node is not wedged: unpublish and unstage
/// finish (and their repeats), DeleteVolume frees the space, and the pool promises again.
#[tokio::test]
async fn a_full_pool_does_not_wedge_the_node() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let pool = scratch.small_pool("ext4", 300);
    let (_server, mut csi) = start_on(&scratch, &pool, &["--overcommit=4"]).await;
    let c = &mut csi;
    let k = kubelet(&scratch);
    let cap = rwo("ext4");
    let id = c.create("pvc-big", 512 * MIB, cap.clone()).await.volume_id;
    let v = k.pod_volume("pod-1", &id);
    c.stage_and_publish(&v, &cap).await;
    // Write until the pool is full: the loop device's writes fail, ext4 aborts.
    let chunk = pattern(8 << 20, 1);
    let mut f = std::fs::File::create(v.target.join("fill")).unwrap();
    for _ in 0..64 {
        if std::io::Write::write_all(&mut f, &chunk)
            .and_then(|()| f.sync_data())
            .is_err()
        {
            break;
        }
    }
    drop(f);
    let stats = loopvol_e2e::poll_until_async(
        std::time::Duration::from_secs(20),
        "the volume reported abnormal",
        || {
            let mut node = c.node.clone();
            let req = stats_req(&id, &v.target);
            let target = v.target.clone();
            async move {
                // Each write makes ext4 commit its journal, which the full pool fails.
                let _ = std::fs::File::create(target.join("touch")).and_then(|f| f.sync_all());
                let s = node.node_get_volume_stats(req).await.ok()?.into_inner();
                s.volume_condition.clone().filter(|c| c.abnormal).map(|_| s)
            }
        },
    )
    .await;
    let cond = stats.volume_condition.unwrap();
    assert!(cond.message.contains("emergency_ro"), "{cond:?}");

    for _ in 0..2 {
        c.unpublish_and_unstage(&v).await;
    }
    assert!(
        loops_under(&pool).is_empty(),
        "unstage left the volume attached"
    );
    ok(
        c.ctl.delete_volume(delete_req(&id)).await,
        "DeleteVolume on a full pool",
    );
    assert!(available(c, "thin").await > 200 * MIB);
    c.create("pvc-next", 64 * MIB, cap).await;
}

/// A stage that fails at attach, or at mount(2) because of a caller's option, undoes itself:
/// nothing attached, no hold (kubelet never unstages a failed stage). A caller's bad option is
/// INVALID_ARGUMENT naming its key, never its value. The volume then stages, and deletes,
/// normally.
#[tokio::test]
async fn a_failed_stage_undoes_itself() {
    if !require_root(fs_tools("ext4")) || !require_root(&["chattr"]) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start_on(&scratch, &scratch.pool(), &[]).await;
    let c = &mut csi;
    let k = kubelet(&scratch);
    let id = c.create("pvc-undo", 64 * MIB, rwo("ext4")).await.volume_id;
    let v = k.pod_volume("pod-1", &id);
    let staged = || -> serde_json::Value {
        let meta = scratch.pool().join("volumes").join(&id).join("volume.json");
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(meta).unwrap()).unwrap()
            ["staged"]
            .clone()
    };
    // Failing at attach (the image cannot be opened for writing), after the hold was recorded.
    let image = scratch.pool().join("volumes").join(&id).join("image");
    let chattr = |flag: &str| {
        let (code, _, err) =
            loopvol_e2e::run(std::process::Command::new("chattr").arg(flag).arg(&image));
        assert_eq!(code, 0, "chattr {flag}: {err}");
    };
    chattr("+i");
    let status = c
        .node
        .node_stage_volume(stage_req(&id, &v.staging, rwo("ext4")))
        .await
        .unwrap_err();
    chattr("-i");
    assert!(
        status.message().contains("Operation not permitted"),
        "{}",
        status.message()
    );
    scratch.assert_clean("a stage that failed at attach");
    assert_eq!(staged(), serde_json::json!([]), "the hold stayed");

    // Failing at mount(2), because of a caller's option.
    let bad = mount_cap_with(
        "ext4",
        Mode::SingleNodeWriter,
        &["noatime", "barrier=xyzzy42"],
        "",
    );
    let status = c
        .node
        .node_stage_volume(stage_req(&id, &v.staging, bad))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("\"barrier\""),
        "{}",
        status.message()
    );
    assert!(
        !status.message().contains("xyzzy42"),
        "{}",
        status.message()
    );
    scratch.assert_clean("a stage that failed at mount");
    assert_eq!(staged(), serde_json::json!([]), "the hold stayed");

    c.stage_and_publish(&v, &rwo("ext4")).await;
    c.unpublish_and_unstage(&v).await;
    ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
}

/// The smaller refusals, each with its code: a 1 PiB thin volume on ext4 (more than one file can
/// be), a filesystem published onto a regular file, group IDs that are not group IDs, a
/// snapshot recorded at 2^63 bytes.
#[tokio::test]
async fn smaller_refusals_get_the_right_code() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let pool = scratch.small_pool("ext4", 300);
    let (_server, mut csi) = start_on(&scratch, &pool, &["--overcommit=100000000"]).await;
    let c = &mut csi;
    let k = kubelet(&scratch);
    assert_refused(
        c.ctl
            .create_volume(create_req("pvc-huge", 1 << 50, rwo("ext4")))
            .await,
        Code::OutOfRange,
        "more than the pool's filesystem holds in one file",
        "1 PiB on ext4",
    );
    assert!(std::fs::read_dir(pool.join("volumes"))
        .unwrap()
        .next()
        .is_none());

    let id = c.create("pvc-small", 64 * MIB, rwo("ext4")).await.volume_id;
    let v = k.pod_volume("pod-1", &id);
    c.stage(&id, &v.staging, rwo("ext4")).await;
    std::fs::create_dir_all(v.target.parent().unwrap()).unwrap();
    std::fs::write(&v.target, b"").unwrap();
    assert_refused(
        c.node
            .node_publish_volume(publish_req(&id, &v.staging, &v.target, rwo("ext4"), false))
            .await,
        Code::FailedPrecondition,
        "is a regular file, not a directory",
        "publish a filesystem onto a file",
    );
    std::fs::remove_file(&v.target).unwrap();
    for group in ["4294967295", "+5"] {
        let cap = mount_cap_with("ext4", Mode::SingleNodeWriter, &[], group);
        assert_refused(
            c.node
                .node_publish_volume(publish_req(&id, &v.staging, &v.target, cap, false))
                .await,
            Code::InvalidArgument,
            "volume_mount_group",
            group,
        );
    }
    c.unstage(&id, &v.staging).await;

    let snap = ok(
        c.ctl.create_snapshot(snapshot_req("snap", &id)).await,
        "snapshot",
    )
    .snapshot
    .unwrap();
    let meta = pool
        .join("snapshots")
        .join(&snap.snapshot_id)
        .join("snapshot.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["size_bytes"] = serde_json::json!(1u64 << 63);
    std::fs::write(&meta, m.to_string()).unwrap();
    let mut r = create_req("pvc-restore", 0, rwo("ext4"));
    r.capacity_range = None;
    r.volume_content_source = from_snapshot(&snap.snapshot_id);
    assert_refused(
        c.ctl.create_volume(r).await,
        Code::OutOfRange,
        "9223372036854775808 bytes is more than a volume can have",
        "restore a snapshot of 2^63 bytes",
    );
}
