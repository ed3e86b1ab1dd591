//! Driving `loopvol-csi` as the sidecars and kubelet do: the server process on its own socket
//! ([`CsiServer`]), a client of every service ([`Csi`]), request builders, the kubelet paths
//! ([`Kubelet`]) and the assertions on replies, including [`CallTable`]: many calls checked
//! together, every failing case reported.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub use loopvol_proto::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use pb::group_controller_client::GroupControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::poll::{poll_until, poll_until_async};
use crate::scratch::Scratch;

/// The driver name the server reports by default (and kubelet's paths name).
pub const DRIVER: &str = "csi.loopvol.io";
/// The topology segment of node-local volumes: the contract StorageClasses and PVs rely on,
/// spelled out here rather than taken from the code under test.
pub const TOPOLOGY_KEY: &str = "topology.loopvol.io/node";

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// A running `loopvol-csi` for a test, on its own socket (`<scratch>/<name>.sock`) and log
/// (`<scratch>/<name>.log`); SIGKILLed and reaped on drop.
pub struct CsiServer {
    exe: PathBuf,
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl CsiServer {
    /// Starts `<exe> --endpoint=unix://<socket> <args…>` and waits until it listens.
    pub fn start(exe: impl AsRef<Path>, scratch: &Scratch, name: &str, args: &[String]) -> Self {
        let mut server = CsiServer::spawn(exe, scratch, name, args);
        server.wait_listening();
        server
    }

    /// Starts it without waiting (several servers can then come up at once).
    pub fn spawn(exe: impl AsRef<Path>, scratch: &Scratch, name: &str, args: &[String]) -> Self {
        let mut server = CsiServer {
            exe: exe.as_ref().to_owned(),
            name: name.to_owned(),
            args: args.to_vec(),
            child: None,
            socket: scratch.path(&format!("{name}.sock")),
            log: scratch.path(&format!("{name}.log")),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let child = Command::new(&self.exe)
            .arg(format!("--endpoint=unix://{}", self.socket.display()))
            .args(&self.args)
            .env("LOOPVOL_LOG", &self.log)
            .env("RUST_LOG", "info")
            .env_remove("CSI_ENDPOINT")
            .env_remove("LOOPVOL_POOL")
            .env_remove("LOOPVOL_NODE")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.exe.display()));
        self.child = Some(child);
    }

    /// Starts it again with the same arguments after it exited (a restart after SIGKILL).
    pub fn restart(&mut self) {
        self.launch();
        self.wait_listening();
    }

    /// Waits (bounded) until the server accepts connections; fails with its log if it exits.
    pub fn wait_listening(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        let what = format!("{} listening on {}", self.name, self.socket.display());
        poll_until(Duration::from_secs(20), &what, || {
            if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket())
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return true;
            }
            if let Some(status) = self.poll_exit() {
                panic!(
                    "{} exited with {status} before listening; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            false
        });
    }

    /// The exit status once the process has exited (it is then reaped).
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let status = child.try_wait().expect("poll loopvol-csi")?;
        self.child = None;
        Some(status)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("poll loopvol-csi").is_none())
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.pid()).expect("a pid fits in i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal loopvol-csi");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit. Async, so the test's client connections keep
    /// being served while a server drains them.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let what = format!("{} exiting", self.name);
        let status = poll_until_async(within, &what, || std::future::ready(self.poll_exit())).await;
        status
    }

    /// SIGTERM, as Kubernetes stops the pod: the server must exit 0 and remove its socket.
    pub async fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{} after SIGTERM: {status}; log:\n{}",
            self.name,
            self.log_text()
        );
        assert!(
            !self.socket.exists(),
            "{} left its socket after SIGTERM",
            self.name
        );
    }

    /// Where the server serves `/metrics` (started with `--metrics-address`, port 0 included):
    /// the address it logged.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        poll_until(
            Duration::from_secs(10),
            "the metrics address in the log",
            || {
                self.log_text().lines().find_map(|l| {
                    l.contains("serving metrics")
                        .then(|| {
                            l.split("address=")
                                .nth(1)?
                                .split_whitespace()
                                .next()?
                                .parse()
                                .ok()
                        })
                        .flatten()
                })
            },
        )
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> Channel {
        loopvol_proto::connect_unix(&self.socket)
            .await
            .expect("connect to the CSI socket")
    }
}

impl Drop for CsiServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// A client of every CSI service, over one connection.
#[derive(Clone)]
pub struct Csi {
    pub channel: Channel,
    pub id: IdentityClient<Channel>,
    pub ctl: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub grp: GroupControllerClient<Channel>,
}

impl Csi {
    pub async fn connect(server: &CsiServer) -> Csi {
        let channel = server.channel().await;
        Csi {
            id: IdentityClient::new(channel.clone()),
            ctl: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            grp: GroupControllerClient::new(channel.clone()),
            channel,
        }
    }

    /// CreateVolume, which must succeed; the volume.
    pub async fn create(&mut self, name: &str, size: i64, cap: pb::VolumeCapability) -> pb::Volume {
        ok(
            self.ctl.create_volume(create_req(name, size, cap)).await,
            &format!("CreateVolume {name}"),
        )
        .volume
        .expect("volume in the reply")
    }

    /// NodeStageVolume, which must succeed.
    pub async fn stage(&mut self, id: &str, staging: &Path, cap: pb::VolumeCapability) {
        ok(
            self.node
                .node_stage_volume(stage_req(id, staging, cap))
                .await,
            &format!("NodeStageVolume {id} at {}", staging.display()),
        );
    }

    /// NodePublishVolume, which must succeed.
    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: pb::VolumeCapability,
        readonly: bool,
    ) {
        ok(
            self.node
                .node_publish_volume(publish_req(id, staging, target, cap, readonly))
                .await,
            &format!("NodePublishVolume {id} at {}", target.display()),
        );
    }

    /// NodeUnpublishVolume, which must succeed.
    pub async fn unpublish(&mut self, id: &str, target: &Path) {
        ok(
            self.node
                .node_unpublish_volume(unpublish_req(id, target))
                .await,
            &format!("NodeUnpublishVolume {id} at {}", target.display()),
        );
    }

    /// NodeUnstageVolume, which must succeed.
    pub async fn unstage(&mut self, id: &str, staging: &Path) {
        ok(
            self.node
                .node_unstage_volume(unstage_req(id, staging))
                .await,
            &format!("NodeUnstageVolume {id} at {}", staging.display()),
        );
    }

    /// NodeStageVolume and a read-write NodePublishVolume of `v`: what kubelet does to start a
    /// pod. Both must succeed.
    pub async fn stage_and_publish(&mut self, v: &PodVolume, cap: &pb::VolumeCapability) {
        self.stage(&v.id, &v.staging, cap.clone()).await;
        self.publish(&v.id, &v.staging, &v.target, cap.clone(), false)
            .await;
    }

    /// NodeUnpublishVolume and NodeUnstageVolume of `v`: what kubelet does once the pod is gone.
    pub async fn unpublish_and_unstage(&mut self, v: &PodVolume) {
        self.unpublish(&v.id, &v.target).await;
        self.unstage(&v.id, &v.staging).await;
    }
}

/// Declares [`Call`] (one variant per unary RPC, built from its request with `.into()`) and
/// [`Csi::call`], which sends any of them and keeps only the outcome.
macro_rules! calls {
    ($($rpc:ident($request:ident) => $client:ident.$method:ident;)*) => {
        /// Any unary CSI request, for tables of calls and their expected outcome.
        #[derive(Debug, Clone)]
        pub enum Call {
            $($rpc(pb::$request),)*
        }

        $(impl From<pb::$request> for Call {
            fn from(r: pb::$request) -> Call {
                Call::$rpc(r)
            }
        })*

        impl Call {
            /// The RPC's name.
            pub fn rpc(&self) -> &'static str {
                match self {
                    $(Call::$rpc(_) => stringify!($rpc),)*
                }
            }
        }

        impl Csi {
            /// Sends `call`; its reply is dropped, its status kept.
            pub async fn call(&mut self, call: impl Into<Call>) -> Result<(), Status> {
                match call.into() {
                    $(Call::$rpc(r) => self.$client.$method(r).await.map(drop),)*
                }
            }
        }
    };
}

calls! {
    GetPluginInfo(GetPluginInfoRequest) => id.get_plugin_info;
    GetPluginCapabilities(GetPluginCapabilitiesRequest) => id.get_plugin_capabilities;
    Probe(ProbeRequest) => id.probe;
    CreateVolume(CreateVolumeRequest) => ctl.create_volume;
    DeleteVolume(DeleteVolumeRequest) => ctl.delete_volume;
    ControllerPublishVolume(ControllerPublishVolumeRequest) => ctl.controller_publish_volume;
    ControllerUnpublishVolume(ControllerUnpublishVolumeRequest) => ctl.controller_unpublish_volume;
    ValidateVolumeCapabilities(ValidateVolumeCapabilitiesRequest) => ctl.validate_volume_capabilities;
    ListVolumes(ListVolumesRequest) => ctl.list_volumes;
    GetCapacity(GetCapacityRequest) => ctl.get_capacity;
    ControllerGetCapabilities(ControllerGetCapabilitiesRequest) => ctl.controller_get_capabilities;
    CreateSnapshot(CreateSnapshotRequest) => ctl.create_snapshot;
    DeleteSnapshot(DeleteSnapshotRequest) => ctl.delete_snapshot;
    ListSnapshots(ListSnapshotsRequest) => ctl.list_snapshots;
    GetSnapshot(GetSnapshotRequest) => ctl.get_snapshot;
    ControllerExpandVolume(ControllerExpandVolumeRequest) => ctl.controller_expand_volume;
    ControllerGetVolume(ControllerGetVolumeRequest) => ctl.controller_get_volume;
    ControllerModifyVolume(ControllerModifyVolumeRequest) => ctl.controller_modify_volume;
    NodeStageVolume(NodeStageVolumeRequest) => node.node_stage_volume;
    NodeUnstageVolume(NodeUnstageVolumeRequest) => node.node_unstage_volume;
    NodePublishVolume(NodePublishVolumeRequest) => node.node_publish_volume;
    NodeUnpublishVolume(NodeUnpublishVolumeRequest) => node.node_unpublish_volume;
    NodeGetVolumeStats(NodeGetVolumeStatsRequest) => node.node_get_volume_stats;
    NodeExpandVolume(NodeExpandVolumeRequest) => node.node_expand_volume;
    NodeGetCapabilities(NodeGetCapabilitiesRequest) => node.node_get_capabilities;
    NodeGetInfo(NodeGetInfoRequest) => node.node_get_info;
    GroupControllerGetCapabilities(GroupControllerGetCapabilitiesRequest) => grp.group_controller_get_capabilities;
    CreateVolumeGroupSnapshot(CreateVolumeGroupSnapshotRequest) => grp.create_volume_group_snapshot;
    DeleteVolumeGroupSnapshot(DeleteVolumeGroupSnapshotRequest) => grp.delete_volume_group_snapshot;
    GetVolumeGroupSnapshot(GetVolumeGroupSnapshotRequest) => grp.get_volume_group_snapshot;
}

/// Calls and the code each must get (`Code::Ok`: success), run all together: [`CallTable::check`]
/// sends every case, in order, and then fails listing every case that got something else, so
/// one run shows the whole picture instead of the first mismatch.
#[derive(Default)]
pub struct CallTable {
    cases: Vec<(String, Call, Code)>,
}

impl CallTable {
    pub fn new() -> CallTable {
        CallTable::default()
    }

    /// Adds a case: `call` must get `want`; `what` names it in the report.
    pub fn case(
        &mut self,
        what: impl Into<String>,
        call: impl Into<Call>,
        want: Code,
    ) -> &mut Self {
        self.cases.push((what.into(), call.into(), want));
        self
    }

    pub fn len(&self) -> usize {
        self.cases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Sends every case to `csi`; fails with the list of the cases that did not get their code.
    pub async fn check(self, csi: &mut Csi) {
        let total = self.cases.len();
        let mut failed = Vec::new();
        for (what, call, want) in self.cases {
            let rpc = call.rpc();
            let got = match csi.call(call).await {
                Ok(()) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            };
            if got.0 != want {
                failed.push(format!(
                    "  {what} ({rpc}): expected {want:?}, got {:?} {:?}",
                    got.0, got.1
                ));
            }
        }
        assert!(
            failed.is_empty(),
            "{} of {total} calls did not get the expected code:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
}

/// A copy of `base` with `change` applied: a table row is "the full request, less one field".
pub fn with<T: Clone>(base: &T, change: impl FnOnce(&mut T)) -> T {
    let mut copy = base.clone();
    change(&mut copy);
    copy
}

// ---------------------------------------------------------------------------------------------
// Request builders
// ---------------------------------------------------------------------------------------------

pub fn mount_cap(fs: &str, mode: Mode) -> pb::VolumeCapability {
    mount_cap_with(fs, mode, &[], "")
}

/// A mount capability with mount flags and a volume mount group (the pod's fsGroup).
pub fn mount_cap_with(fs: &str, mode: Mode, flags: &[&str], group: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: group.into(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// ReadWriteOnce of a filesystem (`""`: the driver's choice).
pub fn rwo(fs: &str) -> pb::VolumeCapability {
    mount_cap(fs, Mode::SingleNodeWriter)
}

pub fn range(required: i64, limit: i64) -> Option<pb::CapacityRange> {
    Some(pb::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

/// String pairs as a request's parameter map.
pub fn params(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn create_req(name: &str, size: i64, cap: pb::VolumeCapability) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn delete_req(id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    }
}

pub fn get_volume_req(id: &str) -> pb::ControllerGetVolumeRequest {
    pb::ControllerGetVolumeRequest {
        volume_id: id.into(),
    }
}

pub fn controller_publish_req(
    id: &str,
    node: &str,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

pub fn controller_unpublish_req(id: &str, node: &str) -> pb::ControllerUnpublishVolumeRequest {
    pb::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

pub fn snapshot_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

pub fn delete_snapshot_req(id: &str) -> pb::DeleteSnapshotRequest {
    pb::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    }
}

pub fn get_snapshot_req(id: &str) -> pb::GetSnapshotRequest {
    pb::GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    }
}

pub fn from_snapshot(id: &str) -> Option<pb::VolumeContentSource> {
    Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            },
        )),
    })
}

pub fn from_volume(id: &str) -> Option<pb::VolumeContentSource> {
    Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: id.into(),
            },
        )),
    })
}

pub fn stage_req(
    id: &str,
    staging: &Path,
    cap: pb::VolumeCapability,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

pub fn publish_req(
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

pub fn unpublish_req(id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

pub fn stats_req(id: &str, path: &Path) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        ..Default::default()
    }
}

pub fn topology(node: &str) -> pb::Topology {
    pb::Topology {
        segments: [(TOPOLOGY_KEY.to_string(), node.to_string())].into(),
    }
}

/// Where kubelet puts CSI paths, under one kubelet root directory (each test's, or each
/// simulated node's).
pub struct Kubelet {
    pub root: PathBuf,
}

impl Kubelet {
    /// The kubelet root `<scratch>/<dir>`.
    pub fn new(scratch: &Scratch, dir: &str) -> Kubelet {
        Kubelet {
            root: scratch.path(dir),
        }
    }

    /// A volume's staging path (NodeStage's `globalmount`).
    pub fn staging(&self, id: &str) -> PathBuf {
        self.root.join(format!(
            "plugins/kubernetes.io/csi/{DRIVER}/{id}/globalmount"
        ))
    }

    /// A pod's target path for a volume (named by its PV).
    pub fn target(&self, pod: &str, volume: &str) -> PathBuf {
        self.root.join(format!(
            "pods/{pod}/volumes/kubernetes.io~csi/{volume}/mount"
        ))
    }

    /// Volume `id` as kubelet lays it out for pod `pod`: its staging and target paths.
    pub fn pod_volume(&self, pod: &str, id: &str) -> PodVolume {
        PodVolume {
            id: id.to_owned(),
            staging: self.staging(id),
            target: self.target(pod, id),
        }
    }

    /// The server flag that confines node paths to this kubelet root.
    pub fn path_prefix_flag(&self) -> String {
        format!("--path-prefix={}", self.root.display())
    }
}

/// A volume as one pod uses it: the volume's staging path and the pod's target path.
#[derive(Debug, Clone)]
pub struct PodVolume {
    pub id: String,
    pub staging: PathBuf,
    pub target: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Assertions on replies
// ---------------------------------------------------------------------------------------------

/// Unwraps an OK reply, naming `what` in the panic.
#[track_caller]
pub fn ok<T>(result: Result<tonic::Response<T>, Status>, what: &str) -> T {
    match result {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("{what}: expected OK, got {:?}: {}", s.code(), s.message()),
    }
}

/// Asserts `result` failed with `code`, naming `what` in the panic.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) {
    assert_refused(result, code, "", what);
}

/// Asserts `result` failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needle: &str,
    what: &str,
) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(
                s.message().contains(needle),
                "{what}: the message does not name {needle:?}: {}",
                s.message()
            );
        }
    }
}
