//! The config's typed words and addresses: each enum lists the spellings it accepts once, and
//! an unknown one is an error at its YAML path while the file is read (the rest of the
//! component is still checked), so nothing downstream falls back silently.
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A config word read through `FromStr` (whose error is the message shown at the YAML path)
/// and written back as `as_str`.
macro_rules! config_word {
    ($ty:ident) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// An otlphttp exporter's request compression (`compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Compression {
    #[default]
    Gzip,
    Deflate,
    /// `none`, or empty.
    None,
}

impl Compression {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Deflate => "deflate",
            Compression::None => "none",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "deflate" => Ok(Compression::Deflate),
            "none" | "" => Ok(Compression::None),
            "zstd" | "snappy" => Err(format!(
                "{s:?} is rejected by MLflow's /v1/traces; use gzip, deflate or none"
            )),
            other => Err(format!("unknown compression {other:?} (gzip, deflate, none)")),
        }
    }
}
config_word!(Compression);

/// An otlphttp exporter's body encoding (`encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Encoding {
    #[default]
    Proto,
    Json,
}

impl Encoding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Encoding::Proto => "proto",
            Encoding::Json => "json",
        }
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "proto" => Ok(Encoding::Proto),
            "json" => Ok(Encoding::Json),
            other => Err(format!("unknown encoding {other:?} (proto, json)")),
        }
    }
}
config_word!(Encoding);

/// What the debug exporter logs (`verbosity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Verbosity {
    /// Span counts per batch.
    #[default]
    Basic,
    /// One line per span.
    Normal,
    /// Every field of every span.
    Detailed,
}

impl Verbosity {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verbosity::Basic => "basic",
            Verbosity::Normal => "normal",
            Verbosity::Detailed => "detailed",
        }
    }
}

impl std::str::FromStr for Verbosity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "basic" => Ok(Verbosity::Basic),
            "normal" => Ok(Verbosity::Normal),
            "detailed" => Ok(Verbosity::Detailed),
            other => Err(format!("unknown verbosity {other:?} (basic, normal, detailed)")),
        }
    }
}
config_word!(Verbosity);

/// What a full spool does (`on_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum OnFull {
    /// Refuse new requests (429 / UNAVAILABLE to clients).
    #[default]
    Refuse,
    /// Delete the oldest segments to make room (counted dropped).
    DropOldest,
}

impl OnFull {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OnFull::Refuse => "refuse",
            OnFull::DropOldest => "drop_oldest",
        }
    }
}

impl std::str::FromStr for OnFull {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(OnFull::Refuse),
            "drop_oldest" => Ok(OnFull::DropOldest),
            other => Err(format!("unknown on_full {other:?} (refuse, drop_oldest)")),
        }
    }
}
config_word!(OnFull);

/// How an oauth2client authenticates to the token endpoint (`auth_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum AuthStyle {
    /// HTTP Basic client authentication.
    #[default]
    Basic,
    /// Client id and secret in the form body.
    Post,
}

impl AuthStyle {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthStyle::Basic => "basic",
            AuthStyle::Post => "post",
        }
    }
}

impl std::str::FromStr for AuthStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "basic" => Ok(AuthStyle::Basic),
            "post" => Ok(AuthStyle::Post),
            other => Err(format!("unknown auth_style {other:?} (basic, post)")),
        }
    }
}
config_word!(AuthStyle);

/// The lowest TLS version a listener or client accepts (`min_version`); empty is the default, as in
/// the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl TlsVersion {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

impl std::str::FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.2" | "" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            other => Err(format!("{other:?} is not supported (1.2, 1.3)")),
        }
    }
}
config_word!(TlsVersion);

/// A listen address, parsed once when the file is read (`HOST:PORT`, `:PORT`, `localhost:PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenAddr(pub(crate) SocketAddr);

impl ListenAddr {
    /// For defaults written as text; panics only on a typo in a constant (a unit test reads each).
    #[expect(clippy::expect_used, reason = "only called with the constants below, tested")]
    pub(crate) fn constant(text: &str) -> ListenAddr {
        text.parse().expect("a default listen address")
    }

    pub(crate) fn as_str(&self) -> String {
        self.0.to_string()
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        super::parse_listen_addr(s)
            .map(ListenAddr)
            .ok_or_else(|| format!("{s:?} is not HOST:PORT"))
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

/// An optional listen address where an empty string, as a missing key, means the default.
pub(crate) fn empty_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ListenAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_read_back_as_written() {
        for c in [Compression::Gzip, Compression::Deflate, Compression::None] {
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        }
        for e in [Encoding::Proto, Encoding::Json] {
            assert_eq!(e.as_str().parse::<Encoding>(), Ok(e));
        }
        for v in [Verbosity::Basic, Verbosity::Normal, Verbosity::Detailed] {
            assert_eq!(v.as_str().parse::<Verbosity>(), Ok(v));
        }
        for o in [OnFull::Refuse, OnFull::DropOldest] {
            assert_eq!(o.as_str().parse::<OnFull>(), Ok(o));
        }
        for a in [AuthStyle::Basic, AuthStyle::Post] {
            assert_eq!(a.as_str().parse::<AuthStyle>(), Ok(a));
        }
        assert_eq!("".parse::<Compression>(), Ok(Compression::None));
        assert!("Gzip".parse::<Compression>().is_err());
        for t in [TlsVersion::V1_2, TlsVersion::V1_3] {
            assert_eq!(t.as_str().parse::<TlsVersion>(), Ok(t));
        }
    }

    #[test]
    fn tls_min_version_is_1_2_or_1_3_wherever_it_is_set() {
        let yaml = |tls: &str| {
            format!(
                "receivers: {{otlp: {{protocols: {{grpc: {{endpoint: '127.0.0.1:0', tls: {{cert_file: a, key_file: b{tls}}}}}}}}}}}\n\
                 exporters: {{otlphttp: {{endpoint: 'https://x', tls: {{min_version: '1.1'}}}}}}\n\
                 service: {{pipelines: {{traces: {{receivers: [otlp], exporters: [otlphttp]}}}}}}\n"
            )
        };
        let errs: Vec<String> = match super::super::parse_str(&yaml(", min_version: '1.0'"), &|_| None) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        };
        for path in [
            "receivers.otlp.protocols.grpc.tls.min_version",
            "exporters.otlphttp.tls.min_version",
        ] {
            assert!(
                errs.iter()
                    .any(|e| e.starts_with(path) && e.contains("is not supported (1.2, 1.3)")),
                "{path} in {errs:#?}"
            );
        }
    }
}
