//! What a receiver can answer besides success, mapped to HTTP and gRPC statuses in one place
//! (OTLP spec: malformed 400/INVALID_ARGUMENT, oversize 413/RESOURCE_EXHAUSTED, overload
//! 429-503 + Retry-After / UNAVAILABLE + RetryInfo).
use std::time::Duration;

use http::StatusCode;

use crate::pipeline::Refusal;
use crate::pipeline::wire::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Malformed(#[from] DecodeError),
    #[error("request body is over the {limit_mib} MiB limit (max_recv_msg_size_mib)")]
    TooLarge { limit_mib: u64 },
    #[error(
        "decoding this request would take about {need_mib} MiB of memory, more than memory_limiter \
         allows one request ({limit_mib} MiB); send smaller requests, or protobuf"
    )]
    DecodeTooLarge { need_mib: u64, limit_mib: u64 },
    #[error("unsupported content type {0:?}: use application/x-protobuf or application/json")]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding {0:?}: use gzip, deflate or none")]
    UnsupportedEncoding(String),
    #[error("cannot decompress the body: {0}")]
    BadCompression(String),
    #[error("cannot read the request body: {0}")]
    Body(String),
    #[error("request body not received within {0:?} (read_timeout)")]
    BodyTimeout(Duration),
    #[error("client certificate {0:?} is not in allowed_clients")]
    Forbidden(String),
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// A processor's statement failed on the request with `error_mode: propagate`.
    #[error("{0}")]
    Processing(String),
}

impl From<crate::processor::apply::ApplyError> for ReceiveError {
    fn from(e: crate::processor::apply::ApplyError) -> Self {
        match e {
            crate::processor::apply::ApplyError::Decode(d) => ReceiveError::Malformed(d),
            crate::processor::apply::ApplyError::Process(p) => ReceiveError::Processing(p.to_string()),
        }
    }
}

impl ReceiveError {
    pub fn http_status(&self) -> StatusCode {
        match self {
            ReceiveError::Malformed(_)
            | ReceiveError::BadCompression(_)
            | ReceiveError::Body(_)
            | ReceiveError::Processing(_) => StatusCode::BAD_REQUEST,
            ReceiveError::TooLarge { .. } | ReceiveError::DecodeTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ReceiveError::UnsupportedMediaType(_) | ReceiveError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ReceiveError::Forbidden(_) => StatusCode::FORBIDDEN,
            ReceiveError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ReceiveError::Refused(Refusal::ShuttingDown | Refusal::DiskFull) => StatusCode::SERVICE_UNAVAILABLE,
            ReceiveError::Refused(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub(crate) fn grpc_code(&self) -> tonic::Code {
        match self {
            ReceiveError::Malformed(_)
            | ReceiveError::BadCompression(_)
            | ReceiveError::UnsupportedMediaType(_)
            | ReceiveError::UnsupportedEncoding(_)
            | ReceiveError::Body(_)
            | ReceiveError::Processing(_) => tonic::Code::InvalidArgument,
            ReceiveError::TooLarge { .. } | ReceiveError::DecodeTooLarge { .. } => tonic::Code::ResourceExhausted,
            ReceiveError::Forbidden(_) => tonic::Code::PermissionDenied,
            ReceiveError::BodyTimeout(_) => tonic::Code::DeadlineExceeded,
            ReceiveError::Refused(_) => tonic::Code::Unavailable,
        }
    }

    /// The wait to advertise (Retry-After / RetryInfo) when the client should come back.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            ReceiveError::Refused(r) => Some(r.retry_after()),
            _ => None,
        }
    }

    pub(crate) fn to_grpc(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        match self.retry_after() {
            Some(delay) => tonic::Status::with_error_details(
                self.grpc_code(),
                self.to_string(),
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            None => tonic::Status::new(self.grpc_code(), self.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_status_mapping() {
        let malformed = ReceiveError::Malformed(DecodeError::Framing("x"));
        assert_eq!(
            (malformed.http_status().as_u16(), malformed.grpc_code()),
            (400, tonic::Code::InvalidArgument)
        );
        let big = ReceiveError::TooLarge { limit_mib: 1 };
        assert_eq!(
            (big.http_status().as_u16(), big.grpc_code()),
            (413, tonic::Code::ResourceExhausted)
        );
        let full = ReceiveError::Refused(Refusal::QueueFull);
        assert_eq!(
            (full.http_status().as_u16(), full.grpc_code()),
            (429, tonic::Code::Unavailable)
        );
        assert_eq!(full.retry_after(), Some(Duration::from_secs(1)));
        let status = full.to_grpc();
        use tonic_types::StatusExt;
        assert!(status.get_details_retry_info().is_some());
        assert_eq!(ReceiveError::Forbidden("x".into()).http_status().as_u16(), 403);
        let slow = ReceiveError::BodyTimeout(Duration::from_secs(30));
        assert_eq!(
            (slow.http_status().as_u16(), slow.grpc_code()),
            (408, tonic::Code::DeadlineExceeded)
        );
        assert_eq!(
            ReceiveError::UnsupportedMediaType("text/plain".into())
                .http_status()
                .as_u16(),
            415
        );
    }
}
