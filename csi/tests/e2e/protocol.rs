//! The controller's answers and the protocol's rules, no root: identity and capabilities,
//! services not served, required fields, lengths, idempotency, parameters, topology, unknown IDs,
//! paging, snapshots, group snapshots, expansion and claims on a shared pool. Volumes here are
//! created and copied, never attached.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use loopvol_e2e::csi::*;
use loopvol_e2e::Scratch;
use pb::volume_capability::access_mode::Mode;
use pb::volume_capability::AccessMode;
use tonic::Code;

use crate::{start, GIB, MIB, NODE};

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
    csi.create("v", MIB, rwo("ext4")).await;
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

/// Every RPC, each required field left out in turn: INVALID_ARGUMENT (or, for a publish without
/// staging path, FAILED_PRECONDITION), and nothing created. Each case is "the full request, less
/// one field"; all run, and a failure lists every case that got another code.
#[tokio::test]
async fn every_rpc_refuses_missing_required_fields() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    csi.create("v1", MIB, rwo("ext4")).await;
    let bad = Code::InvalidArgument;
    let staging = scratch.path("staging");
    let target = scratch.path("target");
    let mut t = CallTable::new();

    let full = create_req("v2", MIB, rwo("ext4"));
    t.case(
        "CreateVolume without name",
        with(&full, |r| r.name.clear()),
        bad,
    )
    .case(
        "CreateVolume without capabilities",
        with(&full, |r| r.volume_capabilities.clear()),
        bad,
    )
    .case(
        "CreateVolume without access type",
        with(&full, |r| r.volume_capabilities[0].access_type = None),
        bad,
    )
    .case(
        "CreateVolume without access mode",
        with(&full, |r| r.volume_capabilities[0].access_mode = None),
        bad,
    )
    .case(
        "CreateVolume with mode UNKNOWN",
        with(&full, |r| {
            r.volume_capabilities[0].access_mode = Some(AccessMode {
                mode: Mode::Unknown as i32,
            })
        }),
        bad,
    )
    .case(
        "CreateVolume with empty snapshot ID",
        with(&full, |r| r.volume_content_source = from_snapshot("")),
        bad,
    )
    .case(
        "CreateVolume with empty source volume ID",
        with(&full, |r| r.volume_content_source = from_volume("")),
        bad,
    )
    .case(
        "CreateVolume with empty content source",
        with(&full, |r| {
            r.volume_content_source = Some(pb::VolumeContentSource { r#type: None })
        }),
        bad,
    )
    .case("DeleteVolume without ID", delete_req(""), bad)
    .case(
        "ValidateVolumeCapabilities without ID",
        pb::ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![rwo("")],
            ..Default::default()
        },
        bad,
    )
    .case(
        "ValidateVolumeCapabilities without capabilities",
        pb::ValidateVolumeCapabilitiesRequest {
            volume_id: "v1".into(),
            ..Default::default()
        },
        bad,
    )
    .case(
        "ListVolumes with negative max_entries",
        pb::ListVolumesRequest {
            max_entries: -1,
            ..Default::default()
        },
        bad,
    )
    .case(
        "GetCapacity with a capability without mode",
        pb::GetCapacityRequest {
            volume_capabilities: vec![with(&rwo(""), |c| c.access_mode = None)],
            ..Default::default()
        },
        bad,
    );

    t.case("CreateSnapshot without name", snapshot_req("", "v1"), bad)
        .case("CreateSnapshot without source", snapshot_req("s1", ""), bad)
        .case("DeleteSnapshot without ID", delete_snapshot_req(""), bad)
        .case("GetSnapshot without ID", get_snapshot_req(""), bad)
        .case(
            "ListSnapshots with negative max_entries",
            pb::ListSnapshotsRequest {
                max_entries: -5,
                ..Default::default()
            },
            bad,
        );

    t.case(
        "ControllerExpandVolume without ID",
        pb::ControllerExpandVolumeRequest {
            capacity_range: range(2 * MIB, 0),
            ..Default::default()
        },
        bad,
    )
    .case(
        "ControllerExpandVolume without capacity range",
        pb::ControllerExpandVolumeRequest {
            volume_id: "v1".into(),
            ..Default::default()
        },
        bad,
    )
    .case("ControllerGetVolume without ID", get_volume_req(""), bad)
    .case(
        "ControllerModifyVolume without ID",
        pb::ControllerModifyVolumeRequest {
            mutable_parameters: params(&[("allocation", "thick")]),
            ..Default::default()
        },
        bad,
    );

    let full = stage_req("v1", &staging, rwo("ext4"));
    t.case(
        "NodeStageVolume without ID",
        with(&full, |r| r.volume_id.clear()),
        bad,
    )
    .case(
        "NodeStageVolume without staging path",
        with(&full, |r| r.staging_target_path.clear()),
        bad,
    )
    .case(
        "NodeStageVolume without capability",
        with(&full, |r| r.volume_capability = None),
        bad,
    )
    .case(
        "NodeStageVolume without access type",
        with(&full, |r| {
            r.volume_capability.as_mut().unwrap().access_type = None
        }),
        bad,
    )
    .case(
        "NodeUnstageVolume without ID",
        unstage_req("", &staging),
        bad,
    )
    .case(
        "NodeUnstageVolume without staging path",
        unstage_req("v1", Path::new("")),
        bad,
    );

    // STAGE_UNSTAGE_VOLUME is advertised: a publish that names no staging path is told to stage
    // first (FAILED_PRECONDITION), after the checks of malformed fields (csi-sanity sends no
    // staging path and no capability, and wants INVALID_ARGUMENT).
    let full = publish_req("v1", &staging, &target, rwo("ext4"), false);
    let unstaged = with(&full, |r| r.staging_target_path.clear());
    t.case(
        "NodePublishVolume without ID",
        with(&full, |r| r.volume_id.clear()),
        bad,
    )
    .case(
        "NodePublishVolume without target",
        with(&full, |r| r.target_path.clear()),
        bad,
    )
    .case(
        "NodePublishVolume without staging path",
        unstaged.clone(),
        Code::FailedPrecondition,
    )
    .case(
        "NodePublishVolume without staging path nor capability",
        with(&unstaged, |r| r.volume_capability = None),
        bad,
    )
    .case(
        "NodePublishVolume without capability",
        with(&full, |r| r.volume_capability = None),
        bad,
    )
    .case(
        "NodeUnpublishVolume without ID",
        unpublish_req("", &target),
        bad,
    )
    .case(
        "NodeUnpublishVolume without target",
        unpublish_req("v1", Path::new("")),
        bad,
    );

    t.case("NodeGetVolumeStats without ID", stats_req("", &target), bad)
        .case(
            "NodeGetVolumeStats without path",
            stats_req("v1", Path::new("")),
            bad,
        )
        .case(
            "NodeExpandVolume without ID",
            pb::NodeExpandVolumeRequest {
                volume_path: target.display().to_string(),
                ..Default::default()
            },
            bad,
        )
        .case(
            "NodeExpandVolume without path",
            pb::NodeExpandVolumeRequest {
                volume_id: "v1".into(),
                ..Default::default()
            },
            bad,
        );

    t.case(
        "CreateVolumeGroupSnapshot without name",
        pb::CreateVolumeGroupSnapshotRequest {
            source_volume_ids: vec!["v1".into()],
            ..Default::default()
        },
        bad,
    )
    .case(
        "CreateVolumeGroupSnapshot without sources",
        pb::CreateVolumeGroupSnapshotRequest {
            name: "g".into(),
            ..Default::default()
        },
        bad,
    )
    .case(
        "DeleteVolumeGroupSnapshot without ID",
        pb::DeleteVolumeGroupSnapshotRequest::default(),
        bad,
    )
    .case(
        "GetVolumeGroupSnapshot without ID",
        pb::GetVolumeGroupSnapshotRequest::default(),
        bad,
    );
    t.check(&mut csi).await;
    // Nothing of the refused requests was created.
    assert_code(
        csi.ctl.controller_get_volume(get_volume_req("v2")).await,
        Code::NotFound,
        "v2 after refused creates",
    );

    // Controller publish (served for shared pools only).
    let shared = Scratch::new();
    let (_s2, mut c2) = start(&shared, &["--shared-pool"]).await;
    c2.create("v1", MIB, rwo("ext4")).await;
    let full = controller_publish_req("v1", NODE, rwo("ext4"), false);
    let mut t = CallTable::new();
    t.case(
        "ControllerPublish without ID",
        with(&full, |r| r.volume_id.clear()),
        bad,
    )
    .case(
        "ControllerPublish without node",
        with(&full, |r| r.node_id.clear()),
        bad,
    )
    .case(
        "ControllerPublish without capability",
        with(&full, |r| r.volume_capability = None),
        bad,
    )
    .case(
        "ControllerUnpublish without ID",
        controller_unpublish_req("", NODE),
        bad,
    );
    t.check(&mut c2).await;
}

#[tokio::test]
async fn names_and_ids_of_128_bytes_are_accepted_and_129_refused() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let c = &mut csi;
    // A name that is a valid ID becomes the ID itself.
    let name = format!("pvc-{}", "a".repeat(124));
    assert_eq!(name.len(), 128);
    let vol = c.create(&name, MIB, rwo("ext4")).await;
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
    let other = c.create(&utf8, MIB, rwo("ext4")).await;
    assert!(other.volume_id.len() <= 128);
    assert_eq!(
        c.create(&utf8, MIB, rwo("ext4")).await.volume_id,
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

    let first = c.create("pvc-1", 8 * MIB, rwo("ext4")).await;
    assert_eq!(first.capacity_bytes, 8 * MIB);
    assert_eq!(first.accessible_topology, vec![topology(NODE)]);
    for _ in 0..10 {
        let again = c.create("pvc-1", 8 * MIB, rwo("ext4")).await;
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
        c.create("odd", 5000, rwo("ext4")).await.capacity_bytes,
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
        c.create("small-xfs", MIB, rwo("xfs")).await.capacity_bytes,
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
    let image = std::fs::metadata(scratch.image(&thick.volume_id)).unwrap();
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
        c.create(&format!("mode-{i}"), MIB, cap).await;
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

/// IDs that name nothing: deletions succeed, everything else is NOT_FOUND, and node calls that
/// find nothing to undo succeed. All cases run; a failure lists every case that got another code.
#[tokio::test]
async fn unknown_ids_get_not_found_or_ok_as_the_spec_says() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &[]).await;
    let staging = scratch.path("staging");
    let target = scratch.path("target");
    let nf = Code::NotFound;
    let mut t = CallTable::new();
    // Deletions of what does not exist succeed.
    t.case("DeleteVolume unknown", delete_req("no-such"), Code::Ok)
        .case(
            "DeleteSnapshot unknown",
            delete_snapshot_req("no-such"),
            Code::Ok,
        )
        .case(
            "DeleteVolumeGroupSnapshot unknown",
            pb::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: "no-such".into(),
                ..Default::default()
            },
            Code::Ok,
        );
    // Everything else: NOT_FOUND.
    t.case(
        "ValidateVolumeCapabilities",
        pb::ValidateVolumeCapabilitiesRequest {
            volume_id: "no-such".into(),
            volume_capabilities: vec![rwo("ext4")],
            ..Default::default()
        },
        nf,
    )
    .case("ControllerGetVolume", get_volume_req("no-such"), nf)
    .case("GetSnapshot", get_snapshot_req("no-such"), nf)
    .case(
        "CreateSnapshot of an unknown volume",
        snapshot_req("s", "no-such"),
        nf,
    )
    .case(
        "ControllerExpandVolume",
        pb::ControllerExpandVolumeRequest {
            volume_id: "no-such".into(),
            capacity_range: range(GIB, 0),
            ..Default::default()
        },
        nf,
    )
    .case(
        "ControllerModifyVolume",
        pb::ControllerModifyVolumeRequest {
            volume_id: "no-such".into(),
            mutable_parameters: params(&[("allocation", "thick")]),
            ..Default::default()
        },
        nf,
    )
    .case(
        "GetVolumeGroupSnapshot",
        pb::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: "no-such".into(),
            ..Default::default()
        },
        nf,
    )
    .case(
        "CreateVolumeGroupSnapshot of an unknown volume",
        pb::CreateVolumeGroupSnapshotRequest {
            name: "g".into(),
            source_volume_ids: vec!["no-such".into()],
            ..Default::default()
        },
        nf,
    )
    .case(
        "NodeStageVolume",
        stage_req("no-such", &staging, rwo("ext4")),
        nf,
    )
    .case("NodeUnstageVolume", unstage_req("no-such", &staging), nf)
    .case(
        "NodePublishVolume",
        publish_req("no-such", &staging, &target, rwo("ext4"), false),
        nf,
    )
    .case("NodeUnpublishVolume", unpublish_req("no-such", &target), nf)
    .case("NodeGetVolumeStats", stats_req("no-such", &target), nf)
    .case(
        "NodeExpandVolume",
        pb::NodeExpandVolumeRequest {
            volume_id: "no-such".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        },
        nf,
    );
    t.check(&mut csi).await;

    // A known volume at a path where it is not: NOT_FOUND too.
    csi.create("known", MIB, rwo("ext4")).await;
    let plain = scratch.path("plain-file");
    std::fs::write(&plain, b"x").unwrap();
    let mut t = CallTable::new();
    t.case(
        "NodeGetVolumeStats at an unknown path",
        stats_req("known", &scratch.path("nowhere")),
        nf,
    );
    // csi-sanity's stats checks name a relative path: the volume is not there either.
    for id in ["no-such", "known"] {
        t.case(
            format!("NodeGetVolumeStats of {id} at a relative path"),
            stats_req(id, Path::new("some/path")),
            nf,
        );
    }
    t.case(
        "NodeGetVolumeStats at a file that is not the volume",
        stats_req("known", &plain),
        nf,
    )
    .case(
        "NodeExpandVolume at a path that does not exist",
        pb::NodeExpandVolumeRequest {
            volume_id: "known".into(),
            volume_path: scratch.path("nowhere").display().to_string(),
            capacity_range: range(2 * MIB, 0),
            ..Default::default()
        },
        nf,
    )
    // Node operations that find nothing to undo succeed.
    .case(
        "NodeUnstage of an unstaged volume",
        unstage_req("known", &staging),
        Code::Ok,
    )
    .case(
        "NodeUnpublish of an unpublished target",
        unpublish_req("known", &target),
        Code::Ok,
    );
    t.check(&mut csi).await;
    assert_eq!(
        std::fs::metadata(scratch.image("known")).unwrap().len(),
        MIB as u64,
        "a refused expansion grew the image"
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
            c.create(&format!("vol-{i}"), MIB, rwo("ext4"))
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
    std::fs::remove_file(scratch.image(&want[1])).unwrap();
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
    c.create("vol-a", 4 * MIB, rwo("ext4")).await;
    c.create("vol-b", 4 * MIB, rwo("ext4")).await;
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
    c.create("vol", MIB, rwo("xfs")).await;
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
    c.create("vol", 32 * MIB, rwo("ext4")).await;
    let allocated = || std::fs::metadata(scratch.image("vol")).unwrap().blocks() * 512;
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
    c.create("vol", 32 * MIB, rwo("ext4")).await;
}

#[tokio::test]
async fn controller_expand_grows_and_reports_node_expansion() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--shared-pool"]).await;
    let c = &mut csi;
    c.create("fs", 8 * MIB, rwo("ext4")).await;
    c.create("raw", 8 * MIB, block_cap(Mode::SingleNodeWriter))
        .await;
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
        std::fs::metadata(scratch.image("fs")).unwrap().len(),
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
    c.create("vol-a", 4 * MIB, rwo("ext4")).await;
    c.create("vol-b", 4 * MIB, rwo("ext4")).await;
    c.create("vol-c", 4 * MIB, rwo("ext4")).await;
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
    let vol = c.create("shared", 4 * MIB, rwo("ext4")).await;
    assert!(vol.accessible_topology.is_empty());

    let publish = |node: &str, cap: pb::VolumeCapability, readonly: bool| {
        controller_publish_req("shared", node, cap, readonly)
    };
    let unpublish = |node: &str| controller_unpublish_req("shared", node);
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
        scratch.open_pool(&node, true);
    }
    // A claim, its repeats and its conflicts, in order (each call sees what the earlier did).
    let mut t = CallTable::new();
    for i in 0..10 {
        t.case(
            format!("publish to node-a, #{i}"),
            publish("node-a", rwo("ext4"), false),
            Code::Ok,
        );
    }
    t.case(
        "read-write-once volume published to a second node",
        publish("node-b", rwo("ext4"), false),
        Code::FailedPrecondition,
    )
    .case(
        "same node, now read-only",
        publish("node-a", rwo("ext4"), true),
        Code::AlreadyExists,
    )
    .case(
        "publish an unknown volume",
        controller_publish_req("no-such", "node-a", rwo("ext4"), false),
        Code::NotFound,
    );
    t.check(c).await;
    let list = ok(
        c.ctl.list_volumes(pb::ListVolumesRequest::default()).await,
        "ListVolumes",
    );
    assert_eq!(
        list.entries[0].status.as_ref().unwrap().published_node_ids,
        ["node-a"]
    );
    // Releases, and the next claims. Node IDs go up to 256 bytes (CSI's limit; Kubernetes node
    // names reach 253).
    let mut t = CallTable::new();
    t.case(
        "delete a published volume",
        delete_req("shared"),
        Code::FailedPrecondition,
    );
    for i in 0..10 {
        t.case(
            format!("unpublish from node-a, #{i}"),
            unpublish("node-a"),
            Code::Ok,
        );
    }
    t.case(
        "unpublish from a node never published to",
        unpublish("node-z"),
        Code::Ok,
    )
    .case(
        "unpublish an unknown volume",
        controller_unpublish_req("no-such", "node-a"),
        Code::Ok,
    )
    .case(
        "now node-b may have it",
        publish("node-b", rwo("ext4"), false),
        Code::Ok,
    )
    .case(
        "a 257-byte node ID",
        publish(&"n".repeat(257), rwo("ext4"), false),
        Code::InvalidArgument,
    )
    .case(
        "a 256-byte node ID, while node-b holds the volume",
        publish(&"n".repeat(256), rwo("ext4"), false),
        Code::FailedPrecondition,
    )
    .case("release node-b", unpublish("node-b"), Code::Ok);
    // Readers share across nodes; a writer then waits for them all.
    let ro = mount_cap("ext4", Mode::MultiNodeReaderOnly);
    t.case(
        "reader on node-a",
        publish("node-a", ro.clone(), true),
        Code::Ok,
    )
    .case("reader on node-b", publish("node-b", ro, true), Code::Ok)
    .case(
        "writer while readers hold it",
        publish("node-c", rwo("ext4"), false),
        Code::FailedPrecondition,
    );
    t.check(c).await;
    let got = ok(
        c.ctl.controller_get_volume(get_volume_req("shared")).await,
        "ControllerGetVolume",
    );
    let mut nodes = got.status.unwrap().published_node_ids;
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);
    // No node: unpublish everywhere. Many writers only for block volumes on a shared pool.
    let mut t = CallTable::new();
    t.case("unpublish from all nodes", unpublish(""), Code::Ok)
        .case("delete", delete_req("shared"), Code::Ok)
        .case(
            "a multi-writer block volume",
            create_req("raw", 4 * MIB, block_cap(Mode::MultiNodeMultiWriter)),
            Code::Ok,
        );
    for node in ["node-a", "node-b"] {
        t.case(
            format!("multi-writer block publish to {node}"),
            controller_publish_req("raw", node, block_cap(Mode::MultiNodeMultiWriter), false),
            Code::Ok,
        );
    }
    t.check(c).await;
}

/// csi-sanity's "should fail when publishing more volumes than the node max attach limit": the
/// node's `--max-volumes-per-node` reaches the controller through the node's record in the pool,
/// and ControllerPublish beyond it is RESOURCE_EXHAUSTED (a repeat of a publication is not a new
/// one; an unpublish makes room).
#[tokio::test]
async fn shared_pool_publish_honours_the_attach_limit() {
    let scratch = Scratch::new();
    let (_server, mut csi) = start(&scratch, &["--shared-pool", "--max-volumes-per-node=2"]).await;
    let c = &mut csi;
    let limit = ok(
        c.node.node_get_info(pb::NodeGetInfoRequest {}).await,
        "NodeGetInfo",
    )
    .max_volumes_per_node;
    assert_eq!(limit, 2);
    for i in 0..3 {
        c.create(&format!("v{i}"), MIB, rwo("ext4")).await;
    }
    let publish = |id: &str| controller_publish_req(id, NODE, rwo("ext4"), false);
    let mut t = CallTable::new();
    t.case("first", publish("v0"), Code::Ok)
        .case("second", publish("v1"), Code::Ok)
        .case("the second again", publish("v1"), Code::Ok)
        .case("beyond the limit", publish("v2"), Code::ResourceExhausted)
        .case(
            "unpublish one",
            controller_unpublish_req("v0", NODE),
            Code::Ok,
        )
        .case("now there is room", publish("v2"), Code::Ok);
    t.check(c).await;
}
