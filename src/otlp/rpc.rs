//! google.rpc.Status with a RetryInfo detail: what an OTLP server says about retrying, and how a
//! client reads it back (prost messages written out; the crate has no googleapis dependency).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub(crate) message: String,
    #[prost(message, repeated, tag = "3")]
    pub(crate) details: Vec<Any>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Any {
    #[prost(string, tag = "1")]
    pub(crate) type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) value: Vec<u8>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub(crate) retry_delay: Option<Duration>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Duration {
    #[prost(int64, tag = "1")]
    pub(crate) seconds: i64,
    #[prost(int32, tag = "2")]
    pub(crate) nanos: i32,
}
pub(crate) const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// A Status carrying a RetryInfo detail when `retry_after` is set.
pub(crate) fn status(code: i32, message: &str, retry_after: Option<std::time::Duration>) -> Status {
    use prost::Message;
    let details = retry_after
        .map(|d| Any {
            type_url: RETRY_INFO_TYPE.to_string(),
            value: RetryInfo {
                retry_delay: Some(Duration {
                    seconds: d.as_secs() as i64,
                    nanos: d.subsec_nanos() as i32,
                }),
            }
            .encode_to_vec(),
        })
        .into_iter()
        .collect();
    Status {
        code,
        message: message.to_string(),
        details,
    }
}

/// The retry delay carried by an encoded google.rpc.Status, if any.
pub fn retry_delay(encoded_status: &[u8]) -> Option<std::time::Duration> {
    use prost::Message;
    let status = Status::decode(encoded_status).ok()?;
    status
        .details
        .iter()
        .find(|d| d.type_url == RETRY_INFO_TYPE)
        .and_then(|d| {
            let info = RetryInfo::decode(d.value.as_slice()).ok()?;
            let delay = info.retry_delay?;
            Some(std::time::Duration::new(
                delay.seconds.max(0) as u64,
                delay.nanos.max(0) as u32,
            ))
        })
}
