//! Cilium-like map writer: creates and pins maps the way Cilium's agent does, and writes
//! entries through the bpf() syscall (single and batched). Test-side only: kvcheck itself
//! never writes to a map.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvcheck::datapath::sys::{self, BatchAttr, ElemAttr, MapCreateAttr, ObjAttr};
use kvcheck::model::version::Layout;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
pub const BPF_F_NO_PREALLOC: u32 = 1;
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// A private bpffs mount in a temporary directory; unmounted and removed on drop.
pub struct BpffsMount {
    pub root: PathBuf,
}

impl BpffsMount {
    pub fn new() -> io::Result<BpffsMount> {
        let mut template = *b"/tmp/kvcheck-bpffs-XXXXXX\0";
        // SAFETY: template is a writable NUL-terminated buffer as mkdtemp requires.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        let root = PathBuf::from(
            std::str::from_utf8(&template[..template.len() - 1]).map_err(io::Error::other)?,
        );
        let c_root = CString::new(root.as_os_str().as_bytes())?;
        let fstype = CString::new("bpf")?;
        // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                c_root.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&root);
            return Err(e);
        }
        std::fs::create_dir_all(root.join("tc/globals"))?;
        Ok(BpffsMount { root })
    }

    pub fn globals(&self) -> PathBuf {
        self.root.join("tc/globals")
    }

    pub fn root_str(&self) -> &str {
        self.root.to_str().unwrap_or_default()
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if let Ok(c_root) = CString::new(self.root.as_os_str().as_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c_root.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The shape Cilium gives one of its maps.
#[derive(Clone, Copy, Debug)]
pub struct MapShape {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// Cilium's ipcache for `layout` (name, size and flags as the agent creates it).
pub fn ipcache_shape(layout: Layout) -> MapShape {
    MapShape {
        name: layout.ipcache_map_name(),
        map_type: BPF_MAP_TYPE_LPM_TRIE,
        key_size: 24,
        value_size: layout.ipcache_value_size(),
        max_entries: 512_000,
        flags: if layout >= Layout::V1_19 {
            BPF_F_NO_PREALLOC | BPF_F_RDONLY_PROG
        } else {
            BPF_F_NO_PREALLOC
        },
    }
}

/// Cilium's endpoint map; `prealloc` follows the agent's `preallocate-bpf-maps`.
pub fn endpoints_shape(layout: Layout, prealloc: bool) -> MapShape {
    let mut flags = if prealloc { 0 } else { BPF_F_NO_PREALLOC };
    if layout >= Layout::V1_20 {
        flags |= BPF_F_RDONLY_PROG;
    }
    MapShape {
        name: "cilium_lxc",
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 20,
        value_size: 48,
        max_entries: 65_535,
        flags,
    }
}

pub fn tunnel_shape() -> MapShape {
    MapShape {
        name: "cilium_tunnel_map",
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 20,
        value_size: 20,
        max_entries: 65_536,
        flags: BPF_F_NO_PREALLOC,
    }
}

/// A map created and pinned by the test, holding a read-write fd (as Cilium's agent does).
pub struct WriterMap {
    pub fd: OwnedFd,
    pub shape: MapShape,
    pub path: PathBuf,
}

impl WriterMap {
    /// Creates a map of `shape` and pins it at `<dir>/<name>`.
    pub fn create(dir: &Path, shape: MapShape) -> io::Result<WriterMap> {
        let mut name = [0u8; 16];
        let n = shape.name.len().min(15);
        name[..n].copy_from_slice(&shape.name.as_bytes()[..n]);
        let mut attr = MapCreateAttr {
            map_type: shape.map_type,
            key_size: shape.key_size,
            value_size: shape.value_size,
            max_entries: shape.max_entries,
            map_flags: shape.flags,
            map_name: name,
            ..MapCreateAttr::default()
        };
        // SAFETY: MAP_CREATE reads only the plain fields of attr.
        let fd = unsafe { sys::bpf(sys::BPF_MAP_CREATE, &mut attr)? };
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let path = dir.join(shape.name);
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        let mut pin = ObjAttr {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        };
        // SAFETY: pathname is a valid NUL-terminated string for the call's duration.
        unsafe { sys::bpf(sys::BPF_OBJ_PIN, &mut pin)? };
        Ok(WriterMap { fd, shape, path })
    }

    /// What Cilium does when it re-creates a map (restart with a changed size, upgrade): a new
    /// map of the same shape pinned under the same path, holding the old map's entries.
    pub fn recreate(&mut self) -> anyhow::Result<()> {
        let old = kvcheck::datapath::maps::PinnedMap::open(self.shape.name, &self.path)?;
        let entries = old.read_all(kvcheck::datapath::maps::ReadStrategy::default())?;
        std::fs::remove_file(&self.path)?;
        let dir = self.path.parent().map(Path::to_owned).unwrap_or_default();
        let new = WriterMap::create(&dir, self.shape)?;
        for (k, v) in entries.iter() {
            new.update(k, v)?;
        }
        *self = new;
        Ok(())
    }

    fn check(&self, key: &[u8], value: Option<&[u8]>) {
        assert_eq!(key.len(), self.shape.key_size as usize, "{} key size", self.shape.name);
        if let Some(v) = value {
            assert_eq!(v.len(), self.shape.value_size as usize, "{} value size", self.shape.name);
        }
    }

    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.check(key, Some(value));
        self.update_unchecked(key, value)
    }

    /// Writes raw bytes of any length (for tests that provoke kernel errors).
    pub fn update_unchecked(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_ptr() as u64,
            ..ElemAttr::default()
        };
        // SAFETY: the kernel copies key_size/value_size bytes; callers pass at least that many.
        unsafe { sys::bpf(sys::BPF_MAP_UPDATE_ELEM, &mut attr)? };
        Ok(())
    }

    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        self.check(key, None);
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            ..ElemAttr::default()
        };
        // SAFETY: key has the map's key size.
        unsafe { sys::bpf(sys::BPF_MAP_DELETE_ELEM, &mut attr)? };
        Ok(())
    }

    /// `BPF_MAP_UPDATE_BATCH` with flat key and value buffers.
    pub fn update_batch(&self, keys: &[u8], values: &[u8]) -> io::Result<u32> {
        let ks = self.shape.key_size as usize;
        let vs = self.shape.value_size as usize;
        assert_eq!(keys.len() % ks, 0);
        assert_eq!(keys.len() / ks, values.len() / vs);
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: (keys.len() / ks) as u32,
            map_fd: self.fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: buffers hold `count` keys and values of the map's sizes.
        unsafe { sys::bpf(sys::BPF_MAP_UPDATE_BATCH, &mut attr)? };
        Ok(attr.count)
    }

    /// `BPF_MAP_DELETE_BATCH`.
    pub fn delete_batch(&self, keys: &[u8]) -> io::Result<u32> {
        let ks = self.shape.key_size as usize;
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            count: (keys.len() / ks) as u32,
            map_fd: self.fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: keys holds `count` keys of the map's key size.
        unsafe { sys::bpf(sys::BPF_MAP_DELETE_BATCH, &mut attr)? };
        Ok(attr.count)
    }

    /// Fills the map with many entries in batches of `batch` (fast setup for big maps).
    pub fn fill(&self, entries: impl Iterator<Item = (Vec<u8>, Vec<u8>)>, batch: usize) -> io::Result<()> {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        let mut n = 0;
        for (k, v) in entries {
            keys.extend_from_slice(&k);
            values.extend_from_slice(&v);
            n += 1;
            if n == batch {
                self.update_batch(&keys, &values)?;
                keys.clear();
                values.clear();
                n = 0;
            }
        }
        if n > 0 {
            self.update_batch(&keys, &values)?;
        }
        Ok(())
    }
}

/// The maps of one simulated node, in one private bpffs.
pub struct CiliumMaps {
    pub ipcache: WriterMap,
    pub endpoints: WriterMap,
    pub tunnel: Option<WriterMap>,
}

impl CiliumMaps {
    /// Creates the maps Cilium's agent of `layout` creates (the tunnel map up to v1.17).
    pub fn create(bpffs: &BpffsMount, layout: Layout) -> io::Result<CiliumMaps> {
        let dir = bpffs.globals();
        Ok(CiliumMaps {
            ipcache: WriterMap::create(&dir, ipcache_shape(layout))?,
            endpoints: WriterMap::create(&dir, endpoints_shape(layout, true))?,
            tunnel: if layout.has_tunnel_map() {
                Some(WriterMap::create(&dir, tunnel_shape())?)
            } else {
                None
            },
        })
    }
}
