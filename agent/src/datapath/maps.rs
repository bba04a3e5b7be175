//! Opening Cilium's pinned maps read-only and reading every entry as raw bytes.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapType};
use serde::Serialize;

use super::sys;
use super::DatapathError;

/// What the kernel says about a map, plus what we counted while reading it.
#[derive(Clone, Debug, Serialize)]
pub struct MapMeta {
    pub name: String,
    pub path: PathBuf,
    pub id: u32,
    pub map_type: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// How the entries were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadMethod {
    /// `BPF_MAP_LOOKUP_BATCH`, many entries per syscall.
    BatchLookup,
    /// One `GET_NEXT_KEY` + `LOOKUP_ELEM` pair per entry (aya's iterator); used when the kernel
    /// refuses batch operations on the map type, or when asked to.
    KeyIteration,
}

/// Whether to try batch lookups first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadStrategy {
    #[default]
    BatchWithFallback,
    IterateOnly,
}

/// All entries of one map as two flat buffers (fast to fill, cheap to hold at 500k entries).
pub struct RawEntries {
    pub key_size: usize,
    pub value_size: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
    pub method: ReadMethod,
}

impl RawEntries {
    pub fn len(&self) -> usize {
        self.keys.len().checked_div(self.key_size).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .chunks_exact(self.key_size)
            .zip(self.values.chunks_exact(self.value_size))
    }
}

/// A pinned map opened with a read-only fd. There is no method that writes.
pub struct PinnedMap {
    map: Map,
    /// A duplicate of aya's (read-only) fd for the raw batch calls aya lacks.
    batch_fd: OwnedFd,
    pub meta: MapMeta,
}

impl PinnedMap {
    /// Opens `path` with `BPF_OBJ_GET` + `BPF_F_RDONLY`. `Ok(None)` when no such pin exists.
    pub fn open_if_present(name: &str, path: &Path) -> Result<Option<PinnedMap>, DatapathError> {
        let fd = match sys::obj_get_readonly(path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DatapathError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::from_fd(name, path, fd).map(Some)
    }

    /// Opens map `id` read-only (`BPF_MAP_GET_FD_BY_ID`): a map the datapath uses that is not
    /// the pinned one. Its `path` says so.
    pub fn open_id(name: &str, id: u32) -> Result<PinnedMap, DatapathError> {
        let path = PathBuf::from(format!("map id {id} (in use by the datapath, not pinned)"));
        let fd = sys::map_fd_by_id_readonly(id).map_err(|source| DatapathError::Open { path: path.clone(), source })?;
        Self::from_fd(name, &path, fd)
    }

    /// Entries in the map (key iteration; no values copied).
    pub fn count_entries(&self) -> Result<usize, DatapathError> {
        sys::count_keys(self.fd(), self.meta.key_size, &mut 0).map_err(|e| self.read_error(e))
    }

    fn from_fd(name: &str, path: &Path, fd: OwnedFd) -> Result<PinnedMap, DatapathError> {
        let aya_err = |e: aya::maps::MapError| DatapathError::Open {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        };
        let batch_fd = fd.try_clone().map_err(|source| DatapathError::Open {
            path: path.to_owned(),
            source,
        })?;
        let data = MapData::from_fd(fd).map_err(aya_err)?;
        let info = data.info().map_err(aya_err)?;
        let map_type = info.map_type().map_err(aya_err)?;
        let meta = MapMeta {
            name: name.to_owned(),
            path: path.to_owned(),
            id: info.id(),
            map_type: map_type_name(map_type),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        let map = Map::from_map_data(data).map_err(aya_err)?;
        Ok(PinnedMap { map, batch_fd, meta })
    }

    /// Like [`open_if_present`](Self::open_if_present), but a missing pin is an error.
    pub fn open(name: &str, path: &Path) -> Result<PinnedMap, DatapathError> {
        Self::open_if_present(name, path)?.ok_or_else(|| DatapathError::MapMissing {
            name: name.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The current value of exactly `key`, or `None` when the map has no such entry. For an LPM
    /// trie a lookup returns the longest *matching* prefix, so existence is checked first:
    /// GET_NEXT_KEY of a key that is not in the trie restarts at the first key.
    pub fn get_exact(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DatapathError> {
        let mut value = vec![0u8; self.meta.value_size as usize];
        if self.meta.map_type == map_type_name(MapType::LpmTrie) {
            let mut first = vec![0u8; key.len()];
            let mut next = vec![0u8; key.len()];
            let has_first = sys::get_next_key(self.fd(), None, &mut first).map_err(|e| self.read_error(e))?;
            if !has_first {
                return Ok(None);
            }
            let has_next = sys::get_next_key(self.fd(), Some(key), &mut next).map_err(|e| self.read_error(e))?;
            // Present: the next key follows it (or it is the last). Absent: iteration restarts.
            if has_next && next == first {
                return Ok(None);
            }
        }
        let found = sys::lookup_elem(self.fd(), key, &mut value).map_err(|e| self.read_error(e))?;
        Ok(found.then_some(value))
    }

    /// Checks the map type against what Cilium creates for this map.
    pub fn expect_type(&self, expected: MapType) -> Result<(), DatapathError> {
        let want = map_type_name(expected);
        if self.meta.map_type == want {
            Ok(())
        } else {
            Err(DatapathError::WrongType {
                path: self.meta.path.clone(),
                found: self.meta.map_type.clone(),
                expected: want,
            })
        }
    }

    /// Reads every entry. Batch lookups first (many entries per syscall), falling back to
    /// per-key iteration when the kernel refuses them for this map type.
    pub fn read_all(&self, strategy: ReadStrategy) -> Result<RawEntries, DatapathError> {
        let mut all = RawEntries::empty(self.meta.key_size as usize, self.meta.value_size as usize, ReadMethod::BatchLookup);
        all.method = self.read_each(strategy, &mut |part| {
            all.keys.extend_from_slice(&part.keys);
            all.values.extend_from_slice(&part.values);
        })?;
        Ok(all)
    }

    /// Reads every entry as [`read_all`](Self::read_all) does, handing them to `on_entries` as
    /// they are read (each batch lookup's entries; all of them when keys are iterated), so a
    /// caller that decodes them never holds the raw map. Returns how the map was read.
    pub fn read_each(&self, strategy: ReadStrategy, on_entries: &mut dyn FnMut(&RawEntries)) -> Result<ReadMethod, DatapathError> {
        if strategy == ReadStrategy::BatchWithFallback {
            let mut delivered = false;
            match self.read_batched(&mut |part| {
                delivered = true;
                on_entries(part);
            }) {
                Ok(()) => return Ok(ReadMethod::BatchLookup),
                // (Refused at the first call, before anything was handed over.)
                Err(e) if sys::is_unsupported(&e) && !delivered => {
                    tracing::debug!(map = %self.meta.name, error = %e, "batch lookup refused; iterating keys");
                }
                Err(source) => return Err(self.read_error(source)),
            }
        }
        on_entries(&self.read_iterating()?);
        Ok(ReadMethod::KeyIteration)
    }

    fn read_error(&self, source: std::io::Error) -> DatapathError {
        DatapathError::Read {
            path: self.meta.path.clone(),
            source,
        }
    }

    /// The read-only fd (BPF_F_RDONLY): the kernel refuses updates and deletes through it.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.batch_fd.as_fd()
    }

    /// Batch lookups, each call's entries handed to `on_batch` (one buffer, reused).
    fn read_batched(&self, on_batch: &mut dyn FnMut(&RawEntries)) -> std::io::Result<()> {
        let key_size = self.meta.key_size as usize;
        let value_size = self.meta.value_size as usize;
        let max = self.meta.max_entries.max(1) as usize;
        // 8192 entries per call: ~60 syscalls for a full 500k ipcache; buffers stay < 400 KiB.
        let mut chunk = max.min(8192);
        let mut batch = RawEntries::empty(key_size, value_size, ReadMethod::BatchLookup);
        let mut cursor = vec![0u8; key_size.max(8)];
        let mut first = true;
        loop {
            batch.keys.resize(chunk * key_size, 0);
            batch.values.resize(chunk * value_size, 0);
            let step = sys::lookup_batch(self.fd(), first, &mut cursor, &mut batch.keys, &mut batch.values, chunk as u32);
            let (got, done) = match step {
                Ok(sys::BatchStep::More(n)) => (n as usize, false),
                Ok(sys::BatchStep::Done(n)) => (n as usize, true),
                // Hash maps answer ENOSPC when one bucket holds more entries than `count`.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < max.max(65536) => {
                    chunk *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            };
            batch.keys.truncate(got * key_size);
            batch.values.truncate(got * value_size);
            if got > 0 {
                on_batch(&batch);
            }
            first = false;
            if done {
                return Ok(());
            }
        }
    }

    fn read_iterating(&self) -> Result<RawEntries, DatapathError> {
        let (k, v) = (self.meta.key_size, self.meta.value_size);
        match (&self.map, k, v) {
            (Map::LpmTrie(_), 24, 12) => self.iterate_lpm::<20, 12>(),
            (Map::LpmTrie(_), 24, 24) => self.iterate_lpm::<20, 24>(),
            (Map::HashMap(_), 20, 48) => self.iterate_hash::<20, 48>(),
            (Map::HashMap(_), 20, 20) => self.iterate_hash::<20, 20>(),
            _ => Err(DatapathError::UnknownLayout {
                name: self.meta.name.clone(),
                path: self.meta.path.clone(),
                key_size: k,
                value_size: v,
                supported: "no per-key reader for this shape".to_owned(),
            }),
        }
    }

    fn iterate_lpm<const K: usize, const V: usize>(&self) -> Result<RawEntries, DatapathError> {
        let trie = LpmTrie::<&MapData, [u8; K], [u8; V]>::try_from(&self.map)
            .map_err(|e| self.read_error(std::io::Error::other(e.to_string())))?;
        let mut out = RawEntries::empty(K + 4, V, ReadMethod::KeyIteration);
        for item in trie.iter() {
            let (key, value): (LpmKey<[u8; K]>, [u8; V]) =
                item.map_err(|e| self.read_error(std::io::Error::other(e.to_string())))?;
            out.keys.extend_from_slice(&key.prefix_len().to_ne_bytes());
            out.keys.extend_from_slice(&key.data());
            out.values.extend_from_slice(&value);
        }
        Ok(out)
    }

    fn iterate_hash<const K: usize, const V: usize>(&self) -> Result<RawEntries, DatapathError> {
        let map = BpfHashMap::<&MapData, [u8; K], [u8; V]>::try_from(&self.map)
            .map_err(|e| self.read_error(std::io::Error::other(e.to_string())))?;
        let mut out = RawEntries::empty(K, V, ReadMethod::KeyIteration);
        for item in map.iter() {
            let (key, value) =
                item.map_err(|e| self.read_error(std::io::Error::other(e.to_string())))?;
            out.keys.extend_from_slice(&key);
            out.values.extend_from_slice(&value);
        }
        Ok(out)
    }
}

impl RawEntries {
    fn empty(key_size: usize, value_size: usize, method: ReadMethod) -> Self {
        RawEntries {
            key_size,
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
            method,
        }
    }
}

/// The kernel's name for a map type, as bpftool prints it.
pub fn map_type_name(t: MapType) -> String {
    match t {
        MapType::Hash => "hash".to_owned(),
        MapType::LpmTrie => "lpm_trie".to_owned(),
        MapType::Array => "array".to_owned(),
        MapType::LruHash => "lru_hash".to_owned(),
        MapType::PerCpuHash => "percpu_hash".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
