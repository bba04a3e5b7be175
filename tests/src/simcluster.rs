//! A consistent simulated node of any layout, IPv4 or dual stack, written the way Cilium's
//! agent writes both sides (this follows docs/cilium-expected-state.md from the writer's side,
//! independently of kvcheck's derivation): node `node-a` with two pods and a health endpoint,
//! a remote node `node-b` with two pods, three identities.

use std::net::IpAddr;

use ipnet::IpNet;
use kvcheck::model::version::Layout;

use crate::encode::{self, EndpointValue, IpcacheValue};
use crate::etcd::EtcdCluster;
use crate::maps::{self, BpffsMount, CiliumMaps, WriterMap};
use crate::netns::Netns;
use crate::simnode::SimulatedNode;

pub const NODE_A: &str = "node-a";
pub const NODE_A_IP: &str = "192.168.50.10";
pub const NODE_A_IP6: &str = "fc00::10";
pub const ROUTER_A: &str = "10.1.0.1";
pub const ROUTER_A6: &str = "fd00:1::1";
pub const HEALTH_A: &str = "10.1.0.2";
pub const HEALTH_A6: &str = "fd00:1::2";
pub const NODE_B_IP: &str = "192.168.50.11";
pub const NODE_B_IP6: &str = "fc00::11";
pub const ROUTER_B: &str = "10.2.0.1";
pub const ROUTER_B6: &str = "fd00:2::1";
pub const HEALTH_B: &str = "10.2.0.2";

/// Local pods: (IPv4, IPv6, identity, endpoint id, ifindex).
pub const LOCAL_PODS: [(&str, &str, u32, u16, u32); 2] = [("10.1.0.20", "fd00:1::20", 1000, 20, 20), ("10.1.0.21", "fd00:1::21", 1001, 21, 21)];
/// Remote pods on node-b: (IPv4, IPv6, identity).
pub const REMOTE_PODS: [(&str, &str, u32); 2] = [("10.2.0.30", "fd00:2::30", 1000), ("10.2.0.31", "fd00:2::31", 1002)];
pub const IDENTITIES: [(u32, &str); 3] = [
    (1000, "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=default;k8s:io.kubernetes.pod.namespace=shop;"),
    (1001, "k8s:app=db;k8s:io.cilium.k8s.policy.cluster=default;k8s:io.kubernetes.pod.namespace=shop;"),
    (1002, "k8s:app=api;k8s:io.cilium.k8s.policy.cluster=default;k8s:io.kubernetes.pod.namespace=shop;"),
];
pub const HEALTH_ENDPOINT_ID: u16 = 5;

#[derive(Clone, Copy, Debug)]
pub struct NodeSpec {
    pub layout: Layout,
    pub dual_stack: bool,
    /// Override the ipcache's max entries (Cilium's is configurable); `None` = 512,000.
    pub ipcache_max: Option<u32>,
    /// A 3-member etcd cluster with TLS client-certificate auth instead of one plaintext member.
    pub three_member_tls: bool,
}

impl NodeSpec {
    pub fn new(layout: Layout, dual_stack: bool) -> NodeSpec {
        NodeSpec { layout, dual_stack, ipcache_max: None, three_member_tls: false }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("constant IP")
}

pub fn ip_json(addr: &str, host: &str, id: u32, node: &str, ep: u32) -> String {
    format!(r#"{{"IP":"{addr}","Mask":null,"HostIP":"{host}","ID":{id},"Key":0,"Metadata":"cilium-global:default:{node}:{ep}","K8sNamespace":"shop","K8sPodName":"pod-{ep}"}}"#)
}

fn node_json(name: &str, node_ip: &str, node_ip6: &str, router: &str, router6: &str, n: u8, health: &str, dual: bool) -> String {
    let mut addrs = vec![format!(r#"{{"Type":"InternalIP","IP":"{node_ip}"}}"#), format!(r#"{{"Type":"CiliumInternalIP","IP":"{router}"}}"#)];
    if dual {
        addrs.push(format!(r#"{{"Type":"InternalIP","IP":"{node_ip6}"}}"#));
        addrs.push(format!(r#"{{"Type":"CiliumInternalIP","IP":"{router6}"}}"#));
    }
    let v6cidr = if dual { format!(r#"{{"IP":"fd00:{n}::","Mask":"//////////8AAAAAAAAAAA=="}}"#) } else { "null".into() };
    format!(
        r#"{{"Name":"{name}","Cluster":"default","IPAddresses":[{}],"IPv4AllocCIDR":{{"IP":"10.{n}.0.0","Mask":"////AA=="}},"IPv6AllocCIDR":{v6cidr},"IPv4HealthIP":"{health}","IPv6HealthIP":"","ClusterID":0,"Source":"local","EncryptionKey":0}}"#,
        addrs.join(",")
    )
}

/// Builds a consistent node for `spec`.
pub fn consistent_node(spec: NodeSpec) -> anyhow::Result<SimulatedNode> {
    let layout = spec.layout;
    let dual = spec.dual_stack;
    let bpffs = BpffsMount::new()?;
    let dir = bpffs.globals();
    let mut ipcache_shape = maps::ipcache_shape(layout);
    if let Some(max) = spec.ipcache_max {
        ipcache_shape.max_entries = max;
    }
    let cilium_maps = CiliumMaps {
        ipcache: WriterMap::create(&dir, ipcache_shape)?,
        endpoints: WriterMap::create(&dir, maps::endpoints_shape(layout, true))?,
        tunnel: if layout.has_tunnel_map() { Some(WriterMap::create(&dir, maps::tunnel_shape())?) } else { None },
    };

    // ---- kvstore (what the agents of node-a and node-b write)
    let mut kv: Vec<(String, String)> = vec![
        (format!("cilium/state/nodes/v1/default/{NODE_A}"), node_json(NODE_A, NODE_A_IP, NODE_A_IP6, ROUTER_A, ROUTER_A6, 1, HEALTH_A, dual)),
        ("cilium/state/nodes/v1/default/node-b".into(), node_json("node-b", NODE_B_IP, NODE_B_IP6, ROUTER_B, ROUTER_B6, 2, HEALTH_B, dual)),
    ];
    for (v4, v6, id, ep, _) in LOCAL_PODS {
        kv.push((format!("cilium/state/ip/v1/default/{v4}"), ip_json(v4, NODE_A_IP, id, NODE_A, u32::from(ep))));
        if dual {
            kv.push((format!("cilium/state/ip/v1/default/{v6}"), ip_json(v6, NODE_A_IP, id, NODE_A, u32::from(ep))));
        }
    }
    for (i, (v4, v6, id)) in REMOTE_PODS.iter().enumerate() {
        kv.push((format!("cilium/state/ip/v1/default/{v4}"), ip_json(v4, NODE_B_IP, *id, "node-b", 30 + i as u32)));
        if dual {
            kv.push((format!("cilium/state/ip/v1/default/{v6}"), ip_json(v6, NODE_B_IP, *id, "node-b", 30 + i as u32)));
        }
    }
    // Health endpoints have ip/v1 keys up to v1.16.
    if layout < Layout::V1_17 {
        kv.push((format!("cilium/state/ip/v1/default/{HEALTH_A}"), ip_json(HEALTH_A, NODE_A_IP, 4, NODE_A, u32::from(HEALTH_ENDPOINT_ID))));
        kv.push((format!("cilium/state/ip/v1/default/{HEALTH_B}"), ip_json(HEALTH_B, NODE_B_IP, 4, "node-b", 5)));
    }
    for (id, labels) in IDENTITIES {
        kv.push((format!("cilium/state/identities/v1/id/{id}"), labels.into()));
    }
    // References: node-a uses 1000 and 1001, node-b 1000 and 1002.
    for (id, node_ip) in [(1000, NODE_A_IP), (1001, NODE_A_IP), (1000, NODE_B_IP), (1002, NODE_B_IP)] {
        let labels = IDENTITIES.iter().find(|(i, _)| *i == id).map(|(_, l)| *l).unwrap_or_default();
        kv.push((format!("cilium/state/identities/v1/value/{labels}/{node_ip}"), id.to_string()));
    }

    // ---- datapath of node-a (what its agent writes)
    let put = |prefix: &str, v: IpcacheValue| -> anyhow::Result<()> {
        let p: IpNet = prefix.parse()?;
        cilium_maps.ipcache.update(&encode::ipcache_key(layout, p, 0), &encode::ipcache_value(layout, v))?;
        Ok(())
    };
    let host = |id: u32| IpcacheValue { identity: id, ..Default::default() };
    let via_b = |id: u32| IpcacheValue { identity: id, tunnel_endpoint: Some(ip(NODE_B_IP)), ..Default::default() };
    let world_v4 = if layout >= Layout::V1_15 && dual { 9 } else { 2 };
    put("0.0.0.0/0", host(world_v4))?;
    if dual {
        put("::/0", host(if layout >= Layout::V1_15 { 10 } else { 2 }))?;
    }
    let mut own = vec![NODE_A_IP, ROUTER_A];
    if dual {
        own.extend([NODE_A_IP6, ROUTER_A6]);
    }
    for a in &own {
        put(&IpNet::from(ip(a)).to_string(), host(1))?;
        cilium_maps.endpoints.update(&encode::endpoint_key(ip(a)), &encode::endpoint_value(layout, EndpointValue::host()))?;
    }
    put(&format!("{HEALTH_A}/32"), host(4))?;
    cilium_maps.endpoints.update(
        &encode::endpoint_key(ip(HEALTH_A)),
        &encode::endpoint_value(layout, EndpointValue { ifindex: 5, endpoint_id: HEALTH_ENDPOINT_ID, identity: 4, mac: [2, 0, 0, 0, 0, 5], node_mac: [2, 0, 0, 0, 1, 5], ..Default::default() }),
    )?;
    for (v4, v6, id, ep, ifindex) in LOCAL_PODS {
        let value = EndpointValue { ifindex, endpoint_id: ep, identity: id, mac: [2, 0, 0, 0, 0, ep as u8], node_mac: [2, 0, 0, 0, 1, ep as u8], ..Default::default() };
        let mut addrs = vec![v4];
        if dual {
            addrs.push(v6);
        }
        for a in addrs {
            put(&IpNet::from(ip(a)).to_string(), host(id))?;
            cilium_maps.endpoints.update(&encode::endpoint_key(ip(a)), &encode::endpoint_value(layout, value))?;
        }
    }
    let remote_node_id = if layout >= Layout::V1_14 { 6 } else { 1 };
    for (v4, v6, id) in REMOTE_PODS {
        put(&format!("{v4}/32"), via_b(id))?;
        if dual {
            put(&format!("{v6}/128"), via_b(id))?;
        }
    }
    put(&format!("{NODE_B_IP}/32"), host(remote_node_id))?;
    put(&format!("{ROUTER_B}/32"), via_b(remote_node_id))?;
    put(&format!("{HEALTH_B}/32"), via_b(4))?;
    if dual {
        put(&format!("{NODE_B_IP6}/128"), host(remote_node_id))?;
        put(&format!("{ROUTER_B6}/128"), via_b(remote_node_id))?;
    }
    if layout.ipcache_v2() {
        put("10.2.0.0/24", via_b(world_v4))?;
        if dual {
            put("fd00:2::/64", via_b(10))?;
        }
    }
    if let Some(t) = &cilium_maps.tunnel {
        t.update(&encode::tunnel_key(ip("10.2.0.0")), &encode::tunnel_value(ip(NODE_B_IP), 0))?;
        if dual {
            t.update(&encode::tunnel_key(ip("fd00:2::")), &encode::tunnel_value(ip(NODE_B_IP), 0))?;
        }
    }

    // ---- node-a's network namespace and node_config.h
    let netns = Netns::new("kvc-sim")?;
    let mut eth0 = vec![format!("{NODE_A_IP}/24")];
    let mut router = vec![format!("{ROUTER_A}/32")];
    if dual {
        eth0.push(format!("{NODE_A_IP6}/64"));
        router.push(format!("{ROUTER_A6}/128"));
    }
    netns.add_interface("eth0", &eth0.iter().map(String::as_str).collect::<Vec<_>>())?;
    netns.add_cilium_host(&router.iter().map(String::as_str).collect::<Vec<_>>())?;

    let etcd = if spec.three_member_tls { EtcdCluster::three_tls()? } else { EtcdCluster::single()? };
    etcd.put_all(&kv)?;
    let state_dir = bpffs.root.with_extension("state");
    std::fs::create_dir_all(state_dir.join("globals"))?;
    let mut defines = vec!["#define ENABLE_IPV4 1"];
    if dual {
        defines.push("#define ENABLE_IPV6 1");
    }
    if layout.has_tunnel_map() {
        defines.push("#define TUNNEL_MODE 1");
    }
    std::fs::write(state_dir.join("globals/node_config.h"), defines.join("\n") + "\n")?;
    Ok(SimulatedNode { name: NODE_A, layout, maps: cilium_maps, bpffs, netns, etcd, state_dir })
}
