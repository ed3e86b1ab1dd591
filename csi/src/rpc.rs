//! Every CSI RPC by name. Handlers, the error mapping and the logs name their RPC with this enum,
//! never with a string, so a typo cannot silently change a status code or a log line.

/// A CSI RPC (Identity, Controller, GroupController and Node services).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    // Identity
    GetPluginInfo,
    GetPluginCapabilities,
    Probe,
    // Controller
    CreateVolume,
    DeleteVolume,
    ControllerPublishVolume,
    ControllerUnpublishVolume,
    ValidateVolumeCapabilities,
    ListVolumes,
    GetCapacity,
    ControllerGetCapabilities,
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    GetSnapshot,
    ControllerExpandVolume,
    ControllerGetVolume,
    ControllerModifyVolume,
    // GroupController
    GroupControllerGetCapabilities,
    CreateVolumeGroupSnapshot,
    DeleteVolumeGroupSnapshot,
    GetVolumeGroupSnapshot,
    // Node
    NodeStageVolume,
    NodeUnstageVolume,
    NodePublishVolume,
    NodeUnpublishVolume,
    NodeGetVolumeStats,
    NodeExpandVolume,
    NodeGetCapabilities,
    NodeGetInfo,
}

impl Rpc {
    /// Every RPC, for tests that must cover them all.
    #[cfg(test)]
    pub const ALL: [Rpc; 30] = [
        Rpc::GetPluginInfo,
        Rpc::GetPluginCapabilities,
        Rpc::Probe,
        Rpc::CreateVolume,
        Rpc::DeleteVolume,
        Rpc::ControllerPublishVolume,
        Rpc::ControllerUnpublishVolume,
        Rpc::ValidateVolumeCapabilities,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::ControllerGetCapabilities,
        Rpc::CreateSnapshot,
        Rpc::DeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::GetSnapshot,
        Rpc::ControllerExpandVolume,
        Rpc::ControllerGetVolume,
        Rpc::ControllerModifyVolume,
        Rpc::GroupControllerGetCapabilities,
        Rpc::CreateVolumeGroupSnapshot,
        Rpc::DeleteVolumeGroupSnapshot,
        Rpc::GetVolumeGroupSnapshot,
        Rpc::NodeStageVolume,
        Rpc::NodeUnstageVolume,
        Rpc::NodePublishVolume,
        Rpc::NodeUnpublishVolume,
        Rpc::NodeGetVolumeStats,
        Rpc::NodeExpandVolume,
        Rpc::NodeGetCapabilities,
        Rpc::NodeGetInfo,
    ];

    /// The RPC's name on the wire (and in the logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Rpc::GetPluginInfo => "GetPluginInfo",
            Rpc::GetPluginCapabilities => "GetPluginCapabilities",
            Rpc::Probe => "Probe",
            Rpc::CreateVolume => "CreateVolume",
            Rpc::DeleteVolume => "DeleteVolume",
            Rpc::ControllerPublishVolume => "ControllerPublishVolume",
            Rpc::ControllerUnpublishVolume => "ControllerUnpublishVolume",
            Rpc::ValidateVolumeCapabilities => "ValidateVolumeCapabilities",
            Rpc::ListVolumes => "ListVolumes",
            Rpc::GetCapacity => "GetCapacity",
            Rpc::ControllerGetCapabilities => "ControllerGetCapabilities",
            Rpc::CreateSnapshot => "CreateSnapshot",
            Rpc::DeleteSnapshot => "DeleteSnapshot",
            Rpc::ListSnapshots => "ListSnapshots",
            Rpc::GetSnapshot => "GetSnapshot",
            Rpc::ControllerExpandVolume => "ControllerExpandVolume",
            Rpc::ControllerGetVolume => "ControllerGetVolume",
            Rpc::ControllerModifyVolume => "ControllerModifyVolume",
            Rpc::GroupControllerGetCapabilities => "GroupControllerGetCapabilities",
            Rpc::CreateVolumeGroupSnapshot => "CreateVolumeGroupSnapshot",
            Rpc::DeleteVolumeGroupSnapshot => "DeleteVolumeGroupSnapshot",
            Rpc::GetVolumeGroupSnapshot => "GetVolumeGroupSnapshot",
            Rpc::NodeStageVolume => "NodeStageVolume",
            Rpc::NodeUnstageVolume => "NodeUnstageVolume",
            Rpc::NodePublishVolume => "NodePublishVolume",
            Rpc::NodeUnpublishVolume => "NodeUnpublishVolume",
            Rpc::NodeGetVolumeStats => "NodeGetVolumeStats",
            Rpc::NodeExpandVolume => "NodeExpandVolume",
            Rpc::NodeGetCapabilities => "NodeGetCapabilities",
            Rpc::NodeGetInfo => "NodeGetInfo",
        }
    }

    /// Calls a CO makes every few seconds (probes, capability and stats polls): their successes
    /// are logged at debug level, so the log shows the work, not the polling.
    pub fn is_poll(self) -> bool {
        matches!(
            self,
            Rpc::Probe
                | Rpc::GetPluginInfo
                | Rpc::GetPluginCapabilities
                | Rpc::ControllerGetCapabilities
                | Rpc::GroupControllerGetCapabilities
                | Rpc::NodeGetCapabilities
                | Rpc::NodeGetInfo
                | Rpc::NodeGetVolumeStats
                | Rpc::GetCapacity
        )
    }
}

impl std::fmt::Display for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC the proto defines for the services loopvol serves has a variant, named as on
    /// the wire (the generated code lists each method's path).
    #[test]
    fn names_match_the_wire() {
        let proto = include_str!("../../proto/csi.proto");
        let mut names: Vec<&str> = Rpc::ALL.iter().map(|r| r.as_str()).collect();
        for name in &names {
            assert!(
                proto.contains(&format!("rpc {name}(")) || proto.contains(&format!("rpc {name} (")),
                "{name} is not an RPC of csi.proto"
            );
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Rpc::ALL.len(), "two RPCs share a name");
        // And the other way: every RPC of the served services has a variant (the
        // SnapshotMetadata service is not served).
        let not_served = ["GetMetadataAllocated", "GetMetadataDelta"];
        for line in proto.lines() {
            let Some(rest) = line.trim().strip_prefix("rpc ") else {
                continue;
            };
            let name = rest.split(['(', ' ']).next().unwrap_or_default();
            assert!(
                names.contains(&name) || not_served.contains(&name),
                "RPC {name} has no variant"
            );
        }
    }
}
