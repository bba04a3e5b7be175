//! Maps in use: the cost of discovering the maps the datapath programs use.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, IpcacheValue};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::maps::{BpffsMount, CiliumMaps};

use crate::common::*;
use crate::Args;

/// What discovering the maps in use costs (issue 12): a node with `endpoints` endpoints, each an
/// `lxc*` interface with a tcx program that tail-calls, through its own `cilium_calls_*` prog
/// array, a program using the ipcache; plus cilium_host and eth0. `kvcheck dump datapath` with
/// and without `--live-maps`.
pub(crate) fn live_maps_bench(args: &Args, endpoints: u32) -> Result<String> {
    use std::os::fd::AsFd;
    use kvcheck_tests::progs;
    let bpffs = BpffsMount::new()?;
    let maps = CiliumMaps::create(&bpffs, Layout::V1_15)?;
    maps.ipcache.update(&encode::ipcache_key(Layout::V1_15, "0.0.0.0/0".parse()?, 0), &encode::ipcache_value(Layout::V1_15, IpcacheValue { identity: 2, ..Default::default() }))?;
    let netns = kvcheck_tests::netns::Netns::new("kvc-lm")?;
    netns.add_cilium_host(&["10.1.0.1/32"])?;
    netns.add_interface("eth0", &["192.168.50.10/24"])?;
    let mut keep = Vec::new();
    let host = progs::classifier_using("cil_from_host", maps.ipcache.fd.as_fd())?;
    keep.push(progs::attach_tcx(&netns.name, "cilium_host", host.as_fd(), progs::BPF_TCX_INGRESS)?);
    keep.push(progs::attach_tcx(&netns.name, "eth0", host.as_fd(), progs::BPF_TCX_INGRESS)?);
    let mut arrays = Vec::new();
    let mut progs_kept = vec![host];
    for i in 0..endpoints {
        let dev = format!("lxc{i:05}");
        netns.add_interface(&dev, &[])?;
        let tail = progs::classifier_using("tail_handle_ipv4", maps.ipcache.fd.as_fd())?;
        let name: &'static str = Box::leak(format!("cilium_calls_{i:05}").into_boxed_str());
        let calls = progs::prog_array(&bpffs.globals(), name, tail.as_fd())?;
        let entry = progs::tail_caller("cil_from_container", calls.fd.as_fd())?;
        keep.push(progs::attach_tcx(&netns.name, &dev, entry.as_fd(), progs::BPF_TCX_INGRESS)?);
        progs_kept.extend([tail, entry]);
        arrays.push(calls);
    }
    let ns_path = format!("/var/run/netns/{}", netns.name);
    let run = |live: &str| -> Result<(Duration, serde_json::Value)> {
        let t = Instant::now();
        let out = Command::new(kvcheck_bin()).args(["dump", "datapath", "--bpffs", bpffs.root_str(), "--netns", &ns_path, "--live-maps", live, "--output", "json"]).output()?;
        let took = t.elapsed();
        anyhow::ensure!(out.status.success(), "dump datapath: {}", String::from_utf8_lossy(&out.stderr));
        Ok((took, serde_json::from_slice(&out.stdout)?))
    };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut last = serde_json::Value::Null;
    for _ in 0..args.runs.max(1) {
        off.push(run("off")?.0);
        let (t, doc) = run("on")?;
        on.push(t);
        last = doc;
    }
    let live = &last["live_maps"];
    anyhow::ensure!(live["status"] == "checked", "live maps not checked: {live}");
    let users = live["maps"]["cilium_ipcache"].as_object().and_then(|m| m.values().next()).and_then(|u| u["users"].as_array()).map_or(0, Vec::len);
    let (a, b) = (median(off), median(on));
    Ok(format!(
        "A node with {endpoints} endpoints: {endpoints} `lxc*` interfaces with a tcx program each that tail-calls (through its own `cilium_calls_*` prog array) a program using the ipcache, plus `cilium_host` and `eth0`; {} programs attached, {} programs in all. `kvcheck dump datapath` (release build, process start included), median of {} runs.\n\n| what | wall ms |\n|---|---:|\n| `--live-maps off` (pins only) | {:.1} |\n| `--live-maps on` | {:.1} |\n\nThe discovery itself: {:.1} ms and {} requests (bpf() calls and netlink dumps: per interface 2 tc filter dumps and 4 `BPF_PROG_QUERY`; per program 2, per map 2, per prog-array slot 2), {} users of the pinned ipcache found.\n",
        live["attached_programs"],
        live["programs"],
        args.runs.max(1),
        a.as_secs_f64() * 1000.0,
        b.as_secs_f64() * 1000.0,
        live["took_ms"].as_f64().unwrap_or(f64::NAN),
        live["syscalls"],
        users,
    ))
}
