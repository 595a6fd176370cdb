//! Workload identities: SPIFFE-style URI SANs, `spiffe://<trust-domain>/<name>`.

use std::fmt;
use std::str::FromStr;

/// A workload identity, e.g. `spiffe://crewmesh.local/router`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("identity `{0}` does not start with spiffe://")]
    Scheme(String),
    #[error("identity `{0}` has no workload path after the trust domain")]
    MissingPath(String),
    #[error("identity `{0}` contains characters outside [a-z0-9.-_/]")]
    Invalid(String),
}

impl SpiffeId {
    /// Builds an identity from parts; both must be lowercase DNS-like labels.
    pub fn new(trust_domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/{name}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The workload name: the path after the trust domain (e.g. `router`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

fn valid_part(s: &str, allow_slash: bool) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'-' | b'_')
                || (allow_slash && b == b'/')
        })
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (td, name) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::MissingPath(s.to_owned()))?;
        if name.is_empty() {
            return Err(SpiffeIdError::MissingPath(s.to_owned()));
        }
        if !valid_part(td, false) || !valid_part(name, true) {
            return Err(SpiffeIdError::Invalid(s.to_owned()));
        }
        Ok(Self {
            trust_domain: td.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.name)
    }
}

/// What the mTLS handshake established about the peer of a connection. Inserted into
/// every request's extensions by the server transport.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The peer's identity, when its certificate carried exactly one valid SPIFFE URI SAN.
    pub identity: Option<SpiffeId>,
}

/// Extracts the SPIFFE id from a DER certificate: the single `spiffe://` URI SAN.
pub fn spiffe_id_from_cert(der: &[u8]) -> Option<SpiffeId> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
        _ => None,
    });
    let first = ids.next()?;
    if ids.next().is_some() {
        return None; // ambiguous: SPIFFE allows exactly one
    }
    first.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://crewmesh.local/router".parse().unwrap();
        assert_eq!(id.trust_domain(), "crewmesh.local");
        assert_eq!(id.name(), "router");
        assert_eq!(id.to_string(), "spiffe://crewmesh.local/router");
    }

    #[test]
    fn rejects_bad_ids() {
        assert!(matches!(
            "https://x/y".parse::<SpiffeId>(),
            Err(SpiffeIdError::Scheme(_))
        ));
        assert!(matches!(
            "spiffe://x".parse::<SpiffeId>(),
            Err(SpiffeIdError::MissingPath(_))
        ));
        assert!(matches!(
            "spiffe://x/".parse::<SpiffeId>(),
            Err(SpiffeIdError::MissingPath(_))
        ));
        assert!(matches!(
            "spiffe://X/Y".parse::<SpiffeId>(),
            Err(SpiffeIdError::Invalid(_))
        ));
    }
}
