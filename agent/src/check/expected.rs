//! What this node's datapath should hold, derived from the kvstore (pure logic, no I/O).
//!
//! Follows docs/cilium-expected-state.md: world entries, this node's own addresses, local and
//! remote pods from `ip/v1`, remote node addresses, health and ingress IPs, pod CIDRs (v1.18+),
//! and the tunnel map (v1.17 and older). Where the agent's configuration is unknown, an
//! expectation accepts every value Cilium can legitimately write, and says so.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasher;

use crate::model::fewset::FewSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::config::DatapathConfig;
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{IpEntry, NodeEntry};
use crate::model::identity;
use crate::model::source::StateSource;
use crate::model::version::Layout;

/// The node kvcheck runs on, and how its agent is configured.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub node_name: String,
    pub cluster: String,
    pub layout: Layout,
    pub config: DatapathConfig,
    /// Addresses on local interfaces (loopback and link-local excluded, as Cilium does).
    pub local_addresses: BTreeSet<IpAddr>,
    /// Whether the tunnel map is in use (tunnel mode) when the configuration does not say:
    /// inferred from the map having entries.
    pub tunnel_map_in_use: bool,
}

/// What one ipcache prefix should map to. Each set lists every acceptable value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expectation {
    pub identities: FewSet<u32>,
    pub tunnel_endpoints: FewSet<Option<IpAddr>>,
    /// `None`: any key (encryption configuration unknown).
    pub encrypt_keys: Option<FewSet<u8>>,
    /// Required entries are reported missing; optional ones only checked when present.
    pub required: bool,
    /// The rule that produced it, e.g. `remote pod (ip/v1)`.
    pub rule: &'static str,
    /// The kvstore key (or Kubernetes object) behind it, if one.
    pub kvstore_key: Option<std::sync::Arc<str>>,
    /// The ClusterMesh remote cluster it comes from (`None`: this node's own cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

impl Expectation {
    /// Whether an ipcache entry holds what this expects (identity, tunnel endpoint and, when
    /// known, encrypt key): no `ipcache-*-mismatch` finding.
    pub fn agrees(&self, o: &crate::datapath::ipcache::IpcacheEntry) -> bool {
        self.identities.contains(&o.identity)
            && self.tunnel_endpoints.contains(&o.tunnel_endpoint)
            && self.encrypt_keys.as_ref().is_none_or(|k| k.contains(&o.encrypt_key))
    }

    fn merge(&mut self, o: Expectation) {
        self.identities.extend(o.identities);
        self.tunnel_endpoints.extend(o.tunnel_endpoints);
        self.encrypt_keys = match (self.encrypt_keys.take(), o.encrypt_keys) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            _ => None,
        };
        self.required |= o.required;
        if self.kvstore_key.is_none() {
            self.kvstore_key = o.kvstore_key;
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpectedTunnel {
    pub endpoint: IpAddr,
    pub encrypt_keys: FewSet<u8>,
    pub node_key: String,
    /// False for a node deleted within Cilium's hold-off: its entry may be there or gone.
    pub required: bool,
}

/// The expected ipcache: one expectation per prefix, in the order the kvstore gave them. A
/// full check holds one per `ip/v1` entry and node address (~105k at the bench's size). A
/// `BTreeMap` held them at ~55 % node fill (heaptrack: 33 MB); a vector needs about half. A
/// hash index of positions finds a prefix (4 bytes a slot, comparing through the entries: a
/// map of prefixes to positions cost 8.7 MB at the bench's size), while expectations merge by
/// prefix and when the diff looks up each of up to 500k ipcache prefixes (a binary search
/// over sorted entries made ~17 scattered compares a prefix, and the sort itself moved
/// 20 MB: together a third of a full check's diff phase). Nothing reads it in prefix order
/// but its serialized form, which sorts.
#[derive(Clone, Debug, Default)]
pub struct ExpectedIpcache {
    entries: Vec<(IpNet, Expectation)>,
    /// Positions in `entries` by prefix.
    index: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl ExpectedIpcache {
    fn building(capacity: usize) -> Self {
        ExpectedIpcache { entries: Vec::with_capacity(capacity), index: hashbrown::HashTable::with_capacity(capacity), ..Default::default() }
    }

    /// `prefix`'s position in [`iter`](Self::iter)'s order, and its expectation.
    pub fn lookup(&self, prefix: &IpNet) -> Option<(usize, &Expectation)> {
        let at = *self.index.find(self.hasher.hash_one(prefix), |&p| self.entries[p as usize].0 == *prefix)? as usize;
        Some((at, &self.entries[at].1))
    }

    pub fn get(&self, prefix: &IpNet) -> Option<&Expectation> {
        self.lookup(prefix).map(|(_, e)| e)
    }

    fn get_mut(&mut self, prefix: &IpNet) -> Option<&mut Expectation> {
        let (at, _) = self.lookup(prefix)?;
        Some(&mut self.entries[at].1)
    }

    /// Replaces `prefix`'s expectation, or adds it (callers merge into a held one through
    /// `get_mut`).
    fn insert(&mut self, prefix: IpNet, e: Expectation) {
        if let Some((at, _)) = self.lookup(&prefix) {
            self.entries[at].1 = e;
            return;
        }
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(hasher.hash_one(prefix), entries.len() as u32, |&p| hasher.hash_one(entries[p as usize].0));
        self.entries.push((prefix, e));
    }

    /// Built: the spare capacity of the size estimate given back.
    fn finish(&mut self) {
        self.entries.shrink_to_fit();
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.shrink_to(entries.len(), |&p| hasher.hash_one(entries[p as usize].0));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// In the order expectations were first made (kvstore order), not by prefix.
    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &Expectation)> {
        self.entries.iter().map(|(p, e)| (p, e))
    }
}

/// As the map it replaces: prefix -> expectation.
impl Serialize for ExpectedIpcache {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut sorted: Vec<(&IpNet, &Expectation)> = self.iter().collect();
        sorted.sort_unstable_by_key(|(p, _)| *p);
        s.collect_map(sorted)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExpectedState {
    pub ipcache: ExpectedIpcache,
    /// Endpoint-map host entries (flags = host): address → required.
    pub host_entries: BTreeMap<IpAddr, bool>,
    /// `ip/v1` entries hosted by this node: each should be a local endpoint.
    pub local_ips: BTreeMap<IpAddr, IpEntry>,
    /// Expected tunnel map; `None` when there is none to check (v1.18+, or not tunnelling).
    pub tunnel: Option<BTreeMap<IpAddr, ExpectedTunnel>>,
    /// This node's kvstore entry.
    pub node: Option<NodeEntry>,
    /// Addresses that identify this node as an ip/v1 HostIP.
    pub node_addresses: BTreeSet<IpAddr>,
    /// Every guess made where the configuration was not known.
    pub assumptions: Vec<String>,
    /// Why the identities are not checked against `identities/v1/id/` (they live elsewhere).
    pub identities_not_checked: Option<String>,
    /// Prefixes two clusters announce (ClusterMesh): each side's cluster (`None`: local) and key.
    pub overlaps: BTreeMap<IpNet, Vec<(Option<String>, Option<std::sync::Arc<str>>)>>,
}

/// Whether the identities the datapath uses can be checked: where Cilium allocates them in the
/// kvstore against `identities/v1/id/`, where it keeps them as CiliumIdentity objects against
/// those (when read). Otherwise why not, said once, never as one `identity-missing` per identity.
fn identities_not_checked(snap: &KvstoreSnapshot, cfg: &DatapathConfig, own: Option<&NodeEntry>) -> Option<String> {
    if snap.origin.identities == StateSource::Kubernetes {
        return None;
    }
    let from = || {
        let mode_file = cfg.sources.iter().find(|s| s.ends_with("identity-allocation-mode"));
        mode_file.or_else(|| cfg.sources.iter().rev().find(|s| !s.ends_with("node_config.h") && !s.contains("config-map"))).cloned().unwrap_or_else(|| "options".to_owned())
    };
    match cfg.identities_in_kvstore() {
        Some(true) => None,
        Some(false) => Some(format!(
            "identity-allocation-mode {} (from {}): Cilium keeps identities as CiliumIdentity objects in the Kubernetes API; identities were not checked: {}",
            cfg.identity_allocation_mode.as_deref().unwrap_or_default(),
            from(),
            snap.origin.identities_unread.as_deref().unwrap_or("they were not read")
        )),
        None => identities_elsewhere(snap, own).map(|why| {
            let unread = snap.origin.identities_unread.as_deref().map(|u| format!(" ({u})")).unwrap_or_default();
            format!("{why}: Cilium allocates identities as CiliumIdentity objects here (identity-allocation-mode crd, Helm's default), so they were not checked{unread}; give kvcheck the Kubernetes API, Cilium's API socket or its ConfigMap, or --identity-source kvstore to check them in the kvstore anyway")
        }),
    }
}

/// With the identity mode unknown, whether the kvstore shows identities kept elsewhere (CRD
/// identities): an empty identities prefix with global identities in use, or local endpoints
/// whose global identities have no `id/` key while this node holds no `value/` reference key
/// at all (an agent allocating in the kvstore writes both for every identity it uses).
pub fn identities_elsewhere(snap: &KvstoreSnapshot, own: Option<&NodeEntry>) -> Option<String> {
    // Cheap tests first: this runs on every re-check of the agent.
    let global = |id: u32| identity::scope(id) == identity::IdentityScope::Global;
    if snap.identities.is_empty() {
        let in_use = snap.ips.iter().filter(|e| global(e.identity)).count();
        return (in_use > 0).then(|| format!("cilium/state/identities/v1/id/ is empty while {in_use} ip/v1 entries use global identities"));
    }
    let node = own?;
    let ips: BTreeSet<IpAddr> = [node.node_ip(true), node.node_ip(false)].into_iter().flatten().collect();
    if snap.identity_references.iter().any(|r| r.node.parse().is_ok_and(|ip| ips.contains(&ip))) {
        return None;
    }
    // A node that merely lost its reference keys still finds its identities' id/ keys.
    let local: BTreeSet<u32> = snap.ips.iter().filter(|e| global(e.identity) && e.host_ip.is_some_and(|h| ips.contains(&h))).map(|e| e.identity).collect();
    (!local.is_empty() && !local.iter().any(|id| snap.identities.contains_key(id)))
        .then(|| format!("the {} global identities of this node's endpoints have neither id/ keys nor a value/ reference from this node in cilium/state/identities/v1/", local.len()))
}

fn set<T: Ord>(items: impl IntoIterator<Item = T>) -> FewSet<T> {
    items.into_iter().collect()
}

/// Keys an entry may carry given the node's announced key `k`: exactly `k` when encryption is
/// known on, `0` when known off, and either when unknown.
fn keys_for(config: &DatapathConfig, k: u8) -> Option<FewSet<u8>> {
    match config.encryption {
        Some(false) => Some(set([0])),
        Some(true) => Some(set([k])),
        None => Some(set([0, k])),
    }
}

/// Everything the kvstore says this node's datapath should hold.
pub fn derive(snap: &KvstoreSnapshot, ctx: &NodeContext) -> ExpectedState {
    // About one expectation per `ip/v1` entry and four per node (addresses, health, ingress).
    let capacity = snap.ips.len() + 4 * snap.nodes.len();
    derive_in(snap, snap.ips.iter(), ctx, &|_| true, capacity)
}

/// [`derive`] with ipcache expectations for `prefixes` only (the agent's re-check of the
/// subjects a change touched). Everything node-scale (this node's entry, local pods, the tunnel
/// map) is derived in full; the ~100k `ip/v1` entries are only filtered, not turned into
/// expectations.
pub fn derive_scoped(snap: &KvstoreSnapshot, ctx: &NodeContext, prefixes: &HashSet<IpNet>) -> ExpectedState {
    let hosts = node_addresses(snap, ctx);
    let ips = snap.ips.iter().filter(|e| prefixes.contains(&e.prefix) || e.host_ip.is_some_and(|h| hosts.contains(&h)));
    derive_for(snap, ctx, prefixes, ips)
}

/// [`derive_scoped`] when the caller already knows the `ip/v1` entries that matter: those of
/// `prefixes` and every entry hosted on this node (see [`node_addresses`]).
pub fn derive_for<'a>(snap: &KvstoreSnapshot, ctx: &NodeContext, prefixes: &HashSet<IpNet>, ips: impl Iterator<Item = &'a IpEntry>) -> ExpectedState {
    derive_in(snap, ips, ctx, &|p| prefixes.contains(p), prefixes.len())
}

/// The addresses that make an `ip/v1` entry's HostIP this node: the node entry's addresses, or
/// the local interface addresses when there is no node entry.
pub fn node_addresses(snap: &KvstoreSnapshot, ctx: &NodeContext) -> BTreeSet<IpAddr> {
    match own_node(snap, ctx) {
        Some(n) => n.addresses.iter().map(|a| a.ip).collect(),
        None => ctx.local_addresses.clone(),
    }
}

pub fn own_node<'a>(snap: &'a KvstoreSnapshot, ctx: &NodeContext) -> Option<&'a NodeEntry> {
    snap.nodes.iter().find(|n| n.name == ctx.node_name && n.cluster == ctx.cluster)
}

/// Collects ipcache expectations for the prefixes it is asked about; the rest are not built.
struct Builder<'w> {
    exp: ExpectedState,
    wanted: &'w dyn Fn(&IpNet) -> bool,
    /// Nodes and pod IPs are CiliumNode / CiliumEndpoint objects (CRD mode).
    from_objects: bool,
    /// The remote cluster whose entries are being derived (`None`: the local one).
    cluster: Option<String>,
}

/// A rule's name, saying where its input came from: the kvstore's name or the object's.
fn named(from_objects: bool, kvstore: &'static str, objects: &'static str) -> &'static str {
    if from_objects { objects } else { kvstore }
}

impl Builder<'_> {
    fn expect(&mut self, prefix: IpNet, make: impl FnOnce() -> Expectation) {
        if !(self.wanted)(&prefix) {
            return;
        }
        let mut e = make();
        e.cluster = self.cluster.clone();
        let Some(existing) = self.exp.ipcache.get_mut(&prefix) else {
            self.exp.ipcache.insert(prefix, e);
            return;
        };
        if existing.cluster != e.cluster && existing.required && e.required {
            let overlap = self.exp.overlaps.entry(prefix).or_default();
            for x in [&*existing, &e] {
                let side = (x.cluster.clone(), x.kvstore_key.clone());
                if !overlap.contains(&side) {
                    overlap.push(side);
                }
            }
        }
        // Cilium's precedence (pkg/source): the local cluster's sources rank above
        // `clustermesh`; two remotes share one source, so either may have written last.
        if existing.cluster.is_some() || e.cluster.is_none() {
            existing.merge(e);
        }
    }
}

fn derive_in<'a>(snap: &KvstoreSnapshot, ips: impl Iterator<Item = &'a IpEntry>, ctx: &NodeContext, wanted: &dyn Fn(&IpNet) -> bool, capacity: usize) -> ExpectedState {
    let exp = ExpectedState { ipcache: ExpectedIpcache::building(capacity), ..ExpectedState::default() };
    let mut b = Builder { exp, wanted, from_objects: snap.origin.endpoints == StateSource::Kubernetes, cluster: None };
    let node = own_node(snap, ctx).cloned();
    b.exp.identities_not_checked = identities_not_checked(snap, &ctx.config, node.as_ref());
    let families = families(ctx, node.as_ref(), &mut b.exp.assumptions);
    let remote_node_ids = remote_node_identities(&ctx.config, &mut b.exp.assumptions);
    if ctx.config.encryption.is_none() {
        b.exp.assumptions.push("encryption setting unknown: entries may carry key 0 or the owner's announced key".into());
    }
    world(&mut b, ctx, families);
    own_addresses(&mut b, ctx, node.as_ref(), families);
    b.exp.node = node;
    for e in ips {
        pod(&mut b, ctx, e, &remote_node_ids);
    }
    let tunnel_on = tunnel_mode(ctx, &mut b.exp.assumptions);
    let mut tunnel_map = BTreeMap::new();
    let others = snap.nodes.iter().filter(|n| !(n.name == ctx.node_name && n.cluster == ctx.cluster));
    // Nodes deleted within Cilium's hold-off: their entries may still be there (or already gone).
    let present: HashSet<&str> = snap.nodes.iter().map(|n| n.meta.key.as_ref()).collect();
    let held = snap.held_nodes.iter().filter(|h| !present.contains(h.node.meta.key.as_ref())).map(|h| &h.node);
    for (n, required) in others.map(|n| (n, true)).chain(held.map(|n| (n, false))) {
        let r = RemoteNode::new(n, ctx, required);
        remote_node_addresses(&mut b, ctx, &r, &remote_node_ids);
        remote_health_and_ingress(&mut b, ctx, &r);
        remote_pod_cidrs(&mut b, ctx, &r, families);
        if ctx.layout.has_tunnel_map() && tunnel_on {
            remote_tunnel_entries(&mut tunnel_map, &r);
        }
    }
    // ClusterMesh: each remote Cilium has synced is one more source of pods and nodes, under
    // the same rules (docs/cilium-expected-state.md, "ClusterMesh").
    b.from_objects = false;
    let local = snap.mesh.as_ref().map(|m| m.local.clone()).unwrap_or_default();
    for r in snap.mesh.iter().filter(|m| m.active()).flat_map(|m| m.judged()) {
        b.cluster = Some(r.name.clone());
        for e in &r.ips {
            remote_cluster_pod(&mut b, ctx, e, &remote_node_ids, &local, r);
        }
        for n in &r.nodes {
            let rn = RemoteNode::new(n, ctx, true);
            remote_node_addresses(&mut b, ctx, &rn, &remote_node_ids);
            remote_health_and_ingress(&mut b, ctx, &rn);
            remote_pod_cidrs(&mut b, ctx, &rn, families);
            if ctx.layout.has_tunnel_map() && tunnel_on {
                // A pod CIDR both clusters use (overlapping CIDRs) keeps the local node's.
                let mut remote_map = BTreeMap::new();
                remote_tunnel_entries(&mut remote_map, &rn);
                for (cidr, t) in remote_map {
                    tunnel_map.entry(cidr).or_insert(t);
                }
            }
        }
    }
    b.exp.tunnel = (ctx.layout.has_tunnel_map() && tunnel_on).then_some(tunnel_map);
    b.exp.ipcache.finish();
    b.exp
}

/// A remote cluster's pod (its `ip/v1` entry): the remote-pod rule, except that an identity
/// outside the cluster's range is dropped by Cilium v1.17+ and kept by v1.16 (present or not,
/// both are Cilium's; the identity itself is reported, see `check::diff`).
fn remote_cluster_pod(b: &mut Builder<'_>, ctx: &NodeContext, e: &IpEntry, remote_node_ids: &FewSet<u32>, local: &crate::clustermesh::LocalCluster, r: &crate::clustermesh::RemoteCluster) {
    let out_of_range = local.cluster_of(e.identity).is_some_and(|c| Some(c) != r.id());
    let before = b.exp.ipcache.get(&e.prefix).is_some_and(|x| x.required);
    pod(b, ctx, e, remote_node_ids);
    if out_of_range && !before {
        if let Some(x) = b.exp.ipcache.get_mut(&e.prefix) {
            x.required = false;
        }
    }
}

/// Which address families the agent runs (node_config.h, else guessed from the node entry).
#[derive(Clone, Copy)]
struct Families {
    ipv4: bool,
    ipv6: bool,
}

fn families(ctx: &NodeContext, node: Option<&NodeEntry>, assumptions: &mut Vec<String>) -> Families {
    let cfg = &ctx.config;
    let ipv4 = cfg.ipv4.unwrap_or(true);
    let ipv6 = cfg.ipv6.unwrap_or_else(|| node.is_some_and(|n| n.ipv6_alloc_cidr.is_some() || n.addresses.iter().any(|a| a.ip.is_ipv6())));
    if cfg.ipv4.is_none() || cfg.ipv6.is_none() {
        assumptions.push(format!(
            "address families not configured: assumed IPv4 {}, IPv6 {} (from the node entry)",
            if ipv4 { "on" } else { "off" },
            if ipv6 { "on" } else { "off" }
        ));
    }
    Families { ipv4, ipv6 }
}

/// The identities a remote node's addresses may carry in this agent's ipcache.
fn remote_node_identities(cfg: &DatapathConfig, assumptions: &mut Vec<String>) -> FewSet<u32> {
    match cfg.remote_node_identity {
        Some(true) => set([identity::REMOTE_NODE]),
        Some(false) => set([identity::HOST]),
        None => {
            assumptions.push("remote-node identity setting unknown: remote node addresses may carry identity 1 or 6".into());
            set([identity::HOST, identity::REMOTE_NODE])
        }
    }
}

/// Whether the tunnel map is in use (node_config.h, else inferred from its entries).
fn tunnel_mode(ctx: &NodeContext, assumptions: &mut Vec<String>) -> bool {
    let tunnel_on = ctx.config.tunnel.unwrap_or(ctx.tunnel_map_in_use);
    if ctx.config.tunnel.is_none() && ctx.layout.has_tunnel_map() {
        assumptions.push(format!(
            "routing mode unknown: assumed {} because the tunnel map {}",
            if tunnel_on { "tunnel" } else { "direct routing" },
            if tunnel_on { "has entries" } else { "is empty" }
        ));
    }
    tunnel_on
}

/// The world identities of a family: 2; dual stack v1.15+: 9 (IPv4) or 10 (IPv6) too.
fn world_identities(layout: Layout, families: Families, v6: bool) -> FewSet<u32> {
    let mut ids = set([identity::WORLD]);
    if layout >= Layout::V1_15 && families.ipv4 && families.ipv6 {
        ids.insert(if v6 { 10 } else { 9 });
    }
    ids
}

/// Rule 1: `0.0.0.0/0` and `::/0` map to world.
fn world(b: &mut Builder<'_>, ctx: &NodeContext, families: Families) {
    let keys = match ctx.config.encryption {
        Some(false) => Some(set([0])),
        _ => None,
    };
    for (on, prefix, v6) in [(families.ipv4, "0.0.0.0/0", false), (families.ipv6, "::/0", true)] {
        if on {
            b.expect(prefix.parse().unwrap_or_default(), || Expectation {
                identities: world_identities(ctx.layout, families, v6),
                tunnel_endpoints: set([None]),
                encrypt_keys: keys.clone(),
                required: true,
                rule: "world",
                kvstore_key: None,
                cluster: None,
            });
        }
    }
}

/// Rules 2, 3 and 3b: this node's own addresses (identity host, no tunnel; endpoint-map host
/// entries) and its health IP; every local interface address may be a host entry.
fn own_addresses(b: &mut Builder<'_>, ctx: &NodeContext, node: Option<&NodeEntry>, families: Families) {
    let objects = b.from_objects;
    let cfg = &ctx.config;
    if let Some(n) = node {
        for a in &n.addresses {
            b.exp.node_addresses.insert(a.ip);
            b.expect(IpNet::from(a.ip), || Expectation {
                identities: set([identity::HOST]),
                tunnel_endpoints: set([None]),
                encrypt_keys: keys_for(cfg, n.encryption_key),
                required: true,
                rule: named(objects, "this node's address (nodes/v1)", "this node's address (CiliumNode)"),
                kvstore_key: Some(n.meta.key.clone()),
                cluster: None,
            });
            if ctx.local_addresses.contains(&a.ip) {
                b.exp.host_entries.insert(a.ip, true);
            }
        }
        for (health, v6) in [(n.ipv4_health_ip, false), (n.ipv6_health_ip, true)] {
            if let Some(ip) = health.filter(|_| if v6 { families.ipv6 } else { families.ipv4 }) {
                b.expect(IpNet::from(ip), || Expectation {
                    identities: set([identity::HEALTH]),
                    tunnel_endpoints: set([None]),
                    encrypt_keys: None,
                    required: true,
                    rule: named(objects, "this node's health endpoint (nodes/v1)", "this node's health endpoint (CiliumNode)"),
                    kvstore_key: Some(n.meta.key.clone()),
                    cluster: None,
                });
            }
        }
    } else {
        // Without a node entry, the local addresses are the node's addresses.
        b.exp.node_addresses.extend(ctx.local_addresses.iter().copied());
    }
    for ip in &ctx.local_addresses {
        b.exp.host_entries.entry(*ip).or_insert(false);
        b.expect(IpNet::from(*ip), || Expectation {
            identities: set([identity::HOST]),
            tunnel_endpoints: set([None]),
            encrypt_keys: None,
            required: false,
            rule: "local interface address",
            kvstore_key: None,
            cluster: None,
        });
    }
}

/// Rules 4 and 5: an `ip/v1` entry is a local pod when its HostIP is this node's (no tunnel;
/// it must be a local endpoint), else a remote pod behind its HostIP.
fn pod(b: &mut Builder<'_>, ctx: &NodeContext, e: &IpEntry, remote_node_ids: &FewSet<u32>) {
    let objects = b.from_objects;
    let hosted_here = e.host_ip.is_some_and(|h| b.exp.node_addresses.contains(&h));
    let mut ids = set([e.identity]);
    if e.identity == identity::HOST {
        // Readers rewrite ID 1 to remote-node (v1.12+ with remote-node identity; always v1.16+).
        ids.extend(remote_node_ids.iter().copied());
    }
    let tunnel = if hosted_here { None } else { e.host_ip.filter(|h| h.is_ipv4() || ctx.layout.ipcache_v2()) };
    b.expect(e.prefix, || Expectation {
        identities: ids,
        tunnel_endpoints: set([tunnel]),
        encrypt_keys: Some(set([e.encrypt_key])),
        required: true,
        rule: match (hosted_here, objects) {
            (true, false) => "local pod (ip/v1)",
            (false, false) => "remote pod (ip/v1)",
            (true, true) => "local pod (CiliumEndpoint)",
            (false, true) => "remote pod (CiliumEndpoint)",
        },
        kvstore_key: Some(e.meta.key.clone()),
        cluster: None,
    });
    if hosted_here && e.prefix.prefix_len() == e.prefix.max_prefix_len() {
        b.exp.local_ips.insert(e.prefix.addr(), e.clone());
    }
}

/// Another node of the cluster as the rules for remote nodes see it.
struct RemoteNode<'n> {
    node: &'n NodeEntry,
    /// Cilium's underlay: the IPv4 node IP through v1.17; v1.18+ may use IPv6.
    underlay: Option<IpAddr>,
    /// Entries required: false for a node in Cilium's node-delete hold-off.
    required: bool,
}

impl<'n> RemoteNode<'n> {
    fn new(node: &'n NodeEntry, ctx: &NodeContext, required: bool) -> Self {
        let underlay = node.node_ip(true).or_else(|| if ctx.layout.ipcache_v2() { node.node_ip(false) } else { None });
        RemoteNode { node, underlay, required }
    }

    /// The rule's name for a present node, or for one in the node-delete hold-off.
    fn rule(&self, present: &'static str, held: &'static str) -> &'static str {
        if self.required { present } else { held }
    }
}

/// Rule 6: other nodes' addresses: remote-node (or host) identity; the CiliumInternalIP
/// behind the node IP, the others direct or through the tunnel.
fn remote_node_addresses(b: &mut Builder<'_>, ctx: &NodeContext, r: &RemoteNode<'_>, remote_node_ids: &FewSet<u32>) {
    let objects = b.from_objects;
    let (n, cfg) = (r.node, &ctx.config);
    for a in &n.addresses {
        let is_internal = a.addr_type == "CiliumInternalIP";
        let mut ids = remote_node_ids.clone();
        ids.insert(7); // kube-apiserver backends get 7 (not knowable from the kvstore)
        if n.node_identity != 0 {
            ids.insert(n.node_identity);
        }
        let tunnels = if is_internal {
            set([r.underlay])
        } else if cfg.encryption == Some(false) && cfg.host_firewall == Some(false) {
            set([None])
        } else {
            set([None, r.underlay])
        };
        b.expect(IpNet::from(a.ip), || Expectation {
            identities: ids,
            tunnel_endpoints: tunnels,
            encrypt_keys: keys_for(cfg, n.encryption_key),
            // v1.10-v1.12 in "legacy" mode insert only the CiliumInternalIP.
            required: r.required && (is_internal || ctx.layout >= Layout::V1_14),
            rule: if objects { "remote node address (CiliumNode)" } else { r.rule("remote node address (nodes/v1)", "deleted node's address, in Cilium's hold-off (nodes/v1)") },
            kvstore_key: Some(n.meta.key.clone()),
            cluster: None,
        });
    }
}

/// Rules 7 and 8: other nodes' health IPs (identity health) and ingress IPs (identity
/// ingress), behind the node IP.
fn remote_health_and_ingress(b: &mut Builder<'_>, ctx: &NodeContext, r: &RemoteNode<'_>) {
    let objects = b.from_objects;
    let n = r.node;
    let mut keys = set([0, n.encryption_key]);
    if ctx.layout >= Layout::V1_15 {
        keys.insert(255); // WireGuard
    }
    let health = if objects { "remote health endpoint (CiliumNode)" } else { r.rule("remote health endpoint (nodes/v1)", "deleted node's health endpoint, in Cilium's hold-off (nodes/v1)") };
    let ingress = if objects { "remote ingress IP (CiliumNode)" } else { r.rule("remote ingress IP (nodes/v1)", "deleted node's ingress IP, in Cilium's hold-off (nodes/v1)") };
    for (ip, id, rule) in [
        (n.ipv4_health_ip, identity::HEALTH, health),
        (n.ipv6_health_ip, identity::HEALTH, health),
        (n.ipv4_ingress_ip, 8, ingress),
        (n.ipv6_ingress_ip, 8, ingress),
    ] {
        let Some(ip) = ip else { continue };
        b.expect(IpNet::from(ip), || Expectation {
            identities: set([id]),
            tunnel_endpoints: set([r.underlay]),
            encrypt_keys: if ctx.config.encryption.is_none() { None } else { Some(keys.clone()) },
            required: r.required,
            rule,
            kvstore_key: Some(n.meta.key.clone()),
            cluster: None,
        });
    }
}

/// Rule 9 (v1.18+): other nodes' pod CIDRs map to world behind the node IP.
fn remote_pod_cidrs(b: &mut Builder<'_>, ctx: &NodeContext, r: &RemoteNode<'_>, families: Families) {
    let objects = b.from_objects;
    if !ctx.layout.ipcache_v2() {
        return;
    }
    let n = r.node;
    let cidrs = n.ipv4_alloc_cidr.iter().chain(&n.ipv4_secondary_alloc_cidrs).chain(&n.ipv6_alloc_cidr).chain(&n.ipv6_secondary_alloc_cidrs);
    for c in cidrs {
        b.expect(c.trunc(), || Expectation {
            identities: world_identities(ctx.layout, families, c.addr().is_ipv6()),
            tunnel_endpoints: set([r.underlay]),
            encrypt_keys: keys_for(&ctx.config, n.encryption_key),
            required: r.required,
            rule: if objects { "remote pod CIDR (CiliumNode, v1.18+)" } else { r.rule("remote pod CIDR (nodes/v1, v1.18+)", "deleted node's pod CIDR, in Cilium's hold-off (nodes/v1, v1.18+)") },
            kvstore_key: Some(n.meta.key.clone()),
            cluster: None,
        });
    }
}

/// Tunnel map (v1.17 and older, tunnel mode): each of a node's alloc CIDRs → its IPv4 node IP.
fn remote_tunnel_entries(tunnel_map: &mut BTreeMap<IpAddr, ExpectedTunnel>, r: &RemoteNode<'_>) {
    let n = r.node;
    let Some(endpoint) = n.node_ip(true) else { return };
    for c in [n.ipv4_alloc_cidr, n.ipv6_alloc_cidr].into_iter().flatten() {
        let t = ExpectedTunnel { endpoint, encrypt_keys: set([0, n.encryption_key]), node_key: n.meta.key.to_string(), required: r.required };
        // A present node's entry wins over a deleted one's for the same CIDR.
        match tunnel_map.get(&c.network()) {
            Some(existing) if existing.required && !r.required => {}
            _ => {
                tunnel_map.insert(c.network(), t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expectation(identity: u32) -> Expectation {
        Expectation { identities: set([identity]), tunnel_endpoints: set([None]), encrypt_keys: Some(set([0])), required: true, rule: "test", kvstore_key: None, cluster: None }
    }

    #[test]
    fn the_expected_ipcache_finds_prefixes_while_built_and_after() {
        let prefixes: Vec<IpNet> = ["10.0.0.9/32", "10.0.0.1/32", "fd00::1/128", "10.0.0.0/8", "10.0.0.5/32"].iter().map(|p| p.parse().unwrap()).collect();
        let mut m = ExpectedIpcache::building(2);
        for (i, p) in prefixes.iter().enumerate() {
            m.insert(*p, expectation(i as u32));
        }
        m.get_mut(&prefixes[1]).unwrap().identities.insert(100);
        assert_eq!(m.get(&prefixes[0]).map(|e| e.identities.clone()), Some(set([0])));
        m.insert(prefixes[2], expectation(2));
        m.finish();
        assert_eq!(m.len(), prefixes.len());
        for (i, p) in prefixes.iter().enumerate() {
            let (at, e) = m.lookup(p).unwrap();
            assert_eq!(m.iter().nth(at).map(|(q, _)| q), Some(p));
            assert!(e.identities.contains(&(i as u32)));
        }
        assert!(m.get(&prefixes[1]).unwrap().identities.contains(&100));
        assert_eq!(m.get(&"10.0.0.2/32".parse().unwrap()), None);
        // Inserting after it is built still finds it, at its position.
        m.insert("10.0.0.2/32".parse().unwrap(), expectation(7));
        let (at, e) = m.lookup(&"10.0.0.2/32".parse().unwrap()).unwrap();
        assert_eq!((at, e.identities.clone()), (5, set([7])));
        assert_eq!(m.len(), 6);
        // Serialized, sorted, as the prefix -> expectation map it replaces.
        let as_map: BTreeMap<IpNet, Expectation> = m.iter().map(|(p, e)| (*p, e.clone())).collect();
        assert_eq!(serde_json::to_string(&m).unwrap(), serde_json::to_string(&as_map).unwrap());
    }
}
