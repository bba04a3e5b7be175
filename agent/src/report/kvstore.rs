//! `kvcheck dump kvstore` as text.

use std::fmt::Write as _;

use crate::kvstore::view::NodeView;
use crate::model::identity;

pub fn render(v: &NodeView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", v.status);
    for e in &v.health.endpoints {
        match &e.error {
            None => {
                let _ = writeln!(
                    out,
                    "  {} etcd {} {}member {}{}",
                    e.endpoint,
                    e.version.as_deref().unwrap_or("?"),
                    if e.proxy { "gRPC proxy in front of " } else { "" },
                    e.member_id.as_deref().unwrap_or("?"),
                    if e.is_leader { " (leader)" } else { "" }
                );
            }
            Some(err) => {
                let _ = writeln!(out, "  {} unreachable: {err}", e.endpoint);
            }
        }
    }
    match (&v.heartbeat, v.heartbeat_age_seconds) {
        (Some(h), Some(age)) => {
            let _ = writeln!(out, "heartbeat {h} ({age}s ago)");
        }
        (Some(h), None) => {
            let _ = writeln!(out, "heartbeat {h:?} (not an RFC 3339 time)");
        }
        (None, _) => {
            let _ = writeln!(out, "heartbeat: none (cilium/.heartbeat absent; written by the operator from v1.9)");
        }
    }
    let _ = writeln!(out);
    let name = v.node_name.as_deref().unwrap_or("(no --node-name)");
    match &v.node {
        Some(n) => {
            let _ = writeln!(out, "node {}/{} (key {}, lease {:x}, TTL {})", n.cluster, n.name, n.meta.key, n.meta.lease,
                v.node_lease_ttl_seconds.map_or_else(|| "n/a".to_owned(), |t| format!("{t}s")));
            for a in &n.addresses {
                let _ = writeln!(out, "  {:<17} {}", a.addr_type, a.ip);
            }
            for (label, c) in [("IPv4AllocCIDR", n.ipv4_alloc_cidr), ("IPv6AllocCIDR", n.ipv6_alloc_cidr)] {
                if let Some(c) = c {
                    let _ = writeln!(out, "  {label:<17} {c}");
                }
            }
            for (label, ip) in [("IPv4HealthIP", n.ipv4_health_ip), ("IPv6HealthIP", n.ipv6_health_ip)] {
                if let Some(ip) = ip {
                    let _ = writeln!(out, "  {label:<17} {ip}");
                }
            }
            let _ = writeln!(out, "  EncryptionKey     {}", n.encryption_key);
        }
        None => {
            let _ = writeln!(out, "node {}/{name}: no cilium/state/nodes/v1 entry", v.cluster);
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "IP entries hosted by this node: {}", v.ips.len());
    for e in &v.ips {
        let pod = match (e.owner.k8s_namespace(), e.owner.k8s_pod_name()) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => "-".to_owned(),
        };
        let _ = writeln!(out, "  {:<40} {:<26} key {:<3} {}", e.prefix.to_string(), identity::describe(e.identity), e.encrypt_key, pod);
    }
    let _ = writeln!(out, "identities they use:");
    for i in &v.identities {
        let _ = writeln!(out, "  {:<10} {}", i.id, i.labels.as_deref().unwrap_or("MISSING: no cilium/state/identities/v1/id key"));
    }
    let _ = writeln!(out);
    let t = &v.totals;
    let _ = writeln!(
        out,
        "cluster totals at revision {}: {} nodes, {} IP entries, {} identities, {} identity references, {} malformed",
        v.revision, t.nodes, t.ips, t.identities, t.identity_references, t.malformed
    );
    if let Some(c) = t.kvstoremesh_cache_keys {
        let _ = writeln!(out, "KVStoreMesh cache: {c} keys under cilium/cache/");
    }
    for s in &v.synced {
        let _ = writeln!(out, "synced {s}");
    }
    for m in &v.malformed {
        let _ = writeln!(out, "MALFORMED {}: {}", m.meta.key, m.reason);
    }
    out
}
