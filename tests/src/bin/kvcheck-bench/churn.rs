//! Trust under churn: a Cilium-like churn generator against the agent, false findings counted.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kvcheck::model::version::Layout;

use crate::common::*;
use crate::Args;

/// Trust under churn (tests/tests/churn.rs at bench length): the Cilium-like churn of
/// `kvcheck_tests::churn` under an eBPF and a polling agent (grace 3 s): changes/s sustained,
/// false findings (must be 0), agent CPU, then three real drifts and their change → opened time.
pub(crate) fn churn_bench(args: &Args) -> Result<String> {
    use kvcheck_tests::agent::Agent;
    use kvcheck_tests::churn::{real_drifts, Churn, ChurnConfig};
    let node = kvcheck_tests::simcluster::consistent_node(kvcheck_tests::simcluster::NodeSpec::new(Layout::V1_15, false))?;
    let agents = [("eBPF events", Agent::start_with(&node, "3s", &[])), ("polling, 500 ms", Agent::start_with(&node, "3s", &["--no-ebpf", "--poll-interval", "500ms"]))];
    let cpu0: Vec<f64> = agents.iter().map(|(_, a)| cpu_seconds(a.child.id())).collect();
    let stats = Churn::new(&node, ChurnConfig { duration: Duration::from_secs(args.churn_seconds), ..ChurnConfig::default() })?.run()?;
    let cpu: Vec<f64> = agents.iter().zip(&cpu0).map(|((_, a), c0)| (cpu_seconds(a.child.id()) - c0) / stats.elapsed.as_secs_f64() * 100.0).collect();
    std::thread::sleep(Duration::from_secs(4));
    let false_findings: Vec<usize> = agents.iter().map(|(_, a)| a.opened().len()).collect();
    let mut latency: Vec<Vec<String>> = vec![Vec::new(); agents.len()];
    for (kind, subject, inject) in real_drifts(&node) {
        let t0 = Instant::now();
        inject()?;
        for (i, (_, a)) in agents.iter().enumerate() {
            let (_, at) = a.wait_for("finding-opened", Some(kind), Some(subject), Duration::from_secs(20));
            latency[i].push(format!("{kind} {:.2} s", (at - t0).as_secs_f64()));
        }
    }
    let mut t = format!(
        "A node churning the way Cilium's agents do (`kvcheck_tests::churn`: remote and local pods with 50-800 ms between Cilium's two sides, remote nodes joining and leaving with the 30 s node-delete hold-off, identities allocated and released) for {:.0} s: **{:.1} map changes/s and {:.1} kvstore changes/s** ({} map, {} kvstore changes; {} remote and {} local pods, {} nodes joined, {} left, {} back within the hold-off, {} identities released). Two agents with `--grace 3s`; then three real drifts, change → `finding-opened` (grace included).\n\n| agent | false findings opened | agent CPU while churning | change → opened |\n|---|---:|---:|---|\n",
        stats.elapsed.as_secs_f64(), stats.map_rate(), stats.kvstore_rate(), stats.map_changes, stats.kvstore_changes, stats.remote_pods, stats.local_pods, stats.nodes_joined, stats.nodes_left, stats.nodes_back, stats.identities_released
    );
    for (i, (name, _)) in agents.iter().enumerate() {
        t.push_str(&format!("| {name} | {} | {:.1} % of a core | {} |\n", false_findings[i], cpu[i], latency[i].join(", ")));
    }
    if false_findings.iter().any(|n| *n > 0) {
        bail!("false findings under consistent churn: {t}");
    }
    Ok(t)
}
