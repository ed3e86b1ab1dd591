//! CSI v1.12 (`csi.v1`) protobuf messages and tonic gRPC services.
//!
//! Generated at build time from `proto/csi.proto` with `protox` +
//! `tonic-prost-build` (no system `protoc` needed). Server traits live in
//! e.g. [`csi::v1::identity_server`], clients in [`csi::v1::node_client`].

/// The `csi` protobuf package namespace.
pub mod csi {
    /// Package `csi.v1`: messages, enums, and the Identity, Controller,
    /// GroupController, SnapshotMetadata and Node services.
    #[allow(
        clippy::all,
        clippy::pedantic,
        clippy::nursery,
        missing_docs,
        rustdoc::all,
        unreachable_pub,
        unused_qualifications
    )]
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` for `csi.proto` and its
/// imports (custom options such as `csi_secret` included), e.g. for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/csi_v1_descriptor.bin"));

/// The proto package name served by this crate.
pub const PACKAGE: &str = "csi.v1";

/// A gRPC channel to a CSI endpoint on a Unix socket (what the sidecars and kubelet use): for
/// clients of `loopvol-csi` such as the tests and the load benchmark.
pub async fn connect_unix(
    socket: impl AsRef<std::path::Path>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.as_ref().to_owned();
    // The URI is required by the API but unused: the connector below ignores it.
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}
