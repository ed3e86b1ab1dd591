//! Wire-identity checks between our `proto/csi.proto` and the CSI spec's
//! `csi.proto` (v1.12.0, kept outside the repo in `shared/reference/`).
//!
//! Both files are compiled with protox at test time. Each file descriptor is
//! decoded as a `google.protobuf.FileDescriptorProto` dynamic message (so
//! custom option extensions such as `csi_secret` survive, which
//! `prost_types` would drop) and flattened into `path -> value` entries,
//! keyed by element *names* rather than positions. Comments and source info
//! are dropped, as is the file's own name. Everything else is compared:
//! package, syntax, imports, file options, every message (fields with name,
//! number, label, type, type_name, oneof_index, json_name, proto3_optional,
//! options incl. extension values), nested types, oneofs, enums and their
//! values, services and methods (input/output types, streaming flags,
//! options) and extension definitions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use protox::prost::Message as _;
use protox::prost_reflect::{
    DescriptorPool, DynamicMessage, FileDescriptor, Kind, ReflectMessage as _, Value,
};

const REFERENCE_REL: &str = "../../shared/reference/csi-v1.12.0.proto";
const FILE_DESCRIPTOR_PROTO: &str = "google.protobuf.FileDescriptorProto";

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

fn ours_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("csi.proto")
}

/// The spec file. Missing, the test fails (a check that cannot run never passes silently) unless
/// the run opts out as every other test that needs what a machine lacks does
/// (`LOOPVOL_TEST_SKIP_ROOT=1`, ignored under `CI=true`): then it says why and returns `None`.
fn reference_path() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(REFERENCE_REL);
    if path.is_file() {
        return Some(path);
    }
    let msg = format!(
        "reference CSI spec not found at {} (expected shared/ beside the repo checkout)",
        path.display()
    );
    let flag = |k: &str| std::env::var(k).is_ok_and(|v| v == "1" || v == "true");
    if flag("LOOPVOL_TEST_SKIP_ROOT") && !flag("CI") {
        eprintln!("SKIPPED: {msg} (LOOPVOL_TEST_SKIP_ROOT=1)");
        return None;
    }
    panic!("{msg}; set LOOPVOL_TEST_SKIP_ROOT=1 to skip it (not under CI=true)");
}

/// Compiles one .proto file (its directory as the include path; google
/// well-known imports come from protox) and returns its descriptor.
fn compile(path: &Path) -> FileDescriptor {
    let dir = path.parent().expect("proto path has a parent");
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut compiler = protox::Compiler::new([dir])
        .unwrap_or_else(|e| panic!("protox include {}: {e}", dir.display()));
    compiler
        .open_file(path)
        .unwrap_or_else(|e| panic!("protox failed to compile {}: {e:?}", path.display()));
    compiler
        .descriptor_pool()
        .get_file_by_name(name)
        .unwrap_or_else(|| panic!("{name} missing from its descriptor pool"))
}

/// The file as a dynamic `FileDescriptorProto`, custom options included.
fn to_dynamic(file: &FileDescriptor) -> DynamicMessage {
    let desc = file
        .parent_pool()
        .get_message_by_name(FILE_DESCRIPTOR_PROTO)
        .expect("descriptor.proto is imported by csi.proto");
    DynamicMessage::decode(desc, file.encode_to_vec().as_slice())
        .expect("decode FileDescriptorProto")
}

// ---------------------------------------------------------------------------
// Flattening and comparison
// ---------------------------------------------------------------------------

type Flat = BTreeMap<String, String>;

/// Flattens a `FileDescriptorProto` into `path -> value` entries, without
/// the file name and source info (comments, spans).
fn flatten_file(file: &DynamicMessage) -> Flat {
    let mut out = Flat::new();
    flatten(file, "", &mut out, true);
    out
}

fn flatten(msg: &DynamicMessage, path: &str, out: &mut Flat, top: bool) {
    for (field, value) in msg.fields() {
        if top && matches!(field.name(), "name" | "source_code_info") {
            continue;
        }
        let key = join(path, field.name());
        flatten_value(&field.kind(), value, &key, out);
    }
    for (ext, value) in msg.extensions() {
        let key = join(path, &format!("({}#{})", ext.full_name(), ext.number()));
        flatten_value(&ext.kind(), value, &key, out);
    }
    for unknown in msg.unknown_fields() {
        let key = join(path, &format!("(unknown#{})", unknown.number()));
        let prev = out.insert(key.clone(), format!("{unknown:?}"));
        assert!(prev.is_none(), "repeated unknown field at {key}");
    }
}

fn flatten_value(kind: &Kind, value: &Value, key: &str, out: &mut Flat) {
    match value {
        Value::Message(m) => {
            out.insert(key.to_owned(), "<present>".to_owned());
            flatten(m, key, out, false);
        }
        Value::List(items) if matches!(kind, Kind::Message(_)) => {
            out.insert(key.to_owned(), format!("<{} items>", items.len()));
            for (i, item) in items.iter().enumerate() {
                let m = item.as_message().expect("message list item");
                // Named elements (messages, fields, enums, values, services,
                // methods, oneofs, extensions) are keyed by name so that a
                // reordering or an insertion shows up as a precise diff.
                let label = match m.get_field_by_name("name").as_deref() {
                    Some(Value::String(s)) => s.clone(),
                    _ => format!("#{i}"),
                };
                let item_key = format!("{key}[{label}]");
                assert!(!out.contains_key(&item_key), "duplicate element {item_key}");
                out.insert(item_key.clone(), format!("<item #{i}>"));
                flatten(m, &item_key, out, false);
            }
        }
        Value::List(items) => {
            let rendered: Vec<String> = items.iter().map(|v| scalar(kind, v)).collect();
            out.insert(key.to_owned(), format!("[{}]", rendered.join(", ")));
        }
        other => {
            out.insert(key.to_owned(), scalar(kind, other));
        }
    }
}

fn scalar(kind: &Kind, value: &Value) -> String {
    match (kind, value) {
        (Kind::Enum(e), Value::EnumNumber(n)) => match e.get_value(*n) {
            Some(v) => format!("{}({n})", v.name()),
            None => format!("{n}"),
        },
        (_, Value::String(s)) => format!("{s:?}"),
        (_, Value::Bool(b)) => b.to_string(),
        (_, Value::I32(n)) => n.to_string(),
        (_, Value::I64(n)) => n.to_string(),
        (_, Value::U32(n)) => n.to_string(),
        (_, Value::U64(n)) => n.to_string(),
        (_, Value::F32(n)) => n.to_string(),
        (_, Value::F64(n)) => n.to_string(),
        (_, v) => format!("{v:?}"),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// Human-readable differences of `ours` against `reference`; empty means
/// wire-identical (modulo comments and the file name).
fn diff(ours: &Flat, reference: &Flat) -> Vec<String> {
    let keys: BTreeSet<&String> = ours.keys().chain(reference.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        match (ours.get(key), reference.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => out.push(format!("{key}: ours={a} spec={b}")),
            (Some(a), None) => out.push(format!("{key}: only in ours ({a})")),
            (None, Some(b)) => out.push(format!("{key}: missing in ours (spec has {b})")),
            (None, None) => unreachable!(),
        }
    }
    out
}

fn assert_no_diff(ours: &Flat, reference: &Flat, what: &str) {
    let diffs = diff(ours, reference);
    assert!(
        diffs.is_empty(),
        "{what}: {} difference(s):\n  {}",
        diffs.len(),
        diffs.join("\n  ")
    );
}

fn ours_flat() -> Flat {
    flatten_file(&to_dynamic(&compile(&ours_path())))
}

// ---------------------------------------------------------------------------
// Dynamic-message helpers for the mutation tests
// ---------------------------------------------------------------------------

/// The element named `name` in the repeated message field `list` of `msg`.
fn child<'a>(msg: &'a mut DynamicMessage, list: &str, name: &str) -> &'a mut DynamicMessage {
    msg.get_field_by_name_mut(list)
        .and_then(Value::as_list_mut)
        .unwrap_or_else(|| panic!("no list {list}"))
        .iter_mut()
        .filter_map(Value::as_message_mut)
        .find(|m| {
            m.get_field_by_name("name")
                .as_deref()
                .and_then(Value::as_str)
                == Some(name)
        })
        .unwrap_or_else(|| panic!("no {list} named {name}"))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The main check: our csi.proto is wire-identical to the spec's.
#[test]
fn ours_matches_spec_v1_12() {
    let Some(reference) = reference_path() else {
        return;
    };
    let spec = compile(&reference);
    let ours = compile(&ours_path());
    assert_eq!(ours.package_name(), "csi.v1");
    assert_eq!(spec.package_name(), "csi.v1");
    assert_no_diff(
        &flatten_file(&to_dynamic(&ours)),
        &flatten_file(&to_dynamic(&spec)),
        "proto/csi.proto vs spec csi-v1.12.0.proto",
    );
}

/// The descriptor set shipped in the crate (`FILE_DESCRIPTOR_SET`) is what
/// csi.proto compiles to, custom options included, and matches the spec.
#[test]
fn embedded_descriptor_set_matches() {
    let pool = DescriptorPool::decode(loopvol_proto::FILE_DESCRIPTOR_SET)
        .expect("FILE_DESCRIPTOR_SET decodes");
    let file = pool
        .get_file_by_name("csi.proto")
        .expect("csi.proto in FILE_DESCRIPTOR_SET");
    let embedded = flatten_file(&to_dynamic(&file));
    assert_no_diff(&embedded, &ours_flat(), "FILE_DESCRIPTOR_SET vs csi.proto");

    if let Some(reference) = reference_path() {
        let spec = flatten_file(&to_dynamic(&compile(&reference)));
        assert_no_diff(&embedded, &spec, "FILE_DESCRIPTOR_SET vs spec");
    }
}

/// Guards against a vacuous comparison: the flattened form really carries
/// the details we rely on (fields, option extension values, streaming, ...).
#[test]
fn flattening_captures_details() {
    let flat = ours_flat();
    let expect = [
        ("package", "\"csi.v1\""),
        ("syntax", "\"proto3\""),
        ("service", "<5 items>"),
        (
            "service[Node].method[NodePublishVolume].input_type",
            "\".csi.v1.NodePublishVolumeRequest\"",
        ),
        (
            "service[SnapshotMetadata].method[GetMetadataDelta].server_streaming",
            "true",
        ),
        (
            "service[SnapshotMetadata].options.(csi.v1.alpha_service#1060)",
            "true",
        ),
        (
            "message_type[CreateVolumeRequest].field[secrets].options.(csi.v1.csi_secret#1059)",
            "true",
        ),
        (
            "message_type[CreateVolumeRequest].field[secrets].type_name",
            "\".csi.v1.CreateVolumeRequest.SecretsEntry\"",
        ),
        (
            "message_type[NodeExpandVolumeRequest].field[secrets].options.(csi.v1.alpha_field#1060)",
            "true",
        ),
        (
            "message_type[VolumeCapability].field[mount].oneof_index",
            "0",
        ),
        (
            "message_type[VolumeCapability].field[access_mode].number",
            "3",
        ),
        (
            "message_type[ProbeResponse].field[ready].type",
            "TYPE_MESSAGE(11)",
        ),
        (
            "message_type[VolumeCapability].nested_type[AccessMode].enum_type[Mode].value[SINGLE_NODE_MULTI_WRITER].options.(csi.v1.alpha_enum_value#1060)",
            "true",
        ),
        ("enum_type[BlockMetadataType].value[VARIABLE_LENGTH].number", "2"),
        ("extension[csi_secret].number", "1059"),
        ("extension[csi_secret].extendee", "\".google.protobuf.FieldOptions\""),
        (
            "message_type[GetMetadataAllocatedRequest].field[max_results].json_name",
            "\"maxResults\"",
        ),
    ];
    for (key, value) in expect {
        assert_eq!(
            flat.get(key).map(String::as_str),
            Some(value),
            "entry {key}"
        );
    }
    assert!(
        !flat.keys().any(|k| k.contains("source_code_info")),
        "source info must be stripped"
    );
}

/// The comparison must be able to fail: change one field number in a copy
/// of our descriptor and check that exactly that is reported.
#[test]
fn comparison_reports_changed_field_number() {
    let original = to_dynamic(&compile(&ours_path()));
    let mut mutated = original.clone();
    child(
        child(&mut mutated, "message_type", "NodePublishVolumeRequest"),
        "field",
        "target_path",
    )
    .set_field_by_name("number", Value::I32(40));

    let diffs = diff(&flatten_file(&mutated), &flatten_file(&original));
    assert_eq!(
        diffs,
        vec![
            "message_type[NodePublishVolumeRequest].field[target_path].number: ours=40 spec=4"
                .to_owned()
        ],
    );
}

/// Same for a nested enum value number and for a dropped `csi_secret`
/// option.
#[test]
fn comparison_reports_enum_and_option_changes() {
    let original = to_dynamic(&compile(&ours_path()));

    let mut mutated = original.clone();
    let rpc = child(
        child(&mut mutated, "message_type", "NodeServiceCapability"),
        "nested_type",
        "RPC",
    );
    child(
        child(rpc, "enum_type", "Type"),
        "value",
        "VOLUME_MOUNT_GROUP",
    )
    .set_field_by_name("number", Value::I32(7));
    let diffs = diff(&flatten_file(&mutated), &flatten_file(&original));
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(diffs[0].contains("value[VOLUME_MOUNT_GROUP].number: ours=7 spec=6"));

    let mut mutated = original.clone();
    child(
        child(&mut mutated, "message_type", "NodeStageVolumeRequest"),
        "field",
        "secrets",
    )
    .clear_field_by_name("options");
    let diffs = diff(&flatten_file(&mutated), &flatten_file(&original));
    assert!(
        diffs.iter().any(|d| d.contains(
            "field[secrets].options.(csi.v1.csi_secret#1059): missing in ours (spec has true)"
        )),
        "{diffs:?}"
    );
}

/// Messages encoded by the generated Rust types decode field-for-field with
/// the spec's own descriptor, and the other way round.
#[test]
fn generated_types_roundtrip_through_spec_descriptor() {
    use loopvol_proto::csi::v1 as csi;

    let Some(reference) = reference_path() else {
        return;
    };
    let spec_pool = compile(&reference).parent_pool().clone();

    let req = csi::NodePublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: "/var/lib/kubelet/pods/x/volumes/v".into(),
        readonly: true,
        secrets: [("key".to_owned(), "s3cr3t".to_owned())].into(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume {
                    fs_type: "ext4".into(),
                    mount_flags: vec!["noatime".into()],
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        ..Default::default()
    };
    let desc = spec_pool
        .get_message_by_name("csi.v1.NodePublishVolumeRequest")
        .unwrap();
    let dynamic = DynamicMessage::decode(desc.clone(), req.encode_to_vec().as_slice()).unwrap();
    assert_eq!(dynamic.unknown_fields().count(), 0);
    assert_eq!(
        dynamic.get_field_by_name("volume_id").unwrap().as_str(),
        Some("vol-1")
    );
    assert_eq!(
        dynamic.get_field_by_name("readonly").unwrap().as_bool(),
        Some(true)
    );
    let cap = dynamic.get_field_by_name("volume_capability").unwrap();
    let cap = cap.as_message().unwrap();
    let mount = cap.get_field_by_name("mount").unwrap();
    assert_eq!(
        mount
            .as_message()
            .unwrap()
            .get_field_by_name("fs_type")
            .unwrap()
            .as_str(),
        Some("ext4")
    );
    let mode = cap.get_field_by_name("access_mode").unwrap();
    assert_eq!(
        mode.as_message()
            .unwrap()
            .get_field_by_name("mode")
            .unwrap()
            .as_enum_number(),
        Some(1)
    );

    // Spec-encoded message -> generated type: identical value.
    let back = csi::NodePublishVolumeRequest::decode(dynamic.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back, req);
    assert_eq!(
        dynamic.descriptor().full_name(),
        "csi.v1.NodePublishVolumeRequest"
    );
}
