//! Benchmark (not a test) of the FlexVolume binary against its baselines, in one run:
//! - `init` wall time vs `/bin/true` (both spawned with captured output, as kubelet runs them);
//!   target ≤ 3×.
//! - mount + unmount of a 1 GiB ext4 volume through the binary (two processes, as kubelet runs
//!   them) vs the same backend calls made in-process; target ≤ 1.05×.
//!
//! Run as root, after a release build of the binary:
//! `cargo build --release -p loopvol-flexvolume && cargo run --release -p loopvol-flexvolume --example flexvolume-bench`
//! Environment: LOOPVOL_BENCH_DIR (default /var/tmp; must be disk-backed), BENCH_INIT_RUNS (300),
//! BENCH_MOUNT_RUNS (20), BENCH_BIN (the binary to measure, e.g. the static musl build).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loopvol::testing::{loopdev, mount};
use loopvol::{Access, CreateVolume, FsType, Pool, PoolOptions, Publish, SizeRequest, VolumeId};

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

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len() as u32
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
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

    // init vs /bin/true, interleaved so drift hits both alike.
    let runs = env_usize("BENCH_INIT_RUNS", 300);
    let (mut init, mut truth) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        truth.push(timed(&mut Command::new("/bin/true")).0);
        let (t, out) = flex(&["init"]);
        assert!(out.contains("\"Success\""), "{out}");
        init.push(t);
    }
    let (mi, mt) = (median(init.clone()), median(truth.clone()));
    println!(
        "init:      median {} (mean {}) vs /bin/true median {} (mean {}) over {runs} runs: {:.2}× (target ≤ 3×)",
        ms(mi),
        ms(mean(&init)),
        ms(mt),
        ms(mean(&truth)),
        mi.as_secs_f64() / mt.as_secs_f64()
    );

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
    let runs = env_usize("BENCH_MOUNT_RUNS", 20);
    let (mut via_bin, mut via_lib) = (Vec::new(), Vec::new());
    let (mut bin_mount, mut lib_mount) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        std::fs::create_dir_all(&pod).unwrap();
        let started = Instant::now();
        flex(&["mount", &pod_s, &options]);
        let mounted = started.elapsed();
        flex(&["unmount", &pod_s]);
        via_bin.push(started.elapsed());
        bin_mount.push(mounted);
        assert!(!pod.exists());

        std::fs::create_dir_all(&pod).unwrap();
        let started = Instant::now();
        // What the binary's mount does: one locked handle, stage and publish.
        pool.volume(&vid)
            .unwrap()
            .stage_and_publish(&publish)
            .unwrap();
        let mounted = started.elapsed();
        pool.release_target(&publish.target).unwrap();
        via_lib.push(started.elapsed());
        lib_mount.push(mounted);
        assert!(!pod.exists());
    }
    let unmount_part = |all: &[Duration], mount: &[Duration]| {
        all.iter()
            .zip(mount)
            .map(|(a, m)| *a - *m)
            .collect::<Vec<_>>()
    };
    println!(
        "  of which mount: binary {} vs backend {}; unmount: binary {} vs backend {}",
        ms(median(bin_mount.clone())),
        ms(median(lib_mount.clone())),
        ms(median(unmount_part(&via_bin, &bin_mount))),
        ms(median(unmount_part(&via_lib, &lib_mount))),
    );
    let (mb, ml) = (median(via_bin.clone()), median(via_lib.clone()));
    println!(
        "mount+unmount 1 GiB ext4: binary median {} (mean {}) vs backend median {} (mean {}) over {runs} runs: {:.3}× (target ≤ 1.05×)",
        ms(mb),
        ms(mean(&via_bin)),
        ms(ml),
        ms(mean(&via_lib)),
        mb.as_secs_f64() / ml.as_secs_f64()
    );
    pool.delete_volume(&vid).unwrap();
}
