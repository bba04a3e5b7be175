//! The full check of a consistent node, and the idle agent.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::common::*;
use crate::node::BenchNode;
use crate::{Args, Figures};

pub(crate) fn check_bench(node: &BenchNode, args: &Args, figs: &mut Figures) -> Result<String> {
    let shape = node.shape;
    let make = || {
        let mut c = node.command("check");
        c.args(["--settle", "0", "--output", "json"]);
        c
    };
    // Exit code 0 = consistent: the bench node must check clean, or the figures mean little.
    let first = make().output()?;
    if !first.status.success() {
        let doc: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap_or_default();
        let sample: Vec<String> = doc["findings"].as_array().map(|a| a.iter().take(5).map(|f| f["message"].to_string()).collect()).unwrap_or_default();
        bail!("the bench node does not check clean: {} {}; {}", doc["counts"]["by_kind"], sample.join("; "), String::from_utf8_lossy(&first.stderr));
    }
    let (took, rss) = measure(args.runs, make)?;
    // The floors of the check's two reads, in the same run: a raw batch-lookup loop over the
    // ipcache (the largest map) and a raw range of the kvstore, nothing decoded.
    let dp_floor = time_runs(args.runs, || {
        let got = raw_batch_loop(&node.maps.ipcache.path, 24, node.layout.ipcache_value_size() as usize)?;
        anyhow::ensure!(got == node.total_ipcache, "raw loop read {got} of {}", node.total_ipcache);
        Ok(())
    })?;
    let (kv_floor, _) = raw_kvstore_range(args.runs, node.etcd.endpoints())?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let floor = dp_floor.max(kv_floor);

    // The agent on the same node, idle (no changes) for `idle_seconds`: CPU and memory.
    let agent = node.start_agent(&[], Stdio::null())?;
    let pid = agent.id();
    let idle = Duration::from_secs(args.idle_seconds);
    let c0 = cpu_seconds(pid);
    std::thread::sleep(idle);
    let cpu_pct = (cpu_seconds(pid) - c0) / idle.as_secs_f64() * 100.0;
    let (rss_now, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    stop(agent);
    within_shipped_limit("the agent (kvstore mode)", hwm)?;
    figs.insert("check_ms", took.as_secs_f64() * 1000.0);
    figs.insert("check_dp_floor_ms", ms(dp_floor));
    figs.insert("check_kv_floor_ms", ms(kv_floor));
    figs.insert("check_rss_mib", rss as f64 / 1024.0);
    figs.insert("idle_rss_mib", rss_now as f64 / 1024.0);
    figs.insert("idle_cpu_pct", cpu_pct);
    Ok(format!(
        "`kvcheck check` (settle 0) of node-0: kvstore {} nodes / {} IP entries / {} identities, ipcache {} entries ({} local-scope CIDR), {} local endpoints, tunnel map {} entries; median of {} runs\n\n| what | wall ms | peak RSS MiB | vs the larger floor |\n|---|---:|---:|---:|\n| datapath floor: raw batch-lookup loop over the ipcache | {:.0} | - | - |\n| kvstore floor: raw range of `cilium/state/`, nothing decoded | {:.0} | - | - |\n| full check, consistent node (exit 0) | {:.0} | {:.1} | {:.2}x |\n\n`kvcheck agent` on the same node, idle for {} s after it became ready: {:.2} % of a core, RSS {:.1} MiB (peak {:.1} MiB)\n",
        shape.nodes, shape.ips, shape.identities, node.total_ipcache, node.local_scope, node.local_pods, shape.nodes - 1, args.runs, ms(dp_floor), ms(kv_floor), ms(took), rss as f64 / 1024.0, ms(took) / ms(floor),
        idle.as_secs(), cpu_pct, rss_now as f64 / 1024.0, hwm as f64 / 1024.0
    ))
}
