//! Test-side encoders of Cilium's map entries, written from the layout tables in
//! docs/cilium-datapath-layouts.md independently of kvcheck's decoders, so a shared mistake
//! cannot hide.

use std::net::IpAddr;

use ipnet::IpNet;
use kvcheck::model::version::Layout;

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 1 } else { 2 }
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// `struct ipcache_key`: prefixlen = 32 + CIDR bits; cluster id where the layout keeps it.
pub fn ipcache_key(layout: Layout, prefix: IpNet, cluster_id: u16) -> Vec<u8> {
    let mut k = vec![0u8; 24];
    k[0..4].copy_from_slice(&(32 + u32::from(prefix.prefix_len())).to_ne_bytes());
    match layout {
        Layout::V1_7 => assert_eq!(cluster_id, 0, "v1.7-v1.13 keys have no cluster id"),
        Layout::V1_14 => k[6] = u8::try_from(cluster_id).expect("v1.14 cluster id is a u8"),
        _ => k[4..6].copy_from_slice(&cluster_id.to_ne_bytes()),
    }
    k[7] = family(prefix.addr());
    k[8..24].copy_from_slice(&ip16(prefix.network()));
    k
}

#[derive(Clone, Copy, Debug, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    pub tunnel_endpoint: Option<IpAddr>,
    pub encrypt_key: u8,
    /// v1.15+ flag byte (v1.16 skip_tunnel; v1.18+ the has/ipv6 tunnel bits are added here).
    pub flags: u8,
    /// v1.14 node id.
    pub node_id: u16,
}

pub fn ipcache_value(layout: Layout, v: IpcacheValue) -> Vec<u8> {
    if layout.ipcache_v2() {
        let mut out = vec![0u8; 24];
        out[0..4].copy_from_slice(&v.identity.to_ne_bytes());
        let mut flags = v.flags;
        match v.tunnel_endpoint {
            Some(IpAddr::V4(ip)) => {
                out[4..8].copy_from_slice(&ip.octets());
                flags |= 1 << 1;
            }
            Some(IpAddr::V6(ip)) => {
                out[4..20].copy_from_slice(&ip.octets());
                flags |= (1 << 1) | (1 << 2);
            }
            None => {}
        }
        out[22] = v.encrypt_key;
        out[23] = flags;
        return out;
    }
    let mut out = vec![0u8; 12];
    out[0..4].copy_from_slice(&v.identity.to_ne_bytes());
    if let Some(IpAddr::V4(ip)) = v.tunnel_endpoint {
        out[4..8].copy_from_slice(&ip.octets());
    }
    match layout {
        Layout::V1_7 => out[8] = v.encrypt_key,
        Layout::V1_14 => {
            out[8..10].copy_from_slice(&v.node_id.to_ne_bytes());
            out[10] = v.encrypt_key;
        }
        _ => {
            out[10] = v.encrypt_key;
            out[11] = v.flags;
        }
    }
    out
}

/// `struct endpoint_key` for the lxc map (key byte 0, cluster id 0).
pub fn endpoint_key(ip: IpAddr) -> Vec<u8> {
    let mut k = vec![0u8; 20];
    k[0..16].copy_from_slice(&ip16(ip));
    k[16] = family(ip);
    k
}

#[derive(Clone, Copy, Debug, Default)]
pub struct EndpointValue {
    pub ifindex: u32,
    pub endpoint_id: u16,
    pub flags: u32,
    pub mac: [u8; 6],
    pub node_mac: [u8; 6],
    pub identity: u32,
    pub parent_ifindex: u32,
}

impl EndpointValue {
    /// A host entry: everything zero but `ENDPOINT_F_HOST`.
    pub fn host() -> Self {
        EndpointValue {
            flags: 1,
            ..Default::default()
        }
    }
}

pub fn endpoint_value(layout: Layout, v: EndpointValue) -> Vec<u8> {
    let mut out = vec![0u8; 48];
    out[0..4].copy_from_slice(&v.ifindex.to_ne_bytes());
    out[6..8].copy_from_slice(&v.endpoint_id.to_ne_bytes());
    out[8..12].copy_from_slice(&v.flags.to_ne_bytes());
    out[16..22].copy_from_slice(&v.mac);
    out[24..30].copy_from_slice(&v.node_mac);
    if layout >= Layout::V1_14 {
        out[32..36].copy_from_slice(&v.identity.to_ne_bytes());
    }
    if layout >= Layout::V1_17 {
        out[36..40].copy_from_slice(&v.parent_ifindex.to_ne_bytes());
    }
    out
}

/// Tunnel map key: a remote pod CIDR's network address.
pub fn tunnel_key(pod_cidr_base: IpAddr) -> Vec<u8> {
    endpoint_key(pod_cidr_base)
}

/// Tunnel map value: the remote node IP with the encrypt key at byte 17.
pub fn tunnel_value(node_ip: IpAddr, encrypt_key: u8) -> Vec<u8> {
    let mut v = endpoint_key(node_ip);
    v[17] = encrypt_key;
    v
}
