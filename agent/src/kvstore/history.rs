//! Nodes deleted recently, from etcd's history: Cilium applies a node delete only after its
//! hold-off (`NodeDeleteDelay`, 30 s; docs/cilium-expected-state.md), so a one-shot check that
//! finds a deleted node's entries still in the datapath must know when the key went.
//!
//! etcd keeps no times, only revisions. The operator rewrites `cilium/.heartbeat` (an RFC 3339
//! time) every minute, so its past versions map revisions to times: a delete at revision r
//! happened before the first heartbeat written after r, and before kvcheck read revision R >= r.
//! Only the history since the newest heartbeat that is older than the hold-off is searched
//! (older deletes have certainly been applied); without such a heartbeat, a bounded window of
//! recent revisions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::{EventType, GetOptions, WatchOptions};

use super::client::{Etcd, KvstoreError};
use super::reader::{self, KvstoreSnapshot};
use super::values::{self, parse_time, HeldNode, KvMeta, NodeEntry, HEARTBEAT_KEY, NODES_PREFIX};

/// Heartbeat versions followed back at most (one a minute).
const MAX_HEARTBEATS: usize = 10;
/// Silence that ends a history search the server does not answer progress requests for.
const QUIET: Duration = Duration::from_secs(1);
/// Revisions etcd's watch store sends a watch in one sync pass at most (`watchBatchMaxRevs`);
/// a fuller batch may continue in the next pass.
const WATCH_BATCH_MAX_REVS: usize = 1000;
/// Revisions searched when no heartbeat bounds the window.
const UNBOUNDED_WINDOW: i64 = 100_000;

/// The node keys deleted at or before `snap.revision` whose hold-off may not have ended by
/// `now`, except those present again in `snap`. `read_at` is when `snap` was read; `known`
/// holds earlier reads `(revision, time)`: etcd was at least at that revision by that time.
pub async fn recent_node_deletes(
    etcd: &Etcd,
    snap: &KvstoreSnapshot,
    read_at: DateTime<Utc>,
    now: DateTime<Utc>,
    hold_off: Duration,
    known: &[(i64, DateTime<Utc>)],
) -> Result<Vec<HeldNode>, KvstoreError> {
    let hold = chrono::Duration::from_std(hold_off).unwrap_or_default();
    let beats = heartbeats(etcd, snap, now - hold).await?;
    // Points (r, t): etcd had reached revision r by time t, so a delete at or before r
    // happened by t. Heartbeat writes, earlier reads, and this read.
    // Cilium's operator writes whole seconds (RFC 3339 without a fraction): a heartbeat saying
    // t was written before t + 1 s, not before t.
    let mut points: Vec<(i64, DateTime<Utc>, String)> =
        beats.iter().map(|(r, t, whole_seconds)| (*r, *t + chrono::Duration::seconds(i64::from(*whole_seconds)), format!("{HEARTBEAT_KEY} written at revision {r}"))).collect();
    points.extend(known.iter().map(|(r, t)| (*r, *t, format!("kvcheck's earlier read at revision {r}"))));
    points.push((snap.revision, read_at, format!("kvcheck's read at revision {}", snap.revision)));
    // Deletes at or before a point older than the hold-off are certainly applied.
    let start = points.iter().filter(|(_, t, _)| *t <= now - hold).map(|(r, _, _)| r + 1).max();
    let start = start.unwrap_or((snap.revision - UNBOUNDED_WINDOW).max(1));
    let deletes = node_deletes(etcd, start, snap.revision).await?;
    let present: std::collections::HashSet<&str> = snap.nodes.iter().map(|n| n.meta.key.as_ref()).collect();
    let mut out = Vec::new();
    for (rev, node) in deletes {
        if present.contains(node.meta.key.as_ref()) {
            continue;
        }
        let after = beats.iter().filter(|(r, _, _)| *r < rev).max_by_key(|(r, _, _)| *r).map(|(_, t, _)| *t);
        let Some((_, deleted_by, bounded_by)) = points.iter().filter(|(r, _, _)| *r >= rev).min_by_key(|(_, t, _)| *t) else { continue };
        let (deleted_by, bounded_by) = (*deleted_by, bounded_by.clone());
        out.push(HeldNode { node, deleted_revision: rev, deleted_after: after, deleted_by, held_until: deleted_by + hold, bounded_by });
    }
    out.retain(|h| h.held_until > now);
    Ok(out)
}

/// `(mod revision, time, whether the time is in whole seconds)` of the heartbeat's versions,
/// newest first, back to the first one written before `older_than` (or as far as history and
/// [`MAX_HEARTBEATS`] allow).
async fn heartbeats(etcd: &Etcd, snap: &KvstoreSnapshot, older_than: DateTime<Utc>) -> Result<Vec<(i64, DateTime<Utc>, bool)>, KvstoreError> {
    let mut out = Vec::new();
    let Some((meta, value)) = &snap.heartbeat else { return Ok(out) };
    let mut current = (meta.mod_revision, value.clone());
    let mut kv = etcd.client.kv_client();
    while out.len() < MAX_HEARTBEATS {
        let Some(t) = parse_time(&current.1) else { break };
        let whole_seconds = !current.1.contains('.');
        out.push((current.0, t, whole_seconds));
        if t + chrono::Duration::seconds(i64::from(whole_seconds)) <= older_than || current.0 <= 1 {
            break;
        }
        let opts = GetOptions::new().with_revision(current.0 - 1);
        let resp = match etcd.call(format!("get {HEARTBEAT_KEY} before revision {}", current.0), kv.get(HEARTBEAT_KEY, Some(opts))).await {
            Ok(r) => r,
            Err(e) if e.to_string().contains("compacted") => break,
            Err(e) => return Err(e),
        };
        let Some(prev) = resp.kvs().first() else { break };
        current = (prev.mod_revision(), String::from_utf8_lossy(prev.value()).into_owned());
    }
    Ok(out)
}


/// The last delete of each node key in revisions `from..=to`, with the value it deleted. A
/// compacted `from` restarts at the oldest revision etcd kept.
async fn node_deletes(etcd: &Etcd, from: i64, to: i64) -> Result<Vec<(i64, NodeEntry)>, KvstoreError> {
    let mut last: std::collections::BTreeMap<String, (i64, NodeEntry)> = std::collections::BTreeMap::new();
    replay(etcd, NODES_PREFIX, from, to, |ev| {
        let Some(kv) = ev.kv() else { return };
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match ev.event_type() {
            EventType::Put => {
                last.remove(&key);
            }
            EventType::Delete => {
                let Some(prev) = ev.prev_kv() else { return };
                let meta = KvMeta { key: key.clone().into(), mod_revision: prev.mod_revision(), lease: prev.lease() };
                if let Ok(node) = values::decode_node(meta, prev.value()) {
                    last.insert(key, (kv.mod_revision(), node));
                }
            }
        }
    })
    .await?;
    Ok(last.into_values().collect())
}

/// The keys under `prefix` written or deleted in revisions `from..=to` (a settle re-read asks
/// whether a key absent at both of its reads lived in between).
pub async fn keys_touched(etcd: &Etcd, prefix: &str, from: i64, to: i64) -> Result<std::collections::BTreeSet<String>, KvstoreError> {
    let mut touched = std::collections::BTreeSet::new();
    replay(etcd, prefix, from, to, |ev| {
        if let Some(kv) = ev.kv() {
            touched.insert(String::from_utf8_lossy(kv.key()).into_owned());
        }
    })
    .await?;
    Ok(touched)
}

/// Replays etcd's events under `prefix` in revisions `from..=to` into `each`, in order. A
/// compacted `from` restarts at the oldest revision etcd kept.
async fn replay(etcd: &Etcd, prefix: &str, from: i64, to: i64, mut each: impl FnMut(&etcd_client::Event)) -> Result<(), KvstoreError> {
    let mut from = from;
    if from > to {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let what = |from: i64| format!("watch {prefix} history from revision {from}");
    let mut client = etcd.client.watch_client().max_decoding_message_size(reader::MAX_RESPONSE_BYTES);
    let opts = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(from);
    let mut stream = etcd.call(what(from), client.watch(prefix, Some(opts))).await?;
    // Historical events arrive in order, a batch per sync pass of etcd's watch store, its
    // header at the revision that pass read history up to. No progress request is asked:
    // etcd before 3.4.24 / 3.5.8 answers one at once with its current revision even while the
    // watch's history is still being read (etcd-io/etcd#15220), which ended a search behind a
    // long history with nothing found. A watch with no event in the window gets no message;
    // a second of silence after its creation ends the search (as behind an etcd gRPC proxy).
    let deadline = tokio::time::Instant::now() + etcd.timeout * 2;
    let mut last_message = tokio::time::Instant::now();
    let mut created = false;
    loop {
        let msg = match tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)), stream.message()).await {
            Err(_) if created && last_message.elapsed() >= QUIET => {
                tracing::debug!(prefix, from, to, took_ms = started.elapsed().as_millis() as u64, "history replayed: no event within a second");
                return Ok(());
            }
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(KvstoreError::Timeout { endpoints: etcd.endpoints.join(","), operation: what(from), timeout: etcd.timeout * 2 })
            }
            Err(_) => continue,
            Ok(Err(e)) => return Err(KvstoreError::Etcd { endpoints: etcd.endpoints.join(","), operation: what(from), message: super::client::describe(&e) }),
            Ok(Ok(None)) => return Err(KvstoreError::Etcd { endpoints: etcd.endpoints.join(","), operation: what(from), message: "watch closed".into() }),
            Ok(Ok(Some(m))) => m,
        };
        last_message = tokio::time::Instant::now();
        created |= msg.created();
        if msg.canceled() && msg.compact_revision() > from {
            // Restart from what etcd still has.
            from = msg.compact_revision();
            let opts = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(from);
            stream = etcd.call(what(from), client.watch(prefix, Some(opts))).await?;
            continue;
        }
        if msg.canceled() {
            return Err(KvstoreError::Etcd { endpoints: etcd.endpoints.join(","), operation: what(from), message: format!("watch canceled: {}", msg.cancel_reason()) });
        }
        let mut done = false;
        for ev in msg.events() {
            if ev.kv().is_some_and(|kv| kv.mod_revision() > to) {
                done = true;
                break;
            }
            each(ev);
        }
        if done || batch_reaches(&msg, to) {
            tracing::debug!(prefix, from, to, took_ms = started.elapsed().as_millis() as u64, "history replayed");
            return Ok(());
        }
    }
}

/// Whether an events message holds every event of its watch up to `to`: its last event is at
/// or past `to`, or its header is (a sync pass read history that far) and the batch was not cut
/// at [`WATCH_BATCH_MAX_REVS`]. A message without events (created, progress) tells nothing.
fn batch_reaches(msg: &etcd_client::WatchResponse, to: i64) -> bool {
    let revisions: Vec<i64> = msg.events().iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision()).collect();
    let Some(&last) = revisions.last() else { return false };
    let mut distinct = revisions.clone();
    distinct.dedup();
    last >= to || (msg.header().is_some_and(|h| h.revision() >= to) && distinct.len() < WATCH_BATCH_MAX_REVS)
}
