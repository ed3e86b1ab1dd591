//! `loopvol check`: what is inconsistent between the pool and this node, each with why and what
//! to do. Exit code 0 clean, 1 findings, 2 error.

use serde_json::json;

use crate::context::Context;
use crate::output;
use crate::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Context, _args: &Args) -> Result<Outcome, String> {
    let scan = ctx.scan()?;
    let outcome = if scan.findings.is_empty() {
        Outcome::Clean
    } else {
        Outcome::Findings
    };
    if ctx.json {
        output::print_json(&json!({
            "pool": scan.root,
            "node": scan.node.as_str(),
            "clean": scan.findings.is_empty(),
            "findings": scan.findings.iter().map(output::finding_json).collect::<Vec<_>>(),
        }));
        return Ok(outcome);
    }
    if scan.findings.is_empty() {
        println!(
            "pool {} is consistent on node {} ({} volumes, {} snapshots)",
            scan.root.display(),
            scan.node,
            scan.volumes.len(),
            scan.snapshots.len()
        );
        return Ok(outcome);
    }
    let removable = scan.findings.iter().filter(|f| f.fix.is_some()).count();
    println!(
        "{} findings in pool {} on node {} ({removable} removable by `loopvol gc --yes`):",
        scan.findings.len(),
        scan.root.display(),
        scan.node
    );
    for f in &scan.findings {
        println!("\n{}", output::finding_text(f));
    }
    Ok(outcome)
}
