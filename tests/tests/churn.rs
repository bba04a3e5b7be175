//! Trust under churn (issue 11): a node churning the way Cilium's agents really do — pods,
//! remote pods, remote nodes (with the 30 s node-delete hold-off) and identities coming and
//! going, both sides kept in step with 50-800 ms of lag — at over 50 map changes/s and 20
//! kvstore changes/s for 60 s. Two agents follow it (eBPF change events, and polling) and one-shot
//! checks run beside it: no finding may open and no check may report drift. Then three real
//! drifts of three kinds must open within grace + 1 s on both agents.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::Agent;
use kvcheck_tests::churn::{real_drifts, Churn, ChurnConfig};
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, NodeSpec};
use serde_json::Value;

const GRACE: Duration = Duration::from_secs(3);

#[test]
fn churn_opens_no_false_findings_and_real_drift_opens_within_grace() {
    if !require_root("churn_opens_no_false_findings_and_real_drift_opens_within_grace") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let ebpf = Agent::start_with(&node, "3s", &[]);
    let poll = Agent::start_with(&node, "3s", &["--no-ebpf", "--poll-interval", "500ms"]);
    let (_, _) = ebpf.wait_for("node-health", None, None, Duration::from_secs(5));

    let stop = AtomicBool::new(false);
    let (stats, checks) = std::thread::scope(|s| {
        let checks = s.spawn(|| {
            let mut results: Vec<(Option<i32>, Value)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = node.check(&["--output", "json"]);
                let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                results.push((out.status.code(), doc));
            }
            results
        });
        let stats = Churn::new(&node, ChurnConfig::default()).unwrap().run().unwrap();
        stop.store(true, Ordering::Relaxed);
        (stats, checks.join().unwrap())
    });
    println!(
        "churn: {:.1} map changes/s, {:.1} kvstore changes/s over {:?}; {stats:?}; {} one-shot checks",
        stats.map_rate(),
        stats.kvstore_rate(),
        stats.elapsed,
        checks.len()
    );
    assert!(stats.map_rate() >= 50.0 && stats.kvstore_rate() >= 20.0, "churn too slow: {stats:?}");
    assert!(stats.nodes_left > 0 && stats.nodes_joined > 0 && stats.identities_released > 0, "{stats:?}");

    // Every lagging change has landed; let the last ones pass the grace period.
    std::thread::sleep(GRACE + Duration::from_secs(1));
    for (name, agent) in [("eBPF", &ebpf), ("polling", &poll)] {
        assert_eq!(agent.opened(), Vec::<(String, String)>::new(), "{name} agent opened findings under consistent churn");
    }
    assert!(checks.len() >= 2, "only {} one-shot checks ran", checks.len());
    for (code, doc) in &checks {
        assert_eq!((code, &doc["findings"]), (&Some(0), &serde_json::json!([])), "a one-shot check beside the churn reported drift: {doc:#}");
    }

    // Three real drifts: a stale map entry, a kvstore pod the ipcache lacks, and a lost identity
    // that only a remote pod uses.
    let drifts = real_drifts(&node);
    let want: BTreeSet<(String, String)> = drifts.iter().map(|(k, s, _)| ((*k).to_owned(), (*s).to_owned())).collect();
    for (kind, subject, inject) in drifts {
        let t0 = Instant::now();
        inject().unwrap();
        for (name, agent) in [("eBPF", &ebpf), ("polling", &poll)] {
            let (_, at) = agent.wait_for("finding-opened", Some(kind), Some(subject), Duration::from_secs(15));
            let took = at - t0;
            println!("{name} agent: {kind} {subject} opened {took:?} after the change");
            assert!(took <= GRACE + Duration::from_secs(1), "{name} agent opened {kind} after {took:?}");
        }
    }
    for agent in [&ebpf, &poll] {
        assert_eq!(agent.opened().into_iter().collect::<BTreeSet<_>>(), want);
    }
}
