//! Security identities: reserved numbers and the scope bits of the 32-bit identity.

use serde::Serialize;

/// Reserved identities (`reserved:<name>`), as numbered in every Cilium release that has them.
pub const RESERVED: &[(u32, &str)] = &[
    (0, "unknown"),
    (1, "host"),
    (2, "world"),
    (3, "unmanaged"),
    (4, "health"),
    (5, "init"),
    (6, "remote-node"),
    (7, "kube-apiserver"),
    (8, "ingress"),
    (9, "world-ipv4"),
    (10, "world-ipv6"),
    (11, "encrypted-overlay"),
];

pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const REMOTE_NODE: u32 = 6;

/// Identities with this bit set are node-local (CIDR/FQDN selectors): allocated by each
/// agent, never stored in the kvstore.
pub const LOCAL_SCOPE_FLAG: u32 = 1 << 24;
const SCOPE_MASK: u32 = 0xff << 24;
const REMOTE_NODE_SCOPE: u32 = 2 << 24;

/// Where an identity number comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityScope {
    /// 1..=255: reserved and well-known fixed identities.
    Reserved,
    /// Allocated cluster-wide through the kvstore.
    Global,
    /// Node-local CIDR/FQDN identity (scope 0x01).
    Local,
    /// Remote-node identity with per-node labels (scope 0x02, v1.15+).
    RemoteNode,
    /// A scope byte Cilium does not define.
    Unknown,
}

pub fn scope(identity: u32) -> IdentityScope {
    match identity & SCOPE_MASK {
        0 if identity < 256 => IdentityScope::Reserved,
        0 => IdentityScope::Global,
        LOCAL_SCOPE_FLAG => IdentityScope::Local,
        REMOTE_NODE_SCOPE => IdentityScope::RemoteNode,
        _ => IdentityScope::Unknown,
    }
}

/// `reserved:<name>` for reserved identities, else `None`.
pub fn reserved_name(identity: u32) -> Option<&'static str> {
    RESERVED
        .iter()
        .find(|(id, _)| *id == identity)
        .map(|(_, name)| *name)
}

/// A short human description: `2 (reserved:world)`, `16777217 (local)`, `12928`.
pub fn describe(identity: u32) -> String {
    if let Some(name) = reserved_name(identity) {
        return format!("{identity} (reserved:{name})");
    }
    match scope(identity) {
        IdentityScope::Local => format!("{identity} (local)"),
        IdentityScope::RemoteNode => format!("{identity} (remote-node scope)"),
        _ => identity.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(scope(2), IdentityScope::Reserved);
        assert_eq!(scope(12928), IdentityScope::Global);
        assert_eq!(scope(196915), IdentityScope::Global);
        assert_eq!(scope(16_777_217), IdentityScope::Local);
        assert_eq!(scope(0x0200_0001), IdentityScope::RemoteNode);
        assert_eq!(scope(0x0500_0001), IdentityScope::Unknown);
    }

    #[test]
    fn descriptions() {
        assert_eq!(describe(6), "6 (reserved:remote-node)");
        assert_eq!(describe(16_777_218), "16777218 (local)");
        assert_eq!(describe(13110), "13110");
    }
}
