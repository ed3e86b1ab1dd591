//! `loopvol-csi`: the CSI gRPC server. It parses and validates requests, calls the loopvol backend
//! and translates its typed errors to gRPC codes; it does no file, device or mount work itself.
//!
//! ```text
//! loopvol-csi --endpoint unix:///run/loopvol/csi.sock --node-id n1 --pool /var/lib/loopvol/pool
//! ```

mod caps;
mod controller;
mod convert;
mod error;
mod group;
mod identity;
mod inflight;
mod log;
mod metrics;
mod node;
mod params;
mod rpc;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity, Controller and GroupController.
    Controller,
    /// Identity and Node.
    Node,
    /// Everything (a node-local pool, or a single-node cluster).
    Both,
}

/// loopvol CSI driver: volumes are sparse image files in a pool directory, attached as loop
/// devices, formatted and mounted.
#[derive(Debug, Parser)]
#[command(name = "loopvol-csi", version)]
struct Args {
    /// Where to listen: unix:///absolute/path/to/csi.sock (no TCP).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/loopvol/csi.sock"
    )]
    endpoint: String,

    /// This node's name (default: the host name, lower-cased as kubelet does).
    #[arg(long, env = "LOOPVOL_NODE")]
    node_id: Option<String>,

    /// The pool directory (must exist).
    #[arg(long, env = "LOOPVOL_POOL", default_value = "/var/lib/loopvol/pool")]
    pool: PathBuf,

    /// The CSI driver name reported to Kubernetes.
    #[arg(long, default_value = loopvol::names::CSI_DRIVER)]
    driver_name: String,

    /// Which services to serve.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,

    /// The pool is on a filesystem that every node mounts: no node topology, volumes are
    /// claimed for a node by ControllerPublishVolume.
    #[arg(long)]
    shared_pool: bool,

    /// Staging and target paths must lie under this directory (repeatable).
    #[arg(long = "path-prefix", value_name = "DIR")]
    path_prefixes: Vec<PathBuf>,

    /// Reported to Kubernetes as the node's attach limit (0: unlimited).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
    max_volumes_per_node: i64,

    /// How many times the pool's free space may be promised to thin volumes (≥ 1.0).
    #[arg(long, default_value_t = 1.0)]
    overcommit: f64,

    /// Serve Prometheus metrics (OpenMetrics text) on http://IP:PORT/metrics, e.g.
    /// 0.0.0.0:9810; port 0 picks a free one (logged). Unset: no metrics server.
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<std::net::SocketAddr>,

    /// Shared pool: how often a node plugin renews its lease in the pool, in seconds.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    lease_interval: f64,

    /// Shared pool: after how many seconds without a renewal a node's lease expires. A node
    /// plugin fences its volumes after half of it; the controller waits the whole of it (and
    /// the longer of its own and the node's). At least 4 lease intervals.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    lease_timeout: f64,

    /// Shared pool: let the controller move a read-write volume to another node once its node's
    /// lease expired, trusting that the node fenced itself in time. Off (the default), only the
    /// node's unstage, its recorded fence, or an operator's `loopvol fence NODE` hands it over:
    /// a paused node plugin cannot fence.
    #[arg(long)]
    handover_on_lease_expiry: bool,
}

/// A number of seconds from a flag.
fn seconds(flag: &str, value: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(value)
        .map_err(|_| format!("--{flag} {value}: not a number of seconds"))
}

/// Settings the services need, checked at startup.
#[derive(Debug, Clone)]
pub struct Config {
    pub driver_name: String,
    pub node_id: loopvol::NodeName,
    pub mode: Mode,
    pub shared: bool,
    pub max_volumes_per_node: i64,
}

impl Config {
    pub fn serves_controller(&self) -> bool {
        matches!(self.mode, Mode::Controller | Mode::Both)
    }
    pub fn serves_node(&self) -> bool {
        matches!(self.mode, Mode::Node | Mode::Both)
    }
}

/// A CSI driver name: at most 63 characters, `[a-z0-9.-]`, starting and ending alphanumeric.
fn check_driver_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty()
        || name.len() > 63
        || !name.chars().all(ok_char)
        || !edge(name.chars().next())
        || !edge(name.chars().last())
    {
        return Err(format!(
            "invalid --driver-name {name:?}: at most 63 characters of a-z, 0-9, '.' and '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// This node's name: `--node-id` (the one node-name rule of every front end), else the host name.
fn node_id(arg: Option<String>) -> Result<loopvol::NodeName, String> {
    match arg.filter(|n| !n.is_empty()) {
        Some(n) => {
            loopvol::NodeName::parse("--node-id (or LOOPVOL_NODE)", n).map_err(|e| e.to_string())
        }
        None => loopvol::default_node_name().ok_or_else(|| {
            "no --node-id given and the host name is unknown; set --node-id or LOOPVOL_NODE".into()
        }),
    }
}

fn run(args: Args) -> Result<(), String> {
    check_driver_name(&args.driver_name)?;
    let socket = server::socket_path(&args.endpoint)?;
    let node_id = node_id(args.node_id)?;
    for prefix in &args.path_prefixes {
        if !prefix.is_absolute() {
            return Err(format!(
                "--path-prefix {} is not an absolute path",
                prefix.display()
            ));
        }
    }
    let lease = loopvol::LeaseSettings {
        interval: seconds("lease-interval", args.lease_interval)?,
        timeout: seconds("lease-timeout", args.lease_timeout)?,
        handover_on_expiry: args.handover_on_lease_expiry,
    };
    let options = loopvol::PoolOptions {
        node: node_id.clone(),
        shared: args.shared_pool,
        overcommit: args.overcommit,
        // A busy volume answers ABORTED at once; the CO retries with backoff.
        lock_wait: loopvol::LockWait::Try,
        path_prefixes: args.path_prefixes,
        lease,
    };
    let pool =
        std::sync::Arc::new(loopvol::Pool::open(&args.pool, options).map_err(|e| e.to_string())?);
    let serves_node = matches!(args.mode, Mode::Node | Mode::Both);
    if serves_node {
        // The controller of a shared pool publishes only to nodes that registered, and reads
        // their attach limit and lease terms there. Rewritten only when it changes; a failure
        // (a full pool) must not keep the node plugin from serving what is staged.
        let info = loopvol::NodeInfo {
            max_volumes: u64::try_from(args.max_volumes_per_node).ok(),
            lease: args.shared_pool.then_some(lease),
        };
        if let Err(e) = pool.register_node_with(&info) {
            tracing::warn!(error = %e, "could not record this node in the pool; serving anyway");
        }
    }
    if args.shared_pool {
        let started = if serves_node {
            loopvol::NodeGuard::new(std::sync::Arc::clone(&pool)).start()
        } else {
            Ok(())
        }
        .and_then(|()| {
            if matches!(args.mode, Mode::Controller | Mode::Both) {
                pool.start_lease_watch()
            } else {
                Ok(())
            }
        });
        started.map_err(|e| format!("cannot start the lease threads: {e}"))?;
    }
    let config = Config {
        driver_name: args.driver_name,
        node_id,
        mode: args.mode,
        shared: args.shared_pool,
        max_volumes_per_node: args.max_volumes_per_node,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(server::serve(config, pool, socket, args.metrics_address));
    // Work whose caller gave up may still be running in the blocking pool: give it a moment,
    // then exit anyway (every backend operation is safe to interrupt and repeat).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

fn main() -> ExitCode {
    // Before any thread starts (see the function for the figures).
    loopvol::limit_malloc_arenas(2);
    let args = Args::parse();
    let log_file = std::env::var_os("LOOPVOL_LOG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if let Err(e) = log::init(log_file.as_deref()) {
        eprintln!("loopvol-csi: {e}");
        return ExitCode::FAILURE;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            // Also on stderr when logging to a file: a failed start must be visible at once.
            if log_file.is_some() {
                eprintln!("loopvol-csi: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names() {
        check_driver_name("csi.loopvol.io").unwrap();
        check_driver_name("a").unwrap();
        for bad in ["", "-a", "a-", "A.b", "a_b", &"a".repeat(64)] {
            assert!(check_driver_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_ids_follow_the_one_rule() {
        for ok in ["n1", "a/b:c", &"n".repeat(256)] {
            assert_eq!(node_id(Some(ok.to_owned())).unwrap().as_str(), ok);
        }
        for bad in ["a\tb", "a\0b", &"n".repeat(257)] {
            let err = node_id(Some(bad.to_owned())).unwrap_err();
            assert!(err.contains("invalid --node-id"), "{bad:?}: {err}");
        }
        // Empty: the host name.
        assert!(node_id(Some(String::new())).is_ok());
    }

    #[test]
    fn cli_defaults() {
        let args = Args::try_parse_from(["loopvol-csi", "--pool", "/p"]).unwrap();
        assert_eq!(args.mode, Mode::Both);
        assert_eq!(args.driver_name, "csi.loopvol.io");
        assert_eq!(args.max_volumes_per_node, 0);
        assert!(!args.shared_pool);
        let args = Args::try_parse_from([
            "loopvol-csi",
            "--path-prefix",
            "/a",
            "--path-prefix",
            "/b",
            "--mode",
            "node",
            "--shared-pool",
        ])
        .unwrap();
        assert_eq!(args.path_prefixes.len(), 2);
        assert_eq!(args.mode, Mode::Node);
        assert!(args.shared_pool);
        assert!(Args::try_parse_from(["loopvol-csi", "--max-volumes-per-node", "-1"]).is_err());
        assert_eq!(args.metrics_address, None);
        let args =
            Args::try_parse_from(["loopvol-csi", "--metrics-address", "0.0.0.0:9810"]).unwrap();
        assert_eq!(args.metrics_address, Some("0.0.0.0:9810".parse().unwrap()));
        for bad in ["9810", "localhost:9810", "0.0.0.0", ":9810"] {
            assert!(
                Args::try_parse_from(["loopvol-csi", "--metrics-address", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
