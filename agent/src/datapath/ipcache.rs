//! `cilium_ipcache` / `cilium_ipcache_v2`: prefix → (identity, tunnel endpoint, encrypt key).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::codec::{self, DecodeError, FAMILY_IPV4, FAMILY_IPV6};
use crate::model::version::Layout;

pub const KEY_SIZE: usize = 24;
/// The LPM prefix length counts 32 bits (prefixlen is excluded; cluster id, pad and family
/// bytes are included) before the address bits start.
pub const NON_ADDRESS_BITS: u32 = 32;

/// One decoded ipcache entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IpcacheEntry {
    pub prefix: IpNet,
    /// ClusterMesh cluster id in the key (0 for the local cluster; always 0 before v1.14).
    pub cluster_id: u16,
    pub identity: u32,
    /// `None` when the entry has no tunnel endpoint (0.0.0.0 / has_tunnel_ep unset).
    pub tunnel_endpoint: Option<IpAddr>,
    /// IPsec key index (255 = WireGuard from v1.16).
    pub encrypt_key: u8,
    /// The raw flags byte (v1.16+; 0 before).
    pub flags: u8,
    pub flag_names: IpcacheFlags,
    /// v1.14's node id (ipcache v1 bytes 8..9); `None` in other layouts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u16>,
}

const FLAG_SKIP_TUNNEL: u8 = 1 << 0;
const FLAG_HAS_TUNNEL_EP: u8 = 1 << 1;
const FLAG_IPV6_TUNNEL_EP: u8 = 1 << 2;
const FLAG_REMOTE_CLUSTER: u8 = 1 << 3;
const FLAG_NAMES: [(u8, &str); 4] = [
    (FLAG_SKIP_TUNNEL, "skip-tunnel"),
    (FLAG_HAS_TUNNEL_EP, "has-tunnel-endpoint"),
    (FLAG_IPV6_TUNNEL_EP, "ipv6-tunnel-endpoint"),
    (FLAG_REMOTE_CLUSTER, "remote-cluster"),
];

/// The flags byte with the bits its layout defines; two bytes per entry (500k entries are
/// common), serialized as the list of names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheFlags {
    pub bits: u8,
    pub known: u8,
}

impl IpcacheFlags {
    fn new(layout: Layout, bits: u8) -> IpcacheFlags {
        let mut known = FLAG_SKIP_TUNNEL;
        if layout.ipcache_v2() {
            known |= FLAG_HAS_TUNNEL_EP | FLAG_IPV6_TUNNEL_EP;
        }
        if layout >= Layout::V1_19 {
            known |= FLAG_REMOTE_CLUSTER;
        }
        IpcacheFlags { bits, known }
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = FLAG_NAMES
            .iter()
            .filter(|(bit, _)| self.known & bit != 0 && self.bits & bit != 0)
            .map(|(_, n)| *n)
            .collect();
        if self.bits & !self.known != 0 {
            names.push("unknown-bits");
        }
        names
    }
}

impl Serialize for IpcacheFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

/// Decodes the 24-byte key: (prefix, cluster id).
pub fn decode_key(layout: Layout, key: &[u8]) -> Result<(IpNet, u16), DecodeError> {
    codec::check_size(key, KEY_SIZE)?;
    let prefixlen = codec::u32_at(key, 0);
    let family = key[7];
    let (max_bits, family_name) = match family {
        FAMILY_IPV4 => (32, "IPv4"),
        FAMILY_IPV6 => (128, "IPv6"),
        other => return Err(DecodeError::Family(other)),
    };
    if !(NON_ADDRESS_BITS..=NON_ADDRESS_BITS + max_bits).contains(&prefixlen) {
        return Err(DecodeError::PrefixLen {
            prefixlen,
            family: family_name,
            max: NON_ADDRESS_BITS + max_bits,
        });
    }
    let ip = codec::ip_at(key, 8, family)?;
    // In range by the check above, so the conversion cannot fail.
    let bits = (prefixlen - NON_ADDRESS_BITS) as u8;
    let prefix = IpNet::new(ip, bits).map_err(|_| DecodeError::PrefixLen {
        prefixlen,
        family: family_name,
        max: NON_ADDRESS_BITS + max_bits,
    })?;
    let cluster_id = match layout {
        Layout::V1_7 => 0,
        Layout::V1_14 => u16::from(key[6]),
        _ => codec::u16_at(key, 4),
    };
    Ok((prefix, cluster_id))
}

pub fn decode(layout: Layout, key: &[u8], value: &[u8]) -> Result<IpcacheEntry, DecodeError> {
    let (prefix, cluster_id) = decode_key(layout, key)?;
    codec::check_size(value, layout.ipcache_value_size() as usize)?;
    let identity = codec::u32_at(value, 0);
    let (tunnel_endpoint, encrypt_key, flags, node_id) = if layout.ipcache_v2() {
        let flags = value[23];
        let tunnel = if flags & FLAG_IPV6_TUNNEL_EP != 0 {
            Some(IpAddr::V6(codec::ipv6_at(value, 4)))
        } else if flags & FLAG_HAS_TUNNEL_EP != 0 {
            Some(IpAddr::V4(codec::ipv4_at(value, 4)))
        } else {
            // Cilium always sets has_tunnel_ep with an endpoint; show stray bytes anyway.
            codec::optional_ipv4_at(value, 4)
        };
        (tunnel, value[22], flags, None)
    } else {
        let tunnel = codec::optional_ipv4_at(value, 4);
        match layout {
            Layout::V1_7 => (tunnel, value[8], 0, None),
            Layout::V1_14 => (tunnel, value[10], 0, Some(codec::u16_at(value, 8))),
            _ => (tunnel, value[10], value[11], None),
        }
    };
    Ok(IpcacheEntry {
        prefix,
        cluster_id,
        identity,
        tunnel_endpoint,
        encrypt_key,
        flags,
        flag_names: IpcacheFlags::new(layout, flags),
        node_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '|'], "")).unwrap()
    }

    #[test]
    fn decodes_reference_examples() {
        // cilium-reference §S6: 10.244.1.79/32, id 199472, tunnel 172.18.0.3.
        let key = hex("40000000 00000001 0af4014f 000000000000000000000000");
        let v1_7 = hex("300b0300 ac120003 00000000");
        let e = decode(Layout::V1_7, &key, &v1_7).unwrap();
        assert_eq!(e.prefix, "10.244.1.79/32".parse::<IpNet>().unwrap());
        assert_eq!(e.identity, 199472);
        assert_eq!(e.tunnel_endpoint, Some("172.18.0.3".parse().unwrap()));
        assert_eq!(e.encrypt_key, 0);

        let v1_16 = hex("300b0300 ac120003 00000500");
        let e = decode(Layout::V1_15, &key, &v1_16).unwrap();
        assert_eq!(e.encrypt_key, 5);
        // The same bytes read with the old layout put the key at byte 8 (=0): layouts matter.
        assert_eq!(decode(Layout::V1_7, &key, &v1_16).unwrap().encrypt_key, 0);

        let v2 = hex("300b0300 ac120003 000000000000000000000000 0000 05 02");
        let e = decode(Layout::V1_18, &key, &v2).unwrap();
        assert_eq!(e.encrypt_key, 5);
        assert_eq!(e.tunnel_endpoint, Some("172.18.0.3".parse().unwrap()));
        assert_eq!(e.flag_names.names(), vec!["has-tunnel-endpoint"]);
    }

    #[test]
    fn prefix_arithmetic() {
        let v6 = hex("a0000000 00000002 fd00001002440001000000000000d643");
        let (p, _) = decode_key(Layout::V1_15, &v6).unwrap();
        assert_eq!(p, "fd00:10:244:1::d643/128".parse::<IpNet>().unwrap());
        let world = hex("20000000 00000001 00000000000000000000000000000000");
        assert_eq!(decode_key(Layout::V1_7, &world).unwrap().0, "0.0.0.0/0".parse::<IpNet>().unwrap());
        let v4_24 = hex("38000000 00000001 0a060700000000000000000000000000");
        assert_eq!(decode_key(Layout::V1_7, &v4_24).unwrap().0, "10.6.7.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn rejects_bad_keys() {
        let bad_family = hex("40000000 00000009 0a000001000000000000000000000000");
        assert_eq!(decode_key(Layout::V1_7, &bad_family), Err(DecodeError::Family(9)));
        let too_long = hex("41000000 00000001 0a000001000000000000000000000000");
        assert!(matches!(decode_key(Layout::V1_7, &too_long), Err(DecodeError::PrefixLen { prefixlen: 65, .. })));
        let too_short = hex("1f000000 00000001 0a000001000000000000000000000000");
        assert!(matches!(decode_key(Layout::V1_7, &too_short), Err(DecodeError::PrefixLen { prefixlen: 31, .. })));
    }

    #[test]
    fn cluster_id_moves_between_layouts() {
        let key = hex("40000000 0300 0401 0a000001000000000000000000000000");
        assert_eq!(decode_key(Layout::V1_7, &key).unwrap().1, 0);
        assert_eq!(decode_key(Layout::V1_14, &key).unwrap().1, 4);
        assert_eq!(decode_key(Layout::V1_15, &key).unwrap().1, 3);
    }
}
