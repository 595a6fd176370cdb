//! Router replica membership, so that provider limits hold across replicas.
//!
//! Each router registers `<prefix>/routers/<uuid>` in etcd under a lease with a short
//! TTL, keeps the lease alive, and counts the keys under `<prefix>/routers/` every
//! `ttl / 3`. The count N is shared with [`crate::limits::Limits`], which then admits
//! `ceil(limit / N)` per replica: the sum over the replicas stays at the configured
//! limit. A replica that stops cleanly revokes its lease (the others see it gone at
//! their next count); one that crashes disappears when its lease expires, and until
//! then the others enforce the smaller share (the error is on the safe side). When
//! etcd cannot be reached the last count is kept.

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

#[derive(Debug, thiserror::Error)]
#[error("replica membership in etcd: {0}")]
pub struct MembershipError(#[from] etcd_client::Error);

/// This replica's registration; [`leave`](Self::leave) on shutdown.
pub struct Membership {
    client: Client,
    lease: i64,
    task: JoinHandle<()>,
    replicas: Arc<AtomicU64>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("lease", &self.lease)
            .finish()
    }
}

fn routers_prefix(prefix: &str) -> String {
    format!("{}/routers/", prefix.trim_end_matches('/'))
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

impl Membership {
    /// Registers this replica and keeps `replicas` current until [`leave`](Self::leave).
    pub async fn join(
        config: &MembershipConfig,
        replicas: Arc<AtomicU64>,
    ) -> Result<Self, MembershipError> {
        let mut client = Client::connect(&config.endpoints, None).await?;
        let ttl = config.ttl.as_secs().max(3);
        let lease = client.lease_grant(ttl as i64, None).await?.id();
        let prefix = routers_prefix(&config.prefix);
        let key = format!("{prefix}{}", uuid::Uuid::now_v7());
        client
            .put(key, "", Some(PutOptions::new().with_lease(lease)))
            .await?;
        replicas.store(count(&mut client, &prefix).await?, Ordering::Relaxed);
        let period = Duration::from_secs(ttl) / 3;
        let task = {
            let mut client = client.clone();
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let mut keeper = None;
                loop {
                    tokio::time::sleep(period).await;
                    if keeper.is_none() {
                        keeper = client.lease_keep_alive(lease).await.ok();
                    }
                    if let Some((k, s)) = keeper.as_mut() {
                        let alive = async {
                            k.keep_alive().await?;
                            s.message().await
                        }
                        .await;
                        if let Err(e) = alive {
                            tracing::warn!(error = %e, "cannot renew the router's membership lease");
                            keeper = None;
                        }
                    }
                    match count(&mut client, &prefix).await {
                        Ok(n) => {
                            if replicas.swap(n, Ordering::Relaxed) != n {
                                tracing::info!(replicas = n, "router replica count changed");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot count router replicas; keeping the last count")
                        }
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

    /// The replica count as last seen.
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Deregisters this replica (revokes its lease).
    pub async fn leave(mut self) {
        self.task.abort();
        if let Err(e) = self.client.lease_revoke(self.lease).await {
            tracing::warn!(error = %e, "cannot revoke the router's membership lease; it expires on its own");
        }
    }
}
