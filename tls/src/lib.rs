//! TLS for the hops between machines: the queen's certificate authority, the certificates it
//! issues (to itself and to enrolled pools), pinning that CA by fingerprint, and tonic configs.
//!
//! Names, not addresses, identify peers: the queen's certificate is for `queen.skep` and a pool's
//! for `<node-id>.pool.skep`, and every client sets that name as the TLS server name. So a
//! certificate does not depend on the IP a machine happens to have on the home network, and a
//! pool cannot present itself as another node.

mod pin;

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
};
use sha2::{Digest, Sha256};
use skep_common::secret::Secret;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use zeroize::Zeroizing;

pub use pin::fetch_pinned_ca;

/// TLS server name of the queen.
pub const QUEEN_NAME: &str = "queen.skep";

/// TLS server name of an enrolled pool.
pub fn pool_name(node_id: &str) -> String {
    format!("{node_id}.pool.skep")
}

/// Separates an enrollment token from the CA fingerprint it carries (`skep_…@<sha256 hex>`).
pub const PIN_SEPARATOR: char = '@';

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS key file: {0}")]
    Secret(#[from] skep_common::secret::SecretError),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the queen presented no certificate with the pinned CA fingerprint {pinned}; \
         you may be talking to another machine. Check the queen URL and the enrollment token"
    )]
    PinMismatch { pinned: String },
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
}

/// SHA-256 of a certificate's DER, lower-case hex: what enrollment tokens pin.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The fingerprint of the first certificate in a PEM text.
pub fn pem_fingerprint(pem_text: &str) -> Result<String, TlsError> {
    let block = pem::parse(pem_text).map_err(|e| TlsError::Invalid(format!("PEM: {e}")))?;
    Ok(fingerprint(block.contents()))
}

/// Splits `token@fingerprint` into the bearer token and the pinned CA fingerprint, if any.
pub fn split_pin(raw: &str) -> Result<(&str, Option<&str>), TlsError> {
    match raw.split_once(PIN_SEPARATOR) {
        None => Ok((raw, None)),
        Some((token, pin)) => {
            let ok = pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(TlsError::Invalid(
                    "the CA fingerprint after '@' in the token must be 64 hex digits".into(),
                ));
            }
            Ok((token, Some(pin)))
        }
    }
}

fn ca_params() -> CertificateParams {
    // Rebuilt identically on every start: an issuer is its name, key usages and key.
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skep queen CA");
    dn.push(DnType::OrganizationName, "skep");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn leaf_params(
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    for n in names {
        p.subject_alt_names
            .push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
    }
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    // A day of slack for clocks that disagree; a year of life (pool certificates are reissued
    // at every pool start, the queen's at every queen start).
    let now = std::time::SystemTime::now();
    p.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    p.not_after = (now + std::time::Duration::from_secs(365 * 86_400)).into();
    Ok(p)
}

/// The queen's certificate authority: signs the queen's server certificate and pools'.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what clients trust.
    pub cert_pem: String,
    /// SHA-256 of the CA certificate: what enrollment tokens carry.
    pub fingerprint: String,
}

/// The queen's TLS material, from `<data-dir>/tls/`.
pub struct QueenTls {
    pub ca: Ca,
    /// Server certificate chain (leaf + CA) and key, PEM.
    chain_pem: String,
    key_pem: Zeroizing<String>,
}

impl QueenTls {
    /// Loads the CA from `dir` (creating it on first start: `ca.pem`, `ca.key` 0600) and issues
    /// a fresh server certificate for `queen.skep` plus `extra_names` (IPs or DNS names).
    pub fn load_or_create(dir: &Path, extra_names: &[String]) -> Result<QueenTls, TlsError> {
        skep_common::daemon::create_private_dir(dir)?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let ca = if key_path.exists() {
            let key = Secret::from_file(&key_path)?;
            let key = KeyPair::from_pem(key.expose())?;
            let cert_pem = std::fs::read_to_string(&cert_path)?;
            Ca {
                fingerprint: pem_fingerprint(&cert_pem)?,
                issuer: Issuer::new(ca_params(), key),
                cert_pem,
            }
        } else {
            let key = KeyPair::generate()?;
            let mut params = ca_params();
            let now = std::time::SystemTime::now();
            params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
            params.not_after = (now + std::time::Duration::from_secs(20 * 365 * 86_400)).into();
            let cert = params.self_signed(&key)?;
            Secret::from_string(key.serialize_pem()).write_new(&key_path)?;
            let cert_pem = cert.pem();
            // Written after the key: a half-created CA is redone from scratch, never reused.
            std::fs::write(&cert_path, &cert_pem)?;
            Ca {
                fingerprint: fingerprint(cert.der()),
                issuer: Issuer::new(ca_params(), key),
                cert_pem,
            }
        };
        let mut names = vec![QUEEN_NAME.to_owned(), "localhost".to_owned()];
        names.extend(extra_names.iter().cloned());
        let key = KeyPair::generate()?;
        let leaf = leaf_params(&names, ExtendedKeyUsagePurpose::ServerAuth)?
            .signed_by(&key, &ca.issuer)?;
        Ok(QueenTls {
            chain_pem: format!("{}{}", leaf.pem(), ca.cert_pem),
            key_pem: Zeroizing::new(key.serialize_pem()),
            ca,
        })
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.chain_pem, &*self.key_pem))
    }

    /// The same certificate chain and key as a rustls server config (ring, rustls' safe
    /// defaults, as tonic builds for `server_config`), for a server tonic does not run: the
    /// queen's HTTP door. `alpn` lists the protocols offered, e.g. `h2` and `http/1.1`.
    pub fn rustls_server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: &dyn std::fmt::Display| TlsError::Invalid(format!("server certificate: {e}"));
        let chain = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| bad(&e))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| bad(&e))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

impl Ca {
    /// A server certificate for an enrolled pool, for `<node-id>.pool.skep`, binding the public
    /// key the pool sent (uncompressed P-256 point; the private key never leaves the pool).
    pub fn issue_pool(&self, node_id: &str, public_key: &[u8]) -> Result<String, TlsError> {
        let key = PoolPublicKey::new(public_key)?;
        let cert = leaf_params(&[pool_name(node_id)], ExtendedKeyUsagePurpose::ServerAuth)?
            .signed_by(&key, &self.issuer)?;
        Ok(cert.pem())
    }

    /// How a client of something this CA certified verifies it.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        client_config(&self.cert_pem, server_name)
    }
}

/// A pool's P-256 public key as received in `Nodes/IssueCertificate`.
struct PoolPublicKey(Vec<u8>);

impl PoolPublicKey {
    fn new(raw: &[u8]) -> Result<PoolPublicKey, TlsError> {
        // SEC1 uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
        if raw.len() != 65 || raw[0] != 0x04 {
            return Err(TlsError::Invalid(
                "public key must be an uncompressed P-256 point (65 bytes)".into(),
            ));
        }
        Ok(PoolPublicKey(raw.to_vec()))
    }
}

impl PublicKeyData for PoolPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A pool's TLS key (made fresh at every start, kept in memory only) and, once the queen has
/// issued it, its certificate.
pub struct PoolKey {
    key: KeyPair,
}

impl PoolKey {
    pub fn generate() -> Result<PoolKey, TlsError> {
        Ok(PoolKey {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// What to send the queen for a certificate.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The server config for the certificate the queen issued (chain: leaf + queen CA).
    pub fn server_config(&self, cert_pem: &str, ca_pem: &str) -> ServerTlsConfig {
        let key = Zeroizing::new(self.key.serialize_pem());
        ServerTlsConfig::new().identity(Identity::from_pem(format!("{cert_pem}{ca_pem}"), &*key))
    }
}

/// A client config trusting only `ca_pem`, expecting the peer to be `server_name`.
pub fn client_config(ca_pem: &str, server_name: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server_name)
}

#[cfg(test)]
mod tests;
