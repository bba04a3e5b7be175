//! ClusterMesh: the remote clusters whose nodes, pod IPs and identities this node's Cilium
//! agent puts into its datapath, read the way the agent reads them.
//!
//! `discovery` finds the remotes (Cilium's ClusterMesh config directory), `config` reads and
//! validates each one's `cilium/cluster-config/<name>` and names the prefixes the agent watches
//! (its own etcd, or KVStoreMesh's cache), `reader` lists them. Decoded, a remote is a
//! [`RemoteCluster`]: its entries carry references `<cluster>:<key>`, so findings about them
//! name the cluster and the key in that cluster's kvstore. The expected-state rules take each
//! remote as one more source cluster (`check::expected`); this module also says which cluster
//! an ipcache entry belongs to (`attribute`), for the reverse direction.

pub mod config;
pub mod discovery;
pub mod reader;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use self::config::{ClusterConfig, RemotePrefixes};
use crate::kvstore::values::{self, IdentityEntry, IpEntry, KvMeta, Malformed, NodeEntry};
use crate::model::identity::{self, IdentityScope};

/// The label every identity a cluster allocates carries (`k8s:io.cilium.k8s.policy.cluster`).
pub const CLUSTER_LABEL: &str = "k8s:io.cilium.k8s.policy.cluster=";

/// The local cluster, as the remotes are judged against it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocalCluster {
    pub name: String,
    pub id: u32,
    /// 255, or 511 with Cilium's extended cluster ids (`--max-connected-clusters`).
    pub max_connected_clusters: u32,
    /// Where the id came from (`--cluster-id`, the Cilium agent's API, this node's entry).
    pub id_from: String,
}

impl LocalCluster {
    /// Bits the cluster id is shifted by in a global identity: 16, or 15 with 511 clusters
    /// (`pkg/identity/numericidentity.go`).
    pub fn shift(&self) -> u32 {
        if self.max_connected_clusters > 255 { 15 } else { 16 }
    }

    /// The cluster id a global identity was allocated in (`NumericIdentity.ClusterID()`).
    pub fn cluster_of(&self, id: u32) -> Option<u32> {
        (identity::scope(id) == IdentityScope::Global).then(|| (id >> self.shift()) & self.max_connected_clusters.max(255))
    }

    /// `[min, max]` of cluster `c`'s identities.
    pub fn range_of(&self, c: u32) -> (u32, u32) {
        // In 64 bits: an id no cluster-config validation has bounded must not overflow.
        let s = self.shift();
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        (clamp(u64::from(c) << s), clamp(((u64::from(c) + 1) << s) - 1))
    }
}

/// Whether kvcheck judges a remote's entries, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteStatus {
    /// Read in full (every sync canary present, where the writer has them): judged.
    Synced,
    /// Its kvstore could not be read: Cilium keeps what it had (not judged).
    Unreachable,
    /// Sync canaries incomplete: Cilium waits before listing those prefixes (not judged).
    NotSynced,
    /// No `cilium/cluster-config/<name>`: Cilium (v1.16+) does not sync it (not judged).
    NoClusterConfig,
    /// Cilium refuses its cluster-config (id out of range, taken, the local one).
    InvalidConfig,
    /// The Cilium agent reports it not ready or not synced yet (not judged).
    CiliumNotSynced,
}

impl RemoteStatus {
    pub const ALL: [RemoteStatus; 6] = [
        RemoteStatus::Synced,
        RemoteStatus::Unreachable,
        RemoteStatus::NotSynced,
        RemoteStatus::NoClusterConfig,
        RemoteStatus::InvalidConfig,
        RemoteStatus::CiliumNotSynced,
    ];

    pub fn judged(self) -> bool {
        self == RemoteStatus::Synced
    }

    /// Its name in JSON, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            RemoteStatus::Synced => "synced",
            RemoteStatus::Unreachable => "unreachable",
            RemoteStatus::NotSynced => "not-synced",
            RemoteStatus::NoClusterConfig => "no-cluster-config",
            RemoteStatus::InvalidConfig => "invalid-config",
            RemoteStatus::CiliumNotSynced => "cilium-not-synced",
        }
    }
}

/// One remote cluster: where it is, its state, and the entries it gives this node.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteCluster {
    pub name: String,
    pub config_file: PathBuf,
    pub endpoints: Vec<String>,
    pub status: RemoteStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub cluster_config: Option<ClusterConfig>,
    pub prefixes: Option<RemotePrefixes>,
    pub revision: i64,
    pub read_at: Option<String>,
    pub counts: RemoteCounts,
    #[serde(skip)]
    pub nodes: Vec<NodeEntry>,
    #[serde(skip)]
    pub ips: Vec<IpEntry>,
    /// Identities Cilium accepts from this cluster.
    #[serde(skip)]
    pub identities: BTreeMap<u32, IdentityEntry>,
    /// Identities Cilium refuses (wrong cluster bits, no cluster label), with why.
    #[serde(skip)]
    pub invalid_identities: BTreeMap<u32, (IdentityEntry, String)>,
    /// Values that do not decode, or that Cilium's validation of remote data refuses.
    #[serde(skip)]
    pub rejected: Vec<Malformed>,
    /// Canary keys present (`cilium/synced/<name>/...`).
    #[serde(skip)]
    pub canaries: BTreeSet<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteCounts {
    pub nodes: usize,
    pub ips: usize,
    pub identities: usize,
    pub rejected: usize,
}

/// How evidence names a key of cluster `name`'s kvstore: `<name>:<key>`.
pub fn remote_reference(name: &str, key: &str) -> String {
    format!("{name}:{key}")
}

/// The cluster a reference names (`None`: the local cluster's kvstore or objects).
pub fn cluster_of_reference(reference: &str) -> Option<&str> {
    if reference.starts_with("cilium/") || reference.starts_with("Cilium") {
        return None;
    }
    reference.split_once(':').filter(|(_, key)| key.starts_with("cilium/")).map(|(c, _)| c)
}

impl RemoteCluster {
    pub fn new(file: &discovery::RemoteConfigFile) -> RemoteCluster {
        RemoteCluster {
            name: file.name.clone(),
            config_file: file.path.clone(),
            endpoints: file.settings.endpoints.clone(),
            status: RemoteStatus::Unreachable,
            reason: None,
            cluster_config: None,
            prefixes: None,
            revision: 0,
            read_at: None,
            counts: RemoteCounts::default(),
            nodes: Vec::new(),
            ips: Vec::new(),
            identities: BTreeMap::new(),
            invalid_identities: BTreeMap::new(),
            rejected: Vec::new(),
            canaries: BTreeSet::new(),
        }
    }

    pub fn not_judged(&mut self, status: RemoteStatus, reason: impl Into<String>) {
        self.status = status;
        self.reason = Some(reason.into());
    }

    pub fn id(&self) -> Option<u32> {
        self.cluster_config.as_ref().map(|c| c.id)
    }

    /// Forgets the decoded state (before decoding it again).
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.ips.clear();
        self.identities.clear();
        self.invalid_identities.clear();
        self.rejected.clear();
        self.canaries.clear();
    }

    /// Decodes raw key-values of this remote's prefixes, with the validation Cilium's agent
    /// applies to remote data (`pkg/clustermesh/clustermesh.go` node validators,
    /// `pkg/identity/cache/allocator.go` cluster-id and cluster-name validators). Each entry's
    /// key becomes its reference `<name>:<key>`.
    pub fn decode<'a>(&mut self, local: &LocalCluster, kvs: impl Iterator<Item = (KvMeta, &'a [u8])>) {
        let (Some(p), Some(id)) = (self.prefixes.clone(), self.id()) else { return };
        for (mut m, v) in kvs {
            let raw = std::mem::take(&mut m.key);
            let reference = remote_reference(&self.name, &raw);
            if raw.starts_with("cilium/synced/") {
                self.canaries.insert(raw.to_string());
                continue;
            }
            // Decode as the state prefix Cilium's types expect, then name it by reference.
            let (state_key, kind) = if let Some(rest) = raw.strip_prefix(&p.nodes) {
                (format!("{}{}/{rest}", values::NODES_PREFIX, self.name), 0)
            } else if let Some(rest) = raw.strip_prefix(&p.ips) {
                (format!("{}default/{rest}", values::IP_PREFIX), 1)
            } else if let Some(rest) = raw.strip_prefix(&p.identities) {
                (format!("{}{rest}", values::IDENTITY_ID_PREFIX), 2)
            } else {
                continue;
            };
            m.key = state_key.into();
            let named = |mut meta: KvMeta| {
                meta.key = reference.clone().into();
                meta
            };
            match kind {
                0 => match values::decode_node(m, v) {
                    Ok(mut n) if n.cluster_id == id => {
                        n.meta = named(n.meta);
                        self.nodes.push(n);
                    }
                    Ok(n) => self.rejected.push(Malformed::new(named(n.meta), v, format!("ClusterID {} is not cluster {}'s id {id}: Cilium skips the node", n.cluster_id, self.name))),
                    Err(mut e) => {
                        e.meta = named(e.meta);
                        self.rejected.push(e);
                    }
                },
                1 => match values::decode_ip(m, v) {
                    Ok(mut e) => {
                        e.meta = named(e.meta);
                        self.ips.push(e);
                    }
                    Err(mut e) => {
                        e.meta = named(e.meta);
                        self.rejected.push(e);
                    }
                },
                _ => match values::decode_identity(m, v) {
                    Ok(mut i) => {
                        i.meta = named(i.meta);
                        match self.identity_problem(local, id, &i) {
                            None => {
                                self.identities.insert(i.id, i);
                            }
                            Some(why) => {
                                self.invalid_identities.insert(i.id, (i, why));
                            }
                        }
                    }
                    Err(mut e) => {
                        e.meta = named(e.meta);
                        self.rejected.push(e);
                    }
                },
            }
        }
        self.counts = RemoteCounts { nodes: self.nodes.len(), ips: self.ips.len(), identities: self.identities.len() + self.invalid_identities.len(), rejected: self.rejected.len() };
    }

    /// Why Cilium's agent refuses a remote identity: outside the cluster's range, or without
    /// the label naming the cluster.
    fn identity_problem(&self, local: &LocalCluster, id: u32, i: &IdentityEntry) -> Option<String> {
        match local.cluster_of(i.id) {
            Some(c) if c != id => return Some(format!("identity {} carries cluster id {c} in its bits, not {}'s id {id}", i.id, self.name)),
            _ => {}
        }
        let label = format!("{CLUSTER_LABEL}{}", self.name);
        (!i.labels.split(';').any(|l| l == label)).then(|| format!("identity {} lacks the label {label}", i.id))
    }

    /// Which sync canaries the writer has not written yet.
    pub fn missing_canaries(&self) -> Vec<String> {
        self.prefixes.iter().flat_map(|p| p.canaries.iter()).filter(|c| !self.canaries.contains(*c)).cloned().collect()
    }

    /// Addresses of this cluster's nodes (their entries' tunnel endpoints and node addresses).
    pub fn node_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.nodes.iter().flat_map(|n| {
            let health = [n.ipv4_health_ip, n.ipv6_health_ip, n.ipv4_ingress_ip, n.ipv6_ingress_ip];
            n.addresses.iter().map(|a| a.ip).chain(health.into_iter().flatten())
        })
    }
}

/// The ClusterMesh as this node's agent runs it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Mesh {
    pub config_dir: PathBuf,
    pub local: LocalCluster,
    pub remotes: Vec<RemoteCluster>,
    pub ignored: Vec<discovery::IgnoredFile>,
    /// Why Cilium builds no ClusterMesh although remotes are configured (local cluster id 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inactive: Option<String>,
}

/// Who an ipcache entry belongs to.
#[derive(Clone, Copy, Debug)]
pub enum Owner<'m> {
    Local,
    Remote(&'m RemoteCluster),
    /// A global identity of a cluster id no remote has (a removed cluster, not drained).
    UnknownCluster(u32),
    /// Possibly a remote kvcheck does not judge (its node addresses are not known).
    Unattributable,
}

impl PartialEq for Owner<'_> {
    fn eq(&self, o: &Self) -> bool {
        match (self, o) {
            (Owner::Remote(a), Owner::Remote(b)) => a.name == b.name,
            (Owner::UnknownCluster(a), Owner::UnknownCluster(b)) => a == b,
            _ => std::mem::discriminant(self) == std::mem::discriminant(o),
        }
    }
}

impl Mesh {
    /// The mesh without its decoded entries (for reports; their counts stay).
    pub fn into_summary(mut self) -> Mesh {
        self.remotes.iter_mut().for_each(RemoteCluster::clear);
        self
    }

    /// `cluster2: synced, cluster3: unreachable` (logs).
    pub fn remote_states(&self) -> String {
        self.remotes.iter().map(|r| format!("{}: {}", r.name, r.status.name())).collect::<Vec<_>>().join(", ")
    }

    /// Whether Cilium runs a ClusterMesh: a local cluster id (Cilium meshes only then). With
    /// no remote configured, entries of other cluster ids are then left from removed ones.
    pub fn active(&self) -> bool {
        self.inactive.is_none() && self.local.id != 0
    }

    /// Whether there is anything to say about the mesh (remotes, ignored files, a cluster id).
    pub fn in_use(&self) -> bool {
        !self.remotes.is_empty() || !self.ignored.is_empty() || self.local.id != 0
    }

    pub fn judged(&self) -> impl Iterator<Item = &RemoteCluster> {
        self.remotes.iter().filter(|r| r.status.judged())
    }

    pub fn remote(&self, name: &str) -> Option<&RemoteCluster> {
        self.remotes.iter().find(|r| r.name == name)
    }

    /// The remote cluster whose id a global identity carries.
    pub fn remote_of_identity(&self, id: u32) -> Option<&RemoteCluster> {
        let c = self.local.cluster_of(id).filter(|c| *c != 0 && *c != self.local.id)?;
        self.remotes.iter().find(|r| r.id() == Some(c))
    }

    /// The cluster an ipcache entry (identity, tunnel endpoint) belongs to. Global identities
    /// carry their cluster id; reserved ones (node, health, pod CIDR entries) are placed by the
    /// node addresses of the remotes read, and are unattributable while a remote is not.
    pub fn owner(&self, prefix: &ipnet::IpNet, id: u32, tunnel: Option<IpAddr>) -> Owner<'_> {
        if !self.active() {
            return Owner::Local;
        }
        if let Some(c) = self.local.cluster_of(id) {
            if c == 0 || c == self.local.id {
                return Owner::Local;
            }
            return match self.remotes.iter().find(|r| r.id() == Some(c) && r.status != RemoteStatus::InvalidConfig) {
                Some(r) => Owner::Remote(r),
                // A remote kvcheck cannot read (or Cilium refuses) may be that cluster.
                None if self.remotes.iter().any(|r| !r.status.judged()) => Owner::Unattributable,
                None => Owner::UnknownCluster(c),
            };
        }
        let addr = prefix.addr();
        for r in self.judged() {
            if r.node_addresses().any(|a| Some(a) == tunnel || a == addr) || r.nodes.iter().any(|n| node_cidrs(n).any(|c| c.contains(prefix))) {
                return Owner::Remote(r);
            }
        }
        if self.remotes.iter().any(|r| !r.status.judged()) { Owner::Unattributable } else { Owner::Local }
    }
}

fn node_cidrs(n: &NodeEntry) -> impl Iterator<Item = &ipnet::IpNet> {
    n.ipv4_alloc_cidr.iter().chain(&n.ipv6_alloc_cidr).chain(&n.ipv4_secondary_alloc_cidrs).chain(&n.ipv6_secondary_alloc_cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(name: &str, id: u32) -> RemoteCluster {
        let file = discovery::RemoteConfigFile { name: name.into(), path: PathBuf::from(name), settings: Default::default() };
        let mut r = RemoteCluster::new(&file);
        let cfg = ClusterConfig { id, ..Default::default() };
        r.prefixes = Some(RemotePrefixes::of(name, &cfg));
        r.cluster_config = Some(cfg);
        r.status = RemoteStatus::Synced;
        r
    }

    fn meta(key: &str) -> KvMeta {
        KvMeta { key: key.into(), mod_revision: 3, lease: 0 }
    }

    #[test]
    fn decodes_and_validates_remote_data_as_cilium() {
        let local = LocalCluster { name: "cluster1".into(), id: 1, max_connected_clusters: 255, id_from: String::new() };
        let mut r = remote("cluster2", 2);
        let node = br#"{"Name":"c2-node1","Cluster":"cluster2","IPAddresses":[{"Type":"InternalIP","IP":"10.5.1.134"}],"IPv4AllocCIDR":{"IP":"10.7.1.0","Mask":"////AA=="},"IPv4HealthIP":"10.7.1.9","ClusterID":2}"#;
        let wrong_id = br#"{"Name":"c2-node2","Cluster":"cluster2","IPAddresses":[],"ClusterID":5}"#;
        let pod = br#"{"IP":"10.7.1.20","Mask":null,"HostIP":"10.5.1.134","ID":131328,"Key":0}"#;
        let kvs: Vec<(KvMeta, &[u8])> = vec![
            (meta("cilium/state/nodes/v1/cluster2/c2-node1"), node),
            (meta("cilium/state/nodes/v1/cluster2/c2-node2"), wrong_id),
            (meta("cilium/state/ip/v1/default/10.7.1.20"), pod),
            (meta("cilium/state/identities/v1/id/131328"), b"k8s:app=web;k8s:io.cilium.k8s.policy.cluster=cluster2;"),
            (meta("cilium/state/identities/v1/id/131329"), b"k8s:app=db;"),
            (meta("cilium/state/identities/v1/id/65600"), b"k8s:io.cilium.k8s.policy.cluster=cluster2;"),
        ];
        r.decode(&local, kvs.into_iter());
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].meta.key, "cluster2:cilium/state/nodes/v1/cluster2/c2-node1".into());
        assert_eq!(r.ips[0].meta.key, "cluster2:cilium/state/ip/v1/default/10.7.1.20".into());
        assert!(r.rejected[0].reason.contains("ClusterID 5"));
        assert!(r.identities.contains_key(&131328));
        assert!(r.invalid_identities[&131329].1.contains("lacks the label"));
        assert!(r.invalid_identities[&65600].1.contains("cluster id 1"));
        assert_eq!(cluster_of_reference(&r.ips[0].meta.key), Some("cluster2"));
        assert_eq!(cluster_of_reference("cilium/state/ip/v1/default/::1"), None);
        assert_eq!(cluster_of_reference("CiliumEndpoint default/a"), None);

        let mesh = Mesh { local, remotes: vec![r, remote("cluster3", 3)], ..Default::default() };
        let p = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        assert_eq!(mesh.owner(&p("10.7.1.20/32"), 131328, None).name(), Some("cluster2"));
        assert_eq!(mesh.owner(&p("10.6.1.5/32"), 65600, None), Owner::Local);
        assert_eq!(mesh.owner(&p("10.9.0.1/32"), 9 << 16, None), Owner::UnknownCluster(9));
        assert_eq!(mesh.owner(&p("10.7.1.9/32"), 4, Some("10.5.1.134".parse().unwrap())).name(), Some("cluster2"));
        assert_eq!(mesh.owner(&p("10.5.1.133/32"), 6, None), Owner::Local);
        // 511 clusters: 15 bits.
        let wide = LocalCluster { max_connected_clusters: 511, ..Default::default() };
        assert_eq!((wide.cluster_of(3 << 15 | 7), wide.range_of(3)), (Some(3), (98304, 131071)));
        // Ids no validation bounded (found through the clustermesh fuzz target): no overflow.
        assert_eq!(wide.range_of(u32::MAX), (u32::MAX, u32::MAX));
        assert_eq!(LocalCluster { max_connected_clusters: 255, ..wide.clone() }.range_of(65_535), (0xFFFF_0000, u32::MAX));
    }

    impl Owner<'_> {
        fn name(&self) -> Option<&str> {
            match self {
                Owner::Remote(r) => Some(&r.name),
                _ => None,
            }
        }
    }
}
