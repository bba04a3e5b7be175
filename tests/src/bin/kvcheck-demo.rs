//! `cargo xtask demo`: the real Cilium 1.7.1 node recreated (maps, netns, etcd), checked while
//! consistent, then again after injecting a handful of drifts.

use anyhow::{bail, Context as _, Result};
use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::simnode::SimulatedNode;

fn show(node: &SimulatedNode, title: &str) -> Result<()> {
    println!("==== {title}");
    println!("$ kvcheck {}", node.check_args().join(" "));
    let out = node.check(&["--settle", "1s"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!("(exit code {})\n", out.status.code().unwrap_or(-1));
    if out.status.code() == Some(2) {
        bail!("kvcheck could not check the simulated node");
    }
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo mounts a private bpffs, creates a network namespace and starts etcd: run it as root");
    }
    let node = SimulatedNode::real_1_7_1().context("building the simulated node")?;
    println!(
        "Simulated node {}: the maps, etcd keys, addresses and node_config.h a real Cilium 1.7.1 agent wrote\n  bpffs {}, netns {}, etcd {}\n",
        node.name,
        node.bpffs.root.display(),
        node.netns.name,
        node.etcd.endpoints_arg()
    );
    show(&node, "1. as captured")?;

    println!("Injecting drift:");
    println!("  - ipcache 10.6.7.99/32 -> 12928 via 10.5.1.133 (a pod that no longer exists)");
    node.ipcache_put("10.6.7.99/32", IpcacheValue { identity: 12928, tunnel_endpoint: Some("10.5.1.133".parse()?), ..Default::default() })?;
    println!("  - ipcache 10.6.7.20/32 (remote pod-x) now says identity 13110");
    node.ipcache_put("10.6.7.20/32", IpcacheValue { identity: 13110, tunnel_endpoint: Some("10.5.1.133".parse()?), ..Default::default() })?;
    println!("  - kvstore ip/v1 10.6.1.77 says this node hosts it (no such endpoint)");
    node.etcd_put(
        "cilium/state/ip/v1/default/10.6.1.77",
        r#"{"IP":"10.6.1.77","Mask":null,"HostIP":"10.5.1.132","ID":13110,"Key":0,"Metadata":"cilium-global:default:k8s-node1:120","K8sNamespace":"default","K8sPodName":"pod-gone"}"#,
    )?;
    println!("  - cilium_host gets 10.6.1.99/32 instead of the CiliumInternalIP 10.6.1.124");
    node.netns.exec(&["ip", "addr", "del", "10.6.1.124/32", "dev", "cilium_host"])?;
    node.netns.add_address("cilium_host", "10.6.1.99/32")?;
    println!("  - the node's identity reference key is deleted");
    node.etcd_del("cilium/state/identities/v1/value/unspec:app=foo;reserved:init=;/10.5.1.132")?;
    println!();
    show(&node, "2. with drift")?;
    Ok(())
}
