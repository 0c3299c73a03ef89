//! Receivers from their config: the listen address of each protocol and the context its
//! connections share, so the topology only says which exporters a receiver feeds.
use std::net::SocketAddr;
use std::sync::Arc;

use super::{ConnectionSettings, Protocol, ReceiverContext};
use crate::config::{self, ListenAddr, OtlpReceiverConfig, ProtocolConfig};
use crate::pipeline::Intake;
use crate::telemetry::{Health, Metrics};

/// One protocol of an `otlp` receiver: what it speaks and where it listens.
pub(crate) struct Endpoint<'a> {
    pub(crate) protocol: Protocol,
    pub(crate) transport: &'static str,
    pub(crate) config: &'a ProtocolConfig,
    pub(crate) addr: SocketAddr,
}

/// The enabled protocols of a receiver, gRPC first.
pub(crate) fn endpoints(otlp: &OtlpReceiverConfig) -> Vec<Endpoint<'_>> {
    [
        (
            Protocol::Grpc,
            "grpc",
            &otlp.protocols.grpc,
            config::DEFAULT_GRPC_ENDPOINT,
        ),
        (
            Protocol::Http,
            "http",
            &otlp.protocols.http,
            config::DEFAULT_HTTP_ENDPOINT,
        ),
    ]
    .into_iter()
    .filter_map(|(protocol, transport, proto, default)| {
        let config = proto.as_ref()?;
        Some(Endpoint {
            protocol,
            transport,
            config,
            addr: config.endpoint.unwrap_or_else(|| ListenAddr::constant(default)).0,
        })
    })
    .collect()
}

impl ReceiverContext {
    /// The context of receiver `id`'s `transport` listener, feeding `intake`.
    pub(crate) fn new(
        id: &str,
        transport: &'static str,
        p: &ProtocolConfig,
        intake: Arc<Intake>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> ReceiverContext {
        ReceiverContext {
            handles: metrics.receiver(id, transport),
            receiver: id.to_string(),
            transport,
            intake,
            metrics,
            max_recv_msg_size_mib: p.max_recv_msg_size_mib,
            include_metadata: p.include_metadata,
            ignored_metadata_warned: Default::default(),
            connections: ConnectionSettings::from_config(p),
            health,
            cors: p.cors.clone().filter(|c| !c.allowed_origins.is_empty()),
        }
    }
}
