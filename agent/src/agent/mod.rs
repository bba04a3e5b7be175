//! `kvcheck agent`: the DaemonSet mode. Lists and watches the kvstore, follows the datapath
//! (BPF change events or polling), applies each change to its copy of both sides and re-checks
//! the subjects the changes touched (debounced; see `check::live`), re-reads everything on a
//! jittered periodic resync, opens a finding once it persisted for the grace period and
//! resolves it when it disappears, logs node-health lines, and serves metrics and probes.

pub mod metrics;
pub mod tracker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::check::kinds::FindingKind;
use crate::check::live::{LiveCheck, Recheck, Scope};
use crate::check::run::{self, CheckOptions, Reading};
use crate::cilium::state::AgentConfig;
use crate::cilium::{CiliumAgent, CiliumAgentState};
use crate::datapath::events::{ChangeFeed, FollowOptions};
use crate::datapath::inuse::LiveMaps;
use crate::kvstore::health::{self, ClusterHealth};
use crate::kvstore::history;
use crate::kvstore::reader::KvstoreSnapshot;
use crate::k8s::watch::{KubeWatcher, ObjectChange};
use crate::kvstore::watch::KvstoreWatcher;
use crate::clustermesh::watch::MeshWatch;
use crate::model::source::StateSource;
use metrics::{KindLabel, MapLabel, Metrics, ResourceLabel, SourceLabel, StateSourceLabel};
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
    /// A quiet kvstore watch is asked for its progress after this long (stall detection).
    pub watch_progress: Duration,
    pub listen: std::net::SocketAddr,
    /// Certificate chain and key (PEM) to serve the endpoints over TLS.
    pub listen_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
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
    /// The kvstore's watch (none in CRD mode).
    watcher: Option<KvstoreWatcher>,
    /// The Kubernetes watch: CRD mode's nodes and pod IPs, CiliumIdentities.
    kube: Option<KubeWatcher>,
    /// ClusterMesh: one watch per remote cluster.
    mesh: MeshWatch,
    feed: ChangeFeed,
    /// Maps followed by id because the datapath uses them instead of the pins.
    read_live: BTreeMap<String, u32>,
    /// Both sides as last seen, kept current by the changes; node_config.h re-read on resync.
    check: LiveCheck,
}

struct State {
    opts: AgentOptions,
    metrics: Arc<Metrics>,
    tracker: Tracker,
    health: Option<ClusterHealth>,
    status: Status,
    /// The last full check: when and how long it took.
    last_check: Option<(chrono::DateTime<chrono::Utc>, Duration)>,
    last_error: Option<String>,
    /// The Kubernetes watch's last error, until a batch of events comes without one: the
    /// watcher backs off and resumes by itself, meanwhile its objects may be stale.
    kube_error: Option<String>,
    /// The polling fallback is logged once per process, not at every re-open.
    fallback_logged: bool,
    /// So is a skipped check of the maps the datapath uses.
    live_maps_logged: bool,
    /// The Cilium agent as last observed.
    cilium: Option<CiliumAgentState>,
    /// Findings are judged only while the Cilium agent is ready (or cannot be asked).
    judging: bool,
    /// Nodes and pod IPs come from Kubernetes objects (no etcd to probe).
    crd_mode: bool,
    /// ClusterMesh remotes that cannot be read (their entries are not judged): degraded.
    remotes_unreachable: Vec<String>,
}

fn jitter(d: Duration) -> Duration {
    // ±10 % from the clock's sub-second noise: enough to spread a DaemonSet's resyncs.
    let nanos = u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0));
    let frac = (nanos % 2001) as f64 / 10_000.0 - 0.1;
    d.mul_f64(1.0 + frac)
}

impl State {
    /// The Cilium agent's own configuration, when its API answered.
    fn agent_config(&self) -> Option<AgentConfig> {
        self.cilium.as_ref().and_then(|c| c.config.clone())
    }

    fn log_transition(&self, t: &Transition) {
        match t {
            Transition::Opened(f) => tracing::warn!(
                event = "finding-opened", kind = f.kind.name(), subject = %f.subject, severity = ?f.severity, cluster = f.cluster.as_deref().unwrap_or(""), detail = %f.message,
                evidence = %format_args!(r#"{{"datapath":{},"kvstore":{}}}"#, evidence_text(&f.datapath), evidence_text(&f.kvstore)), "finding opened"
            ),
            Transition::Resolved(f) => tracing::info!(event = "finding-resolved", kind = f.kind.name(), subject = %f.subject, cluster = f.cluster.as_deref().unwrap_or(""), "finding resolved"),
        }
    }

    fn compute_status(&self) -> Status {
        if self.last_error.is_some() || self.health.as_ref().is_some_and(|h| h.connected == 0) {
            return Status::Failed;
        }
        let partial = self.health.as_ref().is_some_and(|h| h.connected < h.total) || self.kube_error.is_some() || !self.remotes_unreachable.is_empty();
        if partial || self.tracker.open().next().is_some() { Status::Degraded } else { Status::Ok }
    }

    fn health_line(&self, live: Option<&Live>) {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for f in self.tracker.open() {
            *counts.entry(f.kind.name()).or_default() += 1;
        }
        let etcd = match &self.health {
            _ if self.crd_mode => "etcd: not used (CRD mode)".to_owned(),
            Some(h) => h.status_line(),
            None => "etcd: not probed yet".to_owned(),
        };
        let sources = live.map_or_else(String::new, |l| {
            let o = &l.check.reading().kvstore.origin;
            let objects = l.kube.as_ref().map(|k| format!(" ({})", k.counts().iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", "))).unwrap_or_default();
            format!("endpoints: {}, identities: {}{objects}", o.endpoints.name(), o.identities.name())
        });
        let held = live.map_or(0, |l| l.check.held_nodes().len());
        let clustermesh = live.and_then(|l| l.check.reading().kvstore.mesh.as_deref()).map_or_else(String::new, |m| {
            m.inactive.as_ref().map_or_else(|| m.remote_states(), |why| format!("inactive: {why}"))
        });
        let stalls = live.and_then(|l| l.watcher.as_ref()).map_or(0, |w| w.stalls);
        let (maps, layout) = live.map_or((String::new(), String::new()), |l| {
            let dp = &l.check.reading().datapath;
            let mut m = vec![format!("{}={:.3}", dp.ipcache.meta.name, dp.ipcache.fill_ratio), format!("{}={:.3}", dp.endpoints.meta.name, dp.endpoints.fill_ratio)];
            if let Some(t) = &dp.tunnel {
                m.push(format!("{}={:.3}", t.meta.name, t.fill_ratio));
            }
            (m.join(","), dp.layout.summary())
        });
        let (last, took) = self.last_check.map_or((String::new(), 0), |(t, d)| (t.to_rfc3339(), d.as_millis()));
        let cilium = self.cilium.as_ref().map_or_else(|| "not observed yet".to_owned(), CiliumAgentState::summary);
        tracing::info!(
            event = "node-health", status = self.status.name(), node = %self.opts.check.node_name, cilium = %cilium, judging = self.judging, open_findings = %serde_json::to_string(&counts).unwrap_or_default(),
            etcd = %etcd, sources = %sources, clustermesh = %clustermesh, map_fill = %maps, nodes_in_hold_off = held, watch_stalls = stalls, last_check = %last, last_check_ms = took as u64, layout = %layout,
            error = %self.last_error.clone().or_else(|| self.kube_error.clone()).unwrap_or_default(), "node health"
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

    fn record_findings(&mut self, findings: Vec<crate::check::diff::Finding>, scope: &Scope, started: Instant) {
        for t in self.tracker.observe_where(findings, |id| scope.covers(id), Instant::now(), self.opts.grace) {
            self.log_transition(&t);
        }
        self.publish_findings();
        let took = started.elapsed();
        self.metrics.check_duration.observe(took.as_secs_f64());
        let now = chrono::Utc::now();
        self.metrics.last_check.set(now.timestamp_millis() as f64 / 1000.0);
        if *scope == Scope::Full {
            self.last_check = Some((now, took));
        }
    }

    fn publish_findings(&self) {
        let mut counts: BTreeMap<FindingKind, i64> = FindingKind::ALL.iter().map(|k| (*k, 0)).collect();
        for f in self.tracker.open() {
            *counts.entry(f.kind).or_default() += 1;
        }
        for (k, n) in counts {
            let severity = format!("{:?}", k.severity()).to_lowercase();
            self.metrics.findings.get_or_create(&KindLabel { kind: k.name().to_owned(), severity }).set(n);
        }
        let mut by_cluster: BTreeMap<String, i64> = BTreeMap::new();
        for f in self.tracker.open() {
            if let Some(c) = &f.cluster {
                *by_cluster.entry(c.clone()).or_default() += 1;
            }
        }
        // Clusters that had findings drop to 0, not out of the output.
        let mut seen = self.metrics.finding_clusters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.extend(by_cluster.keys().cloned());
        for c in seen.iter() {
            by_cluster.entry(c.clone()).or_default();
        }
        drop(seen);
        for (cluster, n) in by_cluster {
            self.metrics.remote_cluster_findings.get_or_create(&metrics::ClusterLabel { cluster }).set(n);
        }
    }
}

/// Beyond twice the health interval, how long the agent loop may go without progress before
/// /healthz says it is stuck (a start waits up to KUBERNETES_SYNC_TIMEOUT for the lists).
const STALL_MARGIN: Duration = Duration::from_secs(180);

/// How long the Kubernetes watch may take to list every kind before the agent gives up and
/// starts over.
const KUBERNETES_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// `agent_config`: the Cilium agent's own configuration, when its API answered.
async fn start_live(opts: &AgentOptions, agent_config: Option<&AgentConfig>, cilium: Option<&CiliumAgentState>) -> anyhow::Result<Live> {
    let config = run::node_config(&opts.check, agent_config)?;
    let crd_mode = config.crd_mode() == Some(true);
    // With the mode unknown, identities are checked in the kvstore (a one-shot check infers CRD
    // identities from what it lists; the agent is told by Cilium's API or ConfigMap).
    let identities_from_objects = crd_mode || config.identities_in_kvstore() == Some(false);
    let (client, unread) = if identities_from_objects {
        let (client, access) = crate::k8s::client::connect_or_reason(&opts.check.kube).await;
        (client, access.err())
    } else {
        (None, None)
    };
    if crd_mode && client.is_none() {
        anyhow::bail!("Cilium runs in CRD mode (no kvstore): nodes and pod IPs are CiliumNode and CiliumEndpoint objects, and {}", unread.unwrap_or_default());
    }
    // The kvstore is decoded as it is listed: the live check holds the decoded snapshot, the
    // watch keeps keys and revisions, its changes carry the values.
    let (watcher, mut kvstore, health) = if crd_mode {
        (None, KvstoreSnapshot::default(), ClusterHealth::default())
    } else {
        let (etcd, health) = health::connect_healthy(&opts.check.etcd, opts.check.etcd_timeout).await?;
        let (w, snap) = KvstoreWatcher::start_decoded(opts.check.etcd.clone(), etcd, opts.check.list.clone()).await?;
        (Some(w.with_progress_interval(opts.watch_progress)), snap, health)
    };
    let (kube, listed) = match &client {
        Some(c) => {
            let (k, listed) = start_kube(c, opts, &config, crd_mode, agent_config).await?;
            (Some(k), listed)
        }
        None => (None, Vec::new()),
    };
    // The layout comes from the maps' contents; then the feed, then the snapshot the check
    // starts from: a map change made while that is read comes as an event too (applying it
    // again is harmless), so none falls between the feed's start and the snapshot.
    // Only the layout and the maps in use are kept from that first read: its decoded ipcache
    // (26 MB at 500k entries) was held beside the snapshot's until the agent was ready.
    let (layout, read_live) = {
        let first = run::read_datapath(&opts.check.datapath).await?.0;
        (first.layout.layout, first.live_maps.read_live())
    };
    // Follow the maps the datapath uses (by id where they are not the pinned ones).
    let mut read = opts.check.datapath.clone();
    read.read_live = read_live;
    // Reads every map once (a blocking walk): off the async workers.
    let feed = tokio::task::block_in_place(|| ChangeFeed::open(&read, layout, &opts.follow))?;
    let (datapath, host) = run::read_datapath(&read).await?;
    let now = chrono::Utc::now();
    if watcher.is_none() {
        kvstore.origin.endpoints = StateSource::Kubernetes;
        kvstore.origin.endpoint_slices = config.endpoint_slices.unwrap_or(false);
    }
    kvstore.origin.identities_unread = unread;
    let reading = Reading { kvstore, datapath, host, health, datapath_read_at: now, kvstore_read_at: now };
    let mut check = LiveCheck::new(&opts.check.node_name, &opts.check.cluster, config, reading);
    if kube.is_some() {
        // The objects the first lists gave (the watch's changes follow them).
        check.take_identities_from_objects();
        check.apply_objects(listed);
    }
    check.set_hold_off(opts.check.hold_off);
    let mesh = start_mesh(opts, agent_config, &mut check).await;
    check.set_cilium_mesh(cilium_mesh(cilium));
    if let Some(w) = watcher.as_ref().filter(|_| !opts.check.hold_off.is_zero()) {
        // Nodes deleted just before the agent started are in their hold-off too.
        let kv = &check.reading().kvstore;
        match history::recent_node_deletes(w.etcd(), kv, now, now, opts.check.hold_off, &[]).await {
            Ok(held) => check.hold_nodes(held),
            Err(e) => tracing::warn!(event = "hold-off-history-error", error = %e, "could not search etcd's history for recent node deletes"),
        }
    }
    Ok(Live { watcher, kube, mesh, feed, read_live: read.read_live, check })
}

/// ClusterMesh: finds the remotes, lists each (one that cannot be read starts unreachable and
/// is retried by its watch) and hands the mesh to the live check.
async fn start_mesh(opts: &AgentOptions, agent_config: Option<&AgentConfig>, check: &mut LiveCheck) -> MeshWatch {
    let kv = &check.reading().kvstore;
    let local = crate::clustermesh::reader::local_cluster(&opts.check.mesh, &opts.check.cluster, &opts.check.node_name, agent_config, kv);
    match MeshWatch::start(&opts.check.mesh, local.clone()).await {
        Ok((w, mesh)) => {
            let used = mesh.in_use();
            if used {
                tracing::info!(event = "clustermesh-start", local = %local.name, local_id = local.id, id_from = %local.id_from, remotes = %mesh.remote_states(), inactive = %mesh.inactive.clone().unwrap_or_default(), "ClusterMesh remotes");
            }
            check.set_mesh(used.then_some(mesh));
            w
        }
        Err(e) => {
            tracing::warn!(event = "clustermesh-config-error", error = %e, "could not read the ClusterMesh config directory");
            check.set_mesh(None);
            MeshWatch::empty(&opts.check.mesh, local)
        }
    }
}

/// The Cilium agent's own view of its remotes, when its API answered.
fn cilium_mesh(st: Option<&CiliumAgentState>) -> Option<Vec<crate::cilium::models::RemoteCluster>> {
    st.filter(|s| s.source == "api").map(|s| s.cluster_mesh.clone())
}

/// Starts the Kubernetes watch and waits for its first lists (judging half a list would report
/// the other half missing); returns the watch and what those lists held.
async fn start_kube(client: &kube::Client, opts: &AgentOptions, config: &crate::check::config::DatapathConfig, crd_mode: bool, agent_config: Option<&AgentConfig>) -> anyhow::Result<(KubeWatcher, Vec<ObjectChange>)> {
    let cluster_id = agent_config.and_then(|a| a.cluster_id).unwrap_or(0);
    let slices = config.endpoint_slices.unwrap_or(false);
    let mut kw = KubeWatcher::start(client, &opts.check.kube, &opts.check.cluster, cluster_id, crd_mode, slices, true);
    let deadline = tokio::time::Instant::now() + KUBERNETES_SYNC_TIMEOUT;
    let mut last_error = None;
    let mut listed = Vec::new();
    while !kw.synced() {
        match tokio::time::timeout_at(deadline, kw.next()).await {
            Ok(batch) => {
                last_error = batch.errors.last().cloned().or(last_error);
                listed.extend(batch.changes);
            }
            Err(_) => anyhow::bail!("the Kubernetes lists did not complete within {KUBERNETES_SYNC_TIMEOUT:?}: {}", last_error.unwrap_or_else(|| "no answer".into())),
        }
        // A refusal (RBAC, CRD not installed) will not heal by waiting: start over later.
        if let Some(e) = last_error.as_ref().filter(|e| e.contains("forbidden") || e.contains("not served")) {
            anyhow::bail!("{e}");
        }
    }
    tracing::info!(event = "kubernetes-synced", objects = ?kw.counts(), "Kubernetes lists complete; watching");
    Ok((kw, listed))
}

/// The next kvstore watch batch (never, without a kvstore).
async fn next_kvstore(w: &mut Option<KvstoreWatcher>) -> Result<crate::kvstore::watch::WatchBatch, crate::kvstore::client::KvstoreError> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// The next Kubernetes watch batch (never, without a Kubernetes watch).
async fn next_objects(k: &mut Option<KubeWatcher>) -> crate::k8s::watch::ObjectBatch {
    match k {
        Some(k) => k.next().await,
        None => std::future::pending().await,
    }
}

/// A finding's evidence as JSON text (`null` when absent).
fn evidence_text(e: &Option<crate::check::diff::Evidence>) -> &str {
    e.as_ref().map_or("null", crate::check::diff::Evidence::text)
}

/// The remote clusters that cannot be read.
fn remotes_unreachable(l: &Live) -> Vec<String> {
    let mesh = l.check.reading().kvstore.mesh.as_deref().filter(|m| m.active());
    mesh.map(|m| m.remotes.iter().filter(|r| r.status == crate::clustermesh::RemoteStatus::Unreachable).map(|r| r.name.clone()).collect()).unwrap_or_default()
}

/// Each remote cluster's state, as metrics (one series per remote and state).
fn publish_mesh(metrics: &Metrics, l: &Live) {
    let Some(m) = l.check.reading().kvstore.mesh.as_deref() else { return };
    for r in &m.remotes {
        for st in crate::clustermesh::RemoteStatus::ALL {
            metrics.remote_clusters.get_or_create(&metrics::RemoteLabel { cluster: r.name.clone(), status: st.name().to_owned() }).set(i64::from(st == r.status));
        }
    }
}

/// Where each kind is read, as metrics.
fn publish_sources(metrics: &Metrics, l: &Live) {
    let o = &l.check.reading().kvstore.origin;
    for (kind, source) in [("endpoints", o.endpoints), ("identities", o.identities)] {
        for s in [StateSource::Kvstore, StateSource::Kubernetes] {
            metrics.state_source.get_or_create(&StateSourceLabel { kind: kind.into(), source: s.name().into() }).set(i64::from(s == source));
        }
    }
    for (resource, n) in l.kube.as_ref().map(KubeWatcher::counts).unwrap_or_default() {
        metrics.kubernetes_objects.get_or_create(&ResourceLabel { resource: resource.into() }).set(n as i64);
    }
}

/// A re-check of this many ipcache prefixes or more (a burst) is followed by a heap trim.
const TRIM_AFTER_PREFIXES: usize = 1000;

/// Re-checks what changed (everything after a start or resync) and records the result.
fn evaluate(state: &mut State, live: &mut Live) {
    let started = Instant::now();
    let Recheck { findings, scope } = live.check.recheck();
    let dp = &live.check.reading().datapath;
    for (name, ratio) in [(&dp.ipcache.meta.name, dp.ipcache.fill_ratio), (&dp.endpoints.meta.name, dp.endpoints.fill_ratio)] {
        state.metrics.map_fill_ratio.get_or_create(&MapLabel { map: name.clone() }).set(ratio);
    }
    for (map, n) in dp.live_maps.in_use_counts() {
        state.metrics.maps_in_use.get_or_create(&MapLabel { map }).set(n as i64);
    }
    if let LiveMaps::Skipped { reason } = &dp.live_maps
        && !state.live_maps_logged
    {
        tracing::warn!(event = "live-maps-skipped", reason = %reason, "not checking which maps the datapath's programs use; checking the pinned maps");
        state.live_maps_logged = true;
    }
    if state.judging {
        state.record_findings(findings, &scope, started);
    }
    if matches!(&scope, Scope::Full) || matches!(&scope, Scope::Prefixes(p) if p.len() >= TRIM_AFTER_PREFIXES) {
        // A full check, or a burst, allocates and frees a lot (decoded snapshots, a whole-map
        // re-read, findings): give the freed pages back so an idle agent's RSS is what it
        // holds, not its peak.
        crate::release_free_memory();
    }
}

/// How often the pins are checked for maps Cilium re-created (a restart or upgrade).
const PIN_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How often the ClusterMesh config directory is looked at: Cilium (fsnotify) drains a removed
/// remote at once, so kvcheck must notice well within the grace period.
const MESH_CONFIG_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How often the Cilium agent's API is asked while it is ready, and while it is not.
const CILIUM_POLL_READY: Duration = Duration::from_secs(10);
const CILIUM_POLL_RECOVERING: Duration = Duration::from_secs(1);

/// Observes the Cilium agent in the background (its API may take seconds to answer while it
/// starts) and publishes each state; `poke` makes it look at once (the map pins changed:
/// Cilium is probably restarting).
fn spawn_cilium_observer(opts: &crate::cilium::CiliumOptions, poke: Arc<tokio::sync::Notify>) -> tokio::sync::watch::Receiver<Option<CiliumAgentState>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut agent = CiliumAgent::new(opts);
    tokio::spawn(async move {
        loop {
            let st = agent.observe().await;
            let wait = if st.state.judge() { CILIUM_POLL_READY } else { CILIUM_POLL_RECOVERING };
            if tx.send(Some(st)).is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = poke.notified() => {}
            }
        }
    });
    rx
}

/// Takes a new observation of the Cilium agent: logs a change of state, publishes it, holds
/// judging while Cilium recovers and, when it is ready again, re-checks everything with the
/// grace period starting afresh.
async fn on_cilium_state(state: &mut State, live: &mut Option<Live>, st: CiliumAgentState) {
    let judge = st.state.judge();
    let first = state.cilium.is_none();
    let changed = state.cilium.as_ref().is_none_or(|old| old.state != st.state || old.started_at != st.started_at || old.reason != st.reason);
    if changed {
        let started_at = st.started_at.as_deref().unwrap_or("");
        if judge {
            tracing::info!(event = "cilium-agent-state", state = st.state.name(), source = st.source, started_at, reason = %st.reason, "Cilium agent state");
        } else {
            tracing::warn!(event = "cilium-agent-state", state = st.state.name(), source = st.source, started_at, reason = %st.reason, "Cilium agent not ready: judging held");
        }
    }
    state.metrics.set_cilium(st.state, &st.summary(), judge);
    let resumed = judge && !state.judging;
    if judge != state.judging {
        state.tracker.clear_pending();
    }
    state.judging = judge;
    if let Some(l) = live.as_mut() {
        l.check.set_cilium_mesh(cilium_mesh(Some(&st)));
    }
    state.cilium = Some(st);
    if resumed && let Some(l) = live.as_mut() {
        // Cilium has restored what it restores: judge everything afresh (a resync re-reads
        // both sides and re-checks all). The maps followed while it restored may be the old
        // ones its programs have now left: then start over with the maps in use.
        tracing::info!(event = "judging-resumed", "the Cilium agent is ready: re-checking everything");
        let agent_config = state.agent_config();
        match refresh(&state.opts, l, true, agent_config.as_ref()).await {
            Ok(()) => evaluate(state, l),
            Err(e) => {
                tracing::info!(event = "datapath-reopen", reason = %e, "re-opening the datapath now that the Cilium agent is ready");
                *live = None;
            }
        }
    }
    // (The first node-health line comes once etcd has been probed.)
    if changed && !first {
        state.health_line(live.as_ref());
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let metrics = Metrics::new(&opts.check.node_name);
    let tls = opts.listen_tls.as_ref().map(|(cert, key)| metrics::tls_config(cert, key)).transpose()?;
    let server = metrics::serve(opts.listen, metrics.clone(), tls).await?;
    tracing::info!(event = "agent-start", listen = %opts.listen, node = %opts.check.node_name, grace = ?opts.grace, resync = ?opts.resync, "kvcheck agent started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut state = State {
        opts: opts.clone(),
        metrics: metrics.clone(),
        tracker: Tracker::default(),
        health: None,
        status: Status::Ok,
        last_check: None,
        last_error: None,
        kube_error: None,
        fallback_logged: false,
        live_maps_logged: false,
        cilium: None,
        judging: true,
        crd_mode: false,
        remotes_unreachable: Vec::new(),
    };
    let cilium_poke = Arc::new(tokio::sync::Notify::new());
    let mut cilium_rx = spawn_cilium_observer(&opts.check.cilium, cilium_poke.clone());
    // Judge nothing before the first look at the Cilium agent.
    if cilium_rx.changed().await.is_ok() {
        let st = cilium_rx.borrow_and_update().clone();
        if let Some(st) = st {
            on_cilium_state(&mut state, &mut None, st).await;
        }
    }
    let mut live: Option<Live> = None;
    let mut dirty_since: Option<Instant> = None;
    let mut next_resync = Instant::now() + jitter(opts.resync);
    let mut next_health = Instant::now();
    let mut next_pin_check = Instant::now() + PIN_CHECK_INTERVAL;
    let mut next_mesh_check = Instant::now() + MESH_CONFIG_CHECK_INTERVAL;
    let mut retry_at = Instant::now();
    metrics.etcd_endpoints.set(opts.check.etcd.endpoints.len() as i64);
    // The loop runs at least every health interval; a start (Kubernetes lists, etcd, a large
    // map read) may take up to a few minutes. Longer without progress is a stuck agent.
    let stall_after = opts.health_interval.saturating_mul(2).saturating_add(STALL_MARGIN);
    // Start-overs and watch resumes back off with jitter (a DaemonSet's agents lose etcd together).
    let mut restart = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut resume = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        metrics.beat(std::time::SystemTime::now(), stall_after);
        // (Re)build the live sources when missing: etcd down at start, Cilium restarting...
        if live.is_none() && Instant::now() >= retry_at {
            let agent_config = state.agent_config();
            match start_live(&opts, agent_config.as_ref(), state.cilium.as_ref()).await {
                Ok(mut l) => {
                    state.crd_mode = l.watcher.is_none();
                    state.remotes_unreachable = remotes_unreachable(&l);
                    state.health = (!state.crd_mode).then(|| l.check.reading().health.clone());
                    publish_sources(&metrics, &l);
                    // Before ready: a scrape right after /readyz sees each remote's state.
                    publish_mesh(&metrics, &l);
                    state.last_error = None;
                    evaluate(&mut state, &mut l);
                    metrics.set_ready(true);
                    if let Some(r) = l.feed.fallback_reason.as_ref().filter(|_| !state.fallback_logged) {
                        tracing::warn!(event = "change-events-fallback", reason = %r, interval = ?opts.follow.poll_interval, "BPF change events unavailable; polling the maps");
                        state.fallback_logged = true;
                    }
                    next_resync = Instant::now() + jitter(opts.resync);
                    live = Some(l);
                    restart.reset();
                }
                Err(e) => {
                    state.last_error = Some(format!("{e:#}"));
                    retry_at = Instant::now() + restart.next_delay();
                }
            }
            state.set_status(live.as_ref());
        }
        let now = Instant::now();
        let mut wake = [next_resync, next_health, next_pin_check, next_mesh_check].into_iter().min().unwrap_or(now);
        if live.is_none() {
            wake = wake.min(retry_at.max(now + Duration::from_millis(100)));
        }
        if let Some(d) = dirty_since {
            wake = wake.min(d + opts.debounce);
        }
        if let Some(due) = state.tracker.next_due(opts.grace) {
            wake = wake.min(due);
        }
        if let Some(end) = live.as_ref().and_then(|l| l.check.next_hold_end()) {
            // A node-delete hold-off ends: its node's entries are then re-checked.
            wake = wake.min(now + (end - chrono::Utc::now()).to_std().unwrap_or_default());
        }
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake.max(now)));
        tokio::pin!(sleep);
        let mut lost_live = None;
        let mut cilium_seen = false;
        if let Some(l) = live.as_mut() {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                objects = next_objects(&mut l.kube) => {
                    metrics.change_events.get_or_create(&SourceLabel { source: "kubernetes".into() }).inc_by(objects.events as u64);
                    if !objects.listed.is_empty() {
                        tracing::info!(event = "kubernetes-relist", resources = ?objects.listed, "Kubernetes watch relisted");
                    }
                    let errors = objects.errors.last().cloned();
                    // Status follows at the end of this pass.
                    state.kube_error = errors;
                    if !objects.changes.is_empty() {
                        l.check.apply_objects(objects.changes);
                        dirty_since.get_or_insert(Instant::now());
                    }
                },
                update = l.mesh.next() => {
                    metrics.change_events.get_or_create(&SourceLabel { source: "clustermesh".into() }).inc_by(update.touched.len().max(1) as u64);
                    let r = &update.remote;
                    let before = l.check.reading().kvstore.mesh.as_ref().and_then(|m| m.remote(&r.name)).map(|x| x.status);
                    if before != Some(r.status) {
                        let status = r.status.name();
                        if r.status.judged() {
                            tracing::info!(event = "clustermesh-remote-status", cluster = %r.name, status = %status, "remote cluster synced: its entries are judged");
                        } else {
                            tracing::warn!(event = "clustermesh-remote-status", cluster = %r.name, status = %status, reason = %r.reason.clone().unwrap_or_default(), "remote cluster not judged");
                        }
                    }
                    l.check.apply_remote(update);
                    state.remotes_unreachable = remotes_unreachable(l);
                    publish_mesh(&metrics, l);
                    dirty_since.get_or_insert(Instant::now());
                },
                batch = next_kvstore(&mut l.watcher) => match batch {
                    Ok(b) => {
                        metrics.change_events.get_or_create(&SourceLabel { source: "kvstore".into() }).inc_by(b.changes.len() as u64);
                        if b.relisted {
                            tracing::info!(event = "kvstore-relist", revision = b.revision, changes = b.changes.len(), "watch revision compacted: relisted");
                        }
                        l.check.apply_kvstore(&b.changes, b.revision);
                        dirty_since.get_or_insert(Instant::now());
                        resume.reset();
                    }
                    Err(e) => {
                        tracing::warn!(event = "kvstore-watch-error", error = %e, "kvstore watch interrupted; resuming");
                        let stalls = l.watcher.as_ref().map_or(0, |w| w.stalls);
                        metrics.watch_stalls.set(i64::try_from(stalls).unwrap_or(i64::MAX));
                        state.health = Some(health::cluster_health(&opts.check.etcd, opts.check.etcd_timeout).await);
                        if let Some(h) = &state.health {
                            metrics.etcd_connected.set(h.connected as i64);
                        }
                        state.set_status(live.as_ref());
                        tokio::time::sleep(resume.next_delay()).await;
                    }
                },
                changes = l.feed.next(Some(&l.check)) => match changes {
                    Ok(c) => {
                        tracing::debug!(event = "datapath-changes", changes = c.len(), "datapath changes");
                        metrics.change_events.get_or_create(&SourceLabel { source: l.feed.source_name().into() }).inc_by(c.len() as u64);
                        l.check.apply_datapath(&c);
                        dirty_since.get_or_insert(Instant::now());
                    }
                    Err(e) => lost_live = Some(e.to_string()),
                },
                Ok(()) = cilium_rx.changed() => cilium_seen = true,
                () = &mut sleep => {}
            }
        } else {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                Ok(()) = cilium_rx.changed() => cilium_seen = true,
                () = &mut sleep => {}
            }
        }
        if cilium_seen {
            let st = cilium_rx.borrow_and_update().clone();
            if let Some(st) = st {
                on_cilium_state(&mut state, &mut live, st).await;
            }
        }
        let now = Instant::now();
        if let Some(l) = live.as_ref().filter(|_| now >= next_pin_check) {
            next_pin_check = now + PIN_CHECK_INTERVAL;
            lost_live = lost_live.or_else(|| l.feed.replaced_map());
        }
        if let Some(l) = live.as_mut().filter(|_| now >= next_mesh_check) {
            next_mesh_check = now + MESH_CONFIG_CHECK_INTERVAL;
            if l.mesh.config_changed() {
                // A remote added, removed (Cilium drains it at once) or re-configured: start the
                // mesh over, as Cilium connects, drains or reconnects.
                tracing::info!(event = "clustermesh-config-changed", dir = %opts.check.mesh.config_dir.display(), "ClusterMesh config directory changed: re-reading the remotes");
                let agent_config = state.agent_config();
                l.mesh = start_mesh(&opts, agent_config.as_ref(), &mut l.check).await;
                l.check.set_cilium_mesh(cilium_mesh(state.cilium.as_ref()));
                state.remotes_unreachable = remotes_unreachable(l);
                publish_mesh(&metrics, l);
                dirty_since.get_or_insert(now);
            }
        }
        if let Some(why) = lost_live {
            // Cilium re-creating its maps: start over with fresh handles.
            tracing::warn!(event = "datapath-reopen", reason = %why, "datapath maps changed under kvcheck; re-opening them");
            cilium_poke.notify_one();
            state.last_error = Some(why);
            live = None;
            retry_at = Instant::now();
            state.set_status(None);
            continue;
        }
        if let Some(l) = live.as_mut() {
            if l.check.expire_held(chrono::Utc::now()) {
                dirty_since.get_or_insert(now);
            }
            let resync_due = now >= next_resync;
            let recheck_due = dirty_since.is_some_and(|d| now >= d + opts.debounce);
            if resync_due || recheck_due || l.check.needs_reread() {
                dirty_since = None;
                let agent_config = state.agent_config();
                if let Err(e) = refresh(&opts, l, resync_due, agent_config.as_ref()).await {
                    state.last_error = Some(e.to_string());
                    live = None;
                    retry_at = now;
                    state.set_status(None);
                    continue;
                }
                state.last_error = None;
                if resync_due {
                    next_resync = now + jitter(opts.resync);
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
            // CRD mode: no etcd to probe.
            let h = if state.crd_mode { None } else { Some(health::cluster_health(&opts.check.etcd, opts.check.etcd_timeout).await) };
            if let Some(h) = &h {
                metrics.etcd_connected.set(h.connected as i64);
            }
            if let Some(l) = live.as_mut() {
                if let Some(h) = &h {
                    l.check.set_health(h.clone());
                }
                publish_sources(&metrics, l);
                publish_mesh(&metrics, l);
                // Time-dependent findings (heartbeat age) and the node-scale sections.
                if refresh(&opts, l, false, None).await.is_ok() {
                    evaluate(&mut state, l);
                }
            }
            state.health = h;
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

/// Brings the live check up to date before a re-check: the interface addresses (one netlink
/// dump), the maps when a change could not be applied, and on a resync everything (the maps,
/// a fresh kvstore list, node_config.h): the watch and change events are the fast path, the
/// resync the safety net.
async fn refresh(opts: &AgentOptions, l: &mut Live, resync: bool, agent_config: Option<&AgentConfig>) -> Result<(), crate::check::run::CheckError> {
    if resync || l.check.needs_reread() {
        let (dp, host) = run::read_datapath(&opts.check.datapath).await?;
        let read_live = dp.live_maps.read_live();
        if read_live != l.read_live {
            // The programs moved to other maps: follow those (start over with new handles).
            tracing::warn!(event = "datapath-maps-in-use-changed", before = ?l.read_live, now = ?read_live, "the maps the datapath uses changed; re-opening");
            return Err(crate::check::run::CheckError::Task(format!("the maps the datapath uses changed ({:?} -> {read_live:?})", l.read_live)));
        }
        l.check.replace_datapath(dp, host);
    } else {
        l.check.set_host(crate::datapath::addresses::read_host_addresses(opts.check.datapath.netns.as_deref()).await?);
    }
    if resync {
        // The kvstore side: compare key counts with etcd's now; relist only when they disagree
        // with what the watch built (a relist per agent per resync would be most of what
        // kvcheck costs etcd; docs/scale.md).
        if let Some(w) = l.watcher.as_mut() {
            if let Some(reason) = w.verify().await.unwrap_or_else(|e| Some(e.to_string())) {
                tracing::info!(event = "kvstore-resync-relist", reason = %reason, "relisting the kvstore");
                match w.relist().await {
                    Ok(b) => l.check.apply_kvstore(&b.changes, b.revision),
                    Err(e) => tracing::warn!(event = "resync-error", error = %e, "periodic kvstore relist failed"),
                }
            }
        }
        match run::node_config(&opts.check, agent_config) {
            Ok(c) => l.check.set_config(c),
            Err(e) => tracing::warn!(event = "resync-error", error = %e, "re-reading node_config.h failed"),
        }
    }
    Ok(())
}
