//! Load benchmark for `loopvol-csi` (not a test). As root:
//!
//! ```text
//! cargo build --release -p loopvol-csi --bins --examples && target/release/examples/csi-bench [VOLUMES] [LIST_VOLUMES]
//! ```
//!
//! 1. The bare tools doing one lifecycle's steps (`truncate`, `losetup --direct-io`, `mkfs.ext4`,
//!    `mount`, bind mount, and back), as the reference.
//! 2. The full CSI lifecycle (CreateVolume, NodeStage, NodePublish, NodeUnpublish, NodeUnstage,
//!    DeleteVolume) of VOLUMES (default 200) 1 GiB ext4 volumes, with 1, 8 and 32 concurrent
//!    workers, over the real socket: per-RPC p50/p99 and lifecycles per second.
//! 3. LIST_VOLUMES (default 1000) volumes in the pool: ListVolumes time and the server's peak RSS.
//!
//! ```text
//! target/release/examples/csi-bench gluster [PAIRS] [HELD]
//! ```
//!
//! On a GlusterFS volume of its own (the test harness's: glusterd on loopback, the volume with the
//! options a shared pool needs), a `--shared-pool` server:
//!
//! 1. PAIRS (default 30) interleaved pairs of one shared-pool lifecycle (CreateVolume,
//!    ControllerPublish, NodeStage, NodePublish, NodeUnpublish, NodeUnstage, ControllerUnpublish,
//!    DeleteVolume) and the bare tools doing the same steps on the same mount: each side's median,
//!    the median ratio and its spread;
//! 2. the lease renewal cost of a node holding HELD (default 100) staged volumes: lease writes per
//!    second, and the node plugin's CPU per renewal round and per second at the default interval.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loopvol_proto::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::{AccessMode, AccessType, MountVolume};
use tonic::transport::Channel;

const GIB: u64 = 1 << 30;

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path) -> Server {
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    start_server_with(dir, &[format!("--pool={}", pool.display())])
}

/// The server on `<dir>/csi.sock` with `args` (the pool among them).
fn start_server_with(dir: &Path, args: &[String]) -> Server {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/examples/csi-bench → target/<profile>/loopvol-csi
    let bin = exe.parent().unwrap().parent().unwrap().join("loopvol-csi");
    assert!(
        bin.is_file(),
        "build it first: cargo build --release --bins --examples"
    );
    let socket = dir.join("csi.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(bin)
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .args(args)
        .arg("--node-id=bench")
        // 1 GiB thin volumes; only a few exist at once, and they stay nearly empty.
        .arg("--overcommit=64")
        .env("LOOPVOL_LOG", dir.join("csi.log"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    Server { child, socket }
}

async fn channel(socket: &Path) -> Channel {
    loopvol_proto::connect_unix(socket).await.unwrap()
}

/// CreateVolume of an ext4 volume `name` of `bytes`.
fn create_request(name: impl Into<String>, bytes: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        ..Default::default()
    }
}

fn cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

const RPCS: [&str; 6] = [
    "CreateVolume",
    "NodeStageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeUnstageVolume",
    "DeleteVolume",
];

/// A shared pool's lifecycle: the node-local one's, with the controller's claim around the
/// node's calls.
const SHARED_RPCS: [&str; 8] = [
    "CreateVolume",
    "ControllerPublishVolume",
    "NodeStageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeUnstageVolume",
    "ControllerUnpublishVolume",
    "DeleteVolume",
];

/// One full lifecycle; returns each RPC's latency in RPCS order.
async fn lifecycle(ch: &Channel, dir: &Path, name: &str) -> [Duration; 6] {
    let t = timed_lifecycle(ch, dir, name, None).await;
    [t[0], t[2], t[3], t[4], t[5], t[7]]
}

/// One full lifecycle, claimed for `node` on a shared pool (`None`: node-local); returns each
/// RPC's latency in SHARED_RPCS order (zero for the claim's when there is none).
async fn timed_lifecycle(
    ch: &Channel,
    dir: &Path,
    name: &str,
    node: Option<&str>,
) -> [Duration; 8] {
    let mut ctl = ControllerClient::new(ch.clone());
    let mut nd = NodeClient::new(ch.clone());
    let staging = dir.join("kubelet/staging").join(name);
    let target = dir.join("kubelet/pods").join(name).join("mount");
    let mut t = [Duration::ZERO; 8];
    let mut timed = |i: usize, start: Instant| t[i] = start.elapsed();

    let s = Instant::now();
    let id = ctl
        .create_volume(create_request(name, GIB as i64))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    timed(0, s);
    if let Some(node) = node {
        let s = Instant::now();
        ctl.controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.into(),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await
        .expect("ControllerPublishVolume");
        timed(1, s);
    }
    let s = Instant::now();
    nd.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap()),
        ..Default::default()
    })
    .await
    .expect("NodeStageVolume");
    timed(2, s);
    let s = Instant::now();
    nd.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap()),
        ..Default::default()
    })
    .await
    .expect("NodePublishVolume");
    timed(3, s);
    let s = Instant::now();
    nd.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .expect("NodeUnpublishVolume");
    timed(4, s);
    let s = Instant::now();
    nd.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .expect("NodeUnstageVolume");
    timed(5, s);
    if let Some(node) = node {
        let s = Instant::now();
        ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublishVolume");
        timed(6, s);
    }
    let s = Instant::now();
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .expect("DeleteVolume");
    timed(7, s);
    t
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The same steps with the bare tools (what a shell script would do).
fn bare_lifecycle(dir: &Path, i: usize) -> Duration {
    bare_lifecycle_in(dir, dir, i)
}

/// [`bare_lifecycle`] with the image in `images` and the mount points in `mounts`.
fn bare_lifecycle_in(images: &Path, mounts: &Path, i: usize) -> Duration {
    let start = Instant::now();
    let image = images.join(format!("bare-{i}.img"));
    let staging = mounts.join(format!("bare-{i}-staging"));
    let target = mounts.join(format!("bare-{i}-target"));
    let (img, st, tg) = (
        image.display().to_string(),
        staging.display().to_string(),
        target.display().to_string(),
    );
    sh("truncate", &["-s", "1G", &img]);
    let dev = sh(
        "losetup",
        &[
            "--direct-io=on",
            "--sector-size=4096",
            "--find",
            "--show",
            &img,
        ],
    );
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            &dev,
        ],
    );
    std::fs::create_dir_all(&staging).unwrap();
    sh("mount", &["-o", "nodev,nosuid", &dev, &st]);
    std::fs::create_dir_all(&target).unwrap();
    sh("mount", &["--bind", &st, &tg]);
    sh("umount", &[&tg]);
    std::fs::remove_dir(&target).unwrap();
    sh("umount", &[&st]);
    std::fs::remove_dir(&staging).unwrap();
    sh("losetup", &["-d", &dev]);
    std::fs::remove_file(&image).unwrap();
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Each RPC's p50 and p99, one line each.
fn rpc_table(rpcs: &[&str], per_rpc: &mut [Vec<Duration>]) {
    println!("  {:<26} {:>9} {:>9}", "rpc", "p50 ms", "p99 ms");
    for (name, times) in rpcs.iter().zip(per_rpc.iter_mut()) {
        times.sort();
        println!(
            "  {:<26} {:>9} {:>9}",
            name,
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.99))
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// (peak RSS in KiB, CPU seconds used) of a process.
fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    (hwm, ticks / 100.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the benchmark needs root (loop devices, mounts)"
    );
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("gluster") {
        let pairs = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(30);
        let held = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(100);
        gluster::run(pairs, held).await;
        return;
    }
    let volumes: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(200);
    let listed: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(1000);
    let base = std::env::var("LOOPVOL_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempdir(Path::new(&base));
    let server = start_server(&dir);
    let ch = channel(&server.socket).await;

    // Warm up (page cache, first loop devices), then the bare tools as the reference.
    lifecycle(&ch, &dir, "warmup").await;
    bare_lifecycle(&dir, 0);
    let reps = 30.min(volumes.max(1));
    let mut bare: Vec<Duration> = (0..reps).map(|i| bare_lifecycle(&dir, i)).collect();
    bare.sort();
    println!(
        "bare tools, one lifecycle (truncate, losetup, mkfs.ext4, mount, bind, umount x2, losetup -d, rm), {reps} runs: p50 {} ms",
        ms(percentile(&bare, 0.5))
    );

    let mut one_worker_p50 = Duration::ZERO;
    for workers in [1usize, 8, 32] {
        let per_rpc: Vec<Vec<Duration>> = vec![Vec::new(); 6];
        let per_rpc = std::sync::Arc::new(std::sync::Mutex::new(per_rpc));
        let lifecycles = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (_, cpu_before) = proc_usage(server.child.id());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (ch, dir, per_rpc, lifecycles, next) = (
                ch.clone(),
                dir.clone(),
                per_rpc.clone(),
                lifecycles.clone(),
                next.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= volumes {
                        break;
                    }
                    let t = lifecycle(&ch, &dir, &format!("w{workers}-{i}")).await;
                    let mut p = per_rpc.lock().unwrap();
                    for (k, d) in t.iter().enumerate() {
                        p[k].push(*d);
                    }
                    lifecycles.lock().unwrap().push(t.iter().sum::<Duration>());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let wall = start.elapsed();
        let (_, cpu_after) = proc_usage(server.child.id());
        let mut per_rpc = per_rpc.lock().unwrap().clone();
        let mut lc = lifecycles.lock().unwrap().clone();
        lc.sort();
        println!(
            "\n{workers} worker(s): {volumes} lifecycles in {:.2} s = {:.1} lifecycles/s; lifecycle p50 {} ms p99 {} ms; server CPU {:.2} s",
            wall.as_secs_f64(),
            volumes as f64 / wall.as_secs_f64(),
            ms(percentile(&lc, 0.5)),
            ms(percentile(&lc, 0.99)),
            cpu_after - cpu_before
        );
        if workers == 1 {
            one_worker_p50 = percentile(&lc, 0.5);
        }
        rpc_table(&RPCS, &mut per_rpc);
    }
    println!(
        "\none lifecycle at 1 worker / bare tools: {:.2}x (target <= 1.2x)",
        one_worker_p50.as_secs_f64() / percentile(&bare, 0.5).as_secs_f64()
    );

    // Many volumes in the pool: listing and memory.
    let mut ctl = ControllerClient::new(ch.clone());
    let mut create = Vec::new();
    let start = Instant::now();
    for chunk in (0..listed).collect::<Vec<_>>().chunks(32) {
        let mut batch = Vec::new();
        for i in chunk {
            let mut c = ctl.clone();
            let name = format!("many-{i:05}");
            batch.push(tokio::spawn(async move {
                let s = Instant::now();
                c.create_volume(create_request(name, GIB as i64))
                    .await
                    .expect("CreateVolume");
                s.elapsed()
            }));
        }
        for b in batch {
            create.push(b.await.unwrap());
        }
    }
    create.sort();
    println!(
        "\n{listed} volumes created in {:.2} s (32 at a time): CreateVolume p50 {} ms p99 {} ms",
        start.elapsed().as_secs_f64(),
        ms(percentile(&create, 0.5)),
        ms(percentile(&create, 0.99))
    );
    let mut list = Vec::new();
    for _ in 0..20 {
        let s = Instant::now();
        let reply = ctl
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        list.push(s.elapsed());
        assert_eq!(reply.entries.len(), listed);
    }
    list.sort();
    let (rss, cpu) = proc_usage(server.child.id());
    println!(
        "ListVolumes over {listed} volumes: p50 {} ms p99 {} ms (target < 50 ms)",
        ms(percentile(&list, 0.5)),
        ms(percentile(&list, 0.99))
    );
    println!(
        "server peak RSS {:.1} MiB (target < 30 MiB), CPU {cpu:.2} s in all",
        rss as f64 / 1024.0
    );
    for i in 0..listed {
        ctl.delete_volume(pb::DeleteVolumeRequest {
            volume_id: format!("many-{i:05}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(base: &Path) -> PathBuf {
    let dir = base.join(format!("loopvol-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// The GlusterFS rows (see the module's documentation).
mod gluster {
    use super::*;
    use loopvol_e2e::gluster::{GlusterPool, Node, COHERENT};
    use loopvol_e2e::Scratch;

    fn ratio_line(what: &str, ours: &mut [Duration], bare: &mut [Duration]) {
        let mut ratios: Vec<f64> = ours
            .iter()
            .zip(bare.iter())
            .map(|(o, b)| o.as_secs_f64() / b.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        ours.sort();
        bare.sort();
        let q = |p: f64| ratios[((ratios.len() - 1) as f64 * p).round() as usize];
        println!(
            "{what}: loopvol p50 {} ms, bare tools p50 {} ms; ratio median {:.2}x (p25-p75 {:.2}-{:.2}, min-max {:.2}-{:.2}, {} interleaved pairs)",
            ms(percentile(ours, 0.5)),
            ms(percentile(bare, 0.5)),
            q(0.5),
            q(0.25),
            q(0.75),
            ratios[0],
            ratios[ratios.len() - 1],
            ratios.len()
        );
    }

    fn lease_counter(pool: &Path) -> u64 {
        std::fs::read_to_string(pool.join("leases/bench"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn run(pairs: usize, held: usize) {
        let scratch = Scratch::new();
        let gp = GlusterPool::start_with(&scratch, COHERENT);
        let pool = gp.pool(Node::A);
        let dir = scratch.path("bench");
        std::fs::create_dir_all(&dir).unwrap();
        let bare_dir = gp.mount_point(Node::A).join("bare");
        std::fs::create_dir_all(&bare_dir).unwrap();
        let shared = |extra: &[&str]| {
            let mut a = vec![
                format!("--pool={}", pool.display()),
                "--shared-pool".to_owned(),
            ];
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };

        // 1. Interleaved pairs, the order alternating.
        let server = start_server_with(&dir, &shared(&[]));
        let ch = channel(&server.socket).await;
        timed_lifecycle(&ch, &dir, "warmup", Some("bench")).await;
        bare_lifecycle_in(&bare_dir, &dir, 0);
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        let mut per_rpc: Vec<Vec<Duration>> = vec![Vec::new(); 8];
        for i in 0..pairs {
            if i % 2 == 1 {
                bare.push(bare_lifecycle_in(&bare_dir, &dir, i));
            }
            let t = timed_lifecycle(&ch, &dir, &format!("pair-{i}"), Some("bench")).await;
            for (k, d) in t.iter().enumerate() {
                per_rpc[k].push(*d);
            }
            ours.push(t.iter().sum::<Duration>());
            if i % 2 == 0 {
                bare.push(bare_lifecycle_in(&bare_dir, &dir, i));
            }
        }
        println!("GlusterFS pool (one brick on loopback, the volume with {COHERENT:?}):");
        ratio_line(
            "one shared-pool lifecycle vs the bare tools on the same mount",
            &mut ours,
            &mut bare,
        );
        rpc_table(&SHARED_RPCS, &mut per_rpc);
        drop(ch);
        drop(server);

        // 2. The lease keeper of a node holding `held` staged volumes, renewing every 0.25 s (to
        // count many rounds in a short window), scaled to the default interval.
        let interval = 0.25;
        let server = start_server_with(
            &dir,
            &shared(&["--lease-interval=0.25", "--lease-timeout=30"]),
        );
        let ch = channel(&server.socket).await;
        let mut ctl = ControllerClient::new(ch.clone());
        let mut nd = NodeClient::new(ch.clone());
        for i in 0..held {
            let id = ctl
                .create_volume(create_request(format!("held-{i}"), 64 << 20))
                .await
                .expect("CreateVolume")
                .into_inner()
                .volume
                .unwrap()
                .volume_id;
            ctl.controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: "bench".into(),
                volume_capability: Some(cap()),
                ..Default::default()
            })
            .await
            .expect("ControllerPublishVolume");
            nd.node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: dir.join(format!("held/{i}")).display().to_string(),
                volume_capability: Some(cap()),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
        }
        let window = Duration::from_secs(10);
        // The node's FUSE client does the renewals' and reads' work too.
        let client = gp.client_pid(Node::A).expect("node-a's client");
        let (_, client_before) = proc_usage(client);
        let (_, cpu_before) = proc_usage(server.child.id());
        // Read through the node's own mount (the other mount's page cache would serve a stale
        // copy of a file rewritten in place).
        let counter_before = lease_counter(&pool);
        tokio::time::sleep(window).await;
        let (_, cpu_after) = proc_usage(server.child.id());
        let (_, client_after) = proc_usage(client);
        let rounds = lease_counter(&pool).saturating_sub(counter_before).max(1);
        let per_round = |cpu: f64| cpu / rounds as f64;
        let (server_cpu, client_cpu) = (
            per_round(cpu_after - cpu_before),
            per_round(client_after - client_before),
        );
        println!(
            "lease keeper with {held} staged volumes: {rounds} rounds in {:.0} s at {interval} s; per round (one lease write + fsync, {held} metadata reads) {:.2} ms CPU in the plugin + {:.2} ms in the FUSE client; at the default 2 s interval: 0.5 lease writes/s, {:.0} metadata reads/s, {:.3} % of a CPU",
            window.as_secs_f64(),
            server_cpu * 1000.0,
            client_cpu * 1000.0,
            held as f64 / 2.0,
            (server_cpu + client_cpu) / 2.0 * 100.0
        );
        for i in 0..held {
            let _ = nd
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: format!("held-{i}"),
                    staging_target_path: dir.join(format!("held/{i}")).display().to_string(),
                })
                .await;
        }
        drop(server);
    }
}
