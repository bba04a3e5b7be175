//! Builds `agent-ebpf` (the change-event program) for bpfel-unknown-none with the nightly and
//! bpf-linker. Without bpf-linker kvcheck still builds, and its change events fall back to
//! polling; `KVCHECK_REQUIRE_EBPF=1` (set by `cargo xtask`) makes that an error.
//!
//! The program is built once into `target/ebpf` for every profile and target kvcheck is built
//! for (cargo's own fingerprints make a rebuild a no-op), and the nightly's output is shown only
//! when the build fails: a first `cargo xtask demo` stays quiet.

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE: &str = "kvcheck-ebpf";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvcheck_ebpf)");
    println!("cargo:rerun-if-env-changed=KVCHECK_REQUIRE_EBPF");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().map(PathBuf::from).unwrap_or_default();
    let ebpf_dir = root.join("agent-ebpf");
    for watched in ["src", "Cargo.toml", "Cargo.lock", "rust-toolchain.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(watched).display());
    }
    // `cargo xtask setup` installs bpf-linker into .tools/bin.
    let tools = root.join(".tools/bin");
    let mut path = std::env::var("PATH").unwrap_or_default();
    if tools.exists() && !path.split(':').any(|p| Path::new(p) == tools) {
        path = format!("{}:{path}", tools.display());
    }
    let required = std::env::var_os("KVCHECK_REQUIRE_EBPF").is_some_and(|v| v == "1");
    let have_linker = path.split(':').any(|p| Path::new(p).join("bpf-linker").exists());
    let result = if have_linker { build(&ebpf_dir, &root.join("target/ebpf"), &path) } else { Err("bpf-linker not found (run `cargo xtask setup`)".to_owned()) };
    match result {
        Ok(()) => println!("cargo:rustc-cfg=kvcheck_ebpf"),
        Err(e) if required => panic!("building agent-ebpf: {e}"),
        Err(e) => println!("cargo:warning=kvcheck is built without its eBPF program ({e}); change events will poll"),
    }
}

/// `cargo build --release --target bpfel-unknown-none -Z build-std=core` in agent-ebpf (its
/// own workspace) with the nightly, then the object into OUT_DIR.
fn build(ebpf_dir: &Path, target_dir: &Path, path: &str) -> Result<(), String> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").map_err(|_| "CARGO_CFG_TARGET_ARCH not set")?;
    let rustflags = [format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()].join("\x1f");
    // Through rustup when there is one: the outer cargo may have put the stable toolchain's
    // own cargo first in PATH.
    let rustup = path.split(':').map(|p| Path::new(p).join("rustup")).find(|p| p.exists());
    let mut cmd = match rustup {
        Some(rustup) => {
            let mut c = Command::new(rustup);
            c.args(["run", "nightly", "cargo"]);
            c
        }
        None => Command::new("cargo"),
    };
    cmd.current_dir(ebpf_dir)
        .args(["build", "--package", PACKAGE, "--bins", "--release", "--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(target_dir)
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer cargo's toolchain and wrappers must not leak into the nightly build.
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTC_WRAPPER", "RUSTUP_TOOLCHAIN", "CARGO", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(key);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PROFILE_") || key.to_string_lossy().starts_with("CARGO_CFG_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd.output().map_err(|e| format!("running cargo in {}: {e}", ebpf_dir.display()))?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        for line in log.lines() {
            println!("cargo:warning={line}");
        }
        return Err(format!("cargo build of {PACKAGE} failed ({}); its output is above", out.status));
    }
    let object = target_dir.join(TARGET).join("release").join(PACKAGE);
    std::fs::copy(&object, out_dir.join(PACKAGE)).map_err(|e| format!("copying {}: {e}", object.display()))?;
    Ok(())
}
