//! The agent under a stream of changes: change-to-report latency, throughput, a burst.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use kvcheck_tests::encode::{self, IpcacheValue};
use kvcheck_tests::simdata;

use crate::common::*;
use crate::node::BenchNode;
use crate::{Args, Figures};

/// The agent under a steady stream of changes (half ipcache updates, half etcd puts, each one
/// a new drift), run with a zero grace period: how long from each write to its
/// `finding-opened` line, and how many changes per second it keeps up with; then a burst of
/// map changes in one batch, to see the most it handles.
pub(crate) fn agent_load_bench(node: &BenchNode, args: &Args, figs: &mut Figures) -> Result<String> {
    use std::io::{BufRead as _, BufReader};
    let mut agent = node.start_agent(&["--grace", "0s", "--health-interval", "3600s", "--log-format", "json"], Stdio::piped())?;
    let pid = agent.id();
    let stderr = agent.stderr.take().context("agent stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !line.contains("finding-opened") {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(subject) = v["subject"].as_str() {
                if tx.send((subject.to_owned(), Instant::now())).is_err() {
                    break;
                }
            }
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let client = rt.block_on(etcd_client::Client::connect(node.etcd.endpoints(), None))?;
    let layout = node.layout;
    let remote_host = simdata::node_ip(1.min(node.shape.nodes - 1));
    let total = args.agent_rate * args.agent_seconds;
    let mut injected: std::collections::HashMap<String, Instant> = std::collections::HashMap::with_capacity(total as usize);
    let mut reported: std::collections::HashMap<String, Instant> = std::collections::HashMap::with_capacity(total as usize);
    let drain = |reported: &mut std::collections::HashMap<String, Instant>, wait: Duration| {
        if let Ok((s, t)) = rx.recv_timeout(wait) {
            reported.entry(s).or_insert(t);
        }
        while let Ok((s, t)) = rx.try_recv() {
            reported.entry(s).or_insert(t);
        }
    };
    let (t0, c0) = (Instant::now(), cpu_seconds(pid));
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(f64::from(i) / f64::from(args.agent_rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if i % 2 == 0 {
            // A stale ipcache entry (10.250.x.y): ipcache-stale.
            let prefix = IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0afa_0000u32 + i)));
            node.maps.ipcache.update(&encode::ipcache_key(layout, prefix, 0), &encode::ipcache_value(layout, IpcacheValue { identity: 1000, ..Default::default() }))?;
            injected.insert(prefix.to_string(), Instant::now());
        } else {
            // A remote pod (10.251.x.y) the ipcache lacks: ipcache-missing.
            let ip = Ipv4Addr::from(0x0afb_0000u32 + i);
            let value = format!(r#"{{"IP":"{ip}","Mask":null,"HostIP":"{remote_host}","ID":256,"Key":0}}"#);
            injected.insert(format!("{ip}/32"), Instant::now());
            let mut kv = client.kv_client();
            rt.spawn(async move { kv.put(format!("cilium/state/ip/v1/default/{ip}"), value, None).await });
        }
        if i % 64 == 0 {
            drain(&mut reported, Duration::ZERO);
        }
    }
    let sent = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reported.len() < injected.len() && Instant::now() < deadline {
        drain(&mut reported, Duration::from_millis(200));
    }
    let busy = t0.elapsed();
    let cpu_pct = (cpu_seconds(pid) - c0) / busy.as_secs_f64() * 100.0;
    let mut lat: Vec<Duration> = injected.iter().filter_map(|(s, t)| reported.get(s).map(|r| r.saturating_duration_since(*t))).collect();
    lat.sort();
    let missed = injected.len() - lat.len();
    let last = reported.values().max().copied().unwrap_or(t0);
    let sustained = lat.len() as f64 / last.duration_since(t0).as_secs_f64().max(1e-9);

    // Burst: one batch update of `burst` stale entries.
    let burst = args.agent_rate * 10;
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut subjects = Vec::new();
    for i in 0..burst {
        let prefix = IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0afc_0000u32 + i)));
        keys.extend(encode::ipcache_key(layout, prefix, 0));
        values.extend(encode::ipcache_value(layout, IpcacheValue { identity: 1001, ..Default::default() }));
        subjects.push(prefix.to_string());
    }
    let b0 = Instant::now();
    node.maps.ipcache.update_batch(&keys, &values)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while subjects.iter().any(|s| !reported.contains_key(s)) && Instant::now() < deadline {
        drain(&mut reported, Duration::from_millis(200));
    }
    let burst_seen = subjects.iter().filter(|s| reported.contains_key(*s)).count();
    let burst_took = subjects.iter().filter_map(|s| reported.get(s)).max().map_or(Duration::ZERO, |t| t.duration_since(b0));
    let rss = status_kib(pid, "VmRSS:");
    stop(agent);
    // Put the node back the way it was for whatever runs next.
    node.maps.ipcache.delete_batch(&keys)?;
    for i in (0..total).step_by(2) {
        let _ = node.maps.ipcache.delete(&encode::ipcache_key(layout, IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0afa_0000u32 + i))), 0));
    }
    rt.block_on(async {
        let mut kv = client.kv_client();
        kv.delete("cilium/state/ip/v1/default/10.251.", Some(etcd_client::DeleteOptions::new().with_prefix())).await
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, max) = (percentile(&lat, 0.5), percentile(&lat, 0.99), lat.last().copied().unwrap_or_default());
    figs.insert("agent_p50_ms", ms(p50));
    figs.insert("agent_p99_ms", ms(p99));
    figs.insert("agent_burst_per_s", burst_seen as f64 / burst_took.as_secs_f64().max(1e-9));
    Ok(format!(
        "`kvcheck agent` (eBPF change events, grace 0) on the node above; a steady stream of {} changes/s for {} s ({} changes: ipcache updates and etcd puts alternating, each a new drift), written in {:.1} s\n\n| what | value |\n|---|---:|\n| change → `finding-opened` p50 | {:.0} ms |\n| change → `finding-opened` p99 | {:.0} ms |\n| change → `finding-opened` max | {:.0} ms |\n| changes reported / not reported within 60 s | {} / {} |\n| sustained changes handled per second | {:.0} |\n| agent CPU while the stream ran | {:.0} % of a core |\n| burst: {burst} ipcache entries in one batch update, all reported after | {:.0} ms ({:.0} changes/s; {} of {burst} seen) |\n| agent RSS after the burst | {:.1} MiB |\n",
        args.agent_rate, args.agent_seconds, total, sent.as_secs_f64(),
        ms(p50), ms(p99), ms(max), lat.len(), missed, sustained, cpu_pct,
        ms(burst_took), burst_seen as f64 / burst_took.as_secs_f64().max(1e-9), burst_seen,
        rss as f64 / 1024.0
    ))
}
