//! Reports updates and deletes that userspace makes to watched BPF maps through the bpf()
//! syscall (which is how Cilium's agent writes its ipcache and endpoint map).
//!
//! Two tracepoints (fentry on the map-update path is refused on some kernels):
//! `syscalls/sys_enter_bpf` resolves the map fd to the map id by walking the task's file table
//! with member offsets userspace reads from /sys/kernel/btf/vmlinux and sets as globals, and
//! remembers calls on maps whose id is in `WATCHED` by thread; `syscalls/sys_exit_bpf` emits the
//! event once the kernel has applied (or refused) the change, with the syscall's result. A
//! userspace read triggered by the event can therefore never see the map before the write: at
//! `sys_enter_bpf` the update has not happened yet, and a confirmation read could win the race.
//!
//! What an unrelated bpf() call pays, by step (measured 2026-12-03 on an AMD EPYC VM whose
//! kernel returns through the SRSO "safe RET" thunk, so every helper call is dear; the enter
//! program cut short at each step, median of 7 × 1,000,000 updates, beyond empty programs):
//! the command filter +28 ns; the `bpf_probe_read_user` of the map fd +146 ns; the file-table
//! walk through BTF pointers +12 ns; the three `bpf_probe_read_kernel` (fd array slot,
//! `file->private_data`, `map->id`) +118 ns. The user read and the probe reads are the cost.
//! Both go with a hook after the kernel copied the attributes and resolved the fd (fentry on
//! `bpf_map_update_value`, which gets the `struct bpf_map *`; `security_bpf`, which gets the
//! kernel copy of `union bpf_attr`), or with `bpf_rdonly_cast` (a kfunc the verifier inlines)
//! turning the three probe reads into plain loads; aya 0.14 loads neither kfunc calls nor a
//! fallback by itself, so both are left for later.

#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user};
use aya_ebpf::macros::{map, tracepoint};
use core::cell::UnsafeCell;

use aya_ebpf::maps::{LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::TracePointContext;
use aya_ebpf::EbpfContext as _;

/// Largest key copied (Cilium's ipcache key is 24 bytes, endpoint and tunnel keys 20).
pub const KEY_MAX: usize = 32;
/// Keys copied per batch command (one event each); larger batches set `truncated`.
pub const BATCH_MAX: u32 = 128;
/// Maps watched at most (Cilium's ipcache, endpoint and tunnel maps, and the ipcache maps its
/// live programs use).
pub const WATCH_MAX: usize = 16;

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
    /// The syscall's result: 0 done, negative errno refused (batches may be partly done).
    pub ret: i32,
    pub _pad: u32,
    pub key: [u8; KEY_MAX],
}

/// A bpf() call on a watched map, between its enter and its exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    pub map_id: u32,
    pub key_size: u32,
    pub cmd: u64,
    pub uattr: u64,
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

/// Watched map ids, from the front (0: no more), and their key sizes; set by userspace before
/// load. A few compares instead of a hash lookup: every unwatched bpf() call pays for this.
#[unsafe(no_mangle)]
static WATCHED_IDS: [u32; WATCH_MAX] = [0; WATCH_MAX];
#[unsafe(no_mangle)]
static WATCHED_KEY_SIZES: [u32; WATCH_MAX] = [0; WATCH_MAX];

/// Entries in `PENDING`: while none is, `sys_exit_bpf` returns without a lookup.
static IN_FLIGHT: Counter = Counter(UnsafeCell::new(0));

/// A u64 other CPUs update too. The BPF target has no atomic read-modify-write in `core`; the
/// instruction (`BPF_ATOMIC | BPF_ADD`, the old XADD) is written out.
#[repr(transparent)]
struct Counter(UnsafeCell<u64>);

// SAFETY: every write is an atomic add; reads are single aligned loads.
unsafe impl Sync for Counter {}

impl Counter {
    #[inline(always)]
    fn add(&self, v: i64) {
        // SAFETY: an aligned u64 in the program's .bss map, added to atomically.
        unsafe { core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) self.0.get(), v = in(reg) v) };
    }

    #[inline(always)]
    fn get(&self) -> u64 {
        // SAFETY: as above; volatile so the load is not hoisted or folded.
        unsafe { core::ptr::read_volatile(self.0.get()) }
    }
}

const BPF_NOEXIST: u64 = 1;

/// Calls in flight, by thread (pid_tgid). LRU: an entry whose exit never came (a killed task)
/// is evicted instead of filling the map.
#[map]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(4096, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events dropped because the ring buffer was full: userspace re-reads the maps when it grows.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn global(v: &'static u64) -> u64 {
    // SAFETY: read through a volatile pointer so the loader-set value is not constant-folded.
    unsafe { core::ptr::read_volatile(v) }
}

/// The key size of a watched map.
#[inline(always)]
fn watched_key_size(map_id: u32) -> Option<u32> {
    let mut i = 0;
    while i < WATCH_MAX {
        // SAFETY: i < WATCH_MAX; volatile so the loader-set values are not constant-folded.
        let id = unsafe { core::ptr::read_volatile(WATCHED_IDS.as_ptr().add(i)) };
        if id == 0 {
            return None;
        }
        if id == map_id {
            // SAFETY: as above.
            return Some(unsafe { core::ptr::read_volatile(WATCHED_KEY_SIZES.as_ptr().add(i)) });
        }
        i += 1;
    }
    None
}

/// A u64 of the tracepoint's record, read directly (the verifier allows aligned loads from a
/// tracepoint's context; a helper call per argument costs every bpf() call).
#[inline(always)]
fn arg(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: `off` is an aligned field offset from the tracepoint's format file.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(off).cast::<u64>()) }
}

#[inline(always)]
fn read_kernel<T>(base: u64, off: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + off) as *const T).ok() }
}

/// The file table of the current task, `(max_fds, fd array)`, through BTF-typed pointers:
/// `bpf_get_current_task_btf` (Linux 5.11+) lets the program load `task->files->fdt` directly,
/// where `bpf_get_current_task` needs a helper call per step.
#[inline(always)]
fn fd_table_btf() -> Option<(u32, u64)> {
    // SAFETY: the helper returns the current task as a BTF pointer; the verifier checks every
    // load through it against the kernel's BTF and the JIT turns a fault into a zero.
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let files: *const u8 = load(task, global(&OFF_TASK_FILES));
        if files.is_null() {
            return None;
        }
        let fdt: *const u8 = load(files, global(&OFF_FILES_FDT));
        if fdt.is_null() {
            return None;
        }
        Some((load(fdt, global(&OFF_FDT_MAX_FDS)), load(fdt, global(&OFF_FDT_FD))))
    }
}

/// [`fd_table_btf`] for kernels before 5.11: every step a `bpf_probe_read_kernel`.
#[inline(always)]
fn fd_table_probed() -> Option<(u32, u64)> {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, global(&OFF_TASK_FILES))?;
    let fdt: u64 = read_kernel(files, global(&OFF_FILES_FDT))?;
    // `struct fdtable` starts `unsigned int max_fds; struct file **fd;`: one read for both.
    if global(&OFF_FDT_FD) == global(&OFF_FDT_MAX_FDS) + 8 {
        let both: [u64; 2] = read_kernel(fdt, global(&OFF_FDT_MAX_FDS))?;
        return Some((both[0] as u32, both[1]));
    }
    Some((read_kernel::<u32>(fdt, global(&OFF_FDT_MAX_FDS))?, read_kernel::<u64>(fdt, global(&OFF_FDT_FD))?))
}

/// A field of a BTF-typed kernel object at `off`.
#[inline(always)]
unsafe fn load<T>(base: *const u8, off: u64) -> T {
    // SAFETY: the caller's pointer is BTF-typed; see fd_table_btf.
    unsafe { core::ptr::read_volatile(base.add(off as usize).cast::<T>()) }
}

/// The id of the BPF map behind `fd` in the file table `(max_fds, fd array)`, if `fd` is one.
/// (`fd[fd]` and `file->private_data` are untyped for the verifier: probe reads.)
#[inline(always)]
fn map_id_of_fd((max_fds, fd_array): (u32, u64), fd: u32) -> Option<u32> {
    if fd >= max_fds {
        return None;
    }
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
fn emit(map_id: u32, cmd: u32, key_size: u32, key_ptr: u64, truncated: u32, ret: i32) {
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
            unsafe { *lost += 1 };
        }
        return;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: the slot is ours until submit/discard; we write every field before submitting.
    unsafe {
        (*ev).map_id = map_id;
        (*ev).cmd = cmd;
        (*ev).key_size = key_size;
        (*ev).truncated = truncated;
        (*ev).ret = ret;
        (*ev)._pad = 0;
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

fn is_batch(cmd: u64) -> Option<bool> {
    match cmd {
        BPF_MAP_UPDATE_ELEM | BPF_MAP_DELETE_ELEM | BPF_MAP_LOOKUP_AND_DELETE_ELEM => Some(false),
        BPF_MAP_UPDATE_BATCH | BPF_MAP_DELETE_BATCH | BPF_MAP_LOOKUP_AND_DELETE_BATCH => Some(true),
        _ => None,
    }
}

#[tracepoint]
pub fn sys_enter_bpf(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_bpf(&ctx, fd_table_btf);
    0
}

/// `sys_enter_bpf` for kernels without `bpf_get_current_task_btf` (userspace loads it when the
/// verifier refuses the other).
#[tracepoint]
pub fn sys_enter_bpf_probed(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_bpf(&ctx, fd_table_probed);
    0
}

#[inline(always)]
fn try_sys_enter_bpf(ctx: &TracePointContext, fd_table: fn() -> Option<(u32, u64)>) -> Option<()> {
    // Offsets from the tracepoint's format file (cmd at 16, uattr at 24).
    let cmd = arg(ctx, 16);
    let batch = is_batch(cmd)?;
    let uattr = arg(ctx, 24);
    // ELEM commands: map_fd u32 @0. BATCH: map_fd u32 @36.
    let fd_off = if batch { 36 } else { 0 };
    // SAFETY: bpf_probe_read_user fails instead of faulting on a bad user pointer.
    let fd: u32 = unsafe { bpf_probe_read_user((uattr + fd_off) as *const u32).ok()? };
    let map_id = map_id_of_fd(fd_table()?, fd)?;
    let key_size = watched_key_size(map_id)?;
    let pending = Pending { map_id, key_size, cmd, uattr };
    let tid = bpf_get_current_pid_tgid();
    if PENDING.insert(&tid, &pending, BPF_NOEXIST).is_ok() {
        IN_FLIGHT.add(1);
        return Some(());
    }
    // A left-over entry of this thread (counted when it was added): replace it.
    PENDING.insert(&tid, &pending, 0).ok()
}

#[tracepoint]
pub fn sys_exit_bpf(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_bpf(&ctx);
    0
}

fn try_sys_exit_bpf(ctx: &TracePointContext) -> Option<()> {
    // Almost every bpf() call is on a map nobody watches: nothing pending, no lookup. A thread
    // that entered a watched call counted itself before its exit can run.
    if IN_FLIGHT.get() == 0 {
        return None;
    }
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: a lookup in our own map; the value is copied out before the entry is removed.
    let p = unsafe { *PENDING.get(&tid)? };
    if PENDING.remove(&tid).is_ok() {
        IN_FLIGHT.add(-1);
    }
    // Offsets from the tracepoint's format file (ret at 16).
    let ret = arg(ctx, 16) as i64 as i32;
    let (cmd, uattr) = (p.cmd as u32, p.uattr);
    if is_batch(p.cmd) != Some(true) {
        // ELEM commands: key ptr @8. Still the caller's memory: the syscall has not returned.
        // SAFETY: bpf_probe_read_user fails instead of faulting.
        let key: u64 = unsafe { bpf_probe_read_user((uattr + 8) as *const u64).ok()? };
        emit(p.map_id, cmd, p.key_size, key, 0, ret);
        return Some(());
    }
    // BATCH: keys @16, count u32 @32, which the kernel has set to the number of keys processed
    // (for LOOKUP_AND_DELETE_BATCH the keys buffer is only filled now).
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
        emit(p.map_id, cmd, p.key_size, keys + u64::from(i) * u64::from(p.key_size), truncated, ret);
        i += 1;
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
