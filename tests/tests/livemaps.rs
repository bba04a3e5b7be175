//! `datapath-map-mismatch` (issue 12): the maps the programs attached to the node's interfaces
//! really use, against the pins. Real classifiers (tests/src/progs.rs) referencing real maps,
//! attached with tcx links and classic tc filters on the simulated node's interfaces, one of them
//! through a tail call.

use std::os::fd::AsFd;

use kvcheck::model::version::Layout;
use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::maps::{self, WriterMap};
use kvcheck_tests::progs::{self, BPF_TCX_EGRESS, BPF_TCX_INGRESS};
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, NodeSpec, NODE_B_IP, REMOTE_PODS};
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

fn check(node: &SimulatedNode, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["--settle", "0", "--output", "json", "--cilium-version", "1.16"];
    args.extend_from_slice(extra);
    let out = node.check(&args);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), doc)
}

fn kinds(doc: &Value) -> Vec<(String, String)> {
    doc["findings"].as_array().unwrap().iter().map(|f| (f["kind"].as_str().unwrap().to_owned(), f["subject"].as_str().unwrap().to_owned())).collect()
}

/// A new, empty map pinned where the node's ipcache was (Cilium re-creating it). The old map
/// lives on in `node.maps.ipcache` (and in any program using it).
fn replace_ipcache_pin(node: &SimulatedNode) -> WriterMap {
    std::fs::remove_file(&node.maps.ipcache.path).unwrap();
    WriterMap::create(&node.bpffs.globals(), maps::ipcache_shape(node.layout)).unwrap()
}

#[test]
fn the_pinned_map_in_use_checks_clean_and_names_its_users() {
    if !require_root("the_pinned_map_in_use_checks_clean_and_names_its_users") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let prog = progs::classifier_using("cil_from_host", node.maps.ipcache.fd.as_fd()).unwrap();
    let _link = progs::attach_tcx(&node.netns.name, "cilium_host", prog.as_fd(), BPF_TCX_INGRESS).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let live = &doc["sources"]["datapath"]["live_maps"];
    assert_eq!(live["status"], "checked", "{live:#}");
    let ids = live["maps"]["cilium_ipcache"].as_object().unwrap();
    assert_eq!(ids.len(), 1, "{live:#}");
    let (id, used) = ids.iter().next().unwrap();
    assert_eq!(live["pinned"]["cilium_ipcache"][0].to_string(), *id);
    assert_eq!(used["users"], serde_json::json!(["cilium_host tcx ingress: cil_from_host"]));
}

/// The cilium/cilium#45196 shape: the pin replaced by a new empty map while the programs (one
/// on classic tc, one reached through a tail call from a tcx program) keep the old, populated
/// one. Finding, and the check runs on the map the programs use: a drift in it is found, one
/// in the stale pin is not.
#[test]
fn a_replaced_pin_is_found_and_the_map_in_use_is_checked() {
    if !require_root("a_replaced_pin_is_found_and_the_map_in_use_is_checked") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let globals = node.bpffs.globals();
    let netdev = progs::classifier_using("cil_from_netdev", node.maps.ipcache.fd.as_fd()).unwrap();
    let pinned_prog = node.bpffs.root.join("test_from_netdev");
    progs::pin(netdev.as_fd(), &pinned_prog).unwrap();
    progs::attach_tc(&node.netns.name, "eth0", "ingress", &pinned_prog).unwrap();
    let tail = progs::classifier_using("tail_handle_ipv4", node.maps.ipcache.fd.as_fd()).unwrap();
    let calls = progs::prog_array(&globals, "cilium_calls_00020", tail.as_fd()).unwrap();
    let entry = progs::tail_caller("cil_to_host", calls.fd.as_fd()).unwrap();
    let _link = progs::attach_tcx(&node.netns.name, "cilium_host", entry.as_fd(), BPF_TCX_EGRESS).unwrap();

    let stale_pin = replace_ipcache_pin(&node);
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![("datapath-map-mismatch".to_owned(), "cilium_ipcache".to_owned())]), "{doc:#}");
    let f = &doc["findings"][0];
    let in_use = f["datapath"]["in_use"].as_object().unwrap();
    assert_eq!(in_use.len(), 1);
    let (live_id, used) = in_use.iter().next().unwrap();
    assert!(used["entries"].as_u64().unwrap() > 5, "{used}");
    assert_eq!(f["datapath"]["pinned"]["entries"], 0);
    let users: Vec<&str> = used["users"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(users, ["cilium_host tcx egress: cil_to_host -> tail_handle_ipv", "eth0 tc ingress: cil_from_netdev"], "{used}"); // kernel names: 15 bytes
    assert_eq!(doc["sources"]["datapath"]["maps"][0]["path"], format!("map id {live_id} (in use by the datapath, not pinned)"));

    // A drift in the map the programs use is found; one in the stale pin is not.
    let key = |p: &str| kvcheck_tests::encode::ipcache_key(node.layout, p.parse().unwrap(), 0);
    node.maps.ipcache.delete(&key(&format!("{}/32", REMOTE_PODS[0].0))).unwrap();
    let stale = IpcacheValue { identity: 1000, tunnel_endpoint: Some(NODE_B_IP.parse().unwrap()), ..Default::default() };
    stale_pin.update(&key("10.9.9.9/32"), &kvcheck_tests::encode::ipcache_value(node.layout, stale)).unwrap();
    let (_, doc) = check(&node, &[]);
    let mut got = kinds(&doc);
    got.sort();
    assert_eq!(got, vec![("datapath-map-mismatch".to_owned(), "cilium_ipcache".to_owned()), ("ipcache-missing".to_owned(), format!("{}/32", REMOTE_PODS[0].0))], "{doc:#}");

    // `dump datapath` shows both: the map in use, and the pin.
    let out = std::process::Command::new(kvcheck_tests::kvcheck_bin()).args(["dump", "datapath", "--bpffs", node.bpffs.root_str(), "--netns", &format!("/var/run/netns/{}", node.netns.name), "--output", "json"]).output().unwrap();
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dump["ipcache"]["id"].to_string(), *live_id);
    assert_eq!(dump["pinned"]["ipcache"]["entry_count"], 1, "the stale pin holds the one injected entry: {:#}", dump["pinned"]["ipcache"]);

    // `--live-maps off` reads the pins only (and so sees the stale pin's view).
    let (_, doc) = check(&node, &["--live-maps", "off"]);
    assert_eq!(doc["sources"]["datapath"]["live_maps"]["status"], "off");
    assert!(kinds(&doc).contains(&("ipcache-stale".to_owned(), "10.9.9.9/32".to_owned())), "{doc:#}");
}

/// Two programs using two different ipcache maps: a finding naming both.
#[test]
fn two_maps_in_use_under_one_name_are_a_mismatch() {
    if !require_root("two_maps_in_use_under_one_name_are_a_mismatch") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let old_prog = progs::classifier_using("cil_from_netdev", node.maps.ipcache.fd.as_fd()).unwrap();
    let _l1 = progs::attach_tcx(&node.netns.name, "eth0", old_prog.as_fd(), BPF_TCX_INGRESS).unwrap();
    // Re-created with the same entries; only the new program uses the new map.
    let entries = kvcheck::datapath::maps::PinnedMap::open("cilium_ipcache", &node.maps.ipcache.path).unwrap().read_all(Default::default()).unwrap();
    let new = replace_ipcache_pin(&node);
    for (k, v) in entries.iter() {
        new.update(k, v).unwrap();
    }
    let new_prog = progs::classifier_using("cil_from_host", new.fd.as_fd()).unwrap();
    let _l2 = progs::attach_tcx(&node.netns.name, "cilium_host", new_prog.as_fd(), BPF_TCX_INGRESS).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![("datapath-map-mismatch".to_owned(), "cilium_ipcache".to_owned())]), "{doc:#}");
    assert_eq!(doc["findings"][0]["datapath"]["in_use"].as_object().unwrap().len(), 2, "{doc:#}");
    assert!(doc["findings"][0]["datapath"]["read"].is_null(), "two maps in use: the pin is checked");
}

/// Without CAP_SYS_ADMIN (programs and maps cannot be opened by id) the discovery is skipped and
/// the report says why; the findings and the exit code are those of the pins.
#[test]
fn without_cap_sys_admin_the_live_map_check_is_skipped_and_said() {
    if !require_root("without_cap_sys_admin_the_live_map_check_is_skipped_and_said") {
        return;
    }
    // setns into the node's namespace needs CAP_SYS_ADMIN too, so this runs in our own
    // namespace on a veth of its own, with `dump datapath` (no etcd needed).
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let veth = format!("kvclm{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", &format!("{veth}p")]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(veth.clone());
    let prog = progs::classifier_using("cil_from_netdev", node.maps.ipcache.fd.as_fd()).unwrap();
    let pinned_prog = node.bpffs.root.join("test_unpriv");
    progs::pin(prog.as_fd(), &pinned_prog).unwrap();
    let tc = |args: &[&str]| assert!(std::process::Command::new("tc").args(args).status().unwrap().success(), "tc {args:?}");
    tc(&["qdisc", "add", "dev", &veth, "clsact"]);
    tc(&["filter", "add", "dev", &veth, "ingress", "bpf", "direct-action", "pinned", &pinned_prog.display().to_string()]);
    let dump = |drop_cap: bool| -> Value {
        let mut cmd = std::process::Command::new(if drop_cap { "setpriv" } else { "env" });
        if drop_cap {
            cmd.args(["--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"]);
        }
        let out = cmd.arg(kvcheck_tests::kvcheck_bin()).args(["dump", "datapath", "--bpffs", node.bpffs.root_str(), "--output", "json"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let privileged = dump(false);
    assert_eq!(privileged["live_maps"]["status"], "checked", "{:#}", privileged["live_maps"]);
    assert!(privileged["live_maps"]["maps"]["cilium_ipcache"].is_object());
    let unprivileged = dump(true);
    assert_eq!(unprivileged["live_maps"]["status"], "skipped", "{:#}", unprivileged["live_maps"]);
    assert!(unprivileged["live_maps"]["reason"].as_str().unwrap().contains("CAP_SYS_ADMIN"), "{:#}", unprivileged["live_maps"]);
    assert_eq!(unprivileged["ipcache"]["entry_count"], privileged["ipcache"]["entry_count"]);
}

/// The agent re-evaluates when Cilium re-creates a pin: the programs keep the old map, so it
/// opens `datapath-map-mismatch`, follows the map in use (a drift there opens; the empty pin
/// does not flood it with `ipcache-missing`), and exports the maps in use.
#[test]
fn the_agent_finds_a_replaced_pin_and_follows_the_map_in_use() {
    if !require_root("the_agent_finds_a_replaced_pin_and_follows_the_map_in_use") {
        return;
    }
    use std::time::Duration;
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let prog = progs::classifier_using("cil_from_host", node.maps.ipcache.fd.as_fd()).unwrap();
    let _link = progs::attach_tcx(&node.netns.name, "cilium_host", prog.as_fd(), BPF_TCX_INGRESS).unwrap();
    let agent = kvcheck_tests::agent::Agent::start(&node, &[]);
    let in_use = || {
        let (_, m) = kvcheck_tests::agent::http_get(agent.port, "/metrics").unwrap();
        m.lines().find(|l| l.starts_with("kvcheck_datapath_maps_in_use{") && l.contains("map=\"cilium_ipcache\"")).map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(in_use().as_deref(), Some("1"));

    let _stale_pin = replace_ipcache_pin(&node);
    agent.wait_for("finding-opened", Some("datapath-map-mismatch"), Some("cilium_ipcache"), Duration::from_secs(20));
    let remote = format!("{}/32", REMOTE_PODS[0].0);
    node.maps.ipcache.delete(&kvcheck_tests::encode::ipcache_key(node.layout, remote.parse().unwrap(), 0)).unwrap();
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some(&remote), Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let mut opened = agent.opened();
    opened.sort();
    assert_eq!(opened, vec![("datapath-map-mismatch".to_owned(), "cilium_ipcache".to_owned()), ("ipcache-missing".to_owned(), remote)]);
    assert_eq!(in_use().as_deref(), Some("1"), "one map in use, not the pinned one");
}

/// XDP programs (NodePort acceleration on the native device) are part of the datapath: one
/// left on the old ipcache after the pin was replaced is found, and named as an XDP user.
#[test]
fn an_xdp_program_on_an_old_map_is_found() {
    if !require_root("an_xdp_program_on_an_old_map_is_found") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let xdp = progs::xdp_using("cil_xdp_entry", node.maps.ipcache.fd.as_fd()).unwrap();
    let pinned_prog = node.bpffs.root.join("test_xdp_entry");
    progs::pin(xdp.as_fd(), &pinned_prog).unwrap();
    progs::attach_xdp(&node.netns.name, "eth0", &pinned_prog).unwrap();
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let users = &doc["sources"]["datapath"]["live_maps"]["maps"]["cilium_ipcache"];
    assert_eq!(users.as_object().unwrap().values().next().unwrap()["users"], serde_json::json!(["eth0 xdp generic: cil_xdp_entry"]), "{users:#}");
    let _stale_pin = replace_ipcache_pin(&node);
    let (code, doc) = check(&node, &[]);
    assert_eq!((code, kinds(&doc)), (Some(1), vec![("datapath-map-mismatch".to_owned(), "cilium_ipcache".to_owned())]), "{doc:#}");
}
