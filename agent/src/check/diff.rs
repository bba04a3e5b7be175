//! The diff engine (pure): expected state vs what the node shows → typed findings, each with
//! both sides' evidence.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use serde_json::{json, Value};

use super::expected::{Expectation, ExpectedState, NodeContext};
use super::kinds::{FindingKind, Severity};
use crate::datapath::addresses::HostAddresses;
use crate::datapath::ipcache::IpcacheEntry;
use crate::datapath::inuse::LiveMaps;
use crate::datapath::{DatapathSnapshot, MapDump};
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{self, IpEntry};
use crate::kvstore::view::age_seconds;
use crate::model::identity::{self, IdentityScope};
use crate::model::source::StateSource;
use crate::model::version::Layout;
use crate::clustermesh::Owner;

/// Operators' default: the operator rewrites the heartbeat every minute.
pub const HEARTBEAT_STALE_AFTER_SECONDS: i64 = 5 * 60;
pub const MAP_PRESSURE_RATIO: f64 = 0.9;

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub subject: String,
    pub severity: Severity,
    pub message: String,
    /// What the datapath holds (decoded map entry, interface addresses...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Evidence>,
    /// What the kvstore holds (key, decoded value, revisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvstore: Option<Evidence>,
    /// What kvcheck expected, and by which rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<Evidence>,
    /// Kvstore keys (or Kubernetes objects) this finding is about (re-read when settling).
    pub kvstore_keys: Vec<String>,
    /// Where its cluster-state evidence came from: `kvstore` (etcd keys), `kubernetes`
    /// (objects, named in `kvstore_keys` as `CiliumEndpoint default/pod-a`), or `null` (the
    /// datapath alone).
    pub source: Option<StateSource>,
    /// The ClusterMesh remote cluster the finding is about (its entries, its kvstore), or
    /// `null` for this node's own cluster.
    pub cluster: Option<String>,
}

/// A finding's evidence, held as its JSON text: the agent keeps every open finding until it
/// resolves, and a `Value` tree is several times the size of its text (~1.5 KB against ~250 B
/// for an ipcache entry and its kvstore key).
#[derive(Clone, Debug)]
pub struct Evidence(Box<serde_json::value::RawValue>);

impl Evidence {
    /// `None` when `v` does not serialize. Keys sorted, as a `Value` prints them.
    pub fn of(v: impl Serialize) -> Option<Evidence> {
        let v = serde_json::to_value(v).ok()?;
        serde_json::value::to_raw_value(&v).ok().map(Evidence)
    }

    /// The evidence as a JSON value (to read a field of it).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        self.0.get()
    }
}

impl Serialize for Evidence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl Finding {
    pub fn new(kind: FindingKind, subject: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            kind,
            subject: subject.into(),
            severity: kind.severity(),
            message: message.into(),
            datapath: None,
            kvstore: None,
            expected: None,
            kvstore_keys: Vec::new(),
            source: None,
            cluster: None,
        }
    }

    fn datapath(mut self, v: impl Serialize) -> Self {
        self.datapath = Evidence::of(v);
        self
    }

    fn kvstore(mut self, v: impl Serialize) -> Self {
        self.kvstore = Evidence::of(v);
        self
    }

    fn expected(mut self, v: impl Serialize) -> Self {
        self.expected = Evidence::of(v);
        self
    }

    fn keys<K: AsRef<str>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.kvstore_keys.extend(keys.into_iter().map(|k| k.as_ref().to_owned()));
        self
    }

    /// (kind, subject): what identifies a finding across re-reads.
    pub fn id(&self) -> (FindingKind, String) {
        (self.kind, self.subject.clone())
    }
}

/// How evidence names where a prefix's pod IP would be: its `ip/v1` key, or (CRD mode) the
/// CiliumEndpoint that would carry it.
pub fn ip_reference(kv: &KvstoreSnapshot, prefix: &IpNet) -> String {
    match kv.origin.endpoints {
        StateSource::Kvstore => ip_key(prefix),
        StateSource::Kubernetes => format!("CiliumEndpoint with {}", prefix.addr()),
    }
}

/// The key a remote cluster would hold a prefix's pod IP under (its state or cache prefix).
fn remote_ip_key(r: &crate::clustermesh::RemoteCluster, prefix: &IpNet) -> String {
    match &r.prefixes {
        Some(p) => key_under(&p.ips, prefix),
        None => ip_key(prefix),
    }
}

/// The `ip/v1` key Cilium would use for a prefix.
pub fn ip_key(prefix: &IpNet) -> String {
    key_under(values::IP_DEFAULT_SPACE, prefix)
}

/// `<base><ip>` for a host prefix, `<base><ip>/<bits>` otherwise.
fn key_under(base: &str, prefix: &IpNet) -> String {
    if prefix.prefix_len() == prefix.max_prefix_len() { format!("{base}{}", prefix.addr()) } else { format!("{base}{prefix}") }
}

fn show(ip: &Option<IpAddr>) -> String {
    ip.map_or_else(|| "none".to_owned(), |i| i.to_string())
}

fn show_prefixes(prefixes: &[IpNet], total: usize) -> String {
    let shown: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
    if total > shown.len() { format!("{}, ...", shown.join(", ")) } else { shown.join(", ") }
}

fn show_set<'a, T: ToString + 'a>(s: impl IntoIterator<Item = &'a T>) -> String {
    s.into_iter().map(ToString::to_string).collect::<Vec<_>>().join(" or ")
}

/// Everything the diff looks at.
pub struct Observed<'a> {
    pub datapath: &'a DatapathSnapshot,
    pub host: &'a HostAddresses,
    pub kvstore: &'a KvstoreSnapshot,
    pub now: chrono::DateTime<chrono::Utc>,
}

pub fn diff(exp: &ExpectedState, ctx: &NodeContext, obs: &Observed<'_>) -> Vec<Finding> {
    diff_using(exp, ctx, obs, &IdentityUsers::of_observed(obs))
}

/// [`diff`] with the node's identity users already counted (a full check counts them while
/// it derives the expected state).
pub fn diff_using(exp: &ExpectedState, ctx: &NodeContext, obs: &Observed<'_>, used: &IdentityUsers) -> Vec<Finding> {
    let kv = KvIndex::new(obs.kvstore);
    let mut out = Vec::new();
    ipcache(exp, obs, &kv, &mut out);
    node_sections(exp, ctx, obs, &kv, used, &mut out);
    endpoint_objects(obs, &mut out);
    finish(out)
}

/// CRD mode: CiliumEndpoints Cilium cannot fix by itself. A CEP whose `networking.node` is no
/// CiliumNode's address (its node is gone; the operator's CEP GC removes it only once the pod
/// is), and one IP in two live CEPs (the last event won in every ipcache).
fn endpoint_objects(obs: &Observed<'_>, out: &mut Vec<Finding>) {
    let kv = obs.kvstore;
    if kv.origin.endpoints != StateSource::Kubernetes {
        return;
    }
    let node_ips: std::collections::HashSet<IpAddr> = kv.nodes.iter().flat_map(|n| n.addresses.iter().map(|a| a.ip)).collect();
    let owner = |e: &IpEntry| format!("{}/{}", e.owner.k8s_namespace().unwrap_or_default(), e.owner.k8s_pod_name().unwrap_or_default());
    let mut on_unknown: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    let mut by_ip: HashMap<IpNet, BTreeSet<String>> = HashMap::new();
    for e in &kv.ips {
        if let Some(h) = e.host_ip.filter(|h| !node_ips.contains(h)) {
            on_unknown.entry(h).or_default().insert(owner(e));
        }
        by_ip.entry(e.prefix).or_default().insert(owner(e));
    }
    for (node, ceps) in on_unknown {
        let shown: Vec<&String> = ceps.iter().take(IDENTITY_EVIDENCE_PREFIXES).collect();
        out.push(
            Finding::new(FindingKind::EndpointNodeUnknown, node.to_string(), format!("{} CiliumEndpoints ({}) are hosted by node IP {node}, which no CiliumNode has", ceps.len(), show_names(&shown, ceps.len())))
                .kvstore(json!({"node_ip": node, "ciliumendpoints": ceps.len(), "examples": shown, "resource_versions": kv.origin.resource_versions}))
                .keys(shown.iter().map(|c| format!("CiliumEndpoint {c}"))),
        );
    }
    let mut conflicts: Vec<(IpNet, BTreeSet<String>)> = by_ip.into_iter().filter(|(_, c)| c.len() > 1).collect();
    conflicts.sort();
    for (ip, ceps) in conflicts {
        let owners: Vec<&IpEntry> = kv.ips.iter().filter(|e| e.prefix == ip).collect();
        out.push(
            Finding::new(FindingKind::EndpointIpConflict, ip.addr().to_string(), format!("{} is in {} live CiliumEndpoints ({}); Cilium keeps whichever it saw last", ip.addr(), ceps.len(), ceps.iter().cloned().collect::<Vec<_>>().join(", ")))
                .kvstore(json!({"ciliumendpoints": owners}))
                .keys(ceps.iter().map(|c| format!("CiliumEndpoint {c}"))),
        );
    }
}

fn show_names(names: &[&String], total: usize) -> String {
    let shown: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    if total > shown.len() { format!("{}, ...", shown.join(", ")) } else { shown.join(", ") }
}

/// How many prefixes per identity a finding names as evidence.
pub const IDENTITY_EVIDENCE_PREFIXES: usize = 5;

/// The global identities this node's datapath refers to: those of the `ip/v1` entries (every one
/// is expected in the ipcache) and of the observed ipcache entries (cluster 0). Its policy
/// needs every one's labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityUsers {
    /// Identity → (entries using it, up to [`IDENTITY_EVIDENCE_PREFIXES`] of their prefixes).
    pub by_id: BTreeMap<u32, (usize, Vec<IpNet>)>,
}

impl IdentityUsers {
    /// Counts the identities of `ips` and `observed` (the expected and the observed use of one
    /// prefix count once each).
    pub fn of<'a, 'b>(ips: impl Iterator<Item = &'b IpEntry>, observed: impl Iterator<Item = &'a IpcacheEntry>) -> IdentityUsers {
        let mut used = IdentityUsers::default();
        for e in ips {
            used.add(e.identity, e.prefix);
        }
        for o in observed.filter(|o| o.cluster_id == 0) {
            used.add(o.identity, o.prefix);
        }
        used
    }

    /// [`of`](Self::of) both sides of one reading.
    pub fn of_observed(obs: &Observed<'_>) -> IdentityUsers {
        Self::of(obs.kvstore.ips.iter(), obs.datapath.ipcache.entries.iter())
    }

    /// Records one use of `id` by `prefix` (global identities only).
    pub fn add(&mut self, id: u32, prefix: IpNet) {
        if identity::scope(id) != IdentityScope::Global {
            return;
        }
        let (n, prefixes) = self.by_id.entry(id).or_default();
        *n += 1;
        if prefixes.len() < IDENTITY_EVIDENCE_PREFIXES && !prefixes.contains(&prefix) {
            prefixes.push(prefix);
        }
    }
}

/// The diff restricted to some ipcache prefixes: their ipcache findings (the observed entry of
/// each comes from `observed`, an index the caller keeps), plus every node-scale section
/// (endpoints, identities, node, tunnel, kvstore health, map pressure), which are small.
/// `exp` needs expectations only for `prefixes` (see [`super::expected::derive_scoped`]);
/// `used` covers the whole node (the caller keeps it current; see `check::live`).
pub fn diff_scoped<'a>(
    exp: &ExpectedState,
    ctx: &NodeContext,
    obs: &Observed<'a>,
    prefixes: impl IntoIterator<Item = &'a IpNet>,
    observed: impl Fn(&IpNet) -> Option<&'a IpcacheEntry>,
    used: &IdentityUsers,
) -> Vec<Finding> {
    let kv = KvIndex::new(obs.kvstore);
    let mut out = Vec::new();
    let prefixes: Vec<&IpNet> = prefixes.into_iter().collect();
    for p in &prefixes {
        ipcache_prefix(p, exp.ipcache.get(p), observed(p), obs, &kv, &mut out);
    }
    overlaps(exp, prefixes.into_iter(), &mut out);
    node_sections(exp, ctx, obs, &kv, used, &mut out);
    // Not an ipcache kind, so every re-check recomputes them (CRD mode only: one pass).
    endpoint_objects(obs, &mut out);
    finish(out)
}

/// Whether findings of `kind` are about one ipcache prefix (their subject), as opposed to the
/// node-scale sections every re-check recomputes.
pub fn is_ipcache_kind(kind: FindingKind) -> bool {
    matches!(
        kind,
        FindingKind::IpcacheMissing
            | FindingKind::IpcacheStale
            | FindingKind::IpcacheIdentityMismatch
            | FindingKind::IpcacheTunnelMismatch
            | FindingKind::IpcacheEncryptKeyMismatch
            | FindingKind::IpcacheUnknownCluster
            | FindingKind::ClustermeshIpOverlap
    )
}

fn node_sections(exp: &ExpectedState, ctx: &NodeContext, obs: &Observed<'_>, kv: &KvIndex<'_>, used: &IdentityUsers, out: &mut Vec<Finding>) {
    endpoints(exp, ctx, obs, kv, out);
    identities(exp, obs, used, out);
    node(exp, ctx, obs, out);
    tunnel(exp, obs, kv, out);
    kvstore_health(obs, out);
    map_pressure(obs, out);
    datapath_maps(obs, out);
    remote_clusters(obs, used, out);
}

/// ClusterMesh, node-scale: remotes Cilium refuses, remote values it skips, and the remote
/// identities this node's datapath uses: missing in their cluster, or refused by Cilium (no
/// cluster label, another cluster's id bits: #32060, #36338).
fn remote_clusters(obs: &Observed<'_>, used: &IdentityUsers, out: &mut Vec<Finding>) {
    let Some(m) = obs.kvstore.mesh.as_deref().filter(|m| m.active()) else { return };
    for r in &m.remotes {
        let key = format!("{}{}", crate::clustermesh::config::CLUSTER_CONFIG_PREFIX, r.name);
        if matches!(r.status, crate::clustermesh::RemoteStatus::NoClusterConfig | crate::clustermesh::RemoteStatus::InvalidConfig) {
            let mut f = Finding::new(FindingKind::RemoteClusterConfigInvalid, &r.name, format!("cluster {}: {}", r.name, r.reason.as_deref().unwrap_or_default()))
                .kvstore(json!({"key": crate::clustermesh::remote_reference(&r.name, &key), "value": r.cluster_config, "config_file": r.config_file}));
            f.cluster = Some(r.name.clone());
            out.push(f);
        }
        for bad in &r.rejected {
            out.push(Finding::new(FindingKind::KvstoreMalformed, &*bad.meta.key, format!("{}: {}", bad.meta.key, bad.reason)).kvstore(bad).keys([bad.meta.key.clone()]));
        }
    }
    // Remote pods whose identity is not their cluster's: Cilium v1.17+ drops them, v1.16 keeps them.
    let mut by_ip: BTreeMap<u32, (&crate::clustermesh::RemoteCluster, Vec<IpNet>)> = BTreeMap::new();
    for r in m.judged() {
        for e in r.ips.iter().filter(|e| m.local.cluster_of(e.identity).is_some_and(|c| Some(c) != r.id())) {
            by_ip.entry(e.identity).or_insert((r, Vec::new())).1.push(e.prefix);
        }
    }
    // Remote identities live in their cluster's kvstore whatever the local identity mode.
    for (id, (n, prefixes)) in &used.by_id {
        let Some(r) = m.remote_of_identity(*id).filter(|r| r.status.judged()) else { continue };
        let reference = crate::clustermesh::remote_reference(&r.name, &format!("{}{id}", r.prefixes.as_ref().map_or(values::IDENTITY_ID_PREFIX, |p| p.identities.as_str())));
        if let Some((ident, why)) = r.invalid_identities.get(id) {
            out.push(
                Finding::new(FindingKind::RemoteIdentityInvalid, id.to_string(), format!("identity {id} of cluster {} is used by {n} ipcache entries ({}), but Cilium refuses it: {why}", r.name, show_prefixes(prefixes, *n)))
                    .datapath(json!({"ipcache_entries": n, "prefixes": prefixes}))
                    .kvstore(json!({"key": reference, "value": ident.labels, "revision": r.revision}))
                    .keys([reference]),
            );
        } else if !r.identities.contains_key(id) {
            out.push(
                Finding::new(FindingKind::IdentityMissing, id.to_string(), format!("identity {id} is used on this node by {n} ipcache entries ({}) but cluster {} has no {reference}", show_prefixes(prefixes, *n), r.name))
                    .datapath(json!({"ipcache_entries": n, "prefixes": prefixes, "local_endpoint": false}))
                    .kvstore(json!({"key": reference, "value": null, "revision": r.revision}))
                    .keys([reference]),
            );
        }
    }
    for (id, (r, prefixes)) in by_ip {
        let (lo, hi) = r.id().map(|c| m.local.range_of(c)).unwrap_or_default();
        let keys: Vec<String> = prefixes.iter().take(IDENTITY_EVIDENCE_PREFIXES).map(|p| crate::clustermesh::remote_reference(&r.name, &remote_ip_key(r, p))).collect();
        out.push(
            Finding::new(
                FindingKind::RemoteIdentityInvalid,
                id.to_string(),
                format!("cluster {} gives {} pod IPs ({}) identity {id}, outside its range {lo}-{hi} (cluster id {:?}): Cilium v1.17+ drops them, v1.16 keeps them", r.name, prefixes.len(), show_prefixes(&prefixes[..prefixes.len().min(IDENTITY_EVIDENCE_PREFIXES)], prefixes.len()), m.local.cluster_of(id)),
            )
            .kvstore(json!({"cluster_range": [lo, hi], "identity_cluster_id": m.local.cluster_of(id), "revision": r.revision}))
            .keys(keys),
        );
    }
}

/// The maps the attached programs use against the pins: another map under a name kvcheck
/// checks, or two maps under one name (`datapath-map-mismatch`).
fn datapath_maps(obs: &Observed<'_>, out: &mut Vec<Finding>) {
    let LiveMaps::Checked { in_use, pinned, read_live } = &obs.datapath.live_maps else { return };
    for (name, ids) in &in_use.maps {
        let pin = pinned.get(name);
        if ids.len() == 1 && pin.is_some_and(|(id, _)| ids.contains_key(id)) {
            continue;
        }
        let used: Vec<String> = ids.iter().map(|(id, u)| format!("{id} ({} entries)", u.entries.map_or_else(|| "the pinned one's".to_owned(), |n| n.to_string()))).collect();
        let pinned_text = pin.map_or_else(|| "no pinned map".to_owned(), |(id, n)| format!("the pinned map {id} ({n} entries)"));
        let checked = read_live.get(name).map_or_else(|| "the check ran on the pinned map".to_owned(), |id| format!("the check ran on map {id}"));
        out.push(
            Finding::new(
                FindingKind::DatapathMapMismatch,
                name,
                format!("the programs attached to this node use {name} map{} {}, not only {pinned_text}; {checked}", if ids.len() > 1 { "s" } else { "" }, used.join(" and ")),
            )
            .datapath(json!({"pinned": pin.map(|(id, n)| json!({"id": id, "entries": n})), "in_use": ids, "read": read_live.get(name)})),
        );
    }
}

/// One finding per (kind, subject), in report order.
fn finish(mut out: Vec<Finding>) -> Vec<Finding> {
    let mut seen = BTreeSet::new();
    out.retain(|f| seen.insert(f.id()));
    for f in &mut out {
        f.source = f.kvstore_keys.first().map(|k| StateSource::of_reference(k));
        if f.cluster.is_none() {
            f.cluster = f.kvstore_keys.iter().find_map(|k| crate::clustermesh::cluster_of_reference(k)).map(str::to_owned);
        }
    }
    out.sort_by(|a, b| (a.severity, a.kind, &a.subject).cmp(&(b.severity, b.kind, &b.subject)));
    out
}

/// An ipcache this large is diffed on two threads (a consistent node's diff is its lookups).
pub const PARALLEL_DIFF_ENTRIES: usize = 50_000;

fn ipcache(exp: &ExpectedState, obs: &Observed<'_>, kv: &KvIndex<'_>, out: &mut Vec<Finding>) {
    // One pass over the (possibly 500k) observed entries, marking each expected prefix seen by
    // its position and keeping the few that may make a finding (in halves on two threads for
    // a large ipcache); those then make their findings in order, and the expected prefixes
    // left unmarked theirs. Entries of other ClusterMesh clusters (cluster id ≠ 0) need their
    // cluster's kvstore and are not checked here.
    let entries = &obs.datapath.ipcache.entries;
    let scan = |from: usize, part: &[IpcacheEntry]| {
        let (mut seen, mut attention) = (Vec::new(), Vec::new());
        for (i, o) in part.iter().enumerate().filter(|(_, o)| o.cluster_id == 0) {
            let found = exp.ipcache.lookup(&o.prefix);
            if let Some((at, _)) = found {
                seen.push(at as u32);
            }
            let e = found.map(|(_, e)| e);
            if !no_finding(e, Some(o), obs) {
                attention.push((from + i, e));
            }
        }
        (seen, attention)
    };
    let mid = if entries.len() >= PARALLEL_DIFF_ENTRIES { entries.len() / 2 } else { entries.len() };
    let (first, second) = both(mid < entries.len(), || scan(0, &entries[..mid]), || scan(mid, &entries[mid..]));
    let mut seen = vec![false; exp.ipcache.len()];
    for (positions, attention) in [&first, &second] {
        for &at in positions {
            seen[at as usize] = true;
        }
        for &(i, e) in attention {
            ipcache_prefix(&entries[i].prefix, e, Some(&entries[i]), obs, kv, out);
        }
    }
    for ((prefix, e), _) in exp.ipcache.iter().zip(&seen).filter(|(_, seen)| !**seen) {
        ipcache_prefix(prefix, Some(e), None, obs, kv, out);
    }
    overlaps(exp, exp.overlaps.keys(), out);
}

/// `a` and `b`, on two threads when `parallel` (and a thread can be had), else in turn. A
/// panic in either is the caller's.
pub fn both<A: Send, B: Send>(parallel: bool, a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    // `b` waits in a cell: taken by the thread, or run here when no thread started.
    let b = std::sync::Mutex::new(Some(b));
    let take = || b.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    std::thread::scope(|s| {
        let aside = if parallel { std::thread::Builder::new().spawn_scoped(s, || take().map(|b| b())).ok() } else { None };
        let ra = a();
        let rb = aside.and_then(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        (ra, rb.unwrap_or_else(|| take().map(|b| b()).expect("b runs on the thread or here")))
    })
}

/// Whether one prefix certainly makes no finding: nearly every prefix of a 500k-entry ipcache,
/// decided before any text is made (the subject's formatting alone was 15 % of a full check's
/// diff phase).
fn no_finding(exp: Option<&Expectation>, observed: Option<&IpcacheEntry>, obs: &Observed<'_>) -> bool {
    match (exp, observed) {
        (None, None) => true,
        (Some(e), None) => !e.required,
        (None, Some(o)) => obs.kvstore.mesh.is_none() && identity::scope(o.identity) == IdentityScope::Local,
        (Some(e), Some(o)) => e.agrees(o),
    }
}

/// One prefix announced by two clusters (overlapping pod CIDRs, an IP reused across the mesh):
/// the local cluster's entry wins in Cilium, between remotes the last event does.
fn overlaps<'a>(exp: &ExpectedState, prefixes: impl Iterator<Item = &'a IpNet>, out: &mut Vec<Finding>) {
    for p in prefixes {
        let Some(sides) = exp.overlaps.get(p) else { continue };
        let names: Vec<String> = sides.iter().map(|(c, k)| format!("{} ({})", c.as_deref().unwrap_or("the local cluster"), k.as_deref().unwrap_or("a local address"))).collect();
        let local = sides.iter().any(|(c, _)| c.is_none());
        let mut f = Finding::new(
            FindingKind::ClustermeshIpOverlap,
            p.to_string(),
            format!("{p} is announced by {}; {}", names.join(" and "), if local { "Cilium keeps the local cluster's entry" } else { "Cilium keeps whichever remote it heard last, and a delete from either removes it" }),
        )
        .expected(exp.ipcache.get(p))
        .kvstore(json!({"announced_by": sides.iter().map(|(c, k)| json!({"cluster": c, "key": k})).collect::<Vec<_>>()}));
        f.cluster = sides.iter().find_map(|(c, _)| c.clone());
        out.push(f);
    }
}

/// The findings about one prefix: what the kvstore expects of it against what the ipcache
/// holds (cluster 0).
fn ipcache_prefix(prefix: &IpNet, exp: Option<&Expectation>, observed: Option<&IpcacheEntry>, obs: &Observed<'_>, kv: &KvIndex<'_>, out: &mut Vec<Finding>) {
    if no_finding(exp, observed, obs) {
        return;
    }
    let subject = prefix.to_string();
    let (e, o) = match (exp, observed) {
        (None, None) => return,
        (Some(e), None) => {
            if e.required {
                let keys = e.kvstore_key.clone();
                out.push(
                    Finding::new(FindingKind::IpcacheMissing, &subject, format!("{subject} ({}) is not in the ipcache; expected identity {}", e.rule, show_set(&e.identities)))
                        .expected(e)
                        .kvstore(kv.evidence(keys.as_deref()))
                        .keys(keys),
                );
            }
            return;
        }
        (None, Some(o)) => {
            if let Some(m) = obs.kvstore.mesh.as_deref() {
                match m.owner(prefix, o.identity, o.tunnel_endpoint) {
                    Owner::Local => {}
                    Owner::Remote(r) if r.status.judged() => {
                        let key = crate::clustermesh::remote_reference(&r.name, &remote_ip_key(r, prefix));
                        out.push(
                            Finding::new(
                                FindingKind::IpcacheStale,
                                &subject,
                                format!("{subject} -> identity {} via {} is in the ipcache as cluster {}'s, but cluster {} has no entry for it", identity::describe(o.identity), show(&o.tunnel_endpoint), r.name, r.name),
                            )
                            .datapath(o)
                            .kvstore(json!({"key": key, "value": null, "revision": r.revision}))
                            .keys([key]),
                        );
                        return;
                    }
                    // Cilium keeps a remote's entries while it cannot reach it or has not synced it.
                    Owner::Remote(_) | Owner::Unattributable => return,
                    Owner::UnknownCluster(c) => {
                        let known: Vec<String> = m.remotes.iter().filter_map(|r| Some(format!("{} = {}", r.name, r.id()?))).collect();
                        out.push(
                            Finding::new(
                                FindingKind::IpcacheUnknownCluster,
                                &subject,
                                format!("{subject} -> identity {} is cluster id {c}'s, which no configured remote cluster has (known: {})", identity::describe(o.identity), if known.is_empty() { "none".to_owned() } else { known.join(", ") }),
                            )
                            .datapath(o)
                            .kvstore(json!({"cluster_id": c, "remotes": known, "local_cluster_id": m.local.id, "config_dir": m.config_dir})),
                        );
                        return;
                    }
                }
            }
            if identity::scope(o.identity) != IdentityScope::Local {
                // Local-scope (CIDR/FQDN) identities are node-local: not in the kvstore by design.
                out.push(
                    Finding::new(
                        FindingKind::IpcacheStale,
                        &subject,
                        format!(
                            "{subject} -> identity {} via {} is in the ipcache, but no {} or local address explains it",
                            identity::describe(o.identity),
                            show(&o.tunnel_endpoint),
                            if obs.kvstore.origin.endpoints == StateSource::Kubernetes { "CiliumEndpoint, CiliumNode" } else { "kvstore entry" }
                        ),
                    )
                    .datapath(o)
                    .kvstore(json!({"key": ip_reference(obs.kvstore, prefix), "value": null, "revision": obs.kvstore.revision}))
                    .keys([ip_reference(obs.kvstore, prefix)]),
                );
            }
            return;
        }
        (Some(e), Some(o)) => (e, o),
    };
    let keys = e.kvstore_key.clone();
    if !e.identities.contains(&o.identity) {
        out.push(
            Finding::new(
                FindingKind::IpcacheIdentityMismatch,
                &subject,
                format!("{subject}: ipcache identity {}, kvstore says {} ({})", identity::describe(o.identity), show_set(&e.identities), e.rule),
            )
            .datapath(o)
            .expected(e)
            .kvstore(kv.evidence(keys.as_deref()))
            .keys(keys.clone()),
        );
    }
    if !e.tunnel_endpoints.contains(&o.tunnel_endpoint) {
        let want: Vec<String> = e.tunnel_endpoints.iter().map(show).collect();
        out.push(
            Finding::new(
                FindingKind::IpcacheTunnelMismatch,
                &subject,
                format!("{subject}: ipcache tunnel endpoint {}, expected {} ({})", show(&o.tunnel_endpoint), want.join(" or "), e.rule),
            )
            .datapath(o)
            .expected(e)
            .kvstore(kv.evidence(keys.as_deref()))
            .keys(keys.clone()),
        );
    }
    if let Some(k) = e.encrypt_keys.as_ref().filter(|k| !k.contains(&o.encrypt_key)) {
        out.push(
            Finding::new(FindingKind::IpcacheEncryptKeyMismatch, &subject, format!("{subject}: ipcache encrypt key {}, expected {} ({})", o.encrypt_key, show_set(k), e.rule))
                .datapath(o)
                .expected(e)
                .kvstore(kv.evidence(keys.as_deref()))
                .keys(keys),
        );
    }
}

/// Kvstore values by key, built on first use: evidence lookups must not scan the (possibly
/// 100k-entry) snapshot once per finding.
struct KvIndex<'a> {
    kv: &'a KvstoreSnapshot,
    by_key: std::cell::OnceCell<HashMap<&'a str, KvValue<'a>>>,
}

#[derive(Clone, Copy)]
enum KvValue<'a> {
    Node(&'a crate::kvstore::values::NodeEntry),
    Ip(&'a crate::kvstore::values::IpEntry),
}

impl<'a> KvIndex<'a> {
    fn new(kv: &'a KvstoreSnapshot) -> Self {
        KvIndex { kv, by_key: std::cell::OnceCell::new() }
    }

    /// The decoded node or ip/v1 value stored under `key`.
    fn value(&self, key: &str) -> Option<Value> {
        let index = self.by_key.get_or_init(|| {
            let remotes = self.kv.mesh.iter().flat_map(|m| m.remotes.iter());
            let nodes = self.kv.nodes.iter().chain(remotes.clone().flat_map(|r| r.nodes.iter())).map(|n| (n.meta.key.as_ref(), KvValue::Node(n)));
            let ips = self.kv.ips.iter().chain(remotes.flat_map(|r| r.ips.iter()));
            nodes.chain(ips.map(|e| (e.meta.key.as_ref(), KvValue::Ip(e)))).collect()
        });
        match index.get(key)? {
            KvValue::Node(n) => serde_json::to_value(n).ok(),
            KvValue::Ip(e) => serde_json::to_value(e).ok(),
        }
    }

    /// Kvstore evidence for a key: the decoded value with the snapshot's revision.
    fn evidence(&self, key: Option<&str>) -> Value {
        let Some(key) = key else { return Value::Null };
        let remote = crate::clustermesh::cluster_of_reference(key).and_then(|c| self.kv.mesh.as_ref()?.remote(c));
        json!({"key": key, "value": self.value(key), "revision": remote.map_or(self.kv.revision, |r| r.revision)})
    }
}

fn endpoints(exp: &ExpectedState, ctx: &NodeContext, obs: &Observed<'_>, kv: &KvIndex<'_>, out: &mut Vec<Finding>) {
    let local: Vec<_> = obs.datapath.endpoints.entries.iter().filter(|e| !e.is_host).collect();
    let local_ips: BTreeSet<IpAddr> = local.iter().map(|e| e.ip).collect();
    let node = exp.node.as_ref();
    let health: BTreeSet<IpAddr> = node.iter().flat_map(|n| [n.ipv4_health_ip, n.ipv6_health_ip]).flatten().collect();
    let cidrs: Vec<IpNet> = node
        .iter()
        .flat_map(|n| n.ipv4_alloc_cidr.iter().chain(&n.ipv6_alloc_cidr).chain(&n.ipv4_secondary_alloc_cidrs).chain(&n.ipv6_secondary_alloc_cidrs).copied().collect::<Vec<_>>())
        .collect();
    for ep in &local {
        let subject = ep.ip.to_string();
        let key = ip_reference(kv.kv, &IpNet::from(ep.ip));
        match exp.local_ips.get(&ep.ip) {
            // From v1.17 the health endpoint has no ip/v1 key, and never a CiliumEndpoint.
            None if health.contains(&ep.ip) && (ctx.layout >= Layout::V1_17 || kv.kv.origin.endpoints == StateSource::Kubernetes) => {}
            None => out.push(
                Finding::new(FindingKind::EndpointNotInKvstore, &subject, format!("local endpoint {} ({subject}) has no {key} hosted by this node", ep.endpoint_id))
                    .datapath(ep)
                    .kvstore(kv.evidence(Some(&key)))
                    .keys([key]),
            ),
            Some(kv) => {
                if let Some(id) = ep.identity.filter(|id| *id != kv.identity) {
                    out.push(
                        Finding::new(
                            FindingKind::EndpointIdentityMismatch,
                            &subject,
                            format!("local endpoint {} ({subject}) has identity {} in the endpoint map, {} in {}", ep.endpoint_id, identity::describe(id), identity::describe(kv.identity), kv.meta.key),
                        )
                        .datapath(ep)
                        .kvstore(kv)
                        .keys([kv.meta.key.clone()]),
                    );
                }
            }
        }
        let family_cidrs: Vec<&IpNet> = cidrs.iter().filter(|c| c.addr().is_ipv4() == ep.ip.is_ipv4()).collect();
        if !family_cidrs.is_empty() && !family_cidrs.iter().any(|c| c.contains(&ep.ip)) {
            out.push(
                Finding::new(FindingKind::PodcidrViolation, &subject, format!("local endpoint {subject} is outside the node's alloc CIDRs {}", family_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")))
                    .datapath(ep)
                    .kvstore(node.map(|n| json!({"key": n.meta.key, "alloc_cidrs": family_cidrs})))
                    .keys(node.map(|n| n.meta.key.clone())),
            );
        }
    }
    for (ip, kv) in &exp.local_ips {
        if !local_ips.contains(ip) {
            out.push(
                Finding::new(FindingKind::KvstoreGhostEndpoint, ip.to_string(), format!("{} says this node hosts {ip} (identity {}), but no local endpoint has it", kv.meta.key, kv.identity))
                    .kvstore(kv)
                    .keys([kv.meta.key.clone()]),
            );
        }
    }
    for ip in &health {
        if !local_ips.contains(ip) {
            out.push(
                Finding::new(FindingKind::HealthEndpointMissing, ip.to_string(), format!("the node's health IP {ip} has no endpoint in {}", obs.datapath.endpoints.meta.name))
                    .kvstore(node.map(|n| json!({"key": n.meta.key, "health_ips": health})))
                    .keys(node.map(|n| n.meta.key.clone())),
            );
        }
    }
}

fn identities(exp: &ExpectedState, obs: &Observed<'_>, used: &IdentityUsers, out: &mut Vec<Finding>) {
    if exp.identities_not_checked.is_some() {
        return;
    }
    let kv = obs.kvstore;
    // Identities local endpoints use (endpoint map where it has them, else their ip/v1 entries).
    let mut local_ids: BTreeSet<u32> = exp.local_ips.values().map(|e| e.identity).collect();
    local_ids.extend(obs.datapath.endpoints.entries.iter().filter(|e| !e.is_host).filter_map(|e| e.identity));
    local_ids.retain(|id| identity::scope(*id) == IdentityScope::Global);
    // Every identity the ipcache carries (or should) needs its labels here: this node's policy
    // decides on remote pods by them. Identities of other ClusterMesh clusters (their cluster
    // id in bits 16-23) live in those clusters' kvstores.
    let cluster_bits = exp.node.as_ref().map_or(0, |n| n.cluster_id & 0xff);
    let referenced = used.by_id.keys().copied().filter(|id| (id >> 16) & 0xff == cluster_bits);
    for id in local_ids.iter().copied().chain(referenced).collect::<BTreeSet<u32>>() {
        if kv.identities.contains_key(&id) {
            continue;
        }
        let key = kv.origin.identity_reference(id);
        let (n, prefixes) = used.by_id.get(&id).cloned().unwrap_or_default();
        // The objects (or keys) that give the identity to a pod IP.
        let owners: BTreeSet<&str> = kv.ips.iter().filter(|e| e.identity == id).map(|e| e.meta.key.as_ref()).take(IDENTITY_EVIDENCE_PREFIXES).collect();
        let local = local_ids.contains(&id);
        let users = match (local, n) {
            (true, 0) => "a local endpoint".to_owned(),
            (true, _) => format!("a local endpoint and {n} ipcache entries ({})", show_prefixes(&prefixes, n)),
            (false, _) => format!("{n} ipcache entries ({})", show_prefixes(&prefixes, n)),
        };
        out.push(
            Finding::new(FindingKind::IdentityMissing, id.to_string(), format!("identity {id} is used on this node by {users} but {key} does not exist"))
                .datapath(json!({"ipcache_entries": n, "prefixes": prefixes, "local_endpoint": local}))
                .kvstore(json!({"key": key, "value": null, "revision": kv.revision, "used_by": owners}))
                .keys([key]),
        );
    }
    // Reference keys exist only where identities are allocated in the kvstore.
    let Some(node) = exp.node.as_ref().filter(|_| kv.origin.identities == StateSource::Kvstore) else { return };
    let node_ips: BTreeSet<String> = [node.node_ip(true), node.node_ip(false)].into_iter().flatten().map(|ip| ip.to_string()).collect();
    let ours: Vec<_> = kv.identity_references.iter().filter(|r| node_ips.contains(&r.node)).collect();
    for id in &local_ids {
        let Some(ident) = kv.identities.get(id) else { continue };
        if !ours.iter().any(|r| r.labels == ident.labels) {
            let node_ip = node.node_ip(true).or(node.node_ip(false)).map(|i| i.to_string()).unwrap_or_default();
            let key = format!("{}{}/{node_ip}", values::IDENTITY_VALUE_PREFIX, ident.labels);
            out.push(
                Finding::new(FindingKind::IdentityReferenceMissing, id.to_string(), format!("a local endpoint uses identity {id} but this node holds no reference key {key}"))
                    .kvstore(json!({"key": key, "value": null, "identity": ident, "revision": kv.revision}))
                    .keys([key, ident.meta.key.to_string()]),
            );
        }
    }
    for r in ours {
        if !local_ids.contains(&r.id) {
            out.push(
                Finding::new(FindingKind::IdentityReferenceLeaked, r.id.to_string(), format!("{} references identity {} for this node, but no local endpoint uses it", r.meta.key, r.id))
                    .kvstore(r)
                    .keys([r.meta.key.clone()]),
            );
        }
    }
}

fn node(exp: &ExpectedState, ctx: &NodeContext, obs: &Observed<'_>, out: &mut Vec<Finding>) {
    let Some(node) = &exp.node else {
        let key = obs.kvstore.origin.node_reference(&ctx.cluster, &ctx.node_name);
        out.push(
            Finding::new(FindingKind::NodeMissing, &ctx.node_name, format!("{key} does not exist"))
                .kvstore(json!({"key": key, "value": null, "revision": obs.kvstore.revision}))
                .keys([key]),
        );
        return;
    };
    let key = node.meta.key.clone();
    match &obs.host.cilium_host {
        None => out.push(
            Finding::new(FindingKind::CiliumHostMissing, "cilium_host", "no cilium_host interface in this network namespace")
                .datapath(json!({"interfaces": obs.host.interfaces.iter().map(|i| &i.name).collect::<Vec<_>>()}))
                .kvstore(json!({"key": key, "cilium_internal_ips": node.addresses.iter().filter(|a| a.addr_type == "CiliumInternalIP").map(|a| a.ip).collect::<Vec<_>>()}))
                .keys([key.clone()]),
        ),
        Some(host) => {
            let host_ips: BTreeSet<IpAddr> = host.addresses.iter().map(IpNet::addr).filter(|ip| !is_link_local(ip)).collect();
            for v4 in [true, false] {
                let want = node.address_of("CiliumInternalIP", v4);
                let have: BTreeSet<IpAddr> = host_ips.iter().copied().filter(|ip| ip.is_ipv4() == v4).collect();
                let ok = match want {
                    Some(w) => have.contains(&w),
                    None => have.is_empty(),
                };
                if !ok {
                    let fam = if v4 { "IPv4" } else { "IPv6" };
                    out.push(
                        Finding::new(
                            FindingKind::CiliumHostMismatch,
                            format!("cilium_host {fam}"),
                            format!("cilium_host has {} but the node's {fam} CiliumInternalIP is {}", if have.is_empty() { "no address".to_owned() } else { show_set(&have) }, show(&want)),
                        )
                        .datapath(host)
                        .kvstore(json!({"key": key, "cilium_internal_ip": want, "revision": obs.kvstore.revision}))
                        .keys([key.clone()]),
                    );
                }
            }
            let cidrs: Vec<IpNet> = node.ipv4_alloc_cidr.iter().chain(&node.ipv6_alloc_cidr).chain(&node.ipv4_secondary_alloc_cidrs).chain(&node.ipv6_secondary_alloc_cidrs).copied().collect();
            let router_and_health = host_ips.iter().copied().chain([node.ipv4_health_ip, node.ipv6_health_ip].into_iter().flatten());
            for ip in router_and_health {
                let fam: Vec<&IpNet> = cidrs.iter().filter(|c| c.addr().is_ipv4() == ip.is_ipv4()).collect();
                if !fam.is_empty() && !fam.iter().any(|c| c.contains(&ip)) {
                    out.push(
                        Finding::new(FindingKind::PodcidrViolation, ip.to_string(), format!("router/health IP {ip} is outside the node's alloc CIDRs {}", fam.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")))
                            .datapath(host)
                            .kvstore(json!({"key": key, "alloc_cidrs": fam}))
                            .keys([key.clone()]),
                    );
                }
            }
        }
    }
    for a in node.addresses.iter().filter(|a| a.addr_type == "InternalIP" || a.addr_type == "ExternalIP") {
        if !ctx.local_addresses.contains(&a.ip) {
            out.push(
                Finding::new(FindingKind::NodeIpNotLocal, a.ip.to_string(), format!("the node's {} {} is not on any local interface", a.addr_type, a.ip))
                    .datapath(json!({"local_addresses": ctx.local_addresses}))
                    .kvstore(json!({"key": key, "address": a}))
                    .keys([key.clone()]),
            );
        }
    }
}

pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn tunnel(exp: &ExpectedState, obs: &Observed<'_>, kv: &KvIndex<'_>, out: &mut Vec<Finding>) {
    let (Some(expected), Some(dump)) = (&exp.tunnel, &obs.datapath.tunnel) else { return };
    let observed: BTreeMap<IpAddr, _> = dump.entries.iter().filter(|e| e.cluster_id == 0).map(|e| (e.prefix, e)).collect();
    for (prefix, t) in expected {
        let subject = prefix.to_string();
        match observed.get(prefix) {
            // A node deleted within Cilium's hold-off: its entry may already be gone.
            None if !t.required => {}
            None => out.push(
                Finding::new(FindingKind::TunnelMissing, &subject, format!("pod CIDR {subject} of {} has no tunnel map entry (expected endpoint {})", t.node_key, t.endpoint))
                    .expected(t)
                    .kvstore(kv.evidence(Some(&t.node_key)))
                    .keys([t.node_key.clone()]),
            ),
            Some(o) if o.tunnel_endpoint != t.endpoint && t.required => out.push(
                Finding::new(FindingKind::TunnelMismatch, &subject, format!("pod CIDR {subject} tunnels to {}, but {} says its node IP is {}", o.tunnel_endpoint, t.node_key, t.endpoint))
                    .datapath(o)
                    .expected(t)
                    .kvstore(kv.evidence(Some(&t.node_key)))
                    .keys([t.node_key.clone()]),
            ),
            Some(_) => {}
        }
    }
    let mesh = obs.kvstore.mesh.as_deref();
    for (prefix, o) in &observed {
        let unjudged_remote = || mesh.is_some_and(|m| matches!(m.owner(&IpNet::from(*prefix), identity::WORLD, Some(o.tunnel_endpoint)), Owner::Unattributable));
        if !expected.contains_key(prefix) && !unjudged_remote() {
            out.push(
                Finding::new(FindingKind::TunnelStale, prefix.to_string(), format!("tunnel map sends {prefix} to {}, but no node in the kvstore owns that pod CIDR", o.tunnel_endpoint))
                    .datapath(o),
            );
        }
    }
}

fn kvstore_health(obs: &Observed<'_>, out: &mut Vec<Finding>) {
    let kv = obs.kvstore;
    for m in &kv.malformed {
        out.push(
            Finding::new(FindingKind::KvstoreMalformed, &*m.meta.key, format!("{}: {}", m.meta.key, m.reason))
                .kvstore(m)
                .keys([m.meta.key.clone()]),
        );
    }
    // cilium/synced/<cluster>/<prefix>: a writer that syncs a cluster writes one per prefix.
    const CANARIES: [&str; 3] = ["cilium/state/nodes/v1", "cilium/state/ip/v1", "cilium/state/identities/v1"];
    let mut by_cluster: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (m, _) in &kv.synced {
        if let Some((cluster, prefix)) = m.key.strip_prefix(values::SYNCED_PREFIX).and_then(|r| r.split_once('/')) {
            by_cluster.entry(cluster).or_default().insert(prefix);
        }
    }
    // A configured remote's canaries gate its judging instead (its status says not-synced).
    let remote = |c: &str| kv.mesh.as_ref().is_some_and(|m| m.remote(c).is_some());
    for (cluster, have) in by_cluster.into_iter().filter(|(c, _)| !remote(c)) {
        // KVStoreMesh writes its canaries for the cilium/cache/ copies it keeps.
        let cached = have.iter().any(|p| p.starts_with("cilium/cache/"));
        let wanted: Vec<String> = CANARIES.iter().map(|c| if cached { c.replacen("cilium/state/", "cilium/cache/", 1) } else { (*c).to_owned() }).collect();
        let missing: Vec<&str> = wanted.iter().map(String::as_str).filter(|c| !have.contains(c)).collect();
        if !missing.is_empty() {
            out.push(
                Finding::new(FindingKind::KvstoreNotSynced, cluster, format!("cluster {cluster} has sync canaries for {} but not for {}", have.iter().copied().collect::<Vec<_>>().join(", "), missing.join(", ")))
                    .kvstore(json!({"present": have, "missing": missing}))
                    .keys(missing.iter().map(|p| format!("{}{cluster}/{p}", values::SYNCED_PREFIX))),
            );
        }
    }
    if let Some((m, v)) = &kv.heartbeat {
        match age_seconds(v, obs.now) {
            Some(age) if age <= HEARTBEAT_STALE_AFTER_SECONDS => {}
            age => out.push(
                Finding::new(
                    FindingKind::HeartbeatStale,
                    values::HEARTBEAT_KEY,
                    match age {
                        Some(a) => format!("{} was last written {a}s ago (stale after {HEARTBEAT_STALE_AFTER_SECONDS}s)", values::HEARTBEAT_KEY),
                        None => format!("{} holds {v:?}, not an RFC 3339 time", values::HEARTBEAT_KEY),
                    },
                )
                .kvstore(json!({"key": m.key, "value": v, "age_seconds": age}))
                .keys([m.key.clone()]),
            ),
        }
    }
}

fn pressure<T>(dump: &MapDump<T>, out: &mut Vec<Finding>) {
    if dump.fill_ratio >= MAP_PRESSURE_RATIO {
        out.push(
            Finding::new(FindingKind::MapPressure, &dump.meta.name, format!("{} holds {} of {} entries ({:.1}%)", dump.meta.name, dump.entry_count, dump.meta.max_entries, dump.fill_ratio * 100.0))
                .datapath(json!({"map": dump.meta, "entries": dump.entry_count, "fill_ratio": dump.fill_ratio})),
        );
    }
}

fn map_pressure(obs: &Observed<'_>, out: &mut Vec<Finding>) {
    pressure(&obs.datapath.ipcache, out);
    pressure(&obs.datapath.endpoints, out);
    if let Some(t) = &obs.datapath.tunnel {
        pressure(t, out);
    }
}

#[cfg(test)]
mod tests {
    use super::both;

    #[test]
    fn both_runs_each_once_on_two_threads_or_in_turn() {
        for parallel in [true, false] {
            let here = std::thread::current().id();
            let (a, b) = both(parallel, || (1, std::thread::current().id()), || ("b", std::thread::current().id()));
            assert_eq!((a.0, b.0), (1, "b"));
            assert_eq!(a.1, here, "a runs on the caller's thread");
            assert_eq!(b.1 != here, parallel, "b runs aside only when asked to");
        }
    }

    #[test]
    #[should_panic(expected = "from b")]
    fn a_panic_aside_reaches_the_caller() {
        both(true, || (), || panic!("from b"));
    }
}
