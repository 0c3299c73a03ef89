//! The sink's answers: OTLP/HTTP and gRPC exports, `/stats`, `/spans` and health, on one router.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tonic::codec::CompressionEncoding;

use super::count::{LastRequest, State, UniqueSpans};
use super::walk::walk_spans;
use super::{MAX_BODY, rpc};
use crate::otlp::codec::RawCodec;
use crate::otlp::compress::{DecompressError, Deflate, decompress};
use crate::otlp::{EXPERIMENT_HEADER, Encoding, GRPC_EXPORT_PATH, HTTP_TRACES_PATH};

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

pub(super) async fn route(state: Arc<State>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
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
