//! The simulated cluster of [`crate::simcluster`] as Cilium keeps it in CRD mode: a CiliumNode
//! per node, a CiliumEndpoint per pod, a CiliumIdentity per identity. Each is a real object a
//! Cilium 1.16.15 agent wrote (tests/data/k8s/v1.16.15-crd/) with the simulated cluster's names,
//! addresses and identities put in, so every field kvcheck does not look at is as Cilium writes it.

use serde_json::{json, Value};

use crate::k8sapi::{captured, KubeApi};
use crate::simcluster::{HEALTH_A, HEALTH_B, IDENTITIES, LOCAL_PODS, NODE_A, NODE_A_IP, NODE_A_IP6, NODE_B_IP, NODE_B_IP6, REMOTE_PODS, ROUTER_A, ROUTER_A6, ROUTER_B, ROUTER_B6};

const SET: &str = "v1.16.15-crd";

fn template(plural: &str) -> Value {
    captured(SET, plural).into_iter().next().unwrap_or_else(|| panic!("no {plural} in the {SET} capture"))
}

/// `k8s:app=web;k8s:...;` → the CiliumIdentity's `security-labels` map and the CEP's label list.
fn labels_of(kvstore_labels: &str) -> (serde_json::Map<String, Value>, Vec<String>) {
    let pairs: Vec<(&str, &str)> = kvstore_labels.split(';').filter(|l| !l.is_empty()).filter_map(|l| l.split_once('=')).collect();
    (pairs.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect(), pairs.iter().map(|(k, v)| format!("{k}={v}")).collect())
}

pub fn identity_labels(id: u32) -> &'static str {
    IDENTITIES.iter().find(|(i, _)| *i == id).map(|(_, l)| *l).unwrap_or_default()
}

/// A CiliumEndpoint `shop/<name>` for a pod on the node with IP `node_ip`.
pub fn endpoint(name: &str, v4: &str, v6: Option<&str>, identity: u32, endpoint_id: u32, node_ip: &str) -> Value {
    let mut o = template("ciliumendpoints");
    o["metadata"]["name"] = json!(name);
    o["metadata"]["namespace"] = json!("shop");
    o["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{endpoint_id:012}"));
    o["metadata"]["ownerReferences"][0]["name"] = json!(name);
    let s = &mut o["status"];
    s["id"] = json!(endpoint_id);
    s["identity"] = json!({"id": identity, "labels": labels_of(identity_labels(identity)).1});
    let mut pair = json!({"ipv4": v4});
    if let Some(v6) = v6 {
        pair["ipv6"] = json!(v6);
    }
    s["networking"] = json!({"addressing": [pair], "node": node_ip});
    s["external-identifiers"]["pod-name"] = json!(format!("shop/{name}"));
    s["external-identifiers"]["k8s-namespace"] = json!("shop");
    s["external-identifiers"]["k8s-pod-name"] = json!(name);
    o
}

fn node(name: &str, n: u8, ips: (&str, &str), routers: (&str, &str), health: &str, dual: bool) -> Value {
    let mut o = template("ciliumnodes");
    o["metadata"]["name"] = json!(name);
    o["metadata"]["labels"]["kubernetes.io/hostname"] = json!(name);
    o["metadata"]["ownerReferences"][0]["name"] = json!(name);
    let mut addresses = vec![json!({"ip": ips.0, "type": "InternalIP"}), json!({"ip": routers.0, "type": "CiliumInternalIP"})];
    let mut cidrs = vec![format!("10.{n}.0.0/24")];
    let mut health = json!({"ipv4": health});
    if dual {
        addresses.push(json!({"ip": ips.1, "type": "InternalIP"}));
        addresses.push(json!({"ip": routers.1, "type": "CiliumInternalIP"}));
        cidrs.push(format!("fd00:{n}::/64"));
        health["ipv6"] = Value::Null;
    }
    let spec = &mut o["spec"];
    spec["addresses"] = json!(addresses);
    spec["health"] = health;
    spec["ipam"]["podCIDRs"] = json!(cidrs);
    o
}

pub fn identity(id: u32) -> Value {
    let mut o = template("ciliumidentities");
    let (security, _) = labels_of(identity_labels(id));
    o["metadata"]["name"] = json!(id.to_string());
    o["metadata"]["labels"] = json!({"app": security.get("k8s:app").cloned().unwrap_or_default(), "io.kubernetes.pod.namespace": "shop", "io.cilium.k8s.policy.cluster": "default"});
    o["security-labels"] = Value::Object(security);
    o
}

/// Local pods of node-a are `pod-<ep>`, node-b's `pod-3<i>` (as the kvstore's ip/v1 entries say).
pub fn local_pod_name(endpoint_id: u16) -> String {
    format!("pod-{endpoint_id}")
}

/// Serves the whole simulated cluster from `api`: CiliumNodes, CiliumEndpoints, and (with
/// `identities`) CiliumIdentities.
pub fn serve_cluster(api: &KubeApi, dual: bool, identities: bool) {
    api.put("ciliumnodes", node(NODE_A, 1, (NODE_A_IP, NODE_A_IP6), (ROUTER_A, ROUTER_A6), HEALTH_A, dual));
    api.put("ciliumnodes", node("node-b", 2, (NODE_B_IP, NODE_B_IP6), (ROUTER_B, ROUTER_B6), HEALTH_B, dual));
    for (v4, v6, id, ep, _) in LOCAL_PODS {
        api.put("ciliumendpoints", endpoint(&local_pod_name(ep), v4, dual.then_some(v6), id, u32::from(ep), NODE_A_IP));
    }
    for (i, (v4, v6, id)) in REMOTE_PODS.iter().enumerate() {
        api.put("ciliumendpoints", endpoint(&format!("pod-3{i}"), v4, dual.then_some(*v6), *id, 30 + i as u32, NODE_B_IP));
    }
    if identities {
        serve_identities(api);
    }
}

pub fn serve_identities(api: &KubeApi) {
    for (id, _) in IDENTITIES {
        api.put("ciliumidentities", identity(id));
    }
}

/// The cluster of [`crate::simdata::cluster_pairs`] (`shape`) as CRD mode keeps it: a
/// CiliumNode per node, a CiliumEndpoint per pod IP, a CiliumIdentity per identity, plus
/// `extra_identities` no pod uses (the operator keeps unused ones for 30-45 min). Served
/// from `api`.
pub fn serve_scaled(api: &KubeApi, shape: crate::simdata::ClusterShape, extra_identities: u32) {
    use crate::simdata::{identity_labels, node_ip, pod_cidr_base};
    let node_t = template("ciliumnodes");
    let cep_t = template("ciliumendpoints");
    let id_t = template("ciliumidentities");
    for i in 0..shape.nodes {
        let (a, b) = pod_cidr_base(i);
        let mut o = node_t.clone();
        let name = format!("node-{i}");
        o["metadata"]["name"] = json!(name);
        o["metadata"]["labels"]["kubernetes.io/hostname"] = json!(name);
        o["metadata"]["ownerReferences"][0]["name"] = json!(name);
        o["spec"]["addresses"] = json!([{"ip": node_ip(i), "type": "InternalIP"}, {"ip": format!("10.{a}.{b}.1"), "type": "CiliumInternalIP"}]);
        o["spec"]["health"] = json!({"ipv4": format!("10.{a}.{b}.2")});
        o["spec"]["ipam"]["podCIDRs"] = json!([format!("10.{a}.{b}.0/24")]);
        api.put("ciliumnodes", o);
    }
    for j in 0..shape.ips {
        let n = j % shape.nodes;
        let (a, b) = pod_cidr_base(n);
        let id = 256 + j % shape.identities;
        let ns = format!("ns-{}", id % 50);
        let name = format!("pod-{j}");
        let mut o = cep_t.clone();
        o["metadata"]["name"] = json!(name);
        o["metadata"]["namespace"] = json!(ns);
        o["metadata"]["ownerReferences"][0]["name"] = json!(name);
        let s = &mut o["status"];
        s["id"] = json!(j % 60_000);
        s["identity"] = json!({"id": id, "labels": labels_of(&identity_labels(id - 256)).1});
        s["networking"] = json!({"addressing": [{"ipv4": format!("10.{a}.{b}.{}", 3 + j / shape.nodes)}], "node": node_ip(n)});
        s["external-identifiers"]["pod-name"] = json!(format!("{ns}/{name}"));
        api.put("ciliumendpoints", o);
    }
    for k in 0..shape.identities + extra_identities {
        let mut o = id_t.clone();
        let (security, _) = labels_of(&identity_labels(k));
        o["metadata"]["name"] = json!((256 + k).to_string());
        o["security-labels"] = Value::Object(security);
        api.put("ciliumidentities", o);
    }
}
