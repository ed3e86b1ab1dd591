//! Benchmark (not a test) of the FlexVolume binary against its baselines, in one run, in
//! interleaved pairs (see `loopvol_e2e::bench`: the median of the pairs' ratios, its spread, the
//! number of pairs):
//! - `init` wall time vs `/bin/true` (both spawned with captured output, as kubelet runs them;
//!   each side of a pair is the mean of a batch of runs); target ≤ 3×.
//! - mount + unmount of a 1 GiB ext4 volume through the binary (two processes, as kubelet runs
//!   them) vs the same backend calls made in-process (each side the mean of a few cycles);
//!   target ≤ 1.05×.
//!
//! Run as root, after a release build of the binary:
//! `cargo build --release -p loopvol-flexvolume && cargo run --release -p loopvol-flexvolume --example flexvolume-bench`
//! Environment: LOOPVOL_BENCH_DIR (default /var/tmp; must be disk-backed), BENCH_PAIRS (7),
//! BENCH_INIT_BATCH (40 runs per side of a pair), BENCH_MOUNT_BATCH (3 cycles per side),
//! BENCH_BIN (the binary to measure, e.g. the static musl build).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loopvol::testing::{loopdev, mount};
use loopvol::{Access, CreateVolume, FsType, Pool, PoolOptions, Publish, SizeRequest, VolumeId};
use loopvol_e2e::bench::{self, Pairs, Row, Target};

const GIB: u64 = 1 << 30;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The mean of `n` runs of `f`, in ms.
fn mean_ms(n: usize, mut f: impl FnMut() -> Duration) -> f64 {
    (0..n).map(|_| ms_f(f())).sum::<f64>() / n as f64
}

/// Runs a command as kubelet does (output captured) and returns its wall time and stdout.
fn timed(cmd: &mut Command) -> (Duration, String) {
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("spawn");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stderr.is_empty(), "{cmd:?} wrote to stderr");
    (elapsed, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Unmounts and detaches whatever is left under the bench dir, even after a panic.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let table = mount::mounts().unwrap_or_default();
        let mut points: Vec<&Path> = table
            .iter()
            .map(|m| m.mount_point.as_path())
            .filter(|p| p.starts_with(&self.0))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
        for dev in loopdev::list().unwrap_or_default() {
            if dev.backing_file.starts_with(&self.0) {
                let _ = loopdev::detach(&dev);
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the benchmark mounts volumes: run it as root");
        std::process::exit(2);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/bench → target/<profile>/loopvol-flexvolume
    let bin = match std::env::var_os("BENCH_BIN") {
        Some(b) => PathBuf::from(b),
        None => exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("loopvol-flexvolume"),
    };
    if !bin.is_file() {
        eprintln!(
            "{} is missing: run `cargo build --release -p loopvol-flexvolume` first",
            bin.display()
        );
        std::process::exit(2);
    }
    let base = std::env::var_os("LOOPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let dir = base.join(format!("loopvol-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pool")).unwrap();
    let dir = dir.canonicalize().unwrap();
    let _cleanup = Cleanup(dir.clone());
    let pool_dir = dir.join("pool");
    let flex = |args: &[&str]| {
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .env("LOOPVOL_POOL", &pool_dir)
            .env("LOOPVOL_LOG", dir.join("flexvolume.log"))
            .env("LOOPVOL_NODE", "bench")
            .env("LOOPVOL_ATTACH", "false");
        timed(&mut cmd)
    };

    println!("loopvol-flexvolume benchmark ({})", bin.display());

    println!("machine: {}", bench::machine());
    let pairs = bench::pairs_from_env();
    let mut rows = Vec::new();
    // init vs /bin/true: each side of a pair the mean of a batch.
    let batch = env_usize("BENCH_INIT_BATCH", 40);
    let init = Pairs::run(
        pairs,
        || {
            mean_ms(batch, || {
                let (t, out) = flex(&["init"]);
                assert!(out.contains("\"Success\""), "{out}");
                t
            })
        },
        || mean_ms(batch, || timed(&mut Command::new("/bin/true")).0),
    );
    rows.push(Row::new(
        format!("`init` (mean of {batch} runs per side)"),
        &init,
        |v| format!("{v:.3} ms"),
        "/bin/true",
        Target::AtMost(3.0),
    ));

    // mount + unmount of a 1 GiB ext4 volume: the binary vs the backend in-process, on the same
    // volume, interleaved. The first mount creates and formats it (not measured).
    let pool = Pool::open(&pool_dir, PoolOptions::new("bench".parse().unwrap())).unwrap();
    let id = "bench-1g";
    let vid = VolumeId::try_from(id).unwrap();
    pool.create_volume(&CreateVolume {
        name: id.into(),
        size: SizeRequest::at_least(GIB),
        fs_type: Some(FsType::Ext4),
        allocation: None,
        source: None,
    })
    .unwrap();
    let options = format!(
        r#"{{"volumeID":"{id}","kubernetes.io/fsType":"ext4","kubernetes.io/readwrite":"rw","kubernetes.io/pvOrVolumeName":"{id}"}}"#
    );
    let pod = dir.join("pods/uid/volumes/loopvol~loopvol").join(id);
    let pod_s = pod.display().to_string();
    std::fs::create_dir_all(&pod).unwrap();
    flex(&["mount", &pod_s, &options]);
    flex(&["unmount", &pod_s]);

    let access = Access::Mount {
        fs_type: Some(FsType::Ext4),
        mount_options: vec![],
    };
    let publish = Publish {
        staging: None,
        target: pool.node_path("pod volume dir", &pod).unwrap(),
        access,
        read_only: false,
        fs_group: None,
        exclusive: false,
    };
    let batch = env_usize("BENCH_MOUNT_BATCH", 3);
    let (mut bin_mount, mut lib_mount) = (Vec::new(), Vec::new());
    let (mut bin_unmount, mut lib_unmount) = (Vec::new(), Vec::new());
    let mut via_bin = || {
        std::fs::create_dir_all(&pod).unwrap();
        let started = Instant::now();
        flex(&["mount", &pod_s, &options]);
        let mounted = started.elapsed();
        flex(&["unmount", &pod_s]);
        let all = started.elapsed();
        bin_mount.push(mounted);
        bin_unmount.push(all - mounted);
        assert!(!pod.exists());
        all
    };
    let mut via_lib = || {
        std::fs::create_dir_all(&pod).unwrap();
        let started = Instant::now();
        // What the binary's mount does: one locked handle, stage and publish.
        pool.volume(&vid)
            .unwrap()
            .stage_and_publish(&publish)
            .unwrap();
        let mounted = started.elapsed();
        pool.release_target(&publish.target).unwrap();
        let all = started.elapsed();
        lib_mount.push(mounted);
        lib_unmount.push(all - mounted);
        assert!(!pod.exists());
        all
    };
    let cycles = Pairs::run(
        pairs,
        || mean_ms(batch, &mut via_bin),
        || mean_ms(batch, &mut via_lib),
    );
    println!(
        "mount+unmount, of which mount: binary {} vs backend {}; unmount: binary {} vs backend {} (medians)",
        ms(median(bin_mount)),
        ms(median(lib_mount)),
        ms(median(bin_unmount)),
        ms(median(lib_unmount)),
    );
    rows.push(Row::new(
        format!("mount+unmount 1 GiB ext4 (mean of {batch} per side)"),
        &cycles,
        |v| format!("{v:.2} ms"),
        "the backend alone",
        Target::AtMost(1.05),
    ));
    println!();
    bench::print_table(&rows);
    println!("\nload average at the end: {}", bench::load_average());
    pool.delete_volume(&vid).unwrap();
}
