//! The Identity service: who the plugin is, what it offers, and whether its pool is usable.

use std::sync::Arc;

use loopvol_proto::csi::v1 as pb;
use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use tonic::{Request, Response, Status};

use crate::log::serve;
use crate::rpc::Rpc;
use crate::server::Driver;

pub struct Identity {
    driver: Arc<Driver>,
}

impl Identity {
    pub fn new(driver: &Arc<Driver>) -> Self {
        Identity {
            driver: Arc::clone(driver),
        }
    }

    fn capabilities(&self) -> Vec<pb::PluginCapability> {
        let config = &self.driver.config;
        let service = |t: service::Type| pb::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut caps = Vec::new();
        if config.serves_controller() {
            caps.push(service(service::Type::ControllerService));
            caps.push(service(service::Type::GroupControllerService));
        }
        if !config.shared {
            caps.push(service(service::Type::VolumeAccessibilityConstraints));
        }
        caps.push(pb::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        });
        caps
    }

    async fn info(
        &self,
        _r: pb::GetPluginInfoRequest,
    ) -> Result<pb::GetPluginInfoResponse, Status> {
        Ok(pb::GetPluginInfoResponse {
            name: self.driver.config.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        })
    }

    async fn plugin_capabilities(
        &self,
        _r: pb::GetPluginCapabilitiesRequest,
    ) -> Result<pb::GetPluginCapabilitiesResponse, Status> {
        Ok(pb::GetPluginCapabilitiesResponse {
            capabilities: self.capabilities(),
        })
    }

    /// Ready when the pool answers: never waits on a pool known not to answer, nor longer than
    /// the pool's deadline on one that hangs.
    async fn check_ready(&self, _r: pb::ProbeRequest) -> Result<pb::ProbeResponse, Status> {
        let answered = self
            .driver
            .run_bounded(Rpc::Probe, |pool| Ok(pool.ready()?))
            .await?;
        if answered.is_none() {
            return Err(Status::failed_precondition(format!(
                "pool {}: the pool is not answering: the readiness check did not return within \
                 {:.0} s",
                self.driver.pool.root().display(),
                loopvol::POOL_DEADLINE.as_secs_f64()
            )));
        }
        Ok(pb::ProbeResponse { ready: Some(true) })
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        serve(Rpc::GetPluginInfo, req, |r| self.info(r)).await
    }

    async fn get_plugin_capabilities(
        &self,
        req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        serve(Rpc::GetPluginCapabilities, req, |r| {
            self.plugin_capabilities(r)
        })
        .await
    }

    async fn probe(
        &self,
        req: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        serve(Rpc::Probe, req, |r| self.check_ready(r)).await
    }
}
