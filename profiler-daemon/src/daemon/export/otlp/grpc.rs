//! OTLP over gRPC: `ProfilesService/Export` through tonic, the request sent
//! as the bytes the encoder made (a pass-through codec), so a retry resends
//! them without encoding again.
use std::time::Duration;

use bytes::{BufMut, Bytes};
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use super::{partial, OtlpConfig, GRPC_PATH};
use crate::daemon::export::push::Attempt;
use crate::daemon::export::ExportError;

pub struct GrpcClient {
    channel: Channel,
    metadata: MetadataMap,
    gzip: bool,
    timeout: Duration,
}

impl GrpcClient {
    /// A lazily connected channel: a server that is down now is a retry
    /// later, not a start-up failure.
    pub fn new(cfg: &OtlpConfig, ca_pem: Option<&[u8]>) -> Result<Self, ExportError> {
        let bad =
            |why: String| ExportError::Config(format!("otlp endpoint `{}`: {why}", cfg.endpoint));
        let mut ep = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| bad(e.to_string()))?
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("pyebpf/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| bad(e.to_string()))?;
        if cfg.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(pem) = ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let mut metadata = MetadataMap::new();
        for (k, v) in &cfg.headers {
            let key = MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| ExportError::Config(format!("otlp header `{k}`: not a valid name")))?;
            let value = MetadataValue::try_from(v.as_str()).map_err(|_| {
                ExportError::Config(format!("otlp header `{k}`: not a valid value"))
            })?;
            metadata.insert(key, value);
        }
        Ok(GrpcClient {
            channel: ep.connect_lazy(),
            metadata,
            gzip: cfg.gzip,
            timeout: cfg.timeout,
        })
    }

    pub async fn export(&self, body: Bytes) -> Attempt {
        // Channels are cheap clones sharing one connection.
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
        if let Err(e) = grpc.ready().await {
            return Attempt::Retry {
                why: format!("gRPC channel: {e}"),
                after: None,
            };
        }
        let mut req = tonic::Request::new(body);
        *req.metadata_mut() = self.metadata.clone();
        req.set_timeout(self.timeout);
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_PATH);
        match grpc.unary(req, path, RawCodec).await {
            Ok(resp) => {
                let p = resp.into_inner().partial_success.unwrap_or_default();
                partial(p.rejected_profiles, p.error_message).unwrap_or(Attempt::Sent)
            }
            Err(status) => outcome(&status),
        }
    }
}

/// What a failed call means, by the OTLP specification's list of
/// retryable codes.
pub fn outcome(status: &Status) -> Attempt {
    let why = format!("gRPC {:?}: {}", status.code(), status.message());
    let after = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .filter(|d| !d.is_zero());
    let retry = match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => true,
        // Only when the server says when: otherwise retrying will not help.
        Code::ResourceExhausted => after.is_some(),
        _ => false,
    };
    if retry {
        Attempt::Retry { why, after }
    } else {
        Attempt::Rejected(why)
    }
}

/// Sends pre-encoded bytes; decodes the response with the official message.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportProfilesServiceResponse;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ExportProfilesServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ExportProfilesServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| {
                Status::internal(format!("undecodable ExportProfilesServiceResponse: {e}"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn retryable_codes_and_retry_info() {
        for c in [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
        ] {
            assert!(
                matches!(
                    outcome(&Status::new(c, "x")),
                    Attempt::Retry { after: None, .. }
                ),
                "{c:?}"
            );
        }
        for c in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::ResourceExhausted,
        ] {
            assert!(
                matches!(outcome(&Status::new(c, "x")), Attempt::Rejected(_)),
                "{c:?}"
            );
        }
        let with_delay = Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
        );
        match outcome(&with_delay) {
            Attempt::Retry { after, why } => {
                assert_eq!(after, Some(Duration::from_secs(3)));
                assert!(why.contains("slow down"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}
