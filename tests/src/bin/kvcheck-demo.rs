//! `cargo xtask demo`: a simulated Cilium 1.7.1 node with injected drift, inspected by kvcheck.

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::simnode::SimulatedNode;
use kvcheck_tests::{kvcheck_bin, sample};

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo mounts a private bpffs and creates a network namespace: run it as root");
    }
    let node = SimulatedNode::real_1_7_1_with_drift().context("building the simulated node")?;
    println!("Simulated node {} (Cilium 1.7.1 maps as a real agent wrote them, plus injected drift):", node.name);
    println!("  bpffs      {}", node.bpffs.root.display());
    println!("  netns      {} (eth0 10.5.1.132/24, cilium_host {})", node.netns.name, node.cilium_host_addr);
    for d in &node.drifts {
        println!("  drift      {d}");
    }
    println!();
    println!("$ ip netns exec {} kvcheck dump datapath --bpffs {}", node.netns.name, node.bpffs.root.display());
    let status = Command::new("ip")
        .args(["netns", "exec", &node.netns.name])
        .arg(kvcheck_bin())
        .args(["dump", "datapath", "--bpffs"])
        .arg(&node.bpffs.root)
        .status()?;
    if !status.success() {
        bail!("kvcheck dump datapath failed: {status}");
    }

    // The kvstore side: a local etcd with the keys the real agent wrote, plus a leaked IP entry
    // (a pod on this node that no longer exists).
    let etcd = EtcdCluster::single().context("starting a local etcd (Debian's etcd-server)")?;
    let s = sample::sections(sample::REAL_1_7_1);
    let mut pairs = sample::etcd_pairs(sample::section(&s, "etcdctl get --prefix cilium/"));
    pairs.push((
        "cilium/state/ip/v1/default/10.6.1.77".to_owned(),
        r#"{"IP":"10.6.1.77","Mask":null,"HostIP":"10.5.1.132","ID":13110,"Key":0,"Metadata":"cilium-global:default:k8s-node1:120","K8sNamespace":"default","K8sPodName":"pod-gone"}"#.to_owned(),
    ));
    etcd.put_all(&pairs)?;
    println!();
    println!("  drift      kvstore ip/v1 10.6.1.77 on this node: no local endpoint has it (leaked)");
    println!();
    println!("$ kvcheck dump kvstore --etcd-endpoints {} --node-name {}", etcd.endpoints_arg(), node.name);
    let status = Command::new(kvcheck_bin())
        .args(["dump", "kvstore", "--etcd-endpoints", &etcd.endpoints_arg(), "--node-name", node.name])
        .status()?;
    if !status.success() {
        bail!("kvcheck dump kvstore failed: {status}");
    }
    println!();
    println!("Next (issue 5): `kvcheck check` derives the expected datapath from the kvstore and reports each drift above as a typed finding.");
    Ok(())
}
