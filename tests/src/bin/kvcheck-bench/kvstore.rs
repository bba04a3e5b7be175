//! Kvstore read: `dump kvstore` beside `etcdctl get --prefix`, with a page-size sweep.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::simdata;

use crate::common::*;
use crate::{Args, Figures};

pub(crate) fn kvstore_bench(args: &Args, figs: &mut Figures) -> Result<String> {
    let shape = args.shape;
    let etcd = EtcdCluster::single()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let pairs = simdata::cluster_pairs(shape);
    let total_keys = pairs.len();
    let t = Instant::now();
    rt.block_on(simdata::load(&etcd.endpoints(), pairs))?;
    eprintln!("bench: loaded {total_keys} keys into etcd in {:.2?}", t.elapsed());
    let endpoints = etcd.endpoints_arg();

    // etcdctl on the same prefixes (one command for cilium/state/, which holds all four).
    let (etcdctl, etcdctl_rss) = measure(args.runs, || {
        let mut c = etcd.etcdctl();
        c.args(["get", "--prefix", "cilium/state/"]);
        c
    })?;
    let bin = kvcheck_bin();
    let (cli, cli_rss) = measure(args.runs, || {
        let mut c = Command::new(&bin);
        c.args(["dump", "kvstore", "--etcd-endpoints", &endpoints, "--node-name", "node-1", "--output", "json"]);
        c
    })?;

    // Page size, measured: library read+decode in-process.
    let settings = kvcheck::kvstore::config::EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let mut pages = String::new();
    let default_page = kvcheck::kvstore::reader::DEFAULT_PAGE_SIZE;
    let mut sizes = vec![1_000i64, 5_000, 10_000, 20_000, 50_000];
    if !sizes.contains(&default_page) {
        sizes.push(default_page);
        sizes.sort();
    }
    sizes.push(0);
    // The library's read and decode, in-process, of the etcd at `settings`, once.
    let library_read = |settings: &kvcheck::kvstore::config::EtcdSettings, page_size: i64| {
        rt.block_on(async {
            let client = kvcheck::kvstore::client::Etcd::connect(settings, Duration::from_secs(30)).await?;
            let opts = kvcheck::kvstore::reader::ListOptions { page_size, include_cache: false };
            let snap = kvcheck::kvstore::reader::read_snapshot(&client, &opts).await?;
            anyhow::ensure!(snap.ips.len() == shape.ips as usize && snap.nodes.len() == shape.nodes as usize);
            Ok(())
        })
    };
    // The library's read at the default page size and the floor, in turns (see time_in_turns),
    // with the keys the floor returned.
    let library_and_floor = |settings: &kvcheck::kvstore::config::EtcdSettings| {
        let mut keys = 0;
        let (library, floor) = time_in_turns(
            args.runs,
            || library_read(settings, default_page),
            || {
                keys = raw_kvstore_range_once(&rt, settings)?;
                Ok(())
            },
        )?;
        anyhow::Ok((library, floor, keys))
    };
    let (library, floor, floor_keys) = library_and_floor(&settings)?;
    anyhow::ensure!(floor_keys == total_keys, "the raw range returned {floor_keys} of {total_keys} keys");
    for page_size in sizes {
        let d = if page_size == default_page { library } else { time_runs(args.runs, || library_read(&settings, page_size))? };
        let label = if page_size == 0 { "one range (no limit)".to_owned() } else if page_size == default_page { format!("{page_size} keys (the default)") } else { format!("{page_size} keys") };
        pages.push_str(&format!("| {label} | {:.0} |\n", d.as_secs_f64() * 1000.0));
    }

    // Pages of the same size in one stream per prefix, nothing decoded: what paging costs
    // without the library's sub-ranges (etcd walks its index from each page's start to the
    // prefix's end, and serves one stream's pages one after another).
    let mut paged_keys = 0;
    let paged = time_runs(args.runs, || {
        paged_keys = rt.block_on(async {
            let client = kvcheck::kvstore::client::Etcd::connect(&settings, Duration::from_secs(30)).await?;
            let opts = kvcheck::kvstore::reader::ListOptions::default();
            let counts = futures::future::try_join_all(kvcheck::kvstore::reader::prefixes(&opts).into_iter().map(|prefix| {
                let client = &client;
                async move {
                    let mut n = 0;
                    kvcheck::kvstore::reader::list_prefix(client, prefix, None, default_page, |page, _| n += page.len()).await?;
                    anyhow::Ok(n)
                }
            }))
            .await?;
            anyhow::Ok(counts.iter().sum::<usize>())
        })?;
        Ok(())
    })?;
    anyhow::ensure!(paged_keys == total_keys, "the raw paged read returned {paged_keys} of {total_keys} keys");
    // kvcheck's own range call, one unlimited range read in place, nothing decoded: the floor
    // without etcd-client's copy of every key and value.
    let mut in_place_keys = 0;
    let in_place = time_runs(args.runs, || {
        in_place_keys = rt.block_on(async {
            let client = kvcheck::kvstore::client::Etcd::connect(&settings, Duration::from_secs(30)).await?;
            let channel = client.channel.as_ref().context("no gRPC channel without a user")?;
            let request = kvcheck::kvstore::range::RangeRequest { key: b"cilium/state/".to_vec(), range_end: b"cilium/state0".to_vec(), serializable: true, ..Default::default() };
            let page = kvcheck::kvstore::range::range(channel, request, 1 << 30).await?;
            anyhow::Ok(kvcheck::kvstore::range::RangePage::Raw(page).len())
        })?;
        Ok(())
    })?;
    anyhow::ensure!(in_place_keys == total_keys, "the in-place range returned {in_place_keys} of {total_keys} keys");

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |k: i64| k as f64 / 1024.0;
    figs.insert("kv_keys", total_keys as f64);
    figs.insert("kv_cli_ms", ms(cli));
    figs.insert("kv_cli_rss_mib", mib(cli_rss));
    figs.insert("kv_etcdctl_ms", ms(etcdctl));
    figs.insert("kv_etcdctl_rss_mib", mib(etcdctl_rss));
    let mut table = format!(
        "kvstore of {} nodes, {} IP entries, {} identities (+{} value keys), {total_keys} keys; etcd {} on loopback; median of {} runs\n\n",
        shape.nodes, shape.ips, shape.identities, shape.identities, etcd_version(), args.runs
    );
    table.push_str("| what | wall ms | peak RSS MiB | wall vs etcdctl | RSS vs etcdctl |\n|---|---:|---:|---:|---:|\n");
    table.push_str(&format!("| `etcdctl get --prefix cilium/state/` | {:.0} | {:.1} | 1.00x | 1.00x |\n", ms(etcdctl), mib(etcdctl_rss)));
    table.push_str(&format!(
        "| `kvcheck dump kvstore --output json` (health, paged read, decode) | {:.0} | {:.1} | {:.2}x | {:.2}x |\n",
        ms(cli), mib(cli_rss), ms(cli) / ms(etcdctl), cli_rss as f64 / etcdctl_rss as f64
    ));
    table.push_str(&format!(
        "| kvcheck library read + decode, in-process, default pages ({default_page} keys) | {:.0} | - | {:.2}x | - |\n",
        ms(library), ms(library) / ms(etcdctl)
    ));
    table.push_str(&format!(
        "| raw etcd-client range of `cilium/state/`, in-process, nothing decoded (the floor) | {:.0} | - | {:.2}x | - |\n",
        ms(floor), ms(floor) / ms(etcdctl)
    ));
    table.push_str(&format!(
        "| kvcheck's range call, one range of `cilium/state/` read in place, nothing decoded | {:.0} | - | {:.2}x | - |\n",
        ms(in_place), ms(in_place) / ms(etcdctl)
    ));
    table.push_str(&format!(
        "| kvcheck's range calls in {default_page}-key pages, one stream per prefix, every prefix at once, nothing decoded | {:.0} | - | {:.2}x | - |\n",
        ms(paged), ms(paged) / ms(etcdctl)
    ));
    table.push_str(&format!(
        "\nkvcheck's kvstore read (paged at one revision, every prefix at once, the `ip/v1` prefix's rest in two sub-ranges at once, each page read in place and decoded) is **{:.2}x its floor** in-process (the two read in turns); `kvcheck dump kvstore` is {:.2}x it with its process start, etcd health probe and output. One range read in place, nothing decoded, is {:.2}x the floor (etcd-client copies every key and value out of the response); pages in one stream per prefix, nothing decoded, are {:.2}x.\n",
        ms(library) / ms(floor),
        ms(cli) / ms(floor),
        ms(in_place) / ms(floor),
        ms(paged) / ms(floor)
    ));
    table.push_str("\nPage size (kvcheck library, read + decode, in-process):\n\n| page | wall ms |\n|---|---:|\n");
    table.push_str(&pages);

    // The same read against etcd 3.5 (the build `cargo xtask test` repeats the kvstore tests
    // with; `cargo xtask bench` names it), whose range reads cost differently.
    if let Ok(binary) = std::env::var("KVCHECK_BENCH_ETCD35") {
        drop(etcd);
        let etcd35 = EtcdCluster::start(1, false, &binary)?;
        rt.block_on(simdata::load(&etcd35.endpoints(), simdata::cluster_pairs(shape)))?;
        let settings35 = kvcheck::kvstore::config::EtcdSettings { endpoints: etcd35.endpoints(), ..Default::default() };
        // Reads after the load, unmeasured, as etcdctl's and `dump`'s runs are for the 3.4
        // figures (etcd is still busy with the load for a while).
        raw_kvstore_range(args.runs, etcd35.endpoints())?;
        let (library35, floor35, keys35) = library_and_floor(&settings35)?;
        anyhow::ensure!(keys35 == total_keys, "the raw range on etcd 3.5 returned {keys35} of {total_keys} keys");
        figs.insert("kv_ratio_etcd35", ms(library35) / ms(floor35));
        table.push_str(&format!(
            "\nThe same keys in etcd {} (the build `cargo xtask test` repeats the kvstore tests with), median of {} runs each, read in turns: raw range (the floor) {:.0} ms, kvcheck library read + decode {:.0} ms, **{:.2}x its floor**.\n",
            etcd_version_of(&binary), args.runs, ms(floor35), ms(library35), ms(library35) / ms(floor35)
        ));
    }
    Ok(table)
}
