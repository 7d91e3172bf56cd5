//! OTLP over HTTP/protobuf: `POST {endpoint}/v1development/profiles`, the
//! body the encoder made (gzipped already when compression is on).
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
use prost::Message;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::{StatusCode, Url};

use super::{partial, OtlpConfig, HTTP_PATH};
use crate::daemon::export::push::http::{chain, printable, retry_after};
use crate::daemon::export::push::Attempt;
use crate::daemon::export::ExportError;

/// Longest response body read (a response or an error status).
const MAX_RESPONSE: usize = 64 << 10;

pub struct HttpClient {
    client: reqwest::Client,
    url: Url,
}

impl HttpClient {
    pub fn new(cfg: &OtlpConfig, ca_pem: Option<&[u8]>) -> Result<Self, ExportError> {
        let url = export_url(&cfg.endpoint)?;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ExportError::Config(format!("otlp header `{k}`: not a valid name")))?;
            let mut value = HeaderValue::from_str(v).map_err(|_| {
                ExportError::Config(format!("otlp header `{k}`: not a valid value"))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        if cfg.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let mut b = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .pool_max_idle_per_host(cfg.max_concurrent.max(1))
            // Headers (tokens) must not follow a redirect.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pyebpf/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers);
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ExportError::Config(format!("otlp tls.ca_file: {}", chain(&e))))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b
            .build()
            .map_err(|e| ExportError::Config(format!("otlp HTTP client: {}", chain(&e))))?;
        Ok(HttpClient { client, url })
    }

    pub async fn export(&self, body: &Bytes) -> Attempt {
        let resp = match self
            .client
            .post(self.url.clone())
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) => r,
            // Connection refused/reset, DNS, TLS, timeout: all transient.
            Err(e) => {
                return Attempt::Retry {
                    why: chain(&e.without_url()),
                    after: None,
                }
            }
        };
        let status = resp.status();
        let after = retry_after(resp.headers());
        let body = read_some(resp).await;
        if status.is_success() {
            return match ExportProfilesServiceResponse::decode(&body[..]) {
                Ok(r) => {
                    let p = r.partial_success.unwrap_or_default();
                    partial(p.rejected_profiles, p.error_message).unwrap_or(Attempt::Sent)
                }
                // Accepted all the same: the status says so.
                Err(_) => Attempt::Sent,
            };
        }
        // The body of an error is a google.rpc.Status; text otherwise.
        let detail = tonic_types::pb::Status::decode(&body[..])
            .ok()
            .filter(|s| !s.message.is_empty())
            .map_or_else(|| printable(&body), |s| s.message);
        let why = format!("HTTP {status}: {detail}");
        if retryable(status) {
            Attempt::Retry { why, after }
        } else {
            Attempt::Rejected(why)
        }
    }
}

/// The OTLP/HTTP specification's retryable statuses.
fn retryable(s: StatusCode) -> bool {
    matches!(s.as_u16(), 429 | 502 | 503 | 504)
}

/// At most [`MAX_RESPONSE`] bytes of the body.
async fn read_some(mut resp: reqwest::Response) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < MAX_RESPONSE {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    buf
}

/// `{endpoint}/v1development/profiles`, keeping any path prefix.
pub fn export_url(endpoint: &str) -> Result<Url, ExportError> {
    let bad = |why: &str| ExportError::Config(format!("otlp endpoint `{endpoint}`: {why}"));
    let mut url = Url::parse(endpoint).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("must be an http:// or https:// URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    {
        let mut segs = url
            .path_segments_mut()
            .map_err(|()| bad("cannot be a base URL"))?;
        segs.pop_if_empty();
        for s in HTTP_PATH.split('/') {
            segs.push(s);
        }
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_statuses() {
        let u = |s: &str| export_url(s).map(|u| u.to_string());
        assert_eq!(
            u("http://c:4318").unwrap(),
            "http://c:4318/v1development/profiles"
        );
        assert_eq!(
            u("https://c/otlp/").unwrap(),
            "https://c/otlp/v1development/profiles"
        );
        for bad in ["c:4318", "ftp://c", "http://c/?x=1", "http://c/#f"] {
            assert!(u(bad).is_err(), "{bad}");
        }
        for s in [429, 502, 503, 504] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()));
        }
        for s in [400, 401, 404, 413, 500, 501] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()));
        }
    }
}
