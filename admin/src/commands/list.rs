//! `loopvol list [--snapshots]`: the pool's volumes (ID, name, size, allocated, fs, allocation,
//! state on this node, holders, health), or its snapshots.

use serde_json::json;

use crate::context::Context;
use crate::output::{self, size, Table};
use crate::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// List the snapshots instead of the volumes.
    #[arg(long)]
    pub snapshots: bool,
}

pub fn run(ctx: &Context, args: &Args) -> Result<Outcome, String> {
    let scan = ctx.scan()?;
    let allocated = |i: Option<&loopvol::inspect::ImageInfo>| {
        i.map_or_else(|| "missing".to_owned(), |i| size(i.allocated_bytes))
    };
    if args.snapshots {
        if ctx.json {
            output::print_json(&json!({
                "pool": scan.root,
                "snapshots": scan.snapshots.iter().map(output::snapshot_json).collect::<Vec<_>>(),
            }));
            return Ok(Outcome::Clean);
        }
        let mut t = Table::new(&["ID", "NAME", "SOURCE", "SIZE", "ALLOCATED", "FS", "GROUP"]);
        for s in &scan.snapshots {
            t.row(vec![
                s.meta.id.to_string(),
                s.meta.name.clone(),
                s.meta.source_volume_id.to_string(),
                size(s.meta.size_bytes),
                allocated(s.image.as_ref()),
                s.meta.fs_type.map_or("-", |f| f.as_str()).to_owned(),
                s.meta
                    .group_id
                    .as_ref()
                    .map_or("-", |g| g.as_str())
                    .to_owned(),
            ]);
        }
        println!("{}", t.render());
        return Ok(Outcome::Clean);
    }
    if ctx.json {
        output::print_json(&json!({
            "pool": scan.root,
            "node": scan.node.as_str(),
            "volumes": scan.volumes.iter().map(output::volume_json).collect::<Vec<_>>(),
        }));
        return Ok(Outcome::Clean);
    }
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "SIZE",
        "ALLOCATED",
        "FS",
        "ALLOCATION",
        "STATE",
        "HOLDERS",
        "HEALTH",
    ]);
    for v in &scan.volumes {
        t.row(vec![
            v.meta.id.to_string(),
            v.meta.name.clone(),
            size(v.meta.size_bytes),
            allocated(v.image.as_ref()),
            v.meta.fs_type.map_or("-", |f| f.as_str()).to_owned(),
            v.meta.allocation.as_str().to_owned(),
            v.state.as_str().to_owned(),
            output::holders(v),
            output::health(v),
        ]);
    }
    println!("{}", t.render());
    Ok(Outcome::Clean)
}
