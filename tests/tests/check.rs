//! `kvcheck check` end to end: real maps in a private bpffs, a real netns with cilium_host,
//! a real etcd. Consistent nodes check clean; each finding kind comes from exactly one
//! injected drift; a drift repaired within the settle window is not reported.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, EndpointValue, IpcacheValue};
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{self, consistent_node, NodeSpec, HEALTH_A, NODE_A, NODE_A_IP, NODE_B_IP, ROUTER_A};
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

fn check(node: &SimulatedNode, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["--settle", "0", "--output", "json"];
    args.extend_from_slice(extra);
    let out = node.check(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no JSON; exit {:?}; stderr: {stderr}", out.status.code()));
    (out.status.code(), doc)
}

fn kinds_and_subjects(doc: &Value) -> BTreeSet<(String, String)> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["kind"].as_str().unwrap().to_owned(), f["subject"].as_str().unwrap().to_owned()))
        .collect()
}

fn release(layout: Layout) -> &'static str {
    match layout {
        Layout::V1_7 => "1.13",
        Layout::V1_14 => "1.14",
        Layout::V1_15 => "1.16",
        Layout::V1_17 => "1.17",
        Layout::V1_18 => "1.18",
        Layout::V1_19 => "1.19",
        Layout::V1_20 => "1.20",
    }
}

#[test]
fn consistent_nodes_check_clean_in_every_layout_family() {
    if !require_root("consistent_nodes_check_clean_in_every_layout_family") {
        return;
    }
    for layout in [Layout::V1_7, Layout::V1_15, Layout::V1_18] {
        for dual in [false, true] {
            let node = consistent_node(NodeSpec::new(layout, dual)).unwrap();
            let (code, doc) = check(&node, &["--cilium-version", release(layout)]);
            assert_eq!(doc["findings"], serde_json::json!([]), "{layout} dual={dual}: {:#}", doc["findings"]);
            assert_eq!(code, Some(0), "{layout} dual={dual}");
            assert_eq!(doc["status"], "consistent");
            assert_eq!(doc["node"]["name"], NODE_A);
            assert_eq!(doc["sources"]["datapath"]["layout"]["layout"], layout.name());
            assert!(doc["sources"]["kvstore"]["status"].as_str().unwrap().starts_with("etcd: 1/1 connected"));
        }
    }
}

#[test]
fn real_cilium_1_7_1_node_checks_clean_and_reports_a_missing_remote_pod() {
    if !require_root("real_cilium_1_7_1_node_checks_clean_and_reports_a_missing_remote_pod") {
        return;
    }
    let node = SimulatedNode::real_1_7_1().unwrap();
    let (code, doc) = check(&node, &["--cilium-version", "1.7"]);
    assert_eq!((code, &doc["findings"]), (Some(0), &serde_json::json!([])), "{doc:#}");

    // The capture's remote pod was put into etcd by hand without its identity: that is drift
    // (this node's policy needs the labels of every identity its ipcache carries).
    node.etcd_del(kvcheck_tests::simnode::HAND_PUT_IDENTITY.0).unwrap();
    let (code, doc) = check(&node, &["--cilium-version", "1.7"]);
    assert_eq!((code, kinds_and_subjects(&doc)), (Some(1), BTreeSet::from([("identity-missing".to_owned(), "12928".to_owned())])), "{doc:#}");
    assert_eq!(doc["findings"][0]["datapath"]["prefixes"], serde_json::json!(["10.6.7.20/32"]));
    node.etcd_put(kvcheck_tests::simnode::HAND_PUT_IDENTITY.0, kvcheck_tests::simnode::HAND_PUT_IDENTITY.1).unwrap();

    node.ipcache_delete("10.6.7.20/32").unwrap();
    let (code, doc) = check(&node, &["--cilium-version", "1.7"]);
    assert_eq!(code, Some(1));
    assert_eq!(kinds_and_subjects(&doc), BTreeSet::from([("ipcache-missing".to_owned(), "10.6.7.20/32".to_owned())]));
    let f = &doc["findings"][0];
    assert_eq!(f["severity"], "critical");
    assert_eq!(f["kvstore"]["key"], "cilium/state/ip/v1/default/10.6.7.20");
    assert_eq!(f["kvstore"]["value"]["identity"], 12928);
    assert_eq!(f["expected"]["tunnel_endpoints"], serde_json::json!(["10.5.1.133"]));
}

/// Issue 11: the bytes, keys and addresses a real Cilium 1.16.15 agent wrote check clean, and
/// one drift of each datapath kind injected into them is found (and only it).
#[test]
fn real_cilium_1_16_15_node_checks_clean_and_each_datapath_drift_is_found() {
    if !require_root("real_cilium_1_16_15_node_checks_clean_and_each_datapath_drift_is_found") {
        return;
    }
    let node = SimulatedNode::real_1_16_15().unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, &doc["findings"]), (Some(0), &serde_json::json!([])), "{doc:#}");
    // Without ClusterMesh a v1.16 node's bytes also fit v1.17; detection must name v1.16.
    let layout = &doc["sources"]["datapath"]["layout"];
    let named: Vec<&Value> = std::iter::once(&layout["layout"]).chain(layout["also_possible"].as_array().into_iter().flatten()).collect();
    assert!(named.contains(&&serde_json::json!("v1.15-v1.16")), "{layout:#}");
    drop(node);

    let remote = || IpcacheValue { identity: 12928, tunnel_endpoint: Some(ip("10.5.1.133")), ..Default::default() };
    // pod-a's endpoint entry as Cilium wrote it, with another identity at bytes 32..36.
    let pod_a_with = |identity: u32| {
        let s = kvcheck_tests::sample::sections(kvcheck_tests::sample::REAL_1_16_15);
        let entries = kvcheck_tests::sample::bpftool_entries(kvcheck_tests::sample::section(&s, "globals/cilium_lxc"));
        let (k, mut v) = entries.into_iter().find(|(k, _)| k[..4] == [10, 6, 1, 28]).unwrap();
        v[32..36].copy_from_slice(&identity.to_le_bytes());
        (k, v)
    };
    type Inject = Box<dyn Fn(&SimulatedNode)>;
    let cases: Vec<(&str, &str, Inject)> = vec![
        ("ipcache-missing", "10.6.7.20/32", Box::new(|n| n.ipcache_delete("10.6.7.20/32").unwrap())),
        ("ipcache-stale", "10.6.7.99/32", Box::new(move |n| n.ipcache_put("10.6.7.99/32", remote()).unwrap())),
        ("ipcache-identity-mismatch", "10.6.7.20/32", Box::new(move |n| n.ipcache_put("10.6.7.20/32", IpcacheValue { identity: 16195, ..remote() }).unwrap())),
        ("ipcache-tunnel-mismatch", "10.6.7.20/32", Box::new(move |n| n.ipcache_put("10.6.7.20/32", IpcacheValue { tunnel_endpoint: Some(ip("10.5.1.200")), ..remote() }).unwrap())),
        ("kvstore-ghost-endpoint", "10.6.1.28", Box::new(|n| n.endpoint_delete("10.6.1.28").unwrap())),
        ("endpoint-identity-mismatch", "10.6.1.28", Box::new(move |n| {
            let (k, v) = pod_a_with(12928);
            n.maps.endpoints.update(&k, &v).unwrap();
        })),
        ("tunnel-missing", "10.6.7.0", Box::new(|n| n.maps.tunnel.as_ref().unwrap().delete(&encode::tunnel_key(ip("10.6.7.0"))).unwrap())),
        ("tunnel-mismatch", "10.6.7.0", Box::new(|n| tunnel(n, "10.6.7.0", "10.5.1.200"))),
        ("tunnel-stale", "10.6.9.0", Box::new(|n| tunnel(n, "10.6.9.0", "10.5.1.133"))),
        // Only a remote pod uses identity 12928 here: its labels are still needed on this node.
        ("identity-missing", "12928", Box::new(|n| n.etcd_del("cilium/state/identities/v1/id/12928").unwrap())),
    ];
    for (kind, subject, inject) in cases {
        let node = SimulatedNode::real_1_16_15().unwrap();
        inject(&node);
        let (code, doc) = check(&node, &[]);
        assert_eq!(code, Some(1), "{kind}: {doc:#}");
        let mut want = BTreeSet::from([(kind.to_owned(), subject.to_owned())]);
        if kind == "endpoint-identity-mismatch" {
            // The endpoint now uses 12928, for which this node holds no reference key.
            want.insert(("identity-reference-missing".to_owned(), "12928".to_owned()));
        }
        assert_eq!(kinds_and_subjects(&doc), want, "{kind}: {:#}", doc["findings"]);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A drift, how to repair it, the kind it must produce and every subject it may touch.
struct Case {
    kind: &'static str,
    subject: &'static str,
    /// Other (kind, subject) pairs the same drift rightly shows as.
    also: &'static [(&'static str, &'static str)],
    inject: Box<dyn Fn(&SimulatedNode)>,
    repair: Box<dyn Fn(&SimulatedNode)>,
}

fn ipc(node: &SimulatedNode, prefix: &str, v: IpcacheValue) {
    node.ipcache_put(prefix, v).unwrap();
}

fn via_b(id: u32) -> IpcacheValue {
    IpcacheValue { identity: id, tunnel_endpoint: Some(ip(NODE_B_IP)), ..Default::default() }
}

fn lxc(node: &SimulatedNode, addr: &str, v: EndpointValue) {
    node.maps.endpoints.update(&encode::endpoint_key(ip(addr)), &encode::endpoint_value(node.layout, v)).unwrap();
}

fn pod_a(identity: u32) -> EndpointValue {
    EndpointValue { ifindex: 20, endpoint_id: 20, identity, mac: [2, 0, 0, 0, 0, 20], node_mac: [2, 0, 0, 0, 1, 20], ..Default::default() }
}

fn tunnel(node: &SimulatedNode, cidr: &str, to: &str) {
    let t = node.maps.tunnel.as_ref().unwrap();
    t.update(&encode::tunnel_key(ip(cidr)), &encode::tunnel_value(ip(to), 0)).unwrap();
}

fn value_key(id: u32, node_ip: &str) -> String {
    let labels = simcluster::IDENTITIES.iter().find(|(i, _)| *i == id).unwrap().1;
    format!("cilium/state/identities/v1/value/{labels}/{node_ip}")
}

fn cases() -> Vec<Case> {
    let node_a_key = format!("cilium/state/nodes/v1/default/{NODE_A}");
    let node_a_key2 = node_a_key.clone();
    vec![
        Case { kind: "ipcache-missing", subject: "10.2.0.30/32", also: &[],
            inject: Box::new(|n| n.ipcache_delete("10.2.0.30/32").unwrap()),
            repair: Box::new(|n| ipc(n, "10.2.0.30/32", via_b(1000))) },
        Case { kind: "ipcache-stale", subject: "10.9.9.9/32", also: &[],
            inject: Box::new(|n| ipc(n, "10.9.9.9/32", via_b(1000))),
            repair: Box::new(|n| n.ipcache_delete("10.9.9.9/32").unwrap()) },
        Case { kind: "ipcache-identity-mismatch", subject: "10.2.0.30/32", also: &[],
            inject: Box::new(|n| ipc(n, "10.2.0.30/32", via_b(1002))),
            repair: Box::new(|n| ipc(n, "10.2.0.30/32", via_b(1000))) },
        Case { kind: "ipcache-tunnel-mismatch", subject: "10.2.0.30/32", also: &[],
            inject: Box::new(|n| ipc(n, "10.2.0.30/32", IpcacheValue { identity: 1000, tunnel_endpoint: Some(ip("192.168.50.99")), ..Default::default() })),
            repair: Box::new(|n| ipc(n, "10.2.0.30/32", via_b(1000))) },
        Case { kind: "ipcache-encrypt-key-mismatch", subject: "10.2.0.30/32", also: &[],
            inject: Box::new(|n| ipc(n, "10.2.0.30/32", IpcacheValue { encrypt_key: 3, ..via_b(1000) })),
            repair: Box::new(|n| ipc(n, "10.2.0.30/32", via_b(1000))) },
        Case { kind: "endpoint-not-in-kvstore", subject: "10.1.0.21", also: &[("ipcache-stale", "10.1.0.21/32")],
            inject: Box::new(|n| n.etcd_del("cilium/state/ip/v1/default/10.1.0.21").unwrap()),
            repair: Box::new(|n| n.etcd_put("cilium/state/ip/v1/default/10.1.0.21", &simcluster::ip_json("10.1.0.21", NODE_A_IP, 1001, NODE_A, 21)).unwrap()) },
        Case { kind: "endpoint-identity-mismatch", subject: "10.1.0.20", also: &[("identity-reference-missing", "1002")],
            inject: Box::new(|n| lxc(n, "10.1.0.20", pod_a(1002))),
            repair: Box::new(|n| lxc(n, "10.1.0.20", pod_a(1000))) },
        Case { kind: "kvstore-ghost-endpoint", subject: "10.1.0.77", also: &[("ipcache-missing", "10.1.0.77/32")],
            inject: Box::new(|n| n.etcd_put("cilium/state/ip/v1/default/10.1.0.77", &simcluster::ip_json("10.1.0.77", NODE_A_IP, 1000, NODE_A, 77)).unwrap()),
            repair: Box::new(|n| n.etcd_del("cilium/state/ip/v1/default/10.1.0.77").unwrap()) },
        Case { kind: "identity-missing", subject: "1001", also: &[],
            inject: Box::new(|n| n.etcd_del("cilium/state/identities/v1/id/1001").unwrap()),
            repair: Box::new(|n| n.etcd_put("cilium/state/identities/v1/id/1001", simcluster::IDENTITIES[1].1).unwrap()) },
        Case { kind: "identity-reference-missing", subject: "1001", also: &[],
            inject: Box::new(|n| n.etcd_del(&value_key(1001, NODE_A_IP)).unwrap()),
            repair: Box::new(|n| n.etcd_put(&value_key(1001, NODE_A_IP), "1001").unwrap()) },
        Case { kind: "identity-reference-leaked", subject: "1002", also: &[],
            inject: Box::new(|n| n.etcd_put(&value_key(1002, NODE_A_IP), "1002").unwrap()),
            repair: Box::new(|n| n.etcd_del(&value_key(1002, NODE_A_IP)).unwrap()) },
        Case { kind: "node-missing", subject: NODE_A, also: &[],
            inject: Box::new(move |n| n.etcd_del(&node_a_key).unwrap()),
            repair: Box::new(move |n| {
                let s = simcluster_node_a_json();
                n.etcd_put(&node_a_key2, &s).unwrap();
            }) },
        Case { kind: "cilium-host-missing", subject: "cilium_host", also: &[],
            inject: Box::new(|n| n.netns.exec(&["ip", "link", "del", "cilium_host"]).unwrap()),
            repair: Box::new(|n| n.netns.add_cilium_host(&[&format!("{ROUTER_A}/32")]).unwrap()) },
        Case { kind: "cilium-host-mismatch", subject: "cilium_host IPv4", also: &[],
            inject: Box::new(|n| {
                n.netns.exec(&["ip", "addr", "del", &format!("{ROUTER_A}/32"), "dev", "cilium_host"]).unwrap();
                n.netns.add_address("cilium_host", "10.1.0.99/32").unwrap();
            }),
            repair: Box::new(|n| {
                n.netns.exec(&["ip", "addr", "del", "10.1.0.99/32", "dev", "cilium_host"]).unwrap();
                n.netns.add_address("cilium_host", &format!("{ROUTER_A}/32")).unwrap();
            }) },
        Case { kind: "node-ip-not-local", subject: NODE_A_IP, also: &[],
            inject: Box::new(|n| n.netns.exec(&["ip", "addr", "del", &format!("{NODE_A_IP}/24"), "dev", "eth0"]).unwrap()),
            repair: Box::new(|n| n.netns.add_address("eth0", &format!("{NODE_A_IP}/24")).unwrap()) },
        Case { kind: "podcidr-violation", subject: "10.7.0.5", also: &[],
            inject: Box::new(|n| {
                n.etcd_put("cilium/state/ip/v1/default/10.7.0.5", &simcluster::ip_json("10.7.0.5", NODE_A_IP, 1000, NODE_A, 75)).unwrap();
                ipc(n, "10.7.0.5/32", IpcacheValue { identity: 1000, ..Default::default() });
                lxc(n, "10.7.0.5", EndpointValue { ifindex: 75, endpoint_id: 75, identity: 1000, ..Default::default() });
            }),
            repair: Box::new(|n| {
                n.etcd_del("cilium/state/ip/v1/default/10.7.0.5").unwrap();
                n.ipcache_delete("10.7.0.5/32").unwrap();
                n.endpoint_delete("10.7.0.5").unwrap();
            }) },
        Case { kind: "health-endpoint-missing", subject: HEALTH_A, also: &[("kvstore-ghost-endpoint", HEALTH_A)],
            inject: Box::new(|n| n.endpoint_delete(HEALTH_A).unwrap()),
            repair: Box::new(|n| lxc(n, HEALTH_A, EndpointValue { ifindex: 5, endpoint_id: simcluster::HEALTH_ENDPOINT_ID, identity: 4, mac: [2, 0, 0, 0, 0, 5], node_mac: [2, 0, 0, 0, 1, 5], ..Default::default() })) },
        Case { kind: "tunnel-missing", subject: "10.2.0.0", also: &[],
            inject: Box::new(|n| n.maps.tunnel.as_ref().unwrap().delete(&encode::tunnel_key(ip("10.2.0.0"))).unwrap()),
            repair: Box::new(|n| tunnel(n, "10.2.0.0", NODE_B_IP)) },
        Case { kind: "tunnel-stale", subject: "10.99.0.0", also: &[],
            inject: Box::new(|n| tunnel(n, "10.99.0.0", NODE_B_IP)),
            repair: Box::new(|n| n.maps.tunnel.as_ref().unwrap().delete(&encode::tunnel_key(ip("10.99.0.0"))).unwrap()) },
        Case { kind: "tunnel-mismatch", subject: "10.2.0.0", also: &[],
            inject: Box::new(|n| tunnel(n, "10.2.0.0", "192.168.50.99")),
            repair: Box::new(|n| tunnel(n, "10.2.0.0", NODE_B_IP)) },
        Case { kind: "kvstore-malformed", subject: "cilium/state/ip/v1/default/10.2.0.40", also: &[],
            inject: Box::new(|n| n.etcd_put("cilium/state/ip/v1/default/10.2.0.40", "{\"IP\":").unwrap()),
            repair: Box::new(|n| n.etcd_del("cilium/state/ip/v1/default/10.2.0.40").unwrap()) },
        Case { kind: "kvstore-not-synced", subject: "c2", also: &[],
            inject: Box::new(|n| n.etcd_put("cilium/synced/c2/cilium/state/nodes/v1", "2026-11-24T12:00:00Z").unwrap()),
            repair: Box::new(|n| n.etcd_del("cilium/synced/c2/cilium/state/nodes/v1").unwrap()) },
        Case { kind: "heartbeat-stale", subject: "cilium/.heartbeat", also: &[],
            inject: Box::new(|n| n.etcd_put("cilium/.heartbeat", "2020-01-01T00:00:00Z").unwrap()),
            repair: Box::new(|n| n.etcd_put("cilium/.heartbeat", &chrono_now()).unwrap()) },
    ]
}

fn chrono_now() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn simcluster_node_a_json() -> String {
    // The same JSON consistent_node wrote for node-a (IPv4 only).
    format!(
        r#"{{"Name":"{NODE_A}","Cluster":"default","IPAddresses":[{{"Type":"InternalIP","IP":"{NODE_A_IP}"}},{{"Type":"CiliumInternalIP","IP":"{ROUTER_A}"}}],"IPv4AllocCIDR":{{"IP":"10.1.0.0","Mask":"////AA=="}},"IPv6AllocCIDR":null,"IPv4HealthIP":"{HEALTH_A}","IPv6HealthIP":"","ClusterID":0,"Source":"local","EncryptionKey":0}}"#
    )
}

#[test]
fn each_finding_kind_from_one_injected_drift() {
    if !require_root("each_finding_kind_from_one_injected_drift") {
        return;
    }
    // v1.16 layout, IPv4, tunnel mode: every kind but map-pressure (below) applies.
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let args = ["--cilium-version", "1.16"];
    assert_eq!(check(&node, &args).0, Some(0), "baseline not clean: {:#}", check(&node, &args).1);
    let mut covered = BTreeSet::new();
    for case in cases() {
        (case.inject)(&node);
        let (code, doc) = check(&node, &args);
        let got = kinds_and_subjects(&doc);
        let wanted = (case.kind.to_owned(), case.subject.to_owned());
        assert!(got.contains(&wanted), "{}: expected {wanted:?}, got {got:?}", case.kind);
        let allowed: BTreeSet<(String, String)> =
            std::iter::once(wanted.clone()).chain(case.also.iter().map(|(k, s)| ((*k).to_owned(), (*s).to_owned()))).collect();
        let extra: Vec<_> = got.difference(&allowed).collect();
        assert!(extra.is_empty(), "{}: findings about subjects the drift does not touch: {extra:?}", case.kind);
        assert_eq!(code, Some(1), "{}", case.kind);
        let f = doc["findings"].as_array().unwrap().iter().find(|f| f["kind"] == case.kind).unwrap();
        assert!(!f["message"].as_str().unwrap().is_empty());
        assert!(f["datapath"].is_object() || f["kvstore"].is_object(), "{}: no evidence: {f}", case.kind);
        (case.repair)(&node);
        let (code, doc) = check(&node, &args);
        assert_eq!(code, Some(0), "{}: not clean after repair: {:#}", case.kind, doc["findings"]);
        covered.insert(case.kind);
    }

    // map-pressure: a node whose ipcache is sized for exactly what it holds.
    let full = consistent_node(NodeSpec { ipcache_max: Some(12), ..NodeSpec::new(Layout::V1_15, false) }).unwrap();
    let (code, doc) = check(&full, &args);
    assert_eq!(code, Some(1));
    let cilium_ipcache = ("map-pressure".to_owned(), "cilium_ipcache".to_owned());
    assert_eq!(kinds_and_subjects(&doc), BTreeSet::from([cilium_ipcache]), "{doc:#}");
    covered.insert("map-pressure");
    // datapath-map-mismatch needs BPF programs attached to the node's interfaces: its cases are
    // in tests/tests/livemaps.rs.
    covered.insert("datapath-map-mismatch");
    // The CiliumEndpoint kinds exist in CRD mode only: tests/tests/k8s.rs.
    covered.extend(["endpoint-node-unknown", "endpoint-ip-conflict"]);
    // The ClusterMesh kinds need remote clusters: tests/tests/clustermesh.rs.
    covered.extend(["ipcache-unknown-cluster", "remote-identity-invalid", "clustermesh-ip-overlap", "remote-cluster-config-invalid"]);

    let all: BTreeSet<&str> = kvcheck::check::kinds::FindingKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(covered, all, "kinds without an end-to-end test");
}

#[test]
fn drift_repaired_within_the_settle_window_is_not_reported() {
    if !require_root("drift_repaired_within_the_settle_window_is_not_reported") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    node.ipcache_put("10.9.9.9/32", via_b(1000)).unwrap();
    let mut args = node.check_args();
    args.extend(["--settle", "3s", "--output", "json", "--cilium-version", "1.16"].map(String::from));
    let child = std::process::Command::new(kvcheck_tests::kvcheck_bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    node.ipcache_delete("10.9.9.9/32").unwrap();
    let out = child.wait_with_output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{doc:#}");
    assert_eq!(doc["findings"], serde_json::json!([]));
    assert_eq!(doc["settle"]["settled"], serde_json::json!([["ipcache-stale", "10.9.9.9/32"]]));

    // A drift that persists through the window is reported, with the re-read revision.
    node.ipcache_put("10.9.9.9/32", via_b(1000)).unwrap();
    let (code, doc) = {
        let out = node.check(&["--settle", "500ms", "--output", "json", "--cilium-version", "1.16"]);
        (out.status.code(), serde_json::from_slice::<Value>(&out.stdout).unwrap())
    };
    assert_eq!(code, Some(1));
    assert_eq!(kinds_and_subjects(&doc), BTreeSet::from([("ipcache-stale".to_owned(), "10.9.9.9/32".to_owned())]));
    assert!(doc["settle"]["reread_revision"].as_i64().is_some());
    node.ipcache_delete("10.9.9.9/32").unwrap();

    // A pod that lives within the window: its entry ahead of its key at the first read, still
    // there after the key's delete at the second (Cilium's lag, both times). The key's history
    // between the reads says it lived: settled, not drift.
    node.ipcache_put("10.9.9.10/32", via_b(1000)).unwrap();
    let child = std::process::Command::new(kvcheck_tests::kvcheck_bin()).args(&args).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let key = "cilium/state/ip/v1/default/10.9.9.10";
    node.etcd_put(key, &simcluster::ip_json("10.9.9.10", NODE_B_IP, 1000, "node-b", 10)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    node.etcd_del(key).unwrap();
    let out = child.wait_with_output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((out.status.code(), &doc["findings"]), (Some(0), &serde_json::json!([])), "{doc:#}");
    assert_eq!(doc["settle"]["settled"], serde_json::json!([["ipcache-stale", "10.9.9.10/32"]]));
}

#[test]
fn could_not_check_exits_2() {
    if !require_root("could_not_check_exits_2") {
        return;
    }
    let mut node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    node.etcd.kill(0);
    let out = node.check(&["--etcd-timeout", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no etcd endpoint answered"));
}

/// `kvcheck completions <shell>` and `kvcheck man [DIR]`: scripts that name the commands, and
/// one page per command.
#[test]
fn completions_and_man_pages() {
    let run = |args: &[&str]| std::process::Command::new(kvcheck_tests::kvcheck_bin()).args(args).output().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && ["check", "dump", "agent", "explain", "etcd-config"].iter().all(|w| script.contains(w)), "{shell}: {script}");
    }
    assert_ne!(run(&["completions", "tcsh"]).status.code(), Some(0));
    let page = run(&["man"]);
    assert!(page.status.success() && String::from_utf8_lossy(&page.stdout).starts_with(".ie"), "{page:?}");
    let dir = std::env::temp_dir().join(format!("kvcheck-man-{}", std::process::id()));
    assert!(run(&["man", dir.to_str().unwrap()]).status.success());
    for page in ["kvcheck.1", "kvcheck-check.1", "kvcheck-agent.1", "kvcheck-dump-kvstore.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
