//! The backend's one error type and its protocol-neutral classification.
//!
//! Front ends never match on variants: they map [`ErrorKind`] once (to gRPC codes, to FlexVolume
//! replies) and show the `Display` text, which always names the volume, path or value at fault.

use std::path::PathBuf;

/// What kind of failure this is, independent of any wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    /// Another operation holds the volume; retrying later may succeed.
    Busy,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },

    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },

    #[error("{what} {id:?} already exists with different {detail}")]
    AlreadyExists {
        what: &'static str,
        id: String,
        detail: String,
    },

    #[error("{0} is busy: another operation holds its lock")]
    Busy(String),

    #[error("{0}")]
    Precondition(String),

    #[error("{0}")]
    OutOfRange(String),

    #[error("not enough space: {0}")]
    NoSpace(String),

    /// A limit other than space (a node's attach limit).
    #[error("{0}")]
    Limit(String),

    #[error("pool {path}: {reason}")]
    Pool { path: PathBuf, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },

    /// An external tool failed; its exit status and stderr are kept for the operator.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },

    #[error("corrupt metadata {path}: {reason}")]
    Metadata { path: PathBuf, reason: String },

    /// An entry inside the pool is not what loopvol puts there (a symbolic link, a FIFO, a device
    /// node, a file far too large, ...): it is never followed, opened for I/O or used.
    #[error("pool entry {path}: {reason}; refusing to use it")]
    Untrusted { path: PathBuf, reason: String },

    /// A file replaced through another node (a shared pool) still answers ESTALE here after
    /// bounded re-opens by path: retryable, never an internal error.
    #[error("{path}: stale file handle after {tries} re-opens (it was replaced through another node); retry")]
    Stale { path: PathBuf, tries: u32 },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid { .. } => ErrorKind::InvalidArgument,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::Busy(_) => ErrorKind::Busy,
            Error::Precondition(_) | Error::Pool { .. } | Error::Untrusted { .. } => {
                ErrorKind::FailedPrecondition
            }
            Error::Stale { .. } => ErrorKind::Busy,
            Error::OutOfRange(_) => ErrorKind::OutOfRange,
            Error::NoSpace(_) | Error::Limit(_) => ErrorKind::ResourceExhausted,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                ErrorKind::ResourceExhausted
            }
            Error::Sys { source, .. } if *source == nix::Error::ENOSPC => {
                ErrorKind::ResourceExhausted
            }
            // A size the pool's filesystem cannot hold in one file (ext4: 16 TiB).
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFBIG) => {
                ErrorKind::OutOfRange
            }
            Error::Sys { source, .. } if *source == nix::Error::EFBIG => ErrorKind::OutOfRange,
            Error::Io { .. }
            | Error::Sys { .. }
            | Error::Command { .. }
            | Error::Metadata { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn precondition(msg: impl Into<String>) -> Self {
        Error::Precondition(msg.into())
    }

    pub(crate) fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            what,
            id: id.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a human context to io and nix errors at the call site.
pub(crate) trait Context<T> {
    fn context(self, ctx: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, ctx: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: ctx(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, rustix::io::Errno> {
    fn context(self, ctx: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io {
            context: ctx(),
            source: e.into(),
        })
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn context(self, ctx: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            context: ctx(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_resource_exhausted() {
        let e = Error::Io {
            context: "write".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        let e = Error::Io {
            context: "write".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(e.kind(), ErrorKind::Internal);
        let e = Error::Io {
            context: "size".into(),
            source: std::io::Error::from_raw_os_error(libc::EFBIG),
        };
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn messages_name_the_subject() {
        let e = Error::not_found("volume", "pvc-1");
        assert_eq!(e.to_string(), "volume \"pvc-1\" not found");
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
