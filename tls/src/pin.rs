//! Trust on first use, done right: a joining pool knows only the CA *fingerprint* (from its
//! enrollment token). It opens one TLS handshake whose verifier accepts the queen only if the
//! chain it presents contains a certificate with that fingerprint and the handshake is signed
//! by the leaf's key; that certificate becomes the pool's trust anchor for every later call,
//! which then verifies the queen fully (chain and name) with the standard verifier.

use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use crate::{QUEEN_NAME, TlsError, fingerprint};

#[derive(Debug)]
struct Pinned {
    pin: String,
    found: Mutex<Option<Vec<u8>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let hit = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| fingerprint(c.as_ref()) == self.pin);
        match hit {
            Some(ca) => {
                if let Ok(mut found) = self.found.lock() {
                    *found = Some(ca.as_ref().to_vec());
                }
                Ok(ServerCertVerified::assertion())
            }
            None => Err(rustls::Error::General("CA fingerprint mismatch".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to the queen at `addr` (`host:port`) and returns, as PEM, the certificate in its
/// chain whose SHA-256 is `pin` (lower-case hex).
pub async fn fetch_pinned_ca(addr: &str, pin: &str) -> Result<String, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        pin: pin.to_ascii_lowercase(),
        found: Mutex::new(None),
        provider: Arc::clone(&provider),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let handshake = |source| TlsError::Handshake {
        addr: addr.to_owned(),
        source,
    };
    let tcp = TcpStream::connect(addr).await.map_err(handshake)?;
    let name = ServerName::try_from(QUEEN_NAME).map_err(|e| TlsError::Invalid(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match connector.connect(name, tcp).await {
        Ok(_) => {}
        Err(e) if e.to_string().contains("fingerprint mismatch") => {
            return Err(TlsError::PinMismatch {
                pinned: pin.to_owned(),
            });
        }
        Err(e) => return Err(handshake(e)),
    }
    let der = verifier
        .found
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .ok_or(TlsError::PinMismatch {
            pinned: pin.to_owned(),
        })?;
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    Ok(pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        config,
    ))
}
