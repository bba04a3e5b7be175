//! Cilium's node-delete hold-off (`NodeDeleteDelay`, 30 s; docs/cilium-expected-state.md): a
//! remote node's ipcache and tunnel entries stay until the hold-off ends after its key is
//! deleted, and the delete is dropped when the key comes back within it. Neither `check` nor the
//! agent may call those entries drift inside the hold-off; both must once it has certainly
//! passed. On the real Cilium 1.16.15 capture (remote node k8s-node2).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvcheck_tests::agent::Agent;
use kvcheck_tests::require_root;
use kvcheck_tests::sample;
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

const NODE2: &str = "cilium/state/nodes/v1/default/k8s-node2";

/// What k8s-node2 leaves in this node's datapath when its key goes.
fn node2_entries() -> BTreeSet<(String, String)> {
    [("ipcache-stale", "10.5.1.133/32"), ("ipcache-stale", "10.6.7.1/32"), ("ipcache-stale", "10.6.7.9/32"), ("tunnel-stale", "10.6.7.0")]
        .iter()
        .map(|(k, s)| ((*k).to_owned(), (*s).to_owned()))
        .collect()
}

fn node2_value() -> String {
    let s = sample::sections(sample::REAL_1_16_15);
    sample::etcd_pairs(sample::section(&s, "etcdctl get --prefix cilium/")).into_iter().find(|(k, _)| k == NODE2).unwrap().1
}

fn check(node: &SimulatedNode, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["--settle", "0", "--output", "json"];
    args.extend_from_slice(extra);
    let out = node.check(&args);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), doc)
}

fn pairs(doc: &Value, path: &str) -> BTreeSet<(String, String)> {
    if path == "findings" {
        doc["findings"].as_array().unwrap().iter().map(|f| (f["kind"].as_str().unwrap().to_owned(), f["subject"].as_str().unwrap().to_owned())).collect()
    } else {
        doc["hold_off"]["held"].as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_str().unwrap().to_owned())).collect()
    }
}

#[test]
fn check_holds_a_deleted_nodes_entries_until_the_hold_off_has_certainly_passed() {
    if !require_root("check_holds_a_deleted_nodes_entries_until_the_hold_off_has_certainly_passed") {
        return;
    }
    let node = SimulatedNode::real_1_16_15().unwrap();
    node.etcd_del(NODE2).unwrap();

    // Inside the hold-off: held, not drift; the report says which node and why.
    let (code, doc) = check(&node, &["--no-hold-off-wait"]);
    assert_eq!((code, pairs(&doc, "findings")), (Some(0), BTreeSet::new()), "{doc:#}");
    assert_eq!(pairs(&doc, "held"), node2_entries(), "{:#}", doc["hold_off"]);
    let held = &doc["hold_off"]["nodes"][0];
    assert_eq!(held["key"], NODE2);
    assert!(held["bounded_by"].as_str().unwrap().contains("read at revision"), "{held}");

    // Waiting it out (the delete cannot be placed earlier than the read): drift afterwards.
    let t0 = Instant::now();
    let (code, doc) = check(&node, &["--node-delete-hold-off", "3s"]);
    assert_eq!((code, pairs(&doc, "findings")), (Some(1), node2_entries()), "{doc:#}");
    assert!(t0.elapsed() >= Duration::from_secs(3), "did not wait: {:?}", t0.elapsed());
    assert!(doc["hold_off"]["waited_ms"].as_u64().unwrap() >= 2500, "{:#}", doc["hold_off"]);

    // A heartbeat written after the delete places it 40 s back: past the 30 s hold-off, so
    // drift at once, without waiting.
    let old = (chrono::Utc::now() - chrono::Duration::seconds(40)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    node.etcd_put("cilium/.heartbeat", &old).unwrap();
    let t0 = Instant::now();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, pairs(&doc, "findings").into_iter().filter(|(k, _)| k != "heartbeat-stale").collect::<BTreeSet<_>>()), (Some(1), node2_entries()), "{doc:#}");
    assert!(t0.elapsed() < Duration::from_secs(10), "waited {:?}", t0.elapsed());
    assert_eq!(pairs(&doc, "held"), BTreeSet::new());

    // The node back within the hold-off: Cilium drops the delete; consistent.
    node.etcd_put("cilium/.heartbeat", &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap();
    node.etcd_put(NODE2, &node2_value()).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, pairs(&doc, "findings")), (Some(0), BTreeSet::new()), "{doc:#}");
}

#[test]
fn agent_holds_a_deleted_nodes_entries_for_the_hold_off_then_opens_them() {
    if !require_root("agent_holds_a_deleted_nodes_entries_for_the_hold_off_then_opens_them") {
        return;
    }
    let node = SimulatedNode::real_1_16_15().unwrap();
    let agent = Agent::start(&node, &["--node-delete-hold-off", "4s"]);

    // Deleted and back within the hold-off: Cilium keeps everything; nothing is drift.
    node.etcd_del(NODE2).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    node.etcd_put(NODE2, &node2_value()).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(agent.opened(), Vec::<(String, String)>::new());

    // Deleted for good, entries left in place: held for 4 s, then open after the 1 s grace.
    let t0 = Instant::now();
    node.etcd_del(NODE2).unwrap();
    let (_, at) = agent.wait_for("finding-opened", Some("tunnel-stale"), Some("10.6.7.0"), Duration::from_secs(15));
    let took = at - t0;
    assert!(took >= Duration::from_millis(4900) && took <= Duration::from_millis(7000), "opened after {took:?}");
    std::thread::sleep(Duration::from_millis(500));
    let opened: BTreeSet<(String, String)> = agent.opened().into_iter().collect();
    assert_eq!(opened, node2_entries());

    // Cilium applies the delete: resolved.
    for p in ["10.5.1.133/32", "10.6.7.1/32", "10.6.7.9/32"] {
        node.ipcache_delete(p).unwrap();
    }
    node.maps.tunnel.as_ref().unwrap().delete(&kvcheck_tests::encode::tunnel_key("10.6.7.0".parse().unwrap())).unwrap();
    agent.wait_for("finding-resolved", Some("tunnel-stale"), Some("10.6.7.0"), Duration::from_secs(5));
}

/// Writes `txns` transactions of 125 puts of unrelated keys (another application sharing the
/// etcd): a watch from an older revision then takes etcd a while to sync.
fn unrelated_history(node: &SimulatedNode, txns: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect(node.etcd.endpoints(), None).await.unwrap();
        let value = "x".repeat(400);
        for t in 0..txns {
            let ops: Vec<etcd_client::TxnOp> = (0..125).map(|i| etcd_client::TxnOp::put(format!("other-app/{t}/{i}"), value.clone(), None)).collect();
            client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
        }
    });
}

#[test]
fn the_hold_off_search_waits_for_etcds_history_not_its_progress_answer() {
    if !require_root("the_hold_off_search_waits_for_etcds_history_not_its_progress_answer") {
        return;
    }
    // etcd before 3.4.24 / 3.5.8 answers a progress request at once with its current
    // revision, even while a new watch's history is still being read (etcd-io/etcd#15220).
    // A search that took that answer for "history replayed" found no delete behind a long
    // history, and called the held node's entries drift.
    let node = SimulatedNode::real_1_16_15().unwrap();
    node.etcd_del(NODE2).unwrap();
    unrelated_history(&node, 400);
    for round in 0..3 {
        let (code, doc) = check(&node, &["--no-hold-off-wait"]);
        assert_eq!((code, pairs(&doc, "findings")), (Some(0), BTreeSet::new()), "round {round}: {doc:#}");
        assert_eq!(pairs(&doc, "held"), node2_entries(), "round {round}: {:#}", doc["hold_off"]);
    }
}
