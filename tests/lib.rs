//! Shared helpers for the end-to-end tests in `tests/tests/`: the root/tool gate that turns a
//! skip into a failure under CI, a temporary pool that cleans up exactly what a test made, and
//! the paths of the built binaries.

pub mod gluster;

use std::path::{Path, PathBuf};
use std::process::Command;

/// True when the test may touch the kernel (root, and every tool in `tools` on PATH). Otherwise
/// prints why it skips and returns false; under CI (`CI=true`) a skip is a failure.
pub fn require_root(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_owned());
    }
    for tool in tools {
        if !on_path(tool) {
            missing.push(format!("{tool} (not installed)"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "under CI every skip is a failure: this test needs {}",
            missing.join(", ")
        );
    }
    // Straight to the process's stderr, not through the test harness's capture: a skip must be
    // visible in a normal run, not only with --nocapture.
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {name}: needs {}\n", missing.join(", ")).as_bytes(),
    );
    false
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false)
}

/// The tools each filesystem needs.
pub fn fs_tools(fs: &str) -> &'static [&'static str] {
    match fs {
        "ext4" => &["mkfs.ext4", "blkid", "resize2fs", "e2fsck"],
        "xfs" => &["mkfs.xfs", "blkid", "xfs_growfs"],
        "btrfs" => &["mkfs.btrfs", "blkid", "btrfs"],
        other => panic!("unknown fs {other}"),
    }
}

/// A temporary directory for a test: the pool (`pool()`) and scratch paths (`path()`) live in it.
/// On drop, even after a failed assertion, it unmounts every mount under it (deepest first) and
/// detaches every loop device whose image is under it, then removes it. Nothing else is touched.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    pub fn new() -> Self {
        // Under /var/tmp (disk-backed): loop direct I/O needs a real filesystem, not tmpfs.
        let base = std::env::var_os("LOOPVOL_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = tempfile::Builder::new()
            .prefix("loopvol-test-")
            .tempdir_in(base)
            .expect("temp dir");
        Scratch { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().canonicalize().expect("canonical scratch")
    }

    /// The pool directory (created).
    pub fn pool(&self) -> PathBuf {
        let p = self.root().join("pool");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A path under the scratch dir (not created), e.g. a staging or target path.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    /// Unmounts and detaches everything under the scratch dir.
    pub fn cleanup_kernel_state(&self) {
        cleanup_under(&self.root());
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.cleanup_kernel_state();
    }
}

/// Unmounts every mount point under `root` (deepest first) and detaches loop devices backed by
/// files under `root`.
pub fn cleanup_under(root: &Path) {
    // Loops first: once a pool mounted under `root` is (lazily) unmounted, sysfs shows its images'
    // paths relative to that mount and they no longer match. A busy device detaches on last close.
    detach_loops_under(root);
    for _ in 0..4 {
        let mut points: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(root))
            .collect();
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    detach_loops_under(root);
}

fn detach_loops_under(root: &Path) {
    for dev in loopvol::testing::loopdev::list().unwrap_or_default() {
        let backing = dev.backing_file.to_string_lossy();
        let backing = backing.trim_end_matches(" (deleted)");
        if Path::new(backing).starts_with(root) {
            let _ = loopvol::testing::loopdev::detach(&dev);
        }
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Path of a workspace binary built by `cargo build --workspace --bins` (tests live in another
/// package, so Cargo's CARGO_BIN_EXE_* is not available here).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build --workspace --bins` before the tests (the README's test command does)",
        path.display()
    );
    path
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Mount points currently under `root` (for asserting a failed call left nothing behind).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Loop devices whose images are under `root`.
pub fn loops_under(root: &Path) -> Vec<PathBuf> {
    loopvol::testing::loopdev::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.backing_file.starts_with(root))
        .map(|d| d.path())
        .collect()
}

/// A running `loopvol-csi` for a test, on its own socket (`<scratch>/<name>.sock`) and log
/// (`<scratch>/<name>.log`); SIGKILLed and reaped on drop.
pub struct CsiServer {
    name: String,
    args: Vec<String>,
    child: Option<std::process::Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl CsiServer {
    /// Starts `loopvol-csi --endpoint=unix://<socket> <args…>` and waits until it listens.
    pub fn start(scratch: &Scratch, name: &str, args: &[String]) -> CsiServer {
        let mut server = CsiServer::spawn(scratch, name, args);
        server.wait_listening();
        server
    }

    /// Starts it without waiting (several servers can then come up at once).
    pub fn spawn(scratch: &Scratch, name: &str, args: &[String]) -> CsiServer {
        let mut server = CsiServer {
            name: name.to_owned(),
            args: args.to_vec(),
            child: None,
            socket: scratch.path(&format!("{name}.sock")),
            log: scratch.path(&format!("{name}.log")),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let child = Command::new(binary("loopvol-csi"))
            .arg(format!("--endpoint=unix://{}", self.socket.display()))
            .args(&self.args)
            .env("LOOPVOL_LOG", &self.log)
            .env("RUST_LOG", "info")
            .env_remove("CSI_ENDPOINT")
            .env_remove("LOOPVOL_POOL")
            .env_remove("LOOPVOL_NODE")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn loopvol-csi");
        self.child = Some(child);
    }

    /// Starts it again with the same arguments after it exited (a restart after SIGKILL).
    pub fn restart(&mut self) {
        self.launch();
        self.wait_listening();
    }

    /// Polls until the server accepts connections (bounded); fails with its log if it exits.
    pub fn wait_listening(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket())
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("poll loopvol-csi") {
                panic!(
                    "{} exited with {status} before listening; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not listen within 20 s",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("poll loopvol-csi").is_none())
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("signal loopvol-csi");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit. Async, so the test's client connections keep
    /// being served while a server drains them.
    pub async fn wait_exit(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("poll loopvol-csi") {
                self.child = None;
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not exit within {within:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// SIGTERM, as Kubernetes stops the pod: the server must exit 0 and remove its socket.
    pub async fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(std::time::Duration::from_secs(30)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{} after SIGTERM: {status}; log:\n{}",
            self.name,
            self.log_text()
        );
        assert!(
            !self.socket.exists(),
            "{} left its socket after SIGTERM",
            self.name
        );
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        loopvol_proto::connect_unix(&self.socket)
            .await
            .expect("connect to the CSI socket")
    }
}

impl Drop for CsiServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
