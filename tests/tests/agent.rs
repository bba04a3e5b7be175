//! `kvcheck agent` against a simulated node (real maps, netns, etcd): findings open after the
//! grace period and resolve after repair, malformed values are reported and the agent goes on,
//! /metrics, /healthz and /readyz answer, SIGTERM stops it; a 3-member TLS cluster losing one
//! and then all members, a compacted watch revision, and Cilium re-creating its maps.

use std::time::{Duration, Instant};

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::{http_get, pair, Agent};
use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, ip_json, NodeSpec, NODE_B_IP, REMOTE_PODS};
use serde_json::Value;

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

    // A drift in the map, then one in etcd (a pod the ipcache lacks): each opened within 1 s of
    // the grace period (1 s) ending, and resolved within 1 s of the repair.
    let stale = IpcacheValue { identity: 1000, tunnel_endpoint: Some(NODE_B_IP.parse().unwrap()), ..Default::default() };
    agent.opens_and_resolves("ipcache-stale", "10.9.9.9/32", || node.ipcache_put("10.9.9.9/32", stale).unwrap(), || node.ipcache_delete("10.9.9.9/32").unwrap());
    let key = "cilium/state/ip/v1/default/10.2.0.41";
    let pod = ip_json("10.2.0.41", NODE_B_IP, 1000, "node-b", 41);
    agent.opens_and_resolves("ipcache-missing", "10.2.0.41/32", || node.etcd_put(key, &pod).unwrap(), || node.etcd_del(key).unwrap());

    // A malformed value: reported, and the agent goes on.
    node.etcd_put("cilium/state/ip/v1/default/10.2.0.40", "{\"IP\":").unwrap();
    agent.wait_for("finding-opened", Some("kvstore-malformed"), Some("cilium/state/ip/v1/default/10.2.0.40"), Duration::from_secs(10));
    let (code, metrics) = http_get(agent.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let value = |name: &str| -> Option<f64> {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    };
    // The sample of `name` whose labels include every one of `labels` (in any order).
    let labelled = |name: &str, labels: &[&str]| -> Option<f64> {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|p| l.contains(p)))?;
        line.rsplit(' ').next()?.parse().ok()
    };
    assert_eq!(labelled("kvcheck_findings", &["kind=\"kvstore-malformed\"", "severity=\"warning\"", "node=\"node-a\""]), Some(1.0), "{metrics}");
    assert_eq!(labelled("kvcheck_findings", &["kind=\"ipcache-stale\"", "severity=\"critical\""]), Some(0.0));
    assert_eq!(value("kvcheck_etcd_endpoints_connected"), Some(1.0));
    assert!(value("kvcheck_last_successful_check_timestamp_seconds").is_some_and(|t| t > 1.7e9));
    assert!(metrics.contains("kvcheck_check_duration_seconds_bucket"));
    assert!(metrics.lines().any(|l| l.starts_with("kvcheck_change_events_total{") && l.contains("source=\"kvstore\"")), "{metrics}");
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

#[test]
fn agent_rides_out_member_loss_in_a_three_member_tls_cluster() {
    if !require_root("agent_rides_out_member_loss_in_a_three_member_tls_cluster") {
        return;
    }
    let spec = NodeSpec { three_member_tls: true, ..NodeSpec::new(Layout::V1_15, false) };
    let mut node = consistent_node(spec).unwrap();
    let agent = Agent::start(&node, &["--etcd-timeout", "2"]);
    agent.wait_health("ok", "3/3 connected", Duration::from_secs(10));

    // One member down: the agent keeps checking and says 2/3; a change made through the
    // remaining members is seen, and nothing else is reported.
    node.etcd.kill(1);
    let h = agent.wait_health("degraded", "2/3 connected", Duration::from_secs(15));
    assert!(h["etcd"].as_str().unwrap().contains("leader"), "{h}");
    node.etcd_put("cilium/state/ip/v1/default/10.2.0.77", &ip_json("10.2.0.77", NODE_B_IP, 1000, "node-b", 77)).unwrap();
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.2.0.77/32"), Duration::from_secs(10));
    node.etcd_del("cilium/state/ip/v1/default/10.2.0.77").unwrap();
    agent.wait_for("finding-resolved", Some("ipcache-missing"), Some("10.2.0.77/32"), Duration::from_secs(10));

    // All down: failed, unready, still running.
    node.etcd.kill(0);
    node.etcd.kill(2);
    agent.wait_health("failed", "0/3 connected", Duration::from_secs(20));
    agent.wait_readyz(503, Duration::from_secs(10));
    // Meanwhile the datapath drifts; when the members are back the agent catches up by itself.
    node.ipcache_put("10.9.9.7/32", IpcacheValue { identity: 1000, ..Default::default() }).unwrap();
    node.etcd.restart_all().unwrap();
    agent.wait_for("finding-opened", Some("ipcache-stale"), Some("10.9.9.7/32"), Duration::from_secs(30));
    agent.wait_readyz(200, Duration::from_secs(10));
    agent.wait_health("degraded", "3/3 connected", Duration::from_secs(10));
    let opened = agent.opened();
    assert_eq!(opened, vec![pair("ipcache-missing", "10.2.0.77/32"), pair("ipcache-stale", "10.9.9.7/32")], "false findings reported");
}

#[test]
fn agent_relists_after_a_compacted_watch_revision() {
    if !require_root("agent_relists_after_a_compacted_watch_revision") {
        return;
    }
    let mut node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let agent = Agent::start(&node, &["--etcd-timeout", "2"]);
    agent.wait_health("ok", "1/1 connected", Duration::from_secs(10));

    // The agent is frozen while its etcd restarts (its watch connection dies unread), keys
    // change and the history is compacted: on resume its watch revision is gone and it must
    // relist.
    // SAFETY: signals to our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGSTOP) };
    node.etcd.kill(0);
    node.etcd.restart(0).unwrap();
    node.etcd_put("cilium/state/ip/v1/default/10.2.0.78", &ip_json("10.2.0.78", NODE_B_IP, 1000, "node-b", 78)).unwrap();
    node.etcd_del(&format!("cilium/state/ip/v1/default/{}", REMOTE_PODS[0].0)).unwrap();
    node.etcd_put("cilium/state/ip/v1/default/10.2.0.79", &ip_json("10.2.0.79", NODE_B_IP, 1000, "node-b", 79)).unwrap();
    node.etcd_del("cilium/state/ip/v1/default/10.2.0.79").unwrap();
    let rev = node.etcd.revision().unwrap();
    node.etcd.etcdctl_ok(&["compact", &rev.to_string(), "--physical"]).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGCONT) };

    agent.wait_for("kvstore-relist", None, None, Duration::from_secs(20));
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.2.0.78/32"), Duration::from_secs(10));
    let stale = format!("{}/32", REMOTE_PODS[0].0);
    agent.wait_for("finding-opened", Some("ipcache-stale"), Some(&stale), Duration::from_secs(10));
    // A few more checks go by: still exactly these two, each reported once.
    agent.wait_health("degraded", "1/1 connected", Duration::from_secs(10));
    agent.wait_health("degraded", "1/1 connected", Duration::from_secs(10));
    let mut opened = agent.opened();
    opened.sort();
    assert_eq!(opened, vec![pair("ipcache-missing", "10.2.0.78/32"), pair("ipcache-stale", &stale)]);
    // And they are what a one-shot check of the same node finds.
    let out = node.check(&["--cilium-version", "1.16", "--output", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut found: Vec<(String, String)> = doc["findings"].as_array().unwrap().iter().map(|f| (f["kind"].as_str().unwrap().to_owned(), f["subject"].as_str().unwrap().to_owned())).collect();
    found.sort();
    assert_eq!(found, opened);
}

fn reopens_maps_after_cilium_recreates_them(extra: &[&str], source: &str) {
    let mut node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let agent = Agent::start(&node, extra);
    agent.wait_health("ok", "1/1 connected", Duration::from_secs(10));

    // Cilium restarts and re-creates its ipcache and endpoint maps under the same pins.
    node.maps.ipcache.recreate().unwrap();
    node.maps.endpoints.recreate().unwrap();
    let (reopen, _) = agent.wait_for("datapath-reopen", None, None, Duration::from_secs(15));
    assert!(reopen["reason"].as_str().unwrap().contains("re-created"), "{reopen}");
    // The new maps are the ones checked and followed.
    node.ipcache_put("10.9.9.6/32", IpcacheValue { identity: 1000, ..Default::default() }).unwrap();
    agent.wait_for("finding-opened", Some("ipcache-stale"), Some("10.9.9.6/32"), Duration::from_secs(15));
    node.ipcache_delete("10.9.9.6/32").unwrap();
    agent.wait_for("finding-resolved", Some("ipcache-stale"), Some("10.9.9.6/32"), Duration::from_secs(10));
    // An entry changed in place: compared with the live check's copy of the ipcache.
    let remote = format!("{}/32", REMOTE_PODS[0].0);
    let via_b = |identity| IpcacheValue { identity, tunnel_endpoint: Some(NODE_B_IP.parse().unwrap()), ..Default::default() };
    node.ipcache_put(&remote, via_b(1002)).unwrap();
    agent.wait_for("finding-opened", Some("ipcache-identity-mismatch"), Some(&remote), Duration::from_secs(15));
    node.ipcache_put(&remote, via_b(REMOTE_PODS[0].2)).unwrap();
    agent.wait_for("finding-resolved", Some("ipcache-identity-mismatch"), Some(&remote), Duration::from_secs(10));
    // An entry kvcheck cannot decode (address family 9) is reported as a change once (the maps
    // are re-read), not at every poll; so is its removal.
    let changes = || {
        let (_, m) = http_get(agent.port, "/metrics").unwrap();
        m.lines().filter(|l| l.starts_with("kvcheck_change_events_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>()
    };
    let mut key = kvcheck_tests::encode::ipcache_key(Layout::V1_15, "10.9.9.7/32".parse().unwrap(), 0);
    key[7] = 9;
    let before = changes();
    node.maps.ipcache.update(&key, &kvcheck_tests::encode::ipcache_value(Layout::V1_15, via_b(1000))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while changes() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let seen = changes();
    assert!(seen > before, "the undecodable entry was not seen");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(changes(), seen, "the undecodable entry was reported again");
    node.maps.ipcache.delete(&key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while changes() == seen && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(changes() > seen, "the undecodable entry's removal was not seen");
    assert_eq!(agent.opened(), vec![pair("ipcache-stale", "10.9.9.6/32"), pair("ipcache-identity-mismatch", &remote)]);
    let (code, metrics) = http_get(agent.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.lines().any(|l| l.starts_with("kvcheck_change_events_total{") && l.contains(&format!("source=\"{source}\""))), "{metrics}");
    // The polling fallback is logged once, not at every re-open.
    assert_eq!(agent.count("change-events-fallback"), usize::from(source == "poll"));
}

#[test]
fn agent_reopens_maps_after_cilium_recreates_them() {
    if !require_root("agent_reopens_maps_after_cilium_recreates_them") {
        return;
    }
    reopens_maps_after_cilium_recreates_them(&[], "ebpf");
}

#[test]
fn agent_polls_when_change_events_are_off_and_says_so_once() {
    if !require_root("agent_polls_when_change_events_are_off_and_says_so_once") {
        return;
    }
    reopens_maps_after_cilium_recreates_them(&["--no-ebpf", "--poll-interval", "200ms"], "poll");
}

/// The agent listens on the host network: a client sending its headers slowly is cut off after
/// the header timeout (5 s), and connections over the cap (32) are closed on accept while the
/// open ones are still served.
#[test]
fn agent_http_endpoints_resist_slow_and_many_clients() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    if !require_root("agent_http_endpoints_resist_slow_and_many_clients") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let agent = Agent::start(&node, &[]);
    agent.wait_for("node-health", None, None, Duration::from_secs(5));
    assert_eq!(http_get(agent.port, "/healthz"), Some((200, "ok\n".into())));
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // Slow headers: a line every 2 s, never the blank line that ends them.
    let mut slow = connect();
    let started = Instant::now();
    let mut closed_after = None;
    write!(slow, "GET /metrics HTTP/1.1\r\n").unwrap();
    for i in 0..8 {
        std::thread::sleep(Duration::from_secs(2));
        if write!(slow, "X-Slow-{i}: 1\r\n").is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        slow.set_nonblocking(true).unwrap();
        let r = slow.read(&mut buf);
        slow.set_nonblocking(false).unwrap();
        if matches!(r, Ok(_)) {
            // EOF or the server's timeout response: the connection is done.
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("a slow client was not cut off within 16 s");
    assert!(closed_after >= Duration::from_secs(4) && closed_after <= Duration::from_secs(9), "cut off after {closed_after:?}");

    // The cap: 32 open connections (one of them used), the 33rd closed at once.
    let mut open: Vec<TcpStream> = (0..32).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = connect();
    let mut buf = [0u8; 64];
    let _ = write!(extra, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(matches!(extra.read(&mut buf), Ok(0) | Err(_)), "a 33rd connection was served");
    let used = &mut open[0];
    write!(used, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    used.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(open);
    // Freed connections make room again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http_get(agent.port, "/metrics").map(|(c, _)| c), Some(200));
}

/// A watch stream that stays open but delivers nothing (the connection frozen on its path while
/// fresh connections, and so the health probes, still answer): the agent asks for progress
/// after --watch-progress-interval, takes the silence as a stall, reconnects and resumes, and a
/// change made during the freeze is reported; the stall is counted.
#[test]
fn agent_notices_a_stalled_watch_and_resumes() {
    if !require_root("agent_notices_a_stalled_watch_and_resumes") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let target: std::net::SocketAddr = node.etcd.endpoints()[0].trim_start_matches("http://").parse().unwrap();
    let relay = kvcheck_tests::relay::Relay::start(target);
    let agent = Agent::start_via(&node, &[relay.endpoint()], "1s", &["--watch-progress-interval", "2s", "--etcd-timeout", "2"]);
    // The watch is open (a change through it is seen) before its path freezes.
    let key = "cilium/state/ip/v1/default/10.2.0.87";
    agent.opens_and_resolves("ipcache-missing", "10.2.0.87/32", || node.etcd_put(key, &ip_json("10.2.0.87", NODE_B_IP, 1000, "node-b", 87)).unwrap(), || node.etcd_del(key).unwrap());
    relay.freeze_open_connections();
    let frozen = Instant::now();
    // Past the relay's in-flight reads (50 ms).
    std::thread::sleep(Duration::from_millis(300));
    let key = "cilium/state/ip/v1/default/10.2.0.88";
    node.etcd_put(key, &ip_json("10.2.0.88", NODE_B_IP, 1000, "node-b", 88)).unwrap();
    let (stall, _) = agent.wait_for("kvstore-watch-error", None, None, Duration::from_secs(15));
    assert!(stall["error"].as_str().unwrap_or_default().contains("watch stalled"), "{stall}");
    // Before HTTP/2 keepalive (15 s + the timeout) would have cut the connection.
    assert!(frozen.elapsed() < Duration::from_secs(12), "stall seen after {:?}", frozen.elapsed());
    agent.wait_for("finding-opened", Some("ipcache-missing"), Some("10.2.0.88/32"), Duration::from_secs(15));
    let metrics = http_get(agent.port, "/metrics").unwrap().1;
    assert!(metrics.lines().any(|l| l.starts_with("kvcheck_kvstore_watch_stalls{") && l.ends_with(" 1")), "{metrics}");
}

/// `--listen-tls-cert/--listen-tls-key`: the endpoints speak TLS (verified against the CA), plain
/// HTTP gets no answer, and a key that does not match exits with a clear error.
#[test]
fn agent_serves_its_endpoints_over_tls() {
    if !require_root("agent_serves_its_endpoints_over_tls") {
        return;
    }
    use std::io::Write as _;
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let tls = kvcheck_tests::etcd::Tls::generate().unwrap();
    let port = kvcheck_tests::agent::free_port();
    let mut args = node.check_args();
    args[0] = "agent".into();
    args.extend(["--listen".to_owned(), format!("127.0.0.1:{port}"), "--listen-tls-cert".into(), tls.server_cert.display().to_string(), "--listen-tls-key".into(), tls.server_key.display().to_string()]);
    let mut child = std::process::Command::new(kvcheck_tests::kvcheck_bin()).args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let get = |path: &str| -> String {
        let mut c = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
            .arg(&tls.ca)
            .args(["-verify_return_error", "-quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _ = c.stdin.take().unwrap().write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes());
        String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get("/readyz").starts_with("HTTP/1.0 200") && !get("/readyz").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "no TLS /readyz 200 within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(get("/metrics").contains("kvcheck_ready"), "no metrics over TLS");
    assert_eq!(http_get(port, "/metrics").map(|(c, _)| c), None, "plain HTTP must not be answered");
    let _ = child.kill();
    let _ = child.wait();
    // Certificate and key that do not go together: a clear error, exit 1 (the agent's), no panic.
    let mut bad = args.clone();
    let key_at = bad.iter().position(|a| a == "--listen-tls-key").unwrap() + 1;
    bad[key_at] = tls.client_key.display().to_string();
    let out = kvcheck_tests::run_kvcheck(None, &bad.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("do not go together") && !stderr.contains("panicked"), "{stderr}");
}
