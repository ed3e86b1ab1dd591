//! The Identity service: who the plugin is, what it offers, and whether its pool is usable.

use std::sync::Arc;

use loopvol_proto::csi::v1 as pb;
use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use tonic::{Request, Response, Status};

use crate::log::{self, Redact};
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
}

#[tonic::async_trait]
impl pb::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        log::call("GetPluginInfo", "", Redact::default(), async {
            Ok(pb::GetPluginInfoResponse {
                name: self.driver.config.driver_name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        log::call("GetPluginCapabilities", "", Redact::default(), async {
            Ok(pb::GetPluginCapabilitiesResponse {
                capabilities: self.capabilities(),
            })
        })
        .await
    }

    async fn probe(
        &self,
        _req: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        log::call("Probe", "", Redact::default(), async {
            self.driver
                .run("Probe", Vec::new(), |pool| Ok(pool.probe()?))
                .await?;
            Ok(pb::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
