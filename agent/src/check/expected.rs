//! What this node's datapath should hold, derived from the kvstore (pure logic, no I/O).
//!
//! Follows docs/cilium-expected-state.md: world entries, this node's own addresses, local and
//! remote pods from `ip/v1`, remote node addresses, health and ingress IPs, pod CIDRs (v1.18+),
//! and the tunnel map (v1.17 and older). Where the agent's configuration is unknown, an
//! expectation accepts every value Cilium can legitimately write, and says so.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::config::DatapathConfig;
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{IpEntry, NodeEntry};
use crate::model::identity;
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
    pub identities: BTreeSet<u32>,
    pub tunnel_endpoints: BTreeSet<Option<IpAddr>>,
    /// `None`: any key (encryption configuration unknown).
    pub encrypt_keys: Option<BTreeSet<u8>>,
    /// Required entries are reported missing; optional ones only checked when present.
    pub required: bool,
    /// The rule that produced it, e.g. `remote pod (ip/v1)`.
    pub rule: &'static str,
    /// The kvstore key behind it, if one.
    pub kvstore_key: Option<String>,
}

impl Expectation {
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
    pub encrypt_keys: BTreeSet<u8>,
    pub node_key: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExpectedState {
    pub ipcache: BTreeMap<IpNet, Expectation>,
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
}

fn set<T: Ord>(items: impl IntoIterator<Item = T>) -> BTreeSet<T> {
    items.into_iter().collect()
}

impl ExpectedState {
    fn expect(&mut self, prefix: IpNet, e: Expectation) {
        match self.ipcache.get_mut(&prefix) {
            Some(existing) => existing.merge(e),
            None => {
                self.ipcache.insert(prefix, e);
            }
        }
    }
}

/// Keys an entry may carry given the node's announced key `k`: exactly `k` when encryption is
/// known on, `0` when known off, and either when unknown.
fn keys_for(config: &DatapathConfig, k: u8) -> Option<BTreeSet<u8>> {
    match config.encryption {
        Some(false) => Some(set([0])),
        Some(true) => Some(set([k])),
        None => Some(set([0, k])),
    }
}

/// Everything the kvstore says this node's datapath should hold.
pub fn derive(snap: &KvstoreSnapshot, ctx: &NodeContext) -> ExpectedState {
    derive_in(snap, snap.ips.iter(), ctx, &|_| true)
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
    derive_in(snap, ips, ctx, &|p| prefixes.contains(p))
}

/// The addresses that make an `ip/v1` entry's HostIP this node: the node entry's addresses, or
/// the local interface addresses when there is no node entry.
pub fn node_addresses(snap: &KvstoreSnapshot, ctx: &NodeContext) -> BTreeSet<IpAddr> {
    match own_node(snap, ctx) {
        Some(n) => n.addresses.iter().map(|a| a.ip).collect(),
        None => ctx.local_addresses.clone(),
    }
}

fn own_node<'a>(snap: &'a KvstoreSnapshot, ctx: &NodeContext) -> Option<&'a NodeEntry> {
    snap.nodes.iter().find(|n| n.name == ctx.node_name && n.cluster == ctx.cluster)
}

/// Collects ipcache expectations for the prefixes it is asked about; the rest are not built.
struct Builder<'w> {
    exp: ExpectedState,
    wanted: &'w dyn Fn(&IpNet) -> bool,
}

impl Builder<'_> {
    fn expect(&mut self, prefix: IpNet, make: impl FnOnce() -> Expectation) {
        if (self.wanted)(&prefix) {
            self.exp.expect(prefix, make());
        }
    }
}

fn derive_in<'a>(snap: &KvstoreSnapshot, ips: impl Iterator<Item = &'a IpEntry>, ctx: &NodeContext, wanted: &dyn Fn(&IpNet) -> bool) -> ExpectedState {
    let mut b = Builder { exp: ExpectedState::default(), wanted };
    let cfg = &ctx.config;
    let layout = ctx.layout;
    let node = own_node(snap, ctx).cloned();

    let ipv4 = cfg.ipv4.unwrap_or(true);
    let ipv6 = cfg.ipv6.unwrap_or_else(|| {
        node.as_ref().is_some_and(|n| n.ipv6_alloc_cidr.is_some() || n.addresses.iter().any(|a| a.ip.is_ipv6()))
    });
    if cfg.ipv4.is_none() || cfg.ipv6.is_none() {
        b.exp.assumptions.push(format!(
            "address families not configured: assumed IPv4 {}, IPv6 {} (from the node entry)",
            if ipv4 { "on" } else { "off" },
            if ipv6 { "on" } else { "off" }
        ));
    }
    let world_keys = match cfg.encryption {
        Some(false) => Some(set([0])),
        _ => None,
    };
    // 1. World.
    let world = |v6: bool| -> BTreeSet<u32> {
        let mut ids = set([identity::WORLD]);
        if layout >= Layout::V1_15 && ipv4 && ipv6 {
            ids.insert(if v6 { 10 } else { 9 });
        }
        ids
    };
    for (on, prefix, v6) in [(ipv4, "0.0.0.0/0", false), (ipv6, "::/0", true)] {
        if on {
            b.expect(
                prefix.parse().unwrap_or_default(),
                || Expectation {
                    identities: world(v6),
                    tunnel_endpoints: set([None]),
                    encrypt_keys: world_keys.clone(),
                    required: true,
                    rule: "world",
                    kvstore_key: None,
                },
            );
        }
    }

    // 2./3. This node's own addresses: identity host, no tunnel; endpoint-map host entries.
    if let Some(n) = &node {
        for a in &n.addresses {
            b.exp.node_addresses.insert(a.ip);
            b.expect(
                IpNet::from(a.ip),
                || Expectation {
                    identities: set([identity::HOST]),
                    tunnel_endpoints: set([None]),
                    encrypt_keys: keys_for(cfg, n.encryption_key),
                    required: true,
                    rule: "this node's address (nodes/v1)",
                    kvstore_key: Some(n.meta.key.clone()),
                },
            );
            if ctx.local_addresses.contains(&a.ip) {
                b.exp.host_entries.insert(a.ip, true);
            }
        }
        for (health, v6) in [(n.ipv4_health_ip, false), (n.ipv6_health_ip, true)] {
            if let Some(ip) = health.filter(|_| if v6 { ipv6 } else { ipv4 }) {
                b.expect(
                    IpNet::from(ip),
                    || Expectation {
                        identities: set([identity::HEALTH]),
                        tunnel_endpoints: set([None]),
                        encrypt_keys: None,
                        required: true,
                        rule: "this node's health endpoint (nodes/v1)",
                        kvstore_key: Some(n.meta.key.clone()),
                    },
                );
            }
        }
    } else {
        // Without a node entry, the local addresses are the node's addresses.
        b.exp.node_addresses.extend(ctx.local_addresses.iter().copied());
    }
    for ip in &ctx.local_addresses {
        b.exp.host_entries.entry(*ip).or_insert(false);
        b.expect(
            IpNet::from(*ip),
            || Expectation {
                identities: set([identity::HOST]),
                tunnel_endpoints: set([None]),
                encrypt_keys: None,
                required: false,
                rule: "local interface address",
                kvstore_key: None,
            },
        );
    }
    b.exp.node = node.clone();

    // 4./5. Pods from ip/v1.
    let remote_node_ids: BTreeSet<u32> = match cfg.remote_node_identity {
        Some(true) => set([identity::REMOTE_NODE]),
        Some(false) => set([identity::HOST]),
        None => set([identity::HOST, identity::REMOTE_NODE]),
    };
    if cfg.remote_node_identity.is_none() {
        b.exp.assumptions.push("remote-node identity setting unknown: remote node addresses may carry identity 1 or 6".into());
    }
    if cfg.encryption.is_none() {
        b.exp.assumptions.push("encryption setting unknown: entries may carry key 0 or the owner's announced key".into());
    }
    for e in ips {
        let hosted_here = e.host_ip.is_some_and(|h| b.exp.node_addresses.contains(&h));
        let mut ids = set([e.identity]);
        if e.identity == identity::HOST {
            // Readers rewrite ID 1 to remote-node (v1.12+ with remote-node identity; always v1.16+).
            ids.extend(remote_node_ids.iter().copied());
        }
        let tunnel = if hosted_here {
            None
        } else {
            e.host_ip.filter(|h| h.is_ipv4() || layout.ipcache_v2())
        };
        b.expect(
            e.prefix,
            || Expectation {
                identities: ids,
                tunnel_endpoints: set([tunnel]),
                encrypt_keys: Some(set([e.encrypt_key])),
                required: true,
                rule: if hosted_here { "local pod (ip/v1)" } else { "remote pod (ip/v1)" },
                kvstore_key: Some(e.meta.key.clone()),
            },
        );
        if hosted_here && e.prefix.prefix_len() == e.prefix.max_prefix_len() {
            b.exp.local_ips.insert(e.prefix.addr(), e.clone());
        }
    }

    // 6.-9. Remote nodes.
    let tunnel_on = cfg.tunnel.unwrap_or(ctx.tunnel_map_in_use);
    if cfg.tunnel.is_none() && layout.has_tunnel_map() {
        b.exp.assumptions.push(format!(
            "routing mode unknown: assumed {} because the tunnel map {}",
            if tunnel_on { "tunnel" } else { "direct routing" },
            if tunnel_on { "has entries" } else { "is empty" }
        ));
    }
    let mut tunnel_map = BTreeMap::new();
    for n in snap.nodes.iter().filter(|n| !(n.name == ctx.node_name && n.cluster == ctx.cluster)) {
        // Cilium's underlay: the IPv4 node IP through v1.17; v1.18+ may use IPv6.
        let underlay = n.node_ip(true).or_else(|| if layout.ipcache_v2() { n.node_ip(false) } else { None });
        let key_any = keys_for(cfg, n.encryption_key);
        for a in &n.addresses {
            let is_internal = a.addr_type == "CiliumInternalIP";
            let mut ids = remote_node_ids.clone();
            ids.insert(7); // kube-apiserver backends get 7 (not knowable from the kvstore)
            if n.node_identity != 0 {
                ids.insert(n.node_identity);
            }
            let tunnels = if is_internal {
                set([underlay])
            } else if cfg.encryption == Some(false) && cfg.host_firewall == Some(false) {
                set([None])
            } else {
                set([None, underlay])
            };
            b.expect(
                IpNet::from(a.ip),
                || Expectation {
                    identities: ids,
                    tunnel_endpoints: tunnels,
                    encrypt_keys: key_any.clone(),
                    // v1.10-v1.12 in "legacy" mode insert only the CiliumInternalIP.
                    required: is_internal || layout >= Layout::V1_14,
                    rule: "remote node address (nodes/v1)",
                    kvstore_key: Some(n.meta.key.clone()),
                },
            );
        }
        let mut health_keys = set([0, n.encryption_key]);
        if layout >= Layout::V1_15 {
            health_keys.insert(255); // WireGuard
        }
        for (ip, id, rule) in [
            (n.ipv4_health_ip, identity::HEALTH, "remote health endpoint (nodes/v1)"),
            (n.ipv6_health_ip, identity::HEALTH, "remote health endpoint (nodes/v1)"),
            (n.ipv4_ingress_ip, 8, "remote ingress IP (nodes/v1)"),
            (n.ipv6_ingress_ip, 8, "remote ingress IP (nodes/v1)"),
        ] {
            let Some(ip) = ip else { continue };
            b.expect(
                IpNet::from(ip),
                || Expectation {
                    identities: set([id]),
                    tunnel_endpoints: set([underlay]),
                    encrypt_keys: if cfg.encryption.is_none() { None } else { Some(health_keys.clone()) },
                    required: true,
                    rule,
                    kvstore_key: Some(n.meta.key.clone()),
                },
            );
        }
        if layout.ipcache_v2() {
            let cidrs = n.ipv4_alloc_cidr.iter().chain(&n.ipv4_secondary_alloc_cidrs).chain(&n.ipv6_alloc_cidr).chain(&n.ipv6_secondary_alloc_cidrs);
            for c in cidrs {
                b.expect(
                    c.trunc(),
                    || Expectation {
                        identities: world(c.addr().is_ipv6()),
                        tunnel_endpoints: set([underlay]),
                        encrypt_keys: key_any.clone(),
                        required: true,
                        rule: "remote pod CIDR (nodes/v1, v1.18+)",
                        kvstore_key: Some(n.meta.key.clone()),
                    },
                );
            }
        }
        if layout.has_tunnel_map() && tunnel_on {
            if let Some(endpoint) = n.node_ip(true) {
                for c in [n.ipv4_alloc_cidr, n.ipv6_alloc_cidr].into_iter().flatten() {
                    tunnel_map.insert(
                        c.network(),
                        ExpectedTunnel { endpoint, encrypt_keys: set([0, n.encryption_key]), node_key: n.meta.key.clone() },
                    );
                }
            }
        }
    }
    b.exp.tunnel = (layout.has_tunnel_map() && tunnel_on).then_some(tunnel_map);
    b.exp
}
