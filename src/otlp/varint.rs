//! The protobuf varint reader: prost's rule (at most ten bytes, the tenth holding bit 63 only).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarintError {
    Truncated,
    Overflow,
    TooLong,
}

impl VarintError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            VarintError::Truncated => "truncated varint",
            VarintError::Overflow => "varint overflows 64 bits",
            VarintError::TooLong => "varint too long",
        }
    }
}

/// Reads the varint at `*pos`, advancing it. The one-byte case is inlined into every caller
/// (the schema walk reads two or three per field); longer ones take a call.
#[inline(always)]
pub(crate) fn read(buf: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    // Keys and most lengths are one byte.
    match buf.get(*pos) {
        Some(&b) if b < 0x80 => {
            *pos += 1;
            Ok(u64::from(b))
        }
        _ => read_long(buf, pos),
    }
}

#[inline(never)]
fn read_long(buf: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *buf.get(*pos).ok_or(VarintError::Truncated)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // The tenth byte holds bit 63 only; prost (and upb) refuse anything more.
            if i == 9 && byte > 1 {
                return Err(VarintError::Overflow);
            }
            return Ok(value);
        }
    }
    Err(VarintError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_prost() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            prost::encoding::encode_varint(v, &mut buf);
            let mut pos = 0;
            assert_eq!(read(&buf, &mut pos), Ok(v));
            assert_eq!(pos, buf.len());
            let mut pos = 0;
            assert_eq!(
                read(&buf[..buf.len() - 1], &mut pos),
                Err(VarintError::Truncated),
                "{v}"
            );
        }
        let mut pos = 0;
        assert_eq!(
            read(&[0xff; 9].iter().chain(&[2]).copied().collect::<Vec<_>>(), &mut pos),
            Err(VarintError::Overflow)
        );
        let mut pos = 0;
        assert_eq!(read(&[0x80; 11], &mut pos), Err(VarintError::TooLong));
    }
}
