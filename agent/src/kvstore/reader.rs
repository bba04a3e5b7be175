//! Paged, serializable range reads pinned to one revision, decoded into a kvstore snapshot.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use etcd_client::GetOptions;
use serde::Serialize;

use super::client::{Etcd, KvstoreError};
use super::range::{self, KvRef, RangePage, RangeRequest};
use super::values::{self, HeldNode, IdentityEntry, IdentityReference, IpEntry, KvMeta, Malformed, NodeEntry};

/// Keys per range request. Measured on etcd 3.4 with 100k Cilium IP entries: one range
/// 0.17-0.21 s but 66 MB resident; pages of 10k 0.22-0.27 s at 15 MB; pages of 1k 0.75-0.94 s
/// (3.4 recounts the remaining range on every page). A full check at the bench's size
/// (125k keys) made etcd spend ~240 ms of CPU at 10k pages, ~205 ms at 20k (it shares the
/// node's cores with the check), for ~1.5 MB more peak RSS once freed pages are given back.
pub const DEFAULT_PAGE_SIZE: i64 = 20_000;
/// etcd-client refuses responses over 4 MiB by default; a 10k page of Cilium nodes (~2 KiB each)
/// can exceed it. 64 MiB leaves three times that, and stays well under the pod's memory limit
/// (deploy/kvcheck.yaml) with the decoded page beside it.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

#[derive(Clone, Debug)]
pub struct ListOptions {
    pub page_size: i64,
    /// Also list KVStoreMesh's `cilium/cache/` copies of remote clusters.
    pub include_cache: bool,
}

impl Default for ListOptions {
    fn default() -> Self {
        ListOptions { page_size: DEFAULT_PAGE_SIZE, include_cache: false }
    }
}

/// Cilium's kvstore at one revision.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KvstoreSnapshot {
    pub revision: i64,
    pub nodes: Vec<NodeEntry>,
    pub ips: Vec<IpEntry>,
    pub identities: BTreeMap<u32, IdentityEntry>,
    pub identity_references: Vec<IdentityReference>,
    /// `cilium/.heartbeat` (RFC 3339 time written by the operator every minute), if present.
    pub heartbeat: Option<(KvMeta, String)>,
    /// `cilium/synced/<cluster>/<prefix>` canaries.
    pub synced: Vec<(KvMeta, String)>,
    /// Number of keys under `cilium/cache/` (KVStoreMesh), when asked for.
    pub cache_keys: Option<usize>,
    pub malformed: Vec<Malformed>,
    /// Values decoded per kind, including those a [`NodeFilter`] did not keep.
    pub counts: KeyCounts,
    /// Nodes deleted within Cilium's node-delete hold-off, whose entries the datapath may
    /// still hold (found in etcd's history by a one-shot check, or seen deleted by the agent).
    pub held_nodes: Vec<HeldNode>,
    /// Where each kind was read (the kvstore, or Kubernetes objects decoded into this model).
    pub origin: crate::model::source::Origin,
    /// ClusterMesh: the remote clusters this node's agent syncs, each read from its own
    /// kvstore (or KVStoreMesh's cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<Box<crate::clustermesh::Mesh>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeyCounts {
    pub nodes: usize,
    pub ips: usize,
    pub identities: usize,
    pub identity_references: usize,
}

/// Keep only what one node's view needs: the `ip/v1` entries it hosts and its identity
/// references. Every value is still decoded (malformed ones are reported) and counted.
#[derive(Clone, Debug, Default)]
pub struct NodeFilter {
    pub addresses: std::collections::BTreeSet<std::net::IpAddr>,
}

impl NodeFilter {
    fn keeps_ip(&self, e: &IpEntry) -> bool {
        self.keeps_host(e.host_ip)
    }

    fn keeps_host(&self, host_ip: Option<std::net::IpAddr>) -> bool {
        host_ip.is_some_and(|h| self.addresses.contains(&h))
    }

    fn keeps_reference(&self, r: &IdentityReference) -> bool {
        r.node.parse().is_ok_and(|ip| self.addresses.contains(&ip))
    }
}

impl KvstoreSnapshot {
    fn merge(&mut self, o: KvstoreSnapshot) {
        append(&mut self.nodes, o.nodes);
        append(&mut self.ips, o.ips);
        self.identities.extend(o.identities);
        append(&mut self.identity_references, o.identity_references);
        if o.heartbeat.is_some() {
            self.heartbeat = o.heartbeat;
        }
        self.synced.extend(o.synced);
        if let Some(c) = o.cache_keys {
            *self.cache_keys.get_or_insert(0) += c;
        }
        self.malformed.extend(o.malformed);
        self.counts.nodes += o.counts.nodes;
        self.counts.ips += o.counts.ips;
        self.counts.identities += o.counts.identities;
        self.counts.identity_references += o.counts.identity_references;
    }
}

/// `from` appended to `into`; taken whole when `into` is empty (each prefix decodes into its
/// own part), so 100k `ip/v1` entries are not copied while both copies are held (measured: a
/// 15 MB copy beside the part's 20 MB). A prefix's first part has room for the whole prefix
/// (see [`decode_page`]), so the parts of its runs are appended without growing it.
fn append<T>(into: &mut Vec<T>, from: Vec<T>) {
    if into.is_empty() {
        *into = from;
    } else {
        into.extend(from);
    }
}

impl KvstoreSnapshot {
    /// Drops whatever the snapshot holds for `key` (before re-reading it).
    pub fn remove_key(&mut self, key: &str) {
        // Only the list the key's prefix decodes into (the ip/v1 one may hold 100k entries).
        if key.starts_with(values::NODES_PREFIX) {
            self.nodes.retain(|n| &*n.meta.key != key);
        } else if key.starts_with(values::IP_PREFIX) {
            self.ips.retain(|e| &*e.meta.key != key);
        } else if key.starts_with(values::IDENTITY_ID_PREFIX) {
            self.identities.retain(|_, i| &*i.meta.key != key);
        } else if key.starts_with(values::IDENTITY_VALUE_PREFIX) {
            self.identity_references.retain(|r| &*r.meta.key != key);
        } else {
            self.synced.retain(|(m, _)| &*m.key != key);
        }
        self.malformed.retain(|m| &*m.meta.key != key);
        if self.heartbeat.as_ref().is_some_and(|(m, _)| &*m.key == key) {
            self.heartbeat = None;
        }
    }
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Lists every key under `prefix` in pages, all at `revision` (the first page's revision when
/// `None`), handing each page to `on_page` as it arrives so callers can decode and drop it,
/// with the number of keys left from that page on (etcd's count: the first page's is the
/// prefix's size, to make room for it once). Returns the revision read at.
pub async fn list_prefix(
    etcd: &Etcd,
    prefix: &str,
    revision: Option<i64>,
    page_size: i64,
    on_page: impl FnMut(&RangePage, usize),
) -> Result<i64, KvstoreError> {
    let pager = Pager::new(etcd, prefix, page_size);
    let end = prefix_end(prefix.as_bytes());
    let first = pager.fetch(prefix.as_bytes().to_vec(), end.clone(), revision).await?;
    let revision = revision.or_else(|| first.revision()).unwrap_or(0);
    pager.list_from(first, &end, revision, on_page).await?;
    Ok(revision)
}

/// Page requests for one prefix's keys.
#[derive(Clone)]
struct Pager {
    kv: etcd_client::KvClient,
    etcd: Etcd,
    prefix: String,
    page_size: i64,
}

impl Pager {
    fn new(etcd: &Etcd, prefix: &str, page_size: i64) -> Pager {
        let kv = etcd.client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        Pager { kv, etcd: etcd.clone(), prefix: prefix.to_owned(), page_size }
    }

    /// One page of `[start, end)` at `revision` (the current one when `None`), owning what it
    /// needs so it can be spawned.
    fn fetch(&self, start: Vec<u8>, end: Vec<u8>, revision: Option<i64>) -> impl Future<Output = Result<RangePage, KvstoreError>> + Send + 'static {
        self.get(RangeRequest { key: start, range_end: end, limit: self.page_size, revision: revision.unwrap_or(0), serializable: true, count_only: false })
    }

    /// How many keys `[start, end)` holds at `revision` (etcd walks only its index for this).
    fn count(&self, start: Vec<u8>, end: Vec<u8>, revision: i64) -> impl Future<Output = Result<i64, KvstoreError>> + Send + 'static {
        let resp = self.get(RangeRequest { key: start, range_end: end, limit: 0, revision, serializable: true, count_only: true });
        async move { Ok(resp.await?.count()) }
    }

    /// Serializable reads: every page after the first is pinned to a revision, and the first
    /// fixes it (a linearizable read would add a round of consensus per page).
    fn get(&self, r: RangeRequest) -> impl Future<Output = Result<RangePage, KvstoreError>> + Send + 'static {
        let (mut kv, etcd, what) = (self.kv.clone(), self.etcd.clone(), format!("list {}", self.prefix));
        async move {
            if let Some(channel) = &etcd.channel {
                let read = range::range(channel, r, MAX_RESPONSE_BYTES);
                return etcd.call(what, async { read.await.map_err(etcd_client::Error::GRpcStatus) }).await.map(RangePage::Raw);
            }
            let mut opts = GetOptions::new().with_range(r.range_end).with_limit(r.limit).with_revision(r.revision);
            if r.serializable {
                opts = opts.with_serializable();
            }
            if r.count_only {
                opts = opts.with_count_only();
            }
            etcd.call(what, kv.get(r.key, Some(opts))).await.map(RangePage::Client)
        }
    }

    /// Hands `page` and every page after it up to `end` to `on_page`, asking for the next
    /// page before handing one over, so etcd works on it (on the runtime's other thread)
    /// while the caller decodes.
    async fn list_from(
        &self,
        mut page: RangePage,
        end: &[u8],
        revision: i64,
        mut on_page: impl FnMut(&RangePage, usize),
    ) -> Result<(), KvstoreError> {
        loop {
            let next = after_page(&page).map(|start| tokio::spawn(self.fetch(start, end.to_vec(), Some(revision))));
            on_page(&page, usize::try_from(page.count()).unwrap_or(0));
            match next {
                Some(task) => page = self.joined(task.await)?,
                None => return Ok(()),
            }
        }
    }

    fn joined<T>(&self, r: Result<Result<T, KvstoreError>, tokio::task::JoinError>) -> Result<T, KvstoreError> {
        r.map_err(|e| KvstoreError::Etcd { endpoints: self.etcd.endpoints.join(","), operation: format!("list {}", self.prefix), message: e.to_string() })?
    }

    /// How many keys each sub-range between `bounds` (from [`split_bounds`]) holds at
    /// `revision`, to cut the rest of a prefix into runs of about equal size, listed at once
    /// (see [`plan_runs`]). etcd serves each range request on one core, and every limited
    /// request walks its index to the range's end, so one stream of open-ended pages leaves
    /// a core idle and walks the rest of the prefix once per page. Measured at the bench's
    /// size (100k `ip/v1` keys, 20k pages, 2 cores): 215 ms read in one stream, 195 ms in two
    /// cut at the median key, no better in four. Counting walks etcd's index once over the
    /// rest (~6 ms at 80k keys).
    fn count_windows(&self, bounds: Vec<Vec<u8>>, revision: i64) -> impl Future<Output = Result<Vec<i64>, KvstoreError>> + Send + 'static {
        futures::future::try_join_all(bounds.windows(2).map(|w| self.count(w[0].clone(), w[1].clone(), revision)).collect::<Vec<_>>())
    }
}

/// The runs the rest of a prefix is read in, as `(first, end, keys)`: windows `first..end`
/// of the sub-ranges holding `counts` keys, about equal in size ([`balanced_runs`]). The
/// first run always starts at the rest's start and holds at least `page` keys (merged with
/// the next until it does), because its first page is asked for before the counts are
/// known: that page, `page` keys from the start, must end inside it.
fn plan_runs(counts: &[i64], page: i64, streams: usize) -> Vec<(usize, usize, i64)> {
    let mut runs = balanced_runs(counts, streams);
    let keys = |(a, b): (usize, usize)| counts[a..b].iter().sum::<i64>();
    if let Some(first) = runs.first_mut() {
        first.0 = 0;
    }
    while runs.len() > 1 && keys(runs[0]) < page {
        let (_, b) = runs.remove(1);
        runs[0].1 = b;
    }
    runs.into_iter().map(|r| (r.0, r.1, keys(r))).collect()
}

/// Where the page after `page` starts, when there is one.
fn after_page(page: &RangePage) -> Option<Vec<u8>> {
    let last = page.last().filter(|_| page.more())?;
    let mut start = last.key().to_vec();
    start.push(0);
    Some(start)
}

/// Sub-ranges a prefix's rest is read in at once: one per core of a 2-core node (four
/// measured no faster than two, and each stream holds its own pages in memory).
const SPLIT_STREAMS: usize = 2;

/// The bytes keys are cut before: digits, `:` and hex letters (IPv4 and IPv6 addresses,
/// identity ids).
const SPLIT_BYTES: &[u8] = b"0123456789:abcdef";

/// The rest of a range, `[start, end)`, cut at candidate points after the common prefix of
/// its first page's `first` and `last` keys: that prefix followed by each of [`SPLIT_BYTES`],
/// then the end of that prefix. A skewed guess costs only balance: the pieces always
/// cover the rest exactly.
fn split_bounds(first: &[u8], last: &[u8], start: Vec<u8>, end: &[u8]) -> Vec<Vec<u8>> {
    let common = &first[..first.iter().zip(last).take_while(|(a, b)| a == b).count()];
    let mut candidates: Vec<Vec<u8>> = SPLIT_BYTES.iter().map(|b| [common, &[*b]].concat()).collect();
    if !common.is_empty() {
        candidates.push(prefix_end(common));
    }
    candidates.retain(|c| c.as_slice() > start.as_slice() && c.as_slice() < end);
    std::iter::once(start).chain(candidates).chain(std::iter::once(end.to_vec())).collect()
}

/// Pages of about `page_size` (at most a quarter more) for a run of `count` keys, evened out
/// so that no short page trails: a run of 40,960 keys in pages of 20,000 took a third request,
/// at the end of the read, for 960.
fn even_page_size(count: i64, page_size: i64) -> i64 {
    let most = (page_size.max(1) * 5 / 4).max(1);
    let pages = ((count + most - 1) / most).max(1);
    // Never 0: etcd reads a limit of 0 as no limit.
    ((count + pages - 1) / pages).max(1)
}

/// Runs of consecutive ranges (holding `counts` keys, in key order), as `(first, end)` range
/// indices, that hold about equal numbers of keys; runs with no key are left out.
fn balanced_runs(counts: &[i64], streams: usize) -> Vec<(usize, usize)> {
    let total: i64 = counts.iter().sum();
    let before: Vec<i64> = std::iter::once(0).chain(counts.iter().scan(0, |acc, c| { *acc += c; Some(*acc) })).collect();
    let mut cuts = vec![0];
    for k in 1..streams as i64 {
        let target = total * k / streams as i64;
        let last = *cuts.last().unwrap_or(&0);
        if let Some(i) = (last + 1..counts.len()).min_by_key(|&i| (before[i] - target).abs()) {
            cuts.push(i);
        }
    }
    cuts.push(counts.len());
    cuts.windows(2).map(|w| (w[0], w[1])).filter(|&(a, b)| before[b] > before[a]).collect()
}

/// A listed key (etcd keys are bytes; Cilium's are UTF-8).
pub fn key_of(key: &[u8]) -> Arc<str> {
    String::from_utf8_lossy(key).as_ref().into()
}

pub fn meta(kv: KvRef<'_>, key: Arc<str>) -> KvMeta {
    KvMeta { key, mod_revision: kv.mod_revision(), lease: kv.lease() }
}

/// Decodes listed key-values into `snap`, sorting each key to its kind by prefix.
pub fn decode_into<'a>(snap: &mut KvstoreSnapshot, kvs: impl Iterator<Item = KvRef<'a>>) {
    decode_raw_into(snap, kvs.map(|kv| (meta(kv, key_of(kv.key())), kv.value())), None);
}

/// [`decode_into`] with the page's keys already made (`keys[i]` is the `i`th key's), shared.
pub fn decode_keyed_into(snap: &mut KvstoreSnapshot, page: &RangePage, keys: &[Arc<str>]) {
    decode_raw_into(snap, page.iter().zip(keys).map(|(kv, key)| (meta(kv, key.clone()), kv.value())), None);
}

/// [`decode_into`] over (meta, value) pairs from any source (a list or a watch mirror),
/// keeping only what `filter` wants when one is given.
pub fn decode_raw_into<'a>(snap: &mut KvstoreSnapshot, kvs: impl Iterator<Item = (KvMeta, &'a [u8])>, filter: Option<&NodeFilter>) {
    for (m, v) in kvs {
        let key = m.key.as_ref();
        if key.starts_with(values::NODES_PREFIX) {
            snap.counts.nodes += usize::from(push(&mut snap.nodes, &mut snap.malformed, values::decode_node(m, v), |_| true));
        } else if key.starts_with(values::IP_PREFIX) {
            let keep = |e: &IpEntry| filter.is_none_or(|f| f.keeps_ip(e));
            snap.counts.ips += usize::from(push(&mut snap.ips, &mut snap.malformed, values::decode_ip(m, v), keep));
        } else if key.starts_with(values::IDENTITY_ID_PREFIX) {
            match values::decode_identity(m, v) {
                Ok(i) => {
                    snap.counts.identities += 1;
                    snap.identities.insert(i.id, i);
                }
                Err(e) => snap.malformed.push(e),
            }
        } else if key.starts_with(values::IDENTITY_VALUE_PREFIX) {
            let keep = |r: &IdentityReference| filter.is_none_or(|f| f.keeps_reference(r));
            snap.counts.identity_references +=
                usize::from(push(&mut snap.identity_references, &mut snap.malformed, values::decode_identity_reference(m, v), keep));
        } else if key == values::HEARTBEAT_KEY {
            snap.heartbeat = Some((m, String::from_utf8_lossy(v).into_owned()));
        } else if key.starts_with(values::SYNCED_PREFIX) {
            snap.synced.push((m, String::from_utf8_lossy(v).into_owned()));
        } else if key.starts_with(values::KVSTOREMESH_CACHE_PREFIX) {
            *snap.cache_keys.get_or_insert(0) += 1;
        }
    }
}

/// Files a decoded item (when `keep` wants it) or a malformed one; true when it decoded.
fn push<T>(items: &mut Vec<T>, malformed: &mut Vec<Malformed>, r: Result<T, Malformed>, keep: impl Fn(&T) -> bool) -> bool {
    match r {
        Ok(item) => {
            if keep(&item) {
                items.push(item);
            }
            true
        }
        Err(m) => {
            malformed.push(m);
            false
        }
    }
}

/// The prefixes a snapshot covers.
pub const SNAPSHOT_PREFIXES: &[&str] = &[
    values::NODES_PREFIX,
    values::IP_PREFIX,
    values::IDENTITY_ID_PREFIX,
    values::IDENTITY_VALUE_PREFIX,
    values::HEARTBEAT_KEY,
    values::SYNCED_PREFIX,
];

/// The prefixes to list for `opts`.
pub fn prefixes(opts: &ListOptions) -> Vec<&'static str> {
    let mut p = SNAPSHOT_PREFIXES.to_vec();
    if opts.include_cache {
        p.push(values::KVSTOREMESH_CACHE_PREFIX);
    }
    p
}

/// Lists all of Cilium's state at one revision and decodes it page by page (raw pages are
/// dropped as soon as they are decoded, so memory holds the typed snapshot and a page or two).
pub async fn read_snapshot(etcd: &Etcd, opts: &ListOptions) -> Result<KvstoreSnapshot, KvstoreError> {
    read_snapshot_filtered(etcd, opts, None).await
}

/// Like [`read_snapshot`], keeping only what node `(cluster, name)`'s view needs (its node
/// addresses are learnt from the node list, which is read first).
pub async fn read_node_view(etcd: &Etcd, opts: &ListOptions, cluster: &str, name: &str) -> Result<KvstoreSnapshot, KvstoreError> {
    read_snapshot_filtered(etcd, opts, Some((cluster, name))).await
}

async fn read_snapshot_filtered(etcd: &Etcd, opts: &ListOptions, node: Option<(&str, &str)>) -> Result<KvstoreSnapshot, KvstoreError> {
    // One small read fixes the revision every prefix is then listed at, all at once (the
    // node list, 10 MB of JSON at 5,000 nodes, used to go first on its own to learn it). For
    // a node's view that read is the node's own key, whose addresses the view keeps.
    let (revision, mut addresses) = first_read(etcd, node).await?;
    loop {
        let filter = node.map(|_| NodeFilter { addresses: addresses.clone() });
        let snap = list_at(etcd, opts, revision, filter.as_ref()).await?;
        let Some((cluster, name)) = node else { return Ok(snap) };
        // The view keeps what every node entry naming this node hosts: another key naming
        // it (Cilium never writes one) adds addresses, and the view is read again with them
        // (the node list, never filtered, is the same at the same revision).
        let listed: std::collections::BTreeSet<std::net::IpAddr> =
            snap.nodes.iter().filter(|n| n.cluster == cluster && n.name == name).flat_map(|n| n.addresses.iter().map(|a| a.ip)).collect();
        if listed == addresses {
            return Ok(snap);
        }
        addresses = listed;
    }
}

/// The revision to read at, and (for a node's view) the addresses of the node's own entry
/// `cilium/state/nodes/v1/<cluster>/<name>`: one exact-key read (the heartbeat's when no node).
async fn first_read(etcd: &Etcd, node: Option<(&str, &str)>) -> Result<(i64, std::collections::BTreeSet<std::net::IpAddr>), KvstoreError> {
    let key = node.map_or_else(|| values::HEARTBEAT_KEY.to_owned(), |(cluster, name)| format!("{}{cluster}/{name}", values::NODES_PREFIX));
    let mut kv = etcd.client.kv_client();
    let resp = etcd.call(format!("get {key}"), kv.get(key.as_str(), Some(GetOptions::new().with_serializable()))).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let addresses = match (node, resp.kvs().first()) {
        (Some((cluster, name)), Some(kv)) => values::decode_node(meta(kv.into(), key_of(kv.key())), kv.value())
            .ok()
            .filter(|n| n.cluster == cluster && n.name == name)
            .map(|n| n.addresses.iter().map(|a| a.ip).collect())
            .unwrap_or_default(),
        _ => Default::default(),
    };
    Ok((revision, addresses))
}

/// Decodes one page of `prefix` into `part` (`left`: keys left in the range from the page on),
/// keeping only what `filter` wants.
fn decode_page(part: &mut KvstoreSnapshot, page: &RangePage, left: usize, prefix: &str, filter: Option<&NodeFilter>) {
    // Room for the whole prefix at its first page (100k ip/v1 entries grew by doubling
    // to 131k slots: 4.5 MB never used), unless a node's view keeps only a few.
    if prefix == values::NODES_PREFIX && part.nodes.capacity() == 0 {
        part.nodes.reserve_exact(left);
    } else if prefix == values::IP_PREFIX && filter.is_none() && part.ips.capacity() == 0 {
        part.ips.reserve_exact(left);
    }
    // A node's view: the entries it does not keep are only validated and counted.
    let skipped = |kv: &KvRef<'_>| {
        let Some(f) = filter.filter(|_| prefix == values::IP_PREFIX) else { return false };
        let host = std::str::from_utf8(kv.key()).ok().and_then(|key| values::valid_ip_host(key, kv.value()));
        host.is_some_and(|h| !f.keeps_host(h))
    };
    let mut skips = 0;
    let rest = page.iter().filter(|kv| {
        let skip = skipped(kv);
        skips += usize::from(skip);
        !skip
    });
    decode_raw_into(part, rest.map(|kv| (meta(kv, key_of(kv.key())), kv.value())), filter);
    part.counts.ips += skips;
}

/// Every prefix of `opts` listed at `revision`, concurrently: etcd serves one while kvcheck
/// decodes another, and a prefix with more than two pages (the `ip/v1` one) is read in
/// sub-ranges at once after its first page. (One task for all: measured on 2 cores, a task
/// per prefix was slower, etcd needs the other core.)
async fn list_at(etcd: &Etcd, opts: &ListOptions, revision: i64, filter: Option<&NodeFilter>) -> Result<KvstoreSnapshot, KvstoreError> {
    let parts = futures::future::try_join_all(prefixes(opts).into_iter().map(|prefix| async move {
        let decode = |part: &mut KvstoreSnapshot, page: &RangePage, left: usize| decode_page(part, page, left, prefix, filter);
        let pager = Pager::new(etcd, prefix, opts.page_size);
        let end = prefix_end(prefix.as_bytes());
        let first = pager.fetch(prefix.as_bytes().to_vec(), end.clone(), Some(revision)).await?;
        let mut part = KvstoreSnapshot::default();
        let left = usize::try_from(first.count()).unwrap_or(0);
        // More than a page left: read the rest in runs at once (see Pager::count_windows).
        // The rest's first page is asked for at once, with the counts that cut the runs,
        // while this page is decoded: the first run starts from it.
        let split = after_page(&first)
            .filter(|_| left.saturating_sub(first.len()) > usize::try_from(opts.page_size).unwrap_or(usize::MAX))
            .map(|start| {
                let (a, b) = (first.first().map_or(&[][..], |kv| kv.key()), first.last().map_or(&[][..], |kv| kv.key()));
                let bounds = split_bounds(a, b, start.clone(), &end);
                let head = tokio::spawn(pager.fetch(start, end.clone(), Some(revision)));
                (tokio::spawn(pager.count_windows(bounds.clone(), revision)), head, bounds)
            });
        let Some((counts, head, bounds)) = split else {
            pager.list_from(first, &end, revision, |page, left| decode(&mut part, page, left)).await?;
            return Ok(vec![part]);
        };
        decode(&mut part, &first, left);
        drop(first);
        let counts = pager.joined(counts.await)?;
        let runs = plan_runs(&counts, opts.page_size, SPLIT_STREAMS);
        let (pager, decode, bounds, head) = (&pager, &decode, &bounds, &mut Some(head));
        let rest = futures::future::try_join_all(runs.into_iter().map(|(a, b, count)| {
            // The first run (from the rest's start) takes the page asked for above.
            let head = if a == 0 { head.take() } else { None };
            async move {
                let mut sub = KvstoreSnapshot::default();
                let mut pager = Pager { page_size: even_page_size(count, opts.page_size), ..pager.clone() };
                let end = &bounds[b];
                let page = match head {
                    Some(head) => {
                        let page = pager.joined(head.await)?;
                        // The rest of the run after that page, in even pages too.
                        pager.page_size = even_page_size(count - i64::try_from(page.len()).unwrap_or(count), opts.page_size);
                        page
                    }
                    None => pager.fetch(bounds[a].clone(), end.clone(), Some(revision)).await?,
                };
                let count = usize::try_from(count).unwrap_or(0);
                pager.list_from(page, end, revision, |page, left| decode(&mut sub, page, left.min(count))).await?;
                Ok::<_, KvstoreError>(sub)
            }
        }))
        .await?;
        Ok::<_, KvstoreError>(std::iter::once(part).chain(rest).collect::<Vec<_>>())
    }))
    .await?;
    let mut snap = KvstoreSnapshot::default();
    for part in parts.into_iter().flatten() {
        snap.merge(part);
    }
    // Lists grown by doubling give back their spare room (no copy).
    snap.nodes.shrink_to_fit();
    snap.ips.shrink_to_fit();
    snap.identity_references.shrink_to_fit();
    snap.revision = revision;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bounds: &[Vec<u8>]) -> Vec<String> {
        bounds.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
    }

    #[test]
    fn the_rest_is_cut_after_the_first_pages_common_prefix_and_covered_exactly() {
        let p = "cilium/state/ip/v1/default/";
        let (first, last) = (format!("{p}10.0.0.3"), format!("{p}10.11.77.9"));
        let start = format!("{p}10.11.77.9\0").into_bytes();
        let end = prefix_end(b"cilium/state/ip/v1/");
        let bounds = split_bounds(first.as_bytes(), last.as_bytes(), start.clone(), &end);
        let t = text(&bounds);
        // From the rest's start, through 10.2 .. 10.9, `:`, a-f and the end of `10.`, to the end.
        assert_eq!(t.len(), 2 + 8 + 1 + 6 + 1, "{t:?}");
        assert_eq!((bounds[0].as_slice(), bounds[1].as_slice()), (start.as_slice(), format!("{p}10.2").as_bytes()));
        assert_eq!((t[t.len() - 2].as_str(), bounds[bounds.len() - 1].as_slice()), (format!("{p}10/").as_str(), end.as_slice()));
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend: {t:?}");
        // No common prefix beyond nothing (one key): every candidate still lies inside the rest.
        let one = split_bounds(b"a", b"b", b"a\0".to_vec(), b"z");
        assert!(one.windows(2).all(|w| w[0] < w[1]) && one.first().unwrap() == b"a\0" && one.last().unwrap() == b"z", "{:?}", text(&one));
    }

    #[test]
    fn runs_are_read_in_even_pages() {
        assert_eq!(even_page_size(40_960, 20_000), 20_480);
        assert_eq!(even_page_size(39_040, 20_000), 19_520);
        assert_eq!(even_page_size(60_000, 20_000), 20_000);
        assert_eq!(even_page_size(25_000, 20_000), 25_000);
        assert_eq!(even_page_size(25_001, 20_000), 12_501);
        assert_eq!((even_page_size(10, 3), even_page_size(7, 1), even_page_size(5, 0), even_page_size(0, 5)), (3, 1, 1, 1));
        for (count, page) in [(1, 1), (17, 4), (99_999, 20_000), (3, 2)] {
            let size = even_page_size(count, page);
            assert!(size >= 1 && size <= (page * 5 / 4).max(1) && (count + size - 1) / size * size - count < size, "{count} in {page}: {size}");
        }
    }

    #[test]
    fn the_first_run_starts_at_the_rest_and_holds_its_first_page() {
        assert_eq!(plan_runs(&[0, 0, 30, 50], 20, 2), [(0, 3, 30), (3, 4, 50)]);
        // The first page (40 keys from the start) would reach into the second run: one run.
        assert_eq!(plan_runs(&[0, 0, 30, 50], 40, 2), [(0, 4, 80)]);
        // The keys-less first range is still the first run's: its page is read from there.
        assert_eq!(plan_runs(&[0, 100], 20, 2), [(0, 2, 100)]);
        assert_eq!(plan_runs(&[10, 10, 10, 10, 10, 10], 5, 3), [(0, 2, 20), (2, 4, 20), (4, 6, 20)]);
        assert_eq!(plan_runs(&[10, 10, 10, 10, 10, 10], 25, 3), [(0, 4, 40), (4, 6, 20)]);
        assert_eq!(plan_runs(&[], 5, 2), []);
    }

    #[test]
    fn runs_hold_about_equal_counts_and_skip_empty_ranges() {
        // The bench's rest: 39k before `10.2`, then 5k per /16, nothing after `10.9`.
        let counts = [39_040, 5_120, 5_120, 5_120, 5_120, 5_120, 5_120, 5_120, 5_120, 0, 0, 0];
        assert_eq!(balanced_runs(&counts, 2), [(0, 1), (1, 12)]);
        assert_eq!(balanced_runs(&[0, 0, 10, 10, 0], 2), [(0, 3), (3, 5)]);
        assert_eq!(balanced_runs(&[0, 0, 0], 2), []);
        assert_eq!(balanced_runs(&[100], 2), [(0, 1)]);
        assert_eq!(balanced_runs(&[], 2), []);
        assert_eq!(balanced_runs(&[5, 5, 5, 5], 1), [(0, 4)]);
        // Every key is in exactly one run.
        let runs = balanced_runs(&[3, 0, 7, 1, 9, 0], 2);
        assert_eq!(runs.first().unwrap().0, 0);
        assert!(runs.windows(2).all(|w| w[0].1 == w[1].0), "{runs:?}");
    }
}
