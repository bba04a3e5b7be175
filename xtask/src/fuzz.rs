//! The test command's fuzzing step: each cargo-fuzz (libFuzzer) target of `fuzz/` runs for a
//! bounded time from seed corpora written from the real samples (`kvcheck-fuzz-seeds`), and
//! fails on a crash (a panic), a hang (one input over `-timeout`) or running out of memory
//! (`-rss_limit_mb`). Inputs found along the way stay in target/fuzz-corpus for the next run;
//! a crash's input is left in fuzz/artifacts/<target>/ to become a regression test.
//!
//! No sanitizer: the decoders are safe Rust, so what a fuzzer finds there is a panic (overflow
//! checks and debug assertions are on), a hang or unbounded memory; without AddressSanitizer
//! the targets build in 4 minutes instead of 7 and run faster.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every decoder of outside input (fuzz/Cargo.toml's bins).
pub const TARGETS: &[&str] = &["kvstore_values", "etcd_range", "map_codecs", "node_config", "etcd_config", "cilium_api", "clustermesh", "k8s_objects", "btf"];

/// `cargo +nightly fuzz` with .tools/bin (cargo-fuzz, bpf-linker) on PATH.
fn cargo_fuzz(root: &Path, tools_bin: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"]).current_dir(root);
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("{}:{path}", tools_bin.display()));
    // The workspace's CARGO points at the stable cargo; cargo-fuzz must use the nightly's.
    c.env_remove("CARGO").env_remove("RUSTUP_TOOLCHAIN");
    c
}

/// Builds every target, writes the seeds, then runs each for `seconds`: whether each passed.
pub fn run_all(root: &Path, tools: &Path, seeds_bin: &Path, seconds: u64) -> Result<Vec<bool>> {
    crate::install_tool_if_missing(tools, "cargo-fuzz", CARGO_FUZZ_VERSION)?;
    let seeds = root.join("target/fuzz-seeds");
    let _ = std::fs::remove_dir_all(&seeds);
    crate::run(Command::new(seeds_bin).arg(&seeds))?;
    crate::run(cargo_fuzz(root, &tools.join("bin")).args(["build", "--release", "--debug-assertions", "--sanitizer", "none"]))?;
    let mut outcomes = Vec::new();
    for &target in TARGETS {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let target_seeds = seeds.join(target);
        std::fs::create_dir_all(&target_seeds)?;
        let out = cargo_fuzz(root, &tools.join("bin"))
            .args(["run", "--release", "--debug-assertions", "--sanitizer", "none", target])
            .arg(&corpus)
            .arg(&target_seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-max_len=65536", "-print_final_stats=1"])
            .output()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let executions = log.lines().find_map(|l| l.strip_prefix("stat::number_of_executed_units:")).and_then(|n| n.trim().parse().ok());
        if !out.status.success() {
            // libFuzzer's report (the panic, the input's path) is what to act on.
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("fuzz {target} failed ({}):\n{}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        println!("test fuzz::{target} ... {} ({} executions in {seconds} s)", if out.status.success() { "ok" } else { "FAILED" }, executions.map_or("?".into(), |n: u64| n.to_string()));
        outcomes.push(out.status.success() && executions.is_some());
    }
    if outcomes.is_empty() {
        bail!("no fuzz target ran");
    }
    Ok(outcomes)
}
