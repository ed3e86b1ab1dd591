//! A real cluster filesystem for the shared-pool tests: GlusterFS on loopback, one volume per
//! test, mounted twice through FUSE as two "nodes" (`a` and `b`) that share one pool the way two
//! machines would, with real cross-mount `flock`, real caching and real failures (a killed FUSE
//! client answers ENOTCONN).
//!
//! [`GlusterPool::start`] starts `glusterd` when no glusterd runs, creates a one-brick volume on a
//! directory of the test's scratch dir (`force`: the brick is on the root filesystem), starts it
//! and mounts it at `<scratch>/gluster/a` and `<scratch>/gluster/b`, each with its own FUSE client
//! process (a child of the test, so a test can kill one). Dropping it, also after a failed
//! assertion, unmounts everything under the scratch dir, waits for both clients to exit, stops and
//! deletes the volume and removes the brick; the last user of a glusterd the harness started stops
//! it (one test process or several: the hold is a shared `flock`). A glusterd someone else started
//! is never stopped. Every wait is polled against a deadline.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::hazard::{self, Hazard};
use crate::{require_root, Scratch};

/// The programs the GlusterFS tests run, besides root.
pub const TOOLS: &[&str] = &["glusterd", "gluster", "glusterfs"];

/// Volume options under which a read through one mount sees a file that another mount replaced
/// (rename over it) at once. With GlusterFS's defaults, quick-read and open-behind serve the old
/// content and md-cache (stat-prefetch) the old inode, ESTALE once it is gone, for up to their
/// 1 s cache timeout, even to a reader that took the `flock` after the writer released it.
/// (Measured: open-behind and stat-prefetch off suffice for a replace by rename; quick-read is
/// off too so that no cached small-file content is ever served.)
pub const COHERENT: &[(&str, &str)] = &[
    ("performance.quick-read", "off"),
    ("performance.open-behind", "off"),
    ("performance.stat-prefetch", "off"),
];

/// The brick's host. glusterd refuses `localhost` and `127.0.0.1` by name for a brick but takes
/// any other loopback address as itself, and 127.0.0.0/8 is local on every Linux machine: no
/// dependence on the host name resolving.
const BRICK_HOST: &str = "127.0.0.2";
/// Where the FUSE clients fetch the volume's description (glusterd listens on every address).
const VOLFILE_SERVER: &str = "127.0.0.1";
/// Every volume the harness creates is named `<prefix><pid>-<n>`.
const VOLUME_PREFIX: &str = "loopvol-e2e-";
/// Written by a glusterd the harness started, and only then: the mark that it may stop it.
const GLUSTERD_PIDFILE: &str = "/run/loopvol-e2e-glusterd.pid";
/// Held exclusively while a process decides to start or stop glusterd.
const GLUSTERD_MUTEX: &str = "/run/loopvol-e2e-gluster.lock";
/// Held shared by every test process that uses glusterd.
const GLUSTERD_USERS: &str = "/run/loopvol-e2e-gluster.users";

const CLI_DEADLINE: Duration = Duration::from_secs(120);
const GLUSTERD_READY: Duration = Duration::from_secs(60);
const MOUNT_READY: Duration = Duration::from_secs(30);
const CLIENT_EXIT: Duration = Duration::from_secs(10);

/// True when the GlusterFS tests can run (root and the GlusterFS programs); otherwise it fails the
/// test, or skips it saying why when the run opts out, as [`require_root`] does.
pub fn require_gluster() -> bool {
    require_root(TOOLS)
}

/// One of the two mounts of the volume: one "node" of the shared pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    A,
    B,
}

impl Node {
    pub fn name(self) -> &'static str {
        match self {
            Node::A => "a",
            Node::B => "b",
        }
    }

    fn index(self) -> usize {
        match self {
            Node::A => 0,
            Node::B => 1,
        }
    }
}

/// A GlusterFS volume of the test's own, mounted twice. See the module's documentation.
pub struct GlusterPool<'s> {
    scratch: &'s Scratch,
    volume: String,
    brick: PathBuf,
    created: bool,
    clients: Vec<Client>,
    /// Held from the first killed client until the drop has unmounted everything.
    dead_fuse_mount: Option<Hazard>,
    // Last field: dropped after `Drop::drop` removed the volume.
    _glusterd: GlusterdHold,
}

impl<'s> GlusterPool<'s> {
    /// A volume with GlusterFS's default options (what an operator gets).
    pub fn start(scratch: &'s Scratch) -> GlusterPool<'s> {
        GlusterPool::start_with(scratch, &[])
    }

    /// A volume with `options` (`gluster volume set` keys and values) set before it starts.
    pub fn start_with(scratch: &'s Scratch, options: &[(&str, &str)]) -> GlusterPool<'s> {
        assert!(
            Path::new("/dev/fuse").exists(),
            "GlusterFS mounts need FUSE: /dev/fuse is missing (modprobe fuse)"
        );
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let volume = format!(
            "{VOLUME_PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Built step by step so that a panic half-way drops (and undoes) what exists.
        let mut pool = GlusterPool {
            scratch,
            volume,
            brick: scratch.path("gluster/brick"),
            created: false,
            clients: Vec::new(),
            dead_fuse_mount: None,
            _glusterd: GlusterdHold::acquire(),
        };
        remove_leaked_volumes();
        std::fs::create_dir_all(&pool.brick).expect("create the brick directory");
        let brick = format!("{BRICK_HOST}:{}", pool.brick.display());
        // `force`: glusterd refuses a brick on the root filesystem without it.
        gluster(&["volume", "create", &pool.volume, &brick, "force"])
            .unwrap_or_else(|e| panic!("gluster volume create {}: {e}", pool.volume));
        pool.created = true;
        for (key, value) in options {
            pool.set_option(key, value);
        }
        gluster(&["volume", "start", &pool.volume])
            .unwrap_or_else(|e| panic!("gluster volume start {}: {e}", pool.volume));
        for node in [Node::A, Node::B] {
            let dir = scratch.path(&format!("gluster/{}", node.name()));
            std::fs::create_dir_all(&dir).expect("create a mount point");
            let log = scratch.path(&format!("gluster/client-{}.log", node.name()));
            let mut client = Client {
                dir,
                log,
                child: None,
                paused: false,
            };
            client.spawn(&pool.volume);
            pool.clients.push(client);
        }
        // Both clients come up at once; then wait for each.
        for client in &mut pool.clients {
            client.wait_mounted();
        }
        pool
    }

    /// The volume's name (unique per test).
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The brick directory (the volume's data as glusterd stores it; read it only to check).
    pub fn brick(&self) -> &Path {
        &self.brick
    }

    /// Where `node` mounts the volume.
    pub fn mount_point(&self, node: Node) -> &Path {
        &self.clients[node.index()].dir
    }

    /// The pool directory as `node` sees it: `<mount>/pool`, created (like [`Scratch::pool`]).
    pub fn pool(&self, node: Node) -> PathBuf {
        let path = self.mount_point(node).join("pool");
        std::fs::create_dir_all(&path).expect("create the pool directory on the volume");
        path
    }

    /// The PID of `node`'s FUSE client (`glusterfs`), or None after [`kill_client`](Self::kill_client).
    pub fn client_pid(&self, node: Node) -> Option<u32> {
        self.clients[node.index()].child.as_ref().map(Child::id)
    }

    /// SIGKILLs `node`'s FUSE client and reaps it, as a crash would. Its mount stays, answering
    /// ENOTCONN ("Transport endpoint is not connected"), until [`remount`](Self::remount) or drop.
    /// Returns the PID it killed.
    pub fn kill_client(&mut self, node: Node) -> u32 {
        if self.dead_fuse_mount.is_none() {
            self.dead_fuse_mount = Some(hazard::dead_fuse_mount());
        }
        let client = &mut self.clients[node.index()];
        let mut child = client
            .child
            .take()
            .unwrap_or_else(|| panic!("node {}'s client is not running", node.name()));
        let pid = child.id();
        child.kill().expect("SIGKILL the glusterfs client");
        child.wait().expect("reap the glusterfs client");
        pid
    }

    /// SIGSTOPs `node`'s FUSE client: every call on its mount hangs (a hung mount) until
    /// [`resume_client`](Self::resume_client), or the drop, which resumes it first.
    pub fn pause_client(&mut self, node: Node) {
        let client = &mut self.clients[node.index()];
        client.signal(Signal::SIGSTOP);
        client.paused = true;
    }

    /// SIGCONTs `node`'s FUSE client after [`pause_client`](Self::pause_client).
    pub fn resume_client(&mut self, node: Node) {
        let client = &mut self.clients[node.index()];
        client.signal(Signal::SIGCONT);
        client.paused = false;
    }

    /// Unmounts `node`'s mount (lazily when busy, e.g. after its client was killed with files
    /// open) and mounts the volume there again with a new client.
    pub fn remount(&mut self, node: Node) {
        let volume = self.volume.clone();
        let client = &mut self.clients[node.index()];
        client.unmount();
        client.stop();
        client.spawn(&volume);
        client.wait_mounted();
    }

    /// `gluster volume set <volume> <key> <value>` (takes effect on live mounts too).
    pub fn set_option(&self, key: &str, value: &str) {
        gluster(&["volume", "set", &self.volume, key, value])
            .unwrap_or_else(|e| panic!("gluster volume set {} {key} {value}: {e}", self.volume));
    }

    /// The types of the translators `node`'s client runs now (`performance/quick-read`...), as
    /// it shows them under `<mount>/.meta/graphs/active/*/type`. Empty while it switches graphs.
    pub fn translators(&self, node: Node) -> Vec<String> {
        let graph = self.mount_point(node).join(".meta/graphs/active");
        std::fs::read_dir(graph)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("type")).ok())
                    .map(|t| t.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (bounded) until `node`'s client runs a graph with translators and none of
    /// `types`, and answers through it: a `volume set` reaches mounted clients a moment later,
    /// and a client that just switched graphs answers ENOENT for a moment even for a directory
    /// it has just made (seen: the pool's `trash/`), so a file is made, found and removed.
    pub fn wait_for_graph_without(&self, node: Node, types: &[&str]) {
        poll(
            &format!("node {}'s client graph without {types:?}", node.name()),
            MOUNT_READY,
            || {
                let now = self.translators(node);
                (!now.is_empty() && !now.iter().any(|t| types.contains(&t.as_str()))).then_some(())
            },
        );
        let probe = self
            .mount_point(node)
            .join(format!(".graph-probe-{}", node.name()));
        poll(
            &format!("node {}'s client answering on its new graph", node.name()),
            MOUNT_READY,
            || {
                let answered = std::fs::write(&probe, b"x").is_ok()
                    && std::fs::metadata(&probe).is_ok()
                    && std::fs::remove_file(&probe).is_ok();
                answered.then_some(())
            },
        );
    }

    /// `node`'s FUSE client log (for failure messages).
    pub fn client_log(&self, node: Node) -> String {
        std::fs::read_to_string(&self.clients[node.index()].log).unwrap_or_default()
    }
}

impl Drop for GlusterPool<'_> {
    fn drop(&mut self) {
        // A paused client would hang every cleanup step below.
        for client in &mut self.clients {
            if client.paused {
                client.signal(Signal::SIGCONT);
                client.paused = false;
            }
        }
        // Loop devices on the pool's images and the mounts of their filesystems keep the FUSE
        // mounts busy: everything the test left under its scratch dir goes first.
        self.scratch.cleanup_kernel_state();
        for client in &mut self.clients {
            client.stop();
        }
        if self.created {
            stop_brick(&self.volume);
            let stop: &[&str] = &["volume", "stop", &self.volume, "force"];
            let delete: &[&str] = &["volume", "delete", &self.volume];
            for args in [stop, delete] {
                if let Err(e) = gluster(args) {
                    // No panic in drop (it may run while a failed assertion unwinds).
                    eprintln!("gluster {}: {e}", args.join(" "));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.brick);
    }
}

/// One FUSE client: a `glusterfs --no-daemon` child of the test, serving one mount point.
struct Client {
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped by the test.
    paused: bool,
}

impl Client {
    fn signal(&self, sig: Signal) {
        let child = self.child.as_ref().expect("the client is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
        kill(pid, sig).unwrap_or_else(|e| panic!("{sig} the glusterfs client: {e}"));
    }

    fn spawn(&mut self, volume: &str) {
        assert!(self.child.is_none(), "{} is mounted", self.dir.display());
        // What `mount -t glusterfs` runs, kept in the foreground so the test owns the process.
        let child = Command::new("glusterfs")
            .arg("--no-daemon")
            .arg("--process-name=fuse")
            .arg(format!("--volfile-server={VOLFILE_SERVER}"))
            .arg(format!("--volfile-id={volume}"))
            .arg(format!("--log-file={}", self.log.display()))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn glusterfs");
        self.child = Some(child);
    }

    /// Polls until the FUSE mount answers (its root is inode 1, as `mount.glusterfs` checks).
    fn wait_mounted(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let child = self.child.as_mut().expect("spawned");
        let dir = self.dir.clone();
        let log = self.log.clone();
        poll(
            &format!("the FUSE mount at {}", dir.display()),
            MOUNT_READY,
            || {
                if let Some(status) = child.try_wait().expect("poll glusterfs") {
                    panic!(
                        "glusterfs for {} exited with {status}; its log:\n{}",
                        dir.display(),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let mounted = crate::mounts_under(&dir).contains(&dir)
                    && std::fs::metadata(&dir).is_ok_and(|m| m.ino() == 1);
                mounted.then_some(())
            },
        );
    }

    /// Unmounts; lazily when busy. Already unmounted is done.
    fn unmount(&mut self) {
        if !crate::mounts_under(&self.dir).contains(&self.dir) {
            return;
        }
        if let Err(e) = nix::mount::umount(&self.dir) {
            if e != nix::errno::Errno::EBUSY {
                panic!("umount {}: {e}", self.dir.display());
            }
            nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH)
                .unwrap_or_else(|e| panic!("umount -l {}: {e}", self.dir.display()));
        }
    }

    /// Waits for the client to exit after its mount went away; SIGKILLs it past the deadline (a
    /// lazily unmounted FUSE mount lives as long as something holds a file on it).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + CLIENT_EXIT;
        let mut backoff = Duration::from_millis(2);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                _ => {
                    eprintln!(
                        "glusterfs for {} did not exit within {CLIENT_EXIT:?} of its unmount: killed",
                        self.dir.display()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Only reached with a live child when GlusterPool::start panicked between spawn and push.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERMs the volume's brick process (named by the pid file glusterd keeps for it) and waits
/// for it, bounded: `gluster volume stop` then takes about 0.1 s instead of the 1 s it otherwise
/// waits for the brick. Anything unexpected is left to `volume stop`.
fn stop_brick(volume: &str) {
    let Ok(entries) = std::fs::read_dir(Path::new("/run/gluster/vols").join(volume)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if !is_running(pid, "glusterfsd") || kill(Pid::from_raw(pid), Signal::SIGTERM).is_err() {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut backoff = Duration::from_millis(1);
        while is_running(pid, "glusterfsd") && Instant::now() < deadline {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }
}

/// Runs `gluster --mode=script <args>`; Ok(stdout) or Err(what it said). glusterd serialises
/// its transactions and answers "Another transaction is in progress" (or a lock failure) to a
/// command that collides with another: those are retried, bounded.
pub fn gluster(args: &[&str]) -> Result<String, String> {
    let deadline = Instant::now() + CLI_DEADLINE;
    let mut backoff = Duration::from_millis(50);
    loop {
        let out = Command::new("gluster")
            .arg("--mode=script")
            .arg("--timeout=60")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run gluster: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let said = format!(
            "{} ({}){}",
            stdout.trim(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let busy =
            said.contains("Another transaction is in progress") || said.contains("Locking failed");
        if !busy || Instant::now() >= deadline {
            return Err(said);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The names of every volume glusterd knows.
pub fn volumes() -> Vec<String> {
    gluster(&["volume", "list"])
        .map(|out| {
            out.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && *l != "No volumes present in cluster")
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Stops and deletes this harness's volumes whose brick directory is gone: their test ended
/// without its drop (killed). A live test's brick is in its scratch dir, which exists.
fn remove_leaked_volumes() {
    let Ok(info) = gluster(&["volume", "info"]) else {
        return;
    };
    let mut name = None;
    for line in info.lines() {
        if let Some(n) = line.strip_prefix("Volume Name: ") {
            name = Some(n.trim().to_owned());
        } else if let Some(brick) = line.strip_prefix("Brick1: ") {
            let Some(vol) = name.take().filter(|n| n.starts_with(VOLUME_PREFIX)) else {
                continue;
            };
            let path = brick.trim().split_once(':').map_or("", |(_, p)| p);
            if !path.is_empty() && !Path::new(path).exists() {
                let _ = gluster(&["volume", "stop", &vol, "force"]);
                let _ = gluster(&["volume", "delete", &vol]);
            }
        }
    }
}

/// Polls `f` until it returns Some, with a short capped backoff; panics after `within`.
fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    let mut backoff = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready within {within:?}"
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

/// This process's use of glusterd: the first use starts it when none runs, the last use of the
/// machine stops it when the harness started it.
struct GlusterdHold;

struct GlusterdUsers {
    count: usize,
    shared: Option<Flock<File>>,
}

static GLUSTERD: Mutex<GlusterdUsers> = Mutex::new(GlusterdUsers {
    count: 0,
    shared: None,
});

impl GlusterdHold {
    fn acquire() -> GlusterdHold {
        let mut users = GLUSTERD.lock().unwrap_or_else(|e| e.into_inner());
        if users.count == 0 {
            let _mutex = lock_file(GLUSTERD_MUTEX, FlockArg::LockExclusiveNonblock);
            // Taken before glusterd is known to run, so no other process stops it meanwhile.
            let shared = lock_file(GLUSTERD_USERS, FlockArg::LockSharedNonblock);
            ensure_glusterd();
            users.shared = Some(shared);
        }
        users.count += 1;
        GlusterdHold
    }
}

impl Drop for GlusterdHold {
    fn drop(&mut self) {
        let mut users = GLUSTERD.lock().unwrap_or_else(|e| e.into_inner());
        users.count -= 1;
        if users.count > 0 {
            return;
        }
        let Some(shared) = users.shared.take() else {
            return;
        };
        // Under the mutex no process can start using glusterd; once our shared hold is gone an
        // exclusive one succeeds only if no other process holds one.
        let _mutex = lock_file(GLUSTERD_MUTEX, FlockArg::LockExclusiveNonblock);
        let Ok(file) = shared.unlock() else {
            return;
        };
        if let Ok(_alone) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            stop_glusterd_if_ours();
        }
    }
}

/// Opens (creating) `path` and flocks it as `arg` says, polling past contention (bounded).
fn lock_file(path: &str, arg: FlockArg) -> Flock<File> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    let deadline = Instant::now() + CLI_DEADLINE;
    let mut backoff = Duration::from_millis(2);
    loop {
        match Flock::lock(file, arg) {
            Ok(lock) => return lock,
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            Err((_, e)) => panic!("flock {path}: {e}"),
        }
    }
}

/// Starts glusterd unless one runs (then waits until it answers).
fn ensure_glusterd() {
    if glusterd_pids().is_empty() {
        let _ = std::fs::remove_file(GLUSTERD_PIDFILE);
        // glusterd daemonises once it is initialised (about 2 s): its exit status is that of
        // its initialisation.
        let status = Command::new("glusterd")
            .arg(format!("--pid-file={GLUSTERD_PIDFILE}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run glusterd");
        assert!(
            status.success(),
            "glusterd failed to start ({status}); see /var/log/glusterfs/glusterd.log"
        );
    }
    poll("glusterd", GLUSTERD_READY, || {
        gluster(&["pool", "list"]).ok().map(drop)
    });
}

/// Stops glusterd if the harness started it (its pid file names a running glusterd).
fn stop_glusterd_if_ours() {
    let Some(pid) = std::fs::read_to_string(GLUSTERD_PIDFILE)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    if glusterd_pids().contains(&pid) {
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut backoff = Duration::from_millis(5);
        while glusterd_pids().contains(&pid.as_raw()) {
            if Instant::now() >= deadline {
                eprintln!("glusterd {pid} ignored SIGTERM for 30 s: killed");
                let _ = kill(pid, Signal::SIGKILL);
                break;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }
    let _ = std::fs::remove_file(GLUSTERD_PIDFILE);
}

/// PIDs of running glusterd processes.
fn glusterd_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| is_running(pid, "glusterd"))
        .collect()
}

/// Whether `pid` runs a program named `comm` (zombies excluded: a daemon's parent may never reap
/// it).
fn is_running(pid: i32, comm: &str) -> bool {
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces, so split at ") ".
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (head, tail) = s.rsplit_once(") ")?;
            let name = head.split_once(" (")?.1;
            Some(name == comm && !tail.starts_with('Z'))
        })
        .unwrap_or(false)
}
