//! Watch coalescing through etcd's gRPC proxy (issue 13, part 1): agents that reach etcd
//! through a real `etcd grpc-proxy` report drifts as direct ones do, say that they go through a
//! proxy (not calling it the leader), resume their watch from their revision when the proxy is
//! killed and replaced (a drift made meanwhile is reported, without a relist), and relist when
//! the history behind the proxy was compacted. Single plaintext member, and a 3-member TLS
//! cluster with the proxy terminating TLS on both sides.

use std::time::Duration;

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::Agent;
use kvcheck_tests::etcd::GrpcProxy;
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, ip_json, NodeSpec, NODE_B_IP};

fn through_a_proxy(three_member_tls: bool) {
    let node = consistent_node(NodeSpec { three_member_tls, ..NodeSpec::new(Layout::V1_15, false) }).unwrap();
    let mut proxy = GrpcProxy::start(&node.etcd).unwrap();
    let agent = Agent::start_via(&node, std::slice::from_ref(&proxy.url), "1s", &["--etcd-timeout", "2"]);
    let health = agent.wait_health("ok", "through gRPC proxy", Duration::from_secs(10));
    let etcd = health["etcd"].as_str().unwrap();
    assert!(etcd.starts_with("etcd: 1/1 connected, through gRPC proxy") && etcd.contains("behind the proxy") && !etcd.contains(", leader http"), "{etcd}");

    // A drift in etcd, through the proxy's coalesced watch.
    let key = |ip: &str| format!("cilium/state/ip/v1/default/{ip}");
    agent.opens_and_resolves("ipcache-missing", "10.2.0.71/32", || node.etcd_put(&key("10.2.0.71"), &ip_json("10.2.0.71", NODE_B_IP, 1000, "node-b", 71)).unwrap(), || node.etcd_del(&key("10.2.0.71")).unwrap());

    // The proxy dies; a drift is made meanwhile (directly on etcd); a new proxy comes up on the
    // same address: the agent resumes its watch from its revision, without relisting.
    proxy.kill();
    node.etcd_put(&key("10.2.0.72"), &ip_json("10.2.0.72", NODE_B_IP, 1000, "node-b", 72)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    proxy.restart().unwrap();
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.2.0.72/32"), Duration::from_secs(30));
    assert_eq!(agent.count("kvstore-relist"), 0, "the watch resumed from its revision: no relist");
    node.etcd_del(&key("10.2.0.72")).unwrap();
    agent.wait_for("finding-resolved", Some("ipcache-missing"), Some("10.2.0.72/32"), Duration::from_secs(10));

    // History compacted behind the proxy while the agent is frozen: it relists, as direct.
    // SAFETY: signals to our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGSTOP) };
    proxy.kill();
    node.etcd_put(&key("10.2.0.73"), &ip_json("10.2.0.73", NODE_B_IP, 1000, "node-b", 73)).unwrap();
    node.etcd_put(&key("10.2.0.74"), &ip_json("10.2.0.74", NODE_B_IP, 1000, "node-b", 74)).unwrap();
    node.etcd_del(&key("10.2.0.74")).unwrap();
    let rev = node.etcd.revision().unwrap();
    node.etcd.etcdctl_ok(&["compact", &rev.to_string(), "--physical"]).unwrap();
    proxy.restart().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGCONT) };
    agent.wait_for("kvstore-relist", None, None, Duration::from_secs(30));
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.2.0.73/32"), Duration::from_secs(10));
    let mut opened = agent.opened();
    opened.sort();
    let want: Vec<(String, String)> = ["10.2.0.71/32", "10.2.0.72/32", "10.2.0.73/32"].iter().map(|s| ("ipcache-missing".to_owned(), (*s).to_owned())).collect();
    assert_eq!(opened, want);
}

#[test]
fn agent_through_a_grpc_proxy_single_member() {
    if !require_root("agent_through_a_grpc_proxy_single_member") {
        return;
    }
    through_a_proxy(false);
}

#[test]
fn agent_through_a_tls_grpc_proxy_in_front_of_three_members() {
    if !require_root("agent_through_a_tls_grpc_proxy_in_front_of_three_members") {
        return;
    }
    through_a_proxy(true);
}
