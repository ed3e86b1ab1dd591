//! Running the workspace's binaries, built from the current sources.
//!
//! A test that drives only its own package's binary uses `env!("CARGO_BIN_EXE_<name>")`: cargo
//! builds that binary before the test. A test that needs another package's binary (the migration
//! test runs all three) asks [`binary`], which has cargo build the workspace's test targets,
//! binaries included, once per test process:
//!
//! - no deadlock: cargo holds its build-directory lock while it compiles, not while tests run, so
//!   the nested cargo runs at once (or waits its turn behind another cargo that is building);
//! - no rebuild after `cargo test --workspace` (the README's test command): the nested command is
//!   that one, with `--no-run`, in the same target directory and profile, so it finds every unit
//!   fresh and links nothing. A narrower `cargo build -p <pkg>` would not: cargo computes its
//!   units' hashes from what else the build selects (a crate that is both a build- and a
//!   dev-dependency elsewhere in the workspace changes them), so it would compile and re-link a
//!   second variant of each binary;
//! - after a partial run (`cargo test -p loopvol-migrate`) it builds what the full run would, and
//!   may re-link binaries under `target/<profile>/`: a test process that calls [`binary`] gets
//!   every binary from it, its own package's included, so no spawn races that re-link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The path of workspace binary `name`, built from the current sources with the profile of this
/// test: the first call in a process runs the build, for every binary at once.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    let built = BUILT.get_or_init(build_workspace);
    built.get(name).cloned().unwrap_or_else(|| {
        panic!(
            "the workspace has no binary {name:?} (it has {:?})",
            built.keys().collect::<Vec<_>>()
        )
    })
}

/// Builds the workspace's test targets and binaries; every binary's executable, by name.
fn build_workspace() -> BTreeMap<String, PathBuf> {
    let mut cmd = build_command();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    executables(&stdout)
}

/// `cargo test --workspace --no-run` into this test's target directory and profile.
fn build_command() -> Command {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile dir>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("a target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--workspace", "--no-run"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--message-format=json-render-diagnostics");
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(custom) => {
            cmd.args(["--profile", custom]);
        }
        None => panic!("no profile directory in {}", exe.display()),
    }
    cmd
}

/// The executables of the binaries in cargo's JSON messages (not their unit tests' harnesses,
/// which are "bin" targets of the same name too).
fn executables(messages: &str) -> BTreeMap<String, PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == false)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_owned();
            Some((name, PathBuf::from(m["executable"].as_str()?)))
        })
        .collect()
}
