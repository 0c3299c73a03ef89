//! Request bodies read under the memory budget and a read deadline: the bytes a body holds while
//! it arrives count against memory_limiter (declared Content-Length up front, else grown per
//! chunk), so stalled or endless bodies cannot hold memory the limiter does not see, and a body
//! that does not arrive within read_timeout ends the request.
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::conn::{HTTP1_READ_BUFFER, HTTP2_STREAM_WINDOW};
use super::{ReceiveError, ReceiverContext};
use crate::pipeline::wire::DecodeBudget;
use crate::pipeline::{BodyHold, Refusal};
use crate::supervise::LockUnpoisoned;

/// Reads a whole HTTP request body of at most `limit` bytes into `hold` (from
/// `transport_buffer_hold`: one hold per request, so a lone request may still grow past the
/// budget). The returned hold keeps the body's bytes counted until the caller drops it (after
/// decoding, before submitting).
pub(crate) async fn read_http_body(
    ctx: &ReceiverContext,
    body: &mut Incoming,
    declared: Option<u64>,
    limit: usize,
    mut hold: BodyHold,
) -> Result<(Bytes, BodyHold), ReceiveError> {
    let too_large = || ReceiveError::TooLarge {
        limit_mib: ctx.max_recv_msg_size_mib,
    };
    let expected = declared.map_or(0, |n| n as usize);
    if expected > limit {
        return Err(too_large());
    }
    // What hyper may buffer, held beside the body's buffer.
    let base = hold.bytes();
    hold.grow(expected)?;
    let timeout = ctx.connections.read_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(expected);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ReceiveError::BodyTimeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReceiveError::Body(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        let len = buf.len() + data.len();
        if len > limit {
            return Err(too_large());
        }
        if len > buf.capacity() {
            // The memory a body holds is its buffer's capacity, not the bytes received: grow
            // it (doubling, up to the size limit) only once the budget has taken the growth.
            let capacity = buf.capacity().saturating_mul(2).max(len).min(limit);
            if base + capacity > hold.bytes() {
                hold.grow(base + capacity - hold.bytes())?;
            }
            buf.reserve_exact(capacity - buf.len());
        }
        if base + buf.capacity() > hold.bytes() {
            hold.grow(base + buf.capacity() - hold.bytes())?;
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), hold))
}

/// What parsing a request takes beyond its body (a copy of what it keeps, a decoded JSON
/// request) is held with the body, before it is allocated.
impl DecodeBudget for BodyHold {
    type Error = ReceiveError;

    fn hold_copy(&mut self, bytes: usize) -> Result<(), ReceiveError> {
        Ok(self.grow(bytes)?)
    }

    fn hold_decoded(&mut self, bytes: usize) -> Result<(), ReceiveError> {
        // A lone request may pass an empty budget whatever its size (so a large one is not
        // refused forever), but that rule is for bodies bounded by max_recv_msg_size: what
        // decoding takes is not, and the budget must bound it.
        if let Some(limit) = self.limit() {
            let need = self.bytes().saturating_add(bytes);
            if need > limit {
                return Err(ReceiveError::DecodeTooLarge {
                    need_mib: need.div_ceil(MIB) as u64,
                    limit_mib: (limit / MIB) as u64,
                });
            }
        }
        Ok(self.grow(bytes)?)
    }
}

const MIB: usize = 1024 * 1024;

/// Bodies at least this large are parsed on the blocking pool.
const BLOCKING_PARSE_BYTES: usize = 64 * 1024;

/// Runs a parse (decompression, validation, decoding) on tokio's blocking pool when the body is
/// large (`len` bytes) or `always`: a large hostile body takes seconds, and on an async worker
/// it would stall every connection and probe that worker serves. Small bodies run inline,
/// where the hand-off would cost more than the parse.
pub(crate) async fn parse_off_worker<T: Send + 'static>(
    len: usize,
    always: bool,
    parse: impl FnOnce() -> Result<T, ReceiveError> + Send + 'static,
) -> Result<T, ReceiveError> {
    if len < BLOCKING_PARSE_BYTES && !always {
        return parse();
    }
    match tokio::task::spawn_blocking(parse).await {
        Ok(result) => result,
        // A panic is a bug: let it end the handler as it would have inline.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(ReceiveError::Refused(Refusal::ShuttingDown)),
    }
}

/// Holds, while a request is served, the memory budget for what the client can make hyper
/// buffer before the handler reads it, on top of what the body's own hold counts: an HTTP/2
/// stream window (flow control lets that much wait per stream), or an HTTP/1 connection's read
/// buffer.
pub(crate) fn transport_buffer_hold(ctx: &ReceiverContext, version: http::Version) -> Result<BodyHold, Refusal> {
    ctx.intake.hold(if version == http::Version::HTTP_2 {
        HTTP2_STREAM_WINDOW as usize
    } else {
        HTTP1_READ_BUFFER
    })
}

/// Why a budgeted body ended early; the gRPC handler answers with it instead of tonic's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyFault {
    #[error("memory limit reached while reading the request")]
    MemoryLimit,
    #[error("request body not received within read_timeout")]
    TimedOut(Duration),
}

impl From<BodyFault> for ReceiveError {
    fn from(f: BodyFault) -> ReceiveError {
        match f {
            BodyFault::MemoryLimit => ReceiveError::Refused(Refusal::MemoryLimit),
            BodyFault::TimedOut(d) => ReceiveError::BodyTimeout(d),
        }
    }
}

/// Where a budgeted body leaves its fault for the handler.
pub(crate) type FaultSlot = Arc<Mutex<Option<BodyFault>>>;

/// An incoming body whose data frames grow a memory hold as they arrive and which fails once
/// its read deadline passes (for tonic, which buffers the body itself). What tonic can buffer
/// is covered: it reserves the declared message length once the prefix is in (held here as
/// soon as the prefix arrives) and grows only past what was received; the first frames before
/// the prefix is complete and the data HTTP/2 flow control lets wait in hyper are within the
/// stream window held for the body's life.
pub(crate) struct BudgetedBody {
    inner: Incoming,
    hold: BodyHold,
    /// The stream window, held beside the message.
    window: usize,
    /// The gRPC message prefix (flag, big-endian length) as far as it has arrived.
    prefix: Vec<u8>,
    received: usize,
    /// The most worth holding for one message (max_recv_msg_size plus its prefix).
    max_hold: usize,
    /// How much a compressed message may grow when tonic decompresses it: gzip and deflate
    /// expand at most 1032 times; anything else up to max_recv_msg_size.
    expansion: Option<usize>,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    fault: FaultSlot,
}

impl BudgetedBody {
    /// Wraps a body, or refuses at once when the budget has no room at all.
    /// `encoding` is the request's grpc-encoding.
    pub(crate) fn new(
        ctx: &ReceiverContext,
        inner: Incoming,
        encoding: Option<&str>,
    ) -> Result<(BudgetedBody, FaultSlot), Refusal> {
        // gRPC is always HTTP/2. One hold for the stream window and the body, so a lone
        // request may still grow past the budget.
        let hold = transport_buffer_hold(ctx, http::Version::HTTP_2)?;
        let window = hold.bytes();
        let timeout = ctx.connections.read_timeout;
        let fault = FaultSlot::default();
        Ok((
            BudgetedBody {
                inner,
                hold,
                window,
                prefix: Vec::with_capacity(GRPC_PREFIX),
                received: 0,
                max_hold: ctx.max_bytes() + GRPC_PREFIX,
                expansion: match encoding {
                    Some("gzip" | "deflate") => Some(DEFLATE_MAX_RATIO),
                    _ => None,
                },
                timeout,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                fault: fault.clone(),
            },
            fault,
        ))
    }

    /// The bytes to hold after `data` arrived: what was received, or the message's declared
    /// length (as HTTP's Content-Length) once its prefix is in, whichever is more; plus, for a
    /// compressed message, what tonic's decompressed copy may take. tonic keeps that copy while
    /// it waits for the end of the stream, so a client that sends a small compressed message and
    /// never ends the stream would otherwise hold up to max_recv_msg_size each, uncounted.
    fn wanted(&mut self, data: &[u8]) -> usize {
        self.received += data.len();
        if self.prefix.len() < GRPC_PREFIX {
            let take = (GRPC_PREFIX - self.prefix.len()).min(data.len());
            self.prefix.extend_from_slice(&data[..take]);
        }
        let (compressed, length) = match self.prefix[..] {
            [flag, a, b, c, d] => (flag == 1, u32::from_be_bytes([a, b, c, d]) as usize),
            _ => (false, 0),
        };
        let declared = if self.prefix.len() == GRPC_PREFIX {
            GRPC_PREFIX + length
        } else {
            0
        };
        let max_message = self.max_hold - GRPC_PREFIX;
        let decompressed = match (compressed, self.expansion) {
            (false, _) => 0,
            (true, Some(ratio)) => length.saturating_mul(ratio).min(max_message),
            (true, None) => max_message,
        };
        self.received.max(declared.min(self.max_hold)) + decompressed
    }

    fn fail(&mut self, fault: BodyFault) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        *self.fault.lock_unpoisoned() = Some(fault);
        Poll::Ready(Some(Err(Box::new(fault))))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC message's prefix: compressed flag and 4-byte length.
const GRPC_PREFIX: usize = 5;

/// The most deflate (and so gzip) can expand its input: 1032 to 1 (zlib's technical details).
const DEFLATE_MAX_RATIO: usize = 1032;

impl Body for BudgetedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let wanted = this.window + this.wanted(data);
                    if wanted > this.hold.bytes() && this.hold.grow(wanted - this.hold.bytes()).is_err() {
                        return this.fail(BodyFault::MemoryLimit);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    let timeout = this.timeout;
                    return this.fail(BodyFault::TimedOut(timeout));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
