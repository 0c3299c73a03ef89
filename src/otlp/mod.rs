//! What every OTLP speaker in the crate (receiver, exporter, sink, loadgen) shares: the paths,
//! MLflow's header, the experiment-id rule, the raw gRPC codec, body decompression, the varint
//! reader and google.rpc.Status. One copy each, so the relay and its test tools cannot drift.
pub(crate) mod codec;
pub(crate) mod compress;
pub(crate) mod routing;
pub mod rpc;
pub(crate) mod varint;

/// gRPC method path of OTLP trace export.
pub(crate) const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// OTLP/HTTP trace path.
pub(crate) const HTTP_TRACES_PATH: &str = "/v1/traces";
/// The header MLflow routes an OTLP request by.
pub(crate) const EXPERIMENT_HEADER: &str = "x-mlflow-experiment-id";
/// The resource attribute that routes a ResourceSpans to another MLflow experiment.
pub(crate) const EXPERIMENT_ATTRIBUTE: &str = "mlflow.experiment_id";

/// The body encodings of OTLP/HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// By the media type of a Content-Type header, parameters (charset) ignored.
    pub(crate) fn from_content_type(text: &str) -> Option<Encoding> {
        match text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "application/x-protobuf" | "application/protobuf" => Some(Encoding::Protobuf),
            "application/json" => Some(Encoding::Json),
            _ => None,
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// A numeric MLflow experiment id: the one rule for what counts as one, wherever it comes
/// from (a request header, a resource attribute, an exporter's configured header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ExperimentId(String);

impl ExperimentId {
    /// `s` as given (callers trim where their source allows whitespace): ASCII digits, not empty.
    pub(crate) fn parse(s: &str) -> Option<ExperimentId> {
        Self::is_valid(s).then(|| ExperimentId(s.to_string()))
    }

    pub(crate) fn is_valid(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
    }

    /// Valid and in the one spelling MLflow prints its int64 ids in: at most 19 digits, no
    /// leading zero. The gate accepts only this form, so two spellings of one id can never be
    /// told apart by its checks and then read as the same experiment by MLflow.
    pub(crate) fn is_canonical(s: &str) -> bool {
        Self::is_valid(s) && s.len() <= 19 && (s == "0" || !s.starts_with('0'))
    }

    pub(crate) fn into_string(self) -> String {
        self.0
    }
}

/// gRPC codes the OTLP spec calls retryable (RESOURCE_EXHAUSTED only with RetryInfo).
pub(crate) fn grpc_retryable(code: tonic::Code, has_retry_info: bool) -> bool {
    use tonic::Code::*;
    match code {
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss => true,
        ResourceExhausted => has_retry_info,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{ExperimentId, grpc_retryable};

    #[test]
    fn grpc_classification() {
        assert!(grpc_retryable(tonic::Code::Unavailable, false));
        assert!(grpc_retryable(tonic::Code::DataLoss, false));
        assert!(!grpc_retryable(tonic::Code::ResourceExhausted, false));
        assert!(grpc_retryable(tonic::Code::ResourceExhausted, true));
        assert!(!grpc_retryable(tonic::Code::InvalidArgument, false));
        assert!(!grpc_retryable(tonic::Code::PermissionDenied, false));
    }

    #[test]
    fn experiment_ids_are_ascii_digits() {
        for ok in ["0", "7", "0012", "123456789012345678901234"] {
            assert_eq!(
                ExperimentId::parse(ok).map(ExperimentId::into_string).as_deref(),
                Some(ok)
            );
        }
        for bad in ["", " 1", "1 ", "-1", "+1", "1.0", "1e3", "abc", "１"] {
            assert!(ExperimentId::parse(bad).is_none(), "{bad:?}");
            assert!(!ExperimentId::is_canonical(bad), "{bad:?}");
        }
    }

    #[test]
    fn canonical_experiment_ids_have_one_spelling() {
        for ok in ["0", "7", "1234567890123456789"] {
            assert!(ExperimentId::is_canonical(ok), "{ok:?}");
        }
        for bad in ["00", "07", "0012", "12345678901234567890"] {
            assert!(ExperimentId::is_valid(bad), "{bad:?}");
            assert!(!ExperimentId::is_canonical(bad), "{bad:?}");
        }
    }
}
