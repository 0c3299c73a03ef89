//! OTLP/gRPC: `TraceService/Export` served by tonic's unary machinery with a pass-through codec,
//! so the request's bytes reach the pipeline without a second decode.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::server::{Grpc, UnaryService};
use tonic::{Request, Response, Status};

use super::body::{BodyFault, BudgetedBody, parse_off_worker};
use super::{ConnInfo, ReceiveError, ReceiverContext, ResponseBody, client_name, request_context, request_routing};
use crate::otlp::GRPC_EXPORT_PATH;
use crate::otlp::codec::RawCodec;
use crate::supervise::LockUnpoisoned;

struct ExportService {
    ctx: Arc<ReceiverContext>,
    routing: crate::pipeline::RequestRouting,
    request: crate::processor::RequestContext,
}

impl UnaryService<Bytes> for ExportService {
    type Response = ExportTraceServiceResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ExportTraceServiceResponse>, Status>> + Send>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let ctx = self.ctx.clone();
        let routing = std::mem::take(&mut self.routing);
        let request_ctx = std::mem::take(&mut self.request);
        Box::pin(async move {
            let body = request.into_inner();
            // tonic has released the body's hold by now (its buffer is gone); the message it
            // decompressed is held again while it is parsed, with what parsing copies.
            let hold = ctx
                .intake
                .hold(body.len())
                .map_err(|r| ReceiveError::from(r).to_grpc())?;
            let len = body.len();
            let intake = ctx.intake.clone();
            let parse = move || {
                let mut hold = hold;
                let parsed = intake.parse_protobuf(body, &mut hold)?;
                intake.process(parsed, &request_ctx, &mut hold)
            };
            let parsed = parse_off_worker(len, false, parse).await.map_err(|e| e.to_grpc())?;
            let (spans, rejected, rejection) = (parsed.spans, parsed.rejected, parsed.rejection.clone());
            if let Err(refusal) = ctx.intake.accept(parsed, &routing).await {
                ctx.refused(spans, refusal.reason());
                return Err(ReceiveError::from(refusal).to_grpc());
            }
            ctx.accepted(spans);
            ctx.failed(rejected);
            let partial_success = rejection.map(|error_message| ExportTracePartialSuccess {
                rejected_spans: rejected as i64,
                error_message,
            });
            Ok(Response::new(ExportTraceServiceResponse { partial_success }))
        })
    }
}

fn encodings() -> EnabledCompressionEncodings {
    let mut e = EnabledCompressionEncodings::default();
    e.enable(CompressionEncoding::Gzip);
    e.enable(CompressionEncoding::Deflate);
    e.enable(CompressionEncoding::Zstd);
    e
}

pub(crate) async fn handle(
    ctx: Arc<ReceiverContext>,
    conn: Arc<ConnInfo>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<ResponseBody> {
    if req.uri().path() != GRPC_EXPORT_PATH {
        return Status::unimplemented(format!("unknown method {}", req.uri().path())).into_http();
    }
    if !conn.allowed {
        return ReceiveError::Forbidden(client_name(&conn)).to_grpc().into_http();
    }
    let routing = request_routing(&ctx, req.headers());
    let request = request_context(&ctx, req.headers());
    // tonic buffers the body itself: the wrapper counts it against the memory budget as it
    // arrives and ends it at read_timeout.
    let (parts, body) = req.into_parts();
    let encoding = parts.headers.get("grpc-encoding").and_then(|v| v.to_str().ok());
    let (body, fault) = match BudgetedBody::new(&ctx, body, encoding) {
        Ok(x) => x,
        Err(refusal) => return ReceiveError::from(refusal).to_grpc().into_http(),
    };
    let req = hyper::Request::from_parts(parts, body);
    let mut grpc = Grpc::new(RawCodec::<ExportTraceServiceResponse, Bytes>::one_message())
        .apply_compression_config(encodings(), encodings())
        .apply_max_message_size_config(Some(ctx.max_bytes()), None);
    let mut response = grpc
        .unary(
            ExportService {
                ctx: ctx.clone(),
                routing,
                request,
            },
            req,
        )
        .await;
    let fault = *fault.lock_unpoisoned();
    if let Some(fault) = fault {
        if matches!(fault, BodyFault::TimedOut(_)) {
            ctx.handles.connections_closed.inc_by("body_timeout", 1);
        }
        return ReceiveError::from(fault).to_grpc().into_http();
    }
    // tonic answers a request it cannot read (a compressed flag without an encoding, bad gzip,
    // a frame longer than the body, no message at all) with INTERNAL; our service never does.
    // For OTLP that is malformed input: INVALID_ARGUMENT, which clients do not retry either.
    if response.headers().get("grpc-status").is_some_and(|v| v == "13") {
        let why = response
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unreadable message")
            .to_string();
        response = Status::invalid_argument(format!("malformed gRPC request: {why}")).into_http();
    }
    // tonic answers a length prefix over the limit with OUT_OF_RANGE (our service never does);
    // OTLP wants RESOURCE_EXHAUSTED for oversize requests.
    if response.headers().get("grpc-status").is_some_and(|v| v == "11") {
        response = ReceiveError::TooLarge {
            limit_mib: ctx.max_recv_msg_size_mib,
        }
        .to_grpc()
        .into_http();
    }
    response
}
