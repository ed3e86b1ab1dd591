//! The admin CLI `loopvol` (the binary cargo built for this run) against real pools: volumes
//! made and staged through the backend library as a front end would, orphans planted as
//! interrupted calls and hands would leave them, then `list`, `inspect`, `check`, `gc` and
//! `metrics` asserted on their tables, JSON and exit codes, and `gc` on the pool's full listing
//! before and after. Kernel tests run as root on their own scratch pool and clean up what they
//! made.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use loopvol::{Access, AccessMode, CreateVolume, FsType, Pool, Publish, SnapshotRequest, VolumeId};
use loopvol_e2e::admin::Admin;
use loopvol_e2e::{kernel, openmetrics, pattern, require_root, write_synced, Scratch};

const EXE: &str = env!("CARGO_BIN_EXE_loopvol");
const NODE: &str = "node-a";
const MIB: u64 = 1 << 20;

fn admin(s: &Scratch) -> Admin {
    Admin::new(EXE, s.pool(), NODE)
}

/// Every entry under `root` with what it is: a directory, a symlink and its target, or a file
/// with its length and a digest of its content (a removed, added or changed entry shows).
fn listing(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let what = if md.is_dir() {
                walk(&p, out);
                "dir".to_owned()
            } else if md.file_type().is_symlink() {
                format!("symlink to {:?}", std::fs::read_link(&p).unwrap())
            } else if md.is_file() {
                // Images are sparse and large: their length and allocation, not their bytes.
                format!("file {} bytes, {} blocks", md.len(), md.blocks())
            } else {
                "special".to_owned()
            };
            out.insert(p, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

fn create(pool: &Pool, name: &str, size: u64) -> VolumeId {
    pool.create_volume(&CreateVolume::blank(name, size))
        .unwrap()
        .id
}

fn ext4() -> Access {
    Access::Mount {
        fs_type: Some(FsType::Ext4),
        mount_options: vec![],
    }
}

/// Stages `id` at `staging` and publishes it at `target` (ext4, read-write).
fn stage_and_publish(pool: &Pool, id: &VolumeId, staging: &Path, target: &Path) {
    let mut v = pool.volume(id).unwrap();
    let staging = pool.node_path("staging path", staging).unwrap();
    v.stage(&staging, &ext4(), AccessMode::SingleNodeWriter)
        .unwrap();
    v.publish(&Publish {
        staging: Some(staging),
        target: pool.node_path("target path", target).unwrap(),
        access: ext4(),
        read_only: false,
        fs_group: None,
        exclusive: false,
    })
    .unwrap();
}

/// A sparse file of `len` bytes at `path`, with `data` bytes of data at its start.
fn file(path: &Path, len: u64, data: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    if data > 0 {
        std::os::unix::fs::FileExt::write_all_at(&f, &pattern(data, 7), 0).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn a_missing_or_foreign_pool_is_an_error_and_is_left_alone() {
    let s = Scratch::new();
    let foreign = s.path("not-a-pool");
    std::fs::create_dir_all(foreign.join("data")).unwrap();
    std::fs::write(foreign.join("data/file"), b"precious").unwrap();
    let before = listing(&foreign);
    for cmd in [
        &["list"][..],
        &["list", "--snapshots"],
        &["inspect", "pvc-1"],
        &["check"],
        &["gc", "--yes"],
        &["metrics", "--textfile", "/dev/null/x"],
    ] {
        for (pool, needle) in [
            (s.path("missing"), "cannot use it"),
            (foreign.clone(), "is not a loopvol pool"),
        ] {
            let a = Admin::new(EXE, &pool, NODE);
            let ran = a.run(cmd);
            assert_eq!(ran.code, 2, "{cmd:?} on {}: {ran:?}", pool.display());
            assert!(
                ran.stderr.contains(needle) && ran.stderr.contains(&*pool.to_string_lossy()),
                "{cmd:?}: {ran:?}"
            );
            let mut json = vec!["--json"];
            json.extend_from_slice(cmd);
            let ran = a.run(&json);
            assert_eq!(ran.code, 2, "{json:?}: {ran:?}");
            assert!(
                ran.json()["error"].as_str().unwrap().contains(needle),
                "{ran:?}"
            );
        }
    }
    assert_eq!(listing(&foreign), before, "a foreign directory was changed");
    assert!(!s.path("missing").exists());
}

#[test]
fn check_reports_and_gc_removes_exactly_the_safe_set() {
    if !require_root(&[]) {
        return;
    }
    let s = Scratch::new();
    let pool = s.open_pool(NODE, false);
    let root = s.pool();
    let a = admin(&s);
    let kept = create(&pool, "pvc-kept", 64 * MIB);
    let (code, found) = a.findings();
    assert_eq!((code, found), (0, vec![]), "a fresh pool has no findings");
    let clean = a.run(&["check"]);
    assert_eq!(clean.code, 0, "{clean:?}");
    assert!(clean.stdout.contains("is consistent"), "{clean:?}");

    // What interrupted calls and hands leave behind. Removable: no metadata or a temp image,
    // no data, nothing attached. (A record's `.<name>.tmp` spare beside a committed record is
    // the pool-access layer's own, not a finding.)
    let p = |rel: &str| root.join(rel);
    let removable = [
        // A blank create interrupted before its metadata.
        (p("volumes/pvc-blank"), "orphan-entry"),
        // One interrupted at its first metadata write (the temp record, not renamed).
        (p("volumes/pvc-norecord"), "orphan-entry"),
        (p("snapshots/snap-blank"), "orphan-entry"),
        (p("volumes/pvc-kept/image.tmp"), "temp-file"),
        (p("trash/pvc-gone.123.456"), "trash"),
    ];
    file(&p("volumes/pvc-blank/image.tmp"), 64 * MIB, 0);
    file(&p("volumes/pvc-norecord/image"), 64 * MIB, 0);
    std::fs::write(p("volumes/pvc-norecord/.volume.json.tmp"), b"{\"half\":").unwrap();
    file(&p("snapshots/snap-blank/image.tmp"), 64 * MIB, 0);
    file(&p("volumes/pvc-kept/image.tmp"), 64 * MIB, 0);
    file(&p("trash/pvc-gone.123.456/image"), 64 * MIB, 0);
    // Kept: data, an attached image, corrupt metadata, what loopvol never makes.
    let kept_back = [
        (p("volumes/pvc-clone-cut"), "orphan-entry"), // holds data (an interrupted clone)
        (p("trash/pvc-full.1.2"), "trash"),           // a deleted volume's data
        (p("volumes/pvc-attached"), "orphan-entry"),  // its image.tmp is attached
        (p("volumes/pvc-corrupt/volume.json"), "corrupt-metadata"),
        (p("volumes/Bad Name!"), "unknown-entry"),
        (p("volumes/pvc-link"), "unknown-entry"),
    ];
    let interrupted = ("abnormal-volume".to_owned(), "pvc-committing".to_owned());
    file(&p("volumes/pvc-clone-cut/image.tmp"), 64 * MIB, 4096);
    file(&p("trash/pvc-full.1.2/image"), 64 * MIB, 8192);
    file(&p("volumes/pvc-attached/image.tmp"), 64 * MIB, 0);
    let dev =
        loopvol::testing::loopdev::attach(&p("volumes/pvc-attached/image.tmp"), false).unwrap();
    file(&p("volumes/pvc-corrupt/image"), 64 * MIB, 0);
    std::fs::write(p("volumes/pvc-corrupt/volume.json"), b"{not json").unwrap();
    std::fs::create_dir_all(p("volumes/Bad Name!")).unwrap();
    std::os::unix::fs::symlink("/etc", p("volumes/pvc-link")).unwrap();

    // A create interrupted after its metadata, before its image moved into place: abnormal
    // (no image yet), but its `image.tmp` is the volume's image, which the create's repeat
    // moves: never a temp file gc removes.
    let committing = create(&pool, "pvc-committing", 64 * MIB);
    std::fs::rename(
        p("volumes/pvc-committing/image"),
        p("volumes/pvc-committing/image.tmp"),
    )
    .unwrap();

    // check: every plant, its kind, exit 1.
    let (code, found) = a.findings();
    assert_eq!(code, 1);
    let mut want: Vec<(String, String)> = removable
        .iter()
        .chain(&kept_back)
        .map(|(path, kind)| (kind.to_string(), path.display().to_string()))
        .collect();
    // The attached orphan's loop device is one nothing holds.
    want.push(("unheld-device".into(), dev.path().display().to_string()));
    want.push(interrupted.clone());
    want.sort();
    assert_eq!(found, want);
    let report = a.json(&["check"], 1);
    for f in report["findings"].as_array().unwrap() {
        let subject = PathBuf::from(f["subject"].as_str().unwrap());
        let is_removable = removable.iter().any(|(p, _)| *p == subject);
        assert_eq!(f["gc_removes"], is_removable, "{f}");
    }
    let text = a.run(&["check"]);
    assert_eq!(text.code, 1);
    assert!(
        text.stdout.starts_with(&format!(
            "{} findings in pool {} on node {NODE} ({} removable by `loopvol gc --yes`):",
            want.len(),
            root.display(),
            removable.len()
        )),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("holds data") && text.stdout.contains("    why: "),
        "{}",
        text.stdout
    );

    // gc without --yes: says what it would remove, removes nothing.
    let before = listing(&root);
    let dry = a.json(&["gc"], 0);
    assert_eq!(dry["dry_run"], true);
    let mut would: Vec<String> = dry["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert_eq!(o["result"], "would-remove", "{o}");
            o["path"].as_str().unwrap().to_owned()
        })
        .collect();
    would.sort();
    let mut safe: Vec<String> = removable
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect();
    safe.sort();
    assert_eq!(would, safe);
    assert_eq!(listing(&root), before, "a dry run changed the pool");

    // gc --yes: exactly the safe set is gone, everything else is as it was (the lock files it
    // took go with the entries they locked).
    let done = a.run(&["gc", "--yes"]);
    assert_eq!(done.code, 0, "{done:?}");
    for path in &safe {
        assert!(
            done.stdout.contains(&format!("removed {path} (")),
            "{}",
            done.stdout
        );
    }
    let after = listing(&root);
    let gone: Vec<&PathBuf> = before.keys().filter(|p| !after.contains_key(*p)).collect();
    let added: Vec<&PathBuf> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    assert_eq!(added, Vec::<&PathBuf>::new(), "gc added entries");
    for p in &gone {
        assert!(
            removable.iter().any(|(r, _)| p.starts_with(r)),
            "gc removed {} which is not in the safe set",
            p.display()
        );
    }
    for (r, _) in &removable {
        assert!(!r.exists(), "{} is still there", r.display());
    }
    for (path, what) in &after {
        assert_eq!(
            before.get(path),
            Some(what),
            "gc changed {}",
            path.display()
        );
    }
    assert_eq!(
        pool.get_volume(&kept).unwrap().name,
        "pvc-kept",
        "the committed volume beside the temp file is intact"
    );
    assert!(
        p("volumes/pvc-committing/image.tmp").exists(),
        "gc removed an image"
    );
    // What is left is what gc must not touch; a second gc has nothing to do.
    let (code, left) = a.findings();
    assert_eq!(code, 1);
    // The kept-back ones, the unheld device and the interrupted commit.
    assert_eq!(left.len(), kept_back.len() + 2, "{left:?}");
    let again = a.run(&["gc", "--yes"]);
    assert_eq!(
        (again.code, again.stdout.contains("nothing to remove")),
        (0, true),
        "{again:?}"
    );
    assert_eq!(listing(&root), after);
    assert_eq!(create(&pool, "pvc-committing", 64 * MIB), committing);
    assert!(
        p("volumes/pvc-committing/image").exists(),
        "the repeat finished the commit"
    );

    // A busy entry is left, and gc says so (exit 1): a create in progress holds its lock.
    file(&p("volumes/pvc-busy/image.tmp"), MIB, 0);
    let held = s.hold_volume_lock("pvc-busy");
    let busy = a.json(&["gc", "--yes"], 1);
    let outcome = busy["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["path"].as_str().unwrap().ends_with("volumes/pvc-busy"))
        .cloned()
        .unwrap();
    assert_eq!(outcome["result"], "skipped", "{outcome}");
    assert!(
        outcome["why"].as_str().unwrap().contains("busy"),
        "{outcome}"
    );
    assert!(p("volumes/pvc-busy/image.tmp").exists());
    drop(held);
    kernel::detach(&dev).unwrap();
}

#[test]
fn list_inspect_and_the_metrics_textfile_show_what_the_node_has() {
    if !require_root(&["mkfs.ext4", "blkid"]) {
        return;
    }
    let s = Scratch::new();
    let pool = s.open_pool(NODE, false);
    let a = admin(&s);
    let used = create(&pool, "pvc-used", 64 * MIB);
    let idle = create(&pool, "pvc-idle", 32 * MIB);
    let (staging, target) = (s.path("k/staging/used"), s.path("k/pods/p/used"));
    stage_and_publish(&pool, &used, &staging, &target);
    write_synced(&target.join("data"), &pattern(MIB as usize, 1));
    let snap = pool
        .create_snapshot(&SnapshotRequest {
            name: "snap-1".into(),
            source: used.clone(),
        })
        .unwrap();

    let table = a.run(&["list"]);
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<Vec<&str>> = table
        .stdout
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        [
            "ID",
            "NAME",
            "SIZE",
            "ALLOCATED",
            "FS",
            "ALLOCATION",
            "STATE",
            "HOLDERS",
            "HEALTH"
        ]
    );
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    let idle_row = &lines[1];
    assert_eq!(
        idle_row,
        &["pvc-idle", "pvc-idle", "32.0 MiB", "0 B", "-", "thin", "created", "-", "ok"]
    );
    let used_row = &lines[2];
    assert_eq!(
        [
            used_row[0],
            used_row[2],
            used_row[4],
            used_row[5],
            used_row[6],
            used_row[7],
            used_row[8]
        ],
        [
            "pvc-used",
            "64.0 MiB",
            "ext4",
            "thin",
            "published",
            "node-a:rw staged",
            "ok"
        ]
    );

    let json = a.json(&["list"], 0);
    let vols = json["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    let v = vols.iter().find(|v| v["id"] == "pvc-used").unwrap();
    assert_eq!(v["state"], "published");
    assert_eq!(v["fs_type"], "ext4");
    assert_eq!(v["staged"][0]["node"], NODE);
    assert_eq!(v["health"]["abnormal"], false);
    assert!(v["allocated_bytes"].as_u64().unwrap() >= MIB, "{v}");
    let snaps = a.json(&["list", "--snapshots"], 0);
    assert_eq!(snaps["snapshots"][0]["id"], snap.id.as_str());
    assert_eq!(snaps["snapshots"][0]["source_volume_id"], "pvc-used");

    let inspected = a.json(&["inspect", "pvc-used"], 0);
    let k = &inspected["kernel"];
    let dev = k["devices"][0]["path"].as_str().unwrap().to_owned();
    assert!(dev.starts_with("/dev/loop"), "{inspected}");
    let mut points: Vec<&str> = k["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mount_point"].as_str().unwrap())
        .collect();
    points.sort();
    let mut want = [staging.to_str().unwrap(), target.to_str().unwrap()];
    want.sort();
    assert_eq!(points, want);
    assert_eq!(inspected["metadata"]["id"], "pvc-used");
    assert_eq!(inspected["findings"], serde_json::json!([]));
    let text = a.run(&["inspect", "pvc-used"]);
    for needle in [
        "volume pvc-used",
        "state here: published (node node-a)",
        &dev,
        &target.display().to_string(),
        "staged on:  node-a read-write",
        "health:     ok",
    ] {
        assert!(
            text.stdout.contains(needle),
            "no {needle:?} in\n{}",
            text.stdout
        );
    }
    let snap_text = a.run(&["inspect", snap.id.as_str()]);
    assert!(
        snap_text.stdout.contains("source:     volume pvc-used"),
        "{snap_text:?}"
    );
    let unknown = a.run(&["inspect", "pvc-nope"]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown
            .stderr
            .contains("no volume or snapshot \"pvc-nope\""),
        "{unknown:?}"
    );
    assert_eq!(a.findings(), (0, vec![]));

    // The textfile: written atomically, the same gauges as loopvol-csi, parsed strictly.
    let dir = s.path("textfile");
    std::fs::create_dir_all(&dir).unwrap();
    let prom = dir.join("loopvol.prom");
    let ran = a.run(&["metrics", "--textfile", prom.to_str().unwrap()]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, ["loopvol.prom"], "a temp file was left");
    let m = openmetrics::parse(&std::fs::read_to_string(&prom).unwrap()).unwrap();
    let root = s.pool().display().to_string();
    let gauge = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("pool", root.as_str())];
        labels.extend_from_slice(extra);
        m.value(name, &labels)
    };
    assert_eq!(gauge("loopvol_volumes", &[("state", "created")]), 2.0);
    assert_eq!(gauge("loopvol_volumes", &[("state", "staged")]), 1.0);
    assert_eq!(gauge("loopvol_volumes", &[("state", "published")]), 1.0);
    assert_eq!(gauge("loopvol_snapshots", &[]), 1.0);
    assert_eq!(m.sum("loopvol_volumes_abnormal", &[]), 0.0);
    assert_eq!(
        m.samples("loopvol_volumes_abnormal", &[]).len(),
        loopvol::AbnormalReason::ALL.len()
    );
    // The space model's parts, as GetCapacity and admission have them.
    let cap = pool.capacity().unwrap();
    for (name, want) in [
        ("loopvol_pool_reserve_bytes", cap.reserve_bytes),
        (
            "loopvol_pool_thin_promised_bytes",
            cap.thin_unallocated_bytes,
        ),
        (
            "loopvol_pool_thick_reserved_bytes",
            cap.thick_unbacked_bytes,
        ),
    ] {
        assert_eq!(gauge(name, &[]), want as f64, "{name}");
    }
    assert!(
        cap.thin_unallocated_bytes > 0,
        "thin volumes have unwritten space"
    );
    // Other tests write to the filesystem under the pool meanwhile: what depends on its free
    // space is only close.
    let thick = gauge("loopvol_pool_available_thick_bytes", &[]);
    let want = cap.available_thick_bytes as f64;
    assert!(
        (thick - want).abs() <= 0.05 * want,
        "{thick} against {want}"
    );
    assert!(
        gauge("loopvol_pool_filesystem_size_bytes", &[]) >= gauge("loopvol_pool_free_bytes", &[])
    );
    assert_eq!(gauge("loopvol_pool_scan_success", &[]), 1.0);
    // stdout without --textfile: the same text; with --json, the same numbers.
    let out = a.run(&["metrics"]);
    openmetrics::parse(&out.stdout).unwrap();
    let j = a.json(&["metrics"], 0);
    assert_eq!(j["volumes"]["created"], 2);
    assert_eq!(j["thin_promised_bytes"], cap.thin_unallocated_bytes);
    assert_eq!(j["reserve_bytes"], cap.reserve_bytes);
    assert_eq!(j["volumes"]["published"], 1);
    assert_eq!(j["abnormal"]["device_gone"], 0);
    assert_eq!(j["snapshots"], 1);

    let mut v = pool.volume(&used).unwrap();
    v.unpublish(&pool.node_path("t", &target).unwrap()).unwrap();
    v.unstage(&pool.node_path("s", &staging).unwrap()).unwrap();
    drop(v);
    let _ = idle;
    s.assert_clean("left behind");
}
