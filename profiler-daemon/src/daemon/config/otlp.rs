//! `outputs.otlp:` OTLP profiles export to an OpenTelemetry Collector.
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::Deserializer;
use serde::Deserialize;

use super::{absolute_path, check_http_url, checked_str, optional_non_empty, ranged};

/// `outputs.otlp:` where and how windows are exported over OTLP.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Otlp {
    /// `http://host:port` (plaintext: h2c for gRPC) or `https://host:port`
    /// (TLS, verified against the system's roots and `tls.ca_file`). For
    /// `http/protobuf`, `/v1development/profiles` is appended to its path;
    /// for `grpc` it has no path. Default `http://127.0.0.1:4317` (grpc) or
    /// `http://127.0.0.1:4318` (http/protobuf).
    #[serde(deserialize_with = "some_endpoint")]
    pub endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    pub protocol: OtlpProtocol,
    /// Sent with every request, e.g. `authorization: Bearer <token>`;
    /// default none. Values are never logged.
    #[serde(deserialize_with = "headers")]
    pub headers: Vec<(String, String)>,
    /// TLS settings, for `https://` endpoints only.
    pub tls: Option<OtlpTls>,
    /// `gzip` (default) or `none`.
    pub compression: OtlpCompression,
    /// Timeout of one export request in seconds, `1..=300`; default 10.
    #[serde(deserialize_with = "ranged::<_, _, 1, 300>")]
    pub timeout_secs: u64,
    /// Memory for requests waiting to be sent (or being sent), in bytes of
    /// encoded request (gzipped for http/protobuf) plus 512 per request,
    /// `4096..=17179869184`; default 67108864 (64 MiB). Beyond it the
    /// oldest are dropped (and counted).
    #[serde(deserialize_with = "ranged::<_, _, 4096, 17_179_869_184>")]
    pub max_queue_bytes: u64,
    /// Requests in progress at once, `1..=64`; default 4.
    #[serde(deserialize_with = "ranged::<_, _, 1, 64>")]
    pub max_concurrent_exports: u32,
    /// How long a request is retried before it is dropped and counted, in
    /// seconds, `1..=86400`; default 300.
    #[serde(deserialize_with = "ranged::<_, _, 1, 86_400>")]
    pub max_retry_secs: u64,
    /// A window's processes are batched into requests of about this many
    /// encoded bytes (one may exceed it by one process's profile),
    /// `65536..=67108864`; default 2097152 (2 MiB, under a Collector's
    /// default 4 MiB gRPC message limit).
    #[serde(deserialize_with = "ranged::<_, _, 65_536, 67_108_864>")]
    pub max_request_bytes: u64,
    /// `host.name` of every process's resource; default this host's name.
    #[serde(deserialize_with = "optional_non_empty")]
    pub host_name: Option<String>,
}

impl Default for Otlp {
    fn default() -> Self {
        Otlp {
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            headers: Vec::new(),
            tls: None,
            compression: OtlpCompression::Gzip,
            timeout_secs: 10,
            max_queue_bytes: 64 << 20,
            max_concurrent_exports: 4,
            max_retry_secs: 300,
            max_request_bytes: 2 << 20,
            host_name: None,
        }
    }
}

impl Otlp {
    /// `endpoint`, or the protocol's default.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| {
            match self.protocol {
                OtlpProtocol::Grpc => "http://127.0.0.1:4317",
                OtlpProtocol::HttpProtobuf => "http://127.0.0.1:4318",
            }
            .into()
        })
    }

    /// What is wrong across keys, and the key to point at.
    pub fn cross_check(&self) -> Result<(), (&'static str, String)> {
        let ep = self.endpoint();
        if self.tls.is_some() && !ep.starts_with("https://") {
            return Err((
                "tls",
                format!(
                    "outputs.otlp.tls: the endpoint `{ep}` is plaintext http://; TLS settings \
                     need an https:// endpoint"
                ),
            ));
        }
        let rest = ep.split_once("://").map_or("", |(_, r)| r);
        let has_path = rest.find('/').is_some_and(|i| rest.len() > i + 1);
        if self.protocol == OtlpProtocol::Grpc && has_path {
            return Err((
                "endpoint",
                format!(
                    "outputs.otlp.endpoint: `{ep}` has a path; a grpc endpoint is \
                     scheme://host:port (paths are for protocol: http/protobuf)"
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for Otlp {
    /// Header values (tokens) are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Otlp")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers (values redacted)", &headers)
            .field("tls", &self.tls)
            .field("compression", &self.compression)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_queue_bytes", &self.max_queue_bytes)
            .field("max_concurrent_exports", &self.max_concurrent_exports)
            .field("max_retry_secs", &self.max_retry_secs)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("host_name", &self.host_name)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpCompression {
    #[default]
    Gzip,
    None,
}

/// `outputs.otlp.tls:`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpTls {
    /// PEM file of CA certificates trusted besides the system's roots;
    /// absolute; default none.
    #[serde(deserialize_with = "some_absolute_path")]
    pub ca_file: Option<PathBuf>,
}

fn some_absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    absolute_path(d).map(Some)
}

fn some_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked_str(d, "an http:// or https:// URL", |s| {
        check_http_url(s)?;
        if s.contains(['?', '#']) {
            return Err(format!("`{s}` has a query or fragment"));
        }
        Ok(Some(s.to_string()))
    })
}

/// A header name: an HTTP token, lowercased (gRPC metadata keys are).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct HeaderName(String);
impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a header name", |s| {
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if s.is_empty() || !s.chars().all(token) {
                return Err(format!("`{s}` is not a valid header name"));
            }
            let lower = s.to_ascii_lowercase();
            if lower.starts_with("grpc-")
                || [
                    "content-type",
                    "content-encoding",
                    "content-length",
                    "te",
                    "host",
                ]
                .contains(&lower.as_str())
            {
                return Err(format!("`{s}` is set by the exporter itself"));
            }
            Ok(HeaderName(lower))
        })
    }
}

/// A header value: visible ASCII, spaces and tabs (never echoed in errors).
struct HeaderValue(String);
impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a header value", |s| {
            let printable = |c: char| c == ' ' || c == '\t' || c.is_ascii_graphic();
            if s.trim().is_empty() || !s.chars().all(printable) {
                return Err(
                    "a header value must be non-empty printable ASCII (value not shown)".into(),
                );
            }
            Ok(HeaderValue(s.to_string()))
        })
    }
}

fn headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    Ok(BTreeMap::<HeaderName, HeaderValue>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k.0, v.0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::{parse, ConfigError};
    use super::*;

    fn otlp(body: &str) -> Otlp {
        let text = format!("outputs:\n  otlp:\n{body}");
        parse(&text, "t")
            .unwrap_or_else(|e| panic!("{e}"))
            .outputs
            .otlp
            .expect("otlp on")
    }

    /// (line, column, message) of the error `body` makes.
    fn err(body: &str) -> (usize, usize, String) {
        let text = format!("outputs:\n  otlp:\n{body}");
        match parse(&text, "t") {
            Err(ConfigError::Invalid {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected an error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_a_full_section() {
        let c = parse("outputs:\n  otlp: {}\n", "t").unwrap();
        let o = c.outputs.otlp.unwrap();
        assert_eq!(o, Otlp::default());
        assert_eq!(o.endpoint(), "http://127.0.0.1:4317");
        let o = otlp("    protocol: http/protobuf\n");
        assert_eq!(o.endpoint(), "http://127.0.0.1:4318");

        let o = otlp(
            "    endpoint: https://collector.example:4318/prefix\n    protocol: http/protobuf\n    \
             headers:\n      Authorization: Bearer s3cret\n      x-tenant: a b\n    \
             tls:\n      ca_file: /etc/ca.pem\n    compression: none\n    timeout_secs: 3\n    \
             max_queue_bytes: 4096\n    max_concurrent_exports: 64\n    max_retry_secs: 9\n    \
             max_request_bytes: 65536\n    host_name: node-7\n",
        );
        assert_eq!(
            o.endpoint.as_deref(),
            Some("https://collector.example:4318/prefix")
        );
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            o.headers,
            [
                ("authorization".to_string(), "Bearer s3cret".to_string()),
                ("x-tenant".to_string(), "a b".to_string())
            ]
        );
        assert_eq!(
            o.tls.clone().unwrap().ca_file.unwrap(),
            PathBuf::from("/etc/ca.pem")
        );
        assert_eq!(o.compression, OtlpCompression::None);
        assert_eq!(
            (o.timeout_secs, o.max_queue_bytes, o.max_concurrent_exports),
            (3, 4096, 64)
        );
        assert_eq!((o.max_retry_secs, o.max_request_bytes), (9, 65536));
        assert_eq!(o.host_name.as_deref(), Some("node-7"));
        assert!(
            !format!("{o:?}").contains("s3cret"),
            "header values are not printed"
        );
    }

    #[test]
    fn invalid_values_are_rejected_where_they_are() {
        for (body, at, what) in [
            (
                "    endpoint: collector:4317\n",
                (3, 15),
                "not an http:// or https:// URL",
            ),
            ("    endpoint: http://u:p@c:4317\n", (3, 15), "credentials"),
            (
                "    endpoint: http://c:4318/?a=1\n",
                (3, 15),
                "query or fragment",
            ),
            (
                "    protocol: http/json\n",
                (3, 15),
                "unknown variant `http/json`",
            ),
            ("    compression: zstd\n", (3, 18), "unknown variant `zstd`"),
            (
                "    timeout_secs: 0\n",
                (3, 19),
                "0 is out of range 1..=300",
            ),
            (
                "    max_queue_bytes: 4095\n",
                (3, 22),
                "out of range 4096..=",
            ),
            (
                "    max_concurrent_exports: 65\n",
                (3, 29),
                "out of range 1..=64",
            ),
            (
                "    max_retry_secs: 86401\n",
                (3, 21),
                "out of range 1..=86400",
            ),
            (
                "    max_request_bytes: 100\n",
                (3, 24),
                "out of range 65536..=",
            ),
            ("    host_name: ''\n", (3, 16), "must not be empty"),
            (
                "    headers:\n      'bad name': x\n",
                (4, 7),
                "not a valid header name",
            ),
            (
                "    headers:\n      grpc-timeout: 1S\n",
                (4, 7),
                "set by the exporter",
            ),
            (
                "    headers:\n      x-a: \"sekrit\\u0001\"\n",
                (4, 12),
                "value not shown",
            ),
            (
                "    tls:\n      ca_file: ca.pem\n",
                (4, 16),
                "not an absolute path",
            ),
            (
                "    tls:\n      insecure: true\n",
                (4, 7),
                "unknown field `insecure`",
            ),
            (
                "    endpoint: http://c:4317\n    tls: {}\n",
                (4, 10),
                "need an https:// endpoint",
            ),
            ("    tls: {}\n", (3, 10), "need an https:// endpoint"),
            (
                "    endpoint: http://c:4317/v1\n",
                (3, 15),
                "a grpc endpoint is",
            ),
            (
                "    max_queue_windows: 3\n",
                (3, 5),
                "unknown field `max_queue_windows`",
            ),
        ] {
            let (line, col, message) = err(body);
            assert_eq!((line, col), at, "{body:?}: {message}");
            assert!(message.contains(what), "{body:?}: {message}");
            if body.contains("sekrit") {
                assert!(
                    !message.contains("sekrit"),
                    "a header value is never echoed"
                );
            }
        }
        // A path is fine over HTTP.
        let o = otlp("    endpoint: http://c:4318/v1\n    protocol: http/protobuf\n");
        assert_eq!(o.endpoint(), "http://c:4318/v1");
    }
}
