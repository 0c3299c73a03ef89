//! Record framing in segment and dead-letter files, pure and unit-tested. Nothing here panics
//! on file contents: every length and offset read from disk is checked.
//!
//! Format 2 (written since): a file header, twice (`"OTLPRSEG" | version u32 | seed u32 |
//! reserved u32 | crc32c u32`, 24 bytes each, so one damaged copy loses nothing), then frames:
//!
//! `magic "ORec" | len u32 | spans u32 | before u64 | crc32c(body) u32 | header crc u32 | body`
//!
//! (little-endian), where body is an encoded `Record` (proto/spool.proto), `spans` its span
//! count, `before` the spans of the file's earlier frames, and the header CRC is CRC32C over the
//! header's first 24 bytes, started from the file's random seed. So a damaged record costs that
//! record only: a bad body leaves a valid header (the exact span count is known, the next frame
//! follows); a bad header is skipped by scanning for the next magic whose header CRC validates,
//! and the next frame's `before` says exactly how many spans were lost. A damaged header whose
//! body still matches its CRC is recovered whole. The seed keeps a client from planting a frame
//! that validates inside its own span data (it would otherwise be picked up on a resync).
//!
//! Format 1 (files without the header): `len u32 | crc32c(body) u32 | body`, still read; it has
//! no way to resynchronise, so its first bad frame ends what can be read.
use prost::Message;

use super::proto::Record;

pub(crate) const FILE_MAGIC: [u8; 8] = *b"OTLPRSEG";
const VERSION: u32 = 2;
/// One copy of the file header.
const COPY: usize = 24;
/// Both copies.
pub const FILE_HEADER: usize = 2 * COPY;
const FRAME_MAGIC: [u8; 4] = *b"ORec";
/// A format 2 frame header.
pub const HEADER: usize = 28;
/// A format 1 frame header.
const V1_HEADER: usize = 8;
/// No record is this big (receivers cap requests far below); a larger length is corruption.
pub(crate) const MAX_RECORD: usize = 1 << 30;

/// How a file's frames are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V1,
    V2 { seed: u32 },
}

impl Format {
    /// Where the first frame starts.
    pub fn data_start(self) -> usize {
        match self {
            Format::V1 => 0,
            Format::V2 { .. } => FILE_HEADER,
        }
    }
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame")]
    Truncated,
    #[error("record length {0} is implausible")]
    Length(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("damaged frame header")]
    Header,
    #[error("damaged file header (both copies)")]
    FileHeader,
    #[error("record does not decode: {0}")]
    Decode(String),
}

fn le32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn le64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// The header of a new format 2 file whose frames use `seed`.
pub fn file_header(seed: u32) -> [u8; FILE_HEADER] {
    segment_header(seed, None)
}

/// The header of a new spool segment whose frames use `seed`. `previous`: the spans the segment
/// before it holds, final since the writer has moved on. A later start compares it with what
/// that segment's frames hold: a finished segment that came up short is corruption (counted
/// exactly), not a torn tail. Kept in the header's reserved field as spans + 1 (0: unknown, as
/// in files from before it was written, or past `u32`), so every format 2 reader still reads it.
pub(crate) fn segment_header(seed: u32, previous: Option<u64>) -> [u8; FILE_HEADER] {
    let previous = previous
        .and_then(|n| n.checked_add(1))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    let mut copy = [0u8; COPY];
    copy[..8].copy_from_slice(&FILE_MAGIC);
    copy[8..12].copy_from_slice(&VERSION.to_le_bytes());
    copy[12..16].copy_from_slice(&seed.to_le_bytes());
    copy[16..20].copy_from_slice(&previous.to_le_bytes());
    let crc = crc32c::crc32c(&copy[..20]);
    copy[20..24].copy_from_slice(&crc.to_le_bytes());
    let mut out = [0u8; FILE_HEADER];
    out[..COPY].copy_from_slice(&copy);
    out[COPY..].copy_from_slice(&copy);
    out
}

/// What the start of a file says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Known(Format),
    /// Shorter than a file header and not a format 1 record: a creation cut short.
    Empty,
    /// Both header copies damaged: the seed is lost, no frame can be checked.
    Unreadable,
}

/// The first copy of a format 2 file header that validates.
fn valid_header(buf: &[u8]) -> Option<&[u8]> {
    [buf.get(..COPY), buf.get(COPY..FILE_HEADER)]
        .into_iter()
        .flatten()
        .find(|copy| {
            copy[..8] == FILE_MAGIC
                && le32(copy, 8) == Some(VERSION)
                && le32(copy, 20) == Some(crc32c::crc32c(&copy[..20]))
        })
}

/// What a segment's header (the start of `buf`) says the segment before it holds, in spans;
/// None when it does not say (see `segment_header`).
pub fn previous_spans(buf: &[u8]) -> Option<u64> {
    let stored = le32(valid_header(buf)?, 16)?;
    stored.checked_sub(1).map(u64::from)
}

/// The format of a file from its first bytes (up to FILE_HEADER, or the first format 1 frame).
pub fn detect(buf: &[u8]) -> Kind {
    if let Some(seed) = valid_header(buf).and_then(|copy| le32(copy, 12)) {
        return Kind::Known(Format::V2 { seed });
    }
    if buf.is_empty() {
        return Kind::Empty;
    }
    // A format 1 file starts with a valid frame ("OTLP..." as a length is far above MAX_RECORD).
    if v1_frame(buf).is_ok() {
        return Kind::Known(Format::V1);
    }
    if buf.len() <= FILE_HEADER {
        Kind::Empty
    } else {
        Kind::Unreadable
    }
}

fn header_crc(seed: u32, header: &[u8]) -> u32 {
    crc32c::crc32c_append(seed, header)
}

/// Appends one format 2 frame to `out`; `before` is the spans of the file's earlier frames.
pub fn encode(record: &Record, seed: u32, before: u64, out: &mut Vec<u8>) {
    encode_with_payload(&[], record, seed, before, out);
}

/// Like [`encode`] for `record` with `payload` as its payload (`record`'s own must be empty):
/// the same bytes, without first copying the payload into a Record. prost writes fields in
/// their number order and leaves empty ones out, and the payload is field 1.
pub(crate) fn encode_with_payload(payload: &[u8], record: &Record, seed: u32, before: u64, out: &mut Vec<u8>) {
    debug_assert!(payload.is_empty() || record.payload.is_empty());
    let payload_len = if payload.is_empty() {
        0
    } else {
        prost::encoding::key_len(1) + prost::encoding::encoded_len_varint(payload.len() as u64) + payload.len()
    };
    let len = payload_len + record.encoded_len();
    out.reserve(HEADER + len);
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&record.spans.to_le_bytes());
    out.extend_from_slice(&[0; 16]);
    if !payload.is_empty() {
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, out);
        prost::encoding::encode_varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }
    record.encode_raw(out);
    let body_crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start + 20..start + 24].copy_from_slice(&body_crc.to_le_bytes());
    stamp(&mut out[start..start + HEADER], seed, before);
}

/// Sets a header's `before` and its CRC for `seed`.
fn stamp(header: &mut [u8], seed: u32, before: u64) {
    header[12..20].copy_from_slice(&before.to_le_bytes());
    let crc = header_crc(seed, &header[..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// Re-stamps frames made by `encode` (with any seed) for the file they are appended to: its
/// seed, and `before` counted on from `before`. Returns the spans in `buf`.
pub(crate) fn restamp(buf: &mut [u8], seed: u32, mut before: u64) -> Result<u64, FrameError> {
    let mut pos = 0;
    let mut spans = 0;
    while pos < buf.len() {
        let header = buf.get_mut(pos..pos + HEADER).ok_or(FrameError::Truncated)?;
        if header[..4] != FRAME_MAGIC {
            return Err(FrameError::Header);
        }
        let len = le32(header, 4).ok_or(FrameError::Truncated)? as usize;
        let n = u64::from(le32(header, 8).ok_or(FrameError::Truncated)?);
        stamp(header, seed, before);
        before += n;
        spans += n;
        pos += HEADER + len;
    }
    if pos != buf.len() {
        return Err(FrameError::Truncated);
    }
    Ok(spans)
}

/// A format 2 header that validates.
#[derive(Debug, Clone, Copy)]
struct Head {
    len: usize,
    spans: u32,
    before: u64,
    body_crc: u32,
}

fn head(buf: &[u8], seed: u32) -> Option<Head> {
    let h = buf.get(..HEADER)?;
    if h[..4] != FRAME_MAGIC || le32(h, 24)? != header_crc(seed, &h[..24]) {
        return None;
    }
    let len = le32(h, 4)? as usize;
    (len <= MAX_RECORD).then_some(Head {
        len,
        spans: le32(h, 8)?,
        before: le64(h, 12)?,
        body_crc: le32(h, 20)?,
    })
}

/// The offset in `buf`, from `from` on, of the next header that validates.
fn find_header(buf: &[u8], from: usize, seed: u32) -> Option<usize> {
    let last = buf.len().checked_sub(HEADER)?;
    (from..=last).find(|&i| buf[i] == FRAME_MAGIC[0] && head(&buf[i..], seed).is_some())
}

/// A frame whose header is damaged, spanning all of `region`: its record when the body is
/// provably intact (it matches the stored body CRC, or a header rebuilt around it matches the
/// stored header CRC: whichever field the damage hit, one of the two holds).
fn recover(region: &[u8], seed: u32) -> Option<Record> {
    let body = region.get(HEADER..)?;
    if body.len() > MAX_RECORD {
        return None;
    }
    let crc = crc32c::crc32c(body);
    let record = Record::decode(body).ok()?;
    if le32(region, 20)? == crc {
        return Some(record);
    }
    let mut rebuilt = [0u8; HEADER];
    rebuilt[..4].copy_from_slice(&FRAME_MAGIC);
    rebuilt[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
    rebuilt[8..12].copy_from_slice(&record.spans.to_le_bytes());
    rebuilt[12..20].copy_from_slice(region.get(12..20)?);
    rebuilt[20..24].copy_from_slice(&crc.to_le_bytes());
    (header_crc(seed, &rebuilt[..24]) == le32(region, 24)?).then_some(record)
}

/// One thing found in a file's bytes.
#[derive(Debug, PartialEq)]
pub enum Entry {
    Record {
        offset: usize,
        len: usize,
        record: Record,
    },
    /// Bytes holding no readable record.
    Lost {
        offset: usize,
        len: usize,
        /// The spans lost, when the format can tell (a valid header, or the next frame's
        /// `before`).
        spans: Option<u64>,
        error: FrameError,
        /// Runs to the end of the data with no valid frame after it: at the end of a file, a
        /// write a crash cut short (never acknowledged with fsync on), so it is truncated.
        tail: bool,
    },
}

/// What `parse` found in a window of a file.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    /// Bytes of the window the entries cover. Less than the window when the rest needs more
    /// bytes to decide (never when `at_end`): read on from there with a larger window.
    pub(crate) consumed: usize,
}

/// Parses frames from `buf`, bytes of a file from a frame boundary on. `at_end`: nothing follows
/// `buf` (end of file, or of committed data). `before`: spans of the file's frames before `buf`,
/// when known (it makes a lost region's span count exact).
pub fn parse(buf: &[u8], format: Format, at_end: bool, before: Option<u64>) -> Parsed {
    match format {
        Format::V1 => parse_v1(buf, at_end),
        Format::V2 { seed } => parse_v2(buf, seed, at_end, before),
    }
}

fn parse_v2(buf: &[u8], seed: u32, at_end: bool, mut expected: Option<u64>) -> Parsed {
    let mut entries = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let rest = &buf[pos..];
        if let Some(h) = head(rest, seed) {
            let Some(body) = rest.get(HEADER..HEADER + h.len) else {
                if !at_end {
                    break;
                }
                entries.push(Entry::Lost {
                    offset: pos,
                    len: rest.len(),
                    spans: Some(u64::from(h.spans)),
                    error: FrameError::Truncated,
                    tail: true,
                });
                pos = buf.len();
                break;
            };
            let record = if crc32c::crc32c(body) != h.body_crc {
                Err(FrameError::Checksum)
            } else {
                Record::decode(body).map_err(|e| FrameError::Decode(e.to_string()))
            };
            let len = HEADER + h.len;
            entries.push(match record {
                Ok(record) => Entry::Record {
                    offset: pos,
                    len,
                    record,
                },
                Err(error) => Entry::Lost {
                    offset: pos,
                    len,
                    spans: Some(u64::from(h.spans)),
                    error,
                    tail: false,
                },
            });
            expected = Some(h.before.saturating_add(u64::from(h.spans)));
            pos += len;
            continue;
        }
        if rest.len() < HEADER && !at_end {
            break;
        }
        // A damaged header: the region runs to the next header that validates.
        let next = find_header(rest, 1, seed);
        let end = match next {
            Some(q) => q,
            None if at_end => rest.len(),
            None => break,
        };
        let region = &rest[..end];
        if let Some(record) = recover(region, seed) {
            expected = expected.map(|e| e.saturating_add(u64::from(record.spans)));
            entries.push(Entry::Record {
                offset: pos,
                len: end,
                record,
            });
        } else {
            let spans = next
                .and_then(|q| head(&rest[q..], seed))
                .and_then(|h| h.before.checked_sub(expected?));
            let error = if region.len() < HEADER {
                FrameError::Truncated
            } else {
                FrameError::Header
            };
            entries.push(Entry::Lost {
                offset: pos,
                len: end,
                spans,
                error,
                tail: next.is_none(),
            });
            expected = None;
        }
        pos += end;
    }
    Parsed { entries, consumed: pos }
}

/// A format 1 frame at the start of `buf`: (frame length, record).
fn v1_frame(buf: &[u8]) -> Result<(usize, Record), FrameError> {
    let len = le32(buf, 0).ok_or(FrameError::Truncated)? as usize;
    if len > MAX_RECORD {
        return Err(FrameError::Length(len));
    }
    let body = buf.get(V1_HEADER..V1_HEADER + len).ok_or(FrameError::Truncated)?;
    if crc32c::crc32c(body) != le32(buf, 4).ok_or(FrameError::Truncated)? {
        return Err(FrameError::Checksum);
    }
    let record = Record::decode(body).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok((V1_HEADER + len, record))
}

fn parse_v1(buf: &[u8], at_end: bool) -> Parsed {
    let mut entries = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        match v1_frame(&buf[pos..]) {
            Ok((len, record)) => {
                entries.push(Entry::Record {
                    offset: pos,
                    len,
                    record,
                });
                pos += len;
            }
            // Format 1 cannot resynchronise: a bad frame loses the rest, decided once the rest
            // is known to be all there is.
            Err(_) if !at_end => break,
            Err(error) => {
                entries.push(Entry::Lost {
                    offset: pos,
                    len: buf.len() - pos,
                    spans: None,
                    error,
                    tail: true,
                });
                pos = buf.len();
            }
        }
    }
    Parsed { entries, consumed: pos }
}

/// The result of scanning a whole file.
#[derive(Debug, PartialEq)]
pub struct Scan {
    /// None: an empty file or one whose header is damaged beyond repair (`unreadable`).
    pub(crate) format: Option<Format>,
    pub(crate) unreadable: bool,
    pub records: Vec<Record>,
    /// Damaged regions before the tail (their records are lost; the rest of the file is not).
    pub(crate) lost: Vec<Lost>,
    /// Bytes up to a torn or corrupt tail (the whole file when there is none).
    pub valid_len: usize,
    pub(crate) tail_error: Option<FrameError>,
    /// The spans of the record cut off at the tail, when its header survived.
    pub(crate) tail_spans: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lost {
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) spans: Option<u64>,
    pub(crate) error: FrameError,
}

/// Reads every readable record of a whole file.
pub fn scan(buf: &[u8]) -> Scan {
    let format = match detect(buf) {
        Kind::Known(f) => f,
        kind => {
            let unreadable = kind == Kind::Unreadable;
            return Scan {
                format: None,
                unreadable,
                records: Vec::new(),
                lost: Vec::new(),
                valid_len: 0,
                tail_error: (!buf.is_empty()).then_some(if unreadable {
                    FrameError::FileHeader
                } else {
                    FrameError::Truncated
                }),
                tail_spans: None,
            };
        }
    };
    let start = format.data_start();
    let data = buf.get(start..).unwrap_or_default();
    let parsed = parse(data, format, true, Some(0));
    let mut scan = Scan {
        format: Some(format),
        unreadable: false,
        records: Vec::new(),
        lost: Vec::new(),
        valid_len: buf.len(),
        tail_error: None,
        tail_spans: None,
    };
    for entry in parsed.entries {
        match entry {
            Entry::Record { record, .. } => scan.records.push(record),
            Entry::Lost {
                offset,
                error,
                spans,
                tail: true,
                ..
            } => {
                scan.valid_len = start + offset;
                scan.tail_error = Some(error);
                scan.tail_spans = spans;
            }
            Entry::Lost {
                offset,
                len,
                spans,
                error,
                tail: false,
            } => scan.lost.push(Lost {
                offset: start + offset,
                len,
                spans,
                error,
            }),
        }
    }
    scan
}

#[cfg(test)]
mod tests;
