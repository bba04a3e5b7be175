//! ClusterMesh: a node meshed with N remote clusters, check time and memory per remote.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};
use ipnet::IpNet;
use kvcheck_tests::encode::{self, IpcacheValue};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::simdata;

use crate::common::*;
use crate::Args;

/// ClusterMesh: the real 1.16.15 node meshed with 1, 2, 5 and 10 remote clusters of `pods`
/// pods each (100 nodes, 100 identities per remote), all through KVStoreMesh-style caches in
/// one etcd (as one clustermesh-apiserver holds them); the node's maps get what Cilium writes
/// for them. Check time and memory per remote, and the agent idle with all of them.
pub(crate) fn clustermesh_bench(args: &Args) -> Result<String> {
    use kvcheck_tests::simmesh;
    // 10,000 pods per remote at full size (a tenth of the local cluster's ip/v1 entries).
    let pods = (args.shape.ips / 10).max(100);
    let nodes = 100u32.min(pods);
    let node = kvcheck_tests::simnode::SimulatedNode::real_1_16_15()?;
    let cache = EtcdCluster::single()?;
    let dir = node.state_dir.join("clustermesh");
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows: Vec<(u32, f64, f64)> = Vec::new();
    let mut added = 0u32;
    let mut last = (Duration::ZERO, 0i64);
    for k in [1u32, 2, 5, 10] {
        // Remotes added+2 ..= k+1 (ids 2..=11).
        for c in (added + 2)..=(k + 1) {
            let name = format!("cluster{c}");
            let now = chrono::Utc::now().to_rfc3339();
            let mut pairs = vec![(format!("cilium/cluster-config/{name}"), format!(r#"{{"id":{c},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}}}"#))];
            for kind in ["nodes", "ip", "identities", "services"] {
                pairs.push((format!("cilium/synced/{name}/cilium/cache/{kind}/v1"), now.clone()));
            }
            for i in 0..100u32 {
                pairs.push((format!("cilium/cache/identities/v1/{name}/id/{}", (c << 16) + 256 + i), simmesh::labels(&format!("app{i}"), &name)));
            }
            let mut ipc = Vec::new();
            let value = |identity: u32, tunnel: Option<IpAddr>| encode::ipcache_value(node.layout, IpcacheValue { identity, tunnel_endpoint: tunnel, ..Default::default() });
            let key = |p: &str| encode::ipcache_key(node.layout, p.parse().unwrap_or_else(|_| IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))), 0);
            for n in 0..nodes {
                let node_ip = format!("172.16.{c}.{}", n + 1);
                let json = format!(
                    r#"{{"Name":"n{n}","Cluster":"{name}","IPAddresses":[{{"Type":"InternalIP","IP":"{node_ip}"}},{{"Type":"CiliumInternalIP","IP":"10.{}.{n}.200"}}],"IPv4AllocCIDR":{{"IP":"10.{}.{n}.0","Mask":"////AA=="}},"IPv4HealthIP":"10.{}.{n}.201","ClusterID":{c},"Source":"custom-resource","EncryptionKey":0}}"#,
                    100 + c, 100 + c, 100 + c
                );
                pairs.push((format!("cilium/cache/nodes/v1/{name}/n{n}"), json));
                let via = Some(v4(&node_ip));
                ipc.push((key(&format!("{node_ip}/32")), value(6, None)));
                ipc.push((key(&format!("10.{}.{n}.200/32", 100 + c)), value(6, via)));
                ipc.push((key(&format!("10.{}.{n}.201/32", 100 + c)), value(4, via)));
                if let Some(t) = &node.maps.tunnel {
                    t.update(&encode::tunnel_key(v4(&format!("10.{}.{n}.0", 100 + c))), &encode::tunnel_value(v4(&node_ip), 0))?;
                }
            }
            for p in 0..pods {
                let (n, h) = (p % nodes, p / nodes + 1);
                let ip = format!("10.{}.{n}.{h}", 100 + c);
                let id = (c << 16) + 256 + p % 100;
                let node_ip = format!("172.16.{c}.{}", n + 1);
                pairs.push((format!("cilium/cache/ip/v1/{name}/{ip}"), simmesh::ip_json(&ip, id, &node_ip, &name, &format!("p{p}"))));
                ipc.push((key(&format!("{ip}/32")), value(id, Some(v4(&node_ip)))));
            }
            rt.block_on(simdata::load(&cache.endpoints(), pairs))?;
            node.maps.ipcache.fill(ipc.into_iter(), 4096)?;
            std::fs::write(dir.join(&name), format!("endpoints:\n- {}\n", cache.endpoints()[0]))?;
        }
        added = k;
        let make = || {
            let mut c = Command::new(kvcheck_bin());
            c.args(node.check_args()).args(["--clustermesh-config", &dir.display().to_string(), "--cluster-id", "1", "--settle", "0", "--output", "json"]);
            c
        };
        let first = make().output()?;
        if !first.status.success() {
            bail!("the meshed bench node does not check clean with {k} remotes: {} {}", String::from_utf8_lossy(&first.stdout).chars().take(2000).collect::<String>(), String::from_utf8_lossy(&first.stderr));
        }
        last = measure(args.runs, make)?;
        rows.push((k, last.0.as_secs_f64() * 1000.0, last.1 as f64 / 1024.0));
    }
    // Growth past the first remote, per remote added: flat means linear.
    let (k1, ms1, mib1) = rows[0];
    let table: String = rows
        .iter()
        .map(|&(k, ms, mib)| {
            let per = |v: f64, base: f64| if k == k1 { "-".to_owned() } else { format!("{:.1}", (v - base) / f64::from(k - k1)) };
            format!("| {k} | {} | {ms:.0} | {mib:.1} | {} | {} |\n", k * pods, per(ms, ms1), per(mib, mib1))
        })
        .collect();
    // Side by side at 10 remotes: what an operator would run by hand.
    let (etcdctl_t, _) = measure(args.runs, || {
        let mut c = Command::new(kvcheck_tests::etcd::etcdctl_binary());
        c.env("ETCDCTL_API", "3").args(["--endpoints", &cache.endpoints()[0], "get", "--prefix", "cilium/cache/", "-w", "json"]);
        c
    })?;
    let pin = node.bpffs.globals().join("cilium_ipcache");
    let (bpftool_t, _) = measure(args.runs, || {
        let mut c = Command::new("bpftool");
        c.args(["map", "dump", "pinned"]).arg(&pin);
        c
    })?;
    // The agent with all 10 remotes watched, idle.
    let port = kvcheck_tests::agent::free_port();
    let mut a = node.check_args();
    a[0] = "agent".into();
    a.extend(["--clustermesh-config".into(), dir.display().to_string(), "--cluster-id".into(), "1".into(), "--listen".into(), format!("127.0.0.1:{port}")]);
    let agent = wait_ready(Command::new(kvcheck_bin()).args(&a).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?, port, Duration::from_secs(120))?;
    let pid = agent.id();
    let idle = Duration::from_secs(args.idle_seconds.min(20));
    std::thread::sleep(idle);
    let (rss_now, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    stop(agent);
    within_shipped_limit("the agent (10 remote clusters)", hwm)?;
    Ok(format!(
        "The real 1.16.15 node (cluster id 1) meshed with remote clusters of {pods} pods on {nodes} nodes each (plus 100 identities), every remote through a KVStoreMesh-style cache (`cilium/cache/...` with sync canaries) in one etcd, and the node's maps holding what Cilium writes for them (pods, node addresses, health IPs, tunnel entries). `kvcheck check --settle 0` (exit 0 each time), median of {} runs.\n\n| remotes | remote pods | full check ms | peak RSS MiB | ms per added remote | MiB per added remote |\n|---|---:|---:|---:|---:|---:|\n{table}\nAt 10 remotes, side by side: `etcdctl get --prefix cilium/cache/ -w json` {:.0} ms, `bpftool map dump` of the ipcache {:.0} ms: kvcheck's whole check (both sides read, derived, diffed) is {:.2}x their sum. `kvcheck agent` watching all 10 remotes, idle {} s after ready: RSS {:.1} MiB (peak {:.1} MiB).\n",
        args.runs,
        etcdctl_t.as_secs_f64() * 1000.0,
        bpftool_t.as_secs_f64() * 1000.0,
        last.0.as_secs_f64() / (etcdctl_t + bpftool_t).as_secs_f64(),
        idle.as_secs(),
        rss_now as f64 / 1024.0,
        hwm as f64 / 1024.0
    ))
}
