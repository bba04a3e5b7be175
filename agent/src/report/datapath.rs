//! `kvcheck dump datapath` as tables, in the spirit of `cilium bpf ipcache list`.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::datapath::addresses::HostAddresses;
use crate::datapath::{DatapathSnapshot, MapDump};
use crate::model::identity;

fn map_heading<T>(out: &mut String, dump: &MapDump<T>) {
    let m = &dump.meta;
    let _ = writeln!(
        out,
        "{} (id {}, {}, {}/{} entries, {:.1}% full, read by {})",
        m.name,
        m.id,
        m.map_type,
        dump.entry_count,
        m.max_entries,
        dump.fill_ratio * 100.0,
        serde_json::to_value(dump.read_method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    );
}

fn undecodable<T>(out: &mut String, dump: &MapDump<T>) {
    for u in &dump.undecodable {
        let _ = writeln!(out, "  UNDECODABLE key={} value={}: {}", u.key, u.value, u.reason);
    }
}

fn opt_ip(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string())
}

fn flags(names: &[&str]) -> String {
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(",")
    }
}

pub fn render(snapshot: &DatapathSnapshot, host: &HostAddresses) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "bpffs {}", snapshot.bpffs.display());
    let _ = writeln!(out, "layout {}", snapshot.layout.summary());
    for line in snapshot.live_maps.summary() {
        let _ = writeln!(out, "live maps {line}");
    }
    let _ = writeln!(out);

    let ipc = &snapshot.ipcache;
    map_heading(&mut out, ipc);
    let _ = writeln!(
        out,
        "{:<44} {:<32} {:<26} {:>3} {:>7}  FLAGS",
        "IP PREFIX/ADDRESS", "IDENTITY", "TUNNEL ENDPOINT", "KEY", "CLUSTER"
    );
    let mut entries: Vec<_> = ipc.entries.iter().collect();
    entries.sort_by_key(|e| (e.prefix.addr(), e.prefix.prefix_len(), e.cluster_id));
    for e in entries {
        let _ = writeln!(
            out,
            "{:<44} {:<32} {:<26} {:>3} {:>7}  {}",
            e.prefix.to_string(),
            identity::describe(e.identity),
            opt_ip(e.tunnel_endpoint),
            e.encrypt_key,
            e.cluster_id,
            flags(&e.flag_names.names()),
        );
    }
    undecodable(&mut out, ipc);
    let _ = writeln!(out);

    let eps = &snapshot.endpoints;
    map_heading(&mut out, eps);
    let _ = writeln!(
        out,
        "{:<40} {:<11} {:>7} {:<26} {:<17} {:<17} FLAGS",
        "IP ADDRESS", "ENDPOINT", "IFINDEX", "IDENTITY", "MAC", "NODE MAC"
    );
    let mut entries: Vec<_> = eps.entries.iter().collect();
    entries.sort_by_key(|e| e.ip);
    for e in entries {
        let mac = |m: Option<crate::datapath::codec::Mac>| m.map_or_else(|| "-".to_owned(), |m| m.to_string());
        let (endpoint, ifindex) = if e.is_host {
            ("(localhost)".to_owned(), "-".to_owned())
        } else {
            (format!("id={}", e.endpoint_id), e.ifindex.to_string())
        };
        let _ = writeln!(
            out,
            "{:<40} {:<11} {:>7} {:<26} {:<17} {:<17} {}",
            e.ip.to_string(),
            endpoint,
            ifindex,
            e.identity.map_or_else(|| "n/a (layout)".to_owned(), identity::describe),
            mac(e.mac),
            mac(e.node_mac),
            flags(&e.flag_names),
        );
    }
    undecodable(&mut out, eps);
    let _ = writeln!(out);

    match &snapshot.tunnel {
        Some(t) => {
            map_heading(&mut out, t);
            let _ = writeln!(out, "{:<40} {:<40} {:>3}", "TUNNEL (POD CIDR BASE)", "TUNNEL ENDPOINT", "KEY");
            let mut entries: Vec<_> = t.entries.iter().collect();
            entries.sort_by_key(|e| e.prefix);
            for e in entries {
                let _ = writeln!(out, "{:<40} {:<40} {:>3}", e.prefix.to_string(), e.tunnel_endpoint.to_string(), e.encrypt_key);
            }
            undecodable(&mut out, t);
        }
        None if snapshot.layout.layout.has_tunnel_map() => {
            let _ = writeln!(out, "cilium_tunnel_map: not pinned");
        }
        None => {
            let _ = writeln!(out, "cilium_tunnel_map: none in layout {} (encapsulation uses ipcache tunnel endpoints)", snapshot.layout.layout);
        }
    }
    let _ = writeln!(out);
    out.push_str(&render_addresses(host));
    out
}

pub fn render_addresses(host: &HostAddresses) -> String {
    let mut out = String::new();
    match &host.cilium_host {
        Some(i) if i.addresses.is_empty() => {
            let _ = writeln!(out, "cilium_host: ifindex {}, no addresses", i.ifindex);
        }
        Some(i) => {
            let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "cilium_host: ifindex {}, {}", i.ifindex, addrs.join(" "));
        }
        None => {
            let _ = writeln!(out, "cilium_host: no such interface in this network namespace");
        }
    }
    let _ = writeln!(out, "local addresses:");
    for i in &host.interfaces {
        let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  {:<16} {}",
            i.name,
            if addrs.is_empty() { "-".to_owned() } else { addrs.join(" ") }
        );
    }
    out
}

/// One `--follow` line: `+ cilium_ipcache 10.1.0.5/32 {..}`, `~ ... old -> new`, `- ...`.
pub fn change_line(c: &crate::datapath::events::DatapathChange) -> String {
    use crate::datapath::events::Op;
    let show = |v: &Option<serde_json::Value>| v.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string);
    match c.op {
        Op::Added => format!("{} + {} {} {}", c.at, c.map, c.subject, show(&c.new)),
        Op::Removed => format!("{} - {} {} {}", c.at, c.map, c.subject, show(&c.old)),
        Op::Updated => format!("{} ~ {} {} {} -> {}", c.at, c.map, c.subject, show(&c.old), show(&c.new)),
    }
}
