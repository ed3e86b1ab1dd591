//! Conformance tests for `loopvol-csi`: the real binary, spawned per test with its own pool and
//! socket, driven over a real Unix socket by tonic clients. They cover, RPC by RPC, the rules of
//! `reference/csi.md`: required fields, error codes, idempotency (lifecycles repeated 10 times),
//! maximum lengths, paging, capabilities, and the kernel-facing paths (stage, publish, block,
//! snapshots, clones, expansion, crash recovery) with real loop devices as root.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loopvol_e2e::{binary, fs_tools, loops_under, mounts_under, require_root, Scratch};
use loopvol_proto::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use pb::group_controller_client::GroupControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;
const NODE: &str = "node-a";
const TOPOLOGY_KEY: &str = "topology.loopvol.io/node";

// ---------------------------------------------------------------------------------------------
// Harness: the server process and its clients
// ---------------------------------------------------------------------------------------------

type Server = loopvol_e2e::CsiServer;

/// Starts the server on `<scratch>/csi.sock` with the scratch pool, this node and `extra` flags,
/// and waits until it listens.
fn start_server(scratch: &Scratch, extra: &[&str]) -> Server {
    let mut args = vec![
        format!("--pool={}", scratch.pool().display()),
        format!("--node-id={NODE}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start(scratch, "csi", &args)
}

async fn connect(server: &Server) -> Csi {
    let channel = server.channel().await;
    Csi {
        channel: channel.clone(),
        id: IdentityClient::new(channel.clone()),
        ctl: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        grp: GroupControllerClient::new(channel),
    }
}

#[derive(Clone)]
struct Csi {
    channel: Channel,
    id: IdentityClient<Channel>,
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    grp: GroupControllerClient<Channel>,
}

/// Starts a server with `extra` flags and connects to it.
async fn start(scratch: &Scratch, extra: &[&str]) -> (Server, Csi) {
    let server = start_server(scratch, extra);
    let csi = connect(&server).await;
    (server, csi)
}

// ---------------------------------------------------------------------------------------------
// Request builders and assertions
// ---------------------------------------------------------------------------------------------

fn mount_cap(fs: &str, mode: Mode) -> pb::VolumeCapability {
    mount_cap_with(fs, mode, &[], "")
}

fn mount_cap_with(fs: &str, mode: Mode, flags: &[&str], group: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: group.into(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn rwo(fs: &str) -> pb::VolumeCapability {
    mount_cap(fs, Mode::SingleNodeWriter)
}

fn range(required: i64, limit: i64) -> Option<pb::CapacityRange> {
    Some(pb::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

fn create_req(name: &str, size: i64, cap: pb::VolumeCapability) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

fn stage_req(id: &str, staging: &Path, cap: pb::VolumeCapability) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unstage_req(id: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

fn delete_req(id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    }
}

fn snapshot_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

fn from_snapshot(id: &str) -> Option<pb::VolumeContentSource> {
    Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            },
        )),
    })
}

fn from_volume(id: &str) -> Option<pb::VolumeContentSource> {
    Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: id.into(),
            },
        )),
    })
}

fn topology(node: &str) -> pb::Topology {
    pb::Topology {
        segments: [(TOPOLOGY_KEY.to_string(), node.to_string())].into(),
    }
}

/// Asserts `result` failed with `code`, naming `what` in the panic.
#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {v:?}"),
        Err(s) => assert_eq!(s.code(), code, "{what}: {}", s.message()),
    }
}

/// Unwraps an OK reply, naming `what` in the panic.
#[track_caller]
fn ok<T>(result: Result<tonic::Response<T>, tonic::Status>, what: &str) -> T {
    match result {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("{what}: expected OK, got {:?}: {}", s.code(), s.message()),
    }
}

async fn create(csi: &mut Csi, name: &str, size: i64, cap: pb::VolumeCapability) -> pb::Volume {
    let reply = ok(
        csi.ctl.create_volume(create_req(name, size, cap)).await,
        "CreateVolume",
    );
    reply.volume.expect("volume in reply")
}

/// The mount at exactly `path`, as (fs type, options) from mountinfo.
fn mount_at(path: &Path) -> Option<(String, Vec<String>)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let entries = loopvol::testing::mount::parse_mountinfo(&table);
    entries
        .iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| (m.fs_type.clone(), m.options.clone()))
}

fn image_of(scratch: &Scratch, id: &str) -> PathBuf {
    scratch.pool().join("volumes").join(id).join("image")
}

/// Loop devices attached to volume `id`'s image.
fn loops_of(scratch: &Scratch, id: &str) -> Vec<PathBuf> {
    loopvol::testing::loopdev::find(&image_of(scratch, id))
        .unwrap()
        .iter()
        .map(|d| d.path())
        .collect()
}

fn statvfs_total(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// A deterministic pattern of `len` bytes seeded by `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tool_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A frozen filesystem (FIFREEZE via `fsfreeze`), thawed on drop even when a test fails: writes
/// to it block in the kernel, which holds a call in flight for as long as a test needs.
struct Frozen(PathBuf);

impl Frozen {
    fn freeze(path: &Path) -> Frozen {
        run_tool("fsfreeze", &["--freeze", &path.display().to_string()]);
        Frozen(path.to_owned())
    }
    fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .args(["--unfreeze", &self.0.display().to_string()])
            .output();
    }
}

/// Waits until a thread of process `pid` is blocked on a frozen filesystem: asleep
/// uninterruptibly (state D) in the kernel's wait for a frozen superblock (a brief D state
/// during other I/O does not count). Fails after 20 s.
fn wait_for_blocked_thread(pid: i32) {
    wait_for_blocked_threads(pid, 1)
}

/// Waits until `n` threads of process `pid` are blocked on frozen filesystems.
fn wait_for_blocked_threads(pid: i32, n: usize) {
    let on_freeze = |task: &Path| {
        let in_d = std::fs::read_to_string(task.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('D'))
            })
            .unwrap_or(false);
        // wchan names the wait: percpu_rwsem_wait (sb_start_write) on current kernels.
        let wchan = std::fs::read_to_string(task.join("wchan")).unwrap_or_default();
        in_d && ["percpu_rwsem", "percpu_down", "sb_start", "freeze"]
            .iter()
            .any(|w| wchan.contains(w))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        if tasks.flatten().filter(|t| on_freeze(&t.path())).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no thread of the server blocked on the frozen filesystem within 20 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Identity, capabilities, services
// ---------------------------------------------------------------------------------------------

fn plugin_services(caps: &pb::GetPluginCapabilitiesResponse) -> Vec<i32> {
    caps.capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect()
}

fn controller_rpcs(caps: &pb::ControllerGetCapabilitiesResponse) -> Vec<i32> {
    caps.capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|pb::controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect()
}

#[tokio::test]
async fn identity_reports_name_version_capabilities_and_probe() {
    use pb::plugin_capability::service::Type as S;
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--driver-name=test.loopvol.io"]).await;
    let info = ok(
        csi.id.get_plugin_info(pb::GetPluginInfoRequest {}).await,
        "GetPluginInfo",
    );
    assert_eq!(info.name, "test.loopvol.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = ok(
        csi.id
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    );
    let services = plugin_services(&caps);
    for s in [
        S::ControllerService,
        S::VolumeAccessibilityConstraints,
        S::GroupControllerService,
    ] {
        assert!(
            services.contains(&(s as i32)),
            "{s:?} missing: {services:?}"
        );
    }
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(pb::plugin_capability::Type::VolumeExpansion(e))
            if e.r#type == pb::plugin_capability::volume_expansion::Type::Online as i32
    )));

    let probe = ok(csi.id.probe(pb::ProbeRequest {}).await, "Probe");
    assert_eq!(probe.ready, Some(true));
    // The pool loses its layout (an operator deleted it, a mount went away): not ready.
    std::fs::rename(scratch.pool().join("volumes"), scratch.path("moved")).unwrap();
    assert_code(
        csi.id.probe(pb::ProbeRequest {}).await,
        Code::FailedPrecondition,
        "Probe",
    );
    std::fs::rename(scratch.path("moved"), scratch.pool().join("volumes")).unwrap();
    ok(
        csi.id.probe(pb::ProbeRequest {}).await,
        "Probe after repair",
    );

    let node_caps = ok(
        csi.node
            .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
            .await,
        "NodeGetCapabilities",
    );
    use pb::node_service_capability::rpc::Type as N;
    let node_rpcs: Vec<i32> = node_caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|pb::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for n in [
        N::StageUnstageVolume,
        N::GetVolumeStats,
        N::ExpandVolume,
        N::VolumeCondition,
        N::SingleNodeMultiWriter,
        N::VolumeMountGroup,
    ] {
        assert!(
            node_rpcs.contains(&(n as i32)),
            "node capability {n:?} missing"
        );
    }

    let ctl = ok(
        csi.ctl
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
            .await,
        "ControllerGetCapabilities",
    );
    use pb::controller_service_capability::rpc::Type as C;
    let rpcs = controller_rpcs(&ctl);
    for c in [
        C::CreateDeleteVolume,
        C::ListVolumes,
        C::GetCapacity,
        C::CreateDeleteSnapshot,
        C::ListSnapshots,
        C::CloneVolume,
        C::ListVolumesPublishedNodes,
        C::VolumeCondition,
        C::GetVolume,
        C::SingleNodeMultiWriter,
        C::GetSnapshot,
    ] {
        assert!(
            rpcs.contains(&(c as i32)),
            "controller capability {c:?} missing"
        );
    }
    // A node-local pool has no attach step, and its volumes grow on their node (external-resizer
    // cannot reach the node whose pool holds the image).
    assert!(!rpcs.contains(&(C::PublishUnpublishVolume as i32)));
    assert!(!rpcs.contains(&(C::ExpandVolume as i32)));
    assert!(!rpcs.contains(&(C::ModifyVolume as i32)));

    let group = ok(
        csi.grp
            .group_controller_get_capabilities(pb::GroupControllerGetCapabilitiesRequest {})
            .await,
        "GroupControllerGetCapabilities",
    );
    assert!(group.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(pb::group_controller_service_capability::Type::Rpc(r))
            if r.r#type == pb::group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32
    )));

    let info = ok(
        csi.node.node_get_info(pb::NodeGetInfoRequest {}).await,
        "NodeGetInfo",
    );
    assert_eq!(info.node_id, NODE);
    assert_eq!(info.max_volumes_per_node, 0);
    assert_eq!(info.accessible_topology, Some(topology(NODE)));
}

#[tokio::test]
async fn services_not_served_answer_unimplemented() {
    use pb::plugin_capability::service::Type as S;
    // Controller only: the Node service is not there.
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--mode=controller"]).await;
    assert_code(
        csi.node.node_get_info(pb::NodeGetInfoRequest {}).await,
        Code::Unimplemented,
        "NodeGetInfo in controller mode",
    );
    assert_code(
        csi.node
            .node_stage_volume(stage_req("v", &scratch.path("s"), rwo("ext4")))
            .await,
        Code::Unimplemented,
        "NodeStageVolume in controller mode",
    );
    // ControllerPublish on a node-local pool (no PUBLISH_UNPUBLISH_VOLUME).
    create(&mut csi, "v", MIB, rwo("ext4")).await;
    assert_code(
        csi.ctl
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: "v".into(),
                node_id: NODE.into(),
                volume_capability: Some(rwo("ext4")),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "ControllerPublishVolume on a node-local pool",
    );
    // SnapshotMetadata is not implemented at all.
    let mut meta = pb::snapshot_metadata_client::SnapshotMetadataClient::new(csi.channel.clone());
    assert_code(
        meta.get_metadata_allocated(pb::GetMetadataAllocatedRequest {
            snapshot_id: "s".into(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        Code::Unimplemented,
        "GetMetadataAllocated",
    );
    let services = plugin_services(&ok(
        csi.id
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    ));
    assert!(services.contains(&(S::ControllerService as i32)));

    // Node only: no Controller nor GroupController, and Identity says so.
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--mode=node"]).await;
    assert_code(
        csi.ctl
            .create_volume(create_req("v", MIB, rwo("ext4")))
            .await,
        Code::Unimplemented,
        "CreateVolume in node mode",
    );
    assert_code(
        csi.grp
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "g".into(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "GetVolumeGroupSnapshot in node mode",
    );
    ok(
        csi.node.node_get_info(pb::NodeGetInfoRequest {}).await,
        "NodeGetInfo",
    );
    let services = plugin_services(&ok(
        csi.id
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    ));
    assert!(!services.contains(&(S::ControllerService as i32)));
    assert!(!services.contains(&(S::GroupControllerService as i32)));
}

// ---------------------------------------------------------------------------------------------
// Request validation: required fields, lengths, parameters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_rpc_refuses_missing_required_fields() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    create(c, "v1", MIB, rwo("ext4")).await;
    let bad = Code::InvalidArgument;
    let staging = scratch.path("staging");
    let target = scratch.path("target");

    // CreateVolume
    let full = create_req("v2", MIB, rwo("ext4"));
    let mut r = full.clone();
    r.name.clear();
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume without name",
    );
    let mut r = full.clone();
    r.volume_capabilities.clear();
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume without capabilities",
    );
    let mut r = full.clone();
    r.volume_capabilities[0].access_type = None;
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume without access type",
    );
    let mut r = full.clone();
    r.volume_capabilities[0].access_mode = None;
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume without access mode",
    );
    let mut r = full.clone();
    r.volume_capabilities[0].access_mode = Some(AccessMode {
        mode: Mode::Unknown as i32,
    });
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume with mode UNKNOWN",
    );
    let mut r = full.clone();
    r.volume_content_source = from_snapshot("");
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume with empty snapshot ID",
    );
    let mut r = full.clone();
    r.volume_content_source = from_volume("");
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume with empty source volume ID",
    );
    let mut r = full.clone();
    r.volume_content_source = Some(pb::VolumeContentSource { r#type: None });
    assert_code(
        c.ctl.create_volume(r).await,
        bad,
        "CreateVolume with empty content source",
    );
    // Nothing of the refused requests was created.
    assert_code(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "v2".into(),
            })
            .await,
        Code::NotFound,
        "v2 after refused creates",
    );

    assert_code(
        c.ctl.delete_volume(delete_req("")).await,
        bad,
        "DeleteVolume without ID",
    );

    // ValidateVolumeCapabilities
    assert_code(
        c.ctl
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_capabilities: vec![rwo("")],
                ..Default::default()
            })
            .await,
        bad,
        "ValidateVolumeCapabilities without ID",
    );
    assert_code(
        c.ctl
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "v1".into(),
                ..Default::default()
            })
            .await,
        bad,
        "ValidateVolumeCapabilities without capabilities",
    );
    assert_code(
        c.ctl
            .list_volumes(pb::ListVolumesRequest {
                max_entries: -1,
                ..Default::default()
            })
            .await,
        bad,
        "ListVolumes with negative max_entries",
    );
    let mut cap = rwo("");
    cap.access_mode = None;
    assert_code(
        c.ctl
            .get_capacity(pb::GetCapacityRequest {
                volume_capabilities: vec![cap],
                ..Default::default()
            })
            .await,
        bad,
        "GetCapacity with a capability without mode",
    );

    // Snapshots
    assert_code(
        c.ctl.create_snapshot(snapshot_req("", "v1")).await,
        bad,
        "CreateSnapshot without name",
    );
    assert_code(
        c.ctl.create_snapshot(snapshot_req("s1", "")).await,
        bad,
        "CreateSnapshot without source",
    );
    assert_code(
        c.ctl
            .delete_snapshot(pb::DeleteSnapshotRequest::default())
            .await,
        bad,
        "DeleteSnapshot without ID",
    );
    assert_code(
        c.ctl.get_snapshot(pb::GetSnapshotRequest::default()).await,
        bad,
        "GetSnapshot without ID",
    );
    assert_code(
        c.ctl
            .list_snapshots(pb::ListSnapshotsRequest {
                max_entries: -5,
                ..Default::default()
            })
            .await,
        bad,
        "ListSnapshots with negative max_entries",
    );

    // Expand, get, modify
    assert_code(
        c.ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                capacity_range: range(2 * MIB, 0),
                ..Default::default()
            })
            .await,
        bad,
        "ControllerExpandVolume without ID",
    );
    assert_code(
        c.ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "v1".into(),
                ..Default::default()
            })
            .await,
        bad,
        "ControllerExpandVolume without capacity range",
    );
    assert_code(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest::default())
            .await,
        bad,
        "ControllerGetVolume without ID",
    );
    assert_code(
        c.ctl
            .controller_modify_volume(pb::ControllerModifyVolumeRequest {
                mutable_parameters: [("allocation".to_string(), "thick".to_string())].into(),
                ..Default::default()
            })
            .await,
        bad,
        "ControllerModifyVolume without ID",
    );

    // Node: stage
    let full = stage_req("v1", &staging, rwo("ext4"));
    let mut r = full.clone();
    r.volume_id.clear();
    assert_code(
        c.node.node_stage_volume(r).await,
        bad,
        "NodeStageVolume without ID",
    );
    let mut r = full.clone();
    r.staging_target_path.clear();
    assert_code(
        c.node.node_stage_volume(r).await,
        bad,
        "NodeStageVolume without staging path",
    );
    let mut r = full.clone();
    r.volume_capability = None;
    assert_code(
        c.node.node_stage_volume(r).await,
        bad,
        "NodeStageVolume without capability",
    );
    let mut r = full.clone();
    r.volume_capability.as_mut().unwrap().access_type = None;
    assert_code(
        c.node.node_stage_volume(r).await,
        bad,
        "NodeStageVolume without access type",
    );
    assert_code(
        c.node.node_unstage_volume(unstage_req("", &staging)).await,
        bad,
        "NodeUnstageVolume without ID",
    );
    assert_code(
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: "v1".into(),
                staging_target_path: String::new(),
            })
            .await,
        bad,
        "NodeUnstageVolume without staging path",
    );

    // Node: publish
    let full = publish_req("v1", &staging, &target, rwo("ext4"), false);
    let mut r = full.clone();
    r.volume_id.clear();
    assert_code(
        c.node.node_publish_volume(r).await,
        bad,
        "NodePublishVolume without ID",
    );
    let mut r = full.clone();
    r.target_path.clear();
    assert_code(
        c.node.node_publish_volume(r).await,
        bad,
        "NodePublishVolume without target",
    );
    // STAGE_UNSTAGE_VOLUME is advertised: a publish that names no staging path is told to stage
    // first (FAILED_PRECONDITION), after the checks of malformed fields (csi-sanity sends no
    // staging path and no capability, and wants INVALID_ARGUMENT).
    let mut r = full.clone();
    r.staging_target_path.clear();
    assert_code(
        c.node.node_publish_volume(r.clone()).await,
        Code::FailedPrecondition,
        "NodePublishVolume without staging path",
    );
    r.volume_capability = None;
    assert_code(
        c.node.node_publish_volume(r).await,
        bad,
        "NodePublishVolume without staging path nor capability",
    );
    let mut r = full.clone();
    r.volume_capability = None;
    assert_code(
        c.node.node_publish_volume(r).await,
        bad,
        "NodePublishVolume without capability",
    );
    assert_code(
        c.node
            .node_unpublish_volume(unpublish_req("", &target))
            .await,
        bad,
        "NodeUnpublishVolume without ID",
    );
    assert_code(
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: "v1".into(),
                target_path: String::new(),
            })
            .await,
        bad,
        "NodeUnpublishVolume without target",
    );

    // Node: stats, expand
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        bad,
        "NodeGetVolumeStats without ID",
    );
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "v1".into(),
                ..Default::default()
            })
            .await,
        bad,
        "NodeGetVolumeStats without path",
    );
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        bad,
        "NodeExpandVolume without ID",
    );
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "v1".into(),
                ..Default::default()
            })
            .await,
        bad,
        "NodeExpandVolume without path",
    );

    // Group snapshots
    assert_code(
        c.grp
            .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
                source_volume_ids: vec!["v1".into()],
                ..Default::default()
            })
            .await,
        bad,
        "CreateVolumeGroupSnapshot without name",
    );
    assert_code(
        c.grp
            .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
                name: "g".into(),
                ..Default::default()
            })
            .await,
        bad,
        "CreateVolumeGroupSnapshot without sources",
    );
    assert_code(
        c.grp
            .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest::default())
            .await,
        bad,
        "DeleteVolumeGroupSnapshot without ID",
    );
    assert_code(
        c.grp
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest::default())
            .await,
        bad,
        "GetVolumeGroupSnapshot without ID",
    );

    // Controller publish (served for shared pools only).
    let shared = Scratch::new();
    let (_s2, mut c2) = start(&shared, &["--shared-pool"]).await;
    create(&mut c2, "v1", MIB, rwo("ext4")).await;
    let full = pb::ControllerPublishVolumeRequest {
        volume_id: "v1".into(),
        node_id: NODE.into(),
        volume_capability: Some(rwo("ext4")),
        ..Default::default()
    };
    let mut r = full.clone();
    r.volume_id.clear();
    assert_code(
        c2.ctl.controller_publish_volume(r).await,
        bad,
        "ControllerPublish without ID",
    );
    let mut r = full.clone();
    r.node_id.clear();
    assert_code(
        c2.ctl.controller_publish_volume(r).await,
        bad,
        "ControllerPublish without node",
    );
    let mut r = full.clone();
    r.volume_capability = None;
    assert_code(
        c2.ctl.controller_publish_volume(r).await,
        bad,
        "ControllerPublish without capability",
    );
    assert_code(
        c2.ctl
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                node_id: NODE.into(),
                ..Default::default()
            })
            .await,
        bad,
        "ControllerUnpublish without ID",
    );
}

#[tokio::test]
async fn names_and_ids_of_128_bytes_are_accepted_and_129_refused() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    // A name that is a valid ID becomes the ID itself.
    let name = format!("pvc-{}", "a".repeat(124));
    assert_eq!(name.len(), 128);
    let vol = create(c, &name, MIB, rwo("ext4")).await;
    assert_eq!(vol.volume_id, name);
    assert!(vol.volume_id.len() <= 128);
    ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: name.clone(),
            })
            .await,
        "ControllerGetVolume of a 128-byte ID",
    );
    // Any UTF-8 name of 128 bytes works too (its ID is derived, and short).
    let utf8 = "é".repeat(64);
    assert_eq!(utf8.len(), 128);
    let other = create(c, &utf8, MIB, rwo("ext4")).await;
    assert!(other.volume_id.len() <= 128);
    assert_eq!(
        create(c, &utf8, MIB, rwo("ext4")).await.volume_id,
        other.volume_id
    );

    let snap_name = format!("snap-{}", "b".repeat(123));
    assert_eq!(snap_name.len(), 128);
    let snap = ok(
        c.ctl.create_snapshot(snapshot_req(&snap_name, &name)).await,
        "CreateSnapshot",
    )
    .snapshot
    .unwrap();
    assert_eq!(snap.snapshot_id, snap_name);
    assert_eq!(snap.source_volume_id, name);
    ok(
        c.ctl
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: snap_name.clone(),
                ..Default::default()
            })
            .await,
        "GetSnapshot of a 128-byte ID",
    );

    let long = "c".repeat(129);
    assert_code(
        c.ctl
            .create_volume(create_req(&long, MIB, rwo("ext4")))
            .await,
        Code::InvalidArgument,
        "CreateVolume with a 129-byte name",
    );
    assert_code(
        c.ctl.create_snapshot(snapshot_req(&long, &name)).await,
        Code::InvalidArgument,
        "CreateSnapshot with a 129-byte name",
    );
    assert_code(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: long.clone(),
            })
            .await,
        Code::InvalidArgument,
        "ControllerGetVolume with a 129-byte ID",
    );
    // IDs that could escape the pool are malformed, whatever the RPC.
    for bad in ["../etc", "a/b", ".hidden"] {
        assert_code(
            c.ctl.delete_volume(delete_req(bad)).await,
            Code::InvalidArgument,
            &format!("DeleteVolume {bad:?}"),
        );
    }

    ok(
        c.ctl
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap_name,
                ..Default::default()
            })
            .await,
        "DeleteSnapshot",
    );
    ok(
        c.ctl.delete_volume(delete_req(&name)).await,
        "DeleteVolume of a 128-byte ID",
    );
    ok(
        c.ctl.delete_volume(delete_req(&other.volume_id)).await,
        "DeleteVolume",
    );
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name_and_refuses_incompatible_repeats() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;

    let first = create(c, "pvc-1", 8 * MIB, rwo("ext4")).await;
    assert_eq!(first.capacity_bytes, 8 * MIB);
    assert_eq!(first.accessible_topology, vec![topology(NODE)]);
    for _ in 0..10 {
        let again = create(c, "pvc-1", 8 * MIB, rwo("ext4")).await;
        assert_eq!(again, first);
    }
    // A compatible repeat (the existing size is within the new range) gets the same volume.
    let mut r = create_req("pvc-1", 4 * MIB, rwo("ext4"));
    r.capacity_range = range(4 * MIB, 16 * MIB);
    assert_eq!(
        ok(c.ctl.create_volume(r).await, "compatible repeat")
            .volume
            .unwrap(),
        first
    );
    // Incompatible repeats.
    assert_code(
        c.ctl
            .create_volume(create_req("pvc-1", 16 * MIB, rwo("ext4")))
            .await,
        Code::AlreadyExists,
        "same name, other size",
    );
    assert_code(
        c.ctl
            .create_volume(create_req("pvc-1", 8 * MIB, rwo("btrfs")))
            .await,
        Code::AlreadyExists,
        "same name, other fs type",
    );
    let mut r = create_req("pvc-1", 8 * MIB, rwo("ext4"));
    r.parameters = [("allocation".to_string(), "thick".to_string())].into();
    assert_code(
        c.ctl.create_volume(r).await,
        Code::AlreadyExists,
        "same name, other allocation",
    );
    let vols = ok(
        c.ctl.list_volumes(pb::ListVolumesRequest::default()).await,
        "ListVolumes",
    );
    assert_eq!(vols.entries.len(), 1, "never two volumes for one name");

    // Sizes: default, rounding, range checks.
    let mut r = create_req("default-size", 0, rwo("ext4"));
    r.capacity_range = None;
    assert_eq!(
        ok(c.ctl.create_volume(r).await, "no range")
            .volume
            .unwrap()
            .capacity_bytes,
        GIB
    );
    assert_eq!(
        create(c, "odd", 5000, rwo("ext4")).await.capacity_bytes,
        8192
    );
    let mut r = create_req("bad-range", 8 * MIB, rwo("ext4"));
    r.capacity_range = range(8 * MIB, 4 * MIB);
    assert_code(
        c.ctl.create_volume(r).await,
        Code::OutOfRange,
        "limit below required",
    );
    let mut r = create_req("tiny-xfs", MIB, rwo("xfs"));
    r.capacity_range = range(MIB, 2 * MIB);
    assert_code(
        c.ctl.create_volume(r).await,
        Code::OutOfRange,
        "xfs cannot fit in 2 MiB",
    );
    // Without a limit, a too-small xfs volume is made big enough for mkfs.xfs.
    assert_eq!(
        create(c, "small-xfs", MIB, rwo("xfs")).await.capacity_bytes,
        300 * MIB
    );

    // Parameters: the documented ones and the provisioner's metadata are accepted.
    let mut r = create_req("params", MIB, rwo(""));
    r.parameters = [
        ("csi.storage.k8s.io/fstype", "btrfs"),
        ("allocation", "thick"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
        ("csi.storage.k8s.io/pv/name", "pvc-123"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let thick = ok(c.ctl.create_volume(r).await, "CreateVolume with parameters")
        .volume
        .unwrap();
    assert_eq!(thick.capacity_bytes, 128 * MIB, "btrfs minimum size");
    let image = std::fs::metadata(image_of(&scratch, &thick.volume_id)).unwrap();
    assert!(
        image.blocks() * 512 >= image.len(),
        "thick volume is fully allocated"
    );
    for (k, v) in [("speed", "fast"), ("fsType", "ntfs"), ("allocation", "fat")] {
        let mut r = create_req("bad-param", MIB, rwo(""));
        r.parameters = [(k.to_string(), v.to_string())].into();
        assert_code(
            c.ctl.create_volume(r).await,
            Code::InvalidArgument,
            &format!("parameter {k}={v}"),
        );
    }
    let mut r = create_req("bad-param", MIB, rwo("xfs"));
    r.parameters = [("fsType".to_string(), "ext4".to_string())].into();
    assert_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "fsType disagrees with capability",
    );
    // Capabilities loopvol cannot serve.
    for (what, cap) in [
        ("unknown fs type", rwo("ntfs")),
        (
            "unsafe mount flag",
            mount_cap_with("ext4", Mode::SingleNodeWriter, &["bind"], ""),
        ),
        (
            "mount flag naming a device",
            mount_cap_with("ext4", Mode::SingleNodeWriter, &["logdev=/dev/sda"], ""),
        ),
        (
            "multi-node writer filesystem",
            mount_cap("ext4", Mode::MultiNodeMultiWriter),
        ),
        (
            "multi-node writer block on a node-local pool",
            block_cap(Mode::MultiNodeMultiWriter),
        ),
        (
            "multi-node single writer",
            mount_cap("ext4", Mode::MultiNodeSingleWriter),
        ),
    ] {
        assert_code(
            c.ctl.create_volume(create_req("bad-cap", MIB, cap)).await,
            Code::InvalidArgument,
            what,
        );
    }
    // The modes loopvol does serve.
    for (i, cap) in [
        mount_cap("ext4", Mode::SingleNodeSingleWriter),
        mount_cap("ext4", Mode::SingleNodeMultiWriter),
        mount_cap("ext4", Mode::SingleNodeReaderOnly),
        mount_cap("ext4", Mode::MultiNodeReaderOnly),
        block_cap(Mode::SingleNodeWriter),
    ]
    .into_iter()
    .enumerate()
    {
        create(c, &format!("mode-{i}"), MIB, cap).await;
    }

    // Sources that do not exist; a restore smaller than its source.
    let mut r = create_req("from-missing", MIB, rwo("ext4"));
    r.volume_content_source = from_snapshot("no-such-snapshot");
    assert_code(
        c.ctl.create_volume(r).await,
        Code::NotFound,
        "source snapshot missing",
    );
    let mut r = create_req("from-missing", MIB, rwo("ext4"));
    r.volume_content_source = from_volume("no-such-volume");
    assert_code(
        c.ctl.create_volume(r).await,
        Code::NotFound,
        "source volume missing",
    );
    ok(
        c.ctl.create_snapshot(snapshot_req("snap-1", "pvc-1")).await,
        "CreateSnapshot",
    );
    let mut r = create_req("too-small", 4 * MIB, rwo("ext4"));
    r.volume_content_source = from_snapshot("snap-1");
    assert_code(
        c.ctl.create_volume(r).await,
        Code::OutOfRange,
        "restore smaller than the snapshot",
    );
    // Without a size, a restore or clone takes its source's.
    let mut r = create_req("restored", 0, rwo("ext4"));
    r.capacity_range = None;
    r.volume_content_source = from_snapshot("snap-1");
    let restored = ok(c.ctl.create_volume(r).await, "restore").volume.unwrap();
    assert_eq!(restored.capacity_bytes, 8 * MIB);
    assert_eq!(restored.content_source, from_snapshot("snap-1"));
    let mut r = create_req("clone", 0, rwo("ext4"));
    r.capacity_range = None;
    r.volume_content_source = from_volume("pvc-1");
    let clone = ok(c.ctl.create_volume(r.clone()).await, "clone")
        .volume
        .unwrap();
    assert_eq!(clone.capacity_bytes, 8 * MIB);
    assert_eq!(clone.content_source, from_volume("pvc-1"));
    r.volume_content_source = from_snapshot("snap-1");
    assert_code(
        c.ctl.create_volume(r).await,
        Code::AlreadyExists,
        "same name, other source",
    );
}

#[tokio::test]
async fn topology_confines_node_local_volumes_and_capacity() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--max-volumes-per-node=7"]).await;
    let c = &mut csi;
    let info = ok(
        c.node.node_get_info(pb::NodeGetInfoRequest {}).await,
        "NodeGetInfo",
    );
    assert_eq!(info.max_volumes_per_node, 7);
    assert_eq!(info.accessible_topology, Some(topology(NODE)));

    let mut r = create_req("elsewhere", MIB, rwo("ext4"));
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topology("node-b"), topology("node-c")],
        preferred: vec![topology("node-b")],
    });
    assert_code(
        c.ctl.create_volume(r.clone()).await,
        Code::ResourceExhausted,
        "requisite excludes this node",
    );
    r.accessibility_requirements
        .as_mut()
        .unwrap()
        .requisite
        .push(topology(NODE));
    let vol = ok(c.ctl.create_volume(r).await, "requisite includes this node")
        .volume
        .unwrap();
    assert_eq!(vol.accessible_topology, vec![topology(NODE)]);

    let cap = |t: Option<pb::Topology>| pb::GetCapacityRequest {
        volume_capabilities: vec![rwo("ext4")],
        accessible_topology: t,
        ..Default::default()
    };
    let mine = ok(
        c.ctl.get_capacity(cap(Some(topology(NODE)))).await,
        "GetCapacity here",
    );
    assert!(mine.available_capacity > 0);
    let all = ok(c.ctl.get_capacity(cap(None)).await, "GetCapacity");
    assert!(all.available_capacity > 0);
    let other = ok(
        c.ctl.get_capacity(cap(Some(topology("node-b")))).await,
        "GetCapacity elsewhere",
    );
    assert_eq!(other.available_capacity, 0);
    // A capability loopvol cannot serve has no capacity.
    let none = ok(
        c.ctl
            .get_capacity(pb::GetCapacityRequest {
                volume_capabilities: vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
                ..Default::default()
            })
            .await,
        "GetCapacity for an unsupported mode",
    );
    assert_eq!(none.available_capacity, 0);
    // Capacity is what can still be promised: a thick volume takes its share.
    let before = all.available_capacity;
    let mut r = create_req("thick", 64 * MIB, rwo("ext4"));
    r.parameters = [("allocation".to_string(), "thick".to_string())].into();
    ok(c.ctl.create_volume(r).await, "thick volume");
    let after = ok(c.ctl.get_capacity(cap(None)).await, "GetCapacity").available_capacity;
    assert!(
        after < before,
        "capacity {after} not below {before} after a thick volume"
    );
}

#[tokio::test]
async fn unknown_ids_get_not_found_or_ok_as_the_spec_says() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let staging = scratch.path("staging");
    let target = scratch.path("target");
    let nf = Code::NotFound;
    // Deletions of what does not exist succeed.
    ok(
        c.ctl.delete_volume(delete_req("no-such")).await,
        "DeleteVolume unknown",
    );
    ok(
        c.ctl
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: "no-such".into(),
                ..Default::default()
            })
            .await,
        "DeleteSnapshot unknown",
    );
    ok(
        c.grp
            .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: "no-such".into(),
                ..Default::default()
            })
            .await,
        "DeleteVolumeGroupSnapshot unknown",
    );
    // Everything else: NOT_FOUND.
    assert_code(
        c.ctl
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "no-such".into(),
                volume_capabilities: vec![rwo("ext4")],
                ..Default::default()
            })
            .await,
        nf,
        "ValidateVolumeCapabilities",
    );
    assert_code(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "no-such".into(),
            })
            .await,
        nf,
        "ControllerGetVolume",
    );
    assert_code(
        c.ctl
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: "no-such".into(),
                ..Default::default()
            })
            .await,
        nf,
        "GetSnapshot",
    );
    assert_code(
        c.ctl.create_snapshot(snapshot_req("s", "no-such")).await,
        nf,
        "CreateSnapshot of an unknown volume",
    );
    assert_code(
        c.ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "no-such".into(),
                capacity_range: range(GIB, 0),
                ..Default::default()
            })
            .await,
        nf,
        "ControllerExpandVolume",
    );
    assert_code(
        c.ctl
            .controller_modify_volume(pb::ControllerModifyVolumeRequest {
                volume_id: "no-such".into(),
                mutable_parameters: [("allocation".to_string(), "thick".to_string())].into(),
                ..Default::default()
            })
            .await,
        nf,
        "ControllerModifyVolume",
    );
    assert_code(
        c.grp
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "no-such".into(),
                ..Default::default()
            })
            .await,
        nf,
        "GetVolumeGroupSnapshot",
    );
    assert_code(
        c.grp
            .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
                name: "g".into(),
                source_volume_ids: vec!["no-such".into()],
                ..Default::default()
            })
            .await,
        nf,
        "CreateVolumeGroupSnapshot of an unknown volume",
    );
    assert_code(
        c.node
            .node_stage_volume(stage_req("no-such", &staging, rwo("ext4")))
            .await,
        nf,
        "NodeStageVolume",
    );
    assert_code(
        c.node
            .node_unstage_volume(unstage_req("no-such", &staging))
            .await,
        nf,
        "NodeUnstageVolume",
    );
    assert_code(
        c.node
            .node_publish_volume(publish_req(
                "no-such",
                &staging,
                &target,
                rwo("ext4"),
                false,
            ))
            .await,
        nf,
        "NodePublishVolume",
    );
    assert_code(
        c.node
            .node_unpublish_volume(unpublish_req("no-such", &target))
            .await,
        nf,
        "NodeUnpublishVolume",
    );
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "no-such".into(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        nf,
        "NodeGetVolumeStats",
    );
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "no-such".into(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        nf,
        "NodeExpandVolume",
    );
    // A known volume at a path where it is not: stats are NOT_FOUND too.
    create(c, "known", MIB, rwo("ext4")).await;
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "known".into(),
                volume_path: scratch.path("nowhere").display().to_string(),
                ..Default::default()
            })
            .await,
        nf,
        "NodeGetVolumeStats at an unknown path",
    );
    // csi-sanity's stats checks name a relative path: the volume is not there either.
    for id in ["no-such", "known"] {
        assert_code(
            c.node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: id.into(),
                    volume_path: "some/path".into(),
                    ..Default::default()
                })
                .await,
            nf,
            &format!("NodeGetVolumeStats of {id} at a relative path"),
        );
    }
    // A file that is not the volume's published device.
    let plain = scratch.path("plain-file");
    std::fs::write(&plain, b"x").unwrap();
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "known".into(),
                volume_path: plain.display().to_string(),
                ..Default::default()
            })
            .await,
        nf,
        "NodeGetVolumeStats at a file that is not the volume",
    );
    // Expansion at a path that does not exist: NOT_FOUND, and the image did not grow.
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "known".into(),
                volume_path: scratch.path("nowhere").display().to_string(),
                capacity_range: range(2 * MIB, 0),
                ..Default::default()
            })
            .await,
        nf,
        "NodeExpandVolume at a path that does not exist",
    );
    assert_eq!(
        std::fs::metadata(image_of(&scratch, "known"))
            .unwrap()
            .len(),
        MIB as u64,
        "a refused expansion grew the image"
    );
    // Node operations that find nothing to undo succeed.
    ok(
        c.node
            .node_unstage_volume(unstage_req("known", &staging))
            .await,
        "NodeUnstage of an unstaged volume",
    );
    ok(
        c.node
            .node_unpublish_volume(unpublish_req("known", &target))
            .await,
        "NodeUnpublish of an unpublished target",
    );
}

#[tokio::test]
async fn list_volumes_pages_through_every_volume_once() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let mut want: Vec<String> = Vec::new();
    for i in 0..7 {
        want.push(
            create(c, &format!("vol-{i}"), MIB, rwo("ext4"))
                .await
                .volume_id,
        );
    }
    want.sort();
    let all = ok(
        c.ctl.list_volumes(pb::ListVolumesRequest::default()).await,
        "ListVolumes",
    );
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());
    let entry = &all.entries[0];
    assert_eq!(entry.volume.as_ref().unwrap().capacity_bytes, MIB);
    assert_eq!(
        entry.volume.as_ref().unwrap().accessible_topology,
        vec![topology(NODE)]
    );
    assert!(entry.status.as_ref().unwrap().published_node_ids.is_empty());
    // VOLUME_CONDITION is advertised: every entry carries the volume's condition.
    for e in &all.entries {
        let condition = e.status.as_ref().unwrap().volume_condition.as_ref();
        assert!(condition.is_some_and(|c| !c.abnormal), "{:?}", e.status);
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = ok(
            c.ctl
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 3,
                    starting_token: token.clone(),
                })
                .await,
            "ListVolumes page",
        );
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
        if pages == 1 {
            // A volume deleted between pages does not make the next page skip or repeat any.
            ok(
                c.ctl.delete_volume(delete_req(&seen[0])).await,
                "delete between pages",
            );
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, want, "every volume exactly once, in order");
    // The condition is the volume's own: an image gone from under it is reported.
    std::fs::remove_file(image_of(&scratch, &want[1])).unwrap();
    let listed = ok(
        c.ctl.list_volumes(pb::ListVolumesRequest::default()).await,
        "ListVolumes after an image went missing",
    );
    let broken = listed
        .entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == want[1])
        .and_then(|e| e.status.as_ref()?.volume_condition.as_ref())
        .expect("condition of the broken volume");
    assert!(
        broken.abnormal && broken.message.contains("missing"),
        "{broken:?}"
    );
    for bad in ["garbage", "after:../x", "12"] {
        assert_code(
            c.ctl
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: bad.into(),
                })
                .await,
            Code::Aborted,
            &format!("ListVolumes with token {bad:?}"),
        );
    }
}

#[tokio::test]
async fn snapshots_are_idempotent_listed_filtered_and_paged() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    create(c, "vol-a", 4 * MIB, rwo("ext4")).await;
    create(c, "vol-b", 4 * MIB, rwo("ext4")).await;
    let first = ok(
        c.ctl
            .create_snapshot(snapshot_req("snap-a1", "vol-a"))
            .await,
        "CreateSnapshot",
    )
    .snapshot
    .unwrap();
    assert!(first.ready_to_use);
    assert_eq!(first.size_bytes, 4 * MIB);
    assert!(first.creation_time.as_ref().unwrap().seconds > 0);
    for _ in 0..10 {
        let again = ok(
            c.ctl
                .create_snapshot(snapshot_req("snap-a1", "vol-a"))
                .await,
            "repeat",
        )
        .snapshot
        .unwrap();
        assert_eq!(again, first);
    }
    assert_code(
        c.ctl
            .create_snapshot(snapshot_req("snap-a1", "vol-b"))
            .await,
        Code::AlreadyExists,
        "same snapshot name, other source",
    );
    let mut r = snapshot_req("snap-x", "vol-a");
    r.parameters = [("speed".to_string(), "fast".to_string())].into();
    assert_code(
        c.ctl.create_snapshot(r).await,
        Code::InvalidArgument,
        "unknown snapshot parameter",
    );
    let mut r = snapshot_req("snap-a2", "vol-a");
    r.parameters = [(
        "csi.storage.k8s.io/volumesnapshot/name".to_string(),
        "s".to_string(),
    )]
    .into();
    ok(
        c.ctl.create_snapshot(r).await,
        "snapshot with metadata parameters",
    );
    ok(
        c.ctl
            .create_snapshot(snapshot_req("snap-b1", "vol-b"))
            .await,
        "CreateSnapshot b1",
    );

    let lister = c.ctl.clone();
    let list = |r: pb::ListSnapshotsRequest| {
        let mut ctl = lister.clone();
        async move {
            let reply = ok(ctl.list_snapshots(r).await, "ListSnapshots");
            let ids: Vec<String> = reply
                .entries
                .iter()
                .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
                .collect();
            (ids, reply.next_token)
        }
    };
    let (all, next) = list(pb::ListSnapshotsRequest::default()).await;
    assert_eq!(all, ["snap-a1", "snap-a2", "snap-b1"]);
    assert!(next.is_empty());
    let (of_a, _) = list(pb::ListSnapshotsRequest {
        source_volume_id: "vol-a".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(of_a, ["snap-a1", "snap-a2"]);
    let (one, _) = list(pb::ListSnapshotsRequest {
        snapshot_id: "snap-b1".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(one, ["snap-b1"]);
    let (none, _) = list(pb::ListSnapshotsRequest {
        snapshot_id: "snap-b1".into(),
        source_volume_id: "vol-a".into(),
        ..Default::default()
    })
    .await;
    assert!(none.is_empty());
    let (none, _) = list(pb::ListSnapshotsRequest {
        snapshot_id: "no-such".into(),
        ..Default::default()
    })
    .await;
    assert!(none.is_empty());
    let (none, _) = list(pb::ListSnapshotsRequest {
        source_volume_id: "no-such".into(),
        ..Default::default()
    })
    .await;
    assert!(none.is_empty());
    // Paging.
    let (p1, t1) = list(pb::ListSnapshotsRequest {
        max_entries: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(p1, ["snap-a1", "snap-a2"]);
    assert!(!t1.is_empty());
    let (p2, t2) = list(pb::ListSnapshotsRequest {
        max_entries: 2,
        starting_token: t1,
        ..Default::default()
    })
    .await;
    assert_eq!(p2, ["snap-b1"]);
    assert!(t2.is_empty());
    assert_code(
        c.ctl
            .list_snapshots(pb::ListSnapshotsRequest {
                starting_token: "bogus".into(),
                ..Default::default()
            })
            .await,
        Code::Aborted,
        "ListSnapshots with an invalid token",
    );
    let got = ok(
        c.ctl
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: "snap-a1".into(),
                ..Default::default()
            })
            .await,
        "GetSnapshot",
    );
    assert_eq!(got.snapshot.unwrap(), first);

    // A snapshot outlives its source; deleting it is idempotent.
    ok(
        c.ctl.delete_volume(delete_req("vol-a")).await,
        "delete the source",
    );
    ok(
        c.ctl
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: "snap-a1".into(),
                ..Default::default()
            })
            .await,
        "snapshot after its source is gone",
    );
    for _ in 0..10 {
        ok(
            c.ctl
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: "snap-a1".into(),
                    ..Default::default()
                })
                .await,
            "DeleteSnapshot",
        );
    }
    let (left, _) = list(pb::ListSnapshotsRequest::default()).await;
    assert_eq!(left, ["snap-a2", "snap-b1"]);
}

#[tokio::test]
async fn validate_volume_capabilities_confirms_only_what_is_supported() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    create(c, "vol", MIB, rwo("xfs")).await;
    let validate = |caps: Vec<pb::VolumeCapability>, params: &[(&str, &str)]| {
        pb::ValidateVolumeCapabilitiesRequest {
            volume_id: "vol".into(),
            volume_capabilities: caps,
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    };
    let yes = ok(
        c.ctl
            .validate_volume_capabilities(validate(
                vec![
                    rwo("xfs"),
                    rwo(""),
                    block_cap(Mode::SingleNodeWriter),
                    mount_cap("", Mode::MultiNodeReaderOnly),
                ],
                &[("allocation", "thin")],
            ))
            .await,
        "supported capabilities",
    );
    let confirmed = yes.confirmed.expect("confirmed");
    assert_eq!(confirmed.volume_capabilities.len(), 4);
    assert_eq!(
        confirmed.parameters.get("allocation").map(String::as_str),
        Some("thin")
    );
    for (what, caps, params) in [
        ("another fs type", vec![rwo("ext4")], vec![]),
        ("unknown fs type", vec![rwo("ntfs")], vec![]),
        (
            "multi-node writer filesystem",
            vec![mount_cap("xfs", Mode::MultiNodeMultiWriter)],
            vec![],
        ),
        (
            "one unsupported among supported",
            vec![rwo("xfs"), mount_cap("xfs", Mode::MultiNodeSingleWriter)],
            vec![],
        ),
        (
            "unknown parameter",
            vec![rwo("xfs")],
            vec![("speed", "fast")],
        ),
    ] {
        let reply = ok(
            c.ctl
                .validate_volume_capabilities(validate(caps, &params))
                .await,
            what,
        );
        assert!(reply.confirmed.is_none(), "{what} was confirmed");
        assert!(!reply.message.is_empty(), "{what}: no message");
    }
}

#[tokio::test]
async fn modify_volume_changes_allocation_and_refuses_unknown_parameters() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    create(c, "vol", 32 * MIB, rwo("ext4")).await;
    let allocated = || {
        std::fs::metadata(image_of(&scratch, "vol"))
            .unwrap()
            .blocks()
            * 512
    };
    assert!(allocated() < MIB as u64, "a new volume is thin");
    let modify = |params: &[(&str, &str)]| pb::ControllerModifyVolumeRequest {
        volume_id: "vol".into(),
        mutable_parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    // An unknown parameter beside a valid one: refused, and nothing applied.
    assert_code(
        c.ctl
            .controller_modify_volume(modify(&[("allocation", "thick"), ("iops", "1000")]))
            .await,
        Code::InvalidArgument,
        "unknown mutable parameter",
    );
    assert_code(
        c.ctl
            .controller_modify_volume(modify(&[("allocation", "fat")]))
            .await,
        Code::InvalidArgument,
        "bad allocation value",
    );
    assert!(
        allocated() < MIB as u64,
        "a refused modify allocated the volume"
    );
    for _ in 0..3 {
        ok(
            c.ctl
                .controller_modify_volume(modify(&[("allocation", "thick")]))
                .await,
            "to thick",
        );
    }
    assert!(
        allocated() >= 32 * MIB as u64,
        "thick volume is fully allocated"
    );
    ok(
        c.ctl.controller_modify_volume(modify(&[])).await,
        "no parameters",
    );
    ok(
        c.ctl
            .controller_modify_volume(modify(&[("allocation", "thin")]))
            .await,
        "back to thin",
    );
    // The volume's own create call, repeated, still finds it compatible.
    create(c, "vol", 32 * MIB, rwo("ext4")).await;
}

#[tokio::test]
async fn controller_expand_grows_and_reports_node_expansion() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--shared-pool"]).await;
    let c = &mut csi;
    create(c, "fs", 8 * MIB, rwo("ext4")).await;
    create(c, "raw", 8 * MIB, block_cap(Mode::SingleNodeWriter)).await;
    let expand = |id: &str, required: i64, limit: i64, cap: Option<pb::VolumeCapability>| {
        pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: range(required, limit),
            volume_capability: cap,
            ..Default::default()
        }
    };
    for _ in 0..3 {
        let r = ok(
            c.ctl
                .controller_expand_volume(expand("fs", 16 * MIB, 0, Some(rwo("ext4"))))
                .await,
            "expand fs",
        );
        assert_eq!(r.capacity_bytes, 16 * MIB);
        assert!(r.node_expansion_required);
    }
    let r = ok(
        c.ctl
            .controller_expand_volume(expand(
                "raw",
                16 * MIB,
                0,
                Some(block_cap(Mode::SingleNodeWriter)),
            ))
            .await,
        "expand block",
    );
    assert_eq!(r.capacity_bytes, 16 * MIB);
    assert!(
        !r.node_expansion_required,
        "a block volume needs no node expansion"
    );
    let got = ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "fs".into(),
            })
            .await,
        "ControllerGetVolume",
    );
    assert_eq!(got.volume.unwrap().capacity_bytes, 16 * MIB);
    let status = got.status.unwrap();
    assert!(!status.volume_condition.unwrap().abnormal);
    assert_eq!(
        std::fs::metadata(image_of(&scratch, "fs")).unwrap().len(),
        16 * MIB as u64
    );
    // A smaller size: volumes do not shrink, the current size is returned.
    let r = ok(
        c.ctl
            .controller_expand_volume(expand("fs", 4 * MIB, 0, None))
            .await,
        "shrink request",
    );
    assert_eq!(r.capacity_bytes, 16 * MIB);
    assert_code(
        c.ctl
            .controller_expand_volume(expand("fs", 4 * MIB, 8 * MIB, None))
            .await,
        Code::OutOfRange,
        "limit below the current size",
    );
    assert_code(
        c.ctl
            .controller_expand_volume(expand("fs", 32 * MIB, 16 * MIB, None))
            .await,
        Code::OutOfRange,
        "limit below required",
    );
    assert_code(
        c.ctl
            .controller_expand_volume(expand("fs", 1 << 62, 0, None))
            .await,
        Code::ResourceExhausted,
        "more than the pool holds",
    );
}

#[tokio::test]
async fn group_snapshots_cover_several_volumes() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    create(c, "vol-a", 4 * MIB, rwo("ext4")).await;
    create(c, "vol-b", 4 * MIB, rwo("ext4")).await;
    create(c, "vol-c", 4 * MIB, rwo("ext4")).await;
    let req = |name: &str, ids: &[&str]| pb::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let group = ok(
        c.grp
            .create_volume_group_snapshot(req("group-1", &["vol-a", "vol-b"]))
            .await,
        "create group",
    )
    .group_snapshot
    .unwrap();
    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), 2);
    let mut sources: Vec<&str> = group
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.as_str())
        .collect();
    sources.sort();
    assert_eq!(sources, ["vol-a", "vol-b"]);
    assert!(group
        .snapshots
        .iter()
        .all(|s| s.group_snapshot_id == group.group_snapshot_id));
    for _ in 0..5 {
        let again = ok(
            c.grp
                .create_volume_group_snapshot(req("group-1", &["vol-b", "vol-a"]))
                .await,
            "repeat",
        )
        .group_snapshot
        .unwrap();
        assert_eq!(again, group);
    }
    assert_code(
        c.grp
            .create_volume_group_snapshot(req("group-1", &["vol-a", "vol-c"]))
            .await,
        Code::AlreadyExists,
        "same group name, other volumes",
    );
    let member_ids: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let got = ok(
        c.grp
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: group.group_snapshot_id.clone(),
                snapshot_ids: member_ids.clone(),
                ..Default::default()
            })
            .await,
        "GetVolumeGroupSnapshot",
    );
    assert_eq!(got.group_snapshot.unwrap(), group);
    assert_code(
        c.grp
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: group.group_snapshot_id.clone(),
                snapshot_ids: vec![member_ids[0].clone()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "GetVolumeGroupSnapshot with a wrong member list",
    );
    // Members restore like any snapshot.
    let mut r = create_req("restored", 4 * MIB, rwo("ext4"));
    r.volume_content_source = from_snapshot(&member_ids[0]);
    ok(c.ctl.create_volume(r).await, "restore a group member");
    for _ in 0..3 {
        ok(
            c.grp
                .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: group.group_snapshot_id.clone(),
                    snapshot_ids: member_ids.clone(),
                    ..Default::default()
                })
                .await,
            "DeleteVolumeGroupSnapshot",
        );
    }
    assert_code(
        c.grp
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: group.group_snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "deleted group",
    );
    let left = ok(
        c.ctl
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await,
        "ListSnapshots",
    );
    assert!(left.entries.is_empty());
}

#[tokio::test]
async fn shared_pool_publish_keeps_a_writer_on_one_node() {
    use pb::controller_service_capability::rpc::Type as C;
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--shared-pool"]).await;
    let c = &mut csi;
    // A shared pool has no node topology and does attach.
    let services = plugin_services(&ok(
        c.id.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    ));
    assert!(!services
        .contains(&(pb::plugin_capability::service::Type::VolumeAccessibilityConstraints as i32)));
    let rpcs = controller_rpcs(&ok(
        c.ctl
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
            .await,
        "ControllerGetCapabilities",
    ));
    assert!(rpcs.contains(&(C::PublishUnpublishVolume as i32)));
    assert!(rpcs.contains(&(C::PublishReadonly as i32)));
    assert!(rpcs.contains(&(C::ExpandVolume as i32)));
    assert!(rpcs.contains(&(C::ModifyVolume as i32)));
    assert_eq!(
        ok(
            c.node.node_get_info(pb::NodeGetInfoRequest {}).await,
            "NodeGetInfo"
        )
        .accessible_topology,
        None
    );
    let vol = create(c, "shared", 4 * MIB, rwo("ext4")).await;
    assert!(vol.accessible_topology.is_empty());

    let publish = |node: &str, cap: pb::VolumeCapability, readonly: bool| {
        pb::ControllerPublishVolumeRequest {
            volume_id: "shared".into(),
            node_id: node.into(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }
    };
    let unpublish = |node: &str| pb::ControllerUnpublishVolumeRequest {
        volume_id: "shared".into(),
        node_id: node.into(),
        ..Default::default()
    };
    // A node that never registered (no node plugin ever ran there) is NOT_FOUND; this server
    // serves node-a too, so node-a registered when it started.
    assert_code(
        c.ctl
            .controller_publish_volume(publish("node-b", rwo("ext4"), false))
            .await,
        Code::NotFound,
        "publish to a node that never registered",
    );
    // What the plugins of the other nodes (one with a 256-byte name) do when they start.
    for node in ["node-b".to_owned(), "node-c".to_owned(), "n".repeat(256)] {
        let mut options = loopvol::PoolOptions::new(node.parse().unwrap());
        options.shared = true;
        loopvol::Pool::open(scratch.pool(), options)
            .unwrap()
            .register_node()
            .unwrap();
    }
    for _ in 0..10 {
        ok(
            c.ctl
                .controller_publish_volume(publish("node-a", rwo("ext4"), false))
                .await,
            "publish to node-a",
        );
    }
    assert_code(
        c.ctl
            .controller_publish_volume(publish("node-b", rwo("ext4"), false))
            .await,
        Code::FailedPrecondition,
        "read-write-once volume published to a second node",
    );
    assert_code(
        c.ctl
            .controller_publish_volume(publish("node-a", rwo("ext4"), true))
            .await,
        Code::AlreadyExists,
        "same node, now read-only",
    );
    assert_code(
        c.ctl
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: "no-such".into(),
                ..publish("node-a", rwo("ext4"), false)
            })
            .await,
        Code::NotFound,
        "publish an unknown volume",
    );
    let list = ok(
        c.ctl.list_volumes(pb::ListVolumesRequest::default()).await,
        "ListVolumes",
    );
    assert_eq!(
        list.entries[0].status.as_ref().unwrap().published_node_ids,
        ["node-a"]
    );
    assert_code(
        c.ctl.delete_volume(delete_req("shared")).await,
        Code::FailedPrecondition,
        "delete a published volume",
    );
    for _ in 0..10 {
        ok(
            c.ctl.controller_unpublish_volume(unpublish("node-a")).await,
            "unpublish from node-a",
        );
    }
    ok(
        c.ctl.controller_unpublish_volume(unpublish("node-z")).await,
        "unpublish from a node never published to",
    );
    ok(
        c.ctl
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "no-such".into(),
                node_id: "node-a".into(),
                ..Default::default()
            })
            .await,
        "unpublish an unknown volume",
    );
    ok(
        c.ctl
            .controller_publish_volume(publish("node-b", rwo("ext4"), false))
            .await,
        "now node-b may have it",
    );
    // Node IDs up to 256 bytes (CSI's limit; Kubernetes node names reach 253).
    let long_node = "n".repeat(256);
    assert_code(
        c.ctl
            .controller_publish_volume(publish(&"n".repeat(257), rwo("ext4"), false))
            .await,
        Code::InvalidArgument,
        "a 257-byte node ID",
    );
    assert_code(
        c.ctl
            .controller_publish_volume(publish(&long_node, rwo("ext4"), false))
            .await,
        Code::FailedPrecondition,
        "a 256-byte node ID, while node-b holds the volume",
    );
    ok(
        c.ctl.controller_unpublish_volume(unpublish("node-b")).await,
        "release node-b",
    );
    // Readers share across nodes; a writer then waits for them all.
    let ro = mount_cap("ext4", Mode::MultiNodeReaderOnly);
    ok(
        c.ctl
            .controller_publish_volume(publish("node-a", ro.clone(), true))
            .await,
        "reader on node-a",
    );
    ok(
        c.ctl
            .controller_publish_volume(publish("node-b", ro, true))
            .await,
        "reader on node-b",
    );
    assert_code(
        c.ctl
            .controller_publish_volume(publish("node-c", rwo("ext4"), false))
            .await,
        Code::FailedPrecondition,
        "writer while readers hold it",
    );
    let got = ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "shared".into(),
            })
            .await,
        "ControllerGetVolume",
    );
    let mut nodes = got.status.unwrap().published_node_ids;
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);
    // No node: unpublish everywhere.
    ok(
        c.ctl.controller_unpublish_volume(unpublish("")).await,
        "unpublish from all nodes",
    );
    ok(c.ctl.delete_volume(delete_req("shared")).await, "delete");
    // Many writers only for block volumes on a shared pool.
    create(c, "raw", 4 * MIB, block_cap(Mode::MultiNodeMultiWriter)).await;
    for node in ["node-a", "node-b"] {
        ok(
            c.ctl
                .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                    volume_id: "raw".into(),
                    node_id: node.into(),
                    volume_capability: Some(block_cap(Mode::MultiNodeMultiWriter)),
                    ..Default::default()
                })
                .await,
            "multi-writer block publish",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The process: startup, misconfiguration, logging, shutdown
// ---------------------------------------------------------------------------------------------

fn run_server(args: &[String]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let out = Command::new(binary("loopvol-csi"))
        .args(args)
        .env_remove("CSI_ENDPOINT")
        .env_remove("LOOPVOL_POOL")
        .env_remove("LOOPVOL_LOG")
        .env("LOOPVOL_NODE", NODE)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test]
async fn misconfiguration_fails_fast_with_a_clear_message() {
    let scratch = Scratch::new();
    let sock = format!("--endpoint=unix://{}", scratch.path("csi.sock").display());
    let pool = format!("--pool={}", scratch.pool().display());
    let file = scratch.path("a-file");
    std::fs::write(&file, b"").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                sock.clone(),
                format!("--pool={}", scratch.path("missing").display()),
            ],
            "missing",
        ),
        (
            vec![sock.clone(), format!("--pool={}", file.display())],
            "not a directory",
        ),
        (
            vec!["--endpoint=tcp://127.0.0.1:10000".into(), pool.clone()],
            "unix://",
        ),
        (
            vec!["--endpoint=unix://relative.sock".into(), pool.clone()],
            "absolute",
        ),
        (
            vec![sock.clone(), pool.clone(), "--driver-name=Bad_Name".into()],
            "driver-name",
        ),
        (
            vec![sock.clone(), pool.clone(), "--overcommit=0.5".into()],
            "overcommit",
        ),
        (
            vec![
                sock.clone(),
                pool.clone(),
                "--path-prefix=relative/dir".into(),
            ],
            "path-prefix",
        ),
        (
            vec![sock.clone(), pool.clone(), "--mode=everything".into()],
            "mode",
        ),
        (
            vec![
                format!("--endpoint=unix://{}", file.display()),
                pool.clone(),
            ],
            "not a socket",
        ),
    ];
    for (args, needle) in cases {
        let (code, stderr, took) = run_server(&args);
        assert!(code.is_some_and(|c| c != 0), "{args:?} exited {code:?}");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {stderr}"
        );
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
    assert!(
        !scratch.path("csi.sock").exists(),
        "a failed start left a socket"
    );
    assert!(
        file.is_file(),
        "a regular file at the socket path was replaced"
    );
}

#[tokio::test]
async fn socket_is_private_stale_ones_are_replaced_and_sigterm_removes_it() {
    let scratch = Scratch::new();
    let socket = scratch.path("csi.sock");
    // A stale socket (its server died) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut server = start_server(&scratch, &[]);
    let md = std::fs::metadata(&socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(
        md.permissions().mode() & 0o777,
        0o600,
        "socket must be owner-only"
    );
    let mut csi = connect(&server).await;
    ok(csi.id.probe(pb::ProbeRequest {}).await, "Probe");
    // A second server on the same socket refuses to steal it.
    let (code, stderr, _) = run_server(&[
        format!("--endpoint=unix://{}", socket.display()),
        format!("--pool={}", scratch.pool().display()),
    ]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("another server is listening"), "{stderr}");
    ok(
        csi.id.probe(pb::ProbeRequest {}).await,
        "first server still serves",
    );
    // Nothing else was created beside the socket.
    let mut beside: Vec<String> = std::fs::read_dir(scratch.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["csi.log", "csi.sock", "pool"]);

    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
    assert!(!socket.exists(), "socket left after SIGTERM");
    let log = std::fs::read_to_string(scratch.path("csi.log")).unwrap();
    assert!(
        log.contains("listening") && log.contains(&socket.display().to_string()),
        "{log}"
    );
    assert!(log.contains("SIGTERM"), "{log}");

    // SIGINT too.
    let mut server = start_server(&scratch, &[]);
    server.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        server.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );
    assert!(!socket.exists(), "socket left after SIGINT");
}

#[tokio::test]
async fn requests_are_logged_without_secrets_or_mount_flags() {
    let scratch = Scratch::new();
    let (server, mut csi) = start(&scratch, &[]).await;
    let secrets: HashMap<String, String> =
        [("password".to_string(), "hunter2-secret-value".to_string())].into();
    let mut r = create_req("logged", MIB, rwo("ext4"));
    r.secrets = secrets.clone();
    ok(csi.ctl.create_volume(r).await, "CreateVolume with secrets");
    // A refused mount flag whose value is a credential: the reply and the log say what was
    // wrong without repeating it.
    let mut r = create_req(
        "logged-2",
        MIB,
        mount_cap_with(
            "ext4",
            Mode::SingleNodeWriter,
            &["password=flag-s3cret-value;x"],
            "",
        ),
    );
    r.secrets = secrets.clone();
    let err = csi.ctl.create_volume(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        !err.message().contains("flag-s3cret-value"),
        "{}",
        err.message()
    );
    let mut stage = stage_req(
        "logged",
        &scratch.path("staging"),
        mount_cap_with(
            "ext4",
            Mode::SingleNodeWriter,
            &["user=flag-user-value", "bind"],
            "",
        ),
    );
    stage.secrets = secrets;
    assert_code(
        csi.node.node_stage_volume(stage).await,
        Code::InvalidArgument,
        "stage with a bind flag",
    );
    ok(
        csi.ctl.delete_volume(delete_req("logged")).await,
        "DeleteVolume",
    );

    let log = server.log_text();
    for needle in [
        "CreateVolume",
        "DeleteVolume",
        "NodeStageVolume",
        "logged",
        "duration_ms",
        "InvalidArgument",
        "OK",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    for secret in [
        "hunter2-secret-value",
        "flag-s3cret-value",
        "flag-user-value",
    ] {
        assert!(!log.contains(secret), "log leaks {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn paths_are_confined_to_prefixes_and_never_system_directories() {
    let scratch = Scratch::new();
    let kubelet = scratch.path("kubelet");
    let (_server, mut csi) =
        start(&scratch, &[&format!("--path-prefix={}", kubelet.display())]).await;
    let c = &mut csi;
    create(c, "vol", MIB, rwo("ext4")).await;
    let inside = kubelet.join("plugins/x/globalmount");
    let bad_paths = [
        scratch.path("outside"),
        PathBuf::from("/etc/loopvol-x"),
        PathBuf::from("/proc/1/root"),
        PathBuf::from("/"),
        kubelet.join("../outside"),
        kubelet.join("a//b"),
        PathBuf::from("relative/path"),
        kubelet.clone(),
    ];
    for bad in &bad_paths {
        let what = format!("stage at {}", bad.display());
        assert_code(
            c.node
                .node_stage_volume(stage_req("vol", bad, rwo("ext4")))
                .await,
            Code::InvalidArgument,
            &what,
        );
        let what = format!("publish at {}", bad.display());
        assert_code(
            c.node
                .node_publish_volume(publish_req("vol", &inside, bad, rwo("ext4"), false))
                .await,
            Code::InvalidArgument,
            &what,
        );
        assert_code(
            c.node
                .node_unpublish_volume(unpublish_req("vol", bad))
                .await,
            Code::InvalidArgument,
            &format!("unpublish at {}", bad.display()),
        );
        assert_code(
            c.node.node_unstage_volume(unstage_req("vol", bad)).await,
            Code::InvalidArgument,
            &format!("unstage at {}", bad.display()),
        );
    }
    assert!(!scratch.path("outside").exists());
    // Without prefixes, system directories are still refused.
    let other = Scratch::new();
    let (_s2, mut c2) = start(&other, &[]).await;
    create(&mut c2, "vol", MIB, rwo("ext4")).await;
    for bad in ["/etc/x", "/usr/lib/x", "/sys/x", "/dev/x", "/boot/x", "/"] {
        assert_code(
            c2.node
                .node_stage_volume(stage_req("vol", Path::new(bad), rwo("ext4")))
                .await,
            Code::InvalidArgument,
            &format!("stage at {bad}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Root: real loop devices, filesystems and mounts
// ---------------------------------------------------------------------------------------------

/// A staging path the way kubelet lays them out (under `<scratch>/kubelet`).
fn staging_path(scratch: &Scratch, id: &str) -> PathBuf {
    scratch.path(&format!(
        "kubelet/plugins/kubernetes.io/csi/csi.loopvol.io/{id}/globalmount"
    ))
}

/// A pod's target path (under `<scratch>/kubelet`).
fn target_path(scratch: &Scratch, pod: &str, id: &str) -> PathBuf {
    scratch.path(&format!(
        "kubelet/pods/{pod}/volumes/kubernetes.io~csi/{id}/mount"
    ))
}

fn kubelet_prefix(scratch: &Scratch) -> String {
    format!("--path-prefix={}", scratch.path("kubelet").display())
}

async fn stage(c: &mut Csi, id: &str, staging: &Path, cap: pb::VolumeCapability) {
    ok(
        c.node.node_stage_volume(stage_req(id, staging, cap)).await,
        "NodeStageVolume",
    );
}

async fn publish(
    c: &mut Csi,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) {
    ok(
        c.node
            .node_publish_volume(publish_req(id, staging, target, cap, readonly))
            .await,
        "NodePublishVolume",
    );
}

async fn unpublish(c: &mut Csi, id: &str, target: &Path) {
    ok(
        c.node
            .node_unpublish_volume(unpublish_req(id, target))
            .await,
        "NodeUnpublishVolume",
    );
}

async fn unstage(c: &mut Csi, id: &str, staging: &Path) {
    ok(
        c.node.node_unstage_volume(unstage_req(id, staging)).await,
        "NodeUnstageVolume",
    );
}

#[tokio::test]
async fn mount_lifecycle_repeated_ten_times_gives_the_same_results() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[&kubelet_prefix(&scratch)]).await;
    let c = &mut csi;
    let cap = mount_cap_with("ext4", Mode::SingleNodeWriter, &["noatime"], "4242");
    let staging = staging_path(&scratch, "pvc-life");
    let target = target_path(&scratch, "pod-1", "pvc-life");

    let first = create(c, "pvc-life", 64 * MIB, cap.clone()).await;
    for _ in 0..10 {
        assert_eq!(create(c, "pvc-life", 64 * MIB, cap.clone()).await, first);
    }
    let id = first.volume_id.clone();

    for _ in 0..10 {
        stage(c, &id, &staging, cap.clone()).await;
        let (fs, options) = mount_at(&staging).expect("staged mount");
        assert_eq!(fs, "ext4");
        for o in ["nodev", "nosuid", "noatime", "rw"] {
            assert!(
                options.iter().any(|x| x == o),
                "staging mount lacks {o}: {options:?}"
            );
        }
        assert_eq!(
            loops_of(&scratch, &id).len(),
            1,
            "one loop device, whatever the repeats"
        );
        assert_eq!(mounts_under(&scratch.root()).len(), 1);
    }
    // Incompatible repeats at the same staging path.
    assert_code(
        c.node
            .node_stage_volume(stage_req(&id, &staging, rwo("xfs")))
            .await,
        Code::AlreadyExists,
        "stage again as another fs type",
    );
    create(c, "pvc-other", 64 * MIB, rwo("ext4")).await;
    assert_code(
        c.node
            .node_stage_volume(stage_req("pvc-other", &staging, rwo("ext4")))
            .await,
        Code::AlreadyExists,
        "another volume at the same staging path",
    );
    assert!(
        loops_of(&scratch, "pvc-other").is_empty(),
        "a refused stage left a loop device"
    );

    for _ in 0..10 {
        publish(c, &id, &staging, &target, cap.clone(), false).await;
        let (fs, options) = mount_at(&target).expect("published mount");
        assert_eq!(fs, "ext4");
        assert!(options.iter().any(|x| x == "nodev") && options.iter().any(|x| x == "nosuid"));
        assert_eq!(mounts_under(&scratch.root()).len(), 2, "no stacked binds");
    }
    // VOLUME_MOUNT_GROUP: the volume's root belongs to the pod's fsGroup, setgid.
    let root = std::fs::metadata(&target).unwrap();
    assert_eq!(root.gid(), 4242);
    assert!(root.mode() & 0o2070 == 0o2070, "mode {:o}", root.mode());
    std::fs::write(target.join("data"), b"lifecycle").unwrap();
    assert_code(
        c.node
            .node_publish_volume(publish_req(&id, &staging, &target, cap.clone(), true))
            .await,
        Code::AlreadyExists,
        "publish the same target read-only",
    );
    // A second pod on the same node.
    let target2 = target_path(&scratch, "pod-2", "pvc-life");
    publish(c, &id, &staging, &target2, cap.clone(), true).await;
    assert_eq!(std::fs::read(target2.join("data")).unwrap(), b"lifecycle");
    assert!(
        std::fs::write(target2.join("x"), b"x").is_err(),
        "read-only publish is writable"
    );
    unpublish(c, &id, &target2).await;
    assert!(!target2.exists(), "unpublish leaves the target directory");
    // Publishing without staging first: FAILED_PRECONDITION.
    let other_target = target_path(&scratch, "pod-3", "pvc-other");
    assert_code(
        c.node
            .node_publish_volume(publish_req(
                "pvc-other",
                &staging_path(&scratch, "pvc-other"),
                &other_target,
                rwo("ext4"),
                false,
            ))
            .await,
        Code::FailedPrecondition,
        "publish an unstaged volume",
    );

    for path in [&target, &staging] {
        let stats = ok(
            c.node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: path.display().to_string(),
                    ..Default::default()
                })
                .await,
            "NodeGetVolumeStats",
        );
        let bytes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .unwrap();
        let inodes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Inodes as i32)
            .unwrap();
        assert!(
            bytes.total > 50 * MIB && bytes.total <= 64 * MIB,
            "{bytes:?}"
        );
        assert!(bytes.used > 0 && bytes.available > 0);
        assert!(inodes.total > 0 && inodes.used > 0);
        assert!(!stats.volume_condition.unwrap().abnormal);
    }
    // A directory that exists but is not where the volume is mounted: NOT_FOUND (not an OK for
    // a filesystem that never grew), and the image stays as it was.
    let elsewhere = scratch.path("kubelet/elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: elsewhere.display().to_string(),
                capacity_range: range(128 * MIB, 0),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeExpandVolume at a directory that is not the volume",
    );
    assert_eq!(
        std::fs::metadata(image_of(&scratch, &id)).unwrap().len(),
        64 * MIB as u64
    );
    assert_code(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: elsewhere.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeGetVolumeStats at a directory that is not the volume",
    );
    let got = ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await,
        "ControllerGetVolume",
    );
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, [NODE]);
    assert!(!status.volume_condition.unwrap().abnormal);

    // In use: neither deletion nor unstaging may pull it from under the pod.
    assert_code(
        c.ctl.delete_volume(delete_req(&id)).await,
        Code::FailedPrecondition,
        "delete while published",
    );
    assert_code(
        c.node.node_unstage_volume(unstage_req(&id, &staging)).await,
        Code::FailedPrecondition,
        "unstage while published",
    );
    assert!(
        mount_at(&staging).is_some(),
        "a refused unstage unmounted the staging path"
    );

    for _ in 0..10 {
        unpublish(c, &id, &target).await;
        assert!(mount_at(&target).is_none());
        assert!(!target.exists());
    }
    for _ in 0..10 {
        unstage(c, &id, &staging).await;
        assert!(mount_at(&staging).is_none());
        assert!(
            loops_of(&scratch, &id).is_empty(),
            "loop device left after unstage"
        );
    }
    // Staged again later: the data is still there.
    stage(c, &id, &staging, cap.clone()).await;
    publish(c, &id, &staging, &target, cap.clone(), false).await;
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"lifecycle");
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;

    for _ in 0..10 {
        ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
    }
    assert!(!scratch.pool().join("volumes").join(&id).exists());
    assert!(mounts_under(&scratch.root()).is_empty());
    assert!(loops_under(&scratch.root()).is_empty());
}

#[tokio::test]
async fn block_volumes_work_end_to_end() {
    if !require_root(&[]) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[&kubelet_prefix(&scratch)]).await;
    let c = &mut csi;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = create(c, "pvc-block", 16 * MIB, cap.clone())
        .await
        .volume_id;
    let staging = scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-block");
    let target =
        scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-block/pod-1");
    for _ in 0..10 {
        stage(c, &id, &staging, cap.clone()).await;
        assert_eq!(loops_of(&scratch, &id).len(), 1);
    }
    for _ in 0..10 {
        publish(c, &id, &staging, &target, cap.clone(), false).await;
        assert!(
            std::fs::metadata(&target)
                .unwrap()
                .file_type()
                .is_block_device(),
            "target is not the device"
        );
        assert_eq!(mounts_under(&scratch.root()).len(), 1);
    }
    // Write through the published device file, read it back.
    let data = pattern(64 * 1024, 7);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        f.write_all_at(&data, MIB as u64).unwrap();
        f.sync_all().unwrap();
    }
    let read_back = |path: &Path| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; data.len()];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, MIB as u64)
            .unwrap();
        buf
    };
    assert_eq!(read_back(&target), data);
    // A read-only publication of the same device shows the data. (Writes through it are refused
    // by the container runtime's device rules: a read-only bind cannot stop writes to a device
    // node.)
    let ro_target =
        scratch.path("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-block/pod-2");
    publish(c, &id, &staging, &ro_target, cap.clone(), true).await;
    assert_eq!(read_back(&ro_target), data);
    let (_, options) = mount_at(&ro_target).unwrap();
    assert!(options.iter().any(|o| o == "ro"), "{options:?}");
    unpublish(c, &id, &ro_target).await;
    // A block volume expands without a filesystem step.
    let grown = ok(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: range(32 * MIB, 0),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await,
        "NodeExpandVolume of a block volume",
    );
    assert_eq!(grown.capacity_bytes, 32 * MIB);
    let dev_size = {
        let f = std::fs::File::open(&target).unwrap();
        use std::io::Seek;
        let mut f = f;
        f.seek(std::io::SeekFrom::End(0)).unwrap()
    };
    assert_eq!(
        dev_size,
        32 * MIB as u64,
        "the published device did not grow"
    );
    let stats = ok(
        c.node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        "NodeGetVolumeStats of a block volume",
    );
    assert_eq!(stats.usage[0].total, 32 * MIB);

    for _ in 0..10 {
        unpublish(c, &id, &target).await;
        assert!(!target.exists());
    }
    for _ in 0..10 {
        unstage(c, &id, &staging).await;
        assert!(loops_of(&scratch, &id).is_empty());
    }
    // The data is in the image: attach again and read it.
    stage(c, &id, &staging, cap.clone()).await;
    publish(c, &id, &staging, &target, cap.clone(), false).await;
    assert_eq!(read_back(&target), data);
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;
    // A reader-only mode attaches the device itself read-only: no write reaches the image.
    let reader = block_cap(Mode::SingleNodeReaderOnly);
    stage(c, &id, &staging, reader.clone()).await;
    publish(c, &id, &staging, &target, reader.clone(), true).await;
    assert_eq!(read_back(&target), data);
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"x", 0)?;
            f.sync_all()
        });
    assert!(refused.is_err(), "a reader-only block volume took a write");
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;
    for _ in 0..10 {
        ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
    }
    assert!(mounts_under(&scratch.root()).is_empty());
    assert!(loops_under(&scratch.root()).is_empty());
}

#[tokio::test]
async fn single_node_single_writer_is_published_for_one_workload_at_a_time() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[&kubelet_prefix(&scratch)]).await;
    let c = &mut csi;
    // ReadWriteOncePod: Kubernetes sends SINGLE_NODE_SINGLE_WRITER (SINGLE_NODE_MULTI_WRITER is
    // advertised), which the spec defines as one workload at a time.
    let once = mount_cap("ext4", Mode::SingleNodeSingleWriter);
    let id = create(c, "pvc-rwop", 16 * MIB, once.clone())
        .await
        .volume_id;
    let staging = staging_path(&scratch, &id);
    let (first, second) = (
        target_path(&scratch, "pod-1", &id),
        target_path(&scratch, "pod-2", &id),
    );
    stage(c, &id, &staging, once.clone()).await;
    for _ in 0..3 {
        publish(c, &id, &staging, &first, once.clone(), false).await;
    }
    assert_code(
        c.node
            .node_publish_volume(publish_req(&id, &staging, &second, once.clone(), false))
            .await,
        Code::FailedPrecondition,
        "a second workload of a SINGLE_NODE_SINGLE_WRITER volume",
    );
    assert!(mount_at(&second).is_none());
    unpublish(c, &id, &first).await;
    publish(c, &id, &staging, &second, once.clone(), false).await;
    // SINGLE_NODE_MULTI_WRITER (ReadWriteOnce) and the older SINGLE_NODE_WRITER share the node.
    for mode in [Mode::SingleNodeMultiWriter, Mode::SingleNodeWriter] {
        publish(c, &id, &staging, &first, mount_cap("ext4", mode), false).await;
        unpublish(c, &id, &first).await;
    }
    unpublish(c, &id, &second).await;
    unstage(c, &id, &staging).await;
    assert!(loops_of(&scratch, &id).is_empty());
}

#[tokio::test]
async fn reader_only_modes_stage_and_publish_read_only() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let id = create(c, "pvc-ro", 32 * MIB, rwo("ext4")).await.volume_id;
    let staging = staging_path(&scratch, &id);
    let target = target_path(&scratch, "p", &id);
    // Written once read-write...
    stage(c, &id, &staging, rwo("ext4")).await;
    publish(c, &id, &staging, &target, rwo("ext4"), false).await;
    std::fs::write(target.join("seed"), b"seed").unwrap();
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;
    // ...then used by readers.
    let ro = mount_cap("ext4", Mode::MultiNodeReaderOnly);
    for _ in 0..3 {
        stage(c, &id, &staging, ro.clone()).await;
    }
    let (_, options) = mount_at(&staging).unwrap();
    assert!(
        options.iter().any(|o| o == "ro"),
        "reader-only stage is not read-only: {options:?}"
    );
    publish(c, &id, &staging, &target, ro.clone(), false).await;
    assert_eq!(std::fs::read(target.join("seed")).unwrap(), b"seed");
    let err = std::fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;
    assert!(loops_under(&scratch.root()).is_empty());
    // A blank volume cannot be formatted read-only.
    let blank = create(c, "pvc-blank", 32 * MIB, rwo("ext4"))
        .await
        .volume_id;
    assert_code(
        c.node
            .node_stage_volume(stage_req(&blank, &staging_path(&scratch, &blank), ro))
            .await,
        Code::FailedPrecondition,
        "read-only stage of a blank volume",
    );
}

#[tokio::test]
async fn snapshot_restore_and_clone_preserve_contents() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    let src = create(c, "pvc-src", 64 * MIB, cap.clone()).await.volume_id;
    let (s_stage, s_target) = (
        staging_path(&scratch, &src),
        target_path(&scratch, "p0", &src),
    );
    stage(c, &src, &s_stage, cap.clone()).await;
    publish(c, &src, &s_stage, &s_target, cap.clone(), false).await;
    let before = pattern(512 * 1024, 1);
    std::fs::write(s_target.join("data.bin"), &before).unwrap();

    // Snapshot of the mounted volume (frozen while copied), then the source changes.
    let snap = ok(
        c.ctl.create_snapshot(snapshot_req("snap-1", &src)).await,
        "CreateSnapshot",
    )
    .snapshot
    .unwrap();
    assert!(snap.ready_to_use);
    let after = pattern(512 * 1024, 2);
    std::fs::write(s_target.join("data.bin"), &after).unwrap();
    std::fs::write(s_target.join("later.txt"), b"after the snapshot").unwrap();

    // Restore, larger than the snapshot: the filesystem grows when staged.
    let mut r = create_req("pvc-restored", 128 * MIB, cap.clone());
    r.volume_content_source = from_snapshot(&snap.snapshot_id);
    let restored = ok(c.ctl.create_volume(r).await, "restore")
        .volume
        .unwrap()
        .volume_id;
    // Clone of the (mounted, changed) source.
    let mut r = create_req("pvc-clone", 64 * MIB, cap.clone());
    r.volume_content_source = from_volume(&src);
    let clone = ok(c.ctl.create_volume(r).await, "clone")
        .volume
        .unwrap()
        .volume_id;

    let (r_stage, r_target) = (
        staging_path(&scratch, &restored),
        target_path(&scratch, "p1", &restored),
    );
    stage(c, &restored, &r_stage, cap.clone()).await;
    publish(c, &restored, &r_stage, &r_target, cap.clone(), false).await;
    assert!(
        std::fs::read(r_target.join("data.bin")).unwrap() == before,
        "restored contents differ from the snapshot"
    );
    assert!(
        !r_target.join("later.txt").exists(),
        "restore holds a write made after the snapshot"
    );
    assert!(
        statvfs_total(&r_target) > 100 * MIB as u64,
        "the restored filesystem did not grow to its volume"
    );

    let (c_stage, c_target) = (
        staging_path(&scratch, &clone),
        target_path(&scratch, "p2", &clone),
    );
    stage(c, &clone, &c_stage, cap.clone()).await;
    publish(c, &clone, &c_stage, &c_target, cap.clone(), false).await;
    assert!(
        std::fs::read(c_target.join("data.bin")).unwrap() == after,
        "clone contents differ from the source"
    );
    assert_eq!(
        std::fs::read(c_target.join("later.txt")).unwrap(),
        b"after the snapshot"
    );
    // Independent copies: writing the clone leaves the source alone.
    std::fs::write(c_target.join("data.bin"), b"clone only").unwrap();
    assert!(std::fs::read(s_target.join("data.bin")).unwrap() == after);

    for (id, st, tg) in [
        (&src, &s_stage, &s_target),
        (&restored, &r_stage, &r_target),
        (&clone, &c_stage, &c_target),
    ] {
        unpublish(c, id, tg).await;
        unstage(c, id, st).await;
        ok(c.ctl.delete_volume(delete_req(id)).await, "DeleteVolume");
    }
    ok(
        c.ctl
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await,
        "DeleteSnapshot",
    );
    assert!(loops_under(&scratch.root()).is_empty());
}

/// Stages and publishes a `fs` volume of `initial` bytes, grows it to `grown` and checks the
/// mounted filesystem sees the new size. `shared`: through ControllerExpandVolume first (a
/// shared pool), else NodeExpandVolume alone (a node-local pool grows on its node).
async fn expand_online(fs: &str, initial: i64, grown: i64, shared: bool) {
    let scratch = Scratch::new();
    let extra: &[&str] = if shared { &["--shared-pool"] } else { &[] };
    let (_server, mut csi) = start(&scratch, extra).await;
    let c = &mut csi;
    let cap = rwo(fs);
    let id = create(c, &format!("pvc-{fs}"), initial, cap.clone())
        .await
        .volume_id;
    let (staging, target) = (staging_path(&scratch, &id), target_path(&scratch, "p", &id));
    stage(c, &id, &staging, cap.clone()).await;
    publish(c, &id, &staging, &target, cap.clone(), false).await;
    std::fs::write(target.join("keep"), b"kept").unwrap();
    let before = statvfs_total(&target);
    assert!(before <= initial as u64);
    if shared {
        let r = ok(
            c.ctl
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: range(grown, 0),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            "ControllerExpandVolume",
        );
        assert!(r.node_expansion_required);
        assert_eq!(r.capacity_bytes, grown);
        assert_code(
            c.node
                .node_expand_volume(pb::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    capacity_range: range(2 * grown, 0),
                    ..Default::default()
                })
                .await,
            Code::OutOfRange,
            "NodeExpandVolume beyond the controller's size",
        );
    }
    for _ in 0..3 {
        let r = ok(
            c.node
                .node_expand_volume(pb::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: staging.display().to_string(),
                    capacity_range: range(grown, 0),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await,
            "NodeExpandVolume",
        );
        assert_eq!(r.capacity_bytes, grown);
    }
    let after = statvfs_total(&target);
    assert!(
        after > before + (grown - initial) as u64 / 2,
        "{fs}: mounted filesystem {before} -> {after} bytes after growing {initial} -> {grown}"
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"kept");
    let got = ok(
        c.ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await,
        "ControllerGetVolume",
    );
    assert_eq!(got.volume.unwrap().capacity_bytes, grown);
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: range(0, initial),
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "NodeExpandVolume with a limit below the size",
    );
    assert_code(
        c.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: scratch.path("kubelet/nowhere").display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeExpandVolume at a path that does not exist",
    );
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;
    ok(c.ctl.delete_volume(delete_req(&id)).await, "DeleteVolume");
}

#[tokio::test]
async fn xfs_grows_online_on_its_node() {
    if require_root(fs_tools("xfs")) {
        expand_online("xfs", 300 * MIB, 600 * MIB, false).await;
    }
}

#[tokio::test]
async fn btrfs_grows_online_after_controller_expansion() {
    if require_root(fs_tools("btrfs")) {
        expand_online("btrfs", 256 * MIB, 512 * MIB, true).await;
    }
}

#[tokio::test]
async fn ext4_grows_online_or_says_why_and_grows_at_the_next_stage() {
    if !require_root(fs_tools("ext4")) {
        return;
    }
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    let id = create(c, "pvc-ext4", 64 * MIB, cap.clone()).await.volume_id;
    let (staging, target) = (staging_path(&scratch, &id), target_path(&scratch, "p", &id));
    stage(c, &id, &staging, cap.clone()).await;
    publish(c, &id, &staging, &target, cap.clone(), false).await;
    let before = statvfs_total(&target);
    let expand = pb::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        capacity_range: range(128 * MIB, 0),
        ..Default::default()
    };
    let online = loopvol::testing::fs::can_grow_ext4_online();
    let result = c.node.node_expand_volume(expand.clone()).await;
    if online {
        ok(result, "online ext4 growth with CAP_SYS_RESOURCE");
        assert!(statvfs_total(&target) > before + 32 * MIB as u64);
    } else {
        // No CAP_SYS_RESOURCE (as in most containers): a clear refusal, not a silent no-op...
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(
            err.message().contains("CAP_SYS_RESOURCE"),
            "{}",
            err.message()
        );
        assert_eq!(statvfs_total(&target), before);
        // ...and the next stage grows it offline.
        unpublish(c, &id, &target).await;
        unstage(c, &id, &staging).await;
        stage(c, &id, &staging, cap.clone()).await;
        publish(c, &id, &staging, &target, cap.clone(), false).await;
        assert!(
            statvfs_total(&target) > before + 32 * MIB as u64,
            "ext4 not grown at the next stage: {before} -> {}",
            statvfs_total(&target)
        );
        ok(
            c.node.node_expand_volume(expand).await,
            "NodeExpandVolume once grown",
        );
    }
    unpublish(c, &id, &target).await;
    unstage(c, &id, &staging).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_call_on_a_busy_volume_is_aborted_while_others_proceed() {
    if !require_root(&["fsfreeze", "mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    let a = create(c, "pvc-a", 32 * MIB, cap.clone()).await.volume_id;
    let b = create(c, "pvc-b", 32 * MIB, cap.clone()).await.volume_id;
    let (a_stage, a_target) = (staging_path(&scratch, &a), target_path(&scratch, "p", &a));
    stage(c, &a, &a_stage, cap.clone()).await;

    // Hold a NodePublish of A in flight: it applies the pod's fsGroup to the volume's root, and
    // that write waits while the filesystem is frozen.
    let frozen = Frozen::freeze(&a_stage);
    let with_group = mount_cap_with("ext4", Mode::SingleNodeWriter, &[], "4242");
    let first = {
        let mut node = c.node.clone();
        let req = publish_req(&a, &a_stage, &a_target, with_group.clone(), false);
        tokio::spawn(async move { node.node_publish_volume(req).await })
    };
    wait_for_blocked_thread(server.pid());

    // The same call again (a CO retrying after its timeout), and other calls on A: ABORTED.
    let retry = c
        .node
        .node_publish_volume(publish_req(
            &a,
            &a_stage,
            &a_target,
            with_group.clone(),
            false,
        ))
        .await;
    assert_code(
        retry,
        Code::Aborted,
        "the same publish while the first is in flight",
    );
    assert_code(
        c.node.node_unstage_volume(unstage_req(&a, &a_stage)).await,
        Code::Aborted,
        "unstage A",
    );
    assert_code(
        c.ctl.delete_volume(delete_req(&a)).await,
        Code::Aborted,
        "delete A",
    );
    assert!(
        !first.is_finished(),
        "the first call finished while A was frozen"
    );

    // Another volume is not held up.
    let other = async {
        let (b_stage, b_target) = (staging_path(&scratch, &b), target_path(&scratch, "p", &b));
        stage(c, &b, &b_stage, cap.clone()).await;
        publish(c, &b, &b_stage, &b_target, cap.clone(), false).await;
        unpublish(c, &b, &b_target).await;
        unstage(c, &b, &b_stage).await;
    };
    tokio::time::timeout(Duration::from_secs(60), other)
        .await
        .expect("a call on another volume waited for the busy one");
    assert!(!first.is_finished());

    // A caller that gives up (its deadline passes) does not release the volume: the work goes on
    // in the background, and a retry is ABORTED until it ends.
    let v = create(c, "pvc-c", 32 * MIB, cap.clone()).await.volume_id;
    let (v_stage, v_target) = (staging_path(&scratch, &v), target_path(&scratch, "p", &v));
    stage(c, &v, &v_stage, cap.clone()).await;
    let frozen_v = Frozen::freeze(&v_stage);
    let mut impatient = tonic::Request::new(publish_req(
        &v,
        &v_stage,
        &v_target,
        with_group.clone(),
        false,
    ));
    impatient.set_timeout(Duration::from_millis(300));
    let gave_up = c.node.node_publish_volume(impatient).await.unwrap_err();
    assert!(
        matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gave_up:?}"
    );
    wait_for_blocked_threads(server.pid(), 2);
    let err = c
        .node
        .node_publish_volume(publish_req(
            &v,
            &v_stage,
            &v_target,
            with_group.clone(),
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert!(err.message().contains("in progress"), "{}", err.message());
    frozen_v.thaw();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c
            .node
            .node_publish_volume(publish_req(
                &v,
                &v_stage,
                &v_target,
                with_group.clone(),
                false,
            ))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("publish after the abandoned one: {e:?}"),
        }
    }
    assert_eq!(std::fs::metadata(&v_target).unwrap().gid(), 4242);
    assert!(
        server.log_text().contains("Cancelled"),
        "{}",
        server.log_text()
    );
    unpublish(c, &v, &v_target).await;
    unstage(c, &v, &v_stage).await;

    // The same answer across processes: the backend's lock, held here by the test.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(scratch.pool().join("locks").join(format!("v-{b}.lock")))
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    assert_code(
        c.node
            .node_stage_volume(stage_req(&b, &staging_path(&scratch, &b), cap.clone()))
            .await,
        Code::Aborted,
        "stage B while another process holds its lock",
    );
    drop(held);

    frozen.thaw();
    let done = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("first call")
        .unwrap();
    ok(done, "the held publish, once the filesystem thawed");
    assert_eq!(std::fs::metadata(&a_target).unwrap().gid(), 4242);
    // Now the retry is just a repeat.
    publish(c, &a, &a_stage, &a_target, with_group, false).await;
    unpublish(c, &a, &a_target).await;
    unstage(c, &a, &a_stage).await;
    assert!(loops_under(&scratch.root()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_call_in_flight_finish_then_removes_the_socket() {
    if !require_root(&["fsfreeze", "mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (mut server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = mount_cap_with("ext4", Mode::SingleNodeWriter, &[], "777");
    let a = create(c, "pvc-a", 32 * MIB, cap.clone()).await.volume_id;
    let (a_stage, a_target) = (staging_path(&scratch, &a), target_path(&scratch, "p", &a));
    stage(c, &a, &a_stage, cap.clone()).await;
    let frozen = Frozen::freeze(&a_stage);
    let first = {
        let mut node = c.node.clone();
        let req = publish_req(&a, &a_stage, &a_target, cap.clone(), false);
        tokio::spawn(async move { node.node_publish_volume(req).await })
    };
    wait_for_blocked_thread(server.pid());
    server.signal(nix::sys::signal::Signal::SIGTERM);
    // The socket goes at once (no new connections)...
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "socket still there after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...but the process stays until the call in flight is done.
    assert!(server.is_running(), "exited with a call in flight");
    assert!(!first.is_finished());
    frozen.thaw();
    let done = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("first call")
        .unwrap();
    ok(done, "the call in flight at SIGTERM");
    assert_eq!(mount_at(&a_target).map(|m| m.0).as_deref(), Some("ext4"));
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!server.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stage_then_the_same_call_finishes_the_job() {
    if !require_root(&["fsfreeze", "mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (mut server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    let cap = rwo("ext4");
    // The staging path lies on a filesystem the test freezes (itself a loopvol volume), so the
    // stage stops after attaching and formatting, at creating the staging directory: there
    // the server is killed.
    let parent = create(c, "pvc-parent", 32 * MIB, cap.clone())
        .await
        .volume_id;
    let parent_stage = staging_path(&scratch, &parent);
    stage(c, &parent, &parent_stage, cap.clone()).await;
    let id = create(c, "pvc-victim", 32 * MIB, cap.clone())
        .await
        .volume_id;
    let victim_stage = parent_stage.join("victim/globalmount");

    let frozen = Frozen::freeze(&parent_stage);
    let doomed = {
        let mut node = c.node.clone();
        let req = stage_req(&id, &victim_stage, cap.clone());
        tokio::spawn(async move { node.node_stage_volume(req).await })
    };
    wait_for_blocked_thread(server.pid());
    server.signal(nix::sys::signal::Signal::SIGKILL);
    frozen.thaw(); // the kill takes effect once the blocked thread leaves the kernel
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), None, "not killed by the signal: {status}");
    assert!(
        doomed.await.unwrap().is_err(),
        "the killed call reported success"
    );

    // Half done: attached and formatted, not mounted.
    let devices = loops_of(&scratch, &id);
    assert_eq!(devices.len(), 1, "the killed stage attached the volume");
    let dev = devices[0].display().to_string();
    let uuid = tool_output("blkid", &["-p", "-s", "UUID", "-o", "value", &dev]);
    assert!(
        !uuid.is_empty(),
        "the killed stage had formatted the volume"
    );
    assert!(mount_at(&victim_stage).is_none());
    assert!(server.socket.exists(), "a killed server leaves its socket");

    // Restarted (replacing the stale socket), the same call finishes the job.
    server.restart();
    let mut c = connect(&server).await;
    for _ in 0..3 {
        stage(&mut c, &id, &victim_stage, cap.clone()).await;
    }
    let (fs, _) = mount_at(&victim_stage).expect("staged after the restart");
    assert_eq!(fs, "ext4");
    assert_eq!(
        loops_of(&scratch, &id),
        devices,
        "the restart attached a second loop device"
    );
    assert_eq!(
        tool_output("blkid", &["-p", "-s", "UUID", "-o", "value", &dev]),
        uuid,
        "the volume was formatted again"
    );
    unstage(&mut c, &id, &victim_stage).await;
    unstage(&mut c, &parent, &parent_stage).await;
    assert!(loops_under(&scratch.root()).is_empty());
    assert!(mounts_under(&scratch.root()).is_empty());
}
