//! Logs go only to the configured file, through `tracing`; never to stdout or stderr, which
//! kubelet parses. A log file that cannot be opened means no logs, not a failed call.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;

/// `LOOPVOL_LOG_LEVEL`: error, warn, info (default), debug or trace.
fn level() -> LevelFilter {
    std::env::var("LOOPVOL_LOG_LEVEL")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(LevelFilter::INFO)
}

/// Points stderr at /dev/null: nothing the runtime might print (an abort message) may reach
/// kubelet's parse. Cheap enough for `init`.
pub fn quiet_stderr() {
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// Sends logs to `path` (appended; one write per line, so concurrent calls interleave whole lines).
pub fn init(path: Option<&Path>) {
    let Some(path) = path else { return };
    let Ok(file) = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
    else {
        return;
    };
    // Whatever still reaches stderr lands in the log rather than nowhere.
    if let Ok(dup) = file.try_clone() {
        let _ = nix::unistd::dup2_stderr(&dup);
    }
    let subscriber = tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .with_max_level(level())
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}
