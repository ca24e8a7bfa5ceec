//! The control channel's transport, shared by both ends: QUIC (quinn + rustls, TLS 1.3
//! only) with frames from `lorafleet_common::protocol` on one bidirectional stream.
//!
//! The coordinator's certificate is self-signed; workers do not consult any CA but pin the
//! certificate's SHA-256 fingerprint, which the coordinator prints at start.

use lorafleet_common::protocol::{self, FrameError, HEADER_LEN};
use quinn::{RecvStream, SendStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol name: a QUIC peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"lorafleet/1";
/// The name the coordinator's certificate is issued for (workers connect by IP or any host
/// name; the fingerprint, not the name, is what is checked).
pub const SERVER_NAME: &str = "lorafleet-coordinator";
/// Close code for a refused or misbehaving peer.
pub const CLOSE_REFUSED: u32 = 1;
/// Close code for a normal end of run.
pub const CLOSE_DONE: u32 = 0;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the stream or the connection.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The peer sent a frame we refuse.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// TLS or QUIC set-up failed.
    #[error("{0}")]
    Setup(String),
}

/// Reads one frame, refusing it if it is longer than `limit`.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream, limit: usize) -> Result<T, LinkError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| LinkError::Closed(e.to_string()))?;
    let n = protocol::frame_len(len, limit)?;
    let mut rest = vec![0u8; n];
    recv.read_exact(&mut rest).await.map_err(|e| LinkError::Closed(e.to_string()))?;
    Ok(protocol::decode(&rest)?)
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), LinkError> {
    let frame = protocol::encode(msg);
    debug_assert!(frame.len() >= HEADER_LEN);
    send.write_all(&frame).await.map_err(|e| LinkError::Closed(e.to_string()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("60 s is a valid idle timeout")));
    Arc::new(t)
}

/// QUIC server configuration for a certificate and its PKCS#8 key (DER).
pub fn server_config(cert: Vec<u8>, key: Vec<u8>) -> Result<quinn::ServerConfig, LinkError> {
    let setup = |e: rustls::Error| LinkError::Setup(format!("TLS: {e}"));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup)?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert)], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
        .map_err(setup)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| LinkError::Setup(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// QUIC client configuration that accepts exactly the certificate with `fingerprint`.
pub fn client_config(fingerprint: &str) -> Result<quinn::ClientConfig, LinkError> {
    let provider = provider();
    let verifier = Arc::new(Pinned { fingerprint: normalize_fingerprint(fingerprint), provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Setup(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| LinkError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// Fingerprints are compared as lowercase hex without separators (`AB:CD` = `abcd`).
pub fn normalize_fingerprint(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_hexdigit()).map(|c| c.to_ascii_lowercase()).collect()
}

/// Certificate pinning: the server's leaf certificate must hash to the pinned fingerprint;
/// signatures are still verified, so the server must hold the certificate's key.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = protocol::sha256_hex(end_entity.as_ref());
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the coordinator's certificate has fingerprint {got}, not the pinned {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
