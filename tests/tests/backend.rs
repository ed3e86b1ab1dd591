//! The backend on a real kernel: real images, loop devices, mkfs and mounts, for ext4, xfs and
//! btrfs. Run as root; each test makes its own pool and cleans up only what it made.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use loopvol::{
    Access, AccessMode, Allocation, CreateVolume, ErrorKind, FsType, Pool, PoolOptions,
    VolumeSource,
};
use loopvol_e2e::{fs_tools, loops_under, mounts_under, require_root, Scratch};

const MIB: u64 = 1 << 20;
/// xfs refuses filesystems under 300 MiB; sparse images cost nothing until written.
const SIZE: u64 = 320 * MIB;

fn open(s: &Scratch) -> Pool {
    Pool::open(s.pool(), PoolOptions::new("node-a")).unwrap()
}

fn create(pool: &Pool, name: &str, fs: Option<FsType>) -> String {
    pool.create_volume(&CreateVolume {
        name: name.into(),
        size_bytes: SIZE,
        fs_type: fs,
        allocation: Allocation::Thin,
        source: None,
    })
    .unwrap()
    .id
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
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, &format!("vol-{fs}"), Some(fs));
    let staging = s.path("staging");
    let target = s.path("pods/p1/vol");

    let first = pool.stage(&id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(first.formatted, Some(fs));
    let again = pool.stage(&id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(again.formatted, None, "second stage must not format");
    assert_eq!(again.device, first.device);

    pool.publish(&id, Some(&staging), &target, &mount_access(fs), false, None)
        .unwrap();
    pool.publish(&id, Some(&staging), &target, &mount_access(fs), false, None)
        .unwrap();
    write_file(&target.join("data"), b"hello loopvol");
    assert_eq!(
        pool.volume_at(&target).unwrap().as_deref(),
        Some(id.as_str())
    );
    let usage = pool.volume_usage(&id, &target).unwrap();
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

    pool.unpublish(&id, &target).unwrap();
    pool.unpublish(&id, &target).unwrap();
    assert!(!target.exists(), "unpublish removes the target dir");
    pool.unstage(&id, &staging).unwrap();
    pool.unstage(&id, &staging).unwrap();
    assert!(mounts_under(&s.root()).is_empty());
    assert!(loops_under(&s.root()).is_empty(), "unstage detaches");
    assert!(pool.get_volume(&id).unwrap().staged.is_empty());

    let third = pool.stage(&id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(
        third.formatted, None,
        "existing filesystem must not be reformatted"
    );
    assert_eq!(
        std::fs::read(staging.join("data")).unwrap(),
        b"hello loopvol"
    );
    pool.unstage(&id, &staging).unwrap();

    // In use → delete refused; after unstage → gone, and deleting again is fine.
    pool.stage(&id, &staging, &mount_access(fs), false).unwrap();
    assert_eq!(
        pool.delete_volume(&id).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    pool.unstage(&id, &staging).unwrap();
    pool.delete_volume(&id).unwrap();
    pool.delete_volume(&id).unwrap();
    assert_eq!(
        pool.get_volume(&id).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

fn mount_opts(path: &Path) -> String {
    let table = loopvol::mount::mounts().unwrap();
    let m = loopvol::mount::mount_at(&table, path)
        .unwrap_or_else(|| panic!("{} not mounted", path.display()));
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
    pool.stage(&id, &staging, &mount_access(FsType::Ext4), false)
        .unwrap();
    write_file(&staging.join("keep"), b"precious");
    pool.unstage(&id, &staging).unwrap();
    let err = pool
        .stage(&id, &staging, &mount_access(FsType::Xfs), false)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("already holds a ext4"), "{err}");
    // No fs type asked: the existing one is used.
    pool.stage(
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
    pool.unstage(&id, &staging).unwrap();

    // A partition table is data too.
    let id2 = create(&pool, "holds-gpt", None);
    let image = pool.volume_image(&id2);
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
        let err = pool
            .stage(&id2, &staging, &mount_access(FsType::Ext4), false)
            .unwrap_err();
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
    let err = pool
        .stage(&id, &staging, &mount_access(FsType::Ext4), true)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    pool.unstage(&id, &staging).unwrap();

    pool.stage(&id, &staging, &mount_access(FsType::Ext4), false)
        .unwrap();
    write_file(&staging.join("f"), b"x");
    // A read-only bind of a read-write staging.
    let ro_target = s.path("pods/ro/vol");
    pool.publish(
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
    let err = pool
        .publish(
            &id,
            Some(&staging),
            &ro_target,
            &mount_access(FsType::Ext4),
            false,
            None,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    pool.unpublish(&id, &ro_target).unwrap();
    pool.unstage(&id, &staging).unwrap();

    // Staged read-only: a read-only loop device and a read-only mount.
    pool.stage(&id, &staging, &mount_access(FsType::Ext4), true)
        .unwrap();
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
    let err = pool
        .stage(&id, &s.path("staging2"), &mount_access(FsType::Ext4), false)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    pool.unstage(&id, &staging).unwrap();
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
    let staged = pool.stage(&id, &staging, &Access::Block, false).unwrap();
    pool.stage(&id, &staging, &Access::Block, false).unwrap();
    pool.publish(&id, Some(&staging), &target, &Access::Block, false, None)
        .unwrap();
    pool.publish(&id, Some(&staging), &target, &Access::Block, false, None)
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
    assert_eq!(pool.volume_usage(&id, &target).unwrap().total_bytes, SIZE);
    assert_eq!(
        pool.volume_at(&target).unwrap().as_deref(),
        Some(id.as_str())
    );
    // Grow a block volume: the device follows.
    pool.expand_volume(&id, SIZE + 64 * MIB).unwrap();
    assert_eq!(
        pool.node_expand(&id, Some(&target)).unwrap(),
        SIZE + 64 * MIB
    );
    assert_eq!(
        loopvol::loopdev::device_size(&staged.device).unwrap(),
        SIZE + 64 * MIB
    );
    pool.unpublish(&id, &target).unwrap();
    assert!(!target.exists());
    pool.unstage(&id, &staging).unwrap();
    let image = std::fs::read(pool.volume_image(&id)).unwrap();
    assert_eq!(&image[4096..4096 + 15], b"raw block bytes");
    assert!(loops_under(&s.root()).is_empty());
}

/// Snapshot while mounted and being written, restore, clone: contents equal to the source at
/// snapshot time, and the snapshot outlives its source.
fn snapshot_and_clone(fs: FsType) {
    if !gate(fs) {
        return;
    }
    let s = Scratch::new();
    let pool = open(&s);
    let id = create(&pool, &format!("src-{fs}"), Some(fs));
    let staging = s.path("staging");
    pool.stage(&id, &staging, &mount_access(fs), false).unwrap();
    // Written but not synced: the freeze must flush it into the snapshot.
    std::fs::write(staging.join("before"), vec![42u8; 3 << 20]).unwrap();
    let snap = pool.create_snapshot("snap-1", &id).unwrap();
    assert_eq!(
        pool.create_snapshot("snap-1", &id).unwrap(),
        snap,
        "idempotent by name"
    );
    std::fs::write(staging.join("after"), b"later").unwrap();
    let clone = pool
        .create_volume(&CreateVolume {
            name: "clone".into(),
            size_bytes: SIZE,
            fs_type: None,
            allocation: Allocation::Thin,
            source: Some(VolumeSource::Volume(id.clone())),
        })
        .unwrap();
    assert_eq!(
        clone.fs_type,
        Some(fs),
        "a clone inherits the filesystem type"
    );
    pool.unstage(&id, &staging).unwrap();
    pool.delete_volume(&id).unwrap();

    let restored = pool
        .create_volume(&CreateVolume {
            name: "restored".into(),
            size_bytes: SIZE + 128 * MIB,
            fs_type: Some(fs),
            allocation: Allocation::Thin,
            source: Some(VolumeSource::Snapshot(snap.id.clone())),
        })
        .unwrap();
    let r_staging = s.path("r");
    let c_staging = s.path("c");
    // Both copies mounted at once on one node (same filesystem UUID: xfs needs nouuid).
    pool.stage(&restored.id, &r_staging, &mount_access(fs), false)
        .unwrap();
    pool.stage(&clone.id, &c_staging, &mount_access(fs), false)
        .unwrap();
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
    let grown = pool
        .volume_usage(&restored.id, &r_staging)
        .unwrap()
        .total_bytes;
    let same = pool
        .volume_usage(&clone.id, &c_staging)
        .unwrap()
        .total_bytes;
    assert!(
        grown >= same + 100 * MIB,
        "restored fs is {grown} bytes, the clone's {same}"
    );
    pool.unstage(&restored.id, &r_staging).unwrap();
    pool.unstage(&clone.id, &c_staging).unwrap();

    // Smaller than the source: out of range; missing sources: not found.
    let err = pool
        .create_volume(&CreateVolume {
            name: "too-small".into(),
            size_bytes: SIZE / 2,
            fs_type: None,
            allocation: Allocation::Thin,
            source: Some(VolumeSource::Snapshot(snap.id.clone())),
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    for source in [
        VolumeSource::Snapshot("nope".into()),
        VolumeSource::Volume("nope".into()),
    ] {
        let err = pool
            .create_volume(&CreateVolume {
                name: "x".into(),
                size_bytes: SIZE,
                fs_type: None,
                allocation: Allocation::Thin,
                source: Some(source),
            })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
    // Same snapshot name, other source.
    let err = pool.create_snapshot("snap-1", &clone.id).unwrap_err();
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
