//! Decompressing an OTLP/HTTP body by its Content-Encoding, bounded: a gzip bomb ends at the
//! limit, never in memory exhaustion.
use std::io::Read;

use bytes::Bytes;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecompressError {
    #[error("unsupported content-encoding {0}")]
    Unsupported(String),
    #[error("{0}")]
    Bad(String),
    #[error("decompressed body over the limit")]
    TooLarge,
}

/// What `deflate` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deflate {
    /// RFC 9110: zlib-wrapped.
    Zlib,
    /// zlib, or raw deflate as some clients send it (the sink is lenient; the relay is not).
    ZlibOrRaw,
}

/// Decompresses per Content-Encoding (`gzip`, `x-gzip`, `deflate`, `identity` or none),
/// refusing output over `limit` bytes.
pub(crate) fn decompress(
    body: Bytes,
    encoding: Option<&str>,
    limit: usize,
    deflate: Deflate,
) -> Result<Bytes, DecompressError> {
    let encoding = encoding.map(|e| e.trim().to_ascii_lowercase()).unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" | "x-gzip" => read_bounded(flate2::read::MultiGzDecoder::new(body.as_ref()), body.len(), limit),
        "deflate" => match read_bounded(flate2::read::ZlibDecoder::new(body.as_ref()), body.len(), limit) {
            Err(DecompressError::Bad(_)) if deflate == Deflate::ZlibOrRaw => {
                read_bounded(flate2::read::DeflateDecoder::new(body.as_ref()), body.len(), limit)
            }
            other => other,
        },
        other => Err(DecompressError::Unsupported(other.to_string())),
    }
}

fn read_bounded(reader: impl Read, wire_len: usize, limit: usize) -> Result<Bytes, DecompressError> {
    let mut out = Vec::with_capacity(wire_len.saturating_mul(4).min(limit));
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::Bad(e.to_string()))?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_only_when_lenient() {
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        d.write_all(b"abc").unwrap();
        let raw = Bytes::from(d.finish().unwrap());
        assert!(matches!(
            decompress(raw.clone(), Some("deflate"), 10, Deflate::Zlib),
            Err(DecompressError::Bad(_))
        ));
        assert_eq!(
            decompress(raw, Some("deflate"), 10, Deflate::ZlibOrRaw).unwrap(),
            &b"abc"[..]
        );
    }
}
