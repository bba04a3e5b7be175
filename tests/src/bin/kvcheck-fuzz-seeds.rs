//! Writes the fuzz targets' seed corpora (`fuzz/`) from the real samples in tests/data: what real
//! Cilium agents, etcd and the Kubernetes API gave, in each target's input format.
//! Usage: kvcheck-fuzz-seeds DIR (one sub-directory per target).

use std::path::Path;

use anyhow::{Context as _, Result};
use kvcheck::model::version::Layout;
use kvcheck_tests::sample;

fn main() -> Result<()> {
    let out = std::env::args().nth(1).context("usage: kvcheck-fuzz-seeds DIR")?;
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let mut seeds = Seeds { dir: Path::new(&out).to_owned(), written: 0 };

    for (text, layout) in [(sample::REAL_1_7_1, Layout::V1_7), (sample::REAL_1_16_15, Layout::V1_15)] {
        let s = sample::sections(text);
        let pairs = sample::etcd_pairs(sample::section(&s, "etcdctl get --prefix cilium/"));
        for (k, v) in &pairs {
            seeds.write("kvstore_values", format!("{k}\n{v}").as_bytes())?;
        }
        // The same keys as etcd's range response carries them: all at once, and a page of two.
        let kvs: Vec<(&[u8], &[u8], i64, i64)> = pairs.iter().enumerate().map(|(i, (k, v))| (k.as_bytes(), v.as_bytes(), 100 + i as i64, 0)).collect();
        seeds.write("etcd_range", &kvcheck::kvstore::range::encode_response(&kvs, false, kvs.len() as i64, 500))?;
        seeds.write("etcd_range", &kvcheck::kvstore::range::encode_response(&kvs[..kvs.len().min(2)], true, kvs.len() as i64, 500))?;
        let layout_byte = Layout::ALL.iter().position(|l| *l == layout).context("layout")? as u8;
        for map in ["cilium_ipcache", "cilium_lxc", "cilium_tunnel_map"] {
            for (k, v) in sample::bpftool_entries(sample::section(&s, &format!("globals/{map}"))) {
                let mut input = vec![layout_byte, k.len() as u8];
                input.extend(k);
                input.extend(v);
                seeds.write("map_codecs", &input)?;
            }
        }
        seeds.write("node_config", sample::section(&s, "node_config.h").join("\n").as_bytes())?;
        // A remote cluster whose keys are this node's (cluster 2 of up to 255, then of 511).
        let remote: Vec<String> = pairs.iter().flat_map(|(k, v)| [k.replace("/default/", "/remote/"), v.clone()]).collect();
        for (head, cfg) in [([1u8, 0u8], r#"{"id":2,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#), ([1, 1], r#"{"id":300,"capabilities":{"cached":true,"maxConnectedClusters":511}}"#)] {
            let mut input = head.to_vec();
            input.extend(format!("{cfg}\n{}", remote.join("\n")).into_bytes());
            seeds.write("clustermesh", &input)?;
        }
    }

    // Helm's etcd.config, a TLS one with credentials, and a ClusterMesh remote's.
    for text in [
        "---\nendpoints:\n  - https://etcd-1:2379\ntrusted-ca-file: '/var/lib/etcd-secrets/etcd-client-ca.crt'\nkey-file: '/var/lib/etcd-secrets/etcd-client.key'\ncert-file: '/var/lib/etcd-secrets/etcd-client.crt'\n",
        "endpoints: [\"http://kv:pw@10.0.0.1:2379\", http://10.0.0.2:2379]\nusername: kvcheck\npassword: \"s\"\ninsecure-skip-tls-verify: true\n",
        "endpoints:\n- https://cluster2.mesh.cilium.io:2379\ntrusted-ca-file: /var/lib/cilium/clustermesh/cluster2-ca.crt\n",
    ] {
        seeds.write("etcd_config", text.as_bytes())?;
    }

    for dir in ["cilium-api/v1.7.1", "cilium-api/v1.16.15"] {
        for file in std::fs::read_dir(data.join(dir)).with_context(|| format!("reading tests/data/{dir}"))? {
            let path = file?.path();
            if path.extension().is_some_and(|e| e == "json") {
                seeds.write("cilium_api", &std::fs::read(&path)?)?;
            }
        }
    }

    // Each object of the captured lists, as the API serves it.
    for dir in ["k8s/v1.16.15-crd", "k8s/v1.16.15-ces", "k8s/v1.16.15-hybrid"] {
        for file in std::fs::read_dir(data.join(dir))? {
            let list: serde_json::Value = serde_json::from_slice(&std::fs::read(file?.path())?)?;
            for item in list["items"].as_array().into_iter().flatten() {
                seeds.write("k8s_objects", &serde_json::to_vec(item)?)?;
            }
        }
    }

    // The BTF of kvcheck's own eBPF object (the kernel's is megabytes): real types to mutate.
    let object = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/kvcheck-ebpf");
    match std::fs::read(&object).ok().and_then(|elf| btf_section(&elf)) {
        Some(btf) => seeds.write("btf", &btf)?,
        None => eprintln!("kvcheck-fuzz-seeds: no .BTF in {} (not built?): the btf target starts from nothing", object.display()),
    }
    println!("kvcheck-fuzz-seeds: {} seeds in {out}", seeds.written);
    Ok(())
}

fn btf_section(elf: &[u8]) -> Option<Vec<u8>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(elf).ok()?;
    Some(file.section_by_name(".BTF")?.data().ok()?.to_vec())
}

struct Seeds {
    dir: std::path::PathBuf,
    written: usize,
}

impl Seeds {
    fn write(&mut self, target: &str, input: &[u8]) -> Result<()> {
        let dir = self.dir.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{:04}", self.written)), input)?;
        self.written += 1;
        Ok(())
    }
}
