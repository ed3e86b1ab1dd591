//! `loopvol metrics [--textfile PATH]`: the pool and volume gauges loopvol-csi exports on
//! /metrics, for nodes without a CSI server (FlexVolume): written for node-exporter's textfile
//! collector (temp file in the same directory, fsync, rename: the collector never reads half a
//! file), or to stdout (with `--json`: the same numbers as one JSON document).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::context::Context;
use crate::output;
use crate::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write them to this file (node-exporter reads `*.prom` in its
    /// --collector.textfile.directory), replacing it atomically. Without it: stdout.
    #[arg(long, value_name = "PATH")]
    pub textfile: Option<PathBuf>,
}

pub fn run(ctx: &Context, args: &Args) -> Result<Outcome, String> {
    let scan = ctx.scan()?;
    let mut registry = loopvol_metrics::registry();
    let gauges = loopvol_metrics::PoolGauges::register(
        &mut registry,
        ctx.pool.root(),
        ctx.pool.options().overcommit,
    );
    gauges.update(&scan.census(), scan.elapsed);
    let text = loopvol_metrics::encode(&registry);
    match &args.textfile {
        None if ctx.json => {
            let census = scan.census();
            let c = &census.capacity;
            output::print_json(&json!({
                "pool": scan.root,
                "node": scan.node.as_str(),
                "filesystem": {
                    "size_bytes": census.filesystem.size_bytes,
                    "used_bytes": census.filesystem.used_bytes,
                },
                "free_bytes": c.free_bytes,
                "reserve_bytes": c.reserve_bytes,
                "thin_promised_bytes": c.thin_unallocated_bytes,
                "thick_reserved_bytes": c.thick_unbacked_bytes,
                "available_bytes": c.available_bytes,
                "available_thick_bytes": c.available_thick_bytes,
                "overcommit": ctx.pool.options().overcommit,
                "volumes": {
                    "created": census.volumes,
                    "staged": census.staged,
                    "published": census.published,
                },
                "abnormal": census.abnormal.iter()
                    .map(|(r, n)| (r.as_str().to_owned(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
                "snapshots": census.snapshots,
            }));
        }
        None => print!("{text}"),
        Some(path) => {
            write_atomically(path, &text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            if ctx.json {
                output::print_json(&json!({"textfile": path, "bytes": text.len()}));
            }
        }
    }
    Ok(Outcome::Clean)
}

/// Replaces `path` with `text`: a temp file beside it (a dot file, which the collector
/// skips), fsynced, renamed over it.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
