//! Data safety on a real kernel, as root: the README's promises (thick, thin, overcommit,
//! never-format) on small pools with filesystems of their own (ext4 and xfs images of a few
//! hundred MiB on loop devices), images deleted, replaced or truncated under a staged volume,
//! and volumes that lost their metadata. Each test makes its own pool and cleans up only what
//! it made. Every "data survives" claim is checked by reading the bytes back.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use loopvol::{
    Access, AccessMode, Allocation, CreateVolume, ErrorKind, FsType, NodeName, Pool, PoolOptions,
    Publish, Result, SizeRequest, SnapshotRequest, VolumeId, VolumeMeta, VolumeSource,
};
use loopvol_e2e::{fs_tools, loops_under, pattern, require_root, Scratch};

const MIB: u64 = 1 << 20;

fn gate(fs: &str, extra: &[&str]) -> bool {
    let mut tools = fs_tools(fs).to_vec();
    tools.extend(extra);
    require_root(&tools)
}

fn open(dir: &Path, overcommit: f64) -> Pool {
    let mut options = PoolOptions::new(NodeName::try_from("node-a").unwrap());
    options.overcommit = overcommit;
    Pool::open(dir, options).unwrap()
}

fn vid(id: &str) -> VolumeId {
    VolumeId::try_from(id).unwrap()
}

fn create(
    pool: &Pool,
    name: &str,
    size: u64,
    allocation: Allocation,
    source: Option<VolumeSource>,
) -> Result<VolumeMeta> {
    pool.create_volume(&CreateVolume {
        name: name.into(),
        size: SizeRequest::at_least(size),
        fs_type: None,
        allocation: Some(allocation),
        source,
    })
}

fn snapshot(pool: &Pool, name: &str, source: &str) -> Result<loopvol::SnapshotMeta> {
    pool.create_snapshot(&SnapshotRequest {
        name: name.into(),
        source: vid(source),
    })
}

fn ext4() -> Access {
    Access::Mount {
        fs_type: Some(FsType::Ext4),
        mount_options: vec![],
    }
}

fn stage(pool: &Pool, id: &str, staging: &Path, access: &Access) -> Result<PathBuf> {
    let staging = pool.node_path("staging path", staging)?;
    pool.volume(&vid(id))?
        .stage_or_release(&staging, access, AccessMode::SingleNodeWriter)
        .map(|s| s.device)
}

fn unstage(pool: &Pool, id: &str, staging: &Path) -> Result<()> {
    let staging = pool.node_path("staging path", staging)?;
    pool.volume(&vid(id))?.unstage(&staging)
}

fn publish(pool: &Pool, id: &str, staging: &Path, target: &Path) -> Result<()> {
    let request = Publish {
        staging: Some(pool.node_path("staging path", staging)?),
        target: pool.node_path("target path", target)?,
        access: ext4(),
        read_only: false,
        fs_group: None,
        exclusive: false,
    };
    pool.volume(&vid(id))?.publish(&request)
}

fn unpublish(pool: &Pool, id: &str, target: &Path) -> Result<()> {
    let target = pool.node_path("target path", target)?;
    pool.volume(&vid(id))?.unpublish(&target)
}

/// Writes `data` at `offset` of a device or file and makes it durable.
fn write_at(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let f = File::options().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    f.sync_all()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

/// Whole 4 KiB blocks of at most `bytes`.
fn blocks(bytes: u64) -> u64 {
    bytes / 4096 * 4096
}

fn image(pool: &Pool, id: &str) -> PathBuf {
    pool.volume_image(&vid(id))
}

fn assert_kind<T: std::fmt::Debug>(result: Result<T>, kind: ErrorKind, needle: &str) -> String {
    let err = result.expect_err("an error");
    let msg = err.to_string();
    assert_eq!(err.kind(), kind, "{msg}");
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    msg
}

// ---------------------------------------------------------------------------------------------
// Space: thick, thin, overcommit
// ---------------------------------------------------------------------------------------------

/// The README's thick promise on a reflink pool: a snapshot makes every written block of a
/// thick volume shared, and the pool keeps the space to copy them. A thin volume then takes
/// everything the pool still admits and fills it; the thick volume's data is overwritten in full
/// and reads back; the snapshot still holds the old data.
#[test]
fn a_thick_volume_is_overwritten_in_full_after_a_reflinked_snapshot_on_a_full_pool() {
    if !gate("xfs", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.small_pool("xfs", 400), 1.0);
    let old = pattern(100 << 20, 1);
    create(&pool, "thick", 120 * MIB, Allocation::Thick, None).unwrap();
    let dev = stage(&pool, "thick", &s.path("st-thick"), &Access::Block).unwrap();
    write_at(&dev, 0, &old).unwrap();

    let snap = snapshot(&pool, "snap", "thick").unwrap();
    let cap = pool.capacity().unwrap();
    assert!(
        cap.thick_unbacked_bytes >= 100 * MIB,
        "the shared blocks stay reserved: {cap:?}"
    );

    // A thin volume takes all the pool still promises, and fills it.
    let room = blocks(cap.available_bytes);
    assert!(room > 64 * MIB, "{cap:?}");
    create(&pool, "filler", room, Allocation::Thin, None).unwrap();
    assert_kind(
        create(&pool, "one-more", MIB, Allocation::Thin, None),
        ErrorKind::ResourceExhausted,
        "can promise only",
    );
    // A clone costs nothing now (a reflink) but is promised its whole size: refused too.
    assert_kind(
        create(
            &pool,
            "clone",
            120 * MIB,
            Allocation::Thin,
            Some(VolumeSource::Volume(vid("thick"))),
        ),
        ErrorKind::ResourceExhausted,
        "volume clone needs",
    );
    let filler = stage(&pool, "filler", &s.path("st-filler"), &Access::Block).unwrap();
    let fill = pattern(usize::try_from(room).unwrap(), 3);
    write_at(&filler, 0, &fill).unwrap();

    // Every block of the thick volume is copied on this write: the space kept for its shared
    // blocks pays for it.
    let new = pattern(100 << 20, 2);
    write_at(&dev, 0, &new).expect("a thick volume never fails a write for lack of pool space");
    assert!(read_at(&dev, 0, new.len()) == new, "thick data differs");
    assert!(read_at(&filler, 0, fill.len()) == fill, "thin data differs");
    let snap_image = pool
        .root()
        .join("snapshots")
        .join(snap.id.as_str())
        .join("image");
    assert!(
        read_at(&snap_image, 0, old.len()) == old,
        "snapshot data differs"
    );
    unstage(&pool, "thick", &s.path("st-thick")).unwrap();
    unstage(&pool, "filler", &s.path("st-filler")).unwrap();
    assert!(loops_under(pool.root()).is_empty(), "unstage left a device");
}

/// A snapshot is admitted against what the pool can still promise, not its free bytes: one
/// whose copy would eat into a thin volume's promise is refused (and leaves nothing), and the
/// thin volume then writes its whole size.
#[test]
fn a_snapshot_never_takes_what_a_thin_volume_was_promised() {
    if !gate("ext4", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.small_pool("ext4", 300), 1.0);
    let room = pool.capacity().unwrap().available_bytes;
    let size = blocks(room - 40 * MIB);
    create(&pool, "thin", size, Allocation::Thin, None).unwrap();
    let dev = stage(&pool, "thin", &s.path("st"), &Access::Block).unwrap();
    write_at(&dev, 0, &pattern(64 << 20, 1)).unwrap();
    // ext4 copies the data (no reflinks): 64 MiB taken now, 40 MiB left to promise.
    let msg = assert_kind(
        snapshot(&pool, "snap", "thin"),
        ErrorKind::ResourceExhausted,
        "can promise only",
    );
    assert!(msg.contains("snapshot"), "{msg}");
    assert!(
        std::fs::read_dir(pool.root().join("snapshots"))
            .unwrap()
            .next()
            .is_none(),
        "a refused snapshot left its directory"
    );
    let all = pattern(usize::try_from(size).unwrap(), 2);
    write_at(&dev, 0, &all).expect("a thin volume can always write its whole size");
    assert!(read_at(&dev, 0, all.len()) == all, "thin data differs");
    unstage(&pool, "thin", &s.path("st")).unwrap();
}

/// A reflinked snapshot costs only what its source owned alone: a second snapshot of an
/// unchanged volume shares nothing new and is admitted on a pool with less free space than the
/// volume's data (overcommit lets a thin volume fill it).
#[test]
fn a_reflinked_snapshot_is_not_refused_for_space_it_does_not_need() {
    if !gate("xfs", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.small_pool("xfs", 400), 2.0);
    create(&pool, "data", 100 * MIB, Allocation::Thin, None).unwrap();
    let dev = stage(&pool, "data", &s.path("st-data"), &Access::Block).unwrap();
    write_at(&dev, 0, &pattern(64 << 20, 1)).unwrap();
    snapshot(&pool, "first", "data").unwrap();

    let promised = blocks(pool.capacity().unwrap().available_bytes);
    create(&pool, "big", promised, Allocation::Thin, None).unwrap();
    let big = stage(&pool, "big", &s.path("st-big"), &Access::Block).unwrap();
    let free = pool.capacity().unwrap().free_bytes;
    write_at(
        &big,
        0,
        &pattern(usize::try_from(blocks(free - 40 * MIB)).unwrap(), 2),
    )
    .unwrap();
    let cap = pool.capacity().unwrap();
    assert!(cap.free_bytes < 64 * MIB, "{cap:?}");

    snapshot(&pool, "second", "data").expect("the second snapshot shares nothing new");
    let after = pool.capacity().unwrap();
    assert!(
        cap.free_bytes - after.free_bytes < MIB,
        "a reflinked snapshot took space: {cap:?} → {after:?}"
    );
    unstage(&pool, "data", &s.path("st-data")).unwrap();
    unstage(&pool, "big", &s.path("st-big")).unwrap();
}

/// Expansion and thin → thick are admitted against the same promises as creation.
#[test]
fn expansion_and_allocation_changes_are_admitted_like_creation() {
    if !gate("ext4", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.small_pool("ext4", 300), 1.0);
    create(&pool, "a", 64 * MIB, Allocation::Thin, None).unwrap();
    let room = pool.capacity().unwrap().available_bytes;
    let grow = |size| pool.volume(&vid("a"))?.expand(SizeRequest::at_least(size));
    assert_kind(
        grow(64 * MIB + room + MIB),
        ErrorKind::ResourceExhausted,
        "growing volume a",
    );
    assert_eq!(pool.get_volume(&vid("a")).unwrap().size_bytes, 64 * MIB);
    // A little is left for the metadata written in between (a block each).
    grow(64 * MIB + blocks(room - MIB)).unwrap();
    assert!(pool.capacity().unwrap().available_bytes < 2 * MIB);
    // Thin → thick moves the promise; the pool holds it at overcommit 1.
    let mut v = pool.volume(&vid("a")).unwrap();
    v.set_allocation(Allocation::Thick).unwrap();
    drop(v);
    let cap = pool.capacity().unwrap();
    assert_eq!(
        (cap.thin_unallocated_bytes, cap.thick_unbacked_bytes),
        (0, 0),
        "allocated: {cap:?}"
    );
    pool.delete_volume(&vid("a")).unwrap();
    // Under overcommit, thick needs the backing thin promises lacked.
    create(&pool, "b", 64 * MIB, Allocation::Thin, None).unwrap();
    let over = open(pool.root(), 4.0);
    create(
        &over,
        "c",
        blocks(over.capacity().unwrap().available_bytes),
        Allocation::Thin,
        None,
    )
    .unwrap();
    let mut v = over.volume(&vid("b")).unwrap();
    assert_kind(
        v.set_allocation(Allocation::Thick),
        ErrorKind::ResourceExhausted,
        "making volume b thick",
    );
    assert_eq!(v.meta().allocation, Allocation::Thin);
}

// ---------------------------------------------------------------------------------------------
// Never format data
// ---------------------------------------------------------------------------------------------

/// Data written through a raw block device carries no signature blkid knows; the volume is
/// never formatted afterwards, and neither is a volume restored from its snapshot. A damaged
/// filesystem (its signature wiped) is data too. The bytes survive every refusal.
#[test]
fn data_without_a_signature_is_never_formatted() {
    if !gate("ext4", &["wipefs"]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.pool(), 1.0);
    let data = pattern(8 << 20, 7);
    create(&pool, "raw", 64 * MIB, Allocation::Thin, None).unwrap();
    let dev = stage(&pool, "raw", &s.path("st"), &Access::Block).unwrap();
    write_at(&dev, 0, &data).unwrap();
    unstage(&pool, "raw", &s.path("st")).unwrap();
    assert_kind(
        stage(&pool, "raw", &s.path("st"), &ext4()),
        ErrorKind::FailedPrecondition,
        "was used as a raw block device",
    );
    s.assert_clean("a refused stage");
    assert!(
        read_at(&image(&pool, "raw"), 0, data.len()) == data,
        "raw data changed"
    );

    // Restored from the block volume's snapshot, as a filesystem (allow-volume-mode-change).
    let snap = snapshot(&pool, "raw-snap", "raw").unwrap();
    let source = Some(VolumeSource::Snapshot(snap.id.clone()));
    create(&pool, "restored", 64 * MIB, Allocation::Thin, source).unwrap();
    assert_kind(
        stage(&pool, "restored", &s.path("st"), &ext4()),
        ErrorKind::FailedPrecondition,
        &format!("created from snapshot {}", snap.id),
    );
    assert!(
        read_at(&image(&pool, "restored"), 0, data.len()) == data,
        "restored data changed"
    );

    // A filesystem whose signature is gone: blkid sees nothing, the data map sees data.
    create(&pool, "damaged", 64 * MIB, Allocation::Thin, None).unwrap();
    stage(&pool, "damaged", &s.path("st"), &ext4()).unwrap();
    std::fs::write(s.path("st/file"), &data).unwrap();
    unstage(&pool, "damaged", &s.path("st")).unwrap();
    let (code, _, err) = loopvol_e2e::run(
        Command::new("wipefs")
            .arg("-a")
            .arg(image(&pool, "damaged")),
    );
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read(image(&pool, "damaged")).unwrap();
    assert_kind(
        stage(&pool, "damaged", &s.path("st"), &ext4()),
        ErrorKind::FailedPrecondition,
        "but no filesystem blkid recognises",
    );
    assert!(
        std::fs::read(image(&pool, "damaged")).unwrap() == before,
        "damaged image changed"
    );
    s.assert_clean("refused stages");

    // A blank thick volume (allocated, never written) is formatted.
    create(&pool, "thick", 64 * MIB, Allocation::Thick, None).unwrap();
    stage(&pool, "thick", &s.path("st"), &ext4()).unwrap();
    unstage(&pool, "thick", &s.path("st")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Metadata is not the only witness
// ---------------------------------------------------------------------------------------------

/// A volume whose volume.json is gone is not discarded: while it is attached the kernel says so,
/// afterwards its image's data does. Delete and create are refused, naming what to do; the data
/// survives; with its metadata back, the volume is whole again.
#[test]
fn a_volume_that_lost_its_metadata_is_never_discarded() {
    if !gate("ext4", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.pool(), 1.0);
    create(&pool, "kept", 64 * MIB, Allocation::Thin, None).unwrap();
    let (staging, target) = (s.path("st"), s.path("pod/vol"));
    stage(&pool, "kept", &staging, &ext4()).unwrap();
    publish(&pool, "kept", &staging, &target).unwrap();
    loopvol_e2e::write_synced(&target.join("f"), b"precious");
    let meta = pool.root().join("volumes/kept/volume.json");
    let saved = std::fs::read(&meta).unwrap();
    std::fs::remove_file(&meta).unwrap();

    let id = vid("kept");
    for (what, result) in [
        ("delete", pool.delete_volume(&id).map(drop)),
        (
            "create",
            create(&pool, "kept", 64 * MIB, Allocation::Thin, None).map(drop),
        ),
    ] {
        let msg = assert_kind(result, ErrorKind::FailedPrecondition, "has no volume.json");
        assert!(msg.contains("attached as /dev/loop"), "{what}: {msg}");
    }
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"precious");

    // Taken down by hand (nothing knows the volume now), its image still holds the data.
    s.cleanup_kernel_state();
    for result in [
        pool.delete_volume(&id).map(drop),
        create(&pool, "kept", 64 * MIB, Allocation::Thin, None).map(drop),
    ] {
        assert_kind(result, ErrorKind::FailedPrecondition, "bytes of data");
    }
    std::fs::write(&meta, saved).unwrap();
    // The hold recorded before is this node's and nothing is attached: it blocks nothing.
    stage(&pool, "kept", &staging, &ext4()).unwrap();
    assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"precious");
    unstage(&pool, "kept", &staging).unwrap();

    // An interrupted create (no metadata, a blank image) is still cleaned up.
    let dir = pool.root().join("volumes/half");
    std::fs::create_dir_all(&dir).unwrap();
    File::create(dir.join("image"))
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    create(&pool, "half", 64 * MIB, Allocation::Thin, None).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Node-side health, and a volume whose image went away under it
// ---------------------------------------------------------------------------------------------

/// An image deleted while staged: stats still answer, with an abnormal condition that names the
/// loop device the data is readable from; the data is there; unpublish and unstage finish and
/// detach it. The same for an image replaced by another file, where a new stage is refused too.
#[test]
fn an_image_deleted_or_replaced_in_use_is_reported_and_unstaged() {
    if !gate("ext4", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.pool(), 1.0);
    for (name, replace) in [("deleted", false), ("replaced", true)] {
        create(&pool, name, 64 * MIB, Allocation::Thin, None).unwrap();
        let (staging, target) = (
            s.path(&format!("st-{name}")),
            s.path(&format!("pod/{name}")),
        );
        let dev = stage(&pool, name, &staging, &ext4()).unwrap();
        publish(&pool, name, &staging, &target).unwrap();
        loopvol_e2e::write_synced(&target.join("f"), name.as_bytes());
        let img = image(&pool, name);
        std::fs::remove_file(&img).unwrap();
        if replace {
            File::create(&img).unwrap().set_len(64 * MIB).unwrap();
        }
        let meta = pool.get_volume(&vid(name)).unwrap();
        let (usage, cond) = pool.volume_stats(&meta, &target).unwrap();
        assert!(usage.total_bytes > 0, "{usage:?}");
        assert!(cond.abnormal, "{cond:?}");
        let dev_name = dev.display().to_string();
        for needle in [name, dev_name.as_str(), "until it is unstaged", "dd if="] {
            assert!(cond.message.contains(needle), "{cond:?} lacks {needle:?}");
        }
        // The data is readable from the device (ext4's magic) and through the mount.
        assert_eq!(read_at(&dev, 1080, 2), [0x53, 0xEF]);
        assert_eq!(std::fs::read(target.join("f")).unwrap(), name.as_bytes());
        if replace {
            assert_kind(
                stage(&pool, name, &s.path("elsewhere"), &ext4()),
                ErrorKind::FailedPrecondition,
                "was deleted or replaced while attached",
            );
        }
        unpublish(&pool, name, &target).unwrap();
        unstage(&pool, name, &staging).unwrap();
        assert!(loops_under(&s.root()).is_empty(), "{name}: left attached");
    }
}

/// An image truncated to a fraction of its size is abnormal from the controller's view too.
#[test]
fn a_truncated_image_is_abnormal() {
    if !gate("ext4", &[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.pool(), 1.0);
    create(&pool, "short", 64 * MIB, Allocation::Thin, None).unwrap();
    File::options()
        .write(true)
        .open(image(&pool, "short"))
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let cond = pool
        .volume_condition(&pool.get_volume(&vid("short")).unwrap())
        .unwrap();
    assert!(
        cond.abnormal && cond.message.contains("truncated"),
        "{cond:?}"
    );
}

/// xfs shut down under a staged volume: stats answer OK (not NOT_FOUND) with the condition.
#[test]
fn a_shut_down_filesystem_still_has_stats() {
    if !gate("xfs", &["xfs_io"]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s.pool(), 1.0);
    create(&pool, "down", 320 * MIB, Allocation::Thin, None).unwrap();
    let staging = s.path("st");
    let xfs = Access::Mount {
        fs_type: Some(FsType::Xfs),
        mount_options: vec![],
    };
    stage(&pool, "down", &staging, &xfs).unwrap();
    let (code, _, err) = loopvol_e2e::run(
        Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&staging),
    );
    assert_eq!(code, 0, "{err}");
    let meta = pool.get_volume(&vid("down")).unwrap();
    let (_, cond) = pool.volume_stats(&meta, &staging).unwrap();
    assert!(
        cond.abnormal && cond.message.contains("shut down"),
        "{cond:?}"
    );
    unstage(&pool, "down", &staging).unwrap();
    s.assert_clean("after unstage");
}
