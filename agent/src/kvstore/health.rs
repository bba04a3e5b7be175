//! etcd cluster health as Cilium reports it: per-endpoint status, `n/m connected`, leader,
//! heartbeat age, and the TTL left on this node's lease.

use std::time::Duration;

use serde::Serialize;

use super::client::{Etcd, KvstoreError};
use super::config::EtcdSettings;

#[derive(Clone, Debug, Serialize)]
pub struct EndpointStatus {
    pub endpoint: String,
    pub reachable: bool,
    pub version: Option<String>,
    pub member_id: Option<String>,
    pub is_leader: bool,
    /// The endpoint is not one of the cluster's members (an `etcd grpc-proxy` or another
    /// proxy in front of them): its Status is its upstream member's, so it is never the leader.
    pub proxy: bool,
    pub revision: Option<i64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterHealth {
    pub endpoints: Vec<EndpointStatus>,
    pub connected: usize,
    pub total: usize,
    /// The endpoint of the leader, as reported by a reachable member.
    pub leader: Option<String>,
    /// The leader's member id (hex), also when it is only reached through a proxy.
    pub leader_id: Option<String>,
    pub members: Vec<String>,
}

impl ClusterHealth {
    /// Endpoints that answered, leader first (reads then go to the member that is surely current).
    pub fn reachable_endpoints(&self) -> Vec<String> {
        let mut eps: Vec<&EndpointStatus> = self.endpoints.iter().filter(|e| e.reachable).collect();
        eps.sort_by_key(|e| !e.is_leader);
        eps.into_iter().map(|e| e.endpoint.clone()).collect()
    }

    /// `etcd: 3/3 connected, leader https://127.0.0.1:2379, revision 42`; through a proxy
    /// `etcd: 1/1 connected, through gRPC proxy http://127.0.0.1:23790 (upstream member
    /// 8e9e05c52164694d; leader member 8e9e05c52164694d), revision 42`.
    pub fn status_line(&self) -> String {
        let revision = self.endpoints.iter().filter_map(|e| e.revision).max();
        let mut s = format!("etcd: {}/{} connected", self.connected, self.total);
        let proxies: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| e.reachable && e.proxy)
            .map(|e| format!("{} (upstream member {})", e.endpoint, e.member_id.as_deref().unwrap_or("?")))
            .collect();
        if !proxies.is_empty() {
            s.push_str(&format!(", through gRPC proxy {}", proxies.join(", ")));
        }
        match (&self.leader, &self.leader_id) {
            (Some(l), _) => s.push_str(&format!(", leader {l}")),
            (None, Some(id)) if !proxies.is_empty() => s.push_str(&format!(", leader member {id} behind the proxy")),
            _ => s.push_str(", no leader"),
        }
        if let Some(r) = revision {
            s.push_str(&format!(", revision {r}"));
        }
        s
    }
}

/// Asks every configured endpoint for its own status, concurrently, each bounded by `timeout`.
pub async fn cluster_health(settings: &EtcdSettings, timeout: Duration) -> ClusterHealth {
    let probes = settings.endpoints.iter().map(|ep| probe(settings, ep.clone(), timeout));
    let results = futures::future::join_all(probes).await;
    let mut endpoints = Vec::new();
    let mut leader_id = None;
    let mut members = Vec::new();
    for (status, leader, member_urls) in results {
        if leader.is_some() {
            leader_id = leader;
        }
        if members.is_empty() {
            members = member_urls;
        }
        endpoints.push(status);
    }
    let leader_hex = leader_id.map(|id| format!("{id:x}"));
    for e in &mut endpoints {
        e.is_leader = !e.proxy && e.member_id.is_some() && e.member_id == leader_hex;
    }
    let leader = endpoints.iter().find(|e| e.is_leader).map(|e| e.endpoint.clone());
    ClusterHealth {
        connected: endpoints.iter().filter(|e| e.reachable).count(),
        total: endpoints.len(),
        endpoints,
        leader,
        leader_id: leader_hex,
        members: members.into_iter().map(|(name, urls)| format!("{name} {urls}")).collect(),
    }
}

async fn probe(settings: &EtcdSettings, endpoint: String, timeout: Duration) -> (EndpointStatus, Option<u64>, Vec<(String, String)>) {
    let mut status = EndpointStatus {
        endpoint: endpoint.clone(),
        reachable: false,
        version: None,
        member_id: None,
        is_leader: false,
        proxy: false,
        revision: None,
        error: None,
    };
    let result: Result<_, KvstoreError> = async {
        let etcd = match cached_probe_client(settings, &endpoint) {
            Some(c) => c,
            None => Etcd::connect_to(settings, vec![endpoint.clone()], timeout).await?,
        };
        let mut maint = etcd.client.maintenance_client();
        let answer = etcd.call("status", maint.status()).await;
        let st = match answer {
            Ok(st) => st,
            Err(e) => {
                forget_probe_client(&endpoint);
                return Err(e);
            }
        };
        let mut cluster = etcd.client.cluster_client();
        let members = etcd.call("member list", cluster.member_list()).await.ok();
        keep_probe_client(settings, &endpoint, etcd);
        Ok((st, members))
    }
    .await;
    match result {
        Ok((st, members)) => {
            status.reachable = true;
            status.version = Some(st.version().to_owned());
            status.member_id = st.header().map(|h| format!("{:x}", h.member_id()));
            status.revision = st.header().map(|h| h.revision());
            let listed: Vec<(u64, String, String)> = members
                .map(|m| m.members().iter().map(|m| (m.id(), m.name().to_owned(), m.client_urls().join(","))).collect())
                .unwrap_or_default();
            // A member lists itself under this URL with the id its Status answers with. A gRPC
            // proxy forwards the upstream's member list (its URL is not in it) or, with an
            // advertise URL, lists itself under another id than the upstream member it asks.
            let answering = st.header().map(|h| h.member_id());
            let own = listed.iter().find(|(_, _, urls)| urls.split(',').any(|u| same_url(u, &endpoint)));
            status.proxy = !listed.is_empty() && own.is_none_or(|(id, _, _)| Some(*id) != answering);
            let member_urls: Vec<(String, String)> = listed.into_iter().map(|(_, name, urls)| (name, urls)).collect();
            (status, Some(st.leader()).filter(|l| *l != 0), member_urls)
        }
        Err(e) => {
            status.error = Some(e.to_string());
            (status, None, Vec::new())
        }
    }
}

/// One client per probed endpoint, kept while it answers: the agent probes every health
/// interval, and a new client per probe means a new TLS handshake and, with a user, an
/// Authenticate (a raft proposal and a bcrypt in etcd) each time.
type ProbeClients = std::sync::Mutex<std::collections::HashMap<String, (EtcdSettings, Etcd)>>;

fn probe_clients() -> &'static ProbeClients {
    static CLIENTS: std::sync::OnceLock<ProbeClients> = std::sync::OnceLock::new();
    CLIENTS.get_or_init(Default::default)
}

fn cached_probe_client(settings: &EtcdSettings, endpoint: &str) -> Option<Etcd> {
    let clients = probe_clients().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    clients.get(endpoint).filter(|(s, _)| s == settings).map(|(_, e)| e.clone())
}

fn keep_probe_client(settings: &EtcdSettings, endpoint: &str, etcd: Etcd) {
    probe_clients().lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(endpoint.to_owned(), (settings.clone(), etcd));
}

fn forget_probe_client(endpoint: &str) {
    probe_clients().lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(endpoint);
}

/// `http://127.0.0.1:2379/` and `127.0.0.1:2379` name the same endpoint.
fn same_url(a: &str, b: &str) -> bool {
    let norm = |u: &str| u.trim().trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').to_owned();
    norm(a) == norm(b)
}

/// Probes every endpoint, then connects to those that answered (leader first): tonic's
/// balanced channel would keep picking dead members. Fails when none answers.
pub async fn connect_healthy(settings: &EtcdSettings, timeout: Duration) -> Result<(Etcd, ClusterHealth), KvstoreError> {
    settings.validate()?;
    let health = cluster_health(settings, timeout).await;
    if health.connected == 0 {
        let reasons: Vec<String> = health
            .endpoints
            .iter()
            .map(|e| format!("{}: {}", e.endpoint, e.error.as_deref().unwrap_or("unreachable")))
            .collect();
        return Err(KvstoreError::NoneAnswered { status: health.status_line(), reasons: reasons.join("; ") });
    }
    let etcd = Etcd::connect_to(settings, health.reachable_endpoints(), timeout).await?;
    Ok((etcd, health))
}

/// Seconds left on a lease (`None` when it has expired or cannot be read).
pub async fn lease_ttl(etcd: &Etcd, lease: i64) -> Option<i64> {
    if lease == 0 {
        return None;
    }
    let mut leases = etcd.client.lease_client();
    let resp = etcd.call("lease time-to-live", leases.time_to_live(lease, None)).await.ok()?;
    (resp.ttl() >= 0).then_some(resp.ttl())
}
