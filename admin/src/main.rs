//! `loopvol`: the operator's tool on a node. It reads the pool and this node's kernel state
//! through the backend library (never changing them, except `gc --yes`, which removes only
//! what `check` proves safe) and answers in a table or, with `--json`, in JSON.
//!
//! ```text
//! loopvol [--pool DIR] [--node NAME] [--json] list [--snapshots]
//! loopvol inspect ID
//! loopvol check                 exit 0 clean, 1 findings, 2 error
//! loopvol gc [--yes]            dry run without --yes
//! loopvol metrics [--textfile PATH]
//! loopvol fence NODE [--force]  a shared pool: declare NODE down (its volumes may move)
//! ```
//!
//! One file per subcommand under `commands/`.

mod commands;
mod context;
mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use context::Context;

/// loopvol's admin tool: what the pool holds, what this node has of it, what is inconsistent
/// and what is safe to clean.
#[derive(Debug, Parser)]
#[command(name = "loopvol", version)]
struct Args {
    /// The pool directory.
    #[arg(
        long,
        global = true,
        env = "LOOPVOL_POOL",
        default_value = "/var/lib/loopvol/pool"
    )]
    pool: PathBuf,

    /// This node's name, as the driver knows it (default: the host name, lower-cased as
    /// kubelet does).
    #[arg(long, global = true, env = "LOOPVOL_NODE")]
    node: Option<String>,

    /// Answer in JSON (one document on stdout) instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The pool's volumes (or snapshots) and what this node has of each.
    List(commands::list::Args),
    /// One volume (or snapshot): metadata, image, loop devices, mounts, holds, claims, health.
    Inspect(commands::inspect::Args),
    /// What is inconsistent, why, and what to do. Exit code 0 clean, 1 findings, 2 error.
    Check(commands::check::Args),
    /// Removes what `check` proves safe (never data, never anything attached or mounted).
    /// Without --yes only says what it would remove.
    Gc(commands::gc::Args),
    /// The pool and volume gauges loopvol-csi exports, for node-exporter's textfile collector.
    Metrics(commands::metrics::Args),
    /// A shared pool: declare NODE down for good (its kernel writes no more), so its
    /// read-write volumes may move to other nodes. Refused while its lease still moves.
    Fence(commands::fence::Args),
}

/// How a command ended: the exit code it asks for.
pub enum Outcome {
    /// Exit 0.
    Clean,
    /// Exit 1: `check` found something, or `gc` left something it meant to remove.
    Findings,
}

fn run(args: Args) -> Result<Outcome, String> {
    let ctx = Context::new(&args.pool, args.node, args.json)?;
    match args.command {
        Command::List(a) => commands::list::run(&ctx, &a),
        Command::Inspect(a) => commands::inspect::run(&ctx, &a),
        Command::Check(a) => commands::check::run(&ctx, &a),
        Command::Gc(a) => commands::gc::run(&ctx, &a),
        Command::Metrics(a) => commands::metrics::run(&ctx, &a),
        Command::Fence(a) => commands::fence::run(&ctx, &a),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    match run(args) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Findings) => ExitCode::from(1),
        Err(e) => {
            if json {
                output::print_json(&serde_json::json!({ "error": e }));
            }
            eprintln!("loopvol: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_go_anywhere() {
        let a = Args::try_parse_from(["loopvol", "check", "--json", "--pool", "/p"]).unwrap();
        assert!(a.json);
        assert_eq!(a.pool, PathBuf::from("/p"));
        let a = Args::try_parse_from(["loopvol", "--node", "n", "gc", "--yes"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Gc(commands::gc::Args { yes: true })
        ));
        assert!(Args::try_parse_from(["loopvol", "inspect"]).is_err());
        let a = Args::try_parse_from(["loopvol", "fence", "node-a", "--force"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Fence(commands::fence::Args { ref node, force: true }) if node == "node-a"
        ));
        assert!(Args::try_parse_from(["loopvol", "fence"]).is_err());
        assert!(Args::try_parse_from(["loopvol"]).is_err());
    }
}
