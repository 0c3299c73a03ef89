//! OTLP/HTTP: `POST /v1/traces` with protobuf or JSON, gzip/deflate bodies, size limits applied
//! to both the wire and the decompressed size, answers in the request's encoding.
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use prost::Message;

use super::body::{parse_off_worker, read_http_body};
use super::{ConnInfo, ReceiveError, ReceiverContext, ResponseBody, client_name, request_context, request_routing};
use crate::otlp::compress::{self, DecompressError, Deflate};
use crate::otlp::{Encoding, HTTP_TRACES_PATH};
use crate::pipeline::wire::{self, ParsedRequest};
use crate::pipeline::{Admitted, BodyHold};

/// The media type of a Content-Type header, parameters (charset) ignored.
pub(crate) fn parse_content_type(value: Option<&HeaderValue>) -> Result<Encoding, ReceiveError> {
    let text = value.and_then(|v| v.to_str().ok()).unwrap_or("");
    Encoding::from_content_type(text).ok_or_else(|| ReceiveError::UnsupportedMediaType(text.to_string()))
}

/// Decompresses per Content-Encoding, refusing output over `limit` bytes (a gzip bomb ends at
/// the limit, never in memory exhaustion); `deflate` is zlib-wrapped, as RFC 9110 says.
pub fn decompress(body: Bytes, encoding: Option<&str>, limit: usize, limit_mib: u64) -> Result<Bytes, ReceiveError> {
    compress::decompress(body, encoding, limit, Deflate::Zlib).map_err(|e| match e {
        DecompressError::Unsupported(encoding) => ReceiveError::UnsupportedEncoding(encoding),
        DecompressError::Bad(detail) => ReceiveError::BadCompression(detail),
        DecompressError::TooLarge => ReceiveError::TooLarge { limit_mib },
    })
}

/// The most of a refused body read and thrown away before answering.
const DISCARD_MAX: u64 = 64 * 1024 * 1024;
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards what is left of a refused request's body (nothing, when it was read
/// whole), bounded in bytes and time: an HTTP/1.1 client still sending would otherwise get a
/// connection reset instead of our answer, and OTLP exporters retry a reset as a transport
/// error (forever, for a 413 or 415 that no retry can fix), where those statuses are permanent.
async fn discard_refused(body: &mut Incoming, declared: Option<u64>) {
    if declared.is_some_and(|n| n > DISCARD_MAX) {
        return;
    }
    let mut seen = 0u64;
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DISCARD_MAX {
                break;
            }
        }
    })
    .await;
}

fn respond(status: StatusCode, encoding: Encoding, body: Bytes) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::new(Full::new(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(encoding.content_type()));
    r
}

/// A google.rpc.Status body in the request's encoding.
fn error_response(error: &ReceiveError, encoding: Encoding) -> Response<ResponseBody> {
    let code = error.grpc_code() as i32;
    let message = error.to_string();
    let body = match encoding {
        Encoding::Protobuf => Bytes::from(
            tonic_types::Status {
                code,
                message,
                details: vec![],
            }
            .encode_to_vec(),
        ),
        Encoding::Json => Bytes::from(serde_json::json!({ "code": code, "message": message }).to_string()),
    };
    let mut response = respond(error.http_status(), encoding, body);
    if let Some(delay) = error.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(delay.as_secs().max(1)));
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::new(Full::new(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) async fn handle(
    ctx: Arc<ReceiverContext>,
    conn: Arc<ConnInfo>,
    req: hyper::Request<Incoming>,
) -> Response<ResponseBody> {
    let (parts, mut body) = req.into_parts();
    if let Some(cors) = &ctx.cors
        && super::cors::is_preflight(&parts.method, &parts.headers)
    {
        return super::cors::preflight(cors, &parts.headers);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut response = answer(&ctx, &conn, &parts, declared, &mut body).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        // The client stopped sending: waiting for the rest would hold the connection again.
        // (HTTP/2 ends just the stream; a Connection header is not allowed there.)
        if parts.version < http::Version::HTTP_2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        ctx.handles.connections_closed.inc_by("body_timeout", 1);
    } else if !response.status().is_success() {
        discard_refused(&mut body, declared).await;
    }
    if let Some(cors) = &ctx.cors {
        super::cors::decorate(cors, &parts.headers, &mut response);
    }
    response
}

async fn answer(
    ctx: &ReceiverContext,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    declared: Option<u64>,
    body: &mut Incoming,
) -> Response<ResponseBody> {
    if parts.uri.path() != HTTP_TRACES_PATH {
        return plain(StatusCode::NOT_FOUND, "not found: OTLP traces go to POST /v1/traces\n");
    }
    if parts.method != Method::POST {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use POST\n");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let encoding = match parse_content_type(parts.headers.get(header::CONTENT_TYPE)) {
        Ok(e) => e,
        // The client sent neither protobuf nor JSON, so a Status in either would be unreadable
        // to it: say what is wrong in plain text.
        Err(e) => {
            let mut r = plain(e.http_status(), "");
            *r.body_mut() = ResponseBody::new(Full::new(Bytes::from(format!("{e}\n"))));
            return r;
        }
    };
    // One hold for the request: what hyper may buffer for it, then its body.
    let hold = match super::body::transport_buffer_hold(ctx, parts.version) {
        Ok(hold) => hold,
        Err(refusal) => return error_response(&ReceiveError::from(refusal), encoding),
    };
    match receive(ctx, conn, &parts.headers, declared, body, encoding, hold).await {
        Ok(parsed) => {
            let partial_success = parsed.1.map(|error_message| ExportTracePartialSuccess {
                rejected_spans: parsed.0 as i64,
                error_message,
            });
            let response = ExportTraceServiceResponse { partial_success };
            let body = match encoding {
                Encoding::Protobuf => Bytes::from(response.encode_to_vec()),
                // An empty response is `{}`, not `{"partialSuccess":null}`.
                Encoding::Json if response.partial_success.is_none() => Bytes::from_static(b"{}"),
                Encoding::Json => Bytes::from(serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec())),
            };
            respond(StatusCode::OK, encoding, body)
        }
        Err(e) => error_response(&e, encoding),
    }
}

/// Reads, decodes and submits a request; returns the rejected span count and message.
async fn receive(
    ctx: &ReceiverContext,
    conn: &ConnInfo,
    headers: &http::HeaderMap,
    declared: Option<u64>,
    body: &mut Incoming,
    encoding: Encoding,
    hold: BodyHold,
) -> Result<(usize, Option<String>), ReceiveError> {
    if !conn.allowed {
        return Err(ReceiveError::Forbidden(client_name(conn)));
    }
    let limit = ctx.max_bytes();
    let routing = request_routing(ctx, headers);
    let request = request_context(ctx, headers);
    let content_encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (body, hold) = read_http_body(ctx, body, declared, limit, hold).await?;
    let limit_mib = ctx.max_recv_msg_size_mib;
    let (wire_len, compressed) = (body.len(), content_encoding.is_some());
    let intake = ctx.intake.clone();
    let parse = move || -> Result<Admitted, ReceiveError> {
        let mut hold = hold;
        let body = decompress(body, content_encoding.as_deref(), limit, limit_mib)?;
        if body.len() != wire_len {
            // The decompressed copy is held too, until the request is decoded.
            hold.grow(body.len())?;
        }
        if body.is_empty() {
            return Ok(ParsedRequest::default().into());
        }
        // What parsing keeps or decodes is held with the body; all of it is released when
        // this returns: what is accepted is charged to the budget by the submit itself.
        let parsed = match encoding {
            Encoding::Protobuf => intake.parse_protobuf(body, &mut hold),
            Encoding::Json => wire::parse_json_within(&body, &mut hold),
        }?;
        intake.process(parsed, &request, &mut hold)
    };
    let parsed = parse_off_worker(wire_len, compressed, parse).await?;
    let (spans, rejected, rejection) = (parsed.spans, parsed.rejected, parsed.rejection.clone());
    if let Err(refusal) = ctx.intake.accept(parsed, &routing).await {
        ctx.refused(spans, refusal.reason());
        return Err(refusal.into());
    }
    ctx.accepted(spans);
    ctx.failed(rejected);
    Ok((rejected, rejection))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn content_types() {
        let ct = |s: &'static str| parse_content_type(Some(&HeaderValue::from_static(s)));
        assert_eq!(ct("application/x-protobuf").unwrap(), Encoding::Protobuf);
        assert_eq!(ct("application/json; charset=utf-8").unwrap(), Encoding::Json);
        assert_eq!(ct("Application/JSON").unwrap(), Encoding::Json);
        assert!(matches!(ct("text/plain"), Err(ReceiveError::UnsupportedMediaType(_))));
        assert!(parse_content_type(None).is_err());
    }

    fn gzip(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        Bytes::from(e.finish().unwrap())
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![0u8; 8 * 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024);
        assert!(matches!(
            decompress(bomb.clone(), Some("gzip"), 1024 * 1024, 1),
            Err(ReceiveError::TooLarge { .. })
        ));
        assert_eq!(
            decompress(bomb, Some("gzip"), 8 * 1024 * 1024, 8).unwrap().len(),
            8 * 1024 * 1024
        );
    }

    #[test]
    fn encodings() {
        assert_eq!(
            decompress(gzip(b"abc"), Some("GZIP"), 10, 1).unwrap(),
            Bytes::from_static(b"abc")
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(b"xyz").unwrap();
        assert_eq!(
            decompress(Bytes::from(z.finish().unwrap()), Some("deflate"), 10, 1).unwrap(),
            Bytes::from_static(b"xyz")
        );
        assert!(matches!(
            decompress(Bytes::from_static(b"x"), Some("br"), 10, 1),
            Err(ReceiveError::UnsupportedEncoding(_))
        ));
        assert!(matches!(
            decompress(Bytes::from_static(b"nope"), Some("gzip"), 10, 1),
            Err(ReceiveError::BadCompression(_))
        ));
    }
}
