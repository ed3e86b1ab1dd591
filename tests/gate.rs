//! The root/tool gate: a test that needs root or a tool runs only where it can; where it cannot,
//! it says why, and under CI (`CI=true`) that is a failure.

use std::path::PathBuf;

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
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "under CI every skip is a failure: this test needs {}",
            missing.join(", ")
        );
    }
    // Straight to the process's stderr, not through the test harness's capture: a skip must be
    // visible in a normal run, not only with --nocapture.
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {name}: needs {}\n", missing.join(", ")).as_bytes(),
    );
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
