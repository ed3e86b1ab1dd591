//! Running the workspace's binaries, built from the current sources.
//!
//! A test that drives its own package's binary uses `env!("CARGO_BIN_EXE_<name>")`: cargo builds
//! that binary before the test. A test that needs another package's binary (the migration test
//! runs all three; the deploy checks read `--help`) asks [`binary`], which has cargo build it once
//! per test process. Cargo takes its build-directory lock only while it compiles, not while tests
//! run, so the nested `cargo build` cannot deadlock with the `cargo test` that started the test;
//! it waits its turn when another cargo is building. Its command line selects the features
//! `cargo test` used (see [`build_command`]), so after `cargo test --workspace` it builds
//! nothing: the binary is already current.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The path of workspace binary `name` (its package has the same name), built from the current
/// sources with the profile of this test: the first call in a process runs `cargo build`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    // Held while building: a second test wanting the binary waits for the first one's build
    // instead of starting its own.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let mut cmd = build_command(name);
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
    let path = executable(&stdout, name)
        .unwrap_or_else(|| panic!("{cmd:?} reported no executable {name}:\n{stdout}"));
    built.insert(name.to_owned(), path.clone());
    path
}

/// `cargo build` of binary `name` into this test's target directory and profile.
///
/// `cargo test` builds a binary with the features of everything it builds, dev-dependencies
/// included; `cargo build -p <pkg>` alone would unify fewer (no dev-dependencies) and build a
/// second copy of the binary and its dependencies. Building the package's tests (`cargo test
/// --no-run`, which builds the binary for them as `cargo test` does) selects the same features.
fn build_command(name: &str) -> Command {
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
    cmd.arg("test")
        .arg("--no-run")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["-p", name, "--message-format=json-render-diagnostics"]);
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

/// The executable of binary `name` in cargo's JSON messages (not its unit tests' harness, which
/// is a "bin" target of that name too).
fn executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter(|m| m["profile"]["test"] == false)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}
