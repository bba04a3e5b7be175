//! `kvcheck agent` against a simulated node (real maps, netns, etcd): findings open after the
//! grace period and resolve after repair, malformed values are reported and the agent goes on,
//! /metrics, /healthz and /readyz answer, SIGTERM stops it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvcheck::model::version::Layout;
use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, NodeSpec, NODE_B_IP};
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

struct Agent {
    child: Child,
    logs: mpsc::Receiver<Value>,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

impl Agent {
    fn start(node: &SimulatedNode, extra: &[&str]) -> Agent {
        let port = free_port();
        let mut args = node.check_args();
        args[0] = "agent".into();
        args.extend(["--grace", "1s", "--health-interval", "1s", "--listen", &format!("127.0.0.1:{port}"), "--cilium-version", "1.16"].map(String::from));
        args.extend(extra.iter().map(ToString::to_string));
        let mut child = Command::new(kvcheck_tests::kvcheck_bin()).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str::<Value>(&line).unwrap_or_else(|_| Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let agent = Agent { child, logs: rx, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(port, "/readyz").is_some_and(|(c, _)| c == 200) {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent not ready within 20 s");
    }

    /// Waits for a log line with `event` (and, when given, `kind`/`subject`); returns it and when it came.
    fn wait_for(&self, event: &str, kind: Option<&str>, subject: Option<&str>, timeout: Duration) -> (Value, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.logs.recv_timeout(left).unwrap_or_else(|_| panic!("no {event} {kind:?} {subject:?} within {timeout:?}"));
            if v["event"] == event && kind.is_none_or(|k| v["kind"] == k) && subject.is_none_or(|s| v["subject"] == s) {
                return (v, Instant::now());
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn agent_opens_and_resolves_findings_and_serves_probes() {
    if !require_root("agent_opens_and_resolves_findings_and_serves_probes") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let mut agent = Agent::start(&node, &[]);
    let (health, _) = agent.wait_for("node-health", None, None, Duration::from_secs(5));
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["etcd"].as_str().unwrap().starts_with("etcd: 1/1 connected"));

    // A drift in the map: opened within 1 s of the grace period (1 s) ending.
    let t0 = Instant::now();
    node.ipcache_put("10.9.9.9/32", IpcacheValue { identity: 1000, tunnel_endpoint: Some(NODE_B_IP.parse().unwrap()), ..Default::default() }).unwrap();
    let (opened, at) = agent.wait_for("finding-opened", Some("ipcache-stale"), Some("10.9.9.9/32"), Duration::from_secs(10));
    let took = at - t0;
    assert!(took >= Duration::from_secs(1) && took <= Duration::from_millis(2000 + 300), "opened after {took:?}: {opened}");
    // Repair: resolved within 1 s.
    let t1 = Instant::now();
    node.ipcache_delete("10.9.9.9/32").unwrap();
    let (_, at) = agent.wait_for("finding-resolved", Some("ipcache-stale"), Some("10.9.9.9/32"), Duration::from_secs(5));
    assert!(at - t1 <= Duration::from_millis(1300), "resolved after {:?}", at - t1);

    // A drift in etcd (a malformed value): reported, and the agent goes on.
    node.etcd_put("cilium/state/ip/v1/default/10.2.0.40", "{\"IP\":").unwrap();
    agent.wait_for("finding-opened", Some("kvstore-malformed"), Some("cilium/state/ip/v1/default/10.2.0.40"), Duration::from_secs(10));
    let (code, metrics) = http_get(agent.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let value = |name: &str| -> Option<f64> {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    };
    assert_eq!(value("kvcheck_findings{kind=\"kvstore-malformed\"}"), Some(1.0), "{metrics}");
    assert_eq!(value("kvcheck_findings{kind=\"ipcache-stale\"}"), Some(0.0));
    assert_eq!(value("kvcheck_etcd_endpoints_connected"), Some(1.0));
    assert!(value("kvcheck_last_successful_check_timestamp_seconds").is_some_and(|t| t > 1.7e9));
    assert!(metrics.contains("kvcheck_check_duration_seconds_bucket"));
    assert!(metrics.contains("kvcheck_change_events_total{source=\"kvstore\"}"));
    assert_eq!(http_get(agent.port, "/healthz").map(|(c, _)| c), Some(200));
    node.etcd_del("cilium/state/ip/v1/default/10.2.0.40").unwrap();
    agent.wait_for("finding-resolved", Some("kvstore-malformed"), None, Duration::from_secs(5));

    // SIGTERM: a clean stop within a few seconds.
    let t2 = Instant::now();
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(t2.elapsed() < Duration::from_secs(5), "agent did not stop within 5 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn agent_survives_etcd_outage_and_catches_up() {
    if !require_root("agent_survives_etcd_outage_and_catches_up") {
        return;
    }
    let mut node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let agent = Agent::start(&node, &["--etcd-timeout", "1"]);
    node.etcd.kill(0);
    let (failed, _) = loop {
        let (h, at) = agent.wait_for("node-health", None, None, Duration::from_secs(15));
        if h["status"] == "failed" {
            break (h, at);
        }
    };
    assert!(failed["etcd"].as_str().unwrap().contains("0/1 connected"), "{failed}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(agent.port, "/readyz").is_some_and(|(c, _)| c == 200) {
        assert!(Instant::now() < deadline, "/readyz still ready with etcd down");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While etcd is down the datapath drifts; when it is back the agent catches up by itself.
    node.ipcache_put("10.9.9.8/32", IpcacheValue { identity: 1000, ..Default::default() }).unwrap();
    node.etcd.restart(0).unwrap();
    agent.wait_for("finding-opened", Some("ipcache-stale"), Some("10.9.9.8/32"), Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(agent.port, "/readyz").is_some_and(|(c, _)| c == 200) {
        assert!(Instant::now() < deadline, "/readyz not ready after etcd came back");
        std::thread::sleep(Duration::from_millis(100));
    }
}
