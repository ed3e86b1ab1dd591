//! Running `loopvol-flexvolume` as kubelet and the controller-manager run it: argv only, no
//! stdin, the output read as one JSON object, and the options kubelet sends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::{json, Value};

use crate::scratch::Scratch;

/// How the driver is run: its path and environment (node, pool, log, mode), or, for an installed
/// copy, no environment at all (it reads `loopvol.json` beside itself).
#[derive(Clone)]
pub struct Flex {
    pub bin: PathBuf,
    env: Vec<(&'static str, String)>,
    /// Its log file, shown when a call fails unexpectedly.
    log: Option<PathBuf>,
}

/// The driver's environment variables: a call sees only those the test sets.
const ENV: [&str; 6] = [
    "LOOPVOL_POOL",
    "LOOPVOL_LOG",
    "LOOPVOL_NODE",
    "LOOPVOL_ATTACH",
    "LOOPVOL_LOG_LEVEL",
    "LOOPVOL_TEST_PANIC",
];

impl Flex {
    /// `bin` as node `node` of the scratch pool, in attach mode or node mode, logging to
    /// `<scratch>/flexvolume.log`.
    pub fn new(bin: impl AsRef<Path>, s: &Scratch, node: &str, attach: bool) -> Flex {
        let log = s.path("flexvolume.log");
        Flex {
            bin: bin.as_ref().to_owned(),
            env: vec![
                ("LOOPVOL_POOL", s.pool().display().to_string()),
                ("LOOPVOL_LOG", log.display().to_string()),
                ("LOOPVOL_NODE", node.to_owned()),
                ("LOOPVOL_ATTACH", attach.to_string()),
            ],
            log: Some(log),
        }
    }

    /// An installed copy: configured by the `loopvol.json` beside it, nothing from the environment.
    pub fn installed(bin: impl AsRef<Path>) -> Flex {
        Flex {
            bin: bin.as_ref().to_owned(),
            env: Vec::new(),
            log: None,
        }
    }

    pub fn with_env(mut self, key: &'static str, value: &str) -> Flex {
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.to_owned()));
        self
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in ENV {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.retry_busy(|| self.command(args).spawn())
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()))
    }

    /// Runs `start` again while it fails with ETXTBSY. An installed copy was just written by
    /// this test, and a child another test forks in that moment holds the writing descriptor
    /// until its own exec: the kernel refuses to run a file open for writing. It is brief, so a
    /// few tries at 10 ms apart see it end.
    fn retry_busy<T>(&self, mut start: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
        let mut tries = 0;
        loop {
            match start() {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    /// Runs one call and checks the protocol; returns the reply.
    #[track_caller]
    pub fn call(&self, args: &[&str]) -> Value {
        let out = self
            .retry_busy(|| self.command(args).output())
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()));
        check_protocol(args, &out)
    }

    /// A call that must succeed; its reply.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> Value {
        let reply = self.call(args);
        assert_eq!(
            reply["status"],
            "Success",
            "{args:?}: {reply}\nlog:\n{}",
            self.log_text()
        );
        reply
    }

    /// A call that must fail; its message.
    #[track_caller]
    pub fn fail(&self, args: &[&str]) -> String {
        let reply = self.call(args);
        assert_eq!(reply["status"], "Failure", "{args:?}: {reply}");
        let message = reply["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            !message.is_empty(),
            "{args:?}: a Failure needs a message: {reply}"
        );
        message
    }

    /// What the driver logged so far (empty without a log file).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
}

/// kubelet's reading of a call's output: stdout+stderr combined must be exactly one JSON object
/// (trailing whitespace allowed). Stricter here: stderr must be empty. The exit code must agree.
#[track_caller]
pub fn check_protocol(args: &[&str], out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.is_empty(),
        "{args:?} wrote to stderr: {stderr:?} (stdout {stdout:?})"
    );
    let combined = format!("{stdout}{stderr}");
    let reply: Value = serde_json::from_str(&combined)
        .unwrap_or_else(|e| panic!("{args:?}: output is not one JSON object ({e}): {combined:?}"));
    assert!(reply.is_object(), "{args:?}: not an object: {combined}");
    let status = reply["status"]
        .as_str()
        .unwrap_or_else(|| panic!("{args:?}: no status: {reply}"));
    let code = out.status.code();
    match status {
        "Success" | "Not supported" => assert_eq!(code, Some(0), "{args:?}: {reply}"),
        "Failure" => assert_eq!(code, Some(1), "{args:?}: {reply}"),
        other => panic!("{args:?}: status {other:?} is not one kubelet knows: {reply}"),
    }
    reply
}

/// The options kubelet sends to attach-family calls for a PV named `pv` (no pod keys, no
/// secrets), with the PV's own `options` merged last, as kubelet merges them.
pub fn kubelet_options(pv: &str, fs: &str, rw: &str, pv_options: &Value) -> String {
    merged(
        json!({
            "kubernetes.io/fsType": fs,
            "kubernetes.io/readwrite": rw,
            "kubernetes.io/pvOrVolumeName": pv,
        }),
        pv_options,
    )
}

/// The options kubelet sends to `mount` for a pod (its uid `pod_uid`): the attach-family keys and
/// the pod's, with the PV's own `options` merged last.
pub fn kubelet_pod_options(
    pv: &str,
    fs: &str,
    rw: &str,
    pod_uid: &str,
    pv_options: &Value,
) -> String {
    merged(
        json!({
            "kubernetes.io/fsType": fs,
            "kubernetes.io/readwrite": rw,
            "kubernetes.io/pvOrVolumeName": pv,
            "kubernetes.io/pod.name": "web-0",
            "kubernetes.io/pod.namespace": "default",
            "kubernetes.io/pod.uid": pod_uid,
            "kubernetes.io/serviceAccount.name": "default",
        }),
        pv_options,
    )
}

fn merged(mut kubelet: Value, pv_options: &Value) -> String {
    for (k, v) in pv_options.as_object().expect("the PV's options: an object") {
        kubelet[k] = v.clone();
    }
    kubelet.to_string()
}

/// The pod volume directory kubelet makes (0750) before `mount`: `<root>/pods/<pod>/volumes/
/// loopvol~loopvol/<pv>`, created.
pub fn pod_volume_dir(kubelet_root: &Path, pod: &str, pv: &str) -> PathBuf {
    let dir = kubelet_root.join(format!("pods/{pod}/volumes/loopvol~loopvol/{pv}"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}
