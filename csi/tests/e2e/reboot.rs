//! A node reboot, simulated: the server is killed, every mount and loop device of the test is
//! removed behind the driver's back, the server starts again. kubelet's re-stage and re-publish
//! succeed with the data intact and nothing formatted; the stale holds of a pod that did not
//! come back are reported by `loopvol check` and cleared by kubelet's unstage. As root.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use loopvol_e2e::admin::Admin;
use loopvol_e2e::csi::*;
use loopvol_e2e::{pattern, require_root, run, write_synced, Scratch};
use pb::volume_capability::access_mode::Mode;

use crate::{kubelet, start, MIB, NODE};

fn uuid(device: &Path) -> String {
    let (_, out, _) = run(Command::new("blkid")
        .args(["-p", "-s", "UUID", "-o", "value"])
        .arg(device));
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_kubelet_stages_and_publishes_again_and_nothing_is_formatted() {
    if !require_root(&["mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (mut server, mut csi) = start(&scratch, &[]).await;
    let admin = Admin::built(scratch.pool(), NODE);
    let c = &mut csi;
    let fs_cap = rwo("ext4");
    let block = block_cap(Mode::SingleNodeWriter);
    let k = kubelet(&scratch);

    let fs_id = c.create("pvc-fs", 32 * MIB, fs_cap.clone()).await.volume_id;
    let fs = k.pod_volume("p", &fs_id);
    c.stage_and_publish(&fs, &fs_cap).await;
    write_synced(&fs.target.join("kept"), &pattern(256 * 1024, 1));
    let fs_uuid = uuid(&scratch.loops_of(&fs_id)[0].path());
    assert!(!fs_uuid.is_empty());

    let blk_id = c
        .create("pvc-block", 16 * MIB, block.clone())
        .await
        .volume_id;
    let blk = PodVolume {
        id: blk_id.clone(),
        staging: scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/b"),
        target: scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/b/p"),
    };
    c.stage_and_publish(&blk, &block).await;
    let raw = pattern(64 * 1024, 2);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&blk.target)
            .unwrap();
        f.write_all_at(&raw, MIB as u64).unwrap();
        f.sync_all().unwrap();
    }

    // A pod that will not come back after the reboot.
    let gone_id = c
        .create("pvc-gone", 32 * MIB, fs_cap.clone())
        .await
        .volume_id;
    let gone = k.pod_volume("q", &gone_id);
    c.stage_and_publish(&gone, &fs_cap).await;
    assert_eq!(
        admin.findings(),
        (0, vec![]),
        "a healthy node has no findings"
    );

    // The reboot.
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(30)).await;
    scratch.cleanup_kernel_state();
    scratch.assert_clean("the reboot");
    // Every hold of this node is stale now, and check says so (exit 1).
    let mut stale: Vec<(String, String)> = [&fs_id, &blk_id, &gone_id]
        .iter()
        .map(|id| ("stale-hold".to_owned(), id.to_string()))
        .collect();
    stale.sort();
    assert_eq!(admin.findings(), (1, stale));
    let listed = admin.json(&["list"], 0);
    for v in listed["volumes"].as_array().unwrap() {
        assert_eq!(v["state"], "created", "{v}");
        assert_eq!(v["health"]["reason"], "device_gone", "{v}");
    }

    // kubelet after the reboot: the server is back, the pods' volumes staged and published
    // again (twice: kubelet retries), the data where it was, the filesystem not made again.
    let log_before = server.log_text().len();
    server.restart();
    let mut c = Csi::connect(&server).await;
    for _ in 0..2 {
        c.stage_and_publish(&fs, &fs_cap).await;
        c.stage_and_publish(&blk, &block).await;
    }
    assert_eq!(
        std::fs::read(fs.target.join("kept")).unwrap(),
        pattern(256 * 1024, 1)
    );
    assert_eq!(
        uuid(&scratch.loops_of(&fs_id)[0].path()),
        fs_uuid,
        "formatted again"
    );
    let mut buf = vec![0; raw.len()];
    std::fs::File::open(&blk.target)
        .unwrap()
        .read_exact_at(&mut buf, MIB as u64)
        .unwrap();
    assert_eq!(buf, raw);
    // The pod that did not come back: kubelet unpublishes and unstages it (nothing mounted),
    // which clears its hold.
    let (_, left) = admin.findings();
    assert_eq!(left, [("stale-hold".to_owned(), gone_id.clone())]);
    c.unpublish_and_unstage(&gone).await;
    assert_eq!(admin.findings(), (0, vec![]));
    let meta = admin.json(&["inspect", &gone_id], 0);
    assert_eq!(
        meta["metadata"]["staged"],
        loopvol_e2e::admin::empty_list(),
        "the stale hold is gone from the metadata"
    );
    // And the restarted server's log shows no format.
    let after = &server.log_text()[log_before..];
    assert!(
        after.contains("staged") && !after.contains("formatted"),
        "{after}"
    );

    c.unpublish_and_unstage(&fs).await;
    c.unpublish_and_unstage(&blk).await;
    scratch.assert_clean("left behind");
}
