//! The gRPC server: the shared state every service uses ([`Driver`]), the Unix socket, and a
//! graceful shutdown on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use loopvol::Pool;
use loopvol_proto::csi::v1::controller_server::ControllerServer;
use loopvol_proto::csi::v1::group_controller_server::GroupControllerServer;
use loopvol_proto::csi::v1::identity_server::IdentityServer;
use loopvol_proto::csi::v1::node_server::NodeServer;
use loopvol_proto::csi::v1::Topology;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

use crate::error::{self, Fail};
use crate::inflight::InFlight;
use crate::metrics::{self, BusyCause};
use crate::rpc::Rpc;
use crate::Config;

/// The topology key of a node-local pool's volumes: the node whose pool holds them.
pub use loopvol::names::TOPOLOGY_KEY;

/// How long calls in flight may take to finish after SIGTERM (Kubernetes' default grace period
/// is 30 s, after which it kills the container anyway).
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(25);

/// What every service shares.
#[derive(Debug)]
pub struct Driver {
    pub config: Config,
    pub pool: Arc<Pool>,
    pub inflight: InFlight,
}

impl Driver {
    /// Runs blocking backend work off the async threads, holding the in-flight `keys` (ABORTED at
    /// once when any is busy) until the work itself ends. Backend errors become statuses through
    /// the one mapping in [`error::to_status`].
    pub async fn run<T: Send + 'static>(
        &self,
        rpc: Rpc,
        keys: Vec<String>,
        work: impl FnOnce(&Pool) -> Result<T, Fail> + Send + 'static,
    ) -> Result<T, Status> {
        let busy = |cause| {
            if let Some(m) = metrics::get() {
                m.busy(rpc, cause);
            }
        };
        let guard = self
            .inflight
            .acquire(keys)
            .inspect_err(|_| busy(BusyCause::InFlight))?;
        let pool = Arc::clone(&self.pool);
        let outcome = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            work(&pool)
        })
        .await
        .map_err(|e| Status::internal(format!("{rpc}: the operation failed: {e}")))?;
        outcome.map_err(|f| match f {
            Fail::Backend(e) => {
                if e.kind() == loopvol::ErrorKind::Busy {
                    busy(BusyCause::Lock);
                }
                error::to_status(rpc, e)
            }
            Fail::Status(s) => s,
        })
    }

    /// [`Driver::run`] for a read of the pool that must answer within
    /// [`loopvol::POOL_DEADLINE`] even when the pool hangs: `Ok(None)` when the work did not
    /// return by then (it goes on in the background; the pool then counts as not answering).
    pub async fn run_bounded<T: Send + 'static>(
        &self,
        rpc: Rpc,
        work: impl FnOnce(&Pool) -> Result<T, Fail> + Send + 'static,
    ) -> Result<Option<T>, Status> {
        match tokio::time::timeout(loopvol::POOL_DEADLINE, self.run(rpc, Vec::new(), work)).await {
            Ok(done) => done.map(Some),
            Err(_) => {
                self.pool
                    .note_hung(&rpc.to_string(), loopvol::POOL_DEADLINE);
                Ok(None)
            }
        }
    }

    /// This node's topology segment, or none on a shared pool (every node reaches it).
    pub fn topology(&self) -> Option<Topology> {
        (!self.config.shared).then(|| Topology {
            segments: [(TOPOLOGY_KEY.to_owned(), self.config.node_id.to_string())].into(),
        })
    }

    /// The topology of a volume that lives in `node`'s pool.
    pub fn volume_topology(&self, node: Option<&loopvol::NodeName>) -> Vec<Topology> {
        match node {
            Some(n) if !self.config.shared => vec![Topology {
                segments: [(TOPOLOGY_KEY.to_owned(), n.to_string())].into(),
            }],
            _ => Vec::new(),
        }
    }

    /// Whether this node's pool is within topology `t`: every segment must be ours (a key we
    /// do not report is a constraint we cannot promise). An empty topology constrains nothing.
    pub fn in_topology(&self, t: &Topology) -> bool {
        self.config.shared
            || t.segments
                .iter()
                .all(|(k, v)| k == TOPOLOGY_KEY && self.config.node_id == *v.as_str())
    }
}

/// The socket path of a `unix:///abs/path` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let rest = endpoint.strip_prefix("unix://").ok_or_else(|| {
        format!("endpoint {endpoint:?} is not supported: use unix:///absolute/path/to/csi.sock (no TCP)")
    })?;
    let path = PathBuf::from(rest);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(format!(
            "endpoint {endpoint:?}: the socket path must be absolute, as in unix:///run/loopvol/csi.sock"
        ));
    }
    // sun_path holds 108 bytes including the terminating NUL.
    if rest.len() > 107 {
        return Err(format!(
            "endpoint {endpoint:?}: a Unix socket path is at most 107 bytes"
        ));
    }
    Ok(path)
}

/// Binds the socket: removes a stale one (nothing listening), refuses anything else at the path,
/// and creates the new one owner-only (0600) from the start.
fn bind(path: &Path) -> Result<tokio::net::UnixListener, String> {
    let shown = path.display();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create the socket's directory for {shown}: {e}"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "another server is listening on {shown}; refusing to take its socket"
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove the stale socket {shown}: {e}"))?;
            tracing::info!(socket = %shown, "removed stale socket");
        }
        Ok(_) => {
            return Err(format!(
                "{shown} exists and is not a socket; refusing to replace it"
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {shown} to its owner: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("socket {shown}: {e}"))?;
    tokio::net::UnixListener::from_std(listener).map_err(|e| format!("socket {shown}: {e}"))
}

/// Removes our socket, unless another server has replaced it meanwhile.
fn remove_socket(path: &Path, ino: u64) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment this is called.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?,
            int: signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Serves the configured services on `socket` until SIGTERM or SIGINT; then stops accepting,
/// lets calls in flight finish, and removes the socket.
pub async fn serve(
    config: Config,
    pool: Arc<Pool>,
    socket: PathBuf,
    metrics_address: Option<SocketAddr>,
) -> Result<(), String> {
    // Catch the signals before the socket exists: one right after start is not lost (nor does
    // it kill the process with the socket left behind).
    let mut signals = Signals::install()?;
    // Before the socket: a metrics port that cannot be had fails the start, with nothing left.
    let metrics_listener = match metrics_address {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let listener = bind(&socket)?;
    let ino = std::fs::symlink_metadata(&socket)
        .map(|m| m.ino())
        .map_err(|e| format!("socket {}: {e}", socket.display()))?;
    let driver = Arc::new(Driver {
        config: config.clone(),
        pool,
        inflight: InFlight::default(),
    });
    if let Some(l) = metrics_listener {
        let addr = l
            .local_addr()
            .map_err(|e| format!("metrics listener: {e}"))?;
        metrics::serve(l, Arc::clone(&driver.pool));
        tracing::info!(address = %addr, "serving metrics on http://{addr}/metrics");
    }

    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(crate::identity::Identity::new(&driver)))
        .add_optional_service(
            config
                .serves_controller()
                .then(|| ControllerServer::new(crate::controller::Controller::new(&driver))),
        )
        .add_optional_service(
            config
                .serves_controller()
                .then(|| GroupControllerServer::new(crate::group::GroupController::new(&driver))),
        )
        .add_optional_service(
            config
                .serves_node()
                .then(|| NodeServer::new(crate::node::Node::new(&driver))),
        );

    tracing::info!(
        socket = %socket.display(),
        driver = %config.driver_name,
        node = %config.node_id,
        pool = %driver.pool.root().display(),
        mode = ?config.mode,
        shared = config.shared,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );
    let socket_for_signal = socket.clone();
    let (signalled, drain_started) = tokio::sync::oneshot::channel();
    let stop = async move {
        let sig = signals.recv().await;
        tracing::info!(signal = sig, "shutting down: finishing calls in flight");
        // No new connections from here on; existing ones drain.
        remove_socket(&socket_for_signal, ino);
        let _ = signalled.send(());
    };
    let serving = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop);
    // A client that never closes its connection must not keep the process alive for ever.
    let drain_limit = async {
        if drain_started.await.is_ok() {
            tokio::time::sleep(DRAIN_LIMIT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        served = serving => served.map_err(|e| format!("server failed: {e}")),
        () = drain_limit => {
            tracing::warn!("connections still open {DRAIN_LIMIT:?} after the signal; stopping anyway");
            Ok(())
        }
    };
    remove_socket(&socket, ino);
    if served.is_ok() {
        tracing::info!("stopped");
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/loopvol/csi.sock").unwrap(),
            PathBuf::from("/run/loopvol/csi.sock")
        );
        for bad in [
            "tcp://0.0.0.0:10000",
            "/run/csi.sock",
            "unix://relative.sock",
            "unix:///",
            "",
        ] {
            assert!(socket_path(bad).is_err(), "{bad:?}");
        }
        assert!(socket_path(&format!("unix:///{}", "a".repeat(120))).is_err());
    }
}
