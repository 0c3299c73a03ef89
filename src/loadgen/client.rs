//! The generator's transports: OTLP/gRPC over a tonic channel and OTLP/HTTP over a hyper client,
//! both connecting through the same rustls (aws-lc-rs) connector, plus OTLP retry classification.
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

use super::spans::Encoding;
use crate::otlp::codec::RawCodec;
use crate::otlp::{GRPC_EXPORT_PATH, grpc_retryable, rpc};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("bad endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error("bad header {0:?}")]
    Header(String),
}

/// TLS settings from telemetrygen's flags.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsOptions {
    pub(crate) ca_cert: Option<std::path::PathBuf>,
    pub(crate) client_cert: Option<std::path::PathBuf>,
    pub(crate) client_key: Option<std::path::PathBuf>,
}

/// A rustls client config: the CA file (or the system roots) and an optional client certificate,
/// loaded by the relay's own client loader (`tls::client_config`).
pub(crate) fn client_tls(opts: &TlsOptions) -> Result<rustls::ClientConfig, ClientError> {
    let path =
        |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let settings = crate::config::ClientTlsConfig {
        ca_file: path(&opts.ca_cert),
        cert_file: path(&opts.client_cert),
        key_file: path(&opts.client_key),
        ..Default::default()
    };
    Ok(crate::tls::client_config(&settings, true)?)
}

/// A connector for plain and TLS connections; `h2` makes it negotiate HTTP/2 (gRPC).
pub(crate) fn connector(tls: Option<rustls::ClientConfig>, h2: bool) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let tls = tls.unwrap_or_else(|| {
        // Plaintext endpoints never use it; the builder wants one.
        client_tls(&TlsOptions::default()).expect("default TLS config")
    });
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if h2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    }
}

/// Parses repeated `key="value"` / `key=value` header flags.
pub(crate) fn parse_headers(items: &[String]) -> Result<HeaderMap, ClientError> {
    let mut map = HeaderMap::new();
    for item in items {
        let (k, v) = item.split_once('=').ok_or_else(|| ClientError::Header(item.clone()))?;
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        let name = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| ClientError::Header(item.clone()))?;
        let value = HeaderValue::from_str(v).map_err(|_| ClientError::Header(item.clone()))?;
        map.append(name, value);
    }
    Ok(map)
}

/// How a failed attempt is treated (OTLP's retry rules).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    /// e.g. `http_503`, `grpc_UNAVAILABLE`, `transport`, `timeout`.
    pub(crate) label: String,
    pub(crate) retryable: bool,
    pub(crate) retry_after: Option<Duration>,
    /// What went wrong, for the report's first error per label (transport errors with their
    /// causes, e.g. a TLS alert).
    pub(crate) detail: String,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Accepted, with the spans the receiver reported rejected in partial_success.
    Accepted {
        rejected: u64,
    },
    Failed(Failure),
}

/// OTLP/HTTP: retry only 429, 502, 503, 504.
pub(crate) fn classify_http(status: StatusCode, retry_after: Option<&str>, now: SystemTime) -> Failure {
    let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
    Failure {
        label: format!("http_{}", status.as_u16()),
        retryable,
        retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        detail: format!("HTTP {status}"),
    }
}

/// Retry-After as delay-seconds or an HTTP-date.
pub(crate) fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// OTLP/gRPC: the transient codes, and RESOURCE_EXHAUSTED only with RetryInfo.
pub(crate) fn classify_grpc(status: &tonic::Status) -> Failure {
    let retry_after = rpc::retry_delay(status.details());
    let retryable = grpc_retryable(status.code(), retry_after.is_some());
    Failure {
        label: format!("grpc_{}", screaming_snake(&format!("{:?}", status.code()))),
        retryable,
        retry_after,
        detail: crate::telemetry::error_chain(status),
    }
}

/// `ResourceExhausted` → `RESOURCE_EXHAUSTED`, the names gRPC's specification uses.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Where and how to send.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// scheme://host:port
    pub(crate) base: String,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) encoding: Encoding,
    pub(crate) gzip: bool,
    pub(crate) timeout: Duration,
}

/// One worker's connection (one per worker, so the size difference of the variants is moot).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Transport {
    Grpc {
        client: tonic::client::Grpc<Channel>,
        target: Target,
    },
    Http {
        client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
        uri: Uri,
        target: Target,
    },
}

impl Transport {
    pub(crate) fn grpc(target: Target, tls: Option<rustls::ClientConfig>) -> Result<Transport, ClientError> {
        let endpoint = tonic::transport::Endpoint::from_shared(target.base.clone())
            .map_err(|e| ClientError::Endpoint(target.base.clone(), e.to_string()))?
            .tcp_nodelay(true);
        let channel = endpoint.connect_with_connector_lazy(connector(tls, true));
        let mut client = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(usize::MAX);
        if target.gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        Ok(Transport::Grpc { client, target })
    }

    pub(crate) fn http(target: Target, tls: Option<rustls::ClientConfig>) -> Result<Transport, ClientError> {
        let uri: Uri = format!("{}{}", target.base, target.path)
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Endpoint(target.base.clone(), e.to_string()))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(4)
            .build(connector(tls, false));
        Ok(Transport::Http { client, uri, target })
    }

    /// Sends one request body (already encoded; compressed here for HTTP, by tonic for gRPC).
    /// Returns the outcome and the bytes handed to the transport.
    pub(crate) async fn send(&mut self, body: Bytes) -> (Outcome, u64) {
        match self {
            Transport::Grpc { client, target } => {
                let len = body.len() as u64;
                let timeout = target.timeout;
                let fut = async {
                    client.ready().await.map_err(|e| {
                        tonic::Status::unavailable(format!("connect: {}", crate::telemetry::error_chain(&e)))
                    })?;
                    let mut req = tonic::Request::new(body);
                    req.set_timeout(timeout);
                    for (k, v) in target.headers.iter() {
                        if let (Ok(key), Ok(val)) = (
                            tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes()),
                            tonic::metadata::MetadataValue::try_from(v.as_bytes()),
                        ) {
                            req.metadata_mut().append(key, val);
                        }
                    }
                    client
                        .unary(
                            req,
                            http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH),
                            RawCodec::<Bytes, ExportTraceServiceResponse>::new(),
                        )
                        .await
                };
                let outcome = match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok(resp)) => Outcome::Accepted {
                        rejected: resp
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| p.rejected_spans.max(0) as u64),
                    },
                    Ok(Err(status)) => Outcome::Failed(classify_grpc(&status)),
                    Err(_) => timed_out(timeout),
                };
                (outcome, len)
            }
            Transport::Http { client, uri, target } => {
                let body = if target.gzip { gzip(&body) } else { body };
                let len = body.len() as u64;
                let mut req = Request::post(uri.clone());
                let headers = req.headers_mut().expect("fresh request builder");
                headers.extend(target.headers.clone());
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(match target.encoding {
                        Encoding::Proto => "application/x-protobuf",
                        Encoding::Json => "application/json",
                    }),
                );
                if target.gzip {
                    headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                let req = req.body(Full::new(body)).expect("valid request parts");
                let timeout = target.timeout;
                let encoding = target.encoding;
                let fut = async {
                    let resp = client.request(req).await?;
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, body))
                };
                let outcome = match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok((status, _, body))) if status.is_success() => Outcome::Accepted {
                        rejected: rejected_in(encoding, &body),
                    },
                    Ok(Ok((status, retry_after, _))) => {
                        Outcome::Failed(classify_http(status, retry_after.as_deref(), SystemTime::now()))
                    }
                    Ok(Err(e)) => Outcome::Failed(Failure {
                        label: "transport".into(),
                        retryable: true,
                        retry_after: None,
                        detail: crate::telemetry::error_chain(&e),
                    }),
                    Err(_) => timed_out(timeout),
                };
                (outcome, len)
            }
        }
    }
}

/// partial_success.rejected_spans of an HTTP success body (empty bodies reject nothing).
/// A request that got no answer in time: retried.
fn timed_out(timeout: Duration) -> Outcome {
    Outcome::Failed(Failure {
        label: "timeout".into(),
        retryable: true,
        retry_after: None,
        detail: format!("no answer within {timeout:?}"),
    })
}

fn rejected_in(encoding: Encoding, body: &[u8]) -> u64 {
    if body.is_empty() {
        return 0;
    }
    let resp = match encoding {
        Encoding::Proto => ExportTraceServiceResponse::decode(body).ok(),
        Encoding::Json => serde_json::from_slice::<ExportTraceServiceResponse>(body).ok(),
    };
    resp.and_then(|r| r.partial_success)
        .map_or(0, |p| p.rejected_spans.max(0) as u64)
}

fn gzip(data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::fast());
    e.write_all(data).expect("in-memory write");
    e.finish().expect("in-memory write").into()
}

/// GET a JSON document (the sink's /stats) over plain HTTP or TLS.
pub(crate) async fn get_json(url: &str, tls: Option<rustls::ClientConfig>) -> anyhow::Result<serde_json::Value> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector(tls, false));
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(url.parse()?)).await??;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_retry_rules() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let f = classify_http(StatusCode::SERVICE_UNAVAILABLE, Some("7"), now);
        assert!(f.retryable);
        assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert!(!classify_http(StatusCode::BAD_REQUEST, None, now).retryable);
        assert!(classify_http(StatusCode::TOO_MANY_REQUESTS, None, now).retryable);
        assert!(!classify_http(StatusCode::INTERNAL_SERVER_ERROR, None, now).retryable);
    }

    #[test]
    fn grpc_retry_rules() {
        assert!(classify_grpc(&tonic::Status::unavailable("x")).retryable);
        assert!(!classify_grpc(&tonic::Status::invalid_argument("x")).retryable);
        assert!(!classify_grpc(&tonic::Status::resource_exhausted("x")).retryable);
        let st = rpc::status(8, "x", Some(Duration::from_secs(2)));
        let with_info = tonic::Status::with_details(tonic::Code::ResourceExhausted, "x", st.encode_to_vec().into());
        let f = classify_grpc(&with_info);
        assert!(f.retryable);
        assert_eq!(f.retry_after, Some(Duration::from_secs(2)));
        assert_eq!(f.label, "grpc_RESOURCE_EXHAUSTED");
    }

    #[test]
    fn header_flags() {
        let h = parse_headers(&[r#"x-mlflow-experiment-id="7""#.into(), "Authorization=Bearer t".into()]).unwrap();
        assert_eq!(h["x-mlflow-experiment-id"], "7");
        assert_eq!(h["authorization"], "Bearer t");
        assert!(parse_headers(&["novalue".into()]).is_err());
    }
}
