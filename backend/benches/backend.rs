//! Backend benchmark (not a test): loopvol against the bare tools doing the same work, in the same
//! run, printed as ratios. Needs root, fio, mkfs.ext4 and a reflink-capable filesystem (made here
//! on a loop device) for the reflink row.
//!
//!     cargo bench -p loopvol --bench backend
//!
//! Rows:
//! - provision to mounted (create + attach + format + mount) of 1 GiB and 100 GiB ext4 volumes vs
//!   `truncate`, `losetup --direct-io=on`, `mkfs.ext4 -E nodiscard,lazy_itable_init=1`, `mount`;
//! - fio 4 KiB random read / write IOPS and 1 MiB sequential write throughput, direct I/O, in a
//!   mounted volume vs the same job on a file in the pool's own filesystem;
//! - snapshot of a 10 GiB volume holding 1 GiB of data vs `cp --sparse=always`, and on an xfs pool
//!   vs `cp --reflink=always`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use loopvol::{
    Access, AccessMode, CreateVolume, FsType, Pool, PoolOptions, SizeRequest, SnapshotRequest,
    VolumeId,
};

const GIB: u64 = 1 << 30;

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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Row {
    what: String,
    loopvol: String,
    baseline: String,
    ratio: f64,
    target: &'static str,
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

const EXT4: Access = Access::Mount {
    fs_type: Some(FsType::Ext4),
    mount_options: Vec::new(),
};

fn options() -> PoolOptions {
    PoolOptions::new("bench".parse().unwrap())
}

fn stage(pool: &Pool, id: &VolumeId, staging: &Path) {
    let staging = pool.node_path("staging path", staging).unwrap();
    pool.volume(id)
        .unwrap()
        .stage(&staging, &EXT4, AccessMode::SingleNodeWriter)
        .unwrap();
}

fn unstage(pool: &Pool, id: &VolumeId, staging: &Path) {
    let staging = pool.node_path("staging path", staging).unwrap();
    pool.volume(id).unwrap().unstage(&staging).unwrap();
}

/// Creates a thin ext4 volume and stages it at `staging`: what provisioning to mounted means.
fn create_and_stage(pool: &Pool, name: &str, size: u64, staging: &Path) -> VolumeId {
    let m = pool
        .create_volume(&CreateVolume {
            name: name.into(),
            size: SizeRequest::at_least(size),
            fs_type: Some(FsType::Ext4),
            allocation: None,
            source: None,
        })
        .unwrap();
    stage(pool, &m.id, staging);
    m.id
}

/// Median time of create + stage for an ext4 volume of `size`.
fn provision_loopvol(pool: &Pool, scratch: &Path, size: u64, runs: usize) -> Duration {
    let mut times = Vec::new();
    for i in 0..runs {
        let name = format!("bench-{size}-{i}");
        let staging = scratch.join(format!("stage-{i}"));
        let t = Instant::now();
        let id = create_and_stage(pool, &name, size, &staging);
        times.push(t.elapsed());
        unstage(pool, &id, &staging);
        pool.delete_volume(&id).unwrap();
    }
    median(times)
}

/// The same work with the bare tools.
fn provision_bare(dir: &Path, size: u64, runs: usize) -> Duration {
    let mut times = Vec::new();
    for i in 0..runs {
        let image = dir.join(format!("bare-{i}.img"));
        let mnt = dir.join(format!("bare-mnt-{i}"));
        let t = Instant::now();
        sh(
            "truncate",
            &["-s", &size.to_string(), image.to_str().unwrap()],
        );
        let dev = sh(
            "losetup",
            &["--direct-io=on", "--show", "-f", image.to_str().unwrap()],
        )
        .trim()
        .to_owned();
        sh(
            "mkfs.ext4",
            &["-q", "-E", "nodiscard,lazy_itable_init=1", &dev],
        );
        std::fs::create_dir_all(&mnt).unwrap();
        sh("mount", &[&dev, mnt.to_str().unwrap()]);
        times.push(t.elapsed());
        sh("umount", &[mnt.to_str().unwrap()]);
        sh("losetup", &["-d", &dev]);
        std::fs::remove_file(&image).unwrap();
    }
    median(times)
}

fn fio(file: &Path, rw: &str, bs: &str, size: &str) -> f64 {
    let out = sh(
        "fio",
        &[
            "--name=bench",
            &format!("--filename={}", file.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--size={size}"),
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            "--runtime=5",
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
        side["bw_bytes"].as_f64().unwrap() / (1 << 20) as f64
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
fn snapshot_rows(pool_dir: &Path, scratch: &Path, label: &str, cp_flag: &str, rows: &mut Vec<Row>) {
    let mut options = options();
    options.overcommit = 8.0;
    let pool = Pool::open(pool_dir, options).unwrap();
    let staging = scratch.join(format!("snap-stage-{label}"));
    let id = create_and_stage(&pool, "snap-src", 10 * GIB, &staging);
    write_gib(&staging);
    let image = pool.volume_image(&id);
    for mounted in [false, true] {
        if !mounted {
            unstage(&pool, &id, &staging);
        } else {
            stage(&pool, &id, &staging);
        }
        let mut ours = Vec::new();
        let mut bare = Vec::new();
        for i in 0..3 {
            drop_caches();
            let t = Instant::now();
            let snap = pool
                .create_snapshot(&SnapshotRequest {
                    name: format!("s{i}"),
                    source: id.clone(),
                })
                .unwrap();
            ours.push(t.elapsed());
            pool.delete_snapshot(&snap.id).unwrap();
            drop_caches();
            let copy = pool_dir.join(format!("cp-{i}.img"));
            let t = Instant::now();
            if mounted {
                sh("fsfreeze", &["-f", staging.to_str().unwrap()]);
            }
            sh(
                "cp",
                &[cp_flag, image.to_str().unwrap(), copy.to_str().unwrap()],
            );
            if mounted {
                sh("fsfreeze", &["-u", staging.to_str().unwrap()]);
            }
            sh("sync", &["-f", copy.to_str().unwrap()]);
            bare.push(t.elapsed());
            std::fs::remove_file(&copy).unwrap();
        }
        let (o, b) = (median(ours), median(bare));
        let (state, base) = if mounted {
            ("mounted, frozen", "fsfreeze + cp")
        } else {
            ("at rest", "cp")
        };
        rows.push(Row {
            what: format!("snapshot 10 GiB vol, 1 GiB data, {state} ({label})"),
            loopvol: format!("{:.1} ms", ms(o)),
            baseline: format!("{:.1} ms ({base} {cp_flag})", ms(b)),
            ratio: o.as_secs_f64() / b.as_secs_f64(),
            target: "≤ 1.1",
        });
    }
    unstage(&pool, &id, &staging);
    pool.delete_volume(&id).unwrap();
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
    // A 100 GiB thin volume may exceed the free space of a small test disk: allow overcommit, as a
    // thin-provisioning operator would.
    let mut options = options();
    options.overcommit = 8.0;
    let pool = Pool::open(&pool_dir, options).unwrap();
    let mut rows = Vec::new();
    // `cargo bench -p loopvol --bench backend -- snapshot` runs only the groups named.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted =
        |group: &str| filters.is_empty() || filters.iter().any(|f| group.contains(f.as_str()));

    for (label, size) in [("1 GiB", GIB), ("100 GiB", 100 * GIB)]
        .into_iter()
        .filter(|_| wanted("provision"))
    {
        // Interleave to spread any drift in the machine evenly over both sides.
        let runs = 7;
        provision_bare(&scratch_path, size, 1); // warm-up: page cache of the tools
        let bare = provision_bare(&scratch_path, size, runs);
        let ours = provision_loopvol(&pool, &scratch_path, size, runs);
        rows.push(Row {
            what: format!("provision to mounted, ext4 {label}"),
            loopvol: format!("{:.1} ms", ms(ours)),
            baseline: format!("{:.1} ms (bare tools)", ms(bare)),
            ratio: ours.as_secs_f64() / bare.as_secs_f64(),
            target: "≤ 1.1",
        });
    }

    if !wanted("fio") {
    } else if Command::new("fio").arg("--version").output().is_ok() {
        let staging = scratch_path.join("fio-stage");
        let id = create_and_stage(&pool, "fio", 4 * GIB, &staging);
        let inside = staging.join("fio.dat");
        let outside = pool_dir.join("fio-baseline.dat");
        for (what, rw, bs, unit) in [
            ("fio 4 KiB random read", "randread", "4k", "IOPS"),
            ("fio 4 KiB random write", "randwrite", "4k", "IOPS"),
            ("fio 1 MiB sequential write", "write", "1M", "MiB/s"),
        ] {
            let ours = fio(&inside, rw, bs, "1G");
            let bare = fio(&outside, rw, bs, "1G");
            rows.push(Row {
                what: what.into(),
                loopvol: format!("{ours:.0} {unit}"),
                baseline: format!("{bare:.0} {unit} (file in pool fs)"),
                ratio: ours / bare,
                target: "≥ 0.9",
            });
        }
        let _ = std::fs::remove_file(&outside);
        unstage(&pool, &id, &staging);
        pool.delete_volume(&id).unwrap();
    } else {
        eprintln!("fio not installed: skipping the I/O rows (apt-get install fio)");
    }

    if wanted("snapshot") {
        snapshot_rows(
            &pool_dir,
            &scratch_path,
            "sparse copy, ext4 pool",
            "--sparse=always",
            &mut rows,
        );
    }
    if wanted("reflink") {
        reflink_rows(&scratch_path, &mut rows);
    }

    print_table(&pool_dir, rows);
}

/// Snapshot rows on a reflink-capable pool: xfs on a loop device.
fn reflink_rows(scratch_path: &Path, rows: &mut Vec<Row>) {
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
        rows,
    );
    sh("umount", &[xfs_pool.to_str().unwrap()]);
    sh("losetup", &["-d", &dev]);
}

fn print_table(pool_dir: &Path, rows: Vec<Row>) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "machine: {} cores, {cpu}, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        sh("uname", &["-r"]).trim()
    );
    println!(
        "pool filesystem: {}",
        sh("stat", &["-f", "-c", "%T", pool_dir.to_str().unwrap()]).trim()
    );
    println!();
    println!("| what | loopvol | baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} | {} |",
            r.what, r.loopvol, r.baseline, r.ratio, r.target
        );
    }
}
