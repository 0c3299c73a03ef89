//! Finds the (trace_id, span_id) of every span in an encoded export request without decoding it.
use crate::otlp::varint;

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

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    use super::*;

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
}
