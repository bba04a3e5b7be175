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
