//! Cilium's Kubernetes objects decoded into the cluster-state model the kvstore reader also
//! fills (pure; no I/O). Each object becomes what Cilium's agent makes of it (crd-mode recipe in
//! docs/cilium-expected-state.md): a CiliumNode a node entry, each address of a CiliumEndpoint
//! (or of a CiliumEndpointSlice's endpoint) an IP entry, a CiliumIdentity an identity. The
//! evidence names the object (`CiliumEndpoint default/pod-a`) where the kvstore names a key.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crds::{AddressPair, CiliumEndpoint, CiliumEndpointSlice, CiliumIdentity, CiliumNode, CoreCiliumEndpoint, EndpointNetworking};
use crate::kvstore::reader::KvstoreSnapshot;
use crate::kvstore::values::{IdentityEntry, IpEntry, IpOwner, KvMeta, Malformed, NodeAddress, NodeEntry};
use crate::model::identity;

/// How findings and dumps name an object: `<Kind> <namespace>/<name>` or `<Kind> <name>`.
pub fn object_ref(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Whether a reference names a Kubernetes object rather than an etcd key.
pub fn is_object_ref(key: &str) -> bool {
    key.starts_with("Cilium")
}

/// The watched object an entry's reference names: the CiliumEndpointSlice for one of its
/// endpoints (`CiliumEndpoint ns/name (CiliumEndpointSlice ces-1)`), else the reference itself.
pub fn object_of(key: &str) -> &str {
    match key.strip_suffix(')').and_then(|k| k.rfind(" (CiliumEndpointSlice ").map(|i| &k[i + 2..])) {
        Some(slice) => slice,
        None => key,
    }
}

fn meta_of(kind: &str, m: &ObjectMeta) -> KvMeta {
    let name = m.name.as_deref().unwrap_or_default();
    KvMeta {
        key: object_ref(kind, m.namespace.as_deref(), name).into(),
        // resourceVersion is opaque to clients; every kube-apiserver serves etcd's revision.
        mod_revision: m.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0),
        lease: 0,
    }
}

fn malformed(meta: KvMeta, shown: &str, reason: impl Into<String>) -> Malformed {
    Malformed::new(meta, shown.as_bytes(), reason)
}

/// A CiliumEndpoint's addresses as Cilium's CEP watcher inserts them: none without
/// `status.networking.node` (Cilium skips such CEPs); identity 3 (unmanaged) without
/// `status.identity`; encrypt key 0 when absent.
pub fn decode_endpoint(cep: &CiliumEndpoint, snap: &mut KvstoreSnapshot) {
    let meta = meta_of("CiliumEndpoint", &cep.metadata);
    let Some(status) = &cep.status else { return };
    let identity = match &status.identity {
        None => Some(identity::UNMANAGED),
        Some(i) => i.id.map_or(Some(identity::UNMANAGED), |id| u32::try_from(id).ok()),
    };
    let key = status.encryption.as_ref().and_then(|e| e.key).unwrap_or(0);
    let ns = cep.metadata.namespace.as_deref();
    let name = cep.metadata.name.as_deref().unwrap_or_default();
    push_addresses(snap, meta, status.networking.as_ref(), identity, key, ns, name);
}

/// A CiliumEndpointSlice's endpoints, each as a CEP of the slice's namespace (Cilium converts
/// them so; a missing identity id is 0 there, not 3).
pub fn decode_endpoint_slice(ces: &CiliumEndpointSlice, snap: &mut KvstoreSnapshot) {
    let slice = meta_of("CiliumEndpointSlice", &ces.metadata);
    let ns = ces.namespace.as_deref();
    for ep in ces.endpoints.iter().flatten() {
        let CoreCiliumEndpoint { name, id, networking, encryption } = ep;
        let meta = KvMeta { key: format!("{} ({})", object_ref("CiliumEndpoint", ns, name), slice.key).into(), ..slice.clone() };
        let identity = u32::try_from(id.unwrap_or(0)).ok();
        let key = encryption.as_ref().and_then(|e| e.key).unwrap_or(0);
        push_addresses(snap, meta, networking.as_ref(), identity, key, ns, name);
    }
}

fn push_addresses(snap: &mut KvstoreSnapshot, meta: KvMeta, networking: Option<&EndpointNetworking>, identity: Option<u32>, key: i64, ns: Option<&str>, name: &str) {
    let Some(net) = networking else { return };
    let node = net.node.as_deref().unwrap_or_default();
    if node.is_empty() {
        return;
    }
    let Ok(host_ip) = node.parse::<IpAddr>() else {
        snap.malformed.push(malformed(meta, node, format!("status.networking.node {node:?} is not an IP (Cilium skips this endpoint)")));
        return;
    };
    let Some(identity) = identity else {
        snap.malformed.push(malformed(meta, name, "the identity id is not a 32-bit number"));
        return;
    };
    let Ok(encrypt_key) = u8::try_from(key) else {
        snap.malformed.push(malformed(meta, name, format!("encryption key {key} is out of range")));
        return;
    };
    let addresses = net.addressing.iter().flatten().flat_map(|AddressPair { ipv4, ipv6 }| [ipv4, ipv6]).flatten().filter(|a| !a.is_empty());
    for a in addresses {
        match a.parse::<IpAddr>() {
            Ok(ip) => {
                snap.counts.ips += 1;
                snap.ips.push(IpEntry {
                    meta: meta.clone(),
                    prefix: IpNet::from(ip),
                    host_ip: Some(host_ip),
                    identity,
                    encrypt_key,
                    // The object's name is in the key and the two fields below.
                    owner: IpOwner::new("", ns, Some(name)),
                });
            }
            Err(_) => snap.malformed.push(malformed(meta.clone(), a, format!("address {a:?} is not an IP"))),
        }
    }
}

/// A CiliumNode as Cilium's node manager sees it. Cluster name and id come from the local
/// agent's configuration, never from the object.
pub fn decode_node(cn: &CiliumNode, cluster: &str, cluster_id: u32, snap: &mut KvstoreSnapshot) {
    let meta = meta_of("CiliumNode", &cn.metadata);
    let Some(name) = cn.metadata.name.clone().filter(|n| !n.is_empty()) else {
        snap.malformed.push(malformed(meta, "", "CiliumNode without a name"));
        return;
    };
    let spec = cn.spec.clone().unwrap_or_default();
    let mut addresses = Vec::new();
    for a in spec.addresses.iter().flatten() {
        // Cilium skips addresses that do not parse.
        if let Ok(ip) = a.ip.parse() {
            addresses.push(NodeAddress { addr_type: a.addr_type.clone(), ip });
        }
    }
    let ip = |s: &Option<String>| s.as_deref().and_then(|s| s.parse::<IpAddr>().ok());
    let pair = |p: &Option<AddressPair>| p.as_ref().map_or((None, None), |p| (ip(&p.ipv4), ip(&p.ipv6)));
    let (ipv4_health_ip, ipv6_health_ip) = pair(&spec.health);
    let (ipv4_ingress_ip, ipv6_ingress_ip) = pair(&spec.ingress);
    let ipam = spec.ipam.unwrap_or_default();
    let pools = ipam.pools.and_then(|p| p.allocated).unwrap_or_default();
    let cidrs: Vec<IpNet> = ipam.pod_cidrs.iter().flatten().chain(pools.iter().flat_map(|p| p.cidrs.iter().flatten())).filter_map(|c| c.parse().ok()).collect();
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = cidrs.into_iter().partition(|c| c.addr().is_ipv4());
    let key = spec.encryption.and_then(|e| e.key).unwrap_or(0);
    let Ok(encryption_key) = u8::try_from(key) else {
        snap.malformed.push(malformed(meta, &name, format!("spec.encryption.key {key} is out of range")));
        return;
    };
    snap.counts.nodes += 1;
    snap.nodes.push(NodeEntry {
        meta,
        name,
        cluster: cluster.to_owned(),
        addresses,
        ipv4_alloc_cidr: v4.first().copied(),
        ipv6_alloc_cidr: v6.first().copied(),
        ipv4_secondary_alloc_cidrs: v4.get(1..).unwrap_or_default().to_vec(),
        ipv6_secondary_alloc_cidrs: v6.get(1..).unwrap_or_default().to_vec(),
        ipv4_health_ip,
        ipv6_health_ip,
        ipv4_ingress_ip,
        ipv6_ingress_ip,
        cluster_id,
        source: "custom-resource".to_owned(),
        encryption_key,
        node_identity: spec.nodeidentity.and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
    });
}

/// A CiliumIdentity: its name is the numeric identity, `security-labels` its labels (rendered
/// `source:key=value;` as in the kvstore).
pub fn decode_identity(ci: &CiliumIdentity, snap: &mut KvstoreSnapshot) {
    let meta = meta_of("CiliumIdentity", &ci.metadata);
    let name = ci.metadata.name.as_deref().unwrap_or_default();
    let Ok(id) = name.parse::<u32>() else {
        snap.malformed.push(malformed(meta, name, format!("CiliumIdentity name {name:?} is not a numeric identity")));
        return;
    };
    let labels: String = ci.security_labels.iter().flatten().map(|(k, v)| format!("{k}={v};")).collect();
    if labels.is_empty() {
        snap.malformed.push(malformed(meta, name, "CiliumIdentity without security-labels"));
        return;
    }
    snap.counts.identities += 1;
    snap.identities.insert(id, IdentityEntry { meta, id, labels });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_of_names_the_watched_object() {
        assert_eq!(object_of("CiliumEndpoint default/pod-a"), "CiliumEndpoint default/pod-a");
        assert_eq!(object_of("CiliumEndpoint default/pod-a (CiliumEndpointSlice ces-x1)"), "CiliumEndpointSlice ces-x1");
        assert_eq!(object_of("CiliumNode n1"), "CiliumNode n1");
        assert_eq!(object_of("cilium/state/ip/v1/default/10.0.0.1"), "cilium/state/ip/v1/default/10.0.0.1");
    }

    fn items<T: serde::de::DeserializeOwned>(json: &str) -> Vec<T> {
        let v: serde_json::Value = serde_json::from_str(json).expect("fixture JSON");
        serde_json::from_value(v["items"].clone()).expect("fixture items")
    }

    /// Objects a real Cilium 1.16.15 agent wrote in CRD mode.
    #[test]
    fn real_crd_mode_objects() {
        let mut snap = KvstoreSnapshot::default();
        for cep in items::<CiliumEndpoint>(include_str!("../../../tests/data/k8s/v1.16.15-crd/ciliumendpoints.json")) {
            decode_endpoint(&cep, &mut snap);
        }
        for cn in items::<CiliumNode>(include_str!("../../../tests/data/k8s/v1.16.15-crd/ciliumnodes.json")) {
            decode_node(&cn, "default", 0, &mut snap);
        }
        for ci in items::<CiliumIdentity>(include_str!("../../../tests/data/k8s/v1.16.15-crd/ciliumidentities.json")) {
            decode_identity(&ci, &mut snap);
        }
        assert!(snap.malformed.is_empty(), "{:?}", snap.malformed);
        let ip = &snap.ips[0];
        assert_eq!((ip.meta.key.as_ref(), ip.prefix.to_string(), ip.host_ip, ip.identity, ip.encrypt_key), ("CiliumEndpoint default/pod-a", "10.6.1.124/32".into(), "10.5.1.132".parse().ok(), 25143, 0));
        assert_eq!(ip.meta.mod_revision, 155);
        let n = &snap.nodes[0];
        assert_eq!((n.name.as_str(), n.node_ip(true), n.ipv4_alloc_cidr), ("k8s-node1", "10.5.1.132".parse().ok(), "10.6.1.0/24".parse().ok()));
        assert_eq!(n.address_of("CiliumInternalIP", true), "10.6.1.89".parse().ok());
        let i = &snap.identities[&25143];
        assert!(i.labels.starts_with("k8s:app=foo;k8s:io.cilium.k8s.namespace.labels"), "{}", i.labels);
        assert_eq!(i.meta.key, "CiliumIdentity 25143".into());
    }

    /// CiliumEndpointSlices the real cilium-operator 1.16.15 batched from the CEPs (pod-a, the
    /// agent's own; pod-remote, applied by hand as another node's agent would write it).
    #[test]
    fn real_endpoint_slices() {
        let mut snap = KvstoreSnapshot::default();
        for ces in items::<CiliumEndpointSlice>(include_str!("../../../tests/data/k8s/v1.16.15-ces/ciliumendpointslices.json")) {
            decode_endpoint_slice(&ces, &mut snap);
        }
        assert!(snap.malformed.is_empty(), "{:?}", snap.malformed);
        let got: Vec<_> = snap.ips.iter().map(|e| (e.meta.key.as_ref(), e.prefix.to_string(), e.host_ip, e.identity, e.meta.mod_revision)).collect();
        assert_eq!(
            got,
            [
                ("CiliumEndpoint default/pod-a (CiliumEndpointSlice ces-5zjq4fjll-4plrp)", "10.6.1.169/32".to_owned(), "10.5.1.132".parse().ok(), 20638, 205),
                ("CiliumEndpoint default/pod-remote (CiliumEndpointSlice ces-7pcdvgt5k-qp2gm)", "10.6.7.20/32".to_owned(), "10.5.1.133".parse().ok(), 28511, 215),
            ]
        );
        assert_eq!(object_of(&snap.ips[1].meta.key), "CiliumEndpointSlice ces-7pcdvgt5k-qp2gm");
    }

    #[test]
    fn what_cilium_skips_or_defaults() {
        let cep = |status: serde_json::Value| -> CiliumEndpoint { serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "ns"}, "status": status})).expect("CEP") };
        let mut snap = KvstoreSnapshot::default();
        // No node field yet (upgrade case): nothing.
        decode_endpoint(&cep(serde_json::json!({"networking": {"addressing": [{"ipv4": "10.0.0.1"}]}})), &mut snap);
        assert!(snap.ips.is_empty() && snap.malformed.is_empty());
        // No identity: 3 (unmanaged); both families.
        decode_endpoint(&cep(serde_json::json!({"networking": {"addressing": [{"ipv4": "10.0.0.1", "ipv6": "fd00::1"}], "node": "192.168.0.1"}})), &mut snap);
        assert_eq!(snap.ips.iter().map(|e| (e.prefix.to_string(), e.identity)).collect::<Vec<_>>(), [("10.0.0.1/32".into(), 3), ("fd00::1/128".into(), 3)]);
        // Bad addresses are malformed, with the object named.
        decode_endpoint(&cep(serde_json::json!({"networking": {"addressing": [{"ipv4": "10.0.0.300"}], "node": "nope"}})), &mut snap);
        assert_eq!(snap.malformed[0].meta.key, "CiliumEndpoint ns/p".into());
        // A slice's endpoint without an id has identity 0.
        let ces: CiliumEndpointSlice = serde_json::from_value(serde_json::json!({"metadata": {"name": "ces-1"}, "namespace": "ns", "endpoints": [{"name": "q", "networking": {"addressing": [{"ipv4": "10.0.0.2"}], "node": "192.168.0.1"}}]})).expect("CES");
        decode_endpoint_slice(&ces, &mut snap);
        let e = snap.ips.last().expect("slice entry");
        assert_eq!((e.identity, e.meta.key.as_ref()), (0, "CiliumEndpoint ns/q (CiliumEndpointSlice ces-1)"));
        // Unknown fields and a node without spec decode.
        let cn: CiliumNode = serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "future": 1})).expect("node");
        decode_node(&cn, "c", 3, &mut snap);
        assert_eq!((snap.nodes[0].cluster.as_str(), snap.nodes[0].cluster_id), ("c", 3));
        let bad: CiliumIdentity = serde_json::from_value(serde_json::json!({"metadata": {"name": "abc"}})).expect("identity");
        decode_identity(&bad, &mut snap);
        assert!(snap.malformed.last().expect("malformed").reason.contains("not a numeric identity"));
    }
}
