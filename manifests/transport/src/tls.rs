//! TLS for the registry's HTTPS API and broker listener (server) and for every client
//! (the registry's MQTT clients, the simulator, the CLI): rustls on aws-lc-rs.

use anyhow::{bail, Context as _};
use rustls::crypto::aws_lc_rs::default_provider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A server's certificate chain and private key, PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A client configuration that trusts the certificates in `ca` (a PEM file: the
/// private CA of a fleet's own registry, or a self-signed certificate), or the
/// system's roots when `ca` is `None`.
///
/// # Errors
/// The file cannot be read or holds no certificate; no system roots could be loaded.
pub fn client_config(ca: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates(path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate in {}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!("no trusted certificates found on this system; name a CA file");
            }
        }
    }
    Ok(Arc::new(
        ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A server configuration presenting `files`' certificate chain.
///
/// # Errors
/// A file cannot be read, holds no certificate or no private key, or the key does not
/// match the certificate.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key {}", files.key.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "the key {} does not fit the certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    Ok(Arc::new(config))
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(dir: &Path) -> TlsFiles {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, c.cert.pem()).unwrap();
        std::fs::write(&files.key, c.signing_key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_certificate_and_its_key_make_a_server_and_a_client_that_trusts_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = self_signed(dir.path());
        server_config(&files).unwrap();
        client_config(Some(&files.cert)).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_or_a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = self_signed(dir.path());
        let other = tempfile::tempdir().unwrap();
        let mixed = TlsFiles {
            cert: files.cert.clone(),
            key: self_signed(other.path()).key,
        };
        let e = server_config(&mixed).unwrap_err();
        assert!(format!("{e:#}").contains("does not fit"), "{e:#}");
        let e = client_config(Some(&files.key)).unwrap_err();
        assert!(format!("{e:#}").contains("no PEM certificate"), "{e:#}");
    }
}
