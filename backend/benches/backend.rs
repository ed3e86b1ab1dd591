//! Backend benchmark (not a test): loopvol against the bare tools, or the same stack made by hand,
//! doing the same work in the same run. Every ratio comes from interleaved pairs (see
//! `loopvol_e2e::bench`): the median of the pairs' ratios, their spread, and the number of pairs.
//! Needs root, fio, mkfs.ext4, mkfs.xfs (the reflink rows make an xfs pool on a loop device).
//!
//!     cargo bench -p loopvol --bench backend [-- GROUP...]
//!
//! Groups (all but `knobs` by default):
//! - `provision`: create + attach + format + mount of 1 GiB and 100 GiB ext4 volumes vs
//!   `truncate`, `losetup --direct-io=on --sector-size=4096`, `mkfs.ext4` with loopvol's options,
//!   `mount -o nodev,nosuid`;
//! - `fio`: 4 KiB random read / write IOPS and 1 MiB sequential write throughput, direct I/O,
//!   iodepth 32, over 1 GiB: a filesystem volume vs the same stack made by hand (an image in the
//!   pool, `losetup --direct-io=on --sector-size=4096`, the same mkfs and mount options), and a
//!   raw block volume vs a file in the pool's own filesystem; each side has two copies, made in
//!   the order ours, baseline, baseline, ours and taken in turns, so that where an image lies in
//!   the pool does not decide the ratio;
//! - `snapshot`: a 10 GiB volume holding 1 GiB, at rest and mounted (frozen), vs
//!   `cp --sparse=always` (and `fsfreeze`); `reflink`: the same on an xfs pool vs
//!   `cp --reflink=always`;
//! - `knobs` (only when named): the block layer's and the inner filesystem's settings, each
//!   against loopvol's default on a staged volume (4 KiB random reads), and the loop device's
//!   logical block size (512 vs loopvol's 4096) on raw devices.
//!
//! Environment: `BENCH_PAIRS` (pairs per row, default 7; fewer than 5 is a smoke run),
//! `BENCH_FIO_SECONDS` (each fio run, default 5), `LOOPVOL_BENCH_DIR` (default /var/tmp; must be
//! disk-backed: the pool's filesystem is the baseline).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use loopvol::{
    Access, AccessMode, CreateVolume, FsType, Pool, PoolOptions, SizeRequest, SnapshotRequest,
    VolumeId,
};
use loopvol_e2e::bench::{self, Pairs, Row, Target};

const GIB: u64 = 1 << 30;

/// loopvol's mkfs.ext4 options (`fs.rs`), for the stacks made by hand.
const MKFS_EXT4: &[&str] = &[
    "-q",
    "-E",
    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
];

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

fn elapsed_ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

const EXT4: Access = Access::Mount {
    fs_type: Some(FsType::Ext4),
    mount_options: Vec::new(),
};

fn options() -> PoolOptions {
    let mut options = PoolOptions::new("bench".parse().unwrap());
    // A 100 GiB thin volume may exceed the free space of a small test disk: allow overcommit, as
    // a thin-provisioning operator would.
    options.overcommit = 8.0;
    options
}

fn stage(pool: &Pool, id: &VolumeId, staging: &Path, access: &Access) -> PathBuf {
    let staging = pool.node_path("staging path", staging).unwrap();
    pool.volume(id)
        .unwrap()
        .stage(&staging, access, AccessMode::SingleNodeWriter)
        .unwrap()
        .device
}

fn unstage(pool: &Pool, id: &VolumeId, staging: &Path) {
    let staging = pool.node_path("staging path", staging).unwrap();
    pool.volume(id).unwrap().unstage(&staging).unwrap();
}

fn create(pool: &Pool, name: &str, size: u64, fs_type: Option<FsType>) -> VolumeId {
    pool.create_volume(&CreateVolume {
        name: name.into(),
        size: SizeRequest::at_least(size),
        fs_type,
        allocation: None,
        source: None,
    })
    .unwrap()
    .id
}

/// A unique suffix for the names of one run.
fn next() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// One create + stage of an ext4 volume of `size` (what provisioning to mounted means), in ms;
/// undone afterwards, untimed.
fn provision_loopvol(pool: &Pool, scratch: &Path, size: u64) -> f64 {
    let i = next();
    let staging = scratch.join(format!("stage-{i}"));
    let t = Instant::now();
    let id = create(pool, &format!("bench-{i}"), size, Some(FsType::Ext4));
    stage(pool, &id, &staging, &EXT4);
    let took = elapsed_ms(t);
    unstage(pool, &id, &staging);
    pool.delete_volume(&id).unwrap();
    took
}

/// The same work with the bare tools, in ms.
fn provision_bare(dir: &Path, size: u64) -> f64 {
    let i = next();
    let image = dir.join(format!("bare-{i}.img"));
    let mnt = dir.join(format!("bare-mnt-{i}"));
    let t = Instant::now();
    let stack = HandStack::make(&image, size, &mnt);
    let took = elapsed_ms(t);
    drop(stack);
    took
}

/// An ext4 filesystem on a loop device over an image, made by hand as loopvol makes one: the
/// image sparse in the pool, `losetup --direct-io=on --sector-size=4096`, loopvol's mkfs options,
/// mounted `nodev,nosuid`. Undone when dropped.
struct HandStack {
    image: PathBuf,
    dev: String,
    mnt: PathBuf,
}

impl HandStack {
    fn make(image: &Path, size: u64, mnt: &Path) -> HandStack {
        let img = image.to_str().unwrap();
        sh("truncate", &["-s", &size.to_string(), img]);
        let dev = sh(
            "losetup",
            &["--direct-io=on", "--sector-size=4096", "--show", "-f", img],
        )
        .trim()
        .to_owned();
        sh("mkfs.ext4", &[MKFS_EXT4, &[dev.as_str()]].concat());
        std::fs::create_dir_all(mnt).unwrap();
        sh(
            "mount",
            &["-o", "nodev,nosuid", &dev, mnt.to_str().unwrap()],
        );
        HandStack {
            image: image.to_owned(),
            dev,
            mnt: mnt.to_owned(),
        }
    }
}

impl Drop for HandStack {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// A loop device's direct-I/O flag as the kernel reports it.
fn dio(dev: &Path) -> String {
    let name = dev.file_name().unwrap().to_string_lossy();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn fio_seconds() -> String {
    std::env::var("BENCH_FIO_SECONDS").unwrap_or_else(|_| "5".into())
}

/// One fio job on `target` (a file or a device): IOPS for 4 KiB blocks, MiB/s otherwise.
fn fio(target: &Path, rw: &str, bs: &str) -> f64 {
    let out = sh(
        "fio",
        &[
            "--name=bench",
            &format!("--filename={}", target.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--size=1G",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            &format!("--runtime={}", fio_seconds()),
            "--time_based",
            "--output-format=json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("fio json");
    let job = &v["jobs"][0];
    let side = if rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    if bs == "4k" {
        side["iops"].as_f64().unwrap()
    } else {
        side["bw_bytes"].as_f64().unwrap() / f64::from(1 << 20)
    }
}

/// Writes the first GiB of `target` once, so every job reads and overwrites allocated data
/// (a hole reads without any I/O).
fn lay_out(target: &Path) {
    sh(
        "fio",
        &[
            "--name=layout",
            &format!("--filename={}", target.display()),
            "--rw=write",
            "--bs=1M",
            "--size=1G",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=8",
        ],
    );
}

const FIO_JOBS: [(&str, &str, &str, &str); 3] = [
    ("4 KiB random read", "randread", "4k", "IOPS"),
    ("4 KiB random write", "randwrite", "4k", "IOPS"),
    ("1 MiB sequential write", "write", "1M", "MiB/s"),
];

/// The fio rows: a filesystem volume vs the stack made by hand, a raw block volume vs a file in
/// the pool's filesystem.
fn fio_rows(pool: &Pool, pool_dir: &Path, scratch: &Path, pairs: usize, rows: &mut Vec<Row>) {
    // Where an image lies in the pool moves sequential writes by several percent (two stacks
    // made by hand one after the other: 0.93x, 0.88-1.04, the first against the second). So
    // each side has two copies, made in the order ours, baseline, baseline, ours, and each pair
    // takes the next copy of both: the placement cancels out of the median.
    let mut made = Vec::new();
    let mut fs_volume = |name: &str| {
        let staging = scratch.join(name);
        let id = create(pool, name, 4 * GIB, Some(FsType::Ext4));
        let dev = stage(pool, &id, &staging, &EXT4);
        made.push((id, staging.clone()));
        (staging.join("fio.dat"), dev)
    };
    let (ours_1, fs_dev) = fs_volume("fio-fs-1");
    let hand_1 = HandStack::make(
        &pool_dir.join("hand-1.img"),
        4 * GIB,
        &scratch.join("hand-1"),
    );
    let hand_2 = HandStack::make(
        &pool_dir.join("hand-2.img"),
        4 * GIB,
        &scratch.join("hand-2"),
    );
    let (ours_2, _) = fs_volume("fio-fs-2");
    let mut block_volume = |name: &str| {
        let staging = scratch.join(name);
        let id = create(pool, name, 4 * GIB, None);
        let dev = stage(pool, &id, &staging, &Access::Block);
        made.push((id, staging));
        dev
    };
    let block_1 = block_volume("fio-block-1");
    let (file_1, file_2) = (
        pool_dir.join("fio-file-1.dat"),
        pool_dir.join("fio-file-2.dat"),
    );
    lay_out(&file_1);
    lay_out(&file_2);
    let block_2 = block_volume("fio-block-2");
    let (hand_file_1, hand_file_2) = (hand_1.mnt.join("fio.dat"), hand_2.mnt.join("fio.dat"));
    for target in [
        &ours_1,
        &ours_2,
        &hand_file_1,
        &hand_file_2,
        &block_1,
        &block_2,
    ] {
        lay_out(target);
    }
    println!(
        "direct I/O (/sys/block/loopN/loop/dio): filesystem volume {}, block volume {}, by hand {}",
        dio(&fs_dev),
        dio(&block_1),
        dio(Path::new(&hand_1.dev))
    );
    for (what, rw, bs, unit) in FIO_JOBS {
        let show = |v: f64| format!("{v:.0} {unit}");
        let p = Pairs::run(
            pairs,
            by_turns([&ours_1, &ours_2], |t| fio(t, rw, bs)),
            by_turns([&hand_file_1, &hand_file_2], |t| fio(t, rw, bs)),
        );
        rows.push(Row::new(
            format!("fio {what}, filesystem volume"),
            &p,
            show,
            "same stack by hand",
            Target::AtLeast(0.97),
        ));
        let p = Pairs::run(
            pairs,
            by_turns([&block_1, &block_2], |t| fio(t, rw, bs)),
            by_turns([&file_1, &file_2], |t| fio(t, rw, bs)),
        );
        rows.push(Row::new(
            format!("fio {what}, raw block volume"),
            &p,
            show,
            "file in pool fs",
            Target::AtLeast(0.95),
        ));
    }
    drop((hand_1, hand_2));
    let _ = std::fs::remove_file(&file_1);
    let _ = std::fs::remove_file(&file_2);
    for (id, staging) in made {
        unstage(pool, &id, &staging);
        pool.delete_volume(&id).unwrap();
    }
}

/// A side of a pair that measures its copies in turns, one per call.
fn by_turns<'a>(
    copies: [&'a Path; 2],
    mut measure: impl FnMut(&Path) -> f64 + 'a,
) -> impl FnMut() -> f64 + 'a {
    let mut turn = 0;
    move || {
        turn += 1;
        measure(copies[turn % 2])
    }
}

/// The `knobs` group: each setting against loopvol's default, 4 KiB random reads on a staged
/// ext4 volume (the setting applied before its run, the default restored before the other's).
fn knob_rows(pool: &Pool, pool_dir: &Path, scratch: &Path, pairs: usize, rows: &mut Vec<Row>) {
    let staging = scratch.join("knobs");
    let id = create(pool, "knobs", 4 * GIB, Some(FsType::Ext4));
    let dev = stage(pool, &id, &staging, &EXT4);
    let file = staging.join("fio.dat");
    lay_out(&file);
    let queue = |attr: &str| {
        let name = dev.file_name().unwrap().to_string_lossy().into_owned();
        PathBuf::from(format!("/sys/block/{name}/queue/{attr}"))
    };
    let read = |p: &Path| {
        let s = std::fs::read_to_string(p).unwrap();
        // The scheduler file brackets the one in use: "[none] mq-deadline kyber".
        s.split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_owned())
            .unwrap_or_else(|| s.trim().to_owned())
    };
    let mnt = staging.to_str().unwrap().to_owned();
    let remount = |opt: &str| {
        sh("mount", &["-o", &format!("remount,{opt}"), &mnt]);
    };
    let sysfs: [(&str, &str); 6] = [
        ("iostats", "0"),
        ("nomerges", "2"),
        ("rq_affinity", "2"),
        ("scheduler", "mq-deadline"),
        ("nr_requests", "32"),
        ("add_random", "1"),
    ];
    let show = |v: f64| format!("{v:.0} IOPS");
    for (attr, value) in sysfs {
        let path = queue(attr);
        let default = read(&path);
        let set = |v: &str| std::fs::write(&path, v).unwrap();
        let p = Pairs::run(
            pairs,
            || {
                set(value);
                fio(&file, "randread", "4k")
            },
            || {
                set(&default);
                fio(&file, "randread", "4k")
            },
        );
        set(&default);
        rows.push(Row::new(
            format!("knob: queue/{attr} = {value}"),
            &p,
            show,
            &format!("loopvol's {default}"),
            Target::AtLeast(1.02),
        ));
    }
    let p = Pairs::run(
        pairs,
        || {
            remount("noatime");
            fio(&file, "randread", "4k")
        },
        || {
            remount("relatime");
            fio(&file, "randread", "4k")
        },
    );
    remount("relatime");
    rows.push(Row::new(
        "knob: inner ext4 mounted noatime",
        &p,
        show,
        "loopvol's relatime",
        Target::AtLeast(1.02),
    ));
    unstage(pool, &id, &staging);
    pool.delete_volume(&id).unwrap();

    // Logical block size: raw devices over two images in the pool, made by hand.
    let attach = |name: &str, sector: &str| {
        let image = pool_dir.join(name);
        sh("truncate", &["-s", "2G", image.to_str().unwrap()]);
        let dev = sh(
            "losetup",
            &[
                "--direct-io=on",
                &format!("--sector-size={sector}"),
                "--show",
                "-f",
                image.to_str().unwrap(),
            ],
        )
        .trim()
        .to_owned();
        lay_out(Path::new(&dev));
        (image, dev)
    };
    let (img512, dev512) = attach("lbs512.img", "512");
    let (img4k, dev4k) = attach("lbs4096.img", "4096");
    let p = Pairs::run(
        pairs,
        || fio(Path::new(&dev512), "randread", "4k"),
        || fio(Path::new(&dev4k), "randread", "4k"),
    );
    rows.push(Row::new(
        "knob: logical block size 512 (raw device)",
        &p,
        show,
        "loopvol's 4096",
        Target::AtLeast(1.02),
    ));
    for (image, dev) in [(img512, dev512), (img4k, dev4k)] {
        sh("losetup", &["-d", &dev]);
        std::fs::remove_file(image).unwrap();
    }
}

/// Fills `dir` with 1 GiB of incompressible data, synced.
fn write_gib(dir: &Path) {
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", dir.join("data").display()),
            "bs=4M",
            "count=256",
            "conv=fsync",
            "status=none",
        ],
    );
}

/// Snapshot rows: the volume at rest (vs plain `cp`) and mounted (frozen for consistency, vs
/// `fsfreeze -f; cp; fsfreeze -u`, the bare tools doing the same consistent copy).
fn snapshot_rows(
    pool_dir: &Path,
    scratch: &Path,
    label: &str,
    cp_flag: &str,
    pairs: usize,
    rows: &mut Vec<Row>,
) {
    let pool = Pool::open(pool_dir, options()).unwrap();
    let staging = scratch.join(format!("snap-stage-{label}"));
    let id = create(&pool, "snap-src", 10 * GIB, Some(FsType::Ext4));
    stage(&pool, &id, &staging, &EXT4);
    write_gib(&staging);
    let image = pool.volume_image(&id);
    let st = staging.to_str().unwrap();
    for mounted in [false, true] {
        if !mounted {
            unstage(&pool, &id, &staging);
        } else {
            stage(&pool, &id, &staging, &EXT4);
        }
        let ours = || {
            drop_caches();
            let t = Instant::now();
            let snap = pool
                .create_snapshot(&SnapshotRequest {
                    name: format!("s{}", next()),
                    source: id.clone(),
                })
                .unwrap();
            let took = elapsed_ms(t);
            pool.delete_snapshot(&snap.id).unwrap();
            took
        };
        let bare = || {
            drop_caches();
            let copy = pool_dir.join(format!("cp-{}.img", next()));
            let t = Instant::now();
            if mounted {
                sh("fsfreeze", &["-f", st]);
            }
            sh(
                "cp",
                &[cp_flag, image.to_str().unwrap(), copy.to_str().unwrap()],
            );
            if mounted {
                sh("fsfreeze", &["-u", st]);
            }
            sh("sync", &["-f", copy.to_str().unwrap()]);
            let took = elapsed_ms(t);
            std::fs::remove_file(&copy).unwrap();
            took
        };
        let p = Pairs::run(pairs, ours, bare);
        let (state, base) = if mounted {
            ("mounted, frozen", "fsfreeze + cp")
        } else {
            ("at rest", "cp")
        };
        rows.push(Row::new(
            format!("snapshot 10 GiB vol, 1 GiB data, {state} ({label})"),
            &p,
            ms,
            &format!("{base} {cp_flag}"),
            Target::AtMost(1.1),
        ));
    }
    unstage(&pool, &id, &staging);
    pool.delete_volume(&id).unwrap();
}

/// Snapshot rows on a reflink-capable pool: xfs on a loop device.
fn reflink_rows(scratch_path: &Path, pairs: usize, rows: &mut Vec<Row>) {
    let xfs_img = scratch_path.join("xfs-pool.img");
    std::fs::File::create(&xfs_img)
        .unwrap()
        .set_len(24 * GIB)
        .unwrap();
    let dev = sh("losetup", &["--show", "-f", xfs_img.to_str().unwrap()])
        .trim()
        .to_owned();
    sh("mkfs.xfs", &["-q", "-m", "reflink=1", &dev]);
    let xfs_pool = scratch_path.join("xfs-pool");
    std::fs::create_dir_all(&xfs_pool).unwrap();
    sh("mount", &[&dev, xfs_pool.to_str().unwrap()]);
    snapshot_rows(
        &xfs_pool,
        scratch_path,
        "reflink, xfs pool",
        "--reflink=always",
        pairs,
        rows,
    );
    sh("umount", &[xfs_pool.to_str().unwrap()]);
    sh("losetup", &["-d", &dev]);
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the backend benchmark needs root (loop devices, mounts)");
        std::process::exit(2);
    }
    let base = std::env::var_os("LOOPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let scratch = tempfile::Builder::new()
        .prefix("loopvol-bench-")
        .tempdir_in(base)
        .unwrap();
    let scratch_path = scratch.path().canonicalize().unwrap();
    let pool_dir = scratch_path.join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let pool = Pool::open(&pool_dir, options()).unwrap();
    let pairs = bench::pairs_from_env();
    let mut rows = Vec::new();
    // `cargo bench -p loopvol --bench backend -- snapshot` runs only the groups named; `knobs`
    // only runs when named.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |group: &str| {
        if filters.is_empty() {
            group != "knobs"
        } else {
            filters.iter().any(|f| group.contains(f.as_str()))
        }
    };
    println!("machine: {}", bench::machine());
    println!(
        "pool filesystem: {}; {pairs} interleaved pairs per row; fio runs of {} s",
        sh("stat", &["-f", "-c", "%T", pool_dir.to_str().unwrap()]).trim(),
        fio_seconds()
    );

    if wanted("provision") {
        for (label, size) in [("1 GiB", GIB), ("100 GiB", 100 * GIB)] {
            // Warm-up: the page cache of the tools, the first loop devices.
            provision_bare(&scratch_path, size);
            provision_loopvol(&pool, &scratch_path, size);
            let p = Pairs::run(
                pairs,
                || provision_loopvol(&pool, &scratch_path, size),
                || provision_bare(&scratch_path, size),
            );
            rows.push(Row::new(
                format!("provision to mounted, ext4 {label}"),
                &p,
                ms,
                "bare tools",
                Target::AtMost(1.1),
            ));
        }
    }
    let has_fio = Command::new("fio").arg("--version").output().is_ok();
    if !has_fio && (wanted("fio") || wanted("knobs")) {
        eprintln!("fio not installed: skipping the I/O rows (apt-get install fio)");
    }
    if has_fio && wanted("fio") {
        fio_rows(&pool, &pool_dir, &scratch_path, pairs, &mut rows);
    }
    if has_fio && wanted("knobs") {
        knob_rows(&pool, &pool_dir, &scratch_path, pairs, &mut rows);
    }
    if wanted("snapshot") {
        snapshot_rows(
            &pool_dir,
            &scratch_path,
            "sparse copy, ext4 pool",
            "--sparse=always",
            pairs,
            &mut rows,
        );
    }
    if wanted("reflink") {
        reflink_rows(&scratch_path, pairs, &mut rows);
    }
    println!();
    bench::print_table(&rows);
    println!("\nload average at the end: {}", bench::load_average());
}
