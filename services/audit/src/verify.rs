//! Verification of a chain: every stored event is re-hashed from its fields and
//! linked to the one before it, every checkpoint's signature is checked and its head
//! hash compared with the event at its sequence, and the chain head row is compared
//! with the last stored event. The first place where any of this fails is reported
//! with its sequence and a reason that says what is wrong.

use std::collections::BTreeMap;

use crate::checkpoint::{CheckpointRecord, PublicKey, RETENTION_CUT_DOMAIN};
use crate::error::{AuditError, Result};
use crate::event::{EventRecord, GENESIS_HASH, event_hash, hash_matches};
use crate::store::AuditStore;

/// Events read per round trip.
pub(crate) const VERIFY_PAGE: u32 = 5000;

/// Event pages read at the same time.
const READ_AHEAD: usize = 3;

/// Checkpoints read per round trip.
const CHECKPOINT_PAGE: u32 = 1000;

/// The first place where a chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub sequence: i64,
    /// The id of the event stored at (or, for a gap, after) `sequence`; empty when
    /// there is none.
    pub event_id: String,
    pub reason: String,
}

/// The result of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events_verified: u64,
    pub checkpoints_verified: u64,
    pub first_broken: Option<BrokenLink>,
    /// The hash of the last event verified (the genesis hash when none).
    pub head_hash: String,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.first_broken.is_none()
    }

    pub fn into_proto(self) -> crewmesh_proto::audit::v1::VerifyResponse {
        crewmesh_proto::audit::v1::VerifyResponse {
            ok: self.first_broken.is_none(),
            events_verified: self.events_verified,
            checkpoints_verified: self.checkpoints_verified,
            first_broken: self
                .first_broken
                .map(|b| crewmesh_proto::audit::v1::BrokenLink {
                    sequence: u64::try_from(b.sequence).unwrap_or(0),
                    event_id: b.event_id,
                    reason: b.reason,
                }),
            head_hash: self.head_hash,
        }
    }
}

/// Verifies `chain` from `from_sequence` (0 or 1: from the first event). When
/// `public_key` is `None` checkpoint signatures cannot be checked and every
/// checkpoint is reported as unverifiable.
pub async fn verify_chain<S: AuditStore>(
    store: &S,
    chain: &str,
    from_sequence: i64,
    public_key: Option<&PublicKey>,
) -> Result<VerifyReport> {
    verify_chain_reading(store, chain, from_sequence, public_key, READ_AHEAD).await
}

/// [`verify_chain`] with `read_ahead` pages read at the same time (at least 1: the
/// next page is read while the current one is checked).
pub async fn verify_chain_reading<S: AuditStore>(
    store: &S,
    chain: &str,
    from_sequence: i64,
    public_key: Option<&PublicKey>,
    read_ahead: usize,
) -> Result<VerifyReport> {
    let read_ahead = read_ahead.max(1);
    let mut checkpoints = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = store.checkpoints(chain, after, CHECKPOINT_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.sequence;
        let full = page.len() == CHECKPOINT_PAGE as usize;
        checkpoints.extend(page.into_iter().map(|c| (c.sequence, c)));
        if !full {
            break;
        }
    }
    // The head is read after the checkpoints: every honest checkpoint is at or below
    // it. Appends that commit while the chain is read are beyond it and not verified.
    let head = store
        .chain_head(chain)
        .await?
        .unwrap_or((0, GENESIS_HASH.to_owned()));
    let mut verifier = Verifier::new(from_sequence, checkpoints, public_key);
    if let Some(cut) = store.last_cut(chain).await?
        && !verifier.anchor_at_cut(&cut)
    {
        return Ok(verifier.report());
    }
    // Pages are sequence ranges of VERIFY_PAGE, `read_ahead` of them read at a time
    // while the current one is hashed.
    let fetch = |after: i64, upto: i64| {
        let (store, chain) = (store.clone(), chain.to_owned());
        tokio::spawn(async move { store.chain_range(&chain, after, upto).await })
    };
    let mut next_start = verifier.expected - 1;
    let mut pending = std::collections::VecDeque::new();
    let mut read_ahead = |pending: &mut std::collections::VecDeque<_>| {
        while pending.len() < read_ahead && next_start < head.0 {
            let upto = (next_start + i64::from(VERIFY_PAGE)).min(head.0);
            pending.push_back((upto, fetch(next_start, upto)));
            next_start = upto;
        }
    };
    read_ahead(&mut pending);
    while let Some((upto, page)) = pending.pop_front() {
        read_ahead(&mut pending);
        let page = page
            .await
            .map_err(|e| AuditError::Verify(e.to_string()))??;
        let end = page.partition_point(|e| e.sequence <= upto);
        if !verifier.events(&page[..end]) {
            for (_, p) in pending {
                p.abort();
            }
            return Ok(verifier.report());
        }
    }
    verifier.finish(&head);
    if verifier.first_broken.is_none() {
        // An event beyond the head is an honest concurrent append only if the head
        // (read after the event) covers it: the head moves in the event's transaction.
        if let Some(beyond) = store.chain_events(chain, head.0, 1).await?.pop() {
            let now = store.chain_head(chain).await?.map_or(0, |h| h.0);
            if beyond.sequence > now {
                verifier.broken(
                    beyond.sequence,
                    &beyond.id,
                    format!(
                        "event {} lies beyond the chain head ({now}): it was inserted outside an append",
                        beyond.sequence
                    ),
                );
            }
        }
    }
    Ok(verifier.report())
}

/// Whether each event's stored hash is the hash of its fields, computed on up to
/// four threads for large pages.
fn parallel_hash_checks(page: &[EventRecord]) -> Vec<bool> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    if threads < 2 || page.len() < 2048 {
        return page.iter().map(|e| hash_matches(e, &e.hash)).collect();
    }
    let chunk = page.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = page
            .chunks(chunk)
            .map(|c| {
                scope.spawn(move || {
                    c.iter()
                        .map(|e| hash_matches(e, &e.hash))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The verification state, fed one event at a time in sequence order.
pub struct Verifier<'k> {
    expected: i64,
    /// The hash the next event must link to; `None` before the first event of a
    /// verification that starts in the middle of the chain.
    prev: Option<String>,
    checkpoints: BTreeMap<i64, CheckpointRecord>,
    public_key: Option<&'k PublicKey>,
    events_verified: u64,
    checkpoints_verified: u64,
    last_id: String,
    first_broken: Option<BrokenLink>,
}

impl<'k> Verifier<'k> {
    pub fn new(
        from_sequence: i64,
        checkpoints: BTreeMap<i64, CheckpointRecord>,
        public_key: Option<&'k PublicKey>,
    ) -> Self {
        let expected = from_sequence.max(1);
        Self {
            expected,
            prev: (expected == 1).then(|| GENESIS_HASH.to_owned()),
            checkpoints,
            public_key,
            events_verified: 0,
            checkpoints_verified: 0,
            last_id: String::new(),
            first_broken: None,
        }
    }

    /// Starts after a retention cut when the verification would start at or before
    /// it: the events up to the cut were removed on purpose, and the signed cut
    /// vouches for the hash of the last of them. False when the cut does not hold.
    pub fn anchor_at_cut(&mut self, cut: &CheckpointRecord) -> bool {
        if self.expected > cut.sequence + 1 {
            return true;
        }
        let first = cut.sequence + 1;
        let valid = match self.public_key {
            Some(key) => key.check_as(RETENTION_CUT_DOMAIN, "retention cut", cut),
            None => Err(format!(
                "retention cut {} cannot be verified: the service has no signing key configured",
                cut.sequence
            )),
        };
        if let Err(reason) = valid {
            return self.broken(first, "", reason);
        }
        if let Some(cp) = self.checkpoints.get(&cut.sequence) {
            if let Err(reason) = self.check_signature(cp) {
                return self.broken(first, "", reason);
            }
            if cp.head_hash != cut.head_hash {
                let reason = format!(
                    "retention cut {} signed head hash {}, but checkpoint {} signed {}",
                    cut.sequence, cut.head_hash, cut.sequence, cp.head_hash
                );
                return self.broken(first, "", reason);
            }
            self.checkpoints_verified += 1;
        }
        self.checkpoints = self.checkpoints.split_off(&first);
        self.expected = first;
        self.prev = Some(cut.head_hash.clone());
        true
    }

    fn broken(&mut self, sequence: i64, event_id: &str, reason: String) -> bool {
        self.first_broken = Some(BrokenLink {
            sequence,
            event_id: event_id.to_owned(),
            reason,
        });
        false
    }

    /// Checks the next events in order, re-hashing them on every core; false once
    /// the chain is broken.
    pub fn events(&mut self, page: &[EventRecord]) -> bool {
        let hashes_ok = parallel_hash_checks(page);
        page.iter()
            .zip(hashes_ok)
            .all(|(e, ok)| self.event_checked(e, ok))
    }

    /// Checks the next event; false once the chain is broken.
    pub fn event(&mut self, e: &EventRecord) -> bool {
        self.event_checked(e, hash_matches(e, &e.hash))
    }

    /// [`Verifier::event`] with the hash check already done.
    fn event_checked(&mut self, e: &EventRecord, hash_ok: bool) -> bool {
        if self.first_broken.is_some() {
            return false;
        }
        let expected = self.expected;
        if e.sequence != expected {
            return self.broken(
                expected,
                &e.id,
                format!(
                    "event {expected} is missing: the next stored event has sequence {}",
                    e.sequence
                ),
            );
        }
        if !hash_ok {
            let recomputed = event_hash(e);
            return self.broken(
                expected,
                &e.id,
                format!(
                    "the stored hash of event {expected} is not the hash of its fields: the event was changed or moved (stored {}, recomputed {recomputed})",
                    e.hash
                ),
            );
        }
        match &self.prev {
            Some(prev) if *prev != e.prev_hash => {
                let reason = format!(
                    "event {expected} does not link to event {}: its prev_hash is {}, the previous event's hash is {prev}",
                    expected - 1,
                    e.prev_hash
                );
                return self.broken(expected, &e.id, reason);
            }
            Some(_) => {}
            None => {
                // Starting mid-chain: the link into the first event is trusted unless a
                // checkpoint vouches for the event before it.
                if let Some(anchor) = self.checkpoints.get(&(expected - 1))
                    && anchor.head_hash != e.prev_hash
                {
                    let reason = format!(
                        "event {expected} does not link to checkpoint {}: its prev_hash is {}, the checkpoint signed {}",
                        expected - 1,
                        e.prev_hash,
                        anchor.head_hash
                    );
                    return self.broken(expected, &e.id, reason);
                }
            }
        }
        if let Some(cp) = self.checkpoints.remove(&expected) {
            if let Err(reason) = self.check_signature(&cp) {
                return self.broken(expected, &e.id, reason);
            }
            if cp.head_hash != e.hash {
                return self.broken(
                    expected,
                    &e.id,
                    format!(
                        "checkpoint {expected} signed head hash {}, but event {expected} hashes to {}",
                        cp.head_hash, e.hash
                    ),
                );
            }
            self.checkpoints_verified += 1;
        }
        self.prev = Some(e.hash.clone());
        self.last_id.clone_from(&e.id);
        self.events_verified += 1;
        self.expected += 1;
        true
    }

    fn check_signature(&self, cp: &CheckpointRecord) -> std::result::Result<(), String> {
        match self.public_key {
            Some(key) => key.check(cp),
            None => Err(format!(
                "checkpoint {} cannot be verified: the service has no signing key configured",
                cp.sequence
            )),
        }
    }

    /// Checks what follows the last event: checkpoints beyond it and the head row.
    /// Checks what follows the last event up to the chain head `(sequence, hash)`
    /// read before the events: checkpoints beyond the last event, missing events at
    /// the end, and the head hash.
    pub fn finish(&mut self, head: &(i64, String)) {
        if self.first_broken.is_some() {
            return;
        }
        let last = self.expected - 1;
        let (head_sequence, head_hash) = (head.0, head.1.as_str());
        if let Some((&sequence, cp)) = self.checkpoints.range(self.expected..).next() {
            let reason = match self.check_signature(cp) {
                Err(reason) => reason,
                Ok(()) if sequence > head_sequence => format!(
                    "event {} is missing: checkpoint {sequence} was signed over it, but the chain head is {head_sequence}",
                    self.expected
                ),
                Ok(()) => format!(
                    "event {} is missing: checkpoint {sequence} was signed over it, but the chain ends at {last}",
                    self.expected
                ),
            };
            self.broken(self.expected, "", reason);
            return;
        }
        if head_sequence > last {
            self.broken(
                self.expected,
                "",
                format!(
                    "event {} is missing: the chain head records {head_sequence} events, the stored chain ends at {last}",
                    self.expected
                ),
            );
        } else if head_sequence == last
            && self.events_verified > 0
            && self.prev.as_deref() != Some(head_hash)
        {
            let id = self.last_id.clone();
            self.broken(
                last,
                &id,
                format!(
                    "the chain head row says event {last} hashes to {head_hash}, the stored event hashes to {}",
                    self.prev.as_deref().unwrap_or_default()
                ),
            );
        }
    }

    pub fn report(&self) -> VerifyReport {
        VerifyReport {
            events_verified: self.events_verified,
            checkpoints_verified: self.checkpoints_verified,
            first_broken: self.first_broken.clone(),
            head_hash: self.prev.clone().unwrap_or_else(|| GENESIS_HASH.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DEFAULT_CHAIN, NewEvent};

    fn chain(n: i64) -> Vec<EventRecord> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|s| {
                let e = NewEvent::from_input(crewmesh_proto::audit::v1::EventInput {
                    id: format!("0190a5c4-0000-7000-8000-{s:012x}"),
                    time: Some(crewmesh_proto::time::from_micros(s)),
                    tenant: "acme".into(),
                    action: "x".into(),
                    ..Default::default()
                })
                .unwrap()
                .seal(DEFAULT_CHAIN, s, &prev);
                prev.clone_from(&e.hash);
                e
            })
            .collect()
    }

    #[test]
    fn pages_hashed_in_parallel_find_the_first_changed_event() {
        let mut events = chain(5000);
        let mut v = Verifier::new(0, BTreeMap::new(), None);
        assert!(v.events(&events));
        v.finish(&(5000, events[4999].hash.clone()));
        assert_eq!(
            (v.report().first_broken, v.report().events_verified),
            (None, 5000)
        );

        events[2499].resource_name = "changed".into();
        events[3999].resource_name = "changed".into();
        let mut v = Verifier::new(0, BTreeMap::new(), None);
        assert!(!v.events(&events));
        let broken = v.report().first_broken.unwrap();
        assert_eq!(broken.sequence, 2500);
        assert!(
            broken.reason.contains("not the hash of its fields"),
            "{broken:?}"
        );
        assert_eq!(v.report().events_verified, 2499);
    }
}
