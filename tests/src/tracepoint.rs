//! An empty BPF program (`r0 = 0; exit`) attached to a tracepoint with raw syscalls: the floor
//! the change-event program's overhead is measured against (what any program at that hook
//! costs, before it does anything).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, AsRawFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// An attached empty program; detached when dropped.
pub struct EmptyTracepoint {
    _event: OwnedFd,
    _prog: OwnedFd,
}

fn check(ret: libc::c_long, what: &str) -> io::Result<i32> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret as i32)
}

impl EmptyTracepoint {
    /// Attaches to `category/name` (e.g. `syscalls`, `sys_enter_bpf`).
    pub fn attach(category: &str, name: &str) -> io::Result<EmptyTracepoint> {
        // mov r0, 0; exit
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_TRACEPOINT.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: a bpf() call with a zeroed attr of the kernel's layout and valid pointers.
        let prog = check(unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) }, "loading the empty program")?;
        // SAFETY: a new fd the kernel just returned.
        let prog = unsafe { OwnedFd::from_raw_fd(prog) };
        let id: u64 = std::fs::read_to_string(format!("/sys/kernel/tracing/events/{category}/{name}/id"))?
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("tracepoint id: {e}")))?;
        let mut pattr = [0u8; 128];
        pattr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
        pattr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        pattr[8..16].copy_from_slice(&id.to_ne_bytes());
        pattr[16..24].copy_from_slice(&1u64.to_ne_bytes()); // sample_period
        // SAFETY: perf_event_open with a zeroed perf_event_attr of size 128.
        let event = check(unsafe { libc::syscall(libc::SYS_perf_event_open, pattr.as_ptr(), -1, 0, -1, PERF_FLAG_FD_CLOEXEC) }, "perf_event_open")?;
        // SAFETY: as above.
        let event = unsafe { OwnedFd::from_raw_fd(event as i32) };
        // SAFETY: ioctls on the perf event fd we own.
        check(unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) }.into(), "PERF_EVENT_IOC_SET_BPF")?;
        // SAFETY: as above.
        check(unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) }.into(), "PERF_EVENT_IOC_ENABLE")?;
        Ok(EmptyTracepoint { _event: event, _prog: prog })
    }
}
