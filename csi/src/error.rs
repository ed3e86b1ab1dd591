//! The one translation of backend errors into gRPC statuses.
//!
//! Every handler ends in [`to_status`]: the backend's [`ErrorKind`] decides the code, the RPC
//! only adds the exceptions the CSI spec makes for it. The message is the backend's `Display`
//! text (it names the volume, path or value at fault); `details` stay empty.

use loopvol::ErrorKind;
use tonic::{Code, Status};

/// The gRPC code for a backend error returned by `method` (the CSI RPC name).
pub fn code_for(method: &str, kind: ErrorKind) -> Code {
    match (method, kind) {
        // The only InvalidArgument a list call can get from the backend is its starting token:
        // the spec wants ABORTED for a token the plugin did not issue (or no longer knows).
        ("ListVolumes" | "ListSnapshots", ErrorKind::InvalidArgument) => Code::Aborted,
        (_, ErrorKind::NotFound) => Code::NotFound,
        (_, ErrorKind::AlreadyExists) => Code::AlreadyExists,
        (_, ErrorKind::InvalidArgument) => Code::InvalidArgument,
        // Another call holds the volume: the caller retries with backoff. For CreateVolume this
        // is not a final failure (it may well succeed next time), so ABORTED is right there too.
        (_, ErrorKind::Busy) => Code::Aborted,
        (_, ErrorKind::FailedPrecondition) => Code::FailedPrecondition,
        (_, ErrorKind::OutOfRange) => Code::OutOfRange,
        (_, ErrorKind::ResourceExhausted) => Code::ResourceExhausted,
        (_, ErrorKind::Internal) => Code::Internal,
    }
}

/// The status a handler of `method` returns for a backend error.
pub fn to_status(method: &str, err: loopvol::Error) -> Status {
    Status::new(code_for(method, err.kind()), err.to_string())
}

/// How blocking work fails: a backend error (mapped by [`to_status`] with the RPC's name) or a
/// status the handler decided itself. `?` converts both.
#[derive(Debug)]
pub enum Fail {
    Backend(loopvol::Error),
    Status(Status),
}

impl From<loopvol::Error> for Fail {
    fn from(e: loopvol::Error) -> Self {
        Fail::Backend(e)
    }
}

impl From<Status> for Fail {
    fn from(s: Status) -> Self {
        Fail::Status(s)
    }
}

/// A malformed or missing request field.
pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// A required string field that is empty.
pub fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(invalid(format!("{field} is required")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_one_to_one() {
        let table = [
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::AlreadyExists, Code::AlreadyExists),
            (ErrorKind::InvalidArgument, Code::InvalidArgument),
            (ErrorKind::Busy, Code::Aborted),
            (ErrorKind::FailedPrecondition, Code::FailedPrecondition),
            (ErrorKind::OutOfRange, Code::OutOfRange),
            (ErrorKind::ResourceExhausted, Code::ResourceExhausted),
            (ErrorKind::Internal, Code::Internal),
        ];
        for (kind, code) in table {
            assert_eq!(code_for("DeleteVolume", kind), code, "{kind:?}");
        }
    }

    #[test]
    fn list_token_errors_are_aborted() {
        assert_eq!(
            code_for("ListVolumes", ErrorKind::InvalidArgument),
            Code::Aborted
        );
        assert_eq!(
            code_for("ListSnapshots", ErrorKind::InvalidArgument),
            Code::Aborted
        );
        assert_eq!(code_for("ListVolumes", ErrorKind::Internal), Code::Internal);
    }

    #[test]
    fn create_volume_final_failures_are_never_retry_codes() {
        let retry = [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
        ];
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::InvalidArgument,
            ErrorKind::FailedPrecondition,
            ErrorKind::OutOfRange,
            ErrorKind::ResourceExhausted,
            ErrorKind::Internal,
        ] {
            assert!(!retry.contains(&code_for("CreateVolume", kind)), "{kind:?}");
        }
    }
}
