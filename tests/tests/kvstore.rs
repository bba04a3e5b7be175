//! The kvstore reader against real etcd servers (Debian's etcd 3.4): single plaintext member
//! and a 3-member cluster with TLS client-certificate auth.

use std::time::{Duration, Instant};

use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::{require_root, run_kvcheck, sample};
use serde_json::{json, Value};

/// The real Cilium 1.7.1 keys, clustermesh-apiserver samples, a heartbeat, and three
/// malformed values the reader must report and read past.
fn seed() -> Vec<(String, String)> {
    let s = sample::sections(sample::REAL_1_7_1);
    let mut pairs = sample::etcd_pairs(sample::section(&s, "etcdctl get --prefix cilium/"));
    let more = [
        ("cilium/state/nodes/v1/cluster3/test-node-1", r#"{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},{"Type":"InternalIP","IP":"fc00:c111::2"},{"Type":"CiliumInternalIP","IP":"10.244.0.10"},{"Type":"CiliumInternalIP","IP":"fd00:10:244::e2d6"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.0.134","IPv6HealthIP":"fd00:10:244::d812","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":{"kubernetes.io/hostname":"test-node-1"},"Annotations":null,"NodeIdentity":0,"WireguardPubKey":"","BootID":"570d3fd1-93db-4862-ba99-6a3c2c10c38f"}"#),
        ("cilium/state/ip/v1/default/10.244.2.74", r#"{"IP":"10.244.2.74","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-002"}"#),
        ("cilium/state/ip/v1/default/fd00:10:244:1::d643", r#"{"IP":"fd00:10:244:1::d643","Mask":null,"HostIP":"172.18.0.3","ID":199472,"Key":0,"Metadata":"","K8sNamespace":"foo","K8sPodName":"cep-001"}"#),
        ("cilium/state/identities/v1/id/199472", "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;"),
        ("cilium/.heartbeat", "2026-11-24T12:00:00Z"),
        ("cilium/synced/cluster3/cilium/state/nodes/v1", "2026-11-24T11:00:00Z"),
        // Malformed: bad JSON, an IP whose value disagrees with its key, a non-numeric identity.
        ("cilium/state/nodes/v1/default/broken", "{not json"),
        ("cilium/state/ip/v1/default/10.6.1.50", r#"{"IP":"10.6.1.51","Mask":null,"HostIP":"10.5.1.132","ID":13110,"Key":0}"#),
        ("cilium/state/identities/v1/id/notanumber", "k8s:app=x;"),
    ];
    pairs.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    pairs
}

fn dump(args: &[&str]) -> (Option<i32>, Value, String, Duration) {
    let mut all = vec!["dump", "kvstore", "--node-name", "k8s-node1", "--etcd-timeout", "2", "--output", "json"];
    all.extend_from_slice(args);
    let start = Instant::now();
    let out = run_kvcheck(None, &all);
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), doc, stderr, elapsed)
}

fn assert_sample_view(doc: &Value) {
    assert_eq!(doc["node"]["name"], "k8s-node1", "{doc}");
    assert_eq!(doc["node"]["addresses"], json!([{"type":"InternalIP","ip":"10.5.1.132"},{"type":"CiliumInternalIP","ip":"10.6.1.124"}]));
    assert_eq!(doc["node"]["ipv4_alloc_cidr"], "10.6.1.0/24");
    let ips: Vec<&str> = doc["ips"].as_array().unwrap().iter().map(|e| e["prefix"].as_str().unwrap()).collect();
    assert_eq!(ips, vec!["10.6.1.221/32"]);
    assert_eq!(doc["ips"][0]["k8s_pod_name"], "pod-a");
    assert_eq!(doc["identities"], json!([{"id": 13110, "labels": "unspec:app=foo;reserved:init=;"}]));
    assert_eq!(doc["totals"]["nodes"], 3);
    assert_eq!(doc["totals"]["ips"], 4);
    assert_eq!(doc["totals"]["identities"], 2);
    assert_eq!(doc["totals"]["identity_references"], 1);
    assert_eq!(doc["heartbeat"], "2026-11-24T12:00:00Z");
    assert!(doc["heartbeat_age_seconds"].as_i64().is_some());
    // The malformed values are items with their key and reason; the read went on past them.
    let malformed: Vec<(&str, &str)> = doc["malformed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["key"].as_str().unwrap(), m["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(malformed.len(), 3, "{malformed:?}");
    let reason = |key: &str| malformed.iter().find(|(k, _)| *k == key).map(|(_, r)| *r).unwrap_or_else(|| panic!("{key} not malformed"));
    assert!(reason("cilium/state/nodes/v1/default/broken").contains("node JSON"));
    assert!(reason("cilium/state/ip/v1/default/10.6.1.50").contains("value is for 10.6.1.51/32 but the key names 10.6.1.50/32"));
    assert!(reason("cilium/state/identities/v1/id/notanumber").contains("not a number"));
}

#[test]
fn single_member_reads_cilium_samples_and_reports_malformed_values() {
    if !require_root("single_member_reads_cilium_samples_and_reports_malformed_values") {
        return;
    }
    let etcd = EtcdCluster::single().unwrap();
    etcd.put_all(&seed()).unwrap();
    let (code, doc, stderr, _) = dump(&["--etcd-endpoints", &etcd.endpoints_arg()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_sample_view(&doc);
    let status = doc["status"].as_str().unwrap();
    assert!(status.starts_with(&format!("etcd: 1/1 connected, leader {}, revision ", etcd.endpoints()[0])), "{status}");

    // ETCDCTL_ENDPOINTS works the same (etcdctl's own environment).
    let out = std::process::Command::new(kvcheck_tests::kvcheck_bin())
        .args(["dump", "kvstore", "--node-name", "k8s-node1"])
        .env("ETCDCTL_ENDPOINTS", etcd.endpoints_arg())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("10.6.1.221/32") && text.contains("unspec:app=foo;reserved:init=;"), "{text}");
    assert!(text.contains("MALFORMED cilium/state/ip/v1/default/10.6.1.50"), "{text}");
}

#[test]
fn tls_cluster_reads_the_same_and_fails_clearly() {
    if !require_root("tls_cluster_reads_the_same_and_fails_clearly") {
        return;
    }
    let mut etcd = EtcdCluster::three_tls().unwrap();
    etcd.put_all(&seed()).unwrap();
    let tls = etcd.tls.as_ref().unwrap();
    let config = tls.etcd_config(&etcd.endpoints(), &tls.ca).unwrap();
    let config_arg = config.to_str().unwrap().to_owned();

    let (code, doc, stderr, _) = dump(&["--etcd-config", &config_arg]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_sample_view(&doc);
    let status = doc["status"].as_str().unwrap();
    assert!(status.starts_with("etcd: 3/3 connected, leader https://127.0.0.1:"), "{status}");

    // Wrong CA, missing client certificate, wrong endpoint: exit 2, clear message, bounded time.
    let wrong_ca = tls.etcd_config(&etcd.endpoints(), &tls.other_ca).unwrap();
    let (code, _, stderr, took) = dump(&["--etcd-config", wrong_ca.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("0/3 connected") && stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(took < Duration::from_secs(10), "wrong CA took {took:?}");

    let no_cert = tls.dir.join("no-client-cert.config");
    let list: String = etcd.endpoints().iter().map(|e| format!("  - {e}\n")).collect();
    std::fs::write(&no_cert, format!("endpoints:\n{list}trusted-ca-file: {}\n", tls.ca.display())).unwrap();
    let (code, _, stderr, took) = dump(&["--etcd-config", no_cert.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no etcd endpoint answered"), "{stderr}");
    assert!(took < Duration::from_secs(10), "missing client cert took {took:?}");

    let (code, _, stderr, took) = dump(&["--etcd-config", &config_arg, "--etcd-endpoints", "https://127.0.0.1:9"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("0/1 connected") && stderr.contains("https://127.0.0.1:9"), "{stderr}");
    assert!(took < Duration::from_secs(10), "wrong endpoint took {took:?}");

    // Kill a follower: reads go on, the status says 2/3 with the leader.
    let leader = doc["health"]["endpoints"].as_array().unwrap().iter().position(|e| e["is_leader"] == true).unwrap();
    let follower = (leader + 1) % 3;
    etcd.kill(follower);
    let (code, doc, stderr, _) = dump(&["--etcd-config", &config_arg]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_sample_view(&doc);
    let expected = format!("etcd: 2/3 connected, leader {}", etcd.endpoints()[leader]);
    assert!(doc["status"].as_str().unwrap().starts_with(&expected), "{}", doc["status"]);

    // All down: a clear error and exit code 2 within the bounded time.
    for i in 0..3 {
        etcd.kill(i);
    }
    let (code, _, stderr, took) = dump(&["--etcd-config", &config_arg]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("0/3 connected"), "{stderr}");
    assert!(took < Duration::from_secs(10), "all down took {took:?}");
}

/// Least privilege: an etcd user whose only role reads `cilium/` is all kvcheck needs (check,
/// dump, the agent's list, watch, status and lease lookups); its password never shows, and a
/// wrong one is a clear error (exit 2).
#[test]
fn a_read_only_etcd_user_is_enough() {
    use kvcheck::model::version::Layout;
    use kvcheck_tests::agent::Agent;
    use kvcheck_tests::simcluster::{consistent_node, ip_json, NodeSpec, NODE_B_IP};
    if !require_root("a_read_only_etcd_user_is_enough") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let etcd = &node.etcd;
    let grants: [&[&str]; 7] = [
        &["user", "add", "root:root-pw-9"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "kvcheck-ro"],
        &["role", "grant-permission", "kvcheck-ro", "--prefix=true", "read", "cilium/"],
        &["user", "add", "kvcheck:ro-pw-7"],
        &["user", "grant-role", "kvcheck", "kvcheck-ro"],
        &["auth", "enable"],
    ];
    for args in grants {
        etcd.etcdctl_ok(args).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("kvcheck-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = |password: &str| {
        let path = dir.join(format!("etcd-{password}.config"));
        std::fs::write(&path, format!("endpoints: [{}]\nusername: kvcheck\npassword: {password}\n", etcd.endpoints_arg())).unwrap();
        path.display().to_string()
    };
    let (good, bad) = (config("ro-pw-7"), config("wrong-pw-3"));
    let shown = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let out = node.check(&["--etcd-config", &good, "--settle", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let out = run_kvcheck(None, &["dump", "kvstore", "--etcd-config", &good, "--node-name", "k8s-node1"]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    for o in [&out, &node.check(&["--etcd-config", &good, "--settle", "0"])] {
        assert!(!shown(o).contains("ro-pw-7"), "{}", shown(o));
    }
    // No user, or a wrong password: could not check (2), said, the password not echoed.
    let out = node.check(&["--settle", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    let out = node.check(&["--etcd-config", &bad, "--settle", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(shown(&out).contains("authentication failed") && !shown(&out).contains("wrong-pw-3"), "{}", shown(&out));

    // The agent lists, watches and probes with the read-only user: a pod written by another
    // client (Cilium, here root) and missing from the ipcache is reported.
    // As deploy/ gives it: candidates, the first that exists is read.
    let agent = Agent::start(&node, &["--etcd-config", &format!("/nonexistent/etcd.config,{good}")]);
    let (health, _) = agent.wait_for("node-health", None, None, Duration::from_secs(10));
    assert_eq!(health["status"], "ok", "{health}");
    let key = "cilium/state/ip/v1/default/10.2.0.77";
    let out = etcd.etcdctl().args(["--user", "root:root-pw-9", "put", key, &ip_json("10.2.0.77", NODE_B_IP, 1000, "node-b", 77)]).output().unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.2.0.77/32"), Duration::from_secs(10));
    assert!(!agent.seen.borrow().iter().any(|l| l.to_string().contains("ro-pw-7")));
    // Its health probes (every second here) reuse their clients: no Authenticate per probe.
    let authenticates = || {
        let (_, body) = kvcheck_tests::agent::http_get(etcd.members[0].metrics_port, "/metrics").unwrap_or_default();
        body.lines().filter(|l| l.starts_with("grpc_server_started_total") && l.contains("grpc_method=\"Authenticate\"")).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum::<f64>()
    };
    let before = authenticates();
    for _ in 0..5 {
        agent.wait_for("node-health", None, None, Duration::from_secs(5));
    }
    let after = authenticates();
    assert!(before > 0.0 && after - before <= 1.0, "Authenticate calls went from {before} to {after} over 5 health probes");
    let _ = std::fs::remove_dir_all(&dir);
}
