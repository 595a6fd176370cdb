//! Signed checkpoints: every N events or T seconds the service signs the chain head
//! with Ed25519, so that an outsider holding the public key can prove that the chain
//! up to that sequence has not changed since.
//!
//! The signed message is documented on [`checkpoint_message`]; the key is a PKCS#8
//! Ed25519 private key read from a file (DER or PEM).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::error::{AuditError, Result};
use crate::event::write_json_string;
use crate::store::AuditStore;

/// The first element of every signed checkpoint message.
pub const CHECKPOINT_DOMAIN: &str = "crewmesh.audit.checkpoint";

/// The first element of every signed retention cut message.
pub const RETENTION_CUT_DOMAIN: &str = "crewmesh.audit.retention-cut";

/// The version of the checkpoint message, its second element.
pub const CHECKPOINT_VERSION: u32 = 1;

/// A checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub chain: String,
    /// The sequence of the chain head that was signed.
    pub sequence: i64,
    /// The hash of the event at `sequence`.
    pub head_hash: String,
    /// When the checkpoint was taken, Unix microseconds.
    pub time_micros: i64,
    /// Standard base64 (with padding) of the 64-byte Ed25519 signature.
    pub signature: String,
    /// The first 16 hex characters of the SHA-256 of the raw public key.
    pub key_id: String,
}

impl CheckpointRecord {
    pub fn into_proto(self) -> crewmesh_proto::audit::v1::Checkpoint {
        crewmesh_proto::audit::v1::Checkpoint {
            chain: self.chain,
            sequence: u64::try_from(self.sequence).unwrap_or(0),
            head_hash: self.head_hash,
            time: Some(crewmesh_proto::time::from_micros(self.time_micros)),
            signature: self.signature,
            key_id: self.key_id,
        }
    }
}

/// The bytes a checkpoint signs: the UTF-8 bytes of a JSON array without whitespace,
/// `[domain, version, chain, sequence, head_hash, time_micros]`, with strings and
/// numbers written exactly as in [`crate::event::canonical_bytes`]. For example:
///
/// ```text
/// ["crewmesh.audit.checkpoint",1,"main",1000,"8584999f...61e3",1700000000000000]
/// ```
pub fn checkpoint_message(
    chain: &str,
    sequence: i64,
    head_hash: &str,
    time_micros: i64,
) -> Vec<u8> {
    signed_message(CHECKPOINT_DOMAIN, chain, sequence, head_hash, time_micros)
}

/// The message of a checkpoint (`domain` [`CHECKPOINT_DOMAIN`]) or of a retention
/// cut ([`RETENTION_CUT_DOMAIN`]): the same array with another first element.
pub fn signed_message(
    domain: &str,
    chain: &str,
    sequence: i64,
    head_hash: &str,
    time_micros: i64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.push(b'[');
    write_json_string(&mut out, domain);
    out.push(b',');
    out.extend_from_slice(CHECKPOINT_VERSION.to_string().as_bytes());
    out.push(b',');
    write_json_string(&mut out, chain);
    out.push(b',');
    out.extend_from_slice(sequence.to_string().as_bytes());
    out.push(b',');
    write_json_string(&mut out, head_hash);
    out.push(b',');
    out.extend_from_slice(time_micros.to_string().as_bytes());
    out.push(b']');
    out
}

/// The key id of a raw Ed25519 public key: the first 16 lower-case hex characters of
/// its SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    let mut id = hex::encode(Sha256::digest(public_key));
    id.truncate(16);
    id
}

/// The private signing key of checkpoints.
pub struct Signer {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads a PKCS#8 Ed25519 key (DER, or PEM `PRIVATE KEY`) from `path`. When the
    /// file does not exist and `create` is set, generates a key and writes it there
    /// as DER with mode 0600.
    pub fn from_file(path: &Path, create: bool) -> Result<Self> {
        let key_error = |problem: String| AuditError::SigningKey {
            path: path.to_path_buf(),
            problem,
        };
        if create && !path.exists() {
            let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| key_error("cannot generate a key".into()))?;
            write_private(path, doc.as_ref()).map_err(|e| key_error(e.to_string()))?;
            tracing::info!(path = %path.display(), "generated an audit checkpoint signing key");
        }
        let bytes = std::fs::read(path).map_err(|e| key_error(e.to_string()))?;
        Self::from_pkcs8(&bytes).map_err(key_error)
    }

    /// A key from PKCS#8 bytes (DER or PEM).
    pub fn from_pkcs8(bytes: &[u8]) -> std::result::Result<Self, String> {
        let der = if bytes.starts_with(b"-----BEGIN") {
            let text = std::str::from_utf8(bytes).map_err(|_| "the PEM file is not UTF-8")?;
            let body: String = text
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<Vec<_>>()
                .concat();
            BASE64
                .decode(body.trim())
                .map_err(|e| format!("the PEM body is not base64: {e}"))?
        } else {
            bytes.to_vec()
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| format!("not a PKCS#8 Ed25519 private key: {e}"))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    /// A fresh random key that lives only in memory (tests and benchmarks).
    pub fn ephemeral() -> Self {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap_or_else(|_| unreachable!("the system random source works"));
        Self::from_pkcs8(doc.as_ref()).unwrap_or_else(|_| unreachable!("a generated key parses"))
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            bytes: self.pair.public_key().as_ref().to_vec(),
            key_id: self.key_id.clone(),
        }
    }

    /// Signs the chain head at `sequence`.
    pub fn sign(
        &self,
        chain: &str,
        sequence: i64,
        head_hash: &str,
        time_micros: i64,
    ) -> CheckpointRecord {
        self.sign_as(CHECKPOINT_DOMAIN, chain, sequence, head_hash, time_micros)
    }

    /// Signs a message of `domain` (a checkpoint or a retention cut).
    pub fn sign_as(
        &self,
        domain: &str,
        chain: &str,
        sequence: i64,
        head_hash: &str,
        time_micros: i64,
    ) -> CheckpointRecord {
        let message = signed_message(domain, chain, sequence, head_hash, time_micros);
        CheckpointRecord {
            chain: chain.to_owned(),
            sequence,
            head_hash: head_hash.to_owned(),
            time_micros,
            signature: BASE64.encode(self.pair.sign(&message).as_ref()),
            key_id: self.key_id.clone(),
        }
    }
}

/// The public half of the signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: Vec<u8>,
    key_id: String,
}

impl PublicKey {
    pub fn from_raw(bytes: Vec<u8>) -> Self {
        let key_id = key_id(&bytes);
        Self { bytes, key_id }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Standard base64 of the raw 32 bytes.
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.bytes)
    }

    /// Why `checkpoint` is not a valid signature by this key, if it is not.
    pub fn check(&self, checkpoint: &CheckpointRecord) -> std::result::Result<(), String> {
        self.check_as(CHECKPOINT_DOMAIN, "checkpoint", checkpoint)
    }

    /// [`PublicKey::check`] for a message of `domain`; `what` names it in errors.
    pub fn check_as(
        &self,
        domain: &str,
        what: &str,
        checkpoint: &CheckpointRecord,
    ) -> std::result::Result<(), String> {
        if checkpoint.key_id != self.key_id {
            return Err(format!(
                "{what} {} is signed by key {}, not by the service's key {}",
                checkpoint.sequence, checkpoint.key_id, self.key_id
            ));
        }
        let signature = BASE64.decode(&checkpoint.signature).map_err(|_| {
            format!(
                "{what} {} has a signature that is not base64",
                checkpoint.sequence
            )
        })?;
        let message = signed_message(
            domain,
            &checkpoint.chain,
            checkpoint.sequence,
            &checkpoint.head_hash,
            checkpoint.time_micros,
        );
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(&message, &signature)
            .map_err(|_| {
                format!(
                    "{what} {} has an invalid signature: it was changed after signing",
                    checkpoint.sequence
                )
            })
    }
}

/// Takes signed checkpoints of a chain: when `every_events` events were appended
/// since the last one (woken by [`Checkpointer::appended`]) and on every tick of
/// `interval` while the chain has grown. Several replicas may run one each: the
/// first checkpoint stored at a sequence wins, the others are discarded.
pub struct Checkpointer<S> {
    store: S,
    signer: Signer,
    chain: String,
    every_events: i64,
    last: AtomicI64,
    wake: Notify,
}

impl<S: AuditStore> Checkpointer<S> {
    /// Reads the last checkpointed sequence of `chain` from the store.
    pub async fn new(store: S, signer: Signer, chain: &str, every_events: u64) -> Result<Self> {
        let last = store.last_checkpoint_sequence(chain).await?;
        Ok(Self {
            store,
            signer,
            chain: chain.to_owned(),
            every_events: i64::try_from(every_events.max(1)).unwrap_or(i64::MAX),
            last: AtomicI64::new(last),
            wake: Notify::new(),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.signer.public_key()
    }

    /// Called after each append with the new head sequence.
    pub fn appended(&self, head_sequence: i64) {
        if head_sequence - self.last.load(Ordering::Relaxed) >= self.every_events {
            self.wake.notify_one();
        }
    }

    /// Signs and stores the current chain head unless it is checkpointed already.
    pub async fn checkpoint_now(&self) -> Result<Option<CheckpointRecord>> {
        let Some((sequence, hash)) = self.store.chain_head(&self.chain).await? else {
            return Ok(None);
        };
        if sequence <= 0 || sequence <= self.last.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let now = crewmesh_proto::time::to_micros(&crewmesh_proto::time::to_timestamp(
            std::time::SystemTime::now(),
        ));
        let checkpoint = self.signer.sign(&self.chain, sequence, &hash, now);
        let stored = self.store.insert_checkpoint(&checkpoint).await?;
        self.last.fetch_max(sequence, Ordering::Relaxed);
        if stored {
            tracing::debug!(sequence, "signed an audit checkpoint");
            Ok(Some(checkpoint))
        } else {
            Ok(None)
        }
    }

    /// Removes the events up to the newest checkpoint taken before `cutoff_micros`,
    /// recording a signed retention cut there. Returns the cut, if one was made.
    pub async fn retention_cut(&self, cutoff_micros: i64) -> Result<Option<CheckpointRecord>> {
        let Some(at) = self
            .store
            .checkpoint_before(&self.chain, cutoff_micros)
            .await?
        else {
            return Ok(None);
        };
        let last_cut = self.store.last_cut(&self.chain).await?;
        if last_cut.is_some_and(|c| c.sequence >= at.sequence) {
            return Ok(None);
        }
        let now = crewmesh_proto::time::to_micros(&crewmesh_proto::time::to_timestamp(
            std::time::SystemTime::now(),
        ));
        let cut = self.signer.sign_as(
            RETENTION_CUT_DOMAIN,
            &self.chain,
            at.sequence,
            &at.head_hash,
            now,
        );
        let removed = self.store.retention_cut(&cut).await?;
        tracing::info!(sequence = cut.sequence, removed, "audit retention cut");
        Ok(Some(cut))
    }

    /// Runs until `stop` resolves, then takes a last checkpoint. With
    /// `retention_days`, also cuts the chain on each tick.
    pub async fn run(
        &self,
        interval: Duration,
        retention_days: Option<u64>,
        stop: impl Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = ticks.tick() => {}
                () = self.wake.notified() => {}
            }
            if let Err(e) = self.checkpoint_now().await {
                tracing::warn!(error = %e, "cannot take an audit checkpoint");
            }
            if let Some(days) = retention_days {
                let now = crewmesh_proto::time::to_micros(&crewmesh_proto::time::to_timestamp(
                    std::time::SystemTime::now(),
                ));
                let keep = i64::try_from(days.saturating_mul(86_400_000_000)).unwrap_or(i64::MAX);
                if let Err(e) = self.retention_cut(now.saturating_sub(keep)).await {
                    tracing::warn!(error = %e, "cannot apply audit retention");
                }
            }
        }
        if let Err(e) = self.checkpoint_now().await {
            tracing::warn!(error = %e, "cannot take the final audit checkpoint");
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// When checkpoints are taken, and with which key.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// PKCS#8 Ed25519 private key (DER or PEM). Without it no checkpoints are taken.
    pub signing_key_file: Option<PathBuf>,
    /// Generate the key file when it does not exist (the embedded mode does).
    pub create_key_if_missing: bool,
    /// A checkpoint at least every this many events.
    pub every_events: u64,
    /// And at least this often while the chain grows, in seconds.
    pub interval_secs: u64,
    /// Remove events older than this many days, by a signed retention cut at the
    /// newest checkpoint taken before then. `None`: keep everything.
    pub retention_days: Option<u64>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            signing_key_file: None,
            create_key_if_missing: false,
            every_events: 1000,
            interval_secs: 10,
            retention_days: None,
        }
    }
}

impl CheckpointConfig {
    /// Checkpoints signed with the key at `path`, created when missing.
    pub fn with_key_file(path: PathBuf) -> Self {
        Self {
            signing_key_file: Some(path),
            create_key_if_missing: true,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_the_documented_one() {
        let m = checkpoint_message("main", 1000, &"ab".repeat(32), 1_700_000_000_000_000);
        assert_eq!(
            String::from_utf8(m).unwrap(),
            format!(
                "[\"crewmesh.audit.checkpoint\",1,\"main\",1000,\"{}\",1700000000000000]",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let signer = Signer::ephemeral();
        let public = signer.public_key();
        let cp = signer.sign("main", 42, &"cd".repeat(32), 7);
        assert_eq!(public.check(&cp), Ok(()));
        assert_eq!(cp.key_id.len(), 16);
        let mutations: Vec<fn(&mut CheckpointRecord)> = vec![
            |c| c.sequence += 1,
            |c| c.head_hash = "ce".repeat(32),
            |c| c.time_micros += 1,
            |c| c.chain = "other".into(),
        ];
        for (i, m) in mutations.into_iter().enumerate() {
            let mut changed = cp.clone();
            m(&mut changed);
            let err = public.check(&changed).unwrap_err();
            assert!(err.contains("invalid signature"), "mutation {i}: {err}");
        }
        let other = Signer::ephemeral().public_key();
        assert!(other.check(&cp).unwrap_err().contains("signed by key"));
    }

    #[test]
    fn keys_are_created_once_and_read_back_as_der_or_pem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/audit.pk8");
        let first = Signer::from_file(&path, true).unwrap();
        let again = Signer::from_file(&path, true).unwrap();
        assert_eq!(first.key_id(), again.key_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let der = std::fs::read(&path).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            BASE64.encode(&der)
        );
        let from_pem = Signer::from_pkcs8(pem.as_bytes()).unwrap();
        assert_eq!(from_pem.key_id(), first.key_id());
        let missing = Signer::from_file(&dir.path().join("absent"), false).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
        assert!(Signer::from_pkcs8(b"garbage").is_err());
    }
}
