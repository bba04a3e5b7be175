//! Builds `agent-ebpf` (the change-event program) for bpfel-unknown-none with the nightly and
//! bpf-linker, via aya-build. Without bpf-linker kvcheck still builds, and its change events
//! fall back to polling; `KVCHECK_REQUIRE_EBPF=1` (set by `cargo xtask`) makes that an error.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvcheck_ebpf)");
    println!("cargo:rerun-if-env-changed=KVCHECK_REQUIRE_EBPF");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().map(PathBuf::from).unwrap_or_default();
    let ebpf_dir = root.join("agent-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    // `cargo xtask setup` installs bpf-linker into .tools/bin.
    let tools = root.join(".tools/bin");
    let path = std::env::var("PATH").unwrap_or_default();
    if tools.exists() && !path.split(':').any(|p| PathBuf::from(p) == tools) {
        // SAFETY: build scripts are single-threaded; the child cargo inherits this PATH.
        unsafe { std::env::set_var("PATH", format!("{}:{path}", tools.display())) };
    }
    let required = std::env::var_os("KVCHECK_REQUIRE_EBPF").is_some_and(|v| v == "1");
    let have_linker = std::env::var("PATH").unwrap_or_default().split(':').any(|p| PathBuf::from(p).join("bpf-linker").exists());
    let result = if have_linker {
        let root_dir = ebpf_dir.to_string_lossy().into_owned();
        // agent-ebpf is its own workspace (nightly-only, outside the main one): run its cargo there.
        let _ = std::env::set_current_dir(&ebpf_dir);
        aya_build::build_ebpf(
            [aya_build::Package { name: "kvcheck-ebpf", root_dir: &root_dir, ..Default::default() }],
            aya_build::Toolchain::Nightly,
        )
        .map_err(|e| format!("{e:#}"))
    } else {
        Err("bpf-linker not found (run `cargo xtask setup`)".to_owned())
    };
    match result {
        Ok(()) => println!("cargo:rustc-cfg=kvcheck_ebpf"),
        Err(e) if required => panic!("building agent-ebpf: {e}"),
        Err(e) => println!("cargo:warning=kvcheck is built without its eBPF program ({e}); change events will poll"),
    }
}
