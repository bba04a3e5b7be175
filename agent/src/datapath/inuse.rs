//! Which map objects the datapath really uses. Cilium's programs reach the ipcache, endpoint
//! and tunnel maps through the map ids they were loaded with, not through the pins kvcheck
//! reads; when the two differ (cilium/cilium#45196: a pinned ipcache empty while the attached
//! programs used an unpinned, populated one; #25154; #11517), the pin says nothing about what
//! the datapath does.
//!
//! Discovery, per interface of the node's network namespace: classic tc `bpf` filters
//! (rtnetlink filter dump, ingress and egress of clsact), XDP programs (the link's `IFLA_XDP`:
//! Cilium's NodePort acceleration), tcx and netkit attachments (`BPF_PROG_QUERY`); for each program its map ids (`BPF_OBJ_GET_INFO_BY_FD`), and through
//! the prog arrays among them (`cilium_calls_*`, `cilium_call_policy`) the tail-called programs
//! and their maps. Getting program and map fds by id needs CAP_SYS_ADMIN: without it the
//! discovery is skipped, and says why.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::AsFd;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
use serde::Serialize;

use super::addresses::Interface;
use super::{sys, ENDPOINTS, IPCACHE_V1, IPCACHE_V2, TUNNEL};

/// tcx and netkit attach types (`enum bpf_attach_type`).
const TCX_INGRESS: u32 = 46;
const TCX_EGRESS: u32 = 47;
const NETKIT_PRIMARY: u32 = 54;
const NETKIT_PEER: u32 = 55;

/// Tail calls followed at most this deep (Cilium's chains are a few calls long).
const MAX_TAIL_DEPTH: usize = 8;

/// Where one of the watched maps is used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapUse {
    /// Entries in that map (counted when it is not the pinned one).
    pub entries: Option<usize>,
    /// Attach points and programs using it: `eth0 tcx ingress: cil_from_netdev -> tail_handle_ipv4`.
    pub users: BTreeSet<String>,
}

/// The watched maps the attached programs use, by Cilium map name and map id.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MapsInUse {
    pub maps: BTreeMap<String, BTreeMap<u32, MapUse>>,
    /// Programs attached to the interfaces (tc, tcx, netkit).
    pub attached_programs: usize,
    /// Programs looked at, tail-called ones included.
    pub programs: usize,
    /// bpf() and netlink requests the discovery made.
    pub syscalls: u64,
    pub took_ms: f64,
}

/// Whether the datapath's maps were checked, and what was found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum LiveMaps {
    /// `--live-maps off`.
    #[default]
    Off,
    /// Not permitted or not possible here; the check ran on the pins.
    Skipped { reason: String },
    Checked {
        #[serde(flatten)]
        in_use: MapsInUse,
        /// Map name → the pinned map's id and entry count.
        pinned: BTreeMap<String, (u32, usize)>,
        /// Map names read from the map the programs use instead of the pin.
        read_live: BTreeMap<String, u32>,
    },
}

impl LiveMaps {
    /// The map names read from the map in use instead of the pin.
    pub fn read_live(&self) -> BTreeMap<String, u32> {
        match self {
            LiveMaps::Checked { read_live, .. } => read_live.clone(),
            _ => BTreeMap::new(),
        }
    }

    /// One line per fact, for the text reports.
    pub fn summary(&self) -> Vec<String> {
        match self {
            LiveMaps::Off => vec!["not checked (--live-maps off): the pinned maps were read".into()],
            LiveMaps::Skipped { reason } => vec![format!("skipped, the pinned maps were read: {reason}")],
            LiveMaps::Checked { in_use, pinned, read_live } => {
                let mut out = vec![format!("{} programs attached ({} with the ones they tail-call); discovery {:.1} ms, {} requests", in_use.attached_programs, in_use.programs, in_use.took_ms, in_use.syscalls)];
                for (name, (pin, n)) in pinned {
                    let ids = in_use.maps.get(name);
                    let line = match ids {
                        None => format!("{name}: pinned map {pin} ({n} entries); no attached program uses it"),
                        Some(ids) if ids.len() == 1 && ids.contains_key(pin) => format!("{name}: the pinned map {pin} is the one in use"),
                        Some(ids) => {
                            let used: Vec<String> = ids.iter().map(|(id, u)| format!("{id} ({} entries; {})", u.entries.map_or_else(|| n.to_string(), |e| e.to_string()), u.users.iter().cloned().collect::<Vec<_>>().join(", "))).collect();
                            let read = read_live.get(name).map_or_else(|| format!("read the pin {pin}"), |id| format!("read map {id}"));
                            format!("{name}: MISMATCH: pinned map {pin} ({n} entries), in use {}; {read}", used.join(" and "))
                        }
                    };
                    out.push(line);
                }
                out
            }
        }
    }

    /// Distinct maps in use per Cilium map name (0 when no attached program uses it).
    pub fn in_use_counts(&self) -> BTreeMap<String, usize> {
        match self {
            LiveMaps::Checked { in_use, pinned, .. } => pinned.keys().map(|n| (n.clone(), in_use.maps.get(n).map_or(0, BTreeMap::len))).collect(),
            _ => BTreeMap::new(),
        }
    }
}

/// The Cilium map a kernel map name (truncated to 15 bytes) is, if one kvcheck checks.
pub fn cilium_name(kernel_name: &str) -> Option<&'static str> {
    [IPCACHE_V1, IPCACHE_V2, ENDPOINTS, TUNNEL].into_iter().find(|n| kernel_name == &n[..n.len().min(15)])
}

impl MapsInUse {
    /// The map names whose programs all use one map that is not the pinned one: the check
    /// reads those instead of the pins.
    pub fn live_overrides(&self, pinned: &BTreeMap<String, (u32, usize)>) -> BTreeMap<String, u32> {
        self.maps
            .iter()
            .filter_map(|(name, ids)| {
                let only = *ids.keys().next().filter(|_| ids.len() == 1)?;
                (pinned.get(name).map(|p| p.0) != Some(only)).then(|| (name.clone(), only))
            })
            .collect()
    }
}

/// Why a discovery step failed: the report says so and the check goes on with the pins.
fn reason(what: &str, e: &std::io::Error) -> String {
    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
        let cap = if what.starts_with("BPF_PROG_QUERY") { "querying attached programs needs CAP_NET_ADMIN" } else { "getting BPF programs and maps by id needs CAP_SYS_ADMIN" };
        return format!("{what}: {e}: {cap} (an opt-in in deploy/kvcheck.yaml)");
    }
    format!("{what}: {e}")
}

/// Finds the watched maps the programs attached to `interfaces` use (in `netns`, or ours).
/// `pinned` (name → pinned map id) decides which used maps get their entries counted.
/// `Err` says why it could not run (the check then runs on the pins).
pub async fn discover(netns: Option<&Path>, interfaces: &[Interface], pinned: &BTreeMap<String, u32>) -> Result<MapsInUse, String> {
    let started = std::time::Instant::now();
    // Classic tc filters over rtnetlink.
    let (connection, handle, _) = super::addresses::netlink_connection(netns).map_err(|e| e.to_string())?;
    let conn_task = tokio::spawn(connection);
    let mut roots: Vec<(String, u32)> = Vec::new();
    let mut syscalls = 0u64;
    for i in interfaces {
        for (hook, req) in [("tc ingress", handle.traffic_filter(i.ifindex as i32).get().ingress()), ("tc egress", handle.traffic_filter(i.ifindex as i32).get().egress())] {
            syscalls += 1;
            let mut stream = req.execute();
            // An interface without a clsact qdisc answers with an error: nothing attached.
            while let Ok(Some(msg)) = stream.try_next().await {
                let is_bpf = msg.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
                let ids = msg.attributes.iter().filter_map(|a| match a {
                    TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
                        _ => None,
                    }),
                    _ => None,
                });
                if is_bpf {
                    roots.extend(ids.map(|id| (format!("{} {hook}", i.name), id)));
                }
            }
        }
    }
    conn_task.abort();
    // XDP programs (NodePort acceleration on native devices), from the link dump.
    for i in interfaces {
        roots.extend(i.xdp.iter().map(|(mode, id)| (format!("{} {mode}", i.name), *id)));
    }

    // tcx/netkit queries (ifindex is resolved in the calling thread's namespace) and the
    // program walk, on a helper thread inside the namespace.
    let netns = netns.map(Path::to_owned);
    let links: Vec<(String, u32)> = interfaces.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
    let pinned = pinned.clone();
    // Its own thread (setns must not touch a pooled one); awaited, not joined, so the async
    // workers keep serving while it walks.
    let (done, walked) = tokio::sync::oneshot::channel();
    let _ = std::thread::spawn(move || done.send((|| -> Result<MapsInUse, String> {
        if let Some(path) = &netns {
            let file = std::fs::File::open(path).map_err(|e| reason(&format!("opening {}", path.display()), &e))?;
            // SAFETY: setns on this helper thread only; the fd is valid for the call.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
                return Err(reason("entering the network namespace", &std::io::Error::last_os_error()));
            }
        }
        let mut roots = roots;
        for (name, ifindex) in &links {
            for (hook, t) in [("tcx ingress", TCX_INGRESS), ("tcx egress", TCX_EGRESS), ("netkit primary", NETKIT_PRIMARY), ("netkit peer", NETKIT_PEER)] {
                syscalls += 1;
                match sys::prog_query_ifindex(*ifindex, t) {
                    Ok(ids) => roots.extend(ids.into_iter().map(|id| (format!("{name} {hook}"), id))),
                    Err(e) => return Err(reason(&format!("BPF_PROG_QUERY {name} {hook}"), &e)),
                }
            }
        }
        let mut out = walk_programs(&roots, &mut syscalls)?;
        for (name, ids) in out.maps.iter_mut() {
            for (id, u) in ids.iter_mut().filter(|(id, _)| pinned.get(name) != Some(*id)) {
                u.entries = Some(count_entries(*id, &mut syscalls).map_err(|e| reason(&format!("counting map {id}"), &e))?);
            }
        }
        out.attached_programs = roots.len();
        out.syscalls = syscalls;
        Ok(out)
    })()));
    let mut out = walked.await.map_err(|_| "the discovery thread panicked".to_owned())??;
    out.took_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(out)
}

/// Walks the programs from their attach points through tail calls, recording where the
/// watched maps are used.
fn walk_programs(roots: &[(String, u32)], syscalls: &mut u64) -> Result<MapsInUse, String> {
    let mut out = MapsInUse::default();
    let mut progs: HashMap<u32, sys::ProgInfo> = HashMap::new();
    let mut maps: HashMap<u32, sys::MapInfo> = HashMap::new();
    let mut tails: HashMap<u32, Vec<u32>> = HashMap::new();
    for (attach, root) in roots {
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([(*root, String::new(), 0usize)]);
        while let Some((id, path, depth)) = queue.pop_front() {
            if !seen.insert(id) || depth > MAX_TAIL_DEPTH {
                continue;
            }
            if !progs.contains_key(&id) {
                *syscalls += 2;
                let fd = match sys::prog_fd_by_id(id) {
                    Ok(fd) => fd,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // detached meanwhile
                    Err(e) => return Err(reason(&format!("BPF_PROG_GET_FD_BY_ID {id}"), &e)),
                };
                let info = sys::prog_info(fd.as_fd()).map_err(|e| reason(&format!("program {id} info"), &e))?;
                progs.insert(id, info);
            }
            let prog = &progs[&id];
            let path = if path.is_empty() { prog.name.clone() } else { format!("{path} -> {}", prog.name) };
            for map_id in prog.map_ids.clone() {
                if !maps.contains_key(&map_id) {
                    *syscalls += 2;
                    let fd = match sys::map_fd_by_id_readonly(map_id) {
                        Ok(fd) => fd,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        Err(e) => return Err(reason(&format!("BPF_MAP_GET_FD_BY_ID {map_id}"), &e)),
                    };
                    let info = sys::map_info(fd.as_fd()).map_err(|e| reason(&format!("map {map_id} info"), &e))?;
                    if info.map_type == sys::BPF_MAP_TYPE_PROG_ARRAY {
                        tails.insert(map_id, prog_array_ids(fd.as_fd(), info.key_size, syscalls));
                    }
                    maps.insert(map_id, info);
                }
                let info = &maps[&map_id];
                if let Some(name) = cilium_name(&info.name) {
                    out.maps.entry(name.to_owned()).or_default().entry(map_id).or_default().users.insert(format!("{attach}: {path}"));
                }
                for t in tails.get(&map_id).into_iter().flatten() {
                    queue.push_back((*t, path.clone(), depth + 1));
                }
            }
        }
    }
    out.programs = progs.len();
    Ok(out)
}

/// The program ids a prog array holds (a userspace lookup in a prog array returns the id).
fn prog_array_ids(fd: std::os::fd::BorrowedFd<'_>, key_size: u32, syscalls: &mut u64) -> Vec<u32> {
    let mut out = Vec::new();
    if key_size != 4 {
        return out;
    }
    let mut key: Option<[u8; 4]> = None;
    let mut next = [0u8; 4];
    loop {
        *syscalls += 1;
        match sys::get_next_key(fd, key.as_ref().map(|k| k.as_slice()), &mut next) {
            Ok(true) => {}
            _ => break,
        }
        let mut value = [0u8; 4];
        *syscalls += 1;
        if let Ok(true) = sys::lookup_elem(fd, &next, &mut value) {
            out.push(u32::from_ne_bytes(value));
        }
        key = Some(next);
    }
    out
}

/// Entries in map `id` (key iteration).
fn count_entries(id: u32, syscalls: &mut u64) -> std::io::Result<usize> {
    let fd = sys::map_fd_by_id_readonly(id)?;
    let info = sys::map_info(fd.as_fd())?;
    sys::count_keys(fd.as_fd(), info.key_size, syscalls)
}
