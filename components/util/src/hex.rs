//! Printing keys and values: UTF-8 as text, anything else as `0x` + lowercase hex.

pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Text if the bytes are UTF-8, else `0x…`.
pub fn display(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("0x{}", encode(bytes)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        assert_eq!(super::display(b"abc"), "abc");
        assert_eq!(super::display(&[0xff, 0x00]), "0xff00");
        assert_eq!(super::decode("ff00").unwrap(), vec![0xff, 0]);
        assert!(super::decode("f").is_none());
    }
}
