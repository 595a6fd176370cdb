//! Envelope encryption of inline provider secrets.
//!
//! A provider document may carry its API key inline, `"api_key": {"inline": "sk-..."}`,
//! only when the config service has a key file (`[config] secrets_key_file`: 32 random
//! bytes, raw or base64). The service then stores, instead of the key,
//!
//! ```json
//! "api_key": {"encrypted": {"key_id": "3f9a1c0b2d4e5f60", "wrapped_key": "...", "nonce": "...", "ciphertext": "..."}}
//! ```
//!
//! - a fresh 256-bit data key per write encrypts the secret with AES-256-GCM, with
//!   the document's `<owner>/provider/<name>` as associated data (a ciphertext copied
//!   to another document does not decrypt);
//! - the data key is itself encrypted ("wrapped") with AES-256-GCM under the key-file
//!   key (`wrapped_key` = nonce || ciphertext);
//! - `key_id` is the first 8 bytes of the SHA-256 of the key-file key, in hex, so a
//!   service holding a different key says so instead of failing obscurely.
//!
//! Reads never return the secret: Get, List, History, Watch, write responses and audit
//! details show `"api_key": {"redacted": "encrypted with key <key_id>"}`. The one
//! exception is the router's identity, which is the component that calls the provider:
//! its Watch and List responses carry `"api_key": {"value": "<secret>"}` (over mutual
//! TLS). See `docs/security.md` for the threat model.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::document::{DocKey, DocKind};
use crate::error::ConfigServiceError;
use crate::spec::SpecProblem;

/// The field of a provider that may hold an inline secret.
pub const SECRET_FIELD: &str = "api_key";
/// Length of a nonce of AES-GCM.
const NONCE_LEN: usize = 12;

/// The key-encryption key read from `secrets_key_file`.
#[derive(Clone)]
pub struct SecretsKey {
    id: String,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey").field("id", &self.id).finish()
    }
}

/// Why a stored secret cannot be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(
        "it was encrypted with key {stored}, but this config service has key {ours}: configure the secrets_key_file it was written with"
    )]
    WrongKey { stored: String, ours: String },
    #[error("the encrypted value is damaged: {0}")]
    Damaged(String),
}

impl SecretsKey {
    /// A key from the key file's bytes: exactly 32 bytes, or their base64 (standard
    /// alphabet, surrounding whitespace ignored).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        let key: Vec<u8> = if bytes.len() == 32 {
            bytes.to_vec()
        } else {
            let text = std::str::from_utf8(bytes).map_err(|_| {
                format!(
                    "is {} bytes; it must hold exactly 32 random bytes, raw or base64",
                    bytes.len()
                )
            })?;
            STANDARD.decode(text.trim()).map_err(|_| {
                format!(
                    "is {} bytes and not base64; it must hold exactly 32 random bytes, raw or base64 (e.g. `openssl rand -base64 32`)",
                    bytes.len()
                )
            })?
        };
        if key.len() != 32 {
            return Err(format!(
                "holds {} bytes; it must hold exactly 32 random bytes, raw or base64 (e.g. `openssl rand -base64 32`)",
                key.len()
            ));
        }
        let digest = Sha256::digest(&key);
        let cipher =
            Aes256Gcm::new_from_slice(&key).map_err(|_| "is not a 32-byte key".to_owned())?;
        Ok(Self {
            id: hex_of(&digest[..8]),
            cipher,
        })
    }

    /// Reads the key file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigServiceError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigServiceError::ReadFile {
            what: "secrets_key_file",
            path: path.display().to_string(),
            source,
        })?;
        Self::from_file_bytes(&bytes).map_err(|problem| {
            ConfigServiceError::InvalidArgument(format!(
                "secrets_key_file {} {problem}",
                path.display()
            ))
        })
    }

    /// The key's id (first 8 bytes of its SHA-256, hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encrypts `secret` for the document at `key`.
    pub fn seal(&self, key: &DocKey, secret: &str) -> Value {
        let data_key = Aes256Gcm::generate_key(OsRng);
        let data_cipher = Aes256Gcm::new(&data_key);
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let aad = key.to_string();
        // Encryption with a fresh key and nonce only fails for inputs of gigabytes.
        let ciphertext = data_cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: secret.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let wrap_nonce = Aes256Gcm::generate_nonce(OsRng);
        let mut wrapped = wrap_nonce.to_vec();
        wrapped.extend(
            self.cipher
                .encrypt(&wrap_nonce, &data_key[..])
                .unwrap_or_default(),
        );
        json!({"encrypted": {
            "key_id": self.id,
            "wrapped_key": STANDARD.encode(wrapped),
            "nonce": STANDARD.encode(nonce),
            "ciphertext": STANDARD.encode(ciphertext),
        }})
    }

    /// Decrypts an `{"encrypted": {...}}` value written by [`Self::seal`] for `key`.
    pub fn open(&self, key: &DocKey, sealed: &Value) -> Result<String, OpenError> {
        let e = &sealed["encrypted"];
        let field = |name: &str| -> Result<Vec<u8>, OpenError> {
            let text = e[name]
                .as_str()
                .ok_or_else(|| OpenError::Damaged(format!("{name} is missing")))?;
            STANDARD
                .decode(text)
                .map_err(|_| OpenError::Damaged(format!("{name} is not base64")))
        };
        let stored = e["key_id"].as_str().unwrap_or_default();
        if stored != self.id {
            return Err(OpenError::WrongKey {
                stored: stored.to_owned(),
                ours: self.id.clone(),
            });
        }
        let wrapped = field("wrapped_key")?;
        let nonce = field("nonce")?;
        let ciphertext = field("ciphertext")?;
        let lengths = || OpenError::Damaged("wrong lengths".to_owned());
        if wrapped.len() <= NONCE_LEN {
            return Err(lengths());
        }
        let (wrap_nonce, wrapped_key) = wrapped.split_at(NONCE_LEN);
        let wrap_nonce =
            Nonce::from(<[u8; NONCE_LEN]>::try_from(wrap_nonce).map_err(|_| lengths())?);
        let nonce = Nonce::from(<[u8; NONCE_LEN]>::try_from(&nonce[..]).map_err(|_| lengths())?);
        let data_key = self
            .cipher
            .decrypt(&wrap_nonce, wrapped_key)
            .map_err(|_| OpenError::Damaged("the data key does not unwrap".to_owned()))?;
        let data_cipher = Aes256Gcm::new_from_slice(&data_key)
            .map_err(|_| OpenError::Damaged("the data key has the wrong length".to_owned()))?;
        let aad = key.to_string();
        let plain = data_cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| {
                OpenError::Damaged(format!("the ciphertext does not decrypt for {key}"))
            })?;
        String::from_utf8(plain).map_err(|_| OpenError::Damaged("not UTF-8".to_owned()))
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces a provider's inline secret by its envelope before it is stored. Without
/// a key, or for a value a client may not send, the write is refused.
pub fn seal_inline(
    secrets: Option<&SecretsKey>,
    key: &DocKey,
    spec: &mut Map<String, Value>,
) -> Result<(), ConfigServiceError> {
    if key.kind != DocKind::Provider {
        return Ok(());
    }
    let Some(value) = spec.get(SECRET_FIELD) else {
        return Ok(());
    };
    let problem = |problem: &str| ConfigServiceError::InvalidSpec {
        kind: "provider",
        problems: vec![SpecProblem {
            path: SECRET_FIELD.to_owned(),
            problem: problem.to_owned(),
        }],
    };
    let inline = match value.get("inline").and_then(Value::as_str) {
        Some(s) if value.as_object().is_some_and(|o| o.len() == 1) && !s.is_empty() => s,
        _ => {
            return Err(problem(
                "must be {\"inline\": \"<secret>\"} (the config service encrypts it; stored and redacted forms cannot be written back)",
            ));
        }
    };
    let Some(secrets) = secrets else {
        return Err(problem(
            "inline secrets are refused: this config service has no [config] secrets_key_file to encrypt them with; reference the key with api_key_env or api_key_file instead",
        ));
    };
    let sealed = secrets.seal(key, inline);
    spec.insert(SECRET_FIELD.to_owned(), sealed);
    Ok(())
}

/// How a stored secret is shown to a reader.
#[derive(Debug, Clone, Copy)]
pub enum Reveal<'a> {
    /// As a redacted marker (everyone but the router).
    Redacted,
    /// Decrypted (the router's identity).
    Plain(Option<&'a SecretsKey>),
}

/// Rewrites a provider document's stored secret for a reader, in place.
pub fn present(doc: &mut crewmesh_proto::config::v1::Document, reveal: Reveal<'_>) {
    use crewmesh_proto::config::v1::Kind;
    if doc.kind != Kind::Provider as i32 || !doc.spec_json.contains("\"encrypted\"") {
        return;
    }
    let Ok(Value::Object(mut spec)) = serde_json::from_str::<Value>(&doc.spec_json) else {
        return;
    };
    let Some(sealed) = spec
        .get(SECRET_FIELD)
        .filter(|v| v.get("encrypted").is_some())
    else {
        return;
    };
    let key_id = sealed["encrypted"]["key_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let shown = match reveal {
        Reveal::Plain(Some(secrets)) => {
            let key = crate::document::Owner::parse(&doc.tenant)
                .ok()
                .zip(crate::document::DocName::parse(&doc.name).ok())
                .map(|(owner, name)| DocKey::new(owner, DocKind::Provider, name));
            match key.map(|k| secrets.open(&k, sealed)) {
                Some(Ok(secret)) => json!({"value": secret}),
                Some(Err(e)) => {
                    tracing::error!(tenant = %doc.tenant, provider = %doc.name, error = %e, "cannot decrypt the provider's api_key");
                    json!({"redacted": format!("cannot decrypt: {e}")})
                }
                None => json!({"redacted": "cannot decrypt: not a provider key"}),
            }
        }
        Reveal::Plain(None) => {
            tracing::error!(tenant = %doc.tenant, provider = %doc.name, "the provider's api_key is encrypted but this config service has no secrets_key_file");
            json!({"redacted": format!("cannot decrypt: encrypted with key {key_id}, and this config service has no secrets_key_file")})
        }
        Reveal::Redacted => json!({"redacted": format!("encrypted with key {key_id}")}),
    };
    spec.insert(SECRET_FIELD.to_owned(), shown);
    doc.spec_json = Value::Object(spec).to_string();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{DocName, Owner};

    fn provider(name: &str) -> DocKey {
        DocKey::new(
            Owner::Global,
            DocKind::Provider,
            DocName::parse(name).unwrap(),
        )
    }

    #[test]
    fn key_files_are_32_bytes_raw_or_base64() {
        let raw = [7u8; 32];
        let a = SecretsKey::from_file_bytes(&raw).unwrap();
        let b =
            SecretsKey::from_file_bytes(format!("{}\n", STANDARD.encode(raw)).as_bytes()).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id().len(), 16);
        assert_eq!(
            SecretsKey::from_file_bytes(STANDARD.encode([1u8; 16]).as_bytes()).unwrap_err(),
            "holds 16 bytes; it must hold exactly 32 random bytes, raw or base64 (e.g. `openssl rand -base64 32`)"
        );
        assert!(
            SecretsKey::from_file_bytes(b"short")
                .unwrap_err()
                .starts_with("is 5 bytes and not base64")
        );
    }

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_document() {
        let key = SecretsKey::from_file_bytes(&[1u8; 32]).unwrap();
        let doc = provider("openai");
        let sealed = key.seal(&doc, "sk-live-123");
        let text = sealed.to_string();
        assert!(!text.contains("sk-live-123"), "{text}");
        assert_eq!(sealed["encrypted"]["key_id"], key.id());
        assert_eq!(key.open(&doc, &sealed).unwrap(), "sk-live-123");
        // A fresh data key and nonce every time.
        assert_ne!(key.seal(&doc, "sk-live-123"), sealed);
        // Another document, another key, a damaged value: clear errors.
        assert_eq!(
            key.open(&provider("other"), &sealed).unwrap_err(),
            OpenError::Damaged("the ciphertext does not decrypt for _global/provider/other".into())
        );
        let other = SecretsKey::from_file_bytes(&[2u8; 32]).unwrap();
        let err = other.open(&doc, &sealed).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "it was encrypted with key {}, but this config service has key {}: configure the secrets_key_file it was written with",
                key.id(),
                other.id()
            )
        );
        let mut damaged = sealed.clone();
        damaged["encrypted"]["ciphertext"] = json!(STANDARD.encode([0u8; 20]));
        assert!(matches!(
            key.open(&doc, &damaged),
            Err(OpenError::Damaged(_))
        ));
    }

    #[test]
    fn inline_secrets_need_a_key_and_are_shown_redacted_except_to_the_router() {
        let key = SecretsKey::from_file_bytes(&[3u8; 32]).unwrap();
        let doc = provider("openai");
        let mut spec: Map<String, Value> = serde_json::from_value(json!({
            "type": "openai", "base_url": "https://api.openai.com/v1", "api_key": {"inline": "sk-9"}
        }))
        .unwrap();
        assert_eq!(
            seal_inline(None, &doc, &mut spec.clone())
                .unwrap_err()
                .to_string(),
            "invalid provider spec: api_key: inline secrets are refused: this config service has no [config] secrets_key_file to encrypt them with; reference the key with api_key_env or api_key_file instead"
        );
        seal_inline(Some(&key), &doc, &mut spec).unwrap();
        assert!(spec["api_key"]["encrypted"].is_object());
        // The stored form cannot be written back.
        assert!(seal_inline(Some(&key), &doc, &mut spec.clone()).is_err());

        let stored = crewmesh_proto::config::v1::Document {
            tenant: "_global".into(),
            kind: crewmesh_proto::config::v1::Kind::Provider as i32,
            name: "openai".into(),
            spec_json: Value::Object(spec).to_string(),
            ..Default::default()
        };
        let mut shown = stored.clone();
        present(&mut shown, Reveal::Redacted);
        let v: Value = serde_json::from_str(&shown.spec_json).unwrap();
        assert_eq!(
            v["api_key"],
            json!({"redacted": format!("encrypted with key {}", key.id())})
        );
        assert_eq!(v["base_url"], "https://api.openai.com/v1");
        let mut router = stored.clone();
        present(&mut router, Reveal::Plain(Some(&key)));
        let v: Value = serde_json::from_str(&router.spec_json).unwrap();
        assert_eq!(v["api_key"], json!({"value": "sk-9"}));
        let mut wrong = stored;
        present(
            &mut wrong,
            Reveal::Plain(Some(&SecretsKey::from_file_bytes(&[4u8; 32]).unwrap())),
        );
        assert!(!wrong.spec_json.contains("sk-9"));
        assert!(
            wrong
                .spec_json
                .contains("cannot decrypt: it was encrypted with key")
        );
    }
}
