//! Cilium's state in the Kubernetes API (issue 21): identities as CiliumIdentity objects beside
//! a kvstore (Helm's default with etcd), and CRD mode (no kvstore: CiliumNodes and
//! CiliumEndpoints or CiliumEndpointSlices), read through the list protocol served by
//! `kvcheck_tests::k8sapi` over objects a real Cilium 1.16.15 wrote, against a simulated node's
//! real BPF maps.

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::pair;
use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::k8sapi::KubeApi;
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, NodeSpec, NODE_B_IP};
use kvcheck_tests::simnode::SimulatedNode;
use kvcheck_tests::simobjects;
use serde_json::{json, Value};

/// A ConfigMap directory as the DaemonSet mounts cilium-config: `identity-allocation-mode crd`,
/// and `kvstore etcd` unless CRD mode (Helm renders the key only with etcd).
fn config_map(node: &SimulatedNode, kvstore: bool) -> String {
    let dir = node.state_dir.join("config-map");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("identity-allocation-mode"), "crd").unwrap();
    if kvstore {
        std::fs::write(dir.join("kvstore"), "etcd").unwrap();
    } else {
        let _ = std::fs::remove_file(dir.join("kvstore"));
    }
    dir.display().to_string()
}

/// The hybrid (Helm with etcd): nodes and pod IPs in etcd, identities only as CiliumIdentity
/// objects; its ConfigMap directory.
fn hybrid_node() -> (SimulatedNode, KubeApi, String) {
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    node.etcd.etcdctl_ok(&["del", "--prefix", "cilium/state/identities/v1/"]).unwrap();
    let api = KubeApi::start();
    simobjects::serve_identities(&api);
    let cm = config_map(&node, true);
    (node, api, cm)
}

/// CRD mode: the whole cluster as objects; etcd is not Cilium's, so whatever it holds (nothing
/// here) must not matter.
fn crd_mode_node() -> (SimulatedNode, KubeApi, String) {
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    node.etcd.etcdctl_ok(&["del", "--prefix", "cilium/"]).unwrap();
    let api = KubeApi::start();
    simobjects::serve_cluster(&api, false, true);
    let cm = config_map(&node, false);
    (node, api, cm)
}

fn check(node: &SimulatedNode, api: &KubeApi, cm: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let kubeconfig = api.kubeconfig_str();
    let mut args = vec!["--output", "json", "--cilium-version", "1.16", "--cilium-config-map", cm, "--kubeconfig", &kubeconfig];
    if !extra.contains(&"--settle") {
        args.extend(["--settle", "0"]);
    }
    args.extend_from_slice(extra);
    let out = node.check(&args);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no JSON (exit {:?}): {}", out.status.code(), String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), doc)
}

fn kinds(doc: &Value) -> Vec<(String, String)> {
    doc["findings"].as_array().unwrap().iter().map(|f| pair(f["kind"].as_str().unwrap(), f["subject"].as_str().unwrap())).collect()
}

fn finding<'a>(doc: &'a Value, kind: &str, subject: &str) -> &'a Value {
    doc["findings"].as_array().unwrap().iter().find(|f| f["kind"] == kind && f["subject"] == subject).unwrap_or_else(|| panic!("no {kind} {subject}: {doc:#}"))
}

#[test]
fn hybrid_identities_are_checked_against_ciliumidentity_objects() {
    if !require_root("hybrid_identities_are_checked_against_ciliumidentity_objects") {
        return;
    }
    let (node, api, cm) = hybrid_node();

    let (code, doc) = check(&node, &api, &cm, &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let ids = &doc["sources"]["identities"];
    assert_eq!((ids["checked"].as_bool(), ids["source"].as_str(), ids["mode"].as_str()), (Some(true), Some("kubernetes"), Some("crd")), "{ids:#}");
    assert_eq!(doc["sources"]["endpoints"], "kvstore");
    assert!(doc["sources"]["kubernetes"]["resource_versions"]["ciliumidentities"].is_string(), "{doc:#}");

    // A CiliumIdentity deleted while a remote pod uses it: identity-missing naming the object.
    api.delete("ciliumidentities", "1002");
    let (code, doc) = check(&node, &api, &cm, &[]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![pair("identity-missing", "1002")]), "{doc:#}");
    let f = finding(&doc, "identity-missing", "1002");
    assert_eq!((f["source"].as_str(), f["kvstore"]["key"].as_str()), (Some("kubernetes"), Some("CiliumIdentity 1002")), "{f:#}");
    assert!(f["message"].as_str().unwrap().contains("CiliumIdentity 1002 does not exist"), "{f:#}");
    assert!(f["kvstore"]["used_by"].to_string().contains("cilium/state/ip/v1/default/10.2.0.31"), "{f:#}");

    // Without Kubernetes access: not checked, said why, no finding.
    let (code, doc) = check(&node, &api, &cm, &["--kubernetes", "off"]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let ids = &doc["sources"]["identities"];
    assert_eq!(ids["checked"].as_bool(), Some(false), "{ids:#}");
    assert!(ids["reason"].as_str().unwrap().contains("no Kubernetes API configured"), "{ids:#}");
    // RBAC refusing CiliumIdentities: the same, with the API's refusal.
    api.forbid("ciliumidentities");
    let (code, doc) = check(&node, &api, &cm, &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    assert!(doc["sources"]["identities"]["reason"].as_str().unwrap().contains("forbidden"), "{doc:#}");
    // Only reads.
    assert!(api.requests().iter().all(|(_, verb)| verb == "list"), "{:?}", api.requests());
}

#[test]
fn crd_mode_is_checked_from_the_kubernetes_api() {
    if !require_root("crd_mode_is_checked_from_the_kubernetes_api") {
        return;
    }
    let (node, api, cm) = crd_mode_node();

    // Consistent, paged one object at a time.
    let (code, doc) = check(&node, &api, &cm, &["--kube-page-size", "1"]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    assert_eq!((doc["sources"]["endpoints"].as_str(), doc["sources"]["identities"]["source"].as_str()), (Some("kubernetes"), Some("kubernetes")), "{doc:#}");
    let rvs = &doc["sources"]["kubernetes"]["resource_versions"];
    assert!(rvs["ciliumnodes"].is_string() && rvs["ciliumendpoints"].is_string(), "{doc:#}");
    let table = String::from_utf8_lossy(&node.check(&["--settle", "0", "--cilium-config-map", &cm, "--kubeconfig", &api.kubeconfig_str()]).stdout).into_owned();
    assert!(table.contains("CONSISTENT: the datapath agrees with Cilium's objects in the Kubernetes API") && table.contains("kvstore   not used (CRD mode"), "{table}");

    // A remote pod's entry deleted behind Cilium's back: missing, naming its CiliumEndpoint.
    node.ipcache_delete("10.2.0.30/32").unwrap();
    // An entry no object explains.
    let via_b = IpcacheValue { identity: 1000, tunnel_endpoint: NODE_B_IP.parse().ok(), ..Default::default() };
    node.ipcache_put("10.2.0.99/32", via_b).unwrap();
    let (code, doc) = check(&node, &api, &cm, &[]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![pair("ipcache-missing", "10.2.0.30/32"), pair("ipcache-stale", "10.2.0.99/32")]), "{doc:#}");
    let f = finding(&doc, "ipcache-missing", "10.2.0.30/32");
    assert_eq!((f["source"].as_str(), f["kvstore_keys"][0].as_str()), (Some("kubernetes"), Some("CiliumEndpoint shop/pod-30")), "{f:#}");
    assert!(f["message"].as_str().unwrap().contains("remote pod (CiliumEndpoint)"), "{f:#}");
    assert_eq!(f["kvstore"]["value"]["k8s_pod_name"], "pod-30", "{f:#}");
    let f = finding(&doc, "ipcache-stale", "10.2.0.99/32");
    assert!(f["message"].as_str().unwrap().contains("no CiliumEndpoint, CiliumNode or local address explains it"), "{f:#}");
    // Settling re-lists the objects (after at least 12 s: Cilium writes a CEP up to 10 s late)
    // and the drift persists, once each.
    let (code2, settled) = check(&node, &api, &cm, &["--settle", "1s"]);
    assert_eq!((code2, kinds(&settled)), (code, kinds(&doc)), "{settled:#}");
    assert_eq!(settled["settle"]["window_ms"], 12000, "{settled:#}");
    node.ipcache_put("10.2.0.30/32", via_b).unwrap();
    node.ipcache_delete("10.2.0.99/32").unwrap();

    // What Cilium cannot fix: a CEP on a node that is gone, one IP in two CEPs.
    api.put("ciliumendpoints", simobjects::endpoint("orphan", "10.3.0.5", None, 1000, 77, "192.168.50.99"));
    api.put("ciliumendpoints", simobjects::endpoint("twin", "10.2.0.30", None, 1000, 78, NODE_B_IP));
    let (code, doc) = check(&node, &api, &cm, &[]);
    let mut found = kinds(&doc);
    found.sort();
    assert_eq!(
        (code, found),
        (Some(1), vec![pair("endpoint-ip-conflict", "10.2.0.30"), pair("endpoint-node-unknown", "192.168.50.99"), pair("ipcache-missing", "10.3.0.5/32")]),
        "{doc:#}"
    );
    let f = finding(&doc, "endpoint-ip-conflict", "10.2.0.30");
    assert!(f["message"].as_str().unwrap().contains("shop/pod-30, shop/twin"), "{f:#}");
    api.delete("ciliumendpoints", "shop/orphan");
    api.delete("ciliumendpoints", "shop/twin");

    // A CiliumIdentity gone while a local pod uses it.
    api.delete("ciliumidentities", "1001");
    let (code, doc) = check(&node, &api, &cm, &[]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![pair("identity-missing", "1001")]), "{doc:#}");
    api.put("ciliumidentities", simobjects::identity(1001));

    // The same with CiliumEndpointSlices (the operator's batches) instead of CEPs.
    let ceps: Vec<Value> = kvcheck_tests::k8sapi::captured("v1.16.15-crd", "ciliumendpoints");
    assert_eq!(ceps.len(), 1, "the capture's one CEP");
    let slice = |name: &str, eps: &[(&str, &str, u32, &str)]| {
        let endpoints: Vec<Value> = eps.iter().map(|(n, ip, id, host)| json!({"name": n, "id": id, "networking": {"addressing": [{"ipv4": ip}], "node": host}, "encryption": {}})).collect();
        json!({"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumEndpointSlice", "metadata": {"name": name}, "namespace": "shop", "endpoints": endpoints})
    };
    use kvcheck_tests::simcluster::NODE_A_IP;
    api.put("ciliumendpointslices", slice("ces-web", &[("pod-20", "10.1.0.20", 1000, NODE_A_IP), ("pod-30", "10.2.0.30", 1000, NODE_B_IP)]));
    api.put("ciliumendpointslices", slice("ces-db", &[("pod-21", "10.1.0.21", 1001, NODE_A_IP)]));
    api.put("ciliumendpointslices", slice("ces-api", &[("pod-31", "10.2.0.31", 1002, NODE_B_IP)]));
    let (code, doc) = check(&node, &api, &cm, &["--endpoint-slices", "on"]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    assert_eq!(doc["sources"]["kubernetes"]["endpoint_slices"], true, "{doc:#}");
    node.ipcache_delete("10.2.0.31/32").unwrap();
    let (code, doc) = check(&node, &api, &cm, &["--endpoint-slices", "on"]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![pair("ipcache-missing", "10.2.0.31/32")]), "{doc:#}");
    assert_eq!(finding(&doc, "ipcache-missing", "10.2.0.31/32")["kvstore_keys"][0], "CiliumEndpoint shop/pod-31 (CiliumEndpointSlice ces-api)");

    // Without Kubernetes access CRD mode cannot be checked: exit 2, said why.
    let out = node.check(&["--settle", "0", "--cilium-config-map", &cm, "--kubernetes", "off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CRD mode") && stderr.contains("no Kubernetes API configured"), "{stderr}");
    // CiliumEndpoints refused by RBAC: exit 2 naming the resource.
    api.forbid("ciliumendpoints");
    let kubeconfig = api.kubeconfig_str();
    let out = node.check(&["--settle", "0", "--cilium-config-map", &cm, "--kubeconfig", &kubeconfig]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listing ciliumendpoints is forbidden"), "{stderr}");
    assert!(api.requests().iter().all(|(_, verb)| verb == "list"), "{:?}", api.requests());
}

#[test]
fn agent_in_crd_mode_watches_the_kubernetes_api() {
    if !require_root("agent_in_crd_mode_watches_the_kubernetes_api") {
        return;
    }
    use kvcheck_tests::agent::Agent;
    use std::time::Duration;
    let (node, api, cm) = crd_mode_node();
    let kubeconfig = api.kubeconfig_str();
    let started = std::time::Instant::now();
    let agent = Agent::start(&node, &["--cilium-config-map", &cm, "--kubeconfig", &kubeconfig, "--kube-page-size", "2"]);
    let h = agent.wait_health("ok", "not used (CRD mode)", Duration::from_secs(10));
    assert!(h["sources"].as_str().unwrap().contains("endpoints: kubernetes, identities: kubernetes (ciliumendpoints 4, ciliumidentities 3, ciliumnodes 2)"), "{h}");

    // Drift in the datapath: found within the grace period, naming the CiliumEndpoint.
    let via_b = IpcacheValue { identity: 1000, tunnel_endpoint: NODE_B_IP.parse().ok(), ..Default::default() };
    agent.opens_and_resolves("ipcache-missing", "10.2.0.30/32", || node.ipcache_delete("10.2.0.30/32").unwrap(), || node.ipcache_put("10.2.0.30/32", via_b).unwrap());

    // Normal pod churn: a pod's CEP and its ipcache entry arrive together, then go together.
    for i in 0..5u32 {
        let ip = format!("10.2.0.{}", 100 + i);
        api.put("ciliumendpoints", simobjects::endpoint(&format!("churn-{i}"), &ip, None, 1002, 100 + i, NODE_B_IP));
        node.ipcache_put(&format!("{ip}/32"), IpcacheValue { identity: 1002, ..via_b }).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5u32 {
        api.delete("ciliumendpoints", &format!("shop/churn-{i}"));
        node.ipcache_delete(&format!("10.2.0.{}/32", 100 + i)).unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.opened(), vec![pair("ipcache-missing", "10.2.0.30/32")], "churn opened findings");

    // A CEP deleted behind Cilium's back leaves its entry stale; the object's return resolves it.
    let pod31 = api.requests().len();
    agent.opens_and_resolves(
        "ipcache-stale",
        "10.2.0.31/32",
        || api.delete("ciliumendpoints", "shop/pod-31"),
        || api.put("ciliumendpoints", simobjects::endpoint("pod-31", "10.2.0.31", None, 1002, 31, NODE_B_IP)),
    );
    // The watch, not relists, carried that.
    let lists_after = api.requests()[pod31..].iter().filter(|(_, v)| v == "list").count();
    assert_eq!(lists_after, 0, "{:?}", api.requests());

    // Idle watches stay open past --kube-timeout (10 s): like a real apiserver, the test server
    // sends nothing on an idle watch for a minute (a real kube-apiserver broke watches that a
    // read timeout of 10 s cut every 10 s).
    std::thread::sleep(Duration::from_secs(13).saturating_sub(started.elapsed()));
    assert_eq!(agent.count("kubernetes-watch-error"), 0);
    assert_eq!(api.requests().iter().filter(|(_, v)| v == "watch").count(), 3, "one watch per kind: {:?}", api.requests());

    // A compacted watch: the watcher relists (and stays consistent).
    api.compact();
    let (_, _) = agent.wait_for("kubernetes-relist", None, None, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.opened().len(), 2, "{:?}", agent.opened());
    let metrics = kvcheck_tests::agent::http_get(agent.port, "/metrics").unwrap().1;
    assert!(metrics.contains("kind=\"endpoints\",source=\"kubernetes\"} 1"), "{metrics}");
    assert!(metrics.contains("resource=\"ciliumendpoints\"} 4"), "{metrics}");
    assert!(api.requests().iter().all(|(_, verb)| verb == "list" || verb == "watch"));
}

#[test]
fn agent_in_the_hybrid_watches_ciliumidentities() {
    if !require_root("agent_in_the_hybrid_watches_ciliumidentities") {
        return;
    }
    use kvcheck_tests::agent::Agent;
    use std::time::Duration;
    let (node, api, cm) = hybrid_node();
    let kubeconfig = api.kubeconfig_str();
    let agent = Agent::start(&node, &["--cilium-config-map", &cm, "--kubeconfig", &kubeconfig]);
    let h = agent.wait_health("ok", "1/1 connected", Duration::from_secs(10));
    assert!(h["sources"].as_str().unwrap().contains("endpoints: kvstore, identities: kubernetes (ciliumidentities 3)"), "{h}");
    // A CiliumIdentity deleted while a remote pod uses it, then restored.
    agent.opens_and_resolves("identity-missing", "1002", || api.delete("ciliumidentities", "1002"), || api.put("ciliumidentities", simobjects::identity(1002)));
    assert_eq!(agent.opened(), vec![pair("identity-missing", "1002")]);
}
