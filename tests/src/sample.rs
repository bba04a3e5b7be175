//! The capture of a real Cilium 1.7.1 node (`tests/data/real-cilium-1.7.1-node.txt`): map
//! bytes as bpftool dumped them, Cilium's own listings of the same maps, addresses and etcd keys.

use std::collections::BTreeMap;

pub const REAL_1_7_1: &str = include_str!("../data/real-cilium-1.7.1-node.txt");
/// A real Cilium 1.16.15 agent's node (tcx attach, vxlan, IPv4, kvstore mode).
pub const REAL_1_16_15: &str = include_str!("../data/real-cilium-1.16.15-node.txt");

/// One `ip -o addr` line → (interface, address/len) for global-scope addresses. Takes the
/// short `eth0 10.5.1.132/24` form and iproute2's `2: eth0    inet 10.5.1.132/24 scope global`.
pub fn address_line(line: &str) -> Option<(String, String)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        [dev, addr] => Some(((*dev).to_owned(), (*addr).to_owned())),
        [_, dev, "inet" | "inet6", addr, "scope", "global", ..] => Some(((*dev).to_owned(), (*addr).to_owned())),
        _ => None,
    }
}

/// The file's `## heading` sections, each with its non-empty lines.
pub fn sections(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            current = Some(h.trim().to_owned());
            out.entry(h.trim().to_owned()).or_default();
        } else if let Some(h) = &current {
            // `# ...` lines are comments; `#define` lines are data.
            if !line.trim().is_empty() && !line.starts_with("# ") {
                out.entry(h.clone()).or_default().push(line.to_owned());
            }
        }
    }
    out
}

/// The section whose heading contains `prefix`.
pub fn section<'a>(s: &'a BTreeMap<String, Vec<String>>, prefix: &str) -> &'a [String] {
    s.iter()
        .find(|(h, _)| h.contains(prefix))
        .map(|(_, l)| l.as_slice())
        .unwrap_or_else(|| panic!("sample has no section starting with {prefix:?}"))
}

/// `bpftool map dump` text (hex `key:`/`value:` blocks) → raw entries.
pub fn bpftool_entries(lines: &[String]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut value: Vec<u8> = Vec::new();
    let mut in_value = false;
    let flush = |key: &mut Vec<u8>, value: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, Vec<u8>)>| {
        if !key.is_empty() {
            out.push((std::mem::take(key), std::mem::take(value)));
        }
    };
    for line in lines {
        let l = line.trim();
        if l == "key:" {
            flush(&mut key, &mut value, &mut out);
            in_value = false;
        } else if l == "value:" {
            in_value = true;
        } else if l.starts_with("Found ") {
            continue;
        } else {
            let bytes = hex::decode(l.replace(' ', "")).expect("hex line in bpftool dump");
            if in_value {
                value.extend(bytes);
            } else {
                key.extend(bytes);
            }
        }
    }
    flush(&mut key, &mut value, &mut out);
    out
}

/// `etcdctl get --prefix` output (key line, value line) → pairs.
pub fn etcd_pairs(lines: &[String]) -> Vec<(String, String)> {
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}
