//! The GroupController service: snapshots of several volumes taken at one point in time (all
//! frozen together, then copied).

use std::collections::BTreeSet;
use std::sync::Arc;

use loopvol::{validate, ErrorKind, SnapshotMeta};
use loopvol_proto::csi::v1 as pb;
use pb::group_controller_service_capability::rpc::Type as Rpc;
use tonic::{Request, Response, Status};

use crate::controller::snapshot_pb;
use crate::error::{invalid, require, to_status};
use crate::inflight;
use crate::log::{self, Redact};
use crate::params;
use crate::server::Driver;

pub struct GroupController {
    driver: Arc<Driver>,
}

fn group_pb(group_id: &str, members: &[SnapshotMeta]) -> pb::VolumeGroupSnapshot {
    let created = members.iter().map(|s| s.created_unix).min().unwrap_or(0);
    pb::VolumeGroupSnapshot {
        group_snapshot_id: group_id.to_owned(),
        snapshots: members.iter().map(snapshot_pb).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(created).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        ready_to_use: true,
    }
}

/// The spec lets the CO name the members it expects; a list that does not match the group is
/// INVALID_ARGUMENT.
fn check_members(group_id: &str, members: &[SnapshotMeta], named: &[String]) -> Result<(), Status> {
    if named.is_empty() {
        return Ok(());
    }
    let have: BTreeSet<&str> = members.iter().map(|s| s.id.as_str()).collect();
    let want: BTreeSet<&str> = named.iter().map(String::as_str).collect();
    if have != want {
        return Err(invalid(format!(
            "snapshot_ids do not match group snapshot {group_id}, whose members are {}",
            have.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

impl GroupController {
    pub fn new(driver: &Arc<Driver>) -> Self {
        GroupController {
            driver: Arc::clone(driver),
        }
    }
}

#[tonic::async_trait]
impl pb::group_controller_server::GroupController for GroupController {
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        log::call(
            "GroupControllerGetCapabilities",
            "",
            Redact::default(),
            async {
                Ok(pb::GroupControllerGetCapabilitiesResponse {
                    capabilities: vec![pb::GroupControllerServiceCapability {
                        r#type: Some(pb::group_controller_service_capability::Type::Rpc(
                            pb::group_controller_service_capability::Rpc {
                                r#type: Rpc::CreateDeleteGetVolumeGroupSnapshot as i32,
                            },
                        )),
                    }],
                })
            },
        )
        .await
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        const M: &str = "CreateVolumeGroupSnapshot";
        let r = req.into_inner();
        let name = r.name.clone();
        log::call(M, &name, Redact::default(), async move {
            require("name", &r.name)?;
            if r.source_volume_ids.is_empty() {
                return Err(invalid("source_volume_ids is required"));
            }
            validate::check_name("group snapshot name", &r.name).map_err(|e| to_status(M, e))?;
            params::snapshot(&r.parameters)?;
            let group_id = validate::id_for_name(&r.name);
            let (name, sources) = (r.name, r.source_volume_ids);
            let (group_id, members) = self
                .driver
                .run(M, vec![inflight::group(&group_id)], move |pool| {
                    Ok(pool.create_group_snapshot(&name, &sources)?)
                })
                .await?;
            Ok(pb::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(group_pb(&group_id, &members)),
            })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        const M: &str = "DeleteVolumeGroupSnapshot";
        let r = req.into_inner();
        let id = r.group_snapshot_id.clone();
        log::call(M, &id, Redact::default(), async move {
            require("group_snapshot_id", &r.group_snapshot_id)?;
            let (id, named) = (r.group_snapshot_id, r.snapshot_ids);
            self.driver
                .run(M, vec![inflight::group(&id)], move |pool| {
                    let members = match pool.get_group_snapshot(&id) {
                        Ok(m) => m,
                        // Already gone: deletion is idempotent.
                        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                        Err(e) => return Err(e.into()),
                    };
                    check_members(&id, &members, &named)?;
                    for s in &members {
                        pool.delete_snapshot(&s.id)?;
                    }
                    Ok(())
                })
                .await?;
            Ok(pb::DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        const M: &str = "GetVolumeGroupSnapshot";
        let r = req.into_inner();
        let id = r.group_snapshot_id.clone();
        log::call(M, &id, Redact::default(), async move {
            require("group_snapshot_id", &r.group_snapshot_id)?;
            let (id, named) = (r.group_snapshot_id, r.snapshot_ids);
            let members = {
                let id = id.clone();
                self.driver
                    .run(M, Vec::new(), move |pool| Ok(pool.get_group_snapshot(&id)?))
                    .await?
            };
            check_members(&id, &members, &named)?;
            Ok(pb::GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(group_pb(&id, &members)),
            })
        })
        .await
    }
}
