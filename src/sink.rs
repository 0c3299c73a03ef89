//! A fast counting OTLP sink (`otlp-relay sink`) that plays MLflow in tests and benchmarks.
//!
//! It accepts OTLP/HTTP `POST /v1/traces` (protobuf or JSON, gzip/deflate bodies) and gRPC
//! `TraceService/Export` (on the HTTP port too, and on `--grpc-listen`), counts requests, spans,
//! unique spans (trace_id + span_id) and wire bytes, and serves them at `GET /stats`. It can play a
//! failing or slow MLflow (`--status`, `--fail-every`, `--delay-ms`, `--max-spans-per-sec`).
//! Protobuf bodies are walked, not decoded, so the sink stays far cheaper than anything it measures.
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::supervise::LockUnpoisoned;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;

use crate::otlp::codec::RawCodec;
use crate::otlp::compress::{DecompressError, Deflate, decompress};
use crate::otlp::{EXPERIMENT_HEADER, Encoding, GRPC_EXPORT_PATH, HTTP_TRACES_PATH, varint};

/// Largest body the sink reads (compressed or not).
const MAX_BODY: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// Address for OTLP/HTTP (and gRPC, which is served on the same port too), e.g. 127.0.0.1:4318.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Extra address serving gRPC (and HTTP) e.g. 127.0.0.1:4317.
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// Answer every request with this HTTP status (gRPC: the matching code); with --fail-every,
    /// the status of the failing requests.
    #[arg(long)]
    pub status: Option<u16>,
    /// Fail every Nth request (with --status, default 503).
    #[arg(long)]
    pub fail_every: Option<u64>,
    /// Fail the first N requests (with --status, default 503), then accept: "503, then 200".
    #[arg(long)]
    pub fail_first: Option<u64>,
    /// Delay every request by this many milliseconds before answering (a slow MLflow).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Ingest at most this many spans per second overall (requests queue up behind each other).
    #[arg(long)]
    pub max_spans_per_sec: Option<f64>,
    /// Retry-After seconds on failures (gRPC: RetryInfo).
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// Extra plain-HTTP address (no TLS) serving everything, /stats included: lets tests and
    /// loadgen --verify-sink read the counts of a TLS-only sink.
    #[arg(long)]
    pub stats_listen: Option<SocketAddr>,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM) (mTLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Require a Bearer JWT on every export, verified against this JWKS URL (signature, exp with
    /// no leeway, aud); 401 otherwise. /stats counts the distinct tokens seen.
    #[arg(long, requires = "audience")]
    pub require_jwt: Option<String>,
    /// The audience a token must carry (with --require-jwt).
    #[arg(long, requires = "require_jwt")]
    pub audience: Option<String>,
}

/// Bearer JWT checks for `--require-jwt`: the JWKS is fetched at start and again (at most once
/// a second) when a token names an unknown key, as after a provider's key rotation.
pub(crate) struct JwtCheck {
    jwks_url: String,
    audience: String,
    http: crate::http_client::HttpClient,
    keys: tokio::sync::RwLock<jsonwebtoken::jwk::JwkSet>,
    last_fetch: Mutex<Option<Instant>>,
    /// Hashes of the distinct valid tokens seen (not the tokens), and per key id how many.
    tokens: Mutex<(HashSet<u64>, BTreeMap<String, u64>)>,
    rejected: AtomicU64,
}

impl JwtCheck {
    fn new(jwks_url: String, audience: String) -> anyhow::Result<JwtCheck> {
        let http = crate::http_client::HttpClient::new(
            &crate::config::ClientTlsConfig::default(),
            crate::http_client::any_https([jwks_url.as_str()]),
            Duration::from_secs(5),
        )?;
        Ok(JwtCheck {
            jwks_url,
            audience,
            http,
            keys: tokio::sync::RwLock::new(jsonwebtoken::jwk::JwkSet { keys: Vec::new() }),
            last_fetch: Mutex::new(None),
            tokens: Mutex::new((HashSet::new(), BTreeMap::new())),
            rejected: AtomicU64::new(0),
        })
    }

    async fn refetch(&self) -> Result<(), String> {
        {
            let mut last = self.last_fetch.lock_unpoisoned();
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err("unknown signing key (JWKS fetched less than a second ago)".into());
            }
            *last = Some(Instant::now());
        }
        let doc = self
            .http
            .get_json(&self.jwks_url)
            .await
            .map_err(|e| format!("JWKS: {e}"))?;
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(doc).map_err(|e| format!("JWKS: {e}"))?;
        *self.keys.write().await = set;
        Ok(())
    }

    async fn key_for(&self, kid: &str) -> Option<jsonwebtoken::DecodingKey> {
        let find =
            |set: &jsonwebtoken::jwk::JwkSet| set.find(kid).and_then(|k| jsonwebtoken::DecodingKey::from_jwk(k).ok());
        if let Some(k) = find(&*self.keys.read().await) {
            return Some(k);
        }
        if let Err(e) = self.refetch().await {
            tracing::debug!(error = %e, "no key");
        }
        find(&*self.keys.read().await)
    }

    /// Ok when `authorization` holds a valid Bearer JWT for our audience.
    async fn verify(&self, authorization: Option<&str>) -> Result<(), String> {
        let result = self.verify_inner(authorization).await;
        if result.is_err() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn verify_inner(&self, authorization: Option<&str>) -> Result<(), String> {
        use jsonwebtoken::{Algorithm, Validation};
        let value = authorization.ok_or("no Authorization header")?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or("not a Bearer token")?
            .trim();
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err("symmetric algorithms are not accepted".into());
        }
        let kid = header.kid.clone().unwrap_or_default();
        let key = self
            .key_for(&kid)
            .await
            .ok_or_else(|| format!("unknown signing key {kid:?}"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.set_audience(&[&self.audience]);
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| e.to_string())?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(token, &mut hasher);
        let mut seen = self.tokens.lock_unpoisoned();
        if seen.0.insert(hasher.finish()) {
            *seen.1.entry(kid).or_default() += 1;
        }
        Ok(())
    }

    fn stats(&self) -> serde_json::Value {
        let seen = self.tokens.lock_unpoisoned();
        serde_json::json!({
            "distinct_tokens": seen.0.len(),
            "tokens_by_kid": seen.1,
            "rejected": self.rejected.load(Ordering::Relaxed),
        })
    }
}

/// google.rpc.Status and RetryInfo, the OTLP error payloads (not part of opentelemetry-proto).
pub use crate::otlp::rpc;

// ---------------------------------------------------------------------------------------------
// Pure parts: protobuf walking, failure schedule, throttle, counters.

#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum WalkError {
    #[error("truncated protobuf")]
    Truncated,
    #[error("unsupported protobuf wire type {0}")]
    WireType(u64),
}

/// The varint at the front of `buf`, advancing past it.
fn varint(buf: &mut &[u8]) -> Result<u64, WalkError> {
    let mut pos = 0;
    let value = varint::read(buf, &mut pos).map_err(|_| WalkError::Truncated)?;
    *buf = &buf[pos..];
    Ok(value)
}

/// Calls `f(field_number, length_delimited_payload)` for each LEN field of one message, skipping
/// the others.
fn fields<'a>(mut buf: &'a [u8], mut f: impl FnMut(u64, &'a [u8]) -> Result<(), WalkError>) -> Result<(), WalkError> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut buf)?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if buf.len() < n {
                    return Err(WalkError::Truncated);
                }
                buf = &buf[n..];
            }
            2 => {
                let len = varint(&mut buf)? as usize;
                if buf.len() < len {
                    return Err(WalkError::Truncated);
                }
                let (payload, rest) = buf.split_at(len);
                buf = rest;
                f(field, payload)?;
            }
            other => return Err(WalkError::WireType(other)),
        }
    }
    Ok(())
}

/// Walks an encoded ExportTraceServiceRequest and calls `f(trace_id, span_id)` for every span.
/// Returns the span count. Only the framing is checked, which is all a counter needs.
pub(crate) fn walk_spans(buf: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> Result<u64, WalkError> {
    let mut count = 0u64;
    // ExportTraceServiceRequest.resource_spans = 1 → ResourceSpans.scope_spans = 2 →
    // ScopeSpans.spans = 2 → Span.trace_id = 1, span_id = 2.
    fields(buf, |n, rs| {
        if n != 1 {
            return Ok(());
        }
        fields(rs, |n, ss| {
            if n != 2 {
                return Ok(());
            }
            fields(ss, |n, span| {
                if n != 2 {
                    return Ok(());
                }
                let (mut trace, mut id) = (&[][..], &[][..]);
                fields(span, |n, v| {
                    match n {
                        1 => trace = v,
                        2 => id = v,
                        _ => {}
                    }
                    Ok(())
                })?;
                count += 1;
                f(trace, id);
                Ok(())
            })
        })
    })?;
    Ok(count)
}

/// Which requests fail, and with what status.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailurePlan {
    pub status: Option<u16>,
    pub fail_every: Option<u64>,
    pub fail_first: Option<u64>,
}

impl FailurePlan {
    /// The failing status for the `n`th request (1-based), or None to accept it.
    pub(crate) fn status_for(&self, n: u64) -> Option<u16> {
        let failing = self.status.unwrap_or(503);
        let status = match (self.fail_first, self.fail_every) {
            (Some(first), _) if n <= first => Some(failing),
            (Some(_), None) => None,
            (_, Some(k)) if k > 0 => n.is_multiple_of(k).then_some(failing),
            _ => self.status,
        }?;
        (!(200..300).contains(&status)).then_some(status)
    }
}

/// Caps ingestion at `rate` spans/s overall: each request reserves its share of a shared timeline
/// and completes when that share is due, like a server whose throughput is the bottleneck.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: f64,
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    pub(crate) fn new(rate: f64) -> Throttle {
        Throttle {
            rate,
            next: Mutex::new(None),
        }
    }

    /// Reserves `spans` and returns when the request may complete.
    pub(crate) fn reserve(&self, spans: u64, now: Instant) -> Instant {
        let mut next = self.next.lock_unpoisoned();
        let start = next.map_or(now, |n| n.max(now));
        let done = start + Duration::from_secs_f64(spans as f64 / self.rate);
        *next = Some(done);
        done
    }
}

/// A hasher for random ids: they are already uniformly distributed, so folding is enough.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

const SHARDS: usize = 64;
type IdSet = HashSet<(u128, u64), BuildHasherDefault<IdHasher>>;

/// The set of (trace_id, span_id) seen, sharded so concurrent requests rarely contend.
pub struct UniqueSpans {
    shards: Vec<Mutex<IdSet>>,
    count: AtomicU64,
}

impl Default for UniqueSpans {
    fn default() -> Self {
        UniqueSpans {
            shards: (0..SHARDS).map(|_| Mutex::new(IdSet::default())).collect(),
            count: AtomicU64::new(0),
        }
    }
}

impl UniqueSpans {
    pub fn key(trace_id: &[u8], span_id: &[u8]) -> (u128, u64) {
        let mut t = [0u8; 16];
        let mut s = [0u8; 8];
        let tl = trace_id.len().min(16);
        let sl = span_id.len().min(8);
        t[..tl].copy_from_slice(&trace_id[..tl]);
        s[..sl].copy_from_slice(&span_id[..sl]);
        (u128::from_le_bytes(t), u64::from_le_bytes(s))
    }

    /// Inserts keys; returns how many were new.
    pub(crate) fn insert_all(&self, keys: &[(u128, u64)]) -> u64 {
        let mut new = 0;
        for &k in keys {
            let shard = ((k.1 ^ (k.0 as u64)) as usize) % SHARDS;
            if self.shards[shard].lock_unpoisoned().insert(k) {
                new += 1;
            }
        }
        self.count.fetch_add(new, Ordering::Relaxed);
        new
    }

    pub(crate) fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every key seen, as `UniqueSpans::key` makes them (for delivery proofs in tests).
    pub(crate) fn keys(&self) -> Vec<(u128, u64)> {
        self.shards
            .iter()
            .flat_map(|s| s.lock_unpoisoned().iter().copied().collect::<Vec<_>>())
            .collect()
    }
}

/// The headers of the last request that matter to the relay's tests.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct LastRequest {
    pub transport: String,
    pub path: String,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub experiment_id: Option<String>,
    pub authorization: bool,
    pub host: Option<String>,
}

#[derive(Default)]
struct Meta {
    last: Option<LastRequest>,
    /// Spans accepted per x-mlflow-experiment-id ("none" when absent).
    experiments: BTreeMap<String, u64>,
    /// Failed requests per status.
    failures: BTreeMap<u16, u64>,
}

pub(crate) struct State {
    plan: FailurePlan,
    delay: Duration,
    throttle: Option<Throttle>,
    retry_after: Option<u64>,
    requests: AtomicU64,
    failed_requests: AtomicU64,
    spans: AtomicU64,
    bytes: AtomicU64,
    unique: UniqueSpans,
    meta: Mutex<Meta>,
    jwt: Option<JwtCheck>,
}

impl State {
    pub(crate) fn new(args: &SinkArgs) -> State {
        State {
            plan: FailurePlan {
                status: args.status,
                fail_every: args.fail_every,
                fail_first: args.fail_first,
            },
            delay: Duration::from_millis(args.delay_ms),
            throttle: args.max_spans_per_sec.filter(|r| *r > 0.0).map(Throttle::new),
            retry_after: args.retry_after,
            requests: AtomicU64::new(0),
            failed_requests: AtomicU64::new(0),
            spans: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            unique: UniqueSpans::default(),
            meta: Mutex::new(Meta::default()),
            jwt: None,
        }
    }

    /// Answers a request whose token was refused: counted as a request failed with 401.
    fn unauthorized(&self, wire_bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.failed_requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(wire_bytes as u64, Ordering::Relaxed);
        *self.meta.lock_unpoisoned().failures.entry(401).or_default() += 1;
    }

    /// With --require-jwt: Err(reason) unless the request carries a valid token.
    async fn check_jwt(&self, authorization: Option<&str>) -> Result<(), String> {
        match &self.jwt {
            Some(j) => j.verify(authorization).await,
            None => Ok(()),
        }
    }

    /// The /stats document.
    pub(crate) fn stats_json(&self) -> serde_json::Value {
        let meta = self.meta.lock_unpoisoned();
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "failed_requests": self.failed_requests.load(Ordering::Relaxed),
            "spans": self.spans.load(Ordering::Relaxed),
            "unique_spans": self.unique.len(),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "experiments": meta.experiments,
            "failures": meta.failures.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "last": meta.last,
            "jwt": self.jwt.as_ref().map(JwtCheck::stats),
        })
    }

    /// Counts a request's arrival and decides whether it fails.
    fn arrive(&self, wire_bytes: usize, last: LastRequest) -> Option<u16> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.bytes.fetch_add(wire_bytes as u64, Ordering::Relaxed);
        let failing = self.plan.status_for(n);
        let mut meta = self.meta.lock_unpoisoned();
        meta.last = Some(last);
        if let Some(status) = failing {
            *meta.failures.entry(status).or_default() += 1;
            self.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        failing
    }

    /// Waits as a slow MLflow would, then counts the accepted spans.
    async fn accept(&self, keys: Vec<(u128, u64)>, experiment: Option<&str>) {
        let mut until = Instant::now() + self.delay;
        if let Some(t) = &self.throttle {
            until = until.max(t.reserve(keys.len() as u64, Instant::now()));
        }
        let now = Instant::now();
        if until > now {
            tokio::time::sleep(until - now).await;
        }
        self.spans.fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.unique.insert_all(&keys);
        let mut meta = self.meta.lock_unpoisoned();
        *meta
            .experiments
            .entry(experiment.unwrap_or("none").to_string())
            .or_default() += keys.len() as u64;
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after.map(Duration::from_secs)
    }
}

/// The gRPC code an HTTP status stands for (OTLP's mapping, reversed).
pub(crate) fn grpc_code_for(status: u16) -> tonic::Code {
    use tonic::Code;
    match status {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        501 => Code::Unimplemented,
        502..=504 => Code::Unavailable,
        _ => Code::Internal,
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn grpc_export(
    state: Arc<State>,
    req: tonic::Request<Bytes>,
) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
    let md = req.metadata().clone().into_headers();
    let body = req.into_inner();
    let experiment = header(&md, EXPERIMENT_HEADER);
    let last = LastRequest {
        transport: "grpc".into(),
        path: GRPC_EXPORT_PATH.into(),
        content_type: header(&md, "content-type"),
        content_encoding: header(&md, "grpc-encoding"),
        experiment_id: experiment.clone(),
        authorization: md.contains_key("authorization"),
        host: None,
    };
    if let Err(reason) = state.check_jwt(header(&md, "authorization").as_deref()).await {
        state.unauthorized(body.len());
        return Err(tonic::Status::unauthenticated(reason));
    }
    if let Some(status) = state.arrive(body.len(), last) {
        let code = grpc_code_for(status);
        let detail = rpc::status(code as i32, "sink: configured failure", state.retry_after());
        return Err(tonic::Status::with_details(
            code,
            "sink: configured failure",
            detail.encode_to_vec().into(),
        ));
    }
    let mut keys = Vec::new();
    walk_spans(&body, |t, s| keys.push(UniqueSpans::key(t, s)))
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    state.accept(keys, experiment.as_deref()).await;
    Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
}

// ---------------------------------------------------------------------------------------------
// HTTP

type RespBody = tonic::body::Body;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut response = Response::new(RespBody::new(Full::new(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

fn error_response(status: u16, json: bool, message: &str, retry_after: Option<Duration>) -> Response<RespBody> {
    let code = grpc_code_for(status) as i32;
    let st = rpc::status(code, message, retry_after);
    let mut resp = if json {
        let body = serde_json::json!({"code": code, "message": message});
        respond(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "application/json",
            body.to_string(),
        )
    } else {
        respond(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "application/x-protobuf",
            st.encode_to_vec(),
        )
    };
    if let Some(d) = retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(d.as_secs()));
    }
    resp
}

async fn http_export(state: Arc<State>, req: Request<Incoming>) -> Response<RespBody> {
    let headers = req.headers().clone();
    let content_type = header(&headers, "content-type");
    let Some(encoding) = Encoding::from_content_type(content_type.as_deref().unwrap_or("")) else {
        return error_response(415, false, "unsupported content type", None);
    };
    let json = encoding == Encoding::Json;
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(413, json, &format!("body: {e}"), None),
    };
    let experiment = header(&headers, EXPERIMENT_HEADER);
    let content_encoding = header(&headers, "content-encoding");
    let last = LastRequest {
        transport: "http".into(),
        path: HTTP_TRACES_PATH.into(),
        content_type,
        content_encoding: content_encoding.clone(),
        experiment_id: experiment.clone(),
        authorization: headers.contains_key(http::header::AUTHORIZATION),
        host: header(&headers, "host"),
    };
    if let Err(reason) = state.check_jwt(header(&headers, "authorization").as_deref()).await {
        state.unauthorized(body.len());
        let mut resp = error_response(401, json, &reason, None);
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return resp;
    }
    if let Some(status) = state.arrive(body.len(), last) {
        return error_response(status, json, "sink: configured failure", state.retry_after());
    }
    let raw = match decompress(body, content_encoding.as_deref(), MAX_BODY, Deflate::ZlibOrRaw) {
        Ok(b) => b,
        Err(e) => {
            let (status, msg) = match e {
                DecompressError::Unsupported(_) => (415, e.to_string()),
                DecompressError::Bad(detail) => (400, format!("bad compressed body: {detail}")),
                DecompressError::TooLarge => (413, e.to_string()),
            };
            return error_response(status, json, &msg, None);
        }
    };
    let mut keys = Vec::new();
    match encoding {
        Encoding::Protobuf => {
            if let Err(e) = walk_spans(&raw, |t, s| keys.push(UniqueSpans::key(t, s))) {
                return error_response(400, false, &e.to_string(), None);
            }
        }
        Encoding::Json => match serde_json::from_slice::<ExportTraceServiceRequest>(&raw) {
            Ok(r) => {
                for rs in &r.resource_spans {
                    for ss in &rs.scope_spans {
                        for s in &ss.spans {
                            keys.push(UniqueSpans::key(&s.trace_id, &s.span_id));
                        }
                    }
                }
            }
            Err(e) => return error_response(400, true, &format!("bad OTLP/JSON: {e}"), None),
        },
    }
    state.accept(keys, experiment.as_deref()).await;
    match encoding {
        Encoding::Protobuf => respond(
            StatusCode::OK,
            "application/x-protobuf",
            ExportTraceServiceResponse::default().encode_to_vec(),
        ),
        Encoding::Json => respond(StatusCode::OK, "application/json", "{}"),
    }
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        if req.uri().path() != GRPC_EXPORT_PATH {
            let resp = tonic::Status::unimplemented("unknown method").into_http();
            return Ok(resp);
        }
        let mut grpc = tonic::server::Grpc::new(RawCodec::<ExportTraceServiceResponse, Bytes>::new())
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Deflate)
            .max_decoding_message_size(MAX_BODY);
        let svc = tower::service_fn(move |r| grpc_export(state.clone(), r));
        return Ok(grpc.unary(svc, req).await);
    }
    let resp = match (req.method(), req.uri().path()) {
        (&Method::POST, HTTP_TRACES_PATH) => http_export(state, req).await,
        (&Method::GET, "/stats") => respond(StatusCode::OK, "application/json", state.stats_json().to_string()),
        // One `{key.0:032x}-{key.1:016x}` line per unique span, to prove which spans arrived.
        (&Method::GET, "/spans") => {
            let lines: String = state
                .unique
                .keys()
                .iter()
                .map(|(t, s)| format!("{t:032x}-{s:016x}\n"))
                .collect();
            respond(StatusCode::OK, "text/plain", lines)
        }
        (&Method::GET, "/healthz") | (&Method::GET, "/") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (_, "/v1/traces") | (_, "/stats") => {
            respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n")
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

fn load_tls(args: &SinkArgs) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let client_ca = args.tls_client_ca.as_ref().map(|p| p.to_string_lossy());
    let config = crate::tls::server_config_from_files(
        &cert.to_string_lossy(),
        &key.to_string_lossy(),
        client_ca.as_deref(),
        "",
    )?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

async fn serve(
    component: &'static str,
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()));
    let mut acceptor = crate::net::Acceptor::new(component);
    loop {
        let (stream, _) = acceptor.accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| route(state.clone(), req));
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "tls handshake failed");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Binds the sink's listeners and returns their addresses and the serving task.
pub(crate) async fn start(
    args: &SinkArgs,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>, Arc<State>, tokio::task::JoinHandle<()>)> {
    let tls = load_tls(args)?;
    let mut state = State::new(args);
    if let (Some(url), Some(aud)) = (&args.require_jwt, &args.audience) {
        let check = JwtCheck::new(url.clone(), aud.clone())?;
        if let Err(e) = check.refetch().await {
            tracing::warn!(error = %e, "JWKS not available yet; fetched again on the first token");
            *check.last_fetch.lock_unpoisoned() = None;
        }
        state.jwt = Some(check);
    }
    let state = Arc::new(state);
    let listen = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: cannot listen on {addr}: {e}"))
    };
    let http = listen(args.listen, "--listen").await?;
    let http_addr = http.local_addr()?;
    let grpc = match args.grpc_listen {
        Some(a) => Some(listen(a, "--grpc-listen").await?),
        None => None,
    };
    let grpc_addr = grpc.as_ref().map(|g| g.local_addr()).transpose()?;
    let mut tasks = vec![tokio::spawn(serve("sink-http", http, state.clone(), tls.clone()))];
    if let Some(g) = grpc {
        tasks.push(tokio::spawn(serve("sink-grpc", g, state.clone(), tls)));
    }
    if let Some(addr) = args.stats_listen {
        let plain = listen(addr, "--stats-listen").await?;
        tracing::info!(component = %"sink-stats", addr = %plain.local_addr()?, "listening");
        tasks.push(tokio::spawn(serve("sink-stats", plain, state.clone(), None)));
    }
    let handle = tokio::spawn(async move {
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok((http_addr, grpc_addr, state, handle))
}

pub(crate) fn main(args: SinkArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    rt.block_on(async move {
        let (http_addr, grpc_addr, _state, handle) = match start(&args).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "sink failed to start");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(component = %"sink-http", addr = %http_addr, "listening");
        if let Some(a) = grpc_addr {
            tracing::info!(component = %"sink-grpc", addr = %a, "listening");
        }
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "signal handler");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            _ = handle => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn request(ids: &[(u8, u8)]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: ids
                        .iter()
                        .map(|&(t, s)| Span {
                            trace_id: vec![t; 16],
                            span_id: vec![s; 8],
                            name: "x".repeat(200),
                            start_time_unix_nano: 123,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn walker_finds_every_span_id() {
        let req = request(&[(1, 1), (1, 2), (2, 1)]);
        let mut seen = Vec::new();
        let n = walk_spans(&req.encode_to_vec(), |t, s| seen.push((t[0], s[0]))).unwrap();
        assert_eq!(n, 3);
        assert_eq!(seen, vec![(1, 1), (1, 2), (2, 1)]);
        // Concatenated encodings are a merged request.
        let mut two = req.encode_to_vec();
        two.extend(request(&[(3, 3)]).encode_to_vec());
        assert_eq!(walk_spans(&two, |_, _| {}).unwrap(), 4);
    }

    #[test]
    fn walker_rejects_truncated_input() {
        let bytes = request(&[(1, 1)]).encode_to_vec();
        assert_eq!(
            walk_spans(&bytes[..bytes.len() - 3], |_, _| {}),
            Err(WalkError::Truncated)
        );
        assert_eq!(walk_spans(&[], |_, _| {}), Ok(0));
    }

    #[test]
    fn failure_plan() {
        let every3 = FailurePlan {
            status: None,
            fail_every: Some(3),
            fail_first: None,
        };
        let got: Vec<_> = (1..=6).map(|n| every3.status_for(n)).collect();
        assert_eq!(got, vec![None, None, Some(503), None, None, Some(503)]);
        let always = FailurePlan {
            status: Some(429),
            fail_every: None,
            fail_first: None,
        };
        assert_eq!(always.status_for(1), Some(429));
        let ok = FailurePlan {
            status: Some(200),
            fail_every: None,
            fail_first: None,
        };
        assert_eq!(ok.status_for(1), None);
        let first2 = FailurePlan {
            status: None,
            fail_every: None,
            fail_first: Some(2),
        };
        let got: Vec<_> = (1..=4).map(|n| first2.status_for(n)).collect();
        assert_eq!(got, vec![Some(503), Some(503), None, None]);
    }

    #[test]
    fn throttle_spaces_requests_by_their_spans() {
        let t = Throttle::new(1000.0);
        let now = Instant::now();
        assert_eq!(t.reserve(100, now), now + Duration::from_millis(100));
        assert_eq!(t.reserve(100, now), now + Duration::from_millis(200));
        // After an idle period the timeline restarts from now.
        let later = now + Duration::from_secs(5);
        assert_eq!(t.reserve(10, later), later + Duration::from_millis(10));
    }

    #[test]
    fn unique_spans_count_once() {
        let u = UniqueSpans::default();
        let a = UniqueSpans::key(&[1; 16], &[2; 8]);
        let b = UniqueSpans::key(&[1; 16], &[3; 8]);
        assert_eq!(u.insert_all(&[a, b, a]), 2);
        assert_eq!(u.insert_all(&[b]), 0);
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn retry_info_round_trip() {
        let st = rpc::status(14, "x", Some(Duration::from_secs(3)));
        assert_eq!(rpc::retry_delay(&st.encode_to_vec()), Some(Duration::from_secs(3)));
        assert_eq!(rpc::retry_delay(&rpc::status(14, "x", None).encode_to_vec()), None);
    }
}
