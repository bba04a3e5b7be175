//! A whole simulated node: bpffs with Cilium's maps, a netns with cilium_host and a node IP,
//! a local etcd with Cilium-format keys, Cilium's node_config.h. Starts consistent (the real
//! Cilium 1.7.1 capture); drifts are injected by the tests or the demo.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Output;

use ipnet::IpNet;
use kvcheck::model::version::Layout;

use crate::encode::{self, IpcacheValue};
use crate::etcd::EtcdCluster;
use crate::maps::{BpffsMount, CiliumMaps, WriterMap};
use crate::netns::Netns;
use crate::sample;

pub struct SimulatedNode {
    pub name: &'static str,
    pub layout: Layout,
    pub maps: CiliumMaps,
    // Dropped after the maps (field order), so the pins go before the mount.
    pub bpffs: BpffsMount,
    pub netns: Netns,
    pub etcd: EtcdCluster,
    /// Cilium's state dir with globals/node_config.h.
    pub state_dir: PathBuf,
}

/// The identity of the remote pod 10.6.7.20 that the 1.7.1 capture's author put into etcd by
/// hand without its identity key (labels from a real 1.7 cluster, `seed-node-k8s-node1.txt`).
/// Without it, the capture has a real `identity-missing` drift.
pub const HAND_PUT_IDENTITY: (&str, &str) = (
    "cilium/state/identities/v1/id/12928",
    "k8s:app=istio-ingressgateway;k8s:chart=gateways;k8s:heritage=Tiller;k8s:io.cilium.k8s.policy.cluster=default;k8s:io.cilium.k8s.policy.serviceaccount=ai-ingressgateway-service-account;k8s:io.kubernetes.pod.namespace=istio-system;k8s:istio=ai-ingressgateway;k8s:release=istio;",
);

impl SimulatedNode {
    /// The real Cilium 1.7.1 node k8s-node1 of `tests/data/real-cilium-1.7.1-node.txt`:
    /// maps, etcd keys, addresses and node_config.h exactly as captured.
    /// Plus [`HAND_PUT_IDENTITY`], which completes the capture's hand-put remote pod.
    pub fn real_1_7_1() -> anyhow::Result<SimulatedNode> {
        let node = Self::from_sample(sample::REAL_1_7_1, Layout::V1_7)?;
        node.etcd_put(HAND_PUT_IDENTITY.0, HAND_PUT_IDENTITY.1)?;
        Ok(node)
    }

    /// The real Cilium 1.16.15 node k8s-node1 of `tests/data/real-cilium-1.16.15-node.txt`.
    pub fn real_1_16_15() -> anyhow::Result<SimulatedNode> {
        Self::from_sample(sample::REAL_1_16_15, Layout::V1_15)
    }

    /// A node recreated from a capture of a real agent: its map bytes, addresses, etcd keys and
    /// node_config.h defines.
    fn from_sample(text: &str, layout: Layout) -> anyhow::Result<SimulatedNode> {
        let s = sample::sections(text);
        let bpffs = BpffsMount::new()?;
        let maps = CiliumMaps::create(&bpffs, layout)?;
        let write = |map: &WriterMap, name: &str| -> std::io::Result<()> {
            let heading = format!("bpftool map dump pinned /sys/fs/bpf/tc/globals/{name}");
            for (k, v) in sample::bpftool_entries(sample::section(&s, &heading)) {
                map.update(&k, &v)?;
            }
            Ok(())
        };
        write(&maps.ipcache, "cilium_ipcache")?;
        write(&maps.endpoints, "cilium_lxc")?;
        if let Some(t) = &maps.tunnel {
            write(t, "cilium_tunnel_map")?;
        }

        let netns = Netns::new("kvcheck-node")?;
        for line in sample::section(&s, "ip -o addr") {
            match sample::address_line(line) {
                Some((dev, _)) if dev == "lo" => {}
                Some((dev, addr)) if dev == "cilium_host" => netns.add_cilium_host(&[&addr])?,
                Some((dev, addr)) => netns.add_interface(&dev, &[&addr])?,
                // Link-local and loopback lines of iproute2's long form: Cilium ignores them.
                None if line.contains("scope link") || line.contains("scope host") => {}
                None => anyhow::bail!("unexpected address line {line:?}"),
            }
        }

        let etcd = EtcdCluster::single()?;
        let mut pairs = sample::etcd_pairs(sample::section(&s, "etcdctl get --prefix cilium/"));
        // The capture's heartbeat was current when it was taken; the operator keeps it so.
        for (k, v) in &mut pairs {
            if k == "cilium/.heartbeat" {
                *v = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            }
        }
        etcd.put_all(&pairs)?;

        let state_dir = bpffs.root.with_extension("state");
        std::fs::create_dir_all(state_dir.join("globals"))?;
        let defines: Vec<&str> = sample::section(&s, "node_config.h")
            .iter()
            .map(String::as_str)
            .filter(|l| l.starts_with("#define"))
            .collect();
        std::fs::write(state_dir.join("globals/node_config.h"), defines.join("\n") + "\n")?;

        Ok(SimulatedNode { name: "k8s-node1", layout, maps, bpffs, netns, etcd, state_dir })
    }

    /// `kvcheck check` arguments that point at this node (run inside its netns).
    pub fn check_args(&self) -> Vec<String> {
        self.check_args_via(&self.etcd.endpoints())
    }

    /// [`check_args`](Self::check_args) with these etcd endpoints (e.g. a gRPC proxy's).
    pub fn check_args_via(&self, endpoints: &[String]) -> Vec<String> {
        // A TLS cluster is reached the way Cilium's agent reaches it: through an etcd.config.
        let (etcd_flag, etcd_value) = match &self.etcd.tls {
            Some(t) => ("--etcd-config", t.etcd_config(endpoints, &t.ca).map(|p| p.display().to_string()).unwrap_or_default()),
            None => ("--etcd-endpoints", endpoints.join(",")),
        };
        [
            "check",
            "--bpffs",
            self.bpffs.root_str(),
            etcd_flag,
            &etcd_value,
            "--node-name",
            self.name,
            "--cilium-state-dir",
            self.state_dir.to_str().unwrap_or_default(),
            "--netns",
            &format!("/var/run/netns/{}", self.netns.name),
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    /// Runs `kvcheck check <check_args> <extra>` (addresses from the node's netns, etcd on
    /// this host's loopback, as a hostNetwork DaemonSet pod sees them).
    pub fn check(&self, extra: &[&str]) -> Output {
        let mut args = self.check_args();
        args.extend(extra.iter().map(ToString::to_string));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::run_kvcheck(None, &refs)
    }

    pub fn ipcache_put(&self, prefix: &str, v: IpcacheValue) -> anyhow::Result<()> {
        let p: IpNet = prefix.parse()?;
        self.maps.ipcache.update(&encode::ipcache_key(self.layout, p, 0), &encode::ipcache_value(self.layout, v))?;
        Ok(())
    }

    pub fn ipcache_delete(&self, prefix: &str) -> anyhow::Result<()> {
        let p: IpNet = prefix.parse()?;
        self.maps.ipcache.delete(&encode::ipcache_key(self.layout, p, 0))?;
        Ok(())
    }

    pub fn endpoint_delete(&self, ip: &str) -> anyhow::Result<()> {
        let ip: IpAddr = ip.parse()?;
        self.maps.endpoints.delete(&encode::endpoint_key(ip))?;
        Ok(())
    }

    pub fn etcd_put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.etcd.put_all(&[(key.to_owned(), value.to_owned())])
    }

    pub fn etcd_del(&self, key: &str) -> anyhow::Result<()> {
        self.etcd.etcdctl_ok(&["del", key])?;
        Ok(())
    }
}

impl Drop for SimulatedNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
