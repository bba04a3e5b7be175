//! The `kvcheck` command line: parse, call, print, exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvcheck::datapath::{self, addresses, maps::ReadStrategy, ReadOptions};
use kvcheck::model::version::CiliumVersion;
use kvcheck::{kvstore, report};
use serde::Serialize;

/// Exit code when kvcheck could not look (unreadable maps, unreachable kvstore, bad options).
const EXIT_COULD_NOT_CHECK: u8 = 2;

#[derive(Parser)]
#[command(name = "kvcheck", version, about = "Checks that a node's Cilium datapath agrees with Cilium's kvstore")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decoded views of the datapath (and, later, the kvstore).
    #[command(subcommand)]
    Dump(Dump),
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
    /// Cilium's etcd client configuration (YAML); read when present.
    #[arg(long, env = "KVCHECK_ETCD_CONFIG", default_value = kvstore::config::DEFAULT_ETCD_CONFIG)]
    etcd_config: PathBuf,
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
    /// Bound on each etcd request and connection attempt, in seconds.
    #[arg(long, default_value_t = 5.0)]
    etcd_timeout: f64,
    /// Also count KVStoreMesh's cilium/cache/ keys.
    #[arg(long)]
    include_kvstoremesh_cache: bool,
}

#[derive(Args)]
struct NodeIdentityArgs {
    /// This node's name in Cilium (the DaemonSet sets NODE_NAME from the downward API).
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
        use kvstore::config::{EtcdSettings, Overrides};
        let mut s = if self.etcd_config.exists() {
            EtcdSettings::from_config_file(&self.etcd_config)?
        } else {
            EtcdSettings::default()
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
        s.validate()?;
        Ok(s)
    }

    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.etcd_timeout.max(0.1))
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
        }
    }
}

#[derive(Serialize)]
struct DatapathDocument<'a> {
    #[serde(flatten)]
    snapshot: &'a datapath::DatapathSnapshot,
    addresses: &'a addresses::HostAddresses,
}

async fn dump_datapath(args: &DumpDatapath) -> anyhow::Result<()> {
    let opts = args.datapath.read_options(args.raw);
    let snapshot = tokio::task::spawn_blocking(move || datapath::read_maps(&opts))
        .await
        .context("map reader task")??;
    let host = addresses::read_host_addresses().await?;
    tracing::info!(layout = %snapshot.layout.summary(), "datapath read");
    match args.output {
        Output::Json => {
            let doc = DatapathDocument {
                snapshot: &snapshot,
                addresses: &host,
            };
            write_json(&doc)?;
        }
        Output::Table => print!("{}", report::datapath::render(&snapshot, &host)),
    }
    Ok(())
}

async fn dump_kvstore(args: &DumpKvstore) -> anyhow::Result<()> {
    let settings = args.etcd.settings()?;
    let timeout = args.etcd.timeout();
    let health = kvstore::health::cluster_health(&settings, timeout).await;
    if health.connected == 0 {
        let reasons: Vec<String> = health
            .endpoints
            .iter()
            .map(|e| format!("{}: {}", e.endpoint, e.error.as_deref().unwrap_or("unreachable")))
            .collect();
        anyhow::bail!("{}: no etcd endpoint answered ({})", health.status_line(), reasons.join("; "));
    }
    // tonic's balanced channel keeps picking dead members; read from the ones that answered.
    let etcd = kvstore::client::Etcd::connect_to(&settings, health.reachable_endpoints(), timeout).await?;
    let list = kvstore::reader::ListOptions {
        include_cache: args.etcd.include_kvstoremesh_cache,
        ..Default::default()
    };
    let snap = kvstore::reader::read_snapshot(&etcd, &list).await?;
    let node_name = args.node.node_name.as_deref();
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVCHECK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_COULD_NOT_CHECK);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Dump(Dump::Datapath(args)) => dump_datapath(args).await,
            Command::Dump(Dump::Kvstore(args)) => dump_kvstore(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_COULD_NOT_CHECK)
        }
    }
}
