//! Finding the remote clusters the way Cilium's agent does: one file per remote in the
//! ClusterMesh config directory, named after the cluster, holding an etcd client config.
//!
//! Cilium: `configDirectoryWatcher` / `isEtcdConfigFile` in `pkg/clustermesh/common/config.go`;
//! the name check of v1.17+ `common/clustermesh.go` `add`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::config::valid_cluster_name;
use crate::kvstore::config::EtcdSettings;

/// Helm's mount of the `cilium-clustermesh` Secret (Cilium reads `--clustermesh-config`, which
/// Helm sets through `CILIUM_CLUSTERMESH_CONFIG`).
pub const DEFAULT_CONFIG_DIR: &str = "/var/lib/cilium/clustermesh/";

/// One remote cluster's config file.
#[derive(Clone, Debug)]
pub struct RemoteConfigFile {
    pub name: String,
    pub path: PathBuf,
    pub settings: EtcdSettings,
}

/// A file Cilium would not use as a remote cluster, and why (reported, not judged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IgnoredFile {
    pub path: PathBuf,
    pub reason: String,
}

/// The remotes in `dir` (sorted by name). A missing directory means no ClusterMesh; files that
/// are not etcd configs (TLS material) are skipped silently as Cilium skips them; the local
/// cluster's own file and invalid names are listed as ignored.
pub fn config_files(dir: &Path, local_name: &str) -> Result<(Vec<RemoteConfigFile>, Vec<IgnoredFile>), String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(format!("reading ClusterMesh config directory {}: {e}", dir.display())),
    };
    let (mut remotes, mut ignored) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // Secret volumes are symlinks to ..data/<file>: follow them, as Cilium (v1.17+) does.
        if name.starts_with('.') || !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if !text.contains("endpoints:") {
            continue;
        }
        let ignore = |reason: String| IgnoredFile { path: path.clone(), reason };
        if name == local_name {
            ignored.push(ignore("the local cluster's own name (Cilium ignores it)".into()));
        } else if !valid_cluster_name(&name) {
            ignored.push(ignore("not a valid cluster name (Cilium v1.17+ refuses it; v1.16 only logs it)".into()));
        } else {
            match EtcdSettings::from_config_text(&text, &path) {
                Ok(settings) => remotes.push(RemoteConfigFile { name, path, settings }),
                Err(e) => ignored.push(ignore(e.to_string())),
            }
        }
    }
    remotes.sort_by(|a, b| a.name.cmp(&b.name));
    ignored.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((remotes, ignored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_remotes_as_cilium_does() {
        let dir = std::env::temp_dir().join(format!("kvcheck-cm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |n: &str, t: &str| std::fs::write(dir.join(n), t).unwrap();
        write("cluster2", "endpoints:\n- https://10.0.0.2:2379\ntrusted-ca-file: /var/lib/cilium/clustermesh/common-etcd-client-ca.crt\n");
        write("common-etcd-client-ca.crt", "-----BEGIN CERTIFICATE-----\n");
        write("cluster1", "endpoints:\n- https://10.0.0.1:2379\n");
        write("Bad_Name", "endpoints:\n- https://10.0.0.3:2379\n");
        let (remotes, ignored) = config_files(&dir, "cluster1").unwrap();
        assert_eq!(remotes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["cluster2"]);
        assert_eq!(remotes[0].settings.endpoints, ["https://10.0.0.2:2379"]);
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(config_files(&dir.join("absent"), "c").unwrap().0.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
