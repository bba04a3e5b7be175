//! `cargo xtask demo`: a simulated Cilium 1.7.1 node with injected drift, inspected by kvcheck.

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::simnode::SimulatedNode;

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
    Ok(())
}
