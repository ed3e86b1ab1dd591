//! The driver's settings: an optional `loopvol.json` beside the binary, then environment
//! overrides. Loaded on every call, so it must stay cheap (one small file read at most).
//!
//! ```json
//! {"attach": false, "pool": "/var/lib/loopvol/pool", "log": "/var/log/loopvol-flexvolume.log",
//!  "node": null, "lockTimeoutSeconds": 60, "callTimeoutSeconds": null}
//! ```
//! Every key is optional; `null` means the default. Unknown keys are refused (a misspelt
//! `"atach": true` must not silently leave the driver in the other mode): every call, `init`
//! included, then answers `Failure` naming the key, so kubelet does not load a misconfigured driver.
//! `"log": ""` (or `LOOPVOL_LOG=`) logs nowhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const CONFIG_FILE: &str = "loopvol.json";
pub const DEFAULT_POOL: &str = "/var/lib/loopvol/pool";
pub const DEFAULT_LOG: &str = "/var/log/loopvol-flexvolume.log";
pub const DEFAULT_LOCK_TIMEOUT_SECS: u64 = 60;
/// Longest lock wait a config may ask for: kubelet waits on us without a timeout.
pub const MAX_LOCK_TIMEOUT_SECS: u64 = 3600;
/// The default bound on a whole call beyond its lock wait: one external tool's bound (the
/// backend kills mkfs, resize, blkid after 600 s) and a margin.
pub const DEFAULT_CALL_MARGIN_SECS: u64 = 660;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    attach: Option<bool>,
    pool: Option<String>,
    log: Option<String>,
    node: Option<String>,
    lock_timeout_seconds: Option<u64>,
    call_timeout_seconds: Option<u64>,
}

/// The settings in force for this call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Attach mode (shared pool, the attach/detach family) instead of node mode.
    pub attach: bool,
    pub pool: PathBuf,
    /// Where logs go; `None`: nowhere.
    pub log: Option<PathBuf>,
    /// This node's name (host name, lower-cased as kubelet does, unless configured).
    pub node: loopvol::NodeName,
    pub lock_timeout: Duration,
    /// How long a call may take in all before it answers Failure anyway (a hung pool filesystem
    /// must not hang kubelet, which waits without a timeout).
    pub call_timeout: Duration,
}

/// Loads the config beside the running binary, then applies the environment.
pub fn load() -> Result<Config, String> {
    let file = match binary_dir() {
        Some(dir) => read_file(&dir.join(CONFIG_FILE))?,
        None => ConfigFile::default(),
    };
    resolve(file, |k| std::env::var(k).ok())
}

/// The driver's directory: the one kubelet and the controller-manager ran it from. They exec the
/// driver by its full path in the plugin dir, which is argv[0]; that is where the installer puts
/// the config, even when the driver there is a symlink to a binary elsewhere (/proc/self/exe
/// would name the symlink's target). A relative argv[0] (run by hand): /proc/self/exe.
fn binary_dir() -> Option<PathBuf> {
    let exe = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::current_exe().ok())?;
    exe.parent().map(Path::to_path_buf)
}

fn read_file(path: &Path) -> Result<ConfigFile, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(format!("cannot read config file {}: {e}", path.display())),
    };
    serde_json::from_slice(&text)
        .map_err(|e| format!("config file {} is invalid: {e}", path.display()))
}

fn resolve(file: ConfigFile, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
    let attach = match env("LOOPVOL_ATTACH") {
        Some(v) => match v.as_str() {
            "true" => true,
            "false" => false,
            other => {
                return Err(format!(
                    "LOOPVOL_ATTACH must be \"true\" or \"false\", not {other:?}"
                ))
            }
        },
        None => file.attach.unwrap_or(false),
    };
    let pool = env("LOOPVOL_POOL")
        .or(file.pool)
        .unwrap_or_else(|| DEFAULT_POOL.to_owned());
    if pool.is_empty() {
        return Err("the pool directory is empty (config \"pool\" or LOOPVOL_POOL)".into());
    }
    let log = env("LOOPVOL_LOG")
        .or(file.log)
        .unwrap_or_else(|| DEFAULT_LOG.to_owned());
    // The one node-name rule of every front end (the pool makes any valid name a safe path).
    let node = match env("LOOPVOL_NODE").or(file.node) {
        Some(n) if !n.is_empty() => loopvol::NodeName::parse("node name", n)
            .map_err(|e| format!("{e} (config \"node\" or LOOPVOL_NODE)"))?,
        _ => loopvol::default_node_name()
            .ok_or("the host name is empty; set LOOPVOL_NODE or \"node\" in the config")?,
    };
    let secs = file
        .lock_timeout_seconds
        .unwrap_or(DEFAULT_LOCK_TIMEOUT_SECS);
    if secs > MAX_LOCK_TIMEOUT_SECS {
        return Err(format!(
            "lockTimeoutSeconds {secs} is too long (at most {MAX_LOCK_TIMEOUT_SECS}): kubelet \
             waits for the driver without a timeout"
        ));
    }
    let call_secs = file
        .call_timeout_seconds
        .unwrap_or(secs + DEFAULT_CALL_MARGIN_SECS);
    if call_secs <= secs {
        return Err(format!(
            "callTimeoutSeconds {call_secs} must be longer than lockTimeoutSeconds {secs}"
        ));
    }
    Ok(Config {
        attach,
        pool: PathBuf::from(pool),
        log: (!log.is_empty()).then(|| PathBuf::from(log)),
        node,
        lock_timeout: Duration::from_secs(secs),
        call_timeout: Duration::from_secs(call_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ConfigFile, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults() {
        let c = resolve(ConfigFile::default(), |k| {
            (k == "LOOPVOL_NODE").then(|| "n1".to_owned())
        })
        .unwrap();
        assert!(!c.attach);
        assert_eq!(c.pool, Path::new(DEFAULT_POOL));
        assert_eq!(c.log.as_deref(), Some(Path::new(DEFAULT_LOG)));
        assert_eq!(c.node.as_str(), "n1");
        assert_eq!(c.lock_timeout, Duration::from_secs(60));
        assert_eq!(
            c.call_timeout,
            Duration::from_secs(60 + DEFAULT_CALL_MARGIN_SECS)
        );
        // No node configured: the host name.
        assert!(!resolve(ConfigFile::default(), no_env)
            .unwrap()
            .node
            .as_str()
            .is_empty());
    }

    #[test]
    fn file_then_env() {
        let f = parse(
            r#"{"attach": true, "pool": "/p", "log": "", "node": null, "lockTimeoutSeconds": 5}"#,
        )
        .unwrap();
        let c = resolve(f, no_env).unwrap();
        assert!(c.attach);
        assert_eq!(c.pool, Path::new("/p"));
        assert_eq!(c.log, None);
        assert_eq!(c.lock_timeout, Duration::from_secs(5));

        let f = parse(r#"{"attach": true, "pool": "/p"}"#).unwrap();
        let env = |k: &str| match k {
            "LOOPVOL_ATTACH" => Some("false".to_owned()),
            "LOOPVOL_POOL" => Some("/q".to_owned()),
            "LOOPVOL_LOG" => Some("/l".to_owned()),
            "LOOPVOL_NODE" => Some("node-b".to_owned()),
            _ => None,
        };
        let c = resolve(f, env).unwrap();
        assert!(!c.attach);
        assert_eq!(c.pool, Path::new("/q"));
        assert_eq!(c.log.as_deref(), Some(Path::new("/l")));
        assert_eq!(c.node.as_str(), "node-b");
    }

    #[test]
    fn refusals_are_clear() {
        let err = parse(r#"{"atach": true}"#).unwrap_err();
        assert!(err.contains("unknown field `atach`"), "{err}");
        assert!(parse(r#"{"attach": "yes"}"#).is_err());
        assert!(parse("[]").is_err());
        let err = resolve(ConfigFile::default(), |k| {
            (k == "LOOPVOL_ATTACH").then(|| "1".to_owned())
        })
        .unwrap_err();
        assert!(err.contains("LOOPVOL_ATTACH"), "{err}");
        let err = resolve(parse(r#"{"lockTimeoutSeconds": 99999}"#).unwrap(), no_env).unwrap_err();
        assert!(err.contains("lockTimeoutSeconds"), "{err}");
        // The one node-name rule: any name up to 256 bytes without control characters (the pool
        // hashes what is not a plain path component).
        let node = |name: &str| {
            let name = name.to_owned();
            resolve(ConfigFile::default(), move |k| {
                (k == "LOOPVOL_NODE").then(|| name.clone())
            })
        };
        for bad in ["a\nb", &"n".repeat(257)] {
            let err = node(bad).unwrap_err();
            assert!(err.contains("invalid node name"), "{err}");
        }
        assert_eq!(node("../../etc").unwrap().node.as_str(), "../../etc");
        assert_eq!(node("a:b").unwrap().node.as_str(), "a:b");
        let err = resolve(ConfigFile::default(), |k| {
            (k == "LOOPVOL_POOL").then(String::new)
        })
        .unwrap_err();
        assert!(err.contains("pool"), "{err}");
    }
}
