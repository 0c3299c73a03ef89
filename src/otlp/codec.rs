//! The one tonic codec of the crate: one side of a unary Export call stays raw bytes (the request
//! the receiver and sink walk themselves, the pre-encoded request loadgen sends), the other is
//! the small ExportTraceServiceResponse, encoded or decoded with prost.
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A message as it crosses tonic's codec: raw bytes as they are, a response through prost.
pub(crate) trait Payload: Sized + Send + 'static {
    fn encode(self, dst: &mut EncodeBuf<'_>) -> Result<(), Status>;
    fn decode(src: &mut DecodeBuf<'_>) -> Result<Self, Status>;
}

impl Payload for Bytes {
    fn encode(self, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&self);
        Ok(())
    }
    fn decode(src: &mut DecodeBuf<'_>) -> Result<Self, Status> {
        let n = src.remaining();
        Ok(src.copy_to_bytes(n))
    }
}

impl Payload for ExportTraceServiceResponse {
    fn encode(self, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Message::encode(&self, dst).map_err(|e| Status::internal(e.to_string()))
    }
    fn decode(src: &mut DecodeBuf<'_>) -> Result<Self, Status> {
        let n = src.remaining();
        <Self as Message>::decode(src.copy_to_bytes(n)).map_err(|e| Status::internal(e.to_string()))
    }
}

/// Encodes `E`, decodes `D`. Server side: `RawCodec<ExportTraceServiceResponse, Bytes>`;
/// client side: `RawCodec<Bytes, ExportTraceServiceResponse>`.
pub(crate) struct RawCodec<E, D> {
    one_message: bool,
    _items: PhantomData<fn(E) -> D>,
}

impl<E, D> RawCodec<E, D> {
    pub(crate) fn new() -> Self {
        RawCodec {
            one_message: false,
            _items: PhantomData,
        }
    }

    /// Refuses a second message: tonic's unary path takes the first and then drains the body
    /// through the decoder, which would otherwise drop the rest silently.
    pub(crate) fn one_message() -> Self {
        RawCodec {
            one_message: true,
            _items: PhantomData,
        }
    }
}

impl<E, D> Clone for RawCodec<E, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E, D> Copy for RawCodec<E, D> {}

pub(crate) struct RawEncoder<E>(PhantomData<fn(E)>);

pub(crate) struct RawDecoder<D> {
    one_message: bool,
    seen: bool,
    _item: PhantomData<fn() -> D>,
}

impl<E: Payload, D: Payload> Codec for RawCodec<E, D> {
    type Encode = E;
    type Decode = D;
    type Encoder = RawEncoder<E>;
    type Decoder = RawDecoder<D>;
    fn encoder(&mut self) -> RawEncoder<E> {
        RawEncoder(PhantomData)
    }
    fn decoder(&mut self) -> RawDecoder<D> {
        RawDecoder {
            one_message: self.one_message,
            seen: false,
            _item: PhantomData,
        }
    }
}

impl<E: Payload> Encoder for RawEncoder<E> {
    type Item = E;
    type Error = Status;
    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
    }
}

impl<D: Payload> Decoder for RawDecoder<D> {
    type Item = D;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        if std::mem::replace(&mut self.seen, true) && self.one_message {
            return Err(Status::invalid_argument(
                "a unary Export call carries exactly one message; this one has more",
            ));
        }
        D::decode(src).map(Some)
    }
}
