//! A development PKI: one CA, a leaf certificate per mesh service with its SPIFFE URI
//! SAN, and a client certificate for the CLI. `crewmesh certs init` and `crewmesh up`
//! use it; production installs use cert-manager or their own CA instead.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::SpiffeId;
use crate::mesh::Service;
use crate::tls::TlsFiles;

/// Name of the CLI/admin workload in the dev PKI.
pub const CLI_IDENTITY: &str = "cli";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid identity: {0}")]
    Identity(#[from] crate::identity::SpiffeIdError),
}

/// Where `init` puts each file.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Certificate and key files of a workload (`router`, `cli`, ...).
    pub fn files_for(&self, workload: &str) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file(),
            cert_file: self.dir.join(format!("{workload}.pem")),
            key_file: self.dir.join(format!("{workload}-key.pem")),
        }
    }

    /// True when the CA and every leaf exist.
    pub fn is_complete(&self) -> bool {
        self.ca_file().exists()
            && self.dir.join("ca-key.pem").exists()
            && Service::ALL
                .iter()
                .map(|s| s.name())
                .chain([CLI_IDENTITY])
                .all(|w| {
                    let f = self.files_for(w);
                    f.cert_file.exists() && f.key_file.exists()
                })
    }

    /// Creates a new CA and leaf certificates for every service and the CLI. Extra DNS
    /// names are added to every server leaf (for example a Kubernetes service name).
    pub fn init(&self, trust_domain: &str, extra_dns: &[String]) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Write {
            path: self.dir.clone(),
            source,
        })?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("crewmesh dev CA ({trust_domain})"),
        );
        dn.push(DnType::OrganizationName, "crewmesh");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write_file(&self.ca_file(), ca_cert.pem().as_bytes(), false)?;
        write_file(
            &self.dir.join("ca-key.pem"),
            ca_key.serialize_pem().as_bytes(),
            true,
        )?;
        let issuer = Issuer::new(ca_params, ca_key);

        let workloads = Service::ALL.iter().map(|s| s.name()).chain([CLI_IDENTITY]);
        for workload in workloads {
            let id = SpiffeId::new(trust_domain, workload)?;
            let (cert, key) = issue_leaf(&issuer, &id, extra_dns)?;
            let files = self.files_for(workload);
            write_file(&files.cert_file, cert.as_bytes(), false)?;
            write_file(&files.key_file, key.as_bytes(), true)?;
        }
        Ok(())
    }
}

/// Issues a leaf certificate (PEM cert, PEM key) for `id`, usable as both TLS server
/// and client, with DNS SANs `localhost`, `<name>` and the extra names, and IP SAN
/// 127.0.0.1.
pub fn issue_leaf(
    issuer: &Issuer<'_, KeyPair>,
    id: &SpiffeId,
    extra_dns: &[String],
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut dns = vec!["localhost".to_owned(), id.name().replace('/', "-")];
    dns.extend(extra_dns.iter().cloned());
    let mut params = CertificateParams::new(dns)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params
        .subject_alt_names
        .push(SanType::URI(id.uri().as_str().try_into()?));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.name());
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads the issuer (CA certificate and key) of an existing dev PKI, to issue more
/// leaves (tests use this for identities outside the allow-lists).
pub fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|source| PkiError::Read { path: p, source })
    };
    let ca_pem = read(dir.join("ca.pem"))?;
    let key = KeyPair::from_pem(&read(dir.join("ca-key.pem"))?)?;
    Ok(Issuer::from_ca_cert_pem(&ca_pem, key)?)
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let _ = secret;
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(contents).map_err(err)?;
    Ok(())
}
