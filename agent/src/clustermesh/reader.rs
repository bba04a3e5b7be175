//! Reading each remote cluster as Cilium's agent connects to it: connect, read its
//! cluster-config, wait for its sync canaries, list its prefixes (one revision per remote).
//!
//! Cilium: `pkg/clustermesh/common/remote_cluster.go` (connection sequence),
//! `pkg/kvstore/store/watchstoremgr.go` (canaries gate each prefix).

use std::path::PathBuf;
use std::time::Duration;

use super::config::{self, RemotePrefixes, CLUSTER_CONFIG_PREFIX};
use super::discovery::{self, RemoteConfigFile};
use super::{LocalCluster, Mesh, RemoteCluster, RemoteStatus};
use crate::kvstore::client::Etcd;
use crate::kvstore::reader::list_prefix;

/// How to find and read the remotes.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Cilium's `--clustermesh-config` directory.
    pub config_dir: PathBuf,
    /// The local cluster id, when given (else the Cilium agent's, else this node's entry's).
    pub cluster_id: Option<u32>,
    pub max_connected_clusters: Option<u32>,
    pub timeout: Duration,
    pub page_size: i64,
}

/// The local cluster: its name as given, its id from `--cluster-id`, else the Cilium agent's
/// configuration, else this node's own entry (which Cilium writes with its ClusterID).
pub fn local_cluster(opts: &MeshOptions, name: &str, node_name: &str, agent: Option<&crate::cilium::state::AgentConfig>, snap: &crate::kvstore::reader::KvstoreSnapshot) -> LocalCluster {
    let own = snap.nodes.iter().find(|n| n.name == node_name && n.cluster == name);
    let (id, id_from) = match (opts.cluster_id, agent.and_then(|a| a.cluster_id), own) {
        (Some(id), _, _) => (id, "--cluster-id".to_owned()),
        (None, Some(id), _) => (id, "the Cilium agent's configuration".to_owned()),
        (None, None, Some(n)) => (n.cluster_id, format!("ClusterID of {}", n.meta.key)),
        (None, None, None) => (0, "no --cluster-id, Cilium agent API or node entry".to_owned()),
    };
    let max = opts.max_connected_clusters.or_else(|| agent.and_then(|a| a.max_connected_clusters)).unwrap_or(255);
    LocalCluster { name: name.to_owned(), id, max_connected_clusters: max, id_from }
}

/// Judges only the remotes the Cilium agent says it has synced (its `/v1/healthz`
/// `cluster-mesh`): until then, missing and leftover entries are its sync in progress.
/// Returns whether a remote's status changed (gating is undone first, so it follows Cilium).
pub fn gate_on_cilium(mesh: &mut Mesh, cilium: &[crate::cilium::models::RemoteCluster]) -> bool {
    let before: Vec<RemoteStatus> = mesh.remotes.iter().map(|r| r.status).collect();
    for r in mesh.remotes.iter_mut().filter(|r| r.status == RemoteStatus::CiliumNotSynced) {
        r.status = RemoteStatus::Synced;
        r.reason = None;
    }
    for r in mesh.remotes.iter_mut().filter(|r| r.status.judged()) {
        let why = match cilium.iter().find(|c| c.name == r.name) {
            None => Some("the Cilium agent does not list it (not connected yet)".to_owned()),
            Some(c) if c.ready == Some(false) => Some(format!("the Cilium agent reports it not ready: {}", c.status)),
            Some(c) => c.synced.as_ref().filter(|s| !(s.nodes && s.endpoints && s.identities)).map(|s| format!("the Cilium agent has not synced it yet (nodes {}, endpoints {}, identities {})", s.nodes, s.endpoints, s.identities)),
        };
        if let Some(why) = why {
            r.not_judged(RemoteStatus::CiliumNotSynced, why);
        }
    }
    mesh.remotes.iter().map(|r| r.status).ne(before)
}

/// Reads `clusters` of `mesh` again (their config files too).
pub async fn reread(mesh: &mut Mesh, clusters: &std::collections::BTreeSet<&str>, opts: &MeshOptions) {
    let local = mesh.local.clone();
    for r in mesh.remotes.iter_mut().filter(|r| clusters.contains(r.name.as_str())) {
        match crate::kvstore::config::EtcdSettings::from_config_file(&r.config_file) {
            Ok(settings) => {
                let file = RemoteConfigFile { name: r.name.clone(), path: r.config_file.clone(), settings };
                read_remote(r, &file, &local, opts).await;
            }
            Err(e) => {
                r.clear();
                r.not_judged(RemoteStatus::Unreachable, e.to_string());
            }
        }
    }
}

/// The remotes configured in `opts.config_dir` for local cluster `local` (none read yet).
pub fn discover(opts: &MeshOptions, local: LocalCluster) -> Result<(Mesh, Vec<RemoteConfigFile>), String> {
    let (files, ignored) = discovery::config_files(&opts.config_dir, &local.name)?;
    let inactive = (local.id == 0 && !files.is_empty()).then(|| {
        format!("the local cluster id is 0 ({}): Cilium builds no ClusterMesh, so no remote cluster's entries are expected", local.id_from)
    });
    let remotes = files.iter().map(RemoteCluster::new).collect();
    Ok((Mesh { config_dir: opts.config_dir.clone(), local, remotes, ignored, inactive }, files))
}

/// Reads every remote (concurrently), then applies Cilium's one-id-per-cluster rule in name
/// order (the first to claim an id keeps it).
pub async fn read_all(mesh: &mut Mesh, files: &[RemoteConfigFile], opts: &MeshOptions) {
    if mesh.inactive.is_some() {
        return;
    }
    let local = mesh.local.clone();
    let reads = mesh.remotes.iter_mut().zip(files).map(|(r, f)| read_remote(r, f, &local, opts));
    futures::future::join_all(reads).await;
    let mut taken = Vec::new();
    for r in &mut mesh.remotes {
        let Some(cfg) = r.cluster_config.clone() else { continue };
        if let Some(why) = config::validate(&cfg, local.id, local.max_connected_clusters, &taken) {
            r.clear();
            r.not_judged(RemoteStatus::InvalidConfig, format!("Cilium refuses cilium/cluster-config/{}: {why}", r.name));
        } else {
            taken.push(cfg.id);
        }
    }
}

/// One remote, start to end; what went wrong is its status, never an error of the check.
pub async fn read_remote(r: &mut RemoteCluster, file: &RemoteConfigFile, local: &LocalCluster, opts: &MeshOptions) {
    r.clear();
    let etcd = match Etcd::connect(&file.settings, opts.timeout).await {
        Ok(e) => e,
        Err(e) => return r.not_judged(RemoteStatus::Unreachable, e.to_string()),
    };
    if let Err(e) = read_with(r, &etcd, local, opts).await {
        r.clear();
        r.not_judged(RemoteStatus::Unreachable, e.to_string());
    }
}

async fn read_with(r: &mut RemoteCluster, etcd: &Etcd, local: &LocalCluster, opts: &MeshOptions) -> Result<(), crate::kvstore::client::KvstoreError> {
    let key = format!("{CLUSTER_CONFIG_PREFIX}{}", r.name);
    let resp = etcd.call(format!("get {key}"), etcd.client.kv_client().get(key.as_str(), None)).await?;
    let Some(kv) = resp.kvs().first() else {
        r.cluster_config = None;
        r.not_judged(RemoteStatus::NoClusterConfig, format!("{key} does not exist: Cilium (v1.16+) requires it and syncs nothing from this cluster until it is there"));
        return Ok(());
    };
    let cfg = match config::parse(kv.value()) {
        Ok(c) => c,
        Err(why) => {
            r.not_judged(RemoteStatus::InvalidConfig, format!("{key}: {why}"));
            return Ok(());
        }
    };
    let prefixes = RemotePrefixes::of(&r.name, &cfg);
    r.cluster_config = Some(cfg);
    r.prefixes = Some(prefixes.clone());
    let mut revision = None;
    for prefix in prefixes.all(&r.name) {
        // Each page decoded as it arrives (and dropped), all at the first page's revision.
        let rev = list_prefix(etcd, &prefix, revision, opts.page_size, |page, _| {
            r.decode(local, page.iter().map(|kv| (crate::kvstore::reader::meta(kv, crate::kvstore::reader::key_of(kv.key())), kv.value())));
        })
        .await?;
        revision = Some(rev);
    }
    r.revision = revision.unwrap_or(0);
    r.read_at = Some(chrono::Utc::now().to_rfc3339());
    let missing = r.missing_canaries();
    if missing.is_empty() {
        r.status = RemoteStatus::Synced;
        r.reason = None;
    } else {
        r.not_judged(RemoteStatus::NotSynced, format!("sync canaries missing: {} (Cilium waits for each before listing its prefix)", missing.join(", ")));
    }
    Ok(())
}
