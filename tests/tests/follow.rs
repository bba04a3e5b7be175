//! `kvcheck dump datapath --follow`: a Cilium-like writer changes maps in a private bpffs while
//! kvcheck follows, through the eBPF change events and through the polling fallback; every
//! change arrives decoded with the right map and key, failed updates and unwatched maps give
//! nothing, and both paths report the same changes. The write-to-report delay is printed.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, EndpointValue, IpcacheValue};
use kvcheck_tests::maps::{BpffsMount, CiliumMaps, MapShape, WriterMap, BPF_MAP_TYPE_HASH};
use kvcheck_tests::{kvcheck_bin, require_root};
use serde_json::Value;

const LAYOUT: Layout = Layout::V1_15;

struct Follower {
    child: Child,
    lines: mpsc::Receiver<Value>,
    source: String,
}

impl Follower {
    fn start(bpffs: &BpffsMount, ebpf: bool) -> Follower {
        Follower::start_with(bpffs, ebpf, &[])
    }

    fn start_with(bpffs: &BpffsMount, ebpf: bool, env: &[(&str, &str)]) -> Follower {
        let mut cmd = Command::new(kvcheck_bin());
        cmd.args(["dump", "datapath", "--bpffs", bpffs.root_str(), "--follow", "--output", "json", "--poll-interval", "50ms"]);
        if !ebpf {
            cmd.env("KVCHECK_NO_EBPF", "1");
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("kvcheck");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut source = String::new();
        for line in stderr.lines() {
            let line = line.unwrap();
            if line.contains("following changes via") {
                source = line;
                break;
            }
        }
        assert!(!source.is_empty(), "kvcheck exited before following");
        let (tx, rx) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let snapshot = rx.recv_timeout(Duration::from_secs(10)).expect("snapshot line");
        assert!(snapshot["ipcache"].is_object(), "first line is the snapshot");
        Follower { child, lines: rx, source }
    }

    /// Collects changes until `n` arrived (or the timeout).
    fn collect(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => out.push(v),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ipc_key(prefix: &str) -> Vec<u8> {
    encode::ipcache_key(LAYOUT, prefix.parse::<IpNet>().unwrap(), 0)
}

fn ipc_value(identity: u32) -> Vec<u8> {
    encode::ipcache_value(LAYOUT, IpcacheValue { identity, tunnel_endpoint: Some("192.168.50.11".parse().unwrap()), ..Default::default() })
}

fn lxc_key(ip: &str) -> Vec<u8> {
    encode::endpoint_key(ip.parse::<IpAddr>().unwrap())
}

fn lxc_value(id: u16, identity: u32) -> Vec<u8> {
    encode::endpoint_value(LAYOUT, EndpointValue { ifindex: u32::from(id), endpoint_id: id, identity, ..Default::default() })
}

type Summary = BTreeSet<(String, String, String)>;

fn summary(changes: &[Value]) -> Summary {
    changes
        .iter()
        .map(|c| (c["op"].as_str().unwrap().to_owned(), c["map"].as_str().unwrap().to_owned(), c["subject"].as_str().unwrap().to_owned()))
        .collect()
}

fn at(c: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(c["at"].as_str().unwrap()).unwrap().with_timezone(&chrono::Utc)
}

/// Runs the writer's steps against a follower; returns each step's changes and the delays.
fn run_steps(m: &CiliumMaps, other: &WriterMap, f: &Follower) -> (Vec<Summary>, Vec<Duration>) {
    let mut steps = Vec::new();
    let mut delays = Vec::new();
    let mut step = |expect: usize, write: &dyn Fn()| -> Vec<Value> {
        let t = chrono::Utc::now();
        write();
        let got = f.collect(expect, Duration::from_secs(10));
        for c in &got {
            delays.push((at(c) - t).to_std().unwrap_or_default());
        }
        steps.push(summary(&got));
        got
    };

    // 1. single adds
    let got = step(3, &|| {
        m.ipcache.update(&ipc_key("10.50.0.1/32"), &ipc_value(1000)).unwrap();
        m.ipcache.update(&ipc_key("fd00:50::1/128"), &ipc_value(1000)).unwrap();
        m.endpoints.update(&lxc_key("10.60.0.1"), &lxc_value(7, 1000)).unwrap();
    });
    let ipv4 = got.iter().find(|c| c["subject"] == "10.50.0.1/32").expect("10.50.0.1/32 added");
    assert_eq!((ipv4["op"].as_str(), ipv4["new"]["identity"].as_u64(), ipv4["new"]["tunnel_endpoint"].as_str()), (Some("added"), Some(1000), Some("192.168.50.11")));
    // 2. updates (old -> new)
    let got = step(2, &|| {
        m.ipcache.update(&ipc_key("10.50.0.1/32"), &ipc_value(1001)).unwrap();
        m.endpoints.update(&lxc_key("10.60.0.1"), &lxc_value(7, 1001)).unwrap();
    });
    let upd = got.iter().find(|c| c["map"] == "cilium_ipcache").expect("ipcache update");
    assert_eq!((upd["op"].as_str(), upd["old"]["identity"].as_u64(), upd["new"]["identity"].as_u64()), (Some("updated"), Some(1000), Some(1001)));
    // 3. deletes
    let got = step(2, &|| {
        m.ipcache.delete(&ipc_key("fd00:50::1/128")).unwrap();
        m.endpoints.delete(&lxc_key("10.60.0.1")).unwrap();
    });
    assert!(got.iter().all(|c| c["op"] == "removed" && c["new"].is_null() && c["old"].is_object()), "{got:?}");
    // 4. batched update of 100 ipcache entries, 5. batched delete
    let keys: Vec<u8> = (0..100).flat_map(|i| ipc_key(&format!("10.51.0.{i}/32"))).collect();
    let values: Vec<u8> = (0..100).flat_map(|_| ipc_value(1002)).collect();
    step(100, &|| {
        m.ipcache.update_batch(&keys, &values).unwrap();
    });
    step(100, &|| {
        m.ipcache.delete_batch(&keys).unwrap();
    });
    // 6. failed updates and an unwatched map: nothing, then a sentinel change arrives alone.
    step(1, &|| {
        let mut bad = ipc_key("10.50.0.7/32");
        bad[0] = 200; // prefix length beyond the trie's maximum: the kernel refuses it
        assert!(m.ipcache.update_unchecked(&bad, &ipc_value(1000)).is_err());
        assert!(m.endpoints.delete(&lxc_key("10.60.0.99")).is_err()); // no such key
        other.update(&[1, 2, 3, 4], &[5, 6, 7, 8]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        m.ipcache.update(&ipc_key("10.50.0.9/32"), &ipc_value(1000)).unwrap();
    });
    (steps, delays)
}

fn expected_steps() -> Vec<Summary> {
    let s = |items: &[(&str, &str, &str)]| -> Summary { items.iter().map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned())).collect() };
    let batch = |op: &str| -> Summary { (0..100).map(|i| (op.to_owned(), "cilium_ipcache".to_owned(), format!("10.51.0.{i}/32"))).collect() };
    vec![
        s(&[("added", "cilium_ipcache", "10.50.0.1/32"), ("added", "cilium_ipcache", "fd00:50::1/128"), ("added", "cilium_lxc", "10.60.0.1")]),
        s(&[("updated", "cilium_ipcache", "10.50.0.1/32"), ("updated", "cilium_lxc", "10.60.0.1")]),
        s(&[("removed", "cilium_ipcache", "fd00:50::1/128"), ("removed", "cilium_lxc", "10.60.0.1")]),
        batch("added"),
        batch("removed"),
        s(&[("added", "cilium_ipcache", "10.50.0.9/32")]),
    ]
}

fn percentile(d: &mut [Duration], p: f64) -> Duration {
    d.sort();
    d[((d.len() as f64 - 1.0) * p).round() as usize]
}

/// The eBPF program's two ways of resolving a map fd.
#[derive(Clone, Copy, PartialEq)]
enum Walk {
    BtfPointers,
    ProbeReads,
}

fn follow_case(ebpf: bool) -> Duration {
    follow_case_with(ebpf, Walk::BtfPointers)
}

fn follow_case_with(ebpf: bool, walk: Walk) -> Duration {
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, LAYOUT).unwrap();
    let other = WriterMap::create(&bpffs.globals(), MapShape { name: "cilium_other", map_type: BPF_MAP_TYPE_HASH, key_size: 4, value_size: 4, max_entries: 16, flags: 0 }).unwrap();
    let env: &[(&str, &str)] = if walk == Walk::ProbeReads { &[("KVCHECK_EBPF_PROBE_READS", "1")] } else { &[] };
    let f = Follower::start_with(&bpffs, ebpf, env);
    if ebpf {
        assert!(f.source.contains("eBPF change events"), "the eBPF program did not run here: {}", f.source);
        let want = if walk == Walk::ProbeReads { "by probe reads" } else { "through BTF pointers" };
        assert!(f.source.contains(want), "expected the walk {want}: {}", f.source);
    } else {
        assert!(f.source.contains("polling"), "{}", f.source);
    }
    let (steps, mut delays) = run_steps(&m, &other, &f);
    assert_eq!(steps, expected_steps(), "{} path", if ebpf { "eBPF" } else { "polling" });
    // Nothing more arrives (no duplicates, nothing from the failed updates or the other map).
    assert!(f.collect(1, Duration::from_millis(300)).is_empty());
    let p50 = percentile(&mut delays, 0.5);
    let p99 = percentile(&mut delays, 0.99);
    println!("{}: {} changes, write-to-report delay p50 {p50:?}, p99 {p99:?}", if ebpf { "eBPF" } else { "polling (50 ms)" }, delays.len());
    p99
}

#[test]
fn follow_reports_every_change_through_ebpf_and_polling() {
    if !require_root("follow_reports_every_change_through_ebpf_and_polling") {
        return;
    }
    let p99 = follow_case(true);
    // Target 50 ms; the bound leaves room for a loaded CI machine.
    assert!(p99 < Duration::from_millis(250), "eBPF path p99 {p99:?}");
    // The enter program kernels before 5.11 get (forced here: this kernel takes the other).
    follow_case_with(true, Walk::ProbeReads);
    follow_case(false);
}

/// Waits for changes until none arrived for `quiet`.
fn drain(f: &Follower, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(v) = f.lines.recv_timeout(quiet) {
        out.push(v);
    }
    out
}

/// Thousands of single-key writes from two threads, each the last write to its key, so any lost
/// change shows in what was reported: every add and every delete must arrive (a full ring
/// buffer makes kvcheck re-read the maps). The race of issue 11 itself is reproduced
/// deterministically by `follow_reports_a_write_the_kernel_applies_after_the_syscall_began`.
#[test]
fn follow_loses_no_change_under_rapid_writes() {
    if !require_root("follow_loses_no_change_under_rapid_writes") {
        return;
    }
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, LAYOUT).unwrap();
    let f = Follower::start(&bpffs, true);
    assert!(f.source.contains("eBPF change events"), "the eBPF program did not run here: {}", f.source);
    const N: usize = 10_000;
    let prefixes: Vec<String> = (0..N).map(|i| format!("10.{}.{}.{}/32", 100 + i / 65_536, (i / 256) % 256, i % 256)).collect();
    let write_all = |delete: bool| {
        std::thread::scope(|s| {
            for half in prefixes.chunks(N / 2) {
                let m = &m;
                s.spawn(move || {
                    for (i, p) in half.iter().enumerate() {
                        if delete {
                            m.ipcache.delete(&ipc_key(p)).unwrap();
                        } else {
                            m.ipcache.update(&ipc_key(p), &ipc_value(1000)).unwrap();
                        }
                        if i % 25 == 24 {
                            std::thread::sleep(Duration::from_millis(1)); // ~40k writes/s in all
                        }
                    }
                });
            }
        });
    };
    let all: BTreeSet<String> = prefixes.iter().cloned().collect();
    for (delete, op) in [(false, "added"), (true, "removed")] {
        write_all(delete);
        let got = drain(&f, Duration::from_secs(2));
        let reported: BTreeSet<String> = got.iter().filter(|c| c["op"] == op).map(|c| c["subject"].as_str().unwrap().to_owned()).collect();
        let missed: Vec<&String> = all.difference(&reported).collect();
        assert!(missed.is_empty(), "{} of {N} writes ({op}) never reported, e.g. {:?}", missed.len(), &missed[..missed.len().min(5)]);
        assert_eq!(got.len(), N, "one change per write ({op})");
    }
}

/// A page whose first touch blocks in the kernel until the test fills it (userfaultfd): a bpf()
/// update whose value lives there is held inside the syscall after `sys_enter_bpf` fired and
/// before the kernel applies the write.
struct HeldPage {
    uffd: std::os::fd::OwnedFd,
    page: *mut u8,
}

const PAGE: usize = 4096;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;

// SAFETY (for the thread hand-off): the page is only touched through the kernel.
unsafe impl Send for HeldPage {}
unsafe impl Sync for HeldPage {}

impl HeldPage {
    fn new() -> HeldPage {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscalls; every result is checked.
        unsafe {
            let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC);
            assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
            let uffd = std::os::fd::OwnedFd::from_raw_fd(fd as i32);
            let mut api = [0u64; 3];
            api[0] = 0xAA; // UFFD_API
            assert_eq!(libc::ioctl(fd as i32, UFFDIO_API, api.as_mut_ptr()), 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
            let page = libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(page, libc::MAP_FAILED);
            // struct uffdio_register { range { start, len }, mode, ioctls }
            let mut reg = [page as u64, PAGE as u64, 1 /* MISSING */, 0];
            assert_eq!(libc::ioctl(fd as i32, UFFDIO_REGISTER, reg.as_mut_ptr()), 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
            HeldPage { uffd, page: page.cast() }
        }
    }

    /// Waits for the kernel to fault on the page, holds it `hold`, then fills it with `bytes`.
    fn release_after(&self, hold: Duration, bytes: &[u8]) {
        use std::os::fd::AsRawFd;
        let mut msg = [0u8; 32];
        // SAFETY: reading one uffd_msg from our own userfaultfd.
        let n = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        assert_eq!(n, 32, "userfaultfd read: {}", std::io::Error::last_os_error());
        std::thread::sleep(hold);
        let mut src = vec![0u8; PAGE];
        src[..bytes.len()].copy_from_slice(bytes);
        // struct uffdio_copy { dst, src, len, mode, copy }
        let mut copy = [self.page as u64, src.as_ptr() as u64, PAGE as u64, 0, 0];
        // SAFETY: resolves the fault with a page of our own.
        assert_eq!(unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, copy.as_mut_ptr()) }, 0, "UFFDIO_COPY: {}", std::io::Error::last_os_error());
    }
}

impl Drop for HeldPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the page we mapped.
        unsafe { libc::munmap(self.page.cast(), PAGE) };
    }
}

/// Issue 11, deterministically: the kernel applies an update 300 ms after `sys_enter_bpf` fired
/// (its value page faults and is served late). A confirmation read taken at the event would see
/// the map without the entry and report nothing, ever; kvcheck must report the add.
#[test]
fn follow_reports_a_write_the_kernel_applies_after_the_syscall_began() {
    if !require_root("follow_reports_a_write_the_kernel_applies_after_the_syscall_began") {
        return;
    }
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, LAYOUT).unwrap();
    let f = Follower::start(&bpffs, true);
    assert!(f.source.contains("eBPF change events"), "the eBPF program did not run here: {}", f.source);
    let held = HeldPage::new();
    let value = ipc_value(4242);
    std::thread::scope(|s| {
        let held = &held;
        let value = &value;
        s.spawn(move || held.release_after(Duration::from_millis(300), value));
        // SAFETY: the value slice points at the held page; only the kernel reads it.
        let v = unsafe { std::slice::from_raw_parts(held.page, value.len()) };
        m.ipcache.update_unchecked(&ipc_key("10.77.0.1/32"), v).unwrap();
    });
    let got = f.collect(1, Duration::from_secs(3));
    assert_eq!(summary(&got), Summary::from([("added".to_owned(), "cilium_ipcache".to_owned(), "10.77.0.1/32".to_owned())]), "the change was lost");
    assert_eq!(got[0]["new"]["identity"], 4242);
}
