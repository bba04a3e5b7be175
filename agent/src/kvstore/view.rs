//! What `kvcheck dump kvstore` shows about one node (pure: built from a snapshot).

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Serialize;

use super::health::ClusterHealth;
use super::reader::KvstoreSnapshot;
use super::values::{parse_time, IdentityEntry, IpEntry, Malformed, NodeEntry};

#[derive(Clone, Debug, Serialize)]
pub struct Totals {
    pub nodes: usize,
    pub ips: usize,
    pub identities: usize,
    pub identity_references: usize,
    pub malformed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvstoremesh_cache_keys: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub status: String,
    pub health: ClusterHealth,
    pub revision: i64,
    pub cluster: String,
    pub node_name: Option<String>,
    /// This node's `nodes/v1` entry, if it has one.
    pub node: Option<NodeEntry>,
    /// Seconds left on the lease holding this node's key.
    pub node_lease_ttl_seconds: Option<i64>,
    /// `ip/v1` entries whose HostIP is one of this node's IPs.
    pub ips: Vec<IpEntry>,
    /// Identities those entries use (`None` labels: no `id/<id>` key).
    pub identities: Vec<IdentityUse>,
    pub heartbeat: Option<String>,
    pub heartbeat_age_seconds: Option<i64>,
    pub synced: Vec<String>,
    pub totals: Totals,
    pub malformed: Vec<Malformed>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdentityUse {
    pub id: u32,
    pub labels: Option<String>,
}

/// Seconds since an RFC 3339 time, if it parses.
pub fn age_seconds(rfc3339: &str, now: chrono::DateTime<chrono::Utc>) -> Option<i64> {
    Some((now - parse_time(rfc3339)?).num_seconds())
}

pub fn node_view(
    snap: &KvstoreSnapshot,
    health: ClusterHealth,
    cluster: &str,
    node_name: Option<&str>,
    node_lease_ttl_seconds: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> NodeView {
    let node = node_name.and_then(|n| snap.nodes.iter().find(|e| e.cluster == cluster && e.name == n)).cloned();
    let node_ips: BTreeSet<IpAddr> = node
        .iter()
        .flat_map(|n| n.addresses.iter().map(|a| a.ip))
        .collect();
    let ips: Vec<IpEntry> = snap
        .ips
        .iter()
        .filter(|e| e.host_ip.is_some_and(|h| node_ips.contains(&h)))
        .cloned()
        .collect();
    let ids: BTreeSet<u32> = ips.iter().map(|e| e.identity).collect();
    let identities = ids
        .into_iter()
        .map(|id| IdentityUse { id, labels: snap.identities.get(&id).map(|i: &IdentityEntry| i.labels.clone()) })
        .collect();
    let heartbeat = snap.heartbeat.as_ref().map(|(_, v)| v.clone());
    NodeView {
        status: health.status_line(),
        health,
        revision: snap.revision,
        cluster: cluster.to_owned(),
        node_name: node_name.map(str::to_owned),
        heartbeat_age_seconds: heartbeat.as_deref().and_then(|h| age_seconds(h, now)),
        heartbeat,
        node,
        node_lease_ttl_seconds,
        ips,
        identities,
        synced: snap.synced.iter().map(|(m, v)| format!("{} {}", m.key, v)).collect(),
        totals: Totals {
            nodes: snap.counts.nodes,
            ips: snap.counts.ips,
            identities: snap.counts.identities,
            identity_references: snap.counts.identity_references,
            malformed: snap.malformed.len(),
            kvstoremesh_cache_keys: snap.cache_keys,
        },
        malformed: snap.malformed.clone(),
    }
}
