//! The FlexVolume driver run as kubelet and the controller-manager run it: the binary cargo built
//! for this test run, argv only, no stdin, and its output parsed as one JSON object. Every call is also checked to write
//! nothing at all to stderr (kubelet parses stdout and stderr combined, so any stray byte breaks
//! it) and to exit 0 for Success / Not supported, 1 for Failure.
//!
//! Kernel tests run as root on their own temporary pool (parallel-safe) and leave nothing mounted
//! or attached. "Nodes" in attach mode are the same machine with LOOPVOL_NODE=node-a / node-b
//! sharing one pool, as a shared pool on a cluster filesystem looks to each node.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;

use loopvol_e2e::flex::{check_protocol, kubelet_options, kubelet_pod_options, Flex};
use loopvol_e2e::freeze::Frozen;
use loopvol_e2e::gluster::{self, GlusterPool, Node};
use loopvol_e2e::hazard;
use loopvol_e2e::kernel;
use loopvol_e2e::{
    cleanup_under, fs_size, fs_tools, loops_under, mounts_under, require_root, write_synced,
    Scratch,
};
use serde_json::{json, Value};

/// The binary under test.
const EXE: &str = env!("CARGO_BIN_EXE_loopvol-flexvolume");
const MIB: u64 = 1 << 20;
/// The pod kubelet mounts volumes for.
const POD_UID: &str = "0b7a8e3c-1f2d-4e5f-9a0b-1c2d3e4f5a6b";
/// The secret's value and its base64, as kubelet passes `kubernetes.io/secret/password`.
const SECRET: &str = "hunter2-not-in-any-log";
const SECRET_B64: &str = "aHVudGVyMi1ub3QtaW4tYW55LWxvZw==";

const NODE_CAPS: &str = r#"{"status":"Success","capabilities":{"attach":false,"selinuxRelabel":true,"supportsMetrics":true,"fsGroup":false,"requiresFSResize":true}}"#;

/// The options kubelet sends to `mount` for a PV named `pv` in a pod with fsGroup 2000 and the
/// PV's secret (plus the PV's own `extra` options).
fn kubelet_mount_options(pv: &str, fs: &str, rw: &str, extra: Value) -> String {
    let mut pv_options = json!({
        "kubernetes.io/mounterArgs.FsGroup": "2000",
        "kubernetes.io/secret/username": "ZmxleHVzZXI=",
        "kubernetes.io/secret/password": SECRET_B64,
    });
    for (k, v) in extra.as_object().expect("extra options") {
        pv_options[k] = v.clone();
    }
    kubelet_pod_options(pv, fs, rw, POD_UID, &pv_options)
}

/// The options kubelet sends to attach-family calls (no pod keys, no secrets).
fn kubelet_attach_options(pv: &str, fs: &str, rw: &str, extra: Value) -> String {
    kubelet_options(pv, fs, rw, &extra)
}

/// The driver in node mode, as node-a of the scratch pool.
fn node_mode(s: &Scratch) -> Flex {
    Flex::new(EXE, s, "node-a", false)
}

/// An installed copy of the driver at `path`, with `config` as the `loopvol.json` beside it.
fn install(path: &Path, config: &Value) -> Flex {
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(EXE, path).unwrap();
    std::fs::write(dir.join("loopvol.json"), config.to_string()).unwrap();
    Flex::installed(path)
}

fn gate(fs: &str) -> bool {
    require_root(fs_tools(fs))
}

fn mkdir(p: &Path) -> String {
    std::fs::create_dir_all(p).unwrap();
    p.display().to_string()
}

fn mount_count(s: &Scratch, p: &Path) -> usize {
    mounts_under(&s.root()).iter().filter(|m| *m == p).count()
}

fn log_text(s: &Scratch) -> String {
    std::fs::read_to_string(s.path("flexvolume.log")).unwrap_or_default()
}

fn assert_no_secrets_logged(s: &Scratch) {
    let log = log_text(s);
    assert!(!log.is_empty(), "the calls should have logged");
    assert!(!log.contains(SECRET), "the secret reached the log");
    assert!(
        !log.contains(SECRET_B64),
        "the secret's base64 reached the log"
    );
    assert!(
        !log.contains("ZmxleHVzZXI="),
        "a secret key's value reached the log"
    );
}

/// Everything a call could change: the pool's files (metadata content included), the mounts
/// and loop devices under the scratch dir.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    files: BTreeMap<PathBuf, String>,
    mounts: Vec<PathBuf>,
    loops: Vec<PathBuf>,
}

fn state(s: &Scratch) -> State {
    fn walk(dir: &Path, files: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                files.insert(p.clone(), "dir".into());
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "json") {
                files.insert(p.clone(), std::fs::read_to_string(&p).unwrap());
            } else {
                files.insert(p.clone(), format!("{} bytes", md.len()));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(&s.root(), &mut files);
    // A GlusterFS pool is seen through its mounts; its brick is the server's business.
    let brick = s.path("gluster/brick");
    files.retain(|p, _| !p.ends_with("flexvolume.log") && !p.starts_with(&brick));
    State {
        files,
        mounts: mounts_under(&s.root()),
        loops: loops_under(&s.root()),
    }
}

#[test]
fn init_and_calls_not_supported() {
    let s = Scratch::new();
    let node = node_mode(&s);
    let out = node.command(&["init"]).output().unwrap();
    check_protocol(&["init"], &out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), NODE_CAPS);

    let attach = Flex::new(EXE, &s, "node-a", true);
    let caps = attach.ok(&["init"]);
    assert_eq!(caps["capabilities"]["attach"], true, "{caps}");
    assert_eq!(caps["capabilities"]["fsGroup"], false, "{caps}");
    assert_eq!(caps["capabilities"]["requiresFSResize"], true, "{caps}");

    let opts = kubelet_attach_options("pv-1", "ext4", "rw", json!({}));
    let before = state(&s);
    for args in [
        vec!["attach", &opts, "node-a"],
        vec!["isattached", &opts, "node-a"],
        vec!["detach", "pv-1", "node-a"],
        vec!["waitforattach", "loopvol:pv-1", &opts],
        vec!["mountdevice", "/var/lib/kubelet/x", "/dev/loop0", &opts],
        vec!["unmountdevice", "/var/lib/kubelet/x"],
        vec!["getvolumename", &opts],
        vec!["expandvolume", &opts, "/x", "2048", "1024"],
        vec!["frobnicate"],
        vec!["frobnicate", "with", "args"],
    ] {
        let reply = node.call(&args);
        assert_eq!(reply["status"], "Not supported", "{args:?}: {reply}");
    }
    for args in [
        vec!["getvolumename", opts.as_str()],
        vec!["expandvolume", &opts, "/x", "2048", "1024"],
    ] {
        assert_eq!(attach.call(&args)["status"], "Not supported", "{args:?}");
    }
    assert_eq!(state(&s), before, "a Not supported call changed something");
}

/// A copy installed anywhere (as the installer does) reads `loopvol.json` beside itself; the
/// environment overrides it; a broken config fails every call with a clear message.
#[test]
fn installed_copy_reads_its_config() {
    let s = Scratch::new();
    let pool = s.pool();
    let installed = s.path("plugins/loopvol~loopvol/loopvol");
    let config = s.path("plugins/loopvol~loopvol/loopvol.json");
    let flex = install(
        &installed,
        &json!({"attach": true, "pool": pool, "log": s.path("cfg.log"), "node": null, "lockTimeoutSeconds": 5}),
    );
    assert_eq!(flex.ok(&["init"])["capabilities"]["attach"], true);
    let overridden = flex.clone().with_env("LOOPVOL_ATTACH", "false");
    assert_eq!(overridden.ok(&["init"])["capabilities"]["attach"], false);
    // A non-init call in attach mode logs to the configured file.
    flex.ok(&["detach", "pv-none", "node-a"]);
    assert!(std::fs::read_to_string(s.path("cfg.log"))
        .unwrap()
        .contains("detach"));

    std::fs::write(&config, r#"{"atach": true}"#).unwrap();
    let m = flex.fail(&["init"]);
    assert!(
        m.contains("unknown field `atach`") && m.contains("loopvol.json"),
        "{m}"
    );
    std::fs::write(&config, "{not json").unwrap();
    let m = flex.fail(&["init"]);
    assert!(
        m.contains("misconfigured") && m.contains("loopvol.json"),
        "{m}"
    );
    std::fs::write(&config, r#"{"lockTimeoutSeconds": 86400}"#).unwrap();
    assert!(flex.fail(&["init"]).contains("lockTimeoutSeconds"));

    // A log file that cannot be opened: no logs, same reply.
    std::fs::write(
        &config,
        json!({"pool": pool, "log": "/proc/no-such-dir/x.log"}).to_string(),
    )
    .unwrap();
    assert_eq!(flex.ok(&["init"])["capabilities"]["attach"], false);
    let reply = flex.call(&["getvolumename", "{}"]);
    assert_eq!(reply["status"], "Not supported");
    let m = flex.fail(&["unmount", "relative/dir"]);
    assert!(m.contains("not absolute"), "{m}");
    let m = node_mode(&s)
        .with_env("LOOPVOL_ATTACH", "yes")
        .fail(&["init"]);
    assert!(m.contains("LOOPVOL_ATTACH"), "{m}");
}

/// An install that symlinks `<plugindir>/loopvol~loopvol/loopvol` to a binary elsewhere: kubelet
/// runs the symlink by its full path, and the config beside it is the one that counts.
#[test]
fn symlinked_install_reads_the_config_in_the_plugin_dir() {
    let s = Scratch::new();
    let dir = s.path("plugins/loopvol~loopvol");
    let elsewhere = s.path("opt/bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let real = elsewhere.join("loopvol-flexvolume");
    std::fs::copy(EXE, &real).unwrap();
    let link = dir.join("loopvol");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::write(
        dir.join("loopvol.json"),
        json!({"attach": true, "pool": s.pool(), "log": ""}).to_string(),
    )
    .unwrap();
    let flex = Flex::installed(link);
    assert_eq!(flex.ok(&["init"])["capabilities"]["attach"], true);
}

/// A panic still produces exactly one Failure object, nothing on stderr, exit 1.
#[test]
fn panic_is_one_failure_object() {
    let s = Scratch::new();
    let flex = node_mode(&s).with_env("LOOPVOL_TEST_PANIC", "1");
    let m = flex.fail(&[
        "unmount",
        "/var/lib/kubelet/pods/x/volumes/loopvol~loopvol/v",
    ]);
    assert!(
        m.contains("panicked") && m.contains("LOOPVOL_TEST_PANIC"),
        "{m}"
    );
    assert!(
        log_text(&s).contains("panicked"),
        "the panic should be logged"
    );
    // Same with no usable log file.
    let flex = flex.with_env("LOOPVOL_LOG", "/proc/no-such-dir/x.log");
    assert!(flex.fail(&["unmount", "/x/y"]).contains("panicked"));
}

/// A busy volume lock makes the call wait (bounded by lockTimeoutSeconds) and say so.
#[test]
fn busy_volume_fails_after_the_configured_wait() {
    let s = Scratch::new();
    let flex = install(
        &s.path("plugin/loopvol"),
        &json!({"pool": s.pool(), "log": "", "node": "node-a", "lockTimeoutSeconds": 1}),
    );
    // Open the pool's layout, then hold the volume's lock as another call would.
    s.open_pool("node-a", false);
    let _held = s.hold_volume_lock("busy");
    let pod = mkdir(&s.path("pods/p/vol"));
    let started = std::time::Instant::now();
    let m = flex.fail(&[
        "mount",
        &pod,
        &json!({"volumeID": "busy", "size": "64Mi"}).to_string(),
    ]);
    assert!(m.contains("busy") && m.contains("waiting 1s"), "{m}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(!s.pool().join("volumes/busy").exists());
}

/// Every bad input gets a clear Failure and changes nothing: not the pool, not the mount table.
#[test]
fn bad_inputs_fail_clearly_and_change_nothing() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    // Something real in place, so "unchanged" means something.
    let good_pod = mkdir(&s.path("pods/good/vol"));
    flex.ok(&[
        "mount",
        &good_pod,
        &kubelet_mount_options("good", "ext4", "rw", json!({"size": "64Mi"})),
    ]);
    let pod = mkdir(&s.path("pods/p1/vol"));
    let start = state(&s);
    let mut before = start.clone();

    let opts = |extra: Value| kubelet_mount_options("pv-new", "", "rw", extra);
    let no_name =
        json!({"kubernetes.io/fsType": "ext4", "kubernetes.io/readwrite": "rw"}).to_string();
    let missing_dir = s.path("pods/never-created/vol").display().to_string();
    // `mount <pod dir> <options>`, the call most bad inputs come with.
    let mount = |options: String| vec!["mount".to_owned(), pod.clone(), options];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "no call given"),
        (vec!["mount".into()], "mount needs pod volume dir"),
        (
            vec!["mount".into(), pod.clone()],
            "mount needs the JSON options",
        ),
        (mount("{not json".into()), "not valid JSON"),
        (mount("".into()), "not valid JSON"),
        (mount("[1,2]".into()), "must be a JSON object, not an array"),
        (
            mount("\"volumeID\"".into()),
            "must be a JSON object, not a string",
        ),
        (mount("null".into()), "must be a JSON object, not null"),
        (mount("{}".into()), "no volume named"),
        (mount(no_name), "no volume named"),
        (
            mount(opts(json!({"volumeID": "../evil", "size": "64Mi"}))),
            "invalid volume ID",
        ),
        (
            mount(opts(json!({"volumeID": "..", "size": "64Mi"}))),
            "invalid volume ID",
        ),
        (
            mount(opts(json!({"volumeID": "a/b", "size": "64Mi"}))),
            "invalid volume ID",
        ),
        (
            mount(kubelet_mount_options(
                "../../etc",
                "",
                "rw",
                json!({"size": "64Mi"}),
            )),
            "invalid volume ID",
        ),
        (mount(opts(json!({"size": "lots"}))), "invalid size"),
        (mount(opts(json!({"size": "-1Gi"}))), "invalid size"),
        (mount(opts(json!({"size": "0"}))), "invalid size"),
        (
            mount(opts(json!({"size": {"Gi": 1}}))),
            "\"size\" must be a string",
        ),
        (
            mount(kubelet_mount_options(
                "pv-new",
                "ntfs",
                "rw",
                json!({"size": "64Mi"}),
            )),
            "\"ntfs\" is not supported",
        ),
        (
            mount(kubelet_mount_options(
                "pv-new",
                "ext4",
                "maybe",
                json!({"size": "64Mi"}),
            )),
            "\"rw\" or \"ro\"",
        ),
        (
            mount(opts(
                json!({"size": "64Mi", "kubernetes.io/mounterArgs.FsGroup": "staff"}),
            )),
            "group ID",
        ),
        (
            mount(opts(
                json!({"size": "64Mi", "mountOptions": "noatime,bind"}),
            )),
            "invalid mount option",
        ),
        (
            mount(opts(
                json!({"size": "64Mi", "mountOptions": "device=/dev/sda"}),
            )),
            "invalid mount option",
        ),
        (
            vec![
                "mount".into(),
                "relative/pod/vol".into(),
                opts(json!({"size": "64Mi"})),
            ],
            "is not absolute",
        ),
        (
            vec!["mount".into(), missing_dir, opts(json!({"size": "64Mi"}))],
            "does not exist",
        ),
        (
            vec![
                "mount".into(),
                "/etc/pods/vol".into(),
                opts(json!({"size": "64Mi"})),
            ],
            "system directory",
        ),
        (
            vec![
                "mount".into(),
                format!("{pod}/../../p1/vol"),
                opts(json!({"size": "64Mi"})),
            ],
            "not normalized",
        ),
        (mount(opts(json!({}))), "not found"),
        (vec!["unmount".into()], "unmount needs pod volume dir"),
        (
            vec!["unmount".into(), "pods/p1/vol".into()],
            "is not absolute",
        ),
        (
            vec![
                "expandfs".into(),
                opts(json!({})),
                "".into(),
                pod.clone(),
                "big".into(),
                "1".into(),
            ],
            "number of bytes",
        ),
        (
            vec![
                "expandfs".into(),
                opts(json!({})),
                "".into(),
                pod.clone(),
                "1073741824".into(),
                "1".into(),
            ],
            "not found",
        ),
        (
            vec!["expandfs".into(), opts(json!({}))],
            "expandfs needs the device mount path",
        ),
    ];
    // Every case runs; the failure lists each one that did not fail as it should.
    let mut wrong = Vec::new();
    for (args, expect) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = flex.call(&args);
        let message = reply["message"].as_str().unwrap_or_default();
        if reply["status"] != "Failure" || !message.contains(expect) {
            wrong.push(format!(
                "  {args:?}: expected a Failure naming {expect:?}, got {reply}"
            ));
        }
        let after = state(&s);
        if after != before {
            wrong.push(format!("  {args:?} changed the pool or the mount table"));
        }
        before = after; // each case is judged on its own change
    }
    assert!(
        wrong.is_empty(),
        "{} of {} bad inputs were not refused cleanly:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    // A pool that does not exist is refused, not created.
    let m = flex
        .clone()
        .with_env("LOOPVOL_POOL", &s.path("no-pool").display().to_string())
        .fail(&["unmount", &pod]);
    assert!(m.contains("no-pool") && m.contains("cannot use it"), "{m}");
    assert!(!s.path("no-pool").exists());
    assert_eq!(state(&s), start);

    flex.ok(&["unmount", &good_pod]);
    s.assert_clean("left behind");
    assert_no_secrets_logged(&s);
}

/// Node mode, ext4: the whole kubelet key set, fsGroup, data across unmount/mount, two pods on
/// one volume, a read-only pod, repeats of every call, and secrets kept out of the log.
#[test]
fn node_mode_lifecycle_ext4() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let create = kubelet_mount_options(
        "pv-web",
        "ext4",
        "rw",
        json!({"volumeID": "vol-web", "size": "128Mi", "mountOptions": "noatime"}),
    );
    let pod1 = s.path("pods/uid-1/volumes/loopvol~loopvol/pv-web");
    let pod1s = mkdir(&pod1);
    flex.ok(&["mount", &pod1s, &create]);
    assert_eq!(mount_count(&s, &pod1), 1);
    // fsGroup applied by the driver: the volume root belongs to the group, setgid, group-writable.
    let md = std::fs::metadata(&pod1).unwrap();
    assert_eq!(md.gid(), 2000);
    assert_eq!(
        md.permissions().mode() & 0o2070,
        0o2070,
        "{:o}",
        md.permissions().mode()
    );
    assert!(fs_size(&pod1) > 100 * MIB);
    write_synced(&pod1.join("index.html"), b"hello from pod 1");

    // A repeat (kubelet retried) changes nothing.
    flex.ok(&["mount", &pod1s, &create]);
    assert_eq!(mount_count(&s, &pod1), 1);

    // A second pod on the same volume sees the data; a third, read-only, cannot write.
    let pod2 = s.path("pods/uid-2/volumes/loopvol~loopvol/pv-web");
    flex.ok(&["mount", &mkdir(&pod2), &create]);
    assert_eq!(
        std::fs::read(pod2.join("index.html")).unwrap(),
        b"hello from pod 1"
    );
    let pod3 = s.path("pods/uid-3/volumes/loopvol~loopvol/pv-web");
    let ro = kubelet_mount_options(
        "pv-web",
        "ext4",
        "ro",
        json!({"volumeID": "vol-web", "size": "128Mi"}),
    );
    flex.ok(&["mount", &mkdir(&pod3), &ro]);
    assert_eq!(
        std::fs::read(pod3.join("index.html")).unwrap(),
        b"hello from pod 1"
    );
    let err = std::fs::write(pod3.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()), "{err}");
    write_synced(&pod2.join("from-pod-2"), b"two");
    assert!(pod3.join("from-pod-2").exists());
    assert_eq!(
        loops_under(&s.root()).len(),
        1,
        "one loop device for the volume"
    );

    // Unmount one pod: the others keep working.
    flex.ok(&["unmount", &pod1s]);
    assert!(!pod1.exists(), "kubelet's dir is removed once unmounted");
    flex.ok(&["unmount", &pod1s]);
    assert_eq!(std::fs::read(pod2.join("from-pod-2")).unwrap(), b"two");
    flex.ok(&["unmount", &pod2.display().to_string()]);
    flex.ok(&["unmount", &pod3.display().to_string()]);
    s.assert_clean("left behind");

    // The data survives; the volume is found by name alone, no size needed; nothing reformats.
    let pod4 = s.path("pods/uid-4/volumes/loopvol~loopvol/pv-web");
    let by_id = kubelet_mount_options("pv-web", "", "rw", json!({"volumeID": "vol-web"}));
    flex.ok(&["mount", &mkdir(&pod4), &by_id]);
    assert_eq!(
        std::fs::read(pod4.join("index.html")).unwrap(),
        b"hello from pod 1"
    );
    assert_eq!(std::fs::read(pod4.join("from-pod-2")).unwrap(), b"two");
    // The same PV with a size that no longer matches (the PV was not edited after an expand) is fine.
    let pod5 = s.path("pods/uid-5/volumes/loopvol~loopvol/pv-web");
    flex.ok(&[
        "mount",
        &mkdir(&pod5),
        &kubelet_mount_options(
            "pv-web",
            "ext4",
            "rw",
            json!({"volumeID": "vol-web", "size": "64Mi"}),
        ),
    ]);
    flex.ok(&["unmount", &pod5.display().to_string()]);
    flex.ok(&["unmount", &pod4.display().to_string()]);

    // Unmount of a dir that was never mounted succeeds.
    let never = s.path("pods/uid-9/volumes/loopvol~loopvol/pv-web");
    flex.ok(&["unmount", &mkdir(&never)]);
    flex.ok(&["unmount", &s.path("pods/uid-10/gone").display().to_string()]);
    s.assert_clean("left behind");
    assert_no_secrets_logged(&s);
    // The options argument is logged by its length only (issue 12).
    assert!(log_text(&s).contains("bytes, not shown"));
}

fn libc_erofs() -> i32 {
    nix::errno::Errno::EROFS as i32
}

/// After a reboot kubelet unmounts pod dirs that are no longer mounted, and the staging mount
/// and loop device are gone: unmount succeeds and cleans up, and the volume mounts again.
#[test]
fn unmount_after_the_staging_mount_vanished() {
    if !gate("btrfs") {
        return;
    }
    let _btrfs = hazard::formats_btrfs();
    let s = Scratch::new();
    let flex = node_mode(&s);
    let opts = kubelet_mount_options("pv-reboot", "btrfs", "rw", json!({"size": "320Mi"}));
    let pod = s.path("pods/uid-1/volumes/loopvol~loopvol/pv-reboot");
    let pods = mkdir(&pod);
    flex.ok(&["mount", &pods, &opts]);
    write_synced(&pod.join("kept"), b"before the reboot");

    // Simulated reboot: everything unmounted and detached behind the driver's back.
    s.cleanup_kernel_state();
    s.assert_clean("left behind");
    flex.ok(&["unmount", &pods]);
    assert!(!pod.exists(), "the stale pod dir is removed");
    s.assert_clean("left behind");

    // Mounts again, data intact.
    flex.ok(&["mount", &mkdir(&pod), &opts]);
    assert_eq!(
        std::fs::read(pod.join("kept")).unwrap(),
        b"before the reboot"
    );

    // Only the staging mount vanished (the pod's bind is still there): unmount cleans up all.
    let staging = s.pool().join("staging/node-a/pv-reboot");
    assert_eq!(mount_count(&s, &staging), 1);
    nix::mount::umount2(&staging, nix::mount::MntFlags::MNT_DETACH).unwrap();
    flex.ok(&["unmount", &pods]);
    s.assert_clean("left behind");
    assert!(!pod.exists());
}

/// kubelet may run the same call twice at once (a retry racing the first), and different pods
/// of one volume concurrently: every process succeeds and the end state is right.
#[test]
fn concurrent_calls_from_separate_processes() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let opts = kubelet_mount_options("pv-race", "ext4", "rw", json!({"size": "96Mi"}));
    let pod_a = s.path("pods/a/volumes/loopvol~loopvol/pv-race");
    let pod_b = s.path("pods/b/volumes/loopvol~loopvol/pv-race");
    let (a, b) = (mkdir(&pod_a), mkdir(&pod_b));
    let wait_all = |children: Vec<(Vec<String>, Child)>| {
        for (args, child) in children {
            let out = child.wait_with_output().unwrap();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let reply = check_protocol(&args, &out);
            assert_eq!(reply["status"], "Success", "{args:?}: {reply}");
        }
    };
    let start = |calls: &[Vec<String>]| {
        calls
            .iter()
            .map(|args| {
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                (args.clone(), flex.spawn(&argv))
            })
            .collect::<Vec<_>>()
    };
    // The first mounts also create and format the volume: all race for it.
    let mount_a = vec!["mount".to_owned(), a.clone(), opts.clone()];
    let mount_b = vec!["mount".to_owned(), b.clone(), opts.clone()];
    wait_all(start(&[
        mount_a.clone(),
        mount_a.clone(),
        mount_b.clone(),
        mount_b.clone(),
    ]));
    assert_eq!(mount_count(&s, &pod_a), 1);
    assert_eq!(mount_count(&s, &pod_b), 1);
    assert_eq!(loops_under(&s.root()).len(), 1);
    write_synced(&pod_a.join("f"), b"shared");
    assert_eq!(std::fs::read(pod_b.join("f")).unwrap(), b"shared");

    let unmount_a = vec!["unmount".to_owned(), a.clone()];
    let unmount_b = vec!["unmount".to_owned(), b.clone()];
    wait_all(start(&[
        unmount_a.clone(),
        unmount_a.clone(),
        unmount_b.clone(),
        unmount_b,
    ]));
    s.assert_clean("left behind");

    // A pod unmounting while another mounts the same volume.
    flex.ok(&["mount", &mkdir(&pod_a), &opts]);
    wait_all(start(&[
        unmount_a,
        vec!["mount".to_owned(), mkdir(&pod_b), opts.clone()],
    ]));
    assert_eq!(std::fs::read(pod_b.join("f")).unwrap(), b"shared");
    flex.ok(&["unmount", &b]);
    s.assert_clean("left behind");
}

/// expandfs grows the image and the mounted filesystem (xfs, btrfs: online).
fn expand_online(fs: &str) {
    if !gate(fs) {
        return;
    }
    let _btrfs = hazard::for_fs(fs);
    let s = Scratch::new();
    let flex = node_mode(&s);
    let pv = format!("pv-grow-{fs}");
    let opts = kubelet_mount_options(&pv, fs, "rw", json!({"size": "320Mi"}));
    let pod = s.path(&format!("pods/uid-1/volumes/loopvol~loopvol/{pv}"));
    let pods = mkdir(&pod);
    flex.ok(&["mount", &pods, &opts]);
    write_synced(&pod.join("data"), b"grow me");
    let before = fs_size(&pod);
    let new = (640 * MIB).to_string();
    let old = (320 * MIB).to_string();
    let json = kubelet_attach_options(&pv, fs, "rw", json!({}));
    // kubelet passes no device and the pod's dir for a volume without a device mount.
    flex.ok(&["expandfs", &json, "", &pods, &new, &old]);
    let after = fs_size(&pod);
    assert!(after > before + 200 * MIB, "{fs}: {before} → {after}");
    // A repeat is a no-op; a smaller size never shrinks.
    flex.ok(&["expandfs", &json, "", &pods, &new, &old]);
    flex.ok(&["expandfs", &json, "", "", &old, &new]);
    assert_eq!(fs_size(&pod), after);
    flex.ok(&["unmount", &pods]);
    flex.ok(&["mount", &mkdir(&pod), &opts]);
    assert_eq!(fs_size(&pod), after);
    assert_eq!(std::fs::read(pod.join("data")).unwrap(), b"grow me");
    flex.ok(&["unmount", &pods]);
    s.assert_clean("left behind");
}

#[test]
fn expandfs_online_xfs() {
    expand_online("xfs");
}

#[test]
fn expandfs_online_btrfs() {
    expand_online("btrfs");
}

/// ext4 grows online only with CAP_SYS_RESOURCE; without it expandfs says so clearly and the
/// next mount grows the filesystem offline.
#[test]
fn expandfs_ext4_grows_online_or_at_next_mount() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let opts = kubelet_mount_options("pv-grow-ext4", "ext4", "rw", json!({"size": "128Mi"}));
    let pod = s.path("pods/uid-1/volumes/loopvol~loopvol/pv-grow-ext4");
    let pods = mkdir(&pod);
    flex.ok(&["mount", &pods, &opts]);
    write_synced(&pod.join("data"), b"ext4");
    let before = fs_size(&pod);
    let json = kubelet_attach_options("pv-grow-ext4", "ext4", "rw", json!({}));
    let args = ["expandfs", &json, "", &pods, "402653184", "134217728"];
    if kernel::can_grow_ext4_online() {
        flex.ok(&args);
        assert!(fs_size(&pod) > before + 200 * MIB);
    } else {
        let m = flex.fail(&args);
        assert!(
            m.contains("CAP_SYS_RESOURCE") && m.contains("grown offline"),
            "{m}"
        );
        assert_eq!(fs_size(&pod), before);
    }
    flex.ok(&["unmount", &pods]);
    flex.ok(&["mount", &mkdir(&pod), &opts]);
    assert!(
        fs_size(&pod) > before + 200 * MIB,
        "the next mount grows it: {}",
        fs_size(&pod)
    );
    assert_eq!(std::fs::read(pod.join("data")).unwrap(), b"ext4");
    flex.ok(&["unmount", &pods]);
    s.assert_clean("left behind");
}

/// Attach mode on a shared pool: the controller-manager's calls and two nodes' kubelet calls.
/// A read-write volume is refused to the second node, with a clear message, until released.
#[test]
fn attach_mode_two_nodes_share_a_pool() {
    if !gate("xfs") {
        return;
    }
    let s = Scratch::new();
    let pool = s.pool();
    attach_mode_scenario(&s, [&pool, &pool, &pool], &[]);
}

/// The same on GlusterFS (with the options a shared pool needs, see `gluster::COHERENT`): the
/// controller-manager and node-a on mount A, node-b on mount B.
#[test]
fn attach_mode_on_glusterfs() {
    if !gate("xfs") || !gluster::require_gluster() {
        return;
    }
    let s = Scratch::new();
    let gp = GlusterPool::start_with(&s, gluster::COHERENT);
    let (a, b) = (gp.pool(Node::A), gp.pool(Node::B));
    let own = [Node::A, Node::B].map(|n| gp.mount_point(n).to_path_buf());
    attach_mode_scenario(&s, [&a, &a, &b], &own);
}

/// Fails naming them when mounts (but the pool's own, `own`) or loop devices are left under the
/// scratch dir.
#[track_caller]
fn assert_clean_but(s: &Scratch, own: &[PathBuf], when: &str) {
    let mut mounts = mounts_under(&s.root());
    mounts.retain(|m| !own.contains(m));
    let loops = loops_under(&s.root());
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "{when}: left mounted {mounts:?}, left attached {loops:?}"
    );
}

/// The controller-manager, node-a and node-b with the pool at `pools` (in that order); `own`:
/// the mounts the pool itself is on.
fn attach_mode_scenario(s: &Scratch, pools: [&Path; 3], own: &[PathBuf]) {
    let flex = |name: &str, pool: &Path| {
        Flex::new(EXE, s, name, true).with_env("LOOPVOL_POOL", &pool.display().to_string())
    };
    let cm = flex("controller", pools[0]);
    let node_a = flex("node-a", pools[1]);
    let node_b = flex("node-b", pools[2]);
    let opts = kubelet_attach_options(
        "pv-shared",
        "xfs",
        "rw",
        json!({"volumeID": "vol-shared", "size": "320Mi"}),
    );
    let pod_opts = kubelet_mount_options(
        "pv-shared",
        "xfs",
        "rw",
        json!({"volumeID": "vol-shared", "size": "320Mi"}),
    );
    let dmp = |node: &str| {
        s.path(&format!(
            "{node}/plugins/kubernetes.io/flexvolume/loopvol/loopvol/mounts/pv-shared"
        ))
    };
    let pod = |node: &str| {
        s.path(&format!(
            "{node}/pods/uid-1/volumes/loopvol~loopvol/pv-shared"
        ))
    };

    // controller-manager: attach to node-a (creates the volume), idempotently.
    let reply = cm.ok(&["attach", &opts, "node-a"]);
    assert_eq!(reply["device"], "loopvol:vol-shared");
    cm.ok(&["attach", &opts, "node-a"]);
    assert_eq!(cm.ok(&["isattached", &opts, "node-a"])["attached"], true);
    assert_eq!(cm.ok(&["isattached", &opts, "node-b"])["attached"], false);
    let before = state(s);
    let m = cm.fail(&["attach", &opts, "node-b"]);
    assert!(
        m.contains("read-write on node node-a") && m.contains("node-b"),
        "{m}"
    );
    assert_eq!(state(s), before);

    // kubelet on node-a.
    let device = node_a.ok(&["waitforattach", "loopvol:vol-shared", &opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(device.starts_with("/dev/loop"), "{device}");
    assert!(std::fs::metadata(&device)
        .unwrap()
        .file_type()
        .is_block_device());
    assert_eq!(
        node_a.ok(&["waitforattach", "loopvol:vol-shared", &opts])["device"],
        device.as_str()
    );
    let (dmp_a, pod_a) = (dmp("node-a"), pod("node-a"));
    node_a.ok(&["mountdevice", &dmp_a.display().to_string(), &device, &opts]);
    node_a.ok(&["mountdevice", &dmp_a.display().to_string(), &device, &opts]);
    assert_eq!(mount_count(s, &dmp_a), 1);
    node_a.ok(&["mount", &mkdir(&pod_a), &pod_opts]);
    node_a.ok(&["mount", &pod_a.display().to_string(), &pod_opts]);
    assert_eq!(mount_count(s, &pod_a), 1);
    assert_eq!(std::fs::metadata(&pod_a).unwrap().gid(), 2000);
    write_synced(&pod_a.join("written-on-a"), b"node a was here");

    // node-b cannot use it read-write meanwhile, and its failed attempt changes nothing.
    let before = state(s);
    let m = node_b.fail(&["waitforattach", "loopvol:vol-shared", &opts]);
    assert!(
        m.contains("read-write on node node-a") && m.contains("released there"),
        "{m}"
    );
    let m = node_b.fail(&[
        "mountdevice",
        &dmp("node-b").display().to_string(),
        &device,
        &opts,
    ]);
    assert!(m.contains("node node-a"), "{m}");
    assert_eq!(state(s), before);
    // A handle naming another volume is refused.
    assert!(node_a
        .fail(&["waitforattach", "loopvol:other", &opts])
        .contains("other"));

    // node-a lets go: unmount, unmountdevice (twice), then the controller detaches.
    node_a.ok(&["unmount", &pod_a.display().to_string()]);
    node_a.ok(&["unmount", &pod_a.display().to_string()]);
    assert_eq!(
        mount_count(s, &dmp_a),
        1,
        "unmount leaves the device mount to unmountdevice"
    );
    node_a.ok(&["unmountdevice", &dmp_a.display().to_string()]);
    node_a.ok(&["unmountdevice", &dmp_a.display().to_string()]);
    assert_clean_but(s, own, "left behind");
    cm.ok(&["detach", "pv-shared", "node-a"]);
    cm.ok(&["detach", "pv-shared", "node-a"]);
    cm.ok(&["detach", "pv-never-attached", "node-a"]);
    assert_eq!(cm.ok(&["isattached", &opts, "node-a"])["attached"], false);

    // Now node-b gets it, with node-a's data.
    cm.ok(&["attach", &opts, "node-b"]);
    let device = node_b.ok(&["waitforattach", "loopvol:vol-shared", &opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    let (dmp_b, pod_b) = (dmp("node-b"), pod("node-b"));
    node_b.ok(&["mountdevice", &dmp_b.display().to_string(), &device, &opts]);
    node_b.ok(&["mount", &mkdir(&pod_b), &pod_opts]);
    assert_eq!(
        std::fs::read(pod_b.join("written-on-a")).unwrap(),
        b"node a was here"
    );
    // kubelet's expandfs in attach mode names the device and the device mount path.
    let before = fs_size(&pod_b);
    let new = (640 * MIB).to_string();
    let old = (320 * MIB).to_string();
    node_b.ok(&[
        "expandfs",
        &opts,
        &device,
        &dmp_b.display().to_string(),
        &new,
        &old,
    ]);
    assert!(
        fs_size(&pod_b) > before + 200 * MIB,
        "{before} → {}",
        fs_size(&pod_b)
    );

    // node-b reboots: its mounts and loop device vanish. kubelet's cleanup calls succeed and
    // release node-b's hold, so node-a can take the volume back.
    cleanup_under(&s.path("node-b"));
    for dev in kernel::loops_backing(&pools[2].join("volumes/vol-shared/image")) {
        kernel::detach(&dev).unwrap();
    }
    node_b.ok(&["unmount", &pod_b.display().to_string()]);
    node_b.ok(&["unmountdevice", &dmp_b.display().to_string()]);
    cm.ok(&["detach", "pv-shared", "node-b"]);
    cm.ok(&["attach", &opts, "node-a"]);
    let device = node_a.ok(&["waitforattach", "loopvol:vol-shared", &opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    node_a.ok(&["mountdevice", &dmp_a.display().to_string(), &device, &opts]);
    node_a.ok(&["mount", &mkdir(&pod_a), &pod_opts]);
    assert_eq!(
        std::fs::read(pod_a.join("written-on-a")).unwrap(),
        b"node a was here"
    );
    node_a.ok(&["unmount", &pod_a.display().to_string()]);
    node_a.ok(&["unmountdevice", &dmp_a.display().to_string()]);
    cm.ok(&["detach", "pv-shared", "node-a"]);
    assert_clean_but(s, own, "left behind");

    // Read-only claims may be shared by both nodes.
    let ro = kubelet_attach_options("pv-shared", "xfs", "ro", json!({"volumeID": "vol-shared"}));
    cm.ok(&["attach", &ro, "node-a"]);
    cm.ok(&["attach", &ro, "node-b"]);
    assert_eq!(cm.ok(&["isattached", &ro, "node-b"])["attached"], true);
    cm.ok(&["detach", "pv-shared", "node-a"]);
    cm.ok(&["detach", "pv-shared", "node-b"]);
    assert_no_secrets_logged(s);
}

/// A call stuck in the kernel (here a chown on a frozen filesystem) still answers Failure once
/// `callTimeoutSeconds` pass: kubelet waits on `mount` without a timeout of its own.
#[test]
fn a_hung_call_still_answers_in_time() {
    if !gate("ext4") || !require_root(&["fsfreeze"]) {
        return;
    }
    let s = Scratch::new();
    let flex = install(
        &s.path("plugin/loopvol"),
        &json!({"pool": s.pool(), "log": "", "node": "node-a",
                "lockTimeoutSeconds": 1, "callTimeoutSeconds": 3}),
    );
    let pod1 = mkdir(&s.path("pods/p1/vol"));
    flex.ok(&[
        "mount",
        &pod1,
        &json!({"volumeID": "hang", "size": "64Mi"}).to_string(),
    ]);
    let staging = s.pool().join("staging/node-a/hang");

    let frozen = Frozen::freeze(&staging);

    let pod2 = mkdir(&s.path("pods/p2/vol"));
    let started = std::time::Instant::now();
    let mut child = flex.spawn(&[
        "mount",
        &pod2,
        &json!({"volumeID": "hang", "kubernetes.io/mounterArgs.FsGroup": "1234"}).to_string(),
    ]);
    // The reply arrives while the process is still stuck (it can exit only after the thaw).
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("no reply while the call hung");
    let elapsed = started.elapsed();
    frozen.thaw();
    let reply: Value = serde_json::from_str(&line).expect("one JSON object");
    assert_eq!(reply["status"], "Failure", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("did not finish within 3s"), "{message}");
    assert!(
        elapsed < std::time::Duration::from_secs(20),
        "replied after {elapsed:?}"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.is_empty(), "stderr: {stderr}");

    // The next calls finish or undo the job.
    flex.ok(&["unmount", &pod2]);
    flex.ok(&["unmount", &pod1]);
    s.assert_clean("left behind");
}

/// kubelet never unmounts a volume whose `mount` failed (it never counted as mounted), and never
/// calls `unmountdevice` for a device mount path that is not mounted. So a call the backend
/// refuses after attaching (here: a filesystem type other than the one the volume holds) must
/// not leave the loop device or this node's hold behind; a pod already using the volume keeps it.
#[test]
fn a_failed_mount_leaves_no_loop_device_behind() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let opts = kubelet_mount_options("pv-fail", "ext4", "rw", json!({"size": "64Mi"}));
    let wrong = kubelet_mount_options("pv-fail", "xfs", "rw", json!({}));
    let pod1 = s.path("pods/uid-1/volumes/loopvol~loopvol/pv-fail");
    let pod2 = s.path("pods/uid-2/volumes/loopvol~loopvol/pv-fail");
    let (pod1s, pod2s) = (mkdir(&pod1), mkdir(&pod2));
    flex.ok(&["mount", &pod1s, &opts]);
    flex.ok(&["unmount", &pod1s]);
    let before = state(&s);
    let m = flex.fail(&["mount", &pod2s, &wrong]);
    assert!(m.contains("already holds a ext4 filesystem"), "{m}");
    assert_eq!(state(&s), before, "a failed mount left state behind");

    // With another pod using the volume, its staging mount and device stay.
    flex.ok(&["mount", &mkdir(&pod1), &opts]);
    write_synced(&pod1.join("f"), b"still here");
    flex.fail(&["mount", &pod2s, &wrong]);
    assert_eq!(mount_count(&s, &pod1), 1);
    assert_eq!(loops_under(&s.root()).len(), 1);
    assert_eq!(std::fs::read(pod1.join("f")).unwrap(), b"still here");
    flex.ok(&["unmount", &pod1s]);
    s.assert_clean("left behind");

    // Attach mode: waitforattach attached the device; mountdevice is refused; kubelet gives up
    // on the pod and the controller detaches. Nothing may stay attached on the node.
    let cm = Flex::new(EXE, &s, "controller", true);
    let node = Flex::new(EXE, &s, "node-a", true);
    let a_opts = kubelet_attach_options("pv-fail", "", "rw", json!({}));
    let a_wrong = kubelet_attach_options("pv-fail", "xfs", "rw", json!({}));
    let dmp = s.path("node-a/plugins/kubernetes.io/flexvolume/loopvol/loopvol/mounts/pv-fail");
    let dmps = mkdir(&dmp);
    let handle = cm.ok(&["attach", &a_opts, "node-a"])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    let device = node.ok(&["waitforattach", &handle, &a_opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = node.fail(&["mountdevice", &dmps, &device, &a_wrong]);
    assert!(m.contains("already holds a ext4 filesystem"), "{m}");
    s.assert_clean("left behind");
    // kubelet retries waitforattach, then mountdevice: it works once the options are right.
    let device = node.ok(&["waitforattach", &handle, &a_opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    node.ok(&["mountdevice", &dmps, &device, &a_opts]);
    assert_eq!(mount_count(&s, &dmp), 1);
    node.ok(&["unmountdevice", &dmps]);
    cm.ok(&["detach", "pv-fail", "node-a"]);
    s.assert_clean("left behind");
}

/// A driver killed in the middle of mkfs (a node crash, an OOM kill) leaves part of a
/// filesystem on the volume. The stage recorded its format intent, with its hold, before mkfs
/// ran: the next mount formats again and succeeds. (Without that record the half-written bytes
/// would be someone's data, never formatted over: the volume would be stuck.)
#[test]
fn a_mount_killed_mid_mkfs_is_finished_by_the_next() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    // An mkfs.ext4 that writes part of a filesystem and kills its caller, as a crash would.
    let bin = s.path("crashing-tools");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("mkfs.ext4");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor dev; do :; done\n\
         head -c 1048576 /dev/zero | tr '\\000' '\\245' | \\\n\
         dd of=\"$dev\" bs=64K seek=1 iflag=fullblock oflag=direct conv=notrunc status=none\n\
         kill -KILL $PPID\nsleep 5\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let crashing = node_mode(&s).with_env("PATH", &path);
    let opts = kubelet_mount_options(
        "pv-crash",
        "ext4",
        "rw",
        json!({"volumeID": "vol-crash", "size": "64Mi"}),
    );
    let pod = s.path("pods/uid-1/volumes/loopvol~loopvol/pv-crash");
    let pods = mkdir(&pod);
    let status = crashing
        .spawn(&["mount", &pods, &opts])
        .wait_with_output()
        .unwrap()
        .status;
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "{status}"
    );

    // What the killed call left: its hold and its format intent, recorded before mkfs ran, and
    // bytes of data on the volume.
    let volumes: Vec<PathBuf> = std::fs::read_dir(s.pool().join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let [dir] = volumes.as_slice() else {
        panic!("{volumes:?}")
    };
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume.json")).unwrap()).unwrap();
    assert_eq!(meta["formatting"], "ext4", "{meta:#}");
    assert_eq!(meta["staged"][0]["node"], "node-a", "{meta:#}");
    let image = std::fs::read(dir.join("image")).unwrap();
    assert!(image.iter().any(|b| *b != 0), "mkfs wrote nothing");

    // The next mount (kubelet retries) finishes the format and mounts it.
    let flex = node_mode(&s);
    flex.ok(&["mount", &pods, &opts]);
    assert_eq!(mount_count(&s, &pod), 1);
    write_synced(&pod.join("f"), b"usable");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume.json")).unwrap()).unwrap();
    assert_eq!(meta["formatting"], Value::Null, "{meta:#}");
    assert_eq!(meta["fs_type"], "ext4", "{meta:#}");
    flex.ok(&["unmount", &pods]);
    s.assert_clean("left behind");
}

/// Options that are not UTF-8 (never from kubelet, whose JSON encoder replaces bad bytes, but
/// from a hand-made call) are refused without echoing them: they may hold secrets, and the
/// Failure message ends up in kubelet's log.
#[test]
fn a_non_utf8_argument_is_refused_without_echoing_it() {
    use std::os::unix::ffi::OsStrExt;
    let s = Scratch::new();
    let flex = node_mode(&s);
    let mut json =
        format!(r#"{{"volumeID":"v","kubernetes.io/secret/password":"{SECRET_B64}","x":""#)
            .into_bytes();
    json.extend_from_slice(b"\xff\"}");
    let out = flex
        .command(&["mount", "/var/lib/kubelet/pods/p/volumes/loopvol~loopvol/v"])
        .arg(std::ffi::OsStr::from_bytes(&json))
        .output()
        .unwrap();
    let reply = check_protocol(&["mount", "<dir>", "<non-UTF-8 JSON>"], &out);
    assert_eq!(reply["status"], "Failure", "{reply}");
    let m = reply["message"].as_str().unwrap();
    assert!(
        m.contains("argument 3") && m.contains("not valid UTF-8"),
        "{m}"
    );
    assert!(!m.contains(SECRET_B64), "the secret was echoed: {m}");
}

/// After a node reboots kubelet does NOT call `unmountdevice` (its device mount path is no longer
/// a mount point: kubelet only removes the dir). The controller's `detach` releases the claim but
/// not the node's staging hold: a detach is also what a force-detach of a node that stopped
/// answering looks like, while its kernel may still write. Another node gets the volume once the
/// node is known to have rebooted since it staged: its hold names the boot it staged in, and its
/// record (rewritten by its next `waitforattach`) the boot it runs now.
#[test]
fn a_detached_node_hands_over_once_it_rebooted() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let cm = Flex::new(EXE, &s, "controller", true);
    let (node_a, node_b) = (
        Flex::new(EXE, &s, "node-a", true),
        Flex::new(EXE, &s, "node-b", true),
    );
    let opts = kubelet_attach_options("pv-rb", "ext4", "rw", json!({"size": "64Mi"}));
    let dmp = |n: &str| mkdir(&s.path(&format!("{n}/mounts/pv-rb")));
    cm.ok(&["attach", &opts, "node-b"]);
    let dev = node_b.ok(&["waitforattach", "loopvol:pv-rb", &opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    node_b.ok(&["mountdevice", &dmp("node-b"), &dev, &opts]);
    // A force-detach: node-b may still be writing.
    cm.ok(&["detach", "pv-rb", "node-b"]);
    let m = cm.fail(&["attach", &opts, "node-a"]);
    assert!(
        m.contains("still staged read-write on node node-b")
            && m.contains("keeps no lease")
            && m.contains("loopvol fence node-b"),
        "{m}"
    );
    // node-b reboots (kubelet skips unmountdevice); it had staged in the boot before this one.
    s.cleanup_kernel_state();
    let meta = s.pool().join("volumes/pv-rb/volume.json");
    let mut json: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(json["staged"][0]["node"], "node-b", "{json}");
    json["staged"][0]["boot"] = "the-boot-before".into();
    std::fs::write(&meta, serde_json::to_vec(&json).unwrap()).unwrap();
    cm.ok(&["attach", &opts, "node-a"]);
    let dev = node_a.ok(&["waitforattach", "loopvol:pv-rb", &opts])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    node_a.ok(&["mountdevice", &dmp("node-a"), &dev, &opts]);
    node_a.ok(&["unmountdevice", &dmp("node-a")]);
    cm.ok(&["detach", "pv-rb", "node-a"]);
    s.assert_clean("left behind");
}

/// Issue 12: no argument carrying options or JSON is ever logged or echoed, whatever its position
/// or leading bytes (a BOM, whitespace), and a mount option's value (`password=...`) is never in
/// a reply or the log either.
#[test]
fn arguments_with_options_are_never_logged_or_echoed() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let pod = mkdir(&s.path("pods/p/volumes/loopvol~loopvol/pv"));
    let options = kubelet_mount_options(
        "pv",
        "ext4",
        "rw",
        json!({"size": "64Mi", "mountOptions": format!("password={SECRET}")}),
    );
    let cases: Vec<Vec<String>> = vec![
        // The options with a BOM, and with leading whitespace.
        vec!["mount".into(), pod.clone(), format!("\u{feff}{options}")],
        vec!["mount".into(), pod.clone(), format!(" \n{options}")],
        // JSON where the pod dir belongs, and where a node name, a device and a size belong.
        vec!["mount".into(), options.clone(), pod.clone()],
        vec!["unmount".into(), options.clone()],
        vec!["isattached".into(), options.clone(), options.clone()],
        vec![
            "expandfs".into(),
            options.clone(),
            "".into(),
            pod.clone(),
            options.clone(),
            "1".into(),
        ],
        // A valid call whose mount option carries the secret: the mount fails, quietly.
        vec!["mount".into(), pod.clone(), options.clone()],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = flex.call(&args);
        let text = reply.to_string();
        assert!(
            !text.contains(SECRET) && !text.contains(SECRET_B64) && !text.contains("ZmxleHVzZXI="),
            "{:?}: the reply echoes a secret: {text}",
            &args[..1]
        );
    }
    assert_no_secrets_logged(&s);
    assert!(
        !log_text(&s).contains("password="),
        "a mount option's value reached the log"
    );
    s.assert_clean("after the calls");
}

/// Issue 12: the kubelet root is a symlink (`/var/lib/kubelet -> /data/kubelet`): node mode's
/// mount and unmount, and attach mode's mountdevice, mount, unmount, unmountdevice, all work
/// through it and leave nothing behind.
#[test]
fn a_symlinked_kubelet_root_works_in_both_modes() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let real = s.path("data/kubelet");
    std::fs::create_dir_all(&real).unwrap();
    let root = s.path("var-lib-kubelet");
    std::os::unix::fs::symlink(&real, &root).unwrap();

    let flex = node_mode(&s);
    let pod = root.join("pods/uid-1/volumes/loopvol~loopvol/pv-a");
    std::fs::create_dir_all(&pod).unwrap();
    let opts = kubelet_mount_options("pv-a", "ext4", "rw", json!({"size": "64Mi"}));
    flex.ok(&["mount", &pod.display().to_string(), &opts]);
    write_synced(&pod.join("f"), b"via the link");
    assert_eq!(
        std::fs::read(real.join("pods/uid-1/volumes/loopvol~loopvol/pv-a/f")).unwrap(),
        b"via the link"
    );
    flex.ok(&["unmount", &pod.display().to_string()]);
    s.assert_clean("node mode through the link");

    let attach = Flex::new(EXE, &s, "node-a", true);
    let aopts = kubelet_attach_options("pv-b", "ext4", "rw", json!({"size": "64Mi"}));
    let handle = attach.ok(&["attach", &aopts, "node-a"])["device"]
        .as_str()
        .unwrap()
        .to_owned();
    attach.ok(&["waitforattach", &handle, &aopts]);
    let global = root.join("plugins/loopvol/loopvol/mounts/pv-b");
    let globals = global.display().to_string();
    attach.ok(&["mountdevice", &globals, &handle, &aopts]);
    let pod_b = root.join("pods/uid-2/volumes/loopvol~loopvol/pv-b");
    std::fs::create_dir_all(&pod_b).unwrap();
    let pod_bs = pod_b.display().to_string();
    let mopts = kubelet_mount_options("pv-b", "ext4", "rw", json!({}));
    attach.ok(&["mount", &pod_bs, &mopts]);
    write_synced(&pod_b.join("g"), b"attach mode via the link");
    attach.ok(&["unmount", &pod_bs]);
    attach.ok(&["unmountdevice", &globals]);
    attach.ok(&["detach", "pv-b", "node-a"]);
    s.assert_clean("attach mode through the link");
}

/// Issue 12: FlexVolume's `<pool>/staging/<node>` planted as a symlink to a directory elsewhere:
/// `mount` is refused, nothing is staged there, and nothing is left mounted or attached.
#[test]
fn a_planted_staging_link_is_refused() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let elsewhere = s.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    // The pool's layout exists once a call opened it.
    flex.call(&["unmount", &mkdir(&s.path("pods/none/vol"))]);
    let staging = s.pool().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let _ = std::fs::remove_dir_all(staging.join("node-a"));
    std::os::unix::fs::symlink(&elsewhere, staging.join("node-a")).unwrap();
    let pod = mkdir(&s.path("pods/p/volumes/loopvol~loopvol/pv"));
    let m = flex.fail(&[
        "mount",
        &pod,
        &kubelet_mount_options("pv", "ext4", "rw", json!({"size": "64Mi"})),
    ]);
    assert!(m.contains("symbolic link") && m.contains("staging"), "{m}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    s.assert_clean("after the refused mount");
}

/// A node reboot (every mount and loop device gone behind the driver's back): `loopvol check`
/// reports the stale hold, kubelet's `mount` of the pod's volume again succeeds with the data
/// intact and nothing formatted, and the hold is current again. Node mode.
#[test]
fn after_a_reboot_mount_succeeds_again_node_mode() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let flex = node_mode(&s);
    let admin = loopvol_e2e::admin::Admin::built(s.pool(), "node-a");
    let opts = kubelet_mount_options("pv-rb", "ext4", "rw", json!({"size": "64Mi"}));
    let pod = s.path("pods/uid-1/volumes/loopvol~loopvol/pv-rb");
    let pods = mkdir(&pod);
    flex.ok(&["mount", &pods, &opts]);
    write_synced(&pod.join("kept"), b"before the reboot");
    let uuid = blkid_uuid(&s.loops_of("pv-rb")[0].path());
    assert_eq!(admin.findings(), (0, vec![]));

    s.cleanup_kernel_state();
    assert_eq!(
        admin.findings(),
        (1, vec![("stale-hold".to_owned(), "pv-rb".to_owned())])
    );
    // kubelet mounts the pod's volume again on the same (now empty) directory, maybe twice.
    flex.ok(&["mount", &pods, &opts]);
    flex.ok(&["mount", &pods, &opts]);
    assert_eq!(
        std::fs::read(pod.join("kept")).unwrap(),
        b"before the reboot"
    );
    assert_eq!(
        blkid_uuid(&s.loops_of("pv-rb")[0].path()),
        uuid,
        "formatted again"
    );
    assert_eq!(admin.findings(), (0, vec![]), "the hold is current again");
    assert_eq!(
        log_text(&s).matches("formatted").count(),
        1,
        "only the first mount formats"
    );
    flex.ok(&["unmount", &pods]);
    s.assert_clean("left behind");
}

/// The same in attach mode: after node-a reboots, kubelet's `waitforattach`, `mountdevice` and
/// `mount` succeed again under the controller's unchanged claim.
#[test]
fn after_a_reboot_mount_succeeds_again_attach_mode() {
    if !gate("ext4") {
        return;
    }
    let s = Scratch::new();
    let cm = Flex::new(EXE, &s, "controller", true);
    let node = Flex::new(EXE, &s, "node-a", true);
    let admin = loopvol_e2e::admin::Admin::built(s.pool(), "node-a");
    let opts = kubelet_attach_options("pv-ar", "ext4", "rw", json!({"size": "64Mi"}));
    let pod_opts = kubelet_mount_options("pv-ar", "ext4", "rw", json!({"size": "64Mi"}));
    let dmp = s.path("node-a/plugins/kubernetes.io/flexvolume/loopvol/loopvol/mounts/pv-ar");
    let pod = s.path("node-a/pods/uid-1/volumes/loopvol~loopvol/pv-ar");
    let kubelet_node = |node: &Flex| {
        let device = node.ok(&["waitforattach", "loopvol:pv-ar", &opts])["device"]
            .as_str()
            .unwrap()
            .to_owned();
        node.ok(&["mountdevice", &mkdir(&dmp), &device, &opts]);
        node.ok(&["mount", &mkdir(&pod), &pod_opts]);
        device
    };
    cm.ok(&["attach", &opts, "node-a"]);
    let device = kubelet_node(&node);
    write_synced(&pod.join("kept"), b"attach mode");
    let uuid = blkid_uuid(Path::new(&device));

    s.cleanup_kernel_state();
    let (code, found) = admin.findings();
    assert_eq!(
        (code, found),
        (1, vec![("stale-hold".to_owned(), "pv-ar".to_owned())])
    );
    assert_eq!(cm.ok(&["isattached", &opts, "node-a"])["attached"], true);
    let device = kubelet_node(&node);
    assert_eq!(std::fs::read(pod.join("kept")).unwrap(), b"attach mode");
    assert_eq!(blkid_uuid(Path::new(&device)), uuid, "formatted again");
    assert_eq!(admin.findings(), (0, vec![]));
    node.ok(&["unmount", &pod.display().to_string()]);
    node.ok(&["unmountdevice", &dmp.display().to_string()]);
    cm.ok(&["detach", "pv-ar", "node-a"]);
    s.assert_clean("left behind");
}

/// The filesystem UUID on `device` (empty when none): the same UUID means the same filesystem.
fn blkid_uuid(device: &Path) -> String {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-s", "UUID", "-o", "value"])
        .arg(device)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
