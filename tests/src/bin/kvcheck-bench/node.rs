//! The benchmark node: the full-size cluster in a real etcd and real maps, shared by the check, agent and Kubernetes sections.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use ipnet::IpNet;
use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, EndpointValue, IpcacheValue};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::maps::{BpffsMount, CiliumMaps};
use kvcheck_tests::simdata::{self, ClusterShape};

use crate::common::*;

/// A node whose kvstore and datapath are consistent at scale: node-0 of a `shape` cluster,
/// its ipcache topped up to `ipcache_entries` with local-scope CIDR identities (node-local by
/// design, so classified and not drift).
pub(crate) struct BenchNode {
    // Dropped in this order: maps before their bpffs mount.
    pub(crate) maps: CiliumMaps,
    pub(crate) bpffs: BpffsMount,
    pub(crate) ns: kvcheck_tests::netns::Netns,
    pub(crate) etcd: EtcdCluster,
    pub(crate) state: std::path::PathBuf,
    pub(crate) layout: Layout,
    pub(crate) shape: ClusterShape,
    pub(crate) total_ipcache: usize,
    pub(crate) local_scope: u32,
    pub(crate) local_pods: usize,
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

impl BenchNode {
    pub(crate) fn build(shape: ClusterShape, ipcache_entries: u32) -> Result<BenchNode> {
        use kvcheck_tests::netns::Netns;
        // v1.17: health endpoints have no ip/v1 keys (simdata writes none).
        let layout = Layout::V1_17;
        let etcd = EtcdCluster::single()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(simdata::load(&etcd.endpoints(), simdata::cluster_pairs(shape)))?;
        let bpffs = BpffsMount::new()?;
        // The ipcache sized up (Cilium's size is configurable): 500k entries in the default
        // 512k map would rightly be reported as map-pressure.
        let dir = bpffs.globals();
        let maps = CiliumMaps {
            ipcache: kvcheck_tests::maps::WriterMap::create(&dir, kvcheck_tests::maps::MapShape { max_entries: 1 << 20, ..kvcheck_tests::maps::ipcache_shape(layout) })?,
            endpoints: kvcheck_tests::maps::WriterMap::create(&dir, kvcheck_tests::maps::endpoints_shape(layout, true))?,
            tunnel: Some(kvcheck_tests::maps::WriterMap::create(&dir, kvcheck_tests::maps::tunnel_shape())?),
        };
        let mut ipc: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let put = |ipc: &mut Vec<(Vec<u8>, Vec<u8>)>, prefix: IpNet, identity: u32, tunnel: Option<IpAddr>| {
            ipc.push((encode::ipcache_key(layout, prefix, 0), encode::ipcache_value(layout, IpcacheValue { identity, tunnel_endpoint: tunnel, ..Default::default() })));
        };
        put(&mut ipc, "0.0.0.0/0".parse()?, 2, None);
        for i in 0..shape.nodes {
            let (a, b) = simdata::pod_cidr_base(i);
            let node_ip = v4(&simdata::node_ip(i));
            let local = i == 0;
            put(&mut ipc, IpNet::from(node_ip), if local { 1 } else { 6 }, None);
            put(&mut ipc, IpNet::from(v4(&format!("10.{a}.{b}.1"))), if local { 1 } else { 6 }, (!local).then_some(node_ip));
            put(&mut ipc, IpNet::from(v4(&format!("10.{a}.{b}.2"))), 4, (!local).then_some(node_ip));
            if !local {
                if let Some(t) = &maps.tunnel {
                    t.update(&encode::tunnel_key(v4(&format!("10.{a}.{b}.0"))), &encode::tunnel_value(node_ip, 0))?;
                }
            }
        }
        let mut local_pods = Vec::new();
        for j in 0..shape.ips {
            let n = j % shape.nodes;
            let (a, b) = simdata::pod_cidr_base(n);
            let ip = v4(&format!("10.{a}.{b}.{}", 3 + j / shape.nodes));
            let id = 256 + j % shape.identities;
            put(&mut ipc, IpNet::from(ip), id, (n != 0).then(|| v4(&simdata::node_ip(n))));
            if n == 0 {
                local_pods.push((ip, id, j));
            }
        }
        let mut k = 0u32;
        while (ipc.len() as u32) < ipcache_entries {
            put(&mut ipc, IpNet::from(IpAddr::V4(Ipv4Addr::from(0x6440_0000u32 + k))), 0x0100_0001 + k % 1000, None);
            k += 1;
        }
        let total_ipcache = ipc.len();
        maps.ipcache.fill(ipc.into_iter(), 4096)?;
        for ip in [v4(&simdata::node_ip(0)), v4("10.0.0.1")] {
            maps.endpoints.update(&encode::endpoint_key(ip), &encode::endpoint_value(layout, EndpointValue::host()))?;
        }
        maps.endpoints.update(&encode::endpoint_key(v4("10.0.0.2")), &encode::endpoint_value(layout, EndpointValue { ifindex: 2, endpoint_id: 2, identity: 4, ..Default::default() }))?;
        for (ip, id, j) in &local_pods {
            maps.endpoints.update(&encode::endpoint_key(*ip), &encode::endpoint_value(layout, EndpointValue { ifindex: 100 + j % 1000, endpoint_id: (j % 60000) as u16, identity: *id, ..Default::default() }))?;
        }
        let ns = Netns::new("kvc-bench")?;
        ns.add_interface("eth0", &[&format!("{}/16", simdata::node_ip(0))])?;
        ns.add_cilium_host(&["10.0.0.1/32"])?;
        let state = bpffs.root.with_extension("state");
        std::fs::create_dir_all(state.join("globals"))?;
        std::fs::write(state.join("globals/node_config.h"), "#define ENABLE_IPV4 1\n#define TUNNEL_MODE 1\n")?;
        Ok(BenchNode { maps, bpffs, ns, etcd, state, layout, shape, total_ipcache, local_scope: k, local_pods: local_pods.len() })
    }

    /// `kvcheck <sub>` pointed at this node.
    pub(crate) fn command(&self, sub: &str) -> Command {
        self.command_via(sub, &self.etcd.endpoints_arg())
    }

    /// [`command`](Self::command) reaching etcd at `endpoints` (a gRPC proxy, say).
    pub(crate) fn command_via(&self, sub: &str, endpoints: &str) -> Command {
        let mut c = Command::new(kvcheck_bin());
        c.args([sub, "--bpffs", self.bpffs.root_str(), "--etcd-endpoints", endpoints, "--node-name", "node-0"])
            .args(["--netns", &format!("/var/run/netns/{}", self.ns.name), "--cilium-version", "1.17"])
            .arg("--cilium-state-dir")
            .arg(&self.state);
        c
    }

    /// Starts `kvcheck agent` on this node and waits until /readyz answers 200.
    pub(crate) fn start_agent(&self, extra: &[&str], stderr: Stdio) -> Result<Child> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let agent = self.command("agent").args(["--listen", &format!("127.0.0.1:{port}")]).args(extra).stdout(Stdio::null()).stderr(stderr).spawn()?;
        wait_ready(agent, port, Duration::from_secs(120))
    }
}
