//! Choosing the byte layout: from `--cilium-version`, else from what the maps show.
//!
//! Map sizes alone cannot tell v1.7–v1.13 from v1.14+, so detection also looks at bytes that
//! only some layouts use (pure logic over raw entries; no I/O here).

use serde::Serialize;

use super::endpoints::FLAG_HOST;
use super::codec;
use crate::model::version::{CiliumVersion, Layout};

/// `BPF_F_RDONLY_PROG`: Cilium sets it on ipcache_v2 from v1.19 and on cilium_lxc from v1.20.
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// The layout kvcheck decodes with, and why.
#[derive(Clone, Debug, Serialize)]
pub struct LayoutChoice {
    pub layout: Layout,
    /// `option` (from --cilium-version) or `detected`.
    pub source: &'static str,
    /// Each piece of evidence that narrowed the choice.
    pub reasons: Vec<String>,
    /// Other layouts that the evidence could not exclude. They decode the entries present
    /// identically: the bytes that differ between them are all zero.
    pub also_possible: Vec<Layout>,
}

impl LayoutChoice {
    pub fn from_version(v: CiliumVersion, layout: Layout) -> Self {
        let mut reasons = vec![format!("--cilium-version {v}")];
        if (v.major, v.minor) > (1, 20) {
            reasons.push(format!("{v} is newer than any release kvcheck knows; using the newest layout"));
        }
        LayoutChoice {
            layout,
            source: "option",
            reasons,
            also_possible: Vec::new(),
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!("{} ({}: {})", self.layout, self.source, self.reasons.join("; "));
        if !self.also_possible.is_empty() {
            let others: Vec<&str> = self.also_possible.iter().map(|l| l.name()).collect();
            s.push_str(&format!(
                "; not excluded: {} (they decode these entries identically)",
                others.join(", ")
            ));
        }
        s
    }
}

/// What detection may look at.
pub struct Evidence<'a, I, E>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
    E: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    /// 12 (`cilium_ipcache`) or 24 (`cilium_ipcache_v2`).
    pub ipcache_value_size: u32,
    pub ipcache_flags: u32,
    pub endpoints_flags: u32,
    pub ipcache_entries: I,
    pub endpoint_entries: E,
}

#[derive(Debug, thiserror::Error)]
#[error("the maps show contradicting layout evidence ({0}); pass --cilium-version")]
pub struct Contradiction(String);

pub fn detect<'a, I, E>(ev: Evidence<'a, I, E>) -> Result<LayoutChoice, Contradiction>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
    E: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    let mut candidates: Vec<Layout> = Layout::ALL.to_vec();
    let mut reasons = Vec::new();
    let mut keep = |reason: String, pred: &dyn Fn(Layout) -> bool, cands: &mut Vec<Layout>| {
        cands.retain(|l| pred(*l));
        reasons.push(reason);
    };

    if ev.ipcache_value_size == 24 {
        keep("cilium_ipcache_v2 with 24-byte values (v1.18+)".into(), &|l| l.ipcache_v2(), &mut candidates);
        if ev.ipcache_flags & BPF_F_RDONLY_PROG != 0 {
            keep("ipcache created with BPF_F_RDONLY_PROG (v1.19+)".into(), &|l| l >= Layout::V1_19, &mut candidates);
        } else {
            keep("ipcache created without BPF_F_RDONLY_PROG (v1.18)".into(), &|l| l == Layout::V1_18, &mut candidates);
        }
        if ev.endpoints_flags & BPF_F_RDONLY_PROG != 0 {
            keep("cilium_lxc created with BPF_F_RDONLY_PROG (v1.20)".into(), &|l| l >= Layout::V1_20, &mut candidates);
        } else {
            keep("cilium_lxc created without BPF_F_RDONLY_PROG (before v1.20)".into(), &|l| l < Layout::V1_20, &mut candidates);
        }
    } else {
        keep("cilium_ipcache with 12-byte values (v1.7-v1.17)".into(), &|l| !l.ipcache_v2(), &mut candidates);
        // Scan for bytes only some layouts use. Stop at the first example of each.
        let mut cluster_u16 = None;
        let mut cluster_u8 = None;
        let mut key_at_10 = None;
        let mut flags_at_11 = None;
        for (k, v) in ev.ipcache_entries {
            if k.len() != 24 || v.len() != 12 {
                continue;
            }
            if cluster_u16.is_none() && (k[4] != 0 || k[5] != 0) {
                cluster_u16 = Some(describe_ipcache_key(k));
            }
            if cluster_u8.is_none() && k[6] != 0 {
                cluster_u8 = Some(describe_ipcache_key(k));
            }
            if key_at_10.is_none() && v[10] != 0 {
                key_at_10 = Some(describe_ipcache_key(k));
            }
            if flags_at_11.is_none() && v[11] != 0 {
                flags_at_11 = Some(describe_ipcache_key(k));
            }
        }
        let mut endpoint_without_identity = None;
        let mut endpoint_with_identity = None;
        let mut endpoint_with_parent = None;
        for (k, v) in ev.endpoint_entries {
            if k.len() != 20 || v.len() != 48 || codec::u32_at(v, 8) & FLAG_HOST != 0 {
                continue;
            }
            // The address is only formatted for the first example of each (65k endpoints).
            let ip = || codec::ip_at(k, 0, k[16]).map_or_else(|_| hex::encode(k), |ip| ip.to_string());
            let slot = if codec::u32_at(v, 32) == 0 { &mut endpoint_without_identity } else { &mut endpoint_with_identity };
            if slot.is_none() {
                *slot = Some(ip());
            }
            if codec::u32_at(v, 36) != 0 && endpoint_with_parent.is_none() {
                endpoint_with_parent = Some(ip());
            }
        }
        if let Some(p) = cluster_u16 {
            keep(format!("ipcache key {p} has a cluster id at bytes 4-5 (v1.15+)"), &|l| l >= Layout::V1_15, &mut candidates);
        }
        if let Some(p) = cluster_u8 {
            keep(format!("ipcache key {p} has a cluster id at byte 6 (v1.14)"), &|l| l == Layout::V1_14, &mut candidates);
        }
        if let Some(p) = key_at_10 {
            keep(format!("ipcache entry {p} has an encrypt key at value byte 10 (v1.14+)"), &|l| l >= Layout::V1_14, &mut candidates);
        }
        if let Some(p) = flags_at_11 {
            keep(format!("ipcache entry {p} has flags at value byte 11 (v1.15+)"), &|l| l >= Layout::V1_15, &mut candidates);
        }
        if let Some(ip) = endpoint_with_parent {
            keep(format!("endpoint {ip} has a parent ifindex (v1.17)"), &|l| l >= Layout::V1_17, &mut candidates);
        }
        if let Some(ip) = endpoint_with_identity {
            keep(format!("endpoint {ip} carries its identity (v1.14+)"), &|l| l >= Layout::V1_14, &mut candidates);
        } else if let Some(ip) = endpoint_without_identity {
            // v1.14+ always writes an endpoint's identity (at least reserved:init = 5).
            keep(format!("endpoint {ip} has no identity in its value (v1.14+ always writes one)"), &|l| l == Layout::V1_7, &mut candidates);
        }
    }

    // Newest first: among layouts that decode the present entries alike, the newest knows
    // the most fields.
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    match candidates.split_first() {
        Some((layout, rest)) => Ok(LayoutChoice {
            layout: *layout,
            source: "detected",
            reasons,
            also_possible: rest.to_vec(),
        }),
        None => Err(Contradiction(reasons.join("; "))),
    }
}

fn describe_ipcache_key(k: &[u8]) -> String {
    super::ipcache::decode_key(Layout::V1_15, k)
        .map_or_else(|_| hex::encode(k), |(p, _)| p.to_string())
}
