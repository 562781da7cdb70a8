//! HTTPS: the server's certificate and key (vLLM's `--ssl-certfile` and `--ssl-keyfile`), and
//! optionally the CAs whose client certificates it requires (`--ssl-ca-certs`, mutual TLS).
//! rustls with its default cryptography, aws-lc (post-quantum key exchange, X25519MLKEM768,
//! where the client offers it); HTTP/2 and HTTP/1.1 by ALPN. The files are read once, at start,
//! so a bad one stops the server before it listens.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto::aws_lc_rs};

/// A client that has not finished its handshake by then is dropped (it holds a task and a
/// socket, and sends nothing an HTTP timeout would see).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS settings, ready to accept connections.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// Clients must present a certificate from one of `--ssl-ca-certs`' CAs.
    pub client_auth: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the PEM files: `cert` holds the server's certificate chain (its own first), `key`
    /// its private key (PKCS#8, PKCS#1 or SEC1), `client_ca` the CAs of accepted clients.
    pub fn load(cert: &Path, key_file: &Path, client_ca: Option<&Path>) -> anyhow::Result<Tls> {
        let chain = certificates(cert, "--ssl-certfile")?;
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
            anyhow::anyhow!(
                "--ssl-keyfile {}: no private key read ({e}); it must be a PEM file with a `PRIVATE KEY` block",
                key_file.display()
            )
        })?;
        let provider = Arc::new(aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("the TLS protocol versions")?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(path, "--ssl-ca-certs")? {
                    roots.add(c).with_context(|| {
                        format!(
                            "--ssl-ca-certs {}: a certificate is not a CA's",
                            path.display()
                        )
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .with_context(|| format!("--ssl-ca-certs {}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            anyhow::anyhow!(
                "--ssl-certfile {} with --ssl-keyfile {}: {e} (is the key the certificate's?)",
                cert.display(),
                key_file.display()
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_auth: client_ca.is_some(),
        })
    }
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {}: not a PEM file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{flag} {}: no certificate in it (a PEM `BEGIN CERTIFICATE` block)",
            path.display()
        );
    }
    Ok(certs)
}
