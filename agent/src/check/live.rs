//! The agent's check, kept current change by change (pure: no I/O).
//!
//! A full check derives and diffs ~100k kvstore entries against a ~500k-entry ipcache. The
//! agent does that once, and again on each resync. In between it applies every kvstore and map
//! change to its copies of both sides and re-checks only the ipcache prefixes the changes
//! touched, plus the node-scale sections (local endpoints, identities, this node, the tunnel
//! map, kvstore health, map pressure), which are small enough to recompute every time. A change
//! it cannot place precisely (this node's own entry, new host addresses) makes the next
//! re-check a full one, still in memory; an undecodable map entry asks the caller to re-read
//! the maps.

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;

use super::config::DatapathConfig;
use super::diff::{self, Finding, Observed};
use super::expected;
use super::kinds::FindingKind;
use super::run::{self, Reading};
use crate::datapath::addresses::HostAddresses;
use crate::datapath::events::{DatapathChange, Entry};
use crate::datapath::ipcache::IpcacheEntry;
use crate::datapath::{DatapathSnapshot, MapDump};
use crate::kvstore::history::HeldNode;
use crate::kvstore::reader::{self, KvstoreSnapshot};
use crate::kvstore::values::{KvMeta, NodeEntry, IP_PREFIX, NODES_PREFIX};
use crate::kvstore::watch::Change;
use crate::model::identity::{self, IdentityScope};

/// What a re-check looked at: findings outside it are left as they were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Full,
    /// These ipcache prefixes (as finding subjects) and the node-scale sections.
    Prefixes(HashSet<String>),
}

impl Scope {
    /// Whether a finding with this id would have been reported by the re-check, had it held.
    pub fn covers(&self, (kind, subject): &(FindingKind, String)) -> bool {
        match self {
            Scope::Full => true,
            Scope::Prefixes(p) => !diff::is_ipcache_kind(*kind) || p.contains(subject),
        }
    }
}

/// The findings of one re-check and what it covered.
#[derive(Debug)]
pub struct Recheck {
    pub findings: Vec<Finding>,
    pub scope: Scope,
}

pub struct LiveCheck {
    node_name: String,
    cluster: String,
    config: DatapathConfig,
    reading: Reading,
    /// `ip/v1` key → position in `reading.kvstore.ips`.
    ip_at: HashMap<Box<str>, usize>,
    /// Keys of the `ip/v1` entries hosted on this node (HostIP in `hosts`), as of the last full
    /// re-check and the changes since: a scoped re-check derives from these and the touched
    /// prefixes' entries instead of filtering all ~100k.
    hosted: HashSet<Box<str>>,
    hosts: std::collections::BTreeSet<std::net::IpAddr>,
    /// `ip/v1` keys outside Cilium's one address space (`default`): their key cannot be found
    /// from the prefix, so scoped re-checks filter all entries while there are any.
    other_spaces: usize,
    /// Ipcache entries changed since `reading.datapath.ipcache.entries` (kept sorted by prefix
    /// and cluster id, so looked up by binary search) was last merged: `None` = removed. An
    /// index over 500k entries would cost ~35 MB; this costs what changed.
    ipcache_changes: HashMap<(IpNet, u16), Option<IpcacheEntry>>,
    touched: HashSet<IpNet>,
    /// Global identity → `ip/v1` entries plus observed ipcache entries (cluster 0) using it,
    /// kept with the changes: the identities section of a scoped re-check covers the node.
    id_users: HashMap<u32, usize>,
    /// Cilium's node-delete hold-off: a remote node's entries stay expected (optional) this
    /// long after its key was seen deleted.
    hold_off: std::time::Duration,
    full: bool,
    reread: bool,
}

impl LiveCheck {
    /// Takes a full reading of the node `node_name` of `cluster`; the first
    /// [`LiveCheck::recheck`] is a full check.
    pub fn new(node_name: &str, cluster: &str, config: DatapathConfig, reading: Reading) -> LiveCheck {
        let mut live = LiveCheck {
            node_name: node_name.to_owned(),
            cluster: cluster.to_owned(),
            config,
            reading,
            ip_at: HashMap::new(),
            hosted: HashSet::new(),
            hosts: Default::default(),
            other_spaces: 0,
            ipcache_changes: HashMap::new(),
            touched: HashSet::new(),
            id_users: HashMap::new(),
            hold_off: std::time::Duration::ZERO,
            full: true,
            reread: false,
        };
        live.index_kvstore();
        live.sort_ipcache();
        live.count_identity_users();
        live
    }

    fn count_identity_users(&mut self) {
        let ips = self.reading.kvstore.ips.iter().map(|e| e.identity);
        let observed = self.reading.datapath.ipcache.entries.iter().filter(|e| e.cluster_id == 0).map(|e| e.identity);
        let mut users: HashMap<u32, usize> = HashMap::new();
        for id in ips.chain(observed).filter(|id| identity::scope(*id) == IdentityScope::Global) {
            *users.entry(id).or_default() += 1;
        }
        self.id_users = users;
    }

    fn count_identity(&mut self, id: u32, delta: isize) {
        if identity::scope(id) != IdentityScope::Global {
            return;
        }
        let n = self.id_users.entry(id).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.id_users.remove(&id);
        }
    }

    /// The identities in use, with evidence prefixes for those the kvstore lacks (rare: the
    /// entries are scanned only then).
    fn identity_users(&self) -> diff::IdentityUsers {
        let kv = &self.reading.kvstore;
        let missing: HashSet<u32> = self.id_users.keys().copied().filter(|id| !kv.identities.contains_key(id)).collect();
        let mut users = diff::IdentityUsers::default();
        if !missing.is_empty() {
            let ips = kv.ips.iter().filter(|e| missing.contains(&e.identity));
            let sorted = self.reading.datapath.ipcache.entries.iter().filter(|e| !self.ipcache_changes.contains_key(&(e.prefix, e.cluster_id)));
            let observed = sorted.chain(self.ipcache_changes.values().flatten()).filter(|e| missing.contains(&e.identity));
            users = diff::IdentityUsers::of(ips, observed);
        }
        for (id, n) in &self.id_users {
            users.by_id.entry(*id).or_default().0 = *n;
        }
        users
    }

    fn index_kvstore(&mut self) {
        let ips = &self.reading.kvstore.ips;
        self.ip_at = ips.iter().enumerate().map(|(i, e)| (Box::from(e.meta.key.as_str()), i)).collect();
        self.other_spaces = ips.iter().filter(|e| !e.meta.key.starts_with(DEFAULT_SPACE)).count();
    }

    fn sort_ipcache(&mut self) {
        self.reading.datapath.ipcache.entries.sort_unstable_by_key(|e| (e.prefix, e.cluster_id));
        self.ipcache_changes.clear();
    }

    /// The ipcache entry for `key` as the map holds it now.
    fn ipcache_entry(&self, key: &(IpNet, u16)) -> Option<&IpcacheEntry> {
        match self.ipcache_changes.get(key) {
            Some(changed) => changed.as_ref(),
            None => {
                let entries = &self.reading.datapath.ipcache.entries;
                entries.binary_search_by(|e| (e.prefix, e.cluster_id).cmp(key)).ok().map(|i| &entries[i])
            }
        }
    }

    fn set_ipcache_entry(&mut self, key: (IpNet, u16), entry: Option<IpcacheEntry>) {
        let old_id = self.ipcache_entry(&key).map(|e| e.identity);
        let existed = old_id.is_some();
        if key.1 == 0 {
            for (id, delta) in [(old_id, -1), (entry.as_ref().map(|e| e.identity), 1)] {
                if let Some(id) = id {
                    self.count_identity(id, delta);
                }
            }
        }
        let dump = &mut self.reading.datapath.ipcache;
        dump.entry_count = (dump.entry_count + usize::from(entry.is_some())).saturating_sub(usize::from(existed));
        fill(dump);
        self.ipcache_changes.insert(key, entry);
        if self.ipcache_changes.len() > MAX_IPCACHE_CHANGES {
            self.merge_ipcache_changes();
        }
    }

    /// Folds the changed entries into the sorted list (before a full check reads it).
    fn merge_ipcache_changes(&mut self) {
        if self.ipcache_changes.is_empty() {
            return;
        }
        let entries = &mut self.reading.datapath.ipcache.entries;
        let mut changed = std::mem::take(&mut self.ipcache_changes);
        entries.retain(|e| !changed.contains_key(&(e.prefix, e.cluster_id)));
        entries.extend(changed.drain().filter_map(|(_, e)| e));
        entries.sort_unstable_by_key(|e| (e.prefix, e.cluster_id));
    }

    pub fn reading(&self) -> &Reading {
        &self.reading
    }

    /// Whether a map change could not be applied: the caller re-reads the maps
    /// ([`LiveCheck::replace_datapath`]).
    pub fn needs_reread(&self) -> bool {
        self.reread
    }

    pub fn replace_datapath(&mut self, datapath: DatapathSnapshot, host: HostAddresses) {
        self.reading.datapath = datapath;
        self.reading.host = host;
        self.reading.datapath_read_at = chrono::Utc::now();
        self.sort_ipcache();
        self.count_identity_users();
        self.full = true;
        self.reread = false;
    }

    pub fn replace_kvstore(&mut self, mut kvstore: KvstoreSnapshot) {
        kvstore.held_nodes = std::mem::take(&mut self.reading.kvstore.held_nodes);
        self.reading.kvstore = kvstore;
        self.reading.kvstore_read_at = chrono::Utc::now();
        self.index_kvstore();
        self.count_identity_users();
        self.full = true;
    }

    /// CRD mode: the objects as the Kubernetes watch now holds them, and the ipcache prefixes its
    /// events touched (re-checked); a change of this node's own CiliumNode re-checks all.
    pub fn replace_objects(&mut self, kvstore: KvstoreSnapshot, touched: &[IpNet], own_node: bool) {
        self.reading.kvstore = kvstore;
        self.reading.kvstore_read_at = chrono::Utc::now();
        self.index_kvstore();
        self.count_identity_users();
        self.touched.extend(touched.iter().copied());
        self.full |= own_node;
    }

    /// Identities kept as CiliumIdentity objects (beside a kvstore): `fill` puts them in.
    pub fn set_identities(&mut self, fill: impl FnOnce(&mut KvstoreSnapshot)) {
        fill(&mut self.reading.kvstore);
    }

    /// New interface addresses: local addresses feed the expectations, so a full re-check
    /// follows when they changed.
    pub fn set_host(&mut self, host: HostAddresses) {
        if run::local_addresses(&host) != run::local_addresses(&self.reading.host) {
            self.full = true;
        }
        self.reading.host = host;
    }

    pub fn set_config(&mut self, config: DatapathConfig) {
        if config != self.config {
            self.full = true;
        }
        self.config = config;
    }

    pub fn set_health(&mut self, health: crate::kvstore::health::ClusterHealth) {
        self.reading.health = health;
    }

    /// Models Cilium's node-delete hold-off (0: a deleted node's entries are stale at once).
    pub fn set_hold_off(&mut self, hold_off: std::time::Duration) {
        self.hold_off = hold_off;
    }

    /// Nodes deleted before the agent started whose hold-off may not have ended (found in
    /// etcd's history).
    pub fn hold_nodes(&mut self, held: Vec<HeldNode>) {
        for h in held {
            self.touched.extend(node_prefixes(&h.node));
            self.reading.kvstore.held_nodes.retain(|x| x.key() != h.key());
            self.reading.kvstore.held_nodes.push(h);
        }
    }

    /// The nodes in their hold-off.
    pub fn held_nodes(&self) -> &[HeldNode] {
        &self.reading.kvstore.held_nodes
    }

    /// Ends the hold-offs due by `now`; their nodes' entries are re-checked (now stale if
    /// still there). Returns whether any ended.
    pub fn expire_held(&mut self, now: chrono::DateTime<chrono::Utc>) -> bool {
        let (done, keep): (Vec<HeldNode>, Vec<HeldNode>) = std::mem::take(&mut self.reading.kvstore.held_nodes).into_iter().partition(|h| h.held_until <= now);
        self.reading.kvstore.held_nodes = keep;
        for h in &done {
            self.touched.extend(node_prefixes(&h.node));
        }
        !done.is_empty()
    }

    /// When the next hold-off ends.
    pub fn next_hold_end(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.reading.kvstore.held_nodes.iter().map(|h| h.held_until).min()
    }

    /// A remote node's key was deleted at `revision`: Cilium keeps its entries for the hold-off.
    fn hold_deleted_node(&mut self, key: &str, revision: i64) {
        let Some(n) = self.reading.kvstore.nodes.iter().find(|n| n.meta.key == key) else { return };
        if self.hold_off.is_zero() || (n.name == self.node_name && n.cluster == self.cluster) {
            return;
        }
        let now = chrono::Utc::now();
        let held = HeldNode {
            node: n.clone(),
            deleted_revision: revision,
            deleted_after: None,
            deleted_by: now,
            held_until: now + chrono::Duration::from_std(self.hold_off).unwrap_or_default(),
            bounded_by: "seen deleted on kvcheck's watch".into(),
        };
        self.hold_nodes(vec![held]);
    }

    /// Applies watch changes (already in revision order) to the kvstore copy.
    pub fn apply_kvstore(&mut self, changes: &[Change], revision: i64) {
        for c in changes {
            let key = c.key();
            self.touch_key(key);
            if key.starts_with(NODES_PREFIX) {
                match c {
                    Change::Delete { mod_revision, .. } => self.hold_deleted_node(key, *mod_revision),
                    // Back within the hold-off: Cilium drops the pending delete.
                    Change::Put { .. } => self.reading.kvstore.held_nodes.retain(|h| h.key() != key),
                }
            }
            self.remove_key(key);
            if let Change::Put { key, value, mod_revision, lease } = c {
                let meta = KvMeta { key: key.clone(), mod_revision: *mod_revision, lease: *lease };
                let snap = &mut self.reading.kvstore;
                let before = snap.ips.len();
                reader::decode_raw_into(snap, std::iter::once((meta, value.as_bytes())), None);
                if let Some(e) = snap.ips.get(before) {
                    let id = e.identity;
                    self.ip_at.insert(Box::from(key.as_str()), before);
                    if e.host_ip.is_some_and(|h| self.hosts.contains(&h)) {
                        self.hosted.insert(Box::from(key.as_str()));
                    }
                    self.other_spaces += usize::from(!key.starts_with(DEFAULT_SPACE));
                    self.count_identity(id, 1);
                }
                self.touch_key(key);
            }
        }
        self.reading.kvstore.revision = self.reading.kvstore.revision.max(revision);
        self.reading.kvstore_read_at = chrono::Utc::now();
    }

    /// Marks what the value now under `key` makes the ipcache expect.
    fn touch_key(&mut self, key: &str) {
        if key.starts_with(IP_PREFIX) {
            if let Some(e) = self.ip_at.get(key).map(|i| &self.reading.kvstore.ips[*i]) {
                self.touched.insert(e.prefix);
            }
        } else if key.starts_with(NODES_PREFIX) {
            let Some(n) = self.reading.kvstore.nodes.iter().find(|n| n.meta.key == key) else { return };
            if n.name == self.node_name && n.cluster == self.cluster {
                // This node's addresses decide which pods are local: everything may change.
                self.full = true;
            } else {
                self.touched.extend(node_prefixes(n));
            }
        }
    }

    fn remove_key(&mut self, key: &str) {
        if let Some(id) = self.ip_at.get(key).map(|i| self.reading.kvstore.ips[*i].identity) {
            self.count_identity(id, -1);
        }
        let snap = &mut self.reading.kvstore;
        if key.starts_with(IP_PREFIX) {
            if let Some(i) = self.ip_at.remove(key) {
                self.hosted.remove(key);
                self.other_spaces -= usize::from(!key.starts_with(DEFAULT_SPACE));
                snap.ips.swap_remove(i);
                if let Some(moved) = snap.ips.get(i) {
                    self.ip_at.insert(Box::from(moved.meta.key.as_str()), i);
                }
            }
            snap.malformed.retain(|m| m.meta.key != key);
        } else {
            snap.remove_key(key);
        }
    }

    /// Applies confirmed map changes to the datapath copy.
    pub fn apply_datapath(&mut self, changes: &[DatapathChange]) {
        for c in changes {
            if c.undecodable {
                self.reread = true;
                continue;
            }
            let dp = &mut self.reading.datapath;
            match (&c.old_entry, &c.new_entry) {
                (Some(Entry::Ipcache(_)), _) | (_, Some(Entry::Ipcache(_))) => {
                    // Remove what is held under the old and the new key, then add the new
                    // entry: an event for a change the last read already saw stays idempotent.
                    if let Some(Entry::Ipcache(old)) = &c.old_entry {
                        self.touched.insert(old.prefix);
                        self.set_ipcache_entry((old.prefix, old.cluster_id), None);
                    }
                    if let Some(Entry::Ipcache(new)) = &c.new_entry {
                        self.touched.insert(new.prefix);
                        self.set_ipcache_entry((new.prefix, new.cluster_id), Some(new.clone()));
                    }
                }
                (Some(Entry::Endpoint(_)), _) | (_, Some(Entry::Endpoint(_))) => {
                    for e in [&c.old_entry, &c.new_entry] {
                        if let Some(Entry::Endpoint(e)) = e {
                            dp.endpoints.entries.retain(|x| !(x.ip == e.ip && x.cluster_id == e.cluster_id));
                        }
                    }
                    if let Some(Entry::Endpoint(new)) = &c.new_entry {
                        dp.endpoints.entries.push(new.clone());
                    }
                    recount(&mut dp.endpoints);
                }
                (Some(Entry::Tunnel(_)), _) | (_, Some(Entry::Tunnel(_))) => {
                    let Some(t) = dp.tunnel.as_mut() else {
                        self.reread = true;
                        continue;
                    };
                    for e in [&c.old_entry, &c.new_entry] {
                        if let Some(Entry::Tunnel(e)) = e {
                            t.entries.retain(|x| !(x.prefix == e.prefix && x.cluster_id == e.cluster_id));
                        }
                    }
                    if let Some(Entry::Tunnel(new)) = &c.new_entry {
                        t.entries.push(new.clone());
                    }
                    recount(t);
                }
                (None, None) => {}
            }
        }
        self.reading.datapath_read_at = chrono::Utc::now();
    }

    /// A full re-check now (merging the changed map entries first).
    pub fn recheck_all(&mut self) -> Recheck {
        self.full = true;
        self.recheck()
    }

    /// Re-checks what changed since the last re-check (everything the first time).
    pub fn recheck(&mut self) -> Recheck {
        self.reading.kvstore_read_at = chrono::Utc::now();
        let ctx = run::context(&self.node_name, &self.cluster, self.config.clone(), &self.reading);
        let out = if self.full {
            self.merge_ipcache_changes();
            let kv = &self.reading.kvstore;
            self.hosts = expected::node_addresses(kv, &ctx);
            self.hosted = kv.ips.iter().filter(|e| e.host_ip.is_some_and(|h| self.hosts.contains(&h))).map(|e| Box::from(e.meta.key.as_str())).collect();
            let (findings, _) = run::evaluate(&ctx, &self.reading);
            Recheck { findings, scope: Scope::Full }
        } else {
            let kv = &self.reading.kvstore;
            let exp = if self.other_spaces > 0 {
                expected::derive_scoped(kv, &ctx, &self.touched)
            } else {
                let touched = self.touched.iter().filter_map(|p| self.ip_at.get(diff::ip_key(p).as_str()));
                let at: std::collections::BTreeSet<usize> = touched.chain(self.hosted.iter().filter_map(|k| self.ip_at.get(k))).copied().collect();
                expected::derive_for(kv, &ctx, &self.touched, at.into_iter().map(|i| &kv.ips[i]))
            };
            let r = &self.reading;
            let obs = Observed { datapath: &r.datapath, host: &r.host, kvstore: &r.kvstore, now: r.kvstore_read_at };
            let users = self.identity_users();
            let findings = diff::diff_scoped(&exp, &ctx, &obs, self.touched.iter(), |p| self.ipcache_entry(&(*p, 0)), &users);
            Recheck { findings, scope: Scope::Prefixes(self.touched.iter().map(ToString::to_string).collect()) }
        };
        self.touched.clear();
        self.full = false;
        out
    }
}

/// The `ip/v1` address space Cilium writes every entry in.
const DEFAULT_SPACE: &str = "cilium/state/ip/v1/default/";

/// Changed ipcache entries kept aside before they are merged into the sorted list.
const MAX_IPCACHE_CHANGES: usize = 65_536;

fn recount<T>(dump: &mut MapDump<T>) {
    dump.entry_count = dump.entries.len() + dump.undecodable.len();
    fill(dump);
}

fn fill<T>(dump: &mut MapDump<T>) {
    dump.fill_ratio = if dump.meta.max_entries == 0 { 0.0 } else { dump.entry_count as f64 / f64::from(dump.meta.max_entries) };
}

/// The ipcache prefixes a remote node's entry gives expectations for.
pub fn node_prefixes(n: &NodeEntry) -> Vec<IpNet> {
    let ips = n.addresses.iter().map(|a| a.ip).chain([n.ipv4_health_ip, n.ipv6_health_ip, n.ipv4_ingress_ip, n.ipv6_ingress_ip].into_iter().flatten());
    let cidrs = n.ipv4_alloc_cidr.iter().chain(&n.ipv4_secondary_alloc_cidrs).chain(&n.ipv6_alloc_cidr).chain(&n.ipv6_secondary_alloc_cidrs).map(IpNet::trunc);
    ips.map(IpNet::from).chain(cidrs).collect()
}

#[cfg(test)]
mod tests {
    //! The incremental re-check must agree with a full check of the same state.
    use super::*;

    // Covered with real maps and etcd in tests/tests/agent.rs; here the bookkeeping alone.
    #[test]
    fn scope_covers_node_sections_and_touched_prefixes() {
        let s = Scope::Prefixes(["10.0.0.1/32".to_owned()].into());
        assert!(s.covers(&(FindingKind::IpcacheStale, "10.0.0.1/32".into())));
        assert!(!s.covers(&(FindingKind::IpcacheStale, "10.0.0.2/32".into())));
        assert!(s.covers(&(FindingKind::EndpointNotInKvstore, "10.0.0.2".into())));
        assert!(Scope::Full.covers(&(FindingKind::IpcacheMissing, "x".into())));
    }
}
