//! The process, no root: startup and misconfiguration, the socket (private, stale ones replaced,
//! removed at SIGTERM/SIGINT), what is logged (never secrets or mount flags), and node paths
//! confined to prefixes and away from system directories.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loopvol_e2e::csi::*;
use loopvol_e2e::Scratch;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::{start, start_server, EXE, MIB, NODE};

fn run_server(args: &[String]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let out = Command::new(EXE)
        .args(args)
        .env_remove("CSI_ENDPOINT")
        .env_remove("LOOPVOL_POOL")
        .env_remove("LOOPVOL_LOG")
        .env("LOOPVOL_NODE", NODE)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test]
async fn misconfiguration_fails_fast_with_a_clear_message() {
    let scratch = Scratch::new();
    let sock = format!("--endpoint=unix://{}", scratch.path("csi.sock").display());
    let pool = format!("--pool={}", scratch.pool().display());
    let file = scratch.path("a-file");
    std::fs::write(&file, b"").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                sock.clone(),
                format!("--pool={}", scratch.path("missing").display()),
            ],
            "missing",
        ),
        (
            vec![sock.clone(), format!("--pool={}", file.display())],
            "not a directory",
        ),
        (
            vec!["--endpoint=tcp://127.0.0.1:10000".into(), pool.clone()],
            "unix://",
        ),
        (
            vec!["--endpoint=unix://relative.sock".into(), pool.clone()],
            "absolute",
        ),
        (
            vec![sock.clone(), pool.clone(), "--driver-name=Bad_Name".into()],
            "driver-name",
        ),
        (
            vec![sock.clone(), pool.clone(), "--overcommit=0.5".into()],
            "overcommit",
        ),
        (
            vec![
                sock.clone(),
                pool.clone(),
                "--path-prefix=relative/dir".into(),
            ],
            "path-prefix",
        ),
        (
            vec![sock.clone(), pool.clone(), "--mode=everything".into()],
            "mode",
        ),
        (
            vec![
                format!("--endpoint=unix://{}", file.display()),
                pool.clone(),
            ],
            "not a socket",
        ),
    ];
    for (args, needle) in cases {
        let (code, stderr, took) = run_server(&args);
        assert!(code.is_some_and(|c| c != 0), "{args:?} exited {code:?}");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {stderr}"
        );
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
    assert!(
        !scratch.path("csi.sock").exists(),
        "a failed start left a socket"
    );
    assert!(
        file.is_file(),
        "a regular file at the socket path was replaced"
    );
}

#[tokio::test]
async fn socket_is_private_stale_ones_are_replaced_and_sigterm_removes_it() {
    let scratch = Scratch::new();
    let socket = scratch.path("csi.sock");
    // A stale socket (its server died) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut server = start_server(&scratch, &[]);
    let md = std::fs::metadata(&socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(
        md.permissions().mode() & 0o777,
        0o600,
        "socket must be owner-only"
    );
    let mut csi = Csi::connect(&server).await;
    ok(csi.id.probe(pb::ProbeRequest {}).await, "Probe");
    // A second server on the same socket refuses to steal it.
    let (code, stderr, _) = run_server(&[
        format!("--endpoint=unix://{}", socket.display()),
        format!("--pool={}", scratch.pool().display()),
    ]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("another server is listening"), "{stderr}");
    ok(
        csi.id.probe(pb::ProbeRequest {}).await,
        "first server still serves",
    );
    // Nothing else was created beside the socket.
    let mut beside: Vec<String> = std::fs::read_dir(scratch.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["csi.log", "csi.sock", "pool"]);

    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
    assert!(!socket.exists(), "socket left after SIGTERM");
    let log = std::fs::read_to_string(scratch.path("csi.log")).unwrap();
    assert!(
        log.contains("listening") && log.contains(&socket.display().to_string()),
        "{log}"
    );
    assert!(log.contains("SIGTERM"), "{log}");

    // SIGINT too.
    let mut server = start_server(&scratch, &[]);
    server.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        server.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );
    assert!(!socket.exists(), "socket left after SIGINT");
}

#[tokio::test]
async fn requests_are_logged_without_secrets_or_mount_flags() {
    let scratch = Scratch::new();
    let (server, mut csi) = start(&scratch, &[]).await;
    let secrets: HashMap<String, String> =
        [("password".to_string(), "hunter2-secret-value".to_string())].into();
    let mut r = create_req("logged", MIB, rwo("ext4"));
    r.secrets = secrets.clone();
    ok(csi.ctl.create_volume(r).await, "CreateVolume with secrets");
    // A refused mount flag whose value is a credential: the reply and the log say what was
    // wrong without repeating it.
    let mut r = create_req(
        "logged-2",
        MIB,
        mount_cap_with(
            "ext4",
            Mode::SingleNodeWriter,
            &["password=flag-s3cret-value;x"],
            "",
        ),
    );
    r.secrets = secrets.clone();
    let err = csi.ctl.create_volume(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        !err.message().contains("flag-s3cret-value"),
        "{}",
        err.message()
    );
    let mut stage = stage_req(
        "logged",
        &scratch.path("staging"),
        mount_cap_with(
            "ext4",
            Mode::SingleNodeWriter,
            &["user=flag-user-value", "bind"],
            "",
        ),
    );
    stage.secrets = secrets;
    assert_code(
        csi.node.node_stage_volume(stage).await,
        Code::InvalidArgument,
        "stage with a bind flag",
    );
    ok(
        csi.ctl.delete_volume(delete_req("logged")).await,
        "DeleteVolume",
    );

    let log = server.log_text();
    for needle in [
        "CreateVolume",
        "DeleteVolume",
        "NodeStageVolume",
        "logged",
        "duration_ms",
        "InvalidArgument",
        "OK",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    for secret in [
        "hunter2-secret-value",
        "flag-s3cret-value",
        "flag-user-value",
    ] {
        assert!(!log.contains(secret), "log leaks {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn paths_are_confined_to_prefixes_and_never_system_directories() {
    let scratch = Scratch::new();
    let kubelet = scratch.path("kubelet");
    let (_server, mut csi) =
        start(&scratch, &[&format!("--path-prefix={}", kubelet.display())]).await;
    let c = &mut csi;
    c.create("vol", MIB, rwo("ext4")).await;
    let inside = kubelet.join("plugins/x/globalmount");
    let bad_paths = [
        scratch.path("outside"),
        PathBuf::from("/etc/loopvol-x"),
        PathBuf::from("/proc/1/root"),
        PathBuf::from("/"),
        kubelet.join("../outside"),
        kubelet.join("a//b"),
        PathBuf::from("relative/path"),
        kubelet.clone(),
    ];
    let mut t = CallTable::new();
    for bad in &bad_paths {
        let at = bad.display();
        t.case(
            format!("stage at {at}"),
            stage_req("vol", bad, rwo("ext4")),
            Code::InvalidArgument,
        )
        .case(
            format!("publish at {at}"),
            publish_req("vol", &inside, bad, rwo("ext4"), false),
            Code::InvalidArgument,
        )
        .case(
            format!("unpublish at {at}"),
            unpublish_req("vol", bad),
            Code::InvalidArgument,
        )
        .case(
            format!("unstage at {at}"),
            unstage_req("vol", bad),
            Code::InvalidArgument,
        );
    }
    t.check(c).await;
    assert!(!scratch.path("outside").exists());
    // Without prefixes, system directories are still refused.
    let other = Scratch::new();
    let (_s2, mut c2) = start(&other, &[]).await;
    c2.create("vol", MIB, rwo("ext4")).await;
    let mut t = CallTable::new();
    for bad in ["/etc/x", "/usr/lib/x", "/sys/x", "/dev/x", "/boot/x", "/"] {
        t.case(
            format!("stage at {bad}"),
            stage_req("vol", Path::new(bad), rwo("ext4")),
            Code::InvalidArgument,
        );
    }
    t.check(&mut c2).await;
}
