//! The datapath reader against real kernel maps in private bpffs mounts.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;
use kvcheck::datapath::maps::PinnedMap;
use kvcheck::datapath::sys;
use kvcheck::model::version::Layout;
use kvcheck_tests::encode::{self, EndpointValue, IpcacheValue};
use kvcheck_tests::maps::{self, BpffsMount, CiliumMaps, MapShape, WriterMap};
use kvcheck_tests::netns::Netns;
use kvcheck_tests::sample;
use kvcheck_tests::{kvcheck_json, require_root, run_kvcheck};
use serde_json::{json, Value};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A release string for each layout, as an operator would pass it.
fn release(layout: Layout) -> &'static str {
    match layout {
        Layout::V1_7 => "1.7.1",
        Layout::V1_14 => "v1.14.5",
        Layout::V1_15 => "1.16",
        Layout::V1_17 => "1.17.3",
        Layout::V1_18 => "1.18",
        Layout::V1_19 => "v1.19.4",
        Layout::V1_20 => "1.20.0",
    }
}

const MAC: [u8; 6] = [0x9e, 0x9c, 0xde, 0x29, 0xa2, 0x91];
const NODE_MAC: [u8; 6] = [0x3e, 0xec, 0x3e, 0xc4, 0xf5, 0xa7];

/// Fills maps the way an agent of `layout` would: world entries, host IPs, a local pod, remote
/// pods (IPv4 and IPv6) with tunnel endpoint and encrypt key, a pod CIDR, a local-scope CIDR
/// identity, and (≥ v1.14) an entry from a remote cluster.
fn fill(m: &CiliumMaps, layout: Layout) {
    let ipc = |prefix: &str, cluster: u16, v: IpcacheValue| {
        m.ipcache
            .update(&encode::ipcache_key(layout, net(prefix), cluster), &encode::ipcache_value(layout, v))
            .unwrap();
    };
    let cluster = if layout >= Layout::V1_14 { 4 } else { 0 };
    let flags = if layout >= Layout::V1_15 { 1 } else { 0 };
    ipc("0.0.0.0/0", 0, IpcacheValue { identity: 2, ..Default::default() });
    ipc("::/0", 0, IpcacheValue { identity: 2, ..Default::default() });
    ipc("10.5.1.132/32", 0, IpcacheValue { identity: 1, ..Default::default() });
    ipc("10.6.1.221/32", 0, IpcacheValue { identity: 13110, ..Default::default() });
    ipc("10.6.7.20/32", 0, IpcacheValue {
        identity: 199_472,
        tunnel_endpoint: Some(ip("10.5.1.133")),
        encrypt_key: 5,
        flags,
        node_id: 0,
    });
    ipc("fd00:10:244:1::d643/128", 0, IpcacheValue {
        identity: 199_472,
        tunnel_endpoint: if layout.ipcache_v2() { Some(ip("fc00:c111::3")) } else { Some(ip("10.5.1.133")) },
        encrypt_key: 255,
        ..Default::default()
    });
    ipc("10.6.7.0/24", 0, IpcacheValue {
        identity: 2,
        tunnel_endpoint: Some(ip("10.5.1.133")),
        ..Default::default()
    });
    ipc("192.0.2.0/28", 0, IpcacheValue { identity: 16_777_217, ..Default::default() });
    ipc("10.9.0.7/32", cluster, IpcacheValue {
        identity: 4 << 16 | 300,
        tunnel_endpoint: Some(ip("10.5.9.1")),
        ..Default::default()
    });

    let ep = |addr: &str, v: EndpointValue| {
        m.endpoints
            .update(&encode::endpoint_key(ip(addr)), &encode::endpoint_value(layout, v))
            .unwrap();
    };
    ep("10.5.1.132", EndpointValue::host());
    ep("fd00::132", EndpointValue::host());
    let pod = EndpointValue {
        ifindex: 7,
        endpoint_id: 93,
        flags: 0,
        mac: MAC,
        node_mac: NODE_MAC,
        identity: 13110,
        parent_ifindex: if layout >= Layout::V1_17 { 3 } else { 0 },
    };
    ep("10.6.1.221", pod);
    ep("fd00:10:244:1::dd", pod);
    if let Some(t) = &m.tunnel {
        t.update(&encode::tunnel_key(ip("10.6.7.0")), &encode::tunnel_value(ip("10.5.1.133"), 5))
            .unwrap();
    }
}

fn find<'a>(entries: &'a Value, field: &str, value: &str) -> &'a Value {
    entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[field] == value)
        .unwrap_or_else(|| panic!("no entry with {field}={value} in {entries}"))
}

fn assert_decoded(doc: &Value, layout: Layout) {
    let ipc = &doc["ipcache"];
    assert_eq!(ipc["name"], layout.ipcache_map_name());
    assert_eq!(ipc["entry_count"], 9);
    assert_eq!(ipc["undecodable"], json!([]));
    let e = &ipc["entries"];
    let world = find(e, "prefix", "0.0.0.0/0");
    assert_eq!((world["identity"].as_u64(), &world["tunnel_endpoint"]), (Some(2), &Value::Null));
    assert_eq!(find(e, "prefix", "::/0")["identity"], 2);
    assert_eq!(find(e, "prefix", "10.5.1.132/32")["identity"], 1);
    let remote = find(e, "prefix", "10.6.7.20/32");
    assert_eq!(remote["identity"], 199_472);
    assert_eq!(remote["tunnel_endpoint"], "10.5.1.133");
    assert_eq!(remote["encrypt_key"], 5);
    let v6 = find(e, "prefix", "fd00:10:244:1::d643/128");
    assert_eq!(v6["encrypt_key"], 255);
    if layout.ipcache_v2() {
        assert_eq!(v6["tunnel_endpoint"], "fc00:c111::3");
        assert_eq!(v6["flag_names"], json!(["has-tunnel-endpoint", "ipv6-tunnel-endpoint"]));
        assert_eq!(remote["flag_names"], json!(["skip-tunnel", "has-tunnel-endpoint"]));
    } else {
        assert_eq!(v6["tunnel_endpoint"], "10.5.1.133");
        let expected: Value = if layout >= Layout::V1_15 { json!(["skip-tunnel"]) } else { json!([]) };
        assert_eq!(remote["flag_names"], expected);
    }
    let cidr = find(e, "prefix", "10.6.7.0/24");
    assert_eq!((cidr["identity"].as_u64(), cidr["tunnel_endpoint"].as_str()), (Some(2), Some("10.5.1.133")));
    assert_eq!(find(e, "prefix", "192.0.2.0/28")["identity"], 16_777_217);
    let other_cluster = find(e, "prefix", "10.9.0.7/32");
    assert_eq!(other_cluster["cluster_id"], if layout >= Layout::V1_14 { 4 } else { 0 });
    assert_eq!(other_cluster["identity"], 4 << 16 | 300);

    let eps = &doc["endpoints"];
    assert_eq!(eps["entry_count"], 4);
    let host = find(&eps["entries"], "ip", "10.5.1.132");
    assert_eq!((host["is_host"].as_bool(), &host["flag_names"]), (Some(true), &json!(["host"])));
    assert_eq!(find(&eps["entries"], "ip", "fd00::132")["is_host"], true);
    for addr in ["10.6.1.221", "fd00:10:244:1::dd"] {
        let pod = find(&eps["entries"], "ip", addr);
        assert_eq!((pod["ifindex"].as_u64(), pod["endpoint_id"].as_u64()), (Some(7), Some(93)));
        assert_eq!(pod["is_host"], false);
        assert_eq!(pod["mac"], "9e:9c:de:29:a2:91");
        assert_eq!(pod["node_mac"], "3e:ec:3e:c4:f5:a7");
        let identity = if layout >= Layout::V1_14 { json!(13110) } else { Value::Null };
        assert_eq!(pod["identity"], identity);
        if layout >= Layout::V1_17 {
            assert_eq!(pod["parent_ifindex"], 3);
        }
    }
    if layout.has_tunnel_map() {
        let t = find(&doc["tunnel"]["entries"], "prefix", "10.6.7.0");
        assert_eq!((t["tunnel_endpoint"].as_str(), t["encrypt_key"].as_u64()), (Some("10.5.1.133"), Some(5)));
    } else {
        assert_eq!(doc["tunnel"], Value::Null);
    }
}

#[test]
fn every_layout_decodes_every_field() {
    if !require_root("every_layout_decodes_every_field") {
        return;
    }
    for layout in Layout::ALL {
        let bpffs = BpffsMount::new().unwrap();
        let m = CiliumMaps::create(&bpffs, layout).unwrap();
        fill(&m, layout);
        let root = bpffs.root_str();

        let doc = kvcheck_json(None, &["dump", "datapath", "--bpffs", root, "--cilium-version", release(layout)]);
        assert_eq!(doc["layout"]["layout"], layout.name(), "{layout}");
        assert_eq!(doc["layout"]["source"], "option");
        assert_decoded(&doc, layout);

        // Detection from the maps alone picks the same layout. The one exception: v1.15-v1.16
        // and v1.17 differ only in the endpoint's parent ifindex, which is 0 for veth pods, so
        // a v1.16 node is reported as v1.17 with v1.15-v1.16 "not excluded".
        let detected = kvcheck_json(None, &["dump", "datapath", "--bpffs", root]);
        assert_eq!(detected["layout"]["source"], "detected");
        if layout == Layout::V1_15 {
            assert_eq!(detected["layout"]["layout"], "v1.17", "{}", detected["layout"]);
            assert_eq!(detected["layout"]["also_possible"], json!(["v1.15-v1.16"]));
        } else {
            assert_eq!(detected["layout"]["layout"], layout.name(), "detected {}", detected["layout"]);
            assert_eq!(detected["layout"]["also_possible"], json!([]));
        }
        assert_decoded(&detected, layout);

        // Key iteration (the fallback when the kernel refuses batch lookups) reads the same.
        let iterated = kvcheck_json(None, &["dump", "datapath", "--bpffs", root, "--read-method", "iterate"]);
        assert_eq!(iterated["ipcache"]["read_method"], "key-iteration");
        assert_eq!(detected["ipcache"]["read_method"], "batch-lookup");
        for map in ["ipcache", "endpoints", "tunnel"] {
            let set = |d: &Value| -> BTreeSet<String> {
                d[map]["entries"].as_array().map(|a| a.iter().map(Value::to_string).collect()).unwrap_or_default()
            };
            assert_eq!(set(&iterated), set(&detected), "{layout} {map}");
        }
    }
}

#[test]
fn ambiguous_layout_is_reported_with_alternatives() {
    if !require_root("ambiguous_layout_is_reported_with_alternatives") {
        return;
    }
    // A v1.16 node without ClusterMesh or parent interfaces looks like v1.17 too.
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, Layout::V1_15).unwrap();
    let key = encode::endpoint_key(ip("10.6.1.9"));
    let value = encode::endpoint_value(Layout::V1_15, EndpointValue { ifindex: 9, endpoint_id: 1, identity: 5, ..Default::default() });
    m.endpoints.update(&key, &value).unwrap();
    let doc = kvcheck_json(None, &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    assert_eq!(doc["layout"]["layout"], "v1.17");
    assert_eq!(doc["layout"]["also_possible"], json!(["v1.15-v1.16", "v1.14"]));
    let table = run_kvcheck(None, &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("not excluded: v1.15-v1.16, v1.14"), "{text}");
}

/// `bpftool map dump -j` of the same pins: raw bytes must agree entry for entry.
fn bpftool_entries(path: &std::path::Path) -> BTreeSet<(String, String)> {
    let out = Command::new("bpftool").args(["map", "dump", "-j", "pinned"]).arg(path).output().expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = |a: &Value| -> String {
        a.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().trim_start_matches("0x").to_owned())
            .collect()
    };
    v.as_array().unwrap().iter().map(|e| (bytes(&e["key"]), bytes(&e["value"]))).collect()
}

#[test]
fn bpftool_agrees_byte_for_byte() {
    if !require_root("bpftool_agrees_byte_for_byte") {
        return;
    }
    for layout in [Layout::V1_7, Layout::V1_15, Layout::V1_18] {
        let bpffs = BpffsMount::new().unwrap();
        let m = CiliumMaps::create(&bpffs, layout).unwrap();
        fill(&m, layout);
        let doc = kvcheck_json(None, &["dump", "datapath", "--bpffs", bpffs.root_str(), "--raw"]);
        let mut maps = vec![("ipcache", &m.ipcache)];
        maps.push(("endpoints", &m.endpoints));
        if let Some(t) = &m.tunnel {
            maps.push(("tunnel", t));
        }
        for (name, map) in maps {
            let ours: BTreeSet<(String, String)> = doc[name]["raw"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["key"].as_str().unwrap().to_owned(), r["value"].as_str().unwrap().to_owned()))
                .collect();
            let theirs = bpftool_entries(&map.path);
            assert!(!theirs.is_empty());
            assert_eq!(ours, theirs, "{layout} {name}: kvcheck vs bpftool");
            assert_eq!(doc[name]["entry_count"].as_u64(), Some(theirs.len() as u64));
        }
    }
}

#[test]
fn real_cilium_1_7_1_maps_match_ciliums_own_listing() {
    if !require_root("real_cilium_1_7_1_maps_match_ciliums_own_listing") {
        return;
    }
    let s = sample::sections(sample::REAL_1_7_1);
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, Layout::V1_7).unwrap();
    let write = |map: &WriterMap, heading: &str| {
        for (k, v) in sample::bpftool_entries(sample::section(&s, heading)) {
            map.update(&k, &v).unwrap();
        }
    };
    write(&m.ipcache, "bpftool map dump pinned /sys/fs/bpf/tc/globals/cilium_ipcache");
    write(&m.endpoints, "bpftool map dump pinned /sys/fs/bpf/tc/globals/cilium_lxc");
    write(m.tunnel.as_ref().unwrap(), "bpftool map dump pinned /sys/fs/bpf/tc/globals/cilium_tunnel_map");

    let doc = kvcheck_json(None, &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    assert_eq!(doc["layout"]["layout"], "v1.7-v1.13", "{}", doc["layout"]);

    // `cilium bpf ipcache list`: PREFIX  IDENTITY KEY TUNNEL-ENDPOINT
    let listing = sample::section(&s, "cilium bpf ipcache list");
    let ours = doc["ipcache"]["entries"].as_array().unwrap();
    assert_eq!(ours.len(), listing.len() - 1);
    for line in &listing[1..] {
        let f: Vec<&str> = line.split_whitespace().collect();
        let e = find(&doc["ipcache"]["entries"], "prefix", f[0]);
        assert_eq!(e["identity"].to_string(), f[1], "{line}");
        assert_eq!(e["encrypt_key"].to_string(), f[2], "{line}");
        let tunnel = if f[3] == "0.0.0.0" { Value::Null } else { json!(f[3]) };
        assert_eq!(e["tunnel_endpoint"], tunnel, "{line}");
    }

    // `cilium bpf endpoint list`: IP:0 (localhost) | id=N flags=0x.. ifindex=N mac=.. nodemac=..
    let listing = sample::section(&s, "cilium bpf endpoint list");
    assert_eq!(doc["endpoints"]["entries"].as_array().unwrap().len(), listing.len() - 1);
    for line in &listing[1..] {
        let f: Vec<&str> = line.split_whitespace().collect();
        let e = find(&doc["endpoints"]["entries"], "ip", f[0].trim_end_matches(":0"));
        if f[1] == "(localhost)" {
            assert_eq!(e["is_host"], true, "{line}");
            continue;
        }
        let field = |name: &str| f.iter().find_map(|x| x.strip_prefix(name)).unwrap();
        assert_eq!(e["endpoint_id"].to_string(), field("id="));
        assert_eq!(e["flags"].as_u64(), u64::from_str_radix(field("flags=0x"), 16).ok());
        assert_eq!(e["ifindex"].to_string(), field("ifindex="));
        assert_eq!(e["mac"].as_str().unwrap(), field("mac=").to_lowercase());
        assert_eq!(e["node_mac"].as_str().unwrap(), field("nodemac=").to_lowercase());
    }

    // `cilium bpf tunnel list`: PREFIX:0  ENDPOINT:0
    let listing = sample::section(&s, "cilium bpf tunnel list");
    assert_eq!(doc["tunnel"]["entries"].as_array().unwrap().len(), listing.len() - 1);
    for line in &listing[1..] {
        let f: Vec<&str> = line.split_whitespace().collect();
        let e = find(&doc["tunnel"]["entries"], "prefix", f[0].trim_end_matches(":0"));
        assert_eq!(e["tunnel_endpoint"], f[1].trim_end_matches(":0"));
    }
}

#[test]
fn handle_is_read_only() {
    if !require_root("handle_is_read_only") {
        return;
    }
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, Layout::V1_15).unwrap();
    let key = encode::endpoint_key(ip("10.0.0.1"));
    let value = encode::endpoint_value(Layout::V1_15, EndpointValue::host());
    m.endpoints.update(&key, &value).unwrap();

    let handle = PinnedMap::open("cilium_lxc", &m.endpoints.path).unwrap();
    let other = encode::endpoint_key(ip("10.0.0.2"));
    let try_cmd = |cmd: u32, k: &[u8], v: Option<&[u8]>| {
        use std::os::fd::AsRawFd;
        let mut attr = sys::ElemAttr {
            map_fd: handle.fd().as_raw_fd() as u32,
            key: k.as_ptr() as u64,
            value_or_next_key: v.map_or(0, |v| v.as_ptr() as u64),
            ..Default::default()
        };
        // SAFETY: key and value have the map's sizes.
        unsafe { sys::bpf(cmd, &mut attr) }
    };
    let update = try_cmd(sys::BPF_MAP_UPDATE_ELEM, &other, Some(&value)).unwrap_err();
    assert_eq!(update.raw_os_error(), Some(libc::EPERM), "update: {update}");
    let delete = try_cmd(sys::BPF_MAP_DELETE_ELEM, &key, None).unwrap_err();
    assert_eq!(delete.raw_os_error(), Some(libc::EPERM), "delete: {delete}");
    // ...while reading through the same handle works, and the map is unchanged.
    let raw = handle.read_all(Default::default()).unwrap();
    assert_eq!(raw.len(), 1);
}


fn expect_failure(bpffs: &BpffsMount, needles: &[&str]) {
    let out = run_kvcheck(None, &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[test]
fn bad_maps_give_clear_errors() {
    if !require_root("bad_maps_give_clear_errors") {
        return;
    }
    // No maps at all.
    let bpffs = BpffsMount::new().unwrap();
    let globals = bpffs.globals();
    let path = globals.join("cilium_ipcache");
    expect_failure(&bpffs, &["map cilium_ipcache not found", &path.display().to_string()]);

    // ipcache exists, endpoints map missing.
    let shape = maps::ipcache_shape(Layout::V1_15);
    let _ipc = WriterMap::create(&globals, shape).unwrap();
    expect_failure(&bpffs, &["map cilium_lxc not found", &globals.join("cilium_lxc").display().to_string()]);

    // ipcache of the wrong type.
    let bpffs = BpffsMount::new().unwrap();
    let _ipc = WriterMap::create(&bpffs.globals(), MapShape { map_type: maps::BPF_MAP_TYPE_HASH, ..shape }).unwrap();
    expect_failure(&bpffs, &["is a hash map; Cilium creates it as lpm_trie", "cilium_ipcache"]);

    // ipcache with a value size no Cilium release uses.
    let bpffs = BpffsMount::new().unwrap();
    let _ipc = WriterMap::create(&bpffs.globals(), MapShape { value_size: 16, ..shape }).unwrap();
    expect_failure(&bpffs, &["unknown layout for cilium_ipcache", "key 24 bytes, value 16 bytes", "key 24 / value 12, key 24 / value 24"]);

    // endpoint map with an unknown value size.
    let bpffs = BpffsMount::new().unwrap();
    let _ipc = WriterMap::create(&bpffs.globals(), shape).unwrap();
    let _lxc = WriterMap::create(&bpffs.globals(), MapShape { value_size: 56, ..maps::endpoints_shape(Layout::V1_15, true) }).unwrap();
    expect_failure(&bpffs, &["unknown layout for cilium_lxc", "value 56 bytes", "key 20 / value 48"]);

    // A version that contradicts the maps.
    let bpffs = BpffsMount::new().unwrap();
    let _m = CiliumMaps::create(&bpffs, Layout::V1_15).unwrap();
    let out = run_kvcheck(None, &["dump", "datapath", "--bpffs", bpffs.root_str(), "--cilium-version", "1.18"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cilium_ipcache_v2"));
    let out = run_kvcheck(None, &["dump", "datapath", "--bpffs", bpffs.root_str(), "--cilium-version", "banana"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot parse Cilium version"));
}

#[test]
fn undecodable_entries_are_reported_not_fatal() {
    if !require_root("undecodable_entries_are_reported_not_fatal") {
        return;
    }
    let bpffs = BpffsMount::new().unwrap();
    let m = CiliumMaps::create(&bpffs, Layout::V1_15).unwrap();
    fill(&m, Layout::V1_15);
    // An endpoint key with family byte 7: the kernel stores it, Cilium never would.
    let mut bad = encode::endpoint_key(ip("10.0.0.9"));
    bad[16] = 7;
    m.endpoints.update(&bad, &encode::endpoint_value(Layout::V1_15, EndpointValue::host())).unwrap();
    let doc = kvcheck_json(None, &["dump", "datapath", "--bpffs", bpffs.root_str(), "--cilium-version", "1.16"]);
    assert_eq!(doc["endpoints"]["entry_count"], 5);
    assert_eq!(doc["endpoints"]["entries"].as_array().unwrap().len(), 4);
    let u = &doc["endpoints"]["undecodable"][0];
    assert!(u["reason"].as_str().unwrap().contains("family byte is 7"), "{u}");
    assert_eq!(u["key"], hex::encode(&bad));
}

#[test]
fn addresses_from_rtnetlink_inside_a_namespace() {
    if !require_root("addresses_from_rtnetlink_inside_a_namespace") {
        return;
    }
    let bpffs = BpffsMount::new().unwrap();
    let _m = CiliumMaps::create(&bpffs, Layout::V1_7).unwrap();

    let ns = Netns::new("kvc-addr").unwrap();
    ns.add_cilium_host(&["10.6.1.124/32", "fd00:10:244:1::e2d6/128"]).unwrap();
    ns.add_interface("eth0", &["10.5.1.132/24", "fc00:c111::2/64"]).unwrap();
    let doc = kvcheck_json(Some(&ns.name), &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    let host = &doc["addresses"]["cilium_host"];
    assert_eq!(host["name"], "cilium_host");
    let addrs: BTreeSet<&str> = host["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .filter(|a| !a.starts_with("fe80:"))
        .collect();
    assert_eq!(addrs, BTreeSet::from(["10.6.1.124/32", "fd00:10:244:1::e2d6/128"]));

    let mut all: BTreeSet<String> = BTreeSet::new();
    for i in doc["addresses"]["interfaces"].as_array().unwrap() {
        for a in i["addresses"].as_array().unwrap() {
            all.insert(format!("{} {}", i["name"].as_str().unwrap(), a.as_str().unwrap()));
        }
    }
    // Exactly what we configured (+ lo's loopback, and the kernel's fe80:: link-locals on the
    // veths, which are real local addresses too).
    let configured: BTreeSet<String> = all.iter().filter(|a| !a.contains(" fe80:")).cloned().collect();
    let expected: BTreeSet<String> = [
        "lo 127.0.0.1/8",
        "lo ::1/128",
        "cilium_host 10.6.1.124/32",
        "cilium_host fd00:10:244:1::e2d6/128",
        "eth0 10.5.1.132/24",
        "eth0 fc00:c111::2/64",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(configured, expected);

    // A namespace without cilium_host says so.
    let bare = Netns::new("kvc-bare").unwrap();
    let doc = kvcheck_json(Some(&bare.name), &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    assert_eq!(doc["addresses"]["cilium_host"], Value::Null);
    let out = run_kvcheck(Some(&bare.name), &["dump", "datapath", "--bpffs", bpffs.root_str()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cilium_host: no such interface in this network namespace"));
}
