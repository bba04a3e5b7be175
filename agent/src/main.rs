//! The `kvcheck` command line: parse, call, print, exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvcheck::datapath::{self, addresses, maps::ReadStrategy, ReadOptions};
use kvcheck::model::version::CiliumVersion;
use kvcheck::{kvstore, report};
use serde::Serialize;

/// Exit code when kvcheck could not look (unreadable maps, unreachable kvstore, bad options).
const EXIT_COULD_NOT_CHECK: u8 = 2;

#[derive(Parser)]
#[command(name = "kvcheck", version, about = "Checks that a node's Cilium datapath agrees with the cluster state Cilium keeps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check this node once: derive the expected datapath from the kvstore, compare, report.
    /// Exit code 0 = consistent, 1 = drift found, 2 = could not check.
    Check(CheckArgs),
    /// Decoded views of the datapath and the kvstore.
    #[command(subcommand)]
    Dump(Dump),
    /// The DaemonSet mode: check continuously (kvstore watch + datapath change events), log
    /// findings opened/resolved and node-health lines, serve /metrics, /healthz, /readyz.
    Agent(AgentArgs),
    /// What a finding kind means, its usual causes in Cilium, and what to do.
    Explain {
        /// A finding kind (e.g. ipcache-stale); all kinds when omitted.
        kind: Option<kvcheck::check::kinds::FindingKind>,
    },
    /// A shell completion script on stdout (e.g. `kvcheck completions bash > /etc/bash_completion.d/kvcheck`).
    Completions { shell: clap_complete::Shell },
    /// Man pages: kvcheck(1) on stdout, or with DIR one page per command written there.
    Man { dir: Option<PathBuf> },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Json,
    Logfmt,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    check: CheckArgs,
    /// Report a finding as opened only after it persisted this long.
    #[arg(long, default_value = "30s", value_parser = kvcheck::options::duration_in(Duration::ZERO, Duration::from_secs(86_400)))]
    grace: std::time::Duration,
    /// Full re-read of both sides (jittered), the safety net behind the watch and events.
    #[arg(long, default_value = "5m", value_parser = kvcheck::options::duration_in(Duration::from_secs(1), Duration::from_secs(86_400)))]
    resync: std::time::Duration,
    /// Node-health log line period (also logged on every status change).
    #[arg(long, default_value = "60s", value_parser = kvcheck::options::duration_in(Duration::from_secs(1), Duration::from_secs(86_400)))]
    health_interval: std::time::Duration,
    /// A kvstore watch quiet this long is asked for its progress; no answer within
    /// --etcd-timeout and it is taken as stalled (reconnected, resumed, counted).
    #[arg(long, default_value = "30s", value_parser = kvcheck::options::duration_in(Duration::from_secs(1), Duration::from_secs(600)))]
    watch_progress_interval: std::time::Duration,
    #[arg(long, value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Address for /metrics, /healthz and /readyz (clear of Cilium's own ports).
    #[arg(long, default_value = "0.0.0.0:9890")]
    listen: std::net::SocketAddr,
    /// Serve the HTTP endpoints over TLS with this certificate chain (PEM; with
    /// --listen-tls-key). The kubelet's probes then need `scheme: HTTPS`.
    #[arg(long, requires = "listen_tls_key")]
    listen_tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, requires = "listen_tls_cert")]
    listen_tls_key: Option<PathBuf>,
    /// Do not load the eBPF change-event program; poll the maps instead.
    #[arg(long, env = "KVCHECK_NO_EBPF", value_parser = clap::builder::FalseyValueParser::new())]
    no_ebpf: bool,
    /// Map polling interval when eBPF change events are unavailable or off.
    #[arg(long, default_value = "5s", value_parser = kvcheck::options::duration_in(Duration::from_millis(10), Duration::from_secs(3600)))]
    poll_interval: std::time::Duration,
}

/// Where Cilium keeps a kind of state: etcd, or Kubernetes objects.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SourceArg {
    Kvstore,
    Crd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

fn on_off(v: Option<OnOff>) -> Option<bool> {
    v.map(|v| v == OnOff::On)
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    datapath: DatapathOptions,
    #[command(flatten)]
    etcd: EtcdOptions,
    #[command(flatten)]
    node: NodeIdentityArgs,
    /// Cilium's state directory; its globals/node_config.h tells the datapath configuration.
    #[arg(long, env = "KVCHECK_CILIUM_STATE_DIR", default_value = kvcheck::check::config::DEFAULT_STATE_DIR)]
    cilium_state_dir: PathBuf,
    /// Wait this long and re-read what the findings touch, keeping only findings that persist
    /// (Cilium propagates asynchronously); 0 disables. E.g. 2s, 500ms.
    #[arg(long, default_value = "2s", value_parser = kvcheck::options::duration_in(Duration::ZERO, Duration::from_secs(600)))]
    settle: std::time::Duration,
    /// Cilium applies a node delete this long after the key goes (NodeDeleteDelay); until then
    /// the node's entries are held, not drift. 0 treats them as drift at once.
    #[arg(long, default_value = "30s", value_parser = kvcheck::options::duration_in(Duration::ZERO, Duration::from_secs(3600)))]
    node_delete_hold_off: std::time::Duration,
    /// `check` only: report a deleted node's entries as held instead of waiting for its
    /// hold-off to end when the delete cannot be placed in time (no later heartbeat).
    #[arg(long)]
    no_hold_off_wait: bool,
    /// Remote node addresses carry identity 6 (on) or 1 (off); unknown accepts both.
    #[arg(long, value_enum)]
    remote_node_identity: Option<OnOff>,
    /// Where Cilium allocates identities (its `identity-allocation-mode`): `kvstore` checks them
    /// against cilium/state/identities/v1/id/, `crd` against CiliumIdentity objects (through
    /// the Kubernetes API; without one they are not checked). Default: from the Cilium agent's
    /// API, else its ConfigMap (--cilium-config-map).
    #[arg(long, value_enum)]
    identity_source: Option<SourceArg>,
    /// Where Cilium keeps nodes and pod IPs (its `kvstore` setting): `kvstore` (etcd) or `crd`
    /// (CiliumNode and CiliumEndpoint objects: CRD mode, Cilium's default install). Default:
    /// from the Cilium agent's API, else its ConfigMap, else the kvstore.
    #[arg(long, value_enum)]
    endpoint_source: Option<SourceArg>,
    /// CRD mode: pod IPs from CiliumEndpointSlices (on) or CiliumEndpoints (off). Default: the
    /// agent's `enable-cilium-endpoint-slice`.
    #[arg(long, value_enum)]
    endpoint_slices: Option<OnOff>,
    #[command(flatten)]
    kube: KubeArgs,
    /// Cilium's ConfigMap cilium-config as mounted: a directory, one file per key.
    #[arg(long, env = "KVCHECK_CILIUM_CONFIG_MAP", default_value = kvcheck::check::config::DEFAULT_CONFIG_MAP_DIR)]
    cilium_config_map: PathBuf,
    /// Tunnel (on) or direct routing (off); unknown: inferred from the tunnel map.
    #[arg(long, value_enum)]
    tunnel: Option<OnOff>,
    /// IPsec/WireGuard encryption; unknown accepts key 0 and the announced key.
    #[arg(long, value_enum)]
    encryption: Option<OnOff>,
    #[command(flatten)]
    cilium: CiliumArgs,
    #[command(flatten)]
    mesh: MeshArgs,
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
struct KubeArgs {
    /// The Kubernetes API, where Cilium keeps its state in CRD mode (and its identities with
    /// identity-allocation-mode crd): `auto` uses it when a kubeconfig or the pod's
    /// ServiceAccount is there. Read-only: get/list/watch.
    #[arg(long, value_enum, default_value = "auto")]
    kubernetes: kvcheck::k8s::client::KubernetesAccess,
    /// kubeconfig file; default: the pod's ServiceAccount (in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Objects per Kubernetes list request.
    #[arg(long, default_value_t = i64::from(kvcheck::k8s::client::DEFAULT_PAGE_SIZE), value_parser = kvcheck::options::integer_in(1, 100_000))]
    kube_page_size: i64,
    /// Bound on each Kubernetes API request, in seconds (0.1 to 300).
    #[arg(long, default_value = "10", value_parser = kvcheck::options::seconds_in(0.1, 300.0))]
    kube_timeout: Duration,
}

impl KubeArgs {
    fn options(&self) -> kvcheck::k8s::client::KubeOptions {
        kvcheck::k8s::client::KubeOptions { access: self.kubernetes.clone(), kubeconfig: self.kubeconfig.clone(), page_size: u32::try_from(self.kube_page_size).unwrap_or(kvcheck::k8s::client::DEFAULT_PAGE_SIZE), timeout: self.kube_timeout }
    }
}

#[derive(Args)]
struct MeshArgs {
    /// Cilium's ClusterMesh config directory (its `--clustermesh-config`; Helm mounts the
    /// cilium-clustermesh Secret there): one etcd config per remote cluster, named after it.
    /// Missing or empty: no ClusterMesh.
    #[arg(long, env = "CILIUM_CLUSTERMESH_CONFIG", default_value = kvcheck::clustermesh::discovery::DEFAULT_CONFIG_DIR)]
    clustermesh_config: PathBuf,
    /// The local cluster's id (Cilium's `--cluster-id`). Default: the Cilium agent's
    /// configuration (API), else this node's entry's ClusterID.
    #[arg(long, env = "KVCHECK_CLUSTER_ID", value_parser = kvcheck::options::integer_in(0, 511))]
    cluster_id: Option<i64>,
    /// Cilium's `--max-connected-clusters` (255 or 511). Default: the Cilium agent's, else 255.
    #[arg(long, value_parser = kvcheck::options::integer_in(255, 511))]
    max_connected_clusters: Option<i64>,
}

impl MeshArgs {
    fn options(&self, etcd: &EtcdOptions) -> kvcheck::clustermesh::reader::MeshOptions {
        kvcheck::clustermesh::reader::MeshOptions {
            config_dir: self.clustermesh_config.clone(),
            cluster_id: self.cluster_id.and_then(|i| u32::try_from(i).ok()),
            max_connected_clusters: self.max_connected_clusters.and_then(|i| u32::try_from(i).ok()),
            timeout: etcd.timeout(),
            page_size: etcd.etcd_page_size.max(1),
        }
    }
}

#[derive(Args)]
struct CiliumArgs {
    /// The Cilium agent's API socket: kvcheck asks it whether Cilium is running, healthy and
    /// done restoring endpoints before judging (read-only GETs). Without it (no socket and no
    /// Cilium runtime state beside it) kvcheck judges the maps and pins alone.
    #[arg(long, env = "KVCHECK_CILIUM_SOCKET", default_value = kvcheck::cilium::DEFAULT_SOCKET)]
    cilium_socket: PathBuf,
    /// `check`: wait this long for a Cilium agent that is down, starting, unhealthy or still
    /// regenerating its restored endpoints; then exit 2 naming its state. 0 does not wait.
    #[arg(long, default_value = "90s", value_parser = kvcheck::options::duration_in(Duration::ZERO, Duration::from_secs(3600)))]
    cilium_ready_timeout: std::time::Duration,
}

#[derive(Subcommand)]
enum Dump {
    /// Cilium's pinned ipcache, endpoint and tunnel maps, and the node's addresses.
    Datapath(DumpDatapath),
    /// This node's view of Cilium's kvstore: node entry, IP entries, identities, etcd health.
    Kvstore(DumpKvstore),
}

#[derive(Args)]
struct EtcdOptions {
    /// etcd client configuration (YAML, Cilium's etcd.config format): comma-separated
    /// candidates, the first that exists is read (deploy/ lists kvcheck's own read-only user
    /// first, Cilium's configuration as the fallback).
    #[arg(long, env = "KVCHECK_ETCD_CONFIG", value_delimiter = ',', default_value = kvstore::config::DEFAULT_ETCD_CONFIG)]
    etcd_config: Vec<PathBuf>,
    /// etcd endpoints, comma-separated (overrides etcd.config and ETCDCTL_ENDPOINTS).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// CA bundle that signed etcd's certificate.
    #[arg(long)]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// Bound on each etcd request and connection attempt, in seconds (0.1 to 300).
    #[arg(long, default_value = "5", value_parser = kvcheck::options::seconds_in(0.1, 300.0))]
    etcd_timeout: Duration,
    /// Also count KVStoreMesh's cilium/cache/ keys.
    #[arg(long)]
    include_kvstoremesh_cache: bool,
    /// Keys per etcd range request (memory vs round trips; see BENCHMARKS.md).
    #[arg(long, default_value_t = kvstore::reader::DEFAULT_PAGE_SIZE, value_parser = kvcheck::options::integer_in(0, 1_000_000))]
    etcd_page_size: i64,
}

#[derive(Args)]
struct NodeIdentityArgs {
    /// This node's name in Cilium (the DaemonSet sets NODE_NAME from the downward API);
    /// defaults to the hostname.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Cilium's cluster name.
    #[arg(long, env = "KVCHECK_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
}

#[derive(Args)]
struct DumpKvstore {
    #[command(flatten)]
    etcd: EtcdOptions,
    #[command(flatten)]
    node: NodeIdentityArgs,
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

impl EtcdOptions {
    fn settings(&self) -> anyhow::Result<kvstore::config::EtcdSettings> {
        self.settings_unless(|_| false)
    }

    /// [`settings`](Self::settings), accepting the validation errors `accept` says may wait.
    fn settings_unless(&self, accept: fn(&kvstore::config::ConfigError) -> bool) -> anyhow::Result<kvstore::config::EtcdSettings> {
        use kvstore::config::{EtcdSettings, Overrides};
        let mut s = match self.etcd_config.iter().find(|p| p.exists()) {
            Some(path) => EtcdSettings::from_config_file(path)?,
            None => EtcdSettings::default(),
        };
        s.apply(Overrides::from_env(|k| std::env::var(k).ok()), "ETCDCTL_* environment");
        s.apply(
            Overrides {
                endpoints: self.etcd_endpoints.clone(),
                trusted_ca_file: self.etcd_cacert.clone(),
                cert_file: self.etcd_cert.clone(),
                key_file: self.etcd_key.clone(),
                ..Default::default()
            },
            "command-line flags",
        );
        match s.validate() {
            Err(e) if !accept(&e) => Err(e.into()),
            _ => Ok(s),
        }
    }

    fn list_options(&self) -> kvstore::reader::ListOptions {
        kvstore::reader::ListOptions { page_size: self.etcd_page_size.max(0), include_cache: self.include_kvstoremesh_cache }
    }

    fn timeout(&self) -> std::time::Duration {
        self.etcd_timeout
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ReadMethodArg {
    /// Batch lookups, falling back to key iteration where the kernel refuses them.
    Auto,
    /// Always iterate key by key (slow; for kernels with broken batch support).
    Iterate,
}

#[derive(Args)]
struct DatapathOptions {
    /// bpffs root Cilium pins to; maps are read from <BPFFS>/tc/globals/.
    #[arg(long, env = "KVCHECK_BPFFS", default_value = datapath::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Cilium release running on the node (e.g. 1.16 or v1.16.3); detected from the maps when absent.
    #[arg(long, env = "KVCHECK_CILIUM_VERSION")]
    cilium_version: Option<CiliumVersion>,
    /// How to read map entries.
    #[arg(long, value_enum, default_value = "auto", env = "KVCHECK_READ_METHOD")]
    read_method: ReadMethodArg,
    /// Read interface addresses from this network namespace (e.g. /var/run/netns/NAME)
    /// instead of the one kvcheck runs in.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Find the maps the programs attached to the node's interfaces use (tc, tcx, netkit, tail
    /// calls) and check those when they are not the pinned ones (needs CAP_SYS_ADMIN; skipped
    /// and said so without it).
    #[arg(long, value_enum, default_value = "on", env = "KVCHECK_LIVE_MAPS")]
    live_maps: OnOff,
}

#[derive(Args)]
struct DumpDatapath {
    #[command(flatten)]
    datapath: DatapathOptions,
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
    /// Include each entry's raw key and value bytes (hex) in JSON output.
    #[arg(long)]
    raw: bool,
    /// After the snapshot, print one line (JSON: one object) per change until interrupted.
    #[arg(long)]
    follow: bool,
    /// Do not load the eBPF change-event program; poll instead.
    #[arg(long, env = "KVCHECK_NO_EBPF", value_parser = clap::builder::FalseyValueParser::new())]
    no_ebpf: bool,
    /// Polling interval when eBPF change events are unavailable or off.
    #[arg(long, default_value = "1s", value_parser = kvcheck::options::duration_in(Duration::from_millis(10), Duration::from_secs(3600)))]
    poll_interval: std::time::Duration,
}

impl DatapathOptions {
    fn read_options(&self, include_raw: bool) -> ReadOptions {
        ReadOptions {
            bpffs: self.bpffs.clone(),
            version: self.cilium_version,
            strategy: match self.read_method {
                ReadMethodArg::Auto => ReadStrategy::BatchWithFallback,
                ReadMethodArg::Iterate => ReadStrategy::IterateOnly,
            },
            include_raw,
            netns: self.netns.clone(),
            live_maps: self.live_maps == OnOff::On,
            read_live: Default::default(),
        }
    }
}

#[derive(Serialize)]
struct DatapathDocument<'a> {
    #[serde(flatten)]
    snapshot: &'a datapath::DatapathSnapshot,
    addresses: &'a addresses::HostAddresses,
    /// When the datapath uses other maps than the pins: the pinned maps' contents too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned: Option<&'a datapath::DatapathSnapshot>,
}

async fn dump_datapath(args: &DumpDatapath) -> anyhow::Result<()> {
    let mut opts = args.datapath.read_options(args.raw);
    let (snapshot, host) = datapath::read_node(&opts).await?;
    // --follow watches the maps that were read (the ones the programs use).
    opts.read_live = snapshot.live_maps.read_live();
    tracing::info!(layout = %snapshot.layout.summary(), "datapath read");
    // Both sides of a datapath-map-mismatch: the maps in use (above) and the pins.
    let pinned = if opts.read_live.is_empty() {
        None
    } else {
        let pins = datapath::ReadOptions { live_maps: false, read_live: Default::default(), ..opts.clone() };
        Some(tokio::task::spawn_blocking(move || datapath::read_maps(&pins)).await.context("map reader task")??)
    };
    match args.output {
        Output::Json => {
            let doc = DatapathDocument { snapshot: &snapshot, addresses: &host, pinned: pinned.as_ref() };
            write_json(&doc)?;
        }
        Output::Table => {
            print!("{}", report::datapath::render(&snapshot, &host));
            if let Some(p) = &pinned {
                println!("\n==== the pinned maps (the datapath's programs do not use these)");
                print!("{}", report::datapath::render(p, &host));
            }
        }
    }
    if args.follow {
        follow_datapath(args, snapshot.layout.layout).await?;
    }
    Ok(())
}

async fn follow_datapath(args: &DumpDatapath, layout: kvcheck::model::version::Layout) -> anyhow::Result<()> {
    use std::io::Write as _;
    let opts = args.datapath.read_options(false);
    let follow = datapath::events::FollowOptions { ebpf: !args.no_ebpf, poll_interval: args.poll_interval, beside_ipcache_copy: false };
    let mut feed = datapath::events::ChangeFeed::open(&opts, layout, &follow)?;
    let how = match &feed.fallback_reason {
        None => format!("eBPF change events ({})", feed.ebpf_walk().unwrap_or("-")),
        Some(r) => format!("polling every {:?} ({r})", args.poll_interval),
    };
    if args.output == Output::Table {
        println!("\nfollowing changes via {how}; Ctrl-C stops");
    } else {
        eprintln!("following changes via {how}");
    }
    std::io::stdout().flush()?;
    loop {
        let changes = tokio::select! {
            c = feed.next(None) => c?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let mut out = std::io::stdout().lock();
        for c in changes {
            match args.output {
                Output::Json => writeln!(out, "{}", serde_json::to_string(&c)?)?,
                Output::Table => writeln!(out, "{}", report::datapath::change_line(&c))?,
            }
        }
        out.flush()?;
    }
}

impl NodeIdentityArgs {
    fn name_or_hostname(&self) -> anyhow::Result<String> {
        match &self.node_name {
            Some(n) => Ok(n.clone()),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .context("no --node-name or NODE_NAME, and the hostname is unreadable"),
        }
    }
}

/// Exit code for drift found by `check`.
const EXIT_DRIFT: u8 = 1;

impl CheckArgs {
    fn options(&self) -> anyhow::Result<kvcheck::check::run::CheckOptions> {
        let args = self;
        Ok(kvcheck::check::run::CheckOptions {
        datapath: args.datapath.read_options(false),
        // In CRD mode there is no etcd: endpoints are required only once etcd is read.
        etcd: args.etcd.settings_unless(kvstore::config::ConfigError::is_no_endpoints)?,
        etcd_timeout: args.etcd.timeout(),
        list: args.etcd.list_options(),
        node_name: args.node.name_or_hostname()?,
        cluster: args.node.cluster_name.clone(),
        state_dir: args.cilium_state_dir.clone(),
        config_overrides: kvcheck::check::config::DatapathConfig {
            remote_node_identity: on_off(args.remote_node_identity),
            tunnel: on_off(args.tunnel),
            encryption: on_off(args.encryption),
            identity_allocation_mode: args.identity_source.map(|s| if s == SourceArg::Kvstore { "kvstore" } else { "crd" }.to_owned()),
            kvstore: args.endpoint_source.map(|s| if s == SourceArg::Kvstore { "etcd" } else { "" }.to_owned()),
            endpoint_slices: on_off(args.endpoint_slices),
            ..Default::default()
        },
        kube: args.kube.options(),
        mesh: args.mesh.options(&args.etcd),
        config_map_dir: args.cilium_config_map.clone(),
        settle: args.settle,
        hold_off: args.node_delete_hold_off,
        hold_off_wait: !args.no_hold_off_wait,
        cilium: kvcheck::cilium::CiliumOptions {
            socket: args.cilium.cilium_socket.clone(),
            ready_timeout: args.cilium.cilium_ready_timeout,
            bpffs: args.datapath.bpffs.clone(),
            ..Default::default()
        },
        })
    }
}

async fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let opts = args.options()?;
    let report = kvcheck::check::run::run_check(&opts).await?;
    match args.output {
        Output::Json => write_json(&report)?,
        Output::Table => print!("{}", report::check::render(&report)),
    }
    if !report.judged() {
        eprintln!("error: Cilium agent not ready: {}", report.sources.cilium.summary());
        return Ok(ExitCode::from(EXIT_COULD_NOT_CHECK));
    }
    Ok(if report.consistent() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_DRIFT) })
}

fn explain(kind: Option<kvcheck::check::kinds::FindingKind>) {
    use kvcheck::check::kinds::FindingKind;
    let kinds: Vec<FindingKind> = kind.map_or_else(|| FindingKind::ALL.to_vec(), |k| vec![k]);
    for k in &kinds {
        println!("{} ({:?})\n  {}\n  {}\n", k.name(), k.severity(), k.summary(), k.explain());
    }
    if kinds.len() > 1 {
        println!("{RESTARTS}");
    }
}

/// What `kvcheck explain` says about findings while Cilium restarts.
const RESTARTS: &str = "While Cilium restarts (upgrade, config change, OOM, crash)\n  \
No finding is reported for what the Cilium agent is restoring. kvcheck asks the agent's API (--cilium-socket, read-only) and judges only once it is running, healthy (cilium and kvstore Ok) and has regenerated every endpoint it restored: until then its re-created, refilling ipcache and programs still on the old maps are recovery, not drift. `check` waits up to --cilium-ready-timeout, then exits 2 naming the agent's state (never 1); `agent` holds findings meanwhile and says so in its node-health lines, kvcheck_cilium_agent_state, kvcheck_judging and /readyz. Without the socket and without Cilium's runtime state beside it, kvcheck judges the maps and pins alone (sources.cilium.state = unknown).";

async fn dump_kvstore(args: &DumpKvstore) -> anyhow::Result<()> {
    let settings = args.etcd.settings()?;
    let timeout = args.etcd.timeout();
    let (etcd, health) = kvstore::health::connect_healthy(&settings, timeout).await?;
    let list = args.etcd.list_options();
    let node_name = args.node.node_name.as_deref();
    // The view shows one node: keep its entries, count the rest.
    let snap = match node_name {
        Some(name) => kvstore::reader::read_node_view(&etcd, &list, &args.node.cluster_name, name).await?,
        None => kvstore::reader::read_snapshot(&etcd, &list).await?,
    };
    let lease = node_name
        .and_then(|n| snap.nodes.iter().find(|e| e.name == n && e.cluster == args.node.cluster_name))
        .map_or(0, |n| n.meta.lease);
    let ttl = kvstore::health::lease_ttl(&etcd, lease).await;
    let view = kvstore::view::node_view(&snap, health, &args.node.cluster_name, node_name, ttl, chrono::Utc::now());
    match args.output {
        Output::Json => write_json(&view)?,
        Output::Table => print!("{}", report::kvstore::render(&view)),
    }
    Ok(())
}

/// One JSON document on stdout, written in large blocks (stdout is line-buffered and JSON has
/// no newlines).
fn write_json(value: &impl Serialize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer(&mut stdout, value).context("writing JSON to stdout")?;
    writeln!(stdout)?;
    stdout.flush().context("writing JSON to stdout")?;
    Ok(())
}

async fn agent(args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let opts = kvcheck::agent::AgentOptions {
        check: args.check.options()?,
        // The agent's live check holds the ipcache the feed compares with.
        follow: datapath::events::FollowOptions { ebpf: !args.no_ebpf, poll_interval: args.poll_interval, beside_ipcache_copy: true },
        grace: args.grace,
        resync: args.resync,
        health_interval: args.health_interval,
        watch_progress: args.watch_progress_interval,
        listen: args.listen,
        listen_tls: args.listen_tls_cert.clone().zip(args.listen_tls_key.clone()),
        debounce: std::time::Duration::from_millis(100),
    };
    kvcheck::agent::run(opts).await?;
    Ok(ExitCode::SUCCESS)
}

fn init_logs(cli: &Cli) {
    let filter = |default: &str| {
        tracing_subscriber::EnvFilter::try_from_env("KVCHECK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
    };
    match &cli.command {
        Command::Agent(a) if a.log_format == LogFormat::Json => {
            tracing_subscriber::fmt().json().flatten_event(true).with_writer(std::io::stderr).with_env_filter(filter("info")).init();
        }
        Command::Agent(_) => {
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::util::SubscriberInitExt as _;
            tracing_subscriber::registry()
                .with(filter("info"))
                .with(tracing_logfmt::builder().layer().with_writer(std::io::stderr))
                .init();
        }
        _ => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter("warn")).init();
        }
    }
}

fn main() -> ExitCode {
    // glibc gives each thread its own malloc arena, and memory freed in one is not reused by
    // another thread's allocations: for a reader that mostly inflates RSS (measured: 37 -> 27
    // MiB reading 125k keys with two arenas). One arena: the full check at the bench's size
    // peaked at 105 MiB against 107-112 with two, no slower (356-372 ms against 341-373); the
    // agent's p99 at 1,000 changes/s was 143 ms, its peak 119 MiB against 127.
    // (musl's allocator has no arenas.)
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "kvcheck", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => return man_pages(dir.as_deref()),
        _ => {}
    }
    init_logs(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_COULD_NOT_CHECK);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Check(args) => check(args).await,
            Command::Agent(args) => agent(args).await,
            Command::Dump(Dump::Datapath(args)) => dump_datapath(args).await.map(|()| ExitCode::SUCCESS),
            Command::Dump(Dump::Kvstore(args)) => dump_kvstore(args).await.map(|()| ExitCode::SUCCESS),
            Command::Explain { kind } => {
                explain(*kind);
                Ok(ExitCode::SUCCESS)
            }
            Command::Completions { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_COULD_NOT_CHECK)
        }
    }
}

/// kvcheck(1) on stdout, or every command's page into `dir` (kvcheck.1, kvcheck-check.1, ...).
fn man_pages(dir: Option<&std::path::Path>) -> ExitCode {
    let cmd = <Cli as clap::CommandFactory>::command();
    let result = match dir {
        Some(dir) => std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(cmd, dir)).with_context(|| format!("writing man pages into {}", dir.display())),
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()).context("writing the man page"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_COULD_NOT_CHECK)
        }
    }
}
