use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::*;

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("skep-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config from a PEM chain and key.
fn server(chain_pem: &str, key_pem: &str) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// Why a client refused the server's certificate.
#[derive(Debug, PartialEq)]
enum Refused {
    /// The certificate is not for the name the client asked for.
    WrongName,
    /// The certificate does not chain to the client's CA. Every queen's CA has the same name,
    /// so another queen's certificate fails its signature check rather than as an unknown issuer.
    NotOurCa,
}

/// Handshakes a client trusting `ca_pem` with `server` for `name`, in memory. A failure must be
/// the client refusing the certificate for one of the reasons in `Refused`: anything else (a
/// broken test server, a protocol error) fails the test instead of passing as a refusal.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    ca_pem: &str,
    name: &str,
) -> Result<(), Refused> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let accept = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let r = connector.connect(name, a).await.map(|_| ());
    let _ = accept.await;
    let Err(e) = r else { return Ok(()) };
    use rustls::CertificateError as C;
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => Err(Refused::WrongName),
        Some(rustls::Error::InvalidCertificate(C::BadSignature | C::UnknownIssuer)) => {
            Err(Refused::NotOurCa)
        }
        _ => panic!("the handshake failed for another reason than the certificate: {e}"),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_ca_is_created_once_and_kept_private() {
    let dir = temp_dir("ca");
    let first = QueenTls::load_or_create(&dir, &[]).unwrap();
    let mode = std::fs::metadata(dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = QueenTls::load_or_create(&dir, &["10.0.0.1".into()]).unwrap();
    assert_eq!(first.ca.fingerprint, again.ca.fingerprint);
    assert_eq!(
        first.ca.fingerprint,
        pem_fingerprint(&again.ca.cert_pem).unwrap()
    );
    assert_eq!(first.ca.fingerprint.len(), 64);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reloaded_ca_issues_certificates_that_chain_to_the_original() {
    let dir = temp_dir("chain");
    let original_ca_pem = QueenTls::load_or_create(&dir, &[]).unwrap().ca.cert_pem;
    // A second process start: the issuer is rebuilt from the key file.
    let queen = QueenTls::load_or_create(&dir, &["192.168.1.7".into()]).unwrap();
    rt().block_on(async {
        let s = server(&queen.chain_pem, &queen.key_pem);
        handshake(s.clone(), &original_ca_pem, QUEEN_NAME)
            .await
            .unwrap();
        handshake(s.clone(), &original_ca_pem, "192.168.1.7")
            .await
            .unwrap();
        // Another name is refused: certificates are bound to names.
        assert_eq!(
            handshake(s, &original_ca_pem, "other.skep").await,
            Err(Refused::WrongName)
        );

        let pool = PoolKey::generate().unwrap();
        let cert = queen.ca.issue_pool("node-1", &pool.public_key()).unwrap();
        let key_pem = pool.key.serialize_pem();
        let s = server(&format!("{cert}{}", queen.ca.cert_pem), &key_pem);
        handshake(s.clone(), &original_ca_pem, &pool_name("node-1"))
            .await
            .unwrap();
        // A pool certificate does not pass for another node, nor for the queen.
        assert_eq!(
            handshake(s.clone(), &original_ca_pem, &pool_name("node-2")).await,
            Err(Refused::WrongName)
        );
        assert_eq!(
            handshake(s, &original_ca_pem, QUEEN_NAME).await,
            Err(Refused::WrongName)
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let (a, b) = (temp_dir("ca-a"), temp_dir("ca-b"));
    let qa = QueenTls::load_or_create(&a, &[]).unwrap();
    let qb = QueenTls::load_or_create(&b, &[]).unwrap();
    assert_ne!(qa.ca.fingerprint, qb.ca.fingerprint);
    rt().block_on(async {
        let s = server(&qb.chain_pem, &qb.key_pem);
        assert_eq!(
            handshake(s, &qa.ca.cert_pem, QUEEN_NAME).await,
            Err(Refused::NotOurCa)
        );
    });
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn pinning_returns_the_pinned_ca_and_refuses_any_other() {
    let dir = temp_dir("pin");
    let queen = QueenTls::load_or_create(&dir, &[]).unwrap();
    rt().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(server(&queen.chain_pem, &queen.key_pem));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let got = fetch_pinned_ca(&addr, &queen.ca.fingerprint).await.unwrap();
        assert_eq!(pem_fingerprint(&got).unwrap(), queen.ca.fingerprint);
        let wrong = "ab".repeat(32);
        match fetch_pinned_ca(&addr, &wrong).await {
            Err(TlsError::PinMismatch { pinned }) => assert_eq!(pinned, wrong),
            other => panic!("expected a pin mismatch, got {other:?}"),
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tokens_carry_an_optional_well_formed_pin() {
    let fp = "0f".repeat(32);
    assert_eq!(split_pin("skep_abc").unwrap(), ("skep_abc", None));
    let with = format!("skep_abc@{fp}");
    assert_eq!(split_pin(&with).unwrap(), ("skep_abc", Some(fp.as_str())));
    for bad in [
        "skep_abc@".to_owned(),
        "skep_abc@zz".to_owned(),
        format!("skep_abc@{}", "g".repeat(64)),
        format!("skep_abc@{}", "0f".repeat(33)),
    ] {
        match split_pin(&bad) {
            Err(TlsError::Invalid(why)) => assert!(why.contains("64 hex digits"), "{bad}: {why}"),
            other => panic!("{bad}: expected a malformed-pin error, got {other:?}"),
        }
    }
}

#[test]
fn pool_public_keys_must_be_p256_points() {
    let dir = temp_dir("pk");
    let queen = QueenTls::load_or_create(&dir, &[]).unwrap();
    // Too short, and the right length without the uncompressed-point tag.
    for key in [&[4u8; 10][..], &[3u8; 65][..]] {
        match queen.ca.issue_pool("n", key) {
            Err(TlsError::Invalid(why)) => {
                assert!(why.contains("uncompressed P-256 point"), "{why}")
            }
            other => panic!(
                "{} bytes: expected an invalid-key error, got {other:?}",
                key.len()
            ),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
