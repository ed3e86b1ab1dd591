//! The root/tool gate. A test that needs root or a tool either runs, or fails saying what it
//! needs, unless the run opts out explicitly with `LOOPVOL_TEST_SKIP_ROOT=1`: then it passes as
//! skipped and says so on stderr. A test that cannot run never passes silently.

use std::path::PathBuf;

/// The opt-out: set to `1` (or `true`) to skip, with a note, the tests this machine cannot run.
/// Ignored under `CI=true`: CI runs every test.
pub const SKIP_ROOT: &str = "LOOPVOL_TEST_SKIP_ROOT";

/// True when the test may touch the kernel: it runs as root and every tool in `tools` is on
/// PATH. Otherwise it fails naming what is missing, or, when the run opted out ([`SKIP_ROOT`]),
/// prints why it skips and returns false: `if !require_root(&[..]) { return; }`.
#[track_caller]
pub fn require_root(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_owned());
    }
    missing.extend(
        tools
            .iter()
            .filter(|t| !on_path(t))
            .map(|t| format!("{t} (not installed)")),
    );
    if missing.is_empty() {
        return true;
    }
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    let needs = missing.join(", ");
    let ci = env_flag("CI");
    if env_flag(SKIP_ROOT) && !ci {
        // Straight to the process's stderr, past the harness's capture: a skip must show in a
        // normal run, not only with --nocapture.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("SKIPPED {name}: needs {needs} ({SKIP_ROOT}=1)\n").as_bytes(),
        );
        return false;
    }
    let ignored = if ci && env_flag(SKIP_ROOT) {
        format!(" ({SKIP_ROOT} is ignored under CI=true: CI runs every test)")
    } else {
        String::new()
    };
    panic!(
        "{name} needs {needs}: run the tests as root with the tools installed (.ci/run installs \
         them), or set {SKIP_ROOT}=1 to skip, with a note, what this machine cannot run{ignored}"
    );
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
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
