//! The agent's list+watch of Cilium's objects (kube-rs's watcher: paged initial list, watch
//! with bookmarks, resume from the last resourceVersion, relist after 410 Gone, backoff on
//! errors). Objects are kept decoded, only the fields the rules use, per object; each batch of
//! events says which ipcache prefixes it touched so the live check re-checks only those.

use std::collections::{BTreeMap, HashMap};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use ipnet::IpNet;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use super::client::{api_error, K8sError, KubeOptions};
use super::crds::{CiliumEndpoint, CiliumEndpointSlice, CiliumIdentity, CiliumNode};
use super::decode;
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{IdentityEntry, IpEntry, Malformed, NodeEntry};
use crate::model::source::StateSource;

/// Events taken from the streams per batch at most (the rest come with the next).
const MAX_BATCH: usize = 4096;

/// What one object decoded into.
#[derive(Clone, Debug, Default)]
struct Decoded {
    /// The object (`CiliumEndpoint ns/name`).
    key: String,
    ips: Vec<IpEntry>,
    node: Option<NodeEntry>,
    identity: Option<IdentityEntry>,
    malformed: Vec<Malformed>,
}

impl Decoded {
    fn of(f: impl FnOnce(&mut KvstoreSnapshot)) -> Decoded {
        let mut s = KvstoreSnapshot::default();
        f(&mut s);
        Decoded { key: String::new(), ips: s.ips, node: s.nodes.pop(), identity: s.identities.into_values().next(), malformed: s.malformed }
    }
}

/// An object as kept between events: boxed slices and boxes, so a CiliumEndpoint costs its
/// entries and a few words (100k of them are held).
#[derive(Clone, Debug, Default, PartialEq)]
struct Stored {
    ips: Box<[IpEntry]>,
    node: Option<Box<NodeEntry>>,
    identity: Option<Box<IdentityEntry>>,
    malformed: Box<[Malformed]>,
}

impl Stored {
    fn of(d: Decoded) -> (String, Stored) {
        (d.key, Stored { ips: d.ips.into(), node: d.node.map(Box::new), identity: d.identity.map(Box::new), malformed: d.malformed.into() })
    }

    fn prefixes(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.ips.iter().map(|e| e.prefix).collect();
        if let Some(n) = &self.node {
            out.extend(crate::check::live::node_prefixes(n));
        }
        out
    }
}

/// One kind's objects: object (`CiliumEndpoint ns/name`) → what it decoded into.
#[derive(Default)]
struct KindStore {
    objects: HashMap<String, Stored>,
    /// The objects of a list in progress (a start or a relist), swapped in when it is done.
    listing: Option<HashMap<String, Stored>>,
    synced: bool,
}

enum KindEvent {
    Object(&'static str, Event<Decoded>),
    Error(&'static str, String),
}

/// What a batch of events changed.
#[derive(Debug, Default)]
pub struct ObjectBatch {
    pub events: usize,
    /// Ipcache prefixes whose expectations may have changed.
    pub touched: Vec<IpNet>,
    /// This node's own CiliumNode changed (everything may change).
    pub own_node: bool,
    pub identities: bool,
    /// Kinds whose (re)list completed in this batch.
    pub listed: Vec<&'static str>,
    /// Watch errors (the watcher backs off and resumes or relists by itself).
    pub errors: Vec<String>,
}

pub struct KubeWatcher {
    streams: SelectAll<BoxStream<'static, KindEvent>>,
    kinds: BTreeMap<&'static str, KindStore>,
    node_name: String,
    /// Nodes and pod IPs are watched (CRD mode), not only identities.
    endpoints: bool,
    slices: bool,
}

fn stream<K>(client: &kube::Client, opts: &KubeOptions, decode: impl Fn(&K) -> Decoded + Send + Sync + 'static) -> BoxStream<'static, KindEvent>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let plural: &'static str = match K::plural(&()) {
        std::borrow::Cow::Borrowed(p) => p,
        std::borrow::Cow::Owned(p) => Box::leak(p.into_boxed_str()),
    };
    let api: Api<K> = Api::all(client.clone());
    let config = watcher::Config::default().page_size(opts.page_size);
    watcher::watcher(api, config)
        .default_backoff()
        .map(move |e| match e {
            Ok(ev) => KindEvent::Object(plural, ev.map_decoded(&|o: &K| {
                let m = o.meta();
                Decoded { key: decode::object_ref(&K::kind(&()), m.namespace.as_deref(), m.name.as_deref().unwrap_or_default()), ..decode(o) }
            })),
            Err(e) => KindEvent::Error(plural, watch_error(plural, e)),
        })
        .boxed()
}

/// Maps a watcher event's object through `decode` (kube's `Event::map` needs the same type).
trait MapDecoded<K> {
    fn map_decoded(self, f: &dyn Fn(&K) -> Decoded) -> Event<Decoded>;
}

impl<K> MapDecoded<K> for Event<K> {
    fn map_decoded(self, f: &dyn Fn(&K) -> Decoded) -> Event<Decoded> {
        match self {
            Event::Apply(o) => Event::Apply(f(&o)),
            Event::Delete(o) => Event::Delete(f(&o)),
            Event::Init => Event::Init,
            Event::InitApply(o) => Event::InitApply(f(&o)),
            Event::InitDone => Event::InitDone,
        }
    }
}

fn watch_error(plural: &str, e: watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => api_error(plural, e).to_string(),
        watcher::Error::WatchError(s) => K8sError::Api { resource: plural.to_owned(), message: format!("{} {}: {}", s.code, s.reason, s.message) }.to_string(),
        other => format!("Kubernetes API: watching {plural}: {other}"),
    }
}

impl KubeWatcher {
    /// Starts watching: with `endpoints` CiliumNodes and CiliumEndpoints (or, with `slices`,
    /// CiliumEndpointSlices) of cluster `cluster` (id `cluster_id`); with `identities`
    /// CiliumIdentities.
    pub fn start(client: &kube::Client, opts: &KubeOptions, node_name: &str, cluster: &str, cluster_id: u32, endpoints: bool, slices: bool, identities: bool) -> KubeWatcher {
        let mut streams = SelectAll::new();
        let mut kinds = BTreeMap::new();
        if endpoints {
            let cluster = cluster.to_owned();
            streams.push(stream::<CiliumNode>(client, opts, move |o| Decoded::of(|s| decode::decode_node(o, &cluster, cluster_id, s))));
            kinds.insert("ciliumnodes", KindStore::default());
            if slices {
                streams.push(stream::<CiliumEndpointSlice>(client, opts, |o| Decoded::of(|s| decode::decode_endpoint_slice(o, s))));
                kinds.insert("ciliumendpointslices", KindStore::default());
            } else {
                streams.push(stream::<CiliumEndpoint>(client, opts, |o| Decoded::of(|s| decode::decode_endpoint(o, s))));
                kinds.insert("ciliumendpoints", KindStore::default());
            }
        }
        if identities {
            streams.push(stream::<CiliumIdentity>(client, opts, |o| Decoded::of(|s| decode::decode_identity(o, s))));
            kinds.insert("ciliumidentities", KindStore::default());
        }
        KubeWatcher { streams, kinds, node_name: node_name.to_owned(), endpoints, slices }
    }

    /// Whether every kind has completed its first list.
    pub fn synced(&self) -> bool {
        self.kinds.values().all(|k| k.synced)
    }

    /// The next batch: waits for one event, then takes those already there.
    pub async fn next(&mut self) -> ObjectBatch {
        let mut batch = ObjectBatch::default();
        let Some(first) = self.streams.next().await else {
            // No streams (nothing to watch): never ready.
            return std::future::pending().await;
        };
        self.apply(first, &mut batch);
        while batch.events < MAX_BATCH {
            match self.streams.next().now_or_never() {
                Some(Some(e)) => self.apply(e, &mut batch),
                _ => break,
            }
        }
        batch
    }

    fn apply(&mut self, e: KindEvent, batch: &mut ObjectBatch) {
        batch.events += 1;
        let (plural, ev) = match e {
            KindEvent::Error(plural, msg) => {
                tracing::warn!(event = "kubernetes-watch-error", resource = plural, error = %msg, "Kubernetes watch interrupted; the watcher backs off and resumes");
                batch.errors.push(msg);
                return;
            }
            KindEvent::Object(p, ev) => (p, ev),
        };
        let Some(store) = self.kinds.get_mut(plural) else { return };
        let own = format!("CiliumNode {}", self.node_name);
        let touch = |d: &Stored, batch: &mut ObjectBatch| {
            batch.touched.extend(d.prefixes());
            batch.own_node |= d.node.as_ref().is_some_and(|n| n.meta.key == own);
            batch.identities |= d.identity.is_some();
        };
        match ev {
            Event::Init => store.listing = Some(HashMap::new()),
            Event::InitApply(d) => {
                if let Some(listing) = store.listing.as_mut() {
                    let (k, o) = Stored::of(d);
                    listing.insert(k, o);
                }
            }
            Event::InitDone => {
                let new = store.listing.take().unwrap_or_default();
                // A relist: what changed while the watch was down counts as changed.
                for (k, old) in &store.objects {
                    if new.get(k).is_none_or(|n| n != old) {
                        touch(old, batch);
                    }
                }
                for (k, d) in &new {
                    if store.objects.get(k).is_none_or(|o| o != d) {
                        touch(d, batch);
                    }
                }
                store.objects = new;
                store.synced = true;
                batch.listed.push(plural);
            }
            Event::Apply(d) => {
                let (k, d) = Stored::of(d);
                if let Some(old) = store.objects.get(&k) {
                    touch(old, batch);
                }
                touch(&d, batch);
                store.objects.insert(k, d);
            }
            Event::Delete(d) => {
                let (k, d) = Stored::of(d);
                if let Some(old) = store.objects.remove(&k) {
                    touch(&old, batch);
                }
                touch(&d, batch);
            }
        }
    }

    /// Nodes and pod IPs as a snapshot (CRD mode), identities included when watched.
    pub fn snapshot(&self) -> KvstoreSnapshot {
        let mut s = KvstoreSnapshot::default();
        s.origin.endpoints = StateSource::Kubernetes;
        s.origin.endpoint_slices = self.slices;
        for store in self.kinds.values() {
            for d in store.objects.values() {
                s.ips.extend(d.ips.iter().cloned());
                s.nodes.extend(d.node.as_deref().cloned());
                s.malformed.extend(d.malformed.iter().cloned());
            }
        }
        // Stable order (the diff reports in a stable order anyway; this keeps dumps stable).
        s.nodes.sort_by(|a, b| a.meta.key.cmp(&b.meta.key));
        s.counts.nodes = s.nodes.len();
        s.counts.ips = s.ips.len();
        self.fill_identities(&mut s);
        s
    }

    /// Puts the watched CiliumIdentities into `s` (replacing the kvstore's), when watched.
    pub fn fill_identities(&self, s: &mut KvstoreSnapshot) {
        let Some(store) = self.kinds.get("ciliumidentities") else { return };
        s.identities = store.objects.values().filter_map(|d| d.identity.as_deref().cloned()).map(|i| (i.id, i)).collect();
        s.counts.identities = s.identities.len();
        s.identity_references.clear();
        s.malformed.retain(|m| !m.meta.key.starts_with("CiliumIdentity "));
        if !self.endpoints {
            s.malformed.extend(store.objects.values().flat_map(|d| d.malformed.iter().cloned()));
        }
        s.origin.identities = StateSource::Kubernetes;
        s.origin.identities_unread = None;
    }

    /// Objects held per kind (for the node-health line).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        self.kinds.iter().map(|(k, s)| (*k, s.objects.len())).collect()
    }
}
