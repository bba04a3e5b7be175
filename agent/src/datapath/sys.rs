//! The few raw `bpf()` calls aya does not offer: opening a pin read-only and batch lookups.
//!
//! Everything here only reads. Attribute structs mirror the matching anonymous structs of
//! `union bpf_attr` in `include/uapi/linux/bpf.h`; the kernel zero-fills the rest of the
//! union when we pass a shorter size.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const BPF_MAP_LOOKUP_ELEM: u32 = 1;
pub const BPF_MAP_UPDATE_ELEM: u32 = 2;
pub const BPF_MAP_DELETE_ELEM: u32 = 3;
pub const BPF_MAP_GET_NEXT_KEY: u32 = 4;
pub const BPF_OBJ_PIN: u32 = 6;
pub const BPF_OBJ_GET: u32 = 7;
pub const BPF_MAP_LOOKUP_BATCH: u32 = 24;
pub const BPF_MAP_UPDATE_BATCH: u32 = 26;
pub const BPF_MAP_DELETE_BATCH: u32 = 27;
pub const BPF_MAP_CREATE: u32 = 0;

/// `file_flags` for `BPF_OBJ_GET`: the returned fd can look up but not update or delete.
pub const BPF_F_RDONLY: u32 = 1 << 3;

/// `BPF_MAP_*_ELEM` attributes.
#[repr(C)]
#[derive(Default)]
pub struct ElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value_or_next_key: u64,
    pub flags: u64,
}

/// `BPF_MAP_*_BATCH` attributes.
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// `BPF_OBJ_PIN` / `BPF_OBJ_GET` attributes.
#[repr(C)]
#[derive(Default)]
pub struct ObjAttr {
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
}

/// `BPF_MAP_CREATE` attributes (the fields up to `map_name`, which is all we set).
#[repr(C)]
#[derive(Default)]
pub struct MapCreateAttr {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub inner_map_fd: u32,
    pub numa_node: u32,
    pub map_name: [u8; 16],
}

/// Issues one `bpf()` syscall. The attribute must be one of the structs above, matching `cmd`.
///
/// # Safety
/// The pointers stored inside `attr` must be valid for the access `cmd` makes through them.
pub unsafe fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a live, properly sized repr(C) struct; the caller vouches for the
    // pointers inside it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            libc::c_long::from(cmd as i32),
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_long,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned BPF object with `BPF_OBJ_GET`, read-only (`BPF_F_RDONLY`).
pub fn obj_get_readonly(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
    };
    // SAFETY: pathname points at a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: BPF_OBJ_GET returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Outcome of one `BPF_MAP_LOOKUP_BATCH` call.
pub enum BatchStep {
    /// `n` entries were copied and more may follow from the returned cursor.
    More(u32),
    /// `n` entries were copied and the map has no more.
    Done(u32),
}

/// One `BPF_MAP_LOOKUP_BATCH` call. `cursor` is opaque kernel state (at least the key size);
/// `first` says whether this is the first call of the walk (no `in_batch`).
pub fn lookup_batch(
    map: BorrowedFd<'_>,
    first: bool,
    cursor: &mut [u8],
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> io::Result<BatchStep> {
    let mut attr = BatchAttr {
        in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
        out_batch: cursor.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // in_batch and out_batch may be the same buffer: the kernel reads in_batch before it
    // writes out_batch.
    // SAFETY: keys/values hold `count` entries of the map's key/value size (checked by the
    // caller), cursor holds at least one key.
    match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
        Ok(_) => Ok(BatchStep::More(attr.count)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(BatchStep::Done(attr.count)),
        Err(e) => Err(e),
    }
}

/// True when an error means "this kernel or map type does not do batch lookups".
pub fn is_unsupported(err: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524; // kernel-internal, leaks to userspace for some map types
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// `BPF_MAP_LOOKUP_ELEM`: the value for `key` (for an LPM trie: of the longest prefix matching
/// it). `Ok(false)` when there is none.
pub fn lookup_elem(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value_or_next_key: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: key and value are the map's key and value sizes (checked by the caller).
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Entries in a map, by key iteration (no values copied); `calls` counts the bpf() calls.
pub fn count_keys(map: BorrowedFd<'_>, key_size: u32, calls: &mut u64) -> io::Result<usize> {
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0;
    loop {
        *calls += 1;
        if !get_next_key(map, key.as_deref(), &mut next)? {
            return Ok(n);
        }
        n += 1;
        key = Some(next.clone());
    }
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first key when `None`). `Ok(false)` at the end.
pub fn get_next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value_or_next_key: next.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: key and next are the map's key size (checked by the caller).
    match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub const BPF_PROG_GET_FD_BY_ID: u32 = 13;
pub const BPF_MAP_GET_FD_BY_ID: u32 = 14;
pub const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
pub const BPF_PROG_QUERY: u32 = 16;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;

/// `BPF_*_GET_FD_BY_ID` attributes.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` attributes.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `BPF_PROG_QUERY` attributes (the kernel's `query` struct).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// A program's fd by its id (needs CAP_SYS_ADMIN).
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, ..Default::default() };
    // SAFETY: plain integers only.
    let fd = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)? };
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A map's fd by its id, read-only (needs CAP_SYS_ADMIN).
pub fn map_fd_by_id_readonly(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, next_id: 0, open_flags: BPF_F_RDONLY };
    // SAFETY: plain integers only.
    let fd = unsafe { bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)? };
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What kvcheck reads of a program: its name and the ids of the maps it uses.
#[derive(Clone, Debug)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

fn c_name(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a program (`struct bpf_prog_info`: id @4, nr_map_ids @52,
/// map_ids @56, name @64).
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut info = [0u8; 80];
        info[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        info[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        let mut attr = InfoAttr { bpf_fd: prog.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
        // SAFETY: info is a buffer of info_len bytes; map_ids points at `ids.len()` u32s.
        unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
        let n = u32::from_ne_bytes(info[52..56].try_into().unwrap_or_default()) as usize;
        if n > ids.len() {
            ids.resize(n, 0);
            continue;
        }
        ids.truncate(n);
        return Ok(ProgInfo { id: u32::from_ne_bytes(info[4..8].try_into().unwrap_or_default()), name: c_name(&info[64..80]), map_ids: ids });
    }
}

/// What kvcheck reads of a map: `struct bpf_map_info` (type @0, id @4, key/value size, max
/// entries, flags, name @24).
#[derive(Clone, Debug)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub name: String,
}

pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = [0u8; 40];
    let mut attr = InfoAttr { bpf_fd: map.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
    // SAFETY: info is a buffer of info_len bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    let u = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap_or_default());
    Ok(MapInfo { map_type: u(0), id: u(4), key_size: u(8), value_size: u(12), max_entries: u(16), name: c_name(&info[24..40]) })
}

/// `BPF_PROG_QUERY` of one attach point of interface `ifindex` (in this thread's network
/// namespace): the attached programs' ids. `Ok(empty)` when the kernel lacks the attach type.
pub fn prog_query_ifindex(ifindex: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr { target_ifindex: ifindex, attach_type, prog_ids: ids.as_mut_ptr() as u64, prog_cnt: ids.len() as u32, ..Default::default() };
    // SAFETY: prog_ids points at prog_cnt u32s.
    match unsafe { bpf(BPF_PROG_QUERY, &mut attr) } {
        Ok(_) => {
            ids.truncate(attr.prog_cnt as usize);
            Ok(ids)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
