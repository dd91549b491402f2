//! rustls configuration for the calls the proxy makes: the upstream and the ZapSign auth endpoint trust the
//! webpki roots plus, optionally, the PEM roots of `upstream.ca_file`.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::ConfigError;

/// The process-wide crypto provider: ring (pure Rust and C, no cmake).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting the webpki roots and the certificates in `ca_file`. No ALPN is set here: each
/// user (hyper-rustls, reqwest) sets the protocols it speaks.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in read_certs("upstream.ca_file", path)? {
            roots.add(cert).map_err(|e| ConfigError::Invalid {
                key: "upstream.ca_file".into(),
                problem: format!("a certificate in {} is not a usable root: {e}", path.display()),
                fix: "give a PEM file of CA certificates".into(),
            })?;
        }
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| ConfigError::Invalid {
            key: "upstream.ca_file".into(),
            problem: format!("TLS setup failed: {e}"),
            fix: "report this as a bug".into(),
        })
}

/// Reads every certificate of a PEM file; none at all is an error naming `key`.
pub fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        key: key.into(),
        problem,
        fix: "give a PEM file with -----BEGIN CERTIFICATE----- blocks".into(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

/// The caller-facing TLS config from `server.tls_cert_file` and `server.tls_key_file`, offering HTTP/2 and
/// HTTP/1.1 by ALPN.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, ConfigError> {
    use rustls_pki_types::PrivateKeyDer;
    let certs = read_certs("server.tls_cert_file", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| ConfigError::Invalid {
        key: "server.tls_key_file".into(),
        problem: format!("no usable private key in {}: {e}", key_file.display()),
        fix: "give the PEM private key (PKCS#8, PKCS#1 or SEC1) that matches server.tls_cert_file".into(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| ConfigError::Invalid {
            key: "server.tls_key_file".into(),
            problem: format!("the certificate and key do not make a TLS identity: {e}"),
            fix: "check that the key belongs to the first certificate of server.tls_cert_file".into(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
