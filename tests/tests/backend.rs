//! The backend on a real kernel: real images, loop devices, mkfs and mounts, for ext4, xfs and
//! btrfs. Run as root; each test makes its own pool and cleans up only what it made.
//!
//! Volumes are named by string here and reach the backend as typed IDs through the helpers
//! below (each takes the volume's lock for one operation, as a front end does), so the tests
//! also show that a malformed ID is refused where it enters.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use loopvol::testing::{fs as test_fs, loopdev, mount};
use loopvol::{
    Access, AccessMode, Allocation, Condition, CreateVolume, ErrorKind, Expanded, FsType,
    GroupSnapshot, NodeName, Pool, PoolOptions, Publish, Result, SizeRequest, SnapshotId,
    SnapshotMeta, SnapshotRequest, Staged, Usage, VolumeId, VolumeMeta, VolumeSource,
};
use loopvol_e2e::hazard;
use loopvol_e2e::{fs_tools, loops_under, mounts_under, require_root, Scratch};

const MIB: u64 = 1 << 20;
/// xfs refuses filesystems under 300 MiB; sparse images cost nothing until written.
const SIZE: u64 = 320 * MIB;

fn node(name: &str) -> NodeName {
    NodeName::try_from(name).unwrap()
}

fn options(name: &str) -> PoolOptions {
    PoolOptions::new(node(name))
}

fn open(s: &Scratch) -> Pool {
    Pool::open(s.pool(), options("node-a")).unwrap()
}

fn vid(id: &str) -> Result<VolumeId> {
    VolumeId::try_from(id)
}

fn request(name: &str, size: u64, fs: Option<FsType>) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        size: SizeRequest::at_least(size),
        fs_type: fs,
        allocation: None,
        source: None,
    }
}

fn create(pool: &Pool, name: &str, fs: Option<FsType>) -> String {
    pool.create_volume(&request(name, SIZE, fs))
        .unwrap()
        .id
        .to_string()
}

fn get_volume(pool: &Pool, id: impl AsRef<str>) -> Result<VolumeMeta> {
    pool.get_volume(&vid(id.as_ref())?)
}

fn delete_volume(pool: &Pool, id: impl AsRef<str>) -> Result<()> {
    pool.delete_volume(&vid(id.as_ref())?)
}

fn image(pool: &Pool, id: impl AsRef<str>) -> PathBuf {
    pool.volume_image(&vid(id.as_ref()).unwrap())
}

fn stage(
    pool: &Pool,
    id: impl AsRef<str>,
    staging: &Path,
    access: &Access,
    read_only: bool,
) -> Result<Staged> {
    let id = vid(id.as_ref())?;
    let staging = pool.node_path("staging path", staging)?;
    pool.volume(&id)?
        .stage(&staging, access, AccessMode::single_node(read_only))
}

fn unstage(pool: &Pool, id: impl AsRef<str>, staging: &Path) -> Result<()> {
    let id = vid(id.as_ref())?;
    let staging = pool.node_path("staging path", staging)?;
    pool.volume(&id)?.unstage(&staging)
}

fn publish(
    pool: &Pool,
    id: impl AsRef<str>,
    staging: Option<&Path>,
    target: &Path,
    access: &Access,
    read_only: bool,
    fs_group: Option<u32>,
) -> Result<()> {
    let id = vid(id.as_ref())?;
    let request = Publish {
        staging: staging
            .map(|s| pool.node_path("staging path", s))
            .transpose()?,
        target: pool.node_path("target path", target)?,
        access: access.clone(),
        read_only,
        fs_group,
        exclusive: false,
    };
    pool.volume(&id)?.publish(&request)
}

fn unpublish(pool: &Pool, id: impl AsRef<str>, target: &Path) -> Result<()> {
    let id = vid(id.as_ref())?;
    let target = pool.node_path("target path", target)?;
    pool.volume(&id)?.unpublish(&target)
}

fn volume_at(pool: &Pool, path: &Path) -> Option<String> {
    pool.volume_at(path).unwrap().map(|id| id.to_string())
}

fn volume_usage(pool: &Pool, id: impl AsRef<str>, path: &Path) -> Result<Usage> {
    let meta = get_volume(pool, id.as_ref())?;
    pool.volume_stats(&meta, path).map(|(usage, _)| usage)
}

fn volume_condition(pool: &Pool, id: impl AsRef<str>) -> Result<Condition> {
    pool.volume_condition(&get_volume(pool, id.as_ref())?)
}

fn expand_volume(pool: &Pool, id: impl AsRef<str>, size: u64) -> Result<Expanded> {
    pool.volume(&vid(id.as_ref())?)?
        .expand(SizeRequest::at_least(size))
}

/// Grows the filesystem at `path` (the controller sized the image).
fn node_expand(pool: &Pool, id: impl AsRef<str>, path: Option<&Path>) -> Result<u64> {
    let mut volume = pool.volume(&vid(id.as_ref())?)?;
    let path = path.map(|p| pool.node_path("volume path", p)).transpose()?;
    volume.node_expand(path.as_ref(), SizeRequest::default(), false)
}

/// Grows the image to `size` and the filesystem at `path` with it (a node-local pool).
fn node_expand_to(pool: &Pool, id: impl AsRef<str>, path: Option<&Path>, size: u64) -> Result<u64> {
    let mut volume = pool.volume(&vid(id.as_ref())?)?;
    let path = path.map(|p| pool.node_path("volume path", p)).transpose()?;
    volume.node_expand(path.as_ref(), SizeRequest::at_least(size), true)
}

fn attach_volume(pool: &Pool, id: impl AsRef<str>, read_only: bool) -> Result<PathBuf> {
    pool.volume(&vid(id.as_ref())?)?.attach(read_only)
}

fn detach_volume(pool: &Pool, id: impl AsRef<str>) -> Result<()> {
    pool.volume(&vid(id.as_ref())?)?.detach()
}

fn set_allocation(pool: &Pool, id: impl AsRef<str>, allocation: Allocation) -> Result<VolumeMeta> {
    let mut volume = pool.volume(&vid(id.as_ref())?)?;
    volume.set_allocation(allocation)?;
    Ok(volume.into_meta())
}

fn claim(
    pool: &Pool,
    id: impl AsRef<str>,
    on: &str,
    mode: AccessMode,
    pv: Option<&str>,
) -> Result<()> {
    pool.volume(&vid(id.as_ref())?)?.claim(&node(on), mode, pv)
}

fn release_claim(pool: &Pool, id: impl AsRef<str>, on: &str) -> Result<()> {
    match pool.find_volume(&vid(id.as_ref())?)? {
        Some(mut volume) => volume.release(&node(on)),
        None => Ok(()),
    }
}

fn create_snapshot(pool: &Pool, name: &str, source: impl AsRef<str>) -> Result<SnapshotMeta> {
    pool.create_snapshot(&SnapshotRequest {
        name: name.into(),
        source: vid(source.as_ref())?,
    })
}

fn snapshot_id(id: &str) -> SnapshotId {
    SnapshotId::try_from(id).unwrap()
}

fn create_group_snapshot(pool: &Pool, name: &str, sources: &[&str]) -> Result<GroupSnapshot> {
    let sources: Vec<VolumeId> = sources.iter().map(|s| vid(s).unwrap()).collect();
    pool.create_group_snapshot(name, &sources)
}

fn mount_access(fs: FsType) -> Access {
    Access::Mount {
        fs_type: Some(fs),
        mount_options: vec![],
    }
}

fn gate(fs: FsType) -> bool {
    let mut tools: Vec<&str> = fs_tools(fs.as_str()).to_vec();
    tools.push("blkid");
    require_root(&tools)
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    // Reach the image through the page cache and the loop device.
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// Stage, publish, write, unpublish, unstage, stage again: the data survives, nothing is
/// reformatted, and repeats of each step are no-ops.
fn lifecycle(fs: FsType) {
    if !gate(fs) {
        return;
    }
    let _btrfs = hazard::for_fs(fs.as_str());
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, &format!("vol-{fs}"), Some(fs));
    let staging = s.path("staging");
    let target = s.path("pods/p1/vol");

    let first = stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(first.formatted, Some(fs));
    let again = stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(again.formatted, None, "second stage must not format");
    assert_eq!(again.device, first.device);
    // Direct I/O (no double caching) and a fixed 4 KiB logical block size.
    let sys = Path::new("/sys/block").join(first.device.file_name().unwrap());
    assert_eq!(
        std::fs::read_to_string(sys.join("loop/dio"))
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(sys.join("queue/logical_block_size"))
            .unwrap()
            .trim(),
        "4096"
    );

    publish(
        &pool,
        &id,
        Some(&staging),
        &target,
        &mount_access(fs),
        false,
        None,
    )
    .unwrap();
    publish(
        &pool,
        &id,
        Some(&staging),
        &target,
        &mount_access(fs),
        false,
        None,
    )
    .unwrap();
    write_file(&target.join("data"), b"hello loopvol");
    assert_eq!(volume_at(&pool, &target).as_deref(), Some(id.as_str()));
    let usage = volume_usage(&pool, &id, &target).unwrap();
    assert!(
        usage.total_bytes > 200 * MIB && usage.total_bytes <= SIZE,
        "{usage:?}"
    );
    assert!(usage.inodes.is_some_and(|i| i.total > 0) || fs == FsType::Btrfs);

    // Default nodev,nosuid on the staging mount and the bind.
    for p in [&staging, &target] {
        let opts = mount_opts(p);
        assert!(
            opts.contains("nodev") && opts.contains("nosuid"),
            "{}: {opts}",
            p.display()
        );
    }

    // A second bind stacked on the target (a retried mount): unpublish takes both off, reading
    // the mount table again after each unmount.
    let (code, _, err) = loopvol_e2e::run(
        Command::new("mount")
            .arg("--bind")
            .arg(&staging)
            .arg(&target),
    );
    assert_eq!(code, 0, "{err}");
    unpublish(&pool, &id, &target).unwrap();
    unpublish(&pool, &id, &target).unwrap();
    assert!(!target.exists(), "unpublish removes the target dir");
    unstage(&pool, &id, &staging).unwrap();
    unstage(&pool, &id, &staging).unwrap();
    assert!(mounts_under(&s.root()).is_empty());
    assert!(loops_under(&s.root()).is_empty(), "unstage detaches");
    assert!(get_volume(&pool, &id).unwrap().staged.is_empty());

    let third = stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(
        third.formatted, None,
        "existing filesystem must not be reformatted"
    );
    assert_eq!(
        std::fs::read(staging.join("data")).unwrap(),
        b"hello loopvol"
    );
    unstage(&pool, &id, &staging).unwrap();

    // In use → delete refused; after unstage → gone, and deleting again is fine.
    stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(
        delete_volume(&pool, &id).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    unstage(&pool, &id, &staging).unwrap();
    delete_volume(&pool, &id).unwrap();
    delete_volume(&pool, &id).unwrap();
    assert_eq!(
        get_volume(&pool, &id).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

fn mount_opts(path: &Path) -> String {
    let table = mount::mounts().unwrap();
    let m =
        mount::mount_at(&table, path).unwrap_or_else(|| panic!("{} not mounted", path.display()));
    m.options.join(",")
}

#[test]
fn lifecycle_ext4() {
    lifecycle(FsType::Ext4)
}
#[test]
fn lifecycle_xfs() {
    lifecycle(FsType::Xfs)
}
#[test]
fn lifecycle_btrfs() {
    lifecycle(FsType::Btrfs)
}

#[test]
fn never_formats_a_device_with_content() {
    if !gate(FsType::Xfs) || !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "holds-ext4", None);
    let staging = s.path("staging");
    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    write_file(&staging.join("keep"), b"precious");
    unstage(&pool, &id, &staging).unwrap();
    let err = stage(&pool, &id, &staging, &mount_access(FsType::Xfs), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("already holds a ext4"), "{err}");
    // No fs type asked: the existing one is used.
    stage(
        &pool,
        &id,
        &staging,
        &Access::Mount {
            fs_type: None,
            mount_options: vec![],
        },
        false,
    )
    .unwrap();
    assert_eq!(std::fs::read(staging.join("keep")).unwrap(), b"precious");
    unstage(&pool, &id, &staging).unwrap();

    // A partition table is data too.
    let id2 = create(&pool, "holds-gpt", None);
    let image = image(&pool, &id2);
    let out = Command::new("sfdisk")
        .arg(&image)
        .stdin(std::process::Stdio::piped())
        .spawn();
    if let Ok(mut child) = out {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"label: gpt\n,,L\n")
            .unwrap();
        assert!(child.wait().unwrap().success());
        let err = stage(&pool, &id2, &staging, &mount_access(FsType::Ext4), false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("partition table"), "{err}");
        assert!(mounts_under(&s.root()).is_empty());
    }
}

#[test]
fn read_only_is_really_read_only() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "ro", Some(FsType::Ext4));
    let staging = s.path("staging");
    // Blank and read-only: cannot be formatted, nothing is left behind.
    let err = stage(&pool, &id, &staging, &mount_access(FsType::Ext4), true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    unstage(&pool, &id, &staging).unwrap();

    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    write_file(&staging.join("f"), b"x");
    // A read-only bind of a read-write staging.
    let ro_target = s.path("pods/ro/vol");
    publish(
        &pool,
        &id,
        Some(&staging),
        &ro_target,
        &mount_access(FsType::Ext4),
        true,
        None,
    )
    .unwrap();
    let err = std::fs::write(ro_target.join("g"), b"y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()));
    // Same target asked read-write: a conflicting repeat.
    let err = publish(
        &pool,
        &id,
        Some(&staging),
        &ro_target,
        &mount_access(FsType::Ext4),
        false,
        None,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    unpublish(&pool, &id, &ro_target).unwrap();
    unstage(&pool, &id, &staging).unwrap();

    // Staged read-only: a read-only loop device and a read-only mount.
    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), true).unwrap();
    let dev = &loops_under(&s.root())[0];
    let ro = std::fs::read_to_string(format!(
        "/sys/block/{}/ro",
        dev.file_name().unwrap().to_string_lossy()
    ))
    .unwrap();
    assert_eq!(ro.trim(), "1");
    assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"x");
    assert_eq!(
        std::fs::write(staging.join("g"), b"y")
            .unwrap_err()
            .raw_os_error(),
        Some(libc_erofs())
    );
    // Read-write stage while it is staged read-only is refused.
    let err = stage(
        &pool,
        &id,
        &s.path("staging2"),
        &mount_access(FsType::Ext4),
        false,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        get_volume(&pool, &id).unwrap().staged[0].mode,
        AccessMode::ReadOnly,
        "a refused stage changes no hold"
    );
    unstage(&pool, &id, &staging).unwrap();
    assert!(loops_under(&s.root()).is_empty());
}

fn libc_erofs() -> i32 {
    30 // EROFS
}

#[test]
fn raw_block_volume() {
    if !require_root(&[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "block", None);
    let staging = s.path("staging");
    let target = s.path("pods/p/dev/block");
    let staged = stage(&pool, &id, &staging, &Access::Block, false).unwrap();
    stage(&pool, &id, &staging, &Access::Block, false).unwrap();
    publish(
        &pool,
        &id,
        Some(&staging),
        &target,
        &Access::Block,
        false,
        None,
    )
    .unwrap();
    publish(
        &pool,
        &id,
        Some(&staging),
        &target,
        &Access::Block,
        false,
        None,
    )
    .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.write_all_at(b"raw block bytes", 4096).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(volume_usage(&pool, &id, &target).unwrap().total_bytes, SIZE);
    assert_eq!(volume_at(&pool, &target).as_deref(), Some(id.as_str()));
    // Grow a block volume: the device follows.
    expand_volume(&pool, &id, SIZE + 64 * MIB).unwrap();
    assert_eq!(
        node_expand(&pool, &id, Some(&target)).unwrap(),
        SIZE + 64 * MIB
    );
    assert_eq!(
        loopdev::device_size(&staged.device).unwrap(),
        SIZE + 64 * MIB
    );
    unpublish(&pool, &id, &target).unwrap();
    assert!(!target.exists());
    unstage(&pool, &id, &staging).unwrap();
    let image = std::fs::read(image(&pool, &id)).unwrap();
    assert_eq!(&image[4096..4096 + 15], b"raw block bytes");
    assert!(loops_under(&s.root()).is_empty());
}

/// Snapshot while mounted and being written, restore, clone: contents equal to the source at
/// snapshot time, and the snapshot outlives its source.
fn snapshot_and_clone(fs: FsType) {
    if !gate(fs) {
        return;
    }
    let _btrfs = hazard::for_fs(fs.as_str());
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, &format!("src-{fs}"), Some(fs));
    let staging = s.path("staging");
    stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
    // Written but not synced: the freeze must flush it into the snapshot.
    std::fs::write(staging.join("before"), vec![42u8; 3 << 20]).unwrap();
    let snap = create_snapshot(&pool, "snap-1", &id).unwrap();
    assert_eq!(
        create_snapshot(&pool, "snap-1", &id).unwrap(),
        snap,
        "idempotent by name"
    );
    std::fs::write(staging.join("after"), b"later").unwrap();
    let clone = pool
        .create_volume(&CreateVolume {
            name: "clone".into(),
            size: SizeRequest::at_least(SIZE),
            fs_type: None,
            allocation: None,
            source: Some(VolumeSource::Volume(vid(&id).unwrap())),
        })
        .unwrap();
    assert_eq!(
        clone.fs_type,
        Some(fs),
        "a clone inherits the filesystem type"
    );
    unstage(&pool, &id, &staging).unwrap();
    delete_volume(&pool, &id).unwrap();

    let restored = pool
        .create_volume(&CreateVolume {
            name: "restored".into(),
            size: SizeRequest::at_least(SIZE + 128 * MIB),
            fs_type: Some(fs),
            allocation: None,
            source: Some(VolumeSource::Snapshot(snap.id.clone())),
        })
        .unwrap();
    let r_staging = s.path("r");
    let c_staging = s.path("c");
    // Both copies mounted at once on one node (same filesystem UUID: xfs needs nouuid).
    stage(&pool, &restored.id, &r_staging, &mount_access(fs), false).unwrap();
    stage(&pool, &clone.id, &c_staging, &mount_access(fs), false).unwrap();
    assert_eq!(
        std::fs::read(r_staging.join("before")).unwrap(),
        vec![42u8; 3 << 20]
    );
    assert!(
        !r_staging.join("after").exists(),
        "snapshot holds the state at snapshot time"
    );
    assert_eq!(
        std::fs::read(c_staging.join("before")).unwrap(),
        vec![42u8; 3 << 20]
    );
    assert_eq!(std::fs::read(c_staging.join("after")).unwrap(), b"later");
    // Restored into a bigger volume: the filesystem was grown to fill it (online for xfs/btrfs,
    // offline before the mount for ext4).
    let grown = volume_usage(&pool, &restored.id, &r_staging)
        .unwrap()
        .total_bytes;
    let same = volume_usage(&pool, &clone.id, &c_staging)
        .unwrap()
        .total_bytes;
    assert!(
        grown >= same + 100 * MIB,
        "restored fs is {grown} bytes, the clone's {same}"
    );
    unstage(&pool, &restored.id, &r_staging).unwrap();
    unstage(&pool, &clone.id, &c_staging).unwrap();

    // Smaller than the source: out of range; missing sources: not found.
    let err = pool
        .create_volume(&CreateVolume {
            name: "too-small".into(),
            size: SizeRequest::at_least(SIZE / 2),
            fs_type: None,
            allocation: None,
            source: Some(VolumeSource::Snapshot(snap.id.clone())),
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    for source in [
        VolumeSource::Snapshot(snapshot_id("nope")),
        VolumeSource::Volume(vid("nope").unwrap()),
    ] {
        let err = pool
            .create_volume(&CreateVolume {
                name: "x".into(),
                size: SizeRequest::at_least(SIZE),
                fs_type: None,
                allocation: None,
                source: Some(source),
            })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
    // Same snapshot name, other source.
    let err = create_snapshot(&pool, "snap-1", &clone.id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    pool.delete_snapshot(&snap.id).unwrap();
    pool.delete_snapshot(&snap.id).unwrap();
    assert_eq!(
        pool.get_snapshot(&snap.id).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn snapshot_and_clone_ext4() {
    snapshot_and_clone(FsType::Ext4)
}
#[test]
fn snapshot_and_clone_xfs() {
    snapshot_and_clone(FsType::Xfs)
}
#[test]
fn snapshot_and_clone_btrfs() {
    snapshot_and_clone(FsType::Btrfs)
}

/// Expansion visible inside the mounted filesystem. xfs and btrfs grow online; ext4 online grow
/// needs CAP_SYS_RESOURCE: without it the error says so and the next stage grows it offline.
fn expansion(fs: FsType) {
    if !gate(fs) {
        return;
    }
    let _btrfs = hazard::for_fs(fs.as_str());
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, &format!("grow-{fs}"), Some(fs));
    let staging = s.path("staging");
    let target = s.path("pods/p/vol");
    stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
    publish(
        &pool,
        &id,
        Some(&staging),
        &target,
        &mount_access(fs),
        false,
        None,
    )
    .unwrap();
    write_file(&target.join("data"), b"kept");
    let before = volume_usage(&pool, &id, &target).unwrap().total_bytes;

    let new_size = SIZE + 256 * MIB;
    let expanded = expand_volume(&pool, &id, new_size).unwrap();
    assert_eq!(expanded.size_bytes, new_size);
    assert_eq!(
        expand_volume(&pool, &id, new_size).unwrap().size_bytes,
        new_size,
        "repeat is a no-op"
    );
    assert_eq!(
        expand_volume(&pool, &id, SIZE).unwrap().size_bytes,
        new_size,
        "never shrinks"
    );
    let online = node_expand(&pool, &id, Some(&target));
    if fs == FsType::Ext4 && !test_fs::can_grow_ext4_online() {
        let err = online.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("CAP_SYS_RESOURCE"), "{err}");
        unpublish(&pool, &id, &target).unwrap();
        unstage(&pool, &id, &staging).unwrap();
        stage(&pool, &id, &staging, &mount_access(fs), false).unwrap();
        publish(
            &pool,
            &id,
            Some(&staging),
            &target,
            &mount_access(fs),
            false,
            None,
        )
        .unwrap();
    } else {
        assert_eq!(online.unwrap(), new_size);
        node_expand(&pool, &id, Some(&target)).unwrap();
        // Node-side expansion alone (node-local pools): the image grows too.
        let bigger = new_size + 64 * MIB;
        assert_eq!(
            node_expand_to(&pool, &id, Some(&target), bigger).unwrap(),
            bigger
        );
        assert_eq!(get_volume(&pool, &id).unwrap().size_bytes, bigger);
    }
    let after = volume_usage(&pool, &id, &target).unwrap().total_bytes;
    assert!(after >= before + 200 * MIB, "{fs}: {before} → {after}");
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"kept");
    assert!(get_volume(&pool, &id).unwrap().size_bytes >= new_size);
    unpublish(&pool, &id, &target).unwrap();
    unstage(&pool, &id, &staging).unwrap();
}

#[test]
fn expansion_ext4() {
    expansion(FsType::Ext4)
}
#[test]
fn expansion_xfs() {
    expansion(FsType::Xfs)
}
#[test]
fn expansion_btrfs() {
    expansion(FsType::Btrfs)
}

/// Child side of `two_processes_race_on_one_volume`, run only in the processes it starts
/// (ignored otherwise, so it never counts as a passed test).
#[test]
#[ignore = "helper of two_processes_race_on_one_volume"]
fn race_child() {
    let (Ok(pool_dir), Ok(id), Ok(staging), Ok(target)) = (
        std::env::var("LOOPVOL_RACE_POOL"),
        std::env::var("LOOPVOL_RACE_ID"),
        std::env::var("LOOPVOL_RACE_STAGING"),
        std::env::var("LOOPVOL_RACE_TARGET"),
    ) else {
        return; // not a child: nothing to do
    };
    let pool = Pool::open(pool_dir, options("node-a")).unwrap();
    let staged = stage(
        &pool,
        &id,
        Path::new(&staging),
        &mount_access(FsType::Ext4),
        false,
    )
    .unwrap();
    publish(
        &pool,
        &id,
        Some(Path::new(&staging)),
        Path::new(&target),
        &mount_access(FsType::Ext4),
        false,
        None,
    )
    .unwrap();
    println!("RACE-RESULT formatted={}", staged.formatted.is_some());
}

#[test]
fn two_processes_race_on_one_volume() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "raced", Some(FsType::Ext4));
    let staging = s.path("staging");
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "race_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("LOOPVOL_RACE_POOL", s.pool())
                .env("LOOPVOL_RACE_ID", &id)
                .env("LOOPVOL_RACE_STAGING", &staging)
                .env("LOOPVOL_RACE_TARGET", s.path(&format!("pods/p{i}/vol")))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "child failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    let formats = outputs
        .iter()
        .filter(|o| o.contains("RACE-RESULT formatted=true"))
        .count();
    let done = outputs.iter().filter(|o| o.contains("RACE-RESULT")).count();
    assert_eq!(done, 2, "{outputs:?}");
    assert_eq!(formats, 1, "exactly one process formats: {outputs:?}");
    assert_eq!(
        loops_under(&s.root()).len(),
        1,
        "one loop device for the volume"
    );
    let table = mount::mounts().unwrap();
    assert_eq!(
        table.iter().filter(|m| m.mount_point == staging).count(),
        1,
        "one staging mount"
    );
    for i in 0..2 {
        unpublish(&pool, &id, &s.path(&format!("pods/p{i}/vol"))).unwrap();
    }
    unstage(&pool, &id, &staging).unwrap();
}

#[test]
fn threads_race_on_create_and_stage() {
    if !gate(FsType::Xfs) {
        return;
    }
    let s = Scratch::new();
    let pool = std::sync::Arc::new(open(&s));
    let staging = s.path("staging");
    let results: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            let staging = staging.clone();
            std::thread::spawn(move || {
                let m = pool
                    .create_volume(&CreateVolume {
                        name: "same".into(),
                        size: SizeRequest::at_least(SIZE),
                        fs_type: Some(FsType::Xfs),
                        allocation: None,
                        source: None,
                    })
                    .unwrap();
                stage(&pool, &m.id, &staging, &mount_access(FsType::Xfs), false).unwrap();
                m
            })
        })
        .map(|h| h.join().unwrap())
        .collect();
    assert!(
        results
            .windows(2)
            .all(|w| w[0].id == w[1].id && w[0].created_unix == w[1].created_unix),
        "one volume for one name"
    );
    assert_eq!(pool.list_volumes(None, 0).unwrap().entries.len(), 1);
    assert_eq!(loops_under(&s.root()).len(), 1);
    unstage(&pool, &results[0].id, &staging).unwrap();
}

/// A call interrupted between steps, then repeated, finishes the job.
#[test]
fn crash_between_steps_then_repeat() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "crashy", Some(FsType::Ext4));
    let staging = s.path("staging");

    // Stage crashed after attach + format, before the mount.
    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    write_file(&staging.join("f"), b"survives");
    mount::unmount(&staging).unwrap();
    assert_eq!(loops_under(&s.root()).len(), 1);
    let again = stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    assert_eq!(again.formatted, None);
    assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"survives");
    assert_eq!(
        loops_under(&s.root()).len(),
        1,
        "the attached device is reused"
    );

    // Unstage crashed after the unmount, before the detach.
    mount::unmount(&staging).unwrap();
    unstage(&pool, &id, &staging).unwrap();
    assert!(loops_under(&s.root()).is_empty());

    // Create crashed after writing the image, before committing metadata.
    let vol_dir = s.pool().join("volumes").join("half-made");
    std::fs::create_dir_all(&vol_dir).unwrap();
    std::fs::write(vol_dir.join("image.tmp"), b"junk").unwrap();
    assert_eq!(
        get_volume(&pool, "half-made").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(pool
        .list_volumes(None, 0)
        .unwrap()
        .entries
        .iter()
        .all(|v| v.id.as_str() != "half-made"));
    let m = pool
        .create_volume(&CreateVolume::blank("half-made", SIZE))
        .unwrap();
    assert_eq!(std::fs::metadata(image(&pool, &m.id)).unwrap().len(), SIZE);
    assert!(!vol_dir.join("image.tmp").exists());

    // Snapshot crashed midway through the copy.
    let snap_dir = s.pool().join("snapshots").join("snap-crash");
    std::fs::create_dir_all(&snap_dir).unwrap();
    std::fs::write(snap_dir.join("image.tmp"), b"partial").unwrap();
    let snap = create_snapshot(&pool, "snap-crash", &id).unwrap();
    assert_eq!(
        std::fs::metadata(snap_dir.join("image")).unwrap().len(),
        SIZE
    );
    assert!(!snap_dir.join("image.tmp").exists());
    assert_eq!(snap.source_volume_id.as_str(), id);

    // Delete crashed after the move to trash: the next open empties it.
    std::fs::create_dir_all(s.pool().join("trash/left-over/x")).unwrap();
    drop(pool);
    let pool = open(&s);
    assert_eq!(
        std::fs::read_dir(s.pool().join("trash")).unwrap().count(),
        0
    );
    get_volume(&pool, &id).unwrap();
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "good", Some(FsType::Ext4));
    let snapshot_of_pool = || {
        let mut names: Vec<String> = walk(&s.pool());
        names.sort();
        names
    };
    let before = snapshot_of_pool();
    let staging = s.path("staging");
    let target = s.path("pods/p/vol");

    for bad_id in ["../good", "a/b", "..", "x\0y", &"a".repeat(129), ""] {
        assert_eq!(
            get_volume(&pool, bad_id).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad_id:?}"
        );
        assert_eq!(
            delete_volume(&pool, bad_id).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            stage(&pool, bad_id, &staging, &mount_access(FsType::Ext4), false)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            create_snapshot(&pool, "s", bad_id).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
    // No size fits a limit under one block.
    let err = pool
        .create_volume(&CreateVolume {
            name: "zero".into(),
            size: SizeRequest::new(0, 100).unwrap(),
            fs_type: None,
            allocation: None,
            source: None,
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    let err = pool
        .create_volume(&CreateVolume::blank("huge", 1 << 60))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    let err = pool
        .create_volume(&CreateVolume::blank("good", SIZE * 2))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    for opt in ["bind", "device=/dev/sda", "x;y", "remount"] {
        let access = Access::Mount {
            fs_type: Some(FsType::Ext4),
            mount_options: vec![opt.into()],
        };
        assert_eq!(
            stage(&pool, &id, &staging, &access, false)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument,
            "{opt}"
        );
    }
    for path in ["relative", "/etc/x", "/", "/proc/self", "/tmp/../etc"] {
        let err = stage(
            &pool,
            &id,
            Path::new(path),
            &mount_access(FsType::Ext4),
            false,
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{path}");
        let err = publish(
            &pool,
            &id,
            Some(&staging),
            Path::new(path),
            &mount_access(FsType::Ext4),
            false,
            None,
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{path}");
    }
    assert!("ntfs".parse::<FsType>().is_err());
    assert_eq!(
        expand_volume(&pool, &id, 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        expand_volume(&pool, "missing", SIZE).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        unstage(&pool, "missing", &staging).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        pool.list_volumes(Some("forged"), 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Confined to prefixes: a path elsewhere is refused.
    let mut opts = options("node-a");
    opts.path_prefixes = vec![s.path("kubelet")];
    let confined = Pool::open(s.pool(), opts).unwrap();
    let err = stage(&confined, &id, &staging, &mount_access(FsType::Ext4), false).unwrap_err();
    assert!(err.to_string().contains("outside the allowed"), "{err}");
    let err = publish(
        &confined,
        &id,
        None,
        &target,
        &mount_access(FsType::Ext4),
        false,
        None,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    assert_eq!(snapshot_of_pool(), before, "the pool is unchanged");
    assert!(mounts_under(&s.root()).is_empty());
    assert!(loops_under(&s.root()).is_empty());
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.to_string_lossy().contains("/locks/") {
            continue; // lock files are created on demand and hold nothing
        }
        out.push(format!(
            "{} {}",
            p.display(),
            e.metadata().map(|m| m.len()).unwrap_or(0)
        ));
        if p.is_dir() && !p.ends_with("locks") {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn health_reports_missing_image_and_fs_errors() {
    if !gate(FsType::Ext4) || !require_root(&["debugfs"]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "healthy", Some(FsType::Ext4));
    let staging = s.path("staging");
    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    assert!(!volume_condition(&pool, &id).unwrap().abnormal);
    unstage(&pool, &id, &staging).unwrap();
    // Record an error in the superblock the way the kernel does (state "errors").
    let image = image(&pool, &id);
    let (code, _, err) = loopvol_e2e::run(
        Command::new("debugfs")
            .args(["-w", "-R", "ssv state 2"])
            .arg(&image),
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = loopvol_e2e::run(
        Command::new("debugfs")
            .args(["-w", "-R", "ssv error_count 3"])
            .arg(&image),
    );
    assert_eq!(code, 0, "{err}");
    stage(
        &pool,
        &id,
        &staging,
        &Access::Mount {
            fs_type: None,
            mount_options: vec!["errors=continue".into()],
        },
        false,
    )
    .unwrap();
    let cond = volume_condition(&pool, &id).unwrap();
    assert!(cond.abnormal && cond.message.contains("errors"), "{cond:?}");
    unstage(&pool, &id, &staging).unwrap();

    std::fs::remove_file(&image).unwrap();
    let cond = volume_condition(&pool, &id).unwrap();
    assert!(
        cond.abnormal && cond.message.contains("missing"),
        "{cond:?}"
    );
    let err = stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn capacity_listing_and_allocation() {
    if !require_root(&[]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let cap0 = pool.capacity().unwrap();
    assert!(cap0.free_bytes > SIZE);
    for i in 0..5 {
        create(&pool, &format!("v{i}"), None);
    }
    let cap1 = pool.capacity().unwrap();
    assert_eq!(
        cap1.thin_unallocated_bytes,
        5 * SIZE,
        "thin volumes claim their whole size"
    );
    assert!(cap1.available_bytes <= cap1.free_bytes - 5 * SIZE + 16 * MIB);

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = pool.list_volumes(token.as_deref(), 2).unwrap();
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.into_iter().map(|v| v.id.to_string()));
        match page.next_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, ["v0", "v1", "v2", "v3", "v4"]);

    // Thin → thick: every block allocated, and the capacity no longer counts it as promised.
    let m = set_allocation(&pool, "v0", Allocation::Thick).unwrap();
    assert_eq!(m.allocation, Allocation::Thick);
    let blocks = std::fs::metadata(image(&pool, "v0")).unwrap().blocks() * 512;
    assert!(blocks >= SIZE, "allocated {blocks}");
    assert_eq!(pool.capacity().unwrap().thin_unallocated_bytes, 4 * SIZE);
    assert_eq!(set_allocation(&pool, "v0", Allocation::Thick).unwrap(), m);

    // Snapshots list in order, filtered by source, with paging.
    create_snapshot(&pool, "s-a", "v1").unwrap();
    create_snapshot(&pool, "s-b", "v2").unwrap();
    create_snapshot(&pool, "s-c", "v1").unwrap();
    let of_v1: Vec<String> = pool
        .list_snapshots(Some(&vid("v1").unwrap()), None, 0)
        .unwrap()
        .entries
        .into_iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(of_v1, ["s-a", "s-c"]);
    let p = pool.list_snapshots(None, None, 2).unwrap();
    assert_eq!(p.entries.len(), 2);
    let rest = pool
        .list_snapshots(None, p.next_token.as_deref(), 2)
        .unwrap();
    assert_eq!(
        rest.entries
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        ["s-c"]
    );

    // Group snapshot: one per member, all tagged with the group.
    let group = create_group_snapshot(&pool, "grp", &["v3", "v4"]).unwrap();
    assert_eq!(group.members.len(), 2);
    assert_eq!(pool.get_group_snapshot(&group.id, &[]).unwrap(), group);
    let again = create_group_snapshot(&pool, "grp", &["v4", "v3"]).unwrap();
    assert_eq!(again, group);

    // Overcommit lets thin volumes promise more than is free.
    let mut opts = options("node-a");
    opts.overcommit = 4.0;
    let over = Pool::open(s.pool(), opts).unwrap();
    assert!(over.capacity().unwrap().available_bytes > cap1.available_bytes);
}

#[test]
fn shared_pool_keeps_a_writer_on_one_node() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let on = |node: &str| {
        let mut o = options(node);
        o.shared = true;
        Pool::open(s.pool(), o).unwrap()
    };
    let (a, b) = (on("node-a"), on("node-b"));
    let id = create(&a, "shared", Some(FsType::Ext4));
    assert_eq!(
        get_volume(&a, &id).unwrap().node,
        None,
        "no node topology on a shared pool"
    );

    // Controller claims.
    claim(
        &a,
        &id,
        "node-a",
        AccessMode::SingleNodeWriter,
        Some("pv-1"),
    )
    .unwrap();
    claim(
        &a,
        &id,
        "node-a",
        AccessMode::SingleNodeWriter,
        Some("pv-1"),
    )
    .unwrap();
    let err = claim(
        &b,
        &id,
        "node-b",
        AccessMode::SingleNodeWriter,
        Some("pv-1"),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("node-a"), "{err}");
    assert_eq!(
        claim(&a, &id, "node-a", AccessMode::ReadOnly, None)
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        a.find_claim_by_pv("pv-1", &node("node-a")).unwrap(),
        Some(vid(&id).unwrap())
    );
    release_claim(&a, &id, "node-a").unwrap();
    release_claim(&a, &id, "node-a").unwrap();
    claim(&b, &id, "node-b", AccessMode::ReadOnly, None).unwrap();
    claim(&a, &id, "node-a", AccessMode::ReadOnly, None).unwrap();
    release_claim(&a, &id, "node-a").unwrap();
    release_claim(&b, &id, "node-b").unwrap();

    // A shared pool stages only what the controller claimed for the node.
    let sa = s.path("a/staging");
    let sb = s.path("b/staging");
    let err = stage(&a, &id, &sa, &mount_access(FsType::Ext4), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.to_string().contains("not published to node node-a"),
        "{err}"
    );
    assert!(!sa.exists(), "the refused stage made its path");

    // Staging holds: node-a's read-write stage keeps node-b out until node-a unstages, even
    // once the controller released node-a's claim (a force-detach proves nothing).
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter, None).unwrap();
    stage(&a, &id, &sa, &mount_access(FsType::Ext4), false).unwrap();
    let err = stage(&b, &id, &sb, &mount_access(FsType::Ext4), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.to_string().contains("read-write on node node-a"),
        "{err}"
    );
    let err = stage(&b, &id, &sb, &mount_access(FsType::Ext4), true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    release_claim(&a, &id, "node-a").unwrap();
    let err = claim(&b, &id, "node-b", AccessMode::SingleNodeWriter, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let msg = err.to_string();
    assert!(
        msg.contains("still staged read-write on node node-a")
            && msg.contains("loopvol fence node-a"),
        "{msg}"
    );
    unstage(&a, &id, &sa).unwrap();
    claim(&b, &id, "node-b", AccessMode::SingleNodeWriter, None).unwrap();
    stage(&b, &id, &sb, &mount_access(FsType::Ext4), false).unwrap();
    unstage(&b, &id, &sb).unwrap();
    release_claim(&b, &id, "node-b").unwrap();

    // A claim alone (published to node-a, not yet staged there) keeps node-b out too.
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter, None).unwrap();
    let err = stage(&b, &id, &sb, &mount_access(FsType::Ext4), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("not published to node node-b (it is published to node node-a read-write)"),
        "{err}"
    );
    release_claim(&a, &id, "node-a").unwrap();

    // A read-only claim makes a read-only stage, whatever the stage asks.
    claim(&a, &id, "node-a", AccessMode::ReadOnly, None).unwrap();
    stage(&a, &id, &sa, &mount_access(FsType::Ext4), false).unwrap();
    let table = mount::mounts().unwrap();
    assert!(
        mount::mount_at(&table, &sa).is_some_and(|m| m.read_only()),
        "a read-only claim staged read-write"
    );
    unstage(&a, &id, &sa).unwrap();
    release_claim(&a, &id, "node-a").unwrap();

    // node-a dies with the volume staged (its hold stays in the metadata): the controller's
    // release is not enough; an operator's fence (the node is down) frees it for node-b.
    claim(&a, &id, "node-a", AccessMode::SingleNodeWriter, None).unwrap();
    stage(&a, &id, &sa, &mount_access(FsType::Ext4), false).unwrap();
    release_claim(&b, &id, "node-a").unwrap();
    assert!(claim(&b, &id, "node-b", AccessMode::SingleNodeWriter, None).is_err());
    let report = b
        .fence_node(&node("node-a"), loopvol::FenceCheck::Force)
        .unwrap();
    assert_eq!(report.released, [vid(&id).unwrap()]);
    claim(&b, &id, "node-b", AccessMode::SingleNodeWriter, None).unwrap();
    // On one test machine node-a's mount and loop device are still here; a dead node's are not.
    s.cleanup_kernel_state();
    stage(&b, &id, &sb, &mount_access(FsType::Ext4), false).unwrap();
    unstage(&b, &id, &sb).unwrap();
    release_claim(&b, &id, "node-b").unwrap();
    let left = get_volume(&a, &id).unwrap().staged;
    assert!(
        left.len() == 1
            && left[0].node == node("node-a")
            && left[0].fenced.as_ref().map(|f| f.by) == Some(loopvol::FencedBy::Operator),
        "node-a's hold, fenced by the operator: {left:?}"
    );
    // A node declared down keeps no volume from being deleted.
    delete_volume(&a, &id).unwrap();

    // Node-local pools refuse other nodes outright.
    let local = open(&s);
    let lid = create(&local, "local-only", None);
    let other = Pool::open(s.pool(), options("node-z")).unwrap();
    let err = stage(&other, &lid, &sb, &mount_access(FsType::Ext4), false).unwrap_err();
    assert!(err.to_string().contains("node-a"), "{err}");
}

/// On a pool whose filesystem has reflinks (xfs here) a snapshot shares the source's extents:
/// it costs no space and its content is the source's.
#[test]
fn snapshots_reflink_on_a_reflink_pool() {
    if !gate(FsType::Xfs) || !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    // The pool's own filesystem: xfs with reflinks, on a loop device.
    let pool_dir = s.small_pool("xfs", 1024);
    let pool = Pool::open(&pool_dir, options("node-a")).unwrap();
    let id = create(&pool, "big", Some(FsType::Ext4));
    let staging = s.path("staging");
    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    let data: Vec<u8> = (0..(64u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    write_file(&staging.join("data"), &data);
    let free_before = pool.capacity().unwrap().free_bytes;
    let snap = create_snapshot(&pool, "snap", &id).unwrap();
    let free_after = pool.capacity().unwrap().free_bytes;
    assert!(
        free_before - free_after < 8 * MIB,
        "a reflinked snapshot took {} bytes",
        free_before - free_after
    );
    unstage(&pool, &id, &staging).unwrap();
    delete_volume(&pool, &id).unwrap();

    let restored = pool
        .create_volume(&CreateVolume {
            name: "restored".into(),
            size: SizeRequest::at_least(SIZE),
            fs_type: None,
            allocation: None,
            source: Some(VolumeSource::Snapshot(snap.id)),
        })
        .unwrap();
    stage(
        &pool,
        &restored.id,
        &staging,
        &mount_access(FsType::Ext4),
        false,
    )
    .unwrap();
    assert!(
        std::fs::read(staging.join("data")).unwrap() == data,
        "restored content differs"
    );
    unstage(&pool, &restored.id, &staging).unwrap();
}

/// Many volumes attached at once from many threads: the free-device race is retried, every
/// volume gets its own device, and nothing is left attached afterwards.
#[test]
fn concurrent_attaches_get_distinct_devices() {
    if !require_root(&[]) {
        return;
    }
    let s = Scratch::new();
    let pool = std::sync::Arc::new(open(&s));
    let ids: Vec<String> = (0..8)
        .map(|i| create(&pool, &format!("par-{i}"), None))
        .collect();
    let devices: Vec<std::path::PathBuf> = ids
        .iter()
        .map(|id| {
            let (pool, id) = (pool.clone(), id.clone());
            std::thread::spawn(move || attach_volume(&pool, &id, false).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut unique = devices.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 8, "{devices:?}");
    // The driver's listing of loop devices (sysfs' device directories) finds each, bound to its
    // image, read-write, as `/sys/block` shows them.
    let listed = loopdev::list().unwrap();
    for (id, dev) in ids.iter().zip(&devices) {
        let name = dev.file_name().unwrap().to_str().unwrap();
        let via_block =
            std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/backing_file"))
                .unwrap();
        let found = listed
            .iter()
            .find(|d| d.path() == *dev)
            .unwrap_or_else(|| panic!("{} not listed", dev.display()));
        assert_eq!(found.backing_file, image(&pool, id));
        assert_eq!(found.backing_file, Path::new(via_block.trim_end()));
        assert!(!found.read_only && !found.cut_off, "{found:?}");
    }
    for (id, dev) in ids.iter().zip(&devices) {
        assert_eq!(
            attach_volume(&pool, id, false).unwrap(),
            *dev,
            "attach is idempotent"
        );
        detach_volume(&pool, id).unwrap();
        detach_volume(&pool, id).unwrap();
    }
    assert!(loops_under(&s.root()).is_empty());

    // A thick volume is fully allocated from the start.
    let thick = pool
        .create_volume(&CreateVolume {
            name: "thick".into(),
            size: SizeRequest::at_least(64 * MIB),
            fs_type: None,
            allocation: Some(Allocation::Thick),
            source: None,
        })
        .unwrap();
    let allocated = std::fs::metadata(image(&pool, &thick.id)).unwrap().blocks() * 512;
    assert!(allocated >= 64 * MIB, "thick volume allocated {allocated}");
}

/// A filesystem the kernel shut down (xfs after I/O errors) makes the volume abnormal, and the
/// volume can still be unstaged.
#[test]
fn health_reports_a_shut_down_filesystem() {
    if !gate(FsType::Xfs) || !require_root(&["xfs_io"]) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "doomed", Some(FsType::Xfs));
    let staging = s.path("staging");
    stage(&pool, &id, &staging, &mount_access(FsType::Xfs), false).unwrap();
    assert!(!volume_condition(&pool, &id).unwrap().abnormal);
    let (code, _, err) = loopvol_e2e::run(
        Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&staging),
    );
    assert_eq!(code, 0, "{err}");
    let cond = volume_condition(&pool, &id).unwrap();
    assert!(
        cond.abnormal && cond.message.contains("shut down"),
        "{cond:?}"
    );
    unstage(&pool, &id, &staging).unwrap();
    assert!(loops_under(&s.root()).is_empty());
}

/// A crash in the middle of mkfs leaves a partial filesystem. The metadata's record of the
/// format in progress makes the next stage format again; without that record the same bytes are
/// someone's data and are never formatted over.
#[test]
fn an_interrupted_format_is_finished_and_only_then() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let staging = s.path("staging");
    // What a killed mkfs.ext4 leaves: a superblock (blkid says ext4) over broken metadata.
    let half_format = |id: &str| {
        let image = image(&pool, id);
        let (code, _, err) = loopvol_e2e::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .arg(&image),
        );
        assert_eq!(code, 0, "{err}");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xA5; 4 << 20], 4096).unwrap();
    };
    let meta_path = |id: &str| s.pool().join("volumes").join(id).join("volume.json");

    // Interrupted by us: the record says so, and the next stage finishes the job.
    let id = create(&pool, "interrupted", Some(FsType::Ext4));
    half_format(&id);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta_path(&id)).unwrap()).unwrap();
    m["formatting"] = "ext4".into();
    std::fs::write(meta_path(&id), m.to_string()).unwrap();
    let staged = stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    assert_eq!(staged.formatted, Some(FsType::Ext4));
    write_file(&staging.join("f"), b"usable");
    assert_eq!(
        get_volume(&pool, &id).unwrap().formatting,
        None,
        "the record is cleared"
    );
    unstage(&pool, &id, &staging).unwrap();

    // The same bytes without the record: not ours to format.
    let id = create(&pool, "someone-elses", Some(FsType::Ext4));
    half_format(&id);
    let err = stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap_err();
    assert!(!err.to_string().contains("formatted"), "{err}");
    let first = std::fs::read(image(&pool, &id)).unwrap()[4096..4096 + 16].to_vec();
    assert_eq!(first, vec![0xA5; 16], "nothing was written over the volume");
    unstage(&pool, &id, &staging).unwrap();
}

/// A stage that attaches a volume whose image holds no data formats it without asking blkid (the
/// device reads as zeros). A device attached before the stage is another matter: its page cache
/// may hold what the image does not yet (a filesystem written through it, not yet written back),
/// so it is probed, and what is there is used, never formatted over.
#[test]
fn a_device_attached_before_the_stage_is_probed_not_presumed_blank() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let staging = s.path("staging");
    let id = create(&pool, "written-through-the-cache", Some(FsType::Ext4));
    let device = attach_volume(&pool, &id, false).unwrap();
    // A filesystem of the device's size, made in a file, copied onto the device through the page
    // cache (no O_DIRECT, no fsync, and the device kept open: its last close would write the
    // cache back): the image itself still holds nothing.
    let made = s.path("made.img");
    std::fs::File::create(&made).unwrap().set_len(SIZE).unwrap();
    let (code, _, err) = loopvol_e2e::run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-U",
                "0d5e1a7e-0000-4000-8000-00000000c0de",
            ])
            .arg(&made),
    );
    assert_eq!(code, 0, "{err}");
    let fs_bytes = std::fs::read(&made).unwrap();
    let used: Vec<(usize, &[u8])> = fs_bytes
        .chunks(64 << 10)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, c)| (i * (64 << 10), c))
        .collect();
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap();
    for (at, chunk) in &used {
        std::os::unix::fs::FileExt::write_all_at(&dev, chunk, *at as u64).unwrap();
    }

    let staged = stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    drop(dev);
    assert_eq!(staged.formatted, None, "the filesystem was formatted over");
    let uuid = loopvol_e2e::run(
        Command::new("blkid")
            .args(["-p", "-s", "UUID", "-o", "value"])
            .arg(&device),
    )
    .1;
    assert_eq!(uuid.trim(), "0d5e1a7e-0000-4000-8000-00000000c0de");
    unstage(&pool, &id, &staging).unwrap();
    assert!(loops_under(&s.root()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Policy decided once, in the backend, for both front ends
// ---------------------------------------------------------------------------------------------

/// Sizes resolve the same way whoever asks: whole 4 KiB blocks, each filesystem's minimum, 1 GiB
/// by default. (FlexVolume's `size: "1000"` used to make a 1000-byte image; an xfs volume under
/// 300 MiB used to fail late, in mkfs.)
#[test]
fn sizes_are_resolved_by_the_backend() {
    let s = Scratch::new();
    let pool = open(&s);
    // (name, request, fs) → size
    let table: &[(&str, SizeRequest, Option<FsType>, u64)] = &[
        ("tiny", SizeRequest::at_least(1000), None, 4096),
        (
            "odd",
            SizeRequest::at_least(5 * MIB + 1),
            Some(FsType::Ext4),
            5 * MIB + 4096,
        ),
        (
            "small-xfs",
            SizeRequest::at_least(64 * MIB),
            Some(FsType::Xfs),
            300 * MIB,
        ),
        (
            "small-btrfs",
            SizeRequest::at_least(MIB),
            Some(FsType::Btrfs),
            128 * MIB,
        ),
        ("default", SizeRequest::default(), None, 1 << 30),
    ];
    for (name, size, fs, want) in table {
        let m = pool
            .create_volume(&CreateVolume {
                name: (*name).into(),
                size: *size,
                fs_type: *fs,
                allocation: None,
                source: None,
            })
            .unwrap();
        assert_eq!(m.size_bytes, *want, "{name}");
        assert_eq!(
            std::fs::metadata(image(&pool, name)).unwrap().len(),
            *want,
            "{name}"
        );
    }
    // Open-or-create (FlexVolume) takes an existing volume as it is, whatever the request says.
    let again = pool
        .open_or_create_volume(&request("tiny", 10 * MIB, Some(FsType::Xfs)))
        .unwrap();
    assert_eq!(again.meta().size_bytes, 4096);
    assert_eq!(again.meta().fs_type, None);
    drop(again);
    // Get-or-create (CSI) returns it only when the request admits it.
    assert_eq!(
        pool.create_volume(&request("tiny", 10 * MIB, None))
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
    pool.create_volume(&request("tiny", 4096, None)).unwrap();
}

/// No filesystem is recorded at create unless one is asked for; the first format fixes it (the
/// stage's request, else ext4) and records it, for both front ends alike.
#[test]
fn the_default_filesystem_is_fixed_at_the_first_format() {
    if !gate(FsType::Ext4) || !gate(FsType::Xfs) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let any = Access::Mount {
        fs_type: None,
        mount_options: vec![],
    };
    // (volume, fs asked at stage) → fs formatted and recorded
    for (name, asked, want) in [
        ("plain", None, FsType::Ext4),
        ("asked-xfs", Some(FsType::Xfs), FsType::Xfs),
    ] {
        let id = create(&pool, name, None);
        assert_eq!(get_volume(&pool, &id).unwrap().fs_type, None, "{name}");
        let staging = s.path(&format!("staging-{name}"));
        let access = match asked {
            Some(fs) => mount_access(fs),
            None => any.clone(),
        };
        let staged = stage(&pool, &id, &staging, &access, false).unwrap();
        assert_eq!(staged.formatted, Some(want), "{name}");
        assert_eq!(
            get_volume(&pool, &id).unwrap().fs_type,
            Some(want),
            "{name}"
        );
        unstage(&pool, &id, &staging).unwrap();
        // Recorded: a later stage without a request mounts the same filesystem.
        stage(&pool, &id, &staging, &any, false).unwrap();
        assert_eq!(
            mount::mounts()
                .unwrap()
                .iter()
                .rev()
                .find(|m| m.mount_point == staging)
                .unwrap()
                .fs_type,
            want.as_str()
        );
        unstage(&pool, &id, &staging).unwrap();
    }
}

/// One workload at a time (CSI's SINGLE_NODE_SINGLE_WRITER) is enforced under the volume's
/// lock, so it holds between processes too: of two racing exclusive publications at different
/// targets, exactly one wins.
#[test]
fn exclusive_publication_is_enforced_under_the_lock() {
    if !gate(FsType::Ext4) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "rwop", Some(FsType::Ext4));
    let staging = s.path("staging");
    stage(&pool, &id, &staging, &mount_access(FsType::Ext4), false).unwrap();
    let exclusive = |pool: &Pool, target: &Path| {
        let request = Publish {
            staging: Some(pool.node_path("staging path", &staging).unwrap()),
            target: pool.node_path("target path", target).unwrap(),
            access: mount_access(FsType::Ext4),
            read_only: false,
            fs_group: None,
            exclusive: true,
        };
        pool.volume(&vid(&id).unwrap())?.publish(&request)
    };
    let (t1, t2) = (s.path("pods/p1/vol"), s.path("pods/p2/vol"));
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let racers: Vec<_> = [&t1, &t2]
            .into_iter()
            .map(|target| {
                let pool = open(&s); // its own lock file descriptions, as another process
                let exclusive = &exclusive;
                scope.spawn(move || exclusive(&pool, target))
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let won: Vec<&PathBuf> = [&t1, &t2]
        .into_iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| t)
        .collect();
    assert_eq!(won.len(), 1, "{results:?}");
    let (winner, loser) = if won[0] == &t1 {
        (&t1, &t2)
    } else {
        (&t2, &t1)
    };
    let err = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("one workload at a time"), "{err}");
    assert!(mount::mount_at(&mount::mounts().unwrap(), loser).is_none());
    // A repeat at the winner's target is fine; the loser gets it once the winner is gone.
    exclusive(&pool, winner).unwrap();
    unpublish(&pool, &id, winner).unwrap();
    exclusive(&pool, loser).unwrap();
    unpublish(&pool, &id, loser).unwrap();
    unstage(&pool, &id, &staging).unwrap();
}

/// Deleting a group snapshot is one backend call: the members named by the caller are checked
/// before anything is deleted, then every member goes; an unknown group is already deleted.
#[test]
fn group_snapshots_are_deleted_whole() {
    let s = Scratch::new();
    let pool = open(&s);
    for v in ["g1", "g2"] {
        create(&pool, v, None);
    }
    let group = create_group_snapshot(&pool, "grp", &["g1", "g2"]).unwrap();
    let members: Vec<SnapshotId> = group.members.iter().map(|m| m.id.clone()).collect();
    let wrong = [members[0].clone()];
    for result in [
        pool.get_group_snapshot(&group.id, &wrong).map(drop),
        pool.delete_group_snapshot(&group.id, &wrong),
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }
    assert_eq!(pool.list_snapshots(None, None, 0).unwrap().entries.len(), 2);
    pool.get_group_snapshot(&group.id, &members).unwrap();
    pool.delete_group_snapshot(&group.id, &members).unwrap();
    assert!(pool
        .list_snapshots(None, None, 0)
        .unwrap()
        .entries
        .is_empty());
    pool.delete_group_snapshot(&group.id, &members).unwrap();
    assert_eq!(
        pool.get_group_snapshot(&group.id, &[]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

/// Unpublishing from every node (CSI ControllerUnpublish without a node) is one call on the
/// volume's handle: every claim goes (staging holds stay until their nodes unstage).
#[test]
fn release_all_drops_every_claim() {
    let s = Scratch::new();
    let mut o = options("node-a");
    o.shared = true;
    let pool = Pool::open(s.pool(), o).unwrap();
    let id = create(&pool, "shared", None);
    for n in ["node-a", "node-b"] {
        claim(&pool, &id, n, AccessMode::ReadOnly, None).unwrap();
    }
    assert_eq!(
        claim(&pool, &id, "node-c", AccessMode::SingleNodeWriter, None)
            .unwrap_err()
            .kind(),
        ErrorKind::FailedPrecondition
    );
    let mut volume = pool.volume(&vid(&id).unwrap()).unwrap();
    volume.release_all().unwrap();
    volume.release_all().unwrap();
    assert!(volume.meta().claims.is_empty());
    drop(volume);
    assert!(get_volume(&pool, &id).unwrap().claims.is_empty());
    claim(&pool, &id, "node-c", AccessMode::SingleNodeWriter, None).unwrap();
}

/// An ID read from metadata is validated like one from a caller: a `volume.json` that names
/// `../../x`, or another volume, is corrupt, named as such, and never followed.
#[test]
fn metadata_naming_an_invalid_id_is_corrupt() {
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, "victim", None);
    let meta_path = s.pool().join("volumes/victim/volume.json");
    let good = std::fs::read_to_string(&meta_path).unwrap();
    for (replacement, why) in [
        ("../../x", "invalid volume ID"),
        ("other", "records volume other"),
    ] {
        std::fs::write(
            &meta_path,
            good.replace("\"id\": \"victim\"", &format!("\"id\": \"{replacement}\"")),
        )
        .unwrap();
        // A listing shows it as a bad entry, naming the file, and fails no more than that.
        let listed = pool.list_volume_entries(None, 0).unwrap().entries;
        let [Err(bad)] = &listed[..] else {
            panic!("{listed:?}")
        };
        assert_eq!(bad.id, id);
        assert!(pool.list_volumes(None, 0).unwrap().entries.is_empty());
        for msg in [
            get_volume(&pool, &id).unwrap_err().to_string(),
            pool.volume(&vid(&id).unwrap()).unwrap_err().to_string(),
            bad.reason.clone(),
        ] {
            assert!(
                msg.contains("corrupt metadata")
                    && msg.contains("volume.json")
                    && msg.contains(why),
                "{msg}"
            );
        }
    }
    std::fs::write(&meta_path, good).unwrap();
    get_volume(&pool, &id).unwrap();
}
