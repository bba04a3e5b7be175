//! The `kvcheck` command line: parse, call, print, exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvcheck::datapath::{self, addresses, maps::ReadStrategy, ReadOptions};
use kvcheck::model::version::CiliumVersion;
use kvcheck::report;
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
            use std::io::Write as _;
            // stdout is line-buffered and JSON has no newlines: buffer in big blocks instead.
            let mut stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            serde_json::to_writer(&mut stdout, &doc).context("writing JSON to stdout")?;
            writeln!(stdout)?;
            stdout.flush().context("writing JSON to stdout")?;
        }
        Output::Table => print!("{}", report::datapath::render(&snapshot, &host)),
    }
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
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_COULD_NOT_CHECK);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Dump(Dump::Datapath(args)) => dump_datapath(args).await,
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
