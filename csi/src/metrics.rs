//! Prometheus metrics on `--metrics-address` (`/metrics`, OpenMetrics text): every RPC by method
//! and gRPC code (latency histogram, calls in flight, ABORTED because the volume was busy), the
//! backend's events (formats, image copies, lock waits) through its observer hook, and the
//! pool and volume gauges of `loopvol_metrics::PoolGauges`.
//!
//! A scrape never waits for a volume's lock and never piles up work on a hung pool: the pool's
//! gauges come from a lock-free scan ([`loopvol::Pool::scan`]) run at most once a second, on a
//! blocking thread, awaited for at most [`SCAN_BOUND`]; one that takes longer keeps running
//! alone (no second scan starts meanwhile) and the scrape answers with the last values and
//! `loopvol_pool_scan_success 0`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use loopvol::observe::{CopyKind, LockOutcome, Observer};
use loopvol::{CopyMethod, FsType, Pool};
use loopvol_metrics::PoolGauges;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::rpc::Rpc;

/// How long a scrape waits for the pool's scan before it answers with the last values.
pub const SCAN_BOUND: Duration = Duration::from_secs(2);
/// Scrapes closer together than this share one scan.
const SCAN_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Latency buckets of RPCs, formats and copies: 1 ms to 2 min.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

type Labels2 = [(&'static str, &'static str); 2];
type Labels1 = [(&'static str, &'static str); 1];

/// Why a call was answered ABORTED because its volume was busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyCause {
    /// Another call of this server on the same volume, snapshot or group is in flight.
    InFlight,
    /// Another process (a FlexVolume call, another server on a shared pool) holds its lock.
    Lock,
}

impl BusyCause {
    fn as_str(self) -> &'static str {
        match self {
            BusyCause::InFlight => "in_flight",
            BusyCause::Lock => "lock",
        }
    }
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    rpc_seconds: Family<Labels2, Histogram>,
    in_flight: Family<Labels1, Gauge>,
    aborted_busy: Family<Labels2, Counter>,
    format_seconds: Family<Labels2, Histogram>,
    copy_seconds: Family<Labels2, Histogram>,
    copy_bytes: Family<Labels2, Counter>,
    lock_waits: Family<Labels1, Counter>,
    lock_wait_seconds: Family<Labels1, Histogram>,
    pool: PoolGauges,
    scan: Mutex<ScanState>,
}

#[derive(Default)]
struct ScanState {
    last_start: Option<Instant>,
    /// The scan running now, if any: its result arrives here.
    running: Option<tokio::sync::watch::Receiver<bool>>,
}

fn histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// A family of latency histograms.
fn seconds<L: Clone + std::hash::Hash + Eq>() -> Family<L, Histogram> {
    Family::new_with_constructor(histogram as fn() -> Histogram)
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The server's metrics, when it serves them (`--metrics-address`).
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

impl Metrics {
    fn new(pool: &Pool) -> Metrics {
        let mut registry = loopvol_metrics::registry();
        let (rpc_seconds, format_seconds, copy_seconds, lock_wait_seconds) =
            (seconds(), seconds(), seconds(), seconds());
        let (in_flight, aborted_busy, copy_bytes, lock_waits) = (
            Family::default(),
            Family::default(),
            Family::default(),
            Family::default(),
        );
        registry.register_with_unit(
            "csi_request_duration",
            "CSI calls by method and gRPC code, and how long they took (the _count is the \
             number of calls)",
            Unit::Seconds,
            rpc_seconds.clone(),
        );
        registry.register(
            "csi_requests_in_flight",
            "CSI calls being served now, by method",
            in_flight.clone(),
        );
        registry.register(
            "csi_aborted_busy",
            "CSI calls answered ABORTED because their volume, snapshot or group was busy, by \
             method and cause (in_flight: another call of this server; lock: another process \
             holds its lock)",
            aborted_busy.clone(),
        );
        registry.register_with_unit(
            "format_duration",
            "mkfs runs by filesystem and result, and how long they took",
            Unit::Seconds,
            format_seconds.clone(),
        );
        registry.register_with_unit(
            "copy_duration",
            "Image copies by kind (snapshot, restore, clone) and method (reflink, sparse), and \
             how long they took",
            Unit::Seconds,
            copy_seconds.clone(),
        );
        registry.register_with_unit(
            "copy",
            "Bytes of data image copies moved (sparse) or shared (reflink), by kind and method",
            Unit::Bytes,
            copy_bytes.clone(),
        );
        registry.register(
            "lock_waits",
            "Volume and snapshot locks found held by another caller, by how the wait ended \
             (acquired, busy)",
            lock_waits.clone(),
        );
        registry.register_with_unit(
            "lock_wait",
            "How long waits for a held lock lasted, by how they ended",
            Unit::Seconds,
            lock_wait_seconds.clone(),
        );
        let pool = PoolGauges::register(&mut registry, pool.root(), pool.options().overcommit);
        Metrics {
            registry,
            rpc_seconds,
            in_flight,
            aborted_busy,
            format_seconds,
            copy_seconds,
            copy_bytes,
            lock_waits,
            lock_wait_seconds,
            pool,
            scan: Mutex::default(),
        }
    }

    /// A call of `rpc` starts: counted in flight until the returned guard drops.
    pub fn start(&'static self, rpc: Rpc) -> InFlightGuard {
        self.in_flight
            .get_or_create(&[("method", rpc.as_str())])
            .inc();
        InFlightGuard { metrics: self, rpc }
    }

    /// A call of `rpc` ended with `code` after `elapsed`.
    pub fn finished(&self, rpc: Rpc, code: tonic::Code, elapsed: Duration) {
        self.rpc_seconds
            .get_or_create(&[("method", rpc.as_str()), ("code", code_name(code))])
            .observe(elapsed.as_secs_f64());
    }

    /// A call of `rpc` was answered ABORTED because of `cause`.
    pub fn busy(&self, rpc: Rpc, cause: BusyCause) {
        self.aborted_busy
            .get_or_create(&[("method", rpc.as_str()), ("cause", cause.as_str())])
            .inc();
    }

    /// The metrics as a scrape gets them, with the pool's gauges refreshed (bounded, see the
    /// module's comment).
    pub async fn render(&'static self, pool: &Arc<Pool>) -> String {
        if let Some(mut done) = self.start_scan(pool) {
            let finished = tokio::time::timeout(SCAN_BOUND, done.wait_for(|ok| *ok)).await;
            if finished.is_err() {
                self.pool.scan_failed();
            }
        }
        loopvol_metrics::encode(&self.registry)
    }

    /// Starts a scan unless one ran within the last second or one is still running (then that
    /// one's receiver is returned, to wait on). `None`: nothing to wait for.
    fn start_scan(&'static self, pool: &Arc<Pool>) -> Option<tokio::sync::watch::Receiver<bool>> {
        let mut state = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = &state.running {
            if !*running.borrow() {
                return Some(running.clone());
            }
        }
        if state
            .last_start
            .is_some_and(|t| t.elapsed() < SCAN_MIN_INTERVAL)
        {
            return None;
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        state.last_start = Some(Instant::now());
        state.running = Some(rx.clone());
        let pool = Arc::clone(pool);
        tokio::task::spawn_blocking(move || {
            match pool.scan(&mut |_| {}) {
                Ok(scan) => self.pool.update(&scan.census(), scan.elapsed),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: cannot scan the pool");
                    self.pool.scan_failed();
                }
            }
            let _ = tx.send(true);
        });
        Some(rx)
    }
}

/// Holds a call's place in `loopvol_csi_requests_in_flight`.
pub struct InFlightGuard {
    metrics: &'static Metrics,
    rpc: Rpc,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .get_or_create(&[("method", self.rpc.as_str())])
            .dec();
    }
}

/// The gRPC code's name as the spec writes it (`OK`, `NOT_FOUND`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Feeds the backend's events into the metrics.
struct BackendEvents(&'static Metrics);

impl Observer for BackendEvents {
    fn format(&self, fs: FsType, ok: bool, elapsed: Duration) {
        let fs = match fs {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        };
        self.0
            .format_seconds
            .get_or_create(&[("fs", fs), ("result", if ok { "ok" } else { "error" })])
            .observe(elapsed.as_secs_f64());
    }

    fn copy(&self, kind: CopyKind, method: CopyMethod, bytes: u64, elapsed: Duration) {
        let labels = [("kind", kind.as_str()), ("method", method.as_str())];
        self.0
            .copy_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.0.copy_bytes.get_or_create(&labels).inc_by(bytes);
    }

    fn lock_wait(&self, outcome: LockOutcome, waited: Duration) {
        let labels = [("outcome", outcome.as_str())];
        self.0.lock_waits.get_or_create(&labels).inc();
        self.0
            .lock_wait_seconds
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
    }
}

/// Sets up the metrics (once per process) and serves `/metrics` on `listener` until the
/// runtime stops.
pub fn serve(listener: tokio::net::TcpListener, pool: Arc<Pool>) {
    let metrics: &'static Metrics = METRICS.get_or_init(|| Metrics::new(&pool));
    loopvol::observe::install(Arc::new(BackendEvents(metrics)));
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let pool = Arc::clone(&pool);
                    async move { Ok::<_, Infallible>(respond(metrics, &pool, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics: connection ended");
                }
            });
        }
    });
}

async fn respond(
    metrics: &'static Metrics,
    pool: &Arc<Pool>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_str(content_type).expect("a valid header value"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "loopvol-csi serves /metrics only\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET /metrics\n".into(),
        );
    }
    reply(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        metrics.render(pool).await,
    )
}

/// Binds the metrics address (a clear error when it cannot: the port is taken, the address is
/// not this host's).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on --metrics-address {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_specs() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Aborted), "ABORTED");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
    }
}
