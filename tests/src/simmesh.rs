//! A ClusterMesh around a simulated node: the real Cilium 1.16.15 node as cluster `default`
//! (id 1), a remote `cluster2` (id 2) in its own etcd with TLS, reached directly as Cilium's
//! agent reaches a remote kvstore-mode cluster, and a remote `cluster3` (id 3) known through a
//! KVStoreMesh-style cache (`cilium/cache/...`, sync canaries) in the local etcd. Keys and
//! values are those the real 1.16.15 agent of the oracle consumed (`scripts/cluster2.sh`), and
//! the node's maps get the entries that agent wrote for them (docs/cilium-expected-state.md).

use std::path::PathBuf;

use anyhow::Result;

use crate::encode::{self, IpcacheValue};
use crate::etcd::{self, EtcdCluster};
use crate::simnode::SimulatedNode;

pub const LOCAL_ID: u32 = 1;
pub const C2_NODE_IP: &str = "10.5.1.134";
pub const C3_NODE_IP: &str = "10.5.1.135";
/// cluster2's identities: 2 << 16 + n.
pub const C2_WEB: u32 = 131_328;
pub const C2_DB: u32 = 131_329;
/// cluster3's: 3 << 16 + 256.
pub const C3_APP: u32 = 196_864;

pub struct SimulatedMesh {
    pub node: SimulatedNode,
    /// cluster2's own etcd (TLS).
    pub cluster2: EtcdCluster,
    /// Cilium's `--clustermesh-config` directory: `cluster2`, `cluster3`, and a TLS file.
    pub config_dir: PathBuf,
}

fn node_json(name: &str, cluster: &str, id: u32, node_ip: &str, third: u8) -> String {
    format!(
        r#"{{"Name":"{name}","Cluster":"{cluster}","IPAddresses":[{{"Type":"InternalIP","IP":"{node_ip}"}},{{"Type":"CiliumInternalIP","IP":"10.{third}.1.1"}}],"IPv4AllocCIDR":{{"IP":"10.{third}.1.0","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.{third}.1.9","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":{id},"Source":"local","EncryptionKey":0,"Labels":{{}},"Annotations":{{}},"NodeIdentity":0,"WireguardPubKey":"","BootID":""}}"#
    )
}

/// A remote pod's `ip/v1` value as its cluster's agent writes it.
pub fn ip_json(ip: &str, id: u32, host: &str, cluster: &str, pod: &str) -> String {
    format!(r#"{{"IP":"{ip}","Mask":null,"HostIP":"{host}","ID":{id},"Key":0,"Metadata":"cilium-global:{cluster}:node:1","K8sNamespace":"default","K8sPodName":"{pod}"}}"#)
}

pub fn labels(app: &str, cluster: &str) -> String {
    format!("k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=default;")
}

/// cluster2's keys in its own etcd (what its operator and agents publish in kvstore mode).
pub fn cluster2_pairs() -> Vec<(String, String)> {
    let mut p = vec![
        ("cilium/cluster-config/cluster2".to_owned(), r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#.to_owned()),
        ("cilium/state/nodes/v1/cluster2/c2-node1".to_owned(), node_json("c2-node1", "cluster2", 2, C2_NODE_IP, 7)),
        ("cilium/state/identities/v1/id/131328".to_owned(), labels("c2-web", "cluster2")),
        ("cilium/state/identities/v1/id/131329".to_owned(), labels("c2-db", "cluster2")),
    ];
    for (ip, id, pod) in [("10.7.1.20", C2_WEB, "c2-web-1"), ("10.7.1.21", C2_WEB, "c2-web-2"), ("10.7.1.22", C2_DB, "c2-db-1")] {
        p.push((format!("cilium/state/ip/v1/default/{ip}"), ip_json(ip, id, C2_NODE_IP, "cluster2", pod)));
    }
    p
}

/// cluster3 as KVStoreMesh writes it into the local etcd.
pub fn cluster3_pairs() -> Vec<(String, String)> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut p = vec![
        ("cilium/cluster-config/cluster3".to_owned(), r#"{"id":3,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}"#.to_owned()),
        ("cilium/cache/nodes/v1/cluster3/c3-node1".to_owned(), node_json("c3-node1", "cluster3", 3, C3_NODE_IP, 8)),
        ("cilium/cache/identities/v1/cluster3/id/196864".to_owned(), labels("c3-app", "cluster3")),
        ("cilium/cache/ip/v1/cluster3/10.8.1.20".to_owned(), ip_json("10.8.1.20", C3_APP, C3_NODE_IP, "cluster3", "c3-app-1")),
    ];
    for kind in ["nodes", "ip", "identities", "services"] {
        p.push((format!("cilium/synced/cluster3/cilium/cache/{kind}/v1"), now.clone()));
    }
    p
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad IP {s}"))
}

impl SimulatedMesh {
    pub fn start() -> Result<SimulatedMesh> {
        let node = SimulatedNode::real_1_16_15()?;
        let cluster2 = EtcdCluster::start(1, true, &etcd::etcd_binary())?;
        cluster2.put_all(&cluster2_pairs())?;
        node.etcd.put_all(&cluster3_pairs())?;
        let config_dir = node.state_dir.join("clustermesh");
        std::fs::create_dir_all(&config_dir)?;
        let m = SimulatedMesh { node, cluster2, config_dir };
        m.write_config("cluster2")?;
        m.write_config("cluster3")?;
        // TLS material sits beside the configs, as Helm mounts it: not a cluster.
        std::fs::write(m.config_dir.join("common-etcd-client-ca.crt"), "-----BEGIN CERTIFICATE-----\n")?;
        m.write_datapath()?;
        Ok(m)
    }

    /// (Re)writes a remote's config file as Helm renders it (renamed in, never half-written).
    pub fn write_config(&self, cluster: &str) -> Result<()> {
        let text = match cluster {
            "cluster2" => {
                let tls = self.cluster2.tls.as_ref().ok_or_else(|| anyhow::anyhow!("cluster2 has no TLS"))?;
                std::fs::read_to_string(tls.etcd_config(&self.cluster2.endpoints(), &tls.ca)?)?
            }
            _ => format!("endpoints:\n- {}\n", self.node.etcd.endpoints()[0]),
        };
        let tmp = self.node.state_dir.join(format!(".{cluster}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, self.config_dir.join(cluster))?;
        Ok(())
    }

    pub fn remove_config(&self, cluster: &str) -> Result<()> {
        Ok(std::fs::remove_file(self.config_dir.join(cluster))?)
    }

    /// What the real agent put into its maps for both remotes.
    fn write_datapath(&self) -> Result<()> {
        for (node_ip, third, pods) in [(C2_NODE_IP, 7, vec![("10.7.1.20", C2_WEB), ("10.7.1.21", C2_WEB), ("10.7.1.22", C2_DB)]), (C3_NODE_IP, 8, vec![("10.8.1.20", C3_APP)])] {
            let via = |identity| IpcacheValue { identity, tunnel_endpoint: Some(ip(node_ip)), ..Default::default() };
            for (pod, id) in pods {
                self.node.ipcache_put(&format!("{pod}/32"), via(id))?;
            }
            self.node.ipcache_put(&format!("10.{third}.1.1/32"), via(6))?;
            self.node.ipcache_put(&format!("10.{third}.1.9/32"), via(4))?;
            self.node.ipcache_put(&format!("{node_ip}/32"), IpcacheValue { identity: 6, ..Default::default() })?;
            if let Some(t) = &self.node.maps.tunnel {
                t.update(&encode::tunnel_key(ip(&format!("10.{third}.1.0"))), &encode::tunnel_value(ip(node_ip), 0))?;
            }
        }
        Ok(())
    }

    /// `kvcheck check` arguments for this node as a meshed node of cluster `default`, id 1.
    pub fn check_args(&self) -> Vec<String> {
        let mut a = self.node.check_args();
        a.extend(["--clustermesh-config".to_owned(), self.config_dir.display().to_string(), "--cluster-id".to_owned(), LOCAL_ID.to_string()]);
        a
    }

    pub fn cluster2_put(&self, key: &str, value: &str) -> Result<()> {
        self.cluster2.put_all(&[(key.to_owned(), value.to_owned())])
    }

    pub fn cluster2_del(&self, key: &str) -> Result<()> {
        self.cluster2.etcdctl_ok(&["del", key]).map(|_| ())
    }
}
