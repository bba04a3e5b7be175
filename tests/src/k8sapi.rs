//! The Kubernetes API's list protocol for Cilium's CRDs, served by the test over objects shaped
//! exactly as a real Cilium 1.16.15 wrote them (tests/data/k8s/, captured from the kube-apiserver
//! of shared/oracles/cilium-1.16.15). CI has no kube-apiserver to install, so this speaks what
//! kvcheck relies on: paged lists (`limit`, `continue`, every page at the first page's
//! resourceVersion), 410 Gone for a compacted continue token, 403 Forbidden for a resource
//! RBAC refuses, 404 for one that is not installed, and a watch stream (`watch=1`) with
//! bookmarks and 410 for a compacted resourceVersion.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// How often an idle watch gets a bookmark (the kube-apiserver's `bookmarkFrequency`).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// The four Cilium resources: plural → (group version, list kind).
const RESOURCES: [(&str, &str, &str); 4] = [
    ("ciliumendpoints", "cilium.io/v2", "CiliumEndpointList"),
    ("ciliumnodes", "cilium.io/v2", "CiliumNodeList"),
    ("ciliumidentities", "cilium.io/v2", "CiliumIdentityList"),
    ("ciliumendpointslices", "cilium.io/v2alpha1", "CiliumEndpointSliceList"),
];

/// The objects of one captured list (`tests/data/k8s/<set>/<plural>.json`).
pub fn captured(set: &str, plural: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/k8s").join(set).join(format!("{plural}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    doc["items"].as_array().cloned().unwrap_or_default()
}

/// One version of an object: the resourceVersion that wrote it, `None` once deleted.
type History = Vec<(u64, Option<Value>)>;

#[derive(Default)]
struct Store {
    revision: u64,
    /// plural → object key (`ns/name` or `name`) → history.
    objects: BTreeMap<String, BTreeMap<String, History>>,
    /// Lists and watches from before this revision get 410 Gone.
    compacted: u64,
    forbidden: BTreeSet<String>,
    missing: BTreeSet<String>,
    /// Requests served, by plural (`list` or `watch`).
    requests: Vec<(String, String)>,
}

fn object_key(obj: &Value) -> String {
    let m = &obj["metadata"];
    let name = m["name"].as_str().unwrap_or_default();
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

impl Store {
    /// The live objects of `plural` at `revision`, `skip` then at most `limit` of them, and
    /// how many there are in all.
    fn at(&self, plural: &str, revision: u64, skip: usize, limit: usize) -> (Vec<Value>, usize) {
        let Some(objs) = self.objects.get(plural) else { return (Vec::new(), 0) };
        let live = objs.values().filter_map(|h| h.iter().rev().find(|(rv, _)| *rv <= revision).and_then(|(_, v)| v.as_ref()));
        let (mut page, mut total) = (Vec::new(), 0);
        for (i, v) in live.enumerate() {
            if i >= skip && page.len() < limit {
                page.push(v.clone());
            }
            total += 1;
        }
        (page, total)
    }
}

pub struct KubeApi {
    pub port: u16,
    pub dir: PathBuf,
    store: Arc<(Mutex<Store>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

impl KubeApi {
    /// A server on 127.0.0.1 (a free port) with no objects, and a kubeconfig for it.
    pub fn start() -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let dir = std::env::temp_dir().join(format!("kvcheck-kube-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("kubeconfig dir");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n"
        );
        std::fs::write(dir.join("kubeconfig"), kubeconfig).expect("kubeconfig");
        let store = Arc::new((Mutex::new(Store { revision: 100, ..Default::default() }), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (store.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, st) = (s.clone(), st.clone());
                        std::thread::spawn(move || serve(conn, &s, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        KubeApi { port, dir, store, stop, thread: Some(thread) }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn kubeconfig_str(&self) -> String {
        self.kubeconfig().display().to_string()
    }

    fn change(&self, f: impl FnOnce(&mut Store)) {
        let (lock, cv) = &*self.store;
        let mut st = lock.lock().expect("store");
        st.revision += 1;
        f(&mut st);
        cv.notify_all();
    }

    /// Creates or replaces `obj` (its resourceVersion set to the new revision).
    pub fn put(&self, plural: &str, mut obj: Value) {
        self.change(|st| {
            let rv = st.revision;
            obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            st.objects.entry(plural.to_owned()).or_default().entry(object_key(&obj)).or_default().push((rv, Some(obj)));
        });
    }

    pub fn put_all(&self, plural: &str, objs: impl IntoIterator<Item = Value>) {
        for o in objs {
            self.put(plural, o);
        }
    }

    /// Deletes the object `key` (`ns/name` or `name`).
    pub fn delete(&self, plural: &str, key: &str) {
        self.change(|st| {
            let rv = st.revision;
            let h = st.objects.get_mut(plural).and_then(|o| o.get_mut(key)).unwrap_or_else(|| panic!("no {plural} {key}"));
            h.push((rv, None));
        });
    }

    /// Every list or watch from before now gets 410 Gone, and open watches end (as after an
    /// apiserver restart whose etcd compacted meanwhile).
    pub fn compact(&self) {
        self.change(|st| {
            st.compacted = st.revision;
        });
    }

    /// RBAC refuses `plural` (403).
    pub fn forbid(&self, plural: &str) {
        self.change(|st| {
            st.forbidden.insert(plural.to_owned());
        });
    }

    /// The CRD `plural` is not installed (404).
    pub fn uninstall(&self, plural: &str) {
        self.change(|st| {
            st.missing.insert(plural.to_owned());
        });
    }

    /// (plural, `list` or `watch`) of every request served.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.store.0.lock().expect("store").requests.clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.store.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The discovery documents kubectl reads before it lists (`/api`, `/apis`, the group versions).
fn discovery(path: &str) -> Option<Value> {
    let resources = |gv: &str| -> Vec<Value> {
        RESOURCES
            .iter()
            .filter(|(_, g, _)| *g == gv)
            .map(|(plural, _, list)| {
                json!({"name": plural, "singularName": "", "namespaced": *plural == "ciliumendpoints", "kind": list.trim_end_matches("List"), "verbs": ["get", "list", "watch"]})
            })
            .collect()
    };
    match path {
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        "/api/v1" => Some(json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": []})),
        "/apis" => Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "cilium.io", "versions": [{"groupVersion": "cilium.io/v2", "version": "v2"}, {"groupVersion": "cilium.io/v2alpha1", "version": "v2alpha1"}], "preferredVersion": {"groupVersion": "cilium.io/v2", "version": "v2"}}]})),
        "/apis/cilium.io/v2" | "/apis/cilium.io/v2alpha1" => {
            let gv = path.trim_start_matches("/apis/");
            Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources(gv)}))
        }
        _ => None,
    }
}

fn respond(conn: &mut TcpStream, code: u16, body: &Value) {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    let _ = write!(conn, "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.replace("%2F", "/").replace("%3D", "=")))
        .collect();
    (path.to_owned(), params)
}

fn serve(mut conn: TcpStream, store: &(Mutex<Store>, Condvar), stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Headers are not needed: drain them.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, params) = query(&target);
    if let Some(doc) = discovery(&path) {
        respond(&mut conn, 200, &doc);
        return;
    }
    let Some((plural, group_version, list_kind)) = RESOURCES.iter().find(|(p, gv, _)| path == format!("/apis/{gv}/{p}")).copied() else {
        respond(&mut conn, 404, &status(404, "NotFound", &format!("the server could not find the requested resource ({path})")));
        return;
    };
    let watch = params.get("watch").is_some_and(|w| w == "1" || w == "true");
    let (lock, cv) = store;
    let mut st = lock.lock().expect("store");
    st.requests.push((plural.to_owned(), if watch { "watch" } else { "list" }.to_owned()));
    if st.forbidden.contains(plural) {
        let msg = format!("{plural}.cilium.io is forbidden: User \"system:serviceaccount:kube-system:kvcheck\" cannot list resource \"{plural}\" in API group \"cilium.io\" at the cluster scope");
        respond(&mut conn, 403, &status(403, "Forbidden", &msg));
        return;
    }
    if st.missing.contains(plural) {
        respond(&mut conn, 404, &status(404, "NotFound", "the server could not find the requested resource"));
        return;
    }
    if watch {
        let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(st.revision);
        let bookmarks = params.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let timeout = Duration::from_secs(params.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(290));
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n");
        if from < st.compacted {
            let e = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({})", st.compacted))});
            let _ = writeln!(conn, "{e}");
            return;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut sent = from;
        let mut last_bookmark = std::time::Instant::now();
        loop {
            let mut events = Vec::new();
            for h in st.objects.get(plural).into_iter().flat_map(BTreeMap::values) {
                for (i, (rv, v)) in h.iter().enumerate() {
                    if *rv > sent {
                        let (kind, obj) = match v {
                            Some(o) if i == 0 || h[i - 1].1.is_none() => ("ADDED", o.clone()),
                            Some(o) => ("MODIFIED", o.clone()),
                            None => {
                                let mut last = h[..i].iter().rev().find_map(|(_, v)| v.clone()).unwrap_or_default();
                                last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                                ("DELETED", last)
                            }
                        };
                        events.push((*rv, json!({"type": kind, "object": obj})));
                    }
                }
            }
            events.sort_by_key(|(rv, _)| *rv);
            for (_, e) in &events {
                if writeln!(conn, "{e}").is_err() {
                    return;
                }
            }
            sent = st.revision;
            // A compaction ends the watch before its bookmark: the client resumes from an
            // older resourceVersion and gets 410 Gone.
            if stop.load(Ordering::Relaxed) || std::time::Instant::now() >= deadline || st.compacted > from {
                return;
            }
            // As a real kube-apiserver does: a bookmark about once a minute, so an idle watch
            // carries nothing for that long (a client's read timeout must allow for it).
            if bookmarks && last_bookmark.elapsed() >= BOOKMARK_INTERVAL {
                last_bookmark = std::time::Instant::now();
                let b = json!({"type": "BOOKMARK", "object": {"kind": list_kind.trim_end_matches("List"), "apiVersion": group_version, "metadata": {"resourceVersion": sent.to_string()}}});
                if writeln!(conn, "{b}").is_err() {
                    return;
                }
            }
            let _ = conn.flush();
            st = cv.wait_timeout(st, Duration::from_secs(1)).expect("store").0;
        }
    }
    // A list: the first page at the current revision, later pages at the token's.
    let limit: usize = params.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let (revision, offset) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, off) = token.split_once('-').unwrap_or(("0", "0"));
            (rv.parse().unwrap_or(0), off.parse().unwrap_or(0))
        }
        None => (st.revision, 0),
    };
    if revision < st.compacted {
        let msg = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";
        respond(&mut conn, 410, &status(410, "Expired", msg));
        return;
    }
    let (page, total) = st.at(plural, revision, offset, limit);
    let next = offset + page.len();
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if next < total {
        metadata["continue"] = Value::String(format!("{revision}-{next}"));
        metadata["remainingItemCount"] = json!(total - next);
    }
    let body = json!({"apiVersion": group_version, "kind": list_kind, "metadata": metadata, "items": page});
    drop(st);
    respond(&mut conn, 200, &body);
}
