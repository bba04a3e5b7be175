//! Datapath read: kvcheck beside a raw batch-lookup loop and `bpftool map dump` (ipcache, endpoint map).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use kvcheck::datapath::{self, maps::PinnedMap, ReadOptions};
use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, EndpointValue, IpcacheValue};
use kvcheck_tests::kvcheck_bin;
use kvcheck_tests::maps::{BpffsMount, CiliumMaps};

use crate::common::*;
use crate::{Args, Figures};

pub(crate) fn datapath_bench(args: &Args, figs: &mut Figures) -> Result<String> {
    let n = args.ipcache_entries;
    let bpffs = BpffsMount::new()?;
    let layout = Layout::V1_15;
    let maps = CiliumMaps::create(&bpffs, layout)?;
    let t = Instant::now();
    maps.ipcache.fill(
        (0..n).map(|i| {
            let value = IpcacheValue {
                identity: 256 + i % 60_000,
                tunnel_endpoint: Some(IpAddr::V4(Ipv4Addr::new(172, 18, (i % 200) as u8, 1))),
                ..Default::default()
            };
            (encode::ipcache_key(layout, prefix(i), 0), encode::ipcache_value(layout, value))
        }),
        4096,
    )?;
    for i in 0..100u32 {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 200, 0, i as u8));
        let v = EndpointValue { ifindex: 10 + i, endpoint_id: i as u16, identity: 300 + i, ..Default::default() };
        maps.endpoints.update(&encode::endpoint_key(ip), &encode::endpoint_value(layout, v))?;
    }
    eprintln!("bench: filled {n} ipcache entries in {:.2?}", t.elapsed());

    let path = maps.ipcache.path.clone();
    let (floor, library) = floor_and_library(args.runs, &bpffs, &path, (24, 12), n, |s| s.ipcache.entries.len())?;
    let iterate = time_runs(1, || {
        let m = PinnedMap::open("cilium_ipcache", &path)?;
        m.read_all(datapath::maps::ReadStrategy::IterateOnly)?;
        Ok(())
    })?;
    let bin = kvcheck_bin();
    let root = bpffs.root_str().to_owned();
    let (cli_json, kvcheck_rss) = measure(args.runs, || {
        let mut c = Command::new(&bin);
        c.args(["dump", "datapath", "--bpffs", &root, "--output", "json"]);
        c
    })?;
    let bpftool = time_runs(args.runs, || {
        run_quiet(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(&path))
    })?;
    let bpftool_json = time_runs(args.runs, || {
        run_quiet(Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path))
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let per100k = |d: Duration| ms(d) * 100_000.0 / f64::from(n);
    figs.insert("dp_entries", f64::from(n));
    figs.insert("dp_floor_ms", ms(floor));
    figs.insert("dp_library_ms", ms(library));
    figs.insert("dp_cli_ms", ms(cli_json));
    figs.insert("dp_cli_rss_mib", kvcheck_rss as f64 / 1024.0);
    figs.insert("dp_bpftool_ms", ms(bpftool));
    let rows = [
        ("raw batch-lookup loop (floor)", floor),
        ("kvcheck library read+decode (batch)", library),
        ("kvcheck library read (key iteration, 1 run)", iterate),
        ("kvcheck dump datapath --output json", cli_json),
        ("bpftool map dump pinned (text)", bpftool),
        ("bpftool -j map dump pinned", bpftool_json),
    ];
    let mut table = String::new();
    table.push_str(&format!(
        "Datapath read, ipcache of {n} entries (layout {layout}), median of {} runs\n\n",
        args.runs
    ));
    table.push_str("| what | wall ms | ms per 100k | vs floor |\n|---|---:|---:|---:|\n");
    for (name, d) in rows {
        table.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.2}x |\n",
            ms(d),
            per100k(d),
            ms(d) / ms(floor)
        ));
    }
    table.push_str(&format!(
        "\nkvcheck dump (JSON) is {:.1}x faster than `bpftool map dump` and {:.1}x faster than `bpftool -j`; peak RSS of kvcheck: {:.1} MiB\n",
        ms(bpftool) / ms(cli_json),
        ms(bpftool_json) / ms(cli_json),
        kvcheck_rss as f64 / 1024.0
    ));
    drop(maps);
    table.push_str(&endpoints_bench(args)?);
    Ok(table)
}

/// The endpoint map (`cilium_lxc`) read, with a realistic number of local endpoints and full
/// (65,535), beside the raw batch-lookup floor and `bpftool map dump`.
pub(crate) fn endpoints_bench(args: &Args) -> Result<String> {
    let layout = Layout::V1_15;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut table = format!("\nEndpoint map (`cilium_lxc`, 65,535 max entries) read, median of {} runs\n\n| endpoints | floor ms | kvcheck library ms (vs floor) | `bpftool map dump` ms (vs library) |\n|---:|---:|---:|---:|\n", args.runs);
    for n in [110u32, 65_535] {
        let bpffs = BpffsMount::new()?;
        let maps = CiliumMaps::create(&bpffs, layout)?;
        maps.ipcache.update(&encode::ipcache_key(layout, "0.0.0.0/0".parse()?, 0), &encode::ipcache_value(layout, IpcacheValue { identity: 2, ..Default::default() }))?;
        maps.endpoints.fill(
            (0..n).map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a80_0000u32 + i));
                let v = EndpointValue { ifindex: 10 + i, endpoint_id: (i % 65_000) as u16 + 1, identity: 256 + i % 60_000, ..Default::default() };
                (encode::endpoint_key(ip), encode::endpoint_value(layout, v))
            }),
            4096,
        )?;
        let path = maps.endpoints.path.clone();
        let (floor, library) = floor_and_library(args.runs, &bpffs, &path, (20, 48), n, |s| s.endpoints.entries.len())?;
        let bpftool = time_runs(args.runs, || run_quiet(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(&path)))?;
        table.push_str(&format!(
            "| {n} | {:.2} | {:.2} ({:.2}x) | {:.1} ({:.1}x) |\n",
            ms(floor),
            ms(library),
            ms(library) / ms(floor),
            ms(bpftool),
            ms(bpftool) / ms(library)
        ));
    }
    table.push_str("\n(The library figure reads all of Cilium's maps: here a one-entry ipcache beside the endpoint map.)\n");
    Ok(table)
}

/// The raw batch-lookup floor of the map at `path` (key and value sizes `kv`) and kvcheck's
/// read+decode of all maps, each the median of `runs`; both must see `n` entries (`held` counts
/// what the snapshot decoded of that map).
fn floor_and_library(runs: u32, bpffs: &BpffsMount, path: &std::path::Path, kv: (usize, usize), n: u32, held: impl Fn(&datapath::DatapathSnapshot) -> usize) -> Result<(Duration, Duration)> {
    let floor = time_runs(runs, || {
        let got = raw_batch_loop(path, kv.0, kv.1)?;
        anyhow::ensure!(got == n as usize, "raw loop read {got} of {n}");
        Ok(())
    })?;
    let opts = ReadOptions { bpffs: bpffs.root.clone(), ..Default::default() };
    let library = time_runs(runs, || {
        let got = held(&datapath::read_maps(&opts)?);
        anyhow::ensure!(got == n as usize, "kvcheck read {got} of {n}");
        Ok(())
    })?;
    Ok((floor, library))
}
