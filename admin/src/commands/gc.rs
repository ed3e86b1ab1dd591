//! `loopvol gc [--yes]`: removes what `check` proves safe: entries without metadata, temp files
//! and trash, none holding data (SEEK_DATA) or attached, each checked again under its lock.
//! Never detaches, unmounts or edits metadata. Without `--yes` it only says what it would do.
//! Exit code 0 done, 1 something it meant to remove was left (busy, changed), 2 error.

use loopvol::inspect::GcResult;
use serde_json::json;

use crate::context::Context;
use crate::output;
use crate::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Remove them (without it: a dry run).
    #[arg(long)]
    pub yes: bool,
}

pub fn run(ctx: &Context, args: &Args) -> Result<Outcome, String> {
    let scan = ctx.scan()?;
    let outcomes = ctx
        .pool
        .collect_garbage(&scan, args.yes)
        .map_err(|e| format!("gc: {e}"))?;
    let skipped = outcomes
        .iter()
        .filter(|o| matches!(o.result, GcResult::Skipped(_)))
        .count();
    if ctx.json {
        output::print_json(&json!({
            "pool": scan.root,
            "dry_run": !args.yes,
            "outcomes": outcomes.iter().map(|o| {
                let (result, why) = match &o.result {
                    GcResult::WouldRemove => ("would-remove", None),
                    GcResult::Removed => ("removed", None),
                    GcResult::Skipped(why) => ("skipped", Some(why.as_str())),
                };
                json!({"kind": o.kind.as_str(), "path": o.path, "result": result, "why": why})
            }).collect::<Vec<_>>(),
        }));
    } else {
        for o in &outcomes {
            match &o.result {
                GcResult::WouldRemove => {
                    println!("would remove {} ({})", o.path.display(), o.kind.as_str())
                }
                GcResult::Removed => println!("removed {} ({})", o.path.display(), o.kind.as_str()),
                GcResult::Skipped(why) => {
                    println!("left {} ({}): {why}", o.path.display(), o.kind.as_str())
                }
            }
        }
        let left = scan.findings.len() - outcomes.len();
        if outcomes.is_empty() {
            println!("nothing to remove");
        } else if !args.yes {
            println!("dry run: `loopvol gc --yes` removes them");
        }
        if left > 0 {
            println!("{left} findings are not gc's to fix: see `loopvol check`");
        }
    }
    Ok(if skipped > 0 {
        Outcome::Findings
    } else {
        Outcome::Clean
    })
}
