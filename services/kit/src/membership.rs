//! Replica membership in etcd, so that limits hold across the replicas of a service
//! (the gateway's tenant and key limits, the router's provider limits).
//!
//! Each replica registers `<prefix>/<group>/<uuid>` in etcd under a lease with a short
//! TTL, renews the lease, and counts the keys under `<prefix>/<group>/` every
//! `ttl / 3`. The limiter of the service admits `ceil(limit / N)` per replica, so the
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

/// Where and how replicas register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    pub endpoints: Vec<String>,
    /// Key prefix shared by the replicas of one mesh, e.g. `/crewmesh`.
    pub prefix: String,
    /// Lease TTL: how long a crashed replica still counts.
    pub ttl: Duration,
}

/// The `membership` section of a service's config file (`[gateway.membership]`,
/// `[router.membership]`).
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
#[error("replica membership in etcd: {0}")]
pub struct MembershipError(#[from] etcd_client::Error);

/// This replica's registration; [`leave`](Self::leave) on shutdown.
pub struct Membership {
    client: Client,
    lease: Arc<std::sync::atomic::AtomicI64>,
    task: JoinHandle<()>,
    replicas: Arc<AtomicU64>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("replicas", &self.replicas())
            .finish_non_exhaustive()
    }
}

fn group_prefix(prefix: &str, group: &str) -> String {
    format!("{}/{group}/", prefix.trim_end_matches('/'))
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
    /// Registers this replica in `group` (e.g. `gateways`, `routers`) and keeps
    /// `replicas` current until [`leave`](Self::leave).
    pub async fn join(
        config: &MembershipConfig,
        group: &'static str,
        replicas: Arc<AtomicU64>,
    ) -> Result<Self, MembershipError> {
        let mut client = Client::connect(&config.endpoints, None).await?;
        let ttl = config.ttl.as_secs().max(3);
        let prefix = group_prefix(&config.prefix, group);
        let key = format!("{prefix}{}", uuid::Uuid::now_v7());
        let lease = Arc::new(std::sync::atomic::AtomicI64::new(
            register(&mut client, &key, ttl).await?,
        ));
        replicas.store(count(&mut client, &prefix).await?, Ordering::Relaxed);
        let period = Duration::from_secs(ttl) / 3;
        let task = {
            let mut client = client.clone();
            let lease = lease.clone();
            let replicas = replicas.clone();
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
                                        %group, "membership lease renewed after it expired"
                                    );
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, %group, "cannot register this replica")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, %group, "cannot renew the membership lease")
                        }
                    }
                    match count(&mut client, &prefix).await {
                        Ok(n) => {
                            if replicas.swap(n, Ordering::Relaxed) != n {
                                tracing::info!(replicas = n, %group, "replica count changed");
                            }
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            "cannot count replicas; keeping the last count"
                        ),
                    }
                }
            })
        };
        Ok(Self {
            client,
            lease,
            task,
            replicas,
        })
    }

    /// The replica count as last seen (at least 1).
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Deregisters this replica (revokes its lease).
    pub async fn leave(mut self) {
        self.task.abort();
        let lease = self.lease.load(Ordering::Relaxed);
        if let Err(e) = self.client.lease_revoke(lease).await {
            tracing::warn!(error = %e, "cannot revoke the membership lease; it expires on its own");
        }
    }
}
