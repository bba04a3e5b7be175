//! Live datapath changes: BPF change events from `agent-ebpf` (a tracepoint on bpf() that
//! reports updates and deletes of the watched maps, filtered in the kernel by map id), or, when
//! the program cannot run here, periodic snapshot diffing. Either way each change is confirmed
//! by re-reading the key from the pinned map and reported as added / updated / removed. The
//! program reports a call at `sys_exit_bpf`, after the kernel has applied it, so the re-read
//! always sees the write (or a later one); calls the kernel refused are not re-read.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::maps::{PinnedMap, ReadStrategy};
use super::{endpoints, ipcache, tunnel, DatapathError, ReadOptions, ENDPOINTS, IPCACHE_V1, IPCACHE_V2, TUNNEL};
use crate::model::version::Layout;
use ipcache::IpcacheEntry;
use ipnet::IpNet;

/// Which of Cilium's maps a watched map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MapKind {
    Ipcache,
    Endpoints,
    Tunnel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Added,
    Updated,
    Removed,
}

/// One confirmed change of one map entry.
#[derive(Clone, Debug, Serialize)]
pub struct DatapathChange {
    pub map: String,
    pub kind: MapKind,
    pub op: Op,
    /// The entry's subject: prefix (ipcache), IP (endpoints), pod CIDR base (tunnel).
    pub subject: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
    /// When kvcheck saw the change (RFC 3339, ns).
    pub at: String,
    /// `ebpf` or `poll`.
    pub source: &'static str,
    /// The decoded entries (for the agent's copy of the maps); `None` when absent or undecodable.
    #[serde(skip)]
    pub old_entry: Option<Entry>,
    #[serde(skip)]
    pub new_entry: Option<Entry>,
    /// The entry exists but does not decode.
    #[serde(skip)]
    pub undecodable: bool,
}

/// One decoded entry of a watched map.
#[derive(Clone, Debug)]
pub enum Entry {
    Ipcache(ipcache::IpcacheEntry),
    Endpoint(endpoints::EndpointEntry),
    Tunnel(tunnel::TunnelEntry),
}

/// The decoded ipcache a caller keeps in step with the feed's changes (the agent's live check
/// applies every batch before it asks for the next): given one, the feed compares what it
/// re-reads with it instead of with a raw mirror of its own, so the agent holds the ipcache
/// once (a raw mirror of 500k entries is 18 MB). Undecodable entries, which the copy cannot
/// hold, stay in the feed's mirror.
pub trait IpcacheCopy: Sync {
    /// The entry under `key` (prefix, cluster id).
    fn entry(&self, key: &(IpNet, u16)) -> Option<&IpcacheEntry>;
    /// Calls `f` with every key held.
    fn for_each_key(&self, f: &mut dyn FnMut(&(IpNet, u16)));
}

/// Raw key → raw value, as last seen.
trait RawMirror: Send {
    fn get(&self, key: &[u8]) -> Option<&[u8]>;
    fn set(&mut self, key: &[u8], value: Option<&[u8]>);
    /// Replaces the whole content (the first read of the map).
    fn fill(&mut self, entries: &mut dyn Iterator<Item = (&[u8], &[u8])>);
    /// Calls `f` with every key held.
    fn for_each_key(&self, f: &mut dyn FnMut(&[u8]));
}

/// Changes kept aside before they are merged into the sorted entries.
const MAX_MIRROR_CHANGES: usize = 16_384;

/// Fixed-size keys and values inline, sorted by key (binary search), with the changes since the
/// last merge in a small map: a 500k-entry ipcache costs 36 B per entry (a hash map of the same
/// entries, at its load factor, costs twice that).
struct FixedMirror<const K: usize, const V: usize> {
    sorted: Vec<([u8; K], [u8; V])>,
    /// `None` = removed.
    changed: HashMap<[u8; K], Option<[u8; V]>>,
}

impl<const K: usize, const V: usize> FixedMirror<K, V> {
    fn new() -> Self {
        FixedMirror { sorted: Vec::new(), changed: HashMap::new() }
    }

    fn merge(&mut self) {
        let changed = std::mem::take(&mut self.changed);
        self.sorted.retain(|(k, _)| !changed.contains_key(k));
        self.sorted.extend(changed.into_iter().filter_map(|(k, v)| Some((k, v?))));
        self.sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }
}

impl<const K: usize, const V: usize> RawMirror for FixedMirror<K, V> {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let k: [u8; K] = key.try_into().ok()?;
        match self.changed.get(&k) {
            Some(v) => v.as_ref().map(|v| v.as_slice()),
            None => self.sorted.binary_search_by(|(x, _)| x.cmp(&k)).ok().map(|i| self.sorted[i].1.as_slice()),
        }
    }

    fn set(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Ok(k) = <[u8; K]>::try_from(key) else { return };
        self.changed.insert(k, value.and_then(|v| <[u8; V]>::try_from(v).ok()));
        if self.changed.len() > MAX_MIRROR_CHANGES {
            self.merge();
        }
    }

    fn fill(&mut self, entries: &mut dyn Iterator<Item = (&[u8], &[u8])>) {
        self.changed.clear();
        self.sorted = entries.filter_map(|(k, v)| Some((<[u8; K]>::try_from(k).ok()?, <[u8; V]>::try_from(v).ok()?))).collect();
        self.sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // A map holds each key once; a read racing with updates may not.
        self.sorted.dedup_by(|a, b| a.0 == b.0);
        self.sorted.shrink_to_fit();
    }

    fn for_each_key(&self, f: &mut dyn FnMut(&[u8])) {
        let kept = self.sorted.iter().map(|(k, _)| k).filter(|k| !self.changed.contains_key(*k));
        kept.chain(self.changed.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| k)).for_each(|k| f(k));
    }
}

/// A mirror for a map of Cilium's shapes (validated when the map was opened).
fn mirror_for(key_size: u32, value_size: u32) -> Box<dyn RawMirror> {
    match (key_size, value_size) {
        (24, 12) => Box::new(FixedMirror::<24, 12>::new()),
        (24, 24) => Box::new(FixedMirror::<24, 24>::new()),
        (20, 48) => Box::new(FixedMirror::<20, 48>::new()),
        _ => Box::new(FixedMirror::<20, 20>::new()),
    }
}

struct Watched {
    kind: MapKind,
    /// The pin, or `None` for a map the datapath uses that is not the pinned one.
    path: Option<std::path::PathBuf>,
    map: PinnedMap,
    mirror: Box<dyn RawMirror>,
}

/// An entry's subject, its JSON form and the typed entry (`None` when undecodable).
type Decoded = (String, Option<Value>, Option<Entry>);

impl Watched {
    fn decode(&self, layout: Layout, key: &[u8], value: &[u8]) -> Decoded {
        let decoded = match self.kind {
            MapKind::Ipcache => ipcache::decode(layout, key, value).map(|e| (e.prefix.to_string(), serde_json::to_value(&e).ok(), Some(Entry::Ipcache(e)))),
            MapKind::Endpoints => endpoints::decode(layout, key, value).map(|e| (e.ip.to_string(), serde_json::to_value(&e).ok(), Some(Entry::Endpoint(e)))),
            MapKind::Tunnel => tunnel::decode(layout, key, value).map(|e| (e.prefix.to_string(), serde_json::to_value(&e).ok(), Some(Entry::Tunnel(e)))),
        };
        decoded.unwrap_or_else(|e| (hex::encode(key), Some(Value::String(format!("undecodable: {e}"))), None))
    }

    /// Compares the map's current value for `key` with the mirror and updates it.
    fn confirm(&mut self, layout: Layout, key: &[u8], source: &'static str, copy: Option<&dyn IpcacheCopy>) -> Result<Option<DatapathChange>, DatapathError> {
        let now = self.map.get_exact(key)?;
        Ok(self.record(layout, key.to_vec(), now, source, copy))
    }

    fn record(&mut self, layout: Layout, key: Vec<u8>, now: Option<Vec<u8>>, source: &'static str, copy: Option<&dyn IpcacheCopy>) -> Option<DatapathChange> {
        if let Some(copy) = copy.filter(|_| self.kind == MapKind::Ipcache) {
            return self.record_beside(layout, &key, now.as_deref(), source, copy).1;
        }
        let before = self.mirror.get(&key).map(<[u8]>::to_vec);
        if before == now {
            return None;
        }
        let old = before.as_ref().map(|v| self.decode(layout, &key, v));
        let new = now.as_ref().map(|v| self.decode(layout, &key, v));
        self.mirror.set(&key, now.as_deref());
        Some(self.change(old, new, source))
    }

    /// [`Self::record`] for an ipcache whose decoded copy the caller holds: compared decoded
    /// (bytes Cilium does not use cannot make a change); only undecodable entries are mirrored.
    /// Also says whether the key was held before (in the copy or the mirror).
    fn record_beside(&mut self, layout: Layout, key: &[u8], now: Option<&[u8]>, source: &'static str, copy: &dyn IpcacheCopy) -> (bool, Option<DatapathChange>) {
        let held = ipcache::decode_key(layout, key).ok().and_then(|at| copy.entry(&at));
        let raw_before = self.mirror.get(key);
        let now_entry = now.map(|v| ipcache::decode(layout, key, v));
        let unchanged = match (&now_entry, now) {
            (None, _) => held.is_none() && raw_before.is_none(),
            (Some(Ok(e)), _) => held == Some(e) && raw_before.is_none(),
            (Some(Err(_)), v) => raw_before == v,
        };
        let was_held = held.is_some() || raw_before.is_some();
        if unchanged {
            return (was_held, None);
        }
        let old = match (held, raw_before) {
            (Some(e), _) => Some(Self::decoded_ipcache(e.clone())),
            (None, Some(v)) => Some(self.decode(layout, key, v)),
            (None, None) => None,
        };
        let new = match now_entry {
            Some(Ok(e)) => Some(Self::decoded_ipcache(e)),
            Some(Err(_)) => now.map(|v| self.decode(layout, key, v)),
            None => None,
        };
        let undecodable_now = new.as_ref().is_some_and(|(_, _, e)| e.is_none());
        if undecodable_now || old.as_ref().is_some_and(|(_, _, e)| e.is_none()) {
            self.mirror.set(key, now.filter(|_| undecodable_now));
        }
        (was_held, Some(self.change(old, new, source)))
    }

    fn decoded_ipcache(e: IpcacheEntry) -> Decoded {
        (e.prefix.to_string(), serde_json::to_value(&e).ok(), Some(Entry::Ipcache(e)))
    }

    /// The change from `old` to `new` (`None` = absent).
    fn change(&self, old: Option<Decoded>, new: Option<Decoded>, source: &'static str) -> DatapathChange {
        let op = match (&old, &new) {
            (None, Some(_)) => Op::Added,
            (Some(_), Some(_)) => Op::Updated,
            _ => Op::Removed,
        };
        let undecodable = [&old, &new].iter().any(|d| d.as_ref().is_some_and(|(_, _, e)| e.is_none()));
        let (subject, old, old_entry) = old.unwrap_or_default();
        let (subject2, new, new_entry) = new.unwrap_or_default();
        DatapathChange {
            map: self.map.meta.name.clone(),
            kind: self.kind,
            op,
            subject: if subject2.is_empty() { subject } else { subject2 },
            old,
            new,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            source,
            undecodable,
            old_entry,
            new_entry,
        }
    }

    /// Re-reads the whole map and reports every difference from the mirror.
    fn resync(&mut self, layout: Layout, source: &'static str, copy: Option<&dyn IpcacheCopy>) -> Result<Vec<DatapathChange>, DatapathError> {
        // Nothing per key is allocated but the changes: a poll every 500 ms and a burst's
        // re-read of a 500k-entry ipcache would otherwise build sets of every key.
        let copy = copy.filter(|_| self.kind == MapKind::Ipcache);
        let raw = self.map.read_all(ReadStrategy::BatchWithFallback)?;
        let mut held = 0;
        self.mirror.for_each_key(&mut |_| held += 1);
        if let Some(c) = copy {
            c.for_each_key(&mut |_| held += 1);
        }
        let (mut out, mut found) = (Vec::new(), 0);
        for (k, v) in raw.iter() {
            if let Some(c) = copy {
                let (was_held, change) = self.record_beside(layout, k, Some(v), source, c);
                found += usize::from(was_held);
                out.extend(change);
                continue;
            }
            let before = self.mirror.get(k);
            found += usize::from(before.is_some());
            if before != Some(v) {
                out.extend(self.record(layout, k.to_vec(), Some(v.to_vec()), source, None));
            }
        }
        if found != held {
            // Some keys held are gone (or, more found than held, the read raced with updates
            // and returned a key twice): find them among the map's keys, sorted.
            let mut present: Vec<&[u8]> = raw.iter().map(|(k, _)| k).collect();
            present.sort_unstable();
            let mut gone = Vec::new();
            self.mirror.for_each_key(&mut |k| {
                if present.binary_search(&k).is_err() {
                    gone.push(k.to_vec());
                }
            });
            for k in gone {
                // Mirrored (without a copy: every entry; beside one: the undecodable ones).
                out.extend(self.record(layout, k, None, source, None));
            }
            if let Some(c) = copy {
                let mut present: Vec<(IpNet, u16)> = present.iter().filter_map(|k| ipcache::decode_key(layout, k).ok()).collect();
                present.sort_unstable();
                let mut gone = Vec::new();
                c.for_each_key(&mut |k| {
                    if present.binary_search(k).is_err() {
                        gone.extend(c.entry(k).cloned());
                    }
                });
                out.extend(gone.into_iter().map(|e| self.change(Some(Self::decoded_ipcache(e)), None, source)));
            }
        }
        Ok(out)
    }
}

enum Source {
    #[cfg(kvcheck_ebpf)]
    Ebpf(ebpf::Program),
    Poll(Duration),
}

/// Follows Cilium's ipcache, endpoint and tunnel maps.
pub struct ChangeFeed {
    layout: Layout,
    maps: Vec<Watched>,
    source: Source,
    /// Why the eBPF program is not in use, if it is not.
    pub fallback_reason: Option<String>,
    next_poll: Option<tokio::time::Instant>,
}

/// How to follow.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// Use the eBPF program when it can run (else poll).
    pub ebpf: bool,
    pub poll_interval: Duration,
    /// The caller keeps a decoded copy of the ipcache and hands it to every
    /// [`ChangeFeed::next`] ([`IpcacheCopy`]): the feed does not mirror the ipcache itself.
    pub beside_ipcache_copy: bool,
}

impl ChangeFeed {
    pub fn open(opts: &ReadOptions, layout: Layout, follow: &FollowOptions) -> Result<ChangeFeed, DatapathError> {
        let dir = super::globals_dir(&opts.bpffs);
        let ipcache_name = if layout.ipcache_v2() { IPCACHE_V2 } else { IPCACHE_V1 };
        // The maps the datapath uses: by id where that is not the pinned one.
        let open = |name: &str| -> Result<Option<(Option<std::path::PathBuf>, PinnedMap)>, DatapathError> {
            Ok(match opts.read_live.get(name) {
                Some(id) => Some((None, PinnedMap::open_id(name, *id)?)),
                None => PinnedMap::open_if_present(name, &dir.join(name))?.map(|m| (Some(dir.join(name)), m)),
            })
        };
        let required = |name: &str| -> Result<(Option<std::path::PathBuf>, PinnedMap), DatapathError> {
            open(name)?.ok_or_else(|| DatapathError::MapMissing { name: name.to_owned(), path: dir.join(name) })
        };
        let (ipcache_path, ipcache) = required(ipcache_name)?;
        let (endpoints_path, endpoints) = required(ENDPOINTS)?;
        let mut maps = vec![(MapKind::Ipcache, ipcache_path, ipcache), (MapKind::Endpoints, endpoints_path, endpoints)];
        if layout.has_tunnel_map() {
            if let Some((path, t)) = open(TUNNEL)? {
                maps.push((MapKind::Tunnel, path, t));
            }
        }
        let mut watched: Vec<Watched> = maps.into_iter().map(|(kind, path, map)| Watched { kind, path, mirror: mirror_for(map.meta.key_size, map.meta.value_size), map }).collect();
        // Attach before reading the maps: a change made while they are read then comes as an
        // event (confirmed against the mirror), instead of falling between read and attach.
        let (source, fallback_reason) = if follow.ebpf {
            match Self::attach(&watched) {
                Ok(s) => (s, None),
                Err(reason) => (Source::Poll(follow.poll_interval), Some(reason)),
            }
        } else {
            (Source::Poll(follow.poll_interval), Some("eBPF change events switched off".to_owned()))
        };
        for w in watched.iter_mut().filter(|w| !(follow.beside_ipcache_copy && w.kind == MapKind::Ipcache)) {
            let raw = w.map.read_all(opts.strategy)?;
            w.mirror.fill(&mut raw.iter());
        }
        Ok(ChangeFeed { layout, maps: watched, source, fallback_reason, next_poll: None })
    }

    #[cfg(kvcheck_ebpf)]
    fn attach(watched: &[Watched]) -> Result<Source, String> {
        let ids: Vec<(u32, u32)> = watched.iter().map(|w| (w.map.meta.id, w.map.meta.key_size)).collect();
        ebpf::Program::attach(&ids).map(Source::Ebpf)
    }

    #[cfg(not(kvcheck_ebpf))]
    fn attach(_watched: &[Watched]) -> Result<Source, String> {
        Err("kvcheck was built without its eBPF program (no bpf-linker at build time)".to_owned())
    }

    /// How the eBPF program resolves map fds (`None` when polling).
    pub fn ebpf_walk(&self) -> Option<&'static str> {
        match &self.source {
            #[cfg(kvcheck_ebpf)]
            Source::Ebpf(p) => Some(p.walk.describe()),
            Source::Poll(_) => None,
        }
    }

    /// `ebpf` or `poll`.
    pub fn source_name(&self) -> &'static str {
        match self.source {
            #[cfg(kvcheck_ebpf)]
            Source::Ebpf(_) => "ebpf",
            Source::Poll(_) => "poll",
        }
    }

    /// The first watched map whose pin no longer holds the map kvcheck has open (Cilium
    /// re-created or removed it; our handle keeps the old map alive, so reads would go on
    /// returning its frozen contents).
    pub fn replaced_map(&self) -> Option<String> {
        self.maps.iter().find_map(|w| {
            // A map in use that is not pinned is followed by id; the resync's discovery says
            // when the programs move to another.
            let path = w.path.as_ref()?;
            let current = PinnedMap::open_if_present(&w.map.meta.name, path).ok().flatten();
            match current {
                Some(m) if m.meta.id == w.map.meta.id => None,
                Some(m) => Some(format!("{} re-created (map id {} -> {})", path.display(), w.map.meta.id, m.meta.id)),
                None => Some(format!("{} no longer pinned", path.display())),
            }
        })
    }

    /// Waits for the next confirmed changes. `copy`: the caller's copy of the ipcache, as
    /// every batch before this one left it (when it follows with `beside_ipcache_copy`).
    pub async fn next(&mut self, copy: Option<&dyn IpcacheCopy>) -> Result<Vec<DatapathChange>, DatapathError> {
        loop {
            let changes = match &mut self.source {
                #[cfg(kvcheck_ebpf)]
                Source::Ebpf(program) => {
                    let (events, lost) = program.next_events().await.map_err(|e| DatapathError::Read { path: "ring buffer".into(), source: e })?;
                    // Coalesce: one confirmation per (map, key); a truncated batch re-reads the map.
                    let mut keys: BTreeMap<(u32, Vec<u8>), ()> = BTreeMap::new();
                    let mut resync: Vec<u32> = Vec::new();
                    for ev in events {
                        if ev.failed() {
                            // The kernel refused a single-key call: the map is unchanged.
                            continue;
                        }
                        if ev.truncated {
                            resync.push(ev.map_id);
                        } else {
                            keys.insert((ev.map_id, ev.key), ());
                        }
                    }
                    let mut out = Vec::new();
                    for w in &mut self.maps {
                        // Events dropped on a full ring buffer: any map may have changed.
                        if lost || resync.contains(&w.map.meta.id) {
                            // A whole-map read: off the async workers.
                            out.extend(tokio::task::block_in_place(|| w.resync(self.layout, "ebpf", copy))?);
                        }
                    }
                    // A map just re-read holds every key's change already (the copy is not yet
                    // updated with them: confirming them again would report them twice).
                    let reread = |id: &u32| lost || resync.contains(id);
                    for ((id, key), ()) in keys.into_iter().filter(|((id, _), ())| !reread(id)) {
                        if let Some(w) = self.maps.iter_mut().find(|w| w.map.meta.id == id) {
                            if key.len() == w.map.meta.key_size as usize {
                                out.extend(w.confirm(self.layout, &key, "ebpf", copy)?);
                            }
                        }
                    }
                    out
                }
                Source::Poll(interval) => {
                    // A deadline kept across calls: a caller that drops this future (a select
                    // that woke for something else) does not postpone the next poll.
                    let due = *self.next_poll.get_or_insert_with(|| tokio::time::Instant::now() + *interval);
                    tokio::time::sleep_until(due).await;
                    self.next_poll = Some(tokio::time::Instant::now() + *interval);
                    let mut out = Vec::new();
                    for w in &mut self.maps {
                        out.extend(tokio::task::block_in_place(|| w.resync(self.layout, "poll", copy))?);
                    }
                    out
                }
            };
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }
}

#[cfg(kvcheck_ebpf)]
mod ebpf {
    //! Loading and attaching `agent-ebpf`, and reading its ring buffer.

    use std::path::Path;

    use aya::maps::{MapData, PerCpuArray, RingBuf};
    use aya::programs::TracePoint;
    use tokio::io::unix::AsyncFd;

    use crate::datapath::btf::{Btf, KernelOffsets};

    static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kvcheck-ebpf"));
    const KEY_MAX: usize = 32;

    /// The event the program emits (agent-ebpf/src/main.rs `Event`).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct RawEvent {
        map_id: u32,
        cmd: u32,
        key_size: u32,
        truncated: u32,
        ret: i32,
        _pad: u32,
        key: [u8; KEY_MAX],
    }

    /// Batch commands (their result may be negative with some keys processed).
    const BATCH_CMDS: [u32; 3] = [25, 26, 27];

    pub struct Event {
        pub map_id: u32,
        pub cmd: u32,
        pub key: Vec<u8>,
        pub truncated: bool,
        /// The bpf() call's result (0 or a negative errno).
        pub ret: i32,
    }

    impl Event {
        /// A single-key call the kernel refused (a refused batch may have done part of its keys).
        pub fn failed(&self) -> bool {
            self.ret < 0 && !BATCH_CMDS.contains(&self.cmd)
        }
    }

    pub struct Program {
        // Keeps the program attached for as long as the feed lives.
        _ebpf: aya::Ebpf,
        ring: AsyncFd<RingBuf<MapData>>,
        lost: PerCpuArray<MapData, u64>,
        lost_seen: u64,
        pub walk: FileTableWalk,
    }

    /// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (64 KiB in a container): lift it
    /// when allowed (CAP_SYS_RESOURCE, opt-in in deploy/). Later kernels charge the memory
    /// cgroup; without the capability this fails and the load says why if it must.
    fn raise_memlock() {
        let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: a valid rlimit for the calling process.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "RLIMIT_MEMLOCK not raised (only kernels before 5.11 need it)");
        }
    }

    fn ensure_tracefs() {
        let dir = Path::new("/sys/kernel/tracing");
        if dir.join("events").exists() {
            return;
        }
        let (src, fs) = (c"tracefs", c"tracefs");
        let target = c"/sys/kernel/tracing";
        // SAFETY: valid NUL-terminated strings; failure is reported by attach below.
        unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    }

    /// How the enter program resolves a map fd.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum FileTableWalk {
        /// `bpf_get_current_task_btf` and direct loads (Linux 5.11+).
        BtfPointers,
        /// A `bpf_probe_read_kernel` per step (older kernels).
        ProbeReads,
    }

    impl FileTableWalk {
        pub fn describe(self) -> &'static str {
            match self {
                FileTableWalk::BtfPointers => "file table through BTF pointers",
                FileTableWalk::ProbeReads => "file table by probe reads",
            }
        }
    }

    /// Loads the program `name` and attaches it to `syscalls/tracepoint`.
    fn load_tracepoint(ebpf: &mut aya::Ebpf, name: &str, tracepoint: &str) -> Result<(), String> {
        let prog: &mut TracePoint =
            ebpf.program_mut(name).ok_or_else(|| format!("program {name} missing"))?.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| format!("loading the tracepoint program {name}: {e}"))?;
        prog.attach("syscalls", tracepoint).map_err(|e| format!("attaching {name} to syscalls/{tracepoint}: {e}"))?;
        Ok(())
    }

    impl Program {
        /// Loads and attaches the program, watching `(map id, key size)` pairs.
        pub fn attach(maps: &[(u32, u32)]) -> Result<Program, String> {
            let btf = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| format!("no kernel BTF (/sys/kernel/btf/vmlinux: {e})"))?;
            let off = KernelOffsets::from_btf(&Btf::parse(&btf).map_err(|e| format!("kernel BTF: {e}"))?).map_err(|e| format!("kernel BTF: {e}"))?;
            ensure_tracefs();
            raise_memlock();
            // The program compares against a fixed array of ids (a hash lookup would cost every
            // unwatched bpf() call on the node).
            const WATCH_MAX: usize = 16;
            if maps.len() > WATCH_MAX {
                return Err(format!("{} maps to watch, the eBPF program watches at most {WATCH_MAX}", maps.len()));
            }
            let (mut ids, mut key_sizes) = ([0u32; WATCH_MAX], [0u32; WATCH_MAX]);
            for (i, (id, key_size)) in maps.iter().enumerate() {
                (ids[i], key_sizes[i]) = (*id, *key_size);
            }
            let mut ebpf = aya::EbpfLoader::new()
                .override_global("WATCHED_IDS", &ids, true)
                .override_global("WATCHED_KEY_SIZES", &key_sizes, true)
                .override_global("OFF_TASK_FILES", &off.task_files, true)
                .override_global("OFF_FILES_FDT", &off.files_fdt, true)
                .override_global("OFF_FDT_MAX_FDS", &off.fdt_max_fds, true)
                .override_global("OFF_FDT_FD", &off.fdt_fd, true)
                .override_global("OFF_FILE_PRIVATE_DATA", &off.file_private_data, true)
                .override_global("OFF_MAP_ID", &off.map_id, true)
                .load(PROGRAM)
                .map_err(|e| format!("loading the eBPF program: {e}"))?;
            // Exit first: an enter seen without its exit program would only fill PENDING.
            load_tracepoint(&mut ebpf, "sys_exit_bpf", "sys_exit_bpf")?;
            // The enter program walks the file table through BTF pointers (Linux 5.11+); where
            // the verifier refuses that, the same walk with a probe read per step.
            // KVCHECK_EBPF_PROBE_READS=1 takes the second on any kernel (tests run both).
            let forced = std::env::var_os("KVCHECK_EBPF_PROBE_READS").is_some_and(|v| v == "1");
            let fast = if forced { Err("KVCHECK_EBPF_PROBE_READS=1".to_owned()) } else { load_tracepoint(&mut ebpf, "sys_enter_bpf", "sys_enter_bpf") };
            let walk = match fast {
                Ok(()) => FileTableWalk::BtfPointers,
                Err(why) => {
                    tracing::debug!(reason = %why, "BTF-pointer enter program not used; using the probe-read one");
                    load_tracepoint(&mut ebpf, "sys_enter_bpf_probed", "sys_enter_bpf")?;
                    FileTableWalk::ProbeReads
                }
            };
            let ring = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or("program has no EVENTS map")?).map_err(|e| e.to_string())?;
            let lost = PerCpuArray::try_from(ebpf.take_map("LOST").ok_or("program has no LOST map")?).map_err(|e| e.to_string())?;
            // The ring buffer owns its fd for as long as the AsyncFd lives.
            #[allow(deprecated, reason = "AsyncFd::new is sound here: RingBuf owns the fd")]
            let ring = AsyncFd::new(ring).map_err(|e| format!("ring buffer: {e}"))?;
            Ok(Program { _ebpf: ebpf, ring, lost, lost_seen: 0, walk })
        }

        /// Events the program dropped (ring buffer full) since the last call.
        fn newly_lost(&mut self) -> bool {
            let total: u64 = self.lost.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0);
            let grew = total > self.lost_seen;
            self.lost_seen = total;
            grew
        }

        /// Waits until events arrive and returns all that are queued, and whether events were
        /// dropped since the last call (the maps must then be re-read).
        pub async fn next_events(&mut self) -> std::io::Result<(Vec<Event>, bool)> {
            loop {
                let mut guard = self.ring.readable_mut().await?;
                let ring = guard.get_inner_mut();
                let mut out = Vec::new();
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<RawEvent>() {
                        // SAFETY: the program writes a whole RawEvent per record; read unaligned.
                        let raw: RawEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        let n = (raw.key_size as usize).min(KEY_MAX);
                        out.push(Event { map_id: raw.map_id, cmd: raw.cmd, key: raw.key[..n].to_vec(), truncated: raw.truncated != 0, ret: raw.ret });
                    }
                }
                guard.clear_ready();
                drop(guard);
                let lost = self.newly_lost();
                if !out.is_empty() || lost {
                    return Ok((out, lost));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sorted mirror with its overlay answers as a plain map would, across merges.
    #[test]
    fn mirror_agrees_with_a_map() {
        let mut m = FixedMirror::<2, 1>::new();
        let mut model: std::collections::BTreeMap<[u8; 2], [u8; 1]> = Default::default();
        let initial: Vec<([u8; 2], [u8; 1])> = (0..100u8).map(|i| ([i, 7], [i])).collect();
        m.fill(&mut initial.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        model.extend(initial.iter().copied());
        // Enough changes for several merges; keys removed, re-added and changed.
        for step in 0..(3 * MAX_MIRROR_CHANGES as u32) {
            let k = [(step % 251) as u8, (step % 3) as u8 + 6];
            if step % 5 == 0 {
                m.set(&k, None);
                model.remove(&k);
            } else {
                m.set(&k, Some(&[(step % 256) as u8]));
                model.insert(k, [(step % 256) as u8]);
            }
        }
        for k in (0..=255u8).flat_map(|a| (5..10u8).map(move |b| [a, b])) {
            assert_eq!(m.get(&k), model.get(&k).map(|v| v.as_slice()), "{k:?}");
        }
        let mut keys = Vec::new();
        m.for_each_key(&mut |k| keys.push(k.to_vec()));
        keys.sort();
        assert_eq!(keys, model.keys().map(|k| k.to_vec()).collect::<Vec<_>>());
        // Keys of the wrong size are not Cilium's: ignored.
        m.set(&[1, 2, 3], Some(&[1]));
        assert_eq!(m.get(&[1, 2, 3]), None);
    }
}
