//! CRD mode: kvcheck's reads of the Kubernetes API beside a raw paged list.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::common::*;
use crate::node::BenchNode;
use crate::{Args, Figures};

/// kubectl for the side-by-side figure: `KVCHECK_KUBECTL`, else the oracle's, else PATH.
pub(crate) fn kubectl() -> Option<std::path::PathBuf> {
    let candidates = [std::env::var_os("KVCHECK_KUBECTL").map(std::path::PathBuf::from), Some("/tmp/cilium-modern/bin/kubectl".into())];
    candidates.into_iter().flatten().find(|p| p.exists()).or_else(|| {
        let out = Command::new("sh").args(["-c", "command -v kubectl"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().into())
    })
}

/// The floor: every CiliumEndpoint page read over plain HTTP (limit/continue), nothing decoded
/// but the continue token. Returns the bytes read.
pub(crate) fn raw_paged_list(port: u16, plural: &str, limit: u32) -> Result<usize> {
    use std::io::{Read as _, Write as _};
    let (mut token, mut bytes) = (String::new(), 0);
    loop {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let cont = if token.is_empty() { String::new() } else { format!("&continue={token}") };
        write!(s, "GET /apis/cilium.io/v2/{plural}?limit={limit}{cont} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        bytes += body.len();
        // The list's metadata comes last (keys in order): find its continue token from the end.
        let tail = String::from_utf8_lossy(&body[body.len().saturating_sub(300)..]).into_owned();
        match tail.rsplit_once("\"continue\":\"").and_then(|(_, t)| t.split_once('"')) {
            Some((t, _)) if !t.is_empty() => token = t.to_owned(),
            _ => return Ok(bytes),
        }
    }
}

/// CRD mode at the bench's size: the same cluster as CiliumNodes, CiliumEndpoints and
/// CiliumIdentities (twice as many identities: unused ones live 30-45 min), served over the
/// list/watch protocol; kvcheck's full check and idle agent beside kubectl and a raw read.
pub(crate) fn kubernetes_bench(node: &BenchNode, args: &Args, figs: &mut Figures) -> Result<String> {
    let shape = node.shape;
    let api = kvcheck_tests::k8sapi::KubeApi::start();
    let t = Instant::now();
    kvcheck_tests::simobjects::serve_scaled(&api, shape, shape.identities);
    eprintln!("bench: {} CiliumEndpoints, {} CiliumNodes, {} CiliumIdentities served in {:?}", shape.ips, shape.nodes, 2 * shape.identities, t.elapsed());
    let kubeconfig = api.kubeconfig_str();
    let crd = ["--endpoint-source", "crd", "--identity-source", "crd", "--kubeconfig", &kubeconfig, "--cilium-config-map", "/nonexistent"];
    let make = || {
        let mut c = node.command("check");
        c.args(["--settle", "0", "--output", "json"]).args(crd);
        c
    };
    let first = make().output()?;
    if !first.status.success() {
        let doc: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap_or_default();
        bail!("the bench node does not check clean in CRD mode: {}; {}", doc["counts"]["by_kind"], String::from_utf8_lossy(&first.stderr));
    }
    let (check, check_rss) = measure(args.runs, make)?;
    let raw = time_runs(args.runs, || raw_paged_list(api.port, "ciliumendpoints", 500).map(|_| ()))?;
    let bytes = raw_paged_list(api.port, "ciliumendpoints", 500)?;
    let kubectl_row = match kubectl() {
        Some(k) => {
            let (t, rss) = measure(args.runs, || {
                let mut c = Command::new(&k);
                c.args(["--kubeconfig", &kubeconfig, "get", "ciliumendpoints", "-A", "-o", "json"]);
                c
            })?;
            figs.insert("k8s_kubectl_ms", t.as_secs_f64() * 1000.0);
            format!("| `kubectl get ciliumendpoints -A -o json` ({}) | {:.0} | {:.1} | {:.2} |\n", k.display(), t.as_secs_f64() * 1000.0, rss as f64 / 1024.0, t.as_secs_f64() / raw.as_secs_f64())
        }
        None => "| `kubectl get ciliumendpoints -A -o json` | not installed (set KVCHECK_KUBECTL) | | |\n".to_owned(),
    };
    let agent = node.start_agent(&crd, Stdio::null())?;
    let pid = agent.id();
    let idle = Duration::from_secs(args.idle_seconds);
    std::thread::sleep(idle);
    let (rss_now, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    stop(agent);
    within_shipped_limit("the agent (CRD mode)", hwm)?;
    figs.insert("k8s_check_ms", check.as_secs_f64() * 1000.0);
    figs.insert("k8s_check_rss_mib", check_rss as f64 / 1024.0);
    figs.insert("k8s_idle_rss_mib", rss_now as f64 / 1024.0);
    Ok(format!(
        "{} CiliumEndpoints, {} CiliumNodes, {} CiliumIdentities (objects shaped as a real Cilium 1.16.15 wrote them) served by the test API server (`tests/src/k8sapi.rs`) on loopback, pages of 500; node-0's ipcache {} entries. Median of {} runs.\n\n| what | wall ms | peak RSS MiB | × raw read |\n|---|---:|---:|---:|\n| raw paged HTTP read of the CiliumEndpoints ({:.1} MiB, nothing decoded) | {:.0} | | 1.00 |\n{kubectl_row}| `kvcheck check` in CRD mode (every node, CEP and identity listed and decoded, derived, diffed; exit 0) | {:.0} | {:.1} | {:.2} |\n\n`kvcheck agent` in CRD mode on the same node (list+watch of the three kinds), idle for {} s after it became ready: RSS {:.1} MiB (peak {:.1} MiB)\n",
        shape.ips, shape.nodes, 2 * shape.identities, node.total_ipcache, args.runs,
        bytes as f64 / 1048576.0, raw.as_secs_f64() * 1000.0,
        check.as_secs_f64() * 1000.0, check_rss as f64 / 1024.0, check.as_secs_f64() / raw.as_secs_f64(),
        idle.as_secs(), rss_now as f64 / 1024.0, hwm as f64 / 1024.0
    ))
}
