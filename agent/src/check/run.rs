//! One check of this node: read both sides, derive, diff, settle, report. The only I/O of the
//! check; everything it calls into is pure.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::config::DatapathConfig;
use super::diff::{self, Finding, Observed};
use super::expected::{self, NodeContext};
use super::kinds::{FindingKind, Severity};
use crate::cilium::{CiliumAgent, CiliumAgentState, CiliumOptions};
use crate::datapath::addresses::HostAddresses;
use crate::datapath::{self, DatapathSnapshot, ReadOptions};
use crate::kvstore::client::Etcd;
use crate::kvstore::config::EtcdSettings;
use crate::kvstore::health::{self, ClusterHealth};
use crate::kvstore::history;
use crate::kvstore::values::HeldNode;
use crate::kvstore::reader::{self, KvstoreSnapshot, ListOptions};
use crate::k8s::client::{K8sError, KubeOptions};
use crate::model::source::StateSource;

#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub datapath: ReadOptions,
    pub etcd: EtcdSettings,
    pub etcd_timeout: Duration,
    pub list: ListOptions,
    pub node_name: String,
    pub cluster: String,
    /// Cilium's state dir (`globals/node_config.h` inside).
    pub state_dir: PathBuf,
    /// Options that override node_config.h.
    pub config_overrides: DatapathConfig,
    /// Cilium's ConfigMap as mounted (one file per key): `identity-allocation-mode`.
    pub config_map_dir: PathBuf,
    /// Wait this long and re-read what the findings touch; 0 disables.
    pub settle: Duration,
    /// Cilium's node-delete hold-off (`NodeDeleteDelay`); 0 disables the modelling.
    pub hold_off: Duration,
    /// When a deleted node's entries are held and its delete cannot be placed before
    /// now - hold-off, wait the hold-off out and check again (else report them as held).
    pub hold_off_wait: bool,
    /// The Cilium agent's API, and how long to wait for it to be ready.
    pub cilium: CiliumOptions,
    /// The Kubernetes API (CRD mode, CRD identities).
    pub kube: KubeOptions,
    /// ClusterMesh: where the remote clusters are configured, and the local cluster's id.
    pub mesh: crate::clustermesh::reader::MeshOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Kvstore(#[from] crate::kvstore::client::KvstoreError),
    #[error(transparent)]
    Kubernetes(#[from] K8sError),
    #[error("reading Cilium's node_config.h under {path}: {source}")]
    NodeConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("internal: {0}")]
    Task(String),
    #[error("not checked: {0}")]
    Unsupported(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Counts {
    pub total: usize,
    pub critical: usize,
    pub warning: usize,
    pub info: usize,
    pub by_kind: std::collections::BTreeMap<FindingKind, usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeId {
    pub name: String,
    pub cluster: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DatapathSource {
    pub bpffs: PathBuf,
    /// The maps the attached programs use, against the pins (`--live-maps`).
    pub live_maps: datapath::inuse::LiveMaps,
    pub layout: datapath::detect::LayoutChoice,
    pub maps: Vec<datapath::maps::MapMeta>,
    pub entries: Vec<(String, usize)>,
    pub read_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct KvstoreSource {
    pub status: String,
    pub revision: i64,
    pub read_at: String,
    pub keys: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettleInfo {
    pub window_ms: u128,
    /// Findings seen in the first read and gone after re-reading: not reported.
    pub settled: Vec<(FindingKind, String)>,
    pub reread_keys: usize,
    pub reread_revision: Option<i64>,
    pub reread_at: Option<String>,
}

/// Entries a deleted node left that Cilium may still hold (its node-delete hold-off).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HoldOffInfo {
    pub window_ms: u128,
    /// Deleted nodes whose hold-off had not certainly ended.
    pub nodes: Vec<HeldNodeInfo>,
    /// Findings the hold-off explains: not reported as drift.
    pub held: Vec<(FindingKind, String)>,
    /// How long the check waited for hold-offs to end before its final pass.
    pub waited_ms: u128,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeldNodeInfo {
    pub key: String,
    pub deleted_revision: i64,
    pub deleted_after: Option<String>,
    pub deleted_by: String,
    pub held_until: String,
    pub bounded_by: String,
}

impl HeldNodeInfo {
    fn of(h: &HeldNode) -> Self {
        HeldNodeInfo {
            key: h.key().to_owned(),
            deleted_revision: h.deleted_revision,
            deleted_after: h.deleted_after.map(|t| t.to_rfc3339()),
            deleted_by: h.deleted_by.to_rfc3339(),
            held_until: h.held_until.to_rfc3339(),
            bounded_by: h.bounded_by.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Sources {
    /// The Cilium agent: ready, or why its datapath was not judged.
    pub cilium: CiliumAgentState,
    /// Where nodes and pod IPs were read: `kvstore`, or `kubernetes` (CRD mode).
    pub endpoints: StateSource,
    /// The Kubernetes API, when read (CRD mode, CRD identities).
    pub kubernetes: Option<KubernetesSource>,
    /// Where the identities the datapath uses were checked, or why not.
    pub identities: IdentitiesSource,
    /// ClusterMesh: the local cluster and each remote's state (`synced` ones were judged).
    pub clustermesh: Option<crate::clustermesh::Mesh>,
    /// `None` when the datapath was not read (the Cilium agent was not ready).
    pub datapath: Option<DatapathSource>,
    pub kvstore: KvstoreSource,
    pub config: DatapathConfig,
    pub assumptions: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KubernetesSource {
    /// How it was reached: `kubeconfig <path>` or `in-cluster ServiceAccount`.
    pub api: String,
    /// Each list's resource (plural) → the resourceVersion it was served at.
    pub resource_versions: std::collections::BTreeMap<String, String>,
    /// CiliumEndpointSlices were read instead of CiliumEndpoints.
    pub endpoint_slices: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IdentitiesSource {
    pub checked: bool,
    /// Where they were checked: `kvstore` or `kubernetes` (CiliumIdentity objects).
    pub source: Option<StateSource>,
    /// `identity-allocation-mode` as known (`null`: not known).
    pub mode: Option<String>,
    pub reason: Option<String>,
}

/// What the expected state could not know: the guesses it made, and whether identities were
/// checked.
#[derive(Clone, Debug, Default)]
pub struct Notes {
    pub assumptions: Vec<String>,
    pub identities: IdentitiesSource,
}

/// The JSON document of `kvcheck check` (schema in the README).
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub node: NodeId,
    /// `consistent`, `drift`, or `cilium-not-ready` (not judged: exit code 2).
    pub status: &'static str,
    pub counts: Counts,
    pub findings: Vec<Finding>,
    pub sources: Sources,
    pub settle: SettleInfo,
    pub hold_off: HoldOffInfo,
    pub duration_ms: u128,
}

impl CheckReport {
    pub fn consistent(&self) -> bool {
        self.findings.is_empty()
    }

    /// Whether the datapath was judged (false while the Cilium agent was not ready).
    pub fn judged(&self) -> bool {
        self.sources.cilium.state.judge()
    }
}

/// Addresses Cilium treats as the node's own: loopback and link-local excluded.
pub fn local_addresses(host: &HostAddresses) -> BTreeSet<IpAddr> {
    host.all_addresses().map(ipnet::IpNet::addr).filter(|ip| !ip.is_loopback() && !diff::is_link_local(ip)).collect()
}

/// Everything read from both sides at one point in time.
pub struct Reading {
    pub datapath: DatapathSnapshot,
    pub host: HostAddresses,
    pub kvstore: KvstoreSnapshot,
    pub health: ClusterHealth,
    pub datapath_read_at: chrono::DateTime<chrono::Utc>,
    pub kvstore_read_at: chrono::DateTime<chrono::Utc>,
}

pub async fn read_datapath(opts: &ReadOptions) -> Result<(DatapathSnapshot, HostAddresses), CheckError> {
    Ok(datapath::read_node(opts).await?)
}

/// The agent's configuration: node_config.h, then what the Cilium agent's API says, then its
/// ConfigMap, each filling what is still unknown; options override all.
pub fn node_config(opts: &CheckOptions, agent: Option<&crate::cilium::state::AgentConfig>) -> Result<DatapathConfig, CheckError> {
    let mut cfg = DatapathConfig::from_state_dir(&opts.state_dir).map_err(|source| CheckError::NodeConfig { path: opts.state_dir.clone(), source })?;
    if let Some(a) = agent {
        cfg.fill_from_agent(a);
    }
    cfg.fill_from_config_map(&opts.config_map_dir);
    cfg.apply(&opts.config_overrides);
    Ok(cfg)
}

pub fn context(node_name: &str, cluster: &str, cfg: DatapathConfig, r: &Reading) -> NodeContext {
    NodeContext {
        node_name: node_name.to_owned(),
        cluster: cluster.to_owned(),
        layout: r.datapath.layout.layout,
        config: cfg,
        local_addresses: local_addresses(&r.host),
        tunnel_map_in_use: r.datapath.tunnel.as_ref().is_some_and(|t| t.entry_count > 0),
    }
}

/// Derives and diffs one reading.
pub fn evaluate(ctx: &NodeContext, r: &Reading) -> (Vec<Finding>, Notes) {
    let started = std::time::Instant::now();
    let obs = Observed { datapath: &r.datapath, host: &r.host, kvstore: &r.kvstore, now: r.kvstore_read_at };
    // The identity users (a pass over every entry of both sides) counted on the core that
    // deriving leaves idle.
    let large = r.datapath.ipcache.entries.len() >= diff::PARALLEL_DIFF_ENTRIES;
    let (mut exp, used) = diff::both(large, || expected::derive(&r.kvstore, ctx), || diff::IdentityUsers::of_observed(&obs));
    let derived = started.elapsed();
    let findings = diff::diff_using(&exp, ctx, &obs, &used);
    tracing::debug!(derive_ms = derived.as_secs_f64() * 1000.0, diff_ms = (started.elapsed() - derived).as_secs_f64() * 1000.0, expected = exp.ipcache.len(), "derived and diffed");
    let checked = exp.identities_not_checked.is_none();
    let identities = IdentitiesSource { checked, source: checked.then_some(r.kvstore.origin.identities), mode: ctx.config.identity_allocation_mode.clone(), reason: std::mem::take(&mut exp.identities_not_checked) };
    let assumptions = std::mem::take(&mut exp.assumptions);
    drop_aside(exp);
    (findings, Notes { assumptions, identities })
}

/// Frees `value` on a thread of its own: a full check's reading and expected state are
/// ~600k allocations, whose freeing (a fifth of the check's last, single-threaded phase)
/// nothing needs to wait for. Freed in place when no thread can be started. The freed pages
/// are then given back (the agent trims after a full check, which may be before this).
pub fn drop_aside<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new().name("kvcheck-free".into()).spawn(move || {
        drop(value);
        crate::release_free_memory();
    });
}

/// Where one check reads Cilium's cluster state, kind by kind, as the agent's configuration
/// says: nodes and pod IPs from etcd or (CRD mode) CiliumNodes and CiliumEndpoints(Slices),
/// identities from etcd or CiliumIdentities.
struct StateReader {
    etcd: Option<Etcd>,
    kube: Option<kube::Client>,
    /// How the Kubernetes API is reached, or why it is not.
    kube_access: Result<String, String>,
    crd_mode: bool,
    slices: bool,
    /// Identities in the kvstore (`Some(true)`), as objects (`Some(false)`), or not known.
    identities_in_kvstore: Option<bool>,
    cluster_id: u32,
    agent: Option<crate::cilium::state::AgentConfig>,
    /// The Cilium agent's own view of each remote (its API), to judge only what it synced.
    cilium_mesh: Option<Vec<crate::cilium::models::RemoteCluster>>,
}

impl StateReader {
    async fn connect(opts: &CheckOptions, cfg: &DatapathConfig, agent: Option<&crate::cilium::state::AgentConfig>, cilium_mesh: Option<&[crate::cilium::models::RemoteCluster]>) -> Result<(StateReader, ClusterHealth), CheckError> {
        let crd_mode = cfg.crd_mode() == Some(true);
        let identities_in_kvstore = if crd_mode { Some(false) } else { cfg.identities_in_kvstore() };
        let (kube, kube_access) = if identities_in_kvstore == Some(true) {
            (None, Err("not needed".to_owned()))
        } else {
            crate::k8s::client::connect_or_reason(&opts.kube).await
        };
        if crd_mode && kube.is_none() {
            let why = kube_access.as_ref().err().cloned().unwrap_or_default();
            return Err(CheckError::Unsupported(format!(
                "Cilium runs in CRD mode (no kvstore; from {}): nodes and pod IPs are CiliumNode and CiliumEndpoint objects, and {why}",
                cfg.sources.iter().rev().find(|s| !s.ends_with("node_config.h")).map_or("options", String::as_str)
            )));
        }
        let (etcd, health) = if crd_mode {
            (None, ClusterHealth::default())
        } else {
            let (etcd, health) = health::connect_healthy(&opts.etcd, opts.etcd_timeout).await?;
            (Some(etcd), health)
        };
        let reader = StateReader {
            etcd,
            kube,
            kube_access,
            crd_mode,
            slices: cfg.endpoint_slices.unwrap_or(false),
            identities_in_kvstore,
            cluster_id: agent.and_then(|a| a.cluster_id).unwrap_or(0),
            agent: agent.cloned(),
            cilium_mesh: cilium_mesh.map(<[_]>::to_vec),
        };
        Ok((reader, health))
    }

    async fn read(&self, opts: &CheckOptions) -> Result<KvstoreSnapshot, CheckError> {
        let mut snap = match &self.etcd {
            Some(etcd) => reader::read_snapshot(etcd, &opts.list).await?,
            None => KvstoreSnapshot::default(),
        };
        if let (true, Some(kube)) = (self.crd_mode, &self.kube) {
            crate::k8s::reader::read_endpoints(kube, &opts.kube, &opts.cluster, self.cluster_id, self.slices, &mut snap).await?;
        }
        self.read_identities(opts, &mut snap).await;
        self.read_mesh(opts, &mut snap).await?;
        Ok(snap)
    }

    /// ClusterMesh: every configured remote, read as the agent reads it.
    async fn read_mesh(&self, opts: &CheckOptions, snap: &mut KvstoreSnapshot) -> Result<(), CheckError> {
        let local = crate::clustermesh::reader::local_cluster(&opts.mesh, &opts.cluster, &opts.node_name, self.agent.as_ref(), snap);
        let (mut mesh, files) = crate::clustermesh::reader::discover(&opts.mesh, local).map_err(CheckError::Unsupported)?;
        if !mesh.in_use() {
            return Ok(());
        }
        crate::clustermesh::reader::read_all(&mut mesh, &files, &opts.mesh).await;
        if let Some(status) = &self.cilium_mesh {
            let _ = crate::clustermesh::reader::gate_on_cilium(&mut mesh, status);
        }
        snap.mesh = Some(Box::new(mesh));
        Ok(())
    }

    /// Identities from CiliumIdentity objects where Cilium keeps them there (or, the mode not
    /// known, where the kvstore shows they are not in it). Not read: the reason is kept and
    /// the identities are reported as not checked, never as missing.
    async fn read_identities(&self, opts: &CheckOptions, snap: &mut KvstoreSnapshot) {
        let elsewhere = || {
            let own = snap.nodes.iter().find(|n| n.name == opts.node_name && n.cluster == opts.cluster);
            expected::identities_elsewhere(snap, own).is_some()
        };
        let from_objects = match self.identities_in_kvstore {
            Some(in_kvstore) => !in_kvstore,
            None => elsewhere(),
        };
        if !from_objects {
            return;
        }
        let result = match &self.kube {
            Some(kube) => crate::k8s::reader::read_identities(kube, &opts.kube, snap).await.map_err(|e| e.to_string()),
            None => Err(self.kube_access.clone().err().unwrap_or_default()),
        };
        if let Err(why) = result {
            tracing::warn!(reason = %why, "identities kept as CiliumIdentity objects were not read");
            snap.origin.identities_unread = Some(why);
        }
    }

    /// Re-reads what `keys` name: etcd keys one by one, Kubernetes objects by listing their
    /// kind again.
    async fn reread(&self, opts: &CheckOptions, snap: &mut KvstoreSnapshot, keys: &BTreeSet<String>) -> Result<Option<i64>, CheckError> {
        let (remote, keys): (BTreeSet<String>, BTreeSet<String>) = keys.iter().cloned().partition(|k| crate::clustermesh::cluster_of_reference(k).is_some());
        let (kvstore, objects): (BTreeSet<String>, BTreeSet<String>) = keys.into_iter().partition(|k| StateSource::of_reference(k) == StateSource::Kvstore);
        if let Some(mesh) = snap.mesh.as_deref_mut() {
            let clusters: BTreeSet<&str> = remote.iter().filter_map(|k| crate::clustermesh::cluster_of_reference(k)).collect();
            crate::clustermesh::reader::reread(mesh, &clusters, &opts.mesh).await;
            if let Some(status) = &self.cilium_mesh {
                let _ = crate::clustermesh::reader::gate_on_cilium(mesh, status);
            }
        }
        let mut revision = None;
        if let Some(etcd) = &self.etcd {
            revision = Some(reread_keys(etcd, snap, &kvstore).await?);
        }
        if let Some(kube) = &self.kube {
            if self.crd_mode && objects.iter().any(|k| !k.starts_with("CiliumIdentity ")) {
                crate::k8s::reader::read_endpoints(kube, &opts.kube, &opts.cluster, self.cluster_id, self.slices, snap).await?;
            }
            if snap.origin.identities == StateSource::Kubernetes && objects.iter().any(|k| k.starts_with("CiliumIdentity ")) {
                crate::k8s::reader::read_identities(kube, &opts.kube, snap).await?;
            }
        }
        Ok(revision)
    }

    fn kubernetes_source(&self, snap: &KvstoreSnapshot) -> Option<KubernetesSource> {
        let api = self.kube_access.clone().ok().filter(|_| !snap.origin.resource_versions.is_empty())?;
        Some(KubernetesSource { api, resource_versions: snap.origin.resource_versions.clone(), endpoint_slices: snap.origin.endpoint_slices })
    }
}

/// Cilium writes a pod's CiliumEndpoint up to 10 s after the pod's datapath (its endpoint
/// sync controller), and a changed identity after a 5 s grace: a finding on Kubernetes objects
/// is re-read after at least this long (unless settling is off).
const KUBERNETES_SETTLE: Duration = Duration::from_secs(12);

/// Re-reads `keys` from etcd into the snapshot (values that changed, appeared or vanished).
pub async fn reread_keys(etcd: &Etcd, snap: &mut KvstoreSnapshot, keys: &BTreeSet<String>) -> Result<i64, CheckError> {
    let mut kv = etcd.client.kv_client();
    let mut revision = snap.revision;
    for key in keys {
        let resp = etcd.call(format!("get {key}"), kv.get(key.as_str(), None)).await?;
        if let Some(h) = resp.header() {
            revision = revision.max(h.revision());
        }
        snap.remove_key(key);
        reader::decode_into(snap, resp.kvs().iter().map(Into::into));
    }
    snap.revision = revision;
    Ok(revision)
}

pub async fn run_check(opts: &CheckOptions) -> Result<CheckReport, CheckError> {
    let started = std::time::Instant::now();
    let deadline = started + opts.cilium.ready_timeout;
    let mut agent = CiliumAgent::new(&opts.cilium);
    loop {
        // Judge only while Cilium is not recovering: what it is restoring is not drift.
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        let mut before = agent.wait_ready(remaining, |st| tracing::warn!(state = st.state.name(), "waiting for the Cilium agent: {}", st.reason)).await;
        before.waited_ms = started.elapsed().as_millis();
        if !before.state.judge() {
            return Ok(not_judged(opts, before, started.elapsed()).await);
        }
        let cilium_mesh = (before.source == "api").then_some(before.cluster_mesh.as_slice());
        let pass = check_pass(opts, before.config.as_ref(), cilium_mesh).await?;
        // A restart that began while kvcheck read would show as drift: look again, and check
        // afresh when the agent or its map pins changed meanwhile.
        let mut after = agent.observe().await;
        after.waited_ms = before.waited_ms;
        let same = after.state.judge() && after.started_at == before.started_at && pins_of(&after) == pins_of(&before);
        if same || std::time::Instant::now() >= deadline {
            if !same && !after.state.judge() {
                return Ok(not_judged(opts, after, started.elapsed()).await);
            }
            return Ok(report(opts, after, pass, started.elapsed()));
        }
        tracing::warn!(before = %before.summary(), after = %after.summary(), "the Cilium agent or its map pins changed during the check; checking again");
    }
}

fn pins_of(st: &CiliumAgentState) -> Vec<(String, u32)> {
    st.pins.iter().map(|p| (p.map.clone(), p.id)).collect()
}

/// One check of the node, with the node-delete hold-off waited out when needed.
async fn check_pass(opts: &CheckOptions, agent: Option<&crate::cilium::state::AgentConfig>, cilium_mesh: Option<&[crate::cilium::models::RemoteCluster]>) -> Result<Pass, CheckError> {
    let mut pass = check_once(opts, agent, cilium_mesh, &[]).await?;
    if opts.hold_off_wait && !pass.hold_off.held.is_empty() {
        // A deleted node's entries are still there and its delete cannot be placed far enough
        // back: wait until Cilium has certainly applied it (a delete is never later than the
        // read), then check afresh; what is still there now is drift.
        let until = pass.held_until.unwrap_or_else(chrono::Utc::now) + chrono::Duration::from_std(opts.settle).unwrap_or_default();
        let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default().min(opts.hold_off + opts.settle);
        tracing::info!(wait = ?wait, held = pass.hold_off.held.len(), "waiting for Cilium's node-delete hold-off to end");
        tokio::time::sleep(wait).await;
        let first_read = (pass.first_revision, pass.first_read_at);
        pass = check_once(opts, agent, cilium_mesh, &[first_read]).await?;
        pass.hold_off.waited_ms = wait.as_millis();
    }
    Ok(pass)
}

/// A pin younger than this, with the programs on another map and no Cilium API to ask, may be
/// a restart whose endpoints are still regenerating: the finding says so.
const YOUNG_PIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// `datapath-map-mismatch` evidence: when the pin was made and what the Cilium agent said. With
/// the agent ready (every restored endpoint regenerated) a mismatch is a map the programs were
/// left on (#45196); without its API a young pin may be a restart in progress.
fn annotate_map_mismatches(findings: &mut [Finding], cilium: &CiliumAgentState, now: chrono::DateTime<chrono::Utc>) {
    for f in findings.iter_mut().filter(|f| f.kind == FindingKind::DatapathMapMismatch) {
        let pinned_at = cilium.pins.iter().find(|p| p.map == f.subject).and_then(|p| p.pinned_at.clone());
        let age = pinned_at.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| now - t.with_timezone(&chrono::Utc));
        if let Some(serde_json::Value::Object(mut m)) = f.datapath.as_ref().map(super::diff::Evidence::value) {
            m.insert("pinned_at".into(), serde_json::json!(pinned_at));
            m.insert("cilium_agent".into(), serde_json::json!(cilium.summary()));
            f.datapath = super::diff::Evidence::of(m);
        }
        match age {
            Some(age) if cilium.state == crate::cilium::Readiness::Unknown && age < YOUNG_PIN => f.message.push_str(&format!(
                "; the pin is {} s old: if Cilium restarted then, its endpoints may still be regenerating (with access to its API socket kvcheck would know)",
                age.num_seconds()
            )),
            _ if cilium.state == crate::cilium::Readiness::Ready => f.message.push_str("; the Cilium agent is ready and has regenerated every endpoint it restored, so these programs were left on that map"),
            _ => {}
        }
    }
}

/// The report when the Cilium agent did not become ready in time: no findings, its state, and
/// the kvstore's health (which does not depend on Cilium).
async fn not_judged(opts: &CheckOptions, cilium: CiliumAgentState, took: Duration) -> CheckReport {
    let health = health::cluster_health(&opts.etcd, opts.etcd_timeout).await;
    CheckReport {
        node: NodeId { name: opts.node_name.clone(), cluster: opts.cluster.clone() },
        status: "cilium-not-ready",
        counts: Counts { total: 0, critical: 0, warning: 0, info: 0, by_kind: Default::default() },
        findings: Vec::new(),
        sources: Sources {
            cilium,
            endpoints: StateSource::Kvstore,
            kubernetes: None,
            identities: IdentitiesSource::default(),
            clustermesh: None,
            datapath: None,
            kvstore: KvstoreSource { status: health.status_line(), revision: health.endpoints.iter().filter_map(|e| e.revision).max().unwrap_or(0), read_at: chrono::Utc::now().to_rfc3339(), keys: 0 },
            config: DatapathConfig::default(),
            assumptions: Vec::new(),
        },
        settle: SettleInfo { window_ms: opts.settle.as_millis(), settled: Vec::new(), reread_keys: 0, reread_revision: None, reread_at: None },
        hold_off: HoldOffInfo { window_ms: opts.hold_off.as_millis(), ..Default::default() },
        duration_ms: took.as_millis(),
    }
}

/// One read, diff, hold-off and settle of the node.
struct Pass {
    reading: Reading,
    findings: Vec<Finding>,
    notes: Notes,
    settle: SettleInfo,
    hold_off: HoldOffInfo,
    /// The latest hold-off end among the held nodes that explain findings.
    held_until: Option<chrono::DateTime<chrono::Utc>>,
    first_revision: i64,
    first_read_at: chrono::DateTime<chrono::Utc>,
    config: DatapathConfig,
    kubernetes: Option<KubernetesSource>,
}

/// `earlier`: reads of earlier passes `(revision, time)`, which bound when a delete happened.
async fn check_once(
    opts: &CheckOptions,
    agent: Option<&crate::cilium::state::AgentConfig>,
    cilium_mesh: Option<&[crate::cilium::models::RemoteCluster]>,
    earlier: &[(i64, chrono::DateTime<chrono::Utc>)],
) -> Result<Pass, CheckError> {
    let cfg = node_config(opts, agent)?;
    let (state, health) = StateReader::connect(opts, &cfg, agent, cilium_mesh).await?;
    // Both sides at once: the maps are read on a blocking thread while the kvstore's pages
    // arrive and decode on the runtime (two cores: the check takes the longer of the two).
    let kvstore_read = async {
        let k = state.read(opts).await;
        (k, chrono::Utc::now())
    };
    let datapath_read = async {
        let d = read_datapath(&opts.datapath).await;
        (d, chrono::Utc::now())
    };
    let read_started = chrono::Utc::now();
    let ((kvstore, kvstore_read_at), (datapath, datapath_read_at)) = tokio::join!(kvstore_read, datapath_read);
    let (kvstore, (dp, host)) = (kvstore?, datapath?);
    let mut reading = Reading { datapath: dp, host, kvstore, health, datapath_read_at, kvstore_read_at };
    let ctx = context(&opts.node_name, &opts.cluster, cfg.clone(), &reading);
    // The raw pages and batches the reads freed, given back before the expected state is
    // built (the check's peak).
    crate::release_free_memory();
    let evaluate_started = std::time::Instant::now();
    let (mut findings, notes) = evaluate(&ctx, &reading);
    let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    tracing::debug!(
        kvstore_ms = ms(kvstore_read_at - read_started),
        datapath_ms = ms(datapath_read_at - read_started),
        evaluate_ms = evaluate_started.elapsed().as_secs_f64() * 1000.0,
        findings = findings.len(),
        "read both sides and evaluated"
    );
    let first_revision = reading.kvstore.revision;

    // Entries of a node deleted less than the hold-off ago are Cilium's, not drift (kvstore
    // mode only: in CRD mode Cilium deletes a node's entries with its CiliumNode).
    let mut hold_off = HoldOffInfo { window_ms: opts.hold_off.as_millis(), ..Default::default() };
    let mut held_until = None;
    let stale = |f: &Finding| matches!(f.kind, FindingKind::IpcacheStale | FindingKind::TunnelStale);
    if let Some(etcd) = state.etcd.as_ref().filter(|_| !opts.hold_off.is_zero() && findings.iter().any(stale)) {
        let held = history::recent_node_deletes(etcd, &reading.kvstore, kvstore_read_at, chrono::Utc::now(), opts.hold_off, earlier).await?;
        if !held.is_empty() {
            reading.kvstore.held_nodes = held;
            let (with_held, _) = evaluate(&ctx, &reading);
            let remaining: BTreeSet<(FindingKind, String)> = with_held.iter().map(Finding::id).collect();
            hold_off.held = findings.iter().map(Finding::id).filter(|id| !remaining.contains(id)).collect();
            hold_off.nodes = reading.kvstore.held_nodes.iter().map(HeldNodeInfo::of).collect();
            held_until = reading.kvstore.held_nodes.iter().map(|h| h.held_until).max();
            findings = with_held;
        }
    }

    let mut settle = SettleInfo { window_ms: opts.settle.as_millis(), settled: Vec::new(), reread_keys: 0, reread_revision: None, reread_at: None };
    if !findings.is_empty() && !opts.settle.is_zero() {
        // Kvstore side: only the keys the findings name (Kubernetes objects: their kinds listed
        // again). Datapath side: the maps again (an LPM lookup cannot tell an exact entry from
        // a covering prefix, and a batch read of a full ipcache takes ~0.25 s).
        let keys: BTreeSet<String> = findings.iter().flat_map(|f| f.kvstore_keys.iter().cloned()).collect();
        let on_objects = keys.iter().any(|k| StateSource::of_reference(k) == StateSource::Kubernetes);
        let window = if on_objects { opts.settle.max(KUBERNETES_SETTLE) } else { opts.settle };
        settle.window_ms = window.as_millis();
        tokio::time::sleep(window).await;
        let rev = state.reread(opts, &mut reading.kvstore, &keys).await?;
        reading.kvstore_read_at = chrono::Utc::now();
        let (dp, host) = read_datapath(&opts.datapath).await?;
        reading.datapath = dp;
        reading.host = host;
        reading.datapath_read_at = chrono::Utc::now();
        let ctx = context(&opts.node_name, &opts.cluster, cfg.clone(), &reading);
        let (again, _) = evaluate(&ctx, &reading);
        let persisting: BTreeSet<(FindingKind, String)> = again.iter().map(Finding::id).collect();
        settle.settled = findings.iter().map(Finding::id).filter(|id| !persisting.contains(id)).collect();
        let first: BTreeSet<(FindingKind, String)> = findings.iter().map(Finding::id).collect();
        // Keep the re-read evidence of findings that persisted.
        findings = again.into_iter().filter(|f| first.contains(&f.id())).collect();
        // A key absent at both reads may have lived in between: a pod created and deleted
        // within the window, its ipcache entry ahead of its key at the first read and behind
        // its delete at the second. That is the same finding twice, not one drift.
        let stale = |f: &Finding| f.kind == FindingKind::IpcacheStale && f.kvstore_keys.iter().any(|k| k.starts_with(crate::kvstore::values::IP_PREFIX));
        if let (Some(etcd), Some(rev)) = (state.etcd.as_ref().filter(|_| findings.iter().any(stale)), rev) {
            match history::keys_touched(etcd, crate::kvstore::values::IP_PREFIX, first_revision + 1, rev).await {
                Ok(touched) => {
                    let lived: BTreeSet<(FindingKind, String)> = findings.iter().filter(|f| stale(f) && f.kvstore_keys.iter().any(|k| touched.contains(k))).map(Finding::id).collect();
                    findings.retain(|f| !lived.contains(&f.id()));
                    settle.settled.extend(lived);
                }
                Err(e) => tracing::warn!(error = %e, "could not replay the kvstore between the two reads; keeping the stale findings"),
            }
        }
        settle.reread_keys = keys.len();
        settle.reread_revision = rev;
        settle.reread_at = Some(reading.kvstore_read_at.to_rfc3339());
    }
    let kubernetes = state.kubernetes_source(&reading.kvstore);
    Ok(Pass { reading, findings, notes, settle, hold_off, held_until, first_revision, first_read_at: kvstore_read_at, config: cfg, kubernetes })
}

fn report(opts: &CheckOptions, cilium: CiliumAgentState, pass: Pass, took: Duration) -> CheckReport {
    let Pass { reading: mut r, mut findings, notes, settle, hold_off, first_revision: revision, config, kubernetes, .. } = pass;
    annotate_map_mismatches(&mut findings, &cilium, chrono::Utc::now());
    let mut by_kind = std::collections::BTreeMap::new();
    for f in &findings {
        *by_kind.entry(f.kind).or_insert(0) += 1;
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    let dp = &r.datapath;
    let mut maps = vec![dp.ipcache.meta.clone(), dp.endpoints.meta.clone()];
    let mut entries = vec![(dp.ipcache.meta.name.clone(), dp.ipcache.entry_count), (dp.endpoints.meta.name.clone(), dp.endpoints.entry_count)];
    if let Some(t) = &dp.tunnel {
        maps.push(t.meta.clone());
        entries.push((t.meta.name.clone(), t.entry_count));
    }
    // The remotes' entries are not part of the report (only their counts).
    let clustermesh = r.kvstore.mesh.take().map(|m| m.into_summary());
    let kv = &r.kvstore;
    let report = CheckReport {
        node: NodeId { name: opts.node_name.clone(), cluster: opts.cluster.clone() },
        status: if findings.is_empty() { "consistent" } else { "drift" },
        counts: Counts { total: findings.len(), critical: count(Severity::Critical), warning: count(Severity::Warning), info: count(Severity::Info), by_kind },
        findings,
        sources: Sources {
            cilium,
            endpoints: r.kvstore.origin.endpoints,
            kubernetes,
            identities: notes.identities,
            clustermesh,
            datapath: Some(DatapathSource { bpffs: dp.bpffs.clone(), live_maps: dp.live_maps.clone(), layout: dp.layout.clone(), maps, entries, read_at: r.datapath_read_at.to_rfc3339() }),
            kvstore: KvstoreSource {
                status: r.health.status_line(),
                revision,
                read_at: r.kvstore_read_at.to_rfc3339(),
                keys: kv.nodes.len() + kv.ips.len() + kv.identities.len() + kv.identity_references.len() + kv.malformed.len(),
            },
            config,
            assumptions: notes.assumptions,
        },
        settle,
        hold_off,
        duration_ms: took.as_millis(),
    };
    drop_aside(r);
    report
}
