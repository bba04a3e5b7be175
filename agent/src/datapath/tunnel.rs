//! `cilium_tunnel_map` (v1.7–v1.17): remote pod-CIDR base address → remote node IP.

use std::net::IpAddr;

use serde::Serialize;

use super::codec::{self, DecodeError};
use crate::model::version::Layout;

pub const KEY_SIZE: usize = 20;
pub const VALUE_SIZE: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TunnelEntry {
    /// Network address of a remote node's pod CIDR (no prefix length is stored: the datapath
    /// masks the destination with the local pod-CIDR mask before the lookup).
    pub prefix: IpAddr,
    pub cluster_id: u16,
    /// The remote node's IP.
    pub tunnel_endpoint: IpAddr,
    pub encrypt_key: u8,
    /// v1.14's node id; `None` in other layouts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u16>,
}

pub fn decode(layout: Layout, key: &[u8], value: &[u8]) -> Result<TunnelEntry, DecodeError> {
    codec::check_size(key, KEY_SIZE)?;
    codec::check_size(value, VALUE_SIZE)?;
    let cluster_id = match layout {
        Layout::V1_7 => 0,
        Layout::V1_14 => u16::from(key[17]),
        _ => codec::u16_at(key, 18),
    };
    Ok(TunnelEntry {
        prefix: codec::ip_at(key, 0, key[16])?,
        cluster_id,
        tunnel_endpoint: codec::ip_at(value, 0, value[16])?,
        encrypt_key: value[17],
        node_id: (layout == Layout::V1_14).then(|| codec::u16_at(value, 18)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_real_1_7_entry() {
        let key = hex::decode("0a06070000000000000000000000000001000000").unwrap();
        let value = hex::decode("0a05018500000000000000000000000001000000").unwrap();
        let e = decode(Layout::V1_7, &key, &value).unwrap();
        assert_eq!(e.prefix, "10.6.7.0".parse::<IpAddr>().unwrap());
        assert_eq!(e.tunnel_endpoint, "10.5.1.133".parse::<IpAddr>().unwrap());
        assert_eq!(e.encrypt_key, 0);
    }
}
