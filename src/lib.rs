//! otlp-relay: an OTLP trace relay for MLflow, plus its auth front end, load generator and sink.
#![forbid(unsafe_code)]
// Data from outside never meets an unwrap or expect; the few invariants that remain say why.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub(crate) mod admin;
pub(crate) mod app;
pub mod batch;
pub mod cmd;
pub mod config;
pub mod export;
pub mod gate;
pub(crate) mod http_client;
pub(crate) mod loadgen;
pub(crate) mod lock;
pub(crate) mod net;
pub(crate) mod otlp;
pub mod pipeline;
pub(crate) mod processor;
pub mod receiver;
pub mod sink;
pub mod spool;
pub(crate) mod supervise;
pub(crate) mod telemetry;
pub(crate) mod tls;
pub(crate) mod topology;
