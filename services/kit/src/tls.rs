//! mTLS material from PEM files: a rustls server config that requires a client
//! certificate from the mesh CA, a client config that trusts only the mesh CA, and a
//! watcher that rebuilds both when the files change (cert-manager rotates them).
//!
//! Peers are verified by chain to the mesh CA and then by their SPIFFE URI SAN, not by
//! DNS name: the transport checks the identity after the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::Deserialize;

use crate::tasks::AbortOnDrop;

/// How often services look for rotated certificate files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The three PEM files of a workload.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle that peers' certificates must chain to.
    pub ca_file: PathBuf,
    /// This workload's certificate chain.
    pub cert_file: PathBuf,
    /// This workload's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("invalid TLS material: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid CA bundle: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
    })
}

/// Server and client configs built from one set of files.
#[derive(Debug)]
pub struct TlsConfigs {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl TlsConfigs {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in load_certs(&files.ca_file)? {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let chain = load_certs(&files.cert_file)?;
        let key = load_key(&files.key_file)?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];

        let server_verifier = Arc::new(MeshServerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![b"h2".to_vec()];

        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Verifies a server's chain against the mesh CA only. The server's identity is
/// its SPIFFE URI SAN, checked by the transport after the handshake, so the DNS
/// name the client dialled is deliberately not compared.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The current TLS configs of a workload, swapped atomically when the files change.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct MeshTls {
    files: Arc<TlsFiles>,
    current: Arc<ArcSwap<TlsConfigs>>,
}

impl MeshTls {
    /// Loads the files once; fails on unreadable or invalid material.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let configs = TlsConfigs::load(&files)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(ArcSwap::from_pointee(configs)),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current.load().client.clone()
    }

    /// Re-reads the files now. On error the previous configs stay in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = TlsConfigs::load(&self.files)?;
        self.current.store(Arc::new(configs));
        Ok(())
    }

    /// Polls the files every `interval` and reloads when any changes. New connections
    /// use the new material; established ones keep theirs. Runs until the returned
    /// guard is dropped.
    pub fn spawn_reloader(&self, interval: Duration) -> AbortOnDrop {
        let this = self.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut seen = this.fingerprint();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = this.fingerprint();
                if now == seen {
                    continue;
                }
                match this.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %this.files.cert_file.display(), "reloaded tls certificates");
                        seen = now;
                    }
                    // Files can be seen half-written during a rotation: keep the old
                    // material and try again on the next tick.
                    Err(e) => {
                        tracing::warn!(error = %e, "tls reload failed, keeping previous certificates")
                    }
                }
            }
        }))
    }

    fn fingerprint(&self) -> Vec<Option<(SystemTime, u64)>> {
        [
            &self.files.ca_file,
            &self.files.cert_file,
            &self.files.key_file,
        ]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
    }
}
