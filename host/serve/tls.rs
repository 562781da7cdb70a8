//! HTTPS: the server's certificate and key (vLLM's `--ssl-certfile` and `--ssl-keyfile`), and
//! optionally client certificates checked against CAs (`--ssl-ca-certs`), asked for or
//! required as `--ssl-cert-reqs` says (Python's `ssl.CERT_*` numbers, as vLLM takes them).
//! rustls with its default cryptography, aws-lc (post-quantum key exchange, X25519MLKEM768,
//! where the client offers it); HTTP/2 and HTTP/1.1 by ALPN. The files are read at start, so a
//! bad one stops the server before it listens; with `--enable-ssl-refresh` they are read again
//! when they change (a renewed certificate), and a bad new set keeps the one in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto::aws_lc_rs};

/// A client that has not finished its handshake by then is dropped (it holds a task and a
/// socket, and sends nothing an HTTP timeout would see).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `--enable-ssl-refresh` reads the files (a few KB) to see whether they changed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// The server's TLS settings: what new connections are accepted with.
#[derive(Clone)]
pub struct Tls {
    files: Files,
    /// What the config in use was built from.
    loaded: Contents,
    config: Arc<ArcSwap<ServerConfig>>,
}

/// Whether clients present certificates (vLLM's `--ssl-cert-reqs`: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientCerts {
    /// 0 (`CERT_NONE`): not asked for.
    #[default]
    None,
    /// 1 (`CERT_OPTIONAL`): asked for, and checked when given.
    Optional,
    /// 2 (`CERT_REQUIRED`): a client without one is refused.
    Required,
}

impl std::str::FromStr for ClientCerts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "0" => Ok(ClientCerts::None),
            "1" => Ok(ClientCerts::Optional),
            "2" => Ok(ClientCerts::Required),
            _ => Err(format!(
                "{s:?}: 0 (no client certificates), 1 (optional) or 2 (required)"
            )),
        }
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The PEM files: `cert` holds the server's certificate chain (its own first), `key` its private
/// key (PKCS#8, PKCS#1 or SEC1), `client_ca` the CAs of accepted clients.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_certs: ClientCerts,
}

/// The files' bytes, in [`Files`]' order: what a refresh compares.
type Contents = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

impl Tls {
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        client_certs: ClientCerts,
    ) -> anyhow::Result<Tls> {
        if client_certs != ClientCerts::None && client_ca.is_none() {
            bail!(
                "--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (the CAs client certificates are checked against)"
            );
        }
        if client_certs == ClientCerts::None && client_ca.is_some() {
            tracing::warn!(
                "--ssl-ca-certs is given but --ssl-cert-reqs is 0 (vLLM's default): clients are not asked for certificates; 2 requires them, 1 checks them when given"
            );
        }
        let files = Files {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
            client_certs,
        };
        let loaded = files.read()?;
        let config = files.config(&loaded)?;
        Ok(Tls {
            files,
            loaded,
            config: Arc::new(ArcSwap::from_pointee(config)),
        })
    }

    /// What the next handshake uses.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// `--enable-ssl-refresh`: reads the files every `every` and, when they changed, serves new
    /// connections with them (connections already open keep theirs). Files that do not load
    /// (half-written, a key not the certificate's) are logged and the settings in use kept,
    /// until the files change again.
    pub async fn refresh(self, every: Duration) {
        let mut seen = self.loaded.clone();
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let files = self.files.clone();
            let read = tokio::task::spawn_blocking(move || {
                let contents = files.read()?;
                let config = files.config(&contents);
                anyhow::Ok((contents, config))
            });
            let (contents, config) = match read.await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!("TLS files not read: {e:#}");
                    continue;
                }
                Err(_) => continue,
            };
            if seen == contents {
                continue;
            }
            seen = contents;
            match config {
                Ok(c) => {
                    self.config.store(Arc::new(c));
                    tracing::info!("TLS: the certificate files changed; new connections use them");
                }
                Err(e) => tracing::warn!(
                    "TLS: the certificate files changed but do not load ({e:#}); keeping the ones in use"
                ),
            }
        }
    }
}

impl Files {
    fn read(&self) -> anyhow::Result<Contents> {
        let read = |path: &Path, flag: &str| {
            std::fs::read(path)
                .with_context(|| format!("{flag} {}: cannot read it", path.display()))
        };
        Ok((
            read(&self.cert, "--ssl-certfile")?,
            read(&self.key, "--ssl-keyfile")?,
            match &self.client_ca {
                Some(p) => Some(read(p, "--ssl-ca-certs")?),
                None => None,
            },
        ))
    }

    fn config(&self, (cert, key, client_ca): &Contents) -> anyhow::Result<ServerConfig> {
        let chain = certificates(cert, &self.cert, "--ssl-certfile")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            anyhow::anyhow!(
                "--ssl-keyfile {}: no private key read ({e}); it must be a PEM file with a `PRIVATE KEY` block",
                self.key.display()
            )
        })?;
        let provider = Arc::new(aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("the TLS protocol versions")?;
        let builder = match (client_ca, &self.client_ca) {
            (Some(pem), Some(path)) if self.client_certs != ClientCerts::None => {
                let mut roots = RootCertStore::empty();
                for c in certificates(pem, path, "--ssl-ca-certs")? {
                    roots.add(c).with_context(|| {
                        format!(
                            "--ssl-ca-certs {}: a certificate is not a CA's",
                            path.display()
                        )
                    })?;
                }
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
                if self.client_certs == ClientCerts::Optional {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier
                    .build()
                    .with_context(|| format!("--ssl-ca-certs {}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            anyhow::anyhow!(
                "--ssl-certfile {} with --ssl-keyfile {}: {e} (is the key the certificate's?)",
                self.cert.display(),
                self.key.display()
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Every certificate in a PEM file's bytes (at least one).
fn certificates(
    pem: &[u8],
    path: &Path,
    flag: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
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
