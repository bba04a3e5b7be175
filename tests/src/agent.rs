//! `kvcheck agent` run as a child process against a simulated node, with its JSON log lines
//! collected: shared by the agent, hold-off and churn tests and the benchmarks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::simnode::SimulatedNode;

pub struct Agent {
    pub child: Child,
    pub logs: mpsc::Receiver<Value>,
    pub port: u16,
    /// Every log line received so far (the tests check what else was reported).
    pub seen: std::cell::RefCell<Vec<Value>>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
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
    /// An agent with a 1 s grace period.
    pub fn start(node: &SimulatedNode, extra: &[&str]) -> Agent {
        Self::start_with(node, "1s", extra)
    }

    pub fn start_with(node: &SimulatedNode, grace: &str, extra: &[&str]) -> Agent {
        Self::start_via(node, &node.etcd.endpoints(), grace, extra)
    }

    /// An agent reaching etcd through `endpoints` (a proxy's, say).
    pub fn start_via(node: &SimulatedNode, endpoints: &[String], grace: &str, extra: &[&str]) -> Agent {
        let port = free_port();
        let mut args = node.check_args_via(endpoints);
        args[0] = "agent".into();
        args.extend(["--grace", grace, "--health-interval", "1s", "--listen", &format!("127.0.0.1:{port}"), "--cilium-version", "1.16"].map(String::from));
        args.extend(extra.iter().map(ToString::to_string));
        let mut child = Command::new(crate::kvcheck_bin()).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
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
        let agent = Agent { child, logs: rx, port, seen: Default::default() };
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
    pub fn wait_for(&self, event: &str, kind: Option<&str>, subject: Option<&str>, timeout: Duration) -> (Value, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(v) = self.logs.recv_timeout(left) else {
                let seen = self.seen.borrow();
                let recent: Vec<String> = seen.iter().rev().take(40).rev().map(ToString::to_string).collect();
                panic!("no {event} {kind:?} {subject:?} within {timeout:?}; last lines:\n{}", recent.join("\n"));
            };
            self.seen.borrow_mut().push(v.clone());
            if v["event"] == event && kind.is_none_or(|k| v["kind"] == k) && subject.is_none_or(|s| v["subject"] == s) {
                return (v, Instant::now());
            }
        }
    }
}

impl Agent {
    /// Waits for a node-health line whose etcd status contains `etcd` and whose status is `status`.
    pub fn wait_health(&self, status: &str, etcd: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (h, _) = self.wait_for("node-health", None, None, left);
            if h["status"] == status && h["etcd"].as_str().is_some_and(|e| e.contains(etcd)) {
                return h;
            }
        }
    }

    /// Injects a drift, expects it opened within 1 s of the 1 s grace period ending; repairs
    /// it, expects it resolved within 1 s.
    pub fn opens_and_resolves(&self, kind: &str, subject: &str, inject: impl FnOnce(), repair: impl FnOnce()) {
        let t0 = Instant::now();
        inject();
        let (opened, at) = self.wait_for("finding-opened", Some(kind), Some(subject), Duration::from_secs(10));
        let took = at - t0;
        assert!(took >= Duration::from_secs(1) && took <= Duration::from_millis(2000 + 300), "opened after {took:?}: {opened}");
        let t1 = Instant::now();
        repair();
        let (_, at) = self.wait_for("finding-resolved", Some(kind), Some(subject), Duration::from_secs(5));
        assert!(at - t1 <= Duration::from_millis(1300), "{kind} {subject} resolved after {:?}", at - t1);
    }

    pub fn readyz(&self) -> Option<u16> {
        http_get(self.port, "/readyz").map(|(c, _)| c)
    }

    /// Waits until /readyz answers `code`.
    pub fn wait_readyz(&self, code: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.readyz() != Some(code) {
            assert!(Instant::now() < deadline, "/readyz not {code} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads what is queued without waiting, then returns the (kind, subject) of every
    /// finding-opened line seen so far, and how many of each event.
    pub fn opened(&self) -> Vec<(String, String)> {
        while let Ok(v) = self.logs.try_recv() {
            self.seen.borrow_mut().push(v);
        }
        self.seen.borrow().iter().filter(|v| v["event"] == "finding-opened").map(|v| (v["kind"].as_str().unwrap_or_default().to_owned(), v["subject"].as_str().unwrap_or_default().to_owned())).collect()
    }

    pub fn count(&self, event: &str) -> usize {
        self.opened();
        self.seen.borrow().iter().filter(|v| v["event"] == event).count()
    }
}

pub fn pair(kind: &str, subject: &str) -> (String, String) {
    (kind.to_owned(), subject.to_owned())
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
