use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::ids::{NodeName, SnapshotId, VolumeId};
use crate::meta::{AccessMode, Allocation, Hold, VolumeMeta, VolumeSource, SCHEMA_VERSION};
use crate::validate::FsType;

fn rel(p: &str) -> &Path {
    Path::new(p)
}

fn meta() -> VolumeMeta {
    let node = NodeName::try_from("n1").unwrap();
    VolumeMeta {
        schema: SCHEMA_VERSION,
        id: VolumeId::try_from("v").unwrap(),
        name: "v".into(),
        size_bytes: 1 << 30,
        fs_type: Some(FsType::Xfs),
        allocation: Allocation::Thin,
        source: Some(VolumeSource::Snapshot(SnapshotId::try_from("s").unwrap())),
        node: Some(node.clone()),
        created_unix: 1,
        claims: vec![Hold {
            node,
            mode: AccessMode::ReadOnly,
            pv_name: Some("pv".into()),
            boot: None,
            fenced: None,
        }],
        staged: vec![],
        formatting: None,
        blank: true,
        raw_block: true,
    }
}

#[test]
fn metadata_round_trip_missing_and_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("volumes")).unwrap();
    let fs = PoolFs::open(dir.path()).unwrap();
    let path = rel("volumes/volume.json");
    assert!(fs.read_json::<VolumeMeta>(path).unwrap().is_none());
    let meta = meta();
    fs.write_json(path, &meta).unwrap();
    assert_eq!(fs.read_json::<VolumeMeta>(path).unwrap().unwrap(), meta);
    // Each corruption is refused naming the file: bad JSON, and IDs that are not IDs.
    let on_disk = dir.path().join(path);
    let good = std::fs::read_to_string(&on_disk).unwrap();
    let corruptions = [
        "{not json".to_owned(),
        good.replace("\"id\": \"v\"", "\"id\": \"../../x\""),
        good.replace(
            "\"kind\": \"snapshot\",\n    \"id\": \"s\"",
            "\"kind\": \"snapshot\",\n    \"id\": \"a/b\"",
        ),
        good.replace("\"node\": \"n1\"", "\"node\": \"\""),
    ];
    for text in corruptions {
        assert_ne!(text, good, "the corruption did not apply");
        std::fs::write(&on_disk, &text).unwrap();
        let err = fs.read_json::<VolumeMeta>(path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("corrupt metadata") && msg.contains("volume.json"),
            "{text}: {msg}"
        );
    }
}

/// A record is padded to RECORD_SIZE, and once it exists its spare is there too, of the same
/// size: a rewrite swaps the two (nothing allocated), the old record becoming the spare.
#[test]
fn records_are_rewritten_over_their_spare() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("volumes")).unwrap();
    let fs = PoolFs::open(dir.path()).unwrap();
    let path = rel("volumes/volume.json");
    let mut m = meta();
    fs.write_json(path, &m).unwrap();
    let record = dir.path().join(path);
    let spare = dir.path().join("volumes/.volume.json.tmp");
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(&record), RECORD_SIZE as u64);
    assert_eq!(len(&spare), RECORD_SIZE as u64);
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (record_ino, spare_ino) = (ino(&record), ino(&spare));
    m.size_bytes = 2 << 30;
    fs.write_json(path, &m).unwrap();
    assert_eq!(fs.read_json::<VolumeMeta>(path).unwrap().unwrap(), m);
    // Swapped (tmpfs and every local filesystem have RENAME_EXCHANGE).
    assert_eq!((ino(&record), ino(&spare)), (spare_ino, record_ino));
    assert_eq!(len(&record), RECORD_SIZE as u64);
    // What an older release reads: the JSON, trailing whitespace allowed.
    let text = std::fs::read_to_string(&record).unwrap();
    assert_eq!(serde_json::from_str::<VolumeMeta>(&text).unwrap(), m);
}

/// The write of a record on a filesystem other nodes mount (called here directly: a local
/// test filesystem takes the exchange): a temporary file in the way, left by a write that
/// stopped half-way or planted as a link, is replaced, the link's target never written, and
/// nothing is left beside the record.
#[test]
fn fresh_writes_replace_what_is_in_the_way() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pool");
    std::fs::create_dir_all(root.join("volumes")).unwrap();
    let decoy = dir.path().join("decoy");
    std::fs::write(&decoy, b"not yours").unwrap();
    let fs = PoolFs::open(&root).unwrap();
    let path = rel("volumes/volume.json");
    let tmp = root.join("volumes/.volume.json.tmp");
    let mut m = meta();
    let in_the_way: [(&str, &dyn Fn()); 3] = [
        ("nothing", &|| {}),
        ("a half-written file", &|| {
            std::fs::write(&tmp, b"{\"sche").unwrap()
        }),
        ("a link", &|| symlink(&decoy, &tmp).unwrap()),
    ];
    for (what, plant) in in_the_way {
        plant();
        m.size_bytes += 4096;
        let (dirfd, name) = fs.parent_of(path).unwrap();
        let json = serde_json::to_vec(&m).unwrap();
        fs.write_fresh(
            &dirfd,
            fs_magic(&dirfd),
            name,
            &spare_name(name),
            path,
            rel("volumes/.volume.json.tmp"),
            &json,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            fs.read_json::<VolumeMeta>(path).unwrap().unwrap(),
            m,
            "{what}"
        );
        assert!(
            std::fs::symlink_metadata(&tmp).is_err(),
            "{what}: left behind"
        );
        assert_eq!(std::fs::read(&decoy).unwrap(), b"not yours", "{what}");
    }
}

/// A directory's fsync is skipped only where it is known to do nothing.
#[test]
fn directories_are_synced_except_on_glusterfs() {
    let rows = [
        ("fuse.glusterfs", false),
        ("ext4", true),
        ("xfs", true),
        ("btrfs", true),
        ("tmpfs", true),
        ("nfs4", true),
        ("ceph", true),
        ("fuse.ceph-fuse", true),
        ("fuse.sshfs", true),
        ("fuse", true),
        ("glusterfs", true),
    ];
    crate::table::check(rows.iter().copied(), |fs_type| syncs_directories(fs_type));
    // Told the pool is on GlusterFS, a handle still syncs a directory that is not on FUSE.
    let dir = tempfile::tempdir().unwrap();
    assert!(!on_glusterfs(dir.path()));
    let fs = PoolFs::open(dir.path()).unwrap().on_glusterfs(true);
    let root = rfs::open(dir.path(), OFlags::PATH, Mode::empty()).unwrap();
    assert!(fs.dirs_need_sync(fs_magic(&root)));
    assert!(!fs.dirs_need_sync(Some(FUSE_MAGIC)));
    assert!(PoolFs::open(dir.path())
        .unwrap()
        .dirs_need_sync(Some(FUSE_MAGIC)));
}

/// A lock file is made by the first open and opened, the same file, by every later one.
/// A directory opened once is read whole every time (the names are read through a duplicate of
/// its descriptor, rewound: the duplicate shares the position a former read left at the end).
#[test]
fn a_directory_opened_once_reads_whole_every_time() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["volumes/a", "volumes/b", "volumes/c"] {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
    }
    let fs = PoolFs::open(dir.path()).unwrap();
    let kind = fs.open_kind(rel("volumes")).unwrap();
    for _ in 0..3 {
        let mut names = fs.kind_names(&kind).unwrap();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
    }
}

#[test]
fn open_lock_makes_a_missing_lock_file_and_opens_an_existing_one() {
    for resolver in [Resolver::Openat2, Resolver::Walk] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("locks")).unwrap();
        let fs = PoolFs::open_with(dir.path(), resolver).unwrap();
        let first = fs.open_lock(rel("locks/v-v.lock")).unwrap();
        let made = std::fs::metadata(dir.path().join("locks/v-v.lock")).unwrap();
        assert!(made.is_file(), "{resolver:?}");
        let again = fs.open_lock(rel("locks/v-v.lock")).unwrap();
        assert!(fs.names_file(rel("locks/v-v.lock"), &first), "{resolver:?}");
        assert!(fs.names_file(rel("locks/v-v.lock"), &again), "{resolver:?}");
    }
}

/// A directory is removed by the names it should hold, and whatever else it holds (or is) still
/// goes with it: files besides those, a directory under one of the names, the directory itself a
/// link (removed, its target left alone).
#[test]
fn remove_dir_of_removes_the_named_files_and_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let fs = PoolFs::open(root).unwrap();
    let outside = root.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("image"), b"keep").unwrap();
    type Plant<'a> = (&'a str, &'a dyn Fn(&Path));
    let plants: [Plant; 5] = [
        ("just the names", &|_| {}),
        ("one name missing", &|d| {
            std::fs::remove_file(d.join("volume.json")).unwrap()
        }),
        ("a spare besides", &|d| {
            std::fs::write(d.join(".volume.json.tmp"), b" ").unwrap()
        }),
        ("a directory named image", &|d| {
            std::fs::remove_file(d.join("image")).unwrap();
            std::fs::create_dir_all(d.join("image/deeper")).unwrap();
        }),
        ("the directory is a link", &|d| {
            std::fs::remove_dir_all(d).unwrap();
            symlink(&outside, d).unwrap();
        }),
    ];
    for (what, plant) in plants {
        let d = root.join("t");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("image"), b"data").unwrap();
        std::fs::write(d.join("volume.json"), b"{}").unwrap();
        plant(&d);
        fs.remove_dir_of(rel("t"), &["image", "volume.json"])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            std::fs::symlink_metadata(&d).is_err(),
            "{what}: left behind"
        );
        assert_eq!(
            std::fs::read(outside.join("image")).unwrap(),
            b"keep",
            "{what}"
        );
    }
    fs.remove_dir_of(rel("t"), &["image"]).unwrap();
}

/// A directory on the mount the pool was opened on has the pool's filesystem type without a
/// `statfs`; on another mount (a pool remounted since, another filesystem) it is asked.
#[test]
fn magic_of_a_directory_is_known_on_the_pools_own_mount_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("volumes")).unwrap();
    let mut home = Home::of(dir.path()).unwrap();
    let real = home.magic;
    // No filesystem has this type: seen only where the home answers instead of statfs.
    home.magic = 0x5EED;
    let fs = PoolFs::open(dir.path()).unwrap().at_home(Some(home));
    let (volumes, _) = fs.parent_of(rel("volumes/v")).unwrap();
    assert_eq!(fs.magic_of(&volumes), Some(0x5EED));
    let proc = rfs::open("/proc", OFlags::PATH, Mode::empty()).unwrap();
    assert_eq!(fs.magic_of(&proc), fs_magic(&proc));
    assert_ne!(fs.magic_of(&proc), Some(0x5EED));
    let plain = PoolFs::open(dir.path()).unwrap();
    assert_eq!(plain.magic_of(&volumes), Some(real));
}

/// What an attacker who can write the pool plants, and what each access must do: refuse,
/// naming the entry, without touching (or hanging on) what the entry points at.
#[test]
fn planted_entries_are_refused_by_both_resolvers() {
    for resolver in [Resolver::Openat2, Resolver::Walk] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pool");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("volumes/v")).unwrap();
        std::fs::create_dir_all(root.join("locks")).unwrap();
        std::fs::create_dir_all(root.join("trash/t")).unwrap();
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        let decoy = outside.join("decoy");
        std::fs::write(&decoy, b"precious").unwrap();
        std::fs::write(outside.join("dir/volume.json"), br#"{"id":"v"}"#).unwrap();
        let fs = PoolFs::open_with(&root, resolver).unwrap();
        let plant_link = |at: &str, to: &Path| {
            let p = root.join(at);
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_dir_all(&p);
            symlink(to, &p).unwrap();
        };
        let plant_fifo = |at: &str| {
            let p = root.join(at);
            let _ = std::fs::remove_file(&p);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        };
        type Access<'a> = Box<dyn Fn(&PoolFs) -> Result<()> + Send + Sync + 'a>;
        // (what is planted, the access, what the refusal must say)
        type Plant<'a> = Box<dyn Fn() + 'a>;
        let mut cases: Vec<(&str, Plant, Access, &str)> = vec![
            (
                "volumes/v is a symlink to a directory outside",
                Box::new(|| plant_link("volumes/v", &outside.join("dir"))),
                Box::new(|fs| {
                    fs.read_json::<serde_json::Value>(rel("volumes/v/volume.json"))
                        .map(drop)
                }),
                "symbolic link",
            ),
            (
                "volume.json is a symlink to a file outside",
                Box::new(|| {
                    let _ = std::fs::remove_file(root.join("volumes/v"));
                    std::fs::create_dir_all(root.join("volumes/v")).unwrap();
                    plant_link("volumes/v/volume.json", &decoy)
                }),
                Box::new(|fs| {
                    fs.read_json::<serde_json::Value>(rel("volumes/v/volume.json"))
                        .map(drop)
                }),
                "symbolic link",
            ),
            (
                "volume.json is a symlink to /dev/zero",
                Box::new(|| plant_link("volumes/v/volume.json", Path::new("/dev/zero"))),
                Box::new(|fs| {
                    fs.read_json::<serde_json::Value>(rel("volumes/v/volume.json"))
                        .map(drop)
                }),
                "symbolic link",
            ),
            (
                "volume.json is a FIFO",
                Box::new(|| plant_fifo("volumes/v/volume.json")),
                Box::new(|fs| {
                    fs.read_json::<serde_json::Value>(rel("volumes/v/volume.json"))
                        .map(drop)
                }),
                "FIFO",
            ),
            (
                "volume.json is larger than any record",
                Box::new(|| {
                    let _ = std::fs::remove_file(root.join("volumes/v/volume.json"));
                    std::fs::write(root.join("volumes/v/volume.json"), vec![b' '; 70_000]).unwrap()
                }),
                Box::new(|fs| {
                    fs.read_json::<serde_json::Value>(rel("volumes/v/volume.json"))
                        .map(drop)
                }),
                "larger than",
            ),
            (
                "the image is a symlink to a file outside",
                Box::new(|| plant_link("volumes/v/image", &decoy)),
                Box::new(|fs| fs.open_image(rel("volumes/v/image"), false).map(drop)),
                "symbolic link",
            ),
            (
                "the image is a symlink (stat)",
                Box::new(|| plant_link("volumes/v/image", &decoy)),
                Box::new(|fs| fs.stat_image(rel("volumes/v/image")).map(drop)),
                "symbolic link",
            ),
            (
                "the image is a FIFO",
                Box::new(|| plant_fifo("volumes/v/image")),
                Box::new(|fs| fs.open_image(rel("volumes/v/image"), false).map(drop)),
                "FIFO",
            ),
            (
                "the image is a hard link to a file outside",
                Box::new(|| {
                    let _ = std::fs::remove_file(root.join("volumes/v/image"));
                    std::fs::hard_link(&decoy, root.join("volumes/v/image")).unwrap()
                }),
                Box::new(|fs| fs.open_image(rel("volumes/v/image"), false).map(drop)),
                "hard links",
            ),
            (
                "a dangling symlink in locks/",
                Box::new(|| plant_link("locks/v-v.lock", &outside.join("created"))),
                Box::new(|fs| fs.open_lock(rel("locks/v-v.lock")).map(drop)),
                "symbolic link",
            ),
            (
                "a lock file is a FIFO",
                Box::new(|| plant_fifo("locks/v-v.lock")),
                Box::new(|fs| fs.open_lock(rel("locks/v-v.lock")).map(drop)),
                "FIFO",
            ),
            (
                "the metadata's temporary file is a symlink",
                Box::new(|| {
                    let _ = std::fs::remove_file(root.join("volumes/v/volume.json"));
                    plant_link("volumes/v/.volume.json.tmp", &decoy)
                }),
                Box::new(|fs| fs.write_json(rel("volumes/v/volume.json"), &meta())),
                "symbolic link",
            ),
        ];
        let mut wrong = Vec::new();
        for (what, plant, access, needle) in cases.drain(..) {
            plant();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let _ = tx.send(access(&fs).map_err(|e| (e.kind(), e.to_string())));
                });
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Err((kind, msg))) => {
                        if kind != crate::ErrorKind::FailedPrecondition
                            || !msg.contains(needle)
                            || !msg.contains("refusing")
                        {
                            wrong.push(format!("{resolver:?} {what}: {kind:?} {msg}"));
                        }
                    }
                    Ok(Ok(())) => wrong.push(format!("{resolver:?} {what}: accepted")),
                    Err(_) => {
                        // Unblock a hung open of a FIFO so the scope can end, then report.
                        for p in ["volumes/v/volume.json", "volumes/v/image", "locks/v-v.lock"] {
                            let _ = std::fs::OpenOptions::new()
                                .read(true)
                                .write(true)
                                .open(root.join(p));
                        }
                        wrong.push(format!("{resolver:?} {what}: hung"));
                    }
                }
            });
            assert_eq!(std::fs::read(&decoy).unwrap(), b"precious", "{what}");
            assert!(!outside.join("created").exists(), "{what}");
        }
        // Removal of a tree removes links, never what they point at.
        plant_link("trash/t/link", &outside.join("dir"));
        fs.remove_tree(rel("trash/t")).unwrap();
        assert!(!root.join("trash/t").exists());
        assert!(outside.join("dir/volume.json").exists());
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}

/// No `std::fs` call (or path-based check) on a pool path outside the pool-access layer: the
/// modules that touch pool entries go through `PoolFs`. The allowed files name only what is not
/// in the pool (sysfs, /proc, /dev, host paths, test support), each for the reason given.
#[test]
fn nothing_else_touches_pool_paths() {
    const ALLOWED: &[(&str, &str)] = &[
        ("pool/fsops.rs", "the layer itself"),
        ("loopdev.rs", "sysfs and /dev/loop*"),
        ("mount.rs", "/proc/self/mountinfo"),
        ("kernel.rs", "/proc/sys/kernel/random/boot_id"),
        ("fs.rs", "block devices and /proc/self/status"),
        ("cmd.rs", "/proc and the tools' pid files"),
        ("freeze.rs", "mount points (host paths)"),
        ("host.rs", "host paths (staging, targets), resolved there"),
        ("testing.rs", "test support on arbitrary files"),
        (
            "pool/coherence.rs",
            "a GlusterFS client's own .meta view of its translators, beside the pool",
        ),
    ];
    // `std::fs::` followed by a function (the `File` type itself, fd-based, is fine).
    let fs_call = |line: &str| {
        line.match_indices("std::fs::").any(|(i, m)| {
            line[i + m.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase())
        })
    };
    const PATTERNS: &[&str] = &[
        "File::open",
        "File::create",
        "File::options",
        "OpenOptions::new",
        "fs::read",
        "fs::write",
        "read_dir(",
        ".exists()",
        ".is_dir()",
        ".is_file()",
        "canonicalize(",
        "symlink_metadata",
        "statvfs::statvfs(",
        "unistd::access(",
    ];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if !name.ends_with(".rs")
                || name.ends_with("/tests.rs")
                || ALLOWED.iter().any(|(f, _)| *f == name)
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests plant entries with std::fs on purpose.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            for (n, line) in code.lines().enumerate() {
                let line = line.split("//").next().unwrap_or("");
                let hit = PATTERNS
                    .iter()
                    .find(|p| line.contains(**p))
                    .copied()
                    .or(fs_call(line).then_some("std::fs::<function>"));
                if let Some(p) = hit {
                    found.push(format!("{name}:{}: {p}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "file-system calls outside the pool-access layer (go through PoolFs):\n{}",
        found.join("\n")
    );
}
