//! A whole simulated node: bpffs with Cilium's maps, a netns with cilium_host, known drift.

use std::net::IpAddr;

use kvcheck::model::version::Layout;

use crate::encode::{self, IpcacheValue};
use crate::maps::{BpffsMount, CiliumMaps, WriterMap};
use crate::netns::Netns;
use crate::sample;

pub struct SimulatedNode {
    pub name: &'static str,
    pub maps: CiliumMaps,
    // Dropped after the maps (field order), so the pins go before the mount.
    pub bpffs: BpffsMount,
    pub netns: Netns,
    pub cilium_host_addr: &'static str,
    /// What was changed from the real capture, for people.
    pub drifts: Vec<String>,
}

impl SimulatedNode {
    /// The real Cilium 1.7.1 node of `tests/data/real-cilium-1.7.1-node.txt`, with:
    /// a stale ipcache entry for a pod that no longer exists, a local endpoint removed from the
    /// endpoint map, and a `cilium_host` address that is not the node's CiliumInternalIP.
    pub fn real_1_7_1_with_drift() -> anyhow::Result<SimulatedNode> {
        let s = sample::sections(sample::REAL_1_7_1);
        let bpffs = BpffsMount::new()?;
        let maps = CiliumMaps::create(&bpffs, Layout::V1_7)?;
        let write = |map: &WriterMap, heading: &str| -> std::io::Result<()> {
            for (k, v) in sample::bpftool_entries(sample::section(&s, heading)) {
                map.update(&k, &v)?;
            }
            Ok(())
        };
        let dump = "bpftool map dump pinned /sys/fs/bpf/tc/globals/";
        write(&maps.ipcache, &format!("{dump}cilium_ipcache"))?;
        write(&maps.endpoints, &format!("{dump}cilium_lxc"))?;
        if let Some(t) = &maps.tunnel {
            write(t, &format!("{dump}cilium_tunnel_map"))?;
        }

        let mut drifts = Vec::new();
        let stale: IpAddr = "10.6.7.99".parse()?;
        maps.ipcache.update(
            &encode::ipcache_key(Layout::V1_7, ipnet::IpNet::from(stale), 0),
            &encode::ipcache_value(Layout::V1_7, IpcacheValue {
                identity: 12928,
                tunnel_endpoint: Some("10.5.1.133".parse()?),
                ..Default::default()
            }),
        )?;
        drifts.push("ipcache 10.6.7.99/32 -> 12928 via 10.5.1.133: no such pod in the kvstore (stale)".to_owned());

        let cilium_host_addr = "10.6.1.99/32";
        drifts.push(format!("cilium_host has {cilium_host_addr}; the node's CiliumInternalIP is 10.6.1.124"));

        let netns = Netns::new("kvcheck-demo")?;
        netns.add_interface("eth0", &["10.5.1.132/24"])?;
        netns.add_cilium_host(&[cilium_host_addr])?;
        Ok(SimulatedNode {
            name: "k8s-node1",
            maps,
            bpffs,
            netns,
            cilium_host_addr,
            drifts,
        })
    }
}
