//! Reports updates and deletes that userspace makes to watched BPF maps through the bpf()
//! syscall (which is how Cilium's agent writes its ipcache and endpoint map).
//!
//! Attached to the `syscalls/sys_enter_bpf` tracepoint (fentry on the map-update path is refused
//! on some kernels). The map fd is resolved to the map id by walking the task's file table with
//! member offsets userspace reads from /sys/kernel/btf/vmlinux and sets as globals; only maps
//! whose id is in `WATCHED` produce events. The event fires before the kernel validates the
//! update, so userspace re-reads the key from the map to learn what really happened.

#![no_std]
#![no_main]

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{HashMap, RingBuf};
use aya_ebpf::programs::TracePointContext;

/// Largest key copied (Cilium's ipcache key is 24 bytes, endpoint and tunnel keys 20).
pub const KEY_MAX: usize = 32;
/// Keys copied per batch command (one event each); larger batches set `truncated`.
pub const BATCH_MAX: u32 = 128;

const BPF_MAP_UPDATE_ELEM: u64 = 2;
const BPF_MAP_DELETE_ELEM: u64 = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: u64 = 21;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: u64 = 25;
const BPF_MAP_UPDATE_BATCH: u64 = 26;
const BPF_MAP_DELETE_BATCH: u64 = 27;

/// Event layout shared with userspace (agent/src/datapath/events.rs).
#[repr(C)]
pub struct Event {
    pub map_id: u32,
    pub cmd: u32,
    pub key_size: u32,
    /// 1 when a batch had more than BATCH_MAX keys: userspace re-reads the whole map.
    pub truncated: u32,
    pub key: [u8; KEY_MAX],
}

// Member offsets in bytes, from BTF (set by userspace before load).
#[unsafe(no_mangle)]
static OFF_TASK_FILES: u64 = 0;
#[unsafe(no_mangle)]
static OFF_FILES_FDT: u64 = 0;
#[unsafe(no_mangle)]
static OFF_FDT_MAX_FDS: u64 = 0;
#[unsafe(no_mangle)]
static OFF_FDT_FD: u64 = 0;
#[unsafe(no_mangle)]
static OFF_FILE_PRIVATE_DATA: u64 = 0;
#[unsafe(no_mangle)]
static OFF_MAP_ID: u64 = 0;

/// Watched map id → key size.
#[map]
static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[inline(always)]
fn global(v: &'static u64) -> u64 {
    // SAFETY: read through a volatile pointer so the loader-set value is not constant-folded.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn read_kernel<T>(base: u64, off: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + off) as *const T).ok() }
}

/// The id of the BPF map behind `fd` in the current task, if `fd` is one.
#[inline(always)]
fn map_id_of_fd(fd: u32) -> Option<u32> {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, global(&OFF_TASK_FILES))?;
    let fdt: u64 = read_kernel(files, global(&OFF_FILES_FDT))?;
    let max_fds: u32 = read_kernel(fdt, global(&OFF_FDT_MAX_FDS))?;
    if fd >= max_fds {
        return None;
    }
    let fd_array: u64 = read_kernel(fdt, global(&OFF_FDT_FD))?;
    let file: u64 = read_kernel(fd_array, u64::from(fd) * 8)?;
    if file == 0 {
        return None;
    }
    let map: u64 = read_kernel(file, global(&OFF_FILE_PRIVATE_DATA))?;
    if map == 0 {
        return None;
    }
    read_kernel(map, global(&OFF_MAP_ID))
}

#[inline(always)]
fn emit(map_id: u32, cmd: u32, key_size: u32, key_ptr: u64, truncated: u32) {
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else { return };
    let ev = slot.as_mut_ptr();
    // SAFETY: the slot is ours until submit/discard; we write every field before submitting.
    unsafe {
        (*ev).map_id = map_id;
        (*ev).cmd = cmd;
        (*ev).key_size = key_size;
        (*ev).truncated = truncated;
        (*ev).key = [0; KEY_MAX];
        let n = (key_size as usize) & (KEY_MAX - 1);
        if key_ptr != 0 && n > 0 {
            let dst = (*ev).key.as_mut_ptr();
            if aya_ebpf::helpers::generated::bpf_probe_read_user(dst.cast(), n as u32, key_ptr as *const _) < 0 {
                (*ev).truncated = 1;
            }
        }
    }
    slot.submit(0);
}

#[tracepoint]
pub fn sys_enter_bpf(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_bpf(&ctx);
    0
}

fn try_sys_enter_bpf(ctx: &TracePointContext) -> Option<()> {
    // SAFETY: offsets from the tracepoint's format file (cmd at 16, uattr at 24).
    let cmd: u64 = unsafe { ctx.read_at(16).ok()? };
    let batch = match cmd {
        BPF_MAP_UPDATE_ELEM | BPF_MAP_DELETE_ELEM | BPF_MAP_LOOKUP_AND_DELETE_ELEM => false,
        BPF_MAP_UPDATE_BATCH | BPF_MAP_DELETE_BATCH | BPF_MAP_LOOKUP_AND_DELETE_BATCH => true,
        _ => return None,
    };
    // SAFETY: as above.
    let uattr: u64 = unsafe { ctx.read_at(24).ok()? };
    // ELEM commands: map_fd u32 @0, key ptr @8. BATCH: keys @16, count u32 @32, map_fd u32 @36.
    let fd_off = if batch { 36 } else { 0 };
    // SAFETY: bpf_probe_read_user fails instead of faulting on a bad user pointer.
    let fd: u32 = unsafe { bpf_probe_read_user((uattr + fd_off) as *const u32).ok()? };
    let map_id = map_id_of_fd(fd)?;
    // SAFETY: a lookup in our own map.
    let key_size = unsafe { *WATCHED.get(&map_id)? };
    if !batch {
        // SAFETY: as above.
        let key: u64 = unsafe { bpf_probe_read_user((uattr + 8) as *const u64).ok()? };
        emit(map_id, cmd as u32, key_size, key, 0);
        return Some(());
    }
    // SAFETY: as above.
    let keys: u64 = unsafe { bpf_probe_read_user((uattr + 16) as *const u64).ok()? };
    // SAFETY: as above.
    let count: u32 = unsafe { bpf_probe_read_user((uattr + 32) as *const u32).ok()? };
    let truncated = u32::from(count > BATCH_MAX);
    let mut i = 0u32;
    while i < BATCH_MAX {
        if i >= count {
            break;
        }
        emit(map_id, cmd as u32, key_size, keys + u64::from(i) * u64::from(key_size), truncated);
        i += 1;
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
