//! The change-event program's overhead per unrelated `bpf()` call.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kvcheck::model::version::Layout;
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::maps::{BpffsMount, CiliumMaps};

use crate::common::*;
use crate::Args;

/// The cost of the change-event program to everyone else: 1,000,000 bpf() updates of an
/// unrelated map, with and without `kvcheck dump datapath --follow` attached (alternating,
/// median of `runs`).
pub(crate) fn ebpf_overhead_bench(args: &Args) -> Result<String> {
    use std::io::{BufRead as _, BufReader};
    let bpffs = BpffsMount::new()?;
    let _maps = CiliumMaps::create(&bpffs, Layout::V1_15)?;
    let other = kvcheck_tests::maps::WriterMap::create(
        &bpffs.globals(),
        kvcheck_tests::maps::MapShape { name: "unrelated", map_type: kvcheck_tests::maps::BPF_MAP_TYPE_HASH, key_size: 4, value_size: 8, max_entries: 1024, flags: 0 },
    )?;
    const UPDATES: u32 = 1_000_000;
    let updates = || -> Result<Duration> {
        let t = Instant::now();
        for i in 0..UPDATES {
            other.update(&(i % 1024).to_ne_bytes(), &u64::from(i).to_ne_bytes())?;
        }
        Ok(t.elapsed())
    };
    let (mut without, mut floor, mut with) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        without.push(updates()?);
        {
            // The floor: empty programs on both hooks kvcheck uses.
            let _enter = kvcheck_tests::tracepoint::EmptyTracepoint::attach("syscalls", "sys_enter_bpf")?;
            let _exit = kvcheck_tests::tracepoint::EmptyTracepoint::attach("syscalls", "sys_exit_bpf")?;
            floor.push(updates()?);
        }
        let mut follower = Command::new(kvcheck_bin())
            .args(["dump", "datapath", "--bpffs", bpffs.root_str(), "--follow", "--output", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut attached = String::new();
        if let Some(err) = follower.stderr.take() {
            for line in BufReader::new(err).lines() {
                let line = line?;
                if line.contains("following changes via") {
                    attached = line;
                    break;
                }
            }
        }
        if !attached.contains("eBPF change events") {
            let _ = follower.kill();
            bail!("the eBPF program did not attach: {attached}");
        }
        with.push(updates()?);
        let _ = follower.kill();
        let _ = follower.wait();
    }
    let ns = |d: Duration| d.as_secs_f64() * 1e9 / f64::from(UPDATES);
    let (a, f, b) = (ns(median(without)), ns(median(floor)), ns(median(with)));
    Ok(format!(
        "1,000,000 `BPF_MAP_UPDATE_ELEM` calls on an unrelated hash map (what Cilium's other map writes pay), median of {runs} alternating runs. kvcheck's program is two tracepoints: `sys_enter_bpf` (filter by command, resolve the fd to a map id through the task's file table, compare it with the watched ids, remember calls on watched maps by thread) and `sys_exit_bpf` (nothing to do while no watched call is in flight; else look the thread up and report the call with its result).\n\n| what | ns per `bpf()` call | added per call |\n|---|---:|---:|\n| no program | {a:.0} | |\n| floor: empty programs on `sys_enter_bpf` and `sys_exit_bpf` | {f:.0} | {:+.0} ns |\n| kvcheck's change-event program (`dump datapath --follow`) | {b:.0} | {:+.0} ns |\n\nkvcheck's program costs {:+.0} ns per call beyond the floor (total overhead {:+.1} %).\n",
        f - a,
        b - a,
        b - f,
        (b / a - 1.0) * 100.0,
        runs = args.runs.max(1),
    ))
}
