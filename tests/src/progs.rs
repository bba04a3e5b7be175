//! Small real BPF programs for the live-map tests, assembled here (a few instructions each) and
//! attached the ways Cilium attaches its own: tcx links and classic tc `bpf` filters, with tail
//! calls through a prog array. Each program references a map the way Cilium's do (a map lookup),
//! so the kernel lists that map among the program's maps.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use crate::maps::{MapShape, WriterMap};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | u64::from(dst & 0xf) << 8 | u64::from(src & 0xf) << 12 | u64::from(off as u16) << 16 | u64::from(imm as u32) << 32
}

/// `ld_imm64 dst, map` (BPF_PSEUDO_MAP_FD): two instruction slots.
fn ld_map(dst: u8, map: BorrowedFd<'_>) -> [u64; 2] {
    [insn(0x18, dst, 1, 0, map.as_raw_fd()), 0]
}

fn syscall(cmd: libc::c_long, attr: &mut [u8], what: &str) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded buffer of the kernel's layout for `cmd`; the pointers in it
    // are valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    // SAFETY: a fresh fd the kernel returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load(name: &str, insns: &[u64]) -> io::Result<OwnedFd> {
    load_typed(BPF_PROG_TYPE_SCHED_CLS, name, insns)
}

fn load_typed(prog_type: u32, name: &str, insns: &[u64]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 65_536];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes()); // log_level
    attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    syscall(BPF_PROG_LOAD, &mut attr, "loading a test classifier").map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(0);
        io::Error::new(e.kind(), format!("{e}; verifier: {}", String::from_utf8_lossy(&log[..end])))
    })
}

/// A classifier that looks up a zero key of `key_size` bytes (≤ 32) in `map`, then passes.
pub fn classifier_using(name: &str, map: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    load(name, &lookup_then_return(map, 0))
}

/// An XDP program (Cilium's NodePort acceleration) that looks up `map`, then passes.
pub fn xdp_using(name: &str, map: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    load_typed(BPF_PROG_TYPE_XDP, name, &lookup_then_return(map, 2)) // XDP_PASS
}

/// Looks up a zero key in `map`, then returns `verdict`.
fn lookup_then_return(map: BorrowedFd<'_>, verdict: i32) -> Vec<u64> {
    let mut p = Vec::new();
    for off in [-8i16, -16, -24, -32] {
        p.push(insn(0x7a, 10, 0, off, 0)); // *(u64 *)(r10 + off) = 0
    }
    p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
    p.push(insn(0x07, 2, 0, 0, -32)); // r2 += -32
    p.extend(ld_map(1, map)); // r1 = map
    p.push(insn(0x85, 0, 0, 0, 1)); // call bpf_map_lookup_elem
    p.push(insn(0xb7, 0, 0, 0, verdict)); // r0 = verdict
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    p
}

/// A classifier that tail-calls slot 0 of `prog_array`, then passes.
pub fn tail_caller(name: &str, prog_array: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut p = Vec::new();
    p.extend(ld_map(2, prog_array)); // r2 = prog array (r1 is still the context)
    p.push(insn(0xb7, 3, 0, 0, 0)); // r3 = 0
    p.push(insn(0x85, 0, 0, 0, 12)); // call bpf_tail_call
    p.push(insn(0xb7, 0, 0, 0, 0)); // r0 = 0
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    load(name, &p)
}

/// A prog array pinned as `<dir>/<name>` holding `prog` at slot 0 (like `cilium_calls_*`).
pub fn prog_array(dir: &Path, name: &'static str, prog: BorrowedFd<'_>) -> io::Result<WriterMap> {
    let map = WriterMap::create(dir, MapShape { name, map_type: BPF_MAP_TYPE_PROG_ARRAY, key_size: 4, value_size: 4, max_entries: 4, flags: 0 })?;
    map.update(&0u32.to_ne_bytes(), &(prog.as_raw_fd() as u32).to_ne_bytes())?;
    Ok(map)
}

/// Pins a program (for `tc ... bpf pinned PATH`).
pub fn pin(prog: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: pathname is NUL-terminated and outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A tcx link of `prog` on interface `dev` of network namespace `netns` (detached when dropped).
pub fn attach_tcx(netns: &str, dev: &str, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let prog_fd = prog.as_raw_fd();
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    let dev = CString::new(dev)?;
    // The ifindex is resolved in the calling thread's namespace: do it on a thread inside it.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this helper thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            let mut attr = [0u8; 64];
            attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
            attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
            attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
            syscall(BPF_LINK_CREATE, &mut attr, "creating a tcx link")
        })
        .join()
        .map_err(|_| io::Error::other("tcx attach thread panicked"))?
    })
}

/// Attaches the pinned XDP program at `pinned` to `dev` in generic mode, with iproute2.
pub fn attach_xdp(netns: &str, dev: &str, pinned: &Path) -> anyhow::Result<()> {
    let out = Command::new("ip").args(["netns", "exec", netns, "ip", "link", "set", "dev", dev, "xdpgeneric", "pinned"]).arg(pinned).output()?;
    anyhow::ensure!(out.status.success(), "ip link set {dev} xdpgeneric: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Attaches the pinned program at `pinned` as a classic tc `bpf` filter (direct action) on
/// `dev`'s ingress or egress (`hook`), with iproute2's tc, as Cilium before tcx does.
pub fn attach_tc(netns: &str, dev: &str, hook: &str, pinned: &Path) -> anyhow::Result<()> {
    let tc = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("ip").args(["netns", "exec", netns, "tc"]).args(args).output()?;
        anyhow::ensure!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    // The clsact qdisc may already be there from another filter.
    let _ = tc(&["qdisc", "add", "dev", dev, "clsact"]);
    tc(&["filter", "add", "dev", dev, hook, "bpf", "direct-action", "pinned", &pinned.display().to_string()])
}
