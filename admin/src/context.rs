//! What every command starts from: the pool, opened read-only, and this node's name.

use std::path::Path;

use loopvol::inspect::Scan;
use loopvol::{LockWait, NodeName, Pool, PoolOptions};

use crate::progress::ProgressLine;

pub struct Context {
    pub pool: Pool,
    pub json: bool,
}

impl Context {
    /// Opens the pool at `pool` without creating anything: a missing directory, or one that is
    /// not a loopvol pool, is an error naming it.
    pub fn new(pool: &Path, node: Option<String>, json: bool) -> Result<Context, String> {
        let node = match node.filter(|n| !n.is_empty()) {
            Some(n) => NodeName::parse("--node (or LOOPVOL_NODE)", n).map_err(|e| e.to_string())?,
            None => loopvol::default_node_name().ok_or(
                "no --node given and the host name is unknown; set --node or LOOPVOL_NODE",
            )?,
        };
        let mut options = PoolOptions::new(node);
        // gc never waits behind the driver: a busy entry is skipped, and said so.
        options.lock_wait = LockWait::Try;
        let pool = Pool::open_existing(pool, options).map_err(|e| e.to_string())?;
        Ok(Context { pool, json })
    }

    /// Scans the pool and this node (a progress line on a terminal while it runs).
    pub fn scan(&self) -> Result<Scan, String> {
        let mut line = ProgressLine::new(!self.json);
        let scan = self
            .pool
            .scan(&mut |p| line.show(p))
            .map_err(|e| format!("cannot scan the pool: {e}"));
        line.clear();
        scan
    }
}
