//! Byte-level helpers shared by the per-map decoders. Integers in Cilium's maps are in host
//! byte order, addresses in network order (see docs/cilium-datapath-layouts.md).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Serialize, Serializer};

/// Cilium's own address-family constants (not AF_INET/AF_INET6).
pub const FAMILY_IPV4: u8 = 1;
pub const FAMILY_IPV6: u8 = 2;

/// Why one map entry could not be decoded. The rest of the map is still read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("address family byte is {0}, expected 1 (IPv4) or 2 (IPv6)")]
    Family(u8),
    #[error("LPM prefix length {prefixlen} is out of range for {family} (expected 32..={max}: 32 non-address bits plus the CIDR bits)")]
    PrefixLen {
        prefixlen: u32,
        family: &'static str,
        max: u32,
    },
    #[error("entry is {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
}

pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub fn ipv4_at(b: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3])
}

pub fn ipv6_at(b: &[u8], off: usize) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[off..off + 16]);
    Ipv6Addr::from(octets)
}

/// The address in a 16-byte slot at `off`, interpreted by Cilium's family byte.
pub fn ip_at(b: &[u8], off: usize, family: u8) -> Result<IpAddr, DecodeError> {
    match family {
        FAMILY_IPV4 => Ok(IpAddr::V4(ipv4_at(b, off))),
        FAMILY_IPV6 => Ok(IpAddr::V6(ipv6_at(b, off))),
        other => Err(DecodeError::Family(other)),
    }
}

/// An IPv4 tunnel endpoint where 0.0.0.0 means "none".
pub fn optional_ipv4_at(b: &[u8], off: usize) -> Option<IpAddr> {
    let ip = ipv4_at(b, off);
    (!ip.is_unspecified()).then_some(IpAddr::V4(ip))
}

pub fn check_size(b: &[u8], expected: usize) -> Result<(), DecodeError> {
    if b.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::Size {
            got: b.len(),
            expected,
        })
    }
}

/// A MAC address as Cilium stores it: a u64 whose low six bytes are the octets in wire order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn at(b: &[u8], off: usize) -> Mac {
        let mut octets = [0u8; 6];
        octets.copy_from_slice(&b[off..off + 6]);
        Mac(octets)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
