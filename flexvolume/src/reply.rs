//! The one JSON object a call prints, the call errors, and the one place errors become replies.
//!
//! kubelet parses stdout and stderr combined as one JSON object, so [`emit`] writes exactly one
//! object, once per process (a panic after the reply cannot add a second), in a single write.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use loopvol::ErrorKind;
use serde::Serialize;

pub const SUCCESS: &str = "Success";
pub const FAILURE: &str = "Failure";
/// Exact spelling matters: kubelet compares the string.
pub const NOT_SUPPORTED: &str = "Not supported";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    pub attach: bool,
    pub selinux_relabel: bool,
    pub supports_metrics: bool,
    pub fs_group: bool,
    #[serde(rename = "requiresFSResize")]
    pub requires_fs_resize: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

impl Reply {
    fn with_status(status: &'static str) -> Reply {
        Reply {
            status,
            message: None,
            device: None,
            volume_name: None,
            attached: None,
            capabilities: None,
        }
    }

    pub fn success() -> Reply {
        Reply::with_status(SUCCESS)
    }

    pub fn failure(message: impl Into<String>) -> Reply {
        Reply {
            message: Some(message.into()),
            ..Reply::with_status(FAILURE)
        }
    }

    pub fn not_supported(message: impl Into<String>) -> Reply {
        Reply {
            message: Some(message.into()),
            ..Reply::with_status(NOT_SUPPORTED)
        }
    }

    pub fn device(mut self, device: impl Into<String>) -> Reply {
        self.device = Some(device.into());
        self
    }

    pub fn attached(mut self, attached: bool) -> Reply {
        self.attached = Some(attached);
        self
    }

    pub fn capabilities(mut self, c: Capabilities) -> Reply {
        self.capabilities = Some(c);
        self
    }

    /// kubelet's rule: 0 for Success and Not supported, 1 for Failure.
    pub fn exit_code(&self) -> i32 {
        if self.status == FAILURE {
            1
        } else {
            0
        }
    }
}

/// Why a call did not succeed.
#[derive(Debug)]
pub enum CallError {
    /// Bad argv or options, found by the front end.
    Invalid(String),
    /// A call this driver (or this mode) does not implement: kubelet falls back to its default.
    NotSupported(String),
    /// The driver's own configuration is unusable.
    Config(String),
    /// The backend refused or failed; its message names the volume, path or value at fault.
    Backend(loopvol::Error),
}

impl CallError {
    pub fn invalid(message: impl Into<String>) -> CallError {
        CallError::Invalid(message.into())
    }
}

impl From<loopvol::Error> for CallError {
    fn from(e: loopvol::Error) -> Self {
        CallError::Backend(e)
    }
}

impl From<loopvol_flexvolume::options::Error> for CallError {
    fn from(e: loopvol_flexvolume::options::Error) -> Self {
        match e {
            loopvol_flexvolume::options::Error::Invalid(m) => CallError::Invalid(m),
            loopvol_flexvolume::options::Error::Value(e) => CallError::Backend(e),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Invalid(m) | CallError::NotSupported(m) => f.write_str(m),
            CallError::Config(m) => write!(f, "loopvol-flexvolume is misconfigured: {m}"),
            CallError::Backend(e) => write!(f, "{e}"),
        }
    }
}

/// The one mapping from an error to kubelet's reply. The backend's message is kept whole; a busy
/// volume also says how long we waited, so an operator knows it was not a hang.
pub fn error_reply(err: &CallError, lock_timeout: Duration) -> Reply {
    match err {
        CallError::NotSupported(m) => Reply::not_supported(m.clone()),
        CallError::Invalid(_) | CallError::Config(_) => Reply::failure(err.to_string()),
        CallError::Backend(e) => Reply::failure(match e.kind() {
            ErrorKind::Busy => format!(
                "{e} (gave up after waiting {}s; kubelet retries the call)",
                lock_timeout.as_secs()
            ),
            ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::InvalidArgument
            | ErrorKind::FailedPrecondition
            | ErrorKind::OutOfRange
            | ErrorKind::ResourceExhausted
            | ErrorKind::Internal => e.to_string(),
        }),
    }
}

/// The exit code of the reply this process printed; `NONE_YET` until one is.
static EMITTED: AtomicI32 = AtomicI32::new(NONE_YET);
const NONE_YET: i32 = -1;

/// Prints `reply` as the process's one JSON object and returns the exit code the process must
/// end with: that of the reply actually printed. Only the first call prints; a later one (the
/// watchdog firing just after the reply, a panic hook) prints nothing and gets the first
/// reply's code, so the exit code always agrees with the status kubelet reads (a "Success"
/// with exit 1 is a driver bug to kubelet).
pub fn emit(reply: &Reply) -> i32 {
    let code = reply.exit_code();
    if let Err(first) = EMITTED.compare_exchange(NONE_YET, code, Ordering::SeqCst, Ordering::SeqCst)
    {
        return first;
    }
    let mut text = serde_json::to_string(reply).unwrap_or_else(|_| {
        // Cannot happen (plain strings and bools), but never print nothing.
        format!(r#"{{"status":"{FAILURE}","message":"could not encode the reply"}}"#)
    });
    text.push('\n');
    let mut out = std::io::stdout().lock();
    // Nobody to tell if kubelet went away: the exit code still says what happened.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = Reply::success().capabilities(Capabilities {
            attach: false,
            selinux_relabel: true,
            supports_metrics: true,
            fs_group: false,
            requires_fs_resize: true,
        });
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"status":"Success","capabilities":{"attach":false,"selinuxRelabel":true,"supportsMetrics":true,"fsGroup":false,"requiresFSResize":true}}"#
        );
        let r = Reply::not_supported("no");
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"status":"Not supported","message":"no"}"#
        );
        assert_eq!(r.exit_code(), 0);
        assert_eq!(Reply::failure("x").exit_code(), 1);
        let r = Reply::success().device("/dev/loop3").attached(true);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"status":"Success","device":"/dev/loop3","attached":true}"#
        );
    }

    #[test]
    fn exit_code_is_the_printed_replys() {
        // The only test in this binary that emits: the first reply wins, later ones (a watchdog
        // or a panic hook racing the end of the call) get its code and print nothing.
        assert_eq!(emit(&Reply::success()), 0);
        assert_eq!(emit(&Reply::failure("too late")), 0);
        assert_eq!(emit(&Reply::not_supported("x")), 0);
    }

    #[test]
    fn errors_map_once() {
        let busy = CallError::Backend(loopvol::Error::Busy("volume v".into()));
        let r = error_reply(&busy, Duration::from_secs(60));
        assert_eq!(r.status, FAILURE);
        let m = r.message.unwrap();
        assert!(m.contains("volume v is busy") && m.contains("60s"), "{m}");
        let nf = CallError::Backend(loopvol::Error::NotFound {
            what: "volume",
            id: "v".into(),
        });
        assert_eq!(
            error_reply(&nf, Duration::ZERO).message.unwrap(),
            "volume \"v\" not found"
        );
        let ns = CallError::NotSupported("attach is not used in node mode".into());
        assert_eq!(error_reply(&ns, Duration::ZERO).status, NOT_SUPPORTED);
        let cfg = CallError::Config("bad".into());
        assert!(error_reply(&cfg, Duration::ZERO)
            .message
            .unwrap()
            .contains("misconfigured"));
    }
}
