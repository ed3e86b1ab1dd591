//! Issue 12, "trust nothing on disk", at the backend: every entry an attacker who can write the
//! pool plants (a symbolic link, a FIFO, garbage, an ID that is a path), every caller's path that
//! leads somewhere else, and what each call must do: refuse clearly, naming the entry, leave the
//! decoy byte-identical, mount and attach nothing, and answer within a deadline (a hang fails the
//! test). Plus: lock files live only as long as their volumes, metadata writes need no free
//! space, a symlinked kubelet root works end to end, and a directory of a target or staging path
//! replaced after it was resolved never makes an unmount reach another mount. As root, on
//! scratch pools.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use loopvol::{
    Access, AccessMode, CreateVolume, ErrorKind, FsType, LockWait, NodeName, Pool, PoolOptions,
    Publish, SizeRequest, SnapshotRequest, VolumeId, VolumeSource,
};
use loopvol_e2e::{fs_tools, loops_under, mounts_under, require_root, run, Scratch};

const MIB: u64 = 1 << 20;
/// How long any call may take here: far above what each needs, far below a hang.
const DEADLINE: Duration = Duration::from_secs(20);

fn open(s: &Scratch, prefixes: &[PathBuf]) -> Pool {
    let mut options = PoolOptions::new(NodeName::try_from("node-a").unwrap());
    options.path_prefixes = prefixes.to_vec();
    Pool::open(s.pool(), options).unwrap()
}

fn vid(id: &str) -> VolumeId {
    VolumeId::try_from(id).unwrap()
}

fn create(pool: &Pool, name: &str) -> String {
    pool.create_volume(&CreateVolume::blank(name, 64 * MIB))
        .unwrap()
        .id
        .to_string()
}

fn ext4() -> Access {
    Access::Mount {
        fs_type: Some(FsType::Ext4),
        mount_options: vec![],
    }
}

/// Runs `f` on its own thread and fails the test if it does not return within [`DEADLINE`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?} (a hang)"))
}

/// Everything in the pool, with sizes (lock files included): what a call may not leave behind.
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A scratch pool with one volume, a decoy outside the pool that a planted entry points at, and
/// one more volume to plant into.
struct Planted {
    s: Scratch,
    pool: std::sync::Arc<Pool>,
    decoy: PathBuf,
    outside: PathBuf,
}

const DECOY: &[u8] = b"the host's precious file, never to be written";

impl Planted {
    fn new() -> Planted {
        let s = Scratch::new();
        let pool = std::sync::Arc::new(open(&s, &[]));
        let outside = s.path("outside");
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        let decoy = outside.join("decoy");
        let mut bytes = DECOY.to_vec();
        bytes.resize(64 * MIB as usize, 0);
        std::fs::write(&decoy, &bytes).unwrap();
        Planted {
            s,
            pool,
            decoy,
            outside,
        }
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.s.pool().join(rel)
    }

    fn replace_with_link(&self, rel: &str, to: &Path) {
        let p = self.at(rel);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_dir_all(&p);
        symlink(to, &p).unwrap();
    }

    fn replace_with_fifo(&self, rel: &str) {
        let p = self.at(rel);
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[track_caller]
    fn assert_untouched(&self, what: &str) {
        let bytes = std::fs::read(&self.decoy).unwrap();
        assert!(
            bytes.starts_with(DECOY) && bytes[DECOY.len()..].iter().all(|b| *b == 0),
            "{what}: the decoy changed"
        );
        assert!(
            !self.outside.join("created").exists(),
            "{what}: a file was created outside the pool"
        );
        let (mounts, loops) = (mounts_under(&self.s.root()), loops_under(&self.s.root()));
        assert!(
            mounts.is_empty() && loops.is_empty(),
            "{what}: left mounted {mounts:?}, attached {loops:?}"
        );
    }
}

type Call = Box<dyn FnOnce(&Pool) -> loopvol::Result<()> + Send>;
/// A call on a locked volume.
type VolumeCall = Box<dyn FnOnce(&mut loopvol::Volume) -> loopvol::Result<()> + Send>;

/// Runs `call` against the planted pool within the deadline; it must fail with `kind` and a
/// message containing each of `needles`.
#[track_caller]
fn refused(p: &Planted, what: &str, kind: ErrorKind, needles: &[&str], call: Call) -> Vec<String> {
    let pool = std::sync::Arc::clone(&p.pool);
    let got = within(what, move || {
        call(&pool).map_err(|e| (e.kind(), e.to_string()))
    });
    let mut wrong = Vec::new();
    match got {
        Ok(()) => wrong.push(format!("{what}: accepted")),
        Err((k, msg)) => {
            if k != kind || !needles.iter().all(|n| msg.contains(n)) {
                wrong.push(format!(
                    "{what}: {k:?} {msg} (want {kind:?} naming {needles:?})"
                ));
            }
        }
    }
    p.assert_untouched(what);
    wrong
}

/// CreateVolume of a new volume named "fresh".
fn create_fresh() -> Call {
    Box::new(|pool: &Pool| {
        pool.create_volume(&CreateVolume::blank("fresh", MIB))
            .map(drop)
    })
}

fn stage_call(id: &str, staging: PathBuf, access: Access) -> Call {
    let id = vid(id);
    Box::new(move |pool: &Pool| {
        let staging = pool.node_path("staging path", staging)?;
        pool.volume(&id)?
            .stage(&staging, &access, AccessMode::SingleNodeWriter)
            .map(drop)
    })
}

/// The pool rows of issue 12's table: each planted entry, each call, a clear refusal.
#[test]
fn planted_pool_entries_are_refused() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let p = Planted::new();
    let victim = create(&p.pool, "victim");
    let staging = p.s.path("staging");
    let mut wrong = Vec::new();
    let pre = FailedPrecondition;
    use ErrorKind::FailedPrecondition;

    // volumes/<id> is a symlink to a directory outside the pool (holding a volume.json and an
    // image): not listed as a volume, and never staged.
    std::fs::copy(
        p.at(&format!("volumes/{victim}/volume.json")),
        p.outside.join("dir/volume.json"),
    )
    .unwrap();
    std::fs::copy(&p.decoy, p.outside.join("dir/image")).unwrap();
    let moved = p.s.path("victim-dir");
    std::fs::rename(p.at(&format!("volumes/{victim}")), &moved).unwrap();
    p.replace_with_link(&format!("volumes/{victim}"), &p.outside.join("dir"));
    let listed = within("list", {
        let pool = std::sync::Arc::clone(&p.pool);
        move || pool.list_volume_entries(None, 0).unwrap().entries
    });
    assert!(
        matches!(&listed[..], [Err(bad)] if bad.id == victim && bad.reason.contains("symbolic link")),
        "{listed:?}"
    );
    wrong.extend(refused(
        &p,
        "stage through a linked volume directory",
        pre,
        &["symbolic link", "refusing"],
        stage_call(&victim, staging.clone(), ext4()),
    ));
    std::fs::remove_file(p.at(&format!("volumes/{victim}"))).unwrap();
    std::fs::rename(&moved, p.at(&format!("volumes/{victim}"))).unwrap();

    // The image is a symlink to a file, then to a block device outside the pool.
    let image = format!("volumes/{victim}/image");
    let real_image = p.s.path("victim-image");
    std::fs::rename(p.at(&image), &real_image).unwrap();
    p.replace_with_link(&image, &p.decoy);
    wrong.extend(refused(
        &p,
        "stage an image linked to a host file",
        pre,
        &["image", "symbolic link"],
        stage_call(&victim, staging.clone(), ext4()),
    ));
    wrong.extend(refused(
        &p,
        "stage (block) an image linked to a host file",
        pre,
        &["symbolic link"],
        stage_call(&victim, staging.clone(), Access::Block),
    ));
    {
        // A real block device: a loop device on the decoy, the test's own.
        let dev = loopvol::testing::loopdev::attach(&p.decoy, false).unwrap();
        p.replace_with_link(&image, &dev.path());
        let got = within("stage an image linked to a block device", {
            let pool = std::sync::Arc::clone(&p.pool);
            let (id, staging) = (vid(&victim), staging.clone());
            move || {
                let staging = pool.node_path("staging path", staging).unwrap();
                pool.volume(&id)
                    .unwrap()
                    .stage(&staging, &Access::Block, AccessMode::SingleNodeWriter)
                    .map_err(|e| e.to_string())
            }
        });
        loopvol::testing::loopdev::detach(&dev).unwrap();
        if !got.as_ref().is_err_and(|m| m.contains("symbolic link")) {
            wrong.push(format!("stage an image linked to a block device: {got:?}"));
        }
        p.assert_untouched("an image linked to a block device");
    }
    // A FIFO where the image belongs: refused at once, never opened for I/O.
    p.replace_with_fifo(&image);
    wrong.extend(refused(
        &p,
        "stage an image that is a FIFO",
        pre,
        &["FIFO"],
        stage_call(&victim, staging.clone(), ext4()),
    ));
    std::fs::remove_file(p.at(&image)).unwrap();
    std::fs::rename(&real_image, p.at(&image)).unwrap();

    // A snapshot whose image is a symlink to a host file: no volume is made from it.
    let snap = p
        .pool
        .create_snapshot(&SnapshotRequest {
            name: "snap".into(),
            source: vid(&victim),
        })
        .unwrap();
    p.replace_with_link(&format!("snapshots/{}/image", snap.id), &p.decoy);
    wrong.extend(refused(
        &p,
        "restore a snapshot whose image is a link",
        pre,
        &["symbolic link"],
        Box::new(move |pool: &Pool| {
            pool.create_volume(&CreateVolume {
                name: "restored".into(),
                size: SizeRequest::default(),
                fs_type: None,
                allocation: None,
                source: Some(VolumeSource::Snapshot(snap.id.clone())),
            })
            .map(drop)
        }),
    ));
    assert!(!p.at("volumes/restored").exists(), "restored left behind");

    // A dangling symlink in locks/: no file is created where it points.
    p.replace_with_link("locks/v-fresh.lock", &p.outside.join("created"));
    wrong.extend(refused(
        &p,
        "create a volume whose lock file is a dangling link",
        pre,
        &["lock", "symbolic link"],
        create_fresh(),
    ));
    // A lock file that is a FIFO: refused at once, and every other call goes on.
    p.replace_with_fifo("locks/v-fresh.lock");
    wrong.extend(refused(
        &p,
        "create a volume whose lock file is a FIFO",
        pre,
        &["FIFO"],
        create_fresh(),
    ));

    // The metadata's temporary file is a symlink: the link's target is never written.
    let tmp = format!("volumes/{victim}/.volume.json.tmp");
    p.replace_with_link(&tmp, &p.decoy);
    wrong.extend(refused(
        &p,
        "a metadata write over a linked temporary file",
        pre,
        &["symbolic link"],
        Box::new({
            let id = vid(&victim);
            move |pool: &Pool| {
                pool.volume(&id)?.claim(
                    &NodeName::try_from("node-a").unwrap(),
                    AccessMode::SingleNodeWriter,
                    None,
                )
            }
        }),
    ));
    std::fs::remove_file(p.at(&tmp)).unwrap();

    // volume.json is a FIFO, then a link to /dev/zero: listings answer (the entry abnormal),
    // and a snapshot of it is refused, at once.
    let meta = format!("volumes/{victim}/volume.json");
    let good_meta = std::fs::read(p.at(&meta)).unwrap();
    for (what, plant) in [
        (
            "a FIFO",
            Box::new(|| p.replace_with_fifo(&meta)) as Box<dyn Fn()>,
        ),
        (
            "a link to /dev/zero",
            Box::new(|| p.replace_with_link(&meta, Path::new("/dev/zero"))),
        ),
    ] {
        plant();
        let listed = within(what, {
            let pool = std::sync::Arc::clone(&p.pool);
            move || pool.list_volume_entries(None, 0).unwrap().entries
        });
        if !matches!(&listed[..], [Err(bad)] if bad.id == victim && bad.reason.contains("volume.json"))
        {
            wrong.push(format!("list with volume.json {what}: {listed:?}"));
        }
        wrong.extend(refused(
            &p,
            &format!("snapshot a volume whose volume.json is {what}"),
            pre,
            &["volume.json"],
            Box::new({
                let id = vid(&victim);
                move |pool: &Pool| {
                    pool.create_snapshot(&SnapshotRequest {
                        name: "snap2".into(),
                        source: id,
                    })
                    .map(drop)
                }
            }),
        ));
    }
    std::fs::remove_file(p.at(&meta)).unwrap();
    std::fs::write(p.at(&meta), &good_meta).unwrap();

    // An ID inside volume.json that is a path: refused as corrupt, nothing attached.
    let text = String::from_utf8(good_meta.clone()).unwrap();
    std::fs::write(
        p.at(&meta),
        text.replace(&format!("\"id\": \"{victim}\""), "\"id\": \"../../x\""),
    )
    .unwrap();
    wrong.extend(refused(
        &p,
        "stage a volume whose record names ../../x",
        ErrorKind::Internal,
        &["corrupt metadata", "volume.json", "invalid volume ID"],
        stage_call(&victim, staging.clone(), ext4()),
    ));
    std::fs::write(p.at(&meta), &good_meta).unwrap();

    // Mount options that can crash the node.
    for opt in ["errors=panic", "ERRORS=Panic"] {
        let access = Access::Mount {
            fs_type: Some(FsType::Ext4),
            mount_options: vec![opt.into()],
        };
        wrong.extend(refused(
            &p,
            &format!("stage with {opt}"),
            ErrorKind::InvalidArgument,
            &["mount option", "panics the node"],
            stage_call(&victim, staging.clone(), access),
        ));
    }
    assert!(
        wrong.is_empty(),
        "{} rows wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // After all that, the volume is still fine.
    let staging = p.pool.node_path("staging path", staging).unwrap();
    p.pool
        .volume(&vid(&victim))
        .unwrap()
        .stage(&staging, &ext4(), AccessMode::SingleNodeWriter)
        .unwrap();
    p.pool
        .volume(&vid(&victim))
        .unwrap()
        .unstage(&staging)
        .unwrap();
}

/// One corrupt record among many: the listing returns the rest (the bad one shown as such), and
/// FlexVolume's detach still finds its claim.
#[test]
fn one_corrupt_record_never_takes_down_a_listing() {
    let s = Scratch::new();
    let pool = open(&s, &[]);
    let node = NodeName::try_from("node-a").unwrap();
    for i in 0..5 {
        let id = create(&pool, &format!("v{i}"));
        pool.volume(&vid(&id))
            .unwrap()
            .claim(
                &node,
                AccessMode::SingleNodeWriter,
                Some(&format!("pv-{i}")),
            )
            .unwrap();
    }
    std::fs::write(s.pool().join("volumes/v2/volume.json"), b"{garbage").unwrap();
    let listed = pool.list_volume_entries(None, 0).unwrap().entries;
    assert_eq!(listed.len(), 5);
    assert_eq!(listed.iter().filter(|e| e.is_ok()).count(), 4);
    assert!(listed[2]
        .as_ref()
        .is_err_and(|bad| bad.id == "v2" && bad.reason.contains("volumes/v2/volume.json")));
    assert_eq!(pool.list_volumes(None, 0).unwrap().entries.len(), 4);
    // Paging steps over it too.
    let first = pool.list_volume_entries(None, 3).unwrap();
    assert_eq!(first.entries.len(), 3);
    let rest = pool
        .list_volume_entries(first.next_token.as_deref(), 3)
        .unwrap();
    assert_eq!(rest.entries.len(), 2);
    // Detach by PV name: the PV's own volume, and one named otherwise, both found.
    assert_eq!(
        pool.find_claim_by_pv("pv-4", &node).unwrap(),
        Some(vid("v4"))
    );
    let odd = create(&pool, "pv-other");
    pool.volume(&vid(&odd))
        .unwrap()
        .claim(&node, AccessMode::SingleNodeWriter, Some("pv-x"))
        .unwrap();
    assert_eq!(
        pool.find_claim_by_pv("pv-x", &node).unwrap(),
        Some(vid(&odd))
    );
}

/// Caller paths that lead out of where volumes may go: refused before any hold or loop device
/// exists, whatever the link does.
#[test]
fn caller_paths_that_lead_elsewhere_are_refused() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let kubelet = s.path("kubelet");
    std::fs::create_dir_all(kubelet.join("pods/p")).unwrap();
    let etc = s.path("etc-standin");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("passwd"), b"root:x:0:0").unwrap();
    let pool = std::sync::Arc::new(open(&s, std::slice::from_ref(&kubelet)));
    let id = create(&pool, "v");
    let meta_before = std::fs::read(s.pool().join("volumes/v/volume.json")).unwrap();
    // (what, staging or target path, stage (else publish), expected words)
    let escape = kubelet.join("pods/escape");
    symlink(&etc, &escape).unwrap();
    let staging_link = kubelet.join("plugins/v/globalmount");
    std::fs::create_dir_all(staging_link.parent().unwrap()).unwrap();
    symlink(&etc, &staging_link).unwrap();
    let cases: Vec<(&str, PathBuf, bool, &[&str])> = vec![
        (
            "the staging path is a link to a directory",
            staging_link.clone(),
            true,
            &["symbolic link"],
        ),
        (
            "the target's parent is a link out of the prefix",
            escape.join("mount"),
            false,
            &["outside the allowed", "resolved"],
        ),
        (
            "the staging path's parent is a link out of the prefix",
            escape.join("globalmount"),
            true,
            &["outside the allowed"],
        ),
        (
            "a link into a system directory",
            {
                let l = kubelet.join("pods/sys");
                symlink("/etc", &l).unwrap();
                l.join("x")
            },
            true,
            &["system directory /etc"],
        ),
    ];
    let mut wrong = Vec::new();
    for (what, path, is_stage, needles) in cases {
        let pool = std::sync::Arc::clone(&pool);
        let staging = kubelet.join("plugins/v/real");
        let got = within(what, move || {
            let path = pool.node_path("path", path)?;
            let mut volume = pool.volume(&vid("v"))?;
            if is_stage {
                volume
                    .stage(&path, &ext4(), AccessMode::SingleNodeWriter)
                    .map(drop)
            } else {
                let staging = pool.node_path("staging path", staging)?;
                volume.publish(&Publish {
                    staging: Some(staging),
                    target: path,
                    access: ext4(),
                    read_only: false,
                    fs_group: None,
                    exclusive: false,
                })
            }
        });
        match got {
            Err(e)
                if e.kind() == ErrorKind::InvalidArgument
                    && needles.iter().all(|n| e.to_string().contains(n)) => {}
            other => wrong.push(format!("{what}: {other:?}")),
        }
        assert!(
            mounts_under(&s.root()).is_empty() && loops_under(&s.root()).is_empty(),
            "{what}"
        );
    }
    // Inside, or above, the pool (no prefixes configured).
    let open_pool = std::sync::Arc::new(open(&s, &[]));
    for (what, path) in [
        ("a target inside the pool", s.pool().join("volumes/mnt")),
        ("a target above the pool", s.root()),
    ] {
        let pool = std::sync::Arc::clone(&open_pool);
        let got = within(what, move || pool.node_path("target path", path).map(drop));
        if !got
            .as_ref()
            .is_err_and(|e| e.to_string().contains("inside or above the pool"))
        {
            wrong.push(format!("{what}: {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(std::fs::read(etc.join("passwd")).unwrap(), b"root:x:0:0");
    assert_eq!(std::fs::read_dir(&etc).unwrap().count(), 1);
    // No hold was recorded.
    assert_eq!(
        std::fs::read(s.pool().join("volumes/v/volume.json")).unwrap(),
        meta_before
    );
    let _ = id;
}

/// Lock files live as long as their subject: create/delete cycles (and a delete of what a crash
/// left half made) leave `locks/`, and the whole pool, as they were.
#[test]
fn create_delete_cycles_leave_no_entry_behind() {
    let s = Scratch::new();
    let pool = open(&s, &[]);
    let keep = create(&pool, "keep");
    let before = entries(&s.pool());
    for round in 0..3 {
        let id = create(&pool, &format!("cycle-{round}"));
        let snap = pool
            .create_snapshot(&SnapshotRequest {
                name: format!("snap-{round}"),
                source: vid(&id),
            })
            .unwrap();
        pool.delete_snapshot(&snap.id).unwrap();
        pool.delete_volume(&vid(&id)).unwrap();
        // An unknown volume, and a name refused for space, make nothing either.
        pool.delete_volume(&vid("never-was")).unwrap();
        assert!(pool.volume(&vid("never-was")).is_err());
        let err = pool
            .create_volume(&CreateVolume::blank(format!("huge-{round}"), 1 << 60))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(entries(&s.pool()), before, "round {round}");
    }
    // A create interrupted after its directory was made: the delete removes all of it.
    std::fs::create_dir(s.pool().join("volumes/crashed")).unwrap();
    std::fs::write(s.pool().join("volumes/crashed/image.tmp"), b"").unwrap();
    pool.delete_volume(&vid("crashed")).unwrap();
    assert_eq!(entries(&s.pool()), before);
    let _ = keep;
}

/// A symlinked kubelet root (`/var/lib/kubelet -> /data/kubelet`, a real layout): the whole
/// node lifecycle works, every lookup finding the mounts at the resolved path.
#[test]
fn a_symlinked_kubelet_root_works_end_to_end() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let real = s.path("data/kubelet");
    std::fs::create_dir_all(&real).unwrap();
    let root = s.path("var-lib-kubelet");
    symlink(&real, &root).unwrap();
    let pool = open(&s, std::slice::from_ref(&root));
    let id = create(&pool, "pvc-1");
    let staging = root.join("plugins/kubernetes.io/csi/d/pvc-1/globalmount");
    let target = root.join("pods/u/volumes/kubernetes.io~csi/pvc-1/mount");
    let staging_np = pool.node_path("staging path", &staging).unwrap();
    let target_np = pool.node_path("target path", &target).unwrap();
    assert!(staging_np.starts_with(&real), "{}", staging_np.display());
    let mut v = pool.volume(&vid(&id)).unwrap();
    v.stage(&staging_np, &ext4(), AccessMode::SingleNodeWriter)
        .unwrap();
    v.publish(&Publish {
        staging: Some(staging_np.clone()),
        target: target_np.clone(),
        access: ext4(),
        read_only: false,
        fs_group: Some(4242),
        exclusive: false,
    })
    .unwrap();
    std::fs::write(target.join("hello"), b"through the link").unwrap();
    assert_eq!(
        std::fs::read(real.join("plugins/kubernetes.io/csi/d/pvc-1/globalmount/hello")).unwrap(),
        b"through the link"
    );
    drop(v);
    // Stats and the volume at the path, named as kubelet names them.
    let meta = pool.get_volume(&vid(&id)).unwrap();
    let (usage, condition) = pool.volume_stats(&meta, &target).unwrap();
    assert!(usage.total_bytes > 0 && !condition.abnormal);
    assert_eq!(pool.volume_at(&target_np).unwrap(), Some(vid(&id)));
    let grown = pool
        .volume(&vid(&id))
        .unwrap()
        .node_expand(Some(&target_np), SizeRequest::default(), false)
        .unwrap();
    assert!(grown >= 64 * MIB);
    let mut v = pool.volume(&vid(&id)).unwrap();
    v.unpublish(&pool.node_path("target path", &target).unwrap())
        .unwrap();
    v.unstage(&pool.node_path("staging path", &staging).unwrap())
        .unwrap();
    s.assert_clean("after unstage");
    assert!(!target.exists() && !staging.exists());
}

/// A directory of a target or staging path replaced by a symbolic link to another pod's (or
/// volume's) directory after the path was resolved, with a mount of the same name there: no
/// unmount ever reaches that other mount. The volume's own mount is either unmounted through the
/// directory the path was resolved to (when the call had already found it there) or left
/// mounted with an error naming where it is now: never left behind silently.
#[test]
fn a_replaced_parent_directory_never_unmounts_another_mount() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let s = Scratch::new();
    let kubelet = s.path("kubelet");
    let pool = std::sync::Arc::new(open(&s, std::slice::from_ref(&kubelet)));
    let (v, w) = (create(&pool, "v"), create(&pool, "w"));
    let plugin = kubelet.join("plugins/d");
    // Two pods with a volume each under the same name, `pv/mount`; kubelet makes the parent.
    let (dir_a, dir_b) = (
        kubelet.join("pods/a/volumes/pv"),
        kubelet.join("pods/b/volumes/pv"),
    );
    // Resolved before the pod's directory exists: its anchor is above the directory replaced.
    let early_target_v = pool.node_path("target path", dir_a.join("mount")).unwrap();
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).unwrap();
    }
    let stage_and_publish = |id: &str, dir: &Path| {
        let staging = pool
            .node_path("staging path", plugin.join(id).join("globalmount"))
            .unwrap();
        let target = pool.node_path("target path", dir.join("mount")).unwrap();
        let mut volume = pool.volume(&vid(id)).unwrap();
        volume
            .stage(&staging, &ext4(), AccessMode::SingleNodeWriter)
            .unwrap();
        volume
            .publish(&Publish {
                staging: Some(staging),
                target: target.clone(),
                access: ext4(),
                read_only: false,
                fs_group: None,
                exclusive: false,
            })
            .unwrap();
        target
    };
    let target_v = stage_and_publish(&v, &dir_a);
    stage_and_publish(&w, &dir_b);
    std::fs::write(dir_b.join("mount/w-file"), b"w's data").unwrap();
    let mount_at = |p: &Path| {
        let table = loopvol::testing::mount::mounts().unwrap();
        loopvol::testing::mount::mount_at(&table, p).cloned()
    };
    let id_at = |p: &Path| mount_at(p).map(|m| m.id);
    let is_mounted = |id: u32| {
        loopvol::testing::mount::mounts()
            .unwrap()
            .iter()
            .any(|m| m.id == id)
    };
    // `dir` moved aside to `<dir>.moved` (with what is mounted in it), a link to `to` in its
    // place; and back.
    let moved = |dir: &Path| dir.with_extension("moved");
    let replace = |dir: &Path, to: &Path| {
        std::fs::rename(dir, moved(dir)).unwrap();
        symlink(to, dir).unwrap();
    };
    let restore = |dir: &Path| {
        std::fs::remove_file(dir).unwrap();
        std::fs::rename(moved(dir), dir).unwrap();
    };
    let (w_publication, w_staging) = (
        id_at(&dir_b.join("mount")).unwrap(),
        id_at(&plugin.join("w/globalmount")).unwrap(),
    );
    let w_intact = |when: &str| {
        assert_eq!(
            id_at(&dir_b.join("mount")),
            Some(w_publication),
            "{when}: w's publication"
        );
        assert_eq!(
            id_at(&plugin.join("w/globalmount")),
            Some(w_staging),
            "{when}: w's staging mount"
        );
        assert_eq!(
            std::fs::read(dir_b.join("mount/w-file")).unwrap(),
            b"w's data"
        );
    };
    // Runs a call on volume `v` within the deadline; it must fail FAILED_PRECONDITION naming
    // each of `needles`.
    let refused = |what: &str, needles: &[&str], call: VolumeCall| {
        let (pool, id) = (std::sync::Arc::clone(&pool), vid(&v));
        let got = within(what, move || {
            pool.volume(&id)
                .and_then(|mut vol| call(&mut vol))
                .map_err(|e| (e.kind(), e.to_string()))
        });
        match got {
            Err((ErrorKind::FailedPrecondition, msg))
                if needles.iter().all(|n| msg.contains(n)) => {}
            other => panic!("{what}: {other:?} (want FailedPrecondition naming {needles:?})"),
        }
    };
    let v_publication = id_at(&target_v).unwrap();
    let v_moved = moved(&dir_a).join("mount");

    // 1. Within one call: the target was resolved before its parent was replaced by a link to
    // pod b's directory. mountinfo shows nothing at the path, the resolved directory holds v's
    // mount: refused, naming where v's mount is now.
    replace(&dir_a, &dir_b);
    let t = target_v.clone();
    refused(
        "unpublish through the resolved parent",
        &["replaced", &v_moved.display().to_string()],
        Box::new(move |vol| vol.unpublish(&t)),
    );
    w_intact("after unpublish through the resolved parent");
    assert_eq!(id_at(&v_moved), Some(v_publication), "v's own mount stays");
    // Resolved further up, the walk down meets the link itself.
    let t = early_target_v.clone();
    refused(
        "unpublish from an anchor above the link",
        &["symbolic link"],
        Box::new(move |vol| vol.unpublish(&t)),
    );
    w_intact("after unpublish from an anchor above the link");
    // The next call resolves the path afresh, through the link, to w's publication: not v's.
    let fresh = pool.node_path("target path", dir_a.join("mount")).unwrap();
    assert_eq!(fresh.as_path(), dir_b.join("mount"));
    refused(
        "unpublish of the path resolved afresh",
        &["not volume"],
        Box::new(move |vol| vol.unpublish(&fresh)),
    );
    w_intact("after unpublish of the path resolved afresh");
    // v is not leaked silently: its unstage refuses while the moved publication lives.
    let staging_v = pool
        .node_path("staging path", plugin.join(&v).join("globalmount"))
        .unwrap();
    let st = staging_v.clone();
    refused(
        "unstage while the moved publication lives",
        &["still mounted at", &v_moved.display().to_string()],
        Box::new(move |vol| vol.unstage(&st)),
    );
    assert_eq!(id_at(&v_moved), Some(v_publication));

    // 2. Replaced between the lookup and the unmount: the mount found at the path is v's, and
    // the unmount reaches exactly it, in the moved directory (a path-based umount2 would
    // have followed the link and unmounted w's publication).
    restore(&dir_a);
    let found = mount_at(&target_v).unwrap();
    assert_eq!(found.id, v_publication);
    // Something mounted over it meanwhile: that is not the mount found, and neither is touched.
    loopvol::testing::mount::mount_fs(
        Path::new("tmpfs"),
        &target_v,
        "tmpfs",
        nix::mount::MsFlags::empty(),
        "size=1m",
    )
    .unwrap();
    let over = id_at(&target_v).unwrap();
    let err = loopvol::testing::mount::unmount_node_path(&target_v, &found).unwrap_err();
    assert!(
        err.kind() == ErrorKind::FailedPrecondition && err.to_string().contains("tmpfs"),
        "{err}"
    );
    assert!(is_mounted(over) && is_mounted(v_publication));
    loopvol::testing::mount::unmount(&target_v).unwrap();
    replace(&dir_a, &dir_b);
    loopvol::testing::mount::unmount_node_path(&target_v, &found).unwrap();
    w_intact("after the unmount between lookup and umount2");
    assert!(
        !is_mounted(v_publication),
        "v's publication was not unmounted"
    );
    restore(&dir_a);

    // 3. Unstage, the staging path's parent replaced by a link to w's staging directory: the
    // resolved path refuses (v's mount is elsewhere now), the path resolved afresh refuses
    // (w's mount is not v's).
    let v_staging = id_at(&staging_v).unwrap();
    let v_dir = plugin.join(&v);
    replace(&v_dir, &plugin.join(&w));
    let st = staging_v.clone();
    refused(
        "unstage through the resolved parent",
        &[
            "replaced",
            &moved(&v_dir).join("globalmount").display().to_string(),
        ],
        Box::new(move |vol| vol.unstage(&st)),
    );
    let fresh = pool
        .node_path("staging path", v_dir.join("globalmount"))
        .unwrap();
    refused(
        "unstage of the path resolved afresh",
        &["not volume"],
        Box::new(move |vol| vol.unstage(&fresh)),
    );
    w_intact("after the unstages");
    assert_eq!(id_at(&moved(&v_dir).join("globalmount")), Some(v_staging));
    restore(&v_dir);

    // Put back, everything comes undone the usual way.
    for (id, dir) in [(&v, &dir_a), (&w, &dir_b)] {
        let mut volume = pool.volume(&vid(id)).unwrap();
        volume
            .unpublish(&pool.node_path("target path", dir.join("mount")).unwrap())
            .unwrap();
        volume
            .unstage(
                &pool
                    .node_path("staging path", plugin.join(id).join("globalmount"))
                    .unwrap(),
            )
            .unwrap();
    }
    s.assert_clean("after unstage");
}

/// Metadata writes need no free space once the record exists: on a pool filesystem filled to
/// the last block, claims, holds and their release all still write.
#[test]
fn metadata_writes_succeed_on_a_full_pool() {
    if !require_root(&["mkfs.ext4"]) {
        return;
    }
    let s = Scratch::new();
    // A small ext4 of the test's own as the pool.
    let image = s.path("pool.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let (code, _, err) = run(Command::new("mkfs.ext4")
        .args(["-q", "-m", "0", "-b", "4096"])
        .arg(&image));
    assert_eq!(code, 0, "{err}");
    let dev = loopvol::testing::loopdev::attach(&image, false).unwrap();
    let pool_dir = s.pool();
    loopvol::testing::mount::mount_fs(
        &dev.path(),
        &pool_dir,
        "ext4",
        nix::mount::MsFlags::empty(),
        "",
    )
    .unwrap();
    let pool = Pool::open(
        &pool_dir,
        PoolOptions::new(NodeName::try_from("node-a").unwrap()),
    )
    .unwrap();
    let id = create_small(&pool, "v");
    // Fill the filesystem to the last block (root, no reserve: truly full).
    let filler = pool_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xA5u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
        let _ = f.sync_all();
        let mut small = vec![0u8; 1024];
        while f.write(&small).is_ok_and(|n| n > 0) {
            small.truncate(small.len() / 2);
            if small.is_empty() {
                break;
            }
        }
        let _ = f.sync_all();
    }
    assert_eq!(
        std::fs::write(pool_dir.join("probe"), vec![1u8; 8192]).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC)),
        "the pool is not full"
    );
    let node = NodeName::try_from("node-a").unwrap();
    for round in 0..3 {
        let mut v = pool.volume(&vid(&id)).unwrap();
        v.claim(&node, AccessMode::SingleNodeWriter, Some("pv-v"))
            .unwrap_or_else(|e| panic!("round {round}: claim on a full pool: {e}"));
        v.release(&node)
            .unwrap_or_else(|e| panic!("round {round}: release on a full pool: {e}"));
        v.set_allocation(loopvol::Allocation::Thin).unwrap();
    }
    assert!(pool.get_volume(&vid(&id)).unwrap().claims.is_empty());
    drop(pool);
    loopvol::testing::mount::unmount(&pool_dir).unwrap();
    loopvol::testing::loopdev::detach(&dev).unwrap();
}

fn create_small(pool: &Pool, name: &str) -> String {
    pool.create_volume(&CreateVolume::blank(name, MIB))
        .unwrap()
        .id
        .to_string()
}

fn shared_pool(dir: &Path, node: &str) -> Pool {
    let mut options = PoolOptions::new(NodeName::try_from(node).unwrap());
    options.shared = true;
    let pool = Pool::open(dir, options).unwrap();
    pool.register_node().unwrap();
    pool
}

/// A shared pool whose locks never wait (as CSI's): a busy lock is an error at once.
fn shared_pool_at_once(dir: &Path, node: &str) -> Pool {
    let mut options = PoolOptions::new(NodeName::try_from(node).unwrap());
    options.shared = true;
    options.lock_wait = LockWait::Try;
    Pool::open(dir, options).unwrap()
}

/// Node a's and node b's try-lock pools on `gp`'s two mounts, and a volume node a made that node b
/// sees.
fn one_volume_two_nodes(gp: &loopvol_e2e::gluster::GlusterPool) -> (Pool, Pool, VolumeId) {
    use loopvol_e2e::gluster::Node;
    let a = shared_pool_at_once(&gp.pool(Node::A), "node-a");
    let b = shared_pool_at_once(&gp.pool(Node::B), "node-b");
    let id = vid(&create_small(&a, "v"));
    loopvol_e2e::poll_until(Duration::from_secs(10), "b sees the volume", || {
        b.get_volume(&id).is_ok()
    });
    (a, b, id)
}

/// GlusterFS with its DEFAULT options: a `volume.json` replaced through mount A, read through
/// mount B while B still holds the old file open (another reader on that node), answers ESTALE
/// until B's caches expire. The read re-opens by path, bounded, and never fails.
#[test]
fn metadata_replaced_through_another_mount_is_read_despite_estale() {
    use loopvol_e2e::gluster::{require_gluster, GlusterPool, Node};
    if !require_gluster() {
        return;
    }
    let s = Scratch::new();
    let gp = GlusterPool::start(&s);
    // Opened as node-local pools: loopvol refuses a shared pool on GlusterFS's default options
    // (see `pool::coherence`), and the metadata read is the same either way.
    let local = |dir: &Path, node: &str| {
        Pool::open(dir, PoolOptions::new(NodeName::try_from(node).unwrap())).unwrap()
    };
    let a = local(&gp.pool(Node::A), "node-a");
    let b = std::sync::Arc::new(local(&gp.pool(Node::B), "node-b"));
    let id = create_small(&a, "v");
    let node_a = NodeName::try_from("node-a").unwrap();
    let meta_b = gp.pool(Node::B).join(format!("volumes/{id}/volume.json"));
    loopvol_e2e::poll_until(Duration::from_secs(10), "b sees the volume", || {
        b.get_volume(&vid(&id)).is_ok()
    });
    for round in 0..4 {
        let held = std::fs::File::open(&meta_b).unwrap();
        {
            let mut v = a.volume(&vid(&id)).unwrap();
            if round % 2 == 0 {
                v.claim(&node_a, AccessMode::SingleNodeWriter, None)
                    .unwrap();
            } else {
                v.release(&node_a).unwrap();
            }
        }
        let b2 = std::sync::Arc::clone(&b);
        let idc = id.clone();
        let got = within("a read through b after a replace through a", move || {
            b2.get_volume(&vid(&idc))
                .map(drop)
                .map_err(|e| e.to_string())
        });
        assert!(got.is_ok(), "round {round}: {got:?}");
        drop(held);
    }
}

/// A node's FUSE client dies while a call holds a volume's lock on that mount: releasing the
/// lock (its LOCK_UN fails ENOTCONN) neither panics nor fails, and the other node gets the lock.
#[test]
fn a_lock_held_on_a_dead_mount_is_released_without_a_panic() {
    use loopvol_e2e::gluster::{require_gluster, GlusterPool, Node};
    if !require_gluster() {
        return;
    }
    let s = Scratch::new();
    let mut gp = GlusterPool::start_with(&s, loopvol_e2e::gluster::COHERENT);
    let a = shared_pool(&gp.pool(Node::A), "node-a");
    let b = shared_pool(&gp.pool(Node::B), "node-b");
    let id = create_small(&a, "v");
    let held = a.volume(&vid(&id)).unwrap();
    gp.kill_client(Node::A);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(held)));
    assert!(dropped.is_ok(), "releasing a lock on a dead mount panicked");
    loopvol_e2e::poll_until(Duration::from_secs(10), "node b takes the lock", || {
        b.volume(&vid(&id)).is_ok()
    });
}

/// A released lock is free the moment its guard is gone, for the next call through the same
/// mount and through another one. On FUSE, closing the lock file only queues its release (the
/// brick still held it for a moment after close returned): CSI's calls, which never wait for a
/// lock, were then refused as busy right after the call before them returned.
#[test]
fn a_released_lock_is_free_at_once_through_either_mount() {
    use loopvol_e2e::gluster::{require_gluster, GlusterPool, COHERENT};
    if !require_gluster() {
        return;
    }
    let s = Scratch::new();
    let gp = GlusterPool::start_with(&s, COHERENT);
    let (a, b, id) = one_volume_two_nodes(&gp);
    let mut busy = Vec::new();
    for round in 0..400 {
        drop(a.volume(&id).unwrap());
        let next = if round % 2 == 0 { &a } else { &b };
        if let Err(e) = next.volume(&id) {
            busy.push(format!("round {round}: {e}"));
        }
    }
    assert!(busy.is_empty(), "{} of 400: {busy:#?}", busy.len());
}

/// A lock file this node keeps open after a release (the next lock reuses it) can be removed
/// and made again through another mount: the volume deleted and created again under the same
/// name by another node. The kept file then names nothing; locking through it must not count:
/// the lock is taken on the file the path names now, so it still excludes the other node.
#[test]
fn a_kept_lock_file_replaced_through_another_mount_still_excludes() {
    use loopvol_e2e::gluster::{require_gluster, GlusterPool, Node, COHERENT};
    if !require_gluster() {
        return;
    }
    let s = Scratch::new();
    let gp = GlusterPool::start_with(&s, COHERENT);
    let (a, b, id) = one_volume_two_nodes(&gp);
    let lock_file = |dir: &Path| std::fs::metadata(dir.join(format!("locks/v-{id}.lock")));
    let first = std::os::unix::fs::MetadataExt::ino(&lock_file(&gp.pool(Node::A)).unwrap());
    // Kept by node a after its release.
    drop(a.volume(&id).unwrap());
    b.delete_volume(&id).unwrap();
    assert!(
        lock_file(&gp.pool(Node::B)).is_err(),
        "the delete removed the lock file"
    );
    assert_eq!(create_small(&b, "v"), id.to_string());
    let second = std::os::unix::fs::MetadataExt::ino(&lock_file(&gp.pool(Node::B)).unwrap());
    assert_ne!(first, second, "a new lock file");
    let held_by_b = b.volume(&id).unwrap();
    let err = a
        .volume(&id)
        .map(drop)
        .expect_err("node a locked the volume while node b held it");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    drop(held_by_b);
    drop(a.volume(&id).unwrap());
    // And node b's kept file excludes node a's new one, both ways.
    let held_by_a = a.volume(&id).unwrap();
    let err = b.volume(&id).map(drop).expect_err("both held the volume");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    drop(held_by_a);
}
