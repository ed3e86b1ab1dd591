//! From FlexVolume to CSI, end to end (issue 5; deploy/README.md "Migrating from FlexVolume to
//! CSI"):
//! - `loopvol-migrate` (the real binary) on the shipped example PV and on generated ones: the CSI
//!   PV it prints, in YAML and JSON, and its refusals;
//! - as root: data written through the real `loopvol-flexvolume` (called as kubelet calls it) is
//!   read back through the real `loopvol-csi` (over its Unix socket, staged and published as
//!   kubelet would for the migrated PV), in place (same image file), and the other way back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use loopvol_e2e::{binary, fs_tools, loops_under, mounts_under, require_root, run, Scratch};
use loopvol_proto::csi::v1 as pb;
use pb::node_client::NodeClient;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::{AccessMode, AccessType, MountVolume};
use serde_json::{json, Value};

const NODE: &str = "node-a";
const DRIVER: &str = "csi.loopvol.io";
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/examples/flexvolume-pv.yaml"
);

// ---------------------------------------------------------------------------------------------
// loopvol-migrate
// ---------------------------------------------------------------------------------------------

/// Runs loopvol-migrate with `args` and `stdin`; returns (exit code, stdout, stderr).
fn migrate(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(binary("loopvol-migrate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loopvol-migrate");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The documents of a YAML stream.
fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Migrates `input` (must succeed); returns the PVs printed as YAML, after checking that the JSON
/// output says the same.
fn migrate_ok(args: &[&str], input: &str) -> (Vec<Value>, String) {
    let (code, yaml, notes) = migrate(args, input);
    assert_eq!(code, 0, "loopvol-migrate {args:?} failed: {notes}");
    let pvs = yaml_docs(&yaml);
    let json_args: Vec<&str> = args.iter().copied().chain(["--output", "json"]).collect();
    let (code, json, _) = migrate(&json_args, input);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&json).expect("JSON output");
    let from_json = match pvs.len() {
        1 => vec![json],
        _ => {
            assert_eq!(json["kind"], "List", "{json}");
            json["items"].as_array().unwrap().clone()
        }
    };
    assert_eq!(pvs, from_json, "YAML and JSON outputs differ");
    (pvs, notes)
}

/// A PV as `kubectl get pv NAME -o json` prints it once bound, with loopvol's FlexVolume source.
fn live_flex_pv(name: &str, options: Value, fs: &str, size: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "uid": "5f0c2a9e-1111-4e5f-9a0b-000000000001",
            "resourceVersion": "90210",
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "finalizers": ["kubernetes.io/pv-protection"],
            "labels": {"app": "logs"},
            "annotations": {"pv.kubernetes.io/bound-by-controller": "yes"},
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "manual",
            "volumeMode": "Filesystem",
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": "shop",
                "name": format!("claim-{name}"),
                "uid": "0b7a8e3c-1f2d-4e5f-9a0b-1c2d3e4f5a6b",
                "resourceVersion": "90200",
            },
            "flexVolume": {"driver": "loopvol/loopvol", "fsType": fs, "options": options},
        },
        "status": {"phase": "Bound"},
    })
}

/// The PV used end to end besides the shipped example: no volumeID (the PV name is the volume
/// ID), xfs, a mount option.
fn logs_pv() -> Value {
    live_flex_pv(
        "pv-logs",
        json!({"size": "512Mi", "mountOptions": "noatime"}),
        "xfs",
        "512Mi",
    )
}

/// One whose volume ID differs from its name.
fn web_pv() -> Value {
    live_flex_pv(
        "pv-web",
        json!({"volumeID": "vol-web", "size": "64Mi"}),
        "ext4",
        "64Mi",
    )
}

fn node_affinity(node: &str) -> Value {
    json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "topology.loopvol.io/node", "operator": "In", "values": [node]}
    ]}]}})
}

#[test]
fn migrate_prints_the_csi_pv() {
    // The shipped example (its claim and pod are skipped).
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let (pvs, notes) = migrate_ok(&["--node", NODE, EXAMPLE], "");
    assert_eq!(
        pvs,
        [json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "loopvol-flex-demo"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": "default", "name": "loopvol-flex-demo"},
                "csi": {"driver": DRIVER, "volumeHandle": "loopvol-flex-demo", "fsType": "ext4",
                        "readOnly": false},
                "nodeAffinity": node_affinity(NODE),
            },
        })]
    );
    assert!(
        notes.contains("skipped PersistentVolumeClaim default/loopvol-flex-demo")
            && notes.contains("skipped Pod default/loopvol-flex-demo")
            && notes.contains("without a uid"),
        "{notes}"
    );
    // The same from standard input ("-" or no file).
    for args in [&["--node", NODE, "-"][..], &["--node", NODE][..]] {
        let (again, _) = migrate_ok(args, &example);
        assert_eq!(again, pvs);
    }

    // Live PVs, two at once as a kubectl List (JSON): what the server set is gone, the claim's
    // uid stays (the existing claim binds again to it), the volume ID rule is the driver's.
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [web_pv(), logs_pv()]});
    let (pvs, notes) = migrate_ok(&["--node", "worker-7"], &list.to_string());
    assert!(notes.is_empty(), "{notes}");
    assert_eq!(pvs.len(), 2);
    for (pv, handle, fs) in [(&pvs[0], "vol-web", "ext4"), (&pvs[1], "pv-logs", "xfs")] {
        let meta = pv["metadata"].as_object().unwrap();
        assert_eq!(
            meta.keys().collect::<Vec<_>>(),
            ["annotations", "labels", "name"],
            "{pv}"
        );
        assert_eq!(
            pv["metadata"]["annotations"]["pv.kubernetes.io/bound-by-controller"],
            "yes"
        );
        assert!(pv.get("status").is_none());
        let spec = &pv["spec"];
        assert_eq!(spec["accessModes"], json!(["ReadWriteOnce"]));
        assert_eq!(spec["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(spec["storageClassName"], "manual");
        assert_eq!(spec["volumeMode"], "Filesystem");
        assert_eq!(
            spec["claimRef"]["uid"],
            "0b7a8e3c-1f2d-4e5f-9a0b-1c2d3e4f5a6b"
        );
        assert_eq!(spec["claimRef"]["namespace"], "shop");
        assert!(spec["claimRef"].get("resourceVersion").is_none());
        assert!(spec.get("flexVolume").is_none());
        assert_eq!(
            spec["csi"],
            json!({"driver": DRIVER, "volumeHandle": handle, "fsType": fs, "readOnly": false})
        );
        assert_eq!(spec["nodeAffinity"], node_affinity("worker-7"));
    }
    assert_eq!(pvs[0]["spec"]["capacity"]["storage"], "64Mi");
    assert!(pvs[0]["spec"].get("mountOptions").is_none());
    assert_eq!(pvs[1]["spec"]["capacity"]["storage"], "512Mi");
    assert_eq!(pvs[1]["spec"]["mountOptions"], json!(["noatime"]));

    // Shared pool, another driver name: no node affinity.
    let (pvs, _) = migrate_ok(
        &["--shared-pool", "--driver-name", "csi.example.org"],
        &logs_pv().to_string(),
    );
    assert!(pvs[0]["spec"].get("nodeAffinity").is_none());
    assert_eq!(pvs[0]["spec"]["csi"]["driver"], "csi.example.org");

    // Refusals: exit 1, the reason on stderr, nothing on stdout.
    let mut other = logs_pv();
    other["spec"]["flexVolume"]["driver"] = json!("example.com/nfs");
    let mut secret = logs_pv();
    secret["spec"]["flexVolume"]["secretRef"] = json!({"name": "creds"});
    let mut bad_id = logs_pv();
    bad_id["spec"]["flexVolume"]["options"]["volumeID"] = json!("../../etc");
    let mut csi = logs_pv();
    csi["spec"]
        .as_object_mut()
        .unwrap()
        .remove("flexVolume")
        .unwrap();
    csi["spec"]["csi"] = json!({"driver": DRIVER, "volumeHandle": "pv-logs"});
    for (input, want) in [
        (other, "FlexVolume driver is \"example.com/nfs\""),
        (secret, "secretRef"),
        (bad_id, "invalid volume ID"),
        (csi, "not a FlexVolume PV (it is already a CSI PV"),
    ] {
        let (code, out, err) = migrate(&["--node", NODE], &input.to_string());
        assert_eq!(code, 1, "{want}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.starts_with("loopvol-migrate: error: PersistentVolume pv-logs: ")
                && err.contains(want),
            "{want}: {err}"
        );
    }
    // Node-local pools need the node.
    let (code, _, err) = migrate(&[EXAMPLE], "");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--node"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// FlexVolume → CSI with real data
// ---------------------------------------------------------------------------------------------

/// `loopvol-flexvolume <args>` in node mode as kubelet runs it; returns the reply, which must be
/// Success.
fn flex(s: &Scratch, args: &[&str]) -> Value {
    let mut cmd = Command::new(binary("loopvol-flexvolume"));
    cmd.args(args)
        .env("LOOPVOL_POOL", s.pool())
        .env("LOOPVOL_NODE", NODE)
        .env("LOOPVOL_LOG", s.path("flexvolume.log"))
        .env("LOOPVOL_ATTACH", "false")
        .stdin(Stdio::null());
    let (code, stdout, stderr) = run(&mut cmd);
    let reply: Value = serde_json::from_str(&format!("{stdout}{stderr}"))
        .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stdout}{stderr}"));
    assert!(
        code == 0 && reply["status"] == "Success",
        "{args:?}: {reply}\nlog:\n{}",
        std::fs::read_to_string(s.path("flexvolume.log")).unwrap_or_default()
    );
    reply
}

/// The JSON options kubelet passes to `mount` for the FlexVolume PV `pv` in a pod.
fn kubelet_options(pv: &Value, pod_uid: &str) -> String {
    let flex = &pv["spec"]["flexVolume"];
    let mut o = json!({
        "kubernetes.io/fsType": flex["fsType"].as_str().unwrap_or(""),
        "kubernetes.io/readwrite": if flex["readOnly"] == true { "ro" } else { "rw" },
        "kubernetes.io/pvOrVolumeName": pv["metadata"]["name"],
        "kubernetes.io/pod.name": "app-0",
        "kubernetes.io/pod.namespace": "default",
        "kubernetes.io/pod.uid": pod_uid,
        "kubernetes.io/serviceAccount.name": "default",
    });
    for (k, v) in flex["options"].as_object().unwrap() {
        o[k] = v.clone();
    }
    o.to_string()
}

/// The pod's volume dir kubelet makes for a FlexVolume PV.
fn flex_pod_dir(s: &Scratch, pod_uid: &str, pv: &Value) -> PathBuf {
    let dir = s.path(&format!(
        "kubelet/pods/{pod_uid}/volumes/loopvol~loopvol/{}",
        pv["metadata"]["name"].as_str().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic, incompressible test data.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Options of the mount at exactly `path`.
fn mount_options_at(path: &Path) -> Option<Vec<String>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    loopvol::testing::mount::parse_mountinfo(&table)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| m.options)
}

fn assert_clean(s: &Scratch, when: &str) {
    assert!(
        mounts_under(&s.root()).is_empty(),
        "{when}: left mounted: {:?}",
        mounts_under(&s.root())
    );
    assert!(
        loops_under(&s.root()).is_empty(),
        "{when}: left attached: {:?}",
        loops_under(&s.root())
    );
}

fn image_inode(s: &Scratch, id: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(s.pool().join("volumes").join(id).join("image"))
        .unwrap_or_else(|e| panic!("image of volume {id}: {e}"))
        .ino()
}

type Server = loopvol_e2e::CsiServer;

fn start_server(s: &Scratch) -> Server {
    let args = [
        format!("--pool={}", s.pool().display()),
        format!("--node-id={NODE}"),
        format!("--path-prefix={}", s.path("kubelet").display()),
    ];
    Server::start(s, "csi", &args)
}

/// What kubelet asks of the CSI driver for a migrated PV: its fsType and mountOptions, and for a
/// ReadWriteOnce PV SINGLE_NODE_MULTI_WRITER (the driver has that capability).
fn capability(pv: &Value) -> pb::VolumeCapability {
    assert_eq!(pv["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    let flags = pv["spec"]["mountOptions"]
        .as_array()
        .map(|a| a.iter().map(|o| o.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: pv["spec"]["csi"]["fsType"].as_str().unwrap().into(),
            mount_flags: flags,
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeMultiWriter as i32,
        }),
    }
}

/// Kubelet's staging and pod paths for a CSI PV (the staging dir is made by kubelet, the target
/// by the driver, inside the dir kubelet made).
fn csi_paths(s: &Scratch, pv: &Value, pod_uid: &str) -> (PathBuf, PathBuf) {
    let handle = pv["spec"]["csi"]["volumeHandle"].as_str().unwrap();
    let staging = s.path(&format!(
        "kubelet/plugins/kubernetes.io/csi/{DRIVER}/{handle}/globalmount"
    ));
    std::fs::create_dir_all(&staging).unwrap();
    let volume_dir = s.path(&format!(
        "kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi/{}",
        pv["metadata"]["name"].as_str().unwrap()
    ));
    std::fs::create_dir_all(&volume_dir).unwrap();
    (staging, volume_dir.join("mount"))
}

#[tokio::test]
async fn flexvolume_data_is_served_by_csi() {
    let mut tools = fs_tools("ext4").to_vec();
    tools.extend(fs_tools("xfs"));
    if !require_root(&tools) {
        return;
    }
    let started = Instant::now();
    let s = Scratch::new();

    // The FlexVolume PVs: the shipped example (ext4, options.volumeID = its name) and generated
    // ones (no volumeID, xfs, noatime; a volumeID that is not the name, ext4).
    let example_text = std::fs::read_to_string(EXAMPLE).unwrap();
    let example = yaml_docs(&example_text)
        .into_iter()
        .find(|d| d["kind"] == "PersistentVolume")
        .unwrap();
    let flex_pvs = [example, logs_pv(), web_pv()];

    // 1. Pods write through FlexVolume; the first mount creates each volume (thin, `size`).
    let mut data = Vec::new();
    for (i, pv) in flex_pvs.iter().enumerate() {
        let pod = format!("flex-pod-{i}");
        let dir = flex_pod_dir(&s, &pod, pv);
        let dir_s = dir.display().to_string();
        flex(&s, &["mount", &dir_s, &kubelet_options(pv, &pod)]);
        let content = pattern(3 << 20, i as u64 + 7);
        write_synced(&dir.join("data.bin"), &content);
        std::fs::create_dir(dir.join("sub")).unwrap();
        write_synced(&dir.join("sub/hello.txt"), b"written through FlexVolume");
        data.push(content);
        flex(&s, &["unmount", &dir_s]);
    }
    assert_clean(&s, "after the FlexVolume unmounts");

    // 2. The migration command, on the same PVs as they come: the example file (with a claim
    //    and a pod), and the live PVs as a kubectl List on stdin.
    let (mut csi_pvs, _) = migrate_ok(&["--node", NODE, EXAMPLE], "");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": flex_pvs[1..]});
    csi_pvs.extend(migrate_ok(&["--node", NODE], &list.to_string()).0);
    let ids = ["loopvol-flex-demo", "pv-logs", "vol-web"];
    let inodes: Vec<u64> = ids.iter().map(|id| image_inode(&s, id)).collect();
    for (pv, id) in csi_pvs.iter().zip(ids) {
        assert_eq!(pv["spec"]["csi"]["volumeHandle"], id, "{pv}");
    }

    // 3. The CSI server on the same pool and node.
    let mut server = start_server(&s);
    let mut node = NodeClient::new(server.channel().await);
    // The node affinity the migration wrote is the topology this node's driver reports.
    let info = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    let expr = &csi_pvs[0]["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]
        ["matchExpressions"][0];
    let reported = info.accessible_topology.expect("node-local topology");
    assert_eq!(
        reported.segments.get(expr["key"].as_str().unwrap()),
        Some(&NODE.to_owned()),
        "{expr} vs {reported:?}"
    );
    assert_eq!(expr["values"], json!([NODE]));

    for (i, pv) in csi_pvs.iter().enumerate() {
        let handle = pv["spec"]["csi"]["volumeHandle"]
            .as_str()
            .unwrap()
            .to_owned();
        let pod = format!("csi-pod-{i}");
        let (staging, target) = csi_paths(&s, pv, &pod);
        let cap = capability(pv);
        node.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: handle.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("NodeStageVolume {handle}: {e}\n{}", server.log_text()));
        node.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: handle.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            readonly: pv["spec"]["csi"]["readOnly"] == true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("NodePublishVolume {handle}: {e}\n{}", server.log_text()));

        // The data FlexVolume wrote, byte for byte; and the PV's mount options are in force.
        assert!(std::fs::read(target.join("data.bin")).unwrap() == data[i]);
        assert_eq!(
            std::fs::read(target.join("sub/hello.txt")).unwrap(),
            b"written through FlexVolume"
        );
        let options = mount_options_at(&target).expect("target mounted");
        for o in pv["spec"]["mountOptions"].as_array().into_iter().flatten() {
            assert!(options.iter().any(|x| x == o), "{o} not in {options:?}");
        }
        write_synced(&target.join("sub/csi.txt"), b"written through CSI");

        node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: handle.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: handle.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    }
    assert_clean(&s, "after NodeUnpublish/NodeUnstage");
    drop(node);
    server.stop().await;
    assert_clean(&s, "after the CSI server stopped");
    // In place: the same image files, nothing copied.
    assert_eq!(
        ids.iter().map(|id| image_inode(&s, id)).collect::<Vec<_>>(),
        inodes
    );

    // 4. And back (the way to roll a migration back): FlexVolume sees what CSI wrote.
    let pv = &flex_pvs[1];
    let dir = flex_pod_dir(&s, "flex-pod-again", pv);
    let dir_s = dir.display().to_string();
    flex(
        &s,
        &["mount", &dir_s, &kubelet_options(pv, "flex-pod-again")],
    );
    assert_eq!(
        std::fs::read(dir.join("sub/csi.txt")).unwrap(),
        b"written through CSI"
    );
    assert!(std::fs::read(dir.join("data.bin")).unwrap() == data[1]);
    flex(&s, &["unmount", &dir_s]);
    assert_clean(&s, "at the end");
    eprintln!("FlexVolume → CSI → FlexVolume took {:?}", started.elapsed());
}
