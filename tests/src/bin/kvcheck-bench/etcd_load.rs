//! Many agents against one etcd: what they ask of it, directly and through the gRPC proxy, and their reconnects after an outage.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use kvcheck_tests::simdata;

use crate::common::*;
use crate::node::BenchNode;
use crate::Args;

/// Many agents against one etcd: what each costs etcd in requests, watch streams and CPU.
/// Every agent checks the same consistent node (its datapath is shared; to etcd, an agent is
/// an agent), so the agents do the work of a healthy cluster, not of one full of findings.
/// What many agents cost etcd: direct, and through one `etcd grpc-proxy` (which coalesces
/// their watches into one upstream watch), side by side.
pub(crate) fn etcd_load_bench(args: &Args) -> Result<String> {
    let shape = args.load_shape;
    let mut node = BenchNode::build(shape, args.ipcache_entries / 10)?;
    let keys = simdata::cluster_pairs(shape).len();
    let direct = load_run(&node, args, None)?;
    let outage = outage_run(&mut node, args)?;
    let proxy = kvcheck_tests::etcd::GrpcProxy::start(&node.etcd)?;
    let via = load_run(&node, args, Some(&proxy))?;
    let resync = format!("{}s", args.load_resync);
    let health = format!("{}s", args.load_health);
    let n = f64::from(args.agents);
    let mut t = format!(
        "{} agents (`--resync {resync} --health-interval {health}`, polling the maps), each checking a consistent node with a {}-entry ipcache, against one etcd {} member on loopback holding {keys} keys ({} nodes, {} IP entries, {} identities); kvstore puts (existing pod keys rewritten) at 10/s during a {} s window. Run twice: the agents connected to etcd directly, and through one `etcd grpc-proxy` in front of it.\n\n",
        args.agents, node.total_ipcache, etcd_version(), shape.nodes, shape.ips, shape.identities, args.load_seconds
    );
    t.push_str("| | direct | through one gRPC proxy |\n|---|---:|---:|\n");
    let row = |t: &mut String, what: &str, f: &dyn Fn(&LoadFigures) -> String| t.push_str(&format!("| {what} | {} | {} |\n", f(&direct), f(&via)));
    row(&mut t, "start-up: all agents listed and checked (s)", &|f| format!("{:.1}", f.startup_s));
    row(&mut t, "start-up requests etcd served, per agent", &|f| format!("{:.1}", f.startup_requests / n));
    row(&mut t, "steady requests etcd served per minute, per agent", &|f| format!("{:.2}", f.requests_per_min / n));
    row(&mut t, "watch streams open on etcd", &|f| format!("{:.0}", f.watch_streams));
    row(&mut t, "watchers on etcd", &|f| format!("{:.0}", f.watchers));
    row(&mut t, "etcd CPU at 10 changes/s (% of a core)", &|f| format!("{:.1}", f.etcd_cpu));
    row(&mut t, "proxy CPU (% of a core)", &|f| f.proxy_cpu.map_or_else(|| "-".to_owned(), |c| format!("{c:.1}")));
    row(&mut t, "all agents' CPU (% of a core)", &|f| format!("{:.1}", f.agents_cpu));
    row(&mut t, "change → `finding-opened` on one agent, grace 0 (ms)", &|f| format!("{:.0}", f.latency_ms));
    t.push_str(&format!(
        "\nWatch streams on etcd: {:.0} direct ({:.2} per agent), {:.0} through the proxy; etcd's CPU for the same fan-out: {:.1} % direct, {:.1} % through the proxy (plus {:.1} % in the proxy).\n",
        direct.watch_streams,
        direct.watch_streams / n,
        via.watch_streams,
        direct.etcd_cpu,
        via.etcd_cpu,
        via.proxy_cpu.unwrap_or(0.0)
    ));
    t.push_str(&outage);
    Ok(t)
}

/// How long etcd is down in the outage run.
pub(crate) const OUTAGE: Duration = Duration::from_secs(60);

/// `args.agents` agents directly on etcd; etcd killed for [`OUTAGE`] and restarted: how their
/// watch streams come back (etcd's own gauge of open watch streams, sampled every 100 ms). With
/// jittered backoff (250 ms doubling to 10 s, ±jitter) they spread instead of arriving at once.
pub(crate) fn outage_run(node: &mut BenchNode, args: &Args) -> Result<String> {
    let endpoints = node.etcd.endpoints_arg();
    let mut ready = Vec::new();
    for _ in 0..args.agents {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = node
            .command_via("agent", &endpoints)
            .args(["--no-ebpf", "--poll-interval", "60s", "--resync", &format!("{}s", args.load_resync), "--health-interval", &format!("{}s", args.load_health)])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--etcd-timeout", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        ready.push(wait_ready(child, port, Duration::from_secs(300))?);
    }
    let metrics_port = node.etcd.members[0].metrics_port;
    let before = EtcdMetrics::scrape(metrics_port)?.watch_streams;
    node.etcd.kill(0);
    std::thread::sleep(OUTAGE);
    node.etcd.restart(0)?;
    let t0 = Instant::now();
    let mut reached: Vec<(f64, Option<Duration>)> = [0.1, 0.5, 0.9, 1.0].iter().map(|f| (*f, None)).collect();
    while t0.elapsed() < Duration::from_secs(120) && reached.iter().any(|(_, t)| t.is_none()) {
        if let Ok(m) = EtcdMetrics::scrape(metrics_port) {
            for (f, t) in reached.iter_mut().filter(|(_, t)| t.is_none()) {
                if m.watch_streams >= (before * *f).ceil() {
                    *t = Some(t0.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for c in ready {
        stop(c);
    }
    let show = |t: Option<Duration>| t.map_or_else(|| "not within 120 s".to_owned(), |t| format!("{:.1} s", t.as_secs_f64()));
    let cells: Vec<String> = reached.iter().map(|(f, t)| format!("{:.0} %: {}", f * 100.0, show(*t))).collect();
    Ok(format!(
        "\n**Outage**: {} agents on etcd directly, etcd killed for {} s and restarted; watch streams open on etcd before: {before:.0}. After the restart they came back (share of that count, time since the restart): {}. Each agent's watch resumes with jittered exponential backoff (250 ms doubling to 10 s) and its start-overs too (1 s to 30 s), so the DaemonSet's reconnects spread over the last backoff window instead of landing on the fresh etcd in the same instant.\n",
        args.agents,
        OUTAGE.as_secs(),
        cells.join(", ")
    ))
}

/// One etcd-load run's figures.
pub(crate) struct LoadFigures {
    pub(crate) startup_s: f64,
    pub(crate) startup_requests: f64,
    pub(crate) requests_per_min: f64,
    pub(crate) watch_streams: f64,
    pub(crate) watchers: f64,
    pub(crate) etcd_cpu: f64,
    pub(crate) proxy_cpu: Option<f64>,
    pub(crate) agents_cpu: f64,
    pub(crate) latency_ms: f64,
}

/// `args.agents` agents on `node` (through `proxy` when given) under the 10 writes/s trickle.
pub(crate) fn load_run(node: &BenchNode, args: &Args, proxy: Option<&kvcheck_tests::etcd::GrpcProxy>) -> Result<LoadFigures> {
    use std::io::BufRead as _;
    let etcd = &node.etcd;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let member = &etcd.members[0];
    let etcd_pid = member.pid().context("etcd pid")?;
    let metrics_port = member.metrics_port;
    let endpoints = proxy.map_or_else(|| etcd.endpoints_arg(), |p| p.url.clone());
    let resync = format!("{}s", args.load_resync);
    let health = format!("{}s", args.load_health);

    let before_start = EtcdMetrics::scrape(metrics_port)?;
    let t_start = Instant::now();
    let mut agents = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    for i in 0..args.agents {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // The first agent's log tells when the injected drift opened.
        let mut child = node
            .command_via("agent", &endpoints)
            .args(["--no-ebpf", "--poll-interval", "60s", "--resync", &resync, "--health-interval", &health, "--grace", "0s"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(if i == 0 { Stdio::piped() } else { Stdio::null() })
            .spawn()?;
        if let Some(err) = child.stderr.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    if line.contains("finding-opened") && tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
        }
        agents.push((child, port));
    }
    let mut ready = Vec::new();
    for (child, port) in agents {
        ready.push(wait_ready(child, port, Duration::from_secs(300))?);
    }
    let startup = t_start.elapsed();
    let after_start = EtcdMetrics::scrape(metrics_port)?;

    // Steady state: a trickle of kvstore writes (remote pods' keys rewritten, as their agents
    // do on endpoint regeneration) fanned out to every watch, each re-checked by every agent.
    let window = Duration::from_secs(args.load_seconds);
    let proxy_pid = proxy.and_then(kvcheck_tests::etcd::GrpcProxy::pid);
    let (c0, a0, p0) = (cpu_seconds(etcd_pid), ready.iter().map(|c| cpu_seconds(c.id())).sum::<f64>(), proxy_pid.map(cpu_seconds));
    let client = rt.block_on(etcd_client::Client::connect(etcd.endpoints(), None))?;
    let t0 = Instant::now();
    let mut writes = 0u32;
    let pairs: Vec<(String, String)> = simdata::cluster_pairs(args.load_shape).into_iter().filter(|(k, _)| k.starts_with("cilium/state/ip/v1/")).collect();
    while t0.elapsed() < window {
        let (k, v) = pairs[writes as usize % pairs.len()].clone();
        let mut kv = client.kv_client();
        rt.block_on(kv.put(k, v, None))?;
        writes += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let etcd_cpu = (cpu_seconds(etcd_pid) - c0) / elapsed * 100.0;
    let agents_cpu = (ready.iter().map(|c| cpu_seconds(c.id())).sum::<f64>() - a0) / elapsed * 100.0;
    let proxy_cpu = proxy_pid.zip(p0).map(|(pid, p0)| (cpu_seconds(pid) - p0) / elapsed * 100.0);
    let after = EtcdMetrics::scrape(metrics_port)?;

    // One real drift: a remote pod nobody's ipcache has, seen through the watch (or the proxy).
    let key = "cilium/state/ip/v1/default/10.255.255.1";
    let value = r#"{"IP":"10.255.255.1","Mask":null,"HostIP":"192.168.0.2","ID":1000,"Key":0}"#;
    while rx.try_recv().is_ok() {}
    let t_drift = Instant::now();
    rt.block_on(client.kv_client().put(key, value, None))?;
    let latency_ms = loop {
        let (at, line) = rx.recv_timeout(Duration::from_secs(30)).context("the drift was not reported within 30 s")?;
        if line.contains("10.255.255.1/32") {
            break (at - t_drift).as_secs_f64() * 1000.0;
        }
    };
    rt.block_on(client.kv_client().delete(key, None))?;
    for c in ready {
        stop(c);
    }
    let n_min = elapsed / 60.0;
    let reads = |m: &EtcdMetrics| m.by_method.iter().filter(|(k, _)| !WRITES.contains(&k.as_str())).map(|(_, v)| v).sum::<f64>();
    Ok(LoadFigures {
        startup_s: startup.as_secs_f64(),
        startup_requests: after_start.total() - before_start.total(),
        requests_per_min: (reads(&after) - reads(&after_start)) / n_min,
        watch_streams: after.watch_streams,
        watchers: after.watchers,
        etcd_cpu,
        proxy_cpu,
        agents_cpu,
        latency_ms,
    })
}

pub(crate) const WRITES: [&str; 4] = ["Put", "Txn", "DeleteRange", "Compact"];

/// The etcd server's own counters (its /metrics endpoint).
pub(crate) struct EtcdMetrics {
    /// `grpc_server_started_total` by method (unary calls and streams opened).
    pub(crate) by_method: std::collections::BTreeMap<String, f64>,
    pub(crate) watch_streams: f64,
    pub(crate) watchers: f64,
}

impl EtcdMetrics {
    fn scrape(port: u16) -> Result<EtcdMetrics> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let mut m = EtcdMetrics { by_method: Default::default(), watch_streams: 0.0, watchers: 0.0 };
        for line in body.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if let Some(labels) = name.strip_prefix("grpc_server_started_total{") {
                let method = labels.split(',').find_map(|l| l.strip_prefix("grpc_method=")).unwrap_or_default().trim_matches('"');
                *m.by_method.entry(method.to_owned()).or_default() += value;
            } else if name == "etcd_debugging_mvcc_watch_stream_total" {
                m.watch_streams = value;
            } else if name == "etcd_debugging_mvcc_watcher_total" {
                m.watchers = value;
            }
        }
        anyhow::ensure!(!m.by_method.is_empty(), "etcd's /metrics has no grpc_server_started_total");
        Ok(m)
    }

    fn total(&self) -> f64 {
        self.by_method.values().sum()
    }
}
