//! `cargo xtask bench`: kvcheck's datapath read side by side with a raw batch-lookup loop
//! (the floor) and `bpftool map dump`, on the same pinned map, in one run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use kvcheck::datapath::{self, maps::PinnedMap, sys, ReadOptions};
use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, EndpointValue, IpcacheValue};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::maps::{BpffsMount, CiliumMaps};
use kvcheck_tests::simdata::{self, ClusterShape};

struct Args {
    ipcache_entries: u32,
    runs: u32,
    write: Option<String>,
    shape: ClusterShape,
    only: Option<String>,
    idle_seconds: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        ipcache_entries: 500_000,
        runs: 5,
        write: None,
        shape: ClusterShape { nodes: 5_000, ips: 100_000, identities: 10_000 },
        only: None,
        idle_seconds: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--ipcache-entries" => a.ipcache_entries = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--write" => a.write = Some(value()?),
            "--nodes" => a.shape.nodes = value()?.parse()?,
            "--ips" => a.shape.ips = value()?.parse()?,
            "--identities" => a.shape.identities = value()?.parse()?,
            "--only" => a.only = Some(value()?),
            "--idle-seconds" => a.idle_seconds = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// The n-th synthetic ipcache prefix: 90% IPv4 /32 pods, 10% IPv6 /128.
fn prefix(n: u32) -> IpNet {
    if n % 10 == 9 {
        IpNet::from(IpAddr::V6(Ipv6Addr::from(0xfd00_0010_0244_0000_0000_0000_0000_0000u128 | u128::from(n))))
    } else {
        IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 | n)))
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_runs(runs: u32, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// The floor: batch lookups into one buffer, nothing decoded.
fn raw_batch_loop(path: &std::path::Path) -> Result<usize> {
    let fd = sys::obj_get_readonly(path)?;
    use std::os::fd::AsFd;
    let (ks, vs, chunk) = (24usize, 12usize, 8192usize);
    let mut keys = vec![0u8; ks * chunk];
    let mut values = vec![0u8; vs * chunk];
    let mut cursor = vec![0u8; ks];
    let mut total = 0;
    let mut first = true;
    loop {
        let step = sys::lookup_batch(fd.as_fd(), first, &mut cursor, &mut keys, &mut values, chunk as u32)?;
        first = false;
        match step {
            sys::BatchStep::More(n) => total += n as usize,
            sys::BatchStep::Done(n) => return Ok(total + n as usize),
        }
    }
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let status = cmd.stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("{cmd:?}: {status}");
    }
    Ok(())
}

/// Runs a command (stdout discarded) and returns its wall time and its own peak RSS in KiB.
///
/// The RSS comes from GNU time, which forks the command from its own small process: a child
/// forked straight from this (large) benchmark process would report this process's peak as
/// its own (Linux carries the parent's high-water mark into the child's `ru_maxrss`).
fn run_measured(cmd: &mut Command) -> Result<(Duration, i64)> {
    let out_file = std::env::temp_dir().join(format!("kvcheck-bench-rss-{}", std::process::id()));
    let mut timed = Command::new("/usr/bin/time");
    timed.args(["-f", "%M", "-o"]).arg(&out_file).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let t = Instant::now();
    let status = timed.stdout(Stdio::null()).status()?;
    let elapsed = t.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    let rss = std::fs::read_to_string(&out_file)?.lines().last().unwrap_or_default().trim().parse()?;
    let _ = std::fs::remove_file(&out_file);
    Ok((elapsed, rss))
}

/// Median wall time and the largest peak RSS over `runs` runs.
fn measure(runs: u32, mut make: impl FnMut() -> Command) -> Result<(Duration, i64)> {
    let mut times = Vec::new();
    let mut rss = 0;
    for _ in 0..runs {
        let (t, r) = run_measured(&mut make())?;
        times.push(t);
        rss = rss.max(r);
    }
    Ok((median(times), rss))
}

fn datapath_bench(args: &Args) -> Result<String> {
    let n = args.ipcache_entries;
    let bpffs = BpffsMount::new()?;
    let layout = Layout::V1_15;
    let maps = CiliumMaps::create(&bpffs, layout)?;
    let t = Instant::now();
    maps.ipcache.fill(
        (0..n).map(|i| {
            let value = IpcacheValue {
                identity: 256 + i % 60_000,
                tunnel_endpoint: Some(IpAddr::V4(Ipv4Addr::new(172, 18, (i % 200) as u8, 1))),
                ..Default::default()
            };
            (encode::ipcache_key(layout, prefix(i), 0), encode::ipcache_value(layout, value))
        }),
        4096,
    )?;
    for i in 0..100u32 {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 200, 0, i as u8));
        let v = EndpointValue { ifindex: 10 + i, endpoint_id: i as u16, identity: 300 + i, ..Default::default() };
        maps.endpoints.update(&encode::endpoint_key(ip), &encode::endpoint_value(layout, v))?;
    }
    eprintln!("bench: filled {n} ipcache entries in {:.2?}", t.elapsed());

    let path = maps.ipcache.path.clone();
    let floor = time_runs(args.runs, || {
        let got = raw_batch_loop(&path)?;
        anyhow::ensure!(got == n as usize, "raw loop read {got} of {n}");
        Ok(())
    })?;
    let opts = ReadOptions { bpffs: bpffs.root.clone(), ..Default::default() };
    let library = time_runs(args.runs, || {
        let s = datapath::read_maps(&opts)?;
        anyhow::ensure!(s.ipcache.entries.len() == n as usize);
        Ok(())
    })?;
    let iterate = time_runs(1, || {
        let m = PinnedMap::open("cilium_ipcache", &path)?;
        m.read_all(datapath::maps::ReadStrategy::IterateOnly)?;
        Ok(())
    })?;
    let bin = kvcheck_bin();
    let root = bpffs.root_str().to_owned();
    let (cli_json, kvcheck_rss) = measure(args.runs, || {
        let mut c = Command::new(&bin);
        c.args(["dump", "datapath", "--bpffs", &root, "--output", "json"]);
        c
    })?;
    let bpftool = time_runs(args.runs, || {
        run_quiet(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(&path))
    })?;
    let bpftool_json = time_runs(args.runs, || {
        run_quiet(Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path))
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let per100k = |d: Duration| ms(d) * 100_000.0 / f64::from(n);
    let rows = [
        ("raw batch-lookup loop (floor)", floor),
        ("kvcheck library read+decode (batch)", library),
        ("kvcheck library read (key iteration, 1 run)", iterate),
        ("kvcheck dump datapath --output json", cli_json),
        ("bpftool map dump pinned (text)", bpftool),
        ("bpftool -j map dump pinned", bpftool_json),
    ];
    let mut table = String::new();
    table.push_str(&format!(
        "Datapath read, ipcache of {n} entries (layout {layout}), median of {} runs\n\n",
        args.runs
    ));
    table.push_str("| what | wall ms | ms per 100k | vs floor |\n|---|---:|---:|---:|\n");
    for (name, d) in rows {
        table.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.2}x |\n",
            ms(d),
            per100k(d),
            ms(d) / ms(floor)
        ));
    }
    table.push_str(&format!(
        "\nkvcheck dump (JSON) is {:.1}x faster than `bpftool map dump` and {:.1}x faster than `bpftool -j`; peak RSS of kvcheck: {:.1} MiB\n",
        ms(bpftool) / ms(cli_json),
        ms(bpftool_json) / ms(cli_json),
        kvcheck_rss as f64 / 1024.0
    ));
    Ok(table)
}

fn kvstore_bench(args: &Args) -> Result<String> {
    let shape = args.shape;
    let etcd = EtcdCluster::single()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let pairs = simdata::cluster_pairs(shape);
    let total_keys = pairs.len();
    let t = Instant::now();
    rt.block_on(simdata::load(&etcd.endpoints(), pairs))?;
    eprintln!("bench: loaded {total_keys} keys into etcd in {:.2?}", t.elapsed());
    let endpoints = etcd.endpoints_arg();

    // etcdctl on the same prefixes (one command for cilium/state/, which holds all four).
    let (etcdctl, etcdctl_rss) = measure(args.runs, || {
        let mut c = etcd.etcdctl();
        c.args(["get", "--prefix", "cilium/state/"]);
        c
    })?;
    let bin = kvcheck_bin();
    let (cli, cli_rss) = measure(args.runs, || {
        let mut c = Command::new(&bin);
        c.args(["dump", "kvstore", "--etcd-endpoints", &endpoints, "--node-name", "node-1", "--output", "json"]);
        c
    })?;

    // Page size, measured: library read+decode in-process.
    let settings = kvcheck::kvstore::config::EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let mut pages = String::new();
    for page_size in [1_000i64, 5_000, 10_000, 50_000, 0] {
        let d = time_runs(args.runs, || {
            rt.block_on(async {
                let client = kvcheck::kvstore::client::Etcd::connect(&settings, Duration::from_secs(30)).await?;
                let opts = kvcheck::kvstore::reader::ListOptions { page_size, include_cache: false };
                let snap = kvcheck::kvstore::reader::read_snapshot(&client, &opts).await?;
                anyhow::ensure!(snap.ips.len() == shape.ips as usize && snap.nodes.len() == shape.nodes as usize);
                Ok(())
            })
        })?;
        let label = if page_size == 0 { "one range (no limit)".to_owned() } else { format!("{page_size} keys") };
        pages.push_str(&format!("| {label} | {:.0} |\n", d.as_secs_f64() * 1000.0));
    }

    // The floor: one raw range over cilium/state/ through etcd-client, nothing decoded.
    let floor = time_runs(args.runs, || {
        rt.block_on(async {
            let client = kvcheck::kvstore::client::Etcd::connect(&settings, Duration::from_secs(30)).await?;
            let mut kv = client.client.kv_client().max_decoding_message_size(1 << 30);
            let resp = kv.get("cilium/state/", Some(etcd_client::GetOptions::new().with_prefix().with_serializable())).await?;
            anyhow::ensure!(resp.kvs().len() == total_keys);
            Ok(())
        })
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |k: i64| k as f64 / 1024.0;
    let mut table = format!(
        "kvstore of {} nodes, {} IP entries, {} identities (+{} value keys), {total_keys} keys; etcd {} on loopback; median of {} runs\n\n",
        shape.nodes, shape.ips, shape.identities, shape.identities, etcd_version(), args.runs
    );
    table.push_str("| what | wall ms | peak RSS MiB | wall vs etcdctl | RSS vs etcdctl |\n|---|---:|---:|---:|---:|\n");
    table.push_str(&format!("| `etcdctl get --prefix cilium/state/` | {:.0} | {:.1} | 1.00x | 1.00x |\n", ms(etcdctl), mib(etcdctl_rss)));
    table.push_str(&format!(
        "| `kvcheck dump kvstore --output json` (health, paged read, decode) | {:.0} | {:.1} | {:.2}x | {:.2}x |\n",
        ms(cli), mib(cli_rss), ms(cli) / ms(etcdctl), cli_rss as f64 / etcdctl_rss as f64
    ));
    table.push_str(&format!(
        "| raw etcd-client range of `cilium/state/`, in-process, nothing decoded (the floor) | {:.0} | - | {:.2}x | - |\n",
        ms(floor), ms(floor) / ms(etcdctl)
    ));
    table.push_str("\nPage size (kvcheck library, read + decode, in-process):\n\n| page | wall ms |\n|---|---:|\n");
    table.push_str(&pages);
    Ok(table)
}

/// A node whose kvstore and datapath are consistent at scale: node-0 of a `shape` cluster,
/// its ipcache topped up to `ipcache_entries` with local-scope CIDR identities (node-local by
/// design, so classified and not drift).
fn check_bench(args: &Args) -> Result<String> {
    use kvcheck_tests::netns::Netns;
    let shape = args.shape;
    // v1.17: health endpoints have no ip/v1 keys (simdata writes none).
    let layout = Layout::V1_17;
    let etcd = EtcdCluster::single()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(simdata::load(&etcd.endpoints(), simdata::cluster_pairs(shape)))?;
    let bpffs = BpffsMount::new()?;
    // The ipcache sized up (Cilium's size is configurable): 500k entries in the default
    // 512k map would rightly be reported as map-pressure.
    let dir = bpffs.globals();
    let maps = CiliumMaps {
        ipcache: kvcheck_tests::maps::WriterMap::create(&dir, kvcheck_tests::maps::MapShape { max_entries: 1 << 20, ..kvcheck_tests::maps::ipcache_shape(layout) })?,
        endpoints: kvcheck_tests::maps::WriterMap::create(&dir, kvcheck_tests::maps::endpoints_shape(layout, true))?,
        tunnel: Some(kvcheck_tests::maps::WriterMap::create(&dir, kvcheck_tests::maps::tunnel_shape())?),
    };
    let v4 = |s: &str| -> IpAddr { s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) };
    let mut ipc: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let put = |ipc: &mut Vec<(Vec<u8>, Vec<u8>)>, prefix: IpNet, identity: u32, tunnel: Option<IpAddr>| {
        ipc.push((encode::ipcache_key(layout, prefix, 0), encode::ipcache_value(layout, IpcacheValue { identity, tunnel_endpoint: tunnel, ..Default::default() })));
    };
    put(&mut ipc, "0.0.0.0/0".parse()?, 2, None);
    for i in 0..shape.nodes {
        let (a, b) = simdata::pod_cidr_base(i);
        let node_ip = v4(&simdata::node_ip(i));
        let local = i == 0;
        put(&mut ipc, IpNet::from(node_ip), if local { 1 } else { 6 }, None);
        put(&mut ipc, IpNet::from(v4(&format!("10.{a}.{b}.1"))), if local { 1 } else { 6 }, (!local).then_some(node_ip));
        put(&mut ipc, IpNet::from(v4(&format!("10.{a}.{b}.2"))), 4, (!local).then_some(node_ip));
        if !local {
            if let Some(t) = &maps.tunnel {
                t.update(&encode::tunnel_key(v4(&format!("10.{a}.{b}.0"))), &encode::tunnel_value(node_ip, 0))?;
            }
        }
    }
    let mut local_pods = Vec::new();
    for j in 0..shape.ips {
        let n = j % shape.nodes;
        let (a, b) = simdata::pod_cidr_base(n);
        let ip = v4(&format!("10.{a}.{b}.{}", 3 + j / shape.nodes));
        let id = 256 + j % shape.identities;
        put(&mut ipc, IpNet::from(ip), id, (n != 0).then(|| v4(&simdata::node_ip(n))));
        if n == 0 {
            local_pods.push((ip, id, j));
        }
    }
    let mut k = 0u32;
    while (ipc.len() as u32) < args.ipcache_entries {
        put(&mut ipc, IpNet::from(IpAddr::V4(Ipv4Addr::from(0x6440_0000u32 + k))), 0x0100_0001 + k % 1000, None);
        k += 1;
    }
    let total_ipcache = ipc.len();
    maps.ipcache.fill(ipc.into_iter(), 4096)?;
    for ip in [v4(&simdata::node_ip(0)), v4("10.0.0.1")] {
        maps.endpoints.update(&encode::endpoint_key(ip), &encode::endpoint_value(layout, EndpointValue::host()))?;
    }
    maps.endpoints.update(&encode::endpoint_key(v4("10.0.0.2")), &encode::endpoint_value(layout, EndpointValue { ifindex: 2, endpoint_id: 2, identity: 4, ..Default::default() }))?;
    for (ip, id, j) in &local_pods {
        maps.endpoints.update(&encode::endpoint_key(*ip), &encode::endpoint_value(layout, EndpointValue { ifindex: 100 + j % 1000, endpoint_id: (j % 60000) as u16, identity: *id, ..Default::default() }))?;
    }
    let ns = Netns::new("kvc-bench")?;
    ns.add_interface("eth0", &[&format!("{}/16", simdata::node_ip(0))])?;
    ns.add_cilium_host(&["10.0.0.1/32"])?;
    let state = bpffs.root.with_extension("state");
    std::fs::create_dir_all(state.join("globals"))?;
    std::fs::write(state.join("globals/node_config.h"), "#define ENABLE_IPV4 1\n#define TUNNEL_MODE 1\n")?;

    let bin = kvcheck_bin();
    let endpoints = etcd.endpoints_arg();
    let netns = format!("/var/run/netns/{}", ns.name);
    let root = bpffs.root_str().to_owned();
    let state_arg = state.display().to_string();
    let make = || {
        let mut c = Command::new(&bin);
        c.args(["check", "--bpffs", &root, "--etcd-endpoints", &endpoints, "--node-name", "node-0", "--netns", &netns])
            .args(["--cilium-state-dir", &state_arg, "--cilium-version", "1.17", "--settle", "0", "--output", "json"]);
        c
    };
    // Exit code 0 = consistent: the bench node must check clean, or the figures mean little.
    let first = make().output()?;
    if !first.status.success() {
        let doc: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap_or_default();
        let sample: Vec<String> = doc["findings"].as_array().map(|a| a.iter().take(5).map(|f| f["message"].to_string()).collect()).unwrap_or_default();
        bail!("the bench node does not check clean: {} {}; {}", doc["counts"]["by_kind"], sample.join("; "), String::from_utf8_lossy(&first.stderr));
    }
    let (took, rss) = measure(args.runs, make)?;

    // The agent on the same node, idle (no changes) for `idle_seconds`: CPU and memory.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut agent = Command::new(&bin)
        .args(["agent", "--bpffs", &root, "--etcd-endpoints", &endpoints, "--node-name", "node-0", "--netns", &netns])
        .args(["--cilium-state-dir", &state_arg, "--cilium-version", "1.17", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ready_deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let ok = std::net::TcpStream::connect(("127.0.0.1", port)).ok().and_then(|mut s| {
            use std::io::{Read as _, Write as _};
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            Some(r.contains(" 200 "))
        });
        if ok == Some(true) {
            break true;
        }
        if Instant::now() > ready_deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let proc_stat = |pid: u32| -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = s.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let status_kib = |pid: u32, field: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
    };
    let idle = Duration::from_secs(args.idle_seconds);
    let ticks = 100.0; // USER_HZ
    let (cpu_pct, rss_now, hwm) = if ready {
        let t0 = proc_stat(agent.id()).unwrap_or(0);
        std::thread::sleep(idle);
        let t1 = proc_stat(agent.id()).unwrap_or(0);
        (
            (t1 - t0) as f64 / ticks / idle.as_secs_f64() * 100.0,
            status_kib(agent.id(), "VmRSS:").unwrap_or(0),
            status_kib(agent.id(), "VmHWM:").unwrap_or(0),
        )
    } else {
        (f64::NAN, 0, 0)
    };
    let _ = agent.kill();
    let _ = agent.wait();
    if !ready {
        bail!("the agent did not become ready on the bench node");
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(format!(
        "`kvcheck check` (settle 0) of node-0: kvstore {} nodes / {} IP entries / {} identities, ipcache {total_ipcache} entries ({} local-scope CIDR), {} local endpoints, tunnel map {} entries; median of {} runs\n\n| what | wall ms | peak RSS MiB |\n|---|---:|---:|\n| full check, consistent node (exit 0) | {:.0} | {:.1} |\n\n`kvcheck agent` on the same node, idle for {} s after it became ready: {:.2} % of a core, RSS {:.1} MiB (peak {:.1} MiB)\n",
        shape.nodes, shape.ips, shape.identities, k, local_pods.len(), shape.nodes - 1, args.runs, took.as_secs_f64() * 1000.0, rss as f64 / 1024.0,
        idle.as_secs(), cpu_pct, rss_now as f64 / 1024.0, hwm as f64 / 1024.0
    ))
}

/// The cost of the change-event program to everyone else: 1,000,000 bpf() updates of an
/// unrelated map, with and without `kvcheck dump datapath --follow` attached (alternating,
/// median of `runs`).
fn ebpf_overhead_bench(args: &Args) -> Result<String> {
    use std::io::{BufRead as _, BufReader};
    let bpffs = BpffsMount::new()?;
    let _maps = CiliumMaps::create(&bpffs, Layout::V1_15)?;
    let other = kvcheck_tests::maps::WriterMap::create(
        &bpffs.globals(),
        kvcheck_tests::maps::MapShape { name: "unrelated", map_type: kvcheck_tests::maps::BPF_MAP_TYPE_HASH, key_size: 4, value_size: 8, max_entries: 1024, flags: 0 },
    )?;
    const UPDATES: u32 = 1_000_000;
    let updates = || -> Result<Duration> {
        let t = Instant::now();
        for i in 0..UPDATES {
            other.update(&(i % 1024).to_ne_bytes(), &u64::from(i).to_ne_bytes())?;
        }
        Ok(t.elapsed())
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        without.push(updates()?);
        let mut follower = Command::new(kvcheck_bin())
            .args(["dump", "datapath", "--bpffs", bpffs.root_str(), "--follow", "--output", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut attached = String::new();
        if let Some(err) = follower.stderr.take() {
            for line in BufReader::new(err).lines() {
                let line = line?;
                if line.contains("following changes via") {
                    attached = line;
                    break;
                }
            }
        }
        if !attached.contains("eBPF change events") {
            let _ = follower.kill();
            bail!("the eBPF program did not attach: {attached}");
        }
        with.push(updates()?);
        let _ = follower.kill();
        let _ = follower.wait();
    }
    let (a, b) = (median(without), median(with));
    Ok(format!(
        "1,000,000 `BPF_MAP_UPDATE_ELEM` calls on an unrelated hash map, median of {} alternating runs\n\n| what | wall ms | ns per update |\n|---|---:|---:|\n| without kvcheck's program | {:.0} | {:.0} |\n| with `kvcheck dump datapath --follow` attached | {:.0} | {:.0} |\n\nOverhead: {:+.1} %\n",
        args.runs.max(1),
        a.as_secs_f64() * 1000.0,
        a.as_secs_f64() * 1e9 / f64::from(UPDATES),
        b.as_secs_f64() * 1000.0,
        b.as_secs_f64() * 1e9 / f64::from(UPDATES),
        (b.as_secs_f64() / a.as_secs_f64() - 1.0) * 100.0
    ))
}

fn etcd_version() -> String {
    Command::new(kvcheck_tests::etcd::etcd_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.replace("etcd Version: ", "")))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates BPF maps in a private bpffs and starts etcd: run it as root");
    }
    let mut doc = String::new();
    if args.only.as_deref().is_none_or(|o| o == "datapath") {
        let t = datapath_bench(&args)?;
        print!("{t}\n");
        doc.push_str(&format!("## Datapath read\n\n{t}\n"));
    }
    if args.only.as_deref().is_none_or(|o| o == "kvstore") {
        let t = kvstore_bench(&args)?;
        print!("{t}\n");
        doc.push_str(&format!("## Kvstore read\n\n{t}\n"));
    }
    if args.only.as_deref().is_none_or(|o| o == "ebpf") {
        let t = ebpf_overhead_bench(&args)?;
        print!("{t}\n");
        doc.push_str(&format!("## Change-event program overhead\n\n{t}\n"));
    }
    if args.only.as_deref().is_none_or(|o| o == "check") {
        let t = check_bench(&args)?;
        print!("{t}\n");
        doc.push_str(&format!("## Full check\n\n{t}\n"));
    }
    if let Some(path) = &args.write {
        let machine = format!(
            "kernel {}, {} cores, {}",
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            String::from_utf8_lossy(&Command::new("bpftool").arg("--version").output()?.stdout)
                .lines()
                .next()
                .unwrap_or_default()
        );
        let doc = format!("# kvcheck benchmarks\n\nWritten by `cargo xtask bench` (release build). Machine: {machine}.\n\n{doc}");
        std::fs::write(path, doc).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
