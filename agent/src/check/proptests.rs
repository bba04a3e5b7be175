//! Property tests of the pure diff engine: random consistent nodes give no findings; one random
//! mutation gives findings about that subject only; the agent's incremental re-checks agree
//! with a full check after every change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::config::DatapathConfig;
use super::diff::{diff, Observed};
use super::live::{LiveCheck, Scope};
use super::run::Reading;
use crate::datapath::events::{DatapathChange, Entry, MapKind, Op};
use crate::kvstore::watch::Change;
use super::expected::{derive, NodeContext};
use crate::datapath::addresses::{HostAddresses, Interface};
use crate::datapath::detect::LayoutChoice;
use crate::datapath::endpoints::EndpointEntry;
use crate::datapath::ipcache::IpcacheEntry;
use crate::datapath::maps::{MapMeta, ReadMethod};
use crate::datapath::tunnel::TunnelEntry;
use crate::datapath::{DatapathSnapshot, MapDump};
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{IdentityEntry, IdentityReference, IpEntry, KvMeta, NodeAddress, NodeEntry};
use crate::model::version::Layout;

fn meta(key: String) -> KvMeta {
    KvMeta { key: key.into(), mod_revision: 1, lease: 0 }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn dump<T>(name: &str, max: u32, entries: Vec<T>) -> MapDump<T> {
    MapDump {
        meta: MapMeta { name: name.into(), path: name.into(), id: 1, map_type: "hash".into(), key_size: 0, value_size: 0, max_entries: max, flags: 0 },
        entry_count: entries.len(),
        fill_ratio: entries.len() as f64 / f64::from(max),
        read_method: ReadMethod::BatchLookup,
        entries,
        undecodable: Vec::new(),
        raw: None,
    }
}

fn node(i: u8) -> NodeEntry {
    NodeEntry {
        meta: meta(format!("cilium/state/nodes/v1/default/node-{i}")),
        name: format!("node-{i}"),
        cluster: "default".into(),
        addresses: vec![
            NodeAddress { addr_type: "InternalIP".into(), ip: v4(192, 168, 0, i) },
            NodeAddress { addr_type: "CiliumInternalIP".into(), ip: v4(10, i, 0, 1) },
        ],
        ipv4_alloc_cidr: Some(IpNet::new(v4(10, i, 0, 0), 24).unwrap()),
        ipv6_alloc_cidr: None,
        ipv4_secondary_alloc_cidrs: vec![],
        ipv6_secondary_alloc_cidrs: vec![],
        ipv4_health_ip: None,
        ipv6_health_ip: None,
        ipv4_ingress_ip: None,
        ipv6_ingress_ip: None,
        cluster_id: 0,
        source: "local".into(),
        encryption_key: 0,
        node_identity: 0,
    }
}

fn ipc(prefix: IpAddr, identity: u32, tunnel: Option<IpAddr>) -> IpcacheEntry {
    IpcacheEntry { prefix: IpNet::from(prefix), cluster_id: 0, identity, tunnel_endpoint: tunnel, encrypt_key: 0, flags: 0, flag_names: Default::default(), node_id: None }
}

fn endpoint(ip: IpAddr, id: u16, identity: Option<u32>, host: bool) -> EndpointEntry {
    EndpointEntry {
        ip,
        key_byte: 0,
        cluster_id: 0,
        ifindex: if host { 0 } else { u32::from(id) },
        endpoint_id: if host { 0 } else { id },
        flags: u32::from(host),
        flag_names: vec![],
        is_host: host,
        mac: None,
        node_mac: None,
        identity,
        parent_ifindex: None,
        rt_info: None,
    }
}

/// A consistent world: node 1 is "this" node; `pods[n]` lists (identity index) of the pods on
/// node n+1.
#[derive(Clone, Debug)]
struct World {
    kv: KvstoreSnapshot,
    dp: DatapathSnapshot,
    host: HostAddresses,
    ctx: NodeContext,
}

fn world(pods: &[Vec<u8>], layout: Layout) -> World {
    let identity = |k: u8| 1000 + u32::from(k);
    let mut kv = KvstoreSnapshot { revision: 10, ..Default::default() };
    let mut ipcache = vec![ipc(v4(0, 0, 0, 0), 2, None)];
    ipcache[0].prefix = "0.0.0.0/0".parse().unwrap();
    let mut lxc = Vec::new();
    let mut tunnel = Vec::new();
    let this_ip = v4(192, 168, 0, 1);
    let mut used_here = BTreeSet::new();
    for (n, node_pods) in pods.iter().enumerate() {
        let i = n as u8 + 1;
        let nd = node(i);
        let node_ip = v4(192, 168, 0, i);
        let local = i == 1;
        for a in &nd.addresses {
            let is_router = a.addr_type == "CiliumInternalIP";
            let tunnel_ep = (!local && is_router).then_some(node_ip);
            ipcache.push(ipc(a.ip, if local { 1 } else { 6 }, tunnel_ep));
            if local {
                lxc.push(endpoint(a.ip, 0, Some(0), true));
            }
        }
        if !local {
            tunnel.push(TunnelEntry { prefix: v4(10, i, 0, 0), cluster_id: 0, tunnel_endpoint: node_ip, encrypt_key: 0, node_id: None });
        }
        for (p, k) in node_pods.iter().enumerate() {
            let ip = v4(10, i, 0, 10 + p as u8);
            let id = identity(*k);
            kv.ips.push(IpEntry {
                meta: meta(format!("cilium/state/ip/v1/default/{ip}")),
                prefix: IpNet::from(ip),
                host_ip: Some(node_ip),
                identity: id,
                encrypt_key: 0,
                owner: Default::default(),
            });
            ipcache.push(ipc(ip, id, (!local).then_some(node_ip)));
            if local {
                lxc.push(endpoint(ip, 10 + p as u16, (layout >= Layout::V1_14).then_some(id), false));
                used_here.insert(id);
            }
        }
        kv.nodes.push(nd);
    }
    for k in 0..8u8 {
        let id = identity(k);
        let labels = format!("k8s:app=a{k};");
        kv.identities.insert(id, IdentityEntry { meta: meta(format!("cilium/state/identities/v1/id/{id}")), id, labels: labels.clone() });
        if used_here.contains(&id) {
            kv.identity_references.push(IdentityReference {
                meta: meta(format!("cilium/state/identities/v1/value/{labels}/{this_ip}")),
                labels,
                node: this_ip.to_string(),
                id,
            });
        }
    }
    let host = HostAddresses {
        cilium_host: Some(Interface { name: "cilium_host".into(), ifindex: 3, addresses: vec![IpNet::new(v4(10, 1, 0, 1), 32).unwrap()], xdp: vec![] }),
        interfaces: vec![
            Interface { name: "eth0".into(), ifindex: 2, addresses: vec![IpNet::new(this_ip, 24).unwrap()], xdp: vec![] },
            Interface { name: "cilium_host".into(), ifindex: 3, addresses: vec![IpNet::new(v4(10, 1, 0, 1), 32).unwrap()], xdp: vec![] },
        ],
    };
    let dp = DatapathSnapshot {
        bpffs: "/sys/fs/bpf".into(),
        layout: LayoutChoice { layout, source: "option", reasons: vec![], also_possible: vec![] },
        ipcache: dump("cilium_ipcache", 512_000, ipcache),
        endpoints: dump("cilium_lxc", 65_535, lxc),
        tunnel: layout.has_tunnel_map().then(|| dump("cilium_tunnel_map", 65_536, tunnel)),
        live_maps: Default::default(),
    };
    let ctx = NodeContext {
        node_name: "node-1".into(),
        cluster: "default".into(),
        layout,
        config: DatapathConfig { ipv4: Some(true), ipv6: Some(false), tunnel: Some(true), remote_node_identity: Some(true), encryption: Some(false), node_encryption: Some(false), host_firewall: Some(false), identity_allocation_mode: None, kvstore: None, endpoint_slices: None, sources: vec![] },
        local_addresses: [this_ip, v4(10, 1, 0, 1)].into_iter().collect(),
        tunnel_map_in_use: true,
    };
    World { kv, dp, host, ctx }
}

fn findings(w: &World) -> Vec<super::diff::Finding> {
    let exp = derive(&w.kv, &w.ctx);
    diff(&exp, &w.ctx, &Observed { datapath: &w.dp, host: &w.host, kvstore: &w.kv, now: chrono::Utc::now() })
}

fn arb_world() -> impl Strategy<Value = World> {
    let pods = prop::collection::vec(prop::collection::vec(0u8..8, 0..6), 1..6);
    let layout = prop::sample::select(vec![Layout::V1_7, Layout::V1_15, Layout::V1_17]);
    (pods, layout).prop_map(|(p, l)| world(&p, l))
}

/// One mutation of the datapath or the kvstore, and the IP it is about.
#[derive(Clone, Debug)]
enum Mutation {
    DropIpcache(usize),
    ChangeIdentity(usize, u32),
    ChangeTunnel(usize),
    AddStale(u8),
    DropIpEntry(usize),
    /// A pod's identity changed in the kvstore only.
    ChangeIpEntryIdentity(usize, u32),
    /// An identity's `id/` key lost (used by local or only by remote pods, or by none).
    DropIdentity(u8),
}

fn apply(w: &mut World, m: &Mutation) -> Option<String> {
    let ipc = &mut w.dp.ipcache.entries;
    match m {
        Mutation::DropIpcache(i) => {
            let e = ipc.remove(i % ipc.len());
            // Entries Cilium may legitimately omit (e.g. remote InternalIPs in v1.10-v1.12's
            // legacy mode) are optional: dropping one is not drift.
            let exp = derive(&w.kv, &w.ctx);
            exp.ipcache.get(&e.prefix).is_some_and(|x| x.required).then(|| e.prefix.addr().to_string())
        }
        Mutation::ChangeIdentity(i, id) => {
            let n = ipc.len();
            let e = &mut ipc[i % n];
            e.identity = if e.identity == *id { id + 1 } else { *id };
            Some(e.prefix.addr().to_string())
        }
        Mutation::ChangeTunnel(i) => {
            let n = ipc.len();
            let e = &mut ipc[i % n];
            e.tunnel_endpoint = Some(v4(172, 31, 255, 254));
            Some(e.prefix.addr().to_string())
        }
        Mutation::AddStale(d) => {
            let ip = v4(10, 250, 0, *d);
            ipc.push(ipc_entry_stale(ip));
            Some(ip.to_string())
        }
        Mutation::DropIpEntry(i) => {
            if w.kv.ips.is_empty() {
                return None;
            }
            let n = w.kv.ips.len();
            let e = w.kv.ips.remove(i % n);
            Some(e.prefix.addr().to_string())
        }
        Mutation::ChangeIpEntryIdentity(i, id) => {
            let n = w.kv.ips.len();
            let e = w.kv.ips.get_mut(i % n.max(1))?;
            e.identity = if e.identity == *id { id + 1 } else { *id };
            Some(e.prefix.addr().to_string())
        }
        Mutation::DropIdentity(k) => {
            let id = 1000 + u32::from(k % 8);
            w.kv.identities.remove(&id);
            // Drift only while something on this node refers to it.
            let used = w.kv.ips.iter().any(|e| e.identity == id) || w.dp.ipcache.entries.iter().any(|e| e.identity == id);
            used.then(|| id.to_string())
        }
    }
}

fn ipc_entry_stale(ip: IpAddr) -> IpcacheEntry {
    ipc(ip, 1000, Some(v4(192, 168, 0, 2)))
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::DropIpcache),
        (any::<usize>(), 1000u32..1008).prop_map(|(i, id)| Mutation::ChangeIdentity(i, id)),
        any::<usize>().prop_map(Mutation::ChangeTunnel),
        any::<u8>().prop_map(Mutation::AddStale),
        any::<usize>().prop_map(Mutation::DropIpEntry),
        (any::<usize>(), 1000u32..1008).prop_map(|(i, id)| Mutation::ChangeIpEntryIdentity(i, id)),
        any::<u8>().prop_map(Mutation::DropIdentity),
    ]
}

proptest! {
    #[test]
    fn consistent_worlds_have_no_findings(w in arb_world()) {
        let f = findings(&w);
        prop_assert!(f.is_empty(), "{:#?}", f);
    }

    #[test]
    fn one_mutation_gives_findings_about_that_subject_only(w in arb_world(), m in arb_mutation()) {
        let mut w = w;
        let Some(subject_ip) = apply(&mut w, &m) else { return Ok(()) };
        let f = findings(&w);
        prop_assert!(!f.is_empty(), "mutation {:?} went unnoticed", m);
        // Identity findings name identities: the mutated ip's identity references may follow.
        let by_kind: BTreeMap<_, _> = f.iter().map(|x| (x.kind, x.subject.clone())).collect();
        for x in &f {
            let about_ip = x.subject.split('/').next() == Some(subject_ip.as_str());
            let identity_side_effect = matches!(
                x.kind,
                super::kinds::FindingKind::IdentityReferenceLeaked | super::kinds::FindingKind::IdentityReferenceMissing | super::kinds::FindingKind::IdentityMissing
            );
            prop_assert!(about_ip || identity_side_effect, "mutation {:?} on {} also reported {:?}", m, subject_ip, by_kind);
        }
    }
}

/// The changes that turn world `a` into `b`, as the agent receives them: confirmed ipcache
/// changes and etcd watch events.
fn changes_between(a: &World, b: &World) -> (Vec<DatapathChange>, Vec<Change>) {
    let by_prefix = |w: &World| -> BTreeMap<IpNet, IpcacheEntry> { w.dp.ipcache.entries.iter().map(|e| (e.prefix, e.clone())).collect() };
    let (old, new) = (by_prefix(a), by_prefix(b));
    let mut dp = Vec::new();
    for p in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
        let (o, n) = (old.get(p), new.get(p));
        if o.map(|e| (e.identity, e.tunnel_endpoint)) == n.map(|e| (e.identity, e.tunnel_endpoint)) {
            continue;
        }
        dp.push(DatapathChange {
            map: "cilium_ipcache".into(),
            kind: MapKind::Ipcache,
            op: if o.is_none() { Op::Added } else if n.is_none() { Op::Removed } else { Op::Updated },
            subject: p.to_string(),
            old: None,
            new: None,
            at: String::new(),
            source: "test",
            old_entry: o.cloned().map(Entry::Ipcache),
            new_entry: n.cloned().map(Entry::Ipcache),
            undecodable: false,
        });
    }
    let by_key = |w: &World| -> BTreeMap<std::sync::Arc<str>, IpEntry> { w.kv.ips.iter().map(|e| (e.meta.key.clone(), e.clone())).collect() };
    let (old, new) = (by_key(a), by_key(b));
    let mut kv = Vec::new();
    for (k, e) in &new {
        if old.get(k).map(|o| (o.identity, o.host_ip)) != Some((e.identity, e.host_ip)) {
            let host = e.host_ip.map(|h| h.to_string()).unwrap_or_default();
            let value = format!(r#"{{"IP":"{}","Mask":null,"HostIP":"{host}","ID":{},"Key":0}}"#, e.prefix.addr(), e.identity);
            kv.push(Change::Put { key: k.to_string(), value, mod_revision: 11, lease: 0 });
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        kv.push(Change::Delete { key: k.to_string(), mod_revision: 11 });
    }
    for (_, i) in a.kv.identities.iter().filter(|(id, _)| !b.kv.identities.contains_key(*id)) {
        kv.push(Change::Delete { key: i.meta.key.to_string(), mod_revision: 11 });
    }
    (dp, kv)
}

fn reading(w: &World) -> Reading {
    let now = chrono::Utc::now();
    Reading { datapath: w.dp.clone(), host: w.host.clone(), kvstore: w.kv.clone(), health: Default::default(), datapath_read_at: now, kvstore_read_at: now }
}

fn ids(f: &[super::diff::Finding]) -> BTreeSet<(super::kinds::FindingKind, String)> {
    f.iter().map(super::diff::Finding::id).collect()
}

proptest! {
    #[test]
    fn incremental_rechecks_agree_with_a_full_check(w in arb_world(), ms in prop::collection::vec(arb_mutation(), 1..4)) {
        rechecks_agree(w, &ms, false)?;
    }

    #[test]
    fn incremental_rechecks_agree_with_a_full_check_in_crd_mode(w in arb_world(), ms in prop::collection::vec(arb_mutation(), 1..4)) {
        rechecks_agree(as_objects(w), &ms, true)?;
    }
}

/// Applies each mutation to the live check as the agent receives it (map changes, and etcd
/// watch events or, with `objects`, the Kubernetes watch's object changes) and compares every
/// incremental re-check with a full check of the same state.
fn rechecks_agree(w: World, ms: &[Mutation], objects: bool) -> Result<(), TestCaseError> {
    let mut live = LiveCheck::new(&w.ctx.node_name, &w.ctx.cluster, w.ctx.config.clone(), reading(&w));
    let first = live.recheck();
    prop_assert_eq!(&first.scope, &Scope::Full);
    let mut known = ids(&first.findings);
    let mut cur = w;
    for m in ms {
        let mut next = cur.clone();
        apply(&mut next, m);
        let (dp, kv) = changes_between(&cur, &next);
        live.apply_datapath(&dp);
        if objects {
            live.apply_kvstore(&kv.into_iter().filter(|c| !crate::k8s::decode::is_object_ref(c.key())).collect::<Vec<_>>(), 11);
            live.apply_objects(object_changes(&cur, &next));
        } else {
            live.apply_kvstore(&kv, 11);
        }
        let r = live.recheck();
        // What the tracker does: covered ids are replaced by the re-check's findings.
        known.retain(|id| !r.scope.covers(id));
        known.extend(ids(&r.findings));
        prop_assert_eq!(&known, &ids(&findings(&next)), "after {:?} (scope {:?})", m, r.scope);
        // The entries are held once each, as the last change gave them.
        let entries = |ips: &[IpEntry]| -> Vec<(std::sync::Arc<str>, IpNet, u32)> {
            let mut v: Vec<_> = ips.iter().map(|e| (e.meta.key.clone(), e.prefix, e.identity)).collect();
            v.sort();
            v
        };
        prop_assert_eq!(entries(&live.reading().kvstore.ips), entries(&next.kv.ips));
        cur = next;
    }
    // The changes merged into the copy of the maps give the same full check.
    prop_assert_eq!(ids(&live.recheck_all().findings), ids(&findings(&cur)));
    Ok(())
}

/// Cilium's node-delete hold-off in the agent's live check: a deleted remote node's entries
/// are neither required nor stale until the hold-off ends; then they are stale.
#[test]
fn a_deleted_nodes_entries_are_held_until_the_hold_off_ends() {
    use super::kinds::FindingKind::{IpcacheStale, TunnelStale};
    let w = world(&[vec![0], vec![1]], Layout::V1_15);
    let mut live = LiveCheck::new(&w.ctx.node_name, &w.ctx.cluster, w.ctx.config.clone(), reading(&w));
    live.set_hold_off(std::time::Duration::from_secs(30));
    assert!(live.recheck().findings.is_empty());
    let key = "cilium/state/nodes/v1/default/node-2".to_owned();
    live.apply_kvstore(&[Change::Delete { key, mod_revision: 11 }], 11);
    let r = live.recheck();
    assert!(r.findings.is_empty(), "held entries reported: {:?}", ids(&r.findings));
    assert_eq!(live.held_nodes().len(), 1);
    assert!(!live.expire_held(chrono::Utc::now()), "ended too early");
    assert!(live.expire_held(chrono::Utc::now() + chrono::Duration::seconds(31)));
    let stale: BTreeSet<_> = ids(&live.recheck().findings).into_iter().filter(|(k, _)| matches!(k, IpcacheStale | TunnelStale)).map(|(_, s)| s).collect();
    let want: BTreeSet<String> = ["192.168.0.2/32", "10.2.0.1/32", "10.2.0.0"].iter().map(ToString::to_string).collect();
    assert_eq!(stale, want);
}

/// A node back within its hold-off: Cilium drops the delete, nothing is held or stale.
#[test]
fn a_node_back_within_its_hold_off_ends_the_hold() {
    let w = world(&[vec![0], vec![1]], Layout::V1_15);
    let mut live = LiveCheck::new(&w.ctx.node_name, &w.ctx.cluster, w.ctx.config.clone(), reading(&w));
    live.set_hold_off(std::time::Duration::from_secs(30));
    live.recheck();
    let key = "cilium/state/nodes/v1/default/node-2".to_owned();
    live.apply_kvstore(&[Change::Delete { key: key.clone(), mod_revision: 11 }], 11);
    let value = serde_json::json!({"Name": "node-2", "Cluster": "default", "IPAddresses": [{"Type": "InternalIP", "IP": "192.168.0.2"}, {"Type": "CiliumInternalIP", "IP": "10.2.0.1"}], "IPv4AllocCIDR": {"IP": "10.2.0.0", "Mask": "////AA=="}});
    live.apply_kvstore(&[Change::Put { key, value: value.to_string(), mod_revision: 12, lease: 0 }], 12);
    assert!(live.held_nodes().is_empty());
    assert!(!live.expire_held(chrono::Utc::now() + chrono::Duration::seconds(31)));
    let r = live.recheck_all();
    assert!(r.findings.is_empty(), "{:?}", ids(&r.findings));
}

/// An identity only remote pods use, lost from the kvstore: `identity-missing`, naming the
/// prefixes that carry it (this node's policy needs its labels).
#[test]
fn identity_missing_for_an_identity_only_remote_pods_use() {
    let mut w = world(&[vec![0], vec![3, 3]], Layout::V1_15);
    w.kv.identities.remove(&1003);
    let f = findings(&w);
    assert_eq!(ids(&f), BTreeSet::from([(super::kinds::FindingKind::IdentityMissing, "1003".to_owned())]));
    let evidence = f[0].datapath.as_ref().unwrap().value();
    assert_eq!(evidence["ipcache_entries"], 4, "two ip/v1 entries and two ipcache entries: {evidence}");
    assert_eq!(evidence["prefixes"], serde_json::json!(["10.2.0.10/32", "10.2.0.11/32"]));
}

/// Identities of another ClusterMesh cluster (its id in bits 16-23) and reserved or local-scope
/// ones are not this kvstore's.
#[test]
fn identities_of_other_clusters_and_reserved_ones_are_not_required() {
    let mut w = world(&[vec![0], vec![]], Layout::V1_15);
    for id in [(3 << 16) | 1000, 4, (1 << 24) | 7] {
        w.dp.ipcache.entries.push(ipc(v4(10, 9, 9, (id % 200) as u8), id, Some(v4(192, 168, 0, 2))));
        w.kv.ips.push(IpEntry {
            meta: meta(format!("cilium/state/ip/v1/default/10.9.9.{}", id % 200)),
            prefix: IpNet::from(v4(10, 9, 9, (id % 200) as u8)),
            host_ip: Some(v4(192, 168, 0, 2)),
            identity: id,
            encrypt_key: 0,
            owner: Default::default(),
        });
    }
    let f: Vec<_> = ids(&findings(&w)).into_iter().filter(|(k, _)| *k == super::kinds::FindingKind::IdentityMissing).collect();
    assert!(f.is_empty(), "{f:?}");
}

/// `w` with its pod IPs as CRD mode holds them: each node's pods in one CiliumEndpointSlice
/// (several entries per object, as CES mode gives).
fn as_objects(mut w: World) -> World {
    for e in &mut w.kv.ips {
        let node = e.host_ip.map(|h| h.to_string()).unwrap_or_default();
        e.meta.key = format!("CiliumEndpoint default/p-{} (CiliumEndpointSlice ces-{node})", e.prefix.addr()).into();
    }
    w
}

/// The watch's view of `b`: every object applied again (a new resourceVersion; unchanged ones
/// must change nothing), those `a` had and `b` lacks deleted.
fn object_changes(a: &World, b: &World) -> Vec<crate::k8s::watch::ObjectChange> {
    use crate::k8s::decode::object_of;
    use crate::k8s::watch::{DecodedObject, ObjectChange};
    let group = |w: &World| -> BTreeMap<String, Vec<IpEntry>> {
        let mut g: BTreeMap<String, Vec<IpEntry>> = BTreeMap::new();
        for e in &w.kv.ips {
            g.entry(object_of(&e.meta.key).to_owned()).or_default().push(e.clone());
        }
        g
    };
    let (old, new) = (group(a), group(b));
    let mut out: Vec<ObjectChange> = old.keys().filter(|o| !new.contains_key(*o)).map(|o| ObjectChange::Delete(o.clone())).collect();
    for (object, mut ips) in new {
        for e in &mut ips {
            e.meta.mod_revision += 1;
        }
        out.push(ObjectChange::Apply(DecodedObject { object, ips, ..Default::default() }));
    }
    out
}

/// An object applied again with only a new resourceVersion touches nothing; a changed one
/// touches its prefixes; a deleted slice takes all its endpoints' entries.
#[test]
fn objects_applied_again_unchanged_touch_nothing() {
    use crate::k8s::watch::{DecodedObject, ObjectChange};
    let w = as_objects(world(&[vec![0], vec![1, 2, 3]], Layout::V1_17));
    let mut live = LiveCheck::new(&w.ctx.node_name, &w.ctx.cluster, w.ctx.config.clone(), reading(&w));
    live.recheck();
    let slice = "CiliumEndpointSlice ces-192.168.0.2";
    let mut ips: Vec<IpEntry> = w.kv.ips.iter().filter(|e| e.meta.key.ends_with("(CiliumEndpointSlice ces-192.168.0.2)")).cloned().collect();
    assert_eq!(ips.len(), 3);
    for e in &mut ips {
        e.meta.mod_revision = 99;
    }
    live.apply_objects(vec![ObjectChange::Apply(DecodedObject { object: slice.into(), ips: ips.clone(), ..Default::default() })]);
    assert_eq!(live.recheck().scope, Scope::Prefixes(Default::default()));
    assert!(live.reading().kvstore.ips.iter().filter(|e| e.meta.key.ends_with("ces-192.168.0.2)")).all(|e| e.meta.mod_revision == 99), "brought to the new resourceVersion");
    ips[1].identity = 1007;
    live.apply_objects(vec![ObjectChange::Apply(DecodedObject { object: slice.into(), ips, ..Default::default() })]);
    let Scope::Prefixes(touched) = live.recheck().scope else { panic!("a scoped re-check") };
    assert_eq!(touched.len(), 3, "{touched:?}");
    live.apply_objects(vec![ObjectChange::Delete(slice.into())]);
    live.recheck();
    assert_eq!(live.reading().kvstore.ips.len(), 1, "only node 1's pod is left");
}
