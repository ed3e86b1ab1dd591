//! Load benchmark for `loopvol-csi` (not a test). As root:
//!
//! ```text
//! cargo build --release -p loopvol-csi --bins --examples && target/release/examples/csi-bench [VOLUMES] [LISTED]
//! ```
//!
//! 1. One CSI lifecycle (CreateVolume, NodeStage, NodePublish, NodeUnpublish, NodeUnstage,
//!    DeleteVolume of a 1 GiB ext4 volume) at 1 worker against the bare tools doing the same
//!    steps (`truncate`, `losetup --direct-io`, `mkfs.ext4`, `mount`, bind mount, and back), in
//!    interleaved pairs (`BENCH_PAIRS`, default 7; each side of a pair is the mean of 3): the
//!    median ratio and its spread.
//! 2. The lifecycles of VOLUMES (default 200) volumes with 1, 8 and 32 concurrent workers over the
//!    real socket: per-RPC p50/p99 and lifecycles per second.
//! 3. LISTED (default 10 000) volumes in the pool, made by the backend as CreateVolume makes them
//!    (sparse 1 GiB images and their metadata), in parallel, timed; and LISTED / 10 snapshots.
//!    Then, over the socket (medians of 20 calls with their spread): a full ListVolumes, one page
//!    of 100 (from every part of the listing), GetCapacity, CreateVolume with a few volumes in
//!    the pool and with LISTED (20 calls each, one at a time: what admission costs as the pool
//!    grows), ListSnapshots full and by page, and the server's RSS (peak and now).
//!
//! ```text
//! target/release/examples/csi-bench gluster [PAIRS] [HELD] [LISTED]
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
//!    second, and the node plugin's CPU per renewal round and per second at the default interval;
//! 3. with LISTED (default 500) volumes in the pool (the held ones and more, made by the
//!    backend): CreateVolume (its admission reads every volume) and a full ListVolumes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loopvol::{CreateVolume, FsType, Pool, PoolOptions, SizeRequest, SnapshotRequest, VolumeId};
use loopvol_e2e::bench::{self, Pairs, Row, Summary, Target};
use loopvol_proto::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::{AccessMode, AccessType, MountVolume};
use tonic::transport::Channel;

const GIB: u64 = 1 << 30;
/// The pool's overcommit, for the server and for the volumes the backend makes beside it.
const OVERCOMMIT: f64 = 4096.0;

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
        // 1 GiB thin volumes that stay nearly empty: 10 000 of them (the listing rows) promise
        // 10 TiB, more than a test disk times any usual overcommit.
        .arg(format!("--overcommit={OVERCOMMIT}"))
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

/// How many calls answered ABORTED and were retried, as a CO retries them.
static RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Calls `call` until it answers anything but ABORTED (another call holds the volume: the CO
/// retries it), then expects success. The time of the retries counts.
async fn retried<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::Aborted => {
                RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            other => return other.unwrap_or_else(|e| panic!("{what}: {e}")).into_inner(),
        }
    }
}

/// One full lifecycle; returns each RPC's latency in RPCS order.
async fn lifecycle(ch: &Channel, dir: &Path, name: &str) -> [Duration; 6] {
    let t = timed_lifecycle(ch, dir, name, None).await;
    [t[0], t[2], t[3], t[4], t[5], t[7]]
}

/// One full lifecycle, claimed for `node` on a shared pool (`None`: node-local); returns each
/// RPC's latency in SHARED_RPCS order (zero for the claim's when there is none). A call that
/// answers ABORTED is retried, as a CO does, and its retries count in its time.
async fn timed_lifecycle(
    ch: &Channel,
    dir: &Path,
    name: &str,
    node: Option<&str>,
) -> [Duration; 8] {
    let ctl = ControllerClient::new(ch.clone());
    let nd = NodeClient::new(ch.clone());
    let staging = dir.join("kubelet/staging").join(name).display().to_string();
    let target = dir
        .join("kubelet/pods")
        .join(name)
        .join("mount")
        .display()
        .to_string();
    let mut t = [Duration::ZERO; 8];

    let s = Instant::now();
    let id = retried("CreateVolume", || {
        let mut c = ctl.clone();
        let request = create_request(name, GIB as i64);
        async move { c.create_volume(request).await }
    })
    .await
    .volume
    .unwrap()
    .volume_id;
    t[0] = s.elapsed();
    if let Some(node) = node {
        let s = Instant::now();
        retried("ControllerPublishVolume", || {
            let mut c = ctl.clone();
            let request = pb::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.into(),
                volume_capability: Some(cap()),
                ..Default::default()
            };
            async move { c.controller_publish_volume(request).await }
        })
        .await;
        t[1] = s.elapsed();
    }
    let s = Instant::now();
    retried("NodeStageVolume", || {
        let mut c = nd.clone();
        let request = pb::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap()),
            ..Default::default()
        };
        async move { c.node_stage_volume(request).await }
    })
    .await;
    t[2] = s.elapsed();
    let s = Instant::now();
    retried("NodePublishVolume", || {
        let mut c = nd.clone();
        let request = pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap()),
            ..Default::default()
        };
        async move { c.node_publish_volume(request).await }
    })
    .await;
    t[3] = s.elapsed();
    let s = Instant::now();
    retried("NodeUnpublishVolume", || {
        let mut c = nd.clone();
        let request = pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.clone(),
        };
        async move { c.node_unpublish_volume(request).await }
    })
    .await;
    t[4] = s.elapsed();
    let s = Instant::now();
    retried("NodeUnstageVolume", || {
        let mut c = nd.clone();
        let request = pb::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
        };
        async move { c.node_unstage_volume(request).await }
    })
    .await;
    t[5] = s.elapsed();
    if let Some(node) = node {
        let s = Instant::now();
        retried("ControllerUnpublishVolume", || {
            let mut c = ctl.clone();
            let request = pb::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.into(),
                ..Default::default()
            };
            async move { c.controller_unpublish_volume(request).await }
        })
        .await;
        t[6] = s.elapsed();
    }
    let s = Instant::now();
    retried("DeleteVolume", || {
        let mut c = ctl.clone();
        let request = pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        };
        async move { c.delete_volume(request).await }
    })
    .await;
    t[7] = s.elapsed();
    t
}

/// Unmounts and detaches whatever is left under the benchmark's directory, and removes it, even
/// after a panic (declared before the server, so it runs after the server is gone).
struct Cleanup {
    dir: PathBuf,
    /// False for a directory kept between runs (`BENCH_KEEP_DIR`).
    remove: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        loopvol_e2e::cleanup_under(&self.dir);
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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
    bare_lifecycle_parts(images, mounts, i).0
}

/// [`bare_lifecycle_in`], and the part of it a node's calls do (all but making and removing the
/// image: losetup, mkfs, the mounts and back).
fn bare_lifecycle_parts(images: &Path, mounts: &Path, i: usize) -> (Duration, Duration) {
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
    let node_start = Instant::now();
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
    let node = node_start.elapsed();
    std::fs::remove_file(&image).unwrap();
    (start.elapsed(), node)
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

/// What `/proc/<pid>/status` says of a memory field (`VmHWM`, `VmRSS`), in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (peak RSS in KiB, CPU seconds used) of a process.
fn proc_usage(pid: u32) -> (u64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    (proc_kib(pid, "VmHWM"), ticks / 100.0)
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The mean time of `n` lifecycles, in ms.
async fn lifecycles_ms(ch: &Channel, dir: &Path, n: usize) -> f64 {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let name = format!("pair-{}", next());
        total += lifecycle(ch, dir, &name).await.iter().sum::<Duration>();
    }
    ms_f(total) / n as f64
}

/// The mean time of `n` lifecycles with the bare tools, in ms.
fn bare_ms(dir: &Path, n: usize) -> f64 {
    let total: Duration = (0..n).map(|_| bare_lifecycle(dir, next())).sum();
    ms_f(total) / n as f64
}

fn next() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f` over `0..n` on as many threads as `threads`, each index once; returns each call's
/// time, in index order.
fn in_parallel(n: usize, threads: usize, f: impl Fn(usize) + Sync) -> Vec<Duration> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let times = std::sync::Mutex::new(vec![Duration::ZERO; n]);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                f(i);
                times.lock().unwrap()[i] = t.elapsed();
            });
        }
    });
    times.into_inner().unwrap()
}

/// p50 of a slice of times, in ms.
fn p50_ms(times: &[Duration]) -> String {
    let mut t = times.to_vec();
    t.sort();
    ms(percentile(&t, 0.5))
}

/// `calls` timed calls of `f` (given the call's number), summarized in ms.
async fn timed_calls<F, Fut>(calls: usize, mut f: F) -> Summary
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = Vec::with_capacity(calls);
    for i in 0..calls {
        let s = Instant::now();
        f(i).await;
        times.push(ms_f(s.elapsed()));
    }
    Summary::of(&times)
}

/// Every `next_token` of a listing paged by 100 (the first page's is ""), from `list`.
async fn page_tokens<F, Fut>(mut list: F) -> Vec<String>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut tokens = vec![String::new()];
    loop {
        let next = list(tokens.last().unwrap().clone()).await;
        if next.is_empty() {
            return tokens;
        }
        tokens.push(next);
    }
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
        let listed = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(500);
        gluster::run(pairs, held, listed).await;
        return;
    }
    let volumes: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(200);
    let listed: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(10_000);
    let pairs = bench::pairs_from_env();
    let base = std::env::var("LOOPVOL_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    // BENCH_KEEP_DIR: run in (and keep) this directory, so that a second run finds its
    // volumes made (creates are idempotent); BENCH_ONLY=listing: only the listing section.
    let keep = std::env::var_os("BENCH_KEEP_DIR").map(PathBuf::from);
    let listing_only = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "listing");
    let dir = match &keep {
        Some(d) => {
            std::fs::create_dir_all(d).unwrap();
            d.canonicalize().unwrap()
        }
        None => tempdir(Path::new(&base)),
    };
    let _cleanup = Cleanup {
        dir: dir.clone(),
        remove: keep.is_none(),
    };
    let _ = std::fs::remove_file(dir.join("csi.sock"));
    let server = start_server(&dir);
    let ch = channel(&server.socket).await;
    println!("machine: {}", bench::machine());
    if !listing_only {
        lifecycle_section(&ch, &dir, &server, pairs, volumes).await;
    }
    listing_section(&ch, &dir, &server, listed).await;
    println!(
        "\ncalls answered ABORTED and retried: {}",
        RETRIES.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("load average at the end: {}", bench::load_average());
}

/// One lifecycle against the bare tools, in pairs; then lifecycles at 1, 8 and 32 workers.
async fn lifecycle_section(
    ch: &Channel,
    dir: &Path,
    server: &Server,
    pairs: usize,
    volumes: usize,
) {
    let (ch, dir) = (ch.clone(), dir.to_path_buf());
    // Warm up (page cache, first loop devices), then ours and the bare tools in pairs.
    lifecycle(&ch, &dir, "warmup").await;
    bare_lifecycle(&dir, next());
    let mut lifecycle_pairs = Pairs::default();
    for i in 0..pairs {
        let (ours, bare) = if i % 2 == 0 {
            let o = lifecycles_ms(&ch, &dir, 3).await;
            (o, bare_ms(&dir, 3))
        } else {
            let b = bare_ms(&dir, 3);
            (lifecycles_ms(&ch, &dir, 3).await, b)
        };
        lifecycle_pairs.push(ours, bare);
    }

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
        rpc_table(&RPCS, &mut per_rpc);
    }
    println!();
    bench::print_table(&[Row::new(
        "one lifecycle, 1 worker (mean of 3 per side of a pair)",
        &lifecycle_pairs,
        |v| format!("{v:.1} ms"),
        "bare tools",
        Target::AtMost(1.2),
    )]);
}

/// A pool of `listed` volumes and a tenth as many snapshots: ListVolumes, GetCapacity,
/// ListSnapshots and the server's memory.
async fn listing_section(ch: &Channel, dir: &Path, server: &Server, listed: usize) {
    let in_pool = || std::fs::read_dir(dir.join("pool/volumes")).map_or(0, |d| d.count());
    let (few, create_few) = (in_pool(), create_calls(ch, "few").await);
    // A pool of `listed` volumes (and a tenth as many snapshots), made by the backend as
    // CreateVolume and CreateSnapshot make them, in parallel: the server sees them appear in its
    // pool as it would another process's.
    let mut options = PoolOptions::new("bench".parse().unwrap());
    options.overcommit = OVERCOMMIT;
    let pool = Pool::open(dir.join("pool"), options).unwrap();
    let threads = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let start = Instant::now();
    let create_times = in_parallel(listed, threads, |i| {
        pool.create_volume(&CreateVolume {
            name: format!("many-{i:05}"),
            size: SizeRequest::at_least(GIB),
            fs_type: Some(FsType::Ext4),
            allocation: None,
            source: None,
        })
        .expect("create");
    });
    let tenth = (listed / 10).max(1);
    println!(
        "\nsetup: {listed} volumes created in {:.1} s ({threads} threads through the backend); \
         create p50 {} ms for the first {tenth}, {} ms for the last {tenth}",
        start.elapsed().as_secs_f64(),
        p50_ms(&create_times[..tenth]),
        p50_ms(&create_times[listed - tenth..]),
    );
    let snapshots = tenth;
    let start = Instant::now();
    let snap_times = in_parallel(snapshots, threads, |i| {
        pool.create_snapshot(&SnapshotRequest {
            name: format!("snap-{i:05}"),
            source: VolumeId::try_from(format!("many-{:05}", i % 16)).unwrap(),
        })
        .expect("snapshot");
    });
    println!(
        "setup: {snapshots} snapshots (of 16 volumes) created in {:.1} s; p50 {} ms",
        start.elapsed().as_secs_f64(),
        p50_ms(&snap_times),
    );

    // The index trusts a record only once it is older than its racy window (2 s): a pool's
    // volumes were not all made in the last two seconds, so wait that out.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let calls = 20;
    let ctl = ControllerClient::new(ch.clone());
    let list_volumes = |max: i32, token: String| {
        let mut c = ctl.clone();
        async move {
            c.list_volumes(pb::ListVolumesRequest {
                max_entries: max,
                starting_token: token,
            })
            .await
            .expect("ListVolumes")
            .into_inner()
        }
    };
    let list_snapshots = |max: i32, token: String| {
        let mut c = ctl.clone();
        async move {
            c.list_snapshots(pb::ListSnapshotsRequest {
                max_entries: max,
                starting_token: token,
                ..Default::default()
            })
            .await
            .expect("ListSnapshots")
            .into_inner()
        }
    };
    // The server's memory as it goes: started, after paging through every volume by 100 (the
    // index holds every record), after full listings (a whole listing's reply at once).
    let pid = server.child.id();
    let rss = || proc_kib(pid, "VmRSS") as f64 / 1024.0;
    let started_rss = rss();
    // The first pass reads every record once (what a restarted server does); the timed calls
    // after it are served by the index, as a running server's are.
    let first = Instant::now();
    let tokens = page_tokens(|t| async { list_volumes(100, t).await.next_token }).await;
    let first = first.elapsed();
    let paged_rss = rss();
    let all = list_volumes(0, String::new()).await;
    assert_eq!(all.entries.len(), listed);
    assert!(all.entries.iter().all(|e| e
        .status
        .as_ref()
        .and_then(|s| s.volume_condition.as_ref())
        .is_some_and(|c| !c.abnormal)));
    drop(all);
    let full = timed_calls(calls, |_| async {
        assert_eq!(list_volumes(0, String::new()).await.entries.len(), listed);
    })
    .await;
    let full_rss = rss();
    let page = timed_calls(calls, |i| {
        let token = tokens[(i * 7) % tokens.len()].clone();
        async move {
            assert!(!list_volumes(100, token).await.entries.is_empty());
        }
    })
    .await;
    let capacity = timed_calls(calls, |_| async {
        ctl.clone()
            .get_capacity(pb::GetCapacityRequest::default())
            .await
            .expect("GetCapacity");
    })
    .await;
    let create_many = create_calls(ch, "many").await;
    assert_eq!(
        list_snapshots(0, String::new()).await.entries.len(),
        snapshots
    );
    let snaps_full = timed_calls(calls, |_| async {
        list_snapshots(0, String::new()).await;
    })
    .await;
    let snap_tokens = page_tokens(|t| async { list_snapshots(100, t).await.next_token }).await;
    let snaps_page = timed_calls(calls, |i| {
        let token = snap_tokens[(i * 7) % snap_tokens.len()].clone();
        async move {
            list_snapshots(100, token).await;
        }
    })
    .await;
    let peak = proc_kib(pid, "VmHWM") as f64 / 1024.0;
    println!(
        "\nfirst pass over the listing, by pages of 100 (every record read once): {:.1} ms",
        ms_f(first)
    );
    println!(
        "server RSS: {started_rss:.1} MiB started, {paged_rss:.1} MiB once the index holds every \
         record, {full_rss:.1} MiB after full listings"
    );
    println!("\n| what | median (min–max) | calls | target |");
    println!("|---|---|---|---|");
    let row = |what: String, s: Summary, target: &str| {
        println!("| {what} | {s} ms | {} | {target} |", s.n);
    };
    row(
        format!("ListVolumes, {listed} volumes, full listing"),
        full,
        "< 50 ms",
    );
    row(
        format!("ListVolumes, {listed} volumes, one page of 100"),
        page,
        "< 2 ms",
    );
    row(format!("GetCapacity, {listed} volumes"), capacity, "cheap");
    row(
        format!("CreateVolume, {few} volumes in the pool"),
        create_few,
        "",
    );
    row(
        format!("CreateVolume, {listed} volumes in the pool"),
        create_many,
        "",
    );
    row(
        format!("ListSnapshots, {snapshots} snapshots, full listing"),
        snaps_full,
        "",
    );
    row(
        format!("ListSnapshots, {snapshots} snapshots, one page of 100"),
        snaps_page,
        "< 2 ms",
    );
    println!(
        "| server RSS with {listed} volumes, peak (now) | {peak:.1} MiB ({:.1} MiB) | | < 30 MiB |",
        rss()
    );
}

/// 20 CreateVolume calls over the socket, one at a time, each timed (each volume deleted after
/// it, untimed): what admission costs with the pool as it is.
async fn create_calls(ch: &Channel, tag: &str) -> Summary {
    let mut ctl = ControllerClient::new(ch.clone());
    let mut times = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        let id = ctl
            .create_volume(create_request(format!("create-{tag}-{i}"), GIB as i64))
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        times.push(ms_f(start.elapsed()));
        ctl.delete_volume(pb::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    }
    Summary::of(&times)
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

    fn lease_counter(pool: &Path) -> u64 {
        std::fs::read_to_string(pool.join("leases/bench"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The pool work no shared-pool lifecycle that keeps DESIGN.md's contract can skip, done with
    /// bare system calls on the pool's mount: every one of the eight calls holds the volume's
    /// lock (here a lock file kept open, as the server keeps it), the seven after CreateVolume
    /// read the volume's record, and six write it durably (a new file, fsync, rename over):
    /// CreateVolume; ControllerPublish (the claim); NodeStage twice (the hold with the format
    /// intent before mkfs, the finished format after it, before the device is handed out);
    /// NodeUnstage (the hold); ControllerUnpublish (the claim). Left out, so the sum is a lower
    /// bound: everything the bare tools do too (the image, its removal) and the rest of a
    /// create and a delete (the volume's directory, the space admission, the trash).
    struct ClaimsMinimum {
        dir: PathBuf,
        lock: Option<std::fs::File>,
    }

    impl ClaimsMinimum {
        const WHAT: &str = "8 lock cycles, 7 record reads, 6 durable record writes";

        fn new(dir: &Path) -> ClaimsMinimum {
            std::fs::create_dir_all(dir).unwrap();
            let lock = std::fs::File::create(dir.join("v.lock")).unwrap();
            let min = ClaimsMinimum {
                dir: dir.to_owned(),
                lock: Some(lock),
            };
            min.write();
            min
        }

        fn lock_cycle(&mut self) {
            use nix::fcntl::{Flock, FlockArg};
            let file = self.lock.take().unwrap();
            let held = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .unwrap_or_else(|(_, e)| panic!("lock: {e}"));
            self.lock = Some(held.unlock().unwrap_or_else(|(_, e)| panic!("unlock: {e}")));
        }

        fn read(&self) {
            let record = std::fs::read(self.dir.join("volume.json")).unwrap();
            assert!(!record.is_empty());
        }

        fn write(&self) {
            use std::io::Write;
            let tmp = self.dir.join(".volume.json.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .unwrap();
            f.write_all(&[b' '; 400]).unwrap();
            f.sync_all().unwrap();
            drop(f);
            std::fs::rename(&tmp, self.dir.join("volume.json")).unwrap();
        }

        /// One lifecycle's worth, in the calls' order; the time it took.
        fn run(&mut self) -> Duration {
            let start = Instant::now();
            // Per call: (reads its record, writes it).
            let calls = [
                (false, true), // CreateVolume
                (true, true),  // ControllerPublishVolume
                (true, true),  // NodeStageVolume: the hold and the intent ...
                (true, false), // NodePublishVolume
                (true, false), // NodeUnpublishVolume
                (true, true),  // NodeUnstageVolume
                (true, true),  // ControllerUnpublishVolume
                (true, false), // DeleteVolume
            ];
            for (k, (reads, writes)) in calls.into_iter().enumerate() {
                self.lock_cycle();
                if reads {
                    self.read();
                }
                if writes {
                    self.write();
                }
                if k == 2 {
                    // ... and the format, recorded after mkfs.
                    self.write();
                }
            }
            start.elapsed()
        }
    }

    impl Drop for ClaimsMinimum {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub async fn run(pairs: usize, held: usize, listed: usize) {
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
        let minimum_dir = gp.mount_point(Node::A).join("minimum");
        let mut minimum = ClaimsMinimum::new(&minimum_dir);
        let mut pairs_of = Pairs::default();
        // The bare tools plus the claims' minimum, against the bare tools alone (same pairs).
        let mut floor_of = Pairs::default();
        // The lifecycle against the bare tools plus the claims' minimum, and that minimum (ms).
        let (mut over_floor, mut claims_ms) = (Pairs::default(), Vec::new());
        // The node's four calls against the bare tools' steps between losetup and losetup -d.
        let mut node_of = Pairs::default();
        let mut per_rpc: Vec<Vec<Duration>> = vec![Vec::new(); 8];
        for i in 0..pairs {
            let bare_first = (i % 2 == 1).then(|| bare_lifecycle_parts(&bare_dir, &dir, i));
            let t = timed_lifecycle(&ch, &dir, &format!("pair-{i}"), Some("bench")).await;
            for (k, d) in t.iter().enumerate() {
                per_rpc[k].push(*d);
            }
            let (bare, bare_node) =
                bare_first.unwrap_or_else(|| bare_lifecycle_parts(&bare_dir, &dir, i));
            let claims = minimum.run();
            pairs_of.push(ms_f(t.iter().sum::<Duration>()), ms_f(bare));
            floor_of.push(ms_f(bare + claims), ms_f(bare));
            over_floor.push(ms_f(t.iter().sum::<Duration>()), ms_f(bare + claims));
            claims_ms.push(ms_f(claims));
            // NodeStage, NodePublish, NodeUnpublish, NodeUnstage.
            node_of.push(ms_f(t[2..6].iter().sum::<Duration>()), ms_f(bare_node));
        }
        println!("GlusterFS pool (one brick on loopback, the volume with {COHERENT:?}):");
        bench::print_table(&[Row::new(
            "one shared-pool lifecycle",
            &pairs_of,
            |v| format!("{v:.1} ms"),
            "bare tools on the same mount",
            Target::AtMost(1.1),
        )]);
        println!(
            "the claims' minimum ({}), bare system calls on the same mount: {:.1} ms a lifecycle; the bare tools plus it (a driver made of the tools and claims): {} × the bare tools; loopvol: {} × that",
            ClaimsMinimum::WHAT,
            Summary::of(&claims_ms).median,
            floor_of.ratio(),
            over_floor.ratio(),
        );
        println!(
            "the node's calls (NodeStage, NodePublish, NodeUnpublish, NodeUnstage: {:.1} ms) against the bare tools' steps from losetup to losetup -d ({:.1} ms): {} ×",
            node_of.ours().median,
            node_of.base().median,
            node_of.ratio(),
        );
        rpc_table(&SHARED_RPCS, &mut per_rpc);
        drop(minimum);
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

        // 3. A pool of `listed` volumes: CreateVolume's admission and a full listing read every
        // volume's image attributes (and records) from the server.
        let mut options = PoolOptions::new("bench".parse().unwrap());
        options.shared = true;
        options.overcommit = OVERCOMMIT;
        let backend = Pool::open(&pool, options).unwrap();
        let start = Instant::now();
        in_parallel(listed.saturating_sub(held), 8, |i| {
            backend
                .create_volume(&CreateVolume::blank(format!("many-{i:05}"), GIB))
                .expect("create");
        });
        let in_pool = count_volumes(&ch).await;
        println!(
            "\nsetup: {in_pool} volumes in the pool ({:.1} s, 8 threads through the backend)",
            start.elapsed().as_secs_f64()
        );
        let create = create_calls(&ch, "many").await;
        let full = timed_calls(20, |_| async {
            assert_eq!(count_volumes(&ch).await, in_pool);
        })
        .await;
        println!("| what | median (min–max) | calls |");
        println!("|---|---|---|");
        println!(
            "| CreateVolume, {in_pool} volumes in the pool | {create} ms | {} |",
            create.n
        );
        println!(
            "| ListVolumes, {in_pool} volumes, full listing | {full} ms | {} |",
            full.n
        );
        drop(server);
    }

    /// How many volumes a full ListVolumes over the socket returns.
    async fn count_volumes(ch: &Channel) -> usize {
        ControllerClient::new(ch.clone())
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries
            .len()
    }
}
