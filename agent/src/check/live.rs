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
use super::ip_index::IpIndex;
use super::kinds::FindingKind;
use super::run::{self, Reading};
use crate::datapath::addresses::HostAddresses;
use crate::datapath::events::{DatapathChange, Entry, IpcacheCopy};
use crate::datapath::ipcache::IpcacheEntry;
use crate::datapath::{DatapathSnapshot, MapDump};
use crate::kvstore::values::HeldNode;
use crate::k8s::decode;
use crate::k8s::watch::{DecodedObject, ObjectChange};
use crate::kvstore::reader;
use crate::kvstore::values::{KvMeta, NodeEntry, IP_DEFAULT_SPACE, IP_PREFIX, NODES_PREFIX};
use crate::kvstore::watch::Change;
use crate::model::identity::{self, IdentityScope};
use crate::model::source::StateSource;

/// Cilium's kvstore identities (`id/` and `value/` keys).
const IDENTITIES_PREFIX: &str = "cilium/state/identities/v1/";

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
    ip_at: IpIndex,
    /// CRD mode: CiliumEndpoint (or CiliumEndpointSlice) → positions of its entries in
    /// `reading.kvstore.ips`. The live check holds the objects' entries; the Kubernetes watch
    /// only their names.
    objects: HashMap<Box<str>, Box<[u32]>>,
    /// Identities are CiliumIdentity objects (applied with the other objects), not kvstore keys.
    identities_from_objects: bool,
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
    /// The Cilium agent's view of its remote clusters (its API), when known: only what it
    /// has synced is judged.
    cilium_mesh: Option<Vec<crate::cilium::models::RemoteCluster>>,
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
            ip_at: IpIndex::default(),
            objects: HashMap::new(),
            identities_from_objects: false,
            hosted: HashSet::new(),
            hosts: Default::default(),
            other_spaces: 0,
            ipcache_changes: HashMap::new(),
            touched: HashSet::new(),
            id_users: HashMap::new(),
            hold_off: std::time::Duration::ZERO,
            cilium_mesh: None,
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
        // (A remote cluster's identities are in its own kvstore.)
        let in_remote = |id: &u32| kv.mesh.as_ref().and_then(|m| m.remote_of_identity(*id)).is_some_and(|r| r.identities.contains_key(id));
        let missing: HashSet<u32> = self.id_users.keys().copied().filter(|id| !kv.identities.contains_key(id) && !in_remote(id)).collect();
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
        let mut objects = HashMap::<Box<str>, Vec<u32>>::new();
        for (i, e) in ips.iter().enumerate().filter(|(_, e)| !e.meta.key.starts_with(IP_PREFIX)) {
            objects.entry(decode::object_of(&e.meta.key).into()).or_default().push(i as u32);
        }
        self.ip_at = IpIndex::of(ips, |e| e.meta.key.starts_with(IP_PREFIX));
        self.objects = objects.into_iter().map(|(k, v)| (k, v.into())).collect();
        self.other_spaces = ips.iter().filter(|e| !e.meta.key.starts_with(IP_DEFAULT_SPACE)).count();
    }

    /// Removes the `ip/v1` entry at `i` (the last one takes its place, and its index entry
    /// follows).
    fn swap_remove_ip(&mut self, i: usize) {
        let snap = &mut self.reading.kvstore;
        let last = snap.ips.len() - 1;
        let gone = snap.ips.swap_remove(i);
        self.count_identity(gone.identity, -1);
        self.other_spaces -= usize::from(!gone.meta.key.starts_with(IP_DEFAULT_SPACE));
        let Some(moved) = self.reading.kvstore.ips.get(i) else { return };
        if moved.meta.key.starts_with(IP_PREFIX) {
            self.ip_at.moved(&self.reading.kvstore.ips, last, i);
        } else if let Some(at) = self.objects.get_mut(decode::object_of(&moved.meta.key)) {
            for p in at.iter_mut().filter(|p| **p as usize == last) {
                *p = i as u32;
            }
        }
    }

    /// CRD mode (and CiliumIdentities beside a kvstore): applies what the Kubernetes watch saw,
    /// in order. An object applied again with the same entries (CiliumEndpoints are rewritten
    /// for fields kvcheck does not read) changes nothing and touches nothing.
    pub fn apply_objects(&mut self, changes: Vec<ObjectChange>) {
        for c in changes {
            match c {
                ObjectChange::Delete(object) => self.remove_object(&object),
                ObjectChange::Apply(d) => {
                    if self.holds_object(&d) {
                        continue;
                    }
                    self.remove_object(&d.object);
                    self.insert_object(d);
                }
            }
        }
        let kv = &mut self.reading.kvstore;
        (kv.counts.nodes, kv.counts.ips, kv.counts.identities) = (kv.nodes.len(), kv.ips.len(), kv.identities.len());
        self.reading.kvstore_read_at = chrono::Utc::now();
    }

    /// Whether the object's entries are held as decoded but for their resourceVersion (then
    /// brought to it: the evidence names the object's current version).
    fn holds_object(&mut self, d: &DecodedObject) -> bool {
        let kv = &self.reading.kvstore;
        let at: &[u32] = self.objects.get(d.object.as_str()).map_or(&[], |at| at);
        let node = self.node_at(&d.object);
        let held_identity = d.identity.as_ref().and_then(|i| kv.identities.get(&i.id));
        let same = at.len() == d.ips.len()
            && at.iter().zip(&d.ips).all(|(i, e)| same_but_revision(&kv.ips[*i as usize], e, |x| &mut x.meta))
            && match (node.map(|i| &kv.nodes[i]), &d.node) {
                (Some(a), Some(b)) => same_but_revision(a, b, |x| &mut x.meta),
                (a, b) => a.is_none() && b.is_none(),
            }
            && match (held_identity, &d.identity) {
                (Some(a), Some(b)) => same_but_revision(a, b, |x| &mut x.meta),
                (a, b) => a.is_none() && b.is_none(),
            }
            && d.malformed.is_empty()
            && !kv.malformed.iter().any(|m| decode::object_of(&m.meta.key) == d.object);
        if !same {
            return false;
        }
        let at = at.to_vec();
        let kv = &mut self.reading.kvstore;
        for (i, e) in at.iter().zip(&d.ips) {
            kv.ips[*i as usize].meta.mod_revision = e.meta.mod_revision;
        }
        if let (Some(i), Some(n)) = (node, &d.node) {
            kv.nodes[i].meta.mod_revision = n.meta.mod_revision;
        }
        if let Some(i) = &d.identity
            && let Some(held) = kv.identities.get_mut(&i.id)
        {
            held.meta.mod_revision = i.meta.mod_revision;
        }
        true
    }

    /// The held node entry of a CiliumNode object (other objects never have one: no scan of
    /// the nodes for each of the many CiliumEndpoint changes).
    fn node_at(&self, object: &str) -> Option<usize> {
        object.starts_with("CiliumNode ").then(|| self.reading.kvstore.nodes.iter().position(|n| &*n.meta.key == object)).flatten()
    }

    fn remove_object(&mut self, object: &str) {
        if let Some(at) = self.objects.remove(object) {
            let mut at: Vec<usize> = at.iter().map(|i| *i as usize).collect();
            // Highest first: what swap_remove moves down is never one still to remove.
            at.sort_unstable_by(|a, b| b.cmp(a));
            for i in at {
                self.touched.insert(self.reading.kvstore.ips[i].prefix);
                self.swap_remove_ip(i);
            }
        }
        if let Some(i) = self.node_at(object) {
            let n = self.reading.kvstore.nodes.remove(i);
            self.touch_node(&n);
        }
        let kv = &mut self.reading.kvstore;
        if let Some(id) = object.strip_prefix("CiliumIdentity ").and_then(|id| id.parse::<u32>().ok()) {
            kv.identities.remove(&id);
        }
        kv.malformed.retain(|m| decode::object_of(&m.meta.key) != object);
    }

    fn insert_object(&mut self, d: DecodedObject) {
        let DecodedObject { object, ips, node, identity, malformed } = d;
        let kv = &mut self.reading.kvstore;
        if !ips.is_empty() {
            let at: Box<[u32]> = (kv.ips.len()..kv.ips.len() + ips.len()).map(|i| i as u32).collect();
            for e in &ips {
                self.touched.insert(e.prefix);
                self.other_spaces += usize::from(!e.meta.key.starts_with(IP_DEFAULT_SPACE));
                self.count_identity(e.identity, 1);
            }
            self.reading.kvstore.ips.extend(ips);
            self.objects.insert(object.into(), at);
        }
        let kv = &mut self.reading.kvstore;
        if let Some(n) = node {
            // Sorted by reference, as listed: dumps stay stable.
            let i = kv.nodes.partition_point(|x| x.meta.key < n.meta.key);
            self.touch_node(&n);
            self.reading.kvstore.nodes.insert(i, n);
        }
        let kv = &mut self.reading.kvstore;
        if let Some(i) = identity {
            kv.identities.insert(i.id, i);
        }
        kv.malformed.extend(malformed);
    }

    /// A node entry came or went: its prefixes are re-checked (all, for this node's own).
    fn touch_node(&mut self, n: &NodeEntry) {
        if n.name == self.node_name && n.cluster == self.cluster {
            // This node's addresses decide which pods are local: everything may change.
            self.full = true;
        } else {
            self.touched.extend(node_prefixes(n));
        }
    }

    /// Identities come from CiliumIdentity objects (beside a kvstore): the kvstore's are
    /// dropped, and its identity keys ignored from now on.
    pub fn take_identities_from_objects(&mut self) {
        self.identities_from_objects = true;
        let kv = &mut self.reading.kvstore;
        kv.identities.clear();
        kv.identity_references.clear();
        kv.counts.identities = 0;
        kv.origin.identities = StateSource::Kubernetes;
        kv.origin.identities_unread = None;
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

    /// ClusterMesh: the remote clusters as first read (or read again after the config
    /// directory changed); everything is re-checked.
    pub fn set_mesh(&mut self, mesh: Option<crate::clustermesh::Mesh>) {
        self.reading.kvstore.mesh = mesh.map(Box::new);
        self.gate_mesh();
        self.full = true;
    }

    /// One remote cluster's change (its watch): its state replaces the old one.
    pub fn apply_remote(&mut self, update: crate::clustermesh::watch::RemoteUpdate) {
        let Some(mesh) = self.reading.kvstore.mesh.as_deref_mut() else { return };
        let Some(slot) = mesh.remotes.iter_mut().find(|r| r.name == update.remote.name) else { return };
        let (was, name) = (slot.status, update.remote.name.clone());
        *slot = update.remote;
        self.touched.extend(update.touched);
        self.gate_mesh();
        let now = self.reading.kvstore.mesh.as_ref().and_then(|m| m.remote(&name)).map(|r| r.status);
        // A remote judged or no longer judged: every entry it may own is re-checked.
        self.full |= update.full || now != Some(was);
    }

    /// The Cilium agent's view of its remotes (`None`: its API is not available).
    pub fn set_cilium_mesh(&mut self, cilium: Option<Vec<crate::cilium::models::RemoteCluster>>) {
        self.cilium_mesh = cilium;
        if self.gate_mesh() {
            self.full = true;
        }
    }

    /// Judges only the remotes Cilium has synced; whether that changed a remote's status.
    fn gate_mesh(&mut self) -> bool {
        match (self.reading.kvstore.mesh.as_deref_mut(), &self.cilium_mesh) {
            (Some(m), Some(c)) => crate::clustermesh::reader::gate_on_cilium(m, c),
            _ => false,
        }
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
        let Some(n) = self.reading.kvstore.nodes.iter().find(|n| &*n.meta.key == key) else { return };
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
            if self.identities_from_objects && key.starts_with(IDENTITIES_PREFIX) {
                continue;
            }
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
                let meta = KvMeta { key: key.clone().into(), mod_revision: *mod_revision, lease: *lease };
                let snap = &mut self.reading.kvstore;
                let before = snap.ips.len();
                reader::decode_raw_into(snap, std::iter::once((meta, value.as_bytes())), None);
                if let Some(e) = snap.ips.get(before) {
                    let id = e.identity;
                    self.ip_at.insert(&snap.ips, before);
                    if e.host_ip.is_some_and(|h| self.hosts.contains(&h)) {
                        self.hosted.insert(Box::from(key.as_str()));
                    }
                    self.other_spaces += usize::from(!key.starts_with(IP_DEFAULT_SPACE));
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
            let ips = &self.reading.kvstore.ips;
            if let Some(e) = self.ip_at.get(ips, key).map(|i| &ips[i]) {
                self.touched.insert(e.prefix);
            }
        } else if key.starts_with(NODES_PREFIX) {
            let Some(n) = self.reading.kvstore.nodes.iter().find(|n| &*n.meta.key == key).cloned() else { return };
            self.touch_node(&n);
        }
    }

    fn remove_key(&mut self, key: &str) {
        if key.starts_with(IP_PREFIX) {
            if let Some(i) = self.ip_at.remove(&self.reading.kvstore.ips, key) {
                self.hosted.remove(key);
                self.swap_remove_ip(i);
            }
            self.reading.kvstore.malformed.retain(|m| &*m.meta.key != key);
        } else {
            self.reading.kvstore.remove_key(key);
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
            self.hosted = kv.ips.iter().filter(|e| e.host_ip.is_some_and(|h| self.hosts.contains(&h))).map(|e| Box::from(e.meta.key.as_ref())).collect();
            let (findings, _) = run::evaluate(&ctx, &self.reading);
            Recheck { findings, scope: Scope::Full }
        } else {
            let kv = &self.reading.kvstore;
            let exp = if self.other_spaces > 0 {
                expected::derive_scoped(kv, &ctx, &self.touched)
            } else {
                let touched = self.touched.iter().filter_map(|p| self.ip_at.get(&kv.ips, diff::ip_key(p).as_str()));
                let at: std::collections::BTreeSet<usize> = touched.chain(self.hosted.iter().filter_map(|k| self.ip_at.get(&kv.ips, k))).collect();
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

/// Whether `a` and `b` differ at most in their revision (an object's resourceVersion).
fn same_but_revision<T: Clone + PartialEq>(a: &T, b: &T, meta: impl Fn(&mut T) -> &mut KvMeta) -> bool {
    let mut a = a.clone();
    let mut b2 = b.clone();
    meta(&mut a).mod_revision = 0;
    meta(&mut b2).mod_revision = 0;
    a == b2
}


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

/// The change feed compares what it re-reads with the live check's ipcache (one copy).
impl IpcacheCopy for LiveCheck {
    fn entry(&self, key: &(IpNet, u16)) -> Option<&IpcacheEntry> {
        self.ipcache_entry(key)
    }

    fn for_each_key(&self, f: &mut dyn FnMut(&(IpNet, u16))) {
        let sorted = self.reading.datapath.ipcache.entries.iter().map(|e| (e.prefix, e.cluster_id)).filter(|k| !self.ipcache_changes.contains_key(k));
        sorted.chain(self.ipcache_changes.iter().filter(|(_, e)| e.is_some()).map(|(k, _)| *k)).for_each(|k| f(&k));
    }
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
