//! `cilium_lxc`: local endpoint IP → (ifindex, endpoint id, MACs, identity), plus host entries.

use std::net::IpAddr;

use serde::Serialize;

use super::codec::{self, DecodeError, Mac};
use crate::model::version::Layout;

pub const KEY_SIZE: usize = 20;
pub const VALUE_SIZE: usize = 48;

/// `ENDPOINT_F_HOST`: the entry is one of the node's own addresses, not an endpoint.
pub const FLAG_HOST: u32 = 1;
const FLAG_NAMES: &[(u32, &str, Layout)] = &[
    (FLAG_HOST, "host", Layout::V1_7),
    (2, "at-host-ns", Layout::V1_17),
    (4, "no-snat-v4", Layout::V1_19),
    (8, "no-snat-v6", Layout::V1_19),
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointEntry {
    pub ip: IpAddr,
    /// Encrypt key byte of the key (0 in lxc keys).
    pub key_byte: u8,
    pub cluster_id: u16,
    /// Host-side interface index (the lxc veth).
    pub ifindex: u32,
    /// Cilium's endpoint ID.
    pub endpoint_id: u16,
    pub flags: u32,
    pub flag_names: Vec<&'static str>,
    /// A host entry (`ENDPOINT_F_HOST`): one of the node's own IPs.
    pub is_host: bool,
    /// Container-side MAC; `None` when zero.
    pub mac: Option<Mac>,
    /// Host-side MAC; `None` when zero.
    pub node_mac: Option<Mac>,
    /// The endpoint's security identity (v1.14+; `None` in layouts without it).
    pub identity: Option<u32>,
    /// Parent interface index (v1.17+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_ifindex: Option<u32>,
    /// Routing info word (v1.20).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rt_info: Option<u32>,
}

pub fn decode(layout: Layout, key: &[u8], value: &[u8]) -> Result<EndpointEntry, DecodeError> {
    codec::check_size(key, KEY_SIZE)?;
    codec::check_size(value, VALUE_SIZE)?;
    let ip = codec::ip_at(key, 0, key[16])?;
    let cluster_id = match layout {
        Layout::V1_7 => 0,
        Layout::V1_14 => u16::from(key[18]),
        _ => codec::u16_at(key, 18),
    };
    let flags = codec::u32_at(value, 8);
    let mac = Mac::at(value, 16);
    let node_mac = Mac::at(value, 24);
    let mut flag_names: Vec<&'static str> = FLAG_NAMES
        .iter()
        .filter(|(bit, _, since)| flags & bit != 0 && layout >= *since)
        .map(|(_, name, _)| *name)
        .collect();
    let known = FLAG_NAMES
        .iter()
        .filter(|(_, _, since)| layout >= *since)
        .fold(0, |acc, (bit, _, _)| acc | bit);
    if flags & !known != 0 {
        flag_names.push("unknown-bits");
    }
    Ok(EndpointEntry {
        ip,
        key_byte: key[17],
        cluster_id,
        ifindex: codec::u32_at(value, 0),
        endpoint_id: codec::u16_at(value, 6),
        flags,
        flag_names,
        is_host: flags & FLAG_HOST != 0,
        mac: (!mac.is_zero()).then_some(mac),
        node_mac: (!node_mac.is_zero()).then_some(node_mac),
        identity: (layout >= Layout::V1_14).then(|| codec::u32_at(value, 32)),
        parent_ifindex: (layout >= Layout::V1_17).then(|| codec::u32_at(value, 36)),
        rt_info: (layout >= Layout::V1_20).then(|| codec::u32_at(value, 12)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_real_1_7_endpoint_and_host_entry() {
        // From a real Cilium 1.7.1 node (tests/data/real-cilium-1.7.1-node.txt).
        let key = hex::decode("0a0601dd00000000000000000000000001000000").unwrap();
        let value = hex::decode(
            "07000000 00005d00 00000000 00000000 9e9cde29a2910000 3eec3ec4f5a70000 \
             0000000000000000 0000000000000000"
                .replace(' ', ""),
        )
        .unwrap();
        let e = decode(Layout::V1_7, &key, &value).unwrap();
        assert_eq!(e.ip, "10.6.1.221".parse::<IpAddr>().unwrap());
        assert_eq!((e.ifindex, e.endpoint_id, e.is_host), (7, 93, false));
        assert_eq!(e.mac.unwrap().to_string(), "9e:9c:de:29:a2:91");
        assert_eq!(e.node_mac.unwrap().to_string(), "3e:ec:3e:c4:f5:a7");
        assert_eq!(e.identity, None);

        let host_key = hex::decode("0a00020f00000000000000000000000001000000").unwrap();
        let mut host_value = vec![0u8; 48];
        host_value[8] = 1;
        let h = decode(Layout::V1_15, &host_key, &host_value).unwrap();
        assert!(h.is_host);
        assert_eq!(h.flag_names, vec!["host"]);
        assert_eq!(h.identity, Some(0));
        assert_eq!(h.mac, None);
    }

    #[test]
    fn newer_fields_by_layout() {
        let key = hex::decode("fd00001002440001000000000000d64302000300").unwrap();
        let mut value = vec![0u8; 48];
        value[12..16].copy_from_slice(&9u32.to_ne_bytes());
        value[32..36].copy_from_slice(&199472u32.to_ne_bytes());
        value[36..40].copy_from_slice(&42u32.to_ne_bytes());
        let e = decode(Layout::V1_17, &key, &value).unwrap();
        assert_eq!(e.ip, "fd00:10:244:1::d643".parse::<IpAddr>().unwrap());
        assert_eq!((e.identity, e.parent_ifindex, e.rt_info), (Some(199472), Some(42), None));
        assert_eq!(e.cluster_id, 3);
        assert_eq!(decode(Layout::V1_20, &key, &value).unwrap().rt_info, Some(9));
        assert_eq!(decode(Layout::V1_14, &key, &value).unwrap().parent_ifindex, None);
    }
}
