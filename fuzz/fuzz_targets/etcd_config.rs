//! Cilium's etcd.config YAML (also each ClusterMesh remote's config file).
#![no_main]

use kvcheck::kvstore::config::EtcdSettings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = EtcdSettings::from_config_text(&text, std::path::Path::new("etcd.config")) {
        let _ = s.validate();
    }
});
