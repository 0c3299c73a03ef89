//! Record framing in segment files, pure and unit-tested: `len: u32 LE | crc32c(bytes): u32 LE |
//! bytes`, where bytes is an encoded `Record` (proto/spool.proto). Scanning stops at the first
//! frame that is short, oversized, fails its checksum or does not decode: that is a torn tail.
use prost::Message;

use super::proto::Record;

pub const HEADER: usize = 8;
/// No record is this big (receivers cap requests far below); a larger length is corruption.
pub const MAX_RECORD: usize = 1 << 30;

/// Appends one framed record to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let len = record.encoded_len();
    out.reserve(HEADER + len);
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    record.encode(out).expect("Vec grows");
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why a frame is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame")]
    Truncated,
    #[error("record length {0} is implausible")]
    Length(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("record does not decode: {0}")]
    Decode(String),
}

/// The length of the frame starting with `header`, when it is plausible.
pub fn frame_len(header: &[u8; HEADER]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(FrameError::Length(len));
    }
    Ok(HEADER + len)
}

/// Checks and decodes a whole frame (header and body).
pub fn decode(frame: &[u8]) -> Result<Record, FrameError> {
    if frame.len() < HEADER {
        return Err(FrameError::Truncated);
    }
    let header: &[u8; HEADER] = frame[..HEADER].try_into().expect("8 bytes");
    let len = frame_len(header)?;
    if frame.len() < len {
        return Err(FrameError::Truncated);
    }
    let body = &frame[HEADER..len];
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err(FrameError::Checksum);
    }
    Record::decode(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// The result of scanning a segment's bytes.
#[derive(Debug, PartialEq)]
pub struct Scan {
    pub records: Vec<Record>,
    /// Bytes of intact frames from the start; the rest, if any, is a torn or corrupt tail.
    pub valid_len: usize,
    pub tail_error: Option<FrameError>,
}

/// Reads every intact record from the start of `buf` up to the first bad frame.
pub fn scan(buf: &[u8]) -> Scan {
    let mut records = Vec::new();
    let mut pos = 0;
    let mut tail_error = None;
    while pos < buf.len() {
        let rest = &buf[pos..];
        let len = match rest.get(..HEADER) {
            None => Err(FrameError::Truncated),
            Some(h) => frame_len(h.try_into().expect("8 bytes")),
        };
        let result = len.and_then(|len| rest.get(..len).ok_or(FrameError::Truncated).map(|f| (len, f)));
        match result.and_then(|(len, f)| decode(f).map(|r| (len, r))) {
            Ok((len, record)) => {
                records.push(record);
                pos += len;
            }
            Err(e) => {
                tail_error = Some(e);
                break;
            }
        }
    }
    Scan {
        records,
        valid_len: pos,
        tail_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> Record {
        Record {
            payload: vec![i as u8; 10 + i as usize],
            spans: i,
            experiment: format!("{i}"),
            ..Default::default()
        }
    }

    fn segment(n: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in 0..n {
            encode(&record(i), &mut buf);
        }
        buf
    }

    #[test]
    fn round_trip() {
        let buf = segment(5);
        let scan = scan(&buf);
        assert_eq!(scan.records, (0..5).map(record).collect::<Vec<_>>());
        assert_eq!(scan.valid_len, buf.len());
        assert_eq!(scan.tail_error, None);
    }

    #[test]
    fn every_torn_tail_keeps_the_intact_prefix() {
        let buf = segment(4);
        let ends: Vec<usize> = {
            let mut v = vec![0];
            let mut pos = 0;
            while pos < buf.len() {
                pos += frame_len(buf[pos..pos + HEADER].try_into().unwrap()).unwrap();
                v.push(pos);
            }
            v
        };
        for cut in 0..buf.len() {
            let scan = scan(&buf[..cut]);
            let intact = ends.iter().filter(|&&e| e <= cut).count() - 1;
            assert_eq!(scan.records.len(), intact, "cut at {cut}");
            assert_eq!(scan.valid_len, ends[intact]);
            assert_eq!(scan.tail_error.is_some(), cut != ends[intact]);
        }
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut buf = segment(3);
        let last = buf.len() - 3;
        buf[last] ^= 0x10;
        let scan = scan(&buf);
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.tail_error, Some(FrameError::Checksum));
        let mut garbage = segment(1);
        garbage.extend_from_slice(&[0xff; 8]);
        let scan = super::scan(&garbage);
        assert_eq!(scan.records.len(), 1);
        assert!(matches!(scan.tail_error, Some(FrameError::Length(_))));
    }
}
