//! Where Cilium keeps identities (issue 21, first part): with `identity-allocation-mode crd`
//! (Helm's default, also with etcd for nodes and pod IPs) the identities are CiliumIdentity
//! objects and `cilium/state/identities/v1` stays empty. kvcheck learns the mode from the Cilium
//! agent's API, its ConfigMap or `--identity-source`, and without any of them treats an empty
//! identities prefix with identities in use as that mode: identities not checked, said once,
//! never a flood of `identity-missing`.

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::pair;
use kvcheck_tests::ciliumapi::{agent_docs, CiliumApi, Mode};
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, NodeSpec};
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

fn check(node: &SimulatedNode, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["--settle", "0", "--output", "json", "--cilium-version", "1.16"];
    if !extra.contains(&"--cilium-config-map") {
        args.extend(["--cilium-config-map", "/nonexistent"]);
    }
    args.extend_from_slice(extra);
    let out = node.check(&args);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), doc)
}

fn kinds(doc: &Value) -> Vec<(String, String)> {
    doc["findings"].as_array().unwrap().iter().map(|f| pair(f["kind"].as_str().unwrap(), f["subject"].as_str().unwrap())).collect()
}

#[test]
fn identities_kept_as_crds_are_a_mode_not_a_flood_of_findings() {
    if !require_root("identities_kept_as_crds_are_a_mode_not_a_flood_of_findings") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    // Kvstore mode: every identity checked.
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, doc["sources"]["identities"]["checked"].as_bool()), (Some(0), Some(true)), "{doc:#}");

    // The hybrid: nodes and IPs in etcd, identities elsewhere.
    node.etcd.etcdctl_ok(&["del", "--prefix", "cilium/state/identities/v1/"]).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let ids = &doc["sources"]["identities"];
    assert_eq!((ids["checked"].as_bool(), ids["mode"].as_str()), (Some(false), None), "{ids:#}");
    assert!(ids["reason"].as_str().unwrap().contains("is empty while"), "{ids:#}");
    let table = String::from_utf8_lossy(&node.check(&["--settle", "0", "--cilium-config-map", "/nonexistent"]).stdout).into_owned();
    assert!(table.contains("identities not checked:"), "{table}");

    // A remote identity put back by hand (as the oracle's hand-written remote pod has): the
    // prefix is not empty, but this node's endpoints have no reference key from it.
    node.etcd_put("cilium/state/identities/v1/id/1002", kvcheck_tests::simcluster::IDENTITIES[2].1).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, doc["sources"]["identities"]["checked"].as_bool()), (Some(0), Some(false)), "{doc:#}");
    assert!(doc["sources"]["identities"]["reason"].as_str().unwrap().contains("neither id/ keys nor a value/ reference"), "{doc:#}");
    // A node that only lost its reference keys is still kvstore mode: that is drift.
    node.etcd_put("cilium/state/identities/v1/id/1000", kvcheck_tests::simcluster::IDENTITIES[0].1).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, doc["sources"]["identities"]["checked"].as_bool()), (Some(1), Some(true)), "{doc:#}");
    assert!(kinds(&doc).contains(&pair("identity-reference-missing", "1000")), "{doc:#}");
    node.etcd_del("cilium/state/identities/v1/id/1000").unwrap();

    // Told the mode is kvstore: the lost identities are drift.
    let (code, doc) = check(&node, &["--identity-source", "kvstore"]);
    assert_eq!(code, Some(1), "{doc:#}");
    assert!(kinds(&doc).iter().all(|(k, _)| k == "identity-missing" || k == "identity-reference-missing") && doc["counts"]["by_kind"]["identity-missing"].as_u64() >= Some(2), "{doc:#}");

    // The mode from the Cilium agent's API (its captured /v1/config, set to crd).
    let Mode::Serve(mut docs) = agent_docs("ready", true) else { unreachable!() };
    docs.get_mut("config").unwrap()["status"]["daemonConfigurationMap"]["IdentityAllocationMode"] = Value::String("crd".into());
    let api = CiliumApi::start(Mode::Serve(docs));
    let (code, doc) = check(&node, &["--cilium-socket", api.socket_str()]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let ids = &doc["sources"]["identities"];
    assert_eq!((ids["checked"].as_bool(), ids["mode"].as_str()), (Some(false), Some("crd")), "{ids:#}");
    assert!(ids["reason"].as_str().unwrap().contains("Cilium API /v1/config"), "{ids:#}");

    // An agent without a kvstore (CRD mode): etcd's content is not its cluster state.
    let Mode::Serve(mut docs) = agent_docs("ready", true) else { unreachable!() };
    docs.get_mut("config").unwrap()["status"]["daemonConfigurationMap"]["KVStore"] = Value::String(String::new());
    let crd = CiliumApi::start(Mode::Serve(docs));
    let out = node.check(&["--settle", "0", "--cilium-socket", crd.socket_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Cilium runs in CRD mode (no kvstore; from Cilium API /v1/config)") && stderr.contains("no Kubernetes API configured"), "{stderr}");

    // The mode from Cilium's ConfigMap as mounted (one file per key).
    let cm = api.runtime_dir.join("config-map");
    std::fs::create_dir_all(&cm).unwrap();
    std::fs::write(cm.join("identity-allocation-mode"), "crd\n").unwrap();
    std::fs::write(cm.join("kvstore"), "etcd\n").unwrap();
    let (code, doc) = check(&node, &["--cilium-config-map", cm.to_str().unwrap()]);
    assert_eq!((code, doc["sources"]["identities"]["mode"].as_str()), (Some(0), Some("crd")), "{doc:#}");
    assert!(doc["sources"]["identities"]["reason"].as_str().unwrap().contains("config-map/identity-allocation-mode"), "{doc:#}");
}
