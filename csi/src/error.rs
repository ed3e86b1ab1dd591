//! The one translation of backend errors into gRPC statuses.
//!
//! Every handler ends in [`to_status`]: the backend's [`ErrorKind`] decides the code, the RPC
//! only adds the exceptions the CSI spec makes for it. The message is the backend's `Display`
//! text (it names the volume, path or value at fault); `details` stay empty.

use loopvol::ErrorKind;
use tonic::{Code, Status};

use crate::rpc::Rpc;

/// The gRPC code for a backend error returned by `rpc`.
pub fn code_for(rpc: Rpc, kind: ErrorKind) -> Code {
    match (rpc, kind) {
        // The only InvalidArgument a list call can get from the backend is its starting token:
        // the spec wants ABORTED for a token the plugin did not issue (or no longer knows).
        (Rpc::ListVolumes | Rpc::ListSnapshots, ErrorKind::InvalidArgument) => Code::Aborted,
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

/// The status a handler of `rpc` returns for a backend error.
pub fn to_status(rpc: Rpc, err: loopvol::Error) -> Status {
    Status::new(code_for(rpc, err.kind()), err.to_string())
}

/// A backend result as the status `rpc` answers with ([`to_status`]): for the validation a
/// handler does itself (IDs, names, sizes) before any blocking work.
pub trait OrStatus<T> {
    fn or_status(self, rpc: Rpc) -> Result<T, Status>;
}

impl<T> OrStatus<T> for loopvol::Result<T> {
    fn or_status(self, rpc: Rpc) -> Result<T, Status> {
        self.map_err(|e| to_status(rpc, e))
    }
}

/// How blocking work fails: a backend error (mapped by [`to_status`] with the RPC) or a status
/// the handler decided itself. `?` converts both.
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

    /// Each kind and the code it gets from every RPC but the exceptions below.
    const TABLE: [(ErrorKind, Code); 8] = [
        (ErrorKind::NotFound, Code::NotFound),
        (ErrorKind::AlreadyExists, Code::AlreadyExists),
        (ErrorKind::InvalidArgument, Code::InvalidArgument),
        (ErrorKind::Busy, Code::Aborted),
        (ErrorKind::FailedPrecondition, Code::FailedPrecondition),
        (ErrorKind::OutOfRange, Code::OutOfRange),
        (ErrorKind::ResourceExhausted, Code::ResourceExhausted),
        (ErrorKind::Internal, Code::Internal),
    ];

    /// Every RPC × every kind; the only exceptions are the list calls' bad tokens.
    #[test]
    fn every_rpc_maps_every_kind() {
        let exceptions = [
            (Rpc::ListVolumes, ErrorKind::InvalidArgument, Code::Aborted),
            (
                Rpc::ListSnapshots,
                ErrorKind::InvalidArgument,
                Code::Aborted,
            ),
        ];
        let mut wrong = Vec::new();
        for rpc in Rpc::ALL {
            for (kind, usual) in TABLE {
                let want = exceptions
                    .iter()
                    .find(|(r, k, _)| *r == rpc && *k == kind)
                    .map_or(usual, |(_, _, code)| *code);
                let got = code_for(rpc, kind);
                if got != want {
                    wrong.push(format!("{rpc} {kind:?}: {got:?}, want {want:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn create_volume_final_failures_are_never_retry_codes() {
        let retry = [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
        ];
        for (kind, _) in TABLE.into_iter().filter(|(k, _)| *k != ErrorKind::Busy) {
            assert!(
                !retry.contains(&code_for(Rpc::CreateVolume, kind)),
                "{kind:?}"
            );
        }
    }
}
