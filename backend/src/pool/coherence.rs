//! Whether a shared pool's filesystem shows every node what another node just wrote. Claims and
//! holds are only as good as that: node B, taking a volume's lock after node A released it, must
//! read the `volume.json` A wrote under it, not a copy its client cached before.
//!
//! GlusterFS's FUSE client does not, with the volume's default options: quick-read and
//! open-behind serve the old content of a file replaced through another mount, and md-cache
//! (`performance.stat-prefetch`) the old inode, for up to a second, to a reader that holds the
//! lock (measured: `tests/tests/gluster.rs`). The client shows the translators it loaded under
//! `<mount>/.meta/graphs/active/<name>/type`; a shared pool on a GlusterFS mount whose graph has
//! a caching translator is refused, naming the `gluster volume set` commands that remove it.
//! (Only the `type` files are read: the graph's `volfile` holds the client's credentials.)

use std::path::Path;

use crate::mount::{self, MountEntry};

const GLUSTER_FUSE: &str = "fuse.glusterfs";

/// Client translators that serve stale data or metadata across mounts, and the volume option
/// that unloads each.
const INCOHERENT: &[(&str, &str)] = &[
    ("performance/quick-read", "performance.quick-read"),
    ("performance/open-behind", "performance.open-behind"),
    ("performance/md-cache", "performance.stat-prefetch"),
    ("performance/io-cache", "performance.io-cache"),
    ("performance/nl-cache", "performance.nl-cache"),
];

/// `Err(why)` when the pool at `root` (canonical) is on a GlusterFS mount whose client caches
/// across mounts, or whose client graph cannot be read to tell.
pub(crate) fn check_shared(root: &Path) -> Result<(), String> {
    let mounts = mount::mounts().map_err(|e| e.to_string())?;
    let Some(m) = containing_mount(&mounts, root) else {
        return Ok(());
    };
    if m.fs_type != GLUSTER_FUSE {
        return Ok(());
    }
    let volume = gluster_volume(&m.source);
    let graph = m.mount_point.join(".meta/graphs/active");
    // While the client switches graphs (a `gluster volume set` just now) the directory may
    // answer errors for a moment: a few tries.
    let mut tries = 0;
    let types = loop {
        match translator_types(&graph) {
            Err(_) if tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            done => break done,
        }
    };
    let types = types.map_err(|e| {
        format!(
            "it is on GlusterFS volume {volume}, and the client's translator graph at {} cannot \
             be read ({e}) to check that a shared pool sees other nodes' writes at once",
            graph.display()
        )
    })?;
    match refusal(volume, &types) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// The mount `path` is on: the deepest mount point above it (the last one mounted there).
fn containing_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
}

/// The volume of a GlusterFS mount source (`host:volume` or `host:/volume`).
fn gluster_volume(source: &str) -> &str {
    source
        .split_once(':')
        .map_or(source, |(_, v)| v)
        .trim_start_matches('/')
}

/// The `type` of every translator in a client graph directory.
fn translator_types(graph: &Path) -> std::io::Result<Vec<String>> {
    let mut types = Vec::new();
    for entry in std::fs::read_dir(graph)? {
        let entry = entry?;
        if let Ok(t) = std::fs::read_to_string(entry.path().join("type")) {
            types.push(t.trim().to_owned());
        }
    }
    Ok(types)
}

/// Why a shared pool on GlusterFS volume `volume` whose client loaded the translators `types`
/// is refused, or None when none of them caches across mounts.
fn refusal(volume: &str, types: &[String]) -> Option<String> {
    let found: Vec<(&str, &str)> = INCOHERENT
        .iter()
        .copied()
        .filter(|(t, _)| types.iter().any(|have| have == t))
        .collect();
    if found.is_empty() {
        return None;
    }
    let names: Vec<&str> = found
        .iter()
        .map(|(t, _)| t.trim_start_matches("performance/"))
        .collect();
    let commands: Vec<String> = found
        .iter()
        .map(|(_, option)| format!("gluster volume set {volume} {option} off"))
        .collect();
    Some(format!(
        "it is on GlusterFS volume {volume}, whose clients cache what other nodes may have just \
         replaced ({}): a shared pool would act on stale claims. Turn the caches off (mounted \
         clients pick the change up): {}",
        names.join(", "),
        commands.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gluster_defaults_are_refused_naming_the_commands() {
        let defaults: Vec<String> = [
            "debug/io-stats",
            "protocol/client",
            "cluster/distribute",
            "performance/io-threads",
            "performance/md-cache",
            "performance/open-behind",
            "performance/quick-read",
            "features/utime",
            "performance/write-behind",
            "meta",
        ]
        .map(str::to_owned)
        .into();
        let why = refusal("vol1", &defaults).unwrap();
        for want in [
            "GlusterFS volume vol1",
            "gluster volume set vol1 performance.quick-read off",
            "gluster volume set vol1 performance.open-behind off",
            "gluster volume set vol1 performance.stat-prefetch off",
        ] {
            assert!(why.contains(want), "{want}: {why}");
        }
        assert!(!why.contains("io-cache"), "{why}");
        let coherent: Vec<String> = defaults
            .into_iter()
            .filter(|t| {
                ![
                    "performance/md-cache",
                    "performance/open-behind",
                    "performance/quick-read",
                ]
                .contains(&t.as_str())
            })
            .collect();
        assert_eq!(refusal("vol1", &coherent), None);
        let with_io_cache = [coherent, vec!["performance/io-cache".to_owned()]].concat();
        assert!(refusal("v", &with_io_cache)
            .unwrap()
            .contains("gluster volume set v performance.io-cache off"));
    }

    #[test]
    fn the_mount_a_path_is_on() {
        let table = mount::parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 0:42 / /mnt/g rw - fuse.glusterfs 127.0.0.1:gv0 rw\n\
             3 1 0:43 / /mnt/gx rw - ext4 /dev/sdb rw\n",
        );
        let on = |p: &str| containing_mount(&table, Path::new(p)).map(|m| m.fs_type.as_str());
        assert_eq!(on("/mnt/g/pool"), Some("fuse.glusterfs"));
        assert_eq!(on("/mnt/gx/pool"), Some("ext4"));
        assert_eq!(on("/var/pool"), Some("ext4"));
        assert_eq!(gluster_volume("127.0.0.1:gv0"), "gv0");
        assert_eq!(gluster_volume("server:/gv0"), "gv0");
    }
}
