//! The response cache: exact match over the normalised request, scoped to the tenant,
//! with a TTL per entry and a bound on entries and bytes (oldest entries are evicted
//! first). Opt-in per alias (`"cache": {"ttl_secs": N}` in the model document) or per
//! request (`routing.cache = USE`); `routing.cache = BYPASS` skips it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crewmesh_proto::router::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::catalog::Model;

/// TTL of a per-request opt-in on an alias that configures no cache.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

type Key = [u8; 32];

struct Entry {
    response: pb::CompleteResponse,
    expires: Instant,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    /// Insertion order, for eviction.
    order: VecDeque<Key>,
    bytes: usize,
}

pub struct ResponseCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseCache")
    }
}

impl ResponseCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_entries,
            max_bytes,
        }
    }

    /// How long an answer to `req` on `model` may be cached; `None` when it must not be.
    pub fn ttl_for(&self, model: &Model, req: &pb::CompleteRequest) -> Option<Duration> {
        let mode = req
            .routing
            .as_ref()
            .and_then(|r| pb::CacheMode::try_from(r.cache).ok())
            .unwrap_or(pb::CacheMode::Unspecified);
        let configured = model
            .cache
            .map(|c| Duration::from_secs(c.ttl_secs))
            .filter(|d| !d.is_zero());
        match mode {
            pb::CacheMode::Bypass => None,
            pb::CacheMode::Use => Some(configured.unwrap_or(DEFAULT_TTL)),
            pb::CacheMode::Unspecified => configured,
        }
        .filter(|_| self.max_entries > 0)
    }

    /// The key of a request: SHA-256 of the tenant and the request without the fields
    /// that do not change the answer (ids, routing options, agent and run).
    pub fn key(tenant: &str, req: &pb::CompleteRequest) -> Key {
        let mut norm = req.clone();
        norm.request_id.clear();
        norm.agent.clear();
        norm.run_id.clear();
        norm.routing = None;
        if norm.n == 0 {
            norm.n = 1;
        }
        let mut h = Sha256::new();
        h.update(tenant.as_bytes());
        h.update([0]);
        h.update(norm.encode_to_vec());
        h.finalize().into()
    }

    pub fn get(&self, key: &Key, now: Instant) -> Option<pb::CompleteResponse> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.map.get(key) {
            Some(e) if e.expires > now => Some(e.response.clone()),
            Some(_) => {
                if let Some(e) = inner.map.remove(key) {
                    inner.bytes -= e.bytes;
                }
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: Key, response: pb::CompleteResponse, ttl: Duration, now: Instant) {
        let bytes = response.encoded_len() + 64;
        if bytes > self.max_bytes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.map.remove(&key) {
            inner.bytes -= old.bytes;
            inner.order.retain(|k| *k != key);
        }
        while inner.map.len() >= self.max_entries || inner.bytes + bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.map.remove(&oldest) {
                inner.bytes -= e.bytes;
            }
        }
        inner.order.push_back(key);
        inner.bytes += bytes;
        inner.map.insert(
            key,
            Entry {
                response,
                expires: now + ttl,
                bytes,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> pb::CompleteRequest {
        pb::CompleteRequest {
            model: "m".into(),
            messages: vec![pb::ChatMessage {
                role: pb::Role::User as i32,
                content: Some(text.into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn resp(id: &str) -> pb::CompleteResponse {
        pb::CompleteResponse {
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn keys_ignore_ids_but_not_tenant_or_content() {
        let a = req("hi");
        let mut b = req("hi");
        b.request_id = "r".into();
        b.routing = Some(pb::RoutingOptions {
            cache: pb::CacheMode::Use as i32,
            ..Default::default()
        });
        assert_eq!(ResponseCache::key("t", &a), ResponseCache::key("t", &b));
        assert_ne!(ResponseCache::key("t", &a), ResponseCache::key("u", &a));
        assert_ne!(
            ResponseCache::key("t", &a),
            ResponseCache::key("t", &req("ho"))
        );
    }

    #[test]
    fn expires_and_evicts_the_oldest() {
        let c = ResponseCache::new(2, 1 << 20);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        c.put([1; 32], resp("1"), ttl, t0);
        c.put([2; 32], resp("2"), ttl, t0);
        assert_eq!(c.get(&[1; 32], t0).unwrap().id, "1");
        c.put([3; 32], resp("3"), ttl, t0);
        assert_eq!(c.len(), 2);
        assert!(c.get(&[1; 32], t0).is_none());
        assert_eq!(c.get(&[3; 32], t0).unwrap().id, "3");
        assert!(c.get(&[3; 32], t0 + ttl).is_none());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_byte_bound_holds() {
        let c = ResponseCache::new(100, 300);
        let t0 = Instant::now();
        for i in 0..10u8 {
            c.put([i; 32], resp(&"x".repeat(50)), Duration::from_secs(10), t0);
        }
        // Each entry is 50 + framing + 64 bytes of overhead: two fit in 300.
        assert_eq!(c.len(), 2);
        assert!(c.get(&[9; 32], t0).is_some());
    }
}
