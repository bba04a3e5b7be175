//! `kvcheck check` as text: findings grouped by severity, each with the evidence an operator
//! would have dug out by hand.

use std::fmt::Write as _;

use crate::check::diff::Finding;
use crate::check::kinds::Severity;
use crate::check::run::CheckReport;
use crate::cilium::CiliumAgentState;

fn evidence_line(out: &mut String, label: &str, v: &Option<crate::check::diff::Evidence>) {
    let Some(v) = v.as_ref().map(crate::check::diff::Evidence::value) else { return };
    if v.is_null() {
        return;
    }
    let text = match v.get("key").and_then(|k| k.as_str()) {
        Some(key) if v.get("value").is_some_and(serde_json::Value::is_null) => format!("{key} (absent)"),
        _ => v.to_string(),
    };
    let _ = writeln!(out, "      {label:<9} {text}");
}

fn finding(out: &mut String, f: &Finding) {
    let _ = writeln!(out, "  {:<28} {:<26} {}", f.kind.name(), f.subject, f.message);
    if let Some(c) = &f.cluster {
        let _ = writeln!(out, "      cluster:  {c}");
    }
    evidence_line(out, "datapath:", &f.datapath);
    evidence_line(out, "kvstore:", &f.kvstore);
}

fn cilium_lines(out: &mut String, c: &CiliumAgentState) {
    let _ = writeln!(out, "  cilium    {} via {}", c.summary(), c.socket.display());
    let mut facts = Vec::new();
    if let Some(t) = &c.started_at {
        facts.push(format!("API socket created {t}"));
    }
    if let Some(e) = &c.endpoints {
        let states: Vec<String> = e.by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
        facts.push(format!("{} endpoints ({})", e.total, states.join(", ")));
    }
    if let Some(kv) = &c.kvstore {
        facts.push(format!("its kvstore: {} {}", kv.state, kv.msg.trim()));
    }
    if c.waited_ms >= 1000 {
        facts.push(format!("waited {} ms for it", c.waited_ms));
    }
    if !facts.is_empty() {
        let _ = writeln!(out, "  cilium    {}", facts.join("; "));
    }
}

/// ClusterMesh: the local cluster, then one line per remote with its state and what was read.
fn mesh_lines(out: &mut String, m: &crate::clustermesh::Mesh) {
    let l = &m.local;
    let _ = writeln!(out, "  mesh      local cluster {} id {} (from {}); {} remote clusters in {}", l.name, l.id, l.id_from, m.remotes.len(), m.config_dir.display());
    if let Some(why) = &m.inactive {
        let _ = writeln!(out, "  mesh      inactive: {why}");
        return;
    }
    for r in &m.remotes {
        let how = match &r.cluster_config {
            Some(c) if c.capabilities.cached => format!("id {}, through KVStoreMesh's cache", c.id),
            Some(c) => format!("id {}, direct", c.id),
            None => "no cluster-config".to_owned(),
        };
        let state = match r.status {
            crate::clustermesh::RemoteStatus::Synced => format!("synced: {} nodes, {} pod IPs, {} identities at revision {}", r.counts.nodes, r.counts.ips, r.counts.identities, r.revision),
            st => format!("{} (its entries not judged): {}", st.name(), r.reason.as_deref().unwrap_or_default()),
        };
        let _ = writeln!(out, "  cluster   {} ({how}; {}): {state}", r.name, r.endpoints.join(","));
    }
    for i in &m.ignored {
        let _ = writeln!(out, "  mesh      ignored {}: {}", i.path.display(), i.reason);
    }
}

pub fn render(r: &CheckReport) -> String {
    let mut out = String::new();
    let c = &r.counts;
    let verdict = if !r.judged() {
        "NOT CHECKED: the Cilium agent is not ready; what it is restoring is not judged as drift".to_owned()
    } else if r.consistent() {
        let unjudged: Vec<&str> = r.sources.clustermesh.iter().filter(|m| m.active()).flat_map(|m| m.remotes.iter()).filter(|c| !c.status.judged()).map(|c| c.name.as_str()).collect();
        let what = if r.sources.endpoints == crate::model::source::StateSource::Kubernetes { "Cilium's objects in the Kubernetes API" } else { "the kvstore" };
        if unjudged.is_empty() {
            format!("CONSISTENT: the datapath agrees with {what}")
        } else {
            format!("CONSISTENT: the datapath agrees with {what}; remote clusters not judged: {}", unjudged.join(", "))
        }
    } else {
        format!("DRIFT: {} findings ({} critical, {} warning, {} info)", c.total, c.critical, c.warning, c.info)
    };
    let _ = writeln!(out, "node {}/{}: {verdict}", r.node.cluster, r.node.name);
    let s = &r.sources;
    cilium_lines(&mut out, &s.cilium);
    if let Some(dp) = &s.datapath {
        let entries: Vec<String> = dp.entries.iter().map(|(m, n)| format!("{m} {n}")).collect();
        let _ = writeln!(out, "  datapath  {} layout {}; {} (read {})", dp.bpffs.display(), dp.layout.summary(), entries.join(", "), dp.read_at);
    }
    let from_objects = s.endpoints == crate::model::source::StateSource::Kubernetes;
    if let Some(k) = &s.kubernetes {
        let versions: Vec<String> = k.resource_versions.iter().map(|(r, v)| format!("{r}@{v}")).collect();
        let _ = writeln!(out, "  k8s api   {}; {}{}", k.api, versions.join(", "), if k.endpoint_slices { " (CiliumEndpointSlices)" } else { "" });
    }
    if r.judged() && from_objects {
        let _ = writeln!(out, "  kvstore   not used (CRD mode: nodes and pod IPs are Cilium's objects); {} entries from them (read {})", s.kvstore.keys, s.kvstore.read_at);
    } else if r.judged() {
        let _ = writeln!(out, "  kvstore   {}; {} keys at revision {} (read {})", s.kvstore.status, s.kvstore.keys, s.kvstore.revision, s.kvstore.read_at);
    } else {
        let _ = writeln!(out, "  kvstore   {} (read {})", s.kvstore.status, s.kvstore.read_at);
    }
    if let Some(m) = &s.clustermesh {
        mesh_lines(&mut out, m);
    }
    for line in s.datapath.iter().flat_map(|dp| dp.live_maps.summary()) {
        let _ = writeln!(out, "  maps      {line}");
    }
    if r.judged() && !s.identities.checked {
        let _ = writeln!(out, "  identities not checked: {}", s.identities.reason.as_deref().unwrap_or_default());
    }
    for a in &s.assumptions {
        let _ = writeln!(out, "  assumed   {a}");
    }
    if r.settle.window_ms > 0 {
        match (&r.settle.reread_revision, &r.settle.reread_at) {
            (Some(rev), Some(at)) => {
                let _ = writeln!(
                    out,
                    "  settle    {} ms; re-read {} keys at revision {rev} and the maps ({at}); {} transient findings dropped",
                    r.settle.window_ms,
                    r.settle.reread_keys,
                    r.settle.settled.len()
                );
            }
            _ => {
                let _ = writeln!(out, "  settle    {} ms (nothing to re-read)", r.settle.window_ms);
            }
        }
    }
    let h = &r.hold_off;
    if h.waited_ms > 0 {
        let _ = writeln!(out, "  hold-off  waited {} ms for Cilium's node-delete hold-off ({} ms) to end, then checked again", h.waited_ms, h.window_ms);
    }
    for n in &h.nodes {
        let _ = writeln!(
            out,
            "  hold-off  {} deleted at revision {} (by {}, bounded by {}); Cilium may keep its entries until {}",
            n.key, n.deleted_revision, n.deleted_by, n.bounded_by, n.held_until
        );
    }
    if !h.held.is_empty() {
        let held: Vec<String> = h.held.iter().map(|(k, s)| format!("{} {s}", k.name())).collect();
        let _ = writeln!(out, "  held      not drift yet: {}", held.join(", "));
    }
    for sev in [Severity::Critical, Severity::Warning, Severity::Info] {
        let group: Vec<&Finding> = r.findings.iter().filter(|f| f.severity == sev).collect();
        if group.is_empty() {
            continue;
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", format!("{sev:?}").to_uppercase());
        for f in group {
            finding(&mut out, f);
        }
    }
    if !r.consistent() {
        let _ = writeln!(out);
        let _ = writeln!(out, "`kvcheck explain <kind>` says what a kind means, its usual causes and what to do.");
    }
    out
}
