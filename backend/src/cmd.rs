//! The one way the backend runs external tools (mkfs, resize, blkid): no shell, no inherited
//! stdio (the FlexVolume binary's stdout belongs to kubelet), a time bound, and failures that carry
//! the exit status and stderr.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Long enough for mkfs of a very large sparse image or an offline fsck; short enough that no
/// caller hangs forever (kubelet waits on FlexVolume calls without a timeout).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args…` and returns its output whatever the exit status.
pub(crate) fn run_raw(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let started = Instant::now();
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C");
    crate::sys::kill_child_with_parent(&mut command);
    let child = command.spawn().map_err(|e| Error::Command {
        program: program.to_owned(),
        status: "not started".to_owned(),
        stderr: if e.kind() == std::io::ErrorKind::NotFound {
            format!("{program} is not installed (not found in PATH)")
        } else {
            e.to_string()
        },
    })?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(|e| Error::Command {
            program: program.to_owned(),
            status: "wait failed".to_owned(),
            stderr: e.to_string(),
        })?,
        Err(_) => {
            // The waiting thread still owns the child and reaps it once it dies.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(Error::Command {
                program: program.to_owned(),
                status: format!("killed after {}s", timeout.as_secs()),
                stderr: "timed out".to_owned(),
            });
        }
    };
    tracing::debug!(program, ?args, status = %output.status, elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "ran");
    Ok(Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `program args…`; a non-zero exit is an error holding the status and stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = run_raw(program, args, DEFAULT_TIMEOUT)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(failure(program, &out))
    }
}

pub(crate) fn failure(program: &str, out: &Output) -> Error {
    let stderr = if out.stderr.trim().is_empty() {
        out.stdout.trim()
    } else {
        out.stderr.trim()
    };
    Error::Command {
        program: program.to_owned(),
        status: out.status.to_string(),
        stderr: stderr.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keeps_status_and_stderr() {
        let err = run("sh", &["-c", "echo oops >&2; exit 3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("oops"), "{err}");
    }

    #[test]
    fn missing_program_is_named() {
        let err = run("loopvol-no-such-tool", &[]).unwrap_err().to_string();
        assert!(err.contains("not installed"), "{err}");
    }

    /// Helper for `tool_dies_with_a_killed_driver`, run only in the child process it starts
    /// (ignored otherwise, so it never counts as a passed test).
    #[test]
    #[ignore = "helper of tool_dies_with_a_killed_driver"]
    fn run_a_long_tool() {
        let Ok(pid_file) = std::env::var("LOOPVOL_TEST_PID_FILE") else {
            return;
        };
        let script =
            format!("echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 60");
        let _ = run_raw("sh", &["-c", &script], Duration::from_secs(60));
    }

    #[test]
    fn tool_dies_with_a_killed_driver() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let mut driver = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cmd::tests::run_a_long_tool",
                "--ignored",
                "--test-threads=1",
            ])
            .env("LOOPVOL_TEST_PID_FILE", &pid_file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !pid_file.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the tool never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let tool: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        driver.kill().unwrap(); // SIGKILL: no destructor, no cleanup code runs
        driver.wait().unwrap();
        let alive = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        };
        while alive(tool) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "tool {tool} outlived the killed driver"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn timeout_kills() {
        let started = Instant::now();
        let err = run_raw("sleep", &["30"], Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(err.to_string().contains("timed out"));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
