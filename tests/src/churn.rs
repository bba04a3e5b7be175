//! A simulated node that churns the way a real Cilium cluster does, both sides kept in step by
//! "Cilium" with its normal lag: the writer side of docs/cilium-expected-state.md (its rules
//! and its "Intentional delays" section), independent of kvcheck's derivation.
//!
//! On the consistent node of [`crate::simcluster`] (node-a, layout v1.15, tunnel mode):
//! - remote pods on node-b: `ip/v1` key first, the ipcache entry 50-800 ms later; removed in
//!   the same order;
//! - local pods: endpoint-map and ipcache entries first, the `ip/v1` key and this node's
//!   identity reference 50-800 ms later; removed endpoint first, then the key and reference,
//!   then the ipcache entry (when the delete comes back from etcd);
//! - remote nodes joining (key, then their ipcache and tunnel entries after the lag) and leaving
//!   (key deleted; entries removed after Cilium's 30 s node-delete hold-off, or kept when the
//!   node comes back within it);
//! - identities allocated before their first pod and released (by "the operator") a while after
//!   their last one.
//!
//! Every address and identity is used once, so a lagging change is never confused with a new one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::encode::{self, EndpointValue, IpcacheValue};
use crate::simcluster::{ip_json, NODE_A, NODE_A_IP, NODE_B_IP};
use crate::simnode::SimulatedNode;

/// Cilium's node-delete hold-off (`NodeDeleteDelay`).
pub const NODE_DELETE_HOLD_OFF: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ChurnConfig {
    pub duration: Duration,
    /// New remote pods per second (each: 2 kvstore + 2 map changes over its life).
    pub remote_pods_per_s: f64,
    /// New local pods per second (each: ~4 kvstore + 4 map changes).
    pub local_pods_per_s: f64,
    /// A remote node joins or leaves this often.
    pub node_event_every: Duration,
    /// Lag between Cilium's two sides of one change.
    pub lag: (Duration, Duration),
    /// How long pods live.
    pub lifetime: (Duration, Duration),
    pub seed: u64,
}

impl Default for ChurnConfig {
    fn default() -> Self {
        ChurnConfig {
            duration: Duration::from_secs(60),
            remote_pods_per_s: 25.0,
            local_pods_per_s: 5.0,
            node_event_every: Duration::from_secs(3),
            lag: (Duration::from_millis(50), Duration::from_millis(800)),
            lifetime: (Duration::from_secs(1), Duration::from_secs(8)),
            seed: 11,
        }
    }
}

/// What the churn did.
#[derive(Clone, Debug, Default)]
pub struct ChurnStats {
    pub map_changes: u64,
    pub kvstore_changes: u64,
    pub remote_pods: u64,
    pub local_pods: u64,
    pub nodes_joined: u64,
    pub nodes_left: u64,
    /// Leaves undone within the hold-off (Cilium drops the delete).
    pub nodes_back: u64,
    pub identities_allocated: u64,
    pub identities_released: u64,
    pub elapsed: Duration,
    /// How late the latest step ran against its schedule (the simulated agent's own stalls
    /// add to its configured lag).
    pub max_late: Duration,
}

impl ChurnStats {
    pub fn map_rate(&self) -> f64 {
        self.map_changes as f64 / self.elapsed.as_secs_f64()
    }

    pub fn kvstore_rate(&self) -> f64 {
        self.kvstore_changes as f64 / self.elapsed.as_secs_f64()
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 { 0 } else { self.next() % span })
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
}

/// One step Cilium (or the operator) takes.
#[derive(Clone, Debug)]
enum Step {
    NewRemotePod,
    NewLocalPod,
    NodeEvent,
    Heartbeat,
    EtcdPut(String, String),
    EtcdDel(String),
    IpcachePut(IpNet, IpcacheValue),
    IpcacheDel(IpNet),
    EndpointPut(IpAddr, EndpointValue),
    EndpointDel(IpAddr),
    TunnelPut(IpAddr, IpAddr),
    TunnelDel(IpAddr),
    /// A local endpoint starts using identity: this node's reference key (first local user).
    RefUse(u32),
    /// A local endpoint stopped using it: the reference goes with the last one.
    RefUnuse(u32),
    /// A pod of this identity went away (both sides): release it when it has no users left.
    Unuse(u32),
    /// The hold-off of node `n` ended: remove its entries unless it came back.
    NodeHoldOffEnd(u32, u64),
}

struct ChurnNode {
    present: bool,
    /// Bumped on each leave: a hold-off end for an older leave does nothing.
    generation: u64,
}

struct Identity {
    labels: String,
    users: u32,
    /// This node's reference key is written (local users).
    local_users: u32,
}

pub struct Churn<'n> {
    node: &'n SimulatedNode,
    cfg: ChurnConfig,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    steps: BTreeMap<u64, Step>,
    seq: u64,
    next_addr: u32,
    next_local: u32,
    next_identity: u32,
    next_endpoint: u16,
    identities: BTreeMap<u32, Identity>,
    nodes: BTreeMap<u32, ChurnNode>,
    client: etcd_client::Client,
    rt: tokio::runtime::Runtime,
    pub stats: ChurnStats,
}

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

impl<'n> Churn<'n> {
    pub fn new(node: &'n SimulatedNode, cfg: ChurnConfig) -> anyhow::Result<Churn<'n>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = rt.block_on(etcd_client::Client::connect(node.etcd.endpoints(), None))?;
        let rng = Rng(cfg.seed.max(1));
        Ok(Churn {
            node,
            cfg,
            rng,
            queue: BinaryHeap::new(),
            steps: BTreeMap::new(),
            seq: 0,
            // Remote pods in 10.200.0.0/16; local pods in node-a's 10.1.0.0/24.
            next_addr: u32::from(Ipv4Addr::new(10, 200, 0, 1)),
            next_local: 29,
            next_identity: 30_000,
            next_endpoint: 1_000,
            identities: BTreeMap::new(),
            nodes: BTreeMap::new(),
            client,
            rt,
            stats: ChurnStats::default(),
        })
    }

    fn at(&mut self, when: Instant, step: Step) {
        self.seq += 1;
        self.queue.push(Reverse((when, self.seq)));
        self.steps.insert(self.seq, step);
    }

    fn lag(&mut self) -> Duration {
        self.rng.between(self.cfg.lag)
    }

    /// Runs the churn until `cfg.duration` has passed and every lagging step is done (pending
    /// node hold-offs end early: the leftover entries are removed, as Cilium would 30 s later).
    pub fn run(mut self) -> anyhow::Result<ChurnStats> {
        let start = Instant::now();
        let end = start + self.cfg.duration;
        self.at(start, Step::Heartbeat);
        self.at(start, Step::NewRemotePod);
        self.at(start, Step::NewLocalPod);
        self.at(start + Duration::from_millis(500), Step::NodeEvent);
        while let Some(Reverse((when, seq))) = self.queue.pop() {
            let Some(step) = self.steps.remove(&seq) else { continue };
            let generator = matches!(step, Step::NewRemotePod | Step::NewLocalPod | Step::NodeEvent | Step::Heartbeat);
            if generator && when >= end {
                continue;
            }
            let now = Instant::now();
            if when > now {
                std::thread::sleep(when - now);
            }
            self.stats.max_late = self.stats.max_late.max(now.saturating_duration_since(when));
            self.apply(step, end)?;
        }
        self.stats.elapsed = start.elapsed();
        Ok(self.stats)
    }

    fn etcd_put(&mut self, k: &str, v: &str) -> anyhow::Result<()> {
        self.rt.block_on(self.client.put(k, v, None))?;
        self.stats.kvstore_changes += 1;
        Ok(())
    }

    fn etcd_del(&mut self, k: &str) -> anyhow::Result<()> {
        self.rt.block_on(self.client.delete(k, None))?;
        self.stats.kvstore_changes += 1;
        Ok(())
    }

    /// A remote pod's address, never used before.
    fn alloc_addr(&mut self) -> IpAddr {
        self.next_addr += 1;
        v4(self.next_addr)
    }

    /// A local pod's address in node-a's pod CIDR (10.1.0.0/24): round robin over .30-.249,
    /// so an address comes back only ~40 s after it was last handed out.
    fn local_addr(&mut self) -> IpAddr {
        self.next_local = if self.next_local >= 249 { 30 } else { self.next_local + 1 };
        IpAddr::V4(Ipv4Addr::new(10, 1, 0, self.next_local as u8))
    }

    /// An identity for a new pod: a fresh one now and then, else a live one.
    fn identity_for_pod(&mut self) -> anyhow::Result<u32> {
        let live: Vec<u32> = self.identities.keys().copied().collect();
        if live.len() < 3 || self.rng.chance(0.3) {
            self.next_identity += 1;
            let id = self.next_identity;
            let labels = format!("k8s:app=churn-{id};k8s:io.cilium.k8s.policy.cluster=default;k8s:io.kubernetes.pod.namespace=churn;");
            // The allocator writes the master key before any pod may use the identity.
            self.etcd_put(&format!("cilium/state/identities/v1/id/{id}"), &labels)?;
            self.identities.insert(id, Identity { labels, users: 0, local_users: 0 });
            self.stats.identities_allocated += 1;
            return Ok(id);
        }
        Ok(live[(self.rng.next() % live.len() as u64) as usize])
    }

    fn apply(&mut self, step: Step, end: Instant) -> anyhow::Result<()> {
        let now = Instant::now();
        let layout = self.node.layout;
        match step {
            Step::Heartbeat => {
                // The operator's heartbeat, every minute.
                let t = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                self.etcd_put("cilium/.heartbeat", &t)?;
                self.at(now + Duration::from_secs(60), Step::Heartbeat);
            }
            Step::NewRemotePod => {
                let (ip, id) = (self.alloc_addr(), self.identity_for_pod()?);
                if let Some(i) = self.identities.get_mut(&id) {
                    i.users += 1;
                }
                let key = format!("cilium/state/ip/v1/default/{ip}");
                // node-b's agent writes the key; node-a's ipcache follows from the watch.
                self.etcd_put(&key, &ip_json(&ip.to_string(), NODE_B_IP, id, "node-b", 4000))?;
                let lag = self.lag();
                let value = IpcacheValue { identity: id, tunnel_endpoint: Some(NODE_B_IP.parse()?), ..Default::default() };
                self.at(now + lag, Step::IpcachePut(IpNet::from(ip), value));
                let life = self.rng.between(self.cfg.lifetime);
                self.at(now + life, Step::EtcdDel(key));
                let lag2 = self.lag();
                self.at(now + life + lag2, Step::IpcacheDel(IpNet::from(ip)));
                self.at(now + life + lag2, Step::Unuse(id));
                self.stats.remote_pods += 1;
                let every = Duration::from_secs_f64(1.0 / self.cfg.remote_pods_per_s);
                self.at(now + every, Step::NewRemotePod);
            }
            Step::NewLocalPod => {
                let (ip, id) = (self.local_addr(), self.identity_for_pod()?);
                self.next_endpoint += 1;
                let ep = self.next_endpoint;
                if let Some(i) = self.identities.get_mut(&id) {
                    i.users += 1;
                }
                let value = EndpointValue { ifindex: u32::from(ep), endpoint_id: ep, identity: id, mac: [2, 0, 0, 0, 0, 1], node_mac: [2, 0, 0, 0, 1, 1], ..Default::default() };
                self.apply(Step::EndpointPut(ip, value), end)?;
                self.apply(Step::IpcachePut(IpNet::from(ip), IpcacheValue { identity: id, ..Default::default() }), end)?;
                let key = format!("cilium/state/ip/v1/default/{ip}");
                let lag = self.lag();
                self.at(now + lag, Step::EtcdPut(key.clone(), ip_json(&ip.to_string(), NODE_A_IP, id, NODE_A, u32::from(ep))));
                self.at(now + lag, Step::RefUse(id));
                // Removal: endpoint first, then key and reference, then the ipcache entry.
                let life = self.rng.between(self.cfg.lifetime).max(lag + Duration::from_millis(100));
                self.at(now + life, Step::EndpointDel(ip));
                let lag2 = self.lag();
                self.at(now + life + lag2, Step::EtcdDel(key));
                self.at(now + life + lag2, Step::RefUnuse(id));
                let lag3 = self.lag();
                self.at(now + life + lag2 + lag3, Step::IpcacheDel(IpNet::from(ip)));
                self.at(now + life + lag2 + lag3, Step::Unuse(id));
                self.stats.local_pods += 1;
                let every = Duration::from_secs_f64(1.0 / self.cfg.local_pods_per_s);
                self.at(now + every, Step::NewLocalPod);
            }
            Step::EtcdPut(key, value) => self.etcd_put(&key, &value)?,
            Step::EtcdDel(key) => self.etcd_del(&key)?,
            Step::RefUse(id) | Step::RefUnuse(id) => {
                let using = matches!(step, Step::RefUse(_));
                let Some(i) = self.identities.get_mut(&id) else { return Ok(()) };
                i.local_users = if using { i.local_users + 1 } else { i.local_users.saturating_sub(1) };
                let key = format!("cilium/state/identities/v1/value/{}/{NODE_A_IP}", i.labels);
                match (using, i.local_users) {
                    (true, 1) => self.etcd_put(&key, &id.to_string())?,
                    (false, 0) => self.etcd_del(&key)?,
                    _ => {}
                }
            }
            Step::IpcachePut(prefix, v) => {
                self.node.maps.ipcache.update(&encode::ipcache_key(layout, prefix, 0), &encode::ipcache_value(layout, v))?;
                self.stats.map_changes += 1;
            }
            Step::IpcacheDel(prefix) => {
                self.node.maps.ipcache.delete(&encode::ipcache_key(layout, prefix, 0))?;
                self.stats.map_changes += 1;
            }
            Step::EndpointPut(ip, v) => {
                self.node.maps.endpoints.update(&encode::endpoint_key(ip), &encode::endpoint_value(layout, v))?;
                self.stats.map_changes += 1;
            }
            Step::EndpointDel(ip) => {
                self.node.maps.endpoints.delete(&encode::endpoint_key(ip))?;
                self.stats.map_changes += 1;
            }
            Step::TunnelPut(cidr, to) => {
                if let Some(t) = &self.node.maps.tunnel {
                    t.update(&encode::tunnel_key(cidr), &encode::tunnel_value(to, 0))?;
                    self.stats.map_changes += 1;
                }
            }
            Step::TunnelDel(cidr) => {
                if let Some(t) = &self.node.maps.tunnel {
                    t.delete(&encode::tunnel_key(cidr))?;
                    self.stats.map_changes += 1;
                }
            }
            Step::Unuse(id) => {
                let unused = self.identities.get_mut(&id).is_some_and(|i| {
                    i.users = i.users.saturating_sub(1);
                    i.users == 0
                });
                if unused {
                    // The operator's GC deletes an unused identity's master key (minutes later
                    // in a real cluster: it must not be handed out again meanwhile).
                    self.identities.remove(&id);
                    self.etcd_del(&format!("cilium/state/identities/v1/id/{id}"))?;
                    self.stats.identities_released += 1;
                }
            }
            Step::NodeEvent => {
                self.node_event(now, end)?;
                self.at(now + self.cfg.node_event_every, Step::NodeEvent);
            }
            Step::NodeHoldOffEnd(n, generation) => {
                let gone = self.nodes.get(&n).is_some_and(|c| !c.present && c.generation == generation);
                if gone {
                    // Cilium's NodeDeleted: the node's ipcache and tunnel entries go.
                    for ip in churn_node_ipcache(n).into_keys() {
                        self.apply(Step::IpcacheDel(IpNet::from(ip)), end)?;
                    }
                    self.apply(Step::TunnelDel(churn_node_cidr(n)), end)?;
                    self.nodes.remove(&n);
                }
            }
        }
        Ok(())
    }

    /// A node joins, leaves, or comes back within its hold-off.
    fn node_event(&mut self, now: Instant, end: Instant) -> anyhow::Result<()> {
        let leaving: Vec<u32> = self.nodes.iter().filter(|(_, c)| !c.present).map(|(n, _)| *n).collect();
        let present: Vec<u32> = self.nodes.iter().filter(|(_, c)| c.present).map(|(n, _)| *n).collect();
        if let Some(&n) = leaving.first().filter(|_| self.rng.chance(0.3)) {
            // Back within the hold-off: Cilium drops the pending delete; entries stay.
            self.etcd_put(&node_key(n), &churn_node_json(n))?;
            if let Some(c) = self.nodes.get_mut(&n) {
                c.present = true;
            }
            self.stats.nodes_back += 1;
        } else if present.len() >= 2 || (!present.is_empty() && self.rng.chance(0.5)) {
            let n = present[(self.rng.next() % present.len() as u64) as usize];
            self.etcd_del(&node_key(n))?;
            let generation = self.nodes.get_mut(&n).map_or(0, |c| {
                c.present = false;
                c.generation += 1;
                c.generation
            });
            // Applied NodeDeleteDelay after the delete reached the agent (its watch lag), or
            // when the run ends (the leftovers would go 30 s later; the checks stop first).
            let lag = self.lag();
            let at = (now + NODE_DELETE_HOLD_OFF + lag).min(end + Duration::from_secs(3) + lag);
            self.at(at, Step::NodeHoldOffEnd(n, generation));
            self.stats.nodes_left += 1;
        } else {
            let n = self.nodes.keys().max().map_or(1, |m| m + 1).max(self.stats.nodes_joined as u32 + 1);
            self.etcd_put(&node_key(n), &churn_node_json(n))?;
            self.nodes.insert(n, ChurnNode { present: true, generation: 0 });
            let lag = self.lag();
            for (ip, v) in churn_node_ipcache(n) {
                self.at(now + lag, Step::IpcachePut(IpNet::from(ip), v));
            }
            self.at(now + lag, Step::TunnelPut(churn_node_cidr(n), churn_node_ip(n)));
            self.stats.nodes_joined += 1;
        }
        Ok(())
    }
}

fn node_key(n: u32) -> String {
    format!("cilium/state/nodes/v1/default/churn-{n}")
}

fn churn_node_ip(n: u32) -> IpAddr {
    v4(u32::from(Ipv4Addr::new(192, 168, 60, 0)) + n)
}

/// Churn node `n`'s pod CIDR, 10.a.b.0/24 (router .1, health .2), as its first three octets:
/// one /24 each within 10.100.0.0-10.199.255.0, clear of node-a's 10.1.0.0/24, node-b's
/// 10.2.0.0/24 and the remote pods' 10.200.0.1 upwards. (It was 10.(100+n).0.0: from the 156th
/// node joined, ~25 min into an hour's soak, the address was 10.256.0.0 and the CIDRs wrapped
/// onto node-a's own; the soak reported those real drifts.) Numbers repeat after 25,600 joins.
fn churn_node_net(n: u32) -> [u8; 3] {
    let n = n % 25_600;
    [10, (100 + n / 256) as u8, (n % 256) as u8]
}

fn churn_node_addr(n: u32, last: u8) -> IpAddr {
    let [a, b, c] = churn_node_net(n);
    IpAddr::V4(Ipv4Addr::new(a, b, c, last))
}

/// Its pod CIDR's base.
fn churn_node_cidr(n: u32) -> IpAddr {
    churn_node_addr(n, 0)
}

fn churn_node_json(n: u32) -> String {
    let (ip, cidr, router, health) = (churn_node_ip(n), churn_node_cidr(n), churn_node_addr(n, 1), churn_node_addr(n, 2));
    format!(
        r#"{{"Name":"churn-{n}","Cluster":"default","IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}},{{"Type":"CiliumInternalIP","IP":"{router}"}}],"IPv4AllocCIDR":{{"IP":"{cidr}","Mask":"////AA=="}},"IPv6AllocCIDR":null,"IPv4HealthIP":"{health}","IPv6HealthIP":"","ClusterID":0,"Source":"local","EncryptionKey":0}}"#
    )
}

/// What node-a's agent writes for churn node `n` (rules 6 and 7: node IP direct with
/// remote-node identity; router IP and health IP behind the node IP).
fn churn_node_ipcache(n: u32) -> BTreeMap<IpAddr, IpcacheValue> {
    let node_ip = churn_node_ip(n);
    BTreeMap::from([
        (node_ip, IpcacheValue { identity: 6, ..Default::default() }),
        (churn_node_addr(n, 1), IpcacheValue { identity: 6, tunnel_endpoint: Some(node_ip), ..Default::default() }),
        (churn_node_addr(n, 2), IpcacheValue { identity: 4, tunnel_endpoint: Some(node_ip), ..Default::default() }),
    ])
}

/// Three real drifts of three kinds on the churned node, as (kind, subject, inject): a stale map
/// entry, a kvstore pod the ipcache lacks, and a lost identity that only a remote pod uses.
pub fn real_drifts(node: &SimulatedNode) -> Vec<(&'static str, &'static str, Box<dyn Fn() -> anyhow::Result<()> + '_>)> {
    vec![
        (
            "ipcache-stale",
            "10.250.0.1/32",
            Box::new(|| node.ipcache_put("10.250.0.1/32", IpcacheValue { identity: 1000, tunnel_endpoint: Some(NODE_B_IP.parse()?), ..Default::default() })),
        ),
        ("ipcache-missing", "10.250.0.2/32", Box::new(|| node.etcd_put("cilium/state/ip/v1/default/10.250.0.2", &ip_json("10.250.0.2", NODE_B_IP, 1000, "node-b", 77)))),
        ("identity-missing", "1002", Box::new(|| node.etcd_del("cilium/state/identities/v1/id/1002"))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hours of churn join thousands of nodes: each keeps its own addresses, none of them
    /// node-a's, node-b's or a remote pod's.
    #[test]
    fn churn_nodes_never_share_or_reuse_the_fixed_ranges() {
        let mut cidrs = std::collections::HashSet::new();
        let mut node_ips = std::collections::HashSet::new();
        for n in 1..25_600 {
            let [a, b, _] = churn_node_net(n);
            assert!(a == 10 && (100..200).contains(&b), "node {n}: {:?}", churn_node_cidr(n));
            assert!(cidrs.insert(churn_node_cidr(n)), "node {n} reuses {}", churn_node_cidr(n));
            assert!(node_ips.insert(churn_node_ip(n)));
            let json: serde_json::Value = serde_json::from_str(&churn_node_json(n)).unwrap();
            for ip in [&json["IPv4AllocCIDR"]["IP"], &json["IPv4HealthIP"], &json["IPAddresses"][1]["IP"]] {
                ip.as_str().unwrap().parse::<IpAddr>().unwrap();
            }
        }
    }
}
