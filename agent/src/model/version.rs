//! Cilium releases and the datapath byte layouts they use.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A Cilium release as given by the operator: `1.16`, `1.16.3` or `v1.16.3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CiliumVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("cannot parse Cilium version {0:?}: expected MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. 1.16 or v1.16.3")]
    Syntax(String),
    #[error("Cilium {0} is older than v1.7, the oldest release kvcheck knows the datapath layout of")]
    TooOld(CiliumVersion),
}

impl FromStr for CiliumVersion {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError::Syntax(s.to_owned());
        let trimmed = s.trim().trim_start_matches('v');
        // Drop pre-release/build suffixes such as `-rc.1` or `+abc`.
        let core = trimmed.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.');
        let mut number = |required: bool| -> Result<Option<u32>, VersionError> {
            match parts.next() {
                Some(p) => p.parse().map(Some).map_err(|_| bad()),
                None if required => Err(bad()),
                None => Ok(None),
            }
        };
        let major = number(true)?.ok_or_else(bad)?;
        let minor = number(true)?.ok_or_else(bad)?;
        let patch = number(false)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for CiliumVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.patch {
            Some(p) => write!(f, "v{}.{}.{}", self.major, self.minor, p),
            None => write!(f, "v{}.{}", self.major, self.minor),
        }
    }
}

/// A family of Cilium releases that share the byte layout of the ipcache, endpoint and
/// tunnel maps (see `docs/cilium-datapath-layouts.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Layout {
    /// v1.7–v1.13: encrypt key at ipcache value byte 8, no cluster id, no endpoint identity.
    #[serde(rename = "v1.7-v1.13")]
    V1_7,
    /// v1.14: u8 cluster id (ipcache key byte 6, lxc key byte 18), node_id, key at byte 10,
    /// endpoint identity.
    #[serde(rename = "v1.14")]
    V1_14,
    /// v1.15–v1.16: u16 cluster id at ipcache key byte 4 / lxc key byte 18; skip-tunnel flag (v1.16).
    #[serde(rename = "v1.15-v1.16")]
    V1_15,
    /// v1.17: as v1.15 plus the endpoint's parent ifindex.
    #[serde(rename = "v1.17")]
    V1_17,
    /// v1.18: `cilium_ipcache_v2` (24-byte value), no tunnel map.
    #[serde(rename = "v1.18")]
    V1_18,
    /// v1.19: as v1.18 plus the ipcache remote-cluster flag.
    #[serde(rename = "v1.19")]
    V1_19,
    /// v1.20 (main): as v1.19 plus the endpoint's rt_info word.
    #[serde(rename = "v1.20")]
    V1_20,
}

impl Layout {
    pub const ALL: [Layout; 7] = [
        Layout::V1_7,
        Layout::V1_14,
        Layout::V1_15,
        Layout::V1_17,
        Layout::V1_18,
        Layout::V1_19,
        Layout::V1_20,
    ];

    pub fn for_version(v: CiliumVersion) -> Result<Layout, VersionError> {
        Ok(match (v.major, v.minor) {
            (0, _) | (1, 0..=6) => return Err(VersionError::TooOld(v)),
            (1, 7..=13) => Layout::V1_7,
            (1, 14) => Layout::V1_14,
            (1, 15..=16) => Layout::V1_15,
            (1, 17) => Layout::V1_17,
            (1, 18) => Layout::V1_18,
            (1, 19) => Layout::V1_19,
            // Newer than anything we know: the newest layout is the best guess; the
            // reason string says so.
            _ => Layout::V1_20,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::V1_7 => "v1.7-v1.13",
            Layout::V1_14 => "v1.14",
            Layout::V1_15 => "v1.15-v1.16",
            Layout::V1_17 => "v1.17",
            Layout::V1_18 => "v1.18",
            Layout::V1_19 => "v1.19",
            Layout::V1_20 => "v1.20",
        }
    }

    /// v1.18 replaced `cilium_ipcache` (12-byte value) with `cilium_ipcache_v2` (24 bytes).
    pub fn ipcache_v2(self) -> bool {
        self >= Layout::V1_18
    }

    /// The tunnel map exists up to v1.17.
    pub fn has_tunnel_map(self) -> bool {
        self <= Layout::V1_17
    }

    pub fn ipcache_map_name(self) -> &'static str {
        if self.ipcache_v2() {
            "cilium_ipcache_v2"
        } else {
            "cilium_ipcache"
        }
    }

    pub fn ipcache_value_size(self) -> u32 {
        if self.ipcache_v2() { 24 } else { 12 }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_strings() {
        let v: CiliumVersion = "v1.16.3".parse().unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 16, Some(3)));
        let v: CiliumVersion = "1.7".parse().unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 7, None));
        let v: CiliumVersion = "1.19.0-rc.2".parse().unwrap();
        assert_eq!((v.minor, v.patch), (19, Some(0)));
        for bad in ["", "1", "x.y", "1.16.3.4", "1..2"] {
            assert!(bad.parse::<CiliumVersion>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn maps_releases_to_layouts() {
        let l = |s: &str| Layout::for_version(s.parse().unwrap());
        assert_eq!(l("1.7.1"), Ok(Layout::V1_7));
        assert_eq!(l("1.13"), Ok(Layout::V1_7));
        assert_eq!(l("1.14.2"), Ok(Layout::V1_14));
        assert_eq!(l("1.16"), Ok(Layout::V1_15));
        assert_eq!(l("1.17"), Ok(Layout::V1_17));
        assert_eq!(l("1.18"), Ok(Layout::V1_18));
        assert_eq!(l("1.19.4"), Ok(Layout::V1_19));
        assert_eq!(l("1.21"), Ok(Layout::V1_20));
        assert!(matches!(l("1.6"), Err(VersionError::TooOld(_))));
    }
}
