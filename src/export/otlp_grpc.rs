//! The `otlp` (`otlp_grpc`) exporter: sends a batch's ResourceSpans, as the bytes they already
//! are, in one OTLP/gRPC Export call over one tonic channel per exporter (rustls, HTTP/2), with
//! the configured metadata, compression and token, and classifies the answer by the OTLP rules.
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use super::auth::{Authenticator, authorize};
use super::{ExportError, OutBatch};
use crate::config::{GrpcCompression, GrpcTarget, OtlpGrpcExporterConfig};
use crate::otlp::codec::RawCodec;
use crate::otlp::{GRPC_EXPORT_PATH, grpc_retryable, rpc};
use crate::supervise::LockUnpoisoned;

/// Bytes of a destination's message kept in errors and logs.
const MESSAGE_LIMIT: usize = 1024;
/// Largest answer read: an ExportTraceServiceResponse is a few bytes.
const MAX_ANSWER: usize = 1 << 20;
/// At most one partial-success log line per exporter this often; the others are counted in it.
const PARTIAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("endpoint: {0}")]
    Endpoint(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

pub(crate) struct OtlpGrpcExporter {
    name: String,
    endpoint: Endpoint,
    connector: HttpsConnector<HttpConnector>,
    /// Made at the first call: a lazy channel spawns its worker, which needs the runtime
    /// (exporters are built before it runs, by `check` too).
    channel: OnceLock<Channel>,
    headers: HeaderMap,
    compression: Option<CompressionEncoding>,
    timeout: Duration,
    auth: Option<Arc<dyn Authenticator>>,
    /// When partial success was last logged, and rejected spans since.
    partial_log: Mutex<(Option<Instant>, u64)>,
}

impl OtlpGrpcExporter {
    pub(crate) fn new(
        name: &str,
        cfg: &OtlpGrpcExporterConfig,
        auth: Option<Arc<dyn Authenticator>>,
    ) -> Result<Self, SetupError> {
        let target = GrpcTarget::parse(&cfg.endpoint).map_err(SetupError::Endpoint)?;
        let tls = cfg.uses_tls(&target);
        let scheme = if tls { "https" } else { "http" };
        let uri = format!("{scheme}://{}", target.authority);
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| SetupError::Endpoint(format!("{uri}: {e}")))?
            .user_agent(concat!("otlp-relay/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| SetupError::Endpoint(e.to_string()))?;
        // Each sender has at most one call in flight; the cap holds it if that ever changes.
        let consumers = if cfg.sending_queue.enabled {
            cfg.sending_queue.num_consumers
        } else {
            1
        };
        endpoint = endpoint.concurrency_limit(consumers.max(1));
        if let Some(k) = &cfg.keepalive {
            endpoint = endpoint
                .http2_keep_alive_interval(k.time.0)
                .keep_alive_timeout(k.timeout.0)
                .keep_alive_while_idle(k.permit_without_stream);
        }
        if !cfg.authority.is_empty() {
            let origin: http::Uri = format!("{scheme}://{}", cfg.authority)
                .parse()
                .map_err(|_| SetupError::Endpoint(format!("authority {:?}", cfg.authority)))?;
            endpoint = endpoint.origin(origin);
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            // validate() checked names and values.
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                headers.insert(name, value);
            }
        }
        Ok(OtlpGrpcExporter {
            name: name.to_string(),
            endpoint,
            connector: connector(cfg, tls, cfg.timeout.0)?,
            channel: OnceLock::new(),
            headers,
            compression: match cfg.compression {
                GrpcCompression::Gzip => Some(CompressionEncoding::Gzip),
                GrpcCompression::Zstd => Some(CompressionEncoding::Zstd),
                GrpcCompression::None => None,
            },
            timeout: cfg.timeout.0,
            auth,
            partial_log: Mutex::new((None, 0)),
        })
    }

    /// One Export call with the whole batch. Ok holds the spans the destination rejected while
    /// accepting the rest (partial success).
    pub(crate) async fn export(&self, batch: &OutBatch) -> Result<usize, ExportError> {
        let mut headers = self.headers.clone();
        let sent_auth = authorize(self.auth.as_ref(), &mut headers)
            .await
            .map_err(ExportError::Auth)?;
        let channel = self
            .channel
            .get_or_init(|| self.endpoint.connect_with_connector_lazy(self.connector.clone()))
            .clone();
        let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_ANSWER);
        if let Some(c) = self.compression {
            client = client.send_compressed(c);
        }
        let mut request = tonic::Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(headers),
            Default::default(),
            batch.payload(),
        );
        // The deadline travels as grpc-timeout, so the destination gives up when we do.
        request.set_timeout(self.timeout);
        let call = async {
            client
                .ready()
                .await
                .map_err(|e| ExportError::Transport(crate::telemetry::error_chain(&e)))?;
            client
                .unary(
                    request,
                    http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH),
                    RawCodec::<Bytes, ExportTraceServiceResponse>::new(),
                )
                .await
                .map_err(|status| self.refused(&status, sent_auth.as_ref()))
        };
        let response = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ExportError::Timeout(self.timeout))??;
        let rejected = match response.into_inner().partial_success {
            Some(p) if p.rejected_spans > 0 => {
                let rejected = usize::try_from(p.rejected_spans).unwrap_or(usize::MAX).min(batch.spans);
                self.log_partial(rejected, batch.spans, &p.error_message);
                rejected
            }
            _ => 0,
        };
        Ok(rejected)
    }

    /// What a failed call means for the batch.
    fn refused(&self, status: &tonic::Status, sent_auth: Option<&HeaderValue>) -> ExportError {
        // A status made on this side (no connection, a broken stream) carries its cause: the
        // destination never answered, so it is a transport failure, retried like one.
        if std::error::Error::source(status).is_some() {
            return ExportError::Transport(crate::telemetry::error_chain(status));
        }
        let message: String = status.message().chars().take(MESSAGE_LIMIT).collect();
        if status.code() == tonic::Code::Unauthenticated {
            if let (Some(auth), Some(value)) = (&self.auth, sent_auth) {
                auth.invalidate(value);
            }
            return ExportError::Unauthorized {
                body: format!("gRPC UNAUTHENTICATED: {message}"),
                with_token: sent_auth.is_some(),
            };
        }
        let retry_after = rpc::retry_delay(status.details());
        ExportError::Grpc {
            code: code_name(status.code()),
            message,
            retryable: grpc_retryable(status.code(), retry_after.is_some()),
            retry_after,
        }
    }

    /// One line per PARTIAL_LOG_INTERVAL: the destination kept part of a request.
    fn log_partial(&self, rejected: usize, spans: usize, reason: &str) {
        let mut last = self.partial_log.lock_unpoisoned();
        last.1 += rejected as u64;
        let now = Instant::now();
        if last.0.is_some_and(|at| now.duration_since(at) < PARTIAL_LOG_INTERVAL) {
            return;
        }
        let rejected_since_last_line = std::mem::take(&mut last.1);
        last.0 = Some(now);
        let reason: String = reason.chars().take(MESSAGE_LIMIT).collect();
        tracing::warn!(
            exporter = %self.name,
            rejected,
            spans,
            rejected_since_last_line,
            reason = %reason,
            "the destination accepted the request but rejected some spans (partial success): counted as failed, not retried"
        );
    }
}

/// The connector of the exporter's channel: TCP with TCP_NODELAY and a connect timeout, and
/// with `tls` rustls offering only h2 (gRPC), verified as `tls` says (CA, client certificate,
/// server name override, minimum version).
fn connector(
    cfg: &OtlpGrpcExporterConfig,
    tls: bool,
    connect_timeout: Duration,
) -> Result<HttpsConnector<HttpConnector>, SetupError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::tls::client_config(&cfg.tls, tls)?)
        .https_or_http();
    let override_name = &cfg.tls.server_name_override;
    let builder = if tls && !override_name.is_empty() {
        let name = rustls_pki_types::ServerName::try_from(override_name.clone())
            .map_err(|_| SetupError::Endpoint(format!("server_name_override {override_name:?}")))?;
        builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
    } else {
        builder
    };
    Ok(builder.enable_http2().wrap_connector(http))
}

/// A gRPC code as the gRPC specification spells it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message;

    use super::*;
    use crate::config::OtlpGrpcExporterConfig;

    fn exporter() -> OtlpGrpcExporter {
        let cfg = OtlpGrpcExporterConfig {
            endpoint: "127.0.0.1:4317".into(),
            ..Default::default()
        };
        OtlpGrpcExporter::new("otlp/t", &cfg, None).unwrap()
    }

    fn with_details(code: tonic::Code, retry_after: Option<Duration>) -> tonic::Status {
        let detail = rpc::status(code as i32, "busy", retry_after).encode_to_vec();
        tonic::Status::with_details(code, "busy", detail.into())
    }

    #[test]
    fn statuses_are_classified_by_the_otlp_rules() {
        let e = exporter();
        use tonic::Code::*;
        for code in [Unavailable, Aborted, Cancelled, DeadlineExceeded, OutOfRange, DataLoss] {
            let err = e.refused(&tonic::Status::new(code, "x"), None);
            assert!(err.is_retryable(), "{code:?}: {err}");
        }
        for code in [
            InvalidArgument,
            NotFound,
            PermissionDenied,
            FailedPrecondition,
            Unimplemented,
            Internal,
            Unknown,
            AlreadyExists,
            ResourceExhausted,
        ] {
            let err = e.refused(&tonic::Status::new(code, "x"), None);
            assert!(!err.is_retryable(), "{code:?}: {err}");
        }
        // RESOURCE_EXHAUSTED only with RetryInfo, whose delay is honoured.
        let err = e.refused(&with_details(ResourceExhausted, Some(Duration::from_secs(3))), None);
        assert!(err.is_retryable(), "{err}");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
        let err = e.refused(&with_details(Unavailable, Some(Duration::from_millis(1500))), None);
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(err.to_string(), "gRPC UNAVAILABLE: busy");
        // UNAUTHENTICATED without a token is final; with one the token is refreshed first.
        let err = e.refused(&tonic::Status::unauthenticated("no"), None);
        assert!(matches!(err, ExportError::Unauthorized { with_token: false, .. }));
        let token = HeaderValue::from_static("Bearer t");
        let err = e.refused(&tonic::Status::unauthenticated("expired"), Some(&token));
        assert!(err.is_retryable());
    }

    #[test]
    fn a_status_made_here_is_a_transport_failure() {
        let e = exporter();
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = tonic::Status::from_error(Box::new(io));
        let err = e.refused(&status, None);
        assert!(matches!(err, ExportError::Transport(_)), "{err}");
        assert!(err.is_retryable());
    }
}
