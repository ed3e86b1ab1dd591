//! What a shared pool on GlusterFS gives the backend, proved on a real volume mounted twice
//! (two "nodes", `a` and `b`, see `loopvol_e2e::gluster`): cross-mount `flock`, loop devices with
//! direct I/O on FUSE files, no reflink but exact SEEK_DATA/SEEK_HOLE, how a file replaced
//! through one mount looks through the other (stale, then ESTALE), and what a killed FUSE client
//! leaves behind. Timings are printed (`--nocapture`), never asserted; every wait is bounded.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use loopvol_e2e::gluster::{self, GlusterPool, Node, COHERENT};
use loopvol_e2e::{mounts_under, pattern, run, Scratch};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{lseek, Whence};

const MIB: u64 = 1 << 20;

fn gate(tools: &[&str]) -> bool {
    gluster::require_gluster() && loopvol_e2e::require_root(tools)
}

/// Runs `f` on a thread and waits at most `within` for it: None means it hung (the thread is
/// left behind; the test fails).
fn within<T: Send + 'static>(
    within: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(within).ok()
}

/// Polls `f` until it returns Some (bounded); panics naming `what`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes `data` to `dir/name` the way the backend writes metadata: a temporary file, fsync,
/// rename over the old one, fsync of the directory.
fn replace(dir: &Path, name: &str, data: &[u8]) {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
}

/// The harness itself: two mounts of one volume, each with its own client process; after drop
/// (also when the test body panicked) no volume, client or mount is left.
#[test]
fn harness_mounts_twice_and_leaves_nothing_behind() {
    if !gate(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let mut left = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let started = Instant::now();
        let pool = GlusterPool::start(&scratch);
        eprintln!(
            "volume {} up and mounted twice in {:?}",
            pool.volume(),
            started.elapsed()
        );
        let (a, b) = (pool.mount_point(Node::A), pool.mount_point(Node::B));
        assert_ne!(a, b);
        assert_eq!(mounts_under(a), vec![a.to_path_buf()]);
        assert_eq!(mounts_under(b), vec![b.to_path_buf()]);
        let pids = [Node::A, Node::B].map(|n| pool.client_pid(n).expect("client running"));
        assert_ne!(pids[0], pids[1], "one client per mount");
        std::fs::write(pool.pool(Node::A).join("hello"), b"from a").unwrap();
        assert_eq!(
            std::fs::read(pool.pool(Node::B).join("hello")).unwrap(),
            b"from a"
        );
        assert!(gluster::volumes().contains(&pool.volume().to_owned()));
        left = Some((pool.volume().to_owned(), pids));
        panic!("a failed assertion while the pool is up");
    }));
    assert!(outcome.is_err());
    let (volume, pids) = left.expect("the pool came up");
    assert!(
        !gluster::volumes().contains(&volume),
        "volume {volume} outlived its pool"
    );
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "glusterfs client {pid} outlived its pool"
        );
    }
    assert_eq!(mounts_under(&scratch.root()), Vec::<PathBuf>::new());
    assert!(!scratch.path("gluster/brick").exists(), "the brick is left");
}

/// (a) An exclusive `flock` taken through mount A is held as seen through mount B (exclusive and
/// shared requests both refused), and B gets it once A unlocks or closes; a blocked waiter on B
/// is woken by A's release.
#[test]
fn flock_through_one_mount_excludes_the_other() {
    if !gate(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let pool = GlusterPool::start(&scratch);
    let (pa, pb) = (pool.pool(Node::A), pool.pool(Node::B));
    let held = Flock::lock(open_rw(&pa.join("v.lock")), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("lock through a");
    for arg in [
        FlockArg::LockExclusiveNonblock,
        FlockArg::LockSharedNonblock,
    ] {
        match Flock::lock(open_rw(&pb.join("v.lock")), arg) {
            Ok(_) => panic!("{arg:?} through b succeeded while a holds the lock"),
            Err((_, e)) => assert_eq!(e, Errno::EWOULDBLOCK, "{arg:?} through b"),
        }
    }
    // Released by an explicit unlock.
    let file = held.unlock().map_err(|(_, e)| e).expect("unlock through a");
    let t = Instant::now();
    let by_b = poll("b's lock after a's unlock", Duration::from_secs(5), || {
        Flock::lock(open_rw(&pb.join("v.lock")), FlockArg::LockExclusiveNonblock).ok()
    });
    eprintln!("lock free through b {:?} after a's unlock", t.elapsed());
    assert_eq!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map(drop)
            .map_err(|(_, e)| e),
        Err(Errno::EWOULDBLOCK),
        "a while b holds it"
    );
    drop(by_b);

    // Released by close, and a blocked waiter through b is woken.
    let held = Flock::lock(open_rw(&pa.join("v.lock")), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("lock through a again");
    let waiter_path = pb.join("v.lock");
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let file = open_rw(&waiter_path);
        tx.send(()).unwrap();
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e);
        (Instant::now(), lock.map(drop))
    });
    rx.recv().unwrap();
    // Give the waiter time to block (if it got the lock now, exclusion failed: checked below).
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "b's blocking lock returned while a holds it"
    );
    let closed = Instant::now();
    drop(held);
    let (got, result) = within(Duration::from_secs(10), move || waiter.join().unwrap())
        .expect("b's blocked flock was not woken within 10 s of a's close");
    result.expect("b's blocking lock");
    eprintln!(
        "blocked waiter through b woke {:?} after a closed its lock file",
        got.duration_since(closed)
    );
}

/// `losetup` as the backend attaches (LOOP_CONFIGURE, direct I/O, 4096-byte blocks); returns the
/// device.
fn losetup(image: &Path, read_only: bool) -> PathBuf {
    let mut cmd = Command::new("losetup");
    cmd.args(["--find", "--show", "--direct-io=on", "--sector-size=4096"]);
    if read_only {
        cmd.arg("--read-only");
    }
    let (code, out, err) = run(cmd.arg(image));
    assert_eq!(code, 0, "losetup {}: {err}", image.display());
    PathBuf::from(out.trim())
}

fn loop_attr(dev: &Path, attr: &str) -> String {
    let name = dev.file_name().unwrap().to_str().unwrap();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/{attr}"))
        .unwrap_or_else(|e| panic!("{name}/loop/{attr}: {e}"))
        .trim()
        .to_owned()
}

fn detach(dev: &Path) {
    let (code, _, err) = run(Command::new("losetup").arg("--detach").arg(dev));
    assert_eq!(code, 0, "losetup --detach {}: {err}", dev.display());
}

fn mount_ext4(dev: &Path, at: &Path, flags: nix::mount::MsFlags, data: Option<&str>) {
    std::fs::create_dir_all(at).unwrap();
    nix::mount::mount(Some(dev), at, Some("ext4"), flags, data)
        .unwrap_or_else(|e| panic!("mount {} on {}: {e}", dev.display(), at.display()));
}

/// (b) A loop device on an image in the gluster pool: LOOP_CONFIGURE with direct I/O is accepted
/// (no buffered fallback), ext4 is made and mounted on it, and what was written through mount A
/// reads back byte-identical through mount B's view of the image.
#[test]
fn loop_device_with_direct_io_on_a_gluster_image() {
    if !gate(&["losetup", "mkfs.ext4"]) {
        return;
    }
    let scratch = Scratch::new();
    let pool = GlusterPool::start(&scratch);
    let image_a = pool.pool(Node::A).join("image");
    let image_b = pool.pool(Node::B).join("image");
    File::create(&image_a).unwrap().set_len(64 * MIB).unwrap();

    let dev = losetup(&image_a, false);
    assert_eq!(
        loop_attr(&dev, "dio"),
        "1",
        "the kernel took the FUSE file without direct I/O"
    );
    assert_eq!(
        loop_attr(&dev, "backing_file"),
        image_a.display().to_string()
    );
    let (code, _, err) = run(Command::new("mkfs.ext4")
        .args(["-q", "-E", "nodiscard,lazy_itable_init=1"])
        .arg(&dev));
    assert_eq!(code, 0, "mkfs.ext4: {err}");
    let mnt = scratch.path("mnt-a");
    mount_ext4(&dev, &mnt, nix::mount::MsFlags::empty(), None);
    let data = pattern((3 * MIB + 17) as usize, 0x3c);
    let mut f = File::create(mnt.join("data.bin")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    nix::mount::umount(&mnt).unwrap();
    detach(&dev);

    // Through b: the same bytes in the image, and the filesystem with the file on it.
    let whole_a = std::fs::read(&image_a).unwrap();
    let whole_b = std::fs::read(&image_b).unwrap();
    assert!(
        whole_a == whole_b,
        "the image differs between the two mounts"
    );
    let dev_b = losetup(&image_b, true);
    assert_eq!(loop_attr(&dev_b, "dio"), "1");
    let mnt_b = scratch.path("mnt-b");
    mount_ext4(
        &dev_b,
        &mnt_b,
        nix::mount::MsFlags::MS_RDONLY,
        Some("noload"),
    );
    assert!(
        std::fs::read(mnt_b.join("data.bin")).unwrap() == data,
        "data.bin read through b differs from what a wrote"
    );
    nix::mount::umount(&mnt_b).unwrap();
    detach(&dev_b);
}

/// (c) No reflink on GlusterFS: FICLONE fails with EOPNOTSUPP, one of the codes the backend takes
/// as "copy sparsely instead"; SEEK_DATA/SEEK_HOLE report a file's holes exactly (through the
/// other mount too), and copy_file_range copies within the volume.
#[test]
fn no_reflink_but_exact_holes_on_gluster() {
    if !gate(&["cp"]) {
        return;
    }
    let scratch = Scratch::new();
    let pool = GlusterPool::start(&scratch);
    let (pa, pb) = (pool.pool(Node::A), pool.pool(Node::B));
    let src = open_rw(&pa.join("src"));
    src.set_len(16 * MIB).unwrap();
    src.write_all_at(&[7u8; 4096], 4 * MIB).unwrap();
    src.write_all_at(&[9u8; 8192], 12 * MIB).unwrap();
    src.sync_all().unwrap();

    // GNU cp --reflink=always is FICLONE and nothing else; it reports the errno's text.
    let (code, _, err) = run(Command::new("cp")
        .arg("--reflink=always")
        .arg(pa.join("src"))
        .arg(pa.join("clone")));
    assert_ne!(code, 0, "a reflink succeeded on GlusterFS");
    // strerror's text, as cp prints it.
    let texts: Vec<(Errno, String)> = [
        Errno::EOPNOTSUPP,
        Errno::EXDEV,
        Errno::EINVAL,
        Errno::ENOTTY,
    ]
    .into_iter()
    .map(|e| {
        let text = std::io::Error::from_raw_os_error(e as i32).to_string();
        (e, text.split(" (os error").next().unwrap().to_owned())
    })
    .collect();
    let (errno, _) = texts
        .iter()
        .find(|(_, text)| err.contains(text.as_str()))
        .unwrap_or_else(|| {
            panic!("FICLONE failed with a code the backend does not take as 'no reflink': {err}")
        });
    eprintln!("FICLONE on GlusterFS: {errno:?} ({})", err.trim());
    assert_eq!(*errno, Errno::EOPNOTSUPP);

    // Holes, through the other mount.
    let seen = File::open(pb.join("src")).unwrap();
    let mut extents = Vec::new();
    let mut pos = 0i64;
    loop {
        let data = match lseek(seen.as_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA at {pos}: {e}"),
        };
        let hole = lseek(seen.as_fd(), data, Whence::SeekHole).expect("SEEK_HOLE");
        extents.push((data as u64, hole as u64));
        pos = hole;
    }
    assert_eq!(
        extents,
        [(4 * MIB, 4 * MIB + 4096), (12 * MIB, 12 * MIB + 8192)],
        "data extents through b"
    );
    assert!(
        seen.metadata().unwrap().blocks() * 512 <= 64 * 1024,
        "the sparse file is allocated: {} blocks",
        seen.metadata().unwrap().blocks()
    );

    // copy_file_range (the backend's sparse copy moves each extent with it).
    let dest = File::create(pa.join("copy")).unwrap();
    dest.set_len(16 * MIB).unwrap();
    let (mut off_in, mut off_out) = (4 * MIB as i64, 4 * MIB as i64);
    let n = nix::fcntl::copy_file_range(
        src.as_fd(),
        Some(&mut off_in),
        dest.as_fd(),
        Some(&mut off_out),
        4096,
    )
    .expect("copy_file_range on GlusterFS");
    assert_eq!(n, 4096);
    dest.sync_all().unwrap();
    let mut got = vec![0u8; 4096];
    File::open(pb.join("copy"))
        .unwrap()
        .read_exact_at(&mut got, 4 * MIB)
        .unwrap();
    assert_eq!(got, [7u8; 4096]);
}

/// What a read through mount B returned, in order, for how long (from the replace).
#[derive(Debug)]
struct Timeline(Vec<(String, Duration, Duration, u32)>);

impl Timeline {
    fn record(&mut self, what: String, at: Duration) {
        match self.0.last_mut() {
            Some(last) if last.0 == what => {
                last.2 = at;
                last.3 += 1;
            }
            _ => self.0.push((what, at, at, 1)),
        }
    }
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (what, from, to, n) in &self.0 {
            write!(
                f,
                "{what}[{:.3}-{:.3}s x{n}] ",
                from.as_secs_f64(),
                to.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

fn read_at_start(file: &File) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64];
    let n = file.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

fn outcome(result: std::io::Result<Vec<u8>>) -> String {
    match result {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("{:?}", errno_of(&e)),
    }
}

/// Node a locks, replaces `meta.json` with `data` and unlocks; node b then takes the lock. Returns
/// when the replace was done, and b's lock.
fn hand_over(da: &Path, db: &Path, data: &str) -> (Instant, Flock<File>) {
    let a = Flock::lock(open_rw(&da.join("v.lock")), FlockArg::LockExclusive).unwrap();
    replace(da, "meta.json", data.as_bytes());
    drop(a);
    let replaced = Instant::now();
    let b = poll("b's lock", Duration::from_secs(5), || {
        Flock::lock(open_rw(&db.join("v.lock")), FlockArg::LockExclusiveNonblock).ok()
    });
    (replaced, b)
}

/// Polls reads by path through b until they give `new`; every answer before must be `old` or
/// ESTALE. Returns what b saw, in order.
fn read_until_new(meta_b: &Path, replaced: Instant, old: &str, new: &str) -> Timeline {
    let mut seen = Timeline(Vec::new());
    poll("the new content by path", Duration::from_secs(10), || {
        let got = outcome(std::fs::read(meta_b));
        seen.record(got.clone(), replaced.elapsed());
        assert!(
            [old, new, "ESTALE"].contains(&got.as_str()),
            "an open by path read {got:?}"
        );
        (got == new).then_some(())
    });
    seen
}

/// (d) A metadata file replaced (rename over) through mount A, read through mount B after B took
/// the `flock` that A released, with GlusterFS's default options:
/// - open by path, nothing of the file open on B (the backend's pattern): the OLD content, no
///   error, until B's caches (quick-read, open-behind, md-cache: 1 s) expire, then the new one;
///   at the edge an occasional single ESTALE;
/// - open by path while B holds a fd on the old file: ESTALE until the caches expire, then the
///   new content;
/// - that held fd: the old content, then, once the caches expire, ESTALE for good (close
///   included); a re-open by path reads the new content.
///
/// How long each lasts depends on how old B's caches are at the replace, so the windows are
/// printed, not asserted; asserted is that nothing else is ever read, that the held fd ends in
/// ESTALE, and that a re-open by path ends with the new content (bounded). The backend must
/// re-open by path on ESTALE (bounded) and cannot trust a read through another mount under the
/// default options (see `coherent_options_show_a_replace_at_once`).
#[test]
fn replaced_metadata_through_the_other_mount_is_stale_then_estale() {
    if !gate(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let pool = GlusterPool::start(&scratch);
    let (da, db) = (pool.pool(Node::A), pool.pool(Node::B));
    let meta_b = db.join("meta.json");
    let settle = |data: &str| {
        replace(&da, "meta.json", data.as_bytes());
        // B sees this version once its caches of the previous one have gone.
        poll(
            "b reads the version a wrote",
            Duration::from_secs(10),
            || (outcome(std::fs::read(&meta_b)) == data).then_some(()),
        );
    };
    for round in 1..=3 {
        let (old, new) = (format!("old{round}"), format!("new{round}"));
        settle(&old);
        let (replaced, lock) = hand_over(&da, &db, &new);
        let by_path = read_until_new(&meta_b, replaced, &old, &new);
        drop(lock);
        eprintln!("round {round}, by path, nothing open on b: {by_path}");

        let (old, new) = (format!("old{round}-held"), format!("new{round}-held"));
        settle(&old);
        let held = File::open(&meta_b).unwrap();
        let (replaced, lock) = hand_over(&da, &db, &new);
        let by_path = read_until_new(&meta_b, replaced, &old, &new);
        let mut by_fd = Timeline(Vec::new());
        poll("ESTALE on the held fd", Duration::from_secs(10), || {
            let got = outcome(read_at_start(&held));
            by_fd.record(got.clone(), replaced.elapsed());
            assert!(
                [old.as_str(), "ESTALE"].contains(&got.as_str()),
                "held fd read {got:?}"
            );
            (got == "ESTALE").then_some(())
        });
        for _ in 0..3 {
            assert_eq!(outcome(read_at_start(&held)), "ESTALE", "the held fd again");
        }
        assert_eq!(outcome(std::fs::read(&meta_b)), new, "re-open by path");
        let close = nix::unistd::close(held);
        assert!(
            matches!(close, Ok(()) | Err(Errno::ESTALE)),
            "close: {close:?}"
        );
        drop(lock);
        eprintln!(
            "round {round}, by path while b holds the old file open: {by_path}; \
             the held fd: {by_fd}; its close: {close:?}"
        );
    }
}

/// (d, continued) With quick-read, open-behind and stat-prefetch off (`gluster::COHERENT`), the
/// first read by path after the lock hand-over is the new content, every time, and a fd held
/// across the replace keeps reading the old content (the POSIX answer) and closes cleanly.
#[test]
fn coherent_options_show_a_replace_at_once() {
    if !gate(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let pool = GlusterPool::start_with(&scratch, COHERENT);
    let (da, db) = (pool.pool(Node::A), pool.pool(Node::B));
    let meta_b = db.join("meta.json");
    for round in 1..=5 {
        let old = format!("old{round}");
        let new = format!("new{round}");
        replace(&da, "meta.json", old.as_bytes());
        assert_eq!(outcome(std::fs::read(&meta_b)), old);
        let held = File::open(&meta_b).unwrap();
        let a = Flock::lock(open_rw(&da.join("v.lock")), FlockArg::LockExclusive).unwrap();
        replace(&da, "meta.json", new.as_bytes());
        drop(a);
        let b = poll("b's lock", Duration::from_secs(5), || {
            Flock::lock(open_rw(&db.join("v.lock")), FlockArg::LockExclusiveNonblock).ok()
        });
        assert_eq!(
            outcome(std::fs::read(&meta_b)),
            new,
            "round {round}: first read by path"
        );
        assert_eq!(outcome(read_at_start(&held)), old, "round {round}: held fd");
        assert_eq!(
            nix::unistd::close(held),
            Ok(()),
            "round {round}: close of the held fd"
        );
        drop(b);
    }
}

/// (e) Node a's FUSE client killed (`kill -9`): everything through mount A answers ENOTCONN
/// (stat, statfs, open, create, readdir, a fd opened before) once the kernel's attribute cache
/// of what was just looked at expires (up to 1 s); nothing hangs. Mount B goes on, and the `flock`
/// a held is free for b at once (the brick drops a dead client's locks), while a's own unlock
/// fails with ENOTCONN. An ext4 on a loop device over an image on A fails every fsync with EIO,
/// then turns read-only at its next journal commit (a fence of sorts). Cleanup: umount of the
/// ext4, loop detach, then A's mount (EBUSY while a file is open on it: lazily), and a remount
/// gives a working mount again.
#[test]
fn killed_fuse_client_answers_enotconn_and_fails_writes() {
    if !gate(&["losetup", "mkfs.ext4"]) {
        return;
    }
    let scratch = Scratch::new();
    let mut pool = GlusterPool::start(&scratch);
    let (pa, pb) = (pool.pool(Node::A), pool.pool(Node::B));
    let mount_a = pool.mount_point(Node::A).to_path_buf();
    std::fs::write(pa.join("file"), b"written by a").unwrap();
    let open_before = File::open(pa.join("file")).unwrap();
    let lock = Flock::lock(open_rw(&pa.join("v.lock")), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    // A filesystem on a loop device over an image on A, with synced data.
    let image = pa.join("image");
    File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    let dev = losetup(&image, false);
    let (code, _, err) = run(Command::new("mkfs.ext4").arg("-q").arg(&dev));
    assert_eq!(code, 0, "mkfs.ext4: {err}");
    let mnt = scratch.path("mnt-a");
    mount_ext4(&dev, &mnt, nix::mount::MsFlags::empty(), None);
    let mut synced = File::create(mnt.join("synced")).unwrap();
    synced.write_all(&pattern(MIB as usize, 1)).unwrap();
    synced.sync_all().unwrap();

    let pid = pool.kill_client(Node::A);
    assert!(pool.client_pid(Node::A).is_none());
    eprintln!("killed node a's glusterfs (pid {pid})");

    // Mount A: ENOTCONN for everything that reaches the (dead) daemon. What the kernel still has
    // cached (attributes, for the 1 s attribute timeout) may answer first: polled, reported.
    type Check = std::sync::Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;
    let file_a = pa.join("file");
    let checks: Vec<(&str, Check)> = vec![
        ("stat", {
            let p = file_a.clone();
            std::sync::Arc::new(move || std::fs::metadata(&p).map(drop))
        }),
        ("stat of the mount point", {
            let p = mount_a.clone();
            std::sync::Arc::new(move || std::fs::metadata(&p).map(drop))
        }),
        ("statfs", {
            let p = mount_a.clone();
            std::sync::Arc::new(move || nix::sys::statfs::statfs(&p).map(drop).map_err(Into::into))
        }),
        ("open", {
            let p = file_a.clone();
            std::sync::Arc::new(move || File::open(&p).map(drop))
        }),
        ("create", {
            let p = pa.join("new");
            std::sync::Arc::new(move || File::create(&p).map(drop))
        }),
        ("readdir", {
            let p = pa.clone();
            std::sync::Arc::new(move || std::fs::read_dir(&p).map(drop))
        }),
        ("read on a fd opened before", {
            let f = open_before.try_clone().unwrap();
            std::sync::Arc::new(move || f.read_at(&mut [0u8; 8], 0).map(drop))
        }),
    ];
    let killed = Instant::now();
    for (what, check) in checks {
        let mut answered_ok = 0;
        let err = poll(
            &format!("{what} failing on the dead mount"),
            Duration::from_secs(5),
            || {
                let check = check.clone();
                let result = within(Duration::from_secs(5), move || check())
                    .unwrap_or_else(|| panic!("{what} on the dead mount hung for 5 s"));
                match result {
                    Ok(()) => {
                        answered_ok += 1;
                        None
                    }
                    Err(e) => Some(e),
                }
            },
        );
        eprintln!(
            "{what} on the dead mount: {err} at {:?} after the kill ({answered_ok} answers from cache before)",
            killed.elapsed()
        );
        assert_eq!(errno_of(&err), Errno::ENOTCONN, "{what}: {err}");
    }

    // Mount B is unaffected; a's lock went with its client.
    assert_eq!(std::fs::read(pb.join("file")).unwrap(), b"written by a");
    let t = Instant::now();
    let b_lock = poll(
        "b's lock after a's client died",
        Duration::from_secs(10),
        || Flock::lock(open_rw(&pb.join("v.lock")), FlockArg::LockExclusiveNonblock).ok(),
    );
    eprintln!("a's flock released for b {:?} after the kill", t.elapsed());

    // The filesystem over the dead mount: the write is cached, its fsync fails, then read-only.
    let t = Instant::now();
    let mut after = File::create(mnt.join("after")).unwrap();
    after.write_all(&pattern(MIB as usize, 2)).unwrap();
    let fsync = within(Duration::from_secs(10), move || after.sync_all())
        .expect("fsync over the dead mount hung for 10 s");
    let fsync = fsync.expect_err("fsync over the dead mount succeeded");
    eprintln!(
        "fsync on ext4 over the dead mount: {fsync} after {:?}",
        t.elapsed()
    );
    assert_eq!(errno_of(&fsync), Errno::EIO);
    // Every synced write fails from then on; ext4 turns read-only once its journal fails to
    // commit (its 5 s commit interval, or sooner).
    let mut answers = Timeline(Vec::new());
    let mut n = 0;
    poll(
        "ext4 read-only over the dead mount",
        Duration::from_secs(20),
        || {
            n += 1;
            let attempt = File::create(mnt.join(format!("later-{n}")))
                .and_then(|mut f| f.write_all(b"x").and_then(|()| f.sync_all()));
            let errno = attempt.as_ref().err().map(errno_of);
            answers.record(format!("{errno:?}"), killed.elapsed());
            assert!(
                matches!(errno, Some(Errno::EIO | Errno::EROFS)),
                "a synced create over the dead mount: {attempt:?}"
            );
            (errno == Some(Errno::EROFS)).then_some(())
        },
    );
    eprintln!("synced creates on that ext4 after the kill: {answers}");
    assert_eq!(
        std::fs::read(mnt.join("synced")).unwrap(),
        pattern(MIB as usize, 1),
        "the synced file (page cache)"
    );

    // Cleanup by hand: the ext4, the device, then A's mount (busy: a file is open on it).
    drop(synced);
    nix::mount::umount(&mnt).expect("umount the ext4 over the dead mount");
    detach(&dev);
    assert_eq!(
        nix::mount::umount(&mount_a),
        Err(Errno::EBUSY),
        "plain umount of the dead mount with a file open"
    );
    // A lock held through the dead mount cannot be released: LOCK_UN answers ENOTCONN, and nix's
    // `Flock` panics in its drop when the unlock fails (the backend's lock guard is one).
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(lock)));
    let panic = dropped.expect_err("dropping a Flock on the dead mount");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    eprintln!("dropping the Flock held through the dead mount panicked: {message}");
    assert!(message.contains("ENOTCONN"), "{message}");
    pool.remount(Node::A);
    drop(open_before);
    assert_eq!(std::fs::read(pa.join("file")).unwrap(), b"written by a");
    drop(b_lock);
    assert_eq!(
        mounts_under(&mount_a),
        vec![mount_a.clone()],
        "one mount at a again"
    );
}

/// The listings' index on a shared pool: a server that listed the pool (and remembers what it
/// read) sees at once what another node changed through its own mount: a volume created, one
/// deleted, a record replaced (a claim). Stats ask the server for fresh attributes, so neither
/// the kernel's FUSE attribute cache nor the index hides a change. The index is given time to
/// trust what it read first (its racy window), so the second listing is served from it where
/// nothing changed.
#[test]
fn listings_see_what_another_node_changed() {
    use loopvol::{AccessMode, CreateVolume, NodeName, Pool, PoolOptions, VolumeId};
    if !gate(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let g = GlusterPool::start_with(&scratch, COHERENT);
    let open = |node: Node| {
        let name = NodeName::try_from(format!("node-{}", node.name())).unwrap();
        let mut options = PoolOptions::new(name);
        options.shared = true;
        options.overcommit = 1e6;
        Pool::open(g.pool(node), options).unwrap()
    };
    let (a, b) = (open(Node::A), open(Node::B));
    let create =
        |pool: &Pool, name: &str| pool.create_volume(&CreateVolume::blank(name, MIB)).unwrap();
    let listed = |pool: &Pool| -> Vec<(String, usize)> {
        pool.list_volumes(None, 0)
            .unwrap()
            .entries
            .iter()
            .map(|m| (m.id.to_string(), m.claims.len()))
            .collect()
    };
    for name in ["v0", "v1", "v2"] {
        create(&b, name);
    }
    let three = vec![("v0".into(), 0), ("v1".into(), 0), ("v2".into(), 0)];
    assert_eq!(listed(&a), three);
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(listed(&a), three);
    create(&b, "v3");
    b.delete_volume(&VolumeId::try_from("v1").unwrap()).unwrap();
    b.volume(&VolumeId::try_from("v2").unwrap())
        .unwrap()
        .claim(
            &NodeName::try_from("node-b").unwrap(),
            AccessMode::SingleNodeWriter,
            None,
        )
        .unwrap();
    let start = Instant::now();
    assert_eq!(
        listed(&a),
        [("v0".into(), 0), ("v2".into(), 1), ("v3".into(), 0)],
        "node a's listing right after node b's changes"
    );
    println!("listing through the other mount: {:?}", start.elapsed());
}
