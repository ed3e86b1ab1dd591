//! Fencing and hand-over on a real kernel, through the backend: two "nodes" (`node-a`,
//! `node-b`) open the scratch pool as a shared pool, each with its own paths. What a node plugin's
//! lease keeper does ([`NodeGuard`]) is driven one round at a time (`tick`), so every step is
//! observed in order. The GlusterFS partition tests drive the same through the CSI servers
//! (`csi/tests/e2e/partition.rs`).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use loopvol::testing::loopdev;
use loopvol::{
    Access, AccessMode, CreateVolume, ErrorKind, FenceCheck, FencedBy, FsType, LeaseSettings,
    NodeGuard, NodeInfo, NodeName, Pool, PoolOptions, Publish, SizeRequest, VolumeId, VolumeMeta,
};
use loopvol_e2e::hazard;
use loopvol_e2e::kernel::{self, LoopDevice};
use loopvol_e2e::small_fs::SmallFs;
use loopvol_e2e::workload::{assert_synced_blocks, Workload};
use loopvol_e2e::{fs_tools, pattern, poll_until, require_root, run, write_synced, Scratch};

const MIB: u64 = 1 << 20;

fn node(name: &str) -> NodeName {
    NodeName::try_from(name).unwrap()
}

/// Lease terms short enough for a test: a node fences 200 ms after its last renewal.
fn short_lease(handover_on_expiry: bool) -> LeaseSettings {
    LeaseSettings {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(400),
        handover_on_expiry,
    }
}

/// The scratch pool as shared-pool node `name`, confined to `<scratch>/<name>`.
fn open_as(s: &Scratch, name: &str, lease: LeaseSettings) -> Pool {
    let mut o = PoolOptions::new(node(name));
    o.shared = true;
    o.lease = lease;
    o.path_prefixes = vec![s.path(name)];
    let pool = Pool::open(s.pool(), o).unwrap();
    pool.register_node_with(&NodeInfo {
        max_volumes: None,
        lease: Some(lease),
    })
    .unwrap();
    pool
}

fn create(pool: &Pool, name: &str, fs: Option<FsType>) -> VolumeId {
    pool.create_volume(&CreateVolume {
        name: name.into(),
        size: SizeRequest::at_least(320 * MIB),
        fs_type: fs,
        allocation: None,
        source: None,
    })
    .unwrap()
    .id
}

fn claim(pool: &Pool, id: &VolumeId, on: &str, mode: AccessMode) -> loopvol::Result<()> {
    pool.volume(id)?.claim(&node(on), mode, None)
}

fn release(pool: &Pool, id: &VolumeId, on: &str) {
    pool.volume(id).unwrap().release(&node(on)).unwrap();
}

fn access(fs: Option<FsType>) -> Access {
    match fs {
        Some(fs) => Access::Mount {
            fs_type: Some(fs),
            mount_options: vec![],
        },
        None => Access::Block,
    }
}

fn stage(pool: &Pool, id: &VolumeId, at: &Path, fs: Option<FsType>) -> loopvol::Result<PathBuf> {
    let at = pool.node_path("staging path", at)?;
    Ok(pool
        .volume(id)?
        .stage(&at, &access(fs), AccessMode::SingleNodeWriter)?
        .device)
}

fn unstage(pool: &Pool, id: &VolumeId, at: &Path) {
    let at = pool.node_path("staging path", at).unwrap();
    pool.volume(id).unwrap().unstage(&at).unwrap();
}

fn meta(pool: &Pool, id: &VolumeId) -> VolumeMeta {
    pool.get_volume(id).unwrap()
}

fn device(path: &Path) -> LoopDevice {
    kernel::loop_devices()
        .into_iter()
        .find(|d| d.path() == path)
        .unwrap_or_else(|| panic!("{} is not attached", path.display()))
}

/// Checks the filesystem (or reads the device) of volume `id`'s image, attached read-only for
/// the check: clean, or the tool's report.
fn fsck(pool: &Pool, id: &VolumeId, fs: FsType) {
    let dev = loopdev::attach(&pool.volume_image(id), true).unwrap();
    let mut cmd = match fs {
        FsType::Ext4 => {
            let mut c = std::process::Command::new("e2fsck");
            c.arg("-fn");
            c
        }
        FsType::Xfs => {
            let mut c = std::process::Command::new("xfs_repair");
            c.arg("-n");
            c
        }
        FsType::Btrfs => {
            let mut c = std::process::Command::new("btrfs");
            c.args(["check", "--readonly"]);
            c
        }
    };
    let (code, out, err) = run(cmd.arg(dev.path()));
    loopdev::detach(&dev).unwrap();
    assert_eq!(code, 0, "{fs} check of {id}:\n{out}\n{err}");
}

/// What a workload holding the volume open sees once its node fenced it: every synced write
/// fails, and nothing it writes reaches the image.
#[track_caller]
fn assert_writes_fail(file: &std::fs::File, what: &str) {
    let write = file
        .write_all_at(&pattern(64 * 1024, 9), 0)
        .and_then(|()| file.sync_all());
    assert!(
        write.is_err(),
        "{what}: a synced write after the fence succeeded"
    );
}

/// The fence for each kind of volume: node-a stages read-write with a workload writing, the
/// controller releases node-a's claim (a force-detach) and cannot give node-b the volume; node-a's
/// next round finds its claim gone and fences (the filesystem shut down or, for btrfs and raw
/// block, the device cut off its image) and records it; node-b then gets the volume with every
/// byte node-a synced, the filesystem checks clean, and node-a's later unstage loses nothing of
/// node-b's.
fn fence_after_force_detach(fs: Option<FsType>) {
    let tools: &[&str] = match fs {
        Some(f) => fs_tools(f.as_str()),
        None => &[],
    };
    if !require_root(tools) {
        return;
    }
    let _btrfs = fs.and_then(|f| hazard::for_fs(f.as_str()));
    let s = Scratch::new();
    let a = Arc::new(open_as(&s, "node-a", LeaseSettings::default()));
    let b = open_as(&s, "node-b", LeaseSettings::default());
    let id = create(&a, "fenced", fs);
    let (sa, sb) = (s.path("node-a/staging"), s.path("node-b/staging"));
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    let dev_a = stage(&a, &id, &sa, fs).unwrap();
    let synced = pattern(3 * MIB as usize + 5, 1);
    // The workload: a file (or the device) held open for writing.
    let workload = match fs {
        Some(_) => {
            write_synced(&sa.join("synced"), &synced);
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(sa.join("open"))
                .unwrap()
        }
        None => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev_a)
                .unwrap();
            f.write_all_at(&synced, 0).unwrap();
            f.sync_all().unwrap();
            f
        }
    };
    let guard = NodeGuard::new(Arc::clone(&a));
    guard.tick();
    assert!(!device(&dev_a).cut_off, "fenced while it may write");

    // The force-detach: the claim goes, node-a's hold stays and keeps node-b out.
    release(&b, &id, "node-a");
    let err = claim(&b, &id, "node-b", AccessMode::SingleNodeWriter).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.to_string()
            .contains("still staged read-write on node node-a"),
        "{err}"
    );

    guard.tick();
    assert!(device(&dev_a).cut_off, "node-a did not cut its device off");
    assert_writes_fail(&workload, "the workload on node-a");
    if fs.is_some() {
        let created = std::fs::File::create(sa.join("after-fence")).and_then(|mut f| {
            f.write_all(b"x")?;
            f.sync_all()
        });
        assert!(created.is_err(), "a new file on the fenced filesystem");
    }
    let hold = meta(&a, &id).staged;
    let fenced = hold[0].fenced.as_ref().expect("the fence is recorded");
    assert_eq!(fenced.by, FencedBy::Node);
    assert!(
        fenced.reason.contains("claim for this node was released"),
        "{fenced:?}"
    );
    let condition = a.volume_condition(&meta(&a, &id)).unwrap();
    assert!(
        condition.abnormal && condition.message.contains("fenced on this node"),
        "{condition:?}"
    );
    // node-a may not use it again before it unstages, even published to it again.
    claim(&b, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    let again = stage(&a, &id, &sa, fs).unwrap_err();
    assert!(
        again.to_string().contains("was fenced on node node-a"),
        "{again}"
    );
    release(&b, &id, "node-a");

    // The hand-over: node-b gets it. (One machine: node-a's fenced mount must go first here, as
    // its unstage would on its own machine; elsewhere node-b would not see it at all.)
    claim(&b, &id, "node-b", AccessMode::SingleNodeWriter).unwrap();
    drop(workload);
    unstage(&a, &id, &sa);
    let dev_b = stage(&b, &id, &sb, fs).unwrap();
    let written_by_b = pattern(MIB as usize, 2);
    match fs {
        Some(_) => {
            assert_eq!(std::fs::read(sb.join("synced")).unwrap(), synced);
            write_synced(&sb.join("by-b"), &written_by_b);
        }
        None => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev_b)
                .unwrap();
            let mut got = vec![0; synced.len()];
            f.read_exact_at(&mut got, 0).unwrap();
            assert!(got == synced, "the bytes node-a synced, read on node-b");
            f.write_all_at(&written_by_b, 8 * MIB).unwrap();
            f.sync_all().unwrap();
        }
    }
    unstage(&b, &id, &sb);
    if let Some(fs) = fs {
        fsck(&b, &id, fs);
    }
    // What node-b wrote is there after everything node-a did.
    let dev = loopdev::attach(&b.volume_image(&id), true).unwrap();
    match fs {
        Some(f) => {
            let mnt = s.path("check");
            std::fs::create_dir_all(&mnt).unwrap();
            let data = if f == FsType::Ext4 { "noload" } else { "" };
            let flags = nix::mount::MsFlags::MS_RDONLY;
            loopvol::testing::mount::mount_fs(&dev.path(), &mnt, f.as_str(), flags, data).unwrap();
            let got = std::fs::read(mnt.join("by-b"));
            loopvol::testing::mount::unmount(&mnt).unwrap();
            assert!(got.unwrap() == written_by_b, "node-b's file");
        }
        None => {
            let f = std::fs::File::open(dev.path()).unwrap();
            let mut got = vec![0; written_by_b.len()];
            f.read_exact_at(&mut got, 8 * MIB).unwrap();
            assert!(got == written_by_b, "node-b's bytes");
        }
    }
    loopdev::detach(&dev).unwrap();
    release(&b, &id, "node-b");
    s.assert_clean("after the hand-over");
}

#[test]
fn fence_after_force_detach_ext4() {
    fence_after_force_detach(Some(FsType::Ext4));
}

#[test]
fn fence_after_force_detach_xfs() {
    fence_after_force_detach(Some(FsType::Xfs));
}

#[test]
fn fence_after_force_detach_btrfs() {
    fence_after_force_detach(Some(FsType::Btrfs));
}

#[test]
fn fence_after_force_detach_raw_block() {
    fence_after_force_detach(None);
}

/// A node that cannot renew its lease fences every volume it has attached once half the lease
/// timeout passed, from the clock alone (here the lease file was replaced by a directory, so
/// every renewal fails while the rest of the pool answers), and records it once it can.
#[test]
fn a_node_that_cannot_renew_fences_within_half_the_timeout() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let a = Arc::new(open_as(&s, "node-a", short_lease(false)));
    let id = create(&a, "lapsed", Some(FsType::Ext4));
    let sa = s.path("node-a/staging");
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    let dev = stage(&a, &id, &sa, Some(FsType::Ext4)).unwrap();
    let guard = NodeGuard::new(Arc::clone(&a));
    guard.tick();
    assert!(!device(&dev).cut_off);
    let lease = s.pool().join("leases").join("node-a");
    std::fs::remove_file(&lease).unwrap();
    std::fs::create_dir(&lease).unwrap();
    let started = std::time::Instant::now();
    poll_until(Duration::from_secs(10), "the lapse fence", || {
        guard.tick();
        device(&dev).cut_off
    });
    let took = started.elapsed();
    assert!(
        took >= short_lease(false).fence_after(),
        "fenced after {took:?}, before half the timeout"
    );
    assert!(std::fs::File::create(sa.join("x")).is_err());
    let fenced = meta(&a, &id).staged[0].fenced.clone().expect("recorded");
    assert!(
        fenced.reason.contains("could not renew its lease"),
        "{fenced:?}"
    );
    unstage(&a, &id, &sa);
    release(&a, &id, "node-a");
}

/// Stops a guard's threads when the test ends, passed or failed.
struct Stop<'g>(&'g NodeGuard);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// An operator's fence is refused while the node's lease moves (the node is not down), and when
/// it goes through, a node that was not down after all fences what it still has staged.
#[test]
fn operator_fence_needs_a_still_lease_and_fences_a_node_that_comes_back() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let a = Arc::new(open_as(&s, "node-a", short_lease(false)));
    let b = open_as(&s, "node-b", short_lease(false));
    let id = create(&a, "declared", Some(FsType::Ext4));
    let sa = s.path("node-a/staging");
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    let dev = stage(&a, &id, &sa, Some(FsType::Ext4)).unwrap();
    let guard = NodeGuard::new(Arc::clone(&a));
    guard.tick();
    guard.start().unwrap();
    let _stop = Stop(&guard);
    let err = b
        .fence_node(&node("node-a"), FenceCheck::LeaseStill)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("renewed its lease"), "{err}");
    assert!(meta(&b, &id).staged[0].fenced.is_none());
    // Forced (the operator is sure): node-a, alive after all, fences within a round.
    let report = b.fence_node(&node("node-a"), FenceCheck::Force).unwrap();
    assert_eq!(report.released, std::slice::from_ref(&id));
    assert!(meta(&b, &id).claims.is_empty());
    poll_until(Duration::from_secs(10), "node-a fencing itself", || {
        device(&dev).cut_off
    });
    let condition = a.volume_condition(&meta(&a, &id)).unwrap();
    assert!(
        condition.message.contains("declared the node down"),
        "{condition:?}"
    );
    claim(&b, &id, "node-b", AccessMode::SingleNodeWriter).unwrap();
    unstage(&a, &id, &sa);
    release(&b, &id, "node-b");
}

/// With `handover_on_expiry`, the controller hands a volume over once the node's lease stood
/// still for the whole timeout on its own clock, and marks the hold fenced; without it, never.
#[test]
fn handover_at_lease_expiry_only_when_allowed() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let a = Arc::new(open_as(&s, "node-a", short_lease(false)));
    let strict = open_as(&s, "ctl", short_lease(false));
    let lenient = open_as(&s, "ctl2", short_lease(true));
    let id = create(&a, "expiring", Some(FsType::Ext4));
    let sa = s.path("node-a/staging");
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    stage(&a, &id, &sa, Some(FsType::Ext4)).unwrap();
    NodeGuard::new(Arc::clone(&a)).tick();
    release(&strict, &id, "node-a");
    for ctl in [&strict, &lenient] {
        ctl.watch_leases().unwrap();
    }
    // Not expired yet: both refuse, saying the lease is not judged yet.
    let err = claim(&lenient, &id, "node-b", AccessMode::SingleNodeWriter).unwrap_err();
    assert!(err.to_string().contains("not judged yet"), "{err}");
    std::thread::sleep(short_lease(true).timeout);
    for ctl in [&strict, &lenient] {
        ctl.watch_leases().unwrap();
    }
    let err = claim(&strict, &id, "node-b", AccessMode::SingleNodeWriter).unwrap_err();
    assert!(err.to_string().contains("has expired"), "{err}");
    claim(&lenient, &id, "node-b", AccessMode::SingleNodeWriter).unwrap();
    let fenced = meta(&a, &id).staged[0].fenced.clone().expect("marked");
    assert_eq!(fenced.by, FencedBy::LeaseExpiry);
    s.cleanup_kernel_state();
    release(&strict, &id, "node-b");
}

/// A hold stamped with another boot of its node than the node's record names now belongs to a
/// kernel that no longer runs: the controller drops it and hands the volume over.
#[test]
fn a_rebooted_nodes_hold_is_stale() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let a = open_as(&s, "node-a", LeaseSettings::default());
    let b = open_as(&s, "node-b", LeaseSettings::default());
    let id = create(&a, "rebooted", Some(FsType::Ext4));
    let sa = s.path("node-a/staging");
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    stage(&a, &id, &sa, Some(FsType::Ext4)).unwrap();
    release(&b, &id, "node-a");
    assert!(claim(&b, &id, "node-b", AccessMode::SingleNodeWriter).is_err());
    // node-a reboots (its kernel state goes), and staged in the boot before the current one.
    s.cleanup_kernel_state();
    let path = s
        .pool()
        .join("volumes")
        .join(id.as_str())
        .join("volume.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["staged"][0]["boot"] = "an-earlier-boot".into();
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    claim(&b, &id, "node-b", AccessMode::SingleNodeWriter).unwrap();
    assert!(meta(&b, &id).staged.is_empty(), "the stale hold is gone");
    release(&b, &id, "node-b");
}

/// ControllerPublish enforces the attach limit a node recorded (csi-sanity's "should fail when
/// publishing more volumes than the node max attach limit"): RESOURCE_EXHAUSTED beyond it,
/// repeats and other nodes unaffected.
#[test]
fn attach_limit_is_enforced() {
    let s = Scratch::new();
    let a = open_as(&s, "node-a", LeaseSettings::default());
    let mut o = PoolOptions::new(node("node-b"));
    o.shared = true;
    let b = Pool::open(s.pool(), o).unwrap();
    b.register_node_with(&NodeInfo {
        max_volumes: Some(2),
        lease: None,
    })
    .unwrap();
    let ids: Vec<VolumeId> = (0..3)
        .map(|i| {
            a.create_volume(&CreateVolume::blank(format!("v{i}"), MIB))
                .unwrap()
                .id
        })
        .collect();
    let rw = AccessMode::SingleNodeWriter;
    claim(&a, &ids[0], "node-b", rw).unwrap();
    claim(&a, &ids[1], "node-b", rw).unwrap();
    claim(&a, &ids[1], "node-b", rw).unwrap();
    let err = claim(&a, &ids[2], "node-b", rw).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert!(
        err.to_string().contains("--max-volumes-per-node 2"),
        "{err}"
    );
    assert!(meta(&a, &ids[2]).claims.is_empty());
    claim(&a, &ids[2], "node-a", rw).unwrap();
    release(&a, &ids[2], "node-a");
    release(&a, &ids[0], "node-b");
    claim(&a, &ids[2], "node-b", rw).unwrap();
}

/// The node record is rewritten only when it changes, so a node plugin restarting on a full pool
/// writes nothing, and a change is written over the record's spare; a lease renews in place on a
/// full pool.
#[test]
fn node_record_and_lease_on_a_full_pool() {
    if !require_root(&["mkfs.ext4"]) {
        return;
    }
    let s = Scratch::new();
    let fs = SmallFs::ext4(&s, "full", 16 * MIB);
    let dir = fs.path().to_path_buf();
    let open = || {
        let mut o = PoolOptions::new(node("node-a"));
        o.shared = true;
        Pool::open(&dir, o).unwrap()
    };
    let info = NodeInfo {
        max_volumes: Some(4),
        lease: Some(LeaseSettings::default()),
    };
    let pool = Arc::new(open());
    assert!(pool.register_node_with(&info).unwrap(), "first record");
    let guard = NodeGuard::new(Arc::clone(&pool));
    guard.tick();
    fs.fill();
    // A restart: nothing to write.
    let pool = Arc::new(open());
    assert!(
        !pool.register_node_with(&info).unwrap(),
        "unchanged, rewritten"
    );
    let before = std::fs::read(dir.join("leases/node-a")).unwrap();
    NodeGuard::new(Arc::clone(&pool)).tick();
    assert_ne!(
        std::fs::read(dir.join("leases/node-a")).unwrap(),
        before,
        "renewed in place"
    );
    // A change is written over the record's spare: no space needed.
    let changed = NodeInfo {
        max_volumes: Some(5),
        ..info
    };
    assert!(
        pool.register_node_with(&changed).unwrap(),
        "changed, written"
    );
    assert_eq!(
        pool.node_record(&node("node-a"))
            .unwrap()
            .unwrap()
            .max_volumes,
        Some(5)
    );
}

/// Publications of a volume staged read-only (its claim is read-only) are read-only too.
#[test]
fn a_read_only_claim_publishes_read_only() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let a = open_as(&s, "node-a", LeaseSettings::default());
    let id = create(&a, "ro", Some(FsType::Ext4));
    let sa = s.path("node-a/staging");
    // Formatted by a first, read-write use.
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
    stage(&a, &id, &sa, Some(FsType::Ext4)).unwrap();
    unstage(&a, &id, &sa);
    release(&a, &id, "node-a");
    claim(&a, &id, "node-a", AccessMode::ReadOnly).unwrap();
    stage(&a, &id, &sa, Some(FsType::Ext4)).unwrap();
    let target = s.path("node-a/target");
    let request = Publish {
        staging: Some(a.node_path("staging path", &sa).unwrap()),
        target: a.node_path("target path", &target).unwrap(),
        access: access(Some(FsType::Ext4)),
        read_only: false,
        fs_group: None,
        exclusive: false,
    };
    a.volume(&id).unwrap().publish(&request).unwrap();
    assert!(kernel::mount_at(&target).unwrap().has_option("ro"));
    let write = std::fs::write(target.join("x"), b"x").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS));
}

/// What a workload was told is durable survives the fence: a workload appends and syncs blocks
/// on node-a as fast as it can while node-a fences itself (its claim released), and every block
/// whose fsync succeeded is there when the filesystem is mounted again (its journal replayed).
/// The shutdown commits the log first: without that, ext4 can answer success to an fsync that
/// raced the shutdown while dropping its transaction with the aborted journal.
fn synced_blocks_survive_the_fence(fs: FsType) {
    if !require_root(fs_tools(fs.as_str())) {
        return;
    }
    let s = Scratch::new();
    let a = Arc::new(open_as(&s, "node-a", LeaseSettings::default()));
    for round in 0..4 {
        let id = create(&a, &format!("race-{round}"), Some(fs));
        let sa = s.path("node-a/staging");
        claim(&a, &id, "node-a", AccessMode::SingleNodeWriter).unwrap();
        stage(&a, &id, &sa, Some(fs)).unwrap();
        let mut workload = Workload::start(sa.join("workload"));
        poll_until(Duration::from_secs(10), "the workload syncing", || {
            workload.synced() >= 8 * (round + 1)
        });
        release(&a, &id, "node-a");
        NodeGuard::new(Arc::clone(&a)).tick();
        let (synced, error) = workload.wait_failed(Duration::from_secs(10));
        drop(workload);
        unstage(&a, &id, &sa);
        // Mounted again, read-write: the journal replays, as on the next node.
        let dev = loopdev::attach(&a.volume_image(&id), false).unwrap();
        let check = s.path("check");
        std::fs::create_dir_all(&check).unwrap();
        loopvol::testing::mount::mount_fs(
            &dev.path(),
            &check,
            fs.as_str(),
            nix::mount::MsFlags::empty(),
            "",
        )
        .unwrap();
        let got = std::fs::read(check.join("workload"));
        loopvol::testing::mount::unmount(&check).unwrap();
        loopdev::detach(&dev).unwrap();
        assert_synced_blocks(
            &got.unwrap(),
            synced,
            &format!("{fs}, round {round} (the workload stopped with: {error})"),
        );
    }
    s.assert_clean("after the rounds");
}

#[test]
fn synced_blocks_survive_the_fence_ext4() {
    synced_blocks_survive_the_fence(FsType::Ext4);
}

#[test]
fn synced_blocks_survive_the_fence_xfs() {
    synced_blocks_survive_the_fence(FsType::Xfs);
}
