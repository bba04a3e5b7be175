//! A remote cluster's `cilium/cluster-config/<name>` and how Cilium's agent validates it, and the
//! prefixes it then watches (pure).
//!
//! Cilium: `pkg/clustermesh/types/types.go` (`CiliumClusterConfig`, cluster names),
//! `types/option.go` (`ValidateRemoteConfig`), `pkg/clustermesh/idsmgr.go` (`ReserveClusterID`),
//! `pkg/kvstore/kvstore.go` (`StateToCachePrefix`); see docs/cilium-expected-state.md.

use serde::{Deserialize, Serialize};

/// `cilium/cluster-config/<name>`, written by the remote's operator (kvstore mode),
/// clustermesh-apiserver (sync canaries) or KVStoreMesh (cached, into the local etcd).
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config/";

/// `CiliumClusterConfig`; every field is omitempty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ClusterConfig {
    #[serde(default)]
    pub id: u32,
    #[serde(default)]
    pub capabilities: Capabilities,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The writer publishes `cilium/synced/<name>/<prefix>` once each prefix is fully written.
    #[serde(default)]
    pub synced_canaries: bool,
    /// KVStoreMesh: the data are under `cilium/cache/<kind>/v1/<name>/`.
    #[serde(default)]
    pub cached: bool,
    #[serde(default)]
    pub max_connected_clusters: u32,
}

pub fn parse(value: &[u8]) -> Result<ClusterConfig, String> {
    serde_json::from_slice(value).map_err(|e| format!("CiliumClusterConfig JSON: {e}"))
}

/// Cilium's cluster name rule: at most 32 characters of `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`.
pub fn valid_cluster_name(name: &str) -> bool {
    let b = name.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && b.len() <= 32 && ok(&b[0]) && ok(&b[b.len() - 1]) && b.iter().all(|c| ok(c) || *c == b'-')
}

/// Why Cilium's agent refuses `cfg` for a remote, or `None` when it accepts it. `local_id` and
/// `max_connected` (255 or 511) are the local agent's; `taken` the ids of the remotes already
/// accepted.
pub fn validate(cfg: &ClusterConfig, local_id: u32, max_connected: u32, taken: &[u32]) -> Option<String> {
    if cfg.id == 0 || cfg.id > max_connected {
        return Some(format!("cluster id {} is outside 1-{max_connected}", cfg.id));
    }
    if max_connected > 255 && cfg.capabilities.max_connected_clusters != max_connected {
        return Some(format!("maxConnectedClusters {} differs from the local {max_connected}", cfg.capabilities.max_connected_clusters));
    }
    if cfg.id == local_id {
        return Some(format!("cluster id {} is the local cluster's", cfg.id));
    }
    if taken.contains(&cfg.id) {
        return Some(format!("clusterID {} is already used by another remote cluster", cfg.id));
    }
    None
}

/// Where a remote cluster's state is, as the agent watches it: in the remote's etcd
/// (`cilium/state/...`) or, through KVStoreMesh (`cached`), in `cilium/cache/...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemotePrefixes {
    pub nodes: String,
    pub ips: String,
    pub identities: String,
    /// `cilium/synced/<name>/<state or cache prefix>` per kind, when the writer has canaries.
    pub canaries: Vec<String>,
}

impl RemotePrefixes {
    pub fn of(name: &str, cfg: &ClusterConfig) -> RemotePrefixes {
        let (nodes, ips, identities, root) = if cfg.capabilities.cached {
            (format!("cilium/cache/nodes/v1/{name}/"), format!("cilium/cache/ip/v1/{name}/"), format!("cilium/cache/identities/v1/{name}/id/"), "cilium/cache")
        } else {
            // The address space of ip/v1 is literally `default` in every cluster.
            (format!("cilium/state/nodes/v1/{name}/"), crate::kvstore::values::IP_DEFAULT_SPACE.to_owned(), "cilium/state/identities/v1/id/".to_owned(), "cilium/state")
        };
        let canaries = if cfg.capabilities.synced_canaries {
            ["nodes", "ip", "identities"].iter().map(|k| format!("cilium/synced/{name}/{root}/{k}/v1")).collect()
        } else {
            Vec::new()
        };
        RemotePrefixes { nodes, ips, identities, canaries }
    }

    /// Everything to list and watch: the three kinds and the canaries' folder.
    pub fn all(&self, name: &str) -> Vec<String> {
        let mut p = vec![self.nodes.clone(), self.ips.clone(), self.identities.clone()];
        if !self.canaries.is_empty() {
            p.push(format!("cilium/synced/{name}/"));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_configs_and_prefixes() {
        assert!(valid_cluster_name("cluster2") && valid_cluster_name("a") && valid_cluster_name("c-1"));
        assert!(!valid_cluster_name("-c") && !valid_cluster_name("C2") && !valid_cluster_name("c_2") && !valid_cluster_name(&"a".repeat(33)) && !valid_cluster_name(""));
        // What cluster2's operator writes in kvstore mode, and what KVStoreMesh writes.
        let direct = parse(br#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#).unwrap();
        let cached = parse(br#"{"id":3,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}"#).unwrap();
        assert_eq!(validate(&direct, 1, 255, &[]), None);
        assert!(validate(&direct, 2, 255, &[]).unwrap().contains("local"));
        assert!(validate(&direct, 1, 255, &[2]).unwrap().contains("already used"));
        assert!(validate(&ClusterConfig { id: 256, ..direct.clone() }, 1, 255, &[]).unwrap().contains("outside"));
        assert!(validate(&direct, 1, 511, &[]).unwrap().contains("maxConnectedClusters"));
        assert!(parse(b"{nope").is_err());
        let d = RemotePrefixes::of("cluster2", &direct);
        assert_eq!((d.ips.as_str(), d.canaries.len()), ("cilium/state/ip/v1/default/", 0));
        let c = RemotePrefixes::of("cluster3", &cached);
        assert_eq!(c.identities, "cilium/cache/identities/v1/cluster3/id/");
        assert_eq!(c.canaries[1], "cilium/synced/cluster3/cilium/cache/ip/v1");
        assert_eq!(c.all("cluster3").last().unwrap(), "cilium/synced/cluster3/");
    }
}
