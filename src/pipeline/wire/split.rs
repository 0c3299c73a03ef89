//! Cutting a record into pieces of fewer spans, over its bytes (nothing is decoded).
use bytes::Bytes;

use super::{DecodeError, ResourceChunk, walk};
use crate::otlp::varint;

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    varint::read(buf, pos).map_err(|e| DecodeError::Framing(e.message()))
}

/// Splits a record so the first part holds `first` spans (0 < first < chunk.spans). Records
/// passed the walk on receipt, so this does not fail for them; a record that does not decode
/// (or whose span count differs) is an error for the caller to handle, never a panic.
pub(crate) fn split_chunk(chunk: &ResourceChunk, first: usize) -> Result<(ResourceChunk, ResourceChunk), DecodeError> {
    if first == 0 || first >= chunk.spans {
        return Err(DecodeError::Split("split point outside the record"));
    }
    let mut pieces = split_chunk_pieces(chunk, first, chunk.spans - first)?.into_iter();
    match (pieces.next(), pieces.next()) {
        (Some(head), Some(tail)) => Ok((head, tail)),
        _ => Err(DecodeError::Split("split point outside the record")),
    }
}

/// Cuts a record into pieces of `first` spans, then `size` spans each, the last holding what
/// is left, in one pass over its bytes: nothing is decoded (cutting a large record one batch at a
/// time decoded the rest again for every cut, which made a 400,000-span request take minutes;
/// decoding it once still took about 13 times its size in memory, outside the budget).
pub(crate) fn split_chunk_pieces(
    chunk: &ResourceChunk,
    first: usize,
    size: usize,
) -> Result<Vec<ResourceChunk>, DecodeError> {
    if first == 0 || first >= chunk.spans || size == 0 {
        return Err(DecodeError::Split("split point outside the record"));
    }
    let message = record_message(&chunk.bytes)?;
    // Records are validated on receipt; one that is not (a damaged spool record) is refused
    // here rather than cut into pieces MLflow could not parse.
    let counted = walk::request(&chunk.bytes)?;
    if counted.len() != 1 || counted[0].spans != chunk.spans {
        return Err(DecodeError::Split(
            "record holds a different span count than counted on receipt",
        ));
    }
    let count = 1 + (chunk.spans - first).div_ceil(size);
    let max_out = chunk
        .bytes
        .len()
        .saturating_mul(2)
        .saturating_add(count.saturating_mul(SPLIT_ALLOWANCE));
    let pieces = walk::split_message(message, first, size, max_out)?;
    let total: usize = pieces.iter().map(|p| p.1).sum();
    if total != chunk.spans {
        return Err(DecodeError::Split(
            "record holds a different span count than counted on receipt",
        ));
    }
    Ok(pieces
        .into_iter()
        .map(|(bytes, spans)| ResourceChunk {
            bytes: Bytes::from(bytes),
            spans,
            experiment: chunk.experiment.clone(),
            names: chunk.names.clone(),
        })
        .collect())
}

/// The bytes each piece of a split may copy (resource, scopes, framing) beyond twice the
/// record's size in all: real resources are a few hundred bytes.
const SPLIT_ALLOWANCE: usize = 1024;

/// The ResourceSpans message of a record (a request field: key, length, message), which must
/// be the whole of `bytes`.
pub(super) fn record_message(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let mut pos = 0;
    read_varint(bytes, &mut pos)?;
    let len =
        usize::try_from(read_varint(bytes, &mut pos)?).map_err(|_| DecodeError::Split("record length overflows"))?;
    match pos.checked_add(len) {
        Some(end) if end == bytes.len() => Ok(&bytes[pos..end]),
        _ => Err(DecodeError::Split("record shorter than its length")),
    }
}
