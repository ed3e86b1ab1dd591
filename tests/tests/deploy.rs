//! The Kubernetes manifests against the real binaries (issue 5, "Checks in CI"). deploy/validate.sh
//! checks the rendered manifests against the API schema and a written-down contract; this test
//! checks them against what the built binaries actually accept and report:
//! - every flag a manifest passes to `loopvol-csi` exists in `loopvol-csi --help`, takes a value
//!   exactly when the help says so, has one of the possible values, and the binary's own parser
//!   accepts the whole command line;
//! - the CSI socket: the driver's `--endpoint`, each sidecar's `--csi-address` (through each
//!   container's volumeMounts to the pod's volumes) and the registrar's
//!   `--kubelet-registration-path` name the same socket, in `<kubeletDir>/plugins/<driver name>/`;
//! - the driver name is the same in the CSIDriver, the StorageClasses, the VolumeSnapshotClass,
//!   the shared-pool patch's target, every `--driver-name`, the socket directory, and the
//!   defaults of `loopvol-csi --help` and `loopvol-migrate --help`;
//! - the FlexVolume installer puts the real binary where kubelet looks for the example PV's
//!   driver (`loopvol/loopvol` → `loopvol~loopvol/loopvol`), and the installed copy answers `init`.
//!
//! The raw files under deploy/kubernetes are assembled per overlay as kustomize would (resources,
//! components, strategic-merge patches by name, and the settings replacements), so each overlay's
//! settings.yaml is in force, and once more with other settings. No kustomize, no root, no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use loopvol_e2e::{binary, run};
use serde::Deserialize;
use serde_json::{json, Value};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .canonicalize()
        .unwrap()
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
// Assembling an overlay from the raw files, as kustomize does
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Build {
    objects: Vec<Value>,
    /// Targets of JSON 6902 patches (kind, name): they must name existing objects.
    patch_targets: Vec<(String, String)>,
    /// Every file read.
    files: BTreeSet<PathBuf>,
}

/// Adds the kustomization (or component) in `dir` to `b`: its resources, then its components in
/// order, then its patches and replacements (on everything accumulated so far).
fn build(dir: &Path, b: &mut Build, settings: Option<&Value>) {
    let kfile = dir.join("kustomization.yaml");
    let k = load_docs(&kfile).remove(0);
    b.files.insert(kfile);
    for r in list(&k, "/resources") {
        let path = dir.join(r.as_str().unwrap()).canonicalize().unwrap();
        if path.is_dir() {
            build(&path, b, settings);
        } else {
            let mut docs = load_docs(&path);
            if let Some(replacement) = settings {
                for d in &mut docs {
                    if s(d, "/kind") == "ConfigMap" && s(d, "/metadata/name") == "loopvol-settings"
                    {
                        d["data"] = replacement.clone();
                    }
                }
            }
            b.objects.extend(docs);
            b.files.insert(path);
        }
    }
    for c in list(&k, "/components") {
        build(
            &dir.join(c.as_str().unwrap()).canonicalize().unwrap(),
            b,
            settings,
        );
    }
    for p in list(&k, "/patches") {
        if let Some(path) = p.get("path").and_then(Value::as_str) {
            let path = dir.join(path).canonicalize().unwrap();
            for patch in load_docs(&path) {
                let target = b
                    .objects
                    .iter_mut()
                    .find(|o| ident(o) == ident(&patch))
                    .unwrap_or_else(|| {
                        panic!("{}: patches missing {}", path.display(), ident(&patch))
                    });
                merge(target, &patch);
            }
            b.files.insert(path);
        } else {
            let kind = s(p, "/target/kind").to_owned();
            let name = s(p, "/target/name").to_owned();
            b.patch_targets.push((kind, name));
        }
    }
    for r in list(&k, "/replacements") {
        replace(&mut b.objects, r);
    }
}

/// A strategic merge patch as kustomize applies one to built-in objects: maps merge, lists of
/// named items (containers, volumes, env) merge by name (`$patch: delete` removes one), any other
/// value is replaced.
fn merge(base: &mut Value, patch: &Value) {
    let named = |l: &[Value]| l.iter().all(|x| x.get("name").is_some());
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, pv) in p {
                match b.get_mut(k) {
                    Some(bv) => merge(bv, pv),
                    None => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p)) if named(b) && named(p) => {
            for item in p {
                let pos = b.iter().position(|x| x["name"] == item["name"]);
                match (pos, item.get("$patch").and_then(Value::as_str)) {
                    (Some(i), Some("delete")) => {
                        b.remove(i);
                    }
                    (Some(i), _) => merge(&mut b[i], item),
                    (None, _) => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// `a.b.[name=x].c` → ["a", "b", "[name=x]", "c"] (dots inside brackets belong to the value).
fn field_path(path: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            '.' if depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().unwrap().push(c);
    }
    out
}

fn at_path<'a>(mut v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    for seg in field_path(path) {
        v = match seg.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
            Some(sel) => {
                let (k, want) = sel.split_once('=')?;
                v.as_array_mut()?
                    .iter_mut()
                    .find(|x| s(x, &format!("/{k}")) == want)?
            }
            None => v.get_mut(seg.as_str())?,
        };
    }
    Some(v)
}

/// A kustomize replacement: the source value into every target field (with `delimiter`/`index`,
/// into that part of the target's value). A field that does not exist is an error, as in kustomize.
fn replace(objects: &mut [Value], r: &Value) {
    let source = objects
        .iter_mut()
        .find(|o| {
            s(o, "/kind") == s(r, "/source/kind") && s(o, "/metadata/name") == s(r, "/source/name")
        })
        .unwrap_or_else(|| panic!("replacement source missing: {r}"));
    let value = at_path(source, s(r, "/source/fieldPath"))
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("replacement source field missing: {r}"))
        .to_owned();
    for t in list(r, "/targets") {
        for o in objects.iter_mut() {
            if s(o, "/kind") != s(t, "/select/kind")
                || s(o, "/metadata/name") != s(t, "/select/name")
            {
                continue;
            }
            let name = ident(o);
            for fp in list(t, "/fieldPaths") {
                let fp = fp.as_str().unwrap();
                let field = at_path(o, fp).unwrap_or_else(|| panic!("{name}: no field {fp}"));
                *field = match t.pointer("/options/delimiter").and_then(Value::as_str) {
                    Some(delim) => {
                        let index = t
                            .pointer("/options/index")
                            .and_then(Value::as_u64)
                            .unwrap_or(0) as usize;
                        let mut parts: Vec<String> = field
                            .as_str()
                            .unwrap()
                            .split(delim)
                            .map(str::to_owned)
                            .collect();
                        parts[index] = value.clone();
                        json!(parts.join(delim))
                    }
                    None => json!(value),
                };
            }
        }
    }
}

/// An overlay's objects, with its own settings or `settings` instead.
fn overlay(name: &str, settings: Option<&Value>) -> Build {
    let mut b = Build::default();
    build(
        &deploy_dir().join("kubernetes/overlays").join(name),
        &mut b,
        settings,
    );
    b
}

fn settings_of(b: &Build) -> &Value {
    &b.objects
        .iter()
        .find(|o| s(o, "/kind") == "ConfigMap" && s(o, "/metadata/name") == "loopvol-settings")
        .expect("settings ConfigMap")["data"]
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

fn workloads(b: &Build) -> impl Iterator<Item = (&Value, &Value)> {
    b.objects
        .iter()
        .filter(|o| matches!(s(o, "/kind"), "DaemonSet" | "Deployment" | "StatefulSet"))
        .map(|o| (o, &o["spec"]["template"]["spec"]))
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// Every loopvol-csi command line in `b` against `loopvol-csi --help` and the binary's parser.
/// Returns how many containers run loopvol-csi.
fn check_csi_flags(label: &str, b: &Build, help: &BTreeMap<String, Flag>, driver: &str) -> usize {
    let mut found = 0;
    for (o, pod) in workloads(b) {
        for c in list(pod, "/containers")
            .iter()
            .chain(list(pod, "/initContainers"))
        {
            let Some(argv) = csi_argv(c) else { continue };
            found += 1;
            let what = format!("{label}: {} container {}", ident(o), s(c, "/name"));
            let mut args = argv[1..].iter();
            while let Some(a) = args.next() {
                let (name, inline) = match a.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_owned())),
                    None => (a.as_str(), None),
                };
                let flag = help.get(name).unwrap_or_else(|| {
                    panic!("{what}: {a:?} is not an option in `loopvol-csi --help`")
                });
                let value = match (flag.takes_value, inline) {
                    (true, Some(v)) => v,
                    (true, None) => args
                        .next()
                        .unwrap_or_else(|| panic!("{what}: {name} needs a value"))
                        .clone(),
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
            let expanded: Vec<String> = argv[1..].iter().map(|a| expand(c, a, "node-1")).collect();
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
fn check_socket(label: &str, b: &Build, help: &BTreeMap<String, Flag>, driver: &str) -> usize {
    let kubelet_dir = s(settings_of(b), "/kubeletDir")
        .trim_end_matches('/')
        .to_owned();
    let mut registrars = 0;
    for (o, pod) in workloads(b) {
        let containers = list(pod, "/containers");
        let Some(lv) = containers.iter().find(|c| csi_argv(c).is_some()) else {
            continue;
        };
        let what = format!("{label}: {}", ident(o));
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

/// The driver name in the CSI objects of `b`.
fn check_driver_names(label: &str, b: &Build, driver: &str) {
    fn of<'a>(b: &'a Build, kind: &'a str) -> impl Iterator<Item = &'a Value> {
        b.objects.iter().filter(move |o| s(o, "/kind") == kind)
    }
    let drivers: Vec<&str> = of(b, "CSIDriver").map(|o| s(o, "/metadata/name")).collect();
    assert_eq!(drivers, [driver], "{label}: CSIDriver");
    let classes: Vec<&Value> = of(b, "StorageClass").collect();
    assert!(!classes.is_empty(), "{label}: no StorageClass");
    for sc in classes {
        assert_eq!(s(sc, "/provisioner"), driver, "{label}: {}", ident(sc));
    }
    let snapshot_classes: Vec<&Value> = of(b, "VolumeSnapshotClass").collect();
    assert!(
        !snapshot_classes.is_empty(),
        "{label}: no VolumeSnapshotClass"
    );
    for vsc in snapshot_classes {
        assert_eq!(s(vsc, "/driver"), driver, "{label}: {}", ident(vsc));
    }
    for (kind, name) in &b.patch_targets {
        assert!(
            b.objects
                .iter()
                .any(|o| s(o, "/kind") == kind && s(o, "/metadata/name") == name),
            "{label}: a patch targets {kind}/{name}, which does not exist"
        );
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

    // The README's MicroK8s values: other settings must keep everything in agreement.
    let custom = json!({
        "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
        "poolDir": "/var/snap/microk8s/common/loopvol-pool",
    });
    let mut files = BTreeSet::new();
    let mut csi_containers = 0;
    for mode in ["csi-local", "csi-shared"] {
        for settings in [None, Some(&custom)] {
            let label = format!(
                "{mode} ({} settings)",
                if settings.is_some() {
                    "custom"
                } else {
                    "shipped"
                }
            );
            let b = overlay(mode, settings);
            if let Some(custom) = settings {
                assert_eq!(settings_of(&b), custom);
            }
            let n = check_csi_flags(&label, &b, &help, &driver);
            assert!(n >= 1, "{label}: no container runs loopvol-csi");
            csi_containers += n;
            assert_eq!(
                check_socket(&label, &b, &help, &driver),
                1,
                "{label}: one registrar"
            );
            check_driver_names(&label, &b, &driver);
            files.extend(b.files);
        }
    }
    // node (local), node and controller (shared): each twice.
    assert_eq!(csi_containers, 6);

    let flex = overlay("flexvolume", None);
    files.extend(flex.files);
    // Every manifest is part of some overlay, so none escapes these checks.
    let mut all = BTreeSet::new();
    let mut dirs = vec![deploy_dir().join("kubernetes")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                all.insert(p);
            }
        }
    }
    let unused: Vec<_> = all.difference(&files).collect();
    assert!(unused.is_empty(), "manifests no overlay uses: {unused:?}");
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

    // The installer, as the DaemonSet runs it (its settings from the shipped overlay), into a
    // scratch plugin dir, with the real binary.
    let b = overlay("flexvolume", None);
    let (_, pod) = workloads(&b).next().expect("installer DaemonSet");
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
    assert_eq!(code, 0, "install.sh: {out}{err}");
    let installed = plugin_dir.join(&relative);
    assert_eq!(
        std::fs::read(&installed).unwrap_or_else(|e| panic!("{}: {e}", installed.display())),
        std::fs::read(binary("loopvol-flexvolume")).unwrap(),
        "the installed driver is not the built binary"
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
    assert_eq!(code, 0, "{out}{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["status"], "Success", "{reply}");
    let want_attach = list(c, "/env")
        .iter()
        .find(|e| e["name"] == "LOOPVOL_ATTACH")
        .map(|e| s(e, "/value") == "true")
        .expect("installer sets LOOPVOL_ATTACH");
    assert_eq!(reply["capabilities"]["attach"], want_attach, "{reply}");
}
