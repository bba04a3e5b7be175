//! A simulated Cilium node for kvcheck's integration tests, demo and benchmarks: private
//! bpffs mounts with maps of Cilium's exact names, types, sizes and flags, filled through the
//! bpf() syscall the way Cilium's agent writes them; network namespaces with `cilium_host`.
//! Everything created here is torn down by RAII guards.

pub mod agent;
pub mod churn;
pub mod ciliumapi;
pub mod encode;
pub mod etcd;
pub mod k8sapi;
pub mod maps;
pub mod netns;
pub mod progs;
pub mod relay;
pub mod sample;
pub mod simcluster;
pub mod simdata;
pub mod simmesh;
pub mod simnode;
pub mod simobjects;
pub mod tracepoint;

use std::path::PathBuf;
use std::process::{Command, Output};

/// True when this test may use root-only kernel features. Outside CI a test without root
/// skips with a message; in CI (`CI` set) it fails loudly instead.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root for bpffs mounts, BPF maps and network namespaces, and CI is set"
    );
    eprintln!("skipping {test}: needs root (BPF maps, bpffs mounts, network namespaces)");
    false
}

/// The `kvcheck` binary built beside the test executables (`target/<profile>/kvcheck`).
pub fn kvcheck_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVCHECK_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("kvcheck");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo xtask test does) or set KVCHECK_BIN",
        bin.display()
    );
    bin
}

/// Runs `kvcheck ARGS`, inside network namespace `netns` when given.
pub fn run_kvcheck(netns: Option<&str>, args: &[&str]) -> Output {
    let bin = kvcheck_bin();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args(args).output().expect("running kvcheck")
}

/// Runs `kvcheck ARGS --output json` and parses stdout, panicking with stderr on failure.
pub fn kvcheck_json(netns: Option<&str>, args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output", "json"]);
    let out = run_kvcheck(netns, &all);
    assert!(
        out.status.success(),
        "kvcheck {all:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("kvcheck printed invalid JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}
