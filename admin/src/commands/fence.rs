//! `loopvol fence NODE [--force]`: the operator declares NODE down (powered off, isolated from
//! storage for good: its kernel writes nothing more), so its read-write volumes of a shared pool
//! may move to other nodes: loopvol's `node.kubernetes.io/out-of-service` taint. The node's claims
//! go and its staging holds are marked fenced; a node that comes back finds them so and fences
//! what it still has staged. Refused while the node's lease still moves (watched for two of its
//! renewal intervals): a node whose plugin renews is up and fences by itself. `--force` skips
//! that check. Exit code 0 done, 1 some volumes were busy (run it again), 2 error.

use loopvol::{FenceCheck, NodeName, Pool};
use serde_json::json;

use crate::context::Context;
use crate::output;
use crate::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node that is down, as the driver names it (its --node-id).
    pub node: String,
    /// Do not first check that the node's lease stands still.
    #[arg(long)]
    pub force: bool,
}

pub fn run(ctx: &Context, args: &Args) -> Result<Outcome, String> {
    let node = NodeName::parse("NODE", args.node.as_str()).map_err(|e| e.to_string())?;
    // As a shared pool: on a cluster filesystem whose client caches across mounts (GlusterFS's
    // defaults) the holds read here could be stale, and this command is refused.
    let mut options = ctx.pool.options().clone();
    options.shared = true;
    let pool = Pool::open_existing(ctx.pool.root(), options).map_err(|e| e.to_string())?;
    let check = if args.force {
        FenceCheck::Force
    } else {
        FenceCheck::LeaseStill
    };
    let report = pool
        .fence_node(&node, check)
        .map_err(|e| format!("fence {node}: {e}"))?;
    if ctx.json {
        output::print_json(&json!({
            "node": node.as_str(),
            "released": report.released.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
            "busy": report.busy.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        }));
    } else {
        for id in &report.released {
            println!("{id}: node {node}'s claim released, its staging hold fenced");
        }
        for id in &report.busy {
            println!("{id}: busy (another call holds it); run `loopvol fence {node}` again");
        }
        if report.released.is_empty() && report.busy.is_empty() {
            println!("node {node} holds no volume of this pool");
        }
    }
    Ok(if report.busy.is_empty() {
        Outcome::Clean
    } else {
        Outcome::Findings
    })
}
