//! Shared helpers for the end-to-end tests in `tests/tests/`: the root/tool gate that turns a
//! skip into a failure under CI, a temporary pool that cleans up exactly what a test made, and
//! the paths of the built binaries.

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
    let reason = format!("needs {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("under CI every skip is a failure: this test {reason}");
    }
    eprintln!("SKIPPED: this test {reason}");
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
    for dev in loopvol::loopdev::list().unwrap_or_default() {
        let backing = dev.backing_file.to_string_lossy();
        let backing = backing.trim_end_matches(" (deleted)");
        if Path::new(backing).starts_with(root) {
            let _ = loopvol::loopdev::detach(&dev);
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
    loopvol::loopdev::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.backing_file.starts_with(root))
        .map(|d| d.path())
        .collect()
}
