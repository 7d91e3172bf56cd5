//! What the HTTP transports (Pyroscope, OTLP/HTTP) share: which answers are
//! worth retrying, when the server asks to be retried, and readable errors.
use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

/// Longest response body excerpt logged for a refused request.
const BODY_EXCERPT: usize = 512;

/// 408 and 429 are worth retrying, as are server errors; other statuses
/// (4xx, redirects) will not change by resending.
pub fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// `Retry-After: <seconds>`; the HTTP-date form is ignored (the usual
/// back-off applies then).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The first [`BODY_EXCERPT`] bytes of the response body, lossily decoded.
pub async fn excerpt(resp: &mut reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < BODY_EXCERPT {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    printable(&buf)
}

/// At most [`BODY_EXCERPT`] bytes of `bytes` as one line of text.
pub fn printable(bytes: &[u8]) -> String {
    let cut = bytes.len() > BODY_EXCERPT;
    let bytes = &bytes[..bytes.len().min(BODY_EXCERPT)];
    let mut s = String::from_utf8_lossy(bytes)
        .trim()
        .replace(['\n', '\r'], " ");
    if cut {
        s.push_str("...");
    }
    if s.is_empty() {
        s.push_str("(empty body)");
    }
    s
}

/// An error and its causes, `: `-separated (reqwest's Display alone says
/// little, e.g. "error sending request").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn statuses_and_retry_after() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 413, 415] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        assert_eq!(printable(b" a\nb "), "a b");
        assert_eq!(printable(b""), "(empty body)");
        assert!(printable(&[b'x'; 600]).ends_with("..."));
    }
}
