//! `cargo xtask bench`: kvcheck side by side with a raw batch-lookup loop (the floor),
//! `bpftool map dump` and `etcdctl get --prefix`, the full check, the agent idle and under a
//! stream of changes, the change-event program's overhead, the same at 1/10 and 1/100 of the
//! sizes (growth), and many agents against one etcd (etcd load); in one run.
//!
//! One module per section; `common` holds the timing and process helpers, `node` the shared
//! full-size node.

mod common;
mod node;
mod datapath;
mod kvstore;
mod check;
mod kubernetes;
mod agent;
mod etcd_load;
mod ebpf;
mod churn;
mod live_maps;
mod clustermesh;
mod soak;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use kvcheck_tests::simdata::ClusterShape;

use common::*;
use node::BenchNode;
use datapath::datapath_bench;
use kvstore::kvstore_bench;
use check::check_bench;
use kubernetes::kubernetes_bench;
use agent::agent_load_bench;
use etcd_load::etcd_load_bench;
use ebpf::ebpf_overhead_bench;
use churn::churn_bench;
use live_maps::live_maps_bench;
use clustermesh::clustermesh_bench;
use soak::soak_bench;

#[derive(Clone)]
struct Args {
    ipcache_entries: u32,
    runs: u32,
    write: Option<String>,
    shape: ClusterShape,
    only: Option<String>,
    idle_seconds: u64,
    /// Agent under load: changes per second, for how long.
    agent_rate: u32,
    agent_seconds: u32,
    /// Also run the sections at 1/10 and 1/100 of the sizes.
    growth: bool,
    /// etcd load: agents, their cluster, window, resync and health intervals (s).
    agents: u32,
    load_shape: ClusterShape,
    load_seconds: u64,
    load_resync: u64,
    load_health: u64,
    /// Churn: how long the Cilium-like churn runs (s).
    churn_seconds: u64,
    /// Soak: run it (`--only soak` or `--soak-seconds`), for how long, sampled how often (s).
    soak: bool,
    soak_seconds: u64,
    soak_sample: u64,
}

/// Numbers the growth table compares across sizes.
type Figures = std::collections::BTreeMap<&'static str, f64>;

fn parse_args() -> Result<Args> {
    let mut a = Args {
        ipcache_entries: 500_000,
        runs: 5,
        write: None,
        shape: ClusterShape { nodes: 5_000, ips: 100_000, identities: 10_000 },
        only: None,
        idle_seconds: 60,
        agent_rate: 1_000,
        agent_seconds: 10,
        growth: false,
        agents: 50,
        load_shape: ClusterShape { nodes: 500, ips: 10_000, identities: 1_000 },
        load_seconds: 60,
        load_resync: 60,
        load_health: 60,
        churn_seconds: 60,
        soak: false,
        soak_seconds: 3600,
        soak_sample: 30,
    };
    let mut scale = 1.0f64;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--ipcache-entries" => a.ipcache_entries = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--write" => a.write = Some(value()?),
            "--nodes" => a.shape.nodes = value()?.parse()?,
            "--ips" => a.shape.ips = value()?.parse()?,
            "--identities" => a.shape.identities = value()?.parse()?,
            "--only" => a.only = Some(value()?),
            "--idle-seconds" => a.idle_seconds = value()?.parse()?,
            "--agent-rate" => a.agent_rate = value()?.parse()?,
            "--agent-seconds" => a.agent_seconds = value()?.parse()?,
            "--growth" => a.growth = true,
            "--agents" => a.agents = value()?.parse()?,
            "--load-seconds" => a.load_seconds = value()?.parse()?,
            "--load-resync" => a.load_resync = value()?.parse()?,
            "--load-health" => a.load_health = value()?.parse()?,
            "--churn-seconds" => a.churn_seconds = value()?.parse()?,
            "--soak-seconds" => {
                a.soak_seconds = value()?.parse()?;
                a.soak = true;
            }
            "--soak-sample" => a.soak_sample = value()?.parse()?,
            "--scale" => scale = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if scale != 1.0 {
        a = a.scaled(scale);
    }
    a.soak |= a.only.as_deref().is_some_and(|o| o.split(',').any(|x| x == "soak"));
    Ok(a)
}

impl Args {
    /// Every size multiplied by `f` (at least a handful of each).
    fn scaled(&self, f: f64) -> Args {
        let s = |n: u32, min: u32| ((f64::from(n) * f).round() as u32).max(min);
        let shape = |c: ClusterShape| ClusterShape { nodes: s(c.nodes, 3), ips: s(c.ips, 10), identities: s(c.identities, 3) };
        Args { ipcache_entries: s(self.ipcache_entries, 100), shape: shape(self.shape), load_shape: shape(self.load_shape), ..self.clone() }
    }
}

/// The sections `--only` selects, at one size; their figures go into `figs`.
fn run_sections(args: &Args, figs: &mut Figures, with_ebpf: bool) -> Result<String> {
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| o.split(',').any(|x| x == name));
    let mut doc = String::new();
    let mut section = |title: &str, t: String| {
        print!("{t}\n");
        doc.push_str(&format!("## {title}\n\n{t}\n"));
    };
    if wanted("datapath") {
        section("Datapath read", datapath_bench(args, figs)?);
    }
    if wanted("kvstore") {
        section("Kvstore read", kvstore_bench(args, figs)?);
    }
    if with_ebpf && wanted("ebpf") {
        section("Change-event program overhead", ebpf_overhead_bench(args)?);
    }
    if with_ebpf && wanted("live-maps") {
        section("Maps in use: discovery cost", live_maps_bench(args, 100)?);
    }
    if with_ebpf && wanted("churn") {
        section("Trust under churn", churn_bench(args)?);
    }
    if with_ebpf && wanted("clustermesh") {
        section("ClusterMesh: remote clusters", clustermesh_bench(args)?);
    }
    if with_ebpf && args.soak {
        section("Soak", soak_bench(args, figs)?);
    }
    if wanted("check") || wanted("agent") || wanted("kubernetes") {
        let node = BenchNode::build(args.shape, args.ipcache_entries)?;
        // The kvstore-mode check and agent first: run after the CRD section (its test API
        // server and 100k objects, kubectl's 1.8 GB) the same check measured 15-20 % slower on
        // this VM, from the memory it had to fault in, not from anything kvcheck did.
        if wanted("check") {
            section("Full check and idle agent", check_bench(&node, args, figs)?);
        }
        if wanted("agent") {
            section("Agent under a stream of changes", agent_load_bench(&node, args, figs)?);
        }
        if wanted("kubernetes") {
            section("CRD mode: the Kubernetes API", kubernetes_bench(&node, args, figs)?);
        }
    }
    Ok(doc)
}

/// Cost per entry at each size: time and memory should grow linearly.
fn growth_table(rows: &[(String, Figures)]) -> String {
    let get = |f: &Figures, k: &str| f.get(k).copied().unwrap_or(f64::NAN);
    let mut t = String::from("| size | ipcache entries | datapath read ms (µs/entry) | `dump datapath` MiB (B/entry) | kvstore keys | `dump kvstore` ms (µs/key) | `dump kvstore` MiB (B/key) | full check ms | full check MiB | idle agent MiB | agent p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (label, f) in rows {
        let (n, k) = (get(f, "dp_entries"), get(f, "kv_keys"));
        t.push_str(&format!(
            "| {label} | {n:.0} | {:.1} ({:.2}) | {:.1} ({:.0}) | {k:.0} | {:.0} ({:.2}) | {:.1} ({:.0}) | {:.0} | {:.1} | {:.1} | {:.0} |\n",
            get(f, "dp_library_ms"),
            get(f, "dp_library_ms") * 1000.0 / n,
            get(f, "dp_cli_rss_mib"),
            get(f, "dp_cli_rss_mib") * 1048576.0 / n,
            get(f, "kv_cli_ms"),
            get(f, "kv_cli_ms") * 1000.0 / k,
            get(f, "kv_cli_rss_mib"),
            get(f, "kv_cli_rss_mib") * 1048576.0 / k,
            get(f, "check_ms"),
            get(f, "check_rss_mib"),
            get(f, "idle_rss_mib"),
            get(f, "agent_p99_ms"),
        ));
    }
    t
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates BPF maps in a private bpffs and starts etcd: run it as root");
    }
    let mut figs = Figures::new();
    let mut doc = run_sections(&args, &mut figs, true)?;
    if args.growth {
        let mut rows = vec![("full".to_owned(), figs.clone())];
        for (label, f) in [("1/10", 0.1), ("1/100", 0.01)] {
            let small = Args { idle_seconds: args.idle_seconds.min(10), ..args.scaled(f) };
            let mut figs = Figures::new();
            eprintln!("bench: growth, {label} of the sizes");
            run_sections(&small, &mut figs, false)?;
            rows.push((label.to_owned(), figs));
        }
        let t = growth_table(&rows);
        print!("{t}\n");
        doc.push_str(&format!("## Growth\n\nThe datapath, kvstore, check and agent sections again at 1/10 and 1/100 of the sizes (same runs; idle agent measured for at most 10 s at the smaller sizes). Time and memory per entry stay flat from 1/10 to full size: the cost is linear, no step is super-linear. At 1/100 the per-entry figures rise because fixed costs dominate (process start, the etcd health probes, a runtime of ~9 MiB); the agent's p99 is bounded below by its 100 ms debounce.\n\n{t}\n"));
    }
    if args.only.as_deref().is_none_or(|o| o.split(',').any(|x| x == "etcd-load")) {
        let t = etcd_load_bench(&args)?;
        print!("{t}\n");
        doc.push_str(&format!("## etcd load of many agents\n\n{t}\n"));
    }
    if let Some(path) = &args.write {
        let machine = format!(
            "kernel {}, {} cores, {}",
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            String::from_utf8_lossy(&Command::new("bpftool").arg("--version").output()?.stdout)
                .lines()
                .next()
                .unwrap_or_default()
        );
        let doc = format!(
            "# kvcheck benchmarks\n\nWritten by `cargo xtask bench` (release build) on {}. Machine: {machine}; etcd {}.\n\n{doc}",
            chrono::Utc::now().format("%Y-%m-%d"),
            etcd_version()
        );
        // A run without the soak (an hour) keeps the last soak's section, which says its date.
        let doc = match std::fs::read_to_string(path).ok().and_then(|old| kept_section(&old, "## Soak")) {
            Some(soak) if !args.soak => format!("{}\n\n{soak}", doc.trim_end()),
            _ => doc,
        };
        std::fs::write(path, doc).with_context(|| format!("writing {path}"))?;
    }
    if let Some(n) = figs.get("soak_false_findings").filter(|n| **n > 0.0) {
        bail!("the soak opened {n} false findings (its section says which)");
    }
    Ok(())
}

/// The section of `doc` headed `heading`, up to the next `## ` heading.
fn kept_section(doc: &str, heading: &str) -> Option<String> {
    let start = doc.find(&format!("\n{heading}\n"))? + 1;
    let end = doc[start + heading.len()..].find("\n## ").map_or(doc.len(), |e| start + heading.len() + e + 1);
    Some(doc[start..end].trim_end().to_owned() + "\n")
}
