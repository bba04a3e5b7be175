//! The Cilium agent's datapath configuration, where the node shows it: the C defines it writes
//! to `<state-dir>/globals/node_config.h`, overridden by options. Anything unknown stays
//! `None`, and the expected state then accepts every value Cilium can write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub const DEFAULT_STATE_DIR: &str = "/var/run/cilium/state";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DatapathConfig {
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    /// Encapsulation (vxlan/geneve) rather than direct routing.
    pub tunnel: Option<bool>,
    /// Remote node addresses get identity 6 (remote-node) rather than 1 (host).
    pub remote_node_identity: Option<bool>,
    /// IPsec or WireGuard.
    pub encryption: Option<bool>,
    pub node_encryption: Option<bool>,
    pub host_firewall: Option<bool>,
    /// Cilium's `identity-allocation-mode`: `kvstore`, `crd`, or (v1.17+) `doublewrite-readkvstore`
    /// / `doublewrite-readcrd`: where the identities the datapath uses are kept.
    pub identity_allocation_mode: Option<String>,
    /// Cilium's `kvstore` setting: `etcd`, or empty in CRD mode (nodes and pod IPs are then
    /// CiliumNode and CiliumEndpoint objects).
    pub kvstore: Option<String>,
    /// `enable-cilium-endpoint-slice`: pod IPs from CiliumEndpointSlices instead of CEPs.
    pub endpoint_slices: Option<bool>,
    /// Where the settings came from.
    pub sources: Vec<String>,
}

/// Cilium's ConfigMap `cilium-config` as a DaemonSet mounts it: a directory, one file per key.
pub const DEFAULT_CONFIG_MAP_DIR: &str = "/etc/cilium/config-map";

impl DatapathConfig {
    /// Whether the agent allocates identities in the kvstore (`None`: not known).
    pub fn identities_in_kvstore(&self) -> Option<bool> {
        self.identity_allocation_mode.as_deref().map(|m| matches!(m, "kvstore" | "doublewrite-readkvstore"))
    }

    /// Fills what is still unknown from the Cilium agent's own configuration (`GET /v1/config`).
    pub fn fill_from_agent(&mut self, agent: &crate::cilium::state::AgentConfig) {
        let before = self.clone();
        self.ipv4 = self.ipv4.or(agent.ipv4);
        self.ipv6 = self.ipv6.or(agent.ipv6);
        self.tunnel = self.tunnel.or(agent.routing_mode.as_deref().map(|m| m == "tunnel"));
        if self.identity_allocation_mode.is_none() {
            self.identity_allocation_mode.clone_from(&agent.identity_allocation_mode);
        }
        if self.kvstore.is_none() {
            self.kvstore.clone_from(&agent.kvstore);
        }
        self.endpoint_slices = self.endpoint_slices.or(agent.enable_cilium_endpoint_slice);
        if *self != before {
            self.sources.push("Cilium API /v1/config".to_owned());
        }
    }

    /// Whether Cilium runs without a kvstore (CRD mode); `None`: not known.
    pub fn crd_mode(&self) -> Option<bool> {
        self.kvstore.as_deref().map(str::is_empty)
    }

    /// Fills `identity-allocation-mode`, `kvstore` and `enable-cilium-endpoint-slice` from the
    /// cilium-config ConfigMap directory where still unknown (a missing directory or key
    /// changes nothing). Helm renders `kvstore` only with etcd, so a ConfigMap that has
    /// `identity-allocation-mode` but no `kvstore` key is CRD mode.
    pub fn fill_from_config_map(&mut self, dir: &Path) {
        let read = |key: &str| -> Option<(String, String)> {
            let path = dir.join(key);
            let v = std::fs::read_to_string(&path).ok()?;
            Some((v.trim().to_owned(), path.display().to_string()))
        };
        let mut used = Vec::new();
        let mode = read("identity-allocation-mode").filter(|(v, _)| !v.is_empty());
        if self.identity_allocation_mode.is_none()
            && let Some((v, path)) = &mode
        {
            self.identity_allocation_mode = Some(v.clone());
            used.push(path.clone());
        }
        if self.kvstore.is_none() {
            match read("kvstore") {
                Some((v, path)) => {
                    self.kvstore = Some(v);
                    used.push(path);
                }
                None if mode.is_some() => {
                    self.kvstore = Some(String::new());
                    used.push(format!("{} (no kvstore key)", dir.display()));
                }
                None => {}
            }
        }
        if self.endpoint_slices.is_none()
            && let Some((v, path)) = read("enable-cilium-endpoint-slice")
        {
            self.endpoint_slices = Some(v == "true");
            used.push(path);
        }
        self.sources.extend(used);
    }
}

/// `#define NAME VALUE` lines of node_config.h.
pub fn parse_defines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|rest| {
            let mut it = rest.splitn(2, char::is_whitespace);
            let name = it.next()?.trim();
            Some((name.to_owned(), it.next().unwrap_or("").trim().to_owned()))
        })
        .collect()
}

impl DatapathConfig {
    /// Reads `<state_dir>/globals/node_config.h`. A missing file leaves everything unknown.
    pub fn from_state_dir(state_dir: &Path) -> Result<DatapathConfig, std::io::Error> {
        let path: PathBuf = state_dir.join("globals").join("node_config.h");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Self::from_node_config(&text, &path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DatapathConfig::default()),
            Err(e) => Err(e),
        }
    }

    pub fn from_node_config(text: &str, source: &str) -> DatapathConfig {
        let d = parse_defines(text);
        let has = |n: &str| d.contains_key(n);
        let any = |names: &[&str]| names.iter().any(|n| d.contains_key(*n));
        // A file that defines the address families is a real node_config.h: features it does not
        // enable are off. Features whose define names changed across releases are set only
        // when one of their known names is present.
        let real = any(&["ENABLE_IPV4", "ENABLE_IPV6"]);
        let flag = |names: &[&str]| if any(names) { Some(true) } else if real { Some(false) } else { None };
        DatapathConfig {
            ipv4: real.then(|| has("ENABLE_IPV4")),
            ipv6: real.then(|| has("ENABLE_IPV6")),
            tunnel: if any(&["TUNNEL_MODE", "ENCAP_IFINDEX", "TUNNEL_PROTOCOL", "HAVE_ENCAP"]) { Some(true) } else { None },
            remote_node_identity: if has("ENABLE_REMOTE_NODE_IDENTITY") { Some(true) } else { None },
            encryption: flag(&["ENABLE_IPSEC", "ENABLE_WIREGUARD"]),
            node_encryption: flag(&["ENABLE_NODE_ENCRYPTION", "ENCRYPT_NODE"]),
            host_firewall: flag(&["ENABLE_HOST_FIREWALL"]),
            identity_allocation_mode: None,
            kvstore: None,
            endpoint_slices: None,
            sources: vec![source.to_owned()],
        }
    }

    /// Options win over the file.
    pub fn apply(&mut self, o: &DatapathConfig) {
        let pick = |slot: &mut Option<bool>, v: Option<bool>| {
            if v.is_some() {
                *slot = v;
            }
        };
        pick(&mut self.ipv4, o.ipv4);
        pick(&mut self.ipv6, o.ipv6);
        pick(&mut self.tunnel, o.tunnel);
        pick(&mut self.remote_node_identity, o.remote_node_identity);
        pick(&mut self.encryption, o.encryption);
        pick(&mut self.node_encryption, o.node_encryption);
        pick(&mut self.host_firewall, o.host_firewall);
        if o.identity_allocation_mode.is_some() {
            self.identity_allocation_mode.clone_from(&o.identity_allocation_mode);
        }
        if o.kvstore.is_some() {
            self.kvstore.clone_from(&o.kvstore);
        }
        pick(&mut self.endpoint_slices, o.endpoint_slices);
        if [o.ipv4, o.ipv6, o.tunnel, o.remote_node_identity, o.encryption, o.node_encryption, o.host_firewall, o.endpoint_slices]
            .iter()
            .any(Option::is_some)
            || o.identity_allocation_mode.is_some()
            || o.kvstore.is_some()
        {
            self.sources.push("options".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_1_7_node_config() {
        // The defines the real 1.7.1 agent wrote (tests/data/real-cilium-1.7.1-node.txt).
        let text = "#define ENABLE_IPV4 1\n#define ENABLE_SERVICES 1\n#define ENDPOINTS_MAP cilium_lxc\n#define REMOTE_NODE_ID 6\n#define TUNNEL_MAP cilium_tunnel_map\n";
        let c = DatapathConfig::from_node_config(text, "node_config.h");
        assert_eq!((c.ipv4, c.ipv6), (Some(true), Some(false)));
        assert_eq!(c.encryption, Some(false));
        // Not derivable from these defines: left open.
        assert_eq!(c.remote_node_identity, None);
        assert_eq!(c.tunnel, None);
        let mut c2 = c.clone();
        c2.apply(&DatapathConfig { remote_node_identity: Some(false), ..Default::default() });
        assert_eq!(c2.remote_node_identity, Some(false));
        assert_eq!(DatapathConfig::from_node_config("", "x").ipv4, None);
    }
}
