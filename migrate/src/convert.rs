//! FlexVolume PV → CSI PV, as pure functions on documents (`serde_json::Value`): no I/O, no
//! cluster access. `main.rs` reads the input and prints what [`convert`] returns.
//!
//! The rules (each has a test below):
//! - Only `PersistentVolume`s with `spec.flexVolume.driver: loopvol/loopvol` are converted; any
//!   other PV is refused, other kinds (a claim or pod in the same file) are skipped with a note.
//! - Same name, labels and annotations (less kubectl's last-applied copy of the old spec); the
//!   server-set metadata (uid, resourceVersion, finalizers, ...) and `status` are dropped.
//! - The spec is kept (capacity, accessModes, claimRef, volumeMode, storageClassName,
//!   persistentVolumeReclaimPolicy, mountOptions, nodeAffinity, ...) with `flexVolume` replaced by
//!   `csi: {driver, volumeHandle, fsType, readOnly}`.
//! - `volumeHandle` is the volume ID exactly as the FlexVolume driver picks it: the driver's own
//!   rule ([`loopvol_flexvolume::options`]) applied to what kubelet sends it for this PV (the
//!   `volumeID` option, else `kubernetes.io/pvOrVolumeName`: the PV name).
//! - `fsType`: `flexVolume.fsType`, else the `kubernetes.io/fsType` option, else ext4.
//! - The `mountOptions` option (comma-separated) joins `spec.mountOptions`.
//! - `claimRef` keeps namespace, name and uid: the claim still exists and names this PV in its
//!   `spec.volumeName`; while the PV is gone the claim is Lost, and the PV controller binds it
//!   again to a PV of that name whose claimRef carries the claim's uid (or has no claimRef at all,
//!   which would let any claim take it). Only the stale `resourceVersion` goes.
//! - Node-local pools (`Pool::Node`): node affinity on the CSI driver's topology key, added to
//!   every term of an existing `nodeAffinity` (terms are ORed, expressions ANDed).

use std::fmt;

use loopvol::validate::{self, FsType};
use loopvol_flexvolume::options::{
    Options, FS_TYPE, MOUNT_OPTIONS, PV_OR_VOLUME_NAME, SIZE, VOLUME_ID,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub use loopvol::names::{CSI_DRIVER as DEFAULT_CSI_DRIVER, FLEX_DRIVER, TOPOLOGY_KEY};
/// What the FlexVolume driver formats a new volume with when no type is given.
pub const DEFAULT_FS: FsType = FsType::Ext4;

/// The FlexVolume options this command understands; others are reported and not carried over.
const KNOWN_OPTIONS: [&str; 4] = [VOLUME_ID, SIZE, MOUNT_OPTIONS, FS_TYPE];
/// kubectl's copy of the applied manifest: it would describe the old FlexVolume spec.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Where the volumes' pool is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pool {
    /// The pool of this node (node-local pools): the PVs get node affinity to it.
    Node(String),
    /// A pool on a filesystem every node mounts: any node may use the volumes.
    Shared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The CSI driver name (the CSIDriver object, loopvol-csi `--driver-name`).
    pub driver_name: String,
    pub pool: Pool,
}

/// Why the input cannot be converted; the text says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The converted PVs, and notes for the operator (skipped objects, options not carried over).
#[derive(Debug, Default, PartialEq)]
pub struct Converted {
    pub pvs: Vec<Value>,
    pub notes: Vec<String>,
}

/// The documents of a YAML or JSON input (JSON is YAML): several `---`-separated documents, and
/// the items of a `kind: List` (what `kubectl get pv a b -o yaml` prints), in order. Empty
/// documents are skipped.
pub fn read_documents(text: &str) -> Result<Vec<Value>, Error> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .map_err(|e| Error(format!("document {}: not valid YAML or JSON: {e}", i + 1)))?;
        match value {
            Value::Null => {}
            Value::Object(ref o) if is_list(o) => {
                let Some(Value::Array(items)) = o.get("items") else {
                    return Err(Error(format!(
                        "document {}: a {} without an items array",
                        i + 1,
                        str_at(&value, "/kind")
                    )));
                };
                out.extend(items.iter().cloned());
            }
            Value::Object(_) => out.push(value),
            other => {
                return Err(Error(format!(
                    "document {}: expected a Kubernetes object, found {}",
                    i + 1,
                    kind_of(&other)
                )))
            }
        }
    }
    Ok(out)
}

fn is_list(o: &Map<String, Value>) -> bool {
    o.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"))
        && o.contains_key("items")
}

/// Converts every loopvol FlexVolume PV in `docs`. Refuses the whole input on the first PV that
/// cannot be converted (a partial output would be applied by mistake).
pub fn convert(docs: &[Value], settings: &Settings) -> Result<Converted, Error> {
    check_driver_name(&settings.driver_name)?;
    if let Pool::Node(node) = &settings.pool {
        check_node(node)?;
    }
    let mut out = Converted::default();
    for doc in docs {
        let kind = str_at(doc, "/kind");
        if kind == "PersistentVolume" {
            out.pvs.push(convert_pv(doc, settings, &mut out.notes)?);
        } else {
            out.notes.push(format!(
                "skipped {} (not a PersistentVolume; it is not changed by the migration)",
                describe(doc)
            ));
        }
    }
    if out.pvs.is_empty() {
        return Err(Error(
            "no PersistentVolume in the input: give the FlexVolume PV as `kubectl get pv NAME -o yaml` prints it"
                .into(),
        ));
    }
    Ok(out)
}

/// One PV. `notes` collects what the operator should know but does not stop the conversion.
pub fn convert_pv(
    pv: &Value,
    settings: &Settings,
    notes: &mut Vec<String>,
) -> Result<Value, Error> {
    let name = str_at(pv, "/metadata/name");
    if name.is_empty() {
        return Err(Error("a PersistentVolume without metadata.name".into()));
    }
    let refuse = |why: String| Error(format!("PersistentVolume {name}: {why}"));
    let api = str_at(pv, "/apiVersion");
    if api != "v1" {
        return Err(refuse(format!("apiVersion {api:?}, expected v1")));
    }
    let spec = pv
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| refuse("has no spec".into()))?;
    let flex = match spec.get("flexVolume") {
        Some(Value::Object(flex)) => flex,
        _ => {
            return Err(refuse(format!(
            "not a FlexVolume PV ({}); only PVs with flexVolume.driver {FLEX_DRIVER} are migrated",
            volume_source(spec)
        )))
        }
    };
    let driver = flex.get("driver").and_then(Value::as_str).unwrap_or("");
    if driver != FLEX_DRIVER {
        return Err(refuse(format!(
            "its FlexVolume driver is {driver:?}, not {FLEX_DRIVER}: its data is not in a loopvol pool"
        )));
    }
    if let Some(secret) = flex.get("secretRef").filter(|s| !s.is_null()) {
        return Err(refuse(format!(
            "flexVolume.secretRef names the secret {:?}, but loopvol never reads secrets (the \
             FlexVolume driver ignores them and loopvol-csi takes none), so the CSI PV has no place \
             for it; remove secretRef from the input, e.g. `kubectl get pv {name} -o json | jq \
             'del(.spec.flexVolume.secretRef)' | loopvol-migrate ...`, and run again",
            secret.get("name").and_then(Value::as_str).unwrap_or("")
        )));
    }
    if spec.get("volumeMode").and_then(Value::as_str) == Some("Block") {
        return Err(refuse(
            "volumeMode Block: FlexVolume serves only filesystems, so this PV never worked as it is; \
             fix the input (volumeMode Filesystem) if the volume holds a filesystem"
                .into(),
        ));
    }

    let read_only = match flex.get("readOnly") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(refuse(format!(
                "flexVolume.readOnly must be true or false, not {other}"
            )))
        }
    };
    let options = options(flex).map_err(refuse)?;
    // The driver's rule on what kubelet sent it for this PV: the same volume, by construction.
    let sent = options.with_kubelet_keys(
        name,
        flex.get("fsType").and_then(Value::as_str).unwrap_or(""),
        read_only,
    );
    let volume_id = sent.volume_id().map_err(|e| {
        let from = match sent.volume_id_key() {
            Some(VOLUME_ID) => "options.volumeID",
            _ if options.get(PV_OR_VOLUME_NAME).is_some() => {
                "option kubernetes.io/pvOrVolumeName, as options.volumeID is not set"
            }
            _ => "the PV name, as options.volumeID is not set",
        };
        refuse(format!("the volume ID comes from {from}: {e}"))
    })?;

    let fs_type = fs_type(flex, &options).map_err(refuse)?;
    let mount_options = mount_options(spec, &options).map_err(refuse)?;
    for key in options.keys() {
        if !KNOWN_OPTIONS.contains(&key) {
            notes.push(format!(
                "PersistentVolume {name}: option {key:?} is not a loopvol option and is not carried over"
            ));
        }
    }

    let mut new_spec = spec.clone();
    new_spec.remove("flexVolume");
    if let Some(claim) = spec.get("claimRef").and_then(Value::as_object) {
        let claim = claim_ref(claim);
        if !claim.contains_key("uid") {
            notes.push(format!(
                "PersistentVolume {name}: claimRef names {}/{} without a uid; a claim that was \
                 bound to the old PV rebinds only to a PV whose claimRef has its uid: convert the \
                 live PV (`kubectl get pv {name} -o yaml`), which has it",
                claim.get("namespace").and_then(Value::as_str).unwrap_or(""),
                claim.get("name").and_then(Value::as_str).unwrap_or("")
            ));
        }
        new_spec.insert("claimRef".into(), Value::Object(claim));
    }
    if mount_options.is_empty() {
        new_spec.remove("mountOptions");
    } else {
        new_spec.insert("mountOptions".into(), json!(mount_options));
    }
    if let Pool::Node(node) = &settings.pool {
        let affinity = node_affinity(spec.get("nodeAffinity"), node).map_err(refuse)?;
        new_spec.insert("nodeAffinity".into(), affinity);
    }
    new_spec.insert(
        "csi".into(),
        json!({
            "driver": settings.driver_name,
            "volumeHandle": volume_id,
            "fsType": fs_type.as_str(),
            "readOnly": read_only,
        }),
    );

    Ok(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": metadata(pv, name),
        "spec": new_spec,
    }))
}

/// `flexVolume.options`, read as the FlexVolume driver reads its options argument.
fn options(flex: &Map<String, Value>) -> Result<Options, String> {
    match flex.get("options") {
        None | Some(Value::Null) => Ok(Options::from_map(&Map::new()).expect("no options")),
        Some(Value::Object(options)) => Options::from_map(options).map_err(|e| e.to_string()),
        Some(other) => Err(format!(
            "flexVolume.options must be a map, not {}",
            kind_of(other)
        )),
    }
}

/// The type the volume was formatted with, as far as the PV says: the field or the option (an
/// empty option falls back to the field, not to the driver's default, so that a PV that always
/// named its type keeps it).
fn fs_type(flex: &Map<String, Value>, options: &Options) -> Result<FsType, String> {
    let field = flex
        .get("fsType")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let option = options.get(FS_TYPE).filter(|s| !s.is_empty());
    let chosen = match (field, option) {
        (Some(f), Some(o)) if f != o => {
            return Err(format!(
                "flexVolume.fsType {f:?} and option {FS_TYPE} {o:?} disagree; keep the one the \
                 volume was formatted with"
            ))
        }
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => return Ok(DEFAULT_FS),
    };
    chosen.parse().map_err(|e: loopvol::Error| e.to_string())
}

/// `spec.mountOptions` followed by the `mountOptions` option's entries, without repeats.
fn mount_options(spec: &Map<String, Value>, options: &Options) -> Result<Vec<String>, String> {
    let mut all: Vec<String> = Vec::new();
    match spec.get("mountOptions") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let s = item
                    .as_str()
                    .ok_or_else(|| format!("spec.mountOptions holds {item}, not a string"))?;
                all.push(s.to_owned());
            }
        }
        Some(other) => return Err(format!("spec.mountOptions must be a list, not {other}")),
    }
    all.extend(
        options
            .mount_options()
            .map_err(|e| format!("option {MOUNT_OPTIONS}: {e}"))?,
    );
    let mut unique: Vec<String> = Vec::new();
    for o in all {
        if !unique.contains(&o) {
            unique.push(o);
        }
    }
    validate::check_mount_options(&unique).map_err(|e| e.to_string())?;
    Ok(unique)
}

/// The claim reference without its stale resourceVersion (and without an empty uid).
fn claim_ref(claim: &Map<String, Value>) -> Map<String, Value> {
    let mut out = claim.clone();
    out.remove("resourceVersion");
    if out
        .get("uid")
        .and_then(Value::as_str)
        .is_some_and(str::is_empty)
    {
        out.remove("uid");
    }
    out
}

/// `existing` nodeAffinity with `TOPOLOGY_KEY In [node]` added to every term.
fn node_affinity(existing: Option<&Value>, node: &str) -> Result<Value, String> {
    let ours = json!({"key": TOPOLOGY_KEY, "operator": "In", "values": [node]});
    let mut affinity = match existing {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => return Err(format!("spec.nodeAffinity must be a map, not {other}")),
    };
    let terms = affinity
        .as_object_mut()
        .expect("an object")
        .entry("required")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("spec.nodeAffinity.required must be a map")?
        .entry("nodeSelectorTerms")
        .or_insert_with(|| json!([]));
    let terms = terms
        .as_array_mut()
        .ok_or("spec.nodeAffinity.required.nodeSelectorTerms must be a list")?;
    if terms.is_empty() {
        terms.push(json!({"matchExpressions": [ours]}));
        return Ok(affinity);
    }
    for term in terms.iter_mut() {
        let exprs = term
            .as_object_mut()
            .ok_or("a nodeSelectorTerm must be a map")?
            .entry("matchExpressions")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .ok_or("matchExpressions must be a list")?;
        match exprs.iter().find(|e| str_at(e, "/key") == TOPOLOGY_KEY) {
            Some(e) if *e == ours => {}
            Some(e) => {
                return Err(format!(
                    "its nodeAffinity already constrains {TOPOLOGY_KEY} ({e}), which contradicts \
                     node {node:?}; remove that expression or give the matching --node"
                ))
            }
            None => exprs.push(ours.clone()),
        }
    }
    Ok(affinity)
}

/// Name, labels and annotations; nothing the API server sets.
fn metadata(pv: &Value, name: &str) -> Value {
    let mut meta = Map::new();
    meta.insert("name".into(), json!(name));
    if let Some(labels) = pv
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .filter(|l| !l.is_empty())
    {
        meta.insert("labels".into(), Value::Object(labels.clone()));
    }
    if let Some(annotations) = pv
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut kept = annotations.clone();
        kept.remove(LAST_APPLIED);
        if !kept.is_empty() {
            meta.insert("annotations".into(), Value::Object(kept));
        }
    }
    Value::Object(meta)
}

/// A CSI driver name: at most 63 characters of `[a-z0-9.-]`, starting and ending alphanumeric
/// (the rule loopvol-csi applies to its `--driver-name`).
pub fn check_driver_name(name: &str) -> Result<(), Error> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    if name.len() > 63 || !name.chars().all(ok) || !alnum_edges(name) {
        return Err(Error(format!(
            "invalid --driver-name {name:?}: at most 63 characters of a-z, 0-9, '.' and '-', \
             starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// A node name usable as the value of the topology label: a Kubernetes label value (at most 63
/// characters of letters, digits, '-', '_' and '.', starting and ending alphanumeric).
pub fn check_node(node: &str) -> Result<(), Error> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if node.len() > 63 || !node.chars().all(ok) || !alnum_edges(node) {
        return Err(Error(format!(
            "invalid --node {node:?}: the node name becomes the value of the label {TOPOLOGY_KEY}, \
             so at most 63 characters of letters, digits, '-', '_' and '.', starting and ending \
             with a letter or digit"
        )));
    }
    Ok(())
}

fn alnum_edges(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    edge(s.chars().next()) && edge(s.chars().last())
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One YAML document per PV, `---` between them.
    Yaml,
    /// One object; several PVs as a `v1 List`.
    Json,
}

/// The PVs as text for `kubectl create -f -`.
pub fn render(pvs: &[Value], format: Format) -> String {
    match format {
        Format::Yaml => pvs
            .iter()
            .map(crate::yaml::to_string)
            .collect::<Vec<_>>()
            .join("---\n"),
        Format::Json => {
            let doc = match pvs {
                [one] => one.clone(),
                many => json!({"apiVersion": "v1", "kind": "List", "items": many}),
            };
            format!("{doc:#}\n")
        }
    }
}

/// The string at a JSON pointer, or "".
fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// `Kind namespace/name` for messages.
fn describe(doc: &Value) -> String {
    let kind = Some(str_at(doc, "/kind"))
        .filter(|k| !k.is_empty())
        .unwrap_or("an object without kind");
    match str_at(doc, "/metadata/namespace") {
        "" => format!("{kind} {}", str_at(doc, "/metadata/name")),
        ns => format!("{kind} {ns}/{}", str_at(doc, "/metadata/name")),
    }
}

/// Which volume source a non-FlexVolume PV uses, for the refusal message.
fn volume_source(spec: &Map<String, Value>) -> String {
    const NOT_SOURCES: &[&str] = &[
        "accessModes",
        "capacity",
        "claimRef",
        "mountOptions",
        "nodeAffinity",
        "persistentVolumeReclaimPolicy",
        "storageClassName",
        "volumeAttributesClassName",
        "volumeMode",
    ];
    match spec.keys().find(|k| !NOT_SOURCES.contains(&k.as_str())) {
        Some(k) if k == "csi" => format!(
            "it is already a CSI PV of driver {:?}",
            spec["csi"]
                .get("driver")
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        Some(k) => format!("its volume source is {k}"),
        None => "it has no volume source".into(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> Settings {
        Settings {
            driver_name: DEFAULT_CSI_DRIVER.into(),
            pool: Pool::Node(n.into()),
        }
    }

    fn shared() -> Settings {
        Settings {
            driver_name: DEFAULT_CSI_DRIVER.into(),
            pool: Pool::Shared,
        }
    }

    /// Converts YAML text; returns the single PV.
    fn one(yaml: &str, settings: &Settings) -> Value {
        let out = convert(&read_documents(yaml).unwrap(), settings).unwrap();
        assert_eq!(out.pvs.len(), 1, "{out:?}");
        out.pvs.into_iter().next().unwrap()
    }

    fn refused(yaml: &str, settings: &Settings) -> String {
        match read_documents(yaml).and_then(|d| convert(&d, settings)) {
            Ok(out) => panic!("converted, expected a refusal: {out:?}"),
            Err(e) => e.0,
        }
    }

    /// A minimal FlexVolume PV with `flex` as its flexVolume and `extra` merged into its spec.
    fn pv(name: &str, flex: Value, extra: Value) -> String {
        let mut spec = json!({
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "flexVolume": flex,
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec})
            .to_string()
    }

    #[test]
    fn the_shipped_example() {
        let text = include_str!("../../deploy/examples/flexvolume-pv.yaml");
        let out = convert(&read_documents(text).unwrap(), &node("node-1")).unwrap();
        assert_eq!(out.pvs.len(), 1);
        let want = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "loopvol-flex-demo"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": "default", "name": "loopvol-flex-demo"},
                "csi": {
                    "driver": "csi.loopvol.io",
                    "volumeHandle": "loopvol-flex-demo",
                    "fsType": "ext4",
                    "readOnly": false,
                },
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "topology.loopvol.io/node", "operator": "In", "values": ["node-1"]}
                ]}]}},
            },
        });
        assert_eq!(out.pvs[0], want);
        // The claim and pod in the same file are skipped, with a word; the hand-written claimRef
        // has no uid, which the operator is told about.
        assert_eq!(out.notes.len(), 3, "{:?}", out.notes);
        assert!(out.notes[0].contains("claimRef names default/loopvol-flex-demo without a uid"));
        assert!(out.notes[1].contains("skipped PersistentVolumeClaim default/loopvol-flex-demo"));
        assert!(out.notes[2].contains("skipped Pod default/loopvol-flex-demo"));
    }

    /// What `kubectl get pv -o yaml` prints for a bound PV: server-set fields go, the claim's uid
    /// stays, labels and annotations stay (less last-applied-configuration).
    #[test]
    fn a_live_bound_pv() {
        let live = r#"
apiVersion: v1
kind: PersistentVolume
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"PersistentVolume","spec":{"flexVolume":{}}}
    pv.kubernetes.io/bound-by-controller: "yes"
  creationTimestamp: "2026-01-02T03:04:05Z"
  finalizers:
  - kubernetes.io/pv-protection
  labels:
    team: "on"
  name: data-web-0
  resourceVersion: "4711"
  uid: 6c1e2f0a-0000-4000-8000-000000000001
  managedFields:
  - manager: kubectl
spec:
  accessModes:
  - ReadWriteOnce
  - ReadOnlyMany
  capacity:
    storage: 10Gi
  claimRef:
    apiVersion: v1
    kind: PersistentVolumeClaim
    name: data-web-0
    namespace: shop
    resourceVersion: "4700"
    uid: 0b7a8e3c-1f2d-4e5f-9a0b-1c2d3e4f5a6b
  flexVolume:
    driver: loopvol/loopvol
    fsType: xfs
    readOnly: true
    options:
      volumeID: vol-web
      size: 10Gi
      mountOptions: noatime,nodiratime
  mountOptions:
  - noatime
  persistentVolumeReclaimPolicy: Delete
  storageClassName: manual
  volumeMode: Filesystem
status:
  phase: Bound
"#;
        let out = convert(&read_documents(live).unwrap(), &node("worker-2")).unwrap();
        assert!(out.notes.is_empty(), "{:?}", out.notes);
        let got = &out.pvs[0];
        assert_eq!(
            got["metadata"],
            json!({
                "name": "data-web-0",
                "labels": {"team": "on"},
                "annotations": {"pv.kubernetes.io/bound-by-controller": "yes"},
            })
        );
        assert!(got.get("status").is_none());
        let spec = &got["spec"];
        assert_eq!(spec["capacity"], json!({"storage": "10Gi"}));
        assert_eq!(
            spec["accessModes"],
            json!(["ReadWriteOnce", "ReadOnlyMany"])
        );
        assert_eq!(
            spec["claimRef"],
            json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "name": "data-web-0",
                "namespace": "shop",
                "uid": "0b7a8e3c-1f2d-4e5f-9a0b-1c2d3e4f5a6b",
            })
        );
        assert_eq!(spec["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(spec["storageClassName"], "manual");
        assert_eq!(spec["volumeMode"], "Filesystem");
        assert_eq!(spec["mountOptions"], json!(["noatime", "nodiratime"]));
        assert_eq!(
            spec["csi"],
            json!({"driver": "csi.loopvol.io", "volumeHandle": "vol-web", "fsType": "xfs", "readOnly": true})
        );
        assert!(spec.get("flexVolume").is_none());
        assert_eq!(
            spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"],
            json!(["worker-2"])
        );
    }

    #[test]
    fn volume_handle_is_the_flexvolume_drivers_volume_id() {
        let handle = |flex: Value| {
            one(&pv("pv-a", flex, json!({})), &shared())["spec"]["csi"]["volumeHandle"].clone()
        };
        assert_eq!(
            handle(json!({"driver": FLEX_DRIVER, "options": {"volumeID": "vol-1"}})),
            "vol-1"
        );
        // No volumeID (or an empty one): kubelet's pvOrVolumeName, the PV name.
        assert_eq!(handle(json!({"driver": FLEX_DRIVER})), "pv-a");
        assert_eq!(
            handle(json!({"driver": FLEX_DRIVER, "options": {"volumeID": ""}})),
            "pv-a"
        );
        assert_eq!(
            handle(json!({"driver": FLEX_DRIVER, "options": {"size": "1Gi"}})),
            "pv-a"
        );
        // kubelet merges the PV's options over its own keys, so one naming the PV wins there too.
        assert_eq!(
            handle(
                json!({"driver": FLEX_DRIVER, "options": {"kubernetes.io/pvOrVolumeName": "vol-x"}})
            ),
            "vol-x"
        );
        let err = refused(
            &pv(
                "pv-a",
                json!({"driver": FLEX_DRIVER, "options": {"kubernetes.io/pvOrVolumeName": "a/b"}}),
                json!({}),
            ),
            &shared(),
        );
        assert!(
            err.contains("option kubernetes.io/pvOrVolumeName")
                && err.contains("invalid volume ID"),
            "{err}"
        );
    }

    #[test]
    fn fs_type_rules() {
        let fs = |flex: Value| {
            one(&pv("p", flex, json!({})), &shared())["spec"]["csi"]["fsType"].clone()
        };
        assert_eq!(fs(json!({"driver": FLEX_DRIVER})), "ext4");
        assert_eq!(fs(json!({"driver": FLEX_DRIVER, "fsType": ""})), "ext4");
        assert_eq!(
            fs(json!({"driver": FLEX_DRIVER, "fsType": "btrfs"})),
            "btrfs"
        );
        assert_eq!(
            fs(json!({"driver": FLEX_DRIVER, "options": {"kubernetes.io/fsType": "xfs"}})),
            "xfs"
        );
        assert_eq!(
            fs(
                json!({"driver": FLEX_DRIVER, "fsType": "xfs", "options": {"kubernetes.io/fsType": "xfs"}})
            ),
            "xfs"
        );
        let err = refused(
            &pv(
                "p",
                json!({"driver": FLEX_DRIVER, "fsType": "ext4", "options": {"kubernetes.io/fsType": "xfs"}}),
                json!({}),
            ),
            &shared(),
        );
        assert!(err.contains("disagree"), "{err}");
        let err = refused(
            &pv(
                "p",
                json!({"driver": FLEX_DRIVER, "fsType": "ntfs"}),
                json!({}),
            ),
            &shared(),
        );
        assert!(
            err.contains("PersistentVolume p") && err.contains("\"ntfs\" is not supported"),
            "{err}"
        );
    }

    #[test]
    fn read_only() {
        let ro = |flex: Value| {
            one(&pv("p", flex, json!({})), &shared())["spec"]["csi"]["readOnly"].clone()
        };
        assert_eq!(ro(json!({"driver": FLEX_DRIVER})), false);
        assert_eq!(ro(json!({"driver": FLEX_DRIVER, "readOnly": false})), false);
        assert_eq!(ro(json!({"driver": FLEX_DRIVER, "readOnly": true})), true);
        let err = refused(
            &pv(
                "p",
                json!({"driver": FLEX_DRIVER, "readOnly": "yes"}),
                json!({}),
            ),
            &shared(),
        );
        assert!(err.contains("readOnly must be true or false"), "{err}");
    }

    #[test]
    fn mount_options_merge() {
        let opts = |flex: Value, extra: Value| {
            one(&pv("p", flex, extra), &shared())["spec"]
                .get("mountOptions")
                .cloned()
        };
        assert_eq!(opts(json!({"driver": FLEX_DRIVER}), json!({})), None);
        assert_eq!(
            opts(
                json!({"driver": FLEX_DRIVER, "options": {"mountOptions": " noatime , discard,"}}),
                json!({})
            ),
            Some(json!(["noatime", "discard"]))
        );
        assert_eq!(
            opts(
                json!({"driver": FLEX_DRIVER, "options": {"mountOptions": "discard,noatime"}}),
                json!({"mountOptions": ["noatime"]})
            ),
            Some(json!(["noatime", "discard"]))
        );
        assert_eq!(
            opts(
                json!({"driver": FLEX_DRIVER}),
                json!({"mountOptions": ["sync"]})
            ),
            Some(json!(["sync"]))
        );
        let err = refused(
            &pv(
                "p",
                json!({"driver": FLEX_DRIVER, "options": {"mountOptions": "bind"}}),
                json!({}),
            ),
            &shared(),
        );
        assert!(
            err.contains("option mountOptions") && err.contains("mount option"),
            "{err}"
        );
    }

    #[test]
    fn node_affinity_rules() {
        let flex = json!({"driver": FLEX_DRIVER});
        let ours = json!({"key": TOPOLOGY_KEY, "operator": "In", "values": ["n1"]});
        // None before: one term with ours.
        let got = one(&pv("p", flex.clone(), json!({})), &node("n1"));
        assert_eq!(
            got["spec"]["nodeAffinity"],
            json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [ours]}]}})
        );
        // Existing terms keep what they had and each gets ours (ANDed within a term).
        let host =
            |h: &str| json!({"key": "kubernetes.io/hostname", "operator": "In", "values": [h]});
        let zone = json!({"key": "zone", "operator": "Exists"});
        let existing = json!({"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [host("n1")]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
            {"matchExpressions": [zone, ours]},
        ]}}});
        let got = one(&pv("p", flex.clone(), existing), &node("n1"));
        assert_eq!(
            got["spec"]["nodeAffinity"],
            json!({"required": {"nodeSelectorTerms": [
                {"matchExpressions": [host("n1"), ours]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
                 "matchExpressions": [ours]},
                {"matchExpressions": [zone, ours]},
            ]}})
        );
        // An empty nodeAffinity gets ours.
        let got = one(
            &pv("p", flex.clone(), json!({"nodeAffinity": {}})),
            &node("n1"),
        );
        assert_eq!(
            got["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"],
            json!([{"matchExpressions": [ours]}])
        );
        // Ours for another node already there: a contradiction, refused.
        let other = json!({"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": TOPOLOGY_KEY, "operator": "In", "values": ["n2"]}]},
        ]}}});
        let err = refused(&pv("p", flex.clone(), other), &node("n1"));
        assert!(
            err.contains("already constrains topology.loopvol.io/node"),
            "{err}"
        );
        // Shared pool: no affinity added, an existing one kept as it is.
        let got = one(&pv("p", flex.clone(), json!({})), &shared());
        assert!(got["spec"].get("nodeAffinity").is_none(), "{got}");
        let existing = json!({"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [zone]}]}}});
        let got = one(&pv("p", flex, existing.clone()), &shared());
        assert_eq!(got["spec"]["nodeAffinity"], existing["nodeAffinity"]);
    }

    #[test]
    fn driver_name_and_node_settings() {
        let flex = json!({"driver": FLEX_DRIVER});
        let s = Settings {
            driver_name: "csi.example.org".into(),
            pool: Pool::Shared,
        };
        assert_eq!(
            one(&pv("p", flex.clone(), json!({})), &s)["spec"]["csi"]["driver"],
            "csi.example.org"
        );
        for bad in ["", "CSI.loopvol.io", "-a", "a_b", &"a".repeat(64)] {
            let s = Settings {
                driver_name: bad.into(),
                pool: Pool::Shared,
            };
            assert!(
                refused(&pv("p", flex.clone(), json!({})), &s).contains("invalid --driver-name"),
                "{bad:?}"
            );
        }
        one(
            &pv("p", flex.clone(), json!({})),
            &node("ip-10-0-0-1.ec2.internal"),
        );
        for bad in ["", "a/b", "-n", "n ", &"n".repeat(64)] {
            assert!(
                refused(&pv("p", flex.clone(), json!({})), &node(bad)).contains("invalid --node"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn inputs_json_list_and_several_documents() {
        let a = pv("a", json!({"driver": FLEX_DRIVER}), json!({}));
        let b = pv(
            "b",
            json!({"driver": FLEX_DRIVER, "options": {"volumeID": "vol-b"}}),
            json!({}),
        );
        let handles = |text: &str| -> Vec<Value> {
            convert(&read_documents(text).unwrap(), &shared())
                .unwrap()
                .pvs
                .iter()
                .map(|p| p["spec"]["csi"]["volumeHandle"].clone())
                .collect()
        };
        // JSON, one object.
        assert_eq!(handles(&a), [json!("a")]);
        // A kubectl List (JSON) and a PersistentVolumeList.
        let list = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{a},{b}]}}"#);
        assert_eq!(handles(&list), [json!("a"), json!("vol-b")]);
        let list = format!(r#"{{"apiVersion":"v1","kind":"PersistentVolumeList","items":[{b}]}}"#);
        assert_eq!(handles(&list), [json!("vol-b")]);
        // Several YAML documents (JSON lines are YAML), empty ones and comments skipped.
        let multi = format!("# PVs\n---\n{a}\n---\n---\n# nothing\n---\n{b}\n");
        assert_eq!(handles(&multi), [json!("a"), json!("vol-b")]);
        // Garbage and non-objects are refused.
        assert!(refused("a: [", &shared()).contains("not valid YAML or JSON"));
        assert!(
            refused("- 1\n- 2\n", &shared()).contains("expected a Kubernetes object, found a list")
        );
        assert!(refused("{\"kind\":\"List\",\"items\":3}", &shared())
            .contains("without an items array"));
        assert!(refused("", &shared()).contains("no PersistentVolume in the input"));
        let claim = r#"{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"c","namespace":"d"}}"#;
        assert!(refused(claim, &shared()).contains("no PersistentVolume"));
    }

    #[test]
    fn refusals() {
        let s = node("n1");
        let msg = |text: String| refused(&text, &s);

        let other_sources = [
            (
                json!({"csi": {"driver": "csi.loopvol.io", "volumeHandle": "v"}}),
                "already a CSI PV of driver \"csi.loopvol.io\"",
            ),
            (
                json!({"nfs": {"server": "s", "path": "/x"}}),
                "its volume source is nfs",
            ),
            (
                json!({"hostPath": {"path": "/x"}}),
                "its volume source is hostPath",
            ),
            (json!({}), "no volume source"),
        ];
        for (source, want) in other_sources {
            let mut doc = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "p"},
                                 "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}});
            for (k, v) in source.as_object().unwrap() {
                doc["spec"][k] = v.clone();
            }
            let err = msg(doc.to_string());
            assert!(
                err.starts_with("PersistentVolume p: not a FlexVolume PV"),
                "{err}"
            );
            assert!(err.contains(want), "{err}");
        }

        let err = msg(pv("p", json!({"driver": "example.com/nfs"}), json!({})));
        assert!(
            err.contains("FlexVolume driver is \"example.com/nfs\", not loopvol/loopvol"),
            "{err}"
        );
        let err = msg(pv("p", json!({"options": {}}), json!({})));
        assert!(err.contains("FlexVolume driver is \"\""), "{err}");

        for bad in ["../etc", "a/b", ".hidden", "vol:1", &"v".repeat(129)] {
            let err = msg(pv(
                "p",
                json!({"driver": FLEX_DRIVER, "options": {"volumeID": bad}}),
                json!({}),
            ));
            assert!(
                err.contains("options.volumeID") && err.contains("invalid volume ID"),
                "{bad}: {err}"
            );
        }
        // No volumeID: the PV name is the ID, so it must be a valid one.
        let err = msg(pv("pv:x", json!({"driver": FLEX_DRIVER}), json!({})));
        assert!(
            err.contains("the PV name") && err.contains("invalid volume ID"),
            "{err}"
        );

        let err = msg(pv(
            "p",
            json!({"driver": FLEX_DRIVER, "secretRef": {"name": "creds"}}),
            json!({}),
        ));
        assert!(
            err.contains("secretRef names the secret \"creds\""),
            "{err}"
        );
        assert!(err.contains("remove secretRef"), "{err}");
        // A null secretRef is no secretRef.
        one(
            &pv(
                "p",
                json!({"driver": FLEX_DRIVER, "secretRef": null}),
                json!({}),
            ),
            &s,
        );

        let err = msg(pv(
            "p",
            json!({"driver": FLEX_DRIVER}),
            json!({"volumeMode": "Block"}),
        ));
        assert!(err.contains("volumeMode Block"), "{err}");
        let err = msg(pv(
            "p",
            json!({"driver": FLEX_DRIVER, "options": {"size": ["1Gi"]}}),
            json!({}),
        ));
        assert!(
            err.contains("option \"size\" must be a string, not an array"),
            "{err}"
        );
        let err = msg(r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{}}"#.into());
        assert!(err.contains("without metadata.name"), "{err}");
        let err =
            msg(r#"{"apiVersion":"v2","kind":"PersistentVolume","metadata":{"name":"p"}}"#.into());
        assert!(err.contains("apiVersion \"v2\""), "{err}");
        let err =
            msg(r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"p"}}"#.into());
        assert!(err.contains("has no spec"), "{err}");

        // One bad PV refuses the whole input: no partial output.
        let good = pv("a", json!({"driver": FLEX_DRIVER}), json!({}));
        let bad = pv("b", json!({"driver": "other/x"}), json!({}));
        let err = msg(format!("{good}\n---\n{bad}\n"));
        assert!(err.starts_with("PersistentVolume b:"), "{err}");
    }

    #[test]
    fn unknown_options_are_noted() {
        let text = pv(
            "p",
            json!({"driver": FLEX_DRIVER, "options": {"volumeID": "v", "size": "1Gi", "speed": 3, "fast": true}}),
            json!({}),
        );
        let out = convert(&read_documents(&text).unwrap(), &shared()).unwrap();
        assert_eq!(out.notes.len(), 2, "{:?}", out.notes);
        assert!(out
            .notes
            .iter()
            .any(|n| n.contains("option \"speed\" is not a loopvol option")));
        assert!(out.notes.iter().any(|n| n.contains("option \"fast\"")));
    }

    #[test]
    fn rendering() {
        let a = one(
            &pv(
                "a",
                json!({"driver": FLEX_DRIVER}),
                json!({"storageClassName": "yes"}),
            ),
            &node("on"),
        );
        let b = one(
            &pv("b", json!({"driver": FLEX_DRIVER}), json!({})),
            &node("n1"),
        );
        // YAML: one document per PV; reading it back gives the same objects.
        let yaml = render(&[a.clone(), b.clone()], Format::Yaml);
        assert_eq!(yaml.matches("\n---\n").count(), 1, "{yaml}");
        assert_eq!(read_documents(&yaml).unwrap(), [a.clone(), b.clone()]);
        // Strings a YAML 1.1 reader (kubectl) would take for booleans stay quoted.
        assert!(yaml.contains("storageClassName: \"yes\"\n"), "{yaml}");
        assert!(yaml.contains("- \"on\"\n"), "{yaml}");
        // JSON: one object, or a List of several.
        let one_json: Value =
            serde_json::from_str(&render(std::slice::from_ref(&a), Format::Json)).unwrap();
        assert_eq!(one_json, a);
        let list: Value =
            serde_json::from_str(&render(&[a.clone(), b.clone()], Format::Json)).unwrap();
        assert_eq!(
            list,
            json!({"apiVersion": "v1", "kind": "List", "items": [a, b]})
        );
    }
}
