//! Paged, serializable range reads pinned to one revision, decoded into a kvstore snapshot.

use std::collections::BTreeMap;

use etcd_client::GetOptions;
use serde::Serialize;

use super::client::{Etcd, KvstoreError};
use super::values::{self, IdentityEntry, IdentityReference, IpEntry, KvMeta, Malformed, NodeEntry};

/// Keys per range request. Measured on etcd 3.4 with 100k Cilium IP entries: one range
/// 0.17-0.21 s but 66 MB resident; pages of 10k 0.22-0.27 s at 15 MB; pages of 1k 0.75-0.94 s
/// (3.4 recounts the remaining range on every page). 10k keeps memory flat for a small cost.
pub const DEFAULT_PAGE_SIZE: i64 = 10_000;
/// etcd-client refuses responses over 4 MiB by default; a 10k page of Cilium nodes can exceed it.
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;

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
/// `None`). Returns the revision and the key-values.
pub async fn list_prefix(
    etcd: &Etcd,
    prefix: &str,
    revision: Option<i64>,
    page_size: i64,
) -> Result<(i64, Vec<etcd_client::KeyValue>), KvstoreError> {
    let mut kv = etcd.client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = revision;
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page_size).with_serializable();
        if let Some(rev) = revision {
            opts = opts.with_revision(rev);
        }
        let resp = etcd.call(format!("list {prefix}"), kv.get(start.clone(), Some(opts))).await?;
        if revision.is_none() {
            revision = resp.header().map(|h| h.revision());
        }
        let more = resp.more();
        let kvs = resp.kvs();
        if let Some(last) = kvs.last() {
            start = last.key().to_vec();
            start.push(0);
        }
        let empty = kvs.is_empty();
        out.extend(kvs.iter().cloned());
        if !more || empty {
            break;
        }
    }
    Ok((revision.unwrap_or(0), out))
}

fn meta(kv: &etcd_client::KeyValue) -> KvMeta {
    KvMeta {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// Decodes listed key-values into `snap`, sorting each key to its kind by prefix.
pub fn decode_into(snap: &mut KvstoreSnapshot, kvs: &[etcd_client::KeyValue]) {
    decode_raw_into(snap, kvs.iter().map(|kv| (meta(kv), kv.value())));
}

/// [`decode_into`] over (meta, value) pairs from any source (a list or a watch mirror).
pub fn decode_raw_into<'a>(snap: &mut KvstoreSnapshot, kvs: impl Iterator<Item = (KvMeta, &'a [u8])>) {
    for (m, v) in kvs {
        let key = m.key.as_str();
        if key.starts_with(values::NODES_PREFIX) {
            push(&mut snap.nodes, &mut snap.malformed, values::decode_node(m, v));
        } else if key.starts_with(values::IP_PREFIX) {
            push(&mut snap.ips, &mut snap.malformed, values::decode_ip(m, v));
        } else if key.starts_with(values::IDENTITY_ID_PREFIX) {
            match values::decode_identity(m, v) {
                Ok(i) => {
                    snap.identities.insert(i.id, i);
                }
                Err(e) => snap.malformed.push(e),
            }
        } else if key.starts_with(values::IDENTITY_VALUE_PREFIX) {
            push(&mut snap.identity_references, &mut snap.malformed, values::decode_identity_reference(m, v));
        } else if key == values::HEARTBEAT_KEY {
            snap.heartbeat = Some((m, String::from_utf8_lossy(v).into_owned()));
        } else if key.starts_with(values::SYNCED_PREFIX) {
            snap.synced.push((m, String::from_utf8_lossy(v).into_owned()));
        } else if key.starts_with(values::KVSTOREMESH_CACHE_PREFIX) {
            *snap.cache_keys.get_or_insert(0) += 1;
        }
    }
}

fn push<T>(items: &mut Vec<T>, malformed: &mut Vec<Malformed>, r: Result<T, Malformed>) {
    match r {
        Ok(item) => items.push(item),
        Err(m) => malformed.push(m),
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

/// Lists all of Cilium's state at one revision and decodes it.
pub async fn read_snapshot(etcd: &Etcd, opts: &ListOptions) -> Result<KvstoreSnapshot, KvstoreError> {
    Ok(super::watch::KvstoreMirror::list(etcd, opts).await?.snapshot())
}
