//! Reading a node's Cilium datapath: pinned BPF maps (read-only) and host addresses.
//!
//! `sys` holds the raw syscalls aya lacks, `maps` opens pins and reads raw entries, the
//! per-map modules decode bytes by layout (pure), `detect` picks the layout, `addresses`
//! reads rtnetlink. [`read_snapshot`] ties them together.

pub mod addresses;
pub mod btf;
pub mod codec;
pub mod detect;
pub mod endpoints;
pub mod events;
pub mod inuse;
pub mod ipcache;
pub mod maps;
pub mod sys;
pub mod tunnel;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::MapType;
use serde::Serialize;

use crate::model::version::{CiliumVersion, Layout, VersionError};
use codec::DecodeError;
use detect::LayoutChoice;
use endpoints::EndpointEntry;
use ipcache::IpcacheEntry;
use maps::{MapMeta, PinnedMap, RawEntries, ReadMethod, ReadStrategy};
use tunnel::TunnelEntry;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
pub const IPCACHE_V1: &str = "cilium_ipcache";
pub const IPCACHE_V2: &str = "cilium_ipcache_v2";
pub const ENDPOINTS: &str = "cilium_lxc";
pub const TUNNEL: &str = "cilium_tunnel_map";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("map {name} not found: no pin at {path} (is Cilium running on this node, and is --bpffs the bpffs root it pins to?)")]
    MapMissing { name: String, path: PathBuf },
    #[error("cannot open {path} read-only: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a {found} map; Cilium creates it as {expected}")]
    WrongType {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("unknown layout for {name} at {path}: key {key_size} bytes, value {value_size} bytes; supported: {supported}")]
    UnknownLayout {
        name: String,
        path: PathBuf,
        key_size: u32,
        value_size: u32,
        supported: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Layout(#[from] detect::Contradiction),
    #[error("--cilium-version {version} implies layout {layout}, whose ipcache is {expected_map}, but {found}")]
    VersionMismatch {
        version: CiliumVersion,
        layout: Layout,
        expected_map: &'static str,
        found: String,
    },
    #[error("rtnetlink: {what}: {message}")]
    Netlink { what: &'static str, message: String },
}

/// How to read the datapath.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// The bpffs root (`/sys/fs/bpf`); maps are under `<bpffs>/tc/globals/`.
    pub bpffs: PathBuf,
    pub version: Option<CiliumVersion>,
    pub strategy: ReadStrategy,
    /// Keep each entry's raw key and value bytes in the snapshot.
    pub include_raw: bool,
    /// Read addresses from this network namespace (`/var/run/netns/NAME`) instead of ours.
    pub netns: Option<PathBuf>,
    /// Find the maps the attached programs use ([`inuse`]) and check those.
    pub live_maps: bool,
    /// Map name → id of the map to read instead of the pin (the one the programs use).
    pub read_live: std::collections::BTreeMap<String, u32>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            version: None,
            strategy: ReadStrategy::default(),
            include_raw: false,
            netns: None,
            live_maps: true,
            read_live: Default::default(),
        }
    }
}

/// An entry whose bytes do not decode; it is reported, and the rest of the map is read.
#[derive(Clone, Debug, Serialize)]
pub struct UndecodableEntry {
    pub key: String,
    pub value: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RawEntry {
    pub key: String,
    pub value: String,
}

/// One map's decoded contents.
#[derive(Clone, Debug, Serialize)]
pub struct MapDump<T> {
    #[serde(flatten)]
    pub meta: MapMeta,
    pub entry_count: usize,
    /// entry_count / max_entries.
    pub fill_ratio: f64,
    pub read_method: ReadMethod,
    pub entries: Vec<T>,
    pub undecodable: Vec<UndecodableEntry>,
    /// Raw bytes of every entry (hex), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<Vec<RawEntry>>,
}

/// The decoded datapath of one node.
#[derive(Clone, Debug, Serialize)]
pub struct DatapathSnapshot {
    pub bpffs: PathBuf,
    pub layout: LayoutChoice,
    pub ipcache: MapDump<IpcacheEntry>,
    pub endpoints: MapDump<EndpointEntry>,
    /// `None` when the layout has no tunnel map (v1.18+) or none is pinned.
    pub tunnel: Option<MapDump<TunnelEntry>>,
    /// The maps the attached programs use, against the pins.
    pub live_maps: inuse::LiveMaps,
}

pub fn globals_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("tc").join("globals")
}

/// Reads and decodes Cilium's ipcache, endpoint and tunnel maps under `opts.bpffs`.
pub fn read_maps(opts: &ReadOptions) -> Result<DatapathSnapshot, DatapathError> {
    let dir = globals_dir(&opts.bpffs);
    // v1.18+ pins cilium_ipcache_v2 and may leave the old map behind after an upgrade:
    // the v2 map wins when both exist.
    // A map the attached programs use instead of its pin is read by id.
    let open = |name: &str| -> Result<Option<PinnedMap>, DatapathError> {
        match opts.read_live.get(name) {
            Some(id) => PinnedMap::open_id(name, *id).map(Some),
            None => PinnedMap::open_if_present(name, &dir.join(name)),
        }
    };
    let ipcache = match open(IPCACHE_V2)? {
        Some(m) => m,
        None => open(IPCACHE_V1)?.ok_or_else(|| DatapathError::MapMissing { name: IPCACHE_V1.to_owned(), path: dir.join(IPCACHE_V1) })?,
    };
    ipcache.expect_type(MapType::LpmTrie)?;
    check_shape(&ipcache, &[(ipcache::KEY_SIZE as u32, 12), (ipcache::KEY_SIZE as u32, 24)])?;
    let endpoints = open(ENDPOINTS)?.ok_or_else(|| DatapathError::MapMissing { name: ENDPOINTS.to_owned(), path: dir.join(ENDPOINTS) })?;
    endpoints.expect_type(MapType::Hash)?;
    check_shape(&endpoints, &[(endpoints::KEY_SIZE as u32, endpoints::VALUE_SIZE as u32)])?;
    let tunnel = open(TUNNEL)?;
    if let Some(t) = &tunnel {
        t.expect_type(MapType::Hash)?;
        check_shape(t, &[(tunnel::KEY_SIZE as u32, tunnel::VALUE_SIZE as u32)])?;
    }

    let endpoints_raw = endpoints.read_all(opts.strategy)?;
    // With the version known, the ipcache is decoded as it is read; else its entries are
    // evidence for the layout and are read whole first.
    let ipcache_raw = if opts.version.is_some() { None } else { Some(ipcache.read_all(opts.strategy)?) };

    let layout = match opts.version {
        Some(v) => {
            let layout = Layout::for_version(v)?;
            if layout.ipcache_value_size() != ipcache.meta.value_size {
                return Err(DatapathError::VersionMismatch {
                    version: v,
                    layout,
                    expected_map: layout.ipcache_map_name(),
                    found: format!(
                        "{} has {}-byte values",
                        ipcache.meta.path.display(),
                        ipcache.meta.value_size
                    ),
                });
            }
            LayoutChoice::from_version(v, layout)
        }
        None => detect::detect(detect::Evidence {
            ipcache_value_size: ipcache.meta.value_size,
            ipcache_flags: ipcache.meta.flags,
            endpoints_flags: endpoints.meta.flags,
            ipcache_entries: ipcache_raw.iter().flat_map(RawEntries::iter),
            endpoint_entries: endpoints_raw.iter(),
        })?,
    };
    let l = layout.layout;
    let tunnel = match tunnel {
        Some(t) if l.has_tunnel_map() => {
            let raw = t.read_all(opts.strategy)?;
            Some(decode_map(t.meta, &raw, opts.include_raw, |k, v| tunnel::decode(l, k, v)))
        }
        // A v1.18+ node may keep a stale tunnel map pin from before the upgrade; it is
        // not part of the datapath any more.
        _ => None,
    };
    let decode_ipcache = |k: &[u8], v: &[u8]| ipcache::decode(l, k, v);
    let ipcache = match &ipcache_raw {
        Some(raw) => decode_map(ipcache.meta, raw, opts.include_raw, decode_ipcache),
        None => read_decoded(&ipcache, opts.strategy, opts.include_raw, decode_ipcache)?,
    };
    Ok(DatapathSnapshot {
        bpffs: opts.bpffs.clone(),
        ipcache,
        endpoints: decode_map(endpoints.meta, &endpoints_raw, opts.include_raw, |k, v| {
            endpoints::decode(l, k, v)
        }),
        tunnel,
        layout,
        live_maps: inuse::LiveMaps::Off,
    })
}

/// The pinned map ids of Cilium's maps (those pinned).
pub fn pinned_ids(bpffs: &Path) -> BTreeMap<String, u32> {
    let dir = globals_dir(bpffs);
    [IPCACHE_V1, IPCACHE_V2, ENDPOINTS, TUNNEL]
        .into_iter()
        .filter_map(|n| PinnedMap::open_if_present(n, &dir.join(n)).ok().flatten().map(|m| (n.to_owned(), m.meta.id)))
        .collect()
}

/// Reads the node's datapath: its addresses, the maps its programs use (when
/// `opts.live_maps`; reading those instead of pins that differ), and the maps.
pub async fn read_node(opts: &ReadOptions) -> Result<(DatapathSnapshot, addresses::HostAddresses), DatapathError> {
    let host = addresses::read_host_addresses(opts.netns.as_deref()).await?;
    let mut o = opts.clone();
    let live = if opts.live_maps {
        let pinned = pinned_ids(&opts.bpffs);
        match inuse::discover(opts.netns.as_deref(), &host.interfaces, &pinned).await {
            Ok(in_use) => {
                let mut with_counts = BTreeMap::new();
                for (name, id) in &pinned {
                    // The pin's entries: counted here only when the datapath uses another map.
                    let differs = in_use.maps.get(name).is_some_and(|ids| ids.keys().any(|i| i != id));
                    let n = if differs { PinnedMap::open_if_present(name, &globals_dir(&opts.bpffs).join(name))?.map_or(0, |m| m.count_entries().unwrap_or(0)) } else { 0 };
                    with_counts.insert(name.clone(), (*id, n));
                }
                o.read_live = in_use.live_overrides(&with_counts);
                inuse::LiveMaps::Checked { in_use, pinned: with_counts, read_live: o.read_live.clone() }
            }
            Err(reason) => inuse::LiveMaps::Skipped { reason },
        }
    } else {
        inuse::LiveMaps::Off
    };
    let mut snap = tokio::task::spawn_blocking(move || read_maps(&o)).await.map_err(|e| DatapathError::Netlink { what: "map reader task", message: e.to_string() })??;
    snap.live_maps = fill_pinned_counts(live, &snap);
    Ok((snap, host))
}

/// Fills the entry counts of pins the snapshot read itself.
fn fill_pinned_counts(mut live: inuse::LiveMaps, snap: &DatapathSnapshot) -> inuse::LiveMaps {
    if let inuse::LiveMaps::Checked { pinned, read_live, .. } = &mut live {
        let dumps = [(&snap.ipcache.meta, snap.ipcache.entry_count), (&snap.endpoints.meta, snap.endpoints.entry_count)];
        let tunnel = snap.tunnel.as_ref().map(|t| (&t.meta, t.entry_count));
        for (meta, n) in dumps.into_iter().chain(tunnel) {
            if !read_live.contains_key(&meta.name)
                && let Some(p) = pinned.get_mut(&meta.name).filter(|p| p.0 == meta.id)
            {
                p.1 = n;
            }
        }
    }
    live
}

fn check_shape(map: &PinnedMap, supported: &[(u32, u32)]) -> Result<(), DatapathError> {
    let (k, v) = (map.meta.key_size, map.meta.value_size);
    if supported.contains(&(k, v)) {
        return Ok(());
    }
    let list: Vec<String> = supported
        .iter()
        .map(|(k, v)| format!("key {k} / value {v}"))
        .collect();
    Err(DatapathError::UnknownLayout {
        name: map.meta.name.clone(),
        path: map.meta.path.clone(),
        key_size: k,
        value_size: v,
        supported: list.join(", "),
    })
}

fn decode_map<T>(meta: MapMeta, raw: &RawEntries, include_raw: bool, decode: impl Fn(&[u8], &[u8]) -> Result<T, DecodeError>) -> MapDump<T> {
    let mut d = Decoding::new(include_raw, raw.len());
    d.add(raw, &decode);
    d.finish(meta, raw.method)
}

/// Reads `map` and decodes its entries as they are read: the raw map (18 MB for a 500k-entry
/// ipcache) is never held whole beside the decoded one.
fn read_decoded<T>(map: &PinnedMap, strategy: ReadStrategy, include_raw: bool, decode: impl Fn(&[u8], &[u8]) -> Result<T, DecodeError>) -> Result<MapDump<T>, DatapathError> {
    // Room for a full map from the start: a 500k-entry ipcache's vector no longer doubles
    // (copying ~24 MB in all) while it is read. Pages the map does not fill are never touched
    // (a large allocation is mapped lazily), so a mostly empty map costs address space only.
    let mut d = Decoding::new(include_raw, (map.meta.max_entries as usize).min(MAX_PRESIZED_ENTRIES));
    let method = map.read_each(strategy, &mut |part| d.add(part, &decode))?;
    // (Given back in place: the large allocation is remapped, not copied.)
    d.entries.shrink_to_fit();
    Ok(d.finish(map.meta.clone(), method))
}

/// The most entries [`read_decoded`] makes room for before reading (4M: Cilium's largest maps
/// are configured far below; past it the vector grows as it is read).
const MAX_PRESIZED_ENTRIES: usize = 4 << 20;

/// A map's entries being decoded.
struct Decoding<T> {
    entries: Vec<T>,
    undecodable: Vec<UndecodableEntry>,
    raw: Option<Vec<RawEntry>>,
    count: usize,
}

impl<T> Decoding<T> {
    fn new(include_raw: bool, capacity: usize) -> Self {
        Decoding { entries: Vec::with_capacity(capacity), undecodable: Vec::new(), raw: include_raw.then(Vec::new), count: 0 }
    }

    fn add(&mut self, part: &RawEntries, decode: &impl Fn(&[u8], &[u8]) -> Result<T, DecodeError>) {
        self.count += part.len();
        for (k, v) in part.iter() {
            match decode(k, v) {
                Ok(e) => self.entries.push(e),
                Err(reason) => self.undecodable.push(UndecodableEntry { key: hex::encode(k), value: hex::encode(v), reason: reason.to_string() }),
            }
        }
        if let Some(raw) = self.raw.as_mut() {
            raw.extend(part.iter().map(|(k, v)| RawEntry { key: hex::encode(k), value: hex::encode(v) }));
        }
    }

    fn finish(self, meta: MapMeta, read_method: ReadMethod) -> MapDump<T> {
        MapDump {
            fill_ratio: self.count as f64 / f64::from(meta.max_entries.max(1)),
            entry_count: self.count,
            read_method,
            entries: self.entries,
            undecodable: self.undecodable,
            raw: self.raw,
            meta,
        }
    }
}
