//! A remote cluster's `cilium/cluster-config/<name>` value (first line), validated as Cilium's
//! agent does, then the remote's keys and values (`<key>\n<value>` pairs after it) decoded with
//! that config against a local cluster whose id and cluster count come from the first bytes.
#![no_main]

use std::path::PathBuf;

use kvcheck::clustermesh::config::{self, RemotePrefixes};
use kvcheck::clustermesh::discovery::RemoteConfigFile;
use kvcheck::clustermesh::{LocalCluster, RemoteCluster};
use kvcheck::kvstore::config::EtcdSettings;
use kvcheck::kvstore::values::KvMeta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [local_id, extended, rest @ ..] = data else { return };
    let local = LocalCluster { name: "local".into(), id: u32::from(*local_id), max_connected_clusters: if extended & 1 == 1 { 511 } else { 255 }, id_from: "fuzz".into() };
    let mut lines = rest.split(|&b| b == b'\n');
    let Some(cfg) = lines.next() else { return };
    let Ok(cfg) = config::parse(cfg) else { return };
    let _ = config::validate(&cfg, local.id, local.max_connected_clusters, &[]);
    let file = RemoteConfigFile { name: "remote".into(), path: PathBuf::from("remote"), settings: EtcdSettings::default() };
    let mut remote = RemoteCluster::new(&file);
    remote.prefixes = Some(RemotePrefixes::of(&remote.name, &cfg));
    remote.cluster_config = Some(cfg);
    let pairs: Vec<(&[u8], &[u8])> = {
        let rest: Vec<&[u8]> = lines.collect();
        rest.chunks(2).map(|c| (c[0], c.get(1).copied().unwrap_or_default())).collect()
    };
    remote.decode(&local, pairs.iter().map(|(k, v)| (KvMeta { key: String::from_utf8_lossy(k).as_ref().into(), mod_revision: 1, lease: 0 }, *v)));
    for i in remote.identities.keys().chain(remote.invalid_identities.keys()) {
        let _ = local.cluster_of(*i);
    }
    if let Some(c) = remote.id() {
        let _ = local.range_of(c);
    }
});
