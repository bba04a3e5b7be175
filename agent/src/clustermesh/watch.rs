//! The agent's ClusterMesh: one list+watch per remote cluster, as Cilium's agent keeps one per
//! remote. Each batch re-decodes that remote from its raw mirror and says which ipcache
//! prefixes changed; a lost connection makes the remote unreachable (not judged) until the
//! watch resumes from its last revision; a changed cluster-config restarts it (Cilium drains
//! and re-watches on an id change).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use ipnet::IpNet;

use super::config::{self, ClusterConfig, RemotePrefixes, CLUSTER_CONFIG_PREFIX};
use super::discovery::RemoteConfigFile;
use super::reader::MeshOptions;
use super::{LocalCluster, Mesh, RemoteCluster, RemoteStatus};
use crate::backoff::Backoff;
use crate::kvstore::client::Etcd;
use crate::kvstore::reader::ListOptions;
use crate::kvstore::values::KvMeta;
use crate::kvstore::watch::{Change, KvstoreWatcher};

/// How often a remote without a usable cluster-config (or not synced) is looked at again.
const RECHECK_CONFIG: Duration = Duration::from_secs(10);

type Opening = Pin<Box<dyn Future<Output = Result<Opened, String>> + Send>>;

enum Opened {
    Watching(Box<KvstoreWatcher>, ClusterConfig),
    /// Reached, but Cilium would not sync it (yet).
    NotUsable(RemoteStatus, String, Option<ClusterConfig>),
}

struct RemoteWatch {
    file: RemoteConfigFile,
    watcher: Option<Box<KvstoreWatcher>>,
    config: Option<ClusterConfig>,
    /// A (re)connect in progress, kept across the agent's select (which drops `next`).
    opening: Option<Opening>,
    retry: Backoff,
    status: RemoteStatus,
    /// Watch streams opened, over every watcher of this remote.
    reconnects: u64,
    /// Connect attempts (the first is not delayed).
    attempts: u64,
}

/// What one remote's change did: its state now, and what to re-check.
pub struct RemoteUpdate {
    pub remote: RemoteCluster,
    pub touched: Vec<IpNet>,
    /// Re-check everything (a node changed, the remote became (un)judged).
    pub full: bool,
}

pub struct MeshWatch {
    opts: MeshOptions,
    local: LocalCluster,
    remotes: Vec<RemoteWatch>,
    inactive: Option<String>,
}

impl MeshWatch {
    /// Finds the remotes and connects to each (concurrently; one that cannot be read starts
    /// unreachable and is retried by `next`). Returns the watch and the mesh as first read.
    pub async fn start(opts: &MeshOptions, local: LocalCluster) -> Result<(MeshWatch, Mesh), String> {
        let (mesh, files) = super::reader::discover(opts, local.clone())?;
        let mut remotes: Vec<RemoteWatch> = files
            .into_iter()
            .map(|file| RemoteWatch { file, watcher: None, config: None, opening: None, retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)), status: RemoteStatus::Unreachable, reconnects: 0, attempts: 0 })
            .collect();
        let mut first = Vec::new();
        if mesh.inactive.is_none() {
            let (o, l) = (opts.clone(), local.clone());
            first = futures::future::join_all(remotes.iter_mut().map(|r| {
                let (o, l) = (o.clone(), l.clone());
                async move { r.step(&l, &o).await.remote }
            }))
            .await;
        }
        let w = MeshWatch { opts: opts.clone(), local, remotes, inactive: mesh.inactive.clone() };
        for r in &mut first {
            w.validate_id(r);
        }
        let mesh = if first.is_empty() { mesh } else { Mesh { remotes: first, ..mesh } };
        Ok((w, mesh))
    }

    /// A mesh without remotes (the config directory could not be read).
    pub fn empty(opts: &MeshOptions, local: LocalCluster) -> MeshWatch {
        MeshWatch { opts: opts.clone(), local, remotes: Vec::new(), inactive: None }
    }

    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty() || self.inactive.is_some()
    }

    /// The next change of any remote (never, without remotes).
    pub async fn next(&mut self) -> RemoteUpdate {
        if self.is_empty() {
            return std::future::pending().await;
        }
        let (local, opts) = (self.local.clone(), self.opts.clone());
        let steps = self.remotes.iter_mut().map(|r| Box::pin(r.step(&local, &opts)));
        let (mut update, _, _) = futures::future::select_all(steps).await;
        self.validate_id(&mut update.remote);
        update
    }

    /// Cilium's one-id-per-remote rule: the first remote (by name) to claim an id keeps it.
    fn validate_id(&self, r: &mut RemoteCluster) {
        let Some(cfg) = r.cluster_config.clone().filter(|_| r.status.judged() || r.status == RemoteStatus::NotSynced) else { return };
        let taken: Vec<u32> = self.remotes.iter().take_while(|w| w.file.name != r.name).filter_map(|w| w.config.as_ref().map(|c| c.id)).collect();
        if let Some(why) = config::validate(&cfg, self.local.id, self.local.max_connected_clusters, &taken) {
            r.clear();
            r.not_judged(RemoteStatus::InvalidConfig, format!("Cilium refuses cilium/cluster-config/{}: {why}", r.name));
        }
    }

    /// Whether the config directory changed (a remote added, removed or re-configured):
    /// the caller then starts the mesh over, as Cilium re-connects or drains.
    pub fn config_changed(&self) -> bool {
        let Ok((files, _)) = super::discovery::config_files(&self.opts.config_dir, &self.local.name) else { return false };
        files.len() != self.remotes.len() || files.iter().zip(&self.remotes).any(|(f, r)| f.name != r.file.name || f.settings != r.file.settings)
    }

    /// Per remote: its name, status and watch streams opened (for metrics and health lines).
    pub fn statuses(&self) -> Vec<(String, RemoteStatus, u64)> {
        self.remotes.iter().map(|r| (r.file.name.clone(), r.status, r.reconnects)).collect()
    }
}

impl RemoteWatch {
    fn blank(&self) -> RemoteCluster {
        let mut r = RemoteCluster::new(&self.file);
        r.cluster_config = self.config.clone();
        r.prefixes = self.config.as_ref().map(|c| RemotePrefixes::of(&self.file.name, c));
        r
    }

    /// One step: a connect attempt when not watching, else the next watch batch.
    async fn step(&mut self, local: &LocalCluster, opts: &MeshOptions) -> RemoteUpdate {
        let Some(w) = self.watcher.as_mut() else { return self.open(local, opts).await };
        let was = self.status;
        if was == RemoteStatus::Unreachable {
            // Reachable again: judged from the mirror at once; the events it missed follow.
            let result = w.ensure_open().await;
            self.reconnects = w.streams_opened;
            return match result {
                Ok(()) => {
                    let remote = self.decode(local);
                    tracing::info!(event = "clustermesh-remote-resumed", cluster = %self.file.name, revision = remote.revision, "remote cluster reachable again; watch resumed");
                    RemoteUpdate { remote, touched: Vec::new(), full: true }
                }
                Err(e) => {
                    let mut r = self.blank();
                    r.not_judged(RemoteStatus::Unreachable, e.to_string());
                    RemoteUpdate { remote: r, touched: Vec::new(), full: false }
                }
            };
        }
        match w.next().await {
            Ok(batch) => {
                self.reconnects = w.streams_opened;
                let cfg_key = format!("{CLUSTER_CONFIG_PREFIX}{}", self.file.name);
                if batch.changes.iter().any(|c| c.key() == cfg_key) {
                    let now = self.watcher.as_ref().and_then(|w| w.mirror().keys.get(cfg_key.as_str())).and_then(|v| config::parse(&v.value).ok());
                    if now != self.config {
                        // Cilium drains the cluster and watches it anew under the new config.
                        tracing::info!(event = "clustermesh-config-changed", cluster = %self.file.name, "remote cluster-config changed: re-reading the cluster");
                        self.watcher = None;
                        return self.open(local, opts).await;
                    }
                }
                let remote = self.decode(local);
                let touched = touched(&remote, &batch.changes);
                let full = self.status != was || batch.changes.iter().any(|c| remote.prefixes.as_ref().is_some_and(|p| c.key().starts_with(&p.nodes)));
                RemoteUpdate { remote, touched, full }
            }
            Err(e) => {
                // The watcher resumes from its last revision on the next call (with backoff).
                self.reconnects = w.streams_opened;
                self.status = RemoteStatus::Unreachable;
                let mut r = self.blank();
                r.not_judged(RemoteStatus::Unreachable, e.to_string());
                RemoteUpdate { remote: r, touched: Vec::new(), full: was != self.status }
            }
        }
    }

    fn decode(&mut self, local: &LocalCluster) -> RemoteCluster {
        let mut r = self.blank();
        let Some(w) = self.watcher.as_ref() else { return r };
        let m = w.mirror();
        r.revision = m.revision;
        r.read_at = Some(chrono::Utc::now().to_rfc3339());
        r.decode(local, m.keys.iter().map(|(k, v)| (KvMeta { key: k.clone(), mod_revision: v.mod_revision, lease: v.lease }, v.value.as_slice())));
        let missing = r.missing_canaries();
        if missing.is_empty() {
            r.status = RemoteStatus::Synced;
        } else {
            r.not_judged(RemoteStatus::NotSynced, format!("sync canaries missing: {}", missing.join(", ")));
        }
        self.status = r.status;
        r
    }

    async fn open(&mut self, local: &LocalCluster, opts: &MeshOptions) -> RemoteUpdate {
        if self.opening.is_none() {
            let delay = if self.attempts == 0 { Duration::ZERO } else { self.retry.next_delay() };
            self.attempts += 1;
            let (file, opts) = (self.file.clone(), opts.clone());
            self.opening = Some(Box::pin(async move {
                tokio::time::sleep(delay).await;
                open(&file, &opts).await
            }));
        }
        let Some(opening) = self.opening.as_mut() else { unreachable!() };
        let result = opening.await;
        self.opening = None;
        let was = self.status;
        match result {
            Ok(Opened::Watching(w, cfg)) => {
                self.reconnects += 1;
                self.config = Some(cfg);
                self.watcher = Some(w);
                self.retry.reset();
                let remote = self.decode(local);
                tracing::info!(event = "clustermesh-remote-listed", cluster = %self.file.name, status = ?remote.status, nodes = remote.counts.nodes, ips = remote.counts.ips, identities = remote.counts.identities, "remote cluster listed; watching");
                RemoteUpdate { remote, touched: Vec::new(), full: true }
            }
            Ok(Opened::NotUsable(status, why, cfg)) => {
                self.config = cfg;
                self.status = status;
                // Not a connection problem: look again at a steady pace.
                self.retry = Backoff::new(RECHECK_CONFIG, RECHECK_CONFIG);
                let mut r = self.blank();
                r.not_judged(status, why);
                RemoteUpdate { remote: r, touched: Vec::new(), full: was != status }
            }
            Err(why) => {
                self.status = RemoteStatus::Unreachable;
                let mut r = self.blank();
                r.not_judged(RemoteStatus::Unreachable, why);
                RemoteUpdate { remote: r, touched: Vec::new(), full: was != self.status }
            }
        }
    }
}

/// Connects, reads the cluster-config, and lists the remote's prefixes plus its cluster-config
/// key (watched so that a change is noticed).
async fn open(file: &RemoteConfigFile, opts: &MeshOptions) -> Result<Opened, String> {
    let etcd = Etcd::connect(&file.settings, opts.timeout).await.map_err(|e| e.to_string())?;
    let key = format!("{CLUSTER_CONFIG_PREFIX}{}", file.name);
    let resp = etcd.call(format!("get {key}"), etcd.client.kv_client().get(key.as_str(), None)).await.map_err(|e| e.to_string())?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(Opened::NotUsable(RemoteStatus::NoClusterConfig, format!("{key} does not exist: Cilium (v1.16+) requires it and syncs nothing from this cluster until it is there"), None));
    };
    let cfg = match config::parse(kv.value()) {
        Ok(c) => c,
        Err(why) => return Ok(Opened::NotUsable(RemoteStatus::InvalidConfig, format!("{key}: {why}"), None)),
    };
    let mut prefixes = RemotePrefixes::of(&file.name, &cfg).all(&file.name);
    prefixes.push(key);
    let list = ListOptions { page_size: opts.page_size, include_cache: false };
    let w = KvstoreWatcher::start_on(file.settings.clone(), etcd, list, prefixes).await.map_err(|e| e.to_string())?;
    Ok(Opened::Watching(Box::new(w), cfg))
}

/// The ipcache prefixes a batch of a remote's changes touched: its pod IPs' (from the key).
fn touched(r: &RemoteCluster, changes: &[Change]) -> Vec<IpNet> {
    let Some(p) = &r.prefixes else { return Vec::new() };
    changes
        .iter()
        .filter_map(|c| c.key().strip_prefix(p.ips.as_str()))
        .filter_map(|rest| rest.parse::<IpNet>().ok().or_else(|| rest.parse::<std::net::IpAddr>().ok().map(IpNet::from)))
        .collect()
}
