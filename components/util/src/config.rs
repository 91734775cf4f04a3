//! Human units for configuration: sizes (`"96MiB"`, `"256KiB"`, `1024`) and durations
//! (`"10s"`, `"500ms"`, `"2m"`), as serde types that read and write those strings.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("invalid size {0:?}: expected a number with an optional unit (B, KiB, MiB, GiB, KB, MB, GB)")]
    Size(String),
    #[error("invalid duration {0:?}: expected a number with a unit (ms, s, m, h)")]
    Duration(String),
}

/// A size in bytes, written with binary units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadableSize(pub u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

impl ReadableSize {
    pub const fn kib(n: u64) -> Self {
        ReadableSize(n * KIB)
    }
    pub const fn mib(n: u64) -> Self {
        ReadableSize(n * MIB)
    }
    pub const fn gib(n: u64) -> Self {
        ReadableSize(n * GIB)
    }
    pub fn as_bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ReadableSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let err = || UnitError::Size(s.to_string());
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err());
        }
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => KIB,
            "m" | "mb" | "mib" => MIB,
            "g" | "gb" | "gib" => GIB,
            "t" | "tb" | "tib" => GIB * 1024,
            _ => return Err(err()),
        };
        if num.contains('.') {
            let f: f64 = num.parse().map_err(|_| err())?;
            if !f.is_finite() || f < 0.0 {
                return Err(err());
            }
            Ok(ReadableSize((f * mult as f64) as u64))
        } else {
            let n: u64 = num.parse().map_err(|_| err())?;
            n.checked_mul(mult).map(ReadableSize).ok_or_else(err)
        }
    }
}

impl fmt::Display for ReadableSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= GIB && n.is_multiple_of(GIB) {
            write!(f, "{}GiB", n / GIB)
        } else if n >= MIB && n.is_multiple_of(MIB) {
            write!(f, "{}MiB", n / MIB)
        } else if n >= KIB && n.is_multiple_of(KIB) {
            write!(f, "{}KiB", n / KIB)
        } else {
            write!(f, "{n}B")
        }
    }
}

impl Serialize for ReadableSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ReadableSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ReadableSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `"10s"`, `"500ms"`, `"2m"`, `"1h"` or a combination (`"1m30s"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadableDuration(pub Duration);

impl ReadableDuration {
    pub const fn millis(n: u64) -> Self {
        ReadableDuration(Duration::from_millis(n))
    }
    pub const fn secs(n: u64) -> Self {
        ReadableDuration(Duration::from_secs(n))
    }
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl FromStr for ReadableDuration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let err = || UnitError::Duration(s.to_string());
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let split = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(err)?;
            let (num, tail) = rest.split_at(split);
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let n: f64 = num.parse().map_err(|_| err())?;
            if !n.is_finite() || n < 0.0 {
                return Err(err());
            }
            let ms = match unit.trim() {
                "ms" => n,
                "s" => n * 1e3,
                "m" => n * 60e3,
                "h" => n * 3600e3,
                _ => return Err(err()),
            };
            total += Duration::from_micros((ms * 1e3) as u64);
            rest = tail.trim();
        }
        Ok(ReadableDuration(total))
    }
}

impl fmt::Display for ReadableDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        if s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for ReadableDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ReadableDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(
            "96MiB".parse::<ReadableSize>().unwrap(),
            ReadableSize::mib(96)
        );
        assert_eq!(
            "256KiB".parse::<ReadableSize>().unwrap(),
            ReadableSize::kib(256)
        );
        assert_eq!(
            "256kb".parse::<ReadableSize>().unwrap(),
            ReadableSize::kib(256)
        );
        assert_eq!("1024".parse::<ReadableSize>().unwrap(), ReadableSize(1024));
        assert_eq!(
            "1.5KiB".parse::<ReadableSize>().unwrap(),
            ReadableSize(1536)
        );
        assert!("".parse::<ReadableSize>().is_err());
        assert!("12XB".parse::<ReadableSize>().is_err());
        assert!("MiB".parse::<ReadableSize>().is_err());
        assert_eq!(ReadableSize::mib(96).to_string(), "96MiB");
        assert_eq!(ReadableSize(1000).to_string(), "1000B");
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(
            "10s".parse::<ReadableDuration>().unwrap(),
            ReadableDuration::secs(10)
        );
        assert_eq!(
            "500ms".parse::<ReadableDuration>().unwrap(),
            ReadableDuration::millis(500)
        );
        assert_eq!(
            "1m30s".parse::<ReadableDuration>().unwrap(),
            ReadableDuration::secs(90)
        );
        assert!("10".parse::<ReadableDuration>().is_err());
        assert!("s".parse::<ReadableDuration>().is_err());
        assert_eq!(ReadableDuration::secs(120).to_string(), "2m");
        assert_eq!(ReadableDuration::millis(1500).to_string(), "1500ms");
    }

    #[test]
    fn serde_round_trip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct C {
            size: ReadableSize,
            every: ReadableDuration,
        }
        let c: C = toml::from_str("size = \"8MiB\"\nevery = \"3s\"").unwrap();
        assert_eq!(
            c,
            C {
                size: ReadableSize::mib(8),
                every: ReadableDuration::secs(3)
            }
        );
        let c2: C = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, c2);
        let c3: C = toml::from_str("size = 4096\nevery = \"1s\"").unwrap();
        assert_eq!(c3.size, ReadableSize(4096));
    }
}
