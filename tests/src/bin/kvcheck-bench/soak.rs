//! Soak: the churn of `kvcheck_tests::churn` for a long time (an hour by default) against an
//! eBPF agent and a polling agent. Nothing may be reported (0 false findings), and RSS and open
//! file descriptors must stay flat: each is sampled every `--soak-sample` seconds and its
//! least-squares slope per hour reported, after the first tenth of the run (start-up and the
//! first relist are not a leak).

use std::time::{Duration, Instant};

use anyhow::Result;
use kvcheck::model::version::Layout;

use crate::common::*;
use crate::Args;

/// One agent's samples: seconds since the start, RSS KiB, open fds.
#[derive(Default)]
struct Samples(Vec<(f64, f64, f64)>);

impl Samples {
    /// Least-squares slope per hour of the field `f` over the samples after `skip_s` seconds.
    fn slope_per_hour(&self, skip_s: f64, f: impl Fn(&(f64, f64, f64)) -> f64) -> f64 {
        let pts: Vec<(f64, f64)> = self.0.iter().filter(|s| s.0 >= skip_s).map(|s| (s.0, f(s))).collect();
        let n = pts.len() as f64;
        if n < 2.0 {
            return f64::NAN;
        }
        let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
        let (sxy, sxx) = pts.iter().fold((0.0, 0.0), |(a, b), p| (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx) * (p.0 - mx)));
        sxy / sxx * 3600.0
    }

    fn range(&self, skip_s: f64, f: impl Fn(&(f64, f64, f64)) -> f64) -> (f64, f64) {
        self.0.iter().filter(|s| s.0 >= skip_s).map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
    }
}

fn open_fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(f64::NAN, |d| d.count() as f64)
}

pub(crate) fn soak_bench(args: &Args, figs: &mut crate::Figures) -> Result<String> {
    use kvcheck_tests::agent::Agent;
    use kvcheck_tests::churn::{Churn, ChurnConfig};
    let node = kvcheck_tests::simcluster::consistent_node(kvcheck_tests::simcluster::NodeSpec::new(Layout::V1_15, false))?;
    let agents = [("eBPF events", Agent::start_with(&node, "3s", &[])), ("polling, 500 ms", Agent::start_with(&node, "3s", &["--no-ebpf", "--poll-interval", "500ms"]))];
    let pids: Vec<u32> = agents.iter().map(|(_, a)| a.child.id()).collect();
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let duration = Duration::from_secs(args.soak_seconds);
    let every = Duration::from_secs(args.soak_sample.max(1));
    let start = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (stats, samples) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples: Vec<Samples> = pids.iter().map(|_| Samples::default()).collect();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = start.elapsed().as_secs_f64();
                for (i, pid) in pids.iter().enumerate() {
                    samples[i].0.push((t, status_kib(*pid, "VmRSS:") as f64, open_fds(*pid)));
                }
                let next = start + every.mul_f64((t / every.as_secs_f64()).floor() + 1.0);
                while Instant::now() < next && !done.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            samples
        });
        let stats = Churn::new(&node, ChurnConfig { duration, ..ChurnConfig::default() }).and_then(Churn::run);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (stats, sampler.join().unwrap_or_default())
    });
    let stats = stats?;
    let elapsed = stats.elapsed.as_secs_f64();
    let rate = stats.map_rate() + stats.kvstore_rate();
    std::thread::sleep(Duration::from_secs(4));
    let skip = elapsed / 10.0;
    let mut t = format!(
        "Run on {} on kernel {} (`--soak-seconds N` or `--only soak`; a run without it keeps this section). The churn of \"Trust under churn\" for {:.1} min: **{rate:.0} changes/s** ({:.1} map + {:.1} kvstore; {} map and {} kvstore changes), two agents with `--grace 3s`, RSS and open fds sampled every {} s; slopes are least-squares over the samples after the first tenth of the run.\n\n| agent | false findings opened | CPU per 100 changes/s | RSS (min-max) | RSS slope | open fds (min-max) | fd slope |\n|---|---:|---:|---:|---:|---:|---:|\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        elapsed / 60.0,
        stats.map_rate(), stats.kvstore_rate(), stats.map_changes, stats.kvstore_changes, every.as_secs()
    );
    let mut false_findings = 0;
    // What a failing soak opened: per kind, with the first subjects (enough to start from).
    let mut opened_by_kind = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (i, (name, agent)) in agents.iter().enumerate() {
        let cpu = (cpu_seconds(pids[i]) - cpu0[i]) / elapsed * 100.0;
        let none = Samples::default();
        let samples = samples.get(i).unwrap_or(&none);
        let (rss_lo, rss_hi) = samples.range(skip, |s| s.1 / 1024.0);
        let (fd_lo, fd_hi) = samples.range(skip, |s| s.2);
        let opened = agent.opened();
        for (kind, subject) in &opened {
            opened_by_kind.entry(format!("{name}: {kind}")).or_default().push(subject.clone());
        }
        let opened = opened.len();
        false_findings += opened;
        t.push_str(&format!(
            "| {name} | {opened} | {:.2} % of a core | {rss_lo:.1}-{rss_hi:.1} MiB | {:+.2} MiB/h | {fd_lo:.0}-{fd_hi:.0} | {:+.1}/h |\n",
            cpu * 100.0 / rate,
            samples.slope_per_hour(skip, |s| s.1 / 1024.0),
            samples.slope_per_hour(skip, |s| s.2),
        ));
    }
    // A failing soak is written like a passing one (what it opened, by kind, with the first
    // subjects); the run fails after BENCHMARKS.md is written.
    figs.insert("soak_false_findings", false_findings as f64);
    if false_findings > 0 {
        let kinds: Vec<String> = opened_by_kind.iter().map(|(k, subjects)| format!("{k} x{} ({}{})", subjects.len(), subjects.iter().take(5).cloned().collect::<Vec<_>>().join(", "), if subjects.len() > 5 { ", ..." } else { "" })).collect();
        t.push_str(&format!("\n**The soak failed**: false findings opened: {}.\n", kinds.join("; ")));
    }
    Ok(t)
}
