//! Keeping a mirror of Cilium's keys current: list once, then watch from revision+1. A
//! compacted revision triggers a relist and the deletes it implies; a lost stream resumes from
//! the last revision seen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use serde::Serialize;

use super::client::{Etcd, KvstoreError};
use super::config::EtcdSettings;
use super::health;
use super::range::{KvRef, RangePage};
use super::reader::{self, KvstoreSnapshot, ListOptions};
use crate::backoff::Backoff;


/// One key's raw value as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawKv {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

impl RawKv {
    /// `kv`'s revision and lease, and its value when `keep_value`.
    fn of(kv: KvRef<'_>, keep_value: bool) -> RawKv {
        let value = if keep_value { kv.value().to_vec() } else { Vec::new() };
        RawKv { value, mod_revision: kv.mod_revision(), lease: kv.lease() }
    }
}

/// Cilium's keys at a revision, raw; decoded on demand into a [`KvstoreSnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvstoreMirror {
    pub revision: i64,
    /// `Arc`: a snapshot decoded from the same list shares them.
    pub keys: BTreeMap<Arc<str>, RawKv>,
}

impl KvstoreMirror {
    /// Lists Cilium's prefixes (those `opts` asks for) at one revision.
    pub async fn list_cilium(etcd: &Etcd, opts: &ListOptions) -> Result<KvstoreMirror, KvstoreError> {
        Self::list(etcd, &cilium_prefixes(opts), opts.page_size).await
    }

    /// Lists every prefix at one revision.
    pub async fn list(etcd: &Etcd, prefixes: &[String], page_size: i64) -> Result<KvstoreMirror, KvstoreError> {
        Self::list_pages(etcd, prefixes, page_size, true, |_, _| {}).await
    }

    /// Lists every prefix at one revision, handing each page and its keys to `on_page` as it
    /// arrives; the mirror keeps the values only when `keep_values` (a caller that decodes the
    /// pages needs keys and revisions only, and never allocates ~30 MB of raw values it would
    /// drop).
    async fn list_pages(
        etcd: &Etcd,
        prefixes: &[String],
        page_size: i64,
        keep_values: bool,
        mut on_page: impl FnMut(&RangePage, &[Arc<str>]),
    ) -> Result<KvstoreMirror, KvstoreError> {
        let (mut listed, mut revision) = (Vec::new(), None);
        for prefix in prefixes {
            let rev = reader::list_prefix(etcd, prefix, revision, page_size, |page, _| {
                let keys: Vec<Arc<str>> = page.iter().map(|kv| reader::key_of(kv.key())).collect();
                on_page(page, &keys);
                listed.extend(keys.into_iter().zip(page.iter()).map(|(key, kv)| (key, RawKv::of(kv, keep_values))));
            })
            .await?;
            revision = Some(rev);
        }
        // Built at once, the tree's nodes are full; inserted key by key in order, each split
        // leaves a half-full node behind (measured at 125,000 keys: 15.3 MB of nodes).
        Ok(KvstoreMirror { revision: revision.unwrap_or(0), keys: listed.into_iter().collect() })
    }

    /// The deletes that turn `self` into `newer` (a relist's puts are found while it lists).
    fn deletes_to(&self, newer: &KvstoreMirror) -> Vec<Change> {
        let gone = self.keys.keys().filter(|k| !newer.keys.contains_key(*k));
        gone.map(|k| Change::Delete { key: k.to_string(), mod_revision: newer.revision }).collect()
    }
}

fn cilium_prefixes(opts: &ListOptions) -> Vec<String> {
    reader::prefixes(opts).into_iter().map(str::to_owned).collect()
}

/// One change to a Cilium key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    Put { key: String, value: String, mod_revision: i64, lease: i64 },
    Delete { key: String, mod_revision: i64 },
}

impl Change {
    /// A put of `kv`, as etcd delivered it.
    fn put(kv: KvRef<'_>) -> Change {
        Change::Put {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }
}

/// A batch of changes, already applied to the mirror.
#[derive(Clone, Debug, Serialize)]
pub struct WatchBatch {
    pub revision: i64,
    pub changes: Vec<Change>,
    /// The watch revision had been compacted: the mirror was relisted and `changes` are the
    /// difference (including the deletes the relist implied).
    pub relisted: bool,
}

/// Lists, then follows Cilium's keys. One watch stream on `cilium/`; events for keys kvcheck
/// does not read (services, locks, ...) are dropped client-side.
pub struct KvstoreWatcher {
    settings: EtcdSettings,
    etcd: Etcd,
    opts: ListOptions,
    /// What is listed and followed: Cilium's snapshot prefixes, or a remote cluster's.
    prefixes: Vec<String>,
    mirror: KvstoreMirror,
    stream: Option<WatchStream>,
    pub relists: u64,
    /// Watch streams opened (1 + reconnects).
    pub streams_opened: u64,
    /// Delays between failed reconnects (jittered: agents lose etcd together).
    reconnect: Backoff,
    /// A stream quiet this long is asked for its progress; no answer within the etcd timeout
    /// means it stalled (a member that answers pings but delivers nothing).
    progress_every: Duration,
    /// Streams given up as stalled.
    pub stalls: u64,
    /// When the stream last delivered anything, and when its progress was asked for.
    last_heard: std::time::Instant,
    progress_asked: Option<std::time::Instant>,
    /// etcd's revision at the last resync that found the watch behind it.
    behind_since: Option<i64>,
    /// The revision of the last relist: events up to it are in the mirror already (a stream
    /// that was behind delivers them after a resync's relist; re-applied, an old put would
    /// undo a newer value until the stream caught up).
    listed_at: i64,
    /// Whether the mirror keeps values (not when started by [`start_decoded`](Self::start_decoded)).
    keep_values: bool,
    /// A (re)connect in progress: the new client and its stream.
    opening: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Etcd, WatchStream), KvstoreError>> + Send>>>,
}

/// How long a watch may be quiet before etcd is asked for its progress (by default).
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(30);

const WATCH_PREFIX: &str = "cilium/";

impl KvstoreWatcher {
    pub async fn start(settings: EtcdSettings, etcd: Etcd, opts: ListOptions) -> Result<KvstoreWatcher, KvstoreError> {
        let prefixes = cilium_prefixes(&opts);
        Self::start_on(settings, etcd, opts, prefixes).await
    }

    /// Lists Cilium's keys, decoding each page into the snapshot it returns as it arrives, and
    /// follows them. The mirror holds keys and revisions only: the caller keeps the decoded
    /// state and the changes carry the values (a raw copy of every value, ~30 MB at 125,000
    /// keys, would be dead weight, and allocated between the long-lived keys it fragments them).
    pub async fn start_decoded(settings: EtcdSettings, etcd: Etcd, opts: ListOptions) -> Result<(KvstoreWatcher, KvstoreSnapshot), KvstoreError> {
        let prefixes = cilium_prefixes(&opts);
        let mut snap = KvstoreSnapshot::default();
        let mirror = KvstoreMirror::list_pages(&etcd, &prefixes, opts.page_size, false, |page, keys| reader::decode_keyed_into(&mut snap, page, keys)).await?;
        snap.revision = mirror.revision;
        // The vectors grew by doubling while decoding; the caller keeps this snapshot (measured
        // at 100k `ip/v1` entries: 19.9 MB of capacity for 15.2 MB of entries).
        snap.ips.shrink_to_fit();
        snap.nodes.shrink_to_fit();
        let mut w = Self::following(settings, etcd, opts, prefixes, mirror);
        w.keep_values = false;
        Ok((w, snap))
    }

    /// Lists and follows `prefixes` (a ClusterMesh remote's).
    pub async fn start_on(settings: EtcdSettings, etcd: Etcd, opts: ListOptions, prefixes: Vec<String>) -> Result<KvstoreWatcher, KvstoreError> {
        let mirror = KvstoreMirror::list(&etcd, &prefixes, opts.page_size).await?;
        Ok(Self::following(settings, etcd, opts, prefixes, mirror))
    }

    /// A watcher of `prefixes`, from `mirror`'s revision on.
    fn following(settings: EtcdSettings, etcd: Etcd, opts: ListOptions, prefixes: Vec<String>, mirror: KvstoreMirror) -> KvstoreWatcher {
        KvstoreWatcher {
            settings,
            etcd,
            opts,
            prefixes,
            mirror,
            stream: None,
            relists: 0,
            streams_opened: 0,
            reconnect: Backoff::new(Duration::from_millis(250), Duration::from_secs(10)),
            progress_every: DEFAULT_PROGRESS_INTERVAL,
            stalls: 0,
            last_heard: std::time::Instant::now(),
            progress_asked: None,
            behind_since: None,
            listed_at: 0,
            keep_values: true,
            opening: None,
        }
    }

    /// Sets how long a quiet watch goes before its progress is requested.
    pub fn with_progress_interval(mut self, every: Duration) -> Self {
        self.progress_every = every;
        self
    }

    pub fn mirror(&self) -> &KvstoreMirror {
        &self.mirror
    }

    /// The client in use (reconnected to the members that answer after a lost stream).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Waits for the next changes. On a stream error it returns the error; the next call
    /// reconnects (to the members that answer) and resumes from the last revision seen.
    pub async fn next(&mut self) -> Result<WatchBatch, KvstoreError> {
        loop {
            if self.stream.is_none() {
                self.open().await?;
            }
            let Some(stream) = self.stream.as_mut() else { continue };
            // Deadlines kept across calls: the agent's select drops this future whenever
            // something else wakes it first.
            let timeout = self.etcd.timeout;
            let deadline = match self.progress_asked {
                Some(at) => at + timeout,
                None => self.last_heard + self.progress_every,
            };
            let received = match tokio::time::timeout_at(deadline.into(), stream.message()).await {
                Ok(r) => {
                    (self.last_heard, self.progress_asked) = (std::time::Instant::now(), None);
                    r
                }
                Err(_) if self.progress_asked.is_none() => {
                    // Quiet for a while: ask where the watch stands. Any answer (progress or
                    // events) proves it alive.
                    if !self.ask_progress() {
                        return Err(self.stalled());
                    }
                    continue;
                }
                Err(_) => return Err(self.stalled()),
            };
            let msg = match received {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.stream = None;
                    return Err(self.lost("watch stream closed by the server"));
                }
                Err(e) => {
                    self.stream = None;
                    return Err(self.lost(&super::client::describe(&e)));
                }
            };
            if msg.canceled() {
                self.stream = None;
                if msg.compact_revision() > 0 {
                    return self.relist().await;
                }
                return Err(self.lost(&format!("watch canceled: {}", msg.cancel_reason())));
            }
            if !msg.created() && msg.events().is_empty() {
                // A progress answer: every event up to its revision has been delivered.
                if let Some(h) = msg.header() {
                    self.mirror.revision = self.mirror.revision.max(h.revision());
                }
                continue;
            }
            let mut changes = Vec::new();
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = reader::key_of(kv.key());
                self.mirror.revision = self.mirror.revision.max(kv.mod_revision());
                if kv.mod_revision() <= self.listed_at || !self.prefixes.iter().any(|p| key.starts_with(p.as_str())) {
                    continue;
                }
                match ev.event_type() {
                    EventType::Put => {
                        changes.push(Change::put(kv.into()));
                        self.mirror.keys.insert(key, RawKv::of(kv.into(), self.keep_values));
                    }
                    EventType::Delete => {
                        if self.mirror.keys.remove(&*key).is_some() {
                            changes.push(Change::Delete { key: key.to_string(), mod_revision: kv.mod_revision() });
                        }
                    }
                }
            }
            if !changes.is_empty() {
                return Ok(WatchBatch { revision: self.mirror.revision, changes, relisted: false });
            }
        }
    }

    /// Makes sure a stream is open (reconnecting after a lost one), without waiting for an
    /// event: a quiet remote's reconnect is then seen at once.
    pub async fn ensure_open(&mut self) -> Result<(), KvstoreError> {
        if self.stream.is_none() {
            self.open().await?;
        }
        Ok(())
    }

    /// No event for `progress_every` and no answer to a progress request within the timeout.
    fn stalled(&mut self) -> KvstoreError {
        self.stream = None;
        self.stalls += 1;
        let why = format!("watch stalled: no event for {:?} and no answer to a progress request within {:?}", self.progress_every, self.etcd.timeout);
        self.lost(&why)
    }

    fn lost(&mut self, why: &str) -> KvstoreError {
        KvstoreError::Etcd {
            endpoints: self.etcd.endpoints.join(","),
            operation: format!("watch {WATCH_PREFIX} from revision {}", self.mirror.revision + 1),
            message: why.to_owned(),
        }
    }

    /// Opens the stream (reconnecting first after a lost one). The attempt is kept across
    /// calls: the agent's select drops `next()` whenever something else wakes it, and a
    /// restarted attempt would restart its time bounds and never end on a dead path.
    async fn open(&mut self) -> Result<(), KvstoreError> {
        if self.opening.is_none() {
            let (settings, etcd, reconnect) = (self.settings.clone(), self.etcd.clone(), self.streams_opened > 0);
            let delay = if reconnect { self.reconnect.next_delay() } else { Duration::ZERO };
            let start = self.mirror.revision + 1;
            self.opening = Some(Box::pin(async move {
                let etcd = if reconnect {
                    // Whichever members answer now (the old channel may point at a dead one).
                    match health::connect_healthy(&settings, etcd.timeout).await {
                        Ok((etcd, _)) => etcd,
                        Err(e) => {
                            tokio::time::sleep(delay).await;
                            return Err(e);
                        }
                    }
                } else {
                    etcd
                };
                let opts = WatchOptions::new().with_prefix().with_start_revision(start);
                let mut client = etcd.client.watch_client().max_decoding_message_size(reader::MAX_RESPONSE_BYTES);
                let stream = etcd.call(format!("watch {WATCH_PREFIX}"), client.watch(WATCH_PREFIX, Some(opts))).await?;
                Ok((etcd, stream))
            }));
        }
        let Some(opening) = self.opening.as_mut() else { return Ok(()) };
        let result = opening.await;
        self.opening = None;
        let (etcd, stream) = result?;
        self.etcd = etcd;
        self.stream = Some(stream);
        self.streams_opened += 1;
        self.reconnect.reset();
        (self.last_heard, self.progress_asked) = (std::time::Instant::now(), None);
        Ok(())
    }

    /// The resync's check of the mirror against etcd as it is now: `None` when they agree,
    /// else why not (the caller relists). One count-only range per prefix (a few bytes each,
    /// where a relist moves every value) at the server's current revision:
    /// - a mirror at that revision must hold exactly those counts;
    /// - a mirror behind it (events in flight, or writes outside Cilium's prefixes) must hold
    ///   the counts etcd had at the mirror's own revision, and must have reached by now the
    ///   revision etcd had at the previous resync (else the watch stopped delivering); the
    ///   stream is asked for its progress, which brings the mirror to the server's revision
    ///   or, unanswered within the etcd timeout, ends it as stalled.
    /// A compacted mirror revision is a disagreement.
    pub async fn verify(&mut self) -> Result<Option<String>, KvstoreError> {
        let (server, counts) = self.counts_at(None).await?;
        let behind_since = self.behind_since.take();
        if self.mirror.revision >= server {
            return Ok(self.count_difference(&counts, server));
        }
        let (_, at_mirror) = match self.counts_at(Some(self.mirror.revision)).await {
            Err(e) if e.to_string().contains("compacted") => return Ok(Some(format!("the watch's revision {} was compacted", self.mirror.revision))),
            r => r?,
        };
        if let Some(d) = self.count_difference(&at_mirror, self.mirror.revision) {
            return Ok(Some(d));
        }
        if let Some(before) = behind_since.filter(|&b| self.mirror.revision < b) {
            // Given up as stalled: the caller relists, the next call reconnects from there.
            self.stream = None;
            self.stalls += 1;
            return Ok(Some(format!("the watch is at revision {} and has not reached {before}, etcd's revision at the previous resync", self.mirror.revision)));
        }
        self.behind_since = Some(server);
        if self.progress_asked.is_none() && self.stream.is_some() && !self.ask_progress() {
            self.stream = None;
        }
        Ok(None)
    }

    /// etcd's revision (`at`, or its current one) and its key count under each prefix there.
    async fn counts_at(&self, at: Option<i64>) -> Result<(i64, Vec<i64>), KvstoreError> {
        let mut kv = self.etcd.client.kv_client();
        let (mut revision, mut counts) = (at, Vec::with_capacity(self.prefixes.len()));
        for prefix in &self.prefixes {
            let mut opts = etcd_client::GetOptions::new().with_prefix().with_count_only();
            if let Some(r) = revision {
                opts = opts.with_revision(r);
            }
            let resp = self.etcd.call(format!("count {prefix}"), kv.get(prefix.as_str(), Some(opts))).await?;
            // Every prefix at the first answer's revision: one consistent cut.
            revision.get_or_insert(resp.header().map_or(0, |h| h.revision()));
            counts.push(resp.count());
        }
        Ok((revision.unwrap_or(0), counts))
    }

    /// The first prefix whose key count in the mirror differs from `counts` (etcd's at `revision`).
    fn count_difference(&self, counts: &[i64], revision: i64) -> Option<String> {
        self.prefixes.iter().zip(counts).find_map(|(prefix, &count)| {
            let from = (std::ops::Bound::Included(prefix.as_str()), std::ops::Bound::Unbounded);
            let held = self.mirror.keys.range::<str, _>(from).take_while(|(k, _)| k.starts_with(prefix.as_str())).count();
            (count != held as i64).then(|| format!("{prefix}: etcd holds {count} keys at revision {revision}, the watch {held}"))
        })
    }

    /// Asks the stream where it stands (not awaited: a stream too blocked to take the request
    /// is as stalled as one that does not answer); false when the request failed.
    fn ask_progress(&mut self) -> bool {
        let Some(stream) = self.stream.as_mut() else { return false };
        if let Some(Err(_)) = futures::FutureExt::now_or_never(stream.request_progress()) {
            return false;
        }
        self.progress_asked = Some(std::time::Instant::now());
        true
    }

    /// Lists afresh; the batch holds the differences from the mirror, now applied to it.
    pub async fn relist(&mut self) -> Result<WatchBatch, KvstoreError> {
        // A key's mod revision changes with every write to it: equal revisions (and leases)
        // are equal values, also when the mirror does not hold them.
        let (old, mut changes) = (&self.mirror, Vec::new());
        let fresh = KvstoreMirror::list_pages(&self.etcd, &self.prefixes, self.opts.page_size, self.keep_values, |page, keys| {
            let changed = page.iter().zip(keys).filter(|(kv, key)| old.keys.get(&***key).is_none_or(|o| (o.mod_revision, o.lease) != (kv.mod_revision(), kv.lease())));
            changes.extend(changed.map(|(kv, _)| Change::put(kv)));
        })
        .await?;
        changes.extend(self.mirror.deletes_to(&fresh));
        self.mirror = fresh;
        self.listed_at = self.mirror.revision;
        self.relists += 1;
        Ok(WatchBatch { revision: self.mirror.revision, changes, relisted: true })
    }
}
