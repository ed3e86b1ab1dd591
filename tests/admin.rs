//! Running the admin CLI `loopvol` as an operator does, on a test's pool as one node: its exit
//! code, its output, and its JSON answers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The CLI on one pool, as one node.
#[derive(Clone)]
pub struct Admin {
    pub bin: PathBuf,
    pub pool: PathBuf,
    pub node: String,
}

/// What one run of the CLI gave.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// stdout as JSON (the run must have used `--json`).
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

impl Admin {
    /// `bin` (the built `loopvol`) on `pool`, as node `node`.
    pub fn new(bin: impl AsRef<Path>, pool: impl AsRef<Path>, node: &str) -> Admin {
        Admin {
            bin: bin.as_ref().to_owned(),
            pool: pool.as_ref().to_owned(),
            node: node.to_owned(),
        }
    }

    /// The built `loopvol` binary (for tests outside its package).
    pub fn built(pool: impl AsRef<Path>, node: &str) -> Admin {
        Admin::new(crate::binary("loopvol"), pool, node)
    }

    /// Runs `loopvol --pool <pool> --node <node> <args>` (no environment of its own).
    pub fn run(&self, args: &[&str]) -> Ran {
        let out = Command::new(&self.bin)
            .arg("--pool")
            .arg(&self.pool)
            .arg("--node")
            .arg(&self.node)
            .args(args)
            .env_remove("LOOPVOL_POOL")
            .env_remove("LOOPVOL_NODE")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()));
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `loopvol --json <args>`, which must exit `code`; its JSON answer.
    #[track_caller]
    pub fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let ran = self.run(&all);
        assert_eq!(ran.code, code, "loopvol {all:?}: {ran:?}");
        ran.json()
    }

    /// `loopvol --json check`: the kinds and subjects of its findings, sorted, and its exit
    /// code (0 clean, 1 findings).
    #[track_caller]
    pub fn findings(&self) -> (i32, Vec<(String, String)>) {
        let ran = self.run(&["--json", "check"]);
        assert!(matches!(ran.code, 0 | 1), "loopvol check: {ran:?}");
        let v = ran.json();
        assert_eq!(v["clean"], ran.code == 0, "{v}");
        let mut found: Vec<(String, String)> = v["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .map(|f| {
                for key in ["why", "action"] {
                    assert!(
                        f[key].as_str().is_some_and(|s| !s.is_empty()),
                        "a finding without {key}: {f}"
                    );
                }
                (
                    f["kind"].as_str().unwrap().to_owned(),
                    f["subject"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        found.sort();
        (ran.code, found)
    }
}

/// `[]` as JSON, for comparing with an empty list in an answer.
pub fn empty_list() -> Value {
    Value::Array(Vec::new())
}
