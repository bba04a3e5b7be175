//! ClusterMesh with real etcds and real maps: the real 1.16.15 node meshed with `cluster2`
//! (its own TLS etcd, direct) and `cluster3` (KVStoreMesh-style cache with canaries in the
//! local etcd). Every ClusterMesh finding both ways, unreachable / unsynced / drained remotes.

use std::collections::BTreeSet;

use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::require_root;
use kvcheck_tests::simmesh::{self, SimulatedMesh, C2_DB, C2_NODE_IP, C2_WEB, C3_APP};
use serde_json::Value;

fn check(m: &SimulatedMesh, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = m.check_args();
    args.extend(["--settle", "0", "--output", "json", "--etcd-timeout", "2"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kvcheck_tests::run_kvcheck(None, &refs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no JSON; exit {:?}; stderr: {stderr}", out.status.code()));
    (out.status.code(), doc)
}

/// (kind, subject, cluster) of every finding.
fn found(doc: &Value) -> BTreeSet<(String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    doc["findings"].as_array().unwrap().iter().map(|f| (s(&f["kind"]), s(&f["subject"]), s(&f["cluster"]))).collect()
}

fn status_of<'a>(doc: &'a Value, cluster: &str) -> &'a Value {
    let remotes = doc["sources"]["clustermesh"]["remotes"].as_array().unwrap_or_else(|| panic!("no clustermesh section: {doc:#}"));
    &remotes.iter().find(|r| r["name"] == cluster).unwrap_or_else(|| panic!("no {cluster}: {doc:#}"))["status"]
}

fn via(identity: u32, node_ip: &str) -> IpcacheValue {
    IpcacheValue { identity, tunnel_endpoint: Some(node_ip.parse().unwrap()), ..Default::default() }
}

fn f(kind: &str, subject: &str, cluster: &str) -> (String, String, String) {
    (kind.to_owned(), subject.to_owned(), cluster.to_owned())
}

#[test]
fn meshed_node_checks_clean_and_every_clustermesh_drift_is_found() {
    if !require_root("meshed_node_checks_clean_and_every_clustermesh_drift_is_found") {
        return;
    }
    let mut m = SimulatedMesh::start().unwrap();
    let (code, doc) = check(&m, &[]);
    assert_eq!((code, &doc["findings"]), (Some(0), &serde_json::json!([])), "{doc:#}");
    assert_eq!((status_of(&doc, "cluster2"), status_of(&doc, "cluster3")), (&serde_json::json!("synced"), &serde_json::json!("synced")));
    let mesh = &doc["sources"]["clustermesh"];
    assert_eq!((mesh["local"]["id"].as_u64(), mesh["local"]["id_from"].as_str()), (Some(1), Some("--cluster-id")));
    assert_eq!(mesh["remotes"][0]["counts"]["ips"], 3, "{mesh:#}");
    assert_eq!(mesh["remotes"][1]["cluster_config"]["capabilities"]["cached"], true);
    // Without the mesh, the remotes' entries are what an unmeshed check sees: drift.
    let mut unmeshed = m.node.check(&["--settle", "0", "--output", "json"]);
    assert_eq!(unmeshed.status.code(), Some(1), "{}", String::from_utf8_lossy(&unmeshed.stdout));
    unmeshed.stdout.clear();

    type Step = Box<dyn Fn(&SimulatedMesh)>;
    let cases: Vec<(&str, Step, Step, Vec<(String, String, String)>)> = vec![
        (
            "a remote pod's ipcache entry deleted (direct, TLS)",
            Box::new(|m| m.node.ipcache_delete("10.7.1.20/32").unwrap()),
            Box::new(|m| m.node.ipcache_put("10.7.1.20/32", via(C2_WEB, C2_NODE_IP)).unwrap()),
            vec![f("ipcache-missing", "10.7.1.20/32", "cluster2")],
        ),
        (
            "a remote pod's ipcache entry deleted (KVStoreMesh cache)",
            Box::new(|m| m.node.ipcache_delete("10.8.1.20/32").unwrap()),
            Box::new(|m| m.node.ipcache_put("10.8.1.20/32", via(C3_APP, simmesh::C3_NODE_IP)).unwrap()),
            vec![f("ipcache-missing", "10.8.1.20/32", "cluster3")],
        ),
        (
            "a remote pod's entry its cluster no longer has",
            Box::new(|m| m.node.ipcache_put("10.7.1.99/32", via(C2_WEB, C2_NODE_IP)).unwrap()),
            Box::new(|m| m.node.ipcache_delete("10.7.1.99/32").unwrap()),
            vec![f("ipcache-stale", "10.7.1.99/32", "cluster2")],
        ),
        (
            "a remote identity deleted in its cluster while its pod stays",
            Box::new(|m| m.cluster2_del("cilium/state/identities/v1/id/131329").unwrap()),
            Box::new(|m| m.cluster2_put("cilium/state/identities/v1/id/131329", &simmesh::labels("c2-db", "cluster2")).unwrap()),
            vec![f("identity-missing", &C2_DB.to_string(), "cluster2")],
        ),
        (
            "a remote identity without its cluster label",
            Box::new(|m| m.cluster2_put("cilium/state/identities/v1/id/131328", "k8s:app=c2-web;").unwrap()),
            Box::new(|m| m.cluster2_put("cilium/state/identities/v1/id/131328", &simmesh::labels("c2-web", "cluster2")).unwrap()),
            vec![f("remote-identity-invalid", &C2_WEB.to_string(), "cluster2")],
        ),
        (
            "a remote pod with another cluster's identity (#36338)",
            Box::new(|m| {
                m.cluster2_put("cilium/state/ip/v1/default/10.7.1.30", &simmesh::ip_json("10.7.1.30", C3_APP, C2_NODE_IP, "cluster2", "moved")).unwrap();
                m.node.ipcache_put("10.7.1.30/32", via(C3_APP, C2_NODE_IP)).unwrap();
            }),
            Box::new(|m| {
                m.cluster2_del("cilium/state/ip/v1/default/10.7.1.30").unwrap();
                m.node.ipcache_delete("10.7.1.30/32").unwrap();
            }),
            vec![f("remote-identity-invalid", &C3_APP.to_string(), "cluster2")],
        ),
        (
            "an entry of a cluster id no remote has (not drained)",
            Box::new(|m| m.node.ipcache_put("10.9.1.20/32", via(9 << 16 | 300, "10.5.1.139")).unwrap()),
            Box::new(|m| m.node.ipcache_delete("10.9.1.20/32").unwrap()),
            vec![f("ipcache-unknown-cluster", "10.9.1.20/32", "")],
        ),
        (
            "a remote pod IP that is also a local pod's",
            Box::new(|m| m.cluster2_put("cilium/state/ip/v1/default/10.6.1.28", &simmesh::ip_json("10.6.1.28", C2_WEB, C2_NODE_IP, "cluster2", "twin")).unwrap()),
            Box::new(|m| m.cluster2_del("cilium/state/ip/v1/default/10.6.1.28").unwrap()),
            vec![f("clustermesh-ip-overlap", "10.6.1.28/32", "cluster2")],
        ),
        (
            "a remote's tunnel entry deleted",
            Box::new(|m| m.node.maps.tunnel.as_ref().unwrap().delete(&kvcheck_tests::encode::tunnel_key("10.7.1.0".parse().unwrap())).unwrap()),
            Box::new(|m| m.node.maps.tunnel.as_ref().unwrap().update(&kvcheck_tests::encode::tunnel_key("10.7.1.0".parse().unwrap()), &kvcheck_tests::encode::tunnel_value(C2_NODE_IP.parse().unwrap(), 0)).unwrap()),
            vec![f("tunnel-missing", "10.7.1.0", "cluster2")],
        ),
        (
            "a remote without its cluster-config (Cilium syncs nothing; its entries not judged)",
            Box::new(|m| m.cluster2_del("cilium/cluster-config/cluster2").unwrap()),
            Box::new(|m| m.cluster2_put("cilium/cluster-config/cluster2", r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#).unwrap()),
            vec![f("remote-cluster-config-invalid", "cluster2", "cluster2")],
        ),
        (
            "a remote claiming the local cluster's id",
            Box::new(|m| m.cluster2_put("cilium/cluster-config/cluster2", r#"{"id":1,"capabilities":{"maxConnectedClusters":255}}"#).unwrap()),
            Box::new(|m| m.cluster2_put("cilium/cluster-config/cluster2", r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#).unwrap()),
            vec![f("remote-cluster-config-invalid", "cluster2", "cluster2")],
        ),
    ];
    for (what, inject, repair, want) in &cases {
        inject(&m);
        let (code, doc) = check(&m, &[]);
        assert_eq!((code, found(&doc)), (Some(1), want.iter().cloned().collect()), "{what}: {:#}", doc["findings"]);
        repair(&m);
        let (code, doc) = check(&m, &[]);
        assert_eq!(code, Some(0), "{what}, repaired: {:#}", doc["findings"]);
    }

    // A legitimate remote change (a new pod in cluster2, written into the ipcache by Cilium).
    m.cluster2_put("cilium/state/ip/v1/default/10.7.1.40", &simmesh::ip_json("10.7.1.40", C2_WEB, C2_NODE_IP, "cluster2", "new")).unwrap();
    m.node.ipcache_put("10.7.1.40/32", via(C2_WEB, C2_NODE_IP)).unwrap();
    assert_eq!(check(&m, &[]).0, Some(0));

    // The KVStoreMesh writer has not synced cluster3's pod IPs (canary gone): not judged.
    m.node.etcd_del("cilium/synced/cluster3/cilium/cache/ip/v1").unwrap();
    m.node.ipcache_delete("10.8.1.20/32").unwrap();
    let (code, doc) = check(&m, &[]);
    assert_eq!((code, status_of(&doc, "cluster3").as_str()), (Some(0), Some("not-synced")), "{doc:#}");
    m.node.etcd_put("cilium/synced/cluster3/cilium/cache/ip/v1", "2026-12-02T00:00:00Z").unwrap();
    assert_eq!(check(&m, &[]).1["findings"][0]["kind"], "ipcache-missing");
    m.node.ipcache_put("10.8.1.20/32", via(C3_APP, simmesh::C3_NODE_IP)).unwrap();

    // cluster2's etcd down: Cilium keeps its entries; nothing of it is judged, even drift.
    m.cluster2.kill(0);
    m.node.ipcache_put("10.7.1.98/32", via(C2_WEB, C2_NODE_IP)).unwrap();
    let (code, doc) = check(&m, &[]);
    assert_eq!((code, &doc["findings"]), (Some(0), &serde_json::json!([])), "{doc:#}");
    assert_eq!(status_of(&doc, "cluster2"), "unreachable");
    let text = kvcheck_tests::run_kvcheck(None, &m.check_args().iter().map(String::as_str).chain(["--settle", "0", "--etcd-timeout", "2"]).collect::<Vec<_>>());
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("remote clusters not judged: cluster2") && text.contains("cluster2 (") && text.contains("unreachable"), "{text}");
    m.cluster2.restart(0).unwrap();
    let (code, doc) = check(&m, &[]);
    assert_eq!((code, found(&doc)), (Some(1), [f("ipcache-stale", "10.7.1.98/32", "cluster2")].into()), "{doc:#}");
    m.node.ipcache_delete("10.7.1.98/32").unwrap();

    // cluster2 removed from the mesh: Cilium drains it, so its entries left behind are drift.
    m.remove_config("cluster2").unwrap();
    let (code, doc) = check(&m, &[]);
    let kinds: BTreeSet<String> = found(&doc).into_iter().map(|(k, _, _)| k).collect();
    assert_eq!((code, kinds), (Some(1), ["ipcache-stale", "ipcache-unknown-cluster", "tunnel-stale"].map(String::from).into()), "{:#}", doc["findings"]);
}

/// The agent: one watch per remote; drift in a remote's entries opens with its cluster, a
/// remote change Cilium follows opens nothing, an unreachable remote is degraded and not
/// judged, and a removed config file (Cilium drains) is noticed within the grace period.
#[test]
fn agent_watches_each_remote_cluster() {
    if !require_root("agent_watches_each_remote_cluster") {
        return;
    }
    use kvcheck_tests::agent::{http_get, Agent};
    use std::time::Duration;
    let mut m = SimulatedMesh::start().unwrap();
    let dir = m.config_dir.display().to_string();
    let agent = Agent::start_with(&m.node, "3s", &["--clustermesh-config", &dir, "--cluster-id", "1", "--etcd-timeout", "1"]);
    let metrics = || http_get(agent.port, "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(metrics().contains(r#"cluster="cluster2",status="synced"} 1"#), "{}", metrics());
    assert!(metrics().contains(r#"cluster="cluster3",status="synced"} 1"#));

    // Drift in each remote's entries, found through the watches' state.
    m.node.ipcache_delete("10.7.1.20/32").unwrap();
    let (opened, _) = agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.7.1.20/32"), Duration::from_secs(10));
    assert_eq!(opened["cluster"], "cluster2", "{opened}");
    m.node.ipcache_put("10.7.1.20/32", via(C2_WEB, C2_NODE_IP)).unwrap();
    agent.wait_for("finding-resolved", Some("ipcache-missing"), Some("10.7.1.20/32"), Duration::from_secs(5));
    m.node.etcd_del("cilium/cache/identities/v1/cluster3/id/196864").unwrap();
    let (opened, _) = agent.wait_for("finding-opened", Some("identity-missing"), Some("196864"), Duration::from_secs(10));
    assert_eq!(opened["cluster"], "cluster3", "{opened}");
    m.node.etcd_put("cilium/cache/identities/v1/cluster3/id/196864", &simmesh::labels("c3-app", "cluster3")).unwrap();
    agent.wait_for("finding-resolved", Some("identity-missing"), Some("196864"), Duration::from_secs(5));

    // Remote pods come and go, followed by Cilium: nothing opens.
    for i in 50..60 {
        let ip = format!("10.7.1.{i}");
        m.cluster2_put(&format!("cilium/state/ip/v1/default/{ip}"), &simmesh::ip_json(&ip, C2_WEB, C2_NODE_IP, "cluster2", "churn")).unwrap();
        m.node.ipcache_put(&format!("{ip}/32"), via(C2_WEB, C2_NODE_IP)).unwrap();
    }
    for i in 50..60 {
        let ip = format!("10.7.1.{i}");
        m.cluster2_del(&format!("cilium/state/ip/v1/default/{ip}")).unwrap();
        m.node.ipcache_delete(&format!("{ip}/32")).unwrap();
    }
    std::thread::sleep(Duration::from_secs(5));

    // cluster2 unreachable: degraded, its (now drifting) entries not judged; back: judged.
    m.cluster2.kill(0);
    let (st, _) = agent.wait_for("clustermesh-remote-status", None, None, Duration::from_secs(60));
    assert_eq!((st["cluster"].as_str(), st["status"].as_str()), (Some("cluster2"), Some("unreachable")), "{st}");
    m.node.ipcache_put("10.7.1.97/32", via(C2_WEB, C2_NODE_IP)).unwrap();
    let h = loop {
        let (h, _) = agent.wait_for("node-health", None, None, Duration::from_secs(10));
        if h["clustermesh"].as_str().is_some_and(|c| c.contains("cluster2: unreachable")) {
            break h;
        }
    };
    assert_eq!(h["status"], "degraded", "{h}");
    std::thread::sleep(Duration::from_secs(4));
    m.cluster2.restart(0).unwrap();
    agent.wait_for("clustermesh-remote-resumed", None, None, Duration::from_secs(40));
    let (opened, _) = agent.wait_for("finding-opened", Some("ipcache-stale"), Some("10.7.1.97/32"), Duration::from_secs(10));
    assert_eq!(opened["cluster"], "cluster2");
    m.node.ipcache_delete("10.7.1.97/32").unwrap();
    agent.wait_for("finding-resolved", Some("ipcache-stale"), Some("10.7.1.97/32"), Duration::from_secs(5));

    // cluster3 leaves the mesh and Cilium drains it at once: no finding about its entries.
    m.remove_config("cluster3").unwrap();
    for p in ["10.8.1.20/32", "10.8.1.1/32", "10.8.1.9/32", "10.5.1.135/32"] {
        m.node.ipcache_delete(p).unwrap();
    }
    m.node.maps.tunnel.as_ref().unwrap().delete(&kvcheck_tests::encode::tunnel_key("10.8.1.0".parse().unwrap())).unwrap();
    agent.wait_for("clustermesh-config-changed", None, None, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(5));
    let opened = agent.opened();
    let unexpected: Vec<_> = opened.iter().filter(|(k, s)| !matches!((k.as_str(), s.as_str()), ("ipcache-missing", "10.7.1.20/32") | ("identity-missing", "196864") | ("ipcache-stale", "10.7.1.97/32"))).collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(metrics().contains("kvcheck_clustermesh_remote_cluster_findings"), "{}", metrics());
}
