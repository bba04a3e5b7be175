//! Timing, process and memory helpers every section uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use kvcheck::datapath::sys;


/// The n-th synthetic ipcache prefix: 90% IPv4 /32 pods, 10% IPv6 /128.
pub(crate) fn prefix(n: u32) -> IpNet {
    if n % 10 == 9 {
        IpNet::from(IpAddr::V6(Ipv6Addr::from(0xfd00_0010_0244_0000_0000_0000_0000_0000u128 | u128::from(n))))
    } else {
        IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 | n)))
    }
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `a` and `b` timed in turns, `runs` of each: the medians of each. A ratio of two reads of the
/// same etcd compares them under the same conditions (etcd's memory and GC after the reads
/// before, the page cache), which two series one after the other do not.
pub(crate) fn time_in_turns(runs: u32, mut a: impl FnMut() -> Result<()>, mut b: impl FnMut() -> Result<()>) -> Result<(Duration, Duration)> {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        a()?;
        ta.push(t.elapsed());
        let t = Instant::now();
        b()?;
        tb.push(t.elapsed());
    }
    Ok((median(ta), median(tb)))
}

pub(crate) fn time_runs(runs: u32, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// The floor: batch lookups into one buffer, nothing decoded (`ks`/`vs`: key and value sizes).
pub(crate) fn raw_batch_loop(path: &std::path::Path, ks: usize, vs: usize) -> Result<usize> {
    let fd = sys::obj_get_readonly(path)?;
    use std::os::fd::AsFd;
    let chunk = 8192usize;
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

pub(crate) fn run_quiet(cmd: &mut Command) -> Result<()> {
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
pub(crate) fn run_measured(cmd: &mut Command) -> Result<(Duration, i64)> {
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
pub(crate) fn measure(runs: u32, mut make: impl FnMut() -> Command) -> Result<(Duration, i64)> {
    let mut times = Vec::new();
    let mut rss = 0;
    for _ in 0..runs {
        let (t, r) = run_measured(&mut make())?;
        times.push(t);
        rss = rss.max(r);
    }
    Ok((median(times), rss))
}

pub(crate) fn v4(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Waits for an agent's /readyz; kills it if it does not become ready in time.
pub(crate) fn wait_ready(mut agent: Child, port: u16, limit: Duration) -> Result<Child> {
    let deadline = Instant::now() + limit;
    loop {
        let ok = std::net::TcpStream::connect(("127.0.0.1", port)).ok().and_then(|mut s| {
            use std::io::{Read as _, Write as _};
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            Some(r.contains(" 200 "))
        });
        if ok == Some(true) {
            return Ok(agent);
        }
        if Instant::now() > deadline || agent.try_wait()?.is_some() {
            let _ = agent.kill();
            let _ = agent.wait();
            bail!("the agent did not become ready within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU time (user + system) of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let ticks = || -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    ticks().unwrap_or(0) as f64 / 100.0 // USER_HZ
}

pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    let read = || -> Option<u64> { std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok() };
    read().unwrap_or(0)
}

/// The DaemonSet's memory limit (deploy/kvcheck.yaml), in KiB.
pub(crate) fn shipped_memory_limit_kib() -> Result<u64> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kvcheck.yaml");
    let yaml = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let ds = yaml.split("\n---").filter_map(|d| serde_saphyr::from_str::<serde_json::Value>(d).ok()).find(|d| d["kind"] == "DaemonSet").context("no DaemonSet in deploy/kvcheck.yaml")?;
    let limit = ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"].as_str().context("no memory limit")?.to_owned();
    let mib: u64 = limit.strip_suffix("Mi").and_then(|n| n.parse().ok()).with_context(|| format!("memory limit {limit:?} is not in Mi"))?;
    Ok(mib * 1024)
}

/// Fails the bench when a measured peak would have been OOM-killed under the shipped limit.
pub(crate) fn within_shipped_limit(what: &str, peak_kib: u64) -> Result<()> {
    let limit = shipped_memory_limit_kib()?;
    if peak_kib > limit {
        bail!("{what} peaked at {:.1} MiB, above deploy/kvcheck.yaml's memory limit of {} MiB: raise the limit (and README's sizing table) or bring the peak down", peak_kib as f64 / 1024.0, limit / 1024);
    }
    Ok(())
}

pub(crate) fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn etcd_version() -> String {
    etcd_version_of(&kvcheck_tests::etcd::etcd_binary())
}

pub(crate) fn etcd_version_of(binary: &str) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.replace("etcd Version: ", "")))
        .unwrap_or_default()
}

/// The kvstore floor: one raw range of `cilium/state/` through etcd-client, in-process, nothing
/// decoded; the median of `runs`, and the keys it returned.
pub(crate) fn raw_kvstore_range(runs: u32, endpoints: Vec<String>) -> Result<(Duration, usize)> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let settings = kvcheck::kvstore::config::EtcdSettings { endpoints, ..Default::default() };
    let mut keys = 0;
    let took = time_runs(runs, || {
        keys = raw_kvstore_range_once(&rt, &settings)?;
        Ok(())
    })?;
    Ok((took, keys))
}

/// One read of the kvstore floor (see [`raw_kvstore_range`]): the keys it returned.
pub(crate) fn raw_kvstore_range_once(rt: &tokio::runtime::Runtime, settings: &kvcheck::kvstore::config::EtcdSettings) -> Result<usize> {
    rt.block_on(async {
        let client = kvcheck::kvstore::client::Etcd::connect(settings, Duration::from_secs(30)).await?;
        let mut kv = client.client.kv_client().max_decoding_message_size(1 << 30);
        let resp = kv.get("cilium/state/", Some(etcd_client::GetOptions::new().with_prefix().with_serializable())).await?;
        anyhow::Ok(resp.kvs().len())
    })
}
