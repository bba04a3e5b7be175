//! A Cilium agent's REST API on a unix socket, served by the test: the JSON documents a real
//! Cilium 1.16.15 agent answered (tests/data/cilium-api/, captured from the agent of
//! shared/oracles/cilium-1.16.15), with the endpoint states and health the test sets, and the
//! ways a real agent's socket behaves while it restarts: silent (accepts, never answers: the
//! daemon still initializing), refused (a crashed agent's socket file left behind), absent
//! (stopped cleanly, its runtime state left in place).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// Captured documents of one Cilium version: `healthz`, `endpoint`, `config`.
pub fn captured(version: &str) -> BTreeMap<String, Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/cilium-api")
        .join(version);
    ["healthz", "endpoint", "config"]
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.json")))
                .unwrap_or_else(|e| panic!("{}/{n}.json: {e}", dir.display()));
            (
                n.to_owned(),
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{n}.json: {e}")),
            )
        })
        .collect()
}

/// How the API answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Serves the documents: `GET /v1/<name>` answers `docs[name]`.
    Serve(BTreeMap<String, Value>),
    /// Accepts connections and never answers.
    Silent,
}

/// The captured 1.16.15 documents with every endpoint in `state` and the kvstore `Ok` or not.
pub fn agent_docs(endpoint_state: &str, kvstore_ok: bool) -> Mode {
    let mut docs = captured("v1.16.15");
    for ep in docs
        .get_mut("endpoint")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        ep["status"]["state"] = Value::String(endpoint_state.to_owned());
    }
    if !kvstore_ok {
        let h = docs.get_mut("healthz").expect("healthz");
        h["kvstore"] = serde_json::json!({"state": "Failure", "msg": "Err: not able to connect to any etcd endpoints"});
        h["cilium"]["state"] = Value::String("Failure".into());
        let msg = format!(
            "{}    Kvstore service is not ready: Err: not able to connect to any etcd endpoints",
            h["cilium"]["msg"].as_str().unwrap_or_default()
        );
        h["cilium"]["msg"] = Value::String(msg);
    }
    Mode::Serve(docs)
}

pub struct CiliumApi {
    /// Cilium's runtime directory: the socket and `state/globals/node_config.h`.
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
    mode: Arc<Mutex<Mode>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CiliumApi {
    /// An API serving `mode` in a fresh runtime directory (with a node_config.h, as Cilium
    /// leaves one).
    pub fn start(mode: Mode) -> CiliumApi {
        let runtime_dir = std::env::temp_dir().join(format!(
            "kvcheck-cilium-run-{}-{}",
            std::process::id(),
            crate::agent::free_port()
        ));
        std::fs::create_dir_all(runtime_dir.join("state/globals")).expect("runtime dir");
        std::fs::write(
            runtime_dir.join("state/globals/node_config.h"),
            "#define ENABLE_IPV4 1\n",
        )
        .expect("node_config.h");
        let socket = runtime_dir.join("cilium.sock");
        let mut api = CiliumApi {
            runtime_dir,
            socket,
            mode: Arc::new(Mutex::new(mode)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        api.listen();
        api
    }

    fn listen(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket).expect("binding the API socket");
        listener.set_nonblocking(true).expect("nonblocking");
        self.stop = Arc::new(AtomicBool::new(false));
        let (mode, stop) = (self.mode.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (mode, stop) = (mode.clone(), stop.clone());
                        std::thread::spawn(move || serve(conn, &mode, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode") = mode;
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The agent died: nothing listens, the socket file stays (connection refused).
    pub fn crash(&mut self) {
        self.halt();
    }

    /// The agent stopped cleanly: its socket is removed, its runtime state stays.
    pub fn stop(&mut self) {
        self.halt();
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A new agent instance: a new socket (a later mtime) serving `mode`.
    pub fn restart(&mut self, mode: Mode) {
        self.halt();
        std::thread::sleep(Duration::from_millis(20));
        self.set(mode);
        self.listen();
    }

    pub fn socket_str(&self) -> &str {
        self.socket.to_str().unwrap_or_default()
    }
}

impl Drop for CiliumApi {
    fn drop(&mut self) {
        self.halt();
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

/// One HTTP/1.1 exchange, answered as Go's net/http does (Content-Length, then close).
fn serve(mut conn: UnixStream, mode: &Mutex<Mode>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_owned();
    let current = mode.lock().expect("mode").clone();
    let docs = match current {
        Mode::Silent => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        Mode::Serve(docs) => docs,
    };
    let (status, body) = match path.strip_prefix("/v1/").and_then(|n| docs.get(n)) {
        Some(doc) => ("200 OK", doc.to_string()),
        None => ("404 Not Found", "\"not found\"".to_owned()),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
