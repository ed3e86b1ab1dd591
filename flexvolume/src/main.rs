//! `loopvol-flexvolume`: the FlexVolume exec driver. kubelet and the controller-manager run
//! `<driver> <call> <args...>` and parse stdout+stderr combined as one JSON object.
//!
//! This file: argv dispatch, the reply and the exit code. Whatever happens (bad argv, bad JSON, a
//! backend error, a panic, an unwritable log) exactly one JSON object goes to stdout, nothing to
//! stderr, and the exit code is 0 for Success / Not supported, 1 for Failure.

mod calls;
mod config;
mod logging;
mod reply;

use loopvol_flexvolume::options;

use std::time::{Duration, Instant};

use calls::{Args, Driver};
use reply::{error_reply, CallError, Reply};

const USAGE: &str = "usage: loopvol init | mount <podVolumeDir> <json> | unmount <podVolumeDir> | \
    expandfs <json> <devicePath> <deviceMountPath> <newSize> <oldSize> | attach <json> <node> | \
    isattached <json> <node> | detach <volumeName> <node> | waitforattach <device> <json> | \
    mountdevice <deviceMountPath> <device> <json> | unmountdevice <deviceMountPath>";

fn main() {
    logging::quiet_stderr();
    std::panic::set_hook(Box::new(panic_reply));
    let reply = match collect_args() {
        Ok(args) => run(&args),
        Err(e) => error_reply(&e, DEFAULT_LOCK_TIMEOUT),
    };
    std::process::exit(reply::emit(&reply));
}

const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(config::DEFAULT_LOCK_TIMEOUT_SECS);

fn collect_args() -> Result<Vec<String>, CallError> {
    std::env::args_os()
        .skip(1)
        .enumerate()
        .map(|(i, a)| {
            // Never echo the argument: it may be the options, secrets included.
            a.into_string().map_err(|a| {
                CallError::invalid(format!(
                    "argument {} ({} bytes) is not valid UTF-8",
                    i + 1,
                    a.len()
                ))
            })
        })
        .collect()
}

/// A panic is a bug, but kubelet still gets one Failure object (never a second one, never text).
fn panic_reply(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned());
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    tracing::error!(panic = %payload, location = %at, "panicked");
    // After the reply was printed (a panic while the call winds down) the exit code stays that
    // reply's, so the two never disagree.
    std::process::exit(reply::emit(&Reply::failure(format!(
        "loopvol-flexvolume panicked (a bug; please report it): {payload}{at}"
    ))));
}

fn run(args: &[String]) -> Reply {
    let Some((call, rest)) = args.split_first() else {
        return error_reply(
            &CallError::invalid(format!("no call given; {USAGE}")),
            DEFAULT_LOCK_TIMEOUT,
        );
    };
    let config = match config::load() {
        Ok(c) => c,
        Err(m) => return error_reply(&CallError::Config(m), DEFAULT_LOCK_TIMEOUT),
    };
    // init runs on every plugin probe: answer from the config alone, no log file, no pool.
    if call == "init" {
        return Reply::success().capabilities(calls::capabilities(&config));
    }

    // The watchdog first: opening the log file can block too (a hung /var/log).
    start_watchdog(call, config.call_timeout);
    logging::init(config.log.as_deref());
    let span = tracing::info_span!("call", call = %call, pid = std::process::id()).entered();
    tracing::info!(args = %loggable(rest), attach_mode = config.attach, node = %config.node, "called");
    if std::env::var_os("LOOPVOL_TEST_PANIC").is_some_and(|v| v == "1") {
        panic!("LOOPVOL_TEST_PANIC is set");
    }
    let started = Instant::now();
    let reply = match dispatch(&Driver { config: &config }, call, rest) {
        Ok(reply) => reply,
        Err(e) => error_reply(&e, config.lock_timeout),
    };
    tracing::info!(
        status = reply.status,
        message = reply.message.as_deref().unwrap_or(""),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replied"
    );
    drop(span);
    reply
}

/// Answers Failure and exits when the call outlives `limit`. Locks and external tools have their
/// own bounds; this one covers what has none (a syscall on a hung pool filesystem), since kubelet
/// waits on most calls without a timeout. Only the first reply is printed (`reply::emit`).
fn start_watchdog(call: &str, limit: Duration) {
    let call = call.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        tracing::error!(
            call,
            limit_s = limit.as_secs(),
            "call did not finish in time; giving up"
        );
        let code = reply::emit(&Reply::failure(format!(
            "{call} did not finish within {}s (callTimeoutSeconds); is the pool's filesystem \
             hung? The work may be half done: the next call finishes it",
            limit.as_secs()
        )));
        std::process::exit(code);
    });
}

fn dispatch(d: &Driver, call: &str, rest: &[String]) -> Result<Reply, CallError> {
    let attach_mode = d.config.attach;
    let args = |usage| Args::new(call, rest, usage);
    match call {
        "mount" => d.mount(&args("<podVolumeDir> <json>")),
        "unmount" => d.unmount(&args("<podVolumeDir>")),
        "expandfs" => d.expandfs(&args(
            "<json> <devicePath> <deviceMountPath> <newSizeBytes> <oldSizeBytes>",
        )),
        "attach" | "isattached" | "detach" | "waitforattach" | "mountdevice" | "unmountdevice"
            if !attach_mode =>
        {
            Err(CallError::NotSupported(format!(
                "{call} is not used in node mode (attach: false): mount does the whole node-side job"
            )))
        }
        "attach" => d.attach(&args("<json> <nodeName>")),
        "isattached" => d.isattached(&args("<json> <nodeName>")),
        "detach" => d.detach(&args("<volumeName> <nodeName>")),
        "waitforattach" => d.waitforattach(&args("<device> <json>")),
        "mountdevice" => d.mountdevice(&args("<deviceMountPath> <device> <json>")),
        "unmountdevice" => d.unmountdevice(&args("<deviceMountPath>")),
        "getvolumename" => Err(CallError::NotSupported(
            "getvolumename: kubelet's default (the PV or volume name) is the volume name".into(),
        )),
        "expandvolume" => Err(CallError::NotSupported(
            "expandvolume: the image grows in expandfs, on the node".into(),
        )),
        other => Err(CallError::NotSupported(format!(
            "{other:?} is not a call loopvol implements"
        ))),
    }
}

/// The arguments for the log: each plain one as it is; the JSON options, and anything else that
/// could carry them (whatever its position or leading bytes), only by its length. A redacted
/// view is not enough: `mountOptions` values, for one, are secrets under no secret key.
fn loggable(args: &[String]) -> String {
    let shown: Vec<String> = args.iter().map(|a| options::shown_arg(a)).collect();
    format!("[{}]", shown.join(", "))
}
