//! `kvcheck agent`: the DaemonSet mode. Lists and watches the kvstore, follows the datapath
//! (BPF change events or polling), re-checks when either side changes (debounced) and on a
//! jittered periodic resync, opens a finding once it persisted for the grace period and
//! resolves it when it disappears, logs node-health lines, and serves metrics and probes.

pub mod metrics;
pub mod tracker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::check::kinds::FindingKind;
use crate::check::run::{self, CheckOptions, Reading};
use crate::datapath::events::{ChangeFeed, FollowOptions};
use crate::kvstore::health::{self, ClusterHealth};
use crate::kvstore::watch::KvstoreWatcher;
use metrics::{KindLabel, MapLabel, Metrics, SourceLabel};
use tracker::{Tracker, Transition};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub check: CheckOptions,
    pub follow: FollowOptions,
    /// A finding is reported open only after persisting this long.
    pub grace: Duration,
    /// Full re-read of both sides (jittered ±10 %).
    pub resync: Duration,
    pub health_interval: Duration,
    pub listen: std::net::SocketAddr,
    /// Wait this long after a change before re-checking (changes come in bursts).
    pub debounce: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    Degraded,
    Failed,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Failed => "failed",
        }
    }
}

struct Live {
    watcher: KvstoreWatcher,
    feed: ChangeFeed,
    reading: Reading,
    /// The agent's datapath configuration (node_config.h + options), re-read on resync.
    config: crate::check::config::DatapathConfig,
}

struct State {
    opts: AgentOptions,
    metrics: Arc<Metrics>,
    tracker: Tracker,
    health: Option<ClusterHealth>,
    status: Status,
    last_check: Option<(chrono::DateTime<chrono::Utc>, Duration)>,
    last_error: Option<String>,
}

fn jitter(d: Duration) -> Duration {
    // ±10 % from the clock's sub-second noise: enough to spread a DaemonSet's resyncs.
    let nanos = u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0));
    let frac = (nanos % 2001) as f64 / 10_000.0 - 0.1;
    d.mul_f64(1.0 + frac)
}

impl State {
    fn log_transition(&self, t: &Transition) {
        match t {
            Transition::Opened(f) => tracing::warn!(
                event = "finding-opened", kind = f.kind.name(), subject = %f.subject, severity = ?f.severity, detail = %f.message,
                evidence = %serde_json::json!({"datapath": f.datapath, "kvstore": f.kvstore}), "finding opened"
            ),
            Transition::Resolved(f) => tracing::info!(event = "finding-resolved", kind = f.kind.name(), subject = %f.subject, "finding resolved"),
        }
    }

    fn compute_status(&self) -> Status {
        if self.last_error.is_some() || self.health.as_ref().is_some_and(|h| h.connected == 0) {
            return Status::Failed;
        }
        let partial = self.health.as_ref().is_some_and(|h| h.connected < h.total);
        if partial || self.tracker.open().next().is_some() { Status::Degraded } else { Status::Ok }
    }

    fn health_line(&self, live: Option<&Live>) {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for f in self.tracker.open() {
            *counts.entry(f.kind.name()).or_default() += 1;
        }
        let etcd = self.health.as_ref().map_or_else(|| "etcd: not probed yet".to_owned(), ClusterHealth::status_line);
        let (maps, layout) = live.map_or((String::new(), String::new()), |l| {
            let dp = &l.reading.datapath;
            let mut m = vec![format!("{}={:.3}", dp.ipcache.meta.name, dp.ipcache.fill_ratio), format!("{}={:.3}", dp.endpoints.meta.name, dp.endpoints.fill_ratio)];
            if let Some(t) = &dp.tunnel {
                m.push(format!("{}={:.3}", t.meta.name, t.fill_ratio));
            }
            (m.join(","), dp.layout.summary())
        });
        let (last, took) = self.last_check.map_or((String::new(), 0), |(t, d)| (t.to_rfc3339(), d.as_millis()));
        tracing::info!(
            event = "node-health", status = self.status.name(), node = %self.opts.check.node_name, open_findings = %serde_json::to_string(&counts).unwrap_or_default(),
            etcd = %etcd, map_fill = %maps, last_check = %last, last_check_ms = took as u64, layout = %layout,
            error = %self.last_error.clone().unwrap_or_default(), "node health"
        );
    }

    fn set_status(&mut self, live: Option<&Live>) {
        let new = self.compute_status();
        self.metrics.set_failed(new == Status::Failed);
        if new != self.status {
            self.status = new;
            self.health_line(live);
        }
    }

    fn record_findings(&mut self, findings: Vec<crate::check::diff::Finding>, started: Instant) {
        for t in self.tracker.observe(findings, Instant::now(), self.opts.grace) {
            self.log_transition(&t);
        }
        self.publish_findings();
        let took = started.elapsed();
        self.metrics.check_duration.observe(took.as_secs_f64());
        let now = chrono::Utc::now();
        self.metrics.last_check.set(now.timestamp_millis() as f64 / 1000.0);
        self.last_check = Some((now, took));
    }

    fn publish_findings(&self) {
        let mut counts: BTreeMap<FindingKind, i64> = FindingKind::ALL.iter().map(|k| (*k, 0)).collect();
        for f in self.tracker.open() {
            *counts.entry(f.kind).or_default() += 1;
        }
        for (k, n) in counts {
            self.metrics.findings.get_or_create(&KindLabel { kind: k.name().to_owned() }).set(n);
        }
    }
}

async fn start_live(opts: &AgentOptions) -> anyhow::Result<Live> {
    let (etcd, health) = health::connect_healthy(&opts.check.etcd, opts.check.etcd_timeout).await?;
    let watcher = KvstoreWatcher::start(opts.check.etcd.clone(), etcd, opts.check.list.clone()).await?;
    let (datapath, host) = run::read_datapath(&opts.check.datapath).await?;
    let feed = ChangeFeed::open(&opts.check.datapath, datapath.layout.layout, &opts.follow)?;
    let now = chrono::Utc::now();
    let reading = Reading { kvstore: watcher.mirror().snapshot(), datapath, host, health, datapath_read_at: now, kvstore_read_at: now };
    let config = run::node_config(&opts.check)?;
    Ok(Live { watcher, feed, reading, config })
}

fn evaluate(state: &mut State, live: &Live) {
    let started = Instant::now();
    let ctx = run::context(&state.opts.check, live.config.clone(), &live.reading);
    let (findings, _) = run::evaluate(&ctx, &live.reading);
    let dp = &live.reading.datapath;
    for (name, ratio) in [(&dp.ipcache.meta.name, dp.ipcache.fill_ratio), (&dp.endpoints.meta.name, dp.endpoints.fill_ratio)] {
        state.metrics.map_fill_ratio.get_or_create(&MapLabel { map: name.clone() }).set(ratio);
    }
    state.record_findings(findings, started);
    // A check allocates and frees a lot (decoded snapshots, findings): give the freed pages back
    // so an idle agent's RSS is what it holds, not its peak.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let server = metrics::serve(opts.listen, metrics.clone()).await?;
    tracing::info!(event = "agent-start", listen = %opts.listen, node = %opts.check.node_name, grace = ?opts.grace, resync = ?opts.resync, "kvcheck agent started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut state = State { opts: opts.clone(), metrics: metrics.clone(), tracker: Tracker::default(), health: None, status: Status::Ok, last_check: None, last_error: None };
    let mut live: Option<Live> = None;
    let mut dirty_since: Option<Instant> = None;
    let mut next_resync = Instant::now() + jitter(opts.resync);
    let mut next_health = Instant::now();
    let mut retry_at = Instant::now();
    metrics.etcd_endpoints.set(opts.check.etcd.endpoints.len() as i64);
    loop {
        // (Re)build the live sources when missing: etcd down at start, Cilium restarting...
        if live.is_none() && Instant::now() >= retry_at {
            match start_live(&opts).await {
                Ok(l) => {
                    state.health = Some(l.reading.health.clone());
                    state.last_error = None;
                    evaluate(&mut state, &l);
                    metrics.set_ready(true);
                    if let Some(r) = &l.feed.fallback_reason {
                        tracing::warn!(event = "change-events-fallback", reason = %r, "BPF change events unavailable; polling the maps");
                    }
                    live = Some(l);
                }
                Err(e) => {
                    state.last_error = Some(format!("{e:#}"));
                    retry_at = Instant::now() + Duration::from_secs(2);
                }
            }
            state.set_status(live.as_ref());
        }
        let now = Instant::now();
        let mut wake = [next_resync, next_health, retry_at.max(now + Duration::from_millis(100))].into_iter().min().unwrap_or(now);
        if let Some(d) = dirty_since {
            wake = wake.min(d + opts.debounce);
        }
        if let Some(due) = state.tracker.next_due(opts.grace) {
            wake = wake.min(due);
        }
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake.max(now)));
        tokio::pin!(sleep);
        let mut lost_live = false;
        if let Some(l) = live.as_mut() {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                batch = l.watcher.next() => match batch {
                    Ok(b) => {
                        metrics.change_events.get_or_create(&SourceLabel { source: "kvstore".into() }).inc_by(b.changes.len() as u64);
                        if b.relisted {
                            tracing::info!(event = "kvstore-relist", revision = b.revision, changes = b.changes.len(), "watch revision compacted: relisted");
                        }
                        l.reading.kvstore = l.watcher.mirror().snapshot();
                        l.reading.kvstore_read_at = chrono::Utc::now();
                        dirty_since.get_or_insert(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(event = "kvstore-watch-error", error = %e, "kvstore watch interrupted; resuming");
                        state.health = Some(health::cluster_health(&opts.check.etcd, opts.check.etcd_timeout).await);
                        if let Some(h) = &state.health {
                            metrics.etcd_connected.set(h.connected as i64);
                        }
                        state.set_status(live.as_ref());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                changes = l.feed.next() => match changes {
                    Ok(c) => {
                        metrics.change_events.get_or_create(&SourceLabel { source: l.feed.source_name().into() }).inc_by(c.len() as u64);
                        dirty_since.get_or_insert(Instant::now());
                    }
                    Err(e) => {
                        // Cilium re-creating its maps: start over with fresh handles.
                        tracing::warn!(event = "datapath-error", error = %e, "datapath read failed; re-opening the maps");
                        state.last_error = Some(e.to_string());
                        lost_live = true;
                    }
                },
                () = &mut sleep => {}
            }
        } else {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                () = &mut sleep => {}
            }
        }
        if lost_live {
            live = None;
            retry_at = Instant::now();
            continue;
        }
        let now = Instant::now();
        if let Some(l) = live.as_mut() {
            let resync_due = now >= next_resync;
            if resync_due || dirty_since.is_some_and(|d| now >= d + opts.debounce) {
                dirty_since = None;
                match run::read_datapath(&opts.check.datapath).await {
                    Ok((dp, host)) => {
                        l.reading.datapath = dp;
                        l.reading.host = host;
                        l.reading.datapath_read_at = chrono::Utc::now();
                        state.last_error = None;
                    }
                    Err(e) => {
                        state.last_error = Some(e.to_string());
                        live = None;
                        retry_at = now;
                        state.set_status(None);
                        continue;
                    }
                }
                if resync_due {
                    // A fresh list as well: the watch is the fast path, the resync the safety net.
                    next_resync = now + jitter(opts.resync);
                    match crate::kvstore::reader::read_snapshot(l.watcher.etcd(), &opts.check.list).await {
                        Ok(snap) => l.reading.kvstore = snap,
                        Err(e) => tracing::warn!(event = "resync-error", error = %e, "periodic kvstore relist failed"),
                    }
                    match run::node_config(&opts.check) {
                        Ok(c) => l.config = c,
                        Err(e) => tracing::warn!(event = "resync-error", error = %e, "re-reading node_config.h failed"),
                    }
                }
                evaluate(&mut state, l);
            }
        }
        for t in state.tracker.promote(Instant::now(), opts.grace) {
            state.log_transition(&t);
            state.publish_findings();
        }
        if Instant::now() >= next_health {
            next_health = Instant::now() + opts.health_interval;
            let h = health::cluster_health(&opts.check.etcd, opts.check.etcd_timeout).await;
            metrics.etcd_connected.set(h.connected as i64);
            if let Some(l) = live.as_mut() {
                l.reading.health = h.clone();
            }
            state.health = Some(h);
            state.status = state.compute_status();
            metrics.set_failed(state.status == Status::Failed);
            state.health_line(live.as_ref());
        } else {
            state.set_status(live.as_ref());
        }
    }
    tracing::info!(event = "agent-stop", "kvcheck agent stopping");
    server.abort();
    Ok(())
}

