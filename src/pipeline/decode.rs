//! What decoding a request can fail with and the memory it asks for: shared by the schema walk
//! (walk.rs) and the parsers built on it (wire.rs), so the dependency between them goes one way.

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid OTLP/JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid protobuf framing: {0}")]
    Framing(&'static str),
    #[error(
        "{place} value nested deeper than {limit} protobuf message levels (counted from the request); \
         MLflow could not parse it"
    )]
    TooDeep { place: &'static str, limit: u32 },
    #[error("cannot split a record: {0}")]
    Split(&'static str),
}

/// Where parsing asks for the memory it takes beyond the request body, before allocating it.
/// The receivers charge their memory budget; tests and tools use [`Unbudgeted`].
pub trait DecodeBudget {
    /// What a refusal is; malformed input is one too.
    type Error: From<DecodeError>;
    /// A copy of (parts of) the body: never more bytes than the body has.
    fn hold_copy(&mut self, bytes: usize) -> Result<(), Self::Error>;
    /// An estimate of a decoded, in-memory form, which may be many times the body's size: a
    /// request that could never fit is refused, not let through as a lone request.
    fn hold_decoded(&mut self, bytes: usize) -> Result<(), Self::Error>;
}

/// No budget: parsing takes what it needs.
pub struct Unbudgeted;

impl DecodeBudget for Unbudgeted {
    type Error = DecodeError;
    fn hold_copy(&mut self, _: usize) -> Result<(), DecodeError> {
        Ok(())
    }
    fn hold_decoded(&mut self, _: usize) -> Result<(), DecodeError> {
        Ok(())
    }
}
