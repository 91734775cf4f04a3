//! Memcomparable encoding of byte strings: the input is cut into groups of 8 bytes, each
//! padded with zeros and followed by a marker `255 - padding`. The encoding preserves order
//! (`a < b` iff `enc(a) < enc(b)`) and is self-delimiting, so a timestamp can follow it.

pub const ENC_GROUP_SIZE: usize = 8;
const ENC_MARKER: u8 = 0xff;
const ENC_PAD: u8 = 0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("encoded key is truncated")]
    Truncated,
    #[error("invalid group marker {0}")]
    BadMarker(u8),
    #[error("non-zero padding")]
    BadPadding,
    #[error("key too short for a timestamp: {0} bytes")]
    KeyTooShort(usize),
    #[error("not a local key: {0:?}")]
    BadLocalKey(Vec<u8>),
    #[error("not a data key (no data prefix): {0:?}")]
    BadDataKey(Vec<u8>),
}

/// Encoded length of a key of `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    (len / ENC_GROUP_SIZE + 1) * (ENC_GROUP_SIZE + 1)
}

pub fn encode_bytes(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(key.len()) + 8);
    encode_bytes_to(key, &mut out);
    out
}

pub fn encode_bytes_to(key: &[u8], out: &mut Vec<u8>) {
    let mut chunks = key.chunks_exact(ENC_GROUP_SIZE);
    for c in &mut chunks {
        out.extend_from_slice(c);
        out.push(ENC_MARKER);
    }
    let rem = chunks.remainder();
    let pad = ENC_GROUP_SIZE - rem.len();
    out.extend_from_slice(rem);
    out.extend(std::iter::repeat_n(ENC_PAD, pad));
    out.push(ENC_MARKER - pad as u8);
}

/// Decodes a memcomparable prefix of `data`: (the key, bytes consumed).
pub fn decode_bytes(data: &[u8]) -> Result<(Vec<u8>, usize), CodecError> {
    let mut key = Vec::with_capacity(data.len());
    let mut off = 0;
    loop {
        if data.len() < off + ENC_GROUP_SIZE + 1 {
            return Err(CodecError::Truncated);
        }
        let group = &data[off..off + ENC_GROUP_SIZE];
        let marker = data[off + ENC_GROUP_SIZE];
        off += ENC_GROUP_SIZE + 1;
        let pad = (ENC_MARKER - marker) as usize;
        if pad == 0 {
            key.extend_from_slice(group);
            continue;
        }
        if pad > ENC_GROUP_SIZE {
            return Err(CodecError::BadMarker(marker));
        }
        let (real, padding) = group.split_at(ENC_GROUP_SIZE - pad);
        if padding.iter().any(|&b| b != ENC_PAD) {
            return Err(CodecError::BadPadding);
        }
        key.extend_from_slice(real);
        return Ok((key, off));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let keys: Vec<&[u8]> = vec![
            b"",
            b"\x00",
            b"\x00\x00",
            b"a",
            b"a\x00",
            b"a\x00\x00\x00\x00\x00\x00\x00",
            b"a\x00\x00\x00\x00\x00\x00\x00\x00",
            b"abcdefgh",
            b"abcdefghi",
            b"b",
            b"\xff",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(
                encode_bytes(w[0]) < encode_bytes(w[1]),
                "{:?} {:?}",
                w[0],
                w[1]
            );
        }
        for k in keys {
            let e = encode_bytes(k);
            assert_eq!(e.len(), encoded_len(k.len()));
            let mut with_suffix = e.clone();
            with_suffix.extend_from_slice(b"tail");
            let (d, n) = decode_bytes(&with_suffix).unwrap();
            assert_eq!(d, k);
            assert_eq!(n, e.len());
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode_bytes(b"abc"), Err(CodecError::Truncated));
        assert_eq!(decode_bytes(b"abcdefgh\x00"), Err(CodecError::BadMarker(0)));
        assert_eq!(
            decode_bytes(b"ab\x01\x00\x00\x00\x00\x00\xf9"),
            Err(CodecError::BadPadding)
        );
    }
}
