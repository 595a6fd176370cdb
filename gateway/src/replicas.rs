//! Gateway replica membership, so that tenant and key limits hold across replicas.
//!
//! Each gateway registers `<prefix>/gateways/<uuid>` in etcd under a lease with a short
//! TTL, renews the lease, and counts the keys under `<prefix>/gateways/` every
//! `ttl / 3`. [`crate::limits::Limiter`] admits `ceil(limit / N)` per replica, so the
//! sum over the replicas stays at the configured limit. A replica that stops cleanly
//! revokes its lease; one that crashes disappears when its lease expires, and until
//! then the others enforce the smaller share (the error is on the safe side). If the
//! lease is lost (etcd unreachable for longer than the TTL) the replica registers
//! again. When etcd cannot be reached the last count is kept. Without membership
//! configured (one process, `crewmesh up`) the count is 1.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use tokio::task::JoinHandle;

/// Where and how gateway replicas register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    pub endpoints: Vec<String>,
    /// Key prefix shared by the replicas of one mesh, e.g. `/crewmesh`.
    pub prefix: String,
    /// Lease TTL: how long a crashed replica still counts.
    pub ttl: Duration,
}

/// The `[gateway.membership]` section of a config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSection {
    pub etcd_endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
}

fn default_prefix() -> String {
    "/crewmesh".to_owned()
}

fn default_ttl_secs() -> u64 {
    10
}

impl From<MembershipSection> for MembershipConfig {
    fn from(s: MembershipSection) -> Self {
        Self {
            endpoints: s.etcd_endpoints,
            prefix: s.prefix,
            ttl: Duration::from_secs(s.ttl_secs.max(3)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("gateway replica membership in etcd: {0}")]
pub struct MembershipError(#[from] etcd_client::Error);

/// This replica's registration; [`leave`](Self::leave) on shutdown.
pub struct Membership {
    client: Client,
    lease: Arc<std::sync::atomic::AtomicI64>,
    task: JoinHandle<()>,
}

fn gateways_prefix(prefix: &str) -> String {
    format!("{}/gateways/", prefix.trim_end_matches('/'))
}

async fn count(client: &mut Client, prefix: &str) -> Result<u64, etcd_client::Error> {
    let resp = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(u64::try_from(resp.count()).unwrap_or(1).max(1))
}

async fn register(client: &mut Client, key: &str, ttl: u64) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(ttl as i64, None).await?.id();
    client
        .put(key, "", Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

impl Membership {
    /// Registers this replica and keeps `replicas` current until [`leave`](Self::leave).
    pub async fn join(
        config: &MembershipConfig,
        replicas: Arc<AtomicU64>,
    ) -> Result<Self, MembershipError> {
        let mut client = Client::connect(&config.endpoints, None).await?;
        let ttl = config.ttl.as_secs().max(3);
        let prefix = gateways_prefix(&config.prefix);
        let key = format!("{prefix}{}", uuid::Uuid::now_v7());
        let lease = Arc::new(std::sync::atomic::AtomicI64::new(
            register(&mut client, &key, ttl).await?,
        ));
        replicas.store(count(&mut client, &prefix).await?, Ordering::Relaxed);
        let period = Duration::from_secs(ttl) / 3;
        let task = {
            let mut client = client.clone();
            let lease = lease.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let id = lease.load(Ordering::Relaxed);
                    let renewed = async {
                        let (mut k, mut s) = client.lease_keep_alive(id).await?;
                        k.keep_alive().await?;
                        Ok::<_, etcd_client::Error>(s.message().await?.is_some_and(|r| r.ttl() > 0))
                    }
                    .await;
                    match renewed {
                        Ok(true) => {}
                        Ok(false) => {
                            // The lease expired: register again.
                            match register(&mut client, &key, ttl).await {
                                Ok(id) => {
                                    lease.store(id, Ordering::Relaxed);
                                    tracing::info!(
                                        "gateway membership lease renewed after it expired"
                                    );
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot register the gateway replica")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot renew the gateway's membership lease")
                        }
                    }
                    match count(&mut client, &prefix).await {
                        Ok(n) => {
                            if replicas.swap(n, Ordering::Relaxed) != n {
                                tracing::info!(replicas = n, "gateway replica count changed");
                            }
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            "cannot count gateway replicas; keeping the last count"
                        ),
                    }
                }
            })
        };
        Ok(Self {
            client,
            lease,
            task,
        })
    }

    /// Deregisters this replica (revokes its lease).
    pub async fn leave(mut self) {
        self.task.abort();
        let lease = self.lease.load(Ordering::Relaxed);
        if let Err(e) = self.client.lease_revoke(lease).await {
            tracing::warn!(error = %e, "cannot revoke the gateway's membership lease; it expires on its own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replicas_count_each_other_share_limits_and_leave() {
        crewmesh_testkit::init_crypto();
        let etcd = crewmesh_testkit::etcd();
        let config = MembershipConfig {
            endpoints: vec![etcd.endpoint()],
            prefix: etcd.unique_prefix(),
            ttl: Duration::from_secs(3),
        };
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let ma = Membership::join(&config, a.clone()).await.unwrap();
        assert_eq!(a.load(Ordering::Relaxed), 1);
        let mb = Membership::join(&config, b.clone()).await.unwrap();
        assert_eq!(b.load(Ordering::Relaxed), 2);
        // `a` sees `b` at its next count.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while a.load(Ordering::Relaxed) != 2 {
            assert!(std::time::Instant::now() < deadline, "a never saw b");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Two replicas, each with its own limiter: together they admit the limit once.
        let policy = crate::limits::TenantPolicy {
            rpm: Some(10),
            ..Default::default()
        };
        let subject = crate::limits::Subject {
            tenant: "acme",
            key: "k1",
            tenant_policy: Some(&policy),
            key_rpm: None,
            key_tpm: None,
        };
        let now = std::time::Instant::now();
        let admitted: usize = [
            crate::limits::Limiter::new(a.clone()),
            crate::limits::Limiter::new(b.clone()),
        ]
        .iter()
        .map(|l| (0..20).filter(|_| l.admit(&subject, now).is_ok()).count())
        .sum();
        assert_eq!(admitted, 10);
        mb.leave().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while a.load(Ordering::Relaxed) != 1 {
            assert!(std::time::Instant::now() < deadline, "a never saw b leave");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ma.leave().await;
    }
}
