//! Logging: where it goes, and the one line every request gets (method, volume, duration, code).
//!
//! Every handler of every service goes through [`serve`]. Requests are never logged whole: they
//! carry secrets and mount flags (which may hold credentials). [`Subject`] names what a request
//! acts on (a volume ID, name or snapshot ID) and which values to redact: those of `key=value`
//! mount flags are scrubbed from any message before it is logged or returned.

use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use loopvol_proto::csi::v1 as pb;
use tonic::{Request, Response, Status};
use tracing_subscriber::EnvFilter;

use crate::caps;
use crate::metrics;
use crate::rpc::Rpc;

/// Sends logs to `file` (appended) or, without one, to stderr. `RUST_LOG` overrides the level.
pub fn init(file: Option<&Path>) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,tonic=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    format!("cannot open log file {} (LOOPVOL_LOG): {e}", path.display())
                })?;
            builder.with_ansi(false).with_writer(Mutex::new(f)).init();
        }
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    Ok(())
}

/// Values that must not reach a log or an error message.
#[derive(Debug, Default, Clone)]
pub struct Redact(Vec<String>);

impl Redact {
    /// The values of `key=value` mount flags (`password=…`, `context=…`).
    pub fn mount_flags<'a>(flags: impl IntoIterator<Item = &'a String>) -> Redact {
        Redact(
            flags
                .into_iter()
                .filter_map(|f| f.split_once('=').map(|(_, v)| v.to_owned()))
                .filter(|v| v.len() >= 3)
                .collect(),
        )
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for v in &self.0 {
            out = out.replace(v.as_str(), "<redacted>");
        }
        out
    }
}

fn elapsed_ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Logs a request whose caller went away (its deadline passed, the connection dropped) before it
/// ended: tonic drops the handler, so the normal line never comes. The backend work itself goes on
/// to its end, holding the volume.
struct Abandoned<'a> {
    rpc: Rpc,
    subject: &'a str,
    start: Instant,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(m) = metrics::get() {
                m.finished(self.rpc, tonic::Code::Cancelled, self.start.elapsed());
            }
            tracing::warn!(
                method = self.rpc.as_str(),
                volume = self.subject,
                duration_ms = elapsed_ms(self.start),
                code = "Cancelled",
                "the caller gave up; the operation finishes in the background"
            );
        }
    }
}

/// What a request acts on, for its log line, and what must not reach a log or a message.
pub trait Subject {
    /// The volume ID, name or snapshot ID the request names; empty for none.
    fn subject(&self) -> &str {
        ""
    }

    fn redactions(&self) -> Redact {
        Redact::default()
    }
}

/// `impl Subject for Request { subject: field [, redact capabilities: field] }`
macro_rules! subject {
    ($($request:ident $(: $field:ident $(, caps $caps:ident)?)?;)*) => {
        $(impl Subject for pb::$request {
            $(
                fn subject(&self) -> &str {
                    &self.$field
                }
                $(
                    fn redactions(&self) -> Redact {
                        caps::redactions(&self.$caps)
                    }
                )?
            )?
        })*
    };
}

subject! {
    GetPluginInfoRequest;
    GetPluginCapabilitiesRequest;
    ProbeRequest;
    CreateVolumeRequest: name, caps volume_capabilities;
    DeleteVolumeRequest: volume_id;
    ControllerPublishVolumeRequest: volume_id, caps volume_capability;
    ControllerUnpublishVolumeRequest: volume_id;
    ValidateVolumeCapabilitiesRequest: volume_id, caps volume_capabilities;
    ListVolumesRequest;
    ControllerGetCapabilitiesRequest;
    CreateSnapshotRequest: name;
    DeleteSnapshotRequest: snapshot_id;
    ListSnapshotsRequest;
    GetSnapshotRequest: snapshot_id;
    ControllerExpandVolumeRequest: volume_id, caps volume_capability;
    ControllerGetVolumeRequest: volume_id;
    ControllerModifyVolumeRequest: volume_id;
    GroupControllerGetCapabilitiesRequest;
    CreateVolumeGroupSnapshotRequest: name;
    DeleteVolumeGroupSnapshotRequest: group_snapshot_id;
    GetVolumeGroupSnapshotRequest: group_snapshot_id;
    NodeStageVolumeRequest: volume_id, caps volume_capability;
    NodeUnstageVolumeRequest: volume_id;
    NodePublishVolumeRequest: volume_id, caps volume_capability;
    NodeUnpublishVolumeRequest: volume_id;
    NodeGetVolumeStatsRequest: volume_id;
    NodeExpandVolumeRequest: volume_id, caps volume_capability;
    NodeGetCapabilitiesRequest;
    NodeGetInfoRequest;
}

/// GetCapacity names no volume but carries capabilities.
impl Subject for pb::GetCapacityRequest {
    fn redactions(&self) -> Redact {
        caps::redactions(&self.volume_capabilities)
    }
}

/// Serves one request of `rpc`: hands its body to `handler` and logs how it ended (the one
/// shape every trait method of every service has).
pub async fn serve<R, T, F>(
    rpc: Rpc,
    request: Request<R>,
    handler: impl FnOnce(R) -> F,
) -> Result<Response<T>, Status>
where
    R: Subject,
    F: Future<Output = Result<T, Status>>,
{
    let body = request.into_inner();
    let subject = body.subject().to_owned();
    let redact = body.redactions();
    call(rpc, &subject, redact, handler(body)).await
}

/// Runs one request's handler and logs how it ended. `subject` names what it acts on.
async fn call<T>(
    rpc: Rpc,
    subject: &str,
    redact: Redact,
    handler: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let method = rpc.as_str();
    let start = Instant::now();
    let _in_flight = metrics::get().map(|m| m.start(rpc));
    tracing::debug!(method, volume = subject, "request");
    let mut abandoned = Abandoned {
        rpc,
        subject,
        start,
        armed: true,
    };
    let result = handler.await;
    abandoned.armed = false;
    if let Some(m) = metrics::get() {
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        m.finished(rpc, code, start.elapsed());
    }
    let duration_ms = elapsed_ms(start);
    match result {
        Ok(reply) => {
            if rpc.is_poll() {
                tracing::debug!(method, volume = subject, duration_ms, code = "OK");
            } else {
                tracing::info!(method, volume = subject, duration_ms, code = "OK");
            }
            Ok(Response::new(reply))
        }
        Err(status) => {
            let message = redact.scrub(status.message());
            let code = format!("{:?}", status.code());
            if matches!(
                status.code(),
                tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss
            ) {
                tracing::error!(method, volume = subject, duration_ms, code, message);
            } else {
                tracing::warn!(method, volume = subject, duration_ms, code, message);
            }
            Err(Status::new(status.code(), message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_are_scrubbed() {
        let flags = vec![
            "ro".to_string(),
            "password=hunter22".to_string(),
            "x=1".to_string(),
        ];
        let r = Redact::mount_flags(&flags);
        assert_eq!(
            r.scrub("mount option \"password=hunter22\": bad; ro"),
            "mount option \"password=<redacted>\": bad; ro"
        );
    }
}
