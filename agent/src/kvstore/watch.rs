//! Keeping a mirror of Cilium's keys current: list once, then watch from revision+1. A
//! compacted revision triggers a relist and the deletes it implies; a lost stream resumes from
//! the last revision seen.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use serde::Serialize;

use super::client::{Etcd, KvstoreError};
use super::config::EtcdSettings;
use super::health;
use super::reader::{self, KvstoreSnapshot, ListOptions, SNAPSHOT_PREFIXES};
use super::values::{KvMeta, KVSTOREMESH_CACHE_PREFIX};
use crate::backoff::Backoff;


/// One key's raw value as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawKv {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// Cilium's keys at a revision, raw; decoded on demand into a [`KvstoreSnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvstoreMirror {
    pub revision: i64,
    pub keys: BTreeMap<String, RawKv>,
}

/// Whether kvcheck cares about a key (the snapshot prefixes; the KVStoreMesh cache on request).
fn wanted(key: &str, opts: &ListOptions) -> bool {
    SNAPSHOT_PREFIXES.iter().any(|p| key.starts_with(p))
        || (opts.include_cache && key.starts_with(KVSTOREMESH_CACHE_PREFIX))
}

impl KvstoreMirror {
    /// Lists every wanted prefix at one revision.
    pub async fn list(etcd: &Etcd, opts: &ListOptions) -> Result<KvstoreMirror, KvstoreError> {
        let mut mirror = KvstoreMirror::default();
        let mut revision = None;
        for prefix in reader::prefixes(opts) {
            let rev = reader::list_prefix(etcd, prefix, revision, opts.page_size, |page| {
                for kv in page {
                    mirror.keys.insert(
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        RawKv { value: kv.value().to_vec(), mod_revision: kv.mod_revision(), lease: kv.lease() },
                    );
                }
            })
            .await?;
            revision = Some(rev);
        }
        mirror.revision = revision.unwrap_or(0);
        Ok(mirror)
    }

    /// Decodes the mirror (malformed values become items, as in a fresh read).
    pub fn snapshot(&self) -> KvstoreSnapshot {
        let mut snap = KvstoreSnapshot { revision: self.revision, ..Default::default() };
        reader::decode_raw_into(
            &mut snap,
            self.keys.iter().map(|(k, v)| (KvMeta { key: k.clone(), mod_revision: v.mod_revision, lease: v.lease }, v.value.as_slice())),
            None,
        );
        snap
    }

    /// The changes that turn `self` into `newer` (used after a relist).
    fn changes_to(&self, newer: &KvstoreMirror) -> Vec<Change> {
        let mut changes = Vec::new();
        for (k, v) in &newer.keys {
            if self.keys.get(k) != Some(v) {
                changes.push(Change::put(k, v));
            }
        }
        for k in self.keys.keys() {
            if !newer.keys.contains_key(k) {
                changes.push(Change::Delete { key: k.clone(), mod_revision: newer.revision });
            }
        }
        changes
    }
}

/// One change to a Cilium key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    Put { key: String, value: String, mod_revision: i64, lease: i64 },
    Delete { key: String, mod_revision: i64 },
}

impl Change {
    fn put(key: &str, v: &RawKv) -> Change {
        Change::Put {
            key: key.to_owned(),
            value: String::from_utf8_lossy(&v.value).into_owned(),
            mod_revision: v.mod_revision,
            lease: v.lease,
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
    mirror: KvstoreMirror,
    stream: Option<WatchStream>,
    pub relists: u64,
    /// Watch streams opened (1 + reconnects).
    pub streams_opened: u64,
    /// Delays between failed reconnects (jittered: agents lose etcd together).
    reconnect: Backoff,
}

const WATCH_PREFIX: &str = "cilium/";

impl KvstoreWatcher {
    pub async fn start(settings: EtcdSettings, etcd: Etcd, opts: ListOptions) -> Result<KvstoreWatcher, KvstoreError> {
        let mirror = KvstoreMirror::list(&etcd, &opts).await?;
        Ok(KvstoreWatcher { settings, etcd, opts, mirror, stream: None, relists: 0, streams_opened: 0, reconnect: Backoff::new(Duration::from_millis(250), Duration::from_secs(10)) })
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
            let msg = match stream.message().await {
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
            let mut changes = Vec::new();
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                self.mirror.revision = self.mirror.revision.max(kv.mod_revision());
                if !wanted(&key, &self.opts) {
                    continue;
                }
                match ev.event_type() {
                    EventType::Put => {
                        let raw = RawKv { value: kv.value().to_vec(), mod_revision: kv.mod_revision(), lease: kv.lease() };
                        changes.push(Change::put(&key, &raw));
                        self.mirror.keys.insert(key, raw);
                    }
                    EventType::Delete => {
                        if self.mirror.keys.remove(&key).is_some() {
                            changes.push(Change::Delete { key, mod_revision: kv.mod_revision() });
                        }
                    }
                }
            }
            if !changes.is_empty() {
                return Ok(WatchBatch { revision: self.mirror.revision, changes, relisted: false });
            }
        }
    }

    fn lost(&mut self, why: &str) -> KvstoreError {
        KvstoreError::Etcd {
            endpoints: self.etcd.endpoints.join(","),
            operation: format!("watch {WATCH_PREFIX} from revision {}", self.mirror.revision + 1),
            message: why.to_owned(),
        }
    }

    async fn open(&mut self) -> Result<(), KvstoreError> {
        if self.streams_opened > 0 {
            // Reconnect to whichever members answer now (the old channel may point at a dead one).
            match health::connect_healthy(&self.settings, self.etcd.timeout).await {
                Ok((etcd, _)) => self.etcd = etcd,
                Err(e) => {
                    tokio::time::sleep(self.reconnect.next_delay()).await;
                    return Err(e);
                }
            }
        }
        let opts = WatchOptions::new().with_prefix().with_start_revision(self.mirror.revision + 1);
        let mut client = self.etcd.client.watch_client().max_decoding_message_size(reader::MAX_RESPONSE_BYTES);
        let stream = self.etcd.call(format!("watch {WATCH_PREFIX}"), client.watch(WATCH_PREFIX, Some(opts))).await?;
        self.stream = Some(stream);
        self.streams_opened += 1;
        self.reconnect.reset();
        Ok(())
    }

    /// Whether etcd holds, at the mirror's revision, as many keys under each prefix as the
    /// mirror: one count-only range per prefix (a few bytes each, where a relist moves every
    /// value). The agent's periodic resync relists only when this says no: a missed event
    /// shows as a wrong count, and the watch's ordering makes a missed update without a
    /// missed put or delete unlikely. A compacted revision answers no.
    pub async fn counts_match(&self) -> Result<bool, KvstoreError> {
        let mut kv = self.etcd.client.kv_client();
        for prefix in reader::prefixes(&self.opts) {
            let from = (std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded);
            let held = self.mirror.keys.range::<str, _>(from).take_while(|(k, _)| k.starts_with(prefix)).count();
            let opts = etcd_client::GetOptions::new().with_prefix().with_count_only().with_revision(self.mirror.revision);
            match self.etcd.call(format!("count {prefix}"), kv.get(prefix, Some(opts))).await {
                Ok(resp) if resp.count() == held as i64 => {}
                Ok(_) => return Ok(false),
                Err(e) if e.to_string().contains("compacted") => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Lists afresh; the batch holds the differences from the mirror, now applied to it.
    pub async fn relist(&mut self) -> Result<WatchBatch, KvstoreError> {
        let fresh = KvstoreMirror::list(&self.etcd, &self.opts).await?;
        let changes = self.mirror.changes_to(&fresh);
        self.mirror = fresh;
        self.relists += 1;
        Ok(WatchBatch { revision: self.mirror.revision, changes, relisted: true })
    }
}
