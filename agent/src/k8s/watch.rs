//! The agent's list+watch of Cilium's objects (kube-rs's watcher: paged initial list, watch
//! with bookmarks, resume from the last resourceVersion, relist after 410 Gone, backoff on
//! errors). Each object is decoded as it arrives (only the fields the rules use) and handed to
//! the live check as an [`ObjectChange`]; the watcher keeps only the objects' names, to know
//! what a relist no longer has.

use std::collections::{BTreeMap, HashSet};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use super::client::{api_error, K8sError, KubeOptions};
use super::crds::{CiliumEndpoint, CiliumEndpointSlice, CiliumIdentity, CiliumNode};
use super::decode;
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{IdentityEntry, IpEntry, Malformed, NodeEntry};

/// Events taken from the streams per batch at most (the rest come with the next).
const MAX_BATCH: usize = 4096;

/// What one object decoded into.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedObject {
    /// The object (`CiliumEndpoint ns/name`, `CiliumEndpointSlice ces-1`, ...).
    pub object: String,
    pub ips: Vec<IpEntry>,
    pub node: Option<NodeEntry>,
    pub identity: Option<IdentityEntry>,
    pub malformed: Vec<Malformed>,
}

impl DecodedObject {
    fn of(f: impl FnOnce(&mut KvstoreSnapshot)) -> DecodedObject {
        let mut s = KvstoreSnapshot::default();
        f(&mut s);
        DecodedObject { object: String::new(), ips: s.ips, node: s.nodes.pop(), identity: s.identities.into_values().next(), malformed: s.malformed }
    }
}

/// One change to Cilium's objects, in the order the watch saw it. The live check holds the
/// objects' entries (one copy); the watcher holds only their names.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectChange {
    /// The object as it is now (new, changed, or listed again).
    Apply(DecodedObject),
    /// The object is gone (deleted, or absent from a relist).
    Delete(String),
}

/// One kind's objects, by name (`CiliumEndpoint ns/name`).
#[derive(Default)]
struct KindStore {
    objects: HashSet<Box<str>>,
    /// The objects of a list in progress (a start or a relist): those held but not listed
    /// again are gone when it is done.
    listing: Option<HashSet<Box<str>>>,
    synced: bool,
}

enum KindEvent {
    Object(&'static str, Event<DecodedObject>),
    Error(&'static str, String),
}

/// What a batch of events changed.
#[derive(Debug, Default)]
pub struct ObjectBatch {
    pub events: usize,
    /// The changes, in order, for the live check to apply.
    pub changes: Vec<ObjectChange>,
    /// Kinds whose (re)list completed in this batch.
    pub listed: Vec<&'static str>,
    /// Watch errors (the watcher backs off and resumes or relists by itself).
    pub errors: Vec<String>,
}

pub struct KubeWatcher {
    streams: SelectAll<BoxStream<'static, KindEvent>>,
    kinds: BTreeMap<&'static str, KindStore>,
}

fn stream<K>(client: &kube::Client, opts: &KubeOptions, decode: impl Fn(&K) -> DecodedObject + Send + Sync + 'static) -> BoxStream<'static, KindEvent>
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
                DecodedObject { object: decode::object_ref(&K::kind(&()), m.namespace.as_deref(), m.name.as_deref().unwrap_or_default()), ..decode(o) }
            })),
            Err(e) => KindEvent::Error(plural, watch_error(plural, e)),
        })
        .boxed()
}

/// Maps a watcher event's object through `decode` (kube's `Event::map` needs the same type).
trait MapDecoded<K> {
    fn map_decoded(self, f: &dyn Fn(&K) -> DecodedObject) -> Event<DecodedObject>;
}

impl<K> MapDecoded<K> for Event<K> {
    fn map_decoded(self, f: &dyn Fn(&K) -> DecodedObject) -> Event<DecodedObject> {
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
    pub fn start(client: &kube::Client, opts: &KubeOptions, cluster: &str, cluster_id: u32, endpoints: bool, slices: bool, identities: bool) -> KubeWatcher {
        let mut streams = SelectAll::new();
        let mut kinds = BTreeMap::new();
        if endpoints {
            let cluster = cluster.to_owned();
            streams.push(stream::<CiliumNode>(client, opts, move |o| DecodedObject::of(|s| decode::decode_node(o, &cluster, cluster_id, s))));
            kinds.insert("ciliumnodes", KindStore::default());
            if slices {
                streams.push(stream::<CiliumEndpointSlice>(client, opts, |o| DecodedObject::of(|s| decode::decode_endpoint_slice(o, s))));
                kinds.insert("ciliumendpointslices", KindStore::default());
            } else {
                streams.push(stream::<CiliumEndpoint>(client, opts, |o| DecodedObject::of(|s| decode::decode_endpoint(o, s))));
                kinds.insert("ciliumendpoints", KindStore::default());
            }
        }
        if identities {
            streams.push(stream::<CiliumIdentity>(client, opts, |o| DecodedObject::of(|s| decode::decode_identity(o, s))));
            kinds.insert("ciliumidentities", KindStore::default());
        }
        KubeWatcher { streams, kinds }
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
        match ev {
            Event::Init => store.listing = Some(HashSet::new()),
            Event::InitApply(d) => {
                if let Some(listing) = store.listing.as_mut() {
                    listing.insert(d.object.as_str().into());
                    batch.changes.push(ObjectChange::Apply(d));
                }
            }
            Event::InitDone => {
                let listed = store.listing.take().unwrap_or_default();
                // A relist: what was deleted while the watch was down is gone now.
                batch.changes.extend(store.objects.iter().filter(|o| !listed.contains(*o)).map(|o| ObjectChange::Delete(o.to_string())));
                store.objects = listed;
                store.synced = true;
                batch.listed.push(plural);
            }
            Event::Apply(d) => {
                store.objects.insert(d.object.as_str().into());
                batch.changes.push(ObjectChange::Apply(d));
            }
            Event::Delete(d) => {
                store.objects.remove(d.object.as_str());
                batch.changes.push(ObjectChange::Delete(d.object));
            }
        }
    }

    /// Objects held per kind (for the node-health line).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        self.kinds.iter().map(|(k, s)| (*k, s.objects.len())).collect()
    }
}
