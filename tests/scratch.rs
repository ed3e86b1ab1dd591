//! A temporary directory per test, holding its pool and its paths, and the cleanup of exactly
//! what the test made there.

use std::path::{Path, PathBuf};

use crate::kernel;

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

    /// A pool directory on a filesystem of its own: a `mib` MiB image of `fs` (`ext4`, or `xfs`
    /// with reflinks: at least 300 MiB) under the scratch dir, on a loop device, mounted at
    /// `<scratch>/<fs>-pool-<mib>`. For tests of space: its free space is small and known, and
    /// filling it touches nothing else. Unmounted and detached with everything else on drop.
    /// ext4 is made without blocks reserved for root, so root sees all of its free space.
    pub fn small_pool(&self, fs: &str, mib: u64) -> PathBuf {
        let image = self.path(&format!("{fs}-pool-{mib}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        let dev = kernel::attach(&image);
        let mut mkfs = std::process::Command::new(format!("mkfs.{fs}"));
        match fs {
            "ext4" => mkfs.args(["-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=1"]),
            "xfs" => mkfs.args(["-q", "-f", "-K", "-m", "reflink=1"]),
            other => panic!("small_pool: no {other}"),
        };
        let (code, _, err) = crate::run(mkfs.arg(dev.path()));
        assert_eq!(code, 0, "mkfs.{fs}: {err}");
        let dir = self.path(&format!("{fs}-pool-{mib}"));
        std::fs::create_dir_all(&dir).unwrap();
        kernel::mount_device(&dev.path(), &dir, fs);
        dir
    }

    /// The image file of volume `id` in the pool (the layout both front ends share).
    pub fn image(&self, id: &str) -> PathBuf {
        self.pool().join("volumes").join(id).join("image")
    }

    /// Opens the scratch pool as node `node` (creating its layout), as a front end does when it
    /// starts; on a `shared` pool that registers the node, as its node plugin would.
    pub fn open_pool(&self, node: &str, shared: bool) -> loopvol::Pool {
        let node = node
            .parse()
            .unwrap_or_else(|e| panic!("node name {node:?}: {e}"));
        let mut options = loopvol::PoolOptions::new(node);
        options.shared = shared;
        let pool = loopvol::Pool::open(self.pool(), options).expect("open the scratch pool");
        if shared {
            pool.register_node().expect("register the node");
        }
        pool
    }

    /// Holds volume `id`'s lock, as a call in another process would, until the guard drops.
    pub fn hold_volume_lock(&self, id: &str) -> nix::fcntl::Flock<std::fs::File> {
        let path = self.pool().join("locks").join(format!("v-{id}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", path.display()))
    }

    /// The loop devices attached to volume `id`'s image.
    pub fn loops_of(&self, id: &str) -> Vec<kernel::LoopDevice> {
        kernel::loops_backing(&self.image(id))
    }

    /// Fails, naming them, when any mount or loop device of this scratch dir is left.
    #[track_caller]
    pub fn assert_clean(&self, when: &str) {
        let (mounts, loops) = (mounts_under(&self.root()), loops_under(&self.root()));
        assert!(
            mounts.is_empty() && loops.is_empty(),
            "{when}: left mounted {mounts:?}, left attached {loops:?}"
        );
    }

    /// Unmounts and detaches everything under the scratch dir (a simulated reboot, too).
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
        let mut points = mounts_under(root);
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
    for dev in kernel::loop_devices() {
        if backs_under(&dev, root) {
            let _ = kernel::detach(&dev);
        }
    }
}

/// Whether `dev`'s image is under `root` (sysfs marks an image deleted since with " (deleted)").
fn backs_under(dev: &kernel::LoopDevice, root: &Path) -> bool {
    let backing = dev.backing_file.to_string_lossy();
    Path::new(backing.trim_end_matches(" (deleted)")).starts_with(root)
}

/// Mount points currently under `root` (for asserting a failed call left nothing behind).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    kernel::mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Loop devices whose images are under `root`, once the detaches in progress have ended.
///
/// A detach (LOOP_CLR_FD) of a device another process has open only marks it autoclear, and the
/// kernel unbinds it at that process's close: mkfs.btrfs and blkid open every loop device to look
/// for their signatures, so a test's detach can finish a moment after it returned when another
/// test formats btrfs. loopvol never sets autoclear itself, so such a device is one being
/// detached: waited for (bounded), then reported like any other if it is still there.
pub fn loops_under(root: &Path) -> Vec<PathBuf> {
    let under = || -> Vec<PathBuf> {
        kernel::loop_devices()
            .iter()
            .filter(|d| backs_under(d, root))
            .map(|d| d.path())
            .collect()
    };
    let detaching = |devices: &[PathBuf]| {
        devices.iter().any(|d| {
            let name = d.file_name().unwrap_or_default().to_string_lossy();
            std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
                .is_ok_and(|v| v.trim() == "1")
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let devices = under();
        if !detaching(&devices) || std::time::Instant::now() > deadline {
            return devices;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
